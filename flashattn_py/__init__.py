"""flashattn_py: fused Triton kernels for exact scaled-dot-product attention in PyTorch."""

from .functional import attention
from .reference import attention_reference

__version__ = "0.1.0"

__all__ = ["attention", "attention_reference", "__version__"]
