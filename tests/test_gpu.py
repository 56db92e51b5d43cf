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


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mask_shape", [(1000, 1100), (2, 1, 1, 1100), (2, 4, 1000, 1100)], ids=str)
def test_sdpa_masks_low_precision(mask_shape, dtype, triton_ran):
    from numerics import check_sdpa

    q, k, v, do = make_qkv(2, 4, 1000, 1100, 128, dtype, torch.device("cuda"), "bshd")
    gen = torch.Generator().manual_seed(0)
    mask = torch.randn(mask_shape, generator=gen).to(device="cuda", dtype=dtype).requires_grad_()
    check_sdpa(q, k, v, do, attn_mask=mask)
    bool_mask = (torch.rand(mask_shape, generator=gen) > 0.2).cuda()
    check_sdpa(q, k, v, do, attn_mask=bool_mask)
    triton_ran("attn_fwd", "attn_bwd_dbias")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_sdpa_gqa_low_precision(dtype, triton_ran):
    from numerics import check_sdpa

    q, _, _, do = make_qkv(2, 8, 2048, 2048, 128, dtype, torch.device("cuda"), seed=1)
    _, k, v, _ = make_qkv(2, 2, 2048, 2048, 128, dtype, torch.device("cuda"), seed=2)
    check_sdpa(q, k, v, do, is_causal=True, enable_gqa=True)
    triton_ran("attn_bwd_dkdv")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_multihead_attention_low_precision(dtype):
    from torch import nn

    import flashattn_py

    torch.manual_seed(0)
    ref = nn.MultiheadAttention(512, 8, batch_first=True, device="cuda", dtype=dtype)
    ours = flashattn_py.MultiheadAttention(512, 8, batch_first=True, device="cuda", dtype=dtype)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(4, 2048, 512, device="cuda", dtype=dtype)
    kpm = torch.zeros(4, 2048, dtype=torch.bool, device="cuda")
    kpm[1, 1500:] = True
    out_r, _ = ref(x, x, x, key_padding_mask=kpm, need_weights=False)
    out_o, _ = ours(x, x, x, key_padding_mask=kpm, need_weights=False)
    ref32 = nn.MultiheadAttention(512, 8, batch_first=True, device="cuda")
    ref32.load_state_dict({k: v.float() for k, v in ref.state_dict().items()})
    out_32, _ = ref32(x.float(), x.float(), x.float(), key_padding_mask=kpm, need_weights=False)
    assert (out_o.float() - out_32).abs().max() <= 2 * (out_r.float() - out_32).abs().max() + 1e-3
