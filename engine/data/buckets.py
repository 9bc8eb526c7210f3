"""Aspect-ratio bucketing: train every image near its own shape at about resolution^2 pixels.

The bucket sizes follow NovelAI's scheme as kohya's sd-scripts use it: sides are multiples of 64 between
a minimum and a maximum side, each width paired with the largest height that keeps the area at most
resolution^2, both orientations, plus the square. An image goes to the bucket whose aspect ratio is
closest (in log ratio, so portrait and landscape are treated alike), is resized to cover it and cropped
into it. SDXL's conditioning records the size before resizing and the crop's (top, left) in resized
pixels (Podell et al. 2023, sec. 2.2); a horizontal flip mirrors the crop's left edge.
"""
import math
from collections import defaultdict

import torch

Size = tuple[int, int]  # (height, width) in pixels


def bucket_sizes(resolution: int, min_side: int, max_side: int, step: int = 64) -> list[Size]:
    """Every (h, w) with sides multiples of `step` in [min_side, max_side] and area just under resolution^2."""
    if resolution % step or min_side % step or max_side % step:
        raise ValueError(f"resolution {resolution}, min side {min_side} and max side {max_side} must be multiples of {step}")
    if not step <= min_side <= resolution <= max_side:
        raise ValueError(f"need {step} <= min side {min_side} <= resolution {resolution} <= max side {max_side}")
    area = resolution * resolution
    sizes = {(resolution, resolution)}
    for width in range(min_side, max_side + 1, step):
        height = area // width // step * step
        if min_side <= height <= max_side:
            sizes |= {(height, width), (width, height)}
    return sorted(sizes)


def assign(size: Size, buckets: list[Size]) -> Size:
    """The bucket whose aspect ratio is closest to the image's; ties go to the larger bucket."""
    h, w = size
    return min(buckets, key=lambda b: (abs(math.log((b[1] / b[0]) / (w / h))), -b[0] * b[1], b))


def cover(size: Size, bucket: Size) -> Size:
    """The size after scaling, keeping the aspect ratio, so that the image just covers the bucket."""
    (h, w), (bh, bw) = size, bucket
    scale = max(bh / h, bw / w)
    return max(bh, round(h * scale)), max(bw, round(w * scale))


def centre_crop(resized: Size, bucket: Size) -> Size:
    """(top, left) of the centred crop."""
    return (resized[0] - bucket[0]) // 2, (resized[1] - bucket[1]) // 2


def random_crop(resized: Size, bucket: Size, generator: torch.Generator) -> Size:
    """(top, left) drawn uniformly over every crop that fits."""
    top = int(torch.randint(0, resized[0] - bucket[0] + 1, (), generator=generator))
    left = int(torch.randint(0, resized[1] - bucket[1] + 1, (), generator=generator))
    return top, left


def flipped_crop(crop: Size, resized: Size, bucket: Size) -> Size:
    """(top, left) of the same crop once the resized image is mirrored: what was cut on the right is now cut on the left."""
    return crop[0], resized[1] - crop[1] - bucket[1]


def batches_by_bucket(buckets: list[Size], batch_size: int, generator: torch.Generator) -> list[list[int]]:
    """Sample indices grouped into batches that never mix buckets: shuffled within each bucket, then batch order shuffled.

    A bucket's last batch may be short; len(result) == count_batches(buckets, batch_size).
    """
    groups: dict[Size, list[int]] = defaultdict(list)
    for i, bucket in enumerate(buckets):
        groups[bucket].append(i)
    out = []
    for bucket in sorted(groups):
        members = groups[bucket]
        shuffled = [members[j] for j in torch.randperm(len(members), generator=generator).tolist()]
        out += [shuffled[k : k + batch_size] for k in range(0, len(shuffled), batch_size)]
    return [out[j] for j in torch.randperm(len(out), generator=generator).tolist()]


def count_batches(buckets: list[Size], batch_size: int) -> int:
    counts: dict[Size, int] = defaultdict(int)
    for bucket in buckets:
        counts[bucket] += 1
    return sum(math.ceil(n / batch_size) for n in counts.values())
