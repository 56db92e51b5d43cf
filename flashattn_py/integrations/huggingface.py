"""Hugging Face transformers: ``attn_implementation="fa_py"``.

    import flashattn_py.integrations.huggingface as fa_hf
    name = fa_hf.register()            # "fa_py" on transformers >= 5, "flashattn_py" on 4 (where "fa_py" works too)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=name)

`register()` adds our attention to transformers' ``AttentionInterface`` and our
mask builder to its ``AttentionMaskInterface``. GQA runs without repeating K/V;
``sliding_window`` and ``attn_logit_softcapping`` map onto the kernels' window and
softcap; a ``position_bias`` (T5's relative attention bias and the other models
that pass one) is added to the scores, with its gradient.

Masks at kernel speed: transformers builds causal and sliding-window patterns into
a dense ``(B, 1, L, S)`` mask. Our mask builder makes a mask with the same meaning as
``"sdpa"``'s (``masking_utils.sdpa_mask``) and decides whether it is only a causal /
sliding-window band (at the cache's offset) AND a key-padding row from what
transformers passes it, never from the mask's values: its ``mask_function``
(transformers' own causal / bidirectional / sliding-window functions and their
``and_masks``, recognized by identity and closure constants, each confirmed once on a
host grid of Python ints) and Python-int ``q_offset`` / ``kv_offset``. When it is, the
attention call does not read the mask: it passes the band to the kernels (blocks
outside it are skipped, so a sliding window costs O(S·w)) and the padding, always, as
a ``(B, 1, 1, S)`` keep-mask sliced from ``attention_mask`` on the device. Any other
pattern (or_masks, chunked, packed sequences, a model's own mask functions, a tensor
``q_offset`` as a static cache passes while decoding) runs from the dense mask.

No host reads: the mask builder and the attention call read no tensor value on the
host (no ``.item()``, ``bool(t)``, ``torch.equal``), so they add no device sync and can
run under CUDA-graph capture. Where ``sdpa_mask`` would read the padding mask (or a
tensor ``q_offset``) to decide whether to return None, the mask is built instead (same
meaning; an unpadded all-ones ``attention_mask`` therefore materializes the boolean
mask once per forward, which the kernels do not read; pass ``attention_mask=None``
for unpadded inputs to avoid it). Under torch.compile the builder returns sdpa's mask
untagged: compiled models run the dense mask.

Packed batches passed as ``cu_seq_lens_q/k`` + ``max_length_q/k`` (padding-free
training) run `attention_varlen`; ``max_length_q/k`` are Python ints (a tensor is read
in eager code, and replaced by the packed length where it cannot be read). A mask
passed with them is compared with the packing (a host read) only where values are
readable; under compile or capture the mask runs densely instead.

Keywords: every keyword transformers passes is either used, ignored for a stated
reason (`IGNORED_KWARGS`), or refused with a TypeError naming it; an unknown
keyword whose value is None is taken as absent.

The name: transformers 5 sends every ``attn_implementation`` containing "flash" to
its FlashAttention-package / hub-kernel loader, which cannot load a plain attention
function, so there our attention is registered as ``"fa_py"`` only; `register()`
refuses names containing "flash", and ``attn_implementation="flashattn_py"`` fails
with an error that names ``"fa_py"``. On transformers 4 both names work.
``transformers`` is an optional dependency (``pip install flashattn-py[hf]``).
"""

from __future__ import annotations

import functools
import warnings

import torch

from .._validation import InputError, InputTypeError, values_unreadable
from ..functional import _attention_at_offset, attention_varlen

NAME = "flashattn_py"  # transformers 4 only
ALIAS = "fa_py"  # every version; the only name on transformers >= 5, which reserves names containing "flash"

