"""Triton kernels of flashattn_py (installed as ``flashattn_py.kernels``).

Only ``@triton.jit`` code lives here; launching, validation and autograd are in
``flashattn_py.ops``. Importing this package compiles nothing; whether the
kernels run through Triton's CPU interpreter is fixed by ``TRITON_INTERPRET``
at the moment this package is first imported.
"""

from .attn_bwd import _attn_bwd_dbias, _attn_bwd_dkdv, _attn_bwd_dq, _attn_bwd_preprocess
from .attn_fwd import _attn_fwd

__all__ = ["_attn_fwd", "_attn_bwd_preprocess", "_attn_bwd_dkdv", "_attn_bwd_dq", "_attn_bwd_dbias"]
