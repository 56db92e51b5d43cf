"""The reference Transformer under context parallelism: `context_parallel` and `all_reduce_gradients`."""

from __future__ import annotations

import functools
from datetime import timedelta

import torch.distributed as dist
from torch import nn

from ._comm import DEFAULT_TIMEOUT, _all_gather_ints, _check_timeout, _host_timeout, _resolve_group, _wait
from ._layouts import Layout, _check_layout, shard_positions
from ._ring import ring_attention


def all_reduce_gradients(module: nn.Module, group: dist.ProcessGroup | None = None, *,
                         timeout: timedelta | float | None = None) -> None:
    """Sum every parameter's ``.grad`` over `group` (each rank holds its tokens' share of the gradient).

    `timeout` bounds the waits on CPU gradients (gloo); on CUDA ones (NCCL) the waits
    are untimed, so the host does not block, and the process group's timeout applies.
    """
    group = _resolve_group(group)
    wait_s = _check_timeout(timeout)
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    works = [dist.all_reduce(g, group=group, async_op=True) for g in grads]
    for g, work in zip(grads, works, strict=True):
        _wait([work], _host_timeout(wait_s, g.device))


@functools.cache
def _model_classes():
    """Subclasses of the reference Transformer's self-attention and positional encoding that shard the sequence."""
    from .. import models

    # the reference's attention layer (AttentionLayer; MultiHeadAttention before the rename)
    layer_cls = getattr(models, "AttentionLayer", None) or models.MultiHeadAttention

    class RingSelfAttention(layer_cls):
        """Self-attention over the context-parallel group's whole sequence (`ring_attention`)."""

        cp_group: dist.ProcessGroup | None
        cp_layout: str

        def forward(self, x, context=None, causal=False, key_padding_mask=None):
            if context is not None or key_padding_mask is not None:
                raise ValueError("context parallelism covers self-attention without key_padding_mask only")
            if self.training and self.dropout > 0:
                raise ValueError("ring_attention has no attention dropout; set the model's dropout to 0")
            B, T, C = x.shape
            H = self.n_heads
            q, k, v = (proj(x).view(B, T, H, C // H).transpose(1, 2) for proj in (self.q_proj, self.k_proj,
                                                                                   self.v_proj))
            y = ring_attention(q, k, v, group=self.cp_group, causal=causal, layout=self.cp_layout)
            return self.out_proj(y.transpose(1, 2).reshape(B, T, C))

    class ShardedPositionalEncoding(models.SinusoidalPositionalEncoding):
        """Adds the encodings of the shard's global positions (the sequence length is all-gathered)."""

        cp_group: dist.ProcessGroup | None
        cp_layout: str

        def forward(self, x):
            group = _resolve_group(self.cp_group)
            lengths = _all_gather_ints([x.shape[1]], group, x.device, DEFAULT_TIMEOUT)[:, 0].tolist()
            pos = shard_positions(sum(lengths), dist.get_rank(group), len(lengths), self.cp_layout, x.device)
            return x + self.pe[pos].to(x.dtype)

    return layer_cls, models.SinusoidalPositionalEncoding, RingSelfAttention, ShardedPositionalEncoding


def context_parallel(model: nn.Module, group: dist.ProcessGroup | None = None, *,
                     layout: Layout = "zigzag") -> nn.Module:
    """Run a reference Transformer (`flashattn_py.models`, e.g. ``GPT``) context-parallel over `group`, in place.

    Every self-attention layer (``models.AttentionLayer``) computes `ring_attention` over the
    group and every `SinusoidalPositionalEncoding` adds the encodings of the
    shard's global positions; the parameters are untouched. Feed each rank its
    shard of the tokens, ``shard_sequence(idx, rank, world, layout, dim=1)``, take
    the loss as the sum over local tokens divided by the global token count, and
    call `all_reduce_gradients` after ``backward()``: loss and gradients are then
    those of one process on the whole sequence. Returns the model.
    """
    layout = _check_layout(layout)
    _resolve_group(group)
    layer_cls, encoding_cls, ring_cls, pe_cls = _model_classes()
    for m in model.modules():
        if type(m) in (layer_cls, ring_cls):
            m.__class__ = ring_cls
        elif type(m) in (encoding_cls, pe_cls):
            m.__class__ = pe_cls
        else:
            continue
        m.cp_group, m.cp_layout = group, layout
    return model