# Keywords transformers passes to attention functions that do not change what the attention computes.
IGNORED_KWARGS = {
    "position_ids": "positions are already applied to q and k (RoPE); packed sequences reach the attention through "
                    "the mask transformers builds from position_ids, or through cu_seq_lens_q/k",
    "position_embeddings": "already applied to q and k",
    "cache_position": "cache bookkeeping: the cache was updated before the call",
    "use_cache": "cache bookkeeping: the cache was updated before the call",
    "past_key_values": "the cache was updated before the call; k and v hold its contents",
    "past_key_value": "the cache was updated before the call; k and v hold its contents",
    "cache": "the cache was updated before the call; k and v hold its contents",
    "output_attentions": "the weights are never materialized; the model returns attentions=None, as with sdpa",
    "output_hidden_states": "a model-level output flag",
    "output_router_logits": "a model-level output flag (MoE routers)",
    "return_dict": "a model-level output flag",
    "num_items_in_batch": "loss bookkeeping",
    "encoder_hidden_states": "already projected into key and value",
    "deterministic": "our backward is always deterministic",
}
_KERNEL_UNSUPPORTED = {
    "s_aux": "attention sinks (s_aux)",
    "sinks": "attention sinks",
    "head_mask": "head masks",
    "layer_head_mask": "head masks",
    "indices": "sparse attention indices",
    "block_indices": "block-sparse attention indices",
}
_warned_output_attentions = False


def _check_kwargs(kwargs: dict) -> None:
    """Refuse what we would otherwise drop: unknown keywords (None counts as absent) and unsupported inputs."""
    global _warned_output_attentions
    for key, value in kwargs.items():
        if key in IGNORED_KWARGS:
            if key == "output_attentions" and value and not _warned_output_attentions:
                _warned_output_attentions = True
                warnings.warn("flashattn_py does not return attention weights (output_attentions=True): the model "
                              "returns attentions=None, as with sdpa; use attn_implementation='eager' for them",
                              stacklevel=3)
            continue
        if value is None:
            continue
        if key in _KERNEL_UNSUPPORTED:
            raise InputTypeError(f"flashattn_py's attention does not support {_KERNEL_UNSUPPORTED[key]} "
                                 f"({key}=...); use attn_implementation='eager' for this model")
        raise InputTypeError(f"flashattn_py's attention got an unexpected keyword argument {key!r} "
                             f"({type(value).__name__}); refusing it rather than ignoring what it may mean")


# --- masks ---------------------------------------------------------------------------------------------------------
#
# The band is decided from what transformers passes to the mask builder (its mask function, offsets, lengths), never
# from the mask's values: no host read, so the builder and the attention call can be captured in a CUDA graph.

_MAX_DEPTH = 8  # nesting of and_masks we follow


@functools.cache
def _transformers_masks() -> dict:
    """transformers' own mask functions, and the code objects of the closures its mask factories return."""
    from transformers import masking_utils as mu

    def code(factory_name: str, *args):
        factory = getattr(mu, factory_name, None)
        try:
            return factory(*args).__code__ if factory is not None else None
        except Exception:  # a factory whose signature changed: its masks are simply not recognized
            return None

    causal = getattr(mu, "causal_mask_function", None)
    return {
        "causal": causal,
        "bidirectional": getattr(mu, "bidirectional_mask_function", None),
        "and": code("and_masks", causal) if causal is not None else None,
        "sliding": code("sliding_window_overlay", 1),
        "sliding_bidirectional": code("sliding_window_bidirectional_overlay", 1),
    }


def _closure_vars(fn) -> dict | None:
    code, cells = getattr(fn, "__code__", None), getattr(fn, "__closure__", None) or ()
    if code is None or len(code.co_freevars) != len(cells):
        return None
    try:
        return {name: cell.cell_contents for name, cell in zip(code.co_freevars, cells, strict=True)}
    except ValueError:  # an empty cell
        return None


