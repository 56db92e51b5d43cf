"""The CPU PyTorch backend: its fused path (torch's own CPU kernel) and its blocked path.

conftest.py sets TRITON_INTERPRET=1 for the whole suite, so these tests reach the
PyTorch backend either through the public API with `ops.uses_triton` patched to
False (CPU tensors then take `_torch_backend`, as they do without the interpreter)
or by calling `_torch_backend` directly. `_torch_backend.path_counts` proves which
path ran. Small block sizes make the blocked path walk several tiles, band edges included.
"""

from __future__ import annotations

import pytest
import torch
from numerics import check_attention, check_sdpa, make_qkv

import flashattn_py
from flashattn_py import _cpu_fused, _torch_backend, ops
from flashattn_py._contract import DENSE, AttnSpec, BiasKind
from flashattn_py.reference import attention_reference

CPU = torch.device("cpu")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture(autouse=True)
def torch_backend(monkeypatch):
    """CPU tensors take the PyTorch backend (not the interpreter), with small tiles for the blocked path."""
    monkeypatch.setattr(ops, "uses_triton", lambda t: False)
    monkeypatch.setattr(_torch_backend, "_BLOCK_M", 16)
    monkeypatch.setattr(_torch_backend, "_BLOCK_N", 32)


class Paths:
    """Counts of `_torch_backend.path_counts` since construction."""

    def __init__(self) -> None:
        self.before = _torch_backend.path_counts.copy()

    def __getitem__(self, key: str) -> int:
        return _torch_backend.path_counts[key] - self.before[key]


def test_fused_kernel_present():
    """torch 2.13 has the fused CPU op with masks; older torches fall back to the blocked path (tested below)."""
    assert _cpu_fused.available() and _cpu_fused._TAKES_MASK


@pytest.mark.parametrize("layout", ["bhsd", "bshd", "padded"])  # contiguous (B, H, S, D): the backward folds (B, H)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("causal, seqlens", [(False, (37, 50)), (True, (37, 37)), ("top_left", (50, 37))])
def test_fused_path_numerics(dtype, causal, seqlens, layout):
    paths = Paths()
    q, k, v, do = make_qkv(2, 3, *seqlens, 40, dtype, CPU, layout, seed=1)
    out, _, dq, dk, dv = check_attention(q, k, v, do, causal=causal)
    assert paths["fused_fwd"] == 1 and paths["fused_bwd"] == 1 and paths["blocked"] == 0
    if layout != "padded":  # O and the gradients with q's, k's, v's strides (padded ones are not dense)
        assert out.stride() == q.stride() and dq.stride() == q.stride()
        assert dk.stride() == k.stride() and dv.stride() == v.stride()


_ATEN = torch.ops.aten


@pytest.mark.parametrize("layout", ["bhsd", "bshd"])  # bhsd: the backward folds (B, H) into the op's batch dim
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("causal, mask", [(False, None), (True, None), (True, "float"), (False, "bool")])
def test_fused_path_is_the_op_bit_for_bit(dtype, layout, causal, mask):
    """The fused path is torch's op plus our fix-ups only: on inputs that need none, O, LSE and the gradients are
    exactly the op's (called plainly, unfolded, through `torch.ops`), with q's/k's/v's strides and no views."""
    q, k, v, do = (t.detach() for t in make_qkv(2, 3, 21, 21, 16, dtype, CPU, layout, seed=16))
    bias = None
    if mask is not None:
        bias = _mask((1, 1, 21, 21), mask)
        if mask == "bool":
            bias[..., 0] = True  # no row hidden entirely (those are fixed up)
        else:
            bias = bias.to(dtype)
    spec = AttnSpec(scale=0.3, window_right=0 if causal else -1,
                    bias_kind=BiasKind.NONE if mask is None else BiasKind[mask.upper()])
    paths = Paths()
    o, lse = _torch_backend.attn_fwd(q, k, v, bias, None, spec, DENSE)
    dlse = torch.zeros_like(lse)
    dlse[0, 0, 0] = -0.0  # a zero dLSE, signed or not, keeps the fused backward
    grads = _torch_backend.attn_bwd(do, q, k, v, o, lse, dlse, bias, None, False, spec, DENSE)
    assert paths["fused_fwd"] == 1 and paths["fused_bwd"] == 1 and paths["blocked"] == 0
    op_mask = None if bias is None else _cpu_fused._float_mask(bias, dtype)
    ref_o, ref_lse = _ATEN._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, attn_mask=op_mask,
                                                                       scale=0.3)
    lse_in = ref_lse.float().to(ref_lse.dtype)  # our LSE is float32 (float64 calls' too): the backward reads that
    ref = _ATEN._scaled_dot_product_flash_attention_for_cpu_backward(do, q, k, v, ref_o, lse_in, 0.0, causal,
                                                                     attn_mask=op_mask, scale=0.3)
    assert torch.equal(o, ref_o) and torch.equal(lse, ref_lse.float()) and lse.is_contiguous()
    assert o.stride() == q.stride() and o._base is None
    for g, r, t in zip(grads[:3], ref, (q, k, v), strict=True):
        assert torch.equal(g, r) and g.stride() == t.stride() and g._base is None  # ops returns non-views as they are
    assert grads[3] is None


