"""scaled_dot_product_attention: PyTorch's contract on our kernels (masks, GQA, dropout, shapes)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from numerics import check_sdpa, make_qkv

import flashattn_py
from flashattn_py import ops

DTYPES = [torch.float16, torch.float32]


def _mask(shape, kind, device, dtype, seed=0, requires_grad=False, hide_row=None):
    gen = torch.Generator().manual_seed(seed)
    if kind == "bool":
        m = torch.rand(shape, generator=gen) > 0.3
        if hide_row is not None:
            m[..., hide_row, :] = False  # a row that sees nothing
        return m.to(device)
    m = torch.randn(shape, generator=gen)
    if hide_row is not None:
        m[..., hide_row, :] = float("-inf")
    return m.to(device=device, dtype=dtype).requires_grad_(requires_grad)


# mask shapes broadcastable to (B=2, H=2, L=37, S=45)
MASK_SHAPES = [(37, 45), (2, 2, 37, 45), (2, 1, 1, 45), (1, 2, 37, 1), (2, 1, 37, 45), (1, 45)]


@pytest.mark.parametrize("kind", ["bool", "float"])
@pytest.mark.parametrize("shape", MASK_SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES)
def test_masks(shape, kind, dtype, device, triton_ran):
    q, k, v, do = make_qkv(2, 2, 37, 45, 40, dtype, device, "bshd", seed=len(shape))
    hide = 5 if len(shape) >= 2 and shape[-2] == 37 else None
    mask = _mask(shape, kind, device, dtype, requires_grad=(kind == "float"), hide_row=hide)
    out = check_sdpa(q, k, v, do, attn_mask=mask)[0]
    if hide is not None:
        assert torch.isfinite(out).all()
    names = ["attn_fwd", "attn_bwd_dkdv", "attn_bwd_dq"] + (["attn_bwd_dbias"] if kind == "float" else [])
    triton_ran(*names)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("is_causal", [False, True])
def test_gqa(is_causal, dtype, device, triton_ran):
    q, _, _, do = make_qkv(2, 6, 33, 33, 32, dtype, device, seed=21)
    _, k, v, _ = make_qkv(2, 2, 33, 50, 32, dtype, device, seed=22)
    check_sdpa(q, k, v, do, is_causal=is_causal, enable_gqa=True)
    triton_ran("attn_fwd", "attn_bwd_dkdv", "attn_bwd_dq")


def test_gqa_with_mask_grad(device, triton_ran):
    q, _, _, do = make_qkv(1, 4, 20, 20, 16, torch.float32, device, seed=23)
    _, k, v, _ = make_qkv(1, 1, 20, 29, 16, torch.float32, device, seed=24)
    mask = _mask((1, 4, 20, 29), "float", device, torch.float32, requires_grad=True)
    check_sdpa(q, k, v, do, attn_mask=mask, enable_gqa=True)
    triton_ran("attn_bwd_dbias")


def test_gqa_needs_flag(device):
    q = torch.randn(1, 4, 8, 16, device=device)
    k = torch.randn(1, 2, 8, 16, device=device)
    with pytest.raises(ValueError, match="enable_gqa"):
        flashattn_py.scaled_dot_product_attention(q, k, k)


@pytest.mark.parametrize("shape_q, shape_kv", [((3, 17, 24), (3, 29, 24)), ((2, 3, 2, 17, 16), (2, 3, 2, 9, 16))])
def test_leading_dims(shape_q, shape_kv, device):
    gen = torch.Generator().manual_seed(25)
    q = torch.randn(shape_q, generator=gen).to(device)
    k, v = (torch.randn(shape_kv, generator=gen).to(device) for _ in range(2))
    mask = torch.rand(shape_q[-2], shape_kv[-2], generator=gen).to(device) > 0.2
    for kwargs in ({}, {"is_causal": True}, {"attn_mask": mask}):
        ours = flashattn_py.scaled_dot_product_attention(q, k, v, **kwargs)
        torch.testing.assert_close(ours, F.scaled_dot_product_attention(q, k, v, **kwargs), atol=2e-6, rtol=1e-5)


def test_non_contiguous_last_dim(device):
    base = torch.randn(1, 2, 16, 12, device=device)
    q = base.transpose(-1, -2)  # (1, 2, 12, 16) with last stride != 1
    ours = flashattn_py.scaled_dot_product_attention(q, q, q)
    torch.testing.assert_close(ours, F.scaled_dot_product_attention(q, q, q), atol=2e-6, rtol=1e-5)


def test_errors(device):
    q = torch.randn(1, 2, 8, 16, device=device)
    with pytest.raises(ValueError, match="cannot be used together"):
        flashattn_py.scaled_dot_product_attention(q, q, q, attn_mask=torch.ones(8, 8, dtype=torch.bool), is_causal=True)
    with pytest.raises(ValueError, match="does not broadcast"):
        flashattn_py.scaled_dot_product_attention(q, q, q, attn_mask=torch.ones(3, 8, dtype=torch.bool))
    with pytest.raises(TypeError, match="bool or of query's dtype"):
        flashattn_py.scaled_dot_product_attention(q, q, q, attn_mask=torch.ones(8, 8, dtype=torch.float64))
    with pytest.raises(ValueError, match="dropout_p"):
        flashattn_py.scaled_dot_product_attention(q, q, q, dropout_p=1.0)


# --- dropout -----------------------------------------------------------------------------------------------------

def test_dropout_keep_rate_and_unbiased(device, triton_ran):
    """With v = identity columns, out = P∘keep/(1-p): the keep rate and E[out] = P are visible directly."""
    L, S, p = 64, 64, 0.3
    gen = torch.Generator().manual_seed(26)
    q = torch.randn(1, 4, L, S, generator=gen).to(device) * 0.5
    k = torch.randn(1, 4, S, S, generator=gen).to(device)
    v = torch.eye(S)[None, None].expand(1, 4, S, S).contiguous().to(device)  # out[i] = the row P[i]
    probs = F.scaled_dot_product_attention(q, k, v)
    draws = torch.stack([flashattn_py.scaled_dot_product_attention(q, k, v, dropout_p=p) for _ in range(40)])
    kept = (draws != 0).float().mean().item()
    assert abs(kept - (1 - p)) < 0.01, kept  # 40 * 4 * 64 * 64 draws: sd of the rate ~ 0.001
    # surviving entries carry P / (1 - p) exactly
    scaled = probs.expand_as(draws) / (1 - p)
    nz = draws != 0
    torch.testing.assert_close(draws[nz], scaled[nz], atol=1e-6, rtol=1e-4)
    # unbiased: the mean over draws approaches P (sd per entry ~ P * sqrt(p / (1-p) / 40))
    err = (draws.mean(0) - probs).abs() / (probs * (p / (1 - p) / 40) ** 0.5 + 1e-12)
    assert err.mean() < 1.0, err.mean()
    triton_ran("attn_fwd")


def test_dropout_forward_backward_agree(device, triton_ran):
    """Fixed seed -> fixed mask: finite differences of the forward match the backward."""
    gen = torch.Generator().manual_seed(27)
    q, k, v = (torch.randn(1, 2, 13, 16, generator=gen).to(device).requires_grad_() for _ in range(3))
    bias = torch.randn(1, 2, 13, 13, generator=gen).to(device).requires_grad_()

    def f(q, k, v, bias):
        torch.manual_seed(1234)  # the op draws its Philox seed from torch's CPU generator
        return flashattn_py.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=0.4)

    out = f(q, k, v, bias)
    w = torch.randn_like(out)
    grads = torch.autograd.grad((out * w).sum(), (q, k, v, bias))
    eps = 1e-3
    gen = torch.Generator().manual_seed(28)
    for idx, (t, g) in enumerate(zip((q, k, v, bias), grads, strict=True)):
        direction = torch.randn(t.shape, generator=gen).to(device)
        args = [x.detach() for x in (q, k, v, bias)]
        plus, minus = list(args), list(args)
        plus[idx] = args[idx] + eps * direction
        minus[idx] = args[idx] - eps * direction
        numeric = ((f(*plus) * w).sum() - (f(*minus) * w).sum()) / (2 * eps)
        analytic = (g * direction).sum()
        assert abs(numeric - analytic) <= 2e-3 * max(1.0, abs(analytic)), (idx, numeric.item(), analytic.item())
    triton_ran("attn_fwd", "attn_bwd_dkdv", "attn_bwd_dq", "attn_bwd_dbias")


def test_dropout_differs_between_calls_and_follows_manual_seed(device):
    q = torch.randn(1, 2, 32, 16, device=device)
    a = flashattn_py.scaled_dot_product_attention(q, q, q, dropout_p=0.5)
    b = flashattn_py.scaled_dot_product_attention(q, q, q, dropout_p=0.5)
    assert not torch.equal(a, b)
    torch.manual_seed(5)
    c = flashattn_py.scaled_dot_product_attention(q, q, q, dropout_p=0.5)
    torch.manual_seed(5)
    d = flashattn_py.scaled_dot_product_attention(q, q, q, dropout_p=0.5)
    assert torch.equal(c, d)


def test_dropout_compiled_step_draws_per_run_and_keeps_its_mask_for_backward(device):
    """A compiled training step draws its key on the device per run: runs differ, torch.manual_seed reproduces
    the eager step (output and gradients), and the backward uses the forward's own mask."""
    gen = torch.Generator().manual_seed(31)
    q, k, v = (torch.randn(1, 2, 24, 16, generator=gen).to(device).requires_grad_() for _ in range(3))

    def step(q, k, v):
        out = flashattn_py.scaled_dot_product_attention(q, k, v, dropout_p=0.5)
        return out, torch.autograd.grad(out.square().sum(), (q, k, v))

    compiled = torch.compile(step, backend="aot_eager")
    first, second = compiled(q, k, v), compiled(q, k, v)
    assert not torch.equal(first[0], second[0])
    torch.manual_seed(8)
    got = compiled(q, k, v)
    torch.manual_seed(8)
    expected = step(q, k, v)
    assert torch.equal(got[0], expected[0])
    for a, b in zip(got[1], expected[1], strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("kind", ["bool", "float"])
def test_torch_backend_masks_gqa(kind, monkeypatch):
    """The PyTorch path handles masks, mask gradients and GQA the same way."""
    monkeypatch.setattr(ops, "uses_triton", lambda t: False)
    before = sum(ops.launch_counts.values())
    q, _, _, do = make_qkv(2, 4, 21, 21, 24, torch.float32, torch.device("cpu"), seed=29)
    _, k, v, _ = make_qkv(2, 2, 21, 30, 24, torch.float32, torch.device("cpu"), seed=30)
    mask = _mask((2, 1, 21, 30), kind, "cpu", torch.float32, requires_grad=(kind == "float"), hide_row=3)
    check_sdpa(q, k, v, do, attn_mask=mask, enable_gqa=True)
    assert sum(ops.launch_counts.values()) == before
