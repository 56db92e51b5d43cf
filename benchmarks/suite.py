"""Cases, timing and records of the benchmark suite.

FLOPs follow FlashAttention's convention (ANCHORS.md): forward 4·B·H·Sq·Sk·D,
halved when causal; backward 2.5x forward; forward+backward 3.5x. GPU timings
are `triton.testing.do_bench` medians (it flushes L2 between repetitions); small
problems that fit in L2 also rotate over several input sets. Peak memory is
`torch.cuda.max_memory_allocated` over one call, above what the inputs hold.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass

import torch

from .impls import IMPLEMENTATIONS, Unsupported

HIDDEN = 2048
STANDARD_BATCH_SEQLEN = [(32, 512), (16, 1024), (8, 2048), (4, 4096), (2, 8192), (1, 16384)]
STANDARD_HEAD_DIMS = [64, 128, 256]
PASSES = ("fwd", "bwd", "fwd_bwd")
FLOP_FACTOR = {"fwd": 1.0, "bwd": 2.5, "fwd_bwd": 3.5}
L2_BYTES = 50 * 2**20  # H100's L2; inputs smaller than this are rotated over several sets


@dataclass(frozen=True)
class Case:
    batch: int
    heads: int
    seqlen_q: int
    seqlen_k: int
    head_dim: int
    causal: bool
    dtype: str  # "float16" | "bfloat16" | "float32"

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    def flops(self, pass_: str) -> float:
        fwd = 4.0 * self.batch * self.heads * self.seqlen_q * self.seqlen_k * self.head_dim
        if self.causal:
            fwd /= 2
        return fwd * FLOP_FACTOR[pass_]


@dataclass
class Record:
    impl: str
    pass_: str
    batch: int
    heads: int
    seqlen_q: int
    seqlen_k: int
    head_dim: int
    causal: bool
    dtype: str
    ms: float | None
    tflops: float | None
    peak_mem_bytes: int | None
    status: str  # "ok" | "oom" | "unsupported" | "error"
    max_abs_err: float | None = None  # forward output vs sdpa_math / naive in fp32, when checked
    message: str | None = None

    def to_json(self) -> dict:
        d = asdict(self)
        d["pass"] = d.pop("pass_")
        return d


def standard_cases(head_dims=STANDARD_HEAD_DIMS, seqlens=None, dtypes=("float16", "bfloat16"),
                   causals=(False, True)) -> list[Case]:
    cases = []
    for dtype in dtypes:
        for causal in causals:
            for head_dim in head_dims:
                for batch, seqlen in STANDARD_BATCH_SEQLEN:
                    if seqlens and seqlen not in seqlens:
                        continue
                    cases.append(Case(batch, HIDDEN // head_dim, seqlen, seqlen, head_dim, causal, dtype))
    return cases


def quick_cases(on_gpu: bool, dtypes=None) -> list[Case]:
    """A handful of small shapes: real ones on a GPU, tiny ones for the CPU interpreter."""
    if on_gpu:
        shapes = [(8, 16, 512, 128), (4, 16, 1024, 128), (4, 32, 1024, 64)]
        dtypes = dtypes or ("float16", "bfloat16")
    else:
        shapes = [(1, 2, 64, 32), (1, 2, 128, 64)]
        dtypes = dtypes or ("float16",)  # the interpreter's bf16 dot is broken (triton #11584)
    return [Case(b, h, s, s, d, causal, dt) for dt in dtypes for causal in (False, True) for b, h, s, d in shapes]


def _time_ms(fn: Callable[[], object], on_gpu: bool) -> float:
    if on_gpu:
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))
    # CPU: a few wall-clock repetitions; meaningful only as "it runs"
    fn()
    samples = []
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(samples)


def _inputs(case: Case, device: torch.device, requires_grad: bool, n_sets: int, seed: int = 0):
    gen = torch.Generator(device=device).manual_seed(seed)
    sets = []
    for _ in range(n_sets):
        q, k, v, do = (torch.randn(case.batch, case.heads, s, case.head_dim, device=device,
                                   dtype=case.torch_dtype, generator=gen)
                       for s in (case.seqlen_q, case.seqlen_k, case.seqlen_k, case.seqlen_q))
        for t in (q, k, v):
            t.requires_grad_(requires_grad)
        sets.append((q, k, v, do))
    return sets


def _n_sets(case: Case, on_gpu: bool) -> int:
    if not on_gpu:
        return 1
    elt = torch.empty((), dtype=case.torch_dtype).element_size()
    nbytes = elt * case.batch * case.heads * case.head_dim * (2 * case.seqlen_q + 2 * case.seqlen_k)
    return max(1, min(8, (2 * L2_BYTES) // max(nbytes, 1)))


def _timed_call(fn, sets, pass_: str) -> Callable[[], object]:
    """The closure to time: rotates over input sets; bwd reuses one forward graph per set."""
    state = {"i": 0}
    if pass_ == "bwd":
        outs = [fn(q, k, v) for q, k, v, _ in sets]

        def call():
            i = state["i"] = (state["i"] + 1) % len(sets)
            q, k, v, do = sets[i]
            return torch.autograd.grad(outs[i], (q, k, v), do, retain_graph=True)
    elif pass_ == "fwd_bwd":
        def call():
            i = state["i"] = (state["i"] + 1) % len(sets)
            q, k, v, do = sets[i]
            return torch.autograd.grad(fn(q, k, v), (q, k, v), do)
    else:
        def call():
            i = state["i"] = (state["i"] + 1) % len(sets)
            q, k, v, _ = sets[i]
            return fn(q, k, v)
    return call


def _peak_mem(call: Callable[[], object], on_gpu: bool) -> int | None:
    if not on_gpu:
        return None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    result = call()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del result
    return int(peak)


def _check(fn, case: Case, device: torch.device) -> float:
    """Max |out - reference| on one small slice, reference in fp32 (sdpa math)."""
    (q, k, v, _), = _inputs(case, device, False, 1, seed=1)
    q, k, v = (t[:1, :2] for t in (q, k, v))
    out = fn(q, k, v)
    from flashattn_py.reference import attention_reference

    ref = attention_reference(q.float(), k.float(), v.float(), causal=case.causal)
    return float((out.float() - ref).abs().max())


def run_case(impl: str, case: Case, passes, device: torch.device) -> Iterator[Record]:
    on_gpu = device.type == "cuda"

    def record(pass_, status, ms=None, mem=None, err=None, message=None):
        tflops = case.flops(pass_) / (ms * 1e-3) / 1e12 if ms else None
        return Record(impl, pass_, case.batch, case.heads, case.seqlen_q, case.seqlen_k, case.head_dim,
                      case.causal, case.dtype, ms, tflops, mem, status, err, message)

    try:
        fn = IMPLEMENTATIONS[impl](case.causal)
        err = _check(fn, case, device)
    except Unsupported as exc:
        for pass_ in passes:
            yield record(pass_, "unsupported", message=str(exc))
        return
    except torch.cuda.OutOfMemoryError:
        err = None
    except Exception as exc:  # noqa: BLE001 - a backend refusing a case is data, not a crash
        refused = isinstance(exc, NotImplementedError) or any(
            text in str(exc) for text in ("No viable backend", "No available kernel", "not supported"))
        status = "unsupported" if refused else "error"
        for pass_ in passes:
            yield record(pass_, status, message=f"{type(exc).__name__}: {str(exc)[:300]}")
        return

    for pass_ in passes:
        sets = None
        try:
            sets = _inputs(case, device, pass_ != "fwd", _n_sets(case, on_gpu))
            call = _timed_call(fn, sets, pass_)
            mem = _peak_mem(call, on_gpu)
            ms = _time_ms(call, on_gpu)
            yield record(pass_, "ok", ms, mem, err)
        except torch.cuda.OutOfMemoryError:
            yield record(pass_, "oom", err=err)
        except NotImplementedError as exc:  # e.g. FlexAttention has no CPU backward
            yield record(pass_, "unsupported", err=err, message=f"{type(exc).__name__}: {str(exc)[:300]}")
        except Exception as exc:  # noqa: BLE001
            yield record(pass_, "error", err=err, message=f"{type(exc).__name__}: {str(exc)[:300]}")
        finally:
            del sets
            if on_gpu:
                torch.cuda.empty_cache()
