"""GPU-only checks: bf16 and fp16 at real sizes, 64-bit offsets, grids past 65,535 programs, padded varlen
tails, split-K decoding, the config cache across masked and unmasked calls, a second GPU and side streams.
Skipped without CUDA. `python -m benchmarks.gpu_check` runs them (two selections: test_large, the rest)."""

from __future__ import annotations

import pytest
import torch
from numerics import check_against_reference, check_attention, make_qkv

import flashattn_py
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


# --- grids past 65,535 programs on an axis ----------------------------------------------------------------------------

def _ours_on(sl, out, lse, grads):
    return (out[sl], lse[sl], *(g[sl] for g in grads))


def _randn(*shape, dtype, seed: int, requires_grad: bool = False) -> torch.Tensor:
    """Made on the GPU: these tensors are large enough that CPU generation would dominate the test."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    return torch.randn(*shape, device="cuda", dtype=dtype, generator=gen).requires_grad_(requires_grad)


def test_batch_heads_past_grid_axis_limit(triton_ran):
    """B*H = 70,000 > 65,535 (CUDA's limit on grid axes 1 and 2), short sequences: forward and backward of the
    first, middle and last batch entries (the last programs of the grid) against the reference."""
    B, H, S, D = 4375, 16, 64, 64
    q, k, v = (_randn(B, H, S, D, dtype=torch.float16, seed=20 + i, requires_grad=True) for i in range(3))
    do = _randn(B, H, S, D, dtype=torch.float16, seed=23)
    out, lse = attention(q, k, v, causal=True, return_lse=True)
    grads = torch.autograd.grad(out, (q, k, v), do)
    assert not out.isnan().any() and not any(g.isnan().any() for g in grads)
    for sl in (slice(0, 8), slice(B // 2, B // 2 + 4), slice(B - 8, B)):
        check_against_reference(_ours_on(sl, out, lse, grads), q[sl], k[sl], v[sl], do[sl], causal=True)
    triton_ran("attn_fwd", "attn_bwd_preprocess", "attn_bwd_dkdv", "attn_bwd_dq")


def _cu(lengths: list[int]) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device="cuda")


def _check_packed_sequences(q, k, v, do, out, lse, grads, cu_q, cu_k, picks, causal):
    """Sequence b of a packed call against the reference on that sequence alone, forward and gradients."""
    def dense(t, lo, hi):  # rows lo:hi of a packed (total, H, D) tensor as a (1, H, L, D) view
        return t[lo:hi].transpose(0, 1).unsqueeze(0)

    for b in picks:
        qs, qe, ks, ke = int(cu_q[b]), int(cu_q[b + 1]), int(cu_k[b]), int(cu_k[b + 1])
        ours = (dense(out, qs, qe), lse[:, qs:qe].unsqueeze(0), dense(grads[0], qs, qe), dense(grads[1], ks, ke),
                dense(grads[2], ks, ke))
        check_against_reference(ours, dense(q, qs, qe), dense(k, ks, ke), dense(v, ks, ke), dense(do, qs, qe),
                                causal="bottom_right" if causal else False)


def _packed(total: int, H: int, D: int, dtype, seed: int):
    q, k, v = (_randn(total, H, D, dtype=dtype, seed=seed + i, requires_grad=True) for i in range(3))
    return q, k, v, _randn(total, H, D, dtype=dtype, seed=seed + 3)


def test_varlen_sequences_times_heads_past_grid_axis_limit(triton_ran):
    """4,400 packed sequences x 16 heads = 70,400 (sequence, head) pairs, lengths 1..48."""
    gen = torch.Generator().manual_seed(6)
    lengths = torch.randint(1, 49, (4400,), generator=gen).tolist()
    q, k, v, do = _packed(sum(lengths), 16, 64, torch.float16, seed=7)
    cu = _cu(lengths)
    out, lse = flashattn_py.attention_varlen(q, k, v, cu, cu, max(lengths), max(lengths), causal=True,
                                             return_lse=True)
    grads = torch.autograd.grad(out, (q, k, v), do)
    assert not out.isnan().any() and not any(g.isnan().any() for g in grads)
    _check_packed_sequences(q, k, v, do, out, lse, grads, cu.cpu(), cu.cpu(), [0, 1, 2, 2200, 4397, 4398, 4399],
                            causal=True)
    triton_ran("attn_fwd", "attn_bwd_dkdv", "attn_bwd_dq")


# --- packed buffers padded past cu_seqlens[-1] -----------------------------------------------------------------------

@pytest.mark.parametrize("causal", [False, True])
def test_varlen_padded_tail_is_exactly_zero(causal, triton_ran):
    """q/k/v padded to a fixed token count past cu_seqlens[-1] (allocations poisoned with NaN by conftest): rows
    there get output 0 and gradients 0 exactly, nothing is NaN, and each sequence matches the reference."""
    lengths_q, lengths_k, total = [300, 1000, 17, 513], [300, 1100, 17, 700], 2560
    q, k, v, do = _packed(total, 8, 128, torch.bfloat16, seed=8)
    cu_q, cu_k = _cu(lengths_q), _cu(lengths_k)
    out, lse = flashattn_py.attention_varlen(q, k, v, cu_q, cu_k, max(lengths_q), max(lengths_k), causal=causal,
                                             return_lse=True)
    grads = torch.autograd.grad(out, (q, k, v), do)
    for name, t, end in (("out", out, sum(lengths_q)), ("dq", grads[0], sum(lengths_q)),
                         ("dk", grads[1], sum(lengths_k)), ("dv", grads[2], sum(lengths_k))):
        assert not t.isnan().any(), f"{name}: NaN"
        assert torch.equal(t[end:], torch.zeros_like(t[end:])), f"{name}: rows past cu_seqlens[-1] are not 0"
    assert torch.isneginf(lse[:, sum(lengths_q):]).all()
    _check_packed_sequences(q, k, v, do, out, lse, grads, cu_q.cpu(), cu_k.cpu(), range(len(lengths_q)), causal)
    triton_ran("attn_fwd", "attn_bwd_dkdv", "attn_bwd_dq")


# --- split-K decoding -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("valid", [4096, 3001])
@pytest.mark.parametrize("num_splits", [0, 3, 7])
def test_kvcache_split_k_decode(num_splits, valid, triton_ran):
    """B1 H32 (H_kv 8) D128 bf16 against a 4,096-token cache, num_splits automatic (0: split by the GPU's
    multiprocessors; more than one split here) or forced. Keys past the valid ones hold large values that
    would show if read. Reference: the valid keys, bottom-right aligned."""
    from numerics import FWD_FACTOR, assert_rule

    from flashattn_py import _config
    from flashattn_py.ops import multiprocessors

    dtype = torch.bfloat16
    q, _, _, _ = make_qkv(1, 32, 1, 1, 128, dtype, torch.device("cuda"), seed=9)
    _, k, v, _ = make_qkv(1, 8, 1, 4096, 128, dtype, torch.device("cuda"), seed=10)
    q, k, v = (t.detach() for t in (q, k, v))
    k[:, :, valid:], v[:, :, valid:] = 30.0, 30.0
    if num_splits == 0:
        assert _config.auto_splits(multiprocessors(q), 32, 4096) > 1, "this GPU would not split: nothing tested"
    lens = torch.tensor([valid], dtype=torch.int32, device="cuda")
    out = flashattn_py.attention_with_kvcache(q, k, v, lens, num_splits=num_splits)
    kv = k[:, :, :valid], v[:, :, :valid]
    ref64 = attention_reference(q.double(), *(t.double() for t in kv), causal="bottom_right")
    same = attention_reference(q, *kv, causal="bottom_right")
    assert_rule("out", out, same, ref64, FWD_FACTOR, dtype)
    triton_ran("attn_fwd")


# --- a masked call after an unmasked one (and the reverse): each gets a config that fits ---------------------------

@pytest.mark.parametrize("order", ["unmasked_first", "masked_first"])
def test_masked_and_unmasked_calls_in_one_process(order, monkeypatch, triton_ran):
    """D=128 fp16: an unmasked call's 128x128 tile does not fit with a bias tile; the config cache must give the
    masked call (a float (B, 1, 1, S) mask through scaled_dot_product_attention) its own config, whichever
    comes first. Both are checked against the reference and torch's SDPA, forward and backward."""
    from numerics import check_sdpa

    from flashattn_py import _launch

    monkeypatch.setattr(_launch, "_chosen_config", {})  # as in a fresh process
    monkeypatch.setattr(_launch, "_plans", {})
    q, k, v, do = make_qkv(2, 8, 1024, 1024, 128, torch.float16, torch.device("cuda"), seed=11)
    gen = torch.Generator().manual_seed(12)
    mask = torch.randn(2, 1, 1, 1024, generator=gen).to(device="cuda", dtype=torch.float16).requires_grad_()
    calls = [lambda: check_sdpa(q, k, v, do), lambda: check_sdpa(q, k, v, do, attn_mask=mask)]
    for call in calls if order == "unmasked_first" else calls[::-1]:
        call()
    triton_ran("attn_fwd", "attn_bwd_dkdv", "attn_bwd_dq", "attn_bwd_dbias")


# --- devices and streams ----------------------------------------------------------------------------------------------

@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_tensors_on_the_second_gpu(triton_ran):
    """Tensors on cuda:1 while cuda:0 is current: the kernels run on cuda:1, the current device is left alone."""
    torch.cuda.set_device(0)
    dev = torch.device("cuda", 1)
    q, k, v, do = make_qkv(2, 4, 1000, 1100, 128, torch.bfloat16, dev, "bshd", seed=13)
    out = check_attention(q, k, v, do, causal="bottom_right")[0]
    assert out.device == dev and torch.cuda.current_device() == 0
    qd, kd, vd = (t.detach() for t in make_qkv(1, 32, 1, 2048, 128, torch.bfloat16, dev, seed=14)[:3])
    out = flashattn_py.attention_with_kvcache(qd, kd, vd, torch.tensor([2000], dtype=torch.int32, device=dev))
    ref = attention_reference(qd.double(), kd[:, :, :2000].double(), vd[:, :, :2000].double(),
                              causal="bottom_right")
    torch.testing.assert_close(out.double(), ref, atol=2e-2, rtol=2e-2)
    assert torch.cuda.current_device() == 0
    triton_ran("attn_fwd", "attn_bwd_dq")


def test_non_default_stream_matches_default_stream(triton_ran):
    """Under `torch.cuda.stream(s)` the kernels run on s, ordered after the work queued there: inputs made on s
    behind a long sleep give the default stream's result, bit for bit (the backward is deterministic)."""
    q, k, v, do = make_qkv(2, 16, 2048, 2048, 128, torch.bfloat16, torch.device("cuda"), seed=15)
    out0 = attention(q, k, v, causal=True)
    grads0 = torch.autograd.grad(out0, (q, k, v), do)
    torch.cuda.synchronize()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        if hasattr(torch.cuda, "_sleep"):
            torch.cuda._sleep(100_000_000)  # ~50 ms of GPU time on s before the inputs exist
        q1, k1, v1 = (t.detach().clone().requires_grad_() for t in (q, k, v))
        do1 = do.clone()
        out1 = attention(q1, k1, v1, causal=True)
        grads1 = torch.autograd.grad(out1, (q1, k1, v1), do1)
    torch.cuda.synchronize()
    assert torch.equal(out1, out0)
    for g1, g0 in zip(grads1, grads0, strict=True):
        assert torch.equal(g1, g0)
    triton_ran("attn_fwd", "attn_bwd_dkdv", "attn_bwd_dq")


@pytest.mark.parametrize("paged", [False, True])
def test_decode_steps_captured_in_a_cuda_graph(paged):
    """16 decode steps (append + split-K attention) captured once, replayed: the eager steps' outputs and caches."""
    from flashattn_py import attention_with_kvcache

    B, H, H_kv, D, steps, page = 3, 8, 2, 64, 16, 16
    gen = torch.Generator(device="cuda").manual_seed(0)
    lengths = torch.tensor([5, 40, 17], dtype=torch.int32, device="cuda")
    qs = torch.randn(steps, B, H, 1, D, device="cuda", dtype=torch.float16, generator=gen)
    ks = torch.randn(steps, B, H_kv, 1, D, device="cuda", dtype=torch.float16, generator=gen)
    vs = torch.randn_like(ks)
    shape = (B * 8, H_kv, page, D) if paged else (B, H_kv, 8 * page, D)
    k0 = torch.randn(shape, device="cuda", dtype=torch.float16, generator=gen)
    v0 = torch.randn_like(k0)
    table = torch.arange(B * 8, dtype=torch.int32, device="cuda").flip(0).view(B, 8) if paged else None

    def run(k_cache, v_cache, seqlens, overflow, outs):
        for t in range(steps):
            outs[t].copy_(attention_with_kvcache(qs[t], k_cache, v_cache, seqlens, k_new=ks[t], v_new=vs[t],
                                                 block_table=table, num_splits=4, overflow=overflow))
            seqlens.add_(1)

    eager = [torch.empty_like(qs[0]) for _ in range(steps)]
    k_e, v_e, n_e, f_e = k0.clone(), v0.clone(), lengths.clone(), torch.zeros(B, dtype=torch.bool, device="cuda")
    run(k_e, v_e, n_e, f_e, eager)
    k_g, v_g, n_g, f_g = k0.clone(), v0.clone(), lengths.clone(), torch.zeros(B, dtype=torch.bool, device="cuda")
    graphed = [torch.empty_like(qs[0]) for _ in range(steps)]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up: compile and plan outside the capture
        run(k0.clone(), v0.clone(), lengths.clone(), torch.zeros(B, dtype=torch.bool, device="cuda"),
            [torch.empty_like(qs[0]) for _ in range(steps)])
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run(k_g, v_g, n_g, f_g, graphed)
    k_g.copy_(k0), v_g.copy_(v0), n_g.copy_(lengths), f_g.zero_()
    graph.replay()
    torch.cuda.synchronize()
    for t in range(steps):
        torch.testing.assert_close(graphed[t], eager[t], atol=0, rtol=0)
    assert torch.equal(k_g, k_e) and torch.equal(v_g, v_e) and torch.equal(n_g, n_e) and not f_g.any()


def test_dropout_masks_differ_between_cuda_graph_replays():
    """The dropout seed is drawn on the device: each replay of a captured step draws a fresh mask."""
    q, k, v, _ = make_qkv(1, 2, 128, 128, 64, torch.float16, torch.device("cuda"))
    out = torch.empty_like(q)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        attention(q, k, v, dropout_p=0.5)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out.copy_(attention(q, k, v, dropout_p=0.5))
    graph.replay()
    first = out.clone()
    graph.replay()
    assert not torch.equal(first, out)
