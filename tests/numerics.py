"""The FlashAttention numerics rule, shared by the tests.

For every output x: err(ours) <= factor * err(PyTorch's math in the same dtype) + slack,
both errors measured against a float64 reference, with factor 2 for the output and
the LSE and 3 for gradients, and slack one rounding unit of the dtype at the
reference's magnitude (as FlashAttention's tests do).

Two magnitudes are those of intermediate terms rather than of the result:
- dv: Pᵀ|dO| weighted by 1 + r (eps_softmax / eps), r bounding the relative error
  of P = exp2(s2 - lse2) recomputed in the backward from the stored LSE, in eps of
  the softmax dtype (float32; float64 for float64), a rounding PyTorch, holding the
  P its forward made, does not have. Counting unit roundoffs u = eps/2 in the
  exponent (log2 units, s2 = log2(e) s): qk_scale = scale * log2(e) rounded (u|s2|),
  the multiply by it (u|s2|), the subtraction (u(|s2| + |lse2|)); the stored LSE
  (forward max taken after the same rounded multiply, + log2(l), * ln 2 rounded
  constant and product: 5u|lse2|) and lse * log2(e) (rounded constant and product:
  2u|lse2|). An exponent error x costs P a relative ln(2) x, so P is off by
  u(3|s| + 8|lse|) = eps(1.5|s| + 4|lse|), plus exp2's own ~1 ulp (eps).
  The backward also recomputes Q Kᵀ, in another order than the forward that made
  the LSE (other BLAS kernels, tiles, transposes): at a dominant entry PyTorch's
  softmax cancels its own product's rounding, ours keeps the difference of two.
  Each is bounded (probabilistically, Higham & Mary) by sqrt(D) u scale Σ|q||k|,
  so r gets sqrt(D) eps scale (|Q| |K|ᵀ). Without this term the rule's pass hung
  on which BLAS the interpreter's tl.dot called (numpy's OpenBLAS Haswell/Zen
  kernels round q@kᵀ and (k@qᵀ)ᵀ differently, SkylakeX kernels identically); the
  PyTorch factor cannot cover it, PyTorch's error being small there by luck. The
  1 in 1 + r is P's rounding to q's dtype for the MMA and dv's own, one eps of
  q's dtype per term;
- dq, dk: the terms they sum, scale * P (|dP| + |delta|) |K| (or |Q|). dS = P(dP - delta)
  cancels, so an entry that is 0 in exact arithmetic (a row with one key, say)
  still carries rounding at the scale of those terms; PyTorch's softmax backward
  computes both sides of the difference from the same numbers and does not show it.
"""

from __future__ import annotations

import torch

from flashattn_py import attention, attention_reference
from flashattn_py.reference import reference_scores

FWD_FACTOR = 2.0
BWD_FACTOR = 3.0
# roundings of P = exp2(s2 - lse2) recomputed in the backward, in eps of the softmax dtype (module docstring)
DV_ROUNDINGS_S = 1.5
DV_ROUNDINGS_LSE = 4.0
DV_ROUNDINGS_EXP = 1.0


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
        elif layout == "padded":  # cast before slicing: .to() of a non-dense view would make it dense
            return torch.randn(B, H, S, D + 8, generator=gen).to(device=device, dtype=dtype)[..., :D].requires_grad_()
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


def _gradient_term_magnitudes(q, k, v, do, out64, lse64, scale, causal, attn_mask=None,
                              **score_kwargs) -> tuple[float, float, float]:
    """Largest |term| summed into dq, dk and dS, in float64: scale * P (|dP| + |delta|) times |K| or |Q|."""
    dtype = q.dtype
    q, k, v, do = (t.detach().double() for t in (q, k, v, do))
    if k.shape[1] != q.shape[1]:
        k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (k, v))
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    lse = torch.where(torch.isneginf(lse64), torch.inf, lse64.detach())[..., None]
    m = None if attn_mask is None else (attn_mask.detach() if attn_mask.dtype == torch.bool
                                        else attn_mask.detach().double())
    kw = {name: (val.double() if isinstance(val, torch.Tensor) else val) for name, val in score_kwargs.items()}
    s = reference_scores(q, k, causal=causal, scale=scale, attn_mask=m, **kw)
    p = torch.exp(s - lse)
    delta = (out64.detach() * do).sum(-1, keepdim=True)
    w_ds = p * (torch.matmul(do, v.transpose(-1, -2)).abs() + delta.abs())  # |terms| of dS
    w = abs(scale) * w_ds
    if not w.numel():
        return 0.0, 0.0, 0.0, 0.0
    term_dq = torch.matmul(w, k.abs()).max().item()
    term_dk = torch.matmul(w.transpose(-1, -2), q.abs()).max().item()
    # the mask's gradient is dS summed over the mask's broadcast dims
    term_ds = (w_ds.sum_to_size(attn_mask.shape) if attn_mask is not None else w_ds).max().item()
    # dV = Pᵀ dO with P = exp2(s2 - lse2) recomputed from the stored LSE in the softmax dtype (float32, float64
    # for float64): its relative error, counted in the module docstring, is DV_ROUNDINGS_S |s| + DV_ROUNDINGS_LSE
    # |lse| + DV_ROUNDINGS_EXP + sqrt(D) scale |q|·|k| (two orders of Q Kᵀ) eps of that dtype; P in q's dtype and
    # the sum over queries cost one eps of q's dtype per term of Pᵀ|dO|. In units of q's eps (assert_rule's):
    eps_dtype = torch.finfo(dtype).eps
    eps_softmax = torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).eps
    dot_err = q.shape[-1] ** 0.5 * abs(scale) * torch.matmul(q.abs(), k.abs().transpose(-1, -2))
    rel_p = torch.where(p > 0, DV_ROUNDINGS_S * s.abs() + DV_ROUNDINGS_LSE * lse.abs() + DV_ROUNDINGS_EXP + dot_err,
                        0.0)
    w_p = p * (1.0 + rel_p * (eps_softmax / eps_dtype))
    term_dv = torch.matmul(w_p.transpose(-1, -2), do.abs()).max().item()
    return term_dq, term_dk, term_ds, term_dv


