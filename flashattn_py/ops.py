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

__all__ = ["AttnSpec", "BiasKind", "DENSE", "SeqLayout", "SeqMode", "attn_bwd", "attn_fwd", "decode_attention",
           "flash_attention", "interpreter_active", "launch_counts", "multiprocessors", "uses_triton"]


def attn_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None,
             alibi: torch.Tensor | None, spec: AttnSpec, seq: SeqLayout = DENSE,
             num_splits: int = 1, seed: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward on the backend `q` selects. Handles empty problems without launching anything.

    With dropout, `seed` is the call's Philox key (`new_seed`): the kernels read it on the
    device; the PyTorch backend takes its value (a host read, on the CPU no sync).
    """
    _, H, Sq, _ = q.shape
    B = seq.batch if seq.mode == SeqMode.PACKED else q.shape[0]
    Sk = k.shape[2] if seq.block_table is None else seq.block_table.shape[1] * k.shape[2]
    if B * H * Sq == 0 or Sk == 0:  # nothing to compute; rows with no key give 0 and -inf
        lse_shape = (H, Sq) if seq.mode == SeqMode.PACKED else (q.shape[0], H, Sq)
        return (torch.zeros_like(q), torch.full(lse_shape, float("-inf"), device=q.device, dtype=torch.float32))
    if uses_triton(q):
        if not q.is_cuda and not virtual_gpu_active():
            _interpreter.check_dtype(q.dtype)
        return triton_fwd(q, k, v, bias, alibi, spec, seq, num_splits, seed)
    return _torch_backend.attn_fwd(q, k, v, bias, alibi, _with_seed_value(spec, seed), seq)


def attn_bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
             lse: torch.Tensor, dlse: torch.Tensor | None, bias: torch.Tensor | None, alibi: torch.Tensor | None,
             need_dbias: bool, spec: AttnSpec, seq: SeqLayout = DENSE, seed: torch.Tensor | None = None,
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Backward on the backend `q` selects: dq, dk, dv and (if asked) dbias in float32; `seed` the forward's."""
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
        return triton_bwd(do, q, k, v, o, lse, dlse, bias, alibi, need_dbias, spec, seq, seed)
    return _torch_backend.attn_bwd(do, q, k, v, o, lse, dlse, bias, alibi, need_dbias,
                                   _with_seed_value(spec, seed), seq)


def new_seed(q: torch.Tensor, dropout_p: float) -> torch.Tensor:
    """A fresh Philox key for one call: int64 ``(1,)`` on q's device with dropout, ``(0,)`` without.

    Drawn on the device by torch's generator for it (``torch.manual_seed`` reproduces a run)
    and never read on the host: a CUDA graph that captures the call replays the draw with
    the graph-safe generator state, so every replay gets a fresh key, and a compiled step
    draws one per run. The backward takes the forward's key as a tensor.
    """
    if dropout_p == 0:
        return torch.empty(0, dtype=torch.int64, device=q.device)
    return torch.randint(0, 2**62, (1,), dtype=torch.int64, device=q.device)


def _with_seed_value(spec: AttnSpec, seed: torch.Tensor | None) -> AttnSpec:
    """The spec with the seed's value, for the PyTorch backend, which seeds a CPU generator with it."""
    if spec.dropout_p == 0 or seed is None or is_fake(seed):
        return spec
    return dataclasses.replace(spec, seed=int(seed.item()))


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


def _forward(q, k, v, bias, alibi, spec: AttnSpec, seq: SeqLayout):
    """(O in q's layout, LSE, the call's seed or None without dropout): what both routes compute."""
    seed = new_seed(q, spec.dropout_p) if spec.dropout_p > 0 else None
    mode = seq.mode
    o, lse = attn_fwd(_as_kernel_layout(q, mode), _as_kernel_layout(k, mode), _as_kernel_layout(v, mode), bias,
                      alibi, spec, seq, seed=seed)
    return _fresh(_from_kernel_layout(o, mode)), lse, seed


