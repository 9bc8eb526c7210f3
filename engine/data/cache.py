"""On-disk caches of VAE latents and text-encoder outputs, and the bucket-pure batches the step consumes.

Latents: one safetensors file per image and setting under `<cache>/latents/`, keyed by sha256 of the
image's bytes, the VAE's fingerprint, the bucket, resized size, crop and flip. With flip on, the mirrored
image is encoded as well and stored in the same file: a latent cannot be mirrored exactly (the VAE is not
equivariant), and encoding both at cache time keeps the VAE out of the training step. With masked loss, the
image's mask at latent resolution (engine/data/masks.py) is stored in the same file as `mask`, its source in the
key; a mask mirrors exactly, so the flipped sample takes the stored mask mirrored.
Text: one file per caption under `<cache>/text/`, keyed by the caption, the text encoders' fingerprint and
the tokenizers; it holds the context at the caption's own chunk count and the pooled vector. Shuffle or
dropout makes each step's caption new, and trained text encoders change their outputs, so then the text
cache is off and text is encoded per batch. SDXL's ADM vector is built per batch from the pooled vector
and the sample's size and crop: cheap, and a flip changes the crop.
Files are written atomically and never deleted; a cache folder that cannot be written is reported once and
the run continues from memory. Encoder batches are fixed by the dataset, not by what is cached (fixed_batches), so
a run killed while caching and run again trains on the bits an uninterrupted run caches. Each file's metadata records every tensor's shape, dtype and sha256; at load
a file that is unreadable, truncated, fails its checksum, lacks checksums (an older format), holds NaN or
inf, or whose shapes are not what the current bucket and encoders give, is named in a notice, encoded again
and rewritten: never trained on. The check costs a sha256 over bytes just read (0.13 ms for a 1024x1024
SDXL latent, 0.6 ms for a two-chunk SDXL context, measured at 2 GB/s on one CPU core). An image whose
fresh latents are not finite (a VAE overflowing) is skipped with a warning naming it, and not cached.
"""
import hashlib
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import groupby
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm import tqdm

from gesso import models
from gesso.engine.data.dataset import Dataset, Item, Sample, load_pixels
from gesso.engine.data.images import BadImage
from gesso.engine.data.masks import ALPHA, load_mask
from gesso.engine.embedding import vectors as embedding
from gesso.engine.io import write_atomic
from gesso.errors import GessoError, OutputError, TrainError
from gesso.models.files import read_safetensors

log = logging.getLogger("gesso.cache")
FORMAT = "gesso-cache-2"  # in every key and file: bump when decoding, resizing, encoding or the file layout changes
CHUNK = 77
Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]  # latents (B, 4, h, w), context (B, 77k, D), y (B, adm) or None
# a training batch: Batch, then each sample's loss weight (B,) (prior_loss_weight for regularization images) and
# loss mask (B, 1, h, w), None when no image of the dataset has a mask
TrainBatch = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor | None]


