"""Datasets as artists prepare them: folders of images with same-named caption files.

A subset is a folder. Its own images train `repeats` times per epoch, and so do those of each sub-folder
named `N_name` (kohya's convention: N repeats; an explicit `Subset.repeats` wins over N). Other
sub-folders are ignored and listed in the report, hidden files and folders (`.gesso_cache`) silently.
Every image is decoded once here, as it will be for its latents (a huge JPEG reduced while decoding), so a
broken or oversized file is skipped before any model work; each kept image is assigned its bucket, resized
size and crop now, which fixes its latent cache key. Nothing decoded is kept: the cache decodes again.

Regularization images (kohya's `is_reg` subsets: the class without the subject, for prior preservation) train
beside the others, shuffled into the same buckets, with their own captions (the class prompt; a dataset-wide
trigger is not added to them) and their loss weighted by `prior_loss_weight`. Their repeats are balanced to the
training samples as kohya's DreamBooth dataset does (`balance_reg`). With masked loss on, each image's mask
(engine/data/masks.py) is found here and checked against the image's size; an image without one trains unmasked.
"""
import dataclasses
import hashlib
import logging
import os
import random
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch
from PIL import Image

from gesso.engine.data import buckets as B
from gesso.engine.data.buckets import Size
from gesso.engine.data.captions import augment, read_caption, with_trigger
from gesso.engine.data.images import IMAGE_EXTENSIONS, BadImage, decode, has_alpha, open_upright, to_pixels
from gesso.engine.data.masks import ALPHA, check_mask_file, mask_files

log = logging.getLogger("gesso.data")
REPEATS_FOLDER = re.compile(r"^(\d+)_(.+)$")
REPORT_LINES = 20  # per section: the report stays short on a dataset of thousands


@dataclass(frozen=True)
class Subset:
    path: str | Path
    repeats: int = 0  # 0: N from an `N_name` folder name, else 1
    trigger: str = ""  # prepended to each caption that lacks it
    is_reg: bool = False  # regularization images (kohya's is_reg)
    alpha_mask: bool = False  # masked loss from each image's alpha channel (kohya's alpha_mask)
    mask_dir: str | Path = ""  # masked loss from same-named mask images in this folder (kohya's conditioning_data_dir)
    class_tokens: str = ""  # the caption of an image without a caption file (kohya's class_tokens); "": the N_name name


@dataclass(frozen=True)
class DatasetOptions:
    resolution: int = 1024  # buckets hold about resolution^2 pixels
    bucketing: bool = True  # False: every image is cropped to a resolution x resolution square
    min_bucket_side: int = 256  # clamped to at most `resolution`
    max_bucket_side: int = 2048  # clamped to at least `resolution`
    random_crop: bool = False  # crop position drawn once per image from `seed` (latents are cached), else centred
    flip: bool = False  # each sample mirrored with probability 1/2
    shuffle_caption: bool = False  # shuffle comma-separated tags after the first `keep_tokens`
    keep_tokens: int = 0
    caption_dropout_rate: float = 0.0  # probability that a sample trains on the empty caption
    caption_extension: str = ".txt"  # tried first; .txt and .caption are both accepted
    seed: int = 0  # seeds random crops
    masked_loss: bool = False  # look up each image's mask (its subset's alpha_mask or mask_dir)
    prior_loss_weight: float = 1.0  # loss weight of regularization samples
    validation_split: float = 0.0  # kohya's: the fraction of each subset's images held out for the validation loss
    validation_seed: int = 0  # kohya's: seeds that split (Python's random.shuffle, as kohya's)

    @property
    def augments_captions(self) -> bool:
        return self.shuffle_caption or self.caption_dropout_rate > 0

    def bucket_sizes(self) -> list[Size]:
        if not self.bucketing:
            return [(self.resolution, self.resolution)]
        lo, hi = min(self.min_bucket_side, self.resolution), max(self.max_bucket_side, self.resolution)
        return B.bucket_sizes(self.resolution, lo, hi)