def test_fused_backward_dlse_check():
    """Any non-zero dLSE (NaN included) sends the backward to the blocked path; zeros of either sign do not."""
    q, k, v, do = (t.detach() for t in make_qkv(1, 2, 9, 9, 8, torch.float32, CPU, seed=17))
    spec = AttnSpec(scale=0.35, window_right=0)
    o, lse = _torch_backend.attn_fwd(q, k, v, None, None, spec, DENSE)
    for value, path in ((0.0, "fused"), (-0.0, "fused"), (1e-30, "blocked"), (float("nan"), "blocked")):
        dlse = torch.zeros_like(lse)
        dlse[0, 1, 4] = value
        paths = Paths()
        _torch_backend.attn_bwd(do, q, k, v, o, lse, dlse, None, None, False, spec, DENSE)
        assert paths[f"{path}_bwd"] == 1, value


FEATURES = {
    "bottom_right_short_q": (dict(causal="bottom_right"), (23, 70)),
    "bottom_right_long_q": (dict(causal="bottom_right"), (70, 23)),  # the first rows see no key
    "window": (dict(causal=True, window=(20, 0)), (90, 90)),
    "window_two_sided": (dict(window=(9, 13)), (60, 75)),
    "alibi": (dict(causal=True, alibi_slopes=torch.tensor([0.5, 0.25, 0.125])), (45, 45)),
    "softcap": (dict(softcap=2.0), (41, 66)),
    "everything": (dict(causal="bottom_right", window=(17, 0), softcap=3.0,
                        alibi_slopes=torch.tensor([[0.3, 0.2, 0.1], [0.05, 0.4, 0.0]])), (50, 64)),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("feature", FEATURES)
def test_blocked_path_numerics(dtype, feature):
    kwargs, seqlens = FEATURES[feature]
    paths = Paths()
    q, k, v, do = make_qkv(2, 3, *seqlens, 24, dtype, CPU, "bhsd", seed=2)
    out = check_attention(q, k, v, do, **kwargs)[0]
    assert paths["blocked_fwd"] == 1 and paths["blocked_bwd"] == 1 and paths["fused"] == 0
    assert paths["tiles_fwd"] >= 3  # several tiles, band edges among them
    assert out.stride() == q.stride()


@pytest.mark.parametrize("kwargs, path", [(dict(causal=True), "fused"), (dict(causal=True, window=(11, 0)), "blocked"),
                                          (dict(causal="bottom_right", softcap=4.0), "blocked")])
def test_gqa(kwargs, path):
    paths = Paths()
    q, _, _, do = make_qkv(2, 6, 33, 33, 16, torch.float32, CPU, "bshd", seed=3)
    _, k, v, _ = make_qkv(2, 2, 33, 47, 16, torch.float32, CPU, "bshd", seed=4)
    grads = check_attention(q, k, v, do, **kwargs)[2:]
    assert paths[f"{path}_fwd"] == 1 and paths[f"{path}_bwd"] == 1
    assert grads[1].shape == k.shape and grads[1].stride() == k.stride()


def _mask(shape, kind, requires_grad=False, hide_row=None, seed=5):
    gen = torch.Generator().manual_seed(seed)
    if kind == "bool":
        m = torch.rand(shape, generator=gen) > 0.3
        if hide_row is not None:
            m[..., hide_row, :] = False
        return m
    m = torch.randn(shape, generator=gen)
    if hide_row is not None:
        m[..., hide_row, :] = float("-inf")
    return m.requires_grad_(requires_grad)


@pytest.mark.parametrize("shape", [(2, 1, 1, 45), (1, 2, 37, 45), (2, 2, 37, 1), (37, 45)], ids=str)
@pytest.mark.parametrize("kind, dbias", [("bool", False), ("float", False), ("float", True)])
def test_masks_and_dbias(shape, kind, dbias):
    """Masks take the fused path; a mask gradient sends the backward to the blocked path (the op has no dbias)."""
    paths = Paths()
    q, k, v, do = make_qkv(2, 2, 37, 45, 24, torch.float32, CPU, "bshd", seed=6)
    hide = 5 if shape[-2] == 37 else None
    mask = _mask(shape, kind, requires_grad=dbias, hide_row=hide)
    out = check_sdpa(q, k, v, do, attn_mask=mask)[0]
    assert paths["fused_fwd"] == 1
    assert paths["blocked_bwd" if dbias else "fused_bwd"] == 1
    if hide is not None:  # a row that every key is hidden from: zeros, never NaN
        assert torch.equal(out[:, :, hide], torch.zeros_like(out[:, :, hide]))


def test_mask_with_causal_and_lse():
    """A mask plus causal (attention() allows both): rows that the mask hides inside their band get LSE = -inf."""
    paths = Paths()
    q, k, v, do = make_qkv(1, 2, 30, 30, 16, torch.float32, CPU, seed=7)
    mask = torch.ones(1, 1, 30, 30, dtype=torch.bool)
    mask[..., :4] = False  # rows 0..3 see only keys 0..i under causal: all hidden
    check_attention(q, k, v, do, causal=True, attn_mask=mask)
    _, lse = flashattn_py.attention(q, k, v, causal=True, attn_mask=mask, return_lse=True)
    assert torch.isneginf(lse[..., :4]).all() and torch.isfinite(lse[..., 4:]).all()
    assert paths["fused_fwd"] == 2


def test_lse_gradient_takes_blocked_backward():
    """The op's backward has no LSE gradient: a used LSE sends the backward to the blocked path (and is exact)."""
    q, k, v, do = make_qkv(2, 2, 29, 29, 16, torch.float32, CPU, seed=8)
    dl = torch.randn(2, 2, 29)

    def loss(fn, *t):
        out, lse = fn(*t, causal=True, return_lse=True)
        return (out * do.to(out.dtype)).sum() + (lse * dl.to(lse.dtype)).sum()

    paths = Paths()
    grads = torch.autograd.grad(loss(flashattn_py.attention, q, k, v), (q, k, v))
    assert paths["fused_fwd"] == 1 and paths["blocked_bwd"] == 1
    ref = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref_grads = torch.autograd.grad(loss(attention_reference, *ref), ref)
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g.double(), r, atol=2e-5, rtol=1e-4)
    paths = Paths()
    out = flashattn_py.attention(q, k, v, causal=True, return_lse=True)[0]
    torch.autograd.grad(out, (q, k, v), do)  # the LSE unused: its gradient arrives as zeros
    assert paths["fused_bwd"] == 1


