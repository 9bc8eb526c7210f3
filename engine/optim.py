"""Optimizers for LoRA training: the factory, Prodigy and Adafactor.

AdamW is torch's; 8-bit AdamW is the kernels package's; schedule-free AdamW comes from the `schedulefree` package
and CAME and Lion from `pytorch-optimizer` (the `optimizers` extra), imported when chosen. Prodigy and
Adafactor are written here so their state lives in plain tensors and python scalars that
`state_dict` round-trips exactly, and so every mode reads its step size from the param group's
`lr`, which the lr schedules scale and which may differ between UNet and text encoders.
"""
import importlib
import inspect
import math

import torch

from gesso.errors import ConfigError
from gesso.kernels.adamw8bit import AdamW8bit


class Prodigy(torch.optim.Optimizer):
    """Adam whose step size d is learned from the run (Mishchenko & Defazio 2023, "Prodigy", Algorithm 4).

    d starts at d0 and grows to d_coef * r / |s|_1, a lower bound on the distance to the solution,
    where r and s are beta3-averages of <g, x0 - x> and g weighted by each step's size. The step of
    a group is d * lr (lr = 1 is the intended setting); one d is shared by all groups, each group's
    terms weighted by its own step, and a group whose lr is 0 is frozen and adds nothing to the
    estimate (the authors' `prodigyopt` allows no other per-group lr). Otherwise numerics follow
    `prodigyopt`: r and s carry a d / d0 factor for range, and the Adam denominator uses the new d.
    """

    def __init__(
        self, params, lr=1.0, betas=(0.9, 0.999), beta3=None, eps=1e-8, weight_decay=0.0, decouple=True,
        use_bias_correction=False, safeguard_warmup=False, d0=1e-6, d_coef=1.0, growth_rate=math.inf,
    ):
        if not (lr >= 0 and eps > 0 and d0 > 0 and d_coef > 0 and growth_rate >= 1 and 0 <= betas[0] < 1 and 0 <= betas[1] < 1):
            raise ValueError(f"Prodigy: invalid lr={lr}, eps={eps}, d0={d0}, d_coef={d_coef}, growth_rate={growth_rate} or betas={betas}")
        defaults = dict(
            lr=lr, betas=tuple(betas), beta3=beta3, eps=eps, weight_decay=weight_decay, decouple=decouple,
            use_bias_correction=use_bias_correction, safeguard_warmup=safeguard_warmup, d0=d0, d_coef=d_coef,
            growth_rate=growth_rate, d=d0, d_max=d0, d_numerator=0.0, k=0,
        )
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # the running estimate is kept identical in every group so state_dict carries it
        first = self.param_groups[0]
        beta1, beta2 = first["betas"]
        beta3 = math.sqrt(beta2) if first["beta3"] is None else first["beta3"]
        d, d0, k = first["d"], first["d0"], first["k"]
        bias_correction = math.sqrt(1 - beta2 ** (k + 1)) / (1 - beta1 ** (k + 1)) if first["use_bias_correction"] else 1.0
        live = [(g, p) for g in self.param_groups if g["lr"] > 0 for p in g["params"] if p.grad is not None]
        numerator_terms, denom_terms = [], []
        for group, p in live:
            dlr = d * group["lr"] * bias_correction
            state = self.state[p]
            if not state:
                state["p0"] = p.detach().clone()
                state["s"] = torch.zeros_like(p)
                state["exp_avg"] = torch.zeros_like(p)
                state["exp_avg_sq"] = torch.zeros_like(p)
            grad = p.grad
            if group["weight_decay"] and not group["decouple"]:
                grad = grad.add(p, alpha=group["weight_decay"])
            numerator_terms.append((d / d0) * dlr * torch.dot(grad.flatten().float(), (state["p0"] - p).flatten().float()))
            state["exp_avg"].mul_(beta1).add_(grad, alpha=d * (1 - beta1))
            state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=d * d * (1 - beta2))
            state["s"].mul_(beta3).add_(grad, alpha=(d / d0) * (d if group["safeguard_warmup"] else dlr))
            denom_terms.append(state["s"].float().abs().sum())
        if not live:
            return loss
        # one host sync per step: the new d decides every parameter's step below
        step_numerator, denom = torch.stack([torch.stack(numerator_terms).double().sum(), torch.stack(denom_terms).double().sum()]).tolist()
        if denom == 0:  # every gradient so far was zero: nothing to estimate from
            return loss
        numerator = first["d_numerator"] * beta3 + step_numerator
        d_hat = first["d_coef"] * numerator / denom
        d_max = max(first["d_max"], d_hat)
        new_d = min(d_max, (max(d, d_hat) if d == d0 else d) * first["growth_rate"])

        for group, p in live:
            dlr = d * group["lr"] * bias_correction
            state = self.state[p]
            if group["weight_decay"] and group["decouple"]:
                p.add_(p, alpha=-group["weight_decay"] * dlr)
            p.addcdiv_(state["exp_avg"], state["exp_avg_sq"].sqrt().add_(new_d * group["eps"]), value=-dlr)
        for group in self.param_groups:
            group.update(d=new_d, d_max=d_max, d_numerator=numerator, k=k + 1)
        return loss


