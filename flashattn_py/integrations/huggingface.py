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
a dense ``(B, 1, L, S)`` mask. Our mask builder makes the same mask as ``"sdpa"``
(``masking_utils.sdpa_mask``) and checks, exactly, whether it is only a causal /
sliding-window band (at the cache's offset) AND a key-padding row. When it is, the
attention call does not read the mask: it passes the band to the kernels (blocks
outside it are skipped, so a sliding window costs O(S·w)) and the padding as a
``(B, 1, 1, S)`` keep-mask. Any other pattern runs from the dense mask, as given.
Packed batches passed as ``cu_seq_lens_q/k`` + ``max_length_q/k`` (padding-free
training) run `attention_varlen`.

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

from .._validation import InputError, InputTypeError
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
_CHECK_ELEMENTS = 1 << 24  # mask entries compared per step when recognizing a band


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

def _band(q_len: int, kv_len: int, offset: int, left: int, right: int, device: torch.device) -> torch.Tensor:
    """(q_len, kv_len) bool: query i sees key j iff i + offset - left <= j <= i + offset + right (-1 = unbounded)."""
    i = torch.arange(q_len, device=device)[:, None] + offset
    j = torch.arange(kv_len, device=device)[None, :]
    keep = torch.ones(q_len, kv_len, dtype=torch.bool, device=device)
    if right >= 0:
        keep &= j <= i + right
    if left >= 0:
        keep &= j >= i - left
    return keep


def _as_int(x) -> int | None:
    if isinstance(x, torch.Tensor):
        if torch.compiler.is_compiling() or x.numel() != 1:
            return None
        return int(x.item())
    return int(x)


def _tag_band(mask: torch.Tensor, q_offset, kv_offset, padding: torch.Tensor | None, local_size) -> None:
    """If `mask` is exactly a causal / sliding-window band AND a key-padding row, record them on it.

    Sets ``mask._fa_py_band = (version, offset, left, right, keep)`` with ``keep`` the
    ``(B, 1, 1, S)`` padding keep-mask (None when nothing is padded). The check
    is an exact comparison with the mask transformers built, once per mask (not
    per layer); a mask it does not match is left as it is and read densely.
    """
    if mask.dim() != 4 or mask.shape[1] != 1:
        return
    q_off, kv_off = _as_int(q_offset), _as_int(kv_offset)
    if q_off is None or kv_off is None:
        return
    B, _, q_len, kv_len = mask.shape
    keep = None
    if padding is not None:
        if padding.dim() != 2 or padding.shape[0] not in (1, B):
            return
        padding = padding.bool()
        if padding.shape[1] < kv_off + kv_len:  # as masking_utils.prepare_padding_mask: missing keys are padding
            padding = torch.nn.functional.pad(padding, (0, kv_off + kv_len - padding.shape[1]))
        padding = padding[:, kv_off:kv_off + kv_len]
        if not bool(padding.all()):
            keep = padding[:, None, None, :]
    offset = q_off - kv_off
    # causal, bidirectional; with local_size: sliding causal (i - j < w) and sliding bidirectional (|i - j| <= w)
    w = int(local_size) if local_size is not None else None
    candidates = [(w - 1, 0), (w, w)] if w is not None else [(-1, 0), (-1, -1)]
    rows = max(1, _CHECK_ELEMENTS // max(1, B * kv_len))  # compare in row chunks: bounded temporaries
    for left, right in candidates:
        for start in range(0, q_len, rows):
            n = min(rows, q_len - start)
            expected = _band(n, kv_len, offset + start, left, right, mask.device)[None, None]
            if keep is not None:
                expected = expected & keep
            if not torch.equal(mask[:, :, start:start + n], expected.expand(B, 1, n, kv_len)):
                break
        else:
            mask._fa_py_band = (mask._version, offset, left, right, keep)
            return


def mask_interface(*args, **kwargs):
    """transformers' mask hook: the mask ``"sdpa"`` builds (boolean, or None), tagged with its band when it is one.

    Takes whatever transformers' ``sdpa_mask`` takes (its signature differs across
    versions) and returns exactly its result; None (no mask) comes back where
    sdpa's builder returns None: plain causal without padding, where the attention
    call runs the causal flag.
    """
    from transformers.masking_utils import sdpa_mask

    mask = sdpa_mask(*args, **kwargs)
    if not args and isinstance(mask, torch.Tensor) and mask.dtype == torch.bool and not torch.compiler.is_compiling():
        q_offset = kwargs.get("q_offset")
        if q_offset is None and kwargs.get("cache_position") is not None:  # older transformers pass positions
            q_offset = kwargs["cache_position"][:1]
        _tag_band(mask, 0 if q_offset is None else q_offset, kwargs.get("kv_offset", 0),
                  kwargs.get("attention_mask"), kwargs.get("local_size"))  # compiled: the dense mask, as given
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

    Compared once per (mask, cu_seqlens) pair: the result is cached on the mask.
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
    if attention_mask is not None:  # it must say nothing beyond the packing, or we would drop it
        if not _packing_matches(attention_mask, cu_q, cu_k, left, right):
            raise InputError("attention_mask and cu_seq_lens_q/k describe different attention patterns; pass the "
                             "packing one way only")
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # (total, H, D) views
    out = attention_varlen(q, k, v, cu_q.to(torch.int32), cu_k.to(torch.int32), int(max_q), int(max_k),
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
    unless the module says otherwise, as with sdpa. ``position_bias`` is an
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