def test_varlen_and_kvcache_per_sequence_paths():
    lens_q, lens_k = [5, 0, 12, 9], [5, 7, 12, 20]  # equal lengths -> fused causal, others blocked, empty skipped
    H, D = 2, 16
    gen = torch.Generator().manual_seed(9)
    q = torch.randn(sum(lens_q), H, D, generator=gen).requires_grad_()
    k = torch.randn(sum(lens_k), H, D, generator=gen).requires_grad_()
    v = torch.randn(sum(lens_k), H, D, generator=gen).requires_grad_()
    cu_q = torch.tensor([0, *torch.tensor(lens_q).cumsum(0).tolist()], dtype=torch.int32)
    cu_k = torch.tensor([0, *torch.tensor(lens_k).cumsum(0).tolist()], dtype=torch.int32)
    paths = Paths()
    out = flashattn_py.attention_varlen(q, k, v, cu_q, cu_k, 12, 20, causal=True)
    do = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), do)
    assert paths["fused_fwd"] == 2 and paths["blocked_fwd"] == 1  # sequences 0 and 2; sequence 3
    ref_out, ref_grads = [], [torch.zeros_like(t) for t in (q, k, v)]
    for b in range(4):
        sq, sk = slice(cu_q[b], cu_q[b + 1]), slice(cu_k[b], cu_k[b + 1])
        if lens_q[b] == 0:
            continue
        t = [x[s].detach().double().transpose(0, 1)[None].requires_grad_() for x, s in ((q, sq), (k, sk), (v, sk))]
        o = attention_reference(*t, causal="bottom_right")
        ref_out.append(o[0].transpose(0, 1))
        g = torch.autograd.grad(o, t, do[sq].double().transpose(0, 1)[None], allow_unused=True,
                                materialize_grads=True)
        for acc, gi, s in zip(ref_grads, g, (sq, sk, sk), strict=True):
            acc[s] = gi[0].transpose(0, 1).to(acc.dtype)
    torch.testing.assert_close(out, torch.cat(ref_out).float(), atol=1e-5, rtol=1e-5)
    for a, b in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)

    cache_k, cache_v = torch.randn(2, 1, 64, 16), torch.randn(2, 1, 64, 16)
    qd = torch.randn(2, 2, 1, 16)
    lens = torch.tensor([0, 40], dtype=torch.int32)  # an empty cache gives zeros
    out = flashattn_py.attention_with_kvcache(qd, cache_k, cache_v, lens)
    ref = attention_reference(qd[1:], cache_k[1:, :, :40], cache_v[1:, :, :40], causal="bottom_right")
    torch.testing.assert_close(out[1:], ref, atol=1e-5, rtol=1e-5)
    assert torch.equal(out[0], torch.zeros_like(out[0]))


