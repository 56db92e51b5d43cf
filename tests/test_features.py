"""Sliding window, ALiBi, softcap, GQA in `attention`; packed varlen; KV-cache decoding."""

from __future__ import annotations

import pytest
import torch
from numerics import assert_rule, check_against_reference, check_attention, make_qkv

import flashattn_py
from flashattn_py import attention_reference, attention_varlen, attention_with_kvcache, ops

DTYPES = [torch.float16, torch.float32]


def _slopes(shape, device, seed=0):
    return (torch.rand(shape, generator=torch.Generator().manual_seed(seed)) * 0.5 + 0.05).to(device)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [False, True, "bottom_right"])
@pytest.mark.parametrize("window", [(5, 9), (20, -1), (-1, 3), (0, 0), (40, 0)], ids=str)
def test_window(window, causal, dtype, device, triton_ran):
    q, k, v, do = make_qkv(1, 2, 77, 61, 32, dtype, device, "bshd", seed=sum(window) + 3)
    check_attention(q, k, v, do, causal=causal, window=window)
    triton_ran("attn_fwd", "attn_bwd_dkdv", "attn_bwd_dq")


def test_window_empties_rows(device, triton_ran):
    """Bottom-right causal with a window narrower than Sq - Sk leaves early rows empty: 0, -inf, no NaN."""
    q, k, v, do = make_qkv(1, 1, 50, 10, 16, torch.float32, device, seed=4)
    out, lse, *_ = check_attention(q, k, v, do, causal="bottom_right", window=(3, 0))
    assert torch.isneginf(lse[:, :, :37]).all() and torch.equal(out[:, :, :37], torch.zeros_like(out[:, :, :37]))
    triton_ran("attn_fwd")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", ["h", "bh"])
@pytest.mark.parametrize("causal", [False, "bottom_right"])
def test_alibi(causal, shape, dtype, device, triton_ran):
    q, k, v, do = make_qkv(2, 3, 45, 70, 40, dtype, device, seed=5)
    slopes = _slopes((3,) if shape == "h" else (2, 3), device)
    check_attention(q, k, v, do, causal=causal, alibi_slopes=slopes)
    triton_ran("attn_fwd", "attn_bwd_dkdv", "attn_bwd_dq")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("softcap", [0.5, 5.0, 50.0])
def test_softcap(softcap, dtype, device, triton_ran):
    q, k, v, do = make_qkv(1, 2, 50, 50, 64, dtype, device, seed=6)
    check_attention(q, k, v, do, causal=True, softcap=softcap, scale=0.5)  # large scores: the cap bites
    triton_ran("attn_fwd", "attn_bwd_dkdv", "attn_bwd_dq")


@pytest.mark.parametrize("dtype", DTYPES)
def test_gqa_with_everything(dtype, device, triton_ran):
    q, _, _, do = make_qkv(2, 6, 40, 40, 32, dtype, device, seed=7)
    _, k, v, _ = make_qkv(2, 2, 40, 55, 32, dtype, device, seed=8)
    check_attention(q, k, v, do, causal="bottom_right", window=(12, 0), alibi_slopes=_slopes((6,), device),
                    softcap=10.0)
    triton_ran("attn_fwd", "attn_bwd_dkdv", "attn_bwd_dq")


def test_window_skips_blocks(device, monkeypatch):
    """Blocks outside the window are skipped, not masked: a narrow window does O(window) tile products."""
    if device.type != "cpu" or not ops.uses_triton(torch.empty(1)):
        pytest.skip("counts the interpreter's tl.dot calls")
    from triton.runtime import interpreter

    calls = []
    create_dot = interpreter.InterpreterBuilder.create_dot

    def counting(self, *args):
        calls.append(1)
        return create_dot(self, *args)

    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_dot", counting)
    q, k, v, _ = make_qkv(1, 1, 256, 256, 16, torch.float32, device)
    flashattn_py.attention(q, k, v, causal=True, window=(16, 0))
    windowed = len(calls)
    calls.clear()
    flashattn_py.attention(q, k, v, causal=True)
    causal = len(calls)
    calls.clear()
    flashattn_py.attention(q, k, v)
    assert causal < 0.6 * len(calls), (causal, len(calls))  # causal costs about half
    assert windowed < causal / 3, (windowed, causal)


