"""GPU-only checks: bf16 and fp16 at real sizes, and 64-bit offsets. Skipped without CUDA."""

from __future__ import annotations

import pytest
import torch
from numerics import check_attention, make_qkv

from flashattn_py import attention, attention_reference

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("causal", [False, "top_left", "bottom_right"])
@pytest.mark.parametrize("seqlen_q, seqlen_k, head_dim", [
    (1024, 1024, 64), (2047, 2047, 128), (8192, 8192, 128), (4096, 4096, 256), (8192, 8192, 256),
    (1000, 3001, 80), (3001, 1000, 96), (1, 8192, 128), (513, 129, 160),
])
def test_large(seqlen_q, seqlen_k, head_dim, causal, dtype, triton_ran):
    heads = 2 if seqlen_q * seqlen_k <= 2**24 else 1  # the fp64 reference holds a few Sq x Sk matrices
    q, k, v, do = make_qkv(1, heads, seqlen_q, seqlen_k, head_dim, dtype, torch.device("cuda"), "bshd")
    check_attention(q, k, v, do, causal=causal)
    triton_ran("attn_fwd", "attn_bwd_preprocess", "attn_bwd_dkdv", "attn_bwd_dq")


def test_float32_ieee_and_tf32(triton_ran):
    q, k, v, do = make_qkv(2, 2, 777, 555, 64, torch.float32, torch.device("cuda"))
    check_attention(q, k, v, do, causal="bottom_right")  # IEEE by default: fp32-tight
    old = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = True
        out = attention(q, k, v)
        ref = attention_reference(q.double(), k.double(), v.double())
        torch.testing.assert_close(out.double(), ref, atol=5e-3, rtol=5e-3)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old
    triton_ran("attn_fwd")


def test_offsets_past_int32(triton_ran):
    """B*H*S*D > 2**31: the last heads are addressed past 2**31 elements."""
    B, S, D = 2**31 // (128 * 128) + 3, 128, 128
    try:
        q = torch.randn(B, 1, S, D, device="cuda", dtype=torch.float16, requires_grad=True)
        k = torch.randn_like(q, requires_grad=True)
        v = torch.randn_like(q, requires_grad=True)
        out = attention(q, k, v, causal=True)
        out[-2:].float().sum().backward()
    except torch.cuda.OutOfMemoryError:
        pytest.skip("not enough GPU memory for a > 2**31-element problem")
    tail = slice(B - 2, B)
    qt, kt, vt = (t.detach()[tail].double().requires_grad_() for t in (q, k, v))
    ref = attention_reference(qt, kt, vt, causal=True)
    ref.sum().backward()
    torch.testing.assert_close(out[tail].double(), ref, atol=2e-3, rtol=2e-3)
    for t, r in ((q, qt), (k, kt), (v, vt)):
        torch.testing.assert_close(t.grad[tail].double(), r.grad, atol=2e-2, rtol=2e-2)
    triton_ran("attn_fwd", "attn_bwd_dq")