def _scores(q, k, spec: AttnSpec):
    from flashattn_py.reference import reference_scores

    return reference_scores(q, k, scale=spec.scale, window=(spec.window_left, spec.window_right), offset=spec.offset)


@pytest.mark.parametrize("window_right", [-1, 30], ids=["plain", "windowed"])
def test_dropout_statistics_and_backward_consistency(window_right):
    """Dropout keeps ~1 - p of the weights, rescaled by 1 / (1 - p); the backward regenerates the forward's mask."""
    p, Sq, Sk = 0.3, 24, 40
    gen = torch.Generator().manual_seed(10)
    q, k = torch.randn(1, 2, Sq, Sk, generator=gen), torch.randn(1, 2, Sk, Sk, generator=gen)
    spec = AttnSpec(scale=0.3, window_right=window_right, dropout_p=p, seed=123)
    paths = Paths()
    A, _ = _torch_backend.attn_fwd(q, k, torch.eye(Sk).expand(1, 2, Sk, Sk).contiguous(), None, None, spec, DENSE)
    P = torch.softmax(_scores(q, k, spec), -1)  # O = A V: with V = I the output is the dropped weights A
    visible = P > 0
    kept = (A != 0) & visible
    assert not A[~visible].any()
    assert abs(kept.sum().item() / visible.sum().item() - (1 - p)) < 0.05
    torch.testing.assert_close(A[kept], (P / (1 - p))[kept], atol=1e-6, rtol=1e-5)
    v, do = torch.randn(1, 2, Sk, Sk, generator=gen), torch.randn(1, 2, Sq, Sk, generator=gen)
    o, lse = _torch_backend.attn_fwd(q, k, v, None, None, spec, DENSE)
    torch.testing.assert_close(o, A @ v, atol=1e-5, rtol=1e-5)
    dq, dk, dv, _ = _torch_backend.attn_bwd(do, q, k, v, o, lse, None, None, None, False, spec, DENSE)
    t = [x.double().requires_grad_() for x in (q, k, v)]
    ref = (torch.softmax(_scores(t[0], t[1], spec), -1) * kept / (1 - p)) @ t[2]  # O = (P * Z / (1 - p)) V
    for g, r in zip((dq, dk, dv), torch.autograd.grad(ref, t, do.double()), strict=True):
        torch.testing.assert_close(g.double(), r, atol=1e-5, rtol=1e-4)
    assert paths["fused"] == 0 and paths["blocked_bwd"] == 1  # dropout is never fused
    other, _ = _torch_backend.attn_fwd(q, k, v, None, None, AttnSpec(scale=0.3, window_right=window_right,
                                                                  dropout_p=p, seed=124), DENSE)
    assert not torch.equal(other, o)


