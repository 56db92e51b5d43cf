"""Kernel launchers, backend dispatch and the autograd function.

Inputs reaching this module are already validated by the public functions
(``flashattn_py.attention``, ``scaled_dot_product_attention``): q ``(B, H, Sq, D)``,
k and v ``(B, H_kv, Sk, D)`` with H a multiple of H_kv, one dtype and device,
last-dim stride 1, and an optional bias/mask of shape ``(B|1, H|1, Sq|1, Sk|1)``.
Nothing here checks again.

Backend choice, per call:
  * CUDA tensors                                -> Triton kernels
  * CPU tensors, kernels built with TRITON_INTERPRET=1 -> the same kernels, interpreted
  * anything else (or Triton missing)           -> ``_torch_backend`` (same semantics)
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType

import torch

from . import _config, _torch_backend

try:  # Triton is a Linux-only dependency; elsewhere only the torch backend exists
    import triton
    from triton.runtime.errors import OutOfResources
except ImportError:  # pragma: no cover - exercised only where triton is absent
    triton = None
    OutOfResources = RuntimeError

# How many times each Triton kernel was launched in this process: tests read it to
# prove the kernels (not the torch backend) produced a result.
launch_counts: Counter[str] = Counter()

_LOG2E = math.log2(math.e)
_kernels: ModuleType | None = None
_chosen_config: dict[tuple, _config.KernelConfig] = {}


def _get_kernels() -> ModuleType | None:
    """Import the kernels on first use, so TRITON_INTERPRET set after `import flashattn_py` still counts."""
    global _kernels
    if _kernels is None and triton is not None:
        from . import kernels

        _kernels = kernels
    return _kernels


def interpreter_active() -> bool:
    """True when the kernels were (or will be) built for Triton's CPU interpreter."""
    kernels = _get_kernels()
    if kernels is None:
        return False
    return type(kernels._attn_fwd).__name__ == "InterpretedFunction"


def uses_triton(t: torch.Tensor) -> bool:
    """Whether attention on tensors like `t` runs the Triton kernels."""
    if triton is None or t.dtype == torch.float64:  # float64 is the torch backend's alone
        return False
    if t.is_cuda:
        return not interpreter_active()
    if t.device.type == "cpu":
        return interpreter_active()
    return False