@dataclass(frozen=True)
class Item:
    path: Path
    caption: str  # trigger included, before augmentation
    repeats: int
    digest: str  # sha256 of the file's bytes
    original_size: Size  # (h, w) upright, before resizing
    bucket: Size  # (h, w) trained
    resized: Size  # (h, w) after resizing, before cropping
    crop: Size  # (top, left) in resized pixels
    root: Path  # the subset folder, home of the default cache
    is_reg: bool = False
    mask: Path | None = None  # the file whose mask channel is read (the image itself for an alpha mask)
    mask_digest: str = ""  # ALPHA, or sha256 of the mask file: in the latent cache key

    def conditioning(self, flipped: bool) -> tuple[Size, Size, Size]:
        """SDXL's (original size, crop top-left, target size) for this image, mirrored or not."""
        crop = B.flipped_crop(self.crop, self.resized, self.bucket) if flipped else self.crop
        return self.original_size, crop, self.bucket


class Sample(NamedTuple):
    index: int  # into Dataset.items
    flipped: bool
    caption: str  # after augmentation


@dataclass
class Dataset:
    items: list[Item]
    options: DatasetOptions
    skipped: list[tuple[Path, str]] = field(default_factory=list)  # files not trained, with why
    caption_problems: list[tuple[Path, str]] = field(default_factory=list)  # images trained despite their caption
    ignored_folders: list[tuple[Path, str]] = field(default_factory=list)
    unused_reg: list[Path] = field(default_factory=list)  # regularization images beyond the balance (as kohya)
    unmasked: list[tuple[Path, str]] = field(default_factory=list)  # with masked loss on: images trained unmasked, why
    held_out: list[Item] = field(default_factory=list)  # validation_split's images: not trained, the validation set

    def __len__(self) -> int:
        """Samples per epoch: images x repeats, regularization samples included."""
        return sum(it.repeats for it in self.items)

    def samples(self, reg: bool) -> int:
        """Training (reg False) or regularization samples per epoch."""
        return sum(it.repeats for it in self.items if it.is_reg == reg)

    def _sample_buckets(self) -> tuple[list[int], list[Size]]:
        indices = [i for i, it in enumerate(self.items) for _ in range(it.repeats)]
        return indices, [self.items[i].bucket for i in indices]

    def steps_per_epoch(self, batch_size: int) -> int:
        return B.count_batches(self._sample_buckets()[1], batch_size)

    def epoch(self, epoch: int, batch_size: int, seed: int) -> list[list[Sample]]:
        """The epoch's batches, each from one bucket; a pure function of (epoch, batch_size, seed), so a
        resumed run can rebuild an epoch and skip the batches it already trained."""
        g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        indices, sample_buckets = self._sample_buckets()
        o = self.options
        out = []
        for positions in B.batches_by_bucket(sample_buckets, batch_size, g):
            batch = []
            for p in positions:
                i = indices[p]
                flipped = o.flip and float(torch.rand((), generator=g)) < 0.5
                caption = augment(self.items[i].caption, o.shuffle_caption, o.keep_tokens, o.caption_dropout_rate, g)
                batch.append(Sample(i, flipped, caption))
            out.append(batch)
        return out

    def folders(self) -> dict[str, dict[str, int]]:
        """{folder name: {"n_repeats", "img_count"}} of the training images: kohya's `ss_dataset_dirs` metadata."""
        out: dict[str, dict[str, int]] = {}
        for it in self.items:
            if it.is_reg:
                continue
            entry = out.setdefault(it.path.parent.name, {"n_repeats": it.repeats, "img_count": 0})
            entry["img_count"] += 1
        return out

    def report(self) -> str:
        """What was skipped or patched and why: a few lines for the end of a run."""
        counts: dict[Size, int] = {}
        for it in self.items:
            counts[it.bucket] = counts.get(it.bucket, 0) + 1
        sizes = ", ".join(f"{w}x{h}: {n}" for (h, w), n in sorted(counts.items()))
        lines = [f"dataset: {len(self.items)} images trained ({len(self)} samples per epoch); buckets (WxH): {sizes or 'none'}"]
        reg = [it for it in self.items if it.is_reg]
        if reg or self.unused_reg:
            lines.append(f"regularization: {len(reg)} images, {self.samples(True)} samples per epoch, balanced to the "
                         f"{self.samples(False)} training samples as kohya does; {len(self.unused_reg)} images not needed")
        if self.options.masked_loss:
            lines.append(f"masked loss: {len(self.items) - len(self.unmasked)} images masked, {len(self.unmasked)} unmasked")
        for title, entries in (("skipped", self.skipped), ("caption problems (image still trained)", self.caption_problems),
                               ("ignored folders", self.ignored_folders), ("trained unmasked", self.unmasked)):
            if entries:
                lines.append(f"{title}: {len(entries)}")
                lines += [f"  {path}: {why}" for path, why in entries[:REPORT_LINES]]
                lines += [f"  ... and {len(entries) - REPORT_LINES} more"] if len(entries) > REPORT_LINES else []
        return "\n".join(lines)


