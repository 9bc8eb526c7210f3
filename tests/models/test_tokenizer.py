import shutil

import pytest
import torch

from gesso import models
from gesso.models.configs import TINY_SD15, TINY_SDXL
from gesso.models.tokenizer import SHIPPED

START, END = 49406, 49407


@pytest.fixture(scope="module")
def tokenizers():
    return models.load_tokenizers(TINY_SDXL)


def test_short_prompt_matches_transformers_padding(tokenizers):
    clip_l, big_g = tokenizers
    prompt = "a photo of sks dog, Watercolour!"
    ids_l, ids_g = models.tokenize(tokenizers, [prompt])
    reference = clip_l(prompt, padding="max_length", max_length=77).input_ids  # CLIPTokenizer pads with <|endoftext|>
    assert ids_l[0].tolist() == reference
    n = len(clip_l(prompt, add_special_tokens=False).input_ids)
    assert ids_g[0, : n + 2].tolist() == reference[: n + 2]
    assert (ids_g[0, n + 2 :] == 0).all()  # bigG pads with 0
    assert (ids_l[0, n + 2 :] == END).all()


def test_long_prompts_split_into_75_token_chunks(tokenizers):
    long_prompt = " ".join(["red", "cat", "under", "blue", "tree"] * 34)  # 170 one-token words
    body = tokenizers[0](long_prompt, add_special_tokens=False).input_ids
    assert len(body) == 170  # three chunks: 75 + 75 + 20
    ids_l, ids_g = models.tokenize(tokenizers, [long_prompt, "short"])
    assert ids_l.shape == ids_g.shape == (2, 231)
    for c in range(3):
        chunk = ids_l[0, 77 * c : 77 * (c + 1)].tolist()
        part = body[75 * c : 75 * (c + 1)]
        assert chunk[: len(part) + 2] == [START] + part + [END]
    # the short prompt is padded to three chunks: its own, then empty [start, end, pad...] chunks
    assert ids_g[1, 77:79].tolist() == [START, END] and (ids_g[1, 79:154] == 0).all()
    assert ids_l[1, 154:].tolist() == [START] + [END] * 76


def test_exactly_75_tokens_is_one_chunk_and_empty_prompt_is_one(tokenizers):
    body = tokenizers[0](" ".join(["cat"] * 200), add_special_tokens=False).input_ids
    assert len(set(body)) == 1
    prompt = " ".join(["cat"] * 75)
    (ids,) = models.tokenize(tokenizers[:1], [prompt])
    assert ids.shape == (1, 77) and ids[0, -1].item() == END
    (ids,) = models.tokenize(tokenizers[:1], [""])
    assert ids[0].tolist() == [START] + [END] * 76


def test_diffusers_style_folder_is_read_per_encoder(tmp_path):
    shutil.copytree(SHIPPED, tmp_path / "tokenizer")
    shutil.copytree(SHIPPED, tmp_path / "tokenizer_2")
    toks = models.load_tokenizers(TINY_SDXL, tmp_path)
    assert [t.pad_token_id for t in toks] == [END, 0]
    assert [t.pad_token_id for t in models.load_tokenizers(TINY_SD15)] == [END]
    with pytest.raises(FileNotFoundError, match="merges.txt"):
        (tmp_path / "tokenizer_2" / "merges.txt").unlink()
        models.load_tokenizers(TINY_SDXL, tmp_path)


def test_tokens_feed_encode_text(tokenizers):
    model = models.build("tiny-sdxl")
    with torch.no_grad():
        context, pooled = model.encode_text(models.tokenize(tokenizers, ["a " * 100, "b"]))
    assert context.shape == (2, 154, 96) and pooled.shape == (2, 64)