def _dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs multiply in IEEE fp32 unless the user allowed TF32 for matmuls."""
    if dtype != torch.float32:
        return "tf32"  # ignored by tl.dot for 16-bit inputs
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        allow_tf32 = torch.backends.cuda.matmul.allow_tf32
    return "tf32" if allow_tf32 else "ieee"


def _capability(t: torch.Tensor) -> tuple[int, int]:
    return torch.cuda.get_device_capability(t.device) if t.is_cuda else (0, 0)


def _block_d(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))


def _launch(name: str, kernel, args: tuple, grid: Callable[[_config.KernelConfig], tuple],
            constexprs: Callable[[_config.KernelConfig], dict], configs: list[_config.KernelConfig],
            cache_key: tuple) -> None:
    """Launch `kernel` with the first of `configs` that fits this GPU, and remember that config.

    `constexprs(cfg)` gives the kernel's compile-time arguments for a config
    (block sizes and the EVEN_* flags that depend on them).
    """
    key = (name, *cache_key)
    candidates = [_chosen_config[key]] if key in _chosen_config else configs
    last_error: Exception | None = None
    for cfg in candidates:
        try:
            kernel[grid(cfg)](*args, **constexprs(cfg), num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        except OutOfResources as err:  # too much shared memory / registers: try a smaller tile
            last_error = err
            continue
        _chosen_config[key] = cfg
        launch_counts[name] += 1
        return
    raise RuntimeError(f"flashattn_py: no launch configuration of {name} fits this GPU") from last_error


def _configs(kind: str, q: torch.Tensor, block_d: int) -> list[_config.KernelConfig]:
    if not q.is_cuda:
        return [{"fwd": _config.INTERPRETER_FWD, "dkdv": _config.INTERPRETER_DKDV,
                 "dq": _config.INTERPRETER_DQ}[kind]]
    table = {"fwd": _config.fwd_configs, "dkdv": _config.dkdv_configs, "dq": _config.dq_configs}[kind]
    return table(block_d, q.element_size(), _capability(q))


def _bhs_strides(t: torch.Tensor) -> tuple[int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2)


@dataclass(frozen=True)
class AttnSpec:
    """Everything about one attention call except its tensors.

    Query i sees key j iff i + offset - window_left <= j <= i + offset + window_right
    (-1 = no bound on that side; causal is window_right = 0). softcap > 0 applies
    c * tanh(s / c) to the scores. bias_kind: 0 none, 1 boolean mask (True = take
    part), 2 additive float bias. Dropout keeps each probability with chance
    1 - dropout_p, from a Philox stream keyed by `seed`.
    """

    scale: float
    offset: int = 0
    window_left: int = -1
    window_right: int = -1
    softcap: float = 0.0
    bias_kind: int = 0
    dropout_p: float = 0.0
    seed: int = 0


@dataclass(frozen=True)
class SeqLayout:
    """How sequences sit in the q/k/v tensors.

    mode 0: dense (B, H, S, D). mode 1: packed sequences, q/k/v given as
    (1, H, total, D) views with cu_seqlens_q/k (int32, B + 1) and the longest
    lengths; alignment is bottom-right per sequence. mode 2: a KV cache with
    seqlens_k (int32, B) valid keys per sequence, optionally paged through
    block_table (int32, B x pages); bottom-right aligned.
    """

    mode: int = 0
    cu_seqlens_q: torch.Tensor | None = None
    cu_seqlens_k: torch.Tensor | None = None
    max_seqlen_q: int = 0
    max_seqlen_k: int = 0
    seqlens_k: torch.Tensor | None = None
    block_table: torch.Tensor | None = None

    @property
    def batch(self) -> int:
        return self.cu_seqlens_q.numel() - 1


DENSE = SeqLayout()
BIAS_NONE, BIAS_BOOL, BIAS_FLOAT = 0, 1, 2


def _bias_args(bias: torch.Tensor | None, q: torch.Tensor, k: torch.Tensor) -> tuple:
    """(tensor, 4 strides) for the kernels: broadcast dims get stride 0; no bias -> q and zeros."""
    if bias is None:
        return (q, 0, 0, 0, 0)
    full = bias.expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    if full.dtype == torch.bool:
        full = full.view(torch.uint8)  # same bytes; Triton loads it as integers
    return (full, *full.stride())


def _alibi_args(alibi: torch.Tensor | None, q: torch.Tensor) -> tuple:
    """(slopes, stride_b, stride_h): (H,) slopes broadcast over the batch with stride 0."""
    if alibi is None:
        return (q, 0, 0)
    if alibi.dim() == 1:
        return (alibi, 0, alibi.stride(0))
    return (alibi, alibi.stride(0), alibi.stride(1))


def _score_args(spec: AttnSpec) -> tuple[float, float]:
    """(qk_scale, softcap_log2) as the kernels' _score_mods wants them."""
    if spec.softcap > 0:
        return spec.scale / spec.softcap, spec.softcap * _LOG2E
    return spec.scale * _LOG2E, 0.0


def _features(spec: AttnSpec, alibi: torch.Tensor | None) -> dict:
    return dict(HAS_LEFT=spec.window_left >= 0, HAS_RIGHT=spec.window_right >= 0, SOFTCAP=spec.softcap > 0,
                ALIBI_ON=alibi is not None, BIAS_KIND=spec.bias_kind, DROPOUT=spec.dropout_p > 0)