def _leaf(fn) -> tuple | None:
    """``(key, left, right)`` for one of transformers' index-only band functions, else None.

    The function keeps key j for query i iff ``i - left <= j <= i + right`` (-1: unbounded)
    on absolute positions; `key` names it with its closure constants (for the confirmation cache).
    """
    known = _transformers_masks()
    if fn is known["causal"] and fn is not None:
        return ("causal",), -1, 0
    if fn is known["bidirectional"] and fn is not None:
        return ("bidirectional",), -1, -1
    code = getattr(fn, "__code__", None)
    if code is None or code not in (known["sliding"], known["sliding_bidirectional"]):
        return None
    w = (_closure_vars(fn) or {}).get("sliding_window")
    if isinstance(w, bool) or not isinstance(w, int):  # a tensor (or anything else) would need a read: not a band
        return None
    if code is known["sliding"]:  # kv > q - w
        return (("sliding", w), w - 1, -1) if w >= 1 else None
    return (("sliding_bidirectional", w), w, w) if w >= 0 else None  # |q - kv| <= w


_confirmed: dict = {}  # leaf key -> whether evaluating the function agreed with its claimed band


def _confirm_on_host(fn, key: tuple, left: int, right: int) -> bool:
    """Evaluate a recognized band function once per key on a host grid of Python ints around its edges.

    Guards against a transformers version whose function of the same name means something
    else. Python ints only: no tensor is made or read.
    """
    if key in _confirmed:
        return _confirmed[key]
    edges = {0, 1, 2, 3, 5, 8, 13, 64}
    for bound in (left, right):
        if bound >= 0:
            edges |= {bound - 1, bound, bound + 1, 2 * bound + 1}
    ok = True
    try:
        for q in sorted(x for x in edges if x >= 0):
            candidates = {0, 1, q - 1, q, q + 1, q + 2, q + 64}
            for bound in (left, right):
                if bound >= 0:
                    candidates |= {q - bound - 1, q - bound, q - bound + 1, q + bound - 1, q + bound, q + bound + 1}
            for kv in sorted(x for x in candidates if x >= 0):
                expected = (left < 0 or kv >= q - left) and (right < 0 or kv <= q + right)
                got = fn(0, 0, q, kv)
                if not isinstance(got, bool) or got != expected:
                    ok = False
                    break
            if not ok:
                break
    except Exception:  # not evaluable on ints: not one we know
        ok = False
    _confirmed[key] = ok
    return ok


def _function_band(fn, depth: int = 0) -> tuple[int, int] | None:
    """``(left, right)`` when the mask function is exactly a band on absolute positions, from what it is.

    Recognizes transformers' causal / bidirectional / sliding-window functions and their
    intersections (``and_masks``), by identity of its functions and of the closures its
    factories make, with their closure constants; each leaf is confirmed once on a host
    grid. Anything else (or_masks, chunked, packed sequences, user functions): None.
    """
    known = _transformers_masks()
    if depth > _MAX_DEPTH or fn is None:
        return None
    if known["and"] is not None and getattr(fn, "__code__", None) is known["and"]:
        parts = (_closure_vars(fn) or {}).get("mask_functions")
        if not isinstance(parts, tuple) or not parts:
            return None
        left = right = -1
        for part in parts:
            band = _function_band(part, depth + 1)
            if band is None:
                return None
            left = band[0] if left < 0 else (left if band[0] < 0 else min(left, band[0]))
            right = band[1] if right < 0 else (right if band[1] < 0 else min(right, band[1]))
        return left, right
    leaf = _leaf(fn)
    if leaf is None or not _confirm_on_host(fn, *leaf):
        return None
    return leaf[1], leaf[2]


def _host_int(x) -> int | None:
    """A Python int as it is; None for anything else (a tensor offset is never read)."""
    if isinstance(x, bool) or not isinstance(x, int):
        return None
    return x


