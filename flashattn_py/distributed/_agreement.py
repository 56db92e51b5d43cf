"""Validation and the shape agreement: every rank's shard checked against the others' before any ring step.

The agreement is one small all_gather of each rank's shapes and options, read back
on the host, so that a rank whose shard disagrees (or whose inputs are invalid)
raises the same clear error on every rank instead of a hang. It is made once per
signature and remembered per process group (`_agreed_lengths`); see
`ring_attention`'s docstring for the contract that makes the reuse safe.
"""

from __future__ import annotations

import numbers
import struct
import weakref
from collections import OrderedDict
from datetime import timedelta

import torch
import torch.distributed as dist

from .._validation import InputError, InputTypeError, check_causal, check_scale, check_window
from ._comm import _all_gather_ints
from ._layouts import LAYOUTS, _check_layout, shard_lengths

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_MAX_HEAD_DIM = 256


def _check_options(causal: object, scale: object, return_lse: object, window: object,
                   layout: object, backward: object) -> tuple[bool, float | None, int, int, str]:
    # q and k are shards of one sequence: both causal alignments coincide
    is_causal = bool(check_causal(causal))
    scale = None if scale is None else check_scale(scale, 1)
    if not isinstance(return_lse, bool):
        raise InputTypeError(f"return_lse must be a bool, got {type(return_lse).__name__}")
    left, right = check_window(window, is_causal)
    if backward not in ("auto", "global_lse", "recompute"):
        raise InputError(f"backward must be 'auto', 'global_lse' or 'recompute', got {backward!r}")
    return is_causal, scale, left, right, _check_layout(layout)


def _check_seq_len(seq_len: object) -> int | None:
    if seq_len is None:
        return None
    if isinstance(seq_len, bool) or not isinstance(seq_len, numbers.Integral):
        raise InputTypeError(f"seq_len must be an int (the whole sequence's length) or None, got "
                             f"{type(seq_len).__name__}")
    if seq_len < 0:
        raise InputError(f"seq_len must be >= 0, got {seq_len}")
    return int(seq_len)