def triton_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None,
               alibi: torch.Tensor | None, spec: AttnSpec, seq: SeqLayout = DENSE,
               num_splits: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """O and LSE (natural log, float32) from the forward kernel.

    Dense: O like q, LSE (B, H, Sq). Packed (seq.mode 1, q/k/v as (1, H, total, D)
    views): O (1, H, total, D) view of a packed (total, H, D) tensor, LSE (H, total).
    num_splits > 1 (KV cache): partial results merged here by their LSE.
    """
    kernels = _get_kernels()
    _, H, Sq, D = q.shape
    packed = seq.mode == 1
    B = seq.batch if packed else q.shape[0]
    max_q = seq.max_seqlen_q if packed else Sq
    seqlen_k = k.shape[2] if seq.block_table is None else seq.block_table.shape[1] * k.shape[2]
    block_d = _block_d(D)
    bias_t, *bias_strides = _bias_args(bias, q, k)
    alibi_t, *alibi_strides = _alibi_args(alibi, q)
    qk_scale, softcap_log2 = _score_args(spec)
    if packed:
        o = torch.empty_like(q.transpose(1, 2)[0]).unsqueeze(0).transpose(1, 2)  # packed (total, H, D) underneath
        lse = torch.empty((H, Sq), device=q.device, dtype=torch.float32)
        o_strides, lse_strides = (0, 0, o.stride(1), o.stride(2)), (0, 0, Sq)
    elif num_splits > 1:
        o = torch.empty((num_splits, B, H, Sq, D), device=q.device, dtype=torch.float32)
        lse = torch.empty((num_splits, B, H, Sq), device=q.device, dtype=torch.float32)
        o_strides, lse_strides = o.stride()[:4], lse.stride()[:3]
    else:
        o = torch.empty_like(q)
        lse = torch.empty((B, H, Sq), device=q.device, dtype=torch.float32)
        o_strides, lse_strides = (0, *o.stride()[:3]), (0, *lse.stride()[:2])
    q_strides = (0, q.stride(1), q.stride(2)) if packed else _bhs_strides(q)
    k_strides = (0, k.stride(1), k.stride(2)) if packed else _bhs_strides(k)
    v_strides = (0, v.stride(1), v.stride(2)) if packed else _bhs_strides(v)
    table = seq.block_table if seq.block_table is not None else q
    table_strides = seq.block_table.stride() if seq.block_table is not None else (0, 0)
    cu_q = seq.cu_seqlens_q if packed else q
    cu_k = seq.cu_seqlens_k if packed else q
    seqlens_k = seq.seqlens_k if seq.seqlens_k is not None else q
    page_size = k.shape[2] if seq.block_table is not None else 1

    def constexprs(cfg):
        return dict(HEAD_DIM=D, BLOCK_D=block_d, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, SEQ_MODE=seq.mode,
                    PAGED=seq.block_table is not None, EVEN_M=not packed and Sq % cfg.block_m == 0,
                    EVEN_D=block_d == D, DOT_PRECISION=_dot_precision(q.dtype), **_features(spec, alibi))

    configs = _configs("fwd", q, block_d)
    if seq.mode == 2 and q.is_cuda and Sq <= 16:  # decoding: do not spend a 128-row tile on one query
        configs = _config.decode_configs(block_d, q.element_size(), _capability(q))
    if num_splits > 1:  # split boundaries must fall on key blocks: keep one BLOCK_N
        configs = [c for c in configs if c.block_n == configs[0].block_n]
        split_len = triton.cdiv(triton.cdiv(seqlen_k, num_splits), configs[0].block_n) * configs[0].block_n
    else:
        split_len = max(seqlen_k, 1)
    with _device_of(q):
        _launch("attn_fwd", kernels._attn_fwd,
                (q, k, v, o, lse, bias_t, alibi_t, cu_q, cu_k, seqlens_k, table,
                 *q_strides, *k_strides, *v_strides, *o_strides, *lse_strides, *bias_strides, *alibi_strides,
                 *table_strides, H, H // k.shape[1], Sq, seqlen_k, spec.offset, spec.window_left, spec.window_right,
                 qk_scale, softcap_log2, spec.dropout_p, spec.seed, page_size, split_len),
                lambda c: (triton.cdiv(max_q, c.block_m), B * H, max(num_splits, 1)), constexprs, configs,
                (block_d, q.dtype, _capability(q), num_splits > 1, seq.mode == 2 and Sq <= 16))
    if num_splits > 1:  # flash-decoding: merge the splits by their log-sum-exp
        lse_all = torch.logsumexp(lse, dim=0)
        weights = torch.exp(lse - torch.where(torch.isneginf(lse_all), torch.inf, lse_all))
        return (weights[..., None] * o).sum(0).to(q.dtype), lse_all
    return o, lse