def test_dropout_never_fused():
    paths = Paths()
    q = torch.randn(1, 2, 32, 16, requires_grad=True)
    out = flashattn_py.scaled_dot_product_attention(q, q, q, dropout_p=0.2)
    out.sum().backward()
    assert paths["blocked_fwd"] == 1 and paths["blocked_bwd"] == 1 and paths["fused"] == 0


def _both_paths(q, k, v, **kwargs):
    """The same attention through the fused and the blocked path (ALiBi slopes of 0 change nothing but the path)."""
    zero = torch.zeros(q.shape[1])
    fused = flashattn_py.attention(q, k, v, return_lse=True, **kwargs)
    blocked = flashattn_py.attention(q, k, v, return_lse=True, alibi_slopes=zero, **kwargs)
    return fused, blocked


def test_empty_sequences_every_path():
    spec = AttnSpec(scale=0.25)
    for sq, sk in ((0, 9), (9, 0), (0, 0)):
        q, k, v = torch.randn(1, 2, sq, 16), torch.randn(1, 2, sk, 16), torch.randn(1, 2, sk, 16)
        for sp in (spec, AttnSpec(scale=0.25, softcap=3.0)):  # fused-eligible and blocked-only calls
            o, lse = _torch_backend.attn_fwd(q, k, v, None, None, sp, DENSE)  # the op itself would SIGFPE here
            assert o.shape == q.shape and not o.any() and torch.isneginf(lse).all() and lse.shape == (1, 2, sq)
            grads = _torch_backend.attn_bwd(torch.ones_like(q), q, k, v, o, lse, None, None, None, False, sp, DENSE)
            assert all(g.shape == t.shape and not g.any() for g, t in zip(grads[:3], (q, k, v), strict=True))


def test_fully_masked_rows_every_path():
    q, k, v, do = make_qkv(1, 2, 20, 20, 16, torch.float32, CPU, seed=12)
    mask = torch.ones(1, 1, 20, 20, dtype=torch.bool)
    mask[..., 3, :] = False
    results = []
    for (out, lse) in _both_paths(q, k, v, attn_mask=mask):
        grads = torch.autograd.grad(out, (q, k, v), do)
        assert torch.equal(out[:, :, 3], torch.zeros_like(out[:, :, 3])) and torch.isneginf(lse[:, :, 3]).all()
        assert torch.equal(grads[0][:, :, 3], torch.zeros_like(grads[0][:, :, 3]))
        assert all(torch.isfinite(g).all() for g in grads)
        results.append((out, lse, *grads))
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    # bottom-right with Sq > Sk: the first rows see no key (blocked); the same on the reference
    q2, k2, v2, _ = make_qkv(1, 2, 12, 5, 16, torch.float32, CPU, seed=13)
    out, lse = flashattn_py.attention(q2, k2, v2, causal="bottom_right", return_lse=True)
    assert not out[:, :, :7].any() and torch.isneginf(lse[:, :, :7]).all() and torch.isfinite(lse[:, :, 7:]).all()


def test_nan_propagation_every_path():
    """A NaN query row is NaN alone; a NaN key poisons exactly the rows that see it (hidden ones stay clean)."""
    q, k = torch.randn(1, 2, 70, 16), torch.randn(1, 2, 70, 16)
    v = torch.randn(1, 2, 70, 16)
    q[0, 0, 3, 5] = float("nan")
    k[0, 1, 40, 2] = float("nan")
    expected = torch.isnan(attention_reference(q, k, v, causal=True)).any(-1)
    assert expected[0, 0].nonzero().flatten().tolist() == [3]
    assert expected[0, 1].nonzero().flatten().tolist() == list(range(40, 70))
    for out, lse in _both_paths(q, k, v, causal=True):
        assert torch.equal(torch.isnan(out).any(-1), expected)
        assert torch.equal(torch.isnan(lse), expected)


