"""AdamW with block-wise 8-bit moments (Dettmers et al., 2021, "8-bit Optimizers via Block-wise Quantization").

Fused: one program per 256-element block loads g, p and the two uint8 code blocks, dequantises
(map[code] * absmax), applies the AdamW update in fp32, takes the new block absmax and requantises to the
nearest code by an 8-step binary search over the code midpoints, all in one pass: 2 bytes of state per
parameter instead of 8. Memory-bound; fast for LoRA's many mid-sized tensors. Tensors under 4096
elements keep fp32 states (quantisation gains nothing there), as bitsandbytes does.
"""
import math

import torch
import triton
import triton.language as tl

from gesso.kernels import fallback
from gesso.kernels.dispatch import use_triton

BLOCK = 256
MIN_8BIT_SIZE = 4096
FP32_STATE_KEYS = ("m_absmax", "v_absmax", "exp_avg", "exp_avg_sq")


def dynamic_map(signed: bool) -> torch.Tensor:
    """The 256 sorted codes of the dynamic ("tree") quantisation map, values in [-1, 1] or [0, 1].

    A code is a decade 10^(d-6), d = 0..6, times a linear fraction in (0.1, 1): decade d holds the 2^d
    (signed, per sign) or 2^(d+1) (unsigned) midpoints of linspace(0.1, 1, n + 1), so small decades are
    coarse and the top decade fine; plus the exact codes 0 and 1. Signed: 2 * 127 + 2 = 256 codes
    (min -0.99297, max 1); unsigned: 254 + 2 = 256 codes covering 3.25e-7 .. 1 (v spans many decades).
    """
    values = [0.0, 1.0]
    for decade in range(7):
        n = 2**decade if signed else 2 ** (decade + 1)
        edges = torch.linspace(0.1, 1.0, n + 1, dtype=torch.float64)
        means = ((edges[:-1] + edges[1:]) / 2 * 10.0 ** (decade - 6)).tolist()
        values += means + ([-x for x in means] if signed else [])
    assert len(values) == 256, len(values)
    return torch.tensor(sorted(values), dtype=torch.float32)


def code_midpoints(qmap: torch.Tensor) -> torch.Tensor:
    """(256,) fp32: the 255 midpoints between neighbouring codes, then +inf (so 8 halvings cover it)."""
    mids = (qmap[1:].double() + qmap[:-1].double()) / 2
    return torch.cat([mids, torch.tensor([math.inf], dtype=torch.float64)]).float()


_MAPS: dict = {}


def _maps(device) -> tuple:
    """(signed map, unsigned map, signed midpoints, unsigned midpoints) on `device`, built once."""
    key = str(device)
    if key not in _MAPS:
        signed, unsigned = dynamic_map(True), dynamic_map(False)
        _MAPS[key] = tuple(t.to(device) for t in (signed, unsigned, code_midpoints(signed), code_midpoints(unsigned)))
    return _MAPS[key]


def quantize_blockwise(x: torch.Tensor, qmap: torch.Tensor, mids: torch.Tensor):
    """x (n,) fp32 -> codes (n,) uint8 of the nearest code to x / absmax, absmax (ceil(n / 256),) fp32."""
    n = x.numel()
    blocks = torch.nn.functional.pad(x.reshape(-1), (0, (-n) % BLOCK)).view(-1, BLOCK)
    absmax = blocks.abs().amax(dim=1)
    normed = blocks / torch.where(absmax > 0, absmax, torch.ones_like(absmax))[:, None]
    codes = torch.searchsorted(mids[:255].contiguous(), normed.contiguous())  # count of midpoints < x
    return codes.reshape(-1)[:n].to(torch.uint8), absmax


def dequantize_blockwise(codes: torch.Tensor, absmax: torch.Tensor, qmap: torch.Tensor) -> torch.Tensor:
    """codes (n,) uint8, absmax (ceil(n / 256),) -> (n,) fp32."""
    n = codes.numel()
    return qmap[codes.long()] * absmax.repeat_interleave(BLOCK)[:n]


