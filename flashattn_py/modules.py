"""nn modules: a drop-in ``MultiheadAttention`` and ``replace_attention``.

``MultiheadAttention`` subclasses ``torch.nn.MultiheadAttention``: the
constructor, parameters, initialisation and ``state_dict`` keys are PyTorch's
own, so state dicts load strictly both ways; only ``forward`` runs on our
kernels.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .ops import BIAS_BOOL, BIAS_FLOAT, AttnSpec, flash_attention


def _to_keep_or_bias(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """PyTorch MHA masks (bool True = masked out, or float added) -> ours (bool True = takes part, or float)."""
    return ~mask if mask.dtype == torch.bool else mask.to(dtype)


def _combine(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    """Both masks at once: AND of keep-masks, or the sum of biases (a bool keep-mask becomes 0 / -inf)."""
    if a is None or b is None:
        return a if b is None else b
    if a.dtype == torch.bool and b.dtype == torch.bool:
        return a & b
    dtype = a.dtype if a.dtype != torch.bool else b.dtype

    def as_bias(m):
        return torch.zeros(m.shape, dtype=dtype, device=m.device).masked_fill(~m, float("-inf")) \
            if m.dtype == torch.bool else m
    return as_bias(a) + as_bias(b)


def _pad_key(mask: torch.Tensor | None) -> torch.Tensor | None:
    """One more key (bias_k or a zero key) that every query may see."""
    if mask is None or mask.shape[-1] == 1:
        return mask
    return F.pad(mask, (0, 1), value=True if mask.dtype == torch.bool else 0.0)


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
    ``is_causal=True`` needs ``attn_mask`` (as in PyTorch) and then runs the
    kernels' causal fast path when no key-padding mask is given and weights are
    not requested. Dropout applies in training only.

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
        if query.dim() not in (2, 3) or key.dim() != query.dim() or value.dim() != query.dim():
            raise ValueError(f"query, key and value must all be 2-D (unbatched) or 3-D, got {query.dim()}-D, "
                             f"{key.dim()}-D and {value.dim()}-D")
        if not batched:
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        # from here (L, N, E) as in PyTorch's functional MHA
        L, N, E = query.shape
        S = key.shape[0]
        if E != self.embed_dim:
            raise ValueError(f"query's embedding dim must be embed_dim={self.embed_dim}, got {E}")
        if key.shape[:2] != value.shape[:2]:
            raise ValueError(
                f"key and value must have the same (S, N), got {tuple(key.shape)} and {tuple(value.shape)}")
        if is_causal and attn_mask is None:
            raise RuntimeError("Need attn_mask if specifying the is_causal hint. You may use the Transformer module "
                               "method `generate_square_subsequent_mask` to create this mask.")
        H, hd = self.num_heads, self.head_dim

        # projections, in (N, S, E) so heads split as views: (N, H, S, hd) with unit last stride
        if self._qkv_same_embed_dim:
            w_q, w_k, w_v = self.in_proj_weight.chunk(3)
        else:
            w_q, w_k, w_v = self.q_proj_weight, self.k_proj_weight, self.v_proj_weight
        b_q, b_k, b_v = self.in_proj_bias.chunk(3) if self.in_proj_bias is not None else (None, None, None)
        q = F.linear(query.transpose(0, 1), w_q, b_q)
        k = F.linear(key.transpose(0, 1), w_k, b_k)
        v = F.linear(value.transpose(0, 1), w_v, b_v)

        keep_attn = None
        if attn_mask is not None:
            if attn_mask.dim() == 2:
                if attn_mask.shape != (L, S):
                    raise ValueError(f"2-D attn_mask must be (L, S) = {(L, S)}, got {tuple(attn_mask.shape)}")
                keep_attn = _to_keep_or_bias(attn_mask, q.dtype).view(1, 1, L, S)
            elif attn_mask.dim() == 3:
                if attn_mask.shape != (N * H, L, S):
                    raise ValueError(f"3-D attn_mask must be (N*num_heads, L, S) = {(N * H, L, S)}, "
                                     f"got {tuple(attn_mask.shape)}")
                keep_attn = _to_keep_or_bias(attn_mask, q.dtype).view(N, H, L, S)
            else:
                raise ValueError(f"attn_mask must be 2-D or 3-D, got {attn_mask.dim()}-D")
        keep_pad = None
        if key_padding_mask is not None:
            if key_padding_mask.shape != (N, S):
                raise ValueError(f"key_padding_mask must be (N, S) = {(N, S)}, got {tuple(key_padding_mask.shape)}")
            keep_pad = _to_keep_or_bias(key_padding_mask, q.dtype).view(N, 1, 1, S)
        causal_fast_path = is_causal and key_padding_mask is None and not need_weights
        if causal_fast_path:  # as in PyTorch: the mask is trusted to be the causal one
            keep_attn = None

        if self.bias_k is not None:
            k = torch.cat([k, self.bias_k.expand(N, 1, -1)], dim=1)
            v = torch.cat([v, self.bias_v.expand(N, 1, -1)], dim=1)
            keep_attn, keep_pad = _pad_key(keep_attn), _pad_key(keep_pad)
        q, k, v = (t.view(N, t.shape[1], H, hd).transpose(1, 2) for t in (q, k, v))  # (N, H, len, hd)
        if self.add_zero_attn:
            k = torch.cat([k, k.new_zeros(N, H, 1, hd)], dim=2)
            v = torch.cat([v, v.new_zeros(N, H, 1, hd)], dim=2)
            keep_attn, keep_pad = _pad_key(keep_attn), _pad_key(keep_pad)

        bias = _combine(keep_attn, keep_pad)
        bias_kind = 0 if bias is None else (BIAS_BOOL if bias.dtype == torch.bool else BIAS_FLOAT)
        dropout_p = self.dropout if self.training else 0.0
        scale = 1.0 / math.sqrt(hd)
        spec = AttnSpec(scale=scale, window_right=0 if causal_fast_path else -1, bias_kind=bias_kind,
                        dropout_p=dropout_p)
        out, lse = flash_attention(q, k, v, bias, None, spec)  # (N, H, L, hd), (N, H, L)

        attn = self.out_proj(out.transpose(1, 2).reshape(N, L, E))  # (N, L, E)
        attn = attn if (batched and self.batch_first) else attn.transpose(0, 1)
        weights = None
        if need_weights:
            # exact softmax weights from the kernels' LSE: exp(scale q kᵀ + bias - lse)
            s = torch.matmul(q, k.transpose(-1, -2)).float() * scale
            if bias is not None:
                s = s.masked_fill(~bias, float("-inf")) if bias.dtype == torch.bool else s + bias.float()
            lse_safe = torch.where(torch.isneginf(lse), torch.inf, lse)
            weights = torch.exp(s - lse_safe[..., None]).to(q.dtype)  # (N, H, L, S')
            if average_attn_weights:
                weights = weights.mean(dim=1)
            if not batched:
                weights = weights.squeeze(0)
        if not batched:
            attn = attn.squeeze(1)
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
    """
    for module in model.modules():
        if type(module) is nn.MultiheadAttention:
            module.__class__ = MultiheadAttention
    return model
