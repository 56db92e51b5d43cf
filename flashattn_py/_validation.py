"""Input checks shared by the public functions. Every check runs before any kernel launch."""

from __future__ import annotations

import math
import numbers

import torch
from torch.utils.weak import WeakIdKeyDictionary

from ._launch import is_fake, virtual_gpu_active


class InputError(ValueError, RuntimeError):
    """Bad input to a public function (a shape, a value, a combination of arguments).

    A ValueError, as documented, and also a RuntimeError, which is what
    ``torch.nn.functional.scaled_dot_product_attention`` raises for invalid input:
    code that wraps torch's SDPA in ``except RuntimeError`` catches ours too.
    """


class InputTypeError(TypeError, RuntimeError):
    """An argument of the wrong type or dtype; a TypeError and, like torch's SDPA errors, a RuntimeError."""


SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
MAX_HEAD_DIM = 256

CausalArg = bool | str


_FAST_DTYPES = frozenset(SUPPORTED_DTYPES)


def _qkv_plainly_valid(q: object, k: object, v: object, allow_gqa: bool, paged: bool) -> bool:
    """The common valid case, decided in one pass (a call costs host time): every condition `check_qkv` checks.

    False means "not certainly valid", and the full check then raises the precise error (or passes)."""
    if not (isinstance(q, torch.Tensor) and isinstance(k, torch.Tensor) and isinstance(v, torch.Tensor)):
        return False
    qs, ks = q.shape, k.shape
    if len(qs) != 4 or len(ks) != 4 or v.shape != ks:
        return False
    dtype = q.dtype
    if dtype not in _FAST_DTYPES or k.dtype != dtype or v.dtype != dtype or not (q.device == k.device == v.device):
        return False
    B, H, _, D = qs
    H_kv = ks[1]
    if (not paged and ks[0] != B) or ks[3] != D or not 2 <= D <= MAX_HEAD_DIM or H_kv == 0 or H % H_kv:
        return False
    if not allow_gqa and H != H_kv:
        return False
    return q.stride(3) == 1 and k.stride(3) == 1 and v.stride(3) == 1


