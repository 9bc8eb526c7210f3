"""`gesso caption` end to end, offline: a tiny WD tagger (an ONNX graph with known scores) and a tiny random BLIP,
saved in the Hugging Face cache layout under their real default ids, captioning a kohya-style folder."""
import logging

import numpy as np
import onnx  # the "test" extra: it builds the tiny tagger graph
import pytest
import torch
from huggingface_hub import constants
from PIL import Image

from gesso import cli
from gesso.engine.data.captioners import DEFAULT_MODELS, caption_folder

REV = "0123456789abcdef0123456789abcdef01234567"
SIDE = 8  # the tiny tagger's input side (448 for the real ones)
# selected_tags.csv rows and the tiny graph's score for each: ratings first (never written), then general tags, then
# characters, as in the WD v3 files. blue_theme scores the mean of the B channel (BGR input) / 255; others are fixed.
TAGS = [("general", "9", 0.9), ("sensitive", "9", 0.05), ("questionable", "9", 0.02), ("explicit", "9", 0.01),
        ("long_hair", "0", 0.8), ("^_^", "0", 0.6), ("blue_theme", "0", None), ("simple_background", "0", 0.36),
        ("smile", "0", 0.34), ("solo", "0", 0.7), ("hatsune_miku", "4", 0.5), ("zk_(original)", "4", 0.9)]


def _snapshot(cache, repo_id):
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(REV)
    folder = repo / "snapshots" / REV
    folder.mkdir(parents=True)
    return folder


