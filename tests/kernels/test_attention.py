import pytest
import torch

from gesso.kernels.attention import attention, attention_ref

CASES = [
    # (B, H, Tq, Tk, D)
    (1, 1, 16, 16, 64),  # minimal
    (1, 2, 77, 77, 64),  # sequence 77: one full and one ragged tile each way
    (2, 2, 100, 77, 64),  # SDXL cross-attention to one 77-token prompt chunk
    (1, 1, 65, 231, 64),  # three prompt chunks (231 keys), rows not a multiple of the block
    (1, 2, 50, 77, 40),  # SD 1.5 level 0 head dim, padded to 64
    (1, 1, 33, 20, 80),  # SD 1.5 level 1, padded to 128
    (1, 1, 17, 40, 160),  # SD 1.5 level 2, padded to 256
]


def _qkv(B, H, Tq, Tk, D, dtype, device):
    q = torch.randn(B, H, Tq, D, device=device, dtype=dtype, requires_grad=True)
    k = torch.randn(B, H, Tk, D, device=device, dtype=dtype, requires_grad=True)
    v = torch.randn(B, H, Tk, D, device=device, dtype=dtype, requires_grad=True)
    return q, k, v


def _check(assert_parity, q, k, v):
    o = attention(q, k, v)
    do = torch.randn_like(o)
    grads = torch.autograd.grad(o, (q, k, v), do)
    o64 = attention_ref(q.double(), k.double(), v.double(), upcast=False)
    grads64 = torch.autograd.grad(o64, (q, k, v), do.double())
    lowprec = [None] * 4
    if q.dtype in (torch.float16, torch.bfloat16):
        o_lp = attention_ref(q, k, v, upcast=False)
        lowprec = [o_lp, *torch.autograd.grad(o_lp, (q, k, v), do)]
    for name, out, ref, lp in zip(("o", "dq", "dk", "dv"), (o, *grads), (o64, *grads64), lowprec):
        assert_parity(name, out, ref, lp)


@pytest.mark.parametrize("B,H,Tq,Tk,D", CASES)
def test_fp32_forward_and_grads(B, H, Tq, Tk, D, device, assert_parity):
    _check(assert_parity, *_qkv(B, H, Tq, Tk, D, torch.float32, device))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("B,H,Tq,Tk,D", [CASES[1], CASES[4]])
def test_low_precision_forward_and_grads(B, H, Tq, Tk, D, dtype, device, assert_parity):
    _check(assert_parity, *_qkv(B, H, Tq, Tk, D, dtype, device))


def test_strided_heads_layout(device, assert_parity):
    # the UNet's (B, T, heads, D) projections viewed as (B, heads, T, D) without a copy
    q, k, v = (t.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_()
               for t in _qkv(2, 3, 77, 77, 64, torch.float32, device))
    assert not q.is_contiguous()
    _check(assert_parity, q, k, v)


def test_large_logits_stay_finite(device, assert_parity):
    # scores of a few hundred: a naive exp overflows fp32, the online softmax must not
    q, k, v = _qkv(1, 1, 40, 77, 64, torch.float32, device)
    q = (q.detach() * 30).requires_grad_()
    _check(assert_parity, q, k, v)


def test_vae_head_512_falls_back_to_sdpa(device, assert_parity):
    # one 512-wide head (VAE mid-block): documented fallback, still correct
    q, k, v = _qkv(1, 1, 64, 64, 512, torch.float32, device)
    _check(assert_parity, q, k, v)


def test_saved_memory_is_linear_in_sequence(device):
    # what autograd keeps for backward must grow like T, never like T^2
    def saved_bytes(T):
        total = 0

        def pack(t):
            nonlocal total
            total += t.numel() * t.element_size()
            return t

        q, k, v = _qkv(1, 1, T, T, 64, torch.float32, device)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            attention(q, k, v)
        return total

    small, large = saved_bytes(64), saved_bytes(256)
    assert large == 4 * small, (small, large)


def test_reference_mode_is_sdpa_not_the_math_reference(device):
    # the fallback holds no (Tq, Tk) matrix on a GPU: it must be torch's SDPA, whose CPU kernel agrees
    from gesso.kernels.dispatch import forced

    q, k, v = _qkv(1, 2, 40, 77, 64, torch.float32, device)
    with forced("reference"):
        out = attention(q, k, v)
    torch.testing.assert_close(out, torch.nn.functional.scaled_dot_product_attention(q, k, v), rtol=0, atol=0)
    torch.testing.assert_close(out, attention_ref(q, k, v), rtol=1e-5, atol=1e-5)


def test_follows_autocast_like_sdpa(device):
    q, k, v = _qkv(1, 2, 40, 77, 64, torch.float32, device)
    with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
        out = attention(q, k, v)
    assert out.dtype == torch.bfloat16
    bf = [t.detach().to(torch.bfloat16) for t in (q, k, v)]
    torch.testing.assert_close(out, attention(*bf), rtol=0, atol=0)