@pytest.mark.parametrize("seqlen", [256, 512])
def test_blocked_tiles_follow_the_band(seqlen, monkeypatch):
    """Key blocks outside the band are skipped: causal visits about half the tiles, a window O(S * w)."""
    monkeypatch.setattr(_torch_backend, "_BLOCK_M", 32)
    monkeypatch.setattr(_torch_backend, "_BLOCK_N", 32)
    q = torch.randn(1, 1, seqlen, 8)
    n = seqlen // 32

    def tiles(**spec) -> int:
        before = _torch_backend.path_counts["tiles_fwd"]
        _torch_backend._blocked_fwd(q, q, q, None, None, AttnSpec(scale=0.3, **spec))
        return _torch_backend.path_counts["tiles_fwd"] - before

    assert tiles() == n * n
    assert tiles(window_right=0) == n * (n + 1) // 2  # about half
    assert tiles(window_left=64, window_right=0) == sum(min(i, 2) + 1 for i in range(n))  # ~3 per query block
    assert tiles(window_left=64, window_right=64) <= 6 * n  # [r0 - 64, r1 + 64): 6 blocks


def test_fused_choice():
    q, k = torch.randn(1, 1, 10, 8), torch.randn(1, 1, 14, 8)
    flag = _cpu_fused.causal_flag
    assert flag(q, k, None, None, AttnSpec(scale=1.0)) is False
    assert flag(q, k, None, None, AttnSpec(scale=1.0, window_right=0)) is True
    assert flag(q, k, None, None, AttnSpec(scale=1.0, offset=4, window_right=0)) is None  # bottom-right
    assert flag(q, k, None, None, AttnSpec(scale=1.0, offset=-3, window_right=3)) is True  # j <= i: top-left
    assert flag(q, k, None, None, AttnSpec(scale=1.0, window_right=13)) is False  # a band wider than Sk
    assert flag(q, k, None, None, AttnSpec(scale=1.0, window_left=9, window_right=0)) is True  # cuts nothing
    assert flag(q, k, None, None, AttnSpec(scale=1.0, window_left=8, window_right=0)) is None
    for spec in (AttnSpec(scale=1.0, softcap=1.0), AttnSpec(scale=1.0, dropout_p=0.1)):
        assert flag(q, k, None, None, spec) is None
    assert flag(q, k, None, torch.ones(1), AttnSpec(scale=1.0)) is None
    assert flag(q, k, torch.ones(1, 1, 1, 14, dtype=torch.float64), None,
                AttnSpec(scale=1.0, bias_kind=BiasKind.FLOAT)) is None  # a mask of another dtype


def test_torch_without_the_fused_kernel(monkeypatch):
    """Where torch lacks the op, every call takes the blocked path with the same results."""
    q, k, v, do = make_qkv(1, 2, 40, 40, 16, torch.float32, CPU, seed=14)
    fused = check_attention(q, k, v, do, causal=True)
    monkeypatch.setattr(_cpu_fused, "_FWD", None)
    paths = Paths()
    blocked = check_attention(q, k, v, do, causal=True)
    assert paths["fused"] == 0 and paths["blocked_fwd"] == 1
    for a, b in zip(fused, blocked, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_float64_fused_and_blocked_match_reference():
    q, k, v, do = make_qkv(1, 2, 18, 18, 8, torch.float64, CPU, seed=15)
    for out, lse in _both_paths(q, k, v, causal=True):
        ref, ref_lse = attention_reference(q, k, v, causal=True, return_lse=True)
        torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-12)
        torch.testing.assert_close(lse, ref_lse.float(), atol=1e-6, rtol=1e-6)


def test_lse_layout_and_dtype():
    q = torch.randn(2, 30, 3, 16).to(torch.bfloat16).transpose(1, 2)  # (B, S, H, D) viewed as (B, H, S, D)
    for spec in (AttnSpec(scale=0.25), AttnSpec(scale=0.25, softcap=50.0)):  # fused, blocked
        o, lse = _torch_backend.attn_fwd(q, q, q, None, None, spec, DENSE)
        assert lse.dtype == torch.float32 and lse.is_contiguous() and lse.shape == (2, 3, 30)
        assert o.dtype == q.dtype and o.stride() == q.stride()
        qf = q.double()
        s = qf @ qf.transpose(-1, -2) * 0.25
        if spec.softcap:
            s = 50.0 * torch.tanh(s / 50.0)
        torch.testing.assert_close(lse.double(), torch.logsumexp(s, -1), atol=1e-5, rtol=1e-5)
