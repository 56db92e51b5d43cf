"""nn modules: a drop-in ``MultiheadAttention`` and ``replace_attention``.

``MultiheadAttention`` subclasses ``torch.nn.MultiheadAttention``: the
constructor, parameters, initialisation and ``state_dict`` keys are PyTorch's
own, so state dicts load strictly both ways; only ``forward`` runs on our
kernels. The forward is TorchScript-compatible: it calls the custom op
``torch.ops.flashattn_py.attn_fwd`` (whose autograd is registered) directly,
with the op's flat scalars built in one place (`_dense_op_scalars`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from . import ops  # noqa: F401  (registers torch.ops.flashattn_py.attn_fwd and its autograd)
from ._contract import DENSE, AttnSpec, BiasKind, op_scalar_fields, to_op_scalars
from ._validation import InputError


def _dense_op_scalars(scale: float, window_right: int, bias_kind: int,
                      dropout_p: float) -> tuple[float, int, int, int, float, int, float, int, int, int]:
    """The op's flat scalars, in `_contract.op_scalar_fields` order, for a dense call without offset or softcap.

    (scale, offset, window_left, window_right, softcap, bias_kind, dropout_p,
    seq_mode, max_seqlen_q, max_seqlen_k): what `_contract.to_op_scalars` gives for
    ``AttnSpec(scale, window_right=..., bias_kind=..., dropout_p=...)`` and the dense
    layout. TorchScript cannot splat a tuple built at run time into an op call, so
    the order is written out here once; `_check_scalar_order` (run at import) and
    the tests hold it to `to_op_scalars`.
    """
    return (scale, 0, -1, window_right, 0.0, bias_kind, dropout_p, 0, 0, 0)


def _bias_kind(bias: torch.Tensor | None) -> int:
    """`_contract.BiasKind` of a combined mask, as the op's int (TorchScript cannot use IntEnum members)."""
    if bias is None:
        return 0
    return 1 if bias.dtype == torch.bool else 2


def _check_scalar_order() -> None:
    kinds = (_bias_kind(None), _bias_kind(torch.ones(1, dtype=torch.bool)), _bias_kind(torch.ones(1)))
    if kinds != (BiasKind.NONE, BiasKind.BOOL, BiasKind.FLOAT):
        raise RuntimeError(f"modules._bias_kind {kinds} is out of step with _contract.BiasKind")
    spec = AttnSpec(scale=0.125, window_right=0, bias_kind=BiasKind.FLOAT, dropout_p=0.25)
    ours = _dense_op_scalars(0.125, 0, int(BiasKind.FLOAT), 0.25)
    if len(op_scalar_fields()) != len(ours) or ours != to_op_scalars(spec, DENSE):
        raise RuntimeError(f"modules._dense_op_scalars {ours} is out of step with _contract.to_op_scalars "
                           f"{to_op_scalars(spec, DENSE)} ({[name for name, _ in op_scalar_fields()]})")


_check_scalar_order()


def _attn_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None, scale: float,
             causal: bool, bias_kind: int, dropout_p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, H, L, hd) attention through the custom op: (out, lse). Eager and TorchScript take this one path."""
    s = _dense_op_scalars(scale, 0 if causal else -1, bias_kind, dropout_p)
    out, lse, _ = torch.ops.flashattn_py.attn_fwd(q, k, v, bias, None, None, None, s[0], s[1], s[2], s[3], s[4],
                                                  s[5], s[6], s[7], s[8], s[9])
    return out, lse


def _shape(t: torch.Tensor) -> str:
    return "(" + ", ".join([str(n) for n in t.shape]) + ")"


def _to_keep_or_bias(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """PyTorch MHA masks (bool True = masked out, or float added) -> ours (bool True = takes part, or float)."""
    if mask.dtype == torch.bool:
        return ~mask
    return mask.to(dtype)


def _as_bias(m: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if m.dtype == torch.bool:
        return torch.zeros(m.shape, dtype=dtype, device=m.device).masked_fill(~m, float("-inf"))
    return m


def _combine(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    """Both masks at once: AND of keep-masks, or the sum of biases (a bool keep-mask becomes 0 / -inf)."""
    if a is None:
        return b
    if b is None:
        return a
    if a.dtype == torch.bool and b.dtype == torch.bool:
        return a & b
    dtype = a.dtype if a.dtype != torch.bool else b.dtype
    return _as_bias(a, dtype) + _as_bias(b, dtype)


def _pad_key(mask: torch.Tensor | None) -> torch.Tensor | None:
    """One more key (bias_k or a zero key) that every query may see."""
    if mask is None or mask.shape[-1] == 1:
        return mask
    return F.pad(mask, [0, 1], value=1.0 if mask.dtype == torch.bool else 0.0)


def _in_projection(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, packed: bool,
                   w: torch.Tensor | None, w_q: torch.Tensor | None, w_k: torch.Tensor | None,
                   w_v: torch.Tensor | None, b: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The q/k/v projections exactly as torch's ``F.multi_head_attention_forward`` computes them.

    Same ``F.linear`` calls on the same (L, N, E) views (one packed product for
    self-attention, one for k/v when ``key is value``), so dtype promotion, the
    errors for mismatched dtypes and the rounding follow PyTorch's. Results are
    views with unit last stride (no copies).
    """
    b_q: torch.Tensor | None = None
    b_k: torch.Tensor | None = None
    b_v: torch.Tensor | None = None
    if packed:
        if w is None:
            raise InputError("in_proj_weight is None but the module packs its q/k/v projections")
        E = query.shape[-1]
        if key is value:
            if query is key:
                q, k, v = F.linear(query, w, b).chunk(3, dim=-1)
                return q, k, v
            w_q, w_kv = w.split([E, E * 2])
            b_kv: torch.Tensor | None = None
            if b is not None:
                b_q, b_kv = b.split([E, E * 2])
            k, v = F.linear(key, w_kv, b_kv).chunk(2, dim=-1)
            return F.linear(query, w_q, b_q), k, v
        w_q, w_k, w_v = w.chunk(3)
    if b is not None:
        b_q, b_k, b_v = b.chunk(3)
    if w_q is None or w_k is None or w_v is None:
        raise InputError("q_proj_weight, k_proj_weight and v_proj_weight must be set when kdim/vdim differ")
    return F.linear(query, w_q, b_q), F.linear(key, w_k, b_k), F.linear(value, w_v, b_v)


