"""Bad input is refused with a clear error naming the argument, before any kernel launch."""

from __future__ import annotations

import math

import pytest
import torch

import flashattn_py
from flashattn_py import attention, ops


def _qkv(shape_q=(1, 2, 8, 16), shape_kv=(1, 2, 8, 16), dtype=torch.float32):
    return torch.randn(shape_q, dtype=dtype), torch.randn(shape_kv, dtype=dtype), torch.randn(shape_kv, dtype=dtype)


CASES = [
    ("rank", lambda: (torch.randn(2, 8, 16), *_qkv()[1:]), {}, ValueError, "q must be 4-D"),
    ("not a tensor", lambda: ([[1.0]], *_qkv()[1:]), {}, TypeError, "q must be a torch.Tensor"),
    ("int dtype", lambda: (torch.ones(1, 2, 8, 16, dtype=torch.int32), *_qkv()[1:]), {}, TypeError,
     "q must be float16"),
    ("mixed dtypes", lambda: (_qkv()[0].half(), *_qkv()[1:]), {}, TypeError, "share one dtype"),
    ("batch mismatch", lambda: _qkv((2, 2, 8, 16)), {}, ValueError, "same batch"),
    ("heads not a multiple", lambda: _qkv((1, 3, 8, 16)), {}, ValueError, "multiple of k's and v's heads"),
    ("k/v heads differ", lambda: (_qkv((1, 4, 8, 16))[0], torch.randn(1, 2, 8, 16), torch.randn(1, 1, 8, 16)), {},
     ValueError, "same number of heads"),
    ("head dim mismatch", lambda: _qkv((1, 2, 8, 32)), {}, ValueError, "same head_dim"),
    ("k/v length mismatch", lambda: (*_qkv()[:2], torch.randn(1, 2, 9, 16)), {}, ValueError, "same sequence length"),
    ("head dim too large", lambda: _qkv((1, 2, 8, 264), (1, 2, 8, 264)), {}, ValueError, "head_dim"),
    ("last stride", lambda: (torch.randn(1, 2, 16, 8).transpose(2, 3), *_qkv()[1:]), {}, ValueError, "stride 1"),
    ("causal value", lambda: _qkv(), {"causal": "upper"}, ValueError, "causal must be"),
    ("causal type", lambda: _qkv(), {"causal": 1}, TypeError, "causal must be"),
    ("scale nan", lambda: _qkv(), {"scale": math.nan}, ValueError, "scale must be finite"),
    ("scale inf", lambda: _qkv(), {"scale": math.inf}, ValueError, "scale must be finite"),
    ("scale type", lambda: _qkv(), {"scale": "0.1"}, TypeError, "scale must be a float"),
    ("return_lse type", lambda: _qkv(), {"return_lse": 1}, TypeError, "return_lse must be a bool"),
]


@pytest.mark.parametrize("make, kwargs, error, message", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input(make, kwargs, error, message):
    before = sum(ops.launch_counts.values())
    with pytest.raises(error, match=message):
        attention(*make(), **kwargs)
    assert sum(ops.launch_counts.values()) == before


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_mixed_devices():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="one device"):
        attention(q.cuda(), k, v)


@pytest.mark.parametrize("make, kwargs, error, message", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_also_a_runtime_error(make, kwargs, error, message):
    """Our errors are InputError / InputTypeError: ValueError / TypeError and RuntimeError, like torch's SDPA errors."""
    with pytest.raises(RuntimeError, match=message) as info:
        attention(*make(), **kwargs)
    assert isinstance(info.value, error)
    assert type(info.value) is (flashattn_py.InputError if error is ValueError else flashattn_py.InputTypeError)
