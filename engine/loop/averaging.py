"""The weights a run shows: an exponential moving average of the LoRA weights (train.ema_decay), or schedule-free
AdamW's evaluation weights, and a way to put them in place for previews, saved files and validation and to give the
training weights back exactly afterwards.

EMA as OneTrainer and diffusers' EMAModel keep it, without warm-up: after every optimizer step
shadow = decay * shadow + (1 - decay) * weight, in fp32, from the weights the run starts with.
"""
import contextlib
from collections.abc import Iterator

import torch

from gesso.engine.lora.network import OFF, Dropout
from gesso.engine.optim import SWITCHES_WEIGHTS


class EMA:
    """fp32 shadows of the trained tensors, in the network's order (the order the state file keeps them in)."""

    def __init__(self, params: list[torch.Tensor], decay: float):
        self.decay = decay
        self.shadow = [p.detach().float().clone() for p in params]

    @torch.no_grad()
    def update(self, params: list[torch.Tensor]) -> None:
        for s, p in zip(self.shadow, params, strict=True):
            s.lerp_(p.detach().float(), 1 - self.decay)  # s + (1 - decay)(p - s)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "shadow": self.shadow}

    def load_state_dict(self, state: dict, where: str) -> None:
        """The shadows of a state file; TrainError-worthy mismatches come back as ValueError naming `where`."""
        shadow = state.get("shadow")
        if not isinstance(shadow, list) or [tuple(t.shape) for t in shadow] != [tuple(t.shape) for t in self.shadow]:
            raise ValueError(f"{where}: its EMA weights do not fit this network")
        for s, saved in zip(self.shadow, shadow):
            s.copy_(saved)


class Shown:
    """What the run evaluates with: `evaluating()` swaps in the EMA (or schedule-free's evaluation) weights and turns
    dropout off, and on leaving restores the training weights bit for bit (schedule-free's own switch back,
    a lerp, would round them) and the training dropout."""

    def __init__(self, network, opt: torch.optim.Optimizer, optimizer: str, ema: EMA | None, dropout: Dropout = OFF):
        self.network, self.opt, self.ema, self.dropout = network, opt, ema, dropout
        self.switches = optimizer in SWITCHES_WEIGHTS

    def set_dropout(self, dropout: Dropout) -> None:
        if hasattr(self.network, "set_dropout"):  # a textual-inversion network has no dropout
            self.network.set_dropout(dropout)

    @contextlib.contextmanager
    def evaluating(self) -> Iterator[None]:
        params = self.network.parameters()
        saved = [p.detach().clone() for p in params] if self.ema or self.switches else []
        self.set_dropout(OFF)
        try:
            with torch.no_grad():
                if self.ema:
                    for p, s in zip(params, self.ema.shadow):
                        p.copy_(s)
                elif self.switches:
                    self.opt.eval()
            yield
        finally:
            with torch.no_grad():
                if self.switches:
                    self.opt.train()
                for p, s in zip(params, saved):
                    p.copy_(s)
            self.set_dropout(self.dropout)
