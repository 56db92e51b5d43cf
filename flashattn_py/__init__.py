"""flashattn_py: fused Triton kernels for exact scaled-dot-product attention in PyTorch."""

from ._validation import InputError, InputTypeError
from .functional import attention, attention_varlen, attention_with_kvcache, scaled_dot_product_attention
from .modules import MultiheadAttention, replace_attention
from .reference import attention_reference

__version__ = "0.1.0"

__all__ = [
    "attention",
    "attention_varlen",
    "attention_with_kvcache",
    "scaled_dot_product_attention",
    "MultiheadAttention",
    "replace_attention",
    "attention_reference",
    "InputError",
    "InputTypeError",
    "__version__",
]