def _backward(do, q, k, v, o, lse, dlse, bias, alibi, seed, need_dbias: bool, spec: AttnSpec, seq: SeqLayout):
    if do is None:  # only the LSE was used downstream
        do = torch.zeros_like(o)
    dq, dk, dv, dbias = attn_bwd(*(_as_kernel_layout(t, seq.mode) for t in (do, q, k, v, o)), lse, dlse, bias,
                                 alibi, need_dbias, spec, seq, seed)
    grads = [_fresh(_from_kernel_layout(g, seq.mode)) for g in (dq, dk, dv)]
    return grads[0], grads[1], grads[2], dbias.to(bias.dtype) if dbias is not None else None


def _attn_fwd_impl(q, k, v, bias, alibi, cu_seqlens_q, cu_seqlens_k, *scalars):
    spec, seq = from_op_scalars(scalars, cu_seqlens_q, cu_seqlens_k)
    o, lse, seed = _forward(q, k, v, bias, alibi, spec, seq)
    return o, lse, new_seed(q, 0.0) if seed is None else seed  # the op returns a tensor: (0,) without dropout


_attn_fwd_op = torch.library.custom_op("flashattn_py::attn_fwd", mutates_args=(), schema=_FWD_SCHEMA)(_attn_fwd_impl)


@_attn_fwd_op.register_fake
def _(q, k, v, bias, alibi, cu_seqlens_q, cu_seqlens_k, *scalars):
    if virtual_gpu_active():  # FakeTensorMode's CUDA tensors on a virtual GPU: run the CUDA path to the launch
        return _attn_fwd_impl(q, k, v, bias, alibi, cu_seqlens_q, cu_seqlens_k, *scalars)
    spec, seq = from_op_scalars(scalars, cu_seqlens_q, cu_seqlens_k)
    lse_shape = (q.shape[1], q.shape[0]) if seq.mode == SeqMode.PACKED else tuple(q.shape[:3])
    return (torch.empty_like(q), q.new_empty(lse_shape, dtype=torch.float32),
            q.new_empty((1 if spec.dropout_p > 0 else 0,), dtype=torch.int64))


def _attn_bwd_impl(do, q, k, v, o, lse, dlse, bias, alibi, cu_seqlens_q, cu_seqlens_k, seed, need_dbias, *scalars):
    spec, seq = from_op_scalars(scalars, cu_seqlens_q, cu_seqlens_k)
    dq, dk, dv, dbias = _backward(do, q, k, v, o, lse, dlse, bias, alibi, seed, need_dbias, spec, seq)
    return dq, dk, dv, dbias if dbias is not None else q.new_empty(0)


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


# --- decoding over a KV cache: forward only, its own op so torch.compile traces it as one node ---------------------

_DECODE_SCHEMA = (f"(Tensor q, Tensor k_cache, Tensor v_cache, Tensor seqlens_k, Tensor? block_table, "
                  f"Tensor? alibi, {_SCALARS}, int num_splits) -> Tensor")


def _attn_decode_impl(q, k_cache, v_cache, seqlens_k, block_table, alibi, *scalars_and_splits):
    *scalars, num_splits = scalars_and_splits
    spec, _ = from_op_scalars(tuple(scalars), None, None)
    seq = SeqLayout(mode=SeqMode.KV_CACHE, seqlens_k=seqlens_k, block_table=block_table)
    o, _ = attn_fwd(q, k_cache, v_cache, None, alibi, spec, seq, num_splits)
    return _fresh(o)


_attn_decode_op = torch.library.custom_op("flashattn_py::attn_decode", mutates_args=(),
                                          schema=_DECODE_SCHEMA)(_attn_decode_impl)


