"""Drop-in conformance with PyTorch: CausalBias masks, error classes, TorchScript, MultiheadAttention corner cases."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import flashattn_py
from flashattn_py import InputError, InputTypeError, ops
from flashattn_py._contract import DENSE, AttnSpec, BiasKind, op_scalar_fields, to_op_scalars
from flashattn_py.modules import _dense_op_scalars

bias_mod = pytest.importorskip("torch.nn.attention.bias")


def _qkv(L, S, dtype, requires_grad=False, seed=0, H=2, D=16):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(1, H, L, D, generator=gen).to(dtype)
    k, v = (torch.randn(1, H, S, D, generator=gen).to(dtype) for _ in range(2))
    return tuple(t.requires_grad_(requires_grad) for t in (q, k, v))


def _causal_bias(variant, L, S):
    with warnings.catch_warnings():  # lower-right with L > S warns about NaNs (its rows see nothing)
        warnings.simplefilter("ignore")
        return getattr(bias_mod, variant)(L, S)


# --- torch.nn.attention.bias.CausalBias ------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("L, S", [(5, 19), (19, 5)])
@pytest.mark.parametrize("variant", ["causal_upper_left", "causal_lower_right"])
def test_causal_bias_matches_torch(variant, L, S, dtype, triton_ran):
    """Both CausalBias variants, Sq < Sk and Sq > Sk, against torch's SDPA given the same CausalBias."""
    q, k, v = _qkv(L, S, dtype, requires_grad=dtype == torch.float32)
    bias = _causal_bias(variant, L, S)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    out = flashattn_py.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    tol = dict(atol=2e-6, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(out, ref, **tol)
    if dtype == torch.float32:
        do = torch.randn_like(ref)
        for g_o, g_r in zip(torch.autograd.grad(out, (q, k, v), do), torch.autograd.grad(ref, (q, k, v), do),
                            strict=True):
            torch.testing.assert_close(g_o, g_r, atol=1e-5, rtol=1e-4)
    # it is our causal mode (block skipping), not a mask
    mode = "top_left" if variant == "causal_upper_left" else "bottom_right"
    assert torch.equal(out, flashattn_py.attention(q, k, v, causal=mode))
    assert torch.equal(flashattn_py.attention(q, k, v, attn_mask=bias), out)
    triton_ran("attn_fwd")


def test_causal_bias_errors():
    q, k, v = _qkv(4, 6, torch.float32)
    bias = _causal_bias("causal_lower_right", 4, 6)
    with pytest.raises(ValueError, match="CausalBias should not be used with causal=True"):
        F.scaled_dot_product_attention(q, k, v, attn_mask=bias, is_causal=True)
    with pytest.raises(ValueError, match="CausalBias should not be used with causal=True"):
        flashattn_py.scaled_dot_product_attention(q, k, v, attn_mask=bias, is_causal=True)
    with pytest.raises(InputError, match="cannot be combined with causal"):
        flashattn_py.attention(q, k, v, attn_mask=bias, causal=True)
    with pytest.raises(InputError, match=r"CausalBias for \(L, S\) = \(4, 7\)"):
        flashattn_py.scaled_dot_product_attention(q, k, v, attn_mask=_causal_bias("causal_lower_right", 4, 7))


# --- error classes: ValueError / TypeError as documented, RuntimeError as torch's SDPA -------------------------------

def test_error_classes():
    assert issubclass(InputError, ValueError) and issubclass(InputError, RuntimeError)
    assert issubclass(InputTypeError, TypeError) and issubclass(InputTypeError, RuntimeError)


SDPA_BAD = [  # (query, key, value), kwargs. torch raises these on CUDA; on CPU it intersects mask and causal
    ("mask with is_causal", lambda q: ((q, q, q), dict(attn_mask=torch.ones(8, 8, dtype=torch.bool), is_causal=True)),
     InputError),
    ("mask dtype", lambda q: ((q, q, q), dict(attn_mask=torch.ones(8, 8, dtype=torch.float64))), InputTypeError),
    ("mask shape", lambda q: ((q, q, q), dict(attn_mask=torch.ones(3, 8, dtype=torch.bool))), InputError),
    ("heads without enable_gqa", lambda q: ((torch.cat([q, q], 1), q, q), {}), InputError),
]


@pytest.mark.parametrize("make, error", [c[1:] for c in SDPA_BAD], ids=[c[0] for c in SDPA_BAD])
def test_sdpa_errors_are_runtime_errors(make, error):
    """Code that wraps torch's SDPA in `except RuntimeError` catches ours too; messages stay ours."""
    args, kwargs = make(torch.randn(1, 2, 8, 16))
    if not (kwargs.get("is_causal") and not args[0].is_cuda):  # torch's CPU math path accepts mask + is_causal
        with pytest.raises(RuntimeError):
            F.scaled_dot_product_attention(*args, **kwargs)
    before = sum(ops.launch_counts.values())
    with pytest.raises(error) as info:
        flashattn_py.scaled_dot_product_attention(*args, **kwargs)
    assert isinstance(info.value, RuntimeError)
    assert sum(ops.launch_counts.values()) == before


# --- TorchScript -----------------------------------------------------------------------------------------------------

E, H, N, L, S = 32, 4, 2, 7, 9


def test_op_scalars_agree_with_contract():
    """The scripted path's flat scalars are what `_contract.to_op_scalars` gives for the same spec."""
    assert len(_dense_op_scalars(1.0, -1, 0, 0.0)) == len(op_scalar_fields())
    for scale, right, kind, p in [(0.125, -1, BiasKind.NONE, 0.0), (0.5, 0, BiasKind.BOOL, 0.1),
                                  (-2.0, 0, BiasKind.FLOAT, 0.0)]:
        spec = AttnSpec(scale=scale, window_right=right, bias_kind=kind, dropout_p=p)
        assert _dense_op_scalars(scale, right, int(kind), p) == to_op_scalars(spec, DENSE)


@pytest.mark.parametrize("config", [dict(), dict(batch_first=True, add_bias_kv=True, add_zero_attn=True),
                                    dict(kdim=24, vdim=20)], ids=["default", "bias_kv", "kdim"])
def test_torchscript_multihead_attention(config, triton_ran):
    torch.manual_seed(0)
    ref = nn.MultiheadAttention(E, H, **config)
    ours = flashattn_py.MultiheadAttention(E, H, **config)
    ours.load_state_dict(ref.state_dict())
    scripted = torch.jit.script(ours)
    assert "flashattn_py::attn_fwd" in str(scripted.inlined_graph)  # the op itself, not a fallback
    bf = config.get("batch_first", False)
    gen = torch.Generator().manual_seed(1)

    def t(length, e):
        return torch.randn((N, length, e) if bf else (length, N, e), generator=gen).requires_grad_()

    q, k, v = t(L, E), t(S, config.get("kdim", E)), t(S, config.get("vdim", E))
    kpm = torch.zeros(N, S, dtype=torch.bool)
    kpm[1, -3:] = True
    mask = torch.randn(L, S, generator=gen)
    for kwargs in ({}, {"key_padding_mask": kpm, "attn_mask": mask, "need_weights": False}):
        out_r, w_r = ref(q, k, v, **kwargs)
        out_e, w_e = ours(q, k, v, **kwargs)
        out_s, w_s = scripted(q, k, v, **kwargs)
        torch.testing.assert_close(out_e, out_r, atol=1e-5, rtol=1e-4)
        assert torch.equal(out_s, out_e)
        assert (w_s is None) == (w_r is None) and (w_s is None or torch.equal(w_s, w_e))
        g_s = torch.autograd.grad(out_s.sum(), (q, k, v, *scripted.parameters()))
        g_r = torch.autograd.grad(out_r.sum(), (q, k, v, *ref.parameters()))
        for a, b in zip(g_s, g_r, strict=True):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    triton_ran("attn_fwd", "attn_bwd_dq")


def test_torchscript_encoder_layer_after_replace_attention():
    torch.manual_seed(2)
    ref = nn.TransformerEncoderLayer(E, H, 64, dropout=0.0, batch_first=True)
    layer = nn.TransformerEncoderLayer(E, H, 64, dropout=0.0, batch_first=True)
    layer.load_state_dict(ref.state_dict())
    flashattn_py.replace_attention(layer)
    scripted = torch.jit.script(layer)
    x = torch.randn(N, L, E, requires_grad=True)
    kpm = torch.zeros(N, L, dtype=torch.bool)
    kpm[0, -2:] = True
    causal = nn.Transformer.generate_square_subsequent_mask(L)
    before = ops.launch_counts["attn_fwd"]
    for kwargs in ({"src_key_padding_mask": kpm}, {"src_mask": causal, "is_causal": True}):
        out_r, out_e, out_s = ref(x, **kwargs), layer(x, **kwargs), scripted(x, **kwargs)
        torch.testing.assert_close(out_e, out_r, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(out_s, out_e, atol=0, rtol=0)
        g_s, g_r = torch.autograd.grad(out_s.sum(), x), torch.autograd.grad(out_r.sum(), x)
        torch.testing.assert_close(g_s[0], g_r[0], atol=1e-4, rtol=1e-4)
    assert ops.launch_counts["attn_fwd"] >= before + 4  # eager and scripted runs both took our op


# --- MultiheadAttention: torch's treatment of the is_causal hint and of mixed parameter dtypes -----------------------

def test_is_causal_hint_ignores_misshaped_mask():
    """With is_causal=True, no key-padding mask and need_weights=False, torch does not read attn_mask; nor do we."""
    torch.manual_seed(3)
    ref = nn.MultiheadAttention(E, H, batch_first=True)
    ours = flashattn_py.MultiheadAttention(E, H, batch_first=True)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(N, L, E)
    hint = torch.zeros(3, 3, dtype=torch.bool)  # not (L, L): only a hint
    out_r = ref(x, x, x, attn_mask=hint, is_causal=True, need_weights=False)[0]
    out_o = ours(x, x, x, attn_mask=hint, is_causal=True, need_weights=False)[0]
    torch.testing.assert_close(out_o, out_r, atol=1e-5, rtol=1e-4)
    for kwargs in ({"need_weights": True}, {"need_weights": False, "key_padding_mask": torch.zeros(N, L).bool()}):
        for module in (ref, ours):  # where the mask is used, its shape is checked: RuntimeError in both
            with pytest.raises(RuntimeError):
                module(x, x, x, attn_mask=hint, is_causal=True, **kwargs)


@pytest.mark.parametrize("batch_first", [True, False])
def test_mixed_parameter_dtypes_follow_torch(batch_first):
    """float64 module, float16 in_proj_bias: F.linear promotes on the transposed (batch_first) views, else fails."""
    torch.manual_seed(4)
    ref = nn.MultiheadAttention(8, 2, batch_first=batch_first, dtype=torch.float64)
    ref.in_proj_bias.data = ref.in_proj_bias.data.half()
    ours = flashattn_py.MultiheadAttention(8, 2, batch_first=batch_first, dtype=torch.float64)
    ours.in_proj_bias.data = ours.in_proj_bias.data.half()
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(3, 4, 8, dtype=torch.float64)
    y = torch.randn(3, 4, 8, dtype=torch.float64)
    for args in ((x, x, x), (x, y, y)):
        if batch_first:
            out_r, w_r = ref(*args)
            out_o, w_o = ours(*args)
            assert out_o.dtype == out_r.dtype == torch.float64
            torch.testing.assert_close(out_o, out_r, atol=1e-12, rtol=1e-10)
            torch.testing.assert_close(w_o, w_r, atol=1e-6, rtol=1e-5)
        else:
            for module in (ref, ours):
                with pytest.raises(RuntimeError, match="same dtype"):
                    module(*args)