def triton_bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
               lse: torch.Tensor, dlse: torch.Tensor | None, bias: torch.Tensor | None, alibi: torch.Tensor | None,
               need_dbias: bool, spec: AttnSpec, seq: SeqLayout = DENSE,
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """dQ, dK, dV (like q, k, v) and dBias (bias's shape, float32) from the backward kernels."""
    kernels = _get_kernels()
    _, H, Sq, D = q.shape
    packed = seq.mode == 1
    B = seq.batch if packed else q.shape[0]
    H_kv, Sk = k.shape[1], k.shape[2]
    max_q = seq.max_seqlen_q if packed else Sq
    max_k = seq.max_seqlen_k if packed else Sk
    kv_group = H // H_kv
    block_d = _block_d(D)
    even_d = block_d == D
    precision = _dot_precision(q.dtype)
    cache_key = (block_d, q.dtype, _capability(q))
    dq, dk, dv = (torch.empty_like(t.transpose(1, 2)[0]).unsqueeze(0).transpose(1, 2) if packed
                  else torch.empty_like(t) for t in (q, k, v))
    delta = torch.empty_like(lse)
    if dlse is not None:
        dlse = dlse.contiguous()
    qk_scale, softcap_log2 = _score_args(spec)
    pre_block = _config.PREPROCESS_BLOCK_M if q.is_cuda else _config.INTERPRETER_PREPROCESS_BLOCK_M
    bias_t, *bias_strides = _bias_args(bias, q, k)
    alibi_t, *alibi_strides = _alibi_args(alibi, q)
    features = _features(spec, alibi)
    strides = [(0, t.stride(1), t.stride(2)) if packed else _bhs_strides(t) for t in (q, k, v, do, dq, dk, dv)]
    lse_strides = (0, Sq) if packed else lse.stride()[:2]
    cu_q = seq.cu_seqlens_q if packed else q
    cu_k = seq.cu_seqlens_k if packed else q
    runtime = (H, kv_group, Sq, Sk, spec.offset, spec.window_left, spec.window_right, qk_scale, softcap_log2,
               spec.scale, spec.dropout_p, spec.seed)
    pre_batch = 1 if packed else B  # the preprocess is row-wise: packed rows are one long "sequence"

    with _device_of(q):
        _launch("attn_bwd_preprocess", kernels._attn_bwd_preprocess,
                (o, do, dlse if dlse is not None else delta, delta, *_bhs_strides(o), *_bhs_strides(do), H, Sq),
                lambda cfg: (triton.cdiv(Sq, pre_block), pre_batch * H),
                lambda cfg: dict(HEAD_DIM=D, BLOCK_D=block_d, BLOCK_M=pre_block, HAS_DLSE=dlse is not None,
                                 EVEN_M=Sq % pre_block == 0, EVEN_D=even_d),
                [_config.KernelConfig(pre_block, pre_block, 4, 1)], cache_key)
        _launch("attn_bwd_dkdv", kernels._attn_bwd_dkdv,
                (q, k, v, do, lse, delta, dk, dv, bias_t, alibi_t, cu_q, cu_k, *strides[0], *strides[1],
                 *strides[2], *strides[3], *strides[5], *strides[6], *lse_strides, *bias_strides, *alibi_strides,
                 *runtime),
                lambda cfg: (triton.cdiv(max_k, cfg.block_n), B * H_kv),
                lambda cfg: dict(HEAD_DIM=D, BLOCK_D=block_d, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
                                 SEQ_MODE=seq.mode, EVEN_M=not packed and Sq % cfg.block_m == 0,
                                 EVEN_N=not packed and Sk % cfg.block_n == 0, EVEN_D=even_d,
                                 DOT_PRECISION=precision, **features),
                _configs("dkdv", q, block_d), cache_key)
        _launch("attn_bwd_dq", kernels._attn_bwd_dq,
                (q, k, v, do, lse, delta, dq, bias_t, alibi_t, cu_q, cu_k, *strides[0], *strides[1], *strides[2],
                 *strides[3], *strides[4], *lse_strides, *bias_strides, *alibi_strides, *runtime),
                lambda cfg: (triton.cdiv(max_q, cfg.block_m), B * H),
                lambda cfg: dict(HEAD_DIM=D, BLOCK_D=block_d, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
                                 SEQ_MODE=seq.mode, EVEN_M=not packed and Sq % cfg.block_m == 0, EVEN_D=even_d,
                                 DOT_PRECISION=precision, **features),
                _configs("dq", q, block_d), cache_key)
        dbias = None
        if need_dbias:
            # a bias dim of size 1 (against a larger problem dim) is summed over inside the kernel
            bcast = [bias.shape[i] == 1 and n > 1 for i, n in enumerate((B, H, Sq, Sk))]
            dbias = torch.empty(bias.shape, device=q.device, dtype=torch.float32)
            dbias_features = {name: val for name, val in features.items() if name != "BIAS_KIND"}
            _launch("attn_bwd_dbias", kernels._attn_bwd_dbias,
                    (q, k, v, do, lse, delta, bias_t, dbias, alibi_t, *strides[0], *strides[1], *strides[2],
                     *strides[3], *bias_strides, *dbias.stride(), *alibi_strides, B, H, kv_group, Sq, Sk,
                     spec.offset, spec.window_left, spec.window_right, qk_scale, softcap_log2, spec.dropout_p,
                     spec.seed),
                    lambda cfg: (1 if bcast[2] else triton.cdiv(Sq, cfg.block_m),
                                 1 if bcast[3] else triton.cdiv(Sk, cfg.block_n), dbias.shape[0] * dbias.shape[1]),
                    lambda cfg: dict(HEAD_DIM=D, BLOCK_D=block_d, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
                                     BCAST_B=bcast[0], BCAST_H=bcast[1], BCAST_M=bcast[2], BCAST_N=bcast[3],
                                     EVEN_D=even_d, DOT_PRECISION=precision, **dbias_features),
                    _configs("dq", q, block_d), cache_key)
    return dq, dk, dv, dbias


