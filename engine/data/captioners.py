"""Automatic captions: BLIP sentences (transformers) and booru tags from a WD tagger (ONNX), as kohya's finetune/
make_captions.py and finetune/tag_images_by_wd14_tagger.py make them.

Models come from a local folder or through huggingface_hub's cache (HF_HUB_CACHE), downloading what is missing
unless offline; a model that is neither there nor reachable is one line saying how to download it.

BLIP: BlipForConditionalGeneration over BlipProcessor's 384 px input, deterministic beam search (3 beams, 5 to 75
tokens, kohya's limits, cut to the text decoder's max_position_embeddings for a smaller model; not kohya's random
nucleus sampling, so a second run writes the same captions). Only safetensors weights are read.

A model that cannot be loaded is one CaptionError naming it; a captioner that fails on an image (a model that
raises inside its forward pass) names the image in the run's summary and the run goes on with the next one.

WD tagger v3: model.onnx on onnxruntime (the repository ships it, and timm would need torchvision), with
selected_tags.csv (tag_id, name, category, count). The image is padded to a white square, resized to the graph's
input side (448), fed as BGR 0..255 in NHWC, and the graph gives a sigmoid score per CSV row. Category 9 rows are
ratings (left out, as kohya's default), 4 characters (kept at or above `character_threshold`), others general tags
(at or above `threshold`; kohya's defaults 0.35 for both). Tags stay in CSV order. Underscores become spaces in
tags longer than 3 characters (kohya's rule: kaomoji such as ^_^ keep theirs).
"""
import csv
import logging
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from gesso.engine.data.captions import read_caption, with_trigger
from gesso.engine.data.images import IMAGE_EXTENSIONS, BadImage, decode
from gesso.engine.io import write_atomic
from gesso.errors import GessoError

log = logging.getLogger("gesso.caption")

DEFAULT_MODELS = {"blip": "Salesforce/blip-image-captioning-large", "tagger": "SmilingWolf/wd-vit-tagger-v3"}
BLIP_FILES = ["*.json", "*.txt", "*.safetensors"]  # config, processor, tokenizer, weights: no pickle
TAGGER_FILES = ["model.onnx", "selected_tags.csv"]
MIN_CAPTION_TOKENS, MAX_CAPTION_TOKENS = 5, 75  # kohya's BLIP caption lengths, within the model's positions
RATING, CHARACTER = "9", "4"


class CaptionError(GessoError):
    """A captioning model that cannot be found or used; one line naming it and what to do."""


def model_folder(model: str, patterns: list[str]) -> Path:
    """A local folder as it is, else the Hub repo `model` in huggingface_hub's cache, fetched when missing and online."""
    if Path(model).is_dir():
        return Path(model)
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError
    try:
        return Path(snapshot_download(model, allow_patterns=patterns))
    except RepositoryNotFoundError:
        raise CaptionError(f"model {model}: no such folder, and no such repository on the Hugging Face Hub") from None
    except (LocalEntryNotFoundError, OSError) as e:
        raise CaptionError(f"model {model} is not in the Hugging Face cache and cannot be downloaded now "
                           f"({type(e).__name__}); download it where there is network with `hf download {model}`") from None


def _require(folder: Path, name: str, model: str) -> Path:
    if not (folder / name).is_file():
        raise CaptionError(f"model {model}: {name} missing in {folder}; download it with `hf download {model}`")
    return folder / name


@dataclass(frozen=True)
class TagOptions:
    threshold: float = 0.35  # general tags (kohya's --thresh / --general_threshold)
    character_threshold: float | None = None  # character tags; None: threshold
    undesired_tags: tuple[str, ...] = ()  # left out, in either spelling (with underscores or spaces)
    replace_underscores: bool = False


def tag_name(tag: str, replace_underscores: bool) -> str:
    return tag.replace("_", " ") if replace_underscores and len(tag) > 3 else tag


