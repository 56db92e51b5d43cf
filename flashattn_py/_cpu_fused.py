"""CPU fast path: PyTorch's own fused CPU attention kernel, used where it computes exactly our contract.

torch ships ``aten::_scaled_dot_product_flash_attention_for_cpu`` (the kernel that
``F.scaled_dot_product_attention`` runs on CPU: tiled, online softmax, fp32
accumulation, returns out and the natural-log LSE) and its ``_backward``. Being
that kernel, this path is as fast as PyTorch's SDPA on CPU by construction. It
applies when the call is dense, has no band or a top-left causal one, no ALiBi,
softcap or dropout, and a mask (bool or float) whose gradient is not wanted.

What the op does that our contract does not (measured on torch 2.13), and the fix-ups:
  * masks must be float (of q's dtype): a bool keep-mask is passed as 0 / -inf;
  * a row that a mask hides entirely comes back with O = 0 but LSE = 0, not -inf:
    such rows are found from the mask (and the causal band) and get LSE = -inf;
  * its backward recomputes P = exp(s - lse): an LSE of -inf on an empty row would
    give NaN, so +inf goes in there instead (P = 0, zero gradients);
  * Sq = 0 or Sk = 0 kills the process (SIGFPE): callers never pass empty problems;
  * the LSE comes back (B, Sq, H)-strided and the gradients (B, S, H, D)-strided: the LSE is
    made contiguous; for contiguous (B, H, S, D) inputs the backward folds (B, H) into the op's
    batch dim so its gradients come out in that layout, other layouts are copied to q's/k's/v's
    strides where those are dense;
  * GQA (H_kv < H heads in k/v) is handled in the op itself, dk/dv summed per group;
  * its dropout draws from a stream the backward cannot regenerate under our
    contract (the seed is ours), so dropout never comes here.
Torch versions without the op (or whose op takes no ``attn_mask``: checked in its schema)
send every call (or every masked call) to the blocked path.
"""

from __future__ import annotations

import torch

from ._contract import AttnSpec

_FWD_NAME = "_scaled_dot_product_flash_attention_for_cpu"
_BWD_NAME = "_scaled_dot_product_flash_attention_for_cpu_backward"


def _lookup() -> tuple[object | None, object | None, bool]:
    """The fwd and bwd ops as the cheapest callables this torch has for them (None, None where it lacks one),
    and whether both take `attn_mask`. Once per process.

    The forward is called through torch's generated Python binding where it has one (its argument parser costs
    ~4 us less per call than an `OpOverloadPacket`'s schema matching, about a third of the op at S = 16), the
    backward (which has none) through its `OpOverload`: the same aten ops either way.
    """
    fwd = getattr(torch.ops.aten, _FWD_NAME, None) if hasattr(torch.ops.aten, _FWD_NAME) else None
    bwd = getattr(torch.ops.aten, _BWD_NAME, None) if hasattr(torch.ops.aten, _BWD_NAME) else None
    if fwd is None or bwd is None:
        return None, None, False
    takes_mask = all(any(a.name == "attn_mask" for a in o.default._schema.arguments) for o in (fwd, bwd))
    return getattr(torch, _FWD_NAME, fwd.default), bwd.default, takes_mask


_FWD, _BWD, _TAKES_MASK = _lookup()

# dtypes the op dispatches on CPU (AT_DISPATCH_FLOATING_TYPES_AND2(BFloat16, Half))
_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def available() -> bool:
    """Whether this torch has the fused CPU kernel (fwd and bwd)."""
    return _FWD is not None


def causal_flag(q: torch.Tensor, k: torch.Tensor, bias: torch.Tensor | None, alibi: torch.Tensor | None,
                spec: AttnSpec) -> bool | None:
    """The op's `is_causal` for this dense call, or None when the op cannot compute our contract for it.

    The band i + off - left <= j <= i + off + right is the op's "none" when both bounds
    exclude no key of any row, and its top-left causal when off + right == 0 and the
    lower bound excludes nothing.
    """
    # (called once per pass: `is_cpu` rather than `device.type`, which builds a device object, 0.3 us)
    if _FWD is None or not q.is_cpu or q.dtype not in _DTYPES:
        return None
    if spec.dropout_p > 0 or spec.softcap > 0 or alibi is not None:
        return None
    if bias is not None and (not _TAKES_MASK or (bias.dtype != torch.bool and bias.dtype != q.dtype)):
        return None
    off, left, right = spec.offset, spec.window_left, spec.window_right
    if left >= 0 and q.shape[2] - 1 + off - left > 0:  # the last row's lower bound cuts keys
        return None
    if right < 0 or off + right >= k.shape[2] - 1:  # no row's upper bound cuts keys
        return False
    if off + right == 0:
        return True
    return None


