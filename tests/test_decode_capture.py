"""Decoding that a CUDA graph can capture: no host read, no host decision from values, overflow guarded on the device.

A GPU launch path is proven here without a GPU: on the virtual GPU (real CPU tensors
treated as living on an sm_90) every host read from flashattn_py's frames is trapped,
and under FakeTensorMode's CUDA tensors a read has no values to return at all.
"""

from __future__ import annotations

import sys

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from flashattn_py import InputError, attention_reference, attention_with_kvcache
from flashattn_py._launch import virtual_gpu

_READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__")
B, H, H_KV, D, PAGE, PAGES = 3, 4, 2, 16, 4, 3  # capacity PAGE * PAGES = 12 tokens per sequence


@pytest.fixture
def no_host_reads(monkeypatch):
    """Any Tensor -> host conversion called from flashattn_py's own frames fails the test."""
    for name in _READS:
        original = getattr(torch.Tensor, name)

        def trapped(self, *args, _name=name, _original=original, **kwargs):
            caller = sys._getframe(1).f_globals.get("__name__", "")
            if caller.startswith("flashattn_py"):
                raise AssertionError(f"host read: Tensor.{_name} called from {caller}")
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, trapped)


def _decode_inputs(lengths, S_new, paged, device="cpu", seed=0):
    """q (B, H, 1, D) and caches (dense (B, H_kv, 12, D), or paged with shuffled pages) holding random tokens."""
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape):  # FakeTensorMode's CUDA tensors are made on their device: CPU torch cannot copy to one
        return torch.randn(*shape, generator=gen) if device == "cpu" else torch.randn(*shape, device=device)

    q, k_new, v_new = rand(B, H, 1, D), rand(B, H_KV, S_new, D), rand(B, H_KV, S_new, D)
    if paged:
        k_cache, v_cache = rand(B * PAGES, H_KV, PAGE, D), rand(B * PAGES, H_KV, PAGE, D)
        table = torch.arange(B * PAGES, dtype=torch.int32, device=device).flip(0).view(B, PAGES)
    else:
        k_cache, v_cache, table = rand(B, H_KV, PAGE * PAGES, D), rand(B, H_KV, PAGE * PAGES, D), None
    seqlens = torch.tensor(lengths, dtype=torch.int32, device=device)  # a constant: FakeTensorMode makes it fake
    return q, k_cache, v_cache, seqlens, k_new, v_new, table


def _sequence(cache, table, b):
    """Sequence b's (H_kv, capacity, D) keys or values, dense or through its pages."""
    if table is None:
        return cache[b]
    return cache[table[b].long()].permute(1, 0, 2, 3).reshape(H_KV, PAGE * PAGES, D)


@pytest.mark.parametrize("paged", [False, True])
@pytest.mark.parametrize("append", [False, True])
@pytest.mark.parametrize("num_splits", [1, 4])
def test_decode_on_a_gpu_reads_nothing(paged, append, num_splits, no_host_reads):
    """The whole call on the virtual sm_90, real tensors: no read of cache_seqlens (or anything) on the host."""
    q, kc, vc, seqlens, k_new, v_new, table = _decode_inputs([3, 7, 10], 2, paged)
    new = dict(k_new=k_new, v_new=v_new) if append else {}
    with virtual_gpu("sm_90") as records:
        attention_with_kvcache(q, kc, vc, seqlens, block_table=table, num_splits=num_splits, **new)
        overflow = torch.zeros(B, dtype=torch.bool)
        attention_with_kvcache(q, kc, vc, seqlens, block_table=table, num_splits=num_splits, overflow=overflow,
                               **new)
    assert [r.name for r in records].count("attn_fwd") == 2, [r.name for r in records]


@pytest.mark.parametrize("paged", [False, True])
@pytest.mark.parametrize("num_splits", [0, 1, 4])
def test_decode_traces_under_fake_cuda_tensors(paged, num_splits):
    """FakeTensorMode's CUDA tensors have no values: the call, append and split-K included, runs to the launch."""
    with FakeTensorMode(allow_non_fake_inputs=False), virtual_gpu("sm_90") as records:
        q, kc, vc, seqlens, k_new, v_new, table = _decode_inputs([3, 7, 10], 2, paged, device="cuda")
        overflow = torch.zeros(B, dtype=torch.bool, device="cuda")
        out = attention_with_kvcache(q, kc, vc, seqlens, k_new=k_new, v_new=v_new, block_table=table,
                                     num_splits=num_splits, overflow=overflow)
        out2 = attention_with_kvcache(q, kc, vc, seqlens, block_table=table, num_splits=num_splits)
    assert out.shape == out2.shape == q.shape and out.device.type == "cuda"
    assert "attn_fwd" in [r.name for r in records]