def read_tags(path: Path) -> list[tuple[str, str]]:
    """(name, category) per row of a selected_tags.csv, in the graph's output order."""
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    if not rows or rows[0][:3] != ["tag_id", "name", "category"]:
        raise CaptionError(f"{path}: expected a header tag_id,name,category, got {rows[0][:3] if rows else 'nothing'}")
    short = next((i for i, r in enumerate(rows[1:], start=2) if len(r) < 3), None)
    if short is not None:
        raise CaptionError(f"{path}: line {short} has fewer than 3 columns (tag_id,name,category)")
    return [(r[1], r[2]) for r in rows[1:]]


def select_tags(scores: np.ndarray, tags: list[tuple[str, str]], opts: TagOptions) -> list[str]:
    """The tags of one image's scores (one per CSV row) above their category's threshold."""
    char = opts.threshold if opts.character_threshold is None else opts.character_threshold
    undesired = {t.strip() for t in opts.undesired_tags} | {t.strip().replace(" ", "_") for t in opts.undesired_tags}
    out = []
    for (name, category), score in zip(tags, scores):
        if category == RATING or score < (char if category == CHARACTER else opts.threshold) or name in undesired:
            continue
        shown = tag_name(name, opts.replace_underscores)
        if shown not in undesired:
            out.append(shown)
    return out


