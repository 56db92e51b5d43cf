"""GPU targets: what the launch layer needs to know about a GPU, for real devices and virtual ones.

A `GpuTarget` is the few facts that decide a launch: the vendor and compute
capability (which kernels and instructions exist: TMA descriptors from sm_90),
the shared memory one block may use (which configs fit), and the number of
multiprocessors (how far split-K decoding splits). `device_target` reads them
from a real device; `TARGETS` holds the GPUs the tests model without one
(`_launch.virtual_gpu`).

ROCm builds of torch report AMD GPUs as ``is_cuda`` with a made-up capability
(MI300 says (9, 4)); `device_target` recognises them by ``torch.version.hip``, so
Hopper's configs and TMA are never chosen there. A GPU we do not know gets
configs by its shared-memory budget, and no tensor descriptors unless it is of a
family known to have TMA.

Imports nothing of ours: a bottom layer beside `_contract`.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from dataclasses import dataclass

import torch

# CUDA's grid limits: axis 0 up to 2**31 - 1 blocks, axes 1 and 2 up to 65,535
MAX_GRID_X = 2**31 - 1
MAX_GRID_YZ = 65535
# HIP also bounds the threads along a grid axis (gridDim.x * blockDim.x) by 2**32 - 1
MAX_HIP_GRID_THREADS = 2**32 - 1
# registers one block may hold (every NVIDIA GPU from sm_50 on; AMD's VGPR file is per SIMD, see issue 22)
MAX_REGISTERS_PER_BLOCK = 65536
MAX_REGISTERS_PER_THREAD = 255


@dataclass(frozen=True)
class GpuTarget:
    """One GPU as the launch layer sees it.

    name: "sm_90", "gfx942", ...; vendor: "nvidia" or "amd"; capability: CUDA
    compute capability ((0, 0) on AMD); max_shared: bytes of shared memory (LDS)
    one block may use, opt-in maximum; multiprocessors: SMs / CUs; tma: tensor
    descriptors (Hopper's TMA and later) exist; warp_size: 32, or 64 on CDNA.
    """

    name: str
    vendor: str
    capability: tuple[int, int]
    max_shared: int
    multiprocessors: int
    tma: bool
    warp_size: int = 32
    description: str = ""

    @property
    def arch(self) -> int:
        """The integer Triton's CUDA backend targets (90 for sm_90)."""
        return self.capability[0] * 10 + self.capability[1]


# The GPUs the tests model. Shared memory is the opt-in maximum per block
# (cudaDevAttrMaxSharedMemoryPerBlockOptin); SM counts are one common part of each kind.
TARGETS: dict[str, GpuTarget] = {t.name: t for t in (
    GpuTarget("sm_80", "nvidia", (8, 0), 166912, 108, tma=False, description="A100"),
    GpuTarget("sm_86", "nvidia", (8, 6), 101376, 84, tma=False, description="RTX 3090 / A10 / A40"),
    GpuTarget("sm_89", "nvidia", (8, 9), 101376, 128, tma=False, description="RTX 4090 / L40S / L4"),
    GpuTarget("sm_90", "nvidia", (9, 0), 232448, 132, tma=True, description="H100 / H200"),
    GpuTarget("sm_100", "nvidia", (10, 0), 232448, 148, tma=True, description="B200"),
    GpuTarget("sm_120", "nvidia", (12, 0), 101376, 170, tma=True, description="RTX 5090 / RTX PRO 6000"),
    GpuTarget("gfx942", "amd", (0, 0), 65536, 304, tma=False, warp_size=64, description="MI300X"),
    GpuTarget("gfx950", "amd", (0, 0), 163840, 256, tma=False, warp_size=64, description="MI355X"),
)}

# NVIDIA families with TMA (tensor descriptors): Hopper, Blackwell datacenter and consumer parts
_TMA_MAJORS = (9, 10, 11, 12)


def target(name_or_target: str | GpuTarget) -> GpuTarget:
    """A target by name ("sm_90") or as given; unknown names raise a ValueError listing the known ones."""
    if isinstance(name_or_target, GpuTarget):
        return name_or_target
    try:
        return TARGETS[name_or_target]
    except KeyError:
        raise ValueError(f"unknown GPU target {name_or_target!r}; known: {', '.join(TARGETS)}") from None


def _triton_device_properties(index: int) -> dict:
    """What Triton's own driver says of the device: the shared-memory limit its loader enforces and the SMs.

    Preferred to torch's properties: torch before 2.6 has no `shared_memory_per_block_optin` (and ROCm
    builds lack it still), and a 48 KB fallback would refuse every large tile without a word.
    """
    try:
        from triton.runtime.driver import driver

        return dict(driver.active.utils.get_device_properties(index))
    except Exception:  # noqa: BLE001 - no Triton driver here: torch's properties alone
        return {}


@functools.cache
def _device_target(index: int) -> GpuTarget:
    props = torch.cuda.get_device_properties(index)
    triton_props = _triton_device_properties(index)
    shared = int(triton_props.get("max_shared_mem") or getattr(props, "shared_memory_per_block_optin", 0)
                 or getattr(props, "shared_memory_per_block", 0) or 49152)
    if getattr(torch.version, "hip", None):
        arch = str(getattr(props, "gcnArchName", "gfx")).split(":")[0]
        known = TARGETS.get(arch)
        if not triton_props.get("max_shared_mem") and known is not None:
            shared = known.max_shared  # torch's figure for ROCm is not the LDS a block may use
        return GpuTarget(arch, "amd", (0, 0), shared, props.multi_processor_count, tma=False, warp_size=64,
                         description=props.name)
    capability = (props.major, props.minor)
    return GpuTarget(f"sm_{props.major}{props.minor}", "nvidia", capability, shared, props.multi_processor_count,
                     tma=props.major in _TMA_MAJORS, description=props.name)


def device_target(device: torch.device) -> GpuTarget:
    """The target of a real CUDA (or ROCm) device, read once per device."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _device_target(index)




# --- a stand-in for Triton's driver: compile for a target that is not here -------------------------------------------

class _StandInUtils:
    def __init__(self, gpu: GpuTarget):
        self.gpu = gpu

    def get_device_properties(self, device) -> dict[str, int]:
        return {"max_shared_mem": self.gpu.max_shared, "multiprocessor_count": self.gpu.multiprocessors,
                "max_num_regs": MAX_REGISTERS_PER_BLOCK, "warpSize": self.gpu.warp_size, "sm_clock_rate": 0,
                "mem_clock_rate": 0, "mem_bus_width": 0}


class StandInDriver:
    """What Triton's `JITFunction.run(..., warmup=True)` asks the active driver, answered for `gpu`.

    It compiles (the binder derives signature, constexprs and alignment attributes
    from the arguments, as for a launch) and never launches.
    """

    def __init__(self, gpu: GpuTarget):
        from triton.backends.compiler import GPUTarget

        self.gpu = gpu
        self.target = (GPUTarget("cuda", gpu.arch, 32) if gpu.vendor == "nvidia"
                       else GPUTarget("hip", gpu.name, gpu.warp_size))
        self.utils = _StandInUtils(gpu)

    def get_current_target(self):
        return self.target

    def get_current_device(self) -> str:
        return f"virtual-{self.gpu.name}"  # a device key of its own: the JIT caches per (kernel, device)

    def set_current_device(self, device) -> None:
        pass

    def get_current_stream(self, device=None) -> int:
        return 0

    def get_device_capability(self, device=None) -> tuple[int, int]:
        return self.gpu.capability

    def get_active_torch_device(self):
        return torch.device("cpu")

    def is_active(self) -> bool:
        return True


@contextlib.contextmanager
def stand_in_driver(gpu: GpuTarget) -> Iterator[StandInDriver]:
    """Make Triton compile for `gpu` while the context is open (nothing can launch)."""
    from triton.runtime.driver import driver

    saved = driver._active
    stand_in = StandInDriver(gpu)
    driver.set_active(stand_in)
    try:
        yield stand_in
    finally:
        driver._active = saved


__all__ = ["MAX_GRID_X", "MAX_GRID_YZ", "TARGETS", "GpuTarget", "StandInDriver", "device_target", "stand_in_driver",
           "target"]
