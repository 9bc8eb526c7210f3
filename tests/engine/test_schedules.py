import io
import math

import pytest
import torch
from diffusers import optimization

from gesso.engine.schedules import SCHEDULES, build_schedule


def make_optimizer(lrs=(1e-4, 5e-5)):
    groups = [{"params": [torch.nn.Parameter(torch.randn(3))], "lr": lr} for lr in lrs]
    return torch.optim.SGD(groups, lr=lrs[0])


def lrs_over(scheduler, steps):
    """lr of every group at optimizer steps 0..steps-1, flattened, stepping as the training loop does."""
    out = []
    for _ in range(steps):
        out.extend(g["lr"] for g in scheduler.optimizer.param_groups)
        scheduler.optimizer.step()
        scheduler.step()
    return out


# (name, total, warmup, cycles, {step: expected multiplier}) from the formulas written out by hand
CASES = [
    ("constant", 100, 10, 1, {0: 1.0, 5: 1.0, 99: 1.0}),  # warmup ignored, as in diffusers
    ("constant_with_warmup", 100, 10, 1, {0: 0.0, 5: 0.5, 10: 1.0, 99: 1.0}),
    ("linear", 100, 10, 1, {0: 0.0, 4: 0.4, 10: 1.0, 55: 0.5, 100: 0.0, 120: 0.0}),
    ("cosine", 110, 10, 1, {0: 0.0, 10: 1.0, 35: (1 + math.cos(math.pi / 4)) / 2, 60: 0.5, 110: 0.0}),
    # 2 cycles over 100 steps after warmup: restarts to 1 at t = 60, half-way down at 35 and 85
    ("cosine_with_restarts", 110, 10, 2, {10: 1.0, 35: 0.5, 59: (1 + math.cos(math.pi * 49 / 50)) / 2, 60: 1.0, 85: 0.5, 110: 0.0}),
    ("linear", 7, 0, 1, {0: 1.0, 3: 4 / 7, 6: 1 / 7}),  # no warmup, odd length
]


@pytest.mark.parametrize("name,total,warmup,cycles,expected", CASES)
def test_multiplier_equals_formula(name, total, warmup, cycles, expected):
    lrs = lrs_over(build_schedule(name, make_optimizer(), total, warmup, cycles), max(expected) + 1)
    for step, m in expected.items():
        assert lrs[2 * step : 2 * step + 2] == pytest.approx([1e-4 * m, 5e-5 * m], rel=1e-12, abs=1e-18), step


@pytest.mark.parametrize("name", SCHEDULES)
@pytest.mark.parametrize("warmup,cycles", [(0, 1), (7, 3)])  # no warmup; warmup with 3 restarts
def test_matches_diffusers_get_scheduler(name, warmup, cycles):
    total = 53
    ours = lrs_over(build_schedule(name, make_optimizer(), total, warmup, cycles), total + 5)
    ref_opt = make_optimizer()
    ref = optimization.get_scheduler(name, ref_opt, num_warmup_steps=warmup, num_training_steps=total, num_cycles=cycles)
    assert ours == pytest.approx(lrs_over(ref, total + 5), rel=1e-12, abs=1e-18)


def test_state_dict_resumes_mid_schedule():
    full = lrs_over(build_schedule("cosine_with_restarts", make_optimizer(), 40, 5, 2), 40)
    opt = make_optimizer()
    sched = build_schedule("cosine_with_restarts", opt, 40, 5, 2)
    first = lrs_over(sched, 17)
    buf = io.BytesIO()
    torch.save({"opt": opt.state_dict(), "sched": sched.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    opt2 = make_optimizer()
    sched2 = build_schedule("cosine_with_restarts", opt2, 40, 5, 2)
    opt2.load_state_dict(saved["opt"])
    sched2.load_state_dict(saved["sched"])
    assert first + lrs_over(sched2, 23) == full


def test_unknown_name_lists_known():
    with pytest.raises(ValueError, match="unknown lr schedule 'cosine_annealing'.*cosine_with_restarts"):
        build_schedule("cosine_annealing", make_optimizer(), 10)