@_attn_decode_op.register_fake
def _(q, k_cache, v_cache, seqlens_k, block_table, alibi, *scalars_and_splits):
    if virtual_gpu_active():
        return _attn_decode_impl(q, k_cache, v_cache, seqlens_k, block_table, alibi, *scalars_and_splits)
    return torch.empty_like(q)


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, seqlens_k: torch.Tensor,
                     block_table: torch.Tensor | None, alibi: torch.Tensor | None, spec: AttnSpec,
                     num_splits: int) -> torch.Tensor:
    """Attention of q over seqlens_k[b] keys of a (paged) cache, bottom-right aligned; no gradient.

    The custom op under torch.compile, export, modes and transforms; the eager route otherwise.
    """
    with torch.no_grad():
        if _eager_route(q, k_cache, v_cache, seqlens_k, block_table, alibi):
            return _attn_decode_impl(q, k_cache, v_cache, seqlens_k, block_table, alibi,
                                     *to_op_scalars(spec, DENSE), num_splits)
        return torch.ops.flashattn_py.attn_decode(q, k_cache, v_cache, seqlens_k, block_table, alibi,
                                                  *to_op_scalars(spec, DENSE), num_splits)


# --- the eager route: the same forward and backward without the dispatcher ---------------------------------------
#
# torch.library's eager dispatch costs 2-4x a tiny kernel's time on the host. Where nothing
# can observe the difference (no tracing, no tensor subclass, no mode, no functorch transform),
# `flash_attention` calls `_forward` directly, or through an autograd.Function when a gradient
# is wanted. Everything else (torch.compile, torch.export, FakeTensorMode, opcheck, vmap, a
# TorchDispatchMode) goes through the custom op, which computes the same thing.


class _EagerAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, bias, alibi, spec, seq):
        o, lse, seed = _forward(q, k, v, bias, alibi, spec, seq)
        ctx.save_for_backward(q, k, v, o, lse, bias, alibi, seed)
        ctx.spec, ctx.seq = spec, seq
        ctx.set_materialize_grads(False)  # as the custom op's autograd: an unused O or LSE has no gradient
        return o, lse

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, do, dlse):
        q, k, v, o, lse, bias, alibi, seed = ctx.saved_tensors
        need_dbias = bias is not None and ctx.needs_input_grad[3]
        dq, dk, dv, dbias = _backward(do, q, k, v, o, lse, dlse, bias, alibi, seed, need_dbias, ctx.spec, ctx.seq)
        return dq, dk, dv, dbias if need_dbias else None, None, None, None


def _functorch_active() -> bool:
    return torch._C._functorch.peek_interpreter_stack() is not None


def _eager_route(*tensors: torch.Tensor | None) -> bool:
    """Whether a call may skip the custom op: plain tensors, outside any tracing, mode or transform."""
    if torch.compiler.is_compiling():  # first: dynamo sees a constant and traces nothing below
        return False
    if torch._C._len_torch_dispatch_stack() or torch._C._is_torch_function_mode_enabled() or _functorch_active():
        return False
    return all(t is None or type(t) is torch.Tensor for t in tensors)


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None,
                    alibi: torch.Tensor | None, spec: AttnSpec, seq: SeqLayout = DENSE,
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Differentiable attention: the custom op, or the same computation without the dispatcher (eager route).

    q, k, v are dense (B, H, S, D), or packed (total, H, D) when seq.mode is PACKED.
    Returns (O like q, LSE). The dropout seed in `spec` is ignored: each call draws its own.
    `bias` is None, a bool mask or a float bias of shape (B|1, H|1, Sq|1, Sk|1); a
    float bias that requires grad gets dBias of its own shape.
    """
    if _eager_route(q, k, v, bias, alibi, seq.cu_seqlens_q, seq.cu_seqlens_k):
        if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad
                                        or (bias is not None and bias.requires_grad)):
            return _EagerAttention.apply(q, k, v, bias, alibi, spec, seq)
        o, lse, _ = _forward(q, k, v, bias, alibi, spec, seq)
        return o, lse
    o, lse, _ = torch.ops.flashattn_py.attn_fwd(q, k, v, bias, alibi, seq.cu_seqlens_q, seq.cu_seqlens_k,
                                               *to_op_scalars(spec, seq))
    return o, lse
