"""The Triton launch layer: kernel arguments from the contract, configs, launches.

Inputs are already validated (see `ops`): q ``(B, H, Sq, D)``, k and v ``(B,
H_kv, Sk, D)``, one dtype and device, unit last stride. Every kernel is
launched by keyword, so a renamed or reordered kernel parameter fails loudly.
Scalar options arrive as one `AttnSpec`; `_score_args` is the one place that
turns it into the kernels' runtime scalars and feature constexprs.

Under ``TRITON_INTERPRET=1`` the same launches run through Triton's CPU
interpreter; `_interpreter` makes its bf16 matmul exact first (or refuses bf16).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import importlib.util
import inspect
import math
import sys
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch._subclasses import fake_tensor as _fake_tensor

from . import _config, _targets
from ._contract import DENSE, AttnSpec, BiasKind, SeqLayout, SeqMode
from ._targets import GpuTarget

try:  # Triton is a Linux-only dependency; elsewhere only the torch backend exists
    import triton
    from triton.runtime.errors import OutOfResources
except ImportError:  # pragma: no cover - exercised only where triton is absent
    triton = None
    OutOfResources = RuntimeError
try:  # host-side tensor descriptors (TMA on Hopper); every Triton we support has them
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover
    TensorDescriptor = None

# How many times each Triton kernel was launched in this process: tests read it to
# prove the kernels (not the torch backend) produced a result.
launch_counts: Counter[str] = Counter()

_LOG2E = math.log2(math.e)
_kernels: ModuleType | None = None
# the config each launch site chose, keyed by everything that changes the compiled kernel (`_config_key`)
_chosen_config: dict[tuple, _config.KernelConfig] = {}


def _checkout_kernels() -> None:
    """`flashattn_py.kernels` from a plain checkout, where kernels/ sits beside flashattn_py/ (not installed under it).

    The installed package maps the repository's top-level kernels/ to `flashattn_py.kernels`
    (pyproject's package-dir); here the same directory is loaded under the same name.
    """
    root = Path(__file__).resolve().parent.parent / "kernels"
    spec = importlib.util.spec_from_file_location("flashattn_py.kernels", root / "__init__.py",
                                                  submodule_search_locations=[str(root)])
    if spec is None or not (root / "__init__.py").exists():
        raise ModuleNotFoundError("flashattn_py.kernels is neither installed nor beside flashattn_py/ in a checkout")
    module = importlib.util.module_from_spec(spec)
    sys.modules["flashattn_py.kernels"] = module
    spec.loader.exec_module(module)
    sys.modules[__package__].kernels = module  # as the import system does for a submodule


def _get_kernels() -> ModuleType | None:
    """Import the kernels on first use, so TRITON_INTERPRET set after `import flashattn_py` still counts."""
    global _kernels
    if _kernels is None and triton is not None:
        from . import _interpreter

        if importlib.util.find_spec(f"{__package__}.kernels") is None:
            _checkout_kernels()
        from . import kernels
        if type(kernels._attn_fwd).__name__ == "InterpretedFunction":
            _interpreter.make_bf16_dot_exact()
        _kernels = kernels
    return _kernels


def interpreter_active() -> bool:
    """True when the kernels were (or will be) built for Triton's CPU interpreter."""
    kernels = _get_kernels()
    if kernels is None:
        return False
    return type(kernels._attn_fwd).__name__ == "InterpretedFunction"


def uses_triton(t: torch.Tensor) -> bool:
    """Whether attention on tensors like `t` runs the Triton kernels (always inside `virtual_gpu`)."""
    if triton is None or t.dtype == torch.float64:  # float64 is the torch backend's alone
        return False
    if virtual_gpu_active():
        return True
    if t.is_cuda:
        return not interpreter_active()
    if t.device.type == "cpu":
        return interpreter_active()
    return False


# --- the virtual GPU: the launches a GPU of some kind would make, without one --------------------------------------

@dataclass
class LaunchRecord:
    """One kernel launch as `kernel[grid](**args, num_warps=config.num_warps, num_stages=config.num_stages)`.

    `args` holds the config's constexprs too. `compiled` is Triton's CompiledKernel for the
    target when the virtual GPU compiles (its ``metadata.shared`` and ``asm``), else None;
    `refused` the candidates tried first that did not fit (empty when the first choice runs).
    `positional` is the argument list the GPU's launcher would take, in the kernel's
    parameter order; `args` is built from it when first read.
    """

    name: str
    kernel: Any
    positional: list[Any]
    config: _config.KernelConfig
    grid: tuple[int, ...]
    target: GpuTarget | None = None
    compiled: Any = None
    refused: tuple[_config.KernelConfig, ...] = ()
    order: tuple[str, ...] = ()

    @functools.cached_property
    def args(self) -> dict[str, Any]:
        return dict(zip(self.order, self.positional, strict=True))

    @property
    def shared_bytes(self) -> int | None:
        return None if self.compiled is None else int(self.compiled.metadata.shared)


@dataclass
class _VirtualGpu:
    target: GpuTarget
    compile: bool
    records: list[LaunchRecord]
    chosen: dict[tuple, _config.KernelConfig]  # this GPU's own config cache, as a process on it would have
    plans: dict[tuple, tuple] = dataclasses.field(default_factory=dict)  # and its own plans (`_planned`)


# the active virtual GPU, per thread / task: another thread's real launches are never recorded instead
_active_virtual: contextvars.ContextVar[_VirtualGpu | None] = contextvars.ContextVar("flashattn_py_virtual_gpu",
                                                                                    default=None)


@contextlib.contextmanager
def virtual_gpu(target: str | GpuTarget = "sm_90", *, compile: bool = False) -> Iterator[list[LaunchRecord]]:
    """Record the launches `triton_fwd` / `triton_bwd` would make on a GPU of kind `target`; launch nothing.

    Inside, CPU tensors and CUDA tensors (FakeTensorMode's, on a machine without
    CUDA) are treated as living on that GPU: the public functions run the CUDA
    path down to the launch, with the target's configs, descriptors, grid and
    multiprocessor count. Outputs are allocated but never written.

    `compile=True` makes config choice exact: each candidate is compiled for the
    target (Triton's JIT under a stand-in driver, as a launch would compile it)
    and the first whose shared memory fits is chosen, as on the real GPU; each
    record then carries the compiled kernel. It needs real (CPU) tensors: the
    JIT reads their addresses for its alignment attributes. Without it, the
    first candidate of the target's table is chosen (the fit test proves that
    is what the GPU would pick). Chosen configs are cached per context, keyed as
    on a GPU, so a sequence of calls sees what a process on that GPU would.
    """
    records: list[LaunchRecord] = []
    token = _active_virtual.set(_VirtualGpu(_targets.target(target), compile, records, {}))
    try:
        yield records
    finally:
        _active_virtual.reset(token)


@contextlib.contextmanager
def capture_launches(capability: tuple[int, int] = (9, 0)) -> Iterator[list[LaunchRecord]]:
    """`virtual_gpu` for the NVIDIA target of `capability` (the codegen report's entry point)."""
    name = f"sm_{capability[0]}{capability[1]}"
    with virtual_gpu(name) as records:
        yield records


def virtual_gpu_active() -> bool:
    # never under torch.compile, which cannot trace a ContextVar (the custom ops' implementations ask at run time)
    return not torch.compiler.is_compiling() and _active_virtual.get() is not None


def gpu_target(t: torch.Tensor) -> GpuTarget | None:
    """The GPU `t`'s kernels would run on: the virtual one, `t`'s CUDA device, or None (the interpreter)."""
    # torch.compile cannot trace a ContextVar (a graph break); a virtual GPU is an eager-mode test bed
    virtual = None if torch.compiler.is_compiling() else _active_virtual.get()
    if virtual is not None:
        return virtual.target
    return _targets.device_target(t.device) if t.is_cuda else None


def multiprocessors(t: torch.Tensor) -> int:
    """SMs (CUs) of the GPU `t`'s kernels run on; 1 off the GPU."""
    gpu = gpu_target(t)
    return gpu.multiprocessors if gpu is not None else 1


# --- poisoned memory: what the kernels should write, and do not, shows up ----------------------------------------

_poison = False


@contextlib.contextmanager
def poison_allocations() -> Iterator[None]:
    """For tests: every output and temporary the launch layer allocates uninitialised starts as NaN.

    A row the kernels fail to write then reads NaN on any backend, the interpreter included.
    """
    global _poison
    saved, _poison = _poison, True
    try:
        yield
    finally:
        _poison = saved


def _empty(shape, like: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    t = torch.empty(shape, device=like.device, dtype=dtype or like.dtype)
    return t.fill_(float("nan")) if _poison else t


def _empty_like(t: torch.Tensor) -> torch.Tensor:
    out = torch.empty_like(t)
    return out.fill_(float("nan")) if _poison else out


# --- config choice and launch ----------------------------------------------------------------------------------------

def _heavy_scores(spec: AttnSpec, bias: torch.Tensor | None) -> bool:
    """A bias/mask tile loaded per score tile, or dropout's Philox state: the large tiles no longer fit (`_config`)."""
    return bias is not None or spec.dropout_p > 0


def _configs(kind: str, q: torch.Tensor, block_d: int, descriptors: bool = False,
             heavy_scores: bool = False) -> list[_config.KernelConfig]:
    gpu = gpu_target(q)
    if gpu is None:
        return [_config.INTERPRETER[kind]]
    return _config.candidates(kind, block_d, q.element_size(), gpu, descriptors, heavy_scores)


def is_fake(t: torch.Tensor) -> bool:
    """A FakeTensor, or a functional / wrapper subclass around one (torch.export): no values, no address."""
    return bool(_fake_tensor.is_fake(t))


def _aligned16(t: torch.Tensor) -> bool:
    """Whether t's first element is 16-byte aligned (what TMA and the JIT's alignment attribute need).

    A FakeTensor has no address; its storage stands for a fresh CUDA allocation
    (the caching allocator aligns those to 512 bytes), so its offset decides.
    """
    if is_fake(t):
        return t.storage_offset() * t.element_size() % 16 == 0
    return t.data_ptr() % 16 == 0


_constexpr_names_of: dict[int, frozenset[str]] = {}


def _constexpr_names(kernel) -> frozenset[str]:
    """The kernel's tl.constexpr parameters (a JITFunction's `params`; the interpreter's from the signature)."""
    names = _constexpr_names_of.get(id(kernel))
    if names is None:
        params = getattr(kernel, "params", None)
        if params is not None:
            names = frozenset(p.name for p in params if p.is_constexpr)
        else:
            signature = inspect.signature(getattr(kernel, "fn", kernel)).parameters.values()
            names = frozenset(p.name for p in signature if "constexpr" in str(p.annotation))
        _constexpr_names_of[id(kernel)] = names
    return names


def _key_part(value: Any) -> Any:
    """What of one runtime argument the config choice depends on: tensors by dtype and alignment."""
    if isinstance(value, torch.Tensor):
        return value.dtype, _aligned16(value)
    return None  # runtime scalars: Triton specializes ints (== 1, % 16), which changes no tile or buffer size


def _config_key(name: str, kernel, gpu: GpuTarget | None, args: dict[str, Any]) -> tuple:
    """A launch site's identity for the config cache: what decides which candidate fits the GPU.

    The GPU, every constexpr by value (bias kind, dropout, score modifiers, descriptors,
    sequence mode, head dim, ...) and every tensor's dtype and alignment: what sets the
    tiles, the buffers and so the shared memory of each candidate. Runtime scalars do not
    enter (Triton's divisibility specialization of an int changes vector widths, not sizes),
    nor do the per-config arguments (block sizes, EVEN_* flags), which the candidate sets.
    """
    constexprs = _constexpr_names(kernel)
    return (name, gpu, *((k, v) if k in constexprs else (k, _key_part(v))
                         for k, v in args.items() if k in constexprs or isinstance(v, torch.Tensor)))


def _check_grid(name: str, grid: tuple[int, ...], gpu: GpuTarget | None, cfg: _config.KernelConfig) -> tuple[int, ...]:
    """The grid, or a clear error where it passes the GPU's limits (CUDA: 2**31 - 1 blocks on axis 0, 65,535
    on axes 1 and 2; HIP: also 2**32 - 1 threads along axis 0)."""
    too_many = grid[0] > _targets.MAX_GRID_X or any(n > _targets.MAX_GRID_YZ for n in grid[1:])
    if gpu is not None and gpu.vendor == "amd":
        too_many |= grid[0] * cfg.num_warps * gpu.warp_size > _targets.MAX_HIP_GRID_THREADS
    if too_many:
        raise ValueError(f"flashattn_py: {name}'s grid {grid} passes the GPU's grid limits (axis 0 <= "
                         f"{_targets.MAX_GRID_X} blocks, axes 1 and 2 <= {_targets.MAX_GRID_YZ}); the problem is too "
                         f"large for one launch")
    return grid


# B * H (or dBias's tiles) above this go on grid axis 0 with the row blocks (FLAT_GRID): CUDA allows 65,535
# on axes 1 and 2. Tests lower it to run the flat grids on small problems.
FLAT_GRID_ABOVE = _targets.MAX_GRID_YZ


def _flat(*axes: int) -> bool:
    return any(n > FLAT_GRID_ABOVE for n in axes)


def _rows_grid(row_blocks: int, heads: int, flat: bool, *rest: int) -> tuple[int, ...]:
    """(row blocks, heads, *rest), or (row blocks * heads, *rest) when flat (`kernels.tiles._program_ids`)."""
    return (row_blocks * heads, *rest) if flat else (row_blocks, heads, *rest)


def _compile(kernel, grid: tuple, args: dict[str, Any], cfg: _config.KernelConfig, gpu: GpuTarget, virtual: bool):
    """The CompiledKernel `kernel[grid](**args)` builds for `gpu`, compiled, not launched (None if Triton's
    JIT hands back none: a cache hook that took over, say)."""
    options = dict(grid=grid, warmup=True, num_warps=cfg.num_warps, num_stages=cfg.num_stages, **args)
    if virtual:
        with _targets.stand_in_driver(gpu):
            compiled = kernel.run(**options)
    else:
        compiled = kernel.run(**options)
    if hasattr(compiled, "result") and not hasattr(compiled, "metadata"):  # asynchronous compile: a future
        compiled = compiled.result()
    return compiled if hasattr(compiled, "metadata") else None


def _fits(compiled, gpu: GpuTarget, real: bool) -> bool:
    """Whether a compiled candidate can launch on `gpu`: its shared memory within the GPU's; on a real GPU
    also everything Triton checks when it loads the module (threads per block for the registers used,
    Blackwell's tensor memory), without launching it."""
    if compiled is None:
        return True  # nothing to read: the launch itself decides, and its OutOfResources moves on
    if int(compiled.metadata.shared) > gpu.max_shared:
        return False
    if real and hasattr(compiled, "_init_handles"):
        try:
            compiled._init_handles()
        except OutOfResources:
            return False
    return True


def _choose(name: str, kernel, args: dict[str, Any], grid: Callable[[_config.KernelConfig], tuple],
            per_config: Callable[[_config.KernelConfig], dict], configs: list[_config.KernelConfig],
            gpu: GpuTarget | None):
    """(config, its CompiledKernel or None, the candidates refused first): the first of `configs` that fits.

    On a GPU a candidate is compiled (or found in Triton's cache) and checked against the GPU's
    limits before anything launches; the choice is remembered per `_config_key`. Under
    `virtual_gpu` the same choice is made for the target when it compiles.
    """
    virtual = _active_virtual.get()
    cache = virtual.chosen if virtual is not None else _chosen_config
    key = _config_key(name, kernel, gpu, args)
    cfg = cache.get(key)
    compiled = None
    refused: list[_config.KernelConfig] = []
    if cfg is None:
        if gpu is None or (virtual is not None and not virtual.compile):
            cfg = configs[0]  # the interpreter has no limits; an uncompiled virtual GPU takes the table's choice
        else:
            sizes = []
            for candidate in configs:
                compiled = _compile(kernel, _check_grid(name, tuple(grid(candidate)), gpu, candidate),
                                    {**args, **per_config(candidate)}, candidate, gpu, virtual is not None)
                if _fits(compiled, gpu, real=virtual is None):
                    cfg = candidate
                    break
                refused.append(candidate)
                sizes.append(f"{candidate}: {int(compiled.metadata.shared)} B")
            if cfg is None:
                raise RuntimeError(f"flashattn_py: no launch configuration of {name} fits this GPU "
                                   f"({gpu.max_shared} B of shared memory; {'; '.join(sizes)})")
        cache[key] = cfg
    return cfg, compiled, tuple(refused)


@dataclass
class _Planned:
    """One kernel launch, decided once per call signature (FlashInfer's plan/run split).

    `static` holds every argument the signature fixes: constexprs, strides, lengths, the
    score scalars, the config's block sizes. Per call only the tensors change (`slots`;
    descriptors are rebased on their tensor). On a GPU `runner` is the compiled kernel's own
    launcher (`CompiledKernel[grid]`): a call skips Triton's argument binding,
    specialization and cache lookup, which the signature has already decided (the plan
    key holds every tensor's dtype, shape, strides and 16-byte alignment, and every
    scalar the kernel sees is a function of the key).
    """

    name: str
    kernel: Any
    config: _config.KernelConfig
    grid: tuple[int, ...]
    static: dict[str, Any]
    descriptors: dict[str, tuple[str, Any]]  # *_DESC argument -> (its tensor's argument, the validated template)
    order: tuple[str, ...]  # the kernel's parameters, in order
    template: list[Any]  # positional arguments with the static ones filled in
    slots: tuple[tuple[int, str], ...]  # (position, argument) filled per call
    runner: Callable | None = None
    compiled: Any = None
    refused: tuple[_config.KernelConfig, ...] = ()


# Set by the tests: every call re-derives its plan from scratch and checks it against the cached one, so a key
# that misses something the launch depends on fails the suite instead of launching a stale plan.
CHECK_PLANS = False
# signature -> the launches of one call; the virtual GPU keeps its own
_plans: dict[tuple, tuple[_Planned, ...]] = {}


def forget_plans() -> None:
    """Drop every cached plan and config choice (as in a fresh process)."""
    _plans.clear()
    _chosen_config.clear()


def _plan_cache() -> dict[tuple, tuple[_Planned, ...]]:
    virtual = _active_virtual.get()
    return virtual.plans if virtual is not None else _plans


def _param_names(kernel) -> tuple[str, ...]:
    names = getattr(kernel, "arg_names", None)
    if names is None:  # the interpreter's function: its signature
        names = list(inspect.signature(getattr(kernel, "fn", kernel)).parameters)
    return tuple(names)


def _plan_launch(name: str, kernel, args: dict[str, Any], grid: Callable[[_config.KernelConfig], tuple],
                 per_config: Callable[[_config.KernelConfig], dict], configs: list[_config.KernelConfig],
                 gpu: GpuTarget | None, slots: frozenset[str], descriptor_sources: dict[str, str] | None = None,
                 decided: _Planned | None = None) -> _Planned:
    """Decide one launch: its config (`_choose`, or `decided`'s when re-deriving a plan to check it), grid and
    static arguments. `slots` names the arguments taken from each call's tensors; `descriptor_sources` maps each
    *_DESC argument to the tensor it describes."""
    virtual = _active_virtual.get()
    compiled, refused = None, ()
    if decided is None:
        cfg, compiled, refused = _choose(name, kernel, args, grid, per_config, configs, gpu)
    else:
        cfg = decided.config
    launch_grid = _check_grid(name, tuple(grid(cfg)), gpu, cfg)
    full = {**args, **per_config(cfg)}
    sources = descriptor_sources or {}
    descriptors = {n: (src, full[n]) for n, src in sources.items() if full.get(n) is not None}
    static = {n: value for n, value in full.items() if n not in slots and n not in descriptors}
    order = _param_names(kernel)
    if set(order) != set(full):
        raise TypeError(f"flashattn_py: {name}'s arguments do not match its parameters: "
                        f"missing {sorted(set(order) - set(full))}, unknown {sorted(set(full) - set(order))}")
    runner = None
    if decided is None and gpu is not None:
        if virtual is None:
            compiled = compiled or _compile(kernel, launch_grid, full, cfg, gpu, False)
            # loads the module on this device (checked to fit by `_choose`); None if a cache hook took over
            runner = compiled[launch_grid] if compiled is not None and hasattr(compiled, "__getitem__") else None
        elif virtual.compile and compiled is None:
            compiled = _compile(kernel, launch_grid, full, cfg, virtual.target, True)
    return _Planned(name, kernel, cfg, launch_grid, static, descriptors, order, [static.get(n) for n in order],
                    tuple((i, n) for i, n in enumerate(order) if n not in static), runner, compiled, refused)


def _rebased(template, t: torch.Tensor):
    """`template` (a validated TensorDescriptor of a tensor with t's shape, strides and alignment) over `t`."""
    descriptor = object.__new__(type(template))
    descriptor.__dict__.update(template.__dict__)
    descriptor.base = t
    return descriptor


def _same_plan(cached: tuple[_Planned, ...], fresh: tuple[_Planned, ...]) -> None:
    """CHECK_PLANS: the plan re-derived for this call must be the cached one."""
    for a, b in zip(cached, fresh, strict=True):
        same = (a.name == b.name and a.grid == b.grid and a.static == b.static
                and {n: (s, d.shape, d.strides, d.block_shape) for n, (s, d) in a.descriptors.items()}
                == {n: (s, d.shape, d.strides, d.block_shape) for n, (s, d) in b.descriptors.items()})
        if not same:
            diff = sorted(n for n in set(a.static) | set(b.static) if a.static.get(n) != b.static.get(n))
            raise AssertionError(f"flashattn_py: the cached plan of {a.name} differs from this call's "
                                 f"(grid {a.grid} vs {b.grid}; arguments {diff}): its key misses something")


def _planned(key: tuple, derive: Callable[[tuple[_Planned, ...] | None], tuple[_Planned, ...]]
             ) -> tuple[_Planned, ...]:
    """The cached plan of `key`, derived on first sight (and re-derived and compared under CHECK_PLANS)."""
    plans = _plan_cache()
    cached = plans.get(key)
    if cached is None:
        cached = plans[key] = derive(None)
    elif CHECK_PLANS:
        _same_plan(cached, derive(cached))
    return cached


def _run(p: _Planned, tensors: dict[str, Any]) -> None:
    """Launch a planned kernel on this call's tensors (under `virtual_gpu`, record it instead)."""
    values = {n: tensors[n] for _, n in p.slots if n not in p.descriptors}
    for n, (source, template) in p.descriptors.items():
        values[n] = _rebased(template, tensors[source])
    virtual = _active_virtual.get()
    if virtual is not None or p.runner is not None:
        args = p.template.copy()
        for i, n in p.slots:
            args[i] = values[n]
        if virtual is not None:  # what the GPU's launcher would be handed, kept instead
            virtual.records.append(LaunchRecord(p.name, p.kernel, args, p.config, p.grid, virtual.target,
                                                p.compiled, p.refused, p.order))
            return
        p.runner(*args)
    else:  # the interpreter (or a compile Triton handed no kernel for): Triton's own launch
        p.kernel[p.grid](**p.static, **values, num_warps=p.config.num_warps, num_stages=p.config.num_stages)
    launch_counts[p.name] += 1


def _signature(*tensors: torch.Tensor | None) -> tuple:
    """What a plan depends on in a call's input tensors: each one's dtype, shape, strides and 16-byte alignment.

    Outputs and temporaries are left out: the launch layer allocates them fresh, their shapes
    and strides follow from the inputs', and a fresh allocation is aligned (CUDA's to 512
    bytes, the CPU's to 64).
    """
    return tuple(None if t is None else
                 (t.dtype, t.shape, t.stride(), t.data_ptr() % 16 == 0 if type(t) is torch.Tensor else _aligned16(t))
                 for t in tensors)


def _switches(q: torch.Tensor, gpu: GpuTarget | None) -> tuple:
    """Process-wide settings a plan depends on: the GPU (and the device a runner is loaded on), TF32 for fp32
    matmuls, the test switches for descriptors and flat grids."""
    tf32 = q.dtype == torch.float32 and _allow_tf32()
    return gpu, q.device, tf32, _config.INTERPRETER_STREAM_DESCRIPTORS, FLAT_GRID_ABOVE


# --- kernel arguments from the contract -----------------------------------------------------------------------------

def _allow_tf32() -> bool:
    """torch.backends.cuda.matmul.allow_tf32, read without its deprecation machinery (this runs per call)."""
    get = getattr(torch._C, "_get_cublas_allow_tf32", None)
    if get is not None:
        return bool(get())
    with warnings.catch_warnings():  # pragma: no cover - torch without the private getter
        warnings.simplefilter("ignore")
        return bool(torch.backends.cuda.matmul.allow_tf32)


def _dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs multiply in IEEE fp32 unless the user allowed TF32 for matmuls."""
    if dtype != torch.float32:
        return "tf32"  # ignored by tl.dot for 16-bit inputs
    return "tf32" if _allow_tf32() else "ieee"


def _block_d(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))


def _rows(prefix: str, t: torch.Tensor, packed: bool = False, row: str = "m") -> dict[str, int]:
    """stride_{prefix}b/h/{row} of a (B, H, S, D) tensor; packed (1, H, total, D) views have no batch stride."""
    return {f"stride_{prefix}b": 0 if packed else t.stride(0), f"stride_{prefix}h": t.stride(1),
            f"stride_{prefix}{row}": t.stride(2)}


def _even(rows: int, block: int, packed: bool) -> bool:
    """EVEN_M / EVEN_N: every row block is full, so loads and stores need no row mask (never for packed)."""
    return not packed and rows % block == 0


def _bias_view(bias: torch.Tensor | None, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor | None:
    """The bias as the kernels read it: expanded to (B, H, Sq, Sk) (broadcast dims get stride 0), a bool mask as
    its bytes (Triton loads it as integers)."""
    if bias is None:
        return None
    full = bias.expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    return full.view(torch.uint8) if full.dtype == torch.bool else full


def _bias_strides(view: torch.Tensor | None) -> dict[str, int]:
    strides = view.stride() if view is not None else (0, 0, 0, 0)
    return dict(zip(("stride_biasb", "stride_biash", "stride_biasm", "stride_biasn"), strides, strict=True))


def _alibi_strides(alibi: torch.Tensor | None) -> dict[str, int]:
    """ALIBI slopes' strides: (H,) slopes broadcast over the batch with stride 0."""
    if alibi is None:
        return dict(stride_alibib=0, stride_alibih=0)
    if alibi.dim() == 1:
        return dict(stride_alibib=0, stride_alibih=alibi.stride(0))
    return dict(stride_alibib=alibi.stride(0), stride_alibih=alibi.stride(1))


def _score_args(spec: AttnSpec, alibi: torch.Tensor | None) -> dict[str, Any]:
    """The spec as the kernels take it: runtime scalars of `_score_mods` and the band, and feature constexprs.

    With softcap the kernels compute c * tanh(scale * qk / c) in base 2, so they
    get qk_scale = scale / c and softcap_log2 = c * log2(e); otherwise qk_scale =
    scale * log2(e).
    """
    if spec.softcap > 0:
        qk_scale, softcap_log2 = spec.scale / spec.softcap, spec.softcap * _LOG2E
    else:
        qk_scale, softcap_log2 = spec.scale * _LOG2E, 0.0
    return dict(offset=spec.offset, window_left=spec.window_left, window_right=spec.window_right,
                qk_scale=qk_scale, softcap_log2=softcap_log2, dropout_p=spec.dropout_p,
                HAS_LEFT=spec.window_left >= 0, HAS_RIGHT=spec.window_right >= 0, SOFTCAP=spec.softcap > 0,
                ALIBI_ON=alibi is not None, BIAS_KIND=int(spec.bias_kind), DROPOUT=spec.dropout_p > 0)


def _device_of(t: torch.Tensor):
    """Triton launches on the current CUDA device (and its current stream): make it the tensor's."""
    return torch.cuda.device(t.device) if t.is_cuda and not virtual_gpu_active() else contextlib.nullcontext()


def _stream_descriptors(kind: str, q: torch.Tensor, seq: SeqLayout, *streamed: torch.Tensor,
                        heavy_scores: bool = False) -> bool:
    """Whether a pass reads the operands its loop streams through tensor descriptors (TMA), not per-thread pointers.

    The streamed operands are K and V in the forward and the dQ pass, Q and dO in the dK/dV pass.
    Dense layout, 16-bit inputs, and what TMA needs: a 16-byte aligned base and non-zero
    strides that are multiples of 16 bytes (an expanded, stride-0 K/V keeps pointers:
    cuTensorMapEncodeTiled documents strides as multiples of 16 that describe distinct rows, and
    we do not rely on the driver accepting 0). On a GPU where `_config.stream_descriptors` takes
    them (TMA and Hopper's shared memory: sm_90, sm_100; never AMD); under the interpreter when
    `_config.INTERPRETER_STREAM_DESCRIPTORS` is set (the tests run both paths). Paged caches,
    packed sequences, fp32 and older GPUs keep pointers.
    """
    if TensorDescriptor is None or seq.mode != SeqMode.DENSE or q.dtype not in (torch.float16, torch.bfloat16):
        return False
    gpu = gpu_target(q)
    if gpu is None and not _config.INTERPRETER_STREAM_DESCRIPTORS:
        return False
    if not _config.stream_descriptors(kind, _block_d(q.shape[3]), gpu, heavy_scores):
        return False
    elem = q.element_size()
    return all(_aligned16(t) and t.shape[3] * elem >= 16 and t.stride(3) == 1
               and all(stride > 0 and stride * elem % 16 == 0
                       for stride, n in zip(t.stride()[:3], t.shape[:3], strict=True) if n > 1)
               for t in streamed)


def _descriptor(t: torch.Tensor, block_rows: int, block_d: int):
    """A (B, H, S, D) descriptor with [1, 1, block_rows, block_d] boxes; out-of-bounds rows and columns read 0.

    A size-1 dim's stride is never stepped along; it is rounded up to the 16 bytes TMA wants.
    """
    align = 16 // t.element_size()
    strides = [stride if n > 1 else max(align, -(-stride // align) * align)
               for stride, n in zip(t.stride()[:3], t.shape[:3], strict=True)]
    return TensorDescriptor(t, list(t.shape), [*strides, 1], [1, 1, block_rows, block_d])


def _descriptor_args(use: bool, tensors: dict[str, torch.Tensor], block_rows: int, block_d: int) -> dict[str, Any]:
    """The *_DESC kernel arguments of one config: descriptors whose box is one streamed tile, or None."""
    return {name: _descriptor(t, block_rows, block_d) if use else None for name, t in tensors.items()}


def _packed_zeros(t: torch.Tensor) -> torch.Tensor:
    """A zeroed (1, H, total, D) view of a fresh packed (total, H, D) tensor, for outputs of packed inputs.

    Zeroed, not empty: rows past cu_seqlens[-1] (a buffer padded to a fixed token count)
    belong to no sequence, the kernels never visit them, and they must read 0 (output and
    gradients alike), not garbage.
    """
    return torch.zeros_like(t.transpose(1, 2).select(0, 0)).unsqueeze(0).transpose(1, 2)


# --- launchers ------------------------------------------------------------------------------------------------------

def _need_seed(spec: AttnSpec, seed: torch.Tensor | None) -> None:
    if spec.dropout_p > 0 and not isinstance(seed, torch.Tensor):
        raise ValueError("dropout needs its Philox key as an int64 (1,) tensor on q's device (ops.new_seed), "
                         f"got seed={seed!r}")


def triton_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None,
               alibi: torch.Tensor | None, spec: AttnSpec, seq: SeqLayout = DENSE,
               num_splits: int = 1, seed: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """O and LSE (natural log, float32) from the forward kernel.

    Dense: O like q, LSE (B, H, Sq). Packed (q/k/v as (1, H, total, D) views):
    O (1, H, total, D) view of a packed (total, H, D) tensor, LSE (H, total); rows
    past cu_seqlens_q[-1] get O = 0 and LSE = -inf. num_splits > 1 (KV cache):
    partial results merged here by their LSE. `seed` (int64, on q's device) is the
    Philox key when spec.dropout_p > 0; the kernel reads it (`spec.seed` is not used).
    Planned once per call signature (`_planned`); a call allocates its outputs and launches.
    """
    _need_seed(spec, seed)
    _, H, Sq, D = q.shape
    packed = seq.mode == SeqMode.PACKED
    B = seq.batch if packed else q.shape[0]
    splits = max(num_splits, 1)
    gpu = gpu_target(q)
    if packed:
        o = _packed_zeros(q)
        lse = torch.full((H, Sq), float("-inf"), device=q.device, dtype=torch.float32)
    elif splits > 1:
        o = _empty((splits, B, H, Sq, D), q, torch.float32)
        lse = _empty((splits, B, H, Sq), q, torch.float32)
    else:
        o = _empty_like(q)
        lse = _empty((B, H, Sq), q, torch.float32)
    tensors = dict(Q=q, K=k, V=v, O=o, LSE=lse, BIAS=_bias_view(bias, q, k), ALIBI=alibi,
                   CU_Q=seq.cu_seqlens_q if packed else None, CU_K=seq.cu_seqlens_k if packed else None,
                   SEQLENS_K=seq.seqlens_k, BLOCK_TABLE=seq.block_table, SEED=seed if spec.dropout_p > 0 else None)
    key = ("fwd", _signature(q, k, v, bias, alibi, seq.cu_seqlens_q, seq.cu_seqlens_k, seq.seqlens_k,
                             seq.block_table, tensors["SEED"]),
           spec, seq.mode, seq.max_seqlen_q, seq.max_seqlen_k, splits, _switches(q, gpu))
    plan = _planned(key, lambda decided: _plan_fwd(tensors, spec, seq, splits, gpu, decided))
    with _device_of(q):
        _run(plan[0], tensors)
    if plan[0].static["STREAM_DESC"] and not virtual_gpu_active():
        launch_counts["attn_fwd:descriptors"] += 1
    if splits > 1:  # flash-decoding: merge the splits by their log-sum-exp
        lse_all = torch.logsumexp(lse, dim=0)
        weights = torch.exp(lse - torch.where(torch.isneginf(lse_all), torch.inf, lse_all))
        return (weights.unsqueeze(-1) * o).sum(0).to(q.dtype), lse_all
    return o, lse


def _plan_fwd(tensors: dict[str, Any], spec: AttnSpec, seq: SeqLayout, splits: int, gpu: GpuTarget | None,
              decided: tuple[_Planned, ...] | None) -> tuple[_Planned, ...]:
    kernels = _get_kernels()
    q, k, v, o, lse, bias, alibi = (tensors[n] for n in ("Q", "K", "V", "O", "LSE", "BIAS", "ALIBI"))
    _, H, Sq, D = q.shape
    packed = seq.mode == SeqMode.PACKED
    paged = seq.block_table is not None
    B = seq.batch if packed else q.shape[0]
    max_q = seq.max_seqlen_q if packed else Sq
    seqlen_k = k.shape[2] if not paged else seq.block_table.shape[1] * k.shape[2]
    block_d = _block_d(D)
    if packed:
        o_strides = dict(stride_os=0, stride_ob=0, stride_oh=o.stride(1), stride_om=o.stride(2))
        lse_strides = dict(stride_lses=0, stride_lseb=0, stride_lseh=Sq)
    elif splits > 1:
        o_strides = dict(zip(("stride_os", "stride_ob", "stride_oh", "stride_om"), o.stride()[:4], strict=True))
        lse_strides = dict(zip(("stride_lses", "stride_lseb", "stride_lseh"), lse.stride()[:3], strict=True))
    else:
        o_strides = dict(stride_os=0, **_rows("o", o))
        lse_strides = dict(stride_lses=0, stride_lseb=lse.stride(0), stride_lseh=lse.stride(1))

    decoding = seq.mode == SeqMode.KV_CACHE and Sq <= _config.DECODE_MAX_QUERIES and gpu is not None
    if decoding:  # do not spend a 128-row tile on a handful of queries
        configs = _config.decode_configs(block_d, q.element_size(), gpu)
    else:
        configs = _configs("fwd", q, block_d, heavy_scores=_heavy_scores(spec, bias))
    args = dict(
        tensors, K_DESC=None, V_DESC=None, **_bias_strides(bias), **_alibi_strides(alibi),
        **_rows("q", q, packed), **_rows("k", k, packed, "n"), **_rows("v", v, packed, "n"), **o_strides,
        **lse_strides,
        **dict(zip(("stride_tableb", "stride_tablep"), seq.block_table.stride() if paged else (0, 0), strict=True)),
        num_heads=H, kv_group=H // k.shape[1], seqlen_q=Sq, seqlen_k=seqlen_k, page_size=k.shape[2] if paged else 1,
        **_score_args(spec, alibi),
        HEAD_DIM=D, BLOCK_D=block_d, SEQ_MODE=int(seq.mode), PAGED=paged, EVEN_D=block_d == D,
        DOT_PRECISION=_dot_precision(q.dtype),
        # scores that are scale * q k^T and nothing else: the unmasked stage folds the scale into exp2
        PLAIN_SCORES=spec.softcap == 0 and alibi is None and spec.bias_kind == BiasKind.NONE,
        NEG_SCALE=spec.scale < 0, STREAM_DESC=_stream_descriptors("fwd", q, seq, k, v), FLAT_GRID=_flat(B * H),
    )

    def per_config(c: _config.KernelConfig) -> dict[str, Any]:
        # split boundaries fall on this config's key blocks; one split covers every key
        split_len = triton.cdiv(triton.cdiv(seqlen_k, splits), c.block_n) * c.block_n if splits > 1 else \
            max(seqlen_k, 1)
        return dict(BLOCK_M=c.block_m, BLOCK_N=c.block_n, EVEN_M=_even(Sq, c.block_m, packed), split_len=split_len,
                    num_row_blocks=triton.cdiv(max_q, c.block_m),
                    **_descriptor_args(args["STREAM_DESC"], dict(K_DESC=k, V_DESC=v), c.block_n, block_d))

    with _device_of(q):
        return (_plan_launch("attn_fwd", kernels._attn_fwd, args,
                             lambda c: _rows_grid(triton.cdiv(max_q, c.block_m), B * H, args["FLAT_GRID"], splits),
                             per_config, configs, gpu, frozenset(tensors), dict(K_DESC="K", V_DESC="V"),
                             decided and decided[0]),)


def triton_bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
               lse: torch.Tensor, dlse: torch.Tensor | None, bias: torch.Tensor | None, alibi: torch.Tensor | None,
               need_dbias: bool, spec: AttnSpec, seq: SeqLayout = DENSE, seed: torch.Tensor | None = None,
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """dQ, dK, dV (like q, k, v) and dBias (bias's shape, float32) from the backward kernels.

    Packed: rows past cu_seqlens[-1] get zero gradients. `seed` is the forward's Philox key
    (a device tensor) when spec.dropout_p > 0. Planned once per call signature, as the forward.
    """
    _need_seed(spec, seed)
    packed = seq.mode == SeqMode.PACKED
    gpu = gpu_target(q)
    dq, dk, dv = (_packed_zeros(t) if packed else _empty_like(t) for t in (q, k, v))
    tensors = dict(Q=q, K=k, V=v, DO=do, O=o, LSE=lse, DELTA=_empty_like(lse),
                   DLSE=dlse.contiguous() if dlse is not None else None, DQ=dq, DK=dk, DV=dv,
                   BIAS=_bias_view(bias, q, k), ALIBI=alibi, CU_Q=seq.cu_seqlens_q if packed else None,
                   CU_K=seq.cu_seqlens_k if packed else None, SEED=seed if spec.dropout_p > 0 else None,
                   DBIAS=_empty(bias.shape, q, torch.float32) if need_dbias else None)
    key = ("bwd", _signature(q, k, v, do, o, lse, tensors["DLSE"], bias, alibi, seq.cu_seqlens_q, seq.cu_seqlens_k,
                             tensors["SEED"]), spec, seq.mode, seq.max_seqlen_q, seq.max_seqlen_k, _switches(q, gpu))
    plan = _planned(key, lambda decided: _plan_bwd(tensors, spec, seq, gpu, decided))
    with _device_of(q):
        for launch in plan:
            _run(launch, tensors)
    if not virtual_gpu_active():
        launch_counts["attn_bwd_dkdv:descriptors"] += plan[1].static["STREAM_DESC"]
        launch_counts["attn_bwd_dq:descriptors"] += plan[2].static["STREAM_DESC"]
    return dq, dk, dv, tensors["DBIAS"]


def _plan_bwd(tensors: dict[str, Any], spec: AttnSpec, seq: SeqLayout, gpu: GpuTarget | None,
              decided: tuple[_Planned, ...] | None) -> tuple[_Planned, ...]:
    kernels = _get_kernels()
    q, k, v, do, o, lse, dlse, dq, dk, dv, bias, alibi, dbias = (
        tensors[n] for n in ("Q", "K", "V", "DO", "O", "LSE", "DLSE", "DQ", "DK", "DV", "BIAS", "ALIBI", "DBIAS"))
    _, H, Sq, D = q.shape
    packed = seq.mode == SeqMode.PACKED
    B = seq.batch if packed else q.shape[0]
    H_kv, Sk = k.shape[1], k.shape[2]
    max_q = seq.max_seqlen_q if packed else Sq
    max_k = seq.max_seqlen_k if packed else Sk
    block_d = _block_d(D)
    slots = frozenset(tensors)
    pre = list(_config.PREPROCESS) if gpu is not None else [_config.INTERPRETER["preprocess"]]
    pre_batch = 1 if packed else B  # the preprocess is row-wise: packed rows are one long "sequence"
    lse_strides = dict(stride_lseb=0, stride_lseh=Sq) if packed else dict(stride_lseb=lse.stride(0),
                                                                           stride_lseh=lse.stride(1))
    # what the three main passes share: inputs, per-row statistics, the spec, the layout
    common = dict(
        Q=q, K=k, V=v, DO=do, LSE=lse, DELTA=tensors["DELTA"], ALIBI=alibi, SEED=tensors["SEED"],
        **_alibi_strides(alibi),
        **_rows("q", q, packed), **_rows("k", k, packed, "n"), **_rows("v", v, packed, "n"),
        **_rows("do", do, packed), num_heads=H, kv_group=H // H_kv, seqlen_q=Sq, seqlen_k=Sk,
        **_score_args(spec, alibi), HEAD_DIM=D, BLOCK_D=block_d, EVEN_D=block_d == D,
        DOT_PRECISION=_dot_precision(q.dtype),
    )
    layout = dict(CU_Q=tensors["CU_Q"], CU_K=tensors["CU_K"], SEQ_MODE=int(seq.mode), sm_scale=spec.scale,
                  BIAS=bias, **_bias_strides(bias), **lse_strides)

    def earlier(i: int) -> _Planned | None:
        return decided[i] if decided else None

    with _device_of(q):
        plans = [
            _plan_launch("attn_bwd_preprocess", kernels._attn_bwd_preprocess,
                         dict(O=o, DO=do, DLSE=dlse, DELTA=tensors["DELTA"], **_rows("o", o), **_rows("do", do),
                              num_heads=H, seqlen_q=Sq, HEAD_DIM=D, BLOCK_D=block_d, HAS_DLSE=dlse is not None,
                              EVEN_D=block_d == D, FLAT_GRID=_flat(pre_batch * H)),
                         lambda c: _rows_grid(triton.cdiv(Sq, c.block_m), pre_batch * H, _flat(pre_batch * H)),
                         lambda c: dict(BLOCK_M=c.block_m, EVEN_M=Sq % c.block_m == 0,
                                        num_row_blocks=triton.cdiv(Sq, c.block_m)), pre, gpu, slots,
                         decided=earlier(0))]
        qdo_desc = _stream_descriptors("dkdv", q, seq, q, do, heavy_scores=_heavy_scores(spec, bias))
        plans.append(_plan_launch(
            "attn_bwd_dkdv", kernels._attn_bwd_dkdv,
            dict(common, DK=dk, DV=dv, Q_DESC=None, DO_DESC=None, **_rows("dk", dk, packed, "n"),
                 **_rows("dv", dv, packed, "n"), **layout, STREAM_DESC=qdo_desc, FLAT_GRID=_flat(B * H_kv)),
            lambda c: _rows_grid(triton.cdiv(max_k, c.block_n), B * H_kv, _flat(B * H_kv)),
            lambda c: dict(BLOCK_M=c.block_m, BLOCK_N=c.block_n, MASKED_BLOCK_M=c.masked_rows,
                           EVEN_M=_even(Sq, c.block_m, packed), EVEN_N=_even(Sk, c.block_n, packed),
                           num_row_blocks=triton.cdiv(max_k, c.block_n),
                           **_descriptor_args(qdo_desc, dict(Q_DESC=q, DO_DESC=do), c.block_m, block_d)),
            _configs("dkdv", q, block_d, qdo_desc, _heavy_scores(spec, bias)), gpu, slots,
            dict(Q_DESC="Q", DO_DESC="DO"), earlier(1)))
        kv_desc = _stream_descriptors("dq", q, seq, k, v)
        plans.append(_plan_launch(
            "attn_bwd_dq", kernels._attn_bwd_dq,
            dict(common, DQ=dq, K_DESC=None, V_DESC=None, **_rows("dq", dq, packed), **layout, STREAM_DESC=kv_desc,
                 FLAT_GRID=_flat(B * H)),
            lambda c: _rows_grid(triton.cdiv(max_q, c.block_m), B * H, _flat(B * H)),
            lambda c: dict(BLOCK_M=c.block_m, BLOCK_N=c.block_n, EVEN_M=_even(Sq, c.block_m, packed),
                           num_row_blocks=triton.cdiv(max_q, c.block_m),
                           **_descriptor_args(kv_desc, dict(K_DESC=k, V_DESC=v), c.block_n, block_d)),
            _configs("dq", q, block_d, heavy_scores=_heavy_scores(spec, bias)), gpu, slots,
            dict(K_DESC="K", V_DESC="V"), earlier(2)))
        if dbias is not None:
            # a bias dim of size 1 (against a larger problem dim) is summed over inside the kernel
            bcast = [dbias.shape[i] == 1 and n > 1 for i, n in enumerate((B, H, Sq, Sk))]
            args = dict(common, BIAS=bias, **_bias_strides(bias), DBIAS=dbias, batch=B, BCAST_B=bcast[0],
                        BCAST_H=bcast[1], BCAST_M=bcast[2], BCAST_N=bcast[3],
                        **dict(zip(("stride_dbb", "stride_dbh", "stride_dbm", "stride_dbn"), dbias.stride(),
                                   strict=True)))
            del args["BIAS_KIND"]  # the dBias pass always has a float bias

            def dbias_tiles(c: _config.KernelConfig) -> tuple[int, int]:
                return (1 if bcast[2] else triton.cdiv(Sq, c.block_m)), (1 if bcast[3] else triton.cdiv(Sk, c.block_n))

            bias_heads = dbias.shape[0] * dbias.shape[1]
            # column tiles on axis 1 pass 65,535 only past S = 2**21 even at BLOCK_N = 32: the smallest block is
            # the bound; past it (or past 65,535 bias heads) the grid is flat
            args["FLAT_GRID"] = _flat(bias_heads, 1 if bcast[3] else triton.cdiv(Sk, 16))

            def dbias_grid(c: _config.KernelConfig) -> tuple[int, ...]:
                m_tiles, n_tiles = dbias_tiles(c)
                return (m_tiles * n_tiles * bias_heads,) if args["FLAT_GRID"] else (m_tiles, n_tiles, bias_heads)

            plans.append(_plan_launch(
                "attn_bwd_dbias", kernels._attn_bwd_dbias, args, dbias_grid,
                lambda c: dict(BLOCK_M=c.block_m, BLOCK_N=c.block_n, num_row_blocks=dbias_tiles(c)[0],
                               num_col_blocks=dbias_tiles(c)[1]),
                _configs("dbias", q, block_d, heavy_scores=True), gpu, slots, decided=earlier(3)))
    return tuple(plans)


__all__ = ["LaunchRecord", "capture_launches", "forget_plans", "gpu_target", "interpreter_active", "launch_counts",
           "multiprocessors", "poison_allocations", "triton_bwd", "triton_fwd", "uses_triton", "virtual_gpu",
           "virtual_gpu_active"]
