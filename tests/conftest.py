"""Test set-up: pick the device, run the real kernels on CPU through Triton's interpreter.

Without a GPU, TRITON_INTERPRET=1 is set here, before flashattn_py's kernels are
first imported, so CPU tests exercise the Triton kernels (set TRITON_INTERPRET=0
yourself to test the PyTorch backend instead). The interpreter's wrong bf16
`tl.dot` (triton #11584) is corrected by the library itself (`flashattn_py._interpreter`),
as it is for any user of the interpreter; nothing here patches Triton.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch


def _checkout_root_last() -> None:
    """Move the checkout root (``python -m pytest`` puts it first on sys.path) behind site-packages.

    Its ``kernels/`` directory is installed as ``flashattn_py.kernels``; first on the path it would also be a
    top-level ``kernels`` and shadow the Hugging Face ``kernels`` package, which transformers imports when it is
    installed (``cannot import name 'CUDAProperties' from 'kernels'``). ``benchmarks`` is still found there.
    """
    root = Path(__file__).resolve().parent.parent
    mine = [p for p in sys.path if Path(p or ".").resolve() == root]
    sys.path[:] = [p for p in sys.path if p not in mine] + [str(root)] * bool(mine)


_checkout_root_last()

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


from flashattn_py import _launch, ops  # noqa: E402  (after TRITON_INTERPRET is settled)

# Every launch re-derives its plan and checks it against the cached one (`_launch.CHECK_PLANS`): a plan key that
# misses something a launch depends on fails whichever test meets it, instead of a later call launching a stale plan.
_launch.CHECK_PLANS = True

DEVICE = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


# Tests whose name holds one of these run with every buffer the launch layer allocates uninitialised
# filled with NaN first (`_launch.poison_allocations`): a row the kernels should write and do not then
# fails the test instead of passing on whatever the allocator happened to return.
POISONED = ("varlen", "kvcache", "split")


@pytest.fixture(autouse=True)
def _poisoned_memory(request):
    from flashattn_py import _launch

    if any(word in request.node.name for word in POISONED):
        with _launch.poison_allocations():
            yield
    else:
        yield


@pytest.fixture
def device() -> torch.device:
    return DEVICE


@pytest.fixture
def triton_ran():
    """Yields a checker: after the test body, call it to assert every Triton kernel of a pass launched.

    Fails when the device would not run the Triton kernels at all, so a test
    that claims to test the kernels cannot silently test the torch backend.
    """
    before = ops.launch_counts.copy()

    def check(*names: str) -> None:
        assert ops.uses_triton(torch.empty(1, device=DEVICE)), (
            "the Triton kernels are not in use on this device (TRITON_INTERPRET=0 on a CPU-only machine?)")
        for name in names:
            assert ops.launch_counts[name] > before[name], f"Triton kernel {name} did not launch"

    return check