# --- varlen ------------------------------------------------------------------------------------------------------

def _packed(lengths_q, lengths_k, H, H_kv, D, dtype, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    tq, tk = sum(lengths_q), sum(lengths_k)
    q = torch.randn(tq, H, D, generator=gen).to(device=device, dtype=dtype).requires_grad_()
    k = torch.randn(tk, H_kv, D, generator=gen).to(device=device, dtype=dtype).requires_grad_()
    v = torch.randn(tk, H_kv, D, generator=gen).to(device=device, dtype=dtype).requires_grad_()
    do = torch.randn(tq, H, D, generator=gen).to(device=device, dtype=dtype)
    cu_q = torch.tensor([0, *torch.tensor(lengths_q).cumsum(0).tolist()], dtype=torch.int32, device=device)
    cu_k = torch.tensor([0, *torch.tensor(lengths_k).cumsum(0).tolist()], dtype=torch.int32, device=device)
    return q, k, v, do, cu_q, cu_k


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal, window", [(False, (-1, -1)), (True, (-1, -1)), (True, (7, 0)), (False, (4, 4))])
def test_varlen(causal, window, dtype, device, triton_ran):
    """Each packed sequence matches the reference run on it alone, bottom-right aligned."""
    lengths_q, lengths_k = [1, 37, 0, 20, 64], [5, 37, 3, 50, 17]
    q, k, v, do, cu_q, cu_k = _packed(lengths_q, lengths_k, 4, 2, 40, dtype, device, seed=9)
    slopes = _slopes((5, 4), device)
    out, lse = attention_varlen(q, k, v, cu_q, cu_k, max(lengths_q), max(lengths_k), causal=causal, window=window,
                                alibi_slopes=slopes, return_lse=True)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), do)
    for b in range(5):
        sq, sk = slice(int(cu_q[b]), int(cu_q[b + 1])), slice(int(cu_k[b]), int(cu_k[b + 1]))
        if sq.stop == sq.start:
            continue

        def per_seq(t, s):  # (len, H, D) -> (1, H, len, D)
            return t[s].transpose(0, 1)[None]

        ours = (per_seq(out, sq), lse[None, :, sq], per_seq(dq, sq), per_seq(dk, sk), per_seq(dv, sk))
        check_against_reference(ours, per_seq(q.detach(), sq), per_seq(k.detach(), sk), per_seq(v.detach(), sk),
                                per_seq(do, sq), causal=causal, window=window, alibi_slopes=slopes[b],
                                offset=(sk.stop - sk.start) - (sq.stop - sq.start))
    triton_ran("attn_fwd", "attn_bwd_dkdv", "attn_bwd_dq")


def test_varlen_errors(device):
    q = torch.randn(10, 2, 16, device=device)
    good = torch.tensor([0, 4, 10], dtype=torch.int32, device=device)
    with pytest.raises(ValueError, match="never decrease"):
        attention_varlen(q, q, q, torch.tensor([0, 6, 4], dtype=torch.int32, device=device), good, 6, 6)
    with pytest.raises(ValueError, match="int32"):
        attention_varlen(q, q, q, good.long(), good, 6, 6)
    with pytest.raises(ValueError, match="max_seqlen"):
        attention_varlen(q, q, q, good, good, 3, 6)
    with pytest.raises(ValueError, match="same number of sequences"):
        attention_varlen(q, q, q, good, torch.tensor([0, 10], dtype=torch.int32, device=device), 6, 10)