def _device_of(t: torch.Tensor):
    """Triton launches on the current CUDA device: make it the tensor's."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def attn_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None,
             alibi: torch.Tensor | None, spec: AttnSpec, seq: SeqLayout = DENSE,
             num_splits: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward on the backend `q` selects. Handles empty problems without launching anything."""
    _, H, Sq, _ = q.shape
    B = seq.batch if seq.mode == 1 else q.shape[0]
    Sk = k.shape[2] if seq.block_table is None else seq.block_table.shape[1] * k.shape[2]
    if B * H * Sq == 0 or Sk == 0:  # nothing to compute; rows with no key give 0 and -inf
        lse_shape = (H, Sq) if seq.mode == 1 else (q.shape[0], H, Sq)
        return (torch.zeros_like(q), torch.full(lse_shape, float("-inf"), device=q.device, dtype=torch.float32))
    if uses_triton(q):
        return triton_fwd(q, k, v, bias, alibi, spec, seq, num_splits)
    return _torch_backend.attn_fwd(q, k, v, bias, alibi, spec, seq)


def attn_bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
             lse: torch.Tensor, dlse: torch.Tensor | None, bias: torch.Tensor | None, alibi: torch.Tensor | None,
             need_dbias: bool, spec: AttnSpec, seq: SeqLayout = DENSE,
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Backward on the backend `q` selects: dq, dk, dv and (if asked) dbias in float32."""
    _, H, Sq, _ = q.shape
    B = seq.batch if seq.mode == 1 else q.shape[0]
    Sk = k.shape[2]
    if B * H * Sq == 0 or Sk == 0:
        dbias = torch.zeros(bias.shape, device=q.device, dtype=torch.float32) if need_dbias else None
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v), dbias
    if do.stride(-1) != 1:  # e.g. the expanded gradient of out.sum()
        do = do.contiguous()
    if uses_triton(q):
        return triton_bwd(do, q, k, v, o, lse, dlse, bias, alibi, need_dbias, spec, seq)
    return _torch_backend.attn_bwd(do, q, k, v, o, lse, dlse, bias, alibi, need_dbias, spec, seq)


class FlashAttnFunction(torch.autograd.Function):
    """Exact attention with O(S) saved state: only O and the LSE are kept for backward.

    `bias` is None, a bool mask or a float bias of shape (B|1, H|1, Sq|1, Sk|1);
    a float bias that requires grad gets dBias of its own shape. `alibi` (slopes)
    and the tensors inside `seq` are not differentiated.
    """

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None,
                alibi: torch.Tensor | None, spec: AttnSpec,
                seq: SeqLayout = DENSE) -> tuple[torch.Tensor, torch.Tensor]:
        o, lse = attn_fwd(q, k, v, bias, alibi, spec, seq)
        ctx.set_materialize_grads(False)  # an unused output (usually the LSE) then brings None, not zeros
        ctx.save_for_backward(q, k, v, o, lse, bias, alibi)
        ctx.spec, ctx.seq = spec, seq
        return o, lse

    @staticmethod
    def backward(ctx, do: torch.Tensor | None, dlse: torch.Tensor | None):
        q, k, v, o, lse, bias, alibi = ctx.saved_tensors
        if do is None:  # only the LSE was used downstream
            do = torch.zeros_like(o)
        need_dbias = bias is not None and ctx.needs_input_grad[3]
        dq, dk, dv, dbias = attn_bwd(do, q, k, v, o, lse, dlse, bias, alibi, need_dbias, ctx.spec, ctx.seq)
        if dbias is not None:
            dbias = dbias.to(bias.dtype)
        return dq, dk, dv, dbias, None, None, None


# --- torch.library custom ops: what torch.compile sees -------------------------------------------------------------
#
# One forward and one backward op, with fake (meta) implementations giving output
# shapes, dtypes and strides, and autograd registered on the forward: a compiled
# model sees a single opaque node per attention call, with no graph break. q, k, v
# come in their native layout: dense (B, H, S, D), or packed (total, H, D) when
# seq_mode is 1. The dropout seed is drawn inside the forward (so tracing needs no
# .item()) and returned for the backward.

_HAS_CUSTOM_OP = all(hasattr(torch.library, name) for name in ("custom_op", "register_fake", "register_autograd"))


def _as_4d(t: torch.Tensor | None, seq_mode: int) -> torch.Tensor | None:
    """Packed (total, H, D) -> the (1, H, total, D) view the kernels take."""
    return t.unsqueeze(0).transpose(1, 2) if t is not None and seq_mode == 1 else t


def _from_4d(t: torch.Tensor, seq_mode: int) -> torch.Tensor:
    return t.transpose(1, 2)[0] if seq_mode == 1 else t


def _unpack(cu_seqlens_q, cu_seqlens_k, scale, offset, window_left, window_right, softcap, bias_kind, dropout_p,
            seq_mode, max_seqlen_q, max_seqlen_k, seed=0) -> tuple[AttnSpec, SeqLayout]:
    spec = AttnSpec(scale=scale, offset=offset, window_left=window_left, window_right=window_right,
                    softcap=softcap, bias_kind=bias_kind, dropout_p=dropout_p, seed=seed)
    seq = DENSE if seq_mode == 0 else SeqLayout(mode=seq_mode, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
                                                max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k)
    return spec, seq


def _fresh(t: torch.Tensor) -> torch.Tensor:
    """A custom op returns tensors that are not views: the base itself when the view covers it exactly."""
    base = t._base
    if base is None:
        return t
    if base.shape == t.shape and base.stride() == t.stride() and t.storage_offset() == base.storage_offset():
        return base
    return t.clone()


def _draw_seed(dropout_p: float) -> int:
    """A fresh Philox key from torch's CPU generator, so torch.manual_seed reproduces dropout."""
    return int(torch.randint(0, 2**62, ()).item()) if dropout_p > 0 else 0


