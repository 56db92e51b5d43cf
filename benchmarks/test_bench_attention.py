"""pytest-benchmark suite: `pytest benchmarks/ --benchmark-only`. Needs a CUDA GPU; skipped otherwise.

A smaller grid than `python -m benchmarks`; each timed call synchronises the
device so pytest-benchmark's wall clock measures the kernels, not the launch.
"""

from __future__ import annotations

import pytest
import torch

from benchmarks.impls import IMPLEMENTATIONS, Unsupported

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="benchmarks need a CUDA GPU")

IMPLS = ["flashattn_py", "sdpa_flash", "sdpa_cudnn", "naive"]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("batch, seqlen, head_dim", [(8, 2048, 64), (4, 4096, 128), (2, 8192, 128)])
@pytest.mark.parametrize("pass_", ["fwd", "fwd_bwd"])
def test_attention(benchmark, impl, causal, batch, seqlen, head_dim, pass_):
    try:
        fn = IMPLEMENTATIONS[impl](causal)
    except Unsupported as exc:
        pytest.skip(str(exc))
    heads = 2048 // head_dim
    q, k, v, do = (torch.randn(batch, heads, seqlen, head_dim, device="cuda", dtype=torch.bfloat16)
                   for _ in range(4))
    if pass_ == "fwd_bwd":
        for t in (q, k, v):
            t.requires_grad_()

    def call():
        out = fn(q, k, v)
        if pass_ == "fwd_bwd":
            torch.autograd.grad(out, (q, k, v), do)
        torch.cuda.synchronize()

    try:
        call()  # warm-up / compile
    except (RuntimeError, NotImplementedError) as exc:
        pytest.skip(f"{impl} refuses this case: {exc}")
    except torch.cuda.OutOfMemoryError:
        pytest.skip("out of memory")
    benchmark.extra_info["flops"] = 4 * batch * heads * seqlen * seqlen * head_dim / (2 if causal else 1) * (
        3.5 if pass_ == "fwd_bwd" else 1.0)
    benchmark.pedantic(call, rounds=20, warmup_rounds=3)