@pytest.mark.parametrize("bad, error, message", [
    ({"window": (-2, 0)}, ValueError, "window left"),
    ({"window": (3,)}, TypeError, "window must be"),
    ({"softcap": -1.0}, ValueError, "softcap"),
    ({"alibi_slopes": torch.ones(5)}, ValueError, "alibi_slopes must have shape"),
])
def test_feature_errors(bad, error, message, device):
    q = torch.randn(1, 2, 8, 16, device=device)
    with pytest.raises(error, match=message):
        flashattn_py.attention(q, q, q, **bad)


# --- KV cache ------------------------------------------------------------------------------------------------------

def _decode_reference(q, k_full, v_full, lengths, **kwargs):
    outs = []
    for b, length in enumerate(lengths):
        slopes = kwargs.get("alibi_slopes")
        kw = dict(kwargs, alibi_slopes=None if slopes is None else slopes.double())
        outs.append(attention_reference(q[b : b + 1].double(), k_full[b : b + 1, :, :length].double(),
                                        v_full[b : b + 1, :, :length].double(), causal="bottom_right", **kw))
    return torch.cat(outs)


@pytest.mark.parametrize("paged", [False, True])
@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("dtype", DTYPES)
def test_kvcache(paged, num_splits, dtype, device, triton_ran):
    B, H, H_kv, D, S_new, page = 3, 4, 2, 32, 3, 16
    lengths = [5, 14, 40]  # the second sequence's new tokens straddle a page boundary (14..16)
    gen = torch.Generator().manual_seed(10)
    full_k = torch.randn(B, H_kv, 64, D, generator=gen).to(device=device, dtype=dtype)
    full_v = torch.randn(B, H_kv, 64, D, generator=gen).to(device=device, dtype=dtype)
    q = torch.randn(B, H, S_new, D, generator=gen).to(device=device, dtype=dtype)
    k_new = torch.randn(B, H_kv, S_new, D, generator=gen).to(device=device, dtype=dtype)
    v_new = torch.randn(B, H_kv, S_new, D, generator=gen).to(device=device, dtype=dtype)
    seqlens = torch.tensor(lengths, dtype=torch.int32, device=device)
    expected_k, expected_v = full_k.clone(), full_v.clone()
    for b, n in enumerate(lengths):
        expected_k[b, :, n : n + S_new], expected_v[b, :, n : n + S_new] = k_new[b], v_new[b]
    if paged:  # pages shuffled across sequences
        perm = torch.randperm(B * 4, generator=gen)
        table = perm.view(B, 4).to(device=device, dtype=torch.int32)
        k_cache = torch.zeros(B * 4, H_kv, page, D, device=device, dtype=dtype)
        v_cache = torch.zeros_like(k_cache)
        for b in range(B):
            for p in range(4):
                k_cache[table[b, p]] = full_k[b, :, p * page : (p + 1) * page]
                v_cache[table[b, p]] = full_v[b, :, p * page : (p + 1) * page]
    else:
        table, k_cache, v_cache = None, full_k.clone(), full_v.clone()
    out = attention_with_kvcache(q, k_cache, v_cache, seqlens, k_new=k_new, v_new=v_new, block_table=table,
                                 num_splits=num_splits, alibi_slopes=_slopes((H,), device), window=(20, -1))
    # the cache now holds the new tokens
    if paged:
        got_k = torch.stack([k_cache[table[b].long()].permute(1, 0, 2, 3).reshape(H_kv, -1, D) for b in range(B)])
    else:
        got_k = k_cache
    assert torch.equal(got_k, expected_k)
    lengths_after = [n + S_new for n in lengths]
    kw = dict(alibi_slopes=_slopes((H,), device), window=(20, -1))
    ref64 = _decode_reference(q, expected_k, expected_v, lengths_after, **kw)
    same = torch.cat([attention_reference(q[b : b + 1], expected_k[b : b + 1, :, :n], expected_v[b : b + 1, :, :n],
                                          causal="bottom_right", **kw) for b, n in enumerate(lengths_after)])
    assert_rule("out", out, same, ref64, 2.0, dtype)
    triton_ran("attn_fwd")