def _tiny_tagger(folder):
    from onnx import TensorProto, helper, numpy_helper
    weight = np.zeros((3, len(TAGS)), np.float32)  # (BGR, tags): per-pixel scores, averaged over the image
    bias = np.array([0.0 if s is None else s for _, _, s in TAGS], np.float32)
    weight[0, [n for n, _, _ in TAGS].index("blue_theme")] = 1 / 255
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["input", "w"], ["per_pixel"]),
         helper.make_node("ReduceMean", ["per_pixel"], ["mean"], axes=[1, 2], keepdims=0),
         helper.make_node("Add", ["mean", "b"], ["scores"])],
        "tiny_tagger",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", SIDE, SIDE, 3])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["batch", len(TAGS)])],
        [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(bias, "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, folder / "model.onnx")
    rows = ["tag_id,name,category,count"] + [f"{i},{n},{c},{100 - i}" for i, (n, c, _) in enumerate(TAGS)]
    (folder / "selected_tags.csv").write_text("\n".join(rows) + "\n")


def _tiny_blip(folder, positions=80, endless=False):
    """A random BLIP of `positions` text positions; `endless`: it never ends a caption by itself (its end token [SEP]
    is never the likeliest), so every caption runs to the longest the captioner allows."""
    from transformers import BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipImageProcessor, BlipProcessor
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]"] + "a cat dog on the sofa red blue sitting photo of".split()
    (folder / "vocab.txt").write_text("\n".join(words) + "\n")
    text = dict(vocab_size=len(words), hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2,
                max_position_embeddings=positions, bos_token_id=5, sep_token_id=3, pad_token_id=0, encoder_hidden_size=16)
    vision = dict(hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2, image_size=16, patch_size=8)
    torch.manual_seed(0)
    model = BlipForConditionalGeneration(BlipConfig(text_config=text, vision_config=vision))
    if endless:
        with torch.no_grad():
            model.text_decoder.cls.predictions.bias[words.index("[SEP]")] = -1e4
    model.save_pretrained(folder)
    BlipProcessor(BlipImageProcessor(size={"height": 16, "width": 16}), BertTokenizer(str(folder / "vocab.txt"),
                                                                                         bos_token="[DEC]")).save_pretrained(folder)


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """An offline Hugging Face cache in tmp_path/hub (huggingface_hub reads its environment at import: patched too)."""
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


@pytest.fixture
def images(tmp_path):
    """A kohya-style folder: square blue and red images, a wide red one (padded with white), one captioned by its
    artist, and a broken file."""
    folder = tmp_path / "data" / "5_mychar"
    folder.mkdir(parents=True)
    Image.new("RGB", (20, 20), (0, 0, 255)).save(folder / "blue.png")
    Image.new("RGB", (20, 20), (255, 0, 0)).save(folder / "red.png")
    Image.new("RGB", (40, 20), (255, 0, 0)).save(folder / "wide_red.jpg")
    Image.new("RGB", (20, 20), (0, 255, 0)).save(folder / "kept.png")
    (folder / "kept.txt").write_text("my own words\n")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    return tmp_path / "data"


def _captions(folder):
    return {p.stem: p.read_text() for p in sorted(folder.glob("*.txt"))}


def test_tagger_writes_tags_above_thresholds_and_keeps_user_captions(hub, images, caplog, capsys):
    _tiny_tagger(_snapshot(hub, DEFAULT_MODELS["tagger"]))
    args = ["caption", str(images), "--captioner", "tagger", "--prefix", "zkchar", "--threshold", "0.35",
            "--character-threshold", "0.6", "--replace-underscores", "--undesired-tags", "solo", "--batch-size", "2"]
    with caplog.at_level(logging.WARNING):
        assert cli.main(args) == 0
    # smile 0.34 < 0.35, hatsune_miku 0.5 < 0.6, solo undesired, ratings never; ^_^ keeps its underscore
    assert _captions(images / "5_mychar") == {
        "blue": "zkchar, long hair, ^_^, blue theme, simple background, zk (original)\n",
        "kept": "my own words\n",
        "red": "zkchar, long hair, ^_^, simple background, zk (original)\n",
        "wide_red": "zkchar, long hair, ^_^, blue theme, simple background, zk (original)\n",  # white padding: 0.5
    }
    assert any("broken.png" in r.getMessage() and "skipped" in r.getMessage() for r in caplog.records)
    out = capsys.readouterr().out
    assert "captions: 3 written, 1 skipped" in out and "1 failed" in out and "broken.png: not an image" in out

    assert cli.main(["caption", str(images), "--overwrite", "--threshold", "0.5"]) == 0  # the character threshold follows
    assert _captions(images / "5_mychar")["kept"] == "long_hair, ^_^, solo, hatsune_miku, zk_(original)\n"


def test_blip_writes_the_models_sentence_with_the_prefix(hub, images):
    folder = _snapshot(hub, DEFAULT_MODELS["blip"])
    _tiny_blip(folder)
    assert cli.main(["caption", str(images), "--captioner", "blip", "--prefix", "zkchar", "--caption-extension", ".caption"]) == 0
    from transformers import BlipForConditionalGeneration, BlipProcessor
    processor, model = BlipProcessor.from_pretrained(folder), BlipForConditionalGeneration.from_pretrained(folder)
    inputs = processor(images=[Image.open(images / "5_mychar" / "blue.png").convert("RGB")], return_tensors="pt")
    sentence = processor.batch_decode(model.generate(**inputs, num_beams=3, max_length=75, min_length=5),
                                      skip_special_tokens=True)[0].strip()
    assert sentence
    written = {p.stem: p.read_text() for p in (images / "5_mychar").glob("*.caption")}
    assert sorted(written) == ["blue", "red", "wide_red"]  # kept.png has a .txt caption: the dataset would read it
    assert written["blue"] == f"zkchar, {sentence}\n"


def test_blip_captions_fit_a_small_models_positions(hub, images):
    # 32 text positions, and a model that never ends a caption by itself: kohya's 75 tokens would index past them
    folder = _snapshot(hub, "tiny/blip-32")
    _tiny_blip(folder, positions=32, endless=True)
    assert cli.main(["caption", str(images), "--captioner", "blip", "--model", "tiny/blip-32", "--batch-size", "2"]) == 0
    from transformers import BlipForConditionalGeneration, BlipProcessor
    processor, model = BlipProcessor.from_pretrained(folder), BlipForConditionalGeneration.from_pretrained(folder)
    inputs = processor(images=[Image.open(images / "5_mychar" / "red.png").convert("RGB")], return_tensors="pt")
    out = model.generate(**inputs, num_beams=3, max_length=32, min_length=5)
    assert out.shape[1] == 32  # the caption runs to the model's last position, and no further
    written = _captions(images / "5_mychar")
    assert sorted(written) == ["blue", "kept", "red", "wide_red"]
    assert written["red"] == processor.batch_decode(out, skip_special_tokens=True)[0].strip() + "\n"


def test_a_captioner_failing_on_an_image_names_it_and_goes_on(images, caplog):
    def captioner(pictures):  # fails on any batch holding a red picture, as a model might on some input
        if any(p.getpixel((0, 0))[0] > 200 for p in pictures):  # red.png and wide_red.jpg (JPEG: about 254)
            raise RuntimeError("index out of range in self")
        return ["a blue square"] * len(pictures)

    with caplog.at_level(logging.WARNING):
        summary = caption_folder(images, captioner, batch_size=2, progress=False)
    assert [p.name for p in summary.written] == ["blue.png"]
    failed = {p.name: why for p, why in summary.failed}
    assert failed.keys() == {"broken.png", "red.png", "wide_red.jpg"}
    assert failed["red.png"] == "the captioner failed on it (RuntimeError: index out of range in self)"
    assert _captions(images / "5_mychar") == {"blue": "a blue square\n", "kept": "my own words\n"}
    assert any("red.png" in r.getMessage() and "captioner failed" in r.getMessage() for r in caplog.records)


def test_a_model_that_cannot_load_is_one_line_naming_it(hub, images, capsys):
    folder = _snapshot(hub, "tiny/blip-cut")
    _tiny_blip(folder)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    capsys.readouterr()  # transformers' progress bars while the model was saved
    assert cli.main(["caption", str(images), "--captioner", "blip", "--model", "tiny/blip-cut"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("error: model tiny/blip-cut: cannot load BLIP from ")
    assert _captions(images / "5_mychar") == {"kept": "my own words\n"}


def test_a_missing_model_offline_is_one_line_saying_how_to_download_it(hub, images, capsys):
    assert cli.main(["caption", str(images)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("error: model SmilingWolf/wd-vit-tagger-v3 is not in the Hugging Face cache")
    assert err.endswith("`hf download SmilingWolf/wd-vit-tagger-v3`")
    assert _captions(images / "5_mychar") == {"kept": "my own words\n"}