def _recognize(kwargs: dict):
    """``(offset, left, right, keep)`` for the mask `sdpa_mask(**kwargs)` builds, when it is a band AND a padding row.

    From the arguments alone (no tensor value is read). ``keep`` is the ``(B|1, 1, 1, S)``
    boolean key-padding mask sliced on the device from ``attention_mask`` (None without
    one); nothing checks whether anything is padded.
    """
    from transformers.masking_utils import causal_mask_function

    q_len, kv_len, batch = kwargs.get("q_length"), kwargs.get("kv_length"), kwargs.get("batch_size")
    q_off, kv_off = _host_int(kwargs.get("q_offset", 0)), _host_int(kwargs.get("kv_offset", 0))
    if any(_host_int(x) is None for x in (q_len, kv_len, batch)) or q_off is None or kv_off is None:
        return None  # e.g. a static cache's tensor q_offset: the dense mask
    if q_off < 0 or kv_off < 0 or "cache_position" in kwargs:
        return None
    band = _function_band(kwargs.get("mask_function", causal_mask_function))
    if band is None:
        return None
    keep = None
    padding = kwargs.get("attention_mask")
    if padding is not None:
        if (not isinstance(padding, torch.Tensor) or padding.dtype != torch.bool or padding.dim() != 2
                or padding.shape[0] not in (1, batch)):
            return None
        if padding.shape[1] < kv_off + kv_len:  # as masking_utils.prepare_padding_mask: missing keys are padding
            padding = torch.nn.functional.pad(padding, (0, kv_off + kv_len - padding.shape[1]))
        keep = padding[:, None, None, kv_off:kv_off + kv_len]
    return q_off - kv_off, band[0], band[1], keep


@functools.cache
def _sdpa_mask_parameters() -> frozenset:
    import inspect

    from transformers.masking_utils import sdpa_mask

    return frozenset(inspect.signature(sdpa_mask).parameters)


def _without_reads(kwargs: dict) -> dict:
    """sdpa_mask's arguments, minus the shortcuts for which it reads tensor values, where they cannot be read.

    With a padding mask, or a tensor q_offset, sdpa_mask decides whether it may return None
    (causal, or no mask at all) by reading them on the host (``padding_mask.all()``,
    ``q_offset == 0``). In eager code with readable values that is transformers' own read,
    once per forward, as with ``attn_implementation="sdpa"``; it spares building a
    (B, 1, L, S) mask for an all-ones attention_mask (1 GiB at 32k tokens). Where the values
    cannot be read (CUDA-graph capture, FakeTensorMode, torch.compile), the mask is built
    instead, which means the same attention.
    """
    padding, offsets = kwargs.get("attention_mask"), (kwargs.get("q_offset"), kwargs.get("kv_offset"))
    skips = []
    if isinstance(padding, torch.Tensor) and values_unreadable(padding):
        skips += ["allow_is_causal_skip", "allow_is_bidirectional_skip"]
    elif any(isinstance(t, torch.Tensor) and values_unreadable(t) for t in offsets):
        skips += ["allow_is_causal_skip"]
    names = _sdpa_mask_parameters()
    return {**kwargs, **{name: False for name in skips if name in names}}


def mask_interface(*args, **kwargs):
    """transformers' mask hook: the mask ``"sdpa"`` builds (boolean, or None), tagged with its band when it is one.

    Takes whatever transformers' ``sdpa_mask`` takes and returns a mask with the same
    meaning: sdpa's, except that where sdpa would read tensor values to decide whether
    it may return None, the mask is built instead. The band (causal / sliding window,
    at the cache's offset) is recognized from the mask function and offsets transformers
    passes (`_recognize`), never from the mask's values: nothing here reads a tensor's
    values on the host, so it can run under CUDA-graph capture. Under torch.compile the
    mask is sdpa's, untagged (read densely).
    """
    from transformers.masking_utils import sdpa_mask

    if args or torch.compiler.is_compiling():  # positional (old transformers) / compiled: sdpa's mask, as given
        return sdpa_mask(*args, **kwargs)
    band = _recognize(kwargs)
    mask = sdpa_mask(**_without_reads(kwargs))
    if (band is not None and isinstance(mask, torch.Tensor) and mask.dtype == torch.bool
            and tuple(mask.shape) == (kwargs["batch_size"], 1, kwargs["q_length"], kwargs["kv_length"])):
        mask._fa_py_band = (mask._version, *band)
    return mask


def _band_of(mask: torch.Tensor | None, q_len: int, kv_len: int):
    """The band recorded by `mask_interface` on this very tensor, if it fits this call's lengths."""
    if mask is None or torch.compiler.is_compiling() or tuple(mask.shape[-2:]) != (q_len, kv_len):
        return None
    tag = getattr(mask, "_fa_py_band", None)
    if tag is None or tag[0] != mask._version:  # changed in place since it was checked: read it densely
        return None
    return tag[1:]