if _HAS_CUSTOM_OP:
    @torch.library.custom_op("flashattn_py::attn_fwd", mutates_args=())
    def _attn_fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None,
                     alibi: torch.Tensor | None, cu_seqlens_q: torch.Tensor | None, cu_seqlens_k: torch.Tensor | None,
                     scale: float, offset: int, window_left: int, window_right: int, softcap: float, bias_kind: int,
                     dropout_p: float, seq_mode: int, max_seqlen_q: int, max_seqlen_k: int,
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        seed = _draw_seed(dropout_p)
        spec, seq = _unpack(cu_seqlens_q, cu_seqlens_k, scale, offset, window_left, window_right, softcap, bias_kind,
                            dropout_p, seq_mode, max_seqlen_q, max_seqlen_k, seed)
        o, lse = attn_fwd(_as_4d(q, seq_mode), _as_4d(k, seq_mode), _as_4d(v, seq_mode), bias, alibi, spec, seq)
        return _fresh(_from_4d(o, seq_mode)), lse, torch.tensor(seed, dtype=torch.int64)

    @_attn_fwd_op.register_fake
    def _(q, k, v, bias, alibi, cu_seqlens_q, cu_seqlens_k, scale, offset, window_left, window_right, softcap,
          bias_kind, dropout_p, seq_mode, max_seqlen_q, max_seqlen_k):
        lse_shape = (q.shape[1], q.shape[0]) if seq_mode == 1 else (q.shape[0], q.shape[1], q.shape[2])
        return (torch.empty_like(q), q.new_empty(lse_shape, dtype=torch.float32),
                torch.empty((), dtype=torch.int64))

    @torch.library.custom_op("flashattn_py::attn_bwd", mutates_args=())
    def _attn_bwd_op(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                     lse: torch.Tensor, dlse: torch.Tensor | None, bias: torch.Tensor | None,
                     alibi: torch.Tensor | None, cu_seqlens_q: torch.Tensor | None,
                     cu_seqlens_k: torch.Tensor | None, seed: torch.Tensor, need_dbias: bool, scale: float,
                     offset: int, window_left: int, window_right: int, softcap: float, bias_kind: int,
                     dropout_p: float, seq_mode: int, max_seqlen_q: int, max_seqlen_k: int,
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        spec, seq = _unpack(cu_seqlens_q, cu_seqlens_k, scale, offset, window_left, window_right, softcap, bias_kind,
                            dropout_p, seq_mode, max_seqlen_q, max_seqlen_k, int(seed.item()))
        dq, dk, dv, dbias = attn_bwd(*(_as_4d(t, seq_mode) for t in (do, q, k, v, o)), lse, dlse, bias, alibi,
                                     need_dbias, spec, seq)
        grads = [_fresh(_from_4d(g, seq_mode)) for g in (dq, dk, dv)]
        dbias = dbias.to(bias.dtype) if dbias is not None else q.new_empty(0)
        return grads[0], grads[1], grads[2], dbias

    @_attn_bwd_op.register_fake
    def _(do, q, k, v, o, lse, dlse, bias, alibi, cu_seqlens_q, cu_seqlens_k, seed, need_dbias, *scalars):
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
        if do is None:
            do = torch.zeros_like(o)
        dq, dk, dv, dbias = torch.ops.flashattn_py.attn_bwd(do, q, k, v, o, lse, dlse, bias, alibi, cu_q, cu_k, seed,
                                                            need_dbias, *ctx.scalars)
        return (dq, dk, dv, dbias if need_dbias else None) + (None,) * (3 + len(ctx.scalars))

    torch.library.register_autograd("flashattn_py::attn_fwd", _fwd_backward, setup_context=_fwd_setup_context)


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None,
                    alibi: torch.Tensor | None, spec: AttnSpec, seq: SeqLayout = DENSE,
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Differentiable attention: the custom op where torch has them, the autograd Function otherwise.

    q, k, v are dense (B, H, S, D), or packed (total, H, D) when seq.mode == 1.
    Returns (O like q, LSE). The dropout seed in `spec` is ignored: each call draws its own.
    """
    scalars = (spec.scale, spec.offset, spec.window_left, spec.window_right, spec.softcap, spec.bias_kind,
               spec.dropout_p, seq.mode, seq.max_seqlen_q, seq.max_seqlen_k)
    if _HAS_CUSTOM_OP:
        o, lse, _ = torch.ops.flashattn_py.attn_fwd(q, k, v, bias, alibi, seq.cu_seqlens_q, seq.cu_seqlens_k,
                                                   *scalars)
        return o, lse
    from dataclasses import replace

    spec = replace(spec, seed=_draw_seed(spec.dropout_p))
    o, lse = FlashAttnFunction.apply(*(_as_4d(t, seq.mode) for t in (q, k, v)), bias, alibi, spec, seq)
    return _from_4d(o, seq.mode), lse