def _heads(t: torch.Tensor, num_heads: int, head_dim: int) -> torch.Tensor:
    """(len, N, E) -> (N, H, len, hd), a view with unit last stride."""
    return t.view(t.shape[0], t.shape[1], num_heads, head_dim).permute(1, 2, 0, 3)


class MultiheadAttention(nn.MultiheadAttention):
    """``torch.nn.MultiheadAttention`` with the attention itself on flashattn_py's kernels.

    Same arguments, parameters, ``state_dict`` and ``forward`` contract:
    ``forward(query, key, value, key_padding_mask=None, need_weights=True,
    attn_mask=None, average_attn_weights=True, is_causal=False)``, batched
    ``(L, N, E)`` (``(N, L, E)`` with ``batch_first``) or unbatched ``(L, E)``
    inputs; ``attn_mask`` ``(L, S)`` or ``(N·num_heads, L, S)`` and
    ``key_padding_mask`` ``(N, S)``, boolean (True = masked out) or float (added).
    Masks are read in the kernels through broadcast strides; a key-padding mask
    alone costs an ``(N, S)`` read, never an ``(N, H, L, S)`` tensor.
    ``is_causal=True`` needs ``attn_mask`` (as in PyTorch); without a key-padding
    mask and with ``need_weights=False`` the mask is only a hint, as in PyTorch:
    it is not read (nor its shape checked) and the kernels' causal path runs.
    The projections are PyTorch's own ``F.linear`` calls on the same views, so
    mixed parameter dtypes promote (or fail) exactly as in PyTorch. Dropout
    applies in training only. The module is scriptable (``torch.jit.script``),
    alone or inside ``nn.TransformerEncoderLayer`` after `replace_attention`.

    Differences from PyTorch: ``need_weights=True`` returns the exact softmax
    weights, recomputed from the kernels' log-sum-exp (the output never takes the
    naive path); under dropout in training they are the weights before dropout.
    A query row that every mask hides gives output 0 (PyTorch's weights path
    gives NaN there).
    """

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: torch.Tensor | None = None, need_weights: bool = True,
                attn_mask: torch.Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        batched = query.dim() == 3
        if (query.dim() != 2 and query.dim() != 3) or key.dim() != query.dim() or value.dim() != query.dim():
            raise InputError(f"query, key and value must all be 2-D (unbatched) or 3-D, got {query.dim()}-D, "
                             f"{key.dim()}-D and {value.dim()}-D")
        if not batched:
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif self.batch_first:  # keep the `is` relations, as PyTorch does: they pick the projection path
            if key is value:
                if query is key:
                    query = query.transpose(1, 0)
                    key = query
                    value = query
                else:
                    query, key = query.transpose(1, 0), key.transpose(1, 0)
                    value = key
            else:
                query, key, value = query.transpose(1, 0), key.transpose(1, 0), value.transpose(1, 0)
        # from here (L, N, E) as in PyTorch's functional MHA
        L, N, E = query.shape[0], query.shape[1], query.shape[2]
        S = key.shape[0]
        if E != self.embed_dim:
            raise InputError(f"query's embedding dim must be embed_dim={self.embed_dim}, got {E}")
        if key.shape[0] != value.shape[0] or key.shape[1] != value.shape[1]:
            raise InputError(f"key and value must have the same (S, N), got {_shape(key)} and {_shape(value)}")
        if is_causal and attn_mask is None:
            raise RuntimeError("Need attn_mask if specifying the is_causal hint. You may use the Transformer module "
                               "method `generate_square_subsequent_mask` to create this mask.")
        causal_fast_path = is_causal and key_padding_mask is None and not need_weights
        if causal_fast_path:  # as in PyTorch: attn_mask is only a hint that the mask is causal; it is not read
            attn_mask = None
        H, hd = self.num_heads, self.head_dim

        q, k, v = _in_projection(query, key, value, self._qkv_same_embed_dim, self.in_proj_weight,
                                 self.q_proj_weight, self.k_proj_weight, self.v_proj_weight, self.in_proj_bias)

        keep_attn: torch.Tensor | None = None
        if attn_mask is not None:
            if attn_mask.dim() == 2:
                if attn_mask.shape[0] != L or attn_mask.shape[1] != S:
                    raise InputError(f"2-D attn_mask must be (L, S) = ({L}, {S}), got {_shape(attn_mask)}")
                keep_attn = _to_keep_or_bias(attn_mask, q.dtype).view(1, 1, L, S)
            elif attn_mask.dim() == 3:
                if attn_mask.shape[0] != N * H or attn_mask.shape[1] != L or attn_mask.shape[2] != S:
                    raise InputError(f"3-D attn_mask must be (N*num_heads, L, S) = ({N * H}, {L}, {S}), "
                                     f"got {_shape(attn_mask)}")
                keep_attn = _to_keep_or_bias(attn_mask, q.dtype).view(N, H, L, S)
            else:
                raise InputError(f"attn_mask must be 2-D or 3-D, got {attn_mask.dim()}-D")
        keep_pad: torch.Tensor | None = None
        if key_padding_mask is not None:
            if key_padding_mask.dim() != 2 or key_padding_mask.shape[0] != N or key_padding_mask.shape[1] != S:
                raise InputError(f"key_padding_mask must be (N, S) = ({N}, {S}), got {_shape(key_padding_mask)}")
            keep_pad = _to_keep_or_bias(key_padding_mask, q.dtype).view(N, 1, 1, S)

        bias_k, bias_v = self.bias_k, self.bias_v
        if bias_k is not None and bias_v is not None:
            k = torch.cat([k, bias_k.expand(1, N, E)], dim=0)
            v = torch.cat([v, bias_v.expand(1, N, E)], dim=0)
            keep_attn, keep_pad = _pad_key(keep_attn), _pad_key(keep_pad)
        q, k, v = _heads(q, H, hd), _heads(k, H, hd), _heads(v, H, hd)  # (N, H, len, hd)
        if self.add_zero_attn:
            k = torch.cat([k, torch.zeros([N, H, 1, hd], dtype=k.dtype, device=k.device)], dim=2)
            v = torch.cat([v, torch.zeros([N, H, 1, hd], dtype=v.dtype, device=v.device)], dim=2)
            keep_attn, keep_pad = _pad_key(keep_attn), _pad_key(keep_pad)

        bias = _combine(keep_attn, keep_pad)
        bias_kind = _bias_kind(bias)
        dropout_p = self.dropout if self.training else 0.0
        scale = 1.0 / math.sqrt(hd)
        out, lse = _attn_op(q, k, v, bias, scale, causal_fast_path, bias_kind, dropout_p)  # (N, H, L, hd), (N, H, L)

        # out-projection as PyTorch does it: (L·N, E) rows, then (L, N, E)
        out2d = out.permute(2, 0, 1, 3).contiguous().view(L * N, E)
        attn = F.linear(out2d, self.out_proj.weight, self.out_proj.bias).view(L, N, E)
        weights: torch.Tensor | None = None
        if need_weights:
            # exact softmax weights from the kernels' LSE: exp(scale q kᵀ + bias - lse)
            s = torch.matmul(q, k.transpose(-1, -2)).float() * scale
            if bias is not None:
                s = s.masked_fill(~bias, float("-inf")) if bias.dtype == torch.bool else s + bias.float()
            lse_safe = lse.masked_fill(torch.isneginf(lse), float("inf"))
            w = torch.exp(s - lse_safe.unsqueeze(-1)).to(q.dtype)  # (N, H, L, S')
            if average_attn_weights:
                w = w.mean(dim=1)
            if not batched:
                w = w.squeeze(0)
            weights = w
        if not batched:
            return attn.squeeze(1), weights
        if self.batch_first:
            return attn.transpose(1, 0), weights
        return attn, weights


def replace_attention(model: nn.Module) -> nn.Module:
    """Swap every ``torch.nn.MultiheadAttention`` in `model` for ours, in place; returns `model`.

    The swap changes each module's class only: parameters, buffers, hooks,
    device, dtype and any optimizer state that refers to them are untouched.
    ``nn.TransformerEncoder``/``Decoder`` and user models then run their
    attention on our kernels -- except where PyTorch's own fused inference fast
    path bypasses the module: ``nn.TransformerEncoderLayer`` in eval mode under
    ``torch.no_grad()`` (and ``nn.MultiheadAttention``-free fast paths) calls
    ``torch._transformer_encoder_layer_fwd`` with the weights directly. Turn that
    off with ``torch.backends.mha.set_fastpath_enabled(False)`` to run our
    kernels in inference too; training and anything with autograd never takes it.
    The swapped model stays scriptable with ``torch.jit.script``.
    """
    for module in model.modules():
        if type(module) is nn.MultiheadAttention:
            module.__class__ = MultiheadAttention
    return model
