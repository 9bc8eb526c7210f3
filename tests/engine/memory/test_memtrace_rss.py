"""The meta-device prediction against a measured peak: the resident memory of one real CPU training step.

A child process builds a mid-size UNet (between tiny-sdxl and SD 1.5) with the training setup's own functions
and runs two steps in fp32 (the second with the optimizer's states, the step the prediction describes). glibc
is told to serve every allocation over 64 KiB with mmap and to hand it back on free, so the peak resident
memory over a baseline is what the step held, as the GPU allocator's max_memory_allocated would be. The
baseline is taken after an identical model was trained one step and freed: the runtime's one-time caches
(oneDNN, thread pools, small-block heap) are in it, as the CUDA context is outside max_memory_allocated;
without that they add about 50 MB. The CPU runs the same kernels' reference path the meta device traces.
"""
import dataclasses
import json
import os
import subprocess
import sys
from unittest import mock

import pytest

from gesso.engine.config.load import load_config
from gesso.engine.memory import memtrace
from gesso.models import configs
from gesso.models.configs import UNetConfig
from tests.engine.loop.test_train import DEMO

MID = dataclasses.replace(configs.TINY_SDXL, name="mid-sdxl",
                  unet=UNetConfig(model_channels=64, channel_mult=(1, 2, 4), transformer_depth=(0, 1, 2),
                                  transformer_depth_middle=2, head_dim=32, context_dim=256, adm_in_channels=None))
OVERRIDES = ["model.name='mid-sdxl'", "dataset.resolution=256", "train.batch_size=4", "network.rank=8", "network.alpha=8",
             "network.conv_rank=8", "train.optimizer='adamw'", "train.mixed_precision='no'"]

CHILD = r"""
import gc, json, resource, sys
import torch
import torch.nn.functional as F
torch.set_num_threads(1)
from gesso.engine.config.load import load_config
from gesso.engine.memory.network_setup import prepare_unet, train_optimizer
from gesso.models import configs
from gesso.models.unet import UNet
from tests.engine.memory.test_memtrace_rss import MID

demo, overrides, checkpointing = json.loads(sys.argv[1])
configs.REGISTRY[MID.name] = MID
cfg = load_config(demo, overrides + [f"train.gradient_checkpointing={str(checkpointing).lower()}"])  # as the parent's


def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def train(steps):
    # the model as training builds it, `steps` steps of it; returns the RSS after the first
    torch.manual_seed(0)
    unet = UNet(MID.unet).requires_grad_(False)
    network, _ = prepare_unet(unet, cfg, torch.device("cpu"))
    opt = train_optimizer(network, cfg.train)
    side, b = cfg.dataset.resolution // 8, cfg.train.batch_size
    resident = None
    for step in range(steps):
        x0 = torch.randn(b, 4, side, side)
        noise = torch.randn_like(x0)
        pred = unet(x0 + noise, torch.randint(0, 1000, (b,)), torch.randn(b, 77, MID.unet.context_dim))
        F.mse_loss(pred.float(), noise).backward()
        del x0, pred
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step == 0:
            resident = rss()
    return resident


train(1)  # an identical model, then freed: the runtime's one-time caches join the baseline
gc.collect()
base = rss()
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # resets the peak resident memory (VmHWM) to what is resident now
resident = train(2)
with open("/proc/self/status") as f:
    hwm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
print(json.dumps({"base": base, "resident": resident, "peak": hwm}))
"""


def _measured(checkpointing: bool) -> int:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0", MALLOC_ARENA_MAX="1",
               OMP_NUM_THREADS="1", ONEDNN_PRIMITIVE_CACHE_CAPACITY="0")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    out = subprocess.run([sys.executable, "-c", CHILD, json.dumps([str(DEMO), OVERRIDES, checkpointing])],
                         capture_output=True, text=True, env=env, cwd=root, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.splitlines()[-1])


@pytest.mark.slow
def test_prediction_agrees_with_the_measured_peak_of_a_cpu_step_within_10_percent():
    with mock.patch.dict(configs.REGISTRY, {MID.name: MID}):
        for checkpointing in (False, True):
            cfg = load_config(DEMO, OVERRIDES + [f"train.gradient_checkpointing={str(checkpointing).lower()}"])
            predicted = memtrace.predict(cfg)
            m = _measured(checkpointing)
            measured = (m["peak"] - m["base"]) / memtrace.GIB
            assert predicted.activations_gib > 0.1 * predicted.peak_gib  # not only weights: activations are tested too
            assert abs(measured - predicted.peak_gib) <= 0.10 * predicted.peak_gib, (measured, predicted.describe())