def fingerprint(module: torch.nn.Module) -> str:
    """sha256 of every tensor's name, shape, dtype and ~1024 evenly spaced values: another checkpoint or
    precision gives another fingerprint, at a cost of milliseconds even for SDXL."""
    h = hashlib.sha256()
    for name, t in module.state_dict().items():
        flat = t.detach().reshape(-1)
        h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
        h.update(flat[:: max(1, flat.numel() // 1024)].float().cpu().numpy().tobytes())
    return h.hexdigest()


def _key(*parts) -> str:
    return hashlib.sha256(json.dumps([FORMAT, *parts]).encode()).hexdigest()


def _check(t: torch.Tensor) -> dict:
    return {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch."),
            "sha256": hashlib.sha256(t.contiguous().numpy()).hexdigest()}  # the bytes as safetensors stores them


def cache_metadata(tensors: dict[str, torch.Tensor], source: str) -> dict[str, str]:
    """A cache file's safetensors metadata: what it was made from, and each tensor's shape, dtype and sha256.
    One key, its JSON sorted: safetensors writes several keys in a random order, and the same tensors must
    give the same file."""
    checks = {k: _check(v) for k, v in tensors.items()}
    return {"gesso_cache": json.dumps({"format": FORMAT, "source": source, "tensors": checks}, sort_keys=True)}


def _damage(tensors: dict[str, torch.Tensor], metadata: dict[str, str], shapes: dict[str, tuple[int, ...]]) -> str | None:
    """Why a cache file's tensors must not be trained on, or None when they are what was written and what is expected."""
    try:
        record = json.loads(metadata["gesso_cache"])
        checks = record["tensors"] if record["format"] == FORMAT else None
    except (KeyError, TypeError, ValueError):
        checks = None
    if not isinstance(checks, dict):
        return "no checksums (an older cache format, or not written by Gesso)"
    if sorted(tensors) != sorted(shapes):
        return f"holds {sorted(tensors)}, expected {sorted(shapes)}"
    for name, t in tensors.items():
        if tuple(t.shape) != shapes[name] or t.dtype != torch.float32:
            return f"'{name}' is {tuple(t.shape)} {t.dtype}, expected {shapes[name]} torch.float32 for this bucket and model"
        if checks.get(name) != _check(t):
            return f"'{name}' does not match its checksum (bytes changed on disk)"
        if not torch.isfinite(t).all():
            return f"'{name}' holds NaN or inf"
    return None


def _latent_shape(sd, bucket: tuple[int, int]) -> tuple[int, ...]:
    """(C, h/f, w/f): what the VAE makes of a bucket's pixels."""
    f = 2 ** (len(sd.cfg.vae.ch_mult) - 1)
    return sd.cfg.vae.z_channels, bucket[0] // f, bucket[1] // f


def _text_shapes(sd, chunks: int) -> dict[str, tuple[int, ...]]:
    """What the UNet takes from a caption of `chunks` 77-token chunks: the context, and SDXL's pooled vector
    (its ADM input less the six size and crop embeddings)."""
    unet = sd.cfg.unet
    shapes = {"context": (CHUNK * chunks, unet.context_dim)}
    if unet.adm_in_channels is not None:
        shapes["pooled"] = (unet.adm_in_channels - 6 * unet.adm_embed_dim,)
    return shapes


@dataclass
class CacheStats:
    latents_encoded: int = 0  # images through the VAE at cache time (a mirrored copy not counted apart)
    latents_loaded: int = 0
    texts_encoded: int = 0
    texts_loaded: int = 0
    rejected: int = 0  # files found damaged, stale or foreign, and encoded again


@dataclass
class _Store:
    """safetensors files: a damaged one is named and reads as missing; the first write failure is reported, later
    ones are silent."""
    stats: CacheStats
    write_failed: bool = False

    def load(self, path: Path, shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor] | None:
        """The file's tensors if they pass every check against `shapes` (name -> expected shape), else None."""
        if not path.is_file():
            return None
        try:
            tensors, metadata = read_safetensors(path, GessoError)
        except GessoError as e:  # truncated, zeroed or foreign bytes
            why = f"unreadable ({str(e).removeprefix(f'{path}: ')})"
        else:
            why = _damage(tensors, metadata, shapes)
            if why is None:
                return tensors
        log.warning("cache file %s rejected: %s; encoding it again", path, why)
        self.stats.rejected += 1
        return None

    def save(self, path: Path, tensors: dict[str, torch.Tensor], source: str) -> None:
        metadata = cache_metadata(tensors, source)
        try:
            write_atomic(path, lambda tmp: save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata))
        except OutputError as e:  # a full disk or read-only folder: the run still has every tensor in memory
            if not self.write_failed:
                log.warning("cannot write the cache in %s (%s); this run keeps it in memory only", path.parent.parent, e)
            self.write_failed = True


@torch.no_grad()
def encode_latents(sd, pixels: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) pixels -> (B, 4, H/8, W/8) float32 latents on the CPU, on the VAE's device and dtype."""
    p = next(sd.vae.parameters())
    return sd.encode_images(pixels.to(device=p.device, dtype=p.dtype)).float().cpu()


def encode_captions(sd, tokenizers, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Captions -> context (B, 77k, D) and pooled (B, P) or None, float32 on the text encoders' device.
    Gradients flow when enabled: the per-step path for augmented captions or trained text encoders."""
    tokens = models.tokenize(tokenizers, [embedding.expand(sd, c) for c in captions])  # a trained embedding's word
    device = next(sd.text_encoders[0].parameters()).device
    context, pooled = sd.encode_text([t.to(device) for t in tokens])
    return context.float(), None if pooled is None else pooled.float()


@dataclass
class Cache:
    sd: torch.nn.Module
    tokenizers: list
    dataset: Dataset
    device: torch.device
    latents: list[torch.Tensor]  # per item (4, h/8, w/8), CPU
    flipped: list[torch.Tensor | None]  # per item, the mirrored image's latents when flip is on
    text: dict[str, tuple[torch.Tensor, torch.Tensor | None]] | None  # caption -> (77k, D), (P,); None: per step
    masks: list[torch.Tensor | None]  # per item (1, h/8, w/8) in [0, 1], None: unmasked
    train_text_encoders: bool = False
    stats: CacheStats = field(default_factory=CacheStats)
    validation: "Cache | None" = None  # the held-out images' cache (engine/loop/validation.py), None without any

    def __len__(self) -> int:
        return len(self.dataset)

    def steps_per_epoch(self, batch_size: int) -> int:
        return self.dataset.steps_per_epoch(batch_size)

    def batches(self, epoch: int, batch_size: int, seed: int, skip: int = 0) -> Iterator[TrainBatch]:
        """The epoch's batches on the device, each from one bucket, with their loss weights and masks; `skip` drops
        the first batches of a resumed epoch."""
        for samples in self.dataset.epoch(epoch, batch_size, seed)[skip:]:
            yield *self.tensors(samples), *self.weighting(samples)

    def weighting(self, samples: list[Sample]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Per-sample loss weight (B,) and loss mask (B, 1, h, w) or None (no image of the dataset has a mask)."""
        items = self.dataset.items
        prior = self.dataset.options.prior_loss_weight
        weight = torch.tensor([prior if items[s.index].is_reg else 1.0 for s in samples], device=self.device)
        if not any(m is not None for m in self.masks):
            return weight, None
        shape = (1, *self.latents[samples[0].index].shape[1:])
        masks = [torch.ones(shape) if self.masks[s.index] is None else self.masks[s.index] for s in samples]
        return weight, torch.stack([m.flip(-1) if s.flipped else m for m, s in zip(masks, samples)]).to(self.device)

    def fixed_batches(self, batch_size: int) -> Iterator[Batch]:
        """Every item once, unflipped, with its caption as written, bucket by bucket in a fixed order: an evaluation set."""
        order = sorted(range(len(self.dataset.items)), key=lambda i: self.dataset.items[i].bucket)
        for _, group in groupby(order, key=lambda i: self.dataset.items[i].bucket):
            group = list(group)
            for start in range(0, len(group), batch_size):
                yield self.tensors([Sample(i, False, self.dataset.items[i].caption) for i in group[start : start + batch_size]])

    def tensors(self, samples: list[Sample]) -> Batch:
        latents = torch.stack([(self.flipped if s.flipped else self.latents)[s.index] for s in samples])
        context, pooled = self._text([s.caption for s in samples])
        y = None
        if pooled is not None:
            sizes = [self.dataset.items[s.index].conditioning(s.flipped) for s in samples]
            y = self.sd.adm(pooled, *[[c[j] for c in sizes] for j in range(3)])
        return latents.to(self.device), context, y

    def _text(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.text is None:
            with torch.set_grad_enabled(self.train_text_encoders and torch.is_grad_enabled()):
                context, pooled = encode_captions(self.sd, self.tokenizers, captions)
            return context.to(self.device), None if pooled is None else pooled.to(self.device)
        cached = [self.text[c] for c in captions]
        empty = self.text[""][0]  # (77, D): encoders see each chunk alone, so padding = the empty prompt's chunk
        longest = max(ctx.shape[0] for ctx, _ in cached)
        context = torch.stack([torch.cat([ctx, empty.repeat((longest - ctx.shape[0]) // CHUNK, 1)]) for ctx, _ in cached])
        pooled = None if cached[0][1] is None else torch.stack([p for _, p in cached]).to(self.device)
        return context.to(self.device), pooled

    def release_encoders(self) -> None:
        """Move the VAE, and the text encoders unless text is encoded per step, off the accelerator."""
        self.sd.vae.to("cpu")
        if self.text is not None:
            for encoder in self.sd.text_encoders:
                encoder.to("cpu")
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def describe(self) -> str:
        s = self.stats
        text = "encoded per step" if self.text is None else f"{s.texts_encoded} captions encoded, {s.texts_loaded} from cache"
        rejected = f" ({s.rejected} damaged or stale files encoded again, named above)" if s.rejected else ""
        masks = ""
        if self.dataset.options.masked_loss:
            masked = sum(m is not None for m in self.masks)
            masks = f"; masked loss: {masked} images masked, {len(self.masks) - masked} without a mask train unmasked"
        return f"cache: {s.latents_encoded} images encoded, {s.latents_loaded} from cache; text: {text}{rejected}{masks}"


def _folder(cache_dir: str | Path | None, item: Item) -> Path:
    return Path(cache_dir) if cache_dir is not None else item.root / ".gesso_cache"


def _cache_latents(sd, dataset: Dataset, cache_dir, vae_id: str, store: _Store, stats: CacheStats, batch_size: int,
                   progress: bool = False):
    items, flip = dataset.items, dataset.options.flip
    latents: list[torch.Tensor | None] = [None] * len(items)
    flipped: list[torch.Tensor | None] = [None] * len(items)
    masks: list[torch.Tensor | None] = [None] * len(items)
    paths, missing = [], set()
    for i, it in enumerate(items):
        key = _key(it.digest, vae_id, it.bucket, it.resized, it.crop, flip, *([it.mask_digest] if it.mask_digest else []))
        paths.append(_folder(cache_dir, it) / "latents" / f"{key}.safetensors")
        shape = _latent_shape(sd, it.bucket)
        mask_shape = {"mask": (1, *shape[1:])} if it.mask is not None else {}
        got = store.load(paths[i], {"latents": shape} | ({"flipped": shape} if flip else {}) | mask_shape)
        if got is not None:
            latents[i], flipped[i], masks[i] = got["latents"], got.get("flipped"), got.get("mask")
            stats.latents_loaded += 1
        else:
            missing.add(i)
    broken = set()
    bar = tqdm(total=len(missing), desc="caching latents", unit="image", leave=False, disable=not (progress and missing))
    try:  # closed on an interrupt too, so a one-line message never lands on the bar's line
        for group in fixed_batches(range(len(items)), lambda i: items[i].bucket, missing, batch_size):
            chunk, pixels = [], []
            for i in group:
                try:
                    pixels.append(load_pixels(items[i]))
                    if i in missing:
                        masks[i] = _load_mask(items[i], _latent_shape(sd, items[i].bucket))
                    chunk.append(i)
                except (OSError, BadImage) as e:  # changed or removed since the scan
                    if i in missing:
                        log.warning("skipped %s: %s", items[i].path, e)
                        dataset.skipped.append((items[i].path, str(e)))
                        broken.add(i)
            bar.update(len(missing.intersection(group)))
            if not missing.intersection(chunk):
                continue
            batch = torch.stack(pixels)  # (b, 3, H, W)
            encoded = encode_latents(sd, torch.cat([batch, batch.flip(-1)]) if flip else batch)
            for j, i in enumerate(chunk):
                if i not in missing:  # encoded only as its batch's member: its cached file stays
                    continue
                stats.latents_encoded += 1
                tensors = {"latents": encoded[j].clone()} | ({"flipped": encoded[len(chunk) + j].clone()} if flip else {})
                tensors |= {"mask": masks[i]} if masks[i] is not None else {}
                if not all(torch.isfinite(t).all() for t in tensors.values()):  # an fp16 VAE overflows on some images
                    why = "the VAE's latents are not finite (NaN or inf); not cached, not trained"
                    log.warning("skipped %s: %s", items[i].path, why)
                    dataset.skipped.append((items[i].path, why))
                    broken.add(i)
                    continue
                latents[i], flipped[i] = tensors["latents"], tensors.get("flipped")
                store.save(paths[i], tensors, str(items[i].path))
    finally:
        bar.close()
    keep = [i for i in range(len(items)) if i not in broken]
    dataset.items = [items[i] for i in keep]
    return [latents[i] for i in keep], [flipped[i] for i in keep], [masks[i] for i in keep]


def fixed_batches(keys, group_of, missing: set, batch_size: int) -> Iterator[list]:
    """The encoder batches that hold a missing key: `keys` grouped by `group_of` (one bucket, one padded length), in
    order, cut into batches of `batch_size` whatever is cached. A key is thus encoded beside the same others, and to
    the same bits, in a run that fills the cache at once and in one resumed after a kill cut its caching short; a
    batch is encoded whole, its members already cached included, when any of it is missing."""
    for _, group in groupby(sorted(keys, key=group_of), key=group_of):
        group = list(group)
        for start in range(0, len(group), batch_size):
            batch = group[start : start + batch_size]
            if missing.intersection(batch):
                yield batch


def _load_mask(item: Item, latent_shape: tuple[int, ...]) -> torch.Tensor | None:
    if item.mask is None:
        return None
    factor = item.bucket[0] // latent_shape[1]
    return load_mask(item.mask, item.mask_digest == ALPHA, item.resized, item.crop, item.bucket, factor)


def _cache_text(sd, tokenizers, dataset: Dataset, cache_dir, text_id: str, store: _Store, stats: CacheStats, batch_size: int,
                progress: bool = False):
    roots = {"": dataset.items[0]} | {it.caption: it for it in reversed(dataset.items)}  # first item holding each caption
    chunks = {c: models.tokenize(tokenizers, [c])[0].shape[1] // CHUNK for c in roots}  # 0.2 ms a caption
    text, paths, missing = {}, {}, set()
    for caption, it in roots.items():
        paths[caption] = _folder(cache_dir, it) / "text" / f"{_key(caption, text_id)}.safetensors"
        got = store.load(paths[caption], _text_shapes(sd, chunks[caption]))
        if got is not None:
            text[caption] = (got["context"], got.get("pooled"))
            stats.texts_loaded += 1
        else:
            missing.add(caption)
    bar = tqdm(total=len(missing), desc="caching text", unit="caption", leave=False, disable=not (progress and missing))
    try:  # closed on an interrupt too, so a one-line message never lands on the bar's line
        # batches of one padded length per encoder call: each caption keeps its own
        for captions in fixed_batches(roots, lambda c: chunks[c], missing, batch_size):
            with torch.no_grad():
                context, pooled = encode_captions(sd, tokenizers, captions)
            for j, c in enumerate(captions):
                if c in missing:  # encoded only as its batch's member: its cached file stays
                    text[c] = (context[j].cpu().clone(), None if pooled is None else pooled[j].cpu().clone())
                    tensors = {"context": text[c][0]} | ({} if pooled is None else {"pooled": text[c][1]})
                    store.save(paths[c], tensors, c)
            stats.texts_encoded += len(missing.intersection(captions))
            bar.update(len(missing.intersection(captions)))
    finally:
        bar.close()
    return text


def prepare_cache(sd, tokenizers, dataset: Dataset, device: torch.device, cache_dir: str | Path | None = None,
                  model_id: str = "", train_text_encoders: bool = False, encode_batch_size: int = 4,
                  progress: bool = False) -> Cache:
    """Load or encode the latents (and, unless captions change per step, the text) of every item.

    cache_dir: None puts each subset's cache in `<subset>/.gesso_cache`. model_id: when given, it names the
    model in the keys instead of the weights' fingerprints. Items whose file broke since the scan, or whose
    latents are not finite, are dropped; TrainError when none is left. progress: a bar while encoding.
    """
    stats = CacheStats()
    store = _Store(stats)
    vae_id = f"{model_id}:vae" if model_id else fingerprint(sd.vae)
    scanned = len(dataset.skipped)
    latents, flipped, masks = _cache_latents(sd, dataset, cache_dir, vae_id, store, stats, encode_batch_size, progress)
    if not dataset.items:
        path, why = dataset.skipped[scanned]
        raise TrainError(f"dataset: every image was skipped while caching, the first {path}: {why}")
    text = None
    if dataset.options.augments_captions or train_text_encoders:
        why = "text encoders are trained" if train_text_encoders else "caption shuffle/dropout changes captions every step"
        log.warning("text cache off: %s, so captions are encoded per batch", why)
    elif dataset.items:
        tokenizer_id = [[type(t).__name__, len(t), t.pad_token_id] for t in tokenizers]
        text_id = f"{model_id}:text" if model_id else [fingerprint(e) for e in sd.text_encoders]
        text = _cache_text(sd, tokenizers, dataset, cache_dir, json.dumps([text_id, tokenizer_id]), store, stats, 16, progress)
    return Cache(sd, tokenizers, dataset, torch.device(device), latents, flipped, text, masks, train_text_encoders, stats)