def check_qkv(q: object, k: object, v: object, allow_gqa: bool = True, *, paged: bool = False) -> None:
    """q (B, H, Sq, D), k and v (B, H_kv, Sk, D), H a multiple of H_kv: one dtype and device, last dim contiguous.

    paged: k and v are pools of pages (num_pages, H_kv, page_size, D), whose dim 0 is not q's batch.
    """
    if _qkv_plainly_valid(q, k, v, allow_gqa, paged):
        return
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise InputTypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise InputError(f"{name} must be 4-D (batch, heads, seqlen, head_dim), got shape {tuple(t.shape)}")
        if t.dtype not in SUPPORTED_DTYPES:
            raise InputTypeError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise InputTypeError(f"q, k and v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise InputError(f"q, k and v must be on one device, got {q.device}, {k.device}, {v.device}")
    if not paged and (q.shape[0] != k.shape[0] or q.shape[0] != v.shape[0]):
        raise InputError(
            f"q, k and v must have the same batch (dim 0), got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if k.shape[1] != v.shape[1]:
        raise InputError(f"k and v must have the same number of heads (dim 1), got {k.shape[1]} and {v.shape[1]}")
    if not allow_gqa and q.shape[1] != k.shape[1]:
        raise InputError(
            f"q, k and v must have the same number of heads (dim 1) unless enable_gqa=True, got {q.shape[1]}, "
            f"{k.shape[1]}, {v.shape[1]}")
    if (q.shape[1] % k.shape[1] != 0) if k.shape[1] else q.shape[1] != 0:
        raise InputError(
            f"q's heads (dim 1) must be a multiple of k's and v's heads (grouped-query attention), got "
            f"{q.shape[1]} and {k.shape[1]}")
    if k.shape[2] != v.shape[2]:
        raise InputError(f"k and v must have the same sequence length (dim 2), got {k.shape[2]} and {v.shape[2]}")
    head_dim = q.shape[3]
    if k.shape[3] != head_dim or v.shape[3] != head_dim:
        raise InputError(
            f"q, k and v must have the same head_dim (dim 3), got {head_dim}, {k.shape[3]}, {v.shape[3]}")
    if not 1 <= head_dim <= MAX_HEAD_DIM:
        raise InputError(f"head_dim (dim 3) must be in 1..{MAX_HEAD_DIM}, got {head_dim}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if head_dim > 1 and t.stride(3) != 1:
            raise InputError(
                f"{name} must have stride 1 in its last dim (got strides {t.stride()}); "
                f"call .contiguous() on it first")


def check_causal(causal: object) -> bool | str:
    """False | True | 'top_left' | 'bottom_right' -> False, 'top_left' or 'bottom_right'."""
    if isinstance(causal, bool):
        return "top_left" if causal else False
    if isinstance(causal, str):
        if causal in ("top_left", "bottom_right"):
            return causal
        raise InputError(f"causal must be a bool, 'top_left' or 'bottom_right', got {causal!r}")
    raise InputTypeError(f"causal must be a bool, 'top_left' or 'bottom_right', got {type(causal).__name__}")


def check_scale(scale: object, head_dim: int) -> float:
    """None -> 1/sqrt(head_dim); otherwise a finite real number."""
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise InputTypeError(f"scale must be a float or None, got {type(scale).__name__}")
    if not math.isfinite(scale):
        raise InputError(f"scale must be finite, got {scale}")
    return float(scale)


def causal_offset(causal: bool | str, seqlen_q: int, seqlen_k: int) -> int:
    """Query i sees key j iff j <= i + offset: 0 for top-left, Sk - Sq for bottom-right."""
    return seqlen_k - seqlen_q if causal == "bottom_right" else 0


def check_dropout(dropout_p: object) -> float:
    if type(dropout_p) is float and 0.0 <= dropout_p < 1.0:  # the common case in one test (NaN fails it)
        return dropout_p
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, numbers.Real):
        raise InputTypeError(f"dropout_p must be a float, got {type(dropout_p).__name__}")
    if not 0.0 <= dropout_p < 1.0:
        raise InputError(f"dropout_p must be in [0, 1), got {dropout_p}")
    return float(dropout_p)


def check_window(window: object, causal: bool) -> tuple[int, int]:
    """(left, right) with -1 = unbounded; causal forces right = 0."""
    if type(window) is tuple and len(window) == 2 and type(window[0]) is int and type(window[1]) is int \
            and window == (-1, -1):
        return (-1, 0) if causal else (-1, -1)  # the default, without the general checks
    if (not isinstance(window, (tuple, list)) or len(window) != 2
            or not all(isinstance(w, int) and not isinstance(w, bool) for w in window)):
        raise InputTypeError(f"window must be a (left, right) pair of ints, got {window!r}")
    left, right = window
    for side, w in (("left", left), ("right", right)):
        if w < -1:
            raise InputError(f"window {side} must be >= 0, or -1 for unbounded, got {w}")
    if causal:
        right = 0 if right == -1 else min(right, 0)
    return left, right


def check_softcap(softcap: object) -> float:
    if type(softcap) is float and 0.0 <= softcap < math.inf:  # the common case in one test (NaN fails it)
        return softcap
    if isinstance(softcap, bool) or not isinstance(softcap, numbers.Real):
        raise InputTypeError(f"softcap must be a float, got {type(softcap).__name__}")
    if not math.isfinite(softcap) or softcap < 0:
        raise InputError(f"softcap must be a finite number >= 0 (0 = off), got {softcap}")
    return float(softcap)


def check_alibi(slopes: object, batch: int, heads: int, device: torch.device) -> torch.Tensor | None:
    """None, or float32 slopes of shape (H,) or (B, H) on the inputs' device."""
    if slopes is None:
        return None
    if not isinstance(slopes, torch.Tensor):
        raise InputTypeError(f"alibi_slopes must be a torch.Tensor or None, got {type(slopes).__name__}")
    if tuple(slopes.shape) not in ((heads,), (batch, heads)):
        raise InputError(f"alibi_slopes must have shape ({heads},) or ({batch}, {heads}), got {tuple(slopes.shape)}")
    if not slopes.is_floating_point():
        raise InputTypeError(f"alibi_slopes must be floating point, got {slopes.dtype}")
    if slopes.device != device:
        raise InputError(f"alibi_slopes must be on the inputs' device {device}, got {slopes.device}")
    return slopes.to(torch.float32)


def _compiling() -> bool:
    compiler = getattr(torch, "compiler", None)
    return bool(compiler is not None and hasattr(compiler, "is_compiling") and compiler.is_compiling())


def _capturing_cuda_graph(t: torch.Tensor) -> bool:
    # is_initialized() first: without a CUDA context no stream can be capturing, and asking the stream
    # would initialise CUDA (or fail on a CPU-only build)
    return t.device.type == "cuda" and torch.cuda.is_initialized() and torch.cuda.is_current_stream_capturing()


def values_unreadable(t: torch.Tensor) -> bool:
    """Whether reading ``t``'s values on the host is impossible or wrong here; then only metadata is checked.

    True under torch.compile (a read would break the graph), for a FakeTensor (FakeTensorMode,
    torch.export: the values do not exist), for a ``meta`` tensor (likewise), and for a CUDA
    tensor while the current stream captures a CUDA graph (a device-to-host sync is illegal
    during capture). Cheap: it never initialises CUDA.
    """
    return _compiling() or t.device.type == "meta" or is_fake(t) or _capturing_cuda_graph(t)


def check_cu_seqlens(cu: object, name: str, total: int, max_seqlen: object, device: torch.device) -> int:
    """Validate cumulative sequence lengths; returns the number of sequences.

    Reads the offsets on the host once per tensor object (a sync), and again after each
    in-place change to it (every time for an inference tensor, which has no version
    counter). Where the values cannot be read (`values_unreadable`: under torch.compile,
    for fake or meta tensors, during CUDA graph capture) only their dtype, shape and
    device are checked; the offsets themselves are then the caller's responsibility
    (an eager warm-up call before capture validates them).
    """
    if not isinstance(cu, torch.Tensor):
        raise InputTypeError(f"{name} must be a torch.Tensor, got {type(cu).__name__}")
    if cu.dtype != torch.int32 or cu.dim() != 1 or cu.numel() < 1:
        raise InputError(f"{name} must be a 1-D int32 tensor of B + 1 offsets, got {cu.dtype} {tuple(cu.shape)}")
    if cu.device != device:
        raise InputError(f"{name} must be on the inputs' device {device}, got {cu.device}")
    if isinstance(max_seqlen, bool) or not isinstance(max_seqlen, int) or max_seqlen < 0:
        raise InputTypeError(f"max_seqlen for {name} must be a non-negative int, got {max_seqlen!r}")
    if values_unreadable(cu):  # the dtype, shape and device checks above still hold
        return cu.numel() - 1
    # Reading the offsets is a device-to-host sync: do it once per tensor (and per in-place change of it),
    # not once per layer when a model passes the same cu_seqlens to every attention call. The cache is keyed
    # on the tensor object itself (held weakly, so the entry dies with it): a new tensor that the allocator
    # places at a freed one's address, with _version 0 again, is a different object and is read afresh.
    # An inference tensor (made under torch.inference_mode) has no version counter: in-place changes to it
    # cannot be seen, so it is read every time.
    cacheable = not cu.is_inference()
    version = (cu._version, cu.data_ptr(), cu.storage_offset(), cu.numel(), cu.stride(0)) if cacheable else None
    key = (name, total, max_seqlen)
    seen = _validated_offsets.get(cu) if cacheable else None
    if seen is not None and seen[0] == version and key in seen[1]:
        return cu.numel() - 1
    values = cu.tolist()
    if values[0] != 0 or any(b < a for a, b in zip(values, values[1:], strict=False)):
        shown = f"{values[:8]}{'...' if len(values) > 8 else ''}"
        raise InputError(f"{name} must start at 0 and never decrease, got {shown}")
    if values[-1] > total:
        raise InputError(f"{name} ends at {values[-1]} but the packed tensor has {total} rows")
    longest = max((b - a for a, b in zip(values, values[1:], strict=False)), default=0)
    if longest > max_seqlen:
        raise InputError(f"max_seqlen for {name} is {max_seqlen} but a sequence has {longest} tokens")
    if not cacheable:
        return len(values) - 1
    if seen is None or seen[0] != version or len(seen[1]) >= 16:
        seen = (version, set())
        _validated_offsets[cu] = seen
    seen[1].add(key)
    return len(values) - 1


# tensor -> (its version and layout when validated, the (name, total, max_seqlen) it was validated for);
# an id-keyed weak dictionary, since a Tensor's __eq__ is elementwise
_validated_offsets: WeakIdKeyDictionary = WeakIdKeyDictionary()


def check_kvcache(q: object, k_cache: object, v_cache: object, cache_seqlens: object, k_new: object, v_new: object,
                  block_table: object, num_splits: object, causal: object,
                  overflow: object = None) -> tuple[int, int, bool]:
    """`attention_with_kvcache`'s inputs; returns (capacity per sequence, new tokens, whether lengths were read).

    Dtypes, shapes and devices are checked first (every tensor on q's device), from
    metadata alone. The lengths in cache_seqlens are read on the host only where that
    costs no device sync and is possible: on the CPU path (no GPU target, real values)
    and when no ``overflow`` flag was passed. Then an overflowing cache is refused
    here, before anything is written, and the third result is True. Everywhere else
    (a GPU, torch.compile, fake or meta tensors, CUDA graph capture) nothing is read
    and the caller guards on the device (`attention_with_kvcache` states the contract).
    """
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise InputError(f"{name} must be a 4-D tensor")
    if k_cache.shape != v_cache.shape:
        raise InputError(f"k_cache and v_cache must have one shape, got {tuple(k_cache.shape)} and "
                         f"{tuple(v_cache.shape)}")
    B, H, _, D = q.shape
    H_kv = k_cache.shape[1]
    if block_table is not None:
        if not isinstance(block_table, torch.Tensor) or block_table.dtype != torch.int32 or block_table.dim() != 2 \
                or block_table.shape[0] != B:
            raise InputError(f"block_table must be an int32 ({B}, max_pages) tensor")
        capacity = block_table.shape[1] * k_cache.shape[2]
        check_qkv(q, k_cache, v_cache, paged=True)  # no views: slicing a fake CUDA tensor needs CUDA
    else:
        capacity = k_cache.shape[2]
        check_qkv(q, k_cache, v_cache)
    if not isinstance(cache_seqlens, torch.Tensor) or cache_seqlens.dtype != torch.int32 \
            or tuple(cache_seqlens.shape) != (B,):
        raise InputError(f"cache_seqlens must be an int32 tensor of shape ({B},)")
    if cache_seqlens.device != q.device:
        raise InputError(f"cache_seqlens must be on q's device {q.device}, got {cache_seqlens.device}")
    if block_table is not None and block_table.device != q.device:
        raise InputError(f"block_table must be on q's device {q.device}, got {block_table.device}")
    if (k_new is None) != (v_new is None):
        raise InputError("k_new and v_new must be given together")
    S_new = 0
    if k_new is not None:
        if k_new.shape != v_new.shape or k_new.dim() != 4 or k_new.shape[:2] != (B, H_kv) or k_new.shape[3] != D:
            raise InputError(f"k_new and v_new must be ({B}, {H_kv}, S_new, {D}), got {tuple(k_new.shape)} and "
                             f"{tuple(v_new.shape)}")
        if k_new.dtype != k_cache.dtype or v_new.dtype != k_cache.dtype:
            raise InputTypeError(f"k_new and v_new must match the cache's dtype {k_cache.dtype}, got {k_new.dtype} "
                                 f"and {v_new.dtype}")
        if k_new.device != q.device or v_new.device != q.device:
            raise InputError(f"k_new and v_new must match the cache's device {q.device}, got {k_new.device} and "
                             f"{v_new.device}")
        S_new = k_new.shape[2]
        if S_new > capacity:
            raise InputError(f"the cache holds {capacity} tokens per sequence; {S_new} new tokens (k_new) cannot fit")
    if overflow is not None:
        if not isinstance(overflow, torch.Tensor) or overflow.dtype != torch.bool or tuple(overflow.shape) != (B,):
            raise InputError(f"overflow must be a bool tensor of shape ({B},), got "
                             f"{getattr(overflow, 'dtype', type(overflow).__name__)} "
                             f"{tuple(getattr(overflow, 'shape', ()))}")
        if overflow.device != q.device:
            raise InputError(f"overflow must be on q's device {q.device}, got {overflow.device}")
    read = overflow is None and not q.is_cuda and not values_unreadable(cache_seqlens) and not virtual_gpu_active()
    if read:  # host memory: reading costs no sync, and refuses an overflowing cache before anything is written
        lengths = cache_seqlens.tolist()
        if min(lengths, default=0) < 0 or max(lengths, default=0) + S_new > capacity:
            raise InputError(f"the cache holds {capacity} tokens per sequence; cache_seqlens {lengths[:8]} + "
                             f"{S_new} new tokens does not fit")
    if isinstance(num_splits, bool) or not isinstance(num_splits, int) or num_splits < 0:
        raise InputError(f"num_splits must be an int >= 0 (0 = automatic), got {num_splits!r}")
    if not isinstance(causal, bool):
        raise InputTypeError(f"causal must be a bool (decoding is bottom-right aligned), got {causal!r}")
    return capacity, S_new, read
