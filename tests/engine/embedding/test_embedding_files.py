"""Textual-inversion files as the consumers read them, loaded into diffusers' load_textual_inversion on tiny text
encoders (transformers' CLIP, converted from the engine's weights): the same text-encoder output as the engine's own.

Layouts: AUTOMATIC1111 modules/textual_inversion/textual_inversion.py (a safetensors of one tensor, kohya's
`emb_params`; SDXL `clip_g` and `clip_l`), ComfyUI comfy/sd1_clip.py load_embed (`clip_l` / `clip_g` by embed_key).
"""
import sys
from pathlib import Path

import pytest
import torch
from diffusers.loaders import TextualInversionLoaderMixin
from safetensors.torch import load_file, save_file

from gesso import models
from gesso.engine.embedding import vectors as embedding

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "models"))
from models_testutil import SDXL_BIGG, hf_clip, hf_openclip, rel_err  # noqa: E402

PROMPT = "a photo of {}, best quality"


class Host(TextualInversionLoaderMixin):
    """The part of a diffusers pipeline load_textual_inversion touches: no offloading hooks, no components."""

    hf_device_map = None
    components: dict = {}


def write(folder: Path, name: str, vectors: list[torch.Tensor]) -> Path:
    path = folder / f"{name}.safetensors"
    embedding.save_embedding(path, embedding.file_tensors(vectors, torch.float32), {})
    return path


def reference_context(name: str, sd, path: Path, prompt: str):
    """diffusers: load the file into transformers' encoders and tokenizers, expand the prompt as a pipeline does."""
    state = sd.state_dict()
    tokenizers = models.load_tokenizers(sd.cfg)
    host = Host()
    if name == "tiny-sd15":
        encoders = [hf_clip(sd.text_encoders[0].cfg, state)]
        host.load_textual_inversion(str(path), token="mytok", tokenizer=tokenizers[0], text_encoder=encoders[0])
    else:  # diffusers' documented SDXL recipe: the file's clip_l into text_encoder, clip_g into text_encoder_2
        encoders = [hf_clip(sd.text_encoders[0].cfg, state), hf_openclip(sd.text_encoders[1].cfg, state, prefix=SDXL_BIGG)]
        file = load_file(path)
        for key, tok, enc in zip(("clip_l", "clip_g"), tokenizers, encoders):
            host.load_textual_inversion(file[key], token="mytok", tokenizer=tok, text_encoder=enc)
    ids = models.tokenize(tokenizers, [host.maybe_convert_prompt(prompt, tokenizers[0])])
    outs = [enc(i, output_hidden_states=True) for enc, i in zip(encoders, ids)]
    if name == "tiny-sd15":
        return outs[0].last_hidden_state, None
    return torch.cat([o.hidden_states[-2] for o in outs], dim=-1), outs[1].text_embeds


@torch.no_grad()
@pytest.mark.parametrize("name,keys", [("tiny-sd15", {"emb_params"}), ("tiny-sdxl", {"clip_l", "clip_g"})])
def test_file_loads_in_diffusers_with_the_engines_output(tmp_path, name, keys):
    sd = models.build(name, seed=3)
    g = torch.Generator().manual_seed(1)
    vectors = [torch.randn(3, te.cfg.width, generator=g) * 0.02 for te in sd.text_encoders]  # 3 vectors, odd count
    path = write(tmp_path, "mytok", vectors)
    assert load_file(path).keys() == keys and all(v.shape[0] == 3 for v in load_file(path).values())
    expected, expected_pooled = reference_context(name, sd, path, PROMPT.format("mytok"))

    tokenizers = models.load_tokenizers(sd.cfg)
    plain = sd.encode_text(models.tokenize(tokenizers, [PROMPT.format("mytok")]))[0]
    embedding.attach_folder(sd, tokenizers, tmp_path)
    for spelling in ("mytok", "embedding:mytok"):  # A1111's bare file name, ComfyUI's embedding:name
        context, pooled = sd.encode_text(models.tokenize(tokenizers, [embedding.expand(sd, PROMPT.format(spelling))]))
        assert rel_err(context, expected) < 1e-5, spelling
        if expected_pooled is not None:
            assert rel_err(pooled, expected_pooled) < 1e-5  # pooled at the end token, not at the new ids
    assert (context - plain).abs().max() > 1e-3  # the vectors, not the word's own tokens, reached the encoder


def test_expand_spellings():
    sd = models.build("tiny-sd15", seed=0)
    e = embedding.Embeddings(sd, models.load_tokenizers(sd.cfg))
    e.add(["demo"], [torch.zeros(2, 32)])
    e.add(["demo_v2"], [torch.zeros(1, 32)])
    assert e.expand("demo, (embedding:demo_v2.safetensors:1.2), demolition, my-demo") == \
        "<gesso-emb-0> <gesso-emb-1>, (<gesso-emb-2>:1.2), demolition, my-demo"
    e.remove()
    assert embedding.expand(sd, "demo") == "demo" and not isinstance(
        sd.text_encoders[0].transformer.text_model.embeddings.token_embedding, embedding.TokenTable)


def test_bad_files_are_one_line(tmp_path):
    (tmp_path / "old.pt").write_bytes(b"\x80\x04not loaded")
    with pytest.raises(embedding.EmbeddingFileError, match=r"old.pt: only .safetensors embeddings are read"):
        embedding.read_embedding(tmp_path / "old.pt", 1)
    save_file({"clip_l": torch.zeros(1, 32)}, tmp_path / "half.safetensors")
    with pytest.raises(embedding.EmbeddingFileError, match="half.safetensors: an SDXL embedding needs clip_l and clip_g"):
        embedding.read_embedding(tmp_path / "half.safetensors", 2)
    sd = models.build("tiny-sd15", seed=0)
    save_file({"emb_params": torch.zeros(1, 7)}, tmp_path / "wide.safetensors")
    with pytest.raises(embedding.EmbeddingFileError, match=r"wide: vectors of shape \(1, 7\), the text encoder takes \(1, 32\)"):
        embedding.attach_folder(sd, models.load_tokenizers(sd.cfg), tmp_path)