@pytest.mark.parametrize("paged", [False, True])
@pytest.mark.parametrize("num_splits", [1, 3])
def test_overflow_is_flagged_and_guarded(paged, num_splits, no_host_reads):
    """A sequence that does not fit: its cache is untouched, its rows are 0, its flag is raised; the rest is exact."""
    lengths, S_new = [3, 11, -1], 2  # 11 + 2 > 12, and a negative length: sequences 1 and 2 do not fit
    q, kc, vc, seqlens, k_new, v_new, table = _decode_inputs(lengths, S_new, paged, seed=1)
    before_k, before_v = kc.clone(), vc.clone()
    overflow = torch.zeros(B, dtype=torch.bool)
    out = attention_with_kvcache(q, kc, vc, seqlens, k_new=k_new, v_new=v_new, block_table=table,
                                 num_splits=num_splits, overflow=overflow)
    assert overflow.tolist() == [False, True, True]
    assert not out.isnan().any() and torch.equal(out[1:], torch.zeros_like(out[1:]))
    for b in (1, 2):
        assert torch.equal(_sequence(kc, table, b), _sequence(before_k, table, b))
        assert torch.equal(_sequence(vc, table, b), _sequence(before_v, table, b))
    k0, v0 = _sequence(kc, table, 0), _sequence(vc, table, 0)
    assert torch.equal(k0[:, 3:5], k_new[0]) and torch.equal(v0[:, 3:5], v_new[0])
    ref = attention_reference(q[:1].double(), k0[None, :, :5].double(), v0[None, :, :5].double(),
                              causal="bottom_right")
    torch.testing.assert_close(out[:1].double(), ref, atol=2e-5, rtol=0)
    # sticky: a later call where everything fits leaves the flags raised
    attention_with_kvcache(q, kc, vc, torch.zeros(B, dtype=torch.int32), block_table=table, overflow=overflow)
    assert overflow.tolist() == [False, True, True]


def test_overflow_without_a_flag_asserts_on_the_device(no_host_reads):
    """On a GPU (here: virtual), no flag: the device-side assert fires (on CPU memory it fires at once)."""
    q, kc, vc, seqlens, k_new, v_new, _ = _decode_inputs([3, 11, 0], 2, False)
    with virtual_gpu("sm_90"), pytest.raises(RuntimeError, match="exceeds the cache's capacity"):
        attention_with_kvcache(q, kc, vc, seqlens, k_new=k_new, v_new=v_new)


def test_overflow_under_compile():
    """torch.compile cannot read values: the device guard runs, the flag is set, and without a flag it raises."""
    q, kc, vc, seqlens, k_new, v_new, _ = _decode_inputs([3, 11, 0], 2, False, seed=2)

    def step(q, kc, vc, seqlens, k_new, v_new, overflow):
        return attention_with_kvcache(q, kc, vc, seqlens, k_new=k_new, v_new=v_new, overflow=overflow)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    kc_eager, vc_eager, flag_eager = kc.clone(), vc.clone(), torch.zeros(B, dtype=torch.bool)
    expected = step(q, kc_eager, vc_eager, seqlens, k_new, v_new, flag_eager)
    flag = torch.zeros(B, dtype=torch.bool)
    got = compiled(q, kc, vc, seqlens, k_new, v_new, flag)
    assert torch.equal(got, expected) and torch.equal(kc, kc_eager) and torch.equal(vc, vc_eager)
    assert flag.tolist() == flag_eager.tolist() == [False, True, False]

    def unflagged(q, kc, vc, seqlens, k_new, v_new):
        return attention_with_kvcache(q, kc, vc, seqlens, k_new=k_new, v_new=v_new)

    with pytest.raises(RuntimeError, match="exceeds the cache's capacity"):
        torch.compile(unflagged, fullgraph=True, backend="aot_eager")(q, kc, vc, seqlens, k_new, v_new)


def test_overflow_refused_on_the_cpu_path_before_writing():
    """CPU path without a flag: a ValueError (InputError) before anything is written, as reading costs no sync."""
    q, kc, vc, seqlens, k_new, v_new, _ = _decode_inputs([3, 11, 0], 2, False)
    before = kc.clone()
    with pytest.raises(InputError, match="does not fit"):
        attention_with_kvcache(q, kc, vc, seqlens, k_new=k_new, v_new=v_new)
    assert torch.equal(kc, before)


def test_too_many_new_tokens_and_bad_flags_refused_from_shapes():
    with FakeTensorMode(allow_non_fake_inputs=False):
        q, kc, vc, seqlens, k_new, v_new, _ = _decode_inputs([0, 0, 0], 13, False, device="cuda")
        with pytest.raises(InputError, match="13 new tokens"):
            attention_with_kvcache(q, kc, vc, seqlens, k_new=k_new, v_new=v_new)
        for bad, word in ((torch.zeros(B, dtype=torch.int32, device="cuda"), "bool tensor"),
                          (torch.zeros(B + 1, dtype=torch.bool, device="cuda"), "shape"),
                          (torch.zeros(B, dtype=torch.bool), "q's device")):
            with pytest.raises(InputError, match=word):
                attention_with_kvcache(q, kc, vc, seqlens, k_new=k_new.narrow(2, 0, 1), v_new=v_new.narrow(2, 0, 1),
                                       overflow=bad)
