"""Process groups, timeouts and waits: what every part of the package's communication shares.

Which waits take the ``timeout`` (`_host_timeout`): a wait the host blocks on anyway
(CPU tensors on gloo, and the small metadata all_gathers that are read back on the
host) is timed, so a stuck peer raises a clear RuntimeError. A wait on CUDA tensors
is not: ProcessGroupNCCL's ``wait(timeout)`` blocks the CPU thread until the
operation ends, while an untimed ``wait()`` only orders the current stream after
it; the process group's own timeout (NCCL's watchdog) bounds those.
"""

from __future__ import annotations

import math
import numbers
from datetime import timedelta

import torch
import torch.distributed as dist

DEFAULT_TIMEOUT = timedelta(seconds=300)


def _check_timeout(timeout: object) -> timedelta:
    if timeout is None:
        return DEFAULT_TIMEOUT
    if isinstance(timeout, timedelta):
        seconds = timeout.total_seconds()
    elif isinstance(timeout, numbers.Real) and not isinstance(timeout, bool):
        seconds = float(timeout)
    else:
        raise TypeError(f"timeout must be a datetime.timedelta, a number of seconds or None, got "
                        f"{type(timeout).__name__}")
    if not math.isfinite(seconds) or seconds <= 0:
        raise ValueError(f"timeout must be positive and finite, got {timeout!r}")
    return timedelta(seconds=seconds)


def _resolve_group(group: object, name: str = "group") -> dist.ProcessGroup:
    if group is not None and not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"{name} must be a torch.distributed.ProcessGroup or None, got {type(group).__name__}")
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError(f"{name}: torch.distributed is not initialized; call torch.distributed.init_process_group "
                         f"first (gloo for CPU tensors, nccl for CUDA tensors)")
    group = dist.group.WORLD if group is None else group
    if dist.get_rank(group) < 0:
        raise ValueError(f"{name}: this process is not a member of the process group")
    return group


def _host_timeout(timeout: timedelta, device: torch.device) -> timedelta | None:
    """The timeout for waits on tensors of `device`: None (untimed, the process group's watchdog) for CUDA."""
    return None if device.type == "cuda" else timeout


def _wait(works: list, timeout: timedelta | None) -> None:
    """Wait for every work (tensors in the list are send buffers kept alive with their work); None = untimed."""
    for work in works:
        if isinstance(work, torch.Tensor):  # a send buffer kept alive with its work
            continue
        if timeout is None:
            work.wait()
        elif work.wait(timeout=timeout) is False:
            raise RuntimeError(f"ring_attention: a torch.distributed operation did not finish within {timeout}")


def _meta_device(group: dist.ProcessGroup, device: torch.device) -> torch.device:
    if "nccl" in str(dist.get_backend(group)).lower():
        return device if device.type == "cuda" else torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _all_gather_ints(values: list[int], group: dist.ProcessGroup, device: torch.device,
                     timeout: timedelta) -> torch.Tensor:
    """(world, len(values)) int64 table of every rank's values, on the CPU (a host read: the wait is timed)."""
    dev = _meta_device(group, device)
    mine = torch.tensor(values, dtype=torch.int64, device=dev)
    table = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    _wait([dist.all_gather(table, mine, group=group, async_op=True)], timeout)
    return torch.stack(table).cpu()
