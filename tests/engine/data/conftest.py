import numpy as np
import pytest
from PIL import Image

from gesso import models
from gesso.engine.data.dataset import DatasetOptions


@pytest.fixture(scope="module")
def tiny():
    sd = models.build("tiny-sdxl", seed=0)
    sd.requires_grad_(False)
    return sd, models.load_tokenizers(sd.cfg)


@pytest.fixture
def small():
    """128 px buckets between 64 and 256 px sides: (h, w) in {(64, 192), (64, 256), (128, 128), (192, 64), (256, 64)}."""
    return DatasetOptions(resolution=128, min_bucket_side=64, max_bucket_side=256)


@pytest.fixture
def make_image():
    """make_image(path, width, height, seed=0, caption=None): a random RGB file; caption text written beside it."""
    def make(path, width, height, seed=0, caption=None):
        path.parent.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(seed)
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path)
        if caption is not None:
            path.with_suffix(".txt").write_text(caption)
        return path
    return make
