"""Numerics of the Triton kernels (interpreted on CPU) against fp64 and same-dtype PyTorch math."""

from __future__ import annotations

import itertools

import pytest
import torch
from numerics import check_attention, make_qkv

# (Sq, Sk): length 1, odd, not block multiples, block multiples, Sq != Sk both ways
SEQLENS = [(1, 1), (17, 17), (64, 64), (113, 113), (1, 77), (113, 17), (17, 130), (130, 61)]
CAUSAL = [False, "top_left", "bottom_right"]
DTYPES = [torch.float16, torch.float32]
HEAD_DIMS = [16, 40, 64, 80, 128, 256]
LAYOUTS = ["bhsd", "bshd", "padded"]


def _grid():
    """Every (lengths, causal, dtype) triple; head dim and layout rotate so each appears with each."""
    cases = []
    for i, ((sq, sk), causal, dtype) in enumerate(itertools.product(SEQLENS, CAUSAL, DTYPES)):
        head_dim = HEAD_DIMS[i % len(HEAD_DIMS)]
        layout = LAYOUTS[(i // len(HEAD_DIMS)) % len(LAYOUTS)]
        if head_dim == 256 and sq * sk > 2000:  # keep the interpreter fast: D=256 on short ones
            head_dim = 96
        cases.append(pytest.param(sq, sk, head_dim, causal, dtype, layout,
                                  id=f"{sq}x{sk}-d{head_dim}-{causal}-{str(dtype)[6:]}-{layout}"))
    return cases


@pytest.mark.parametrize("seqlen_q, seqlen_k, head_dim, causal, dtype, layout", _grid())
def test_grid(seqlen_q, seqlen_k, head_dim, causal, dtype, layout, device, triton_ran):
    q, k, v, do = make_qkv(2, 2, seqlen_q, seqlen_k, head_dim, dtype, device, layout)
    check_attention(q, k, v, do, causal=causal)
    triton_ran("attn_fwd", "attn_bwd_preprocess", "attn_bwd_dkdv", "attn_bwd_dq")


@pytest.mark.parametrize("head_dim", [8, 16, 40, 64, 80, 96, 128, 160, 256])
@pytest.mark.parametrize("dtype", DTYPES)
def test_head_dims(head_dim, dtype, device, triton_ran):
    q, k, v, do = make_qkv(1, 2, 45, 37, head_dim, dtype, device, "bshd", seed=head_dim)
    check_attention(q, k, v, do, causal="bottom_right")
    triton_ran("attn_fwd", "attn_bwd_dkdv", "attn_bwd_dq")


@pytest.mark.parametrize("causal", CAUSAL)
def test_bfloat16(causal, device, triton_ran):
    q, k, v, do = make_qkv(1, 2, 77, 50, 64, torch.bfloat16, device, "bshd", seed=3)
    check_attention(q, k, v, do, causal=causal)
    triton_ran("attn_fwd", "attn_bwd_dkdv", "attn_bwd_dq")


@pytest.mark.parametrize("scale", [4.0, 0.0, -0.3])
def test_scale(scale, device, triton_ran):
    """A large scale makes the softmax nearly one-hot; 0 makes it uniform; negative flips it."""
    q, k, v, do = make_qkv(1, 2, 50, 50, 64, torch.float16, device, seed=5)
    check_attention(q, k, v, do, causal=True, scale=scale)
    triton_ran("attn_fwd", "attn_bwd_dq")


def test_many_blocks(device, triton_ran):
    """Several blocks in every direction, both dtypes in one longer causal case."""
    for dtype in DTYPES:
        q, k, v, do = make_qkv(1, 1, 255, 255, 64, dtype, device, seed=7)
        check_attention(q, k, v, do, causal=True)
    triton_ran("attn_fwd", "attn_bwd_dkdv", "attn_bwd_dq")