def adamw8bit_ref(p, g, state, lr, beta1, beta2, eps, weight_decay, step, upcast: bool = True):
    """One AdamW step on p (any shape) with the block-wise 8-bit moments in `state`, in place.

    upcast: compute in fp32 (the only mode; the flag keeps the house signature)."""
    assert upcast, "the 8-bit AdamW reference always computes in fp32"
    m_map, v_map, m_mids, v_mids = _maps(p.device)
    g = g.reshape(-1).float()
    p32 = p.reshape(-1).float()
    m = dequantize_blockwise(state["m_code"], state["m_absmax"], m_map)
    v = dequantize_blockwise(state["v_code"], state["v_absmax"], v_map)
    finite = torch.isfinite(g)
    g = torch.where(finite, g, torch.zeros_like(g))
    m_new = torch.where(finite, beta1 * m + (1 - beta1) * g, m)
    v_new = torch.where(finite, beta2 * v + (1 - beta2) * g * g, v)
    p_new = p32 * (1 - lr * weight_decay)
    p_new = p_new - (lr / (1 - beta1**step)) * m_new / (torch.sqrt(v_new) / math.sqrt(1 - beta2**step) + eps)
    p.copy_(torch.where(finite, p_new, p32).view_as(p))
    state["m_code"], state["m_absmax"] = quantize_blockwise(m_new, m_map, m_mids)
    state["v_code"], state["v_absmax"] = quantize_blockwise(v_new, v_map, v_mids)


@triton.jit
def _nearest_code(x, mids_ptr):
    """Index of the nearest of 256 sorted codes: the count of the 255 midpoints below x, 8 halvings."""
    code = tl.zeros_like(x).to(tl.int32)
    for i in tl.static_range(8):
        step = 128 >> i  # a constexpr per unrolled iteration; an annotated one could not be reassigned
        mid = tl.load(mids_ptr + code + (step - 1))
        code = tl.where(mid < x, code + step, code)
    return code


@triton.jit
def _adamw8bit_kernel(
    # pointers
    p_ptr,  # shape (n,), fp32/bf16/fp16, updated in place
    g_ptr,  # shape (n,)
    m_code_ptr,  # shape (n,) uint8, in place
    v_code_ptr,  # shape (n,) uint8, in place
    m_absmax_ptr,  # shape (ceil(n / BLOCK),) fp32, in place
    v_absmax_ptr,  # shape (ceil(n / BLOCK),) fp32, in place
    m_map_ptr,  # shape (256,) fp32 signed codes
    v_map_ptr,  # shape (256,) fp32 unsigned codes
    m_mids_ptr,  # shape (256,) fp32 midpoints of the signed codes, then +inf
    v_mids_ptr,  # shape (256,) fp32 midpoints of the unsigned codes, then +inf
    # sizes
    n, lr, beta1, beta2, eps, weight_decay, step_size, bias_correction2_sqrt,
    # meta
    BLOCK: tl.constexpr,
):
    blk = tl.program_id(0)
    offs = blk * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    m_code = tl.load(m_code_ptr + offs, mask=mask, other=0).to(tl.int32)
    v_code = tl.load(v_code_ptr + offs, mask=mask, other=0).to(tl.int32)
    m = tl.load(m_map_ptr + m_code) * tl.load(m_absmax_ptr + blk)
    v = tl.load(v_map_ptr + v_code) * tl.load(v_absmax_ptr + blk)
    finite = tl.abs(g) < float("inf")  # false for +-inf and NaN
    g = tl.where(finite, g, 0.0)
    m_new = tl.where(finite, beta1 * m + (1 - beta1) * g, m)
    v_new = tl.where(finite, beta2 * v + (1 - beta2) * g * g, v)
    p_new = p * (1 - lr * weight_decay)
    p_new = p_new - step_size * m_new / (tl.sqrt(v_new) / bias_correction2_sqrt + eps)
    tl.store(p_ptr + offs, tl.where(finite, p_new, p).to(p_ptr.dtype.element_ty), mask=mask)
    m_new = tl.where(mask, m_new, 0.0)
    v_new = tl.where(mask, v_new, 0.0)
    m_absmax = tl.max(tl.abs(m_new), 0)
    v_absmax = tl.max(v_new, 0)
    tl.store(m_absmax_ptr + blk, m_absmax)
    tl.store(v_absmax_ptr + blk, v_absmax)
    m_code = _nearest_code(m_new / tl.where(m_absmax > 0, m_absmax, 1.0), m_mids_ptr)
    v_code = _nearest_code(v_new / tl.where(v_absmax > 0, v_absmax, 1.0), v_mids_ptr)
    tl.store(m_code_ptr + offs, m_code.to(tl.uint8), mask=mask)
    tl.store(v_code_ptr + offs, v_code.to(tl.uint8), mask=mask)


