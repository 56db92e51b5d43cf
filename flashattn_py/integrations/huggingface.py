"""Hugging Face transformers: ``attn_implementation="flashattn_py"``.

    import flashattn_py.integrations.huggingface as fa_hf
    name = fa_hf.register()            # "flashattn_py", or "fa_py" on transformers >= 5 (see below)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=name)

`register()` adds our attention to transformers' ``AttentionInterface`` and the
matching mask builder (boolean masks, as for ``"sdpa"``) to its
``AttentionMaskInterface``. GQA runs without repeating K/V, padding masks from the
tokenizer are read in-kernel, and configs with ``sliding_window`` or
``attn_logit_softcapping`` map onto the kernels' window and softcap.
``transformers`` is an optional dependency (``pip install flashattn-py[hf]``).

transformers 5 sends every ``attn_implementation`` whose name contains "flash"
to its FlashAttention-package / hub-kernel loader, which cannot load a plain
attention function. There `register()` also registers the name ``"fa_py"`` and
returns it; on transformers 4 it returns ``"flashattn_py"``. Both names run the
same function.
"""

from __future__ import annotations

import torch

from ..functional import attention

NAME = "flashattn_py"
ALIAS = "fa_py"  # for transformers >= 5, which reserves names containing "flash"


def attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                      is_causal: bool | None = None, sliding_window: int | None = None,
                      softcap: float | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention-function contract: (B, H, L, D) in, (B, L, H, D) out, no weights.

    key/value arrive with the model's K/V heads (GQA is handled in the kernels).
    A mask, when given, already holds causality, padding and any sliding window;
    without one the call is causal (decoder) unless the module says otherwise.
    """
    q_len, kv_len = query.shape[2], key.shape[2]
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    causal = bool(causal) and attention_mask is None and q_len > 1
    window = (-1, -1)
    if attention_mask is None:
        if causal and kv_len > q_len:  # prefill into an empty static cache: the extra slots are unused
            key, value = key[:, :, :q_len], value[:, :, :q_len]
        if sliding_window is not None:  # key j visible iff i - j < sliding_window
            window = (int(sliding_window) - 1, 0 if causal else -1)
    elif attention_mask.dtype != torch.bool:
        attention_mask = attention_mask.to(query.dtype)
    out = attention(query, key, value, causal=causal, scale=scaling, window=window, softcap=float(softcap or 0.0),
                    attn_mask=attention_mask, dropout_p=float(dropout))
    return out.transpose(1, 2).contiguous(), None


def register(name: str = NAME) -> str:
    """Make our attention available to transformers models; returns the ``attn_implementation`` to pass."""
    import transformers
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    names = [name]
    if "flash" in name and int(transformers.__version__.split(".")[0]) >= 5:
        names.append(ALIAS)
    for n in names:
        AttentionInterface.register(n, attention_forward)
        AttentionMaskInterface.register(n, sdpa_mask)
    return names[-1]
