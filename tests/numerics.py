"""The FlashAttention numerics rule, shared by the tests.

For every output x: err(ours) <= factor * err(PyTorch's math in the same dtype) + slack,
both errors measured against a float64 reference, with factor 2 for the output and
the LSE and 3 for gradients, and slack one rounding unit of the dtype at the
reference's magnitude (as FlashAttention's tests do). For dq and dk the magnitude
is that of the terms they sum, scale * P (|dP| + |delta|) |K| (or |Q|): dS = P(dP - delta)
cancels, so an entry that is 0 in exact arithmetic (a row with one key, say) still
carries rounding at the scale of those terms. PyTorch's softmax backward computes
both sides of the difference from the same numbers and does not show it.
"""

from __future__ import annotations

import torch

from flashattn_py import attention, attention_reference
from flashattn_py._validation import causal_offset, check_causal

FWD_FACTOR = 2.0
BWD_FACTOR = 3.0


def make_qkv(B: int, H: int, Sq: int, Sk: int, D: int, dtype: torch.dtype, device: torch.device,
             layout: str = "bhsd", seed: int = 0):
    """Random q, k, v (requires grad) and dO in one of three layouts.

    bhsd: contiguous (B, H, S, D). bshd: a (B, S, H, D) tensor viewed with
    .transpose(1, 2). padded: rows padded to D + 8, sliced back to D (non-dense).
    """
    gen = torch.Generator().manual_seed(seed)

    def one(S: int) -> torch.Tensor:
        if layout == "bhsd":
            t = torch.randn(B, H, S, D, generator=gen)
        elif layout == "bshd":
            t = torch.randn(B, S, H, D, generator=gen).transpose(1, 2)
        elif layout == "padded":
            t = torch.randn(B, H, S, D + 8, generator=gen)[..., :D]
        else:
            raise ValueError(layout)
        return t.to(device=device, dtype=dtype).requires_grad_()

    q, k, v = one(Sq), one(Sk), one(Sk)
    do = torch.randn(B, H, Sq, D, generator=gen).to(device=device, dtype=dtype)
    return q, k, v, do


def _err(x: torch.Tensor, ref: torch.Tensor) -> float:
    x, ref = x.double(), ref.double()
    finite = torch.isfinite(ref)
    assert torch.equal(torch.isfinite(x), finite), "non-finite entries differ from the reference"
    return (x - ref)[finite].abs().max().item() if finite.any() else 0.0


def _magnitude(*refs: torch.Tensor) -> float:
    return max((r[torch.isfinite(r)].abs().max().item() for r in refs if torch.isfinite(r).any()), default=0.0)


def assert_rule(name: str, ours: torch.Tensor, same_dtype: torch.Tensor, ref64: torch.Tensor,
                factor: float, dtype: torch.dtype, magnitude: float | None = None) -> None:
    assert not torch.isnan(ours).any(), f"{name}: NaN"
    assert ours.shape == ref64.shape, f"{name}: shape {tuple(ours.shape)} != {tuple(ref64.shape)}"
    if magnitude is None:
        magnitude = _magnitude(ref64)
    slack = torch.finfo(dtype).eps * max(magnitude, 1.0)
    err_ours, err_pt = _err(ours, ref64), _err(same_dtype, ref64)
    assert err_ours <= factor * err_pt + slack, (
        f"{name}: max error {err_ours:.3e} > {factor} x PyTorch's {err_pt:.3e} + slack {slack:.3e}")


def _gradient_term_magnitudes(q, k, v, do, out64, lse64, scale, causal) -> tuple[float, float]:
    """Largest |term| summed into dq and dk, in float64: scale * P (|dP| + |delta|) times |K| or |Q|."""
    q, k, v, do = (t.detach().double() for t in (q, k, v, do))
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    lse = torch.where(torch.isneginf(lse64), torch.inf, lse64.detach())[..., None]
    s = torch.matmul(q, k.transpose(-1, -2)) * scale
    mode = check_causal(causal)
    if mode:
        Sq, Sk = s.shape[-2:]
        hidden = torch.arange(Sk)[None, :] > torch.arange(Sq)[:, None] + causal_offset(mode, Sq, Sk)
        s = s.masked_fill(hidden.to(s.device), float("-inf"))
    p = torch.exp(s - lse)
    delta = (out64.detach() * do).sum(-1, keepdim=True)
    w = abs(scale) * p * (torch.matmul(do, v.transpose(-1, -2)).abs() + delta.abs())
    term_dq = torch.matmul(w, k.abs()).max().item() if w.numel() else 0.0
    term_dk = torch.matmul(w.transpose(-1, -2), q.abs()).max().item() if w.numel() else 0.0
    return term_dq, term_dk


def _run(fn, q, k, v, do, **kwargs):
    out, lse = fn(q, k, v, return_lse=True, **kwargs)
    grads = torch.autograd.grad(out, (q, k, v), do)
    return (out, lse, *grads)


def check_attention(q, k, v, do, **kwargs) -> tuple[torch.Tensor, ...]:
    """Run ours, the fp64 reference and PyTorch's same-dtype math; assert the rule on out, lse, dq, dk, dv."""
    dtype = q.dtype
    ours = _run(attention, q, k, v, do, **kwargs)

    def detached(cast):
        return [cast(t.detach()).requires_grad_() for t in (q, k, v)]

    ref64 = _run(attention_reference, *detached(lambda t: t.double()), do.double(), **kwargs)
    same = _run(attention_reference, *detached(lambda t: t.clone()), do, **kwargs)
    term_dq, term_dk = _gradient_term_magnitudes(q, k, v, do, ref64[0], ref64[1], kwargs.get("scale"),
                                                 kwargs.get("causal", False))
    magnitudes = {"dq": term_dq, "dk": term_dk}
    for i, name in enumerate(("out", "lse", "dq", "dk", "dv")):
        factor = FWD_FACTOR if i < 2 else BWD_FACTOR
        assert_rule(name, ours[i], same[i], ref64[i], factor, dtype, magnitudes.get(name))
    return ours