def _float_mask(bias: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """The op's mask: float additive, q's dtype. A bool keep-mask becomes 0 / -inf (same shape, one pass)."""
    if bias is None or bias.dtype != torch.bool:
        return bias
    zero = torch.zeros((), dtype=dtype)
    return torch.where(bias, zero, torch.full((), float("-inf"), dtype=dtype))


def _empty_rows(bias: torch.Tensor, is_causal: bool, Sq: int, Sk: int) -> torch.Tensor | None:
    """Rows (broadcastable to (B, H, Sq)) that the mask hides entirely within the band; None if there are none."""
    keep = bias if bias.dtype == torch.bool else ~torch.isneginf(bias)
    if not is_causal or keep.shape[3] == 1:  # a size-1 key dim broadcasts: the row's one entry decides
        has = keep.any(-1)
    else:  # top-left causal: row i sees keys 0..min(i, Sk - 1)
        seen = keep.cumsum(-1, dtype=torch.int32) > 0  # (.., Sq|1, Sk): any visible key among 0..j
        last = torch.arange(Sq).clamp_(max=Sk - 1)
        if keep.shape[2] == 1:
            has = seen[:, :, 0, last]
        else:
            has = seen.gather(-1, last.view(1, 1, Sq, 1).expand(*seen.shape[:2], Sq, 1))[..., 0]
    empty = ~has
    return empty if bool(empty.any()) else None


def _like(t: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """`t` with `ref`'s strides when ref is dense (our layout contract); as it is otherwise."""
    if t.stride() == ref.stride() or not _dense(ref):
        return t
    return torch.empty_like(ref).copy_(t)


def _rebased(g: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`g` (a fresh op output over a contiguous buffer of `like`'s size) restrided in place as contiguous `like`.

    In place (`as_strided_` on a tensor that is no view stays no view) rather than as a view: a custom op may not
    return views (ops clones those).
    """
    return g.as_strided_(like.shape, like.stride())


def _dense(t: torch.Tensor) -> bool:
    """Non-overlapping and dense (a permutation of a contiguous tensor): `empty_like` keeps such strides."""
    expected = 1
    for stride, size in sorted((st, n) for n, st in zip(t.shape, t.stride(), strict=True) if n != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None, spec: AttnSpec,
        is_causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """O (q's dtype and strides) and LSE (float32, natural log, -inf on rows that see no key)."""
    if bias is None:
        o, lse = _FWD(q, k, v, 0.0, is_causal, scale=spec.scale)
    else:
        o, lse = _FWD(q, k, v, 0.0, is_causal, attn_mask=_float_mask(bias, q.dtype), scale=spec.scale)
    lse = (lse if lse.dtype == torch.float32 else lse.to(torch.float32)).contiguous()  # it is (B, Sq, H)-strided
    if o.stride() != q.stride():  # the op allocates O like q (torch 2.13); `_like` where it does not
        o = _like(o, q)
    if bias is not None:
        empty = _empty_rows(bias, is_causal, q.shape[2], k.shape[2])
        if empty is not None:
            empty = empty.expand(lse.shape)
            lse.masked_fill_(empty, float("-inf"))
            o.masked_fill_(empty[..., None], 0.0)
    return o, lse


def bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, lse: torch.Tensor,
        bias: torch.Tensor | None, spec: AttnSpec, is_causal: bool,
        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dq, dk, dv (q's, k's, v's dtypes and strides) for a forward that `fwd` (or the blocked path) computed."""
    mask = _float_mask(bias, q.dtype)
    # the op reads P = exp(s - lse): +inf on empty rows (P = 0); it wants its accumulation type (float64 for
    # float64). A where, not nan_to_num: NaN LSEs pass through bit for bit.
    lse_in = torch.where(lse.isneginf(), float("inf"), lse)
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    if lse_in.dtype != acc:
        lse_in = lse_in.to(acc)
    B, H, Sq, D = q.shape
    H_kv, Sk, Dv = k.shape[1], k.shape[2], v.shape[3]
    if (q.is_contiguous() and k.is_contiguous() and v.is_contiguous() and H_kv == H
            and (mask is None or mask.shape[:2] == (1, 1))):
        # The op allocates its gradients (B, S, H, D)-strided and copies a (B, H, S, D) dO to that layout. With
        # (B, H) folded into its batch dim (one head each: attention is independent per (b, h)) dO already is in
        # it and the gradients come out in q's (B, H, S, D) layout: no copies (measured: 5-8% of the backward at
        # S = 1k, page faults of fresh buffers; ~15% at S = 16). The folded head dim has size 1, so every
        # element's address, and so the op's arithmetic, is the same as unfolded.
        BH = B * H  # (plain ints for the shapes: a torch.Size slice and unpacking cost ~0.4 us a view)
        grads = _BWD(do.reshape(BH, 1, Sq, Dv), q.view(BH, 1, Sq, D), k.view(BH, 1, Sk, D), v.view(BH, 1, Sk, Dv),
                     o.reshape(BH, 1, Sq, Dv), lse_in.reshape(BH, 1, Sq), 0.0, is_causal, **_mask_kw(mask),
                     scale=spec.scale)
        return _rebased(grads[0], q), _rebased(grads[1], k), _rebased(grads[2], v)
    dq, dk, dv = _BWD(do, q, k, v, o, lse_in, 0.0, is_causal, **_mask_kw(mask), scale=spec.scale)
    return _like(dq, q), _like(dk, k), _like(dv, v)


_NO_MASK: dict = {}


def _mask_kw(mask: torch.Tensor | None) -> dict:
    """The op's `attn_mask` keyword, left out when there is none (the schema parser is cheaper without it)."""
    return _NO_MASK if mask is None else {"attn_mask": mask}