def _with_position_bias(position_bias: torch.Tensor, mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """The additive float bias: position_bias, with a boolean keep-mask as -inf or a float mask added."""
    bias = position_bias.to(dtype)
    if mask is None:
        return bias
    if mask.dtype == torch.bool:
        return torch.where(mask, bias, torch.tensor(float("-inf"), dtype=dtype, device=bias.device))
    return bias + mask.to(dtype)


# --- packed (padding-free) batches ----------------------------------------------------------------------------------

def _packing_matches(mask: torch.Tensor, cu_q: torch.Tensor, cu_k: torch.Tensor, left: int, right: int) -> bool:
    """Whether a dense (1, 1, Tq, Tk) boolean mask is exactly what `attention_varlen` computes for this packing.

    Compared once per (mask, cu_seqlens) pair: the result is cached on the mask. The
    comparison reads a value on the host (a sync on a GPU): `_varlen_forward` calls it
    only where values are readable (`_readable`), never under capture or compile.
    """
    key = (cu_q.data_ptr(), cu_q._version, cu_k.data_ptr(), cu_k._version, left, right)
    cached = getattr(mask, "_fa_py_packing", None)
    if cached is not None and cached[0] == key:
        return cached[1]
    ok = False
    if mask.dtype == torch.bool and mask.dim() == 4 and mask.shape[0] == 1 and mask.shape[1] == 1:
        tq, tk = mask.shape[2], mask.shape[3]
        rows, cols = torch.arange(tq, device=mask.device), torch.arange(tk, device=mask.device)
        seq_q = torch.searchsorted(cu_q[1:].long(), rows, right=True)
        seq_k = torch.searchsorted(cu_k[1:].long(), cols, right=True)
        len_q, len_k = cu_q.diff().long(), cu_k.diff().long()
        # bottom-right per sequence: local query i sits at key position i + len_k - len_q
        pos_q = (rows - cu_q[:-1].long()[seq_q.clamp(max=len_q.numel() - 1)]
                 + (len_k - len_q)[seq_q.clamp(max=len_q.numel() - 1)])
        pos_k = cols - cu_k[:-1].long()[seq_k.clamp(max=len_k.numel() - 1)]
        expected = seq_q[:, None] == seq_k[None, :]
        if right >= 0:
            expected &= pos_k[None, :] <= pos_q[:, None] + right
        if left >= 0:
            expected &= pos_k[None, :] >= pos_q[:, None] - left
        ok = torch.equal(mask[0, 0], expected)
    mask._fa_py_packing = (key, ok)
    return ok


def _readable(*tensors) -> bool:
    """Whether reading these tensors' values is possible and legal here (eager, real values, not capturing)."""
    return not any(isinstance(t, torch.Tensor) and values_unreadable(t) for t in tensors)


def _max_length(x, bound: int, name: str) -> int:
    """max_length_q/k as an int: a Python int as it is; a tensor is read only where that is legal.

    transformers passes ints (its flattening collator, continuous batching). A tensor is
    read on the host (one sync) in eager code; where its value cannot be read (compile,
    FakeTensor, CUDA-graph capture) the packed length `bound`, which bounds every sequence,
    is used instead: the same result, with more (empty) programs launched.
    """
    if isinstance(x, bool):
        raise InputTypeError(f"{name} must be an int, got {x!r}")
    if isinstance(x, int):
        return x
    if isinstance(x, torch.Tensor) and x.numel() == 1 and not x.is_floating_point():
        return int(x) if _readable(x) else bound
    raise InputTypeError(f"{name} must be an int (or a one-element integer tensor), got {type(x).__name__}")


def _varlen_forward(query, key, value, attention_mask, cu_q, cu_k, max_q, max_k, causal, window_left, scaling,
                    softcap, dropout, position_bias):
    """Padding-free batches: (1, H, total, D) with cu_seq_lens -> `attention_varlen`, as transformers' flash path."""
    if query.shape[0] != 1:
        raise InputError(f"cu_seq_lens_q/k describe one packed sequence of tokens (batch size 1), got query of "
                         f"shape {tuple(query.shape)}")
    if position_bias is not None:
        raise InputTypeError("position_bias cannot be combined with packed sequences (cu_seq_lens_q/k)")
    if dropout > 0:
        raise InputError(f"dropout ({dropout}) is not supported with packed sequences (cu_seq_lens_q/k)")
    left, right = (window_left, 0) if causal else (window_left, window_left)  # as transformers' flash path
    max_q, max_k = _max_length(max_q, query.shape[2], "max_length_q"), _max_length(max_k, key.shape[2], "max_length_k")
    if attention_mask is not None:  # it must say nothing beyond the packing, or we would drop it
        if not _packing_matches(attention_mask, cu_q, cu_k, left, right):
            raise InputError("attention_mask and cu_seq_lens_q/k describe different attention patterns; pass the "
                             "packing one way only")
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # (total, H, D) views
    out = attention_varlen(q, k, v, cu_q.to(torch.int32), cu_k.to(torch.int32), max_q, max_k,
                           causal=causal, scale=scaling, window=(left, right), softcap=softcap)
    return out.unsqueeze(0).contiguous(), None  # (1, total, H, D)


# --- the attention function ----------------------------------------------------------------------------------------

def attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                      is_causal: bool | None = None, sliding_window: int | None = None,
                      softcap: float | None = None, position_bias: torch.Tensor | None = None,
                      cu_seq_lens_q: torch.Tensor | None = None, cu_seq_lens_k: torch.Tensor | None = None,
                      max_length_q: int | None = None, max_length_k: int | None = None,
                      **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention-function contract: (B, H, L, D) in, (B, L, H, D) out, no weights.

    key/value arrive with the model's K/V heads (GQA is handled in the kernels).
    A mask, when given, already holds causality, padding and any sliding window
    (when `mask_interface` recorded it as a band, the band runs as kernel flags
    and only the padding row is read); without one the call is causal (decoder)
    unless the module says otherwise, as with sdpa. No tensor value is read on
    the host, except to compare a mask with cu_seq_lens where that is legal. ``position_bias`` is an
    additive float bias (combined with the mask) that receives its gradient.
    """
    _check_kwargs(kwargs)
    q_len, kv_len = query.shape[2], key.shape[2]
    causal = bool(is_causal if is_causal is not None else getattr(module, "is_causal", True))
    cap = float(softcap or 0.0)
    dropout = float(dropout)
    window_left = int(sliding_window) - 1 if sliding_window is not None else -1  # key j visible iff i - j < w

    packed = (cu_seq_lens_q, cu_seq_lens_k, max_length_q, max_length_k)
    if any(x is not None for x in packed):
        if any(x is None for x in packed):
            raise InputError("cu_seq_lens_q, cu_seq_lens_k, max_length_q and max_length_k must be given together")
    # With a mask too, the packing runs varlen only where the two can be compared (a host read); elsewhere (compile,
    # CUDA-graph capture, fake tensors) the mask, which says all eager attention uses, runs densely
    if cu_seq_lens_q is not None and (attention_mask is None or _readable(attention_mask, cu_seq_lens_q,
                                                                          cu_seq_lens_k)):
        return _varlen_forward(query, key, value, attention_mask, cu_seq_lens_q, cu_seq_lens_k, max_length_q,
                               max_length_k, causal, window_left, scaling, cap, dropout, position_bias)

    band = _band_of(attention_mask, q_len, kv_len)
    if band is not None:  # causal / window as kernel flags (block skipping); only the padding row is read
        offset, left, right, mask = band
    elif attention_mask is None:  # sdpa's convention: causal (top-left) unless decoding one token
        causal = causal and q_len > 1
        if causal and kv_len > q_len:  # prefill into an empty static cache: the extra slots are unused
            key, value = key[:, :, :q_len], value[:, :, :q_len]
            if position_bias is not None:
                position_bias = position_bias[..., :q_len]
        offset, mask = 0, None
        left, right = (window_left, 0) if causal else (-1, -1)
    else:  # a pattern other than band + padding: read densely
        offset, left, right = 0, -1, -1
        mask = attention_mask if attention_mask.dtype == torch.bool else attention_mask.to(query.dtype)
    if position_bias is not None:
        mask = _with_position_bias(position_bias, mask, query.dtype)
    out = _attention_at_offset(query, key, value, offset=offset, window=(left, right), scale=scaling, softcap=cap,
                               attn_mask=mask, dropout_p=dropout)
    return out.transpose(1, 2).contiguous(), None


# --- registration --------------------------------------------------------------------------------------------------

def _major_version() -> int:
    import transformers

    return int(transformers.__version__.split(".")[0])


_RESERVED = (f'attn_implementation="{NAME}" cannot work on transformers >= 5: it sends every name containing '
             f'"flash" to its FlashAttention / hub-kernel loader. flashattn_py is registered there as '
             f'attn_implementation="{ALIAS}" (the name flashattn_py.integrations.huggingface.register() returns).')


def _refuse_reserved_name() -> None:
    """Make ``attn_implementation="flashattn_py"`` fail with an error naming "fa_py" (transformers >= 5).

    transformers would otherwise fail inside its kernel loader with "Could not
    find the currently requested flash attention implementation"; the check wraps
    the one method every model's attention choice passes through, once, and only
    acts on that exact name.
    """
    try:
        from transformers import PreTrainedModel
    except ImportError:
        return
    original = getattr(PreTrainedModel, "_check_and_adjust_attn_implementation", None)
    if original is None or getattr(original, "_fa_py_name_check", False):
        return

    @functools.wraps(original)
    def check(self, attn_implementation, *args, **kwargs):
        if isinstance(attn_implementation, str) and attn_implementation.removeprefix("paged|") == NAME:
            raise InputError(_RESERVED)
        return original(self, attn_implementation, *args, **kwargs)

    check._fa_py_name_check = True
    PreTrainedModel._check_and_adjust_attn_implementation = check


def register(name: str | None = None) -> str:
    """Make our attention available to transformers models; returns the ``attn_implementation`` to pass.

    Registers the attention function (`attention_forward`) and its mask builder
    (`mask_interface`) under ``"fa_py"`` on every transformers version, and also
    under ``"flashattn_py"`` on transformers 4; returns ``"fa_py"`` on transformers
    >= 5 and ``"flashattn_py"`` on 4. Use the returned name::

        model = AutoModelForCausalLM.from_pretrained(path, attn_implementation=fa_hf.register())

    transformers >= 5 routes every ``attn_implementation`` containing "flash" to
    its FlashAttention-package / hub-kernel loader, so there ``"flashattn_py"``
    cannot be our name: `register()` refuses a `name` containing "flash", and a
    model asked for ``attn_implementation="flashattn_py"`` raises an error that
    points to ``"fa_py"``. `name`, when given, registers that name only.
    """
    from transformers import AttentionInterface

    major = _major_version()
    if name is None:
        names = [ALIAS] if major >= 5 else [NAME, ALIAS]
    elif "flash" in name and major >= 5:
        raise InputError(f"register(name={name!r}): transformers >= 5 sends every attn_implementation containing "
                         f"\"flash\" to its FlashAttention / hub-kernel loader, so that name would never reach "
                         f"flashattn_py; call register() for \"{ALIAS}\" or pick a name without \"flash\"")
    else:
        names = [name]
    try:
        from transformers.masking_utils import AttentionMaskInterface
    except ImportError:  # transformers without the mask interface (< 4.53): models build their own masks
        AttentionMaskInterface = None
    for n in names:
        AttentionInterface.register(n, attention_forward)
        if AttentionMaskInterface is not None:
            AttentionMaskInterface.register(n, mask_interface)
    if major >= 5:
        _refuse_reserved_name()
    return names[0]