def test_kvcache_errors(device):
    q = torch.randn(2, 2, 1, 16, device=device)
    cache = torch.zeros(2, 2, 8, 16, device=device)
    new = torch.randn(2, 2, 2, 16, device=device)
    with pytest.raises(ValueError, match="does not fit"):
        attention_with_kvcache(q, cache, cache.clone(), torch.tensor([3, 7], dtype=torch.int32, device=device),
                               k_new=new, v_new=new)
    with pytest.raises(ValueError, match="cache_seqlens"):
        attention_with_kvcache(q, cache, cache.clone(), torch.tensor([3, 7], device=device))
    with pytest.raises(ValueError, match="block_table"):
        attention_with_kvcache(q, cache, cache.clone(), torch.tensor([3, 7], dtype=torch.int32, device=device),
                               block_table=torch.zeros(2, 2, device=device))
    with pytest.raises(ValueError, match="together"):
        attention_with_kvcache(q, cache, cache.clone(), torch.tensor([3, 7], dtype=torch.int32, device=device),
                               k_new=new)


@pytest.mark.parametrize("mode", ["window", "varlen", "kvcache"])
def test_torch_backend_features(mode, monkeypatch):
    """The PyTorch path gives the kernels' answers for the same features."""
    device = torch.device("cpu")
    if mode == "window":
        q, k, v, do = make_qkv(1, 2, 30, 30, 16, torch.float32, device, seed=11)
        kwargs = dict(causal=True, window=(6, 0), softcap=5.0, alibi_slopes=_slopes((2,), device))
        ours = flashattn_py.attention(q, k, v, **kwargs)
        monkeypatch.setattr(ops, "uses_triton", lambda t: False)
        check_attention(q, k, v, do, **kwargs)
        torch.testing.assert_close(flashattn_py.attention(q, k, v, **kwargs), ours, atol=1e-5, rtol=1e-5)
    elif mode == "varlen":
        q, k, v, do, cu_q, cu_k = _packed([3, 9, 5], [4, 9, 12], 2, 1, 16, torch.float32, device, seed=12)
        ours = attention_varlen(q, k, v, cu_q, cu_k, 9, 12, causal=True)
        g_ours = torch.autograd.grad(ours, (q, k, v), do)
        monkeypatch.setattr(ops, "uses_triton", lambda t: False)
        theirs = attention_varlen(q, k, v, cu_q, cu_k, 9, 12, causal=True)
        g_theirs = torch.autograd.grad(theirs, (q, k, v), do)
        torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)
        for a, b in zip(g_theirs, g_ours, strict=True):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    else:
        q = torch.randn(2, 2, 2, 16)
        cache_k, cache_v = torch.randn(2, 1, 32, 16), torch.randn(2, 1, 32, 16)
        lens = torch.tensor([7, 20], dtype=torch.int32)
        ours = attention_with_kvcache(q, cache_k.clone(), cache_v.clone(), lens, num_splits=2)
        monkeypatch.setattr(ops, "uses_triton", lambda t: False)
        theirs = attention_with_kvcache(q, cache_k.clone(), cache_v.clone(), lens)
        torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)


def test_varlen_offsets_checked_once_per_tensor(device):
    """Validation reads cu_seqlens once per tensor version; an in-place edit is checked again."""
    q = torch.randn(10, 2, 16, device=device)
    cu = torch.tensor([0, 4, 10], dtype=torch.int32, device=device)
    attention_varlen(q, q, q, cu, cu, 6, 6)
    cu[1] = 7  # still valid: 0, 7, 10
    attention_varlen(q, q, q, cu, cu, 7, 7)
    cu[1] = 11  # now decreasing: must be caught despite the earlier check of the same tensor
    with pytest.raises(ValueError, match="never decrease"):
        attention_varlen(q, q, q, cu, cu, 11, 11)