def _run(fn, q, k, v, do, **kwargs):
    out, lse = fn(q, k, v, return_lse=True, **kwargs)
    grads = torch.autograd.grad(out, (q, k, v), do, allow_unused=True, materialize_grads=True)
    return (out, lse, *grads)


def check_attention(q, k, v, do, **kwargs) -> tuple[torch.Tensor, ...]:
    """Run ours, the fp64 reference and PyTorch's same-dtype math; assert the rule on out, lse, dq, dk, dv."""
    ours = _run(attention, q, k, v, do, **kwargs)
    check_against_reference(ours, q, k, v, do, **kwargs)
    return ours


def check_against_reference(ours, q, k, v, do, **kwargs) -> None:
    """Assert the rule on ours = (out, lse, dq, dk, dv) for inputs q, k, v, dO and reference kwargs."""
    dtype = q.dtype

    def detached(cast):
        return [cast(t.detach()).requires_grad_() for t in (q, k, v)]

    ref64 = _run(attention_reference, *detached(lambda t: t.double()), do.double(), **kwargs)
    same = _run(attention_reference, *detached(lambda t: t.clone()), do, **kwargs)
    extra = {name: kwargs[name] for name in ("window", "alibi_slopes", "softcap", "offset") if name in kwargs}
    term_dq, term_dk, _, term_dv = _gradient_term_magnitudes(q, k, v, do, ref64[0], ref64[1], kwargs.get("scale"),
                                                             kwargs.get("causal", False), **extra)
    magnitudes = {"dq": term_dq, "dk": term_dk, "dv": max(term_dv, _magnitude(ref64[4]))}
    for i, name in enumerate(("out", "lse", "dq", "dk", "dv")):
        factor = FWD_FACTOR if i < 2 else BWD_FACTOR
        assert_rule(name, ours[i], same[i], ref64[i], factor, dtype, magnitudes.get(name))


def check_sdpa(q, k, v, do, attn_mask=None, is_causal=False, scale=None, enable_gqa=False):
    """Our scaled_dot_product_attention vs fp64 reference and torch's SDPA in the same dtype.

    The rule applies to out, dq, dk, dv and (for a float mask that requires grad)
    the mask's gradient. torch's own SDPA in float64 must equal the fp64
    reference, which pins the reference's semantics to PyTorch's.
    """
    import torch.nn.functional as F

    from flashattn_py import scaled_dot_product_attention

    dtype = q.dtype
    wants = [q, k, v] + ([attn_mask] if attn_mask is not None and attn_mask.requires_grad else [])
    kw = dict(is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)
    out = scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, **kw)
    ours = (out, *torch.autograd.grad(out, wants, do))

    def copies(cast):
        return [cast(t.detach()).requires_grad_(t.requires_grad) if t.is_floating_point() else t
                for t in (q, k, v, attn_mask) if t is not None]

    c64 = copies(lambda t: t.double())
    m64 = c64[3] if attn_mask is not None else None
    out64, lse64 = attention_reference(*c64[:3], causal=is_causal, scale=scale, attn_mask=m64, return_lse=True)
    ref64 = (out64, *torch.autograd.grad(out64, [t for t in c64 if t.requires_grad], do.double()))
    torch_out64 = F.scaled_dot_product_attention(*c64[:3], attn_mask=m64, **kw)
    torch.testing.assert_close(torch_out64, out64, atol=1e-10, rtol=1e-10)

    cs = copies(lambda t: t.clone())
    same_out = F.scaled_dot_product_attention(*cs[:3], attn_mask=cs[3] if attn_mask is not None else None, **kw)
    same = (same_out, *torch.autograd.grad(same_out, [t for t in cs if t.requires_grad], do))

    term_dq, term_dk, term_ds, term_dv = _gradient_term_magnitudes(q, k, v, do, out64, lse64, scale, is_causal,
                                                                   attn_mask)
    names = ["out", "dq", "dk", "dv", "dmask"][:len(ours)]
    magnitudes = {"dq": term_dq, "dk": term_dk, "dv": max(term_dv, _magnitude(ref64[3])), "dmask": term_ds}
    for name, a, b, r in zip(names, ours, same, ref64, strict=True):
        factor = FWD_FACTOR if name == "out" else BWD_FACTOR
        assert_rule(name, a, b, r, factor, dtype, magnitudes.get(name))
    return ours
