"""The tensor-descriptor (TMA) path of the streamed operands, interpreted, against the same numerics rule.

Streamed: K/V in the forward and the dQ pass, Q/dO in the dK/dV pass.

On a GPU the path is taken from sm_90 on for dense, 16-byte aligned fp16/bf16 inputs;
on CPU the interpreter takes it when `_config.INTERPRETER_STREAM_DESCRIPTORS` is set, so
both the descriptor and the pointer paths are tested here.
"""

from __future__ import annotations

import pytest
import torch
from numerics import check_attention, make_qkv

from flashattn_py import _config, ops

pytestmark = pytest.mark.skipif(not ops.uses_triton(torch.empty(1)) and not torch.cuda.is_available(),
                                reason="the Triton kernels do not run here")


@pytest.fixture
def descriptors(monkeypatch):
    """Turn the interpreter's descriptor path on; yields a checker that it (or the pointer path) ran."""
    monkeypatch.setattr(_config, "INTERPRETER_STREAM_DESCRIPTORS", True)
    passes = {"attn_fwd": "fwd", "attn_bwd_dkdv": "dkdv", "attn_bwd_dq": "dq"}
    before = {name: (ops.launch_counts[name], ops.launch_counts[f"{name}:descriptors"]) for name in passes}

    def check(used: bool, head_dim: int = 64, heavy_scores: bool = False) -> None:
        """`used`: the inputs allow descriptors; each pass then takes them where `_config` says it gains."""
        block_d = max(16, 1 << (head_dim - 1).bit_length())
        for name, (launches, with_descriptors) in before.items():
            assert ops.launch_counts[name] > launches, f"{name} did not run"
            expected = used and _config.stream_descriptors(passes[name], block_d, None, heavy_scores)
            assert (ops.launch_counts[f"{name}:descriptors"] > with_descriptors) == expected, name

    return check


@pytest.mark.parametrize("seqlen_q, seqlen_k, head_dim, causal, dtype, layout", [
    (17, 17, 64, "top_left", torch.float16, "bhsd"),
    (113, 40, 40, "bottom_right", torch.float16, "bshd"),
    (1, 77, 80, False, torch.bfloat16, "bhsd"),
    (50, 130, 128, "bottom_right", torch.bfloat16, "bshd"),
])
def test_descriptor_numerics(seqlen_q, seqlen_k, head_dim, causal, dtype, layout, device, descriptors):
    q, k, v, do = make_qkv(2, 2, seqlen_q, seqlen_k, head_dim, dtype, device, layout, seed=seqlen_k)
    check_attention(q, k, v, do, causal=causal)
    descriptors(used=True, head_dim=head_dim)


def test_descriptor_gqa_negative_scale(device, descriptors):
    q, _, _, do = make_qkv(1, 4, 45, 45, 64, torch.float16, device, seed=1)
    _, k, v, _ = make_qkv(1, 2, 45, 45, 64, torch.float16, device, seed=2)
    check_attention(q, k, v, do, causal=False, scale=-0.2)
    descriptors(used=True)


def test_unaligned_strides_take_pointers(device, descriptors):
    """Rows padded by 3 elements (6 bytes) cannot be a TMA stride: the pointer path runs, with the same results."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 33, 19, generator=gen).to(device=device, dtype=torch.float16)[..., :16]
               .requires_grad_() for _ in range(3))
    assert q.stride(2) == 19
    do = torch.randn(1, 2, 33, 16, generator=gen).to(device=device, dtype=torch.float16)
    check_attention(q, k, v, do, causal=True)
    descriptors(used=False)


def test_fp32_takes_pointers(device, descriptors):
    q, k, v, do = make_qkv(1, 1, 20, 20, 32, torch.float32, device)
    check_attention(q, k, v, do)
    descriptors(used=False)
