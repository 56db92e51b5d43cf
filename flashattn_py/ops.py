"""Backend dispatch and the torch.library custom ops: the layer the public functions call.

Inputs reaching this module are already validated by the public functions
(``flashattn_py.attention``, ``scaled_dot_product_attention``, ...): q ``(B, H,
Sq, D)``, k and v ``(B, H_kv, Sk, D)`` with H a multiple of H_kv, one dtype and
device, last-dim stride 1, and an optional bias/mask of shape ``(B|1, H|1,
Sq|1, Sk|1)``. Nothing here checks them again.

Backend choice, per call (`attn_fwd`, `attn_bwd`):
  * CUDA tensors                                       -> Triton kernels (`_launch`)
  * CPU tensors, kernels built with TRITON_INTERPRET=1 -> the same kernels, interpreted
  * anything else (or Triton missing)                  -> `_torch_backend` (same semantics)

`flash_attention` is the differentiable entry point: one custom op
(``flashattn_py::attn_fwd``) with ``flashattn_py::attn_bwd`` registered as its
autograd, and fake implementations for shapes, dtypes and strides, so a compiled
model sees one opaque node per attention call. The ops' scalar arguments are
generated from the contract (`_contract.op_scalar_fields`).
"""

from __future__ import annotations

import dataclasses

import torch

from . import _interpreter, _torch_backend
from ._contract import (
    DENSE,
    AttnSpec,
    BiasKind,
    SeqLayout,
    SeqMode,
    from_op_scalars,
    op_scalar_fields,
    to_op_scalars,
)
from ._launch import (
    interpreter_active,
    is_fake,
    launch_counts,
    multiprocessors,
    triton_bwd,
    triton_fwd,
    uses_triton,
    virtual_gpu_active,
)

__all__ = ["AttnSpec", "BiasKind", "DENSE", "SeqLayout", "SeqMode", "attn_bwd", "attn_fwd", "flash_attention",
           "interpreter_active", "launch_counts", "multiprocessors", "uses_triton"]


def attn_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None,
             alibi: torch.Tensor | None, spec: AttnSpec, seq: SeqLayout = DENSE,
             num_splits: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward on the backend `q` selects. Handles empty problems without launching anything."""
    _, H, Sq, _ = q.shape
    B = seq.batch if seq.mode == SeqMode.PACKED else q.shape[0]
    Sk = k.shape[2] if seq.block_table is None else seq.block_table.shape[1] * k.shape[2]
    if B * H * Sq == 0 or Sk == 0:  # nothing to compute; rows with no key give 0 and -inf
        lse_shape = (H, Sq) if seq.mode == SeqMode.PACKED else (q.shape[0], H, Sq)
        return (torch.zeros_like(q), torch.full(lse_shape, float("-inf"), device=q.device, dtype=torch.float32))
    if uses_triton(q):
        if not q.is_cuda and not virtual_gpu_active():
            _interpreter.check_dtype(q.dtype)
        return triton_fwd(q, k, v, bias, alibi, spec, seq, num_splits)
    return _torch_backend.attn_fwd(q, k, v, bias, alibi, spec, seq)


def attn_bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
             lse: torch.Tensor, dlse: torch.Tensor | None, bias: torch.Tensor | None, alibi: torch.Tensor | None,
             need_dbias: bool, spec: AttnSpec, seq: SeqLayout = DENSE,
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Backward on the backend `q` selects: dq, dk, dv and (if asked) dbias in float32."""
    _, H, Sq, _ = q.shape
    B = seq.batch if seq.mode == SeqMode.PACKED else q.shape[0]
    Sk = k.shape[2]
    if B * H * Sq == 0 or Sk == 0:
        dbias = torch.zeros(bias.shape, device=q.device, dtype=torch.float32) if need_dbias else None
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v), dbias
    if do.stride(-1) != 1:  # e.g. the expanded gradient of out.sum()
        do = do.contiguous()
    if uses_triton(q):
        if not q.is_cuda and not virtual_gpu_active():
            _interpreter.check_dtype(q.dtype)
        return triton_bwd(do, q, k, v, o, lse, dlse, bias, alibi, need_dbias, spec, seq)
    return _torch_backend.attn_bwd(do, q, k, v, o, lse, dlse, bias, alibi, need_dbias, spec, seq)