def shard(batches: list[list[Sample]], rank: int, size: int) -> list[list[Sample] | None]:
    """Rank `rank`'s share of an epoch's batches, in their places: batch j goes whole to rank j % size (sharding
    after batching, so every batch stays bucket-pure), the others' are None. Every rank gets a list of the same
    length, so all run the same optimizer steps; a step of size x accumulation consecutive batches gives each
    rank `accumulation` of them (in an epoch's short last step, some ranks one fewer)."""
    return [batch if j % size == rank else None for j, batch in enumerate(batches)]


def _parse_name(folder: Path) -> tuple[int | None, str]:
    """(N, name) of an `N_name` folder, else (None, "")."""
    m = REPEATS_FOLDER.match(folder.name)
    return (int(m.group(1)), m.group(2)) if m else (None, "")


def _folders(subset: Subset, ignored: list[tuple[Path, str]]) -> list[tuple[Path, int, str]]:
    """(folder, repeats, class tokens) for the subset folder and its `N_name` sub-folders; as in kohya, the
    name part of `N_name` is the caption of an image that has no caption file."""
    root = Path(subset.path)
    if not root.is_dir():
        raise FileNotFoundError(f"dataset folder not found: {root}")
    n, name = _parse_name(root)
    out = [(root, subset.repeats or n or 1, subset.class_tokens or name)]
    for child in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        n, name = _parse_name(child)
        if n is None:
            ignored.append((child, "name is not N_name (N repeats), e.g. 10_cat"))
        elif n == 0 and not subset.repeats:
            ignored.append((child, "0 repeats"))
        else:
            out.append((child, subset.repeats or n, name))
    return out


def _probe(path: Path, sizes: list[Size]) -> tuple[str, Size, bool] | str:
    """(sha256, upright (h, w), has an alpha channel) of an image file, or why it cannot train."""
    try:
        data = path.read_bytes()
    except OSError as e:
        return f"unreadable ({e.strerror or e})"
    try:
        im, size = open_upright(data, lambda size: B.cover(size, B.assign(size, sizes)))
    except BadImage as e:
        return str(e)
    return hashlib.sha256(data).hexdigest(), size, has_alpha(im)


def _place(size: Size, sizes: list[Size], options: DatasetOptions, digest: str) -> tuple[Size, Size, Size]:
    bucket = B.assign(size, sizes)
    resized = B.cover(size, bucket)
    if options.random_crop:
        g = torch.Generator().manual_seed(options.seed ^ int(digest[:15], 16))  # fixed per image and seed
        return bucket, resized, B.random_crop(resized, bucket, g)
    return bucket, resized, B.centre_crop(resized, bucket)


def balance_reg(train_samples: int, reg_repeats: list[int]) -> list[int]:
    """Each regularization image's repeats per epoch, kohya's rule (train_util.DreamBoothDataset): images are taken in
    order with their own repeats until their samples reach the training samples; while still short, each image in
    turn gains one repeat. Images not reached get 0 (more regularization samples than needed); none when no training."""
    out = [0] * len(reg_repeats)
    n, first = 0, True
    while reg_repeats and n < train_samples:
        for i, repeats in enumerate(reg_repeats):
            out[i] += repeats if first else 1
            n += repeats if first else 1
            if n >= train_samples:
                break
        first = False
    return out


def _mask(path: Path, subset: Subset, size: Size, alpha: bool, masks: dict[str, Path]) -> tuple[Path | None, str, str]:
    """(mask file, its cache digest, why unmasked) for an image: its mask_dir file first, else its alpha channel."""
    mask_file = masks.get(path.stem)
    if mask_file is not None:
        try:
            return mask_file, check_mask_file(mask_file, size), ""
        except BadImage as e:
            return None, "", str(e)
    if subset.alpha_mask and alpha:
        return path, ALPHA, ""
    why = "no alpha channel" if subset.alpha_mask else "no mask image in mask_dir" if subset.mask_dir else "no mask source"
    return None, "", why


