"""Semantics beyond plain numerics: empty rows, LSE gradients, determinism, dispatch, the torch backend."""

from __future__ import annotations

import pytest
import torch
from numerics import check_attention, make_qkv

import flashattn_py
from flashattn_py import attention, attention_reference, ops


def test_rows_that_see_no_key(device, triton_ran):
    """Bottom-right with Sq > Sk leaves the first Sq - Sk rows without keys: 0 out, -inf lse, 0 grads."""
    Sq, Sk = 40, 9
    q, k, v, do = make_qkv(1, 2, Sq, Sk, 32, torch.float32, device, seed=11)
    out, lse, dq, dk, dv = check_attention(q, k, v, do, causal="bottom_right")
    empty = Sq - Sk
    assert torch.equal(out[:, :, :empty], torch.zeros_like(out[:, :, :empty]))
    assert torch.isneginf(lse[:, :, :empty]).all() and torch.isfinite(lse[:, :, empty:]).all()
    assert torch.equal(dq[:, :, :empty], torch.zeros_like(dq[:, :, :empty]))
    assert all(torch.isfinite(t).all() for t in (out, dq, dk, dv))
    triton_ran("attn_fwd", "attn_bwd_dkdv", "attn_bwd_dq")


def test_keys_no_query_sees(device, triton_ran):
    """Top-left causal with Sk > Sq: keys past Sq - 1 are never attended, so their dK, dV are 0."""
    q, k, v, do = make_qkv(1, 1, 20, 70, 16, torch.float32, device, seed=12)
    _, _, _, dk, dv = check_attention(q, k, v, do, causal=True)
    assert torch.equal(dk[:, :, 20:], torch.zeros_like(dk[:, :, 20:]))
    assert torch.equal(dv[:, :, 20:], torch.zeros_like(dv[:, :, 20:]))
    assert dk[:, :, :20].abs().sum() > 0
    triton_ran("attn_bwd_dkdv")


@pytest.mark.parametrize("shape", [(0, 2, 5, 5), (2, 0, 5, 5), (1, 2, 0, 5), (1, 2, 5, 0)])
def test_empty(shape, device):
    """Empty batch/heads/queries give empty outputs; no keys gives zeros and -inf, like PyTorch's math."""
    B, H, Sq, Sk = shape
    q = torch.randn(B, H, Sq, 16, device=device, requires_grad=True)
    k = torch.randn(B, H, Sk, 16, device=device, requires_grad=True)
    v = torch.randn(B, H, Sk, 16, device=device, requires_grad=True)
    out, lse = attention(q, k, v, return_lse=True)
    ref_out, ref_lse = attention_reference(q, k, v, return_lse=True)
    assert out.shape == ref_out.shape and lse.shape == (B, H, Sq)
    assert torch.equal(out, ref_out) and torch.equal(lse, ref_lse)
    out.sum().backward()
    assert all(t.grad is not None and not t.grad.any() for t in (q, k, v))


def test_lse_gradient(device, triton_ran):
    """The returned LSE is differentiable: a loss on both out and lse matches the reference."""
    q, k, v, do = make_qkv(1, 2, 33, 47, 40, torch.float32, device, seed=13)
    dlse = torch.randn(1, 2, 33, device=device)
    out, lse = attention(q, k, v, causal=True, return_lse=True)
    grads = torch.autograd.grad((out, lse), (q, k, v), (do, dlse))
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref_out, ref_lse = attention_reference(q64, k64, v64, causal=True, return_lse=True)
    ref_grads = torch.autograd.grad((ref_out, ref_lse), (q64, k64, v64), (do.double(), dlse.double()))
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g.double(), r, atol=2e-5, rtol=1e-4)
    # only the lse used: dO is absent and the kernels still run
    lse_only = torch.autograd.grad(attention(q, k, v, return_lse=True)[1].sum(), (q, k, v))
    ref_lse_only = torch.autograd.grad(attention_reference(q64, k64, v64, return_lse=True)[1].sum(), (q64, k64, v64),
                                       materialize_grads=True)  # the LSE does not depend on v: dv = 0
    for g, r in zip(lse_only, ref_lse_only, strict=True):
        torch.testing.assert_close(g.double(), r, atol=2e-5, rtol=1e-4)
    triton_ran("attn_bwd_preprocess", "attn_bwd_dq")


def test_backward_is_deterministic(device, triton_ran):
    q, k, v, do = make_qkv(2, 2, 70, 90, 64, torch.float16, device, "bshd", seed=14)
    runs = []
    for _ in range(2):
        out = attention(q, k, v, causal="bottom_right")
        runs.append(torch.autograd.grad(out, (q, k, v), do))
    for a, b in zip(*runs, strict=True):
        assert torch.equal(a, b)
    triton_ran("attn_bwd_dkdv", "attn_bwd_dq")