# --- torch.library custom ops: what torch.compile sees -------------------------------------------------------------
#
# q, k, v come in their native layout: dense (B, H, S, D), or packed (total, H, D)
# when seq_mode is PACKED. The dropout seed is drawn inside the forward (so tracing
# needs no .item()) and returned for the backward. The scalar arguments (the spec,
# then the packed layout's mode and lengths) are generated from the contract.

_SCALARS = ", ".join(f"{kind} {name}" for name, kind in op_scalar_fields())
_N_SCALARS = len(op_scalar_fields())
_FWD_SCHEMA = (f"(Tensor q, Tensor k, Tensor v, Tensor? bias, Tensor? alibi, Tensor? cu_seqlens_q, "
               f"Tensor? cu_seqlens_k, {_SCALARS}) -> (Tensor, Tensor, Tensor)")
_BWD_SCHEMA = (f"(Tensor do, Tensor q, Tensor k, Tensor v, Tensor o, Tensor lse, Tensor? dlse, Tensor? bias, "
               f"Tensor? alibi, Tensor? cu_seqlens_q, Tensor? cu_seqlens_k, Tensor seed, bool need_dbias, "
               f"{_SCALARS}) -> (Tensor, Tensor, Tensor, Tensor)")


def _as_kernel_layout(t: torch.Tensor | None, seq_mode: int) -> torch.Tensor | None:
    """Packed (total, H, D) -> the (1, H, total, D) view the kernels take; dense tensors as they are."""
    return t.unsqueeze(0).transpose(1, 2) if t is not None and seq_mode == SeqMode.PACKED else t


def _from_kernel_layout(t: torch.Tensor, seq_mode: int) -> torch.Tensor:
    return t.transpose(1, 2).select(0, 0) if seq_mode == SeqMode.PACKED else t


def _fresh(t: torch.Tensor) -> torch.Tensor:
    """A custom op returns tensors that are not views: the base itself when the view covers it exactly."""
    base = t._base
    if base is None:
        return t
    if base.shape == t.shape and base.stride() == t.stride() and t.storage_offset() == base.storage_offset():
        return base
    return t.clone()


def _draw_seed(dropout_p: float) -> int:
    """A fresh Philox key from torch's CPU generator, so torch.manual_seed reproduces dropout.

    Drawn outside any tensor mode: under FakeTensorMode the generator still advances and the
    key is a real number (the one host value the forward reads; it is a CPU tensor, no sync).
    """
    if dropout_p == 0:
        return 0
    with torch.utils._python_dispatch._disable_current_modes():
        return int(torch.randint(0, 2**62, ()).item())


def _attn_fwd_impl(q, k, v, bias, alibi, cu_seqlens_q, cu_seqlens_k, *scalars):
    spec, seq = from_op_scalars(scalars, cu_seqlens_q, cu_seqlens_k)
    seed = _draw_seed(spec.dropout_p)
    spec = dataclasses.replace(spec, seed=seed)
    mode = seq.mode
    o, lse = attn_fwd(_as_kernel_layout(q, mode), _as_kernel_layout(k, mode), _as_kernel_layout(v, mode), bias,
                      alibi, spec, seq)
    return _fresh(_from_kernel_layout(o, mode)), lse, torch.tensor(seed, dtype=torch.int64)


_attn_fwd_op = torch.library.custom_op("flashattn_py::attn_fwd", mutates_args=(), schema=_FWD_SCHEMA)(_attn_fwd_impl)