class Adafactor(torch.optim.Optimizer):
    """Adafactor (Shazeer & Stern 2018, Algorithms 4 and 5): factored second moments, update clipping.

    A tensor of 2 or more dims keeps row and column means of g^2 + eps1 instead of a full second
    moment (eq. 4-5, over the last two dims); beta2_t = 1 - t^decay_rate; the update is divided by
    max(1, RMS(update) / clip_threshold) (Sec. 6). The step size is the group's `lr`, or with
    `relative_step` min(1e-2, 1 / sqrt(t)) (min(1e-6 t, 1 / sqrt(t)) with `warmup_init`), times
    max(eps2, RMS(x)) with `scale_parameter` (Sec. 8). Defaults keep the group lr and no parameter
    scale: LoRA's up matrices start at zero, where a parameter-relative step would stall. Numerics
    match transformers' `Adafactor`, so settings carried over from kohya mean the same here.
    """

    def __init__(
        self, params, lr=1e-3, eps=(1e-30, 1e-3), clip_threshold=1.0, decay_rate=-0.8, beta1=None,
        weight_decay=0.0, scale_parameter=False, relative_step=False, warmup_init=False,
    ):
        if warmup_init and not relative_step:
            raise ValueError("Adafactor: warmup_init needs relative_step=True")
        if not (lr >= 0 and clip_threshold > 0 and decay_rate < 0):
            raise ValueError(f"Adafactor: invalid lr={lr}, clip_threshold={clip_threshold} or decay_rate={decay_rate}")
        defaults = dict(
            lr=lr, eps=tuple(eps), clip_threshold=clip_threshold, decay_rate=decay_rate, beta1=beta1,
            weight_decay=weight_decay, scale_parameter=scale_parameter, relative_step=relative_step, warmup_init=warmup_init,
        )
        super().__init__(params, defaults)

    def load_state_dict(self, state_dict):
        """Restore exactly: torch casts floating state to the parameter's dtype, but this state is fp32 for every dtype."""
        super().load_state_dict(state_dict)
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for index, p in zip(saved_ids, params):
            for key, value in state_dict["state"].get(index, {}).items():
                if torch.is_tensor(value) and value.is_floating_point():
                    self.state[p][key] = value.to(p.device, torch.float32, copy=True)

    @staticmethod
    def _rms(x: torch.Tensor) -> torch.Tensor:
        return x.norm(2) / math.sqrt(x.numel())

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            eps1, eps2 = group["eps"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad.float()
                x = p if p.dtype == torch.float32 else p.float()  # low-precision params update through an fp32 copy
                state = self.state[p]
                factored = grad.dim() >= 2
                if not state:
                    state["step"] = 0
                    if factored:
                        state["exp_avg_sq_row"] = grad.new_zeros(grad.shape[:-1])  # (..., rows)
                        state["exp_avg_sq_col"] = grad.new_zeros(grad.shape[:-2] + grad.shape[-1:])  # (..., cols)
                    else:
                        state["exp_avg_sq"] = torch.zeros_like(grad)
                    if group["beta1"] is not None:
                        state["exp_avg"] = torch.zeros_like(grad)
                state["step"] += 1
                t = state["step"]
                if group["relative_step"]:
                    rho = min(1e-6 * t if group["warmup_init"] else 1e-2, 1 / math.sqrt(t))
                else:
                    rho = group["lr"]
                alpha = self._rms(x).clamp(min=eps2) * rho if group["scale_parameter"] else rho
                beta2t = 1.0 - t ** group["decay_rate"]
                sq = grad * grad + eps1
                if factored:
                    row, col = state["exp_avg_sq_row"], state["exp_avg_sq_col"]
                    row.mul_(beta2t).add_(sq.mean(dim=-1), alpha=1 - beta2t)
                    col.mul_(beta2t).add_(sq.mean(dim=-2), alpha=1 - beta2t)
                    row_factor = (row / row.mean(dim=-1, keepdim=True)).rsqrt().unsqueeze(-1)
                    update = row_factor * col.unsqueeze(-2).rsqrt() * grad
                else:
                    state["exp_avg_sq"].mul_(beta2t).add_(sq, alpha=1 - beta2t)
                    update = state["exp_avg_sq"].rsqrt() * grad
                update.div_((self._rms(update) / group["clip_threshold"]).clamp(min=1.0)).mul_(alpha)
                if group["beta1"] is not None:
                    update = state["exp_avg"].mul_(group["beta1"]).add_(update, alpha=1 - group["beta1"])
                if group["weight_decay"]:
                    x.sub_(x * (group["weight_decay"] * alpha))
                x.sub_(update)
                if x is not p:
                    p.copy_(x)
        return loss


def _library(name: str, module: str, attr: str, package: str):
    """The class `attr` of an optional package, imported when the optimizer is chosen; a missing package is one
    ConfigError line naming the extra that installs it."""
    def load():
        try:
            return getattr(importlib.import_module(module), attr)
        except ImportError:
            raise ConfigError(f"train.optimizer = {name} needs the {package} package: pip install 'gesso[optimizers]'") from None
    return load


OPTIMIZERS = {
    "adamw": lambda: torch.optim.AdamW,
    "adamw8bit": lambda: AdamW8bit,
    "prodigy": lambda: Prodigy,
    "adafactor": lambda: Adafactor,
    "adamw_schedulefree": _library("adamw_schedulefree", "schedulefree", "AdamWScheduleFree", "schedulefree"),
    "came": _library("came", "pytorch_optimizer", "CAME", "pytorch-optimizer"),
    "lion": _library("lion", "pytorch_optimizer", "Lion", "pytorch-optimizer"),
}
# the optimizers that take train.adam_beta1/2 and adam_epsilon; the others keep their own defaults (Lion's betas are
# (0.9, 0.99), CAME's three betas (0.9, 0.999, 0.9999) and two epsilons), which optimizer_args may set
ADAM_MOMENTS = ("adamw", "adamw8bit", "prodigy", "adamw_schedulefree")
# optimizers whose training weights are not the weights to evaluate: train()/eval() switch between them
SWITCHES_WEIGHTS = ("adamw_schedulefree",)


def optimizer_options(name: str) -> list[str]:
    """The keywords train.optimizer_args may give the optimizer `name`: its constructor's, less those
    build_optimizer sets itself from the train section (lr, weight_decay, and for Adam's kin betas and eps)."""
    own = {"lr", "weight_decay"} | ({"betas", "eps"} if name in ADAM_MOMENTS else set())
    named = [p.name for p in inspect.signature(OPTIMIZERS[name]()).parameters.values()
             if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]
    return sorted(set(named) - {"params"} - own)


def build_optimizer(
    name: str, param_groups, lr: float, weight_decay: float, adam_betas=(0.9, 0.999), adam_eps=1e-8, **extra
) -> torch.optim.Optimizer:
    """The named optimizer over `param_groups` (tensors, or dicts whose own `lr` overrides `lr`).

    `extra` holds the optimizer's own options (Prodigy: d_coef, growth_rate, use_bias_correction,
    safeguard_warmup, d0, decouple, beta3; Adafactor: relative_step, scale_parameter, warmup_init,
    clip_threshold, decay_rate, beta1; schedule-free AdamW: warmup_steps, r, weight_lr_power; CAME and Lion: betas).
    Only Adam's kin (ADAM_MOMENTS) take `adam_betas` and `adam_eps` (as betas, eps); the others keep their own
    defaults unless `extra` sets them. For Prodigy, lr = 1 is the usual setting.
    """
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r} (known: {', '.join(OPTIMIZERS)})")
    unknown = sorted(set(extra) - set(optimizer_options(name)))
    if unknown:
        raise ValueError(f"optimizer {name!r} has no option {', '.join(unknown)} (known: {', '.join(optimizer_options(name))})")
    kwargs = dict(lr=lr, weight_decay=weight_decay) | (dict(betas=adam_betas, eps=adam_eps) if name in ADAM_MOMENTS else {}) | extra
    opt = OPTIMIZERS[name]()(param_groups, **kwargs)
    if name in SWITCHES_WEIGHTS:
        opt.train()  # schedule-free starts in evaluation mode and refuses to step there
    return opt