def test_gradient_with_zero_strides(device, triton_ran):
    """out.sum().backward() hands the backward an expanded dO (stride 0 everywhere)."""
    q, k, v, _ = make_qkv(1, 1, 19, 19, 16, torch.float32, device, seed=15)
    attention(q, k, v, causal=True).sum().backward()
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    attention_reference(q64, k64, v64, causal=True).sum().backward()
    for t, r in ((q, q64), (k, k64), (v, v64)):
        torch.testing.assert_close(t.grad.double(), r.grad, atol=1e-5, rtol=1e-4)
    triton_ran("attn_bwd_dq")


def test_output_keeps_layout(device):
    """A (B, S, H, D).transpose(1, 2) input gives an output in the same layout, no copies."""
    q, k, v, _ = make_qkv(2, 3, 16, 16, 32, torch.float32, device, "bshd")
    out = attention(q, k, v)
    assert out.stride() == q.stride()


def test_causal_aliases(device):
    q, k, v, _ = make_qkv(1, 1, 20, 20, 16, torch.float32, device)
    a = attention(q, k, v, causal=True)
    for alias in ("top_left", "bottom_right"):  # identical when Sq == Sk
        torch.testing.assert_close(attention(q, k, v, causal=alias), a, atol=0, rtol=0)


def test_matches_torch_sdpa(device):
    """Top-left causal and the default scale are exactly torch's scaled_dot_product_attention."""
    q, k, v, _ = make_qkv(2, 2, 23, 41, 40, torch.float32, device, seed=16)
    for causal in (False, True):
        ours = attention(q, k, v, causal=causal)
        theirs = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)
        torch.testing.assert_close(ours, theirs, atol=2e-6, rtol=1e-5)


def test_float64_uses_torch_backend(device):
    q, k, v, _ = make_qkv(1, 1, 9, 9, 8, torch.float64, device)
    assert not ops.uses_triton(q)
    before = sum(ops.launch_counts.values())
    assert torch.autograd.gradcheck(lambda q, k, v: attention(q, k, v, causal=True), (q, k, v))
    assert sum(ops.launch_counts.values()) == before


@pytest.mark.parametrize("causal", [False, "top_left", "bottom_right"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("seqlens", [(1, 1), (37, 37), (50, 13), (13, 50)])
def test_torch_backend(seqlens, dtype, causal, monkeypatch):
    """The PyTorch path (CPU without the interpreter) meets the same rule, in small chunks too."""
    monkeypatch.setattr(ops, "uses_triton", lambda t: False)
    monkeypatch.setattr(flashattn_py._torch_backend, "_CHUNK_ELEMENTS", 64)  # several row chunks
    before = sum(ops.launch_counts.values())
    q, k, v, do = make_qkv(2, 2, *seqlens, 40, dtype, torch.device("cpu"), "bshd", seed=17)
    check_attention(q, k, v, do, causal=causal)
    assert sum(ops.launch_counts.values()) == before


def _max_growth_per_key_block(q, k, scale, block_n):
    """Per key block after the first: the largest growth of any row's running max, in log2 units."""
    scores = (q.double() @ k.double().transpose(-1, -2)) * scale * 1.4426950408889634
    running = scores[..., :block_n].amax(-1)
    growth = []
    for start in range(block_n, scores.shape[-1], block_n):
        tile = scores[..., start:start + block_n].amax(-1)
        growth.append((tile - running).amax().item())
        running = torch.maximum(running, tile)
    return growth


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("use_descriptors", [False, True])
def test_running_max_jumps(dtype, use_descriptors, device, triton_ran, monkeypatch):
    """The forward rescales its accumulator only when a row max grows by more than 2**8 (FlashAttention-4's
    trick); otherwise it keeps the stale max and P runs above 1. Keys in 128-long segments of growing size
    make both happen for any BLOCK_N up to 128: exact either way."""
    from flashattn_py import _config

    monkeypatch.setattr(_config, "INTERPRETER_STREAM_DESCRIPTORS", use_descriptors)
    q, k, v, do = make_qkv(1, 2, 32, 512, 64, dtype, device, seed=21)
    ramp = torch.tensor([1.0, 1.6, 12.0, 13.0]).repeat_interleave(128).to(device)
    k = (k.detach() * ramp[:, None].to(dtype)).requires_grad_()
    block_n = _config.INTERPRETER["fwd"].block_n if ops.uses_triton(q) and not q.is_cuda else 128
    growth = _max_growth_per_key_block(q.detach(), k.detach(), 64 ** -0.5, block_n)
    assert max(growth) > 8, "no block makes the forward rescale"
    assert any(0 < g <= 8 for g in growth), "no block runs on a stale max"
    check_attention(q, k, v, do, causal=False)
    triton_ran("attn_fwd")