@_attn_fwd_op.register_fake
def _(q, k, v, bias, alibi, cu_seqlens_q, cu_seqlens_k, *scalars):
    if virtual_gpu_active():  # FakeTensorMode's CUDA tensors on a virtual GPU: run the CUDA path to the launch
        return _attn_fwd_impl(q, k, v, bias, alibi, cu_seqlens_q, cu_seqlens_k, *scalars)
    _, seq = from_op_scalars(scalars, cu_seqlens_q, cu_seqlens_k)
    lse_shape = (q.shape[1], q.shape[0]) if seq.mode == SeqMode.PACKED else tuple(q.shape[:3])
    return (torch.empty_like(q), q.new_empty(lse_shape, dtype=torch.float32), torch.empty((), dtype=torch.int64))


def _attn_bwd_impl(do, q, k, v, o, lse, dlse, bias, alibi, cu_seqlens_q, cu_seqlens_k, seed, need_dbias, *scalars):
    spec, seq = from_op_scalars(scalars, cu_seqlens_q, cu_seqlens_k)
    if spec.dropout_p > 0 and not is_fake(seed):  # read only when there is dropout to regenerate (and a value)
        spec = dataclasses.replace(spec, seed=int(seed.item()))
    dq, dk, dv, dbias = attn_bwd(*(_as_kernel_layout(t, seq.mode) for t in (do, q, k, v, o)), lse, dlse, bias,
                                 alibi, need_dbias, spec, seq)
    grads = [_fresh(_from_kernel_layout(g, seq.mode)) for g in (dq, dk, dv)]
    dbias = dbias.to(bias.dtype) if dbias is not None else q.new_empty(0)
    return grads[0], grads[1], grads[2], dbias


_attn_bwd_op = torch.library.custom_op("flashattn_py::attn_bwd", mutates_args=(), schema=_BWD_SCHEMA)(_attn_bwd_impl)


@_attn_bwd_op.register_fake
def _(do, q, k, v, o, lse, dlse, bias, alibi, cu_seqlens_q, cu_seqlens_k, seed, need_dbias, *scalars):
    if virtual_gpu_active():
        return _attn_bwd_impl(do, q, k, v, o, lse, dlse, bias, alibi, cu_seqlens_q, cu_seqlens_k, seed, need_dbias,
                              *scalars)
    dbias = torch.empty(bias.shape, dtype=bias.dtype, device=bias.device) if need_dbias else q.new_empty(0)
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), dbias


def _fwd_setup_context(ctx, inputs, output):
    q, k, v, bias, alibi, cu_q, cu_k, *scalars = inputs
    o, lse, seed = output
    ctx.save_for_backward(q, k, v, o, lse, bias, alibi, cu_q, cu_k, seed)
    ctx.scalars = scalars


def _fwd_backward(ctx, do, dlse, _dseed):
    q, k, v, o, lse, bias, alibi, cu_q, cu_k, seed = ctx.saved_tensors
    need_dbias = bias is not None and ctx.needs_input_grad[3]
    if do is None:  # only the LSE was used downstream
        do = torch.zeros_like(o)
    dq, dk, dv, dbias = torch.ops.flashattn_py.attn_bwd(do, q, k, v, o, lse, dlse, bias, alibi, cu_q, cu_k, seed,
                                                        need_dbias, *ctx.scalars)
    return (dq, dk, dv, dbias if need_dbias else None) + (None,) * (3 + _N_SCALARS)


torch.library.register_autograd("flashattn_py::attn_fwd", _fwd_backward, setup_context=_fwd_setup_context)


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None,
                    alibi: torch.Tensor | None, spec: AttnSpec, seq: SeqLayout = DENSE,
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Differentiable attention through the custom op.

    q, k, v are dense (B, H, S, D), or packed (total, H, D) when seq.mode is PACKED.
    Returns (O like q, LSE). The dropout seed in `spec` is ignored: each call draws its own.
    `bias` is None, a bool mask or a float bias of shape (B|1, H|1, Sq|1, Sk|1); a
    float bias that requires grad gets dBias of its own shape.
    """
    o, lse, _ = torch.ops.flashattn_py.attn_fwd(q, k, v, bias, alibi, seq.cu_seqlens_q, seq.cu_seqlens_k,
                                               *to_op_scalars(spec, seq))
    return o, lse
