"""AUTOMATIC1111's prompt syntax: the parse, LoRA tags, 75-token chunks, and the two emphasis rules.

Parse cases: the first six are the doctests of `parse_prompt_attention` in AUTOMATIC1111's
modules/prompt_parser.py (stable-diffusion-webui, commit 28bd8e1); the others' expected lists were produced by
running that same function on those prompts. Weights compare exactly: the parse multiplies in A1111's order.
"""
import pytest
import torch

from gesso import models
from gesso.engine.sampling import prompt

A1111_PARSE = [
    # doctests of parse_prompt_attention
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    ("\\(literal\\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
     [("a ", 1.0), ("house", 1.5730000000000004), (" ", 1.1), ("on", 1.0), (" a ", 1.1), ("hill", 0.55),
      (", sun, ", 1.1), ("sky", 1.4641000000000006), (".", 1.1)]),
    # produced by running A1111's parse_prompt_attention
    ("(looking up:2.4)", [("looking up", 2.4)]),
    ("((masterpiece)), best quality", [("masterpiece", 1.2100000000000002), (", best quality", 1.0)]),
    ("[[blurry]]", [("blurry", 0.8264462809917354)]),
    ("(red:1.5) [blue] ((green))", [("red", 1.5), (" ", 1.0), ("blue", 0.9090909090909091), (" ", 1.0), ("green", 1.2100000000000002)]),
    ("(a (b:0.5) c:2)", [("a ", 2.0), ("b", 1.0), (" c", 2.0)]),  # nesting multiplies
    ("( spaced : 1.2 )", [(" spaced ", 1.2)]),
    ("(negative:-1)", [("negative", -1.0)]),
    ("(dot:.5)", [("dot", 0.5)]),
    ("a:b:c", [("a:b:c", 1.0)]),
    ("(a:b)", [("a:b", 1.1)]),  # not a number: text, and the bracket is a plain 1.1
    ("x) y] z", [("x) y] z", 1.0)]),  # unmatched closers are text
    ("[unclosed square", [("unclosed square", 0.9090909090909091)]),
    ("a\\b", [("ab", 1.0)]),  # a lone backslash vanishes
    ("a \\\\ b", [("a \\ b", 1.0)]),
    ("(nested [mixed] parens)", [("nested ", 1.1), ("mixed", 1.0), (" parens", 1.1)]),
    ("[(cancel)]", [("cancel", 1.0)]),
    ("", [("", 1.0)]),
    ("a BREAK b", [("a", 1.0), ("BREAK", -1), ("b", 1.0)]),
    ("BREAK start", [("", 1.0), ("BREAK", -1), ("start", 1.0)]),
    ("a BREAKfast", [("a BREAKfast", 1.0)]),
    ("1girl, solo, (smile:1.2), BREAK, blue sky",
     [("1girl, solo, ", 1.0), ("smile", 1.2), (",", 1.0), ("BREAK", -1), (", blue sky", 1.0)]),
    ("\\(1girl\\), (hat:0.8)", [("(1girl), ", 1.0), ("hat", 0.8)]),
    ("((a)):1.2)", [("a", 1.2100000000000002), (":1.2)", 1.0)]),
    ("(a:1.2:1.3)", [("a:1.2", 1.3)]),
    ("(emb:1e2)", [("emb:1e2", 1.1)]),  # exponents are not weights
    ("line one\nline (two)", [("line one\nline ", 1.0), ("two", 1.1)]),
]


@pytest.mark.parametrize("text,expected", A1111_PARSE)
def test_parse_matches_a1111(text, expected):
    assert prompt.parse_attention(text) == [(t, float(w)) for t, w in expected]


def test_break_inside_brackets_still_breaks():
    # deliberate difference: A1111 scales BREAK's -1 marker to -1.1 here and then encodes the word "BREAK"
    assert prompt.parse_attention("(a BREAK b)") == [("a", 1.1), ("BREAK", -1.0), ("b", 1.1)]


@pytest.mark.parametrize("text,clean,tags", [
    ("a <lora:demo:0.8> cat", "a  cat", [prompt.LoraTag("demo", 0.8, 0.8)]),
    ("<lora:demo>", "", [prompt.LoraTag("demo", 1.0, 1.0)]),  # no strength: 1
    ("x <lora:demo-000002:0.5:0.7>", "x ", [prompt.LoraTag("demo-000002", 0.7, 0.5)]),  # te then unet
    ("<lora:d:te=0.2:unet=0.9>", "", [prompt.LoraTag("d", 0.9, 0.2)]),
    ("<hypernet:h:1> cat", " cat", []),  # other networks are removed, not applied
    ("# a comment\ncat <lora:d:1>", "cat ", [prompt.LoraTag("d", 1.0, 1.0)]),
])
def test_lora_tags(text, clean, tags):
    assert prompt.extract_lora_tags(text) == (clean, tags)