class Tagger:
    def __init__(self, model: str, device: str, opts: TagOptions):
        try:
            import onnxruntime as ort
        except ImportError:
            raise CaptionError("the tagger runs on onnxruntime: pip install 'gesso[caption]'") from None
        folder = model_folder(model, TAGGER_FILES)
        self.opts = opts
        cuda = device != "cpu" and "CUDAExecutionProvider" in ort.get_available_providers()
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if cuda else ["CPUExecutionProvider"]
        with _loading(model, f"the tagger from {folder}"):
            self.tags = read_tags(_require(folder, "selected_tags.csv", model))
            self.session = ort.InferenceSession(str(_require(folder, "model.onnx", model)), providers=providers)
            graph_input = self.session.get_inputs()[0]
            self.input_name, self.side = graph_input.name, int(graph_input.shape[1])  # NHWC
        outputs = self.session.get_outputs()[0].shape[-1]
        if isinstance(outputs, int) and outputs != len(self.tags):
            raise CaptionError(f"model {model}: the graph scores {outputs} tags, selected_tags.csv lists {len(self.tags)}")

    def pixels(self, im: Image.Image) -> np.ndarray:
        """(side, side, 3) float32 BGR 0..255: padded to a white square, then resized."""
        size = max(im.size)
        square = Image.new("RGB", (size, size), (255, 255, 255))
        square.paste(im, ((size - im.width) // 2, (size - im.height) // 2))
        square = square.resize((self.side, self.side), Image.Resampling.BICUBIC)
        return np.asarray(square, dtype=np.float32)[:, :, ::-1]

    def __call__(self, images: list[Image.Image]) -> list[str]:
        batch = np.ascontiguousarray(np.stack([self.pixels(im) for im in images]))
        scores = self.session.run(None, {self.input_name: batch})[0]  # (B, tags)
        return [", ".join(select_tags(s, self.tags, self.opts)) for s in scores]


class Blip:
    def __init__(self, model: str, device: str):
        from transformers import BlipForConditionalGeneration, BlipProcessor
        if device == "cuda" and not torch.cuda.is_available():
            raise CaptionError("--device cuda, but no CUDA device is available")
        folder = model_folder(model, BLIP_FILES)
        _require(folder, "config.json", model)
        self.device = torch.device(device if device != "auto" else "cuda" if torch.cuda.is_available() else "cpu")
        with _loading(model, f"BLIP from {folder}"):
            self.processor = BlipProcessor.from_pretrained(folder)
            self.model = BlipForConditionalGeneration.from_pretrained(folder, use_safetensors=True).to(self.device).eval()
            # every token of a caption, the start token included, takes a position of the text decoder
            self.max_length = min(MAX_CAPTION_TOKENS, int(self.model.config.text_config.max_position_embeddings))

    @torch.no_grad()
    def __call__(self, images: list[Image.Image]) -> list[str]:
        inputs = self.processor(images=images, return_tensors="pt").to(self.device)
        out = self.model.generate(**inputs, num_beams=3, max_length=self.max_length,
                                  min_length=min(MIN_CAPTION_TOKENS, self.max_length))
        return [t.strip() for t in self.processor.batch_decode(out, skip_special_tokens=True)]


@contextmanager
def _loading(model: str, what: str):
    """Any failure to load `what` (a damaged or foreign file, a config the library refuses) as one CaptionError
    naming the model, never the library's traceback."""
    try:
        yield
    except GessoError:
        raise
    except Exception as e:  # transformers and onnxruntime raise many types for a model they cannot use
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        raise CaptionError(f"model {model}: cannot load {what}: {first}") from None


def open_captioner(kind: str, model: str | None, device: str, opts: TagOptions):
    """A callable list of RGB images -> list of captions."""
    model = model or DEFAULT_MODELS[kind]
    return Tagger(model, device, opts) if kind == "tagger" else Blip(model, device)


@dataclass
class CaptionSummary:
    written: list[Path]
    skipped: list[Path]  # images that already had a caption
    failed: list[tuple[Path, str]]  # images that could not be read, with why

    def describe(self) -> str:
        lines = [f"captions: {len(self.written)} written, {len(self.skipped)} skipped (a caption exists; --overwrite "
                 f"replaces it), {len(self.failed)} failed"]
        lines += [f"  {path}: {why}" for path, why in self.failed]
        return "\n".join(lines)


def find_images(root: Path) -> list[Path]:
    """Every image under `root` (kohya's N_name sub-folders included), hidden files and folders left out."""
    if not root.is_dir():
        raise CaptionError(f"{root}: no such folder")
    return sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
                  and not any(part.startswith(".") for part in p.relative_to(root).parts))


def caption_folder(root: Path, captioner, prefix: str = "", overwrite: bool = False, batch_size: int = 1,
                   extension: str = ".txt", progress: bool = True) -> CaptionSummary:
    """Write `<image stem><extension>` beside each image under `root`. An image that has a caption file (any the
    dataset reads) keeps it unless `overwrite`; a broken image, or one the captioner fails on, is skipped with a
    warning naming it, as training skips a broken image."""
    summary = CaptionSummary([], [], [])
    todo = []
    for path in find_images(root):
        if not overwrite and read_caption(path, extension)[1] is not None:
            summary.skipped.append(path)
        else:
            todo.append(path)
    with tqdm(total=len(todo), unit="image", disable=not progress) as bar:
        for start in range(0, len(todo), batch_size):
            batch, images = [], []
            for path in todo[start : start + batch_size]:
                try:
                    images.append(decode(path.read_bytes())[0])
                    batch.append(path)
                except (OSError, BadImage) as e:
                    why = f"unreadable ({e.strerror or e})" if isinstance(e, OSError) else str(e)
                    log.warning("skipped %s: %s", path, why)
                    summary.failed.append((path, why))
            for path, caption in _captions(captioner, batch, images, summary):
                text = with_trigger(caption, prefix)
                write_atomic(path.with_suffix(extension), lambda tmp: Path(tmp).write_text(text + "\n", encoding="utf-8"))
                summary.written.append(path)
            bar.update(len(todo[start : start + batch_size]))
    return summary


def _captions(captioner, batch: list[Path], images: list[Image.Image], summary: CaptionSummary) -> list[tuple[Path, str]]:
    """(image, caption) for a batch. When the captioner fails on the batch, each image is captioned alone, and one it
    fails on is named in the summary: one bad image (or a model that breaks on some input) costs that image only."""
    if not images:
        return []
    try:
        return list(zip(batch, captioner(images)))
    except Exception as e:  # whatever the model's library raises inside its forward pass
        if len(images) == 1:
            _failed(summary, batch[0], e)
            return []
    out = []
    for path, image in zip(batch, images):
        try:
            out += zip([path], captioner([image]))
        except Exception as e:
            _failed(summary, path, e)
    return out


def _failed(summary: CaptionSummary, path: Path, e: Exception) -> None:
    first = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
    why = f"the captioner failed on it ({type(e).__name__}{': ' + first if first else ''})"
    log.warning("skipped %s: %s", path, why)
    summary.failed.append((path, why))