def build_dataset(subsets: list[Subset], options: DatasetOptions = DatasetOptions()) -> Dataset:
    """Scan, decode and place every image of `subsets`; broken files are skipped with a warning naming them."""
    sizes = options.bucket_sizes()
    dataset = Dataset([], options)
    found = []  # (path, repeats, class tokens, subset)
    masks = {}  # subset -> {stem: mask file}
    for subset in subsets:
        masks[subset] = mask_files(subset.mask_dir) if options.masked_loss and subset.mask_dir else {}
        for folder, repeats, class_tokens in _folders(subset, dataset.ignored_folders):
            files = sorted(p for p in folder.iterdir()
                           if p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".") and p.is_file())
            found += [(p, repeats, class_tokens, subset) for p in files]
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:  # Pillow decodes without the GIL
        probes = list(pool.map(lambda f: _probe(f[0], sizes), found))
    for (path, repeats, class_tokens, subset), probe in zip(found, probes):
        if isinstance(probe, str):
            log.warning("skipped %s: %s", path, probe)
            dataset.skipped.append((path, probe))
            continue
        digest, size, alpha = probe
        caption, caption_file, problem = read_caption(path, options.caption_extension)
        if caption_file is None and class_tokens:
            caption, problem = class_tokens, f"no caption file (folder name used: {class_tokens!r})"
        if problem:
            dataset.caption_problems.append((caption_file or path, problem))
        mask, mask_digest = None, ""
        if options.masked_loss:
            mask, mask_digest, why = _mask(path, subset, size, alpha, masks[subset])
            if mask is None:
                dataset.unmasked.append((path, why))
        bucket, resized, crop = _place(size, sizes, options, digest)
        dataset.items.append(Item(path, with_trigger(caption, subset.trigger), repeats, digest, size, bucket, resized,
                                  crop, Path(subset.path), subset.is_reg, mask, mask_digest))
    if dataset.caption_problems:
        first = dataset.caption_problems[0]
        log.warning("%d caption problems (images still train), first: %s: %s", len(dataset.caption_problems), *first)
    dataset.items, dataset.held_out = hold_out(dataset.items, options.validation_split, options.validation_seed)
    _balance(dataset)
    return dataset


def hold_out(items: list[Item], fraction: float, seed: int) -> tuple[list[Item], list[Item]]:
    """(trained, held out): as kohya's split_train_val, per subset folder, each one's images (in file-name order)
    shuffled with Python's random seeded by `seed`, the last round(n x fraction) held out (at least one when
    fraction > 0 and the folder has two or more). Regularization images are never held out."""
    if not fraction:
        return items, []
    held = set()
    for root in dict.fromkeys(it.root for it in items if not it.is_reg):
        paths = sorted(it.path for it in items if it.root == root and not it.is_reg)
        random.Random(seed).shuffle(paths)
        n = min(len(paths) - 1, max(1, round(len(paths) * fraction)))
        held |= set(paths[len(paths) - n:]) if n > 0 else set()
    return [it for it in items if it.path not in held], [it for it in items if it.path in held]


def validation_set(dataset: Dataset) -> Dataset:
    """The held-out images as a dataset of their own, as written: no flips, no caption shuffle or dropout."""
    options = dataclasses.replace(dataset.options, flip=False, shuffle_caption=False, caption_dropout_rate=0.0)
    return Dataset([dataclasses.replace(it, repeats=1) for it in dataset.held_out], options)


def _balance(dataset: Dataset) -> None:
    reg = [it for it in dataset.items if it.is_reg]
    if not reg:
        return
    balanced = iter(balance_reg(dataset.samples(False), [it.repeats for it in reg]))
    items = []
    for it in dataset.items:
        repeats = next(balanced) if it.is_reg else it.repeats
        if repeats:
            items.append(dataclasses.replace(it, repeats=repeats))
        else:
            dataset.unused_reg.append(it.path)
    dataset.items = items


def load_pixels(item: Item) -> torch.Tensor:
    """The item's training pixels: (3, bucket h, bucket w) in [-1, 1], not flipped."""
    im, _ = decode(item.path.read_bytes(), lambda _: item.resized)
    (rh, rw), (top, left), (bh, bw) = item.resized, item.crop, item.bucket
    im = im.resize((rw, rh), Image.Resampling.LANCZOS).crop((left, top, left + bw, top + bh))
    return to_pixels(im)