def _check_tensors(q: object, k: object, v: object) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be a 4-D shard (batch, heads, seqlen_local, head_dim), got shape "
                             f"{tuple(t.shape)}")
        if t.dtype not in _DTYPES:
            raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k and v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k and v must be on one device, got {q.device}, {k.device}, {v.device}")
    if q.device.type not in ("cpu", "cuda"):
        raise ValueError(f"q must be a CPU (gloo) or CUDA (nccl) tensor, got device {q.device}")
    if not (q.shape[0] == k.shape[0] == v.shape[0]):
        raise ValueError(f"q, k and v must have the same batch (dim 0), got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    if k.shape[1] != v.shape[1]:
        raise ValueError(f"k and v must have the same number of heads (dim 1), got {k.shape[1]} and {v.shape[1]}")
    if k.shape[1] == 0 or q.shape[1] % k.shape[1] != 0:
        raise ValueError(f"q's heads (dim 1) must be a multiple of k's and v's heads (grouped-query attention), got "
                         f"{q.shape[1]} and {k.shape[1]}")
    if not (q.shape[2] == k.shape[2] == v.shape[2]):
        raise ValueError(f"q, k and v must be shards of one sequence: the same local length (dim 2), got "
                         f"{q.shape[2]}, {k.shape[2]}, {v.shape[2]}")
    if not (q.shape[3] == k.shape[3] == v.shape[3]):
        raise ValueError(f"q, k and v must have the same head_dim (dim 3), got {q.shape[3]}, {k.shape[3]}, "
                         f"{v.shape[3]}")
    if not 1 <= q.shape[3] <= _MAX_HEAD_DIM:
        raise ValueError(f"head_dim (dim 3) must be in 1..{_MAX_HEAD_DIM}, got {q.shape[3]}")


# --- the agreement -------------------------------------------------------------------------------------------------

_META = ("ok", "batch", "heads", "heads_kv", "seqlen_local", "head_dim", "dtype", "device", "causal",
         "window_left", "window_right", "layout", "scale", "needs_grad", "seq_len")
_SHAPE_FIELDS = ("batch", "heads", "heads_kv", "head_dim", "dtype", "device")


def _scale_bits(scale: float) -> int:
    return struct.unpack("<q", struct.pack("<d", scale))[0]


def _agree(q, k, v, local_error: Exception | None, options: dict, group, timeout: timedelta,
           seq_len: int | None = None) -> list[int]:
    """All-gather every rank's shapes and options; raise the same clear error on every rank if they disagree.

    Returns the shard length of every rank. One collective and one host read.
    """
    if local_error is None:
        row = [1, q.shape[0], q.shape[1], k.shape[1], q.shape[2], q.shape[3], _DTYPES.index(q.dtype),
               int(q.device.type == "cuda"), int(options["causal"]), options["left"], options["right"],
               LAYOUTS.index(options["layout"]), _scale_bits(options["scale"]), int(options["needs_grad"]),
               -1 if seq_len is None else seq_len]
        device = q.device
    else:
        row = [0] * len(_META)
        device = q.device if isinstance(q, torch.Tensor) else torch.device("cpu")
    table = _all_gather_ints(row, group, device, timeout)
    bad = [r for r in range(table.shape[0]) if table[r, 0] == 0]
    if bad:
        if local_error is not None:
            raise local_error
        raise ValueError(f"ring_attention: rank(s) {bad} of the group rejected their inputs (the error is raised "
                         f"there); no ring step was started")
    differ = [name for i, name in enumerate(_META) if (table[:, i] != table[0, i]).any() and name != "seqlen_local"]
    if differ:
        shown = [n for n in _META[1:] if n in differ or n in ("seqlen_local",)]
        rows = "; ".join(f"rank {r}: " + ", ".join(f"{n}={_decode(n, int(table[r, _META.index(n)]))}"
                                                   for n in shown) for r in range(table.shape[0]))
        what = "shapes" if any(n in _SHAPE_FIELDS for n in differ) else "options"
        raise ValueError(f"ring_attention: the ranks' shard {what} disagree ({', '.join(differ)}): {rows}")
    lengths = table[:, _META.index("seqlen_local")].tolist()
    if seq_len is not None and sum(lengths) != seq_len:
        raise ValueError(f"ring_attention: seq_len={seq_len}, but the ranks' shards (dim 2 lengths {lengths}) hold "
                         f"{sum(lengths)} tokens")
    expected = shard_lengths(sum(lengths), len(lengths), options["layout"])
    if lengths != expected:
        raise ValueError(f"ring_attention: the shard lengths (dim 2) {lengths} are not the {options['layout']} "
                         f"layout of a sequence of {sum(lengths)} tokens, which has shards {expected}; shard the "
                         f"sequence with shard_sequence(x, rank, world_size, layout={options['layout']!r})")
    return lengths


def _decode(name: str, value: int) -> str:
    if name == "dtype":
        return str(_DTYPES[value]).replace("torch.", "")
    if name == "layout":
        return LAYOUTS[value]
    if name == "device":
        return "cuda" if value else "cpu"
    if name == "scale":
        return f"{struct.unpack('<d', struct.pack('<q', value))[0]:.6g}"
    if name in ("causal", "needs_grad"):
        return str(bool(value))
    if name == "seq_len" and value < 0:
        return "None"
    return str(value)


# --- agreements remembered per process group -----------------------------------------------------------------------
#
# group -> {signature: every rank's shard length}, least recently used first. A signature holds what every rank of a
# correct program has in common (shapes but the local length, dtype, device type, options, seq_len), never the local
# length itself, which legitimately differs between ranks. Without seq_len there is one entry per signature, the
# last agreed: a rank reuses it only if its own length is the one agreed, so ranks that all reuse it all hold the
# agreed shards (see ring_attention's contract). Every rank records the same agreements in the same order, so the
# eviction below is the same on every rank too.

_CACHE_SIZE = 64
_AGREED: weakref.WeakKeyDictionary[dist.ProcessGroup, OrderedDict[tuple, tuple[int, ...]]] = \
    weakref.WeakKeyDictionary()


def _signature(q: torch.Tensor, k: torch.Tensor, options: dict, seq_len: int | None) -> tuple:
    return (q.shape[0], q.shape[1], k.shape[1], q.shape[3], q.dtype, q.device.type, options["causal"],
            options["left"], options["right"], options["layout"], _scale_bits(options["scale"]),
            options["needs_grad"], seq_len)


def _agreed_lengths(q, k, v, local_error: Exception | None, options: dict, group: dist.ProcessGroup,
                    timeout: timedelta, seq_len: int | None = None) -> tuple[int, ...]:
    """Every rank's shard length: remembered if this signature was agreed on `group` before, else `_agree`d.

    A remembered agreement costs no collective and no host read.
    """
    key = None
    if local_error is None:
        key = _signature(q, k, options, seq_len)
        agreed = _AGREED.get(group)
        lengths = None if agreed is None else agreed.get(key)
        if lengths is not None and lengths[dist.get_rank(group)] == q.shape[2]:
            agreed.move_to_end(key)
            return lengths
    lengths = tuple(_agree(q, k, v, local_error, options, group, timeout, seq_len))  # raises if local_error
    agreed = _AGREED.setdefault(group, OrderedDict())
    agreed[key] = lengths
    agreed.move_to_end(key)
    while len(agreed) > _CACHE_SIZE:
        agreed.popitem(last=False)
    return lengths