def adamw8bit_step(p, g, state, lr, beta1, beta2, eps, weight_decay, step):
    """Launch the fused kernel: one AdamW step on p with its 8-bit moments, in place."""
    assert p.is_contiguous(), "AdamW8bit updates parameters in place and needs them contiguous"
    assert g.shape == p.shape, f"grad {tuple(g.shape)} does not match parameter {tuple(p.shape)}"
    assert p.dtype in (torch.float32, torch.bfloat16, torch.float16), f"parameter dtype {p.dtype} unsupported"
    n = p.numel()
    assert state["m_code"].numel() == n and state["m_absmax"].numel() == triton.cdiv(n, BLOCK), "state/param mismatch"
    m_map, v_map, m_mids, v_mids = _maps(p.device)
    _adamw8bit_kernel[(triton.cdiv(n, BLOCK),)](
        p, g.contiguous(), state["m_code"], state["v_code"], state["m_absmax"], state["v_absmax"],
        m_map, v_map, m_mids, v_mids,
        n, lr, beta1, beta2, eps, weight_decay, lr / (1 - beta1**step), math.sqrt(1 - beta2**step),
        BLOCK=BLOCK, num_warps=4)


def adamw32_step(p, g, state, lr, beta1, beta2, eps, weight_decay, step):
    """Plain AdamW on fp32 moments, for tensors too small to quantise; same formula as the 8-bit step."""
    m, v = state["exp_avg"], state["exp_avg_sq"]
    g = g.float()
    m.mul_(beta1).add_(g, alpha=1 - beta1)
    v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    p32 = p.float() * (1 - lr * weight_decay)
    p32 -= (lr / (1 - beta1**step)) * m / (v.sqrt() / math.sqrt(1 - beta2**step) + eps)
    p.copy_(p32)


class AdamW8bit(torch.optim.Optimizer):
    """AdamW (decoupled weight decay) with block-wise 8-bit moments for tensors of >= min_8bit_size elements.

    State per 8-bit tensor: m_code, v_code (n,) uint8 and m_absmax, v_absmax (ceil(n / 256),) fp32;
    smaller tensors keep exp_avg, exp_avg_sq in fp32. Non-finite gradient elements are skipped.
    """

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, min_8bit_size: int = MIN_8BIT_SIZE):
        assert lr >= 0 and eps >= 0 and weight_decay >= 0, "lr, eps and weight_decay must be >= 0"
        assert 0 <= betas[0] < 1 and 0 <= betas[1] < 1, f"betas {betas} must lie in [0, 1)"
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, min_8bit_size=min_8bit_size)
        super().__init__(params, defaults)

    def _init_state(self, p, state, min_8bit_size):
        state["step"] = 0
        if p.numel() < min_8bit_size:
            state["exp_avg"] = torch.zeros(p.shape, device=p.device, dtype=torch.float32)
            state["exp_avg_sq"] = torch.zeros(p.shape, device=p.device, dtype=torch.float32)
            return
        blocks = triton.cdiv(p.numel(), BLOCK)
        zero_code = int(torch.searchsorted(dynamic_map(True), torch.tensor(0.0)))
        state["m_code"] = torch.full((p.numel(),), zero_code, device=p.device, dtype=torch.uint8)
        state["v_code"] = torch.zeros((p.numel(),), device=p.device, dtype=torch.uint8)
        state["m_absmax"] = torch.zeros((blocks,), device=p.device, dtype=torch.float32)
        state["v_absmax"] = torch.zeros((blocks,), device=p.device, dtype=torch.float32)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                assert not p.grad.is_sparse, "AdamW8bit does not support sparse gradients"
                state = self.state[p]
                if not state:
                    self._init_state(p, state, group["min_8bit_size"])
                state["step"] += 1
                args = (p, p.grad, state, group["lr"], beta1, beta2, group["eps"], group["weight_decay"], state["step"])
                if "exp_avg" in state:
                    adamw32_step(*args)
                elif use_triton(p, op="adamw8bit"):
                    # a launch that fails (compile, shared memory) does so before writing: the reference does this step
                    fallback.run("adamw8bit", str(p.dtype).removeprefix("torch."), p.device,
                                 lambda: adamw8bit_step(*args), lambda: adamw8bit_ref(*args))
                else:
                    adamw8bit_ref(*args)
        return loss

    def load_state_dict(self, state_dict):
        """Restore exactly: torch casts floating state to the parameter dtype, so fp32 state is put back."""
        super().load_state_dict(state_dict)
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for index, p in zip(saved_ids, params):
            for key in FP32_STATE_KEYS:
                if key in state_dict["state"].get(index, {}):
                    self.state[p][key] = state_dict["state"][index][key].to(p.device, torch.float32, copy=True)