def test_bad_lora_strength_is_an_error():
    with pytest.raises(prompt.PromptError, match="numbers"):
        prompt.extract_lora_tags("<lora:demo:strong>")


@pytest.fixture(scope="module")
def tiny():
    cfg = models.configs.get("tiny-sdxl")
    return models.build(cfg, seed=0).eval(), models.load_tokenizers(cfg)


def test_chunks_match_models_tokenize_without_syntax(tiny):
    _, toks = tiny
    text = "cat " * 100  # 100 tokens: chunks of 75 and 25
    ids, weights = prompt.tokenize_weighted(toks, [text, "dog"])
    expected = models.tokenize(toks, [text, "dog"])
    for ours, ref in zip(ids, expected):
        assert ours.shape == (2, 154)
        assert torch.equal(ours, ref)  # start/end per chunk, CLIP-L pads with 49407, bigG with 0
    assert torch.equal(weights[0], torch.ones(2, 154))


def test_break_and_comma_backtrack_start_new_chunks(tiny):
    _, (tok, _) = tiny
    cat, dog, comma = (tok.convert_tokens_to_ids(t) for t in ("cat</w>", "dog</w>", ",</w>"))
    ids, _ = prompt.tokenize_weighted([tok], ["cat BREAK dog"])
    assert ids[0].shape == (1, 154)
    assert ids[0][0, :4].tolist() == [49406, cat, 49407, 49407] and ids[0][0, 77:80].tolist() == [49406, dog, 49407]
    # 70 cats, a comma, 10 dogs: the chunk is full at 75 with a comma 5 tokens back, so it is cut after the comma
    ids, _ = prompt.tokenize_weighted([tok], ["cat " * 70 + ", " + "dog " * 10])
    row = ids[0][0].tolist()
    assert row[70:73] == [cat, comma, 49407] and row[77:79] == [49406, dog] and row[78:88] == [dog] * 10


def test_weights_follow_tokens(tiny):
    _, toks = tiny
    _, weights = prompt.tokenize_weighted(toks, ["(cat:1.5) [dog]"])
    assert weights[0][0, :4].tolist() == pytest.approx([1.0, 1.5, 1 / 1.1, 1.0])


def test_unweighted_encoding_is_the_models(tiny):
    sd, toks = tiny
    plain = sd.encode_text(models.tokenize(toks, ["a cat on a mat"]))
    for emphasis in prompt.EMPHASIS:
        context, pooled = prompt.encode(sd, toks, ["a cat on a mat"], emphasis)
        assert torch.allclose(context, plain[0], atol=1e-6) and torch.allclose(pooled, plain[1], atol=1e-6)


def test_a1111_emphasis_scales_then_restores_mean(tiny):
    sd, toks = tiny
    z, pooled_plain = sd.encode_text(models.tokenize(toks, ["cat dog"]))  # fragments tokenise to the same ids
    zw, pooled = prompt.encode(sd, toks, ["(cat:1.5) dog"], "a1111")
    assert torch.allclose(pooled, pooled_plain, atol=1e-6)  # the pooled output is not weighted
    for part in (slice(0, 32), slice(32, 96)):  # CLIP-L, then bigG channels of the tiny model
        a, b = z[0, :, part], zw[0, :, part]
        assert torch.allclose(b.mean(), a.mean(), atol=1e-6)
        c = b[2] / a[2]  # the common rescale factor, read off an unweighted token
        assert torch.allclose(b[1], 1.5 * c * a[1], atol=1e-5)
        assert not torch.allclose(b[1], a[1], atol=1e-3)


def test_a1111_emphasis_of_states_with_mean_zero_is_finite():
    # a bias-free final layer norm (random init) can give states whose mean is exactly 0: no 0/0
    z = torch.tensor([[[1.0, -1.0], [2.0, -2.0]]])
    assert torch.equal(prompt.emphasis_a1111(z, torch.ones(1, 2)), z)
    weighted = prompt.emphasis_a1111(z, torch.tensor([[1.5, 1.0]]))
    assert torch.equal(weighted, z * torch.tensor([1.5, 1.0])[None, :, None])  # scaled, the mean 0 kept


def test_comfy_emphasis_moves_away_from_empty_prompt(tiny):
    sd, toks = tiny
    z, _ = sd.encode_text(models.tokenize(toks, ["cat dog"]))
    empty, _ = sd.encode_text(models.tokenize(toks, [""]))
    zw, _ = prompt.encode(sd, toks, ["(cat:1.5) dog"], "comfy")
    assert torch.allclose(zw[0, 1], empty[0, 1] + 1.5 * (z[0, 1] - empty[0, 1]), atol=1e-5)
    assert torch.allclose(zw[0, 2:], z[0, 2:], atol=1e-6)  # weight-1 tokens untouched
