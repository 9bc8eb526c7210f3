"""Full-size SDXL predictions shared by the memory tests of one session (each is seconds of meta-device tracing)."""
from gesso.engine.memory import memtrace

SDXL_1024 = ["model.name='sdxl'", "network.conv_rank=0", "network.rank=16", "network.alpha=16", "dataset.resolution=1024",
             "train.batch_size=1", "train.mixed_precision='bf16'", "train.optimizer='adamw8bit'"]
_CACHE: dict[str, memtrace.MemoryPrediction] = {}
_PREDICT = memtrace.predict  # the real one, also while a test patches memtrace.predict with a wrapper of this


def predict(cfg) -> memtrace.MemoryPrediction:
    """memtrace.predict, once per distinct config."""
    key = repr(cfg)
    if key not in _CACHE:
        _CACHE[key] = _PREDICT(cfg)
    return _CACHE[key]
