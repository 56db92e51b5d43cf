"""Property tests (hypothesis) over shapes, strides, dtypes, masks and options; gradcheck; NaN propagation."""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICE
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from numerics import check_against_reference

import flashattn_py

SETTINGS = settings(max_examples=12, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@st.composite
def problems(draw):
    group = draw(st.sampled_from([1, 2]))
    h_kv = draw(st.integers(1, 2))
    return dict(
        B=draw(st.integers(1, 2)), H=h_kv * group, H_kv=h_kv,
        Sq=draw(st.integers(1, 70)), Sk=draw(st.integers(1, 70)),
        D=draw(st.sampled_from([8, 16, 24, 40, 64])),
        dtype=draw(st.sampled_from([torch.float16, torch.float32])),
        layout=draw(st.sampled_from(["bhsd", "bshd", "padded"])),
        causal=draw(st.sampled_from([False, True, "bottom_right"])),
        window=draw(st.sampled_from([(-1, -1), (8, -1), (-1, 4), (10, 10)])),
        softcap=draw(st.sampled_from([0.0, 15.0])),
        mask=draw(st.sampled_from([None, "bool_keys", "float_full"])),
        seed=draw(st.integers(0, 2**16)),
    )


def _tensor(shape, layout, dtype, device, gen):
    B, H, S, D = shape
    if layout == "bshd":
        t = torch.randn(B, S, H, D, generator=gen).transpose(1, 2)
    elif layout == "padded":
        t = torch.randn(B, H, S, D + 8, generator=gen)[..., :D]
    else:
        t = torch.randn(B, H, S, D, generator=gen)
    return t.to(device=device, dtype=dtype).requires_grad_()


@SETTINGS
@given(p=problems())
def test_random_problems(p):
    device = DEVICE
    gen = torch.Generator().manual_seed(p["seed"])
    q = _tensor((p["B"], p["H"], p["Sq"], p["D"]), p["layout"], p["dtype"], device, gen)
    k = _tensor((p["B"], p["H_kv"], p["Sk"], p["D"]), p["layout"], p["dtype"], device, gen)
    v = _tensor((p["B"], p["H_kv"], p["Sk"], p["D"]), p["layout"], p["dtype"], device, gen)
    do = torch.randn(p["B"], p["H"], p["Sq"], p["D"], generator=gen).to(device=device, dtype=p["dtype"])
    mask = None
    if p["mask"] == "bool_keys":
        mask = (torch.rand(p["B"], 1, 1, p["Sk"], generator=gen) > 0.3).to(device)
    elif p["mask"] == "float_full":
        mask = torch.randn(p["B"], p["H"], p["Sq"], p["Sk"], generator=gen).to(device=device, dtype=p["dtype"])
    kwargs = dict(causal=p["causal"], window=p["window"], softcap=p["softcap"], attn_mask=mask)
    out, lse = flashattn_py.attention(q, k, v, return_lse=True, **kwargs)
    grads = torch.autograd.grad(out, (q, k, v), do)
    check_against_reference((out, lse, *grads), q, k, v, do, **kwargs)


def _gradcheck_inputs(dtype, device):
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, n, 8, generator=gen).to(device=device, dtype=dtype).requires_grad_()
               for n in (6, 9, 9))
    bias = torch.randn(1, 2, 6, 9, generator=gen).to(device=device, dtype=dtype).requires_grad_()
    return q, k, v, bias


def _features(q, k, v, bias):
    return flashattn_py.attention(q, k, v, causal="bottom_right", window=(5, 0), softcap=3.0,
                                  alibi_slopes=torch.tensor([0.3, 0.1], device=q.device), attn_mask=bias)


def test_gradcheck_float64_torch_path(device):
    assert torch.autograd.gradcheck(_features, _gradcheck_inputs(torch.float64, device))


@pytest.mark.filterwarnings("ignore:Input #:UserWarning")
def test_gradcheck_float32_kernels(device, triton_ran):
    """Through the Triton kernels in fp32: finite differences need loose tolerances (fast mode: random projections)."""
    assert torch.autograd.gradcheck(_features, _gradcheck_inputs(torch.float32, device), eps=1e-2, atol=2e-2,
                                    rtol=2e-2, nondet_tol=0.0, fast_mode=True)
    triton_ran("attn_fwd", "attn_bwd_dkdv", "attn_bwd_dq", "attn_bwd_dbias")


def test_nan_inputs_propagate(device):
    """As in PyTorch: a NaN in one query row makes that row NaN; a NaN key poisons every row that sees it.

    For the NaN query the reference is torch's math backend: its CPU flash kernel's NaN handling
    depends on the CPU's vector ISA (with AVX-512 a NaN query row comes out finite).
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def math_sdpa(q, k):
        with sdpa_kernel(SDPBackend.MATH):
            return torch.nn.functional.scaled_dot_product_attention(q, k, k, is_causal=True)

    q = torch.randn(1, 1, 8, 16, device=device)
    k = torch.randn(1, 1, 8, 16, device=device)
    q[0, 0, 3, 5] = float("nan")
    out = flashattn_py.attention(q, k, k, causal=True)
    assert torch.isnan(out).any(-1).sum() == 1
    assert torch.equal(torch.isnan(out), torch.isnan(math_sdpa(q, k)))
    k[0, 0, 6, 0] = float("nan")
    q[0, 0, 3, 5] = 0.0
    out = flashattn_py.attention(q, k, k, causal=True)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, k, is_causal=True)
    assert torch.equal(torch.isnan(out), torch.isnan(ref))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_mixed_devices_message():
    q = torch.randn(1, 1, 4, 16)
    with pytest.raises(ValueError, match="one device"):
        flashattn_py.attention(q, q.cuda(), q)


def test_public_api_is_typed_and_documented():
    import inspect

    for name in flashattn_py.__all__:
        obj = getattr(flashattn_py, name)
        if name.startswith("__"):
            continue
        assert inspect.getdoc(obj), f"{name} has no docstring"
        if inspect.isfunction(obj):
            hints = {k for k in inspect.signature(obj).parameters if k not in ("self",)}
            assert set(obj.__annotations__) >= hints, f"{name} lacks type hints"
