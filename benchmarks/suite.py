"""Cases, timing and records of the benchmark suite.

FLOPs follow FlashAttention's convention (ANCHORS.md): forward 4·B·H·Sq·Sk·D,
halved when causal; backward 2.5x forward; forward+backward 3.5x. Feature
variants (window, ALiBi, softcap, bottom-right) count 4·B·H·D per score a row
actually sees. GPU timings are `triton.testing.do_bench` medians (it flushes L2
between repetitions); small problems that fit in L2 also rotate over several
input sets. GPU peak memory is `torch.cuda.max_memory_allocated` over one call,
above what the inputs hold.

CPU (`run_cpu_case`): wall-clock medians of `repeats` timed calls (more for short
cases, up to 3x, to fill ~3 s; the naive baseline 3 at most) after one warm-up
call, the implementations interleaved call by call (fwd twice per round, then
fwd+bwd whose backward half is also the "bwd" figure). CPU peak memory is the process's peak
resident set during one call above its resident set just before it (Linux
``VmHWM`` reset through ``/proc/self/clear_refs``, free heap returned to the OS
with ``malloc_trim`` first): every byte the call touched, allocator slack
included, the inputs excluded.
"""

from __future__ import annotations

import ctypes
import gc
import statistics
import sys
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
    variant: str = ""  # "" or a feature variant of `impls.VARIANTS` (CPU suite)

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    def flops(self, pass_: str) -> float:
        if self.variant:  # 4·B·H·D per visible score
            return 4.0 * self.batch * self.heads * self.head_dim * visible_scores(self) * FLOP_FACTOR[pass_]
        fwd = 4.0 * self.batch * self.heads * self.seqlen_q * self.seqlen_k * self.head_dim
        if self.causal:
            fwd /= 2
        return fwd * FLOP_FACTOR[pass_]

    def label(self) -> str:
        seq = f"S{self.seqlen_q}" if self.seqlen_q == self.seqlen_k else f"S{self.seqlen_q}x{self.seqlen_k}"
        return (f"B{self.batch} H{self.heads} {seq} D{self.head_dim} {'causal' if self.causal else 'full'} "
                f"{self.dtype}{' ' + self.variant if self.variant else ''}")


def visible_scores(case: Case) -> int:
    """How many (query, key) pairs one head's rows see under the variant's causal mask and window."""
    from .impls import variant_kwargs

    kwargs = variant_kwargs(case.variant, case.causal, case.heads)
    sq, sk = case.seqlen_q, case.seqlen_k
    causal = kwargs.get("causal", False)
    off = sk - sq if causal == "bottom_right" else 0
    left, right = kwargs.get("window", (-1, -1))
    if causal:
        right = 0 if right < 0 else min(right, 0)
    i = torch.arange(sq, dtype=torch.int64)
    lo = (i + off - left).clamp(min=0) if left >= 0 else torch.zeros_like(i)
    hi = (i + off + right).clamp(max=sk - 1) if right >= 0 else torch.full_like(i, sk - 1)
    return int((hi - lo + 1).clamp(min=0).sum())


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
    status: str  # "ok" | "oom" | "unsupported" | "skipped" | "error"
    max_abs_err: float | None = None  # forward output vs a higher-precision reference, when checked
    message: str | None = None
    variant: str = ""  # CPU feature variant ("" = plain attention)
    repeats: int | None = None  # CPU: timed calls behind the median

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
    # CPU: wall clock, one warm-up call, then enough calls for about half a second (3 to 50)
    fn()
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
    samples = [first * 1e3]
    for _ in range(max(3, min(50, int(0.5 / max(first, 1e-6)))) - 1):
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


# --- CPU: the PyTorch path for real --------------------------------------------------------------------------------

# B = 1; heads 8 / 4 / 2 / 2 at S = 1k / 2k / 4k / 8k: short calls keep enough work that the per-call Python cost
# (~0.3 ms) is noise, long ones stay affordable; B·H >= 2 = the cores of our CI machines (torch's CPU backward
# parallelises over B·H only). A B·H = 2 series at S = 2k, 4k, 8k (fp32, D 64) shows how peak memory grows with S.
CPU_HEADS = {1024: 8, 2048: 4, 4096: 2, 8192: 2}
MEMORY_SERIES_HEADS = 2
CPU_SEQLENS = (1024, 2048, 4096, 8192)
CPU_HEAD_DIMS = (64, 128)
CPU_DTYPES = ("float32", "bfloat16")
VARIANT_SHAPE = (1, 4, 4096, 64)  # B, H, S, D of the feature variants (bottom-right: Sq = S / 4)
NAIVE_BUDGET_BYTES = 1 << 30
ROUND_BUDGET_S = 3.0  # CPU: timed rounds of a case fill about this much time, `repeats` at least
NAIVE_ROUNDS = 3
FWD_SAMPLES = 2  # forward calls per round (a forward is ~1/4 of a round's time)
_NAIVE_MATRICES = 4  # S×S matrices the naive fwd+bwd holds at its peak (scores, masked scores, probs, grads)


def cpu_heads(seqlen: int) -> int:
    return CPU_HEADS.get(seqlen, max(MEMORY_SERIES_HEADS, 8192 // max(seqlen, 1)))


def cpu_cases(quick: bool, dtypes=None, head_dims=None, seqlens=None, causals=(False, True)) -> list[Case]:
    """The CPU grid: B1, S 1k..8k (`CPU_HEADS`), D 64 and 128, fp32 and bf16, causal and not, plus the B·H = 2
    memory series (quick: fp32 D64 S 1k, 2k)."""
    dtypes = dtypes or (("float32",) if quick else CPU_DTYPES)
    head_dims = head_dims or ((64,) if quick else CPU_HEAD_DIMS)
    seqlens = seqlens or ((1024, 2048) if quick else CPU_SEQLENS)
    cases = [Case(1, cpu_heads(s), s, s, d, c, dt) for dt in dtypes for d in head_dims for c in causals
             for s in seqlens]
    if not quick and "float32" in dtypes and 64 in head_dims:  # S = 4k, 8k already run at B·H = 2
        cases += [Case(1, MEMORY_SERIES_HEADS, s, s, 64, c, "float32") for c in causals for s in seqlens
                  if s < 4096 and s >= 2048 and cpu_heads(s) != MEMORY_SERIES_HEADS]
    return cases


def cpu_variant_cases(quick: bool, seqlen: int | None = None) -> list[Case]:
    """Window 256 / ALiBi / softcap (causal) and bottom-right causal with Sq = S / 4, fp32, against the naive path."""
    B, H, S, D = VARIANT_SHAPE
    S = seqlen or (1024 if quick else S)
    cases = [Case(B, H, S, S, D, True, "float32", v) for v in ("window", "alibi", "softcap")]
    return cases + [Case(B, H, S // 4, S, D, True, "float32", "bottom_right")]


def naive_bytes(case: Case) -> int:
    """What the naive path's S×S matrices take at the peak of its fwd+bwd (fp32-sized, to be safe)."""
    return _NAIVE_MATRICES * 4 * case.batch * case.heads * case.seqlen_q * case.seqlen_k


# peak memory on CPU: Linux's resident-set high-water mark, reset per measurement
try:
    _LIBC = ctypes.CDLL("libc.so.6") if sys.platform.startswith("linux") else None
except OSError:  # pragma: no cover - not glibc
    _LIBC = None


def _status_bytes(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def peak_rss_delta(call: Callable[[], object]) -> int | None:
    """Peak resident bytes during `call()` above the resident bytes just before it; None where unmeasurable."""
    if _LIBC is None:
        return None
    try:
        gc.collect()
        _LIBC.malloc_trim(0)  # hand free heap pages back, so reused-but-free memory cannot hide a peak
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current VmRSS
        base = _status_bytes("VmRSS:")
    except OSError:
        return None
    result = call()
    del result
    return max(0, _status_bytes("VmHWM:") - base)


def _cpu_inputs(case: Case, requires_grad: bool, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    q, k, v, do = (torch.randn(case.batch, case.heads, s, case.head_dim, generator=gen).to(case.torch_dtype)
                   for s in (case.seqlen_q, case.seqlen_k, case.seqlen_k, case.seqlen_q))
    for t in (q, k, v):
        t.requires_grad_(requires_grad)
    return q, k, v, do


def _rows_error(out: torch.Tensor, case: Case, q, k, v) -> float:
    """Max |out - float64 reference| over the last 64 query rows of the first two heads (they see the most keys)."""
    from flashattn_py.reference import attention_reference

    from .impls import variant_kwargs

    kwargs = variant_kwargs(case.variant, case.causal, case.heads)
    r0 = max(0, case.seqlen_q - 64)
    base = case.seqlen_k - case.seqlen_q if kwargs.get("causal") == "bottom_right" else 0
    heads = slice(0, min(2, case.heads))
    if "alibi_slopes" in kwargs:
        kwargs["alibi_slopes"] = kwargs["alibi_slopes"][heads].double()
    if "causal" in kwargs and kwargs["causal"]:
        kwargs["causal"] = True
    ref = attention_reference(q[:1, heads, r0:].detach().double(), k[:1, heads].detach().double(),
                              v[:1, heads].detach().double(), offset=r0 + base, **kwargs)
    return float((out[:1, heads, r0:].detach().double() - ref).abs().max())


def _failure(exc: BaseException) -> tuple[str, str]:
    text = f"{type(exc).__name__}: {str(exc)[:300]}"
    oom = isinstance(exc, (MemoryError, torch.OutOfMemoryError)) or "can't allocate memory" in str(exc)
    return ("oom" if oom else "error"), text


def run_cpu_case(case: Case, impls, passes=PASSES, repeats: int = 5, naive_budget: int = NAIVE_BUDGET_BYTES,
                 round_budget_s: float = ROUND_BUDGET_S) -> list[Record]:
    """Every implementation on one case, interleaved call by call; records for each pass asked for."""
    from .impls import CPU_IMPLEMENTATIONS, Unsupported

    def record(impl, pass_, status, ms=None, mem=None, err=None, message=None, n=None):
        tflops = case.flops(pass_) / (ms * 1e-3) / 1e12 if ms else None
        return Record(impl, pass_, case.batch, case.heads, case.seqlen_q, case.seqlen_k, case.head_dim,
                      case.causal, case.dtype, ms, tflops, mem, status, err, message, case.variant, n)

    out: list[Record] = []
    fns: dict[str, Callable] = {}
    for impl in impls:
        if impl == "naive" and naive_bytes(case) > naive_budget:
            msg = (f"naive would hold ~{naive_bytes(case) / 2**30:.1f} GiB of S×S matrices "
                   f"(budget {naive_budget / 2**30:.1f} GiB)")
            out += [record(impl, p, "skipped", message=msg) for p in passes]
            continue
        try:
            fns[impl] = CPU_IMPLEMENTATIONS[impl](case)
        except Unsupported as exc:
            out += [record(impl, p, "unsupported", message=str(exc)) for p in passes]
    q0, k0, v0, _ = _cpu_inputs(case, False)
    qg, kg, vg, do = _cpu_inputs(case, True)

    def fwd_bwd(fn) -> tuple[float, float]:
        t0 = time.perf_counter()
        o = fn(qg, kg, vg)
        t1 = time.perf_counter()
        torch.autograd.grad(o, (qg, kg, vg), do)
        return t1 - t0, time.perf_counter() - t1

    mem: dict[tuple[str, str], int | None] = {}
    err: dict[str, float] = {}
    failed: dict[str, tuple[str, str]] = {}
    for impl, fn in fns.items():  # warm-up calls; they measure the peak memory and the error
        try:
            result = {}
            mem[impl, "fwd"] = peak_rss_delta(lambda fn=fn, result=result: result.setdefault("o", fn(q0, k0, v0)))
            err[impl] = _rows_error(result.pop("o"), case, q0, k0, v0)
            if "fwd_bwd" in passes or "bwd" in passes:
                mem[impl, "fwd_bwd"] = peak_rss_delta(lambda fn=fn: fwd_bwd(fn))
        except Exception as exc:  # noqa: BLE001 - a failing implementation is data, not a crash
            failed[impl] = _failure(exc)
    # short cases get more timed rounds (up to 3x), so that a median is not at the mercy of one stalled call on
    # shared cores; a round is every implementation once, each pass. The naive baseline (slow, and no target is
    # measured against its noise) stops after NAIVE_ROUNDS.
    times: dict[str, dict[str, list[float]]] = {impl: {p: [] for p in PASSES} for impl in fns if impl not in failed}
    start, rounds = time.perf_counter(), 0
    while rounds < repeats or (rounds < 3 * repeats and time.perf_counter() - start < round_budget_s):
        rounds += 1
        for impl, fn in fns.items():
            if impl in failed or (impl == "naive" and rounds > min(repeats, NAIVE_ROUNDS)):
                continue
            try:
                for _ in range(FWD_SAMPLES if "fwd" in passes else 0):  # the cheap pass gets more samples
                    t0 = time.perf_counter()
                    fn(q0, k0, v0)
                    times[impl]["fwd"].append(time.perf_counter() - t0)
                if "fwd_bwd" in passes or "bwd" in passes:
                    tf, tb = fwd_bwd(fn)
                    times[impl]["bwd"].append(tb)
                    times[impl]["fwd_bwd"].append(tf + tb)
            except Exception as exc:  # noqa: BLE001
                failed[impl] = _failure(exc)
    for impl in fns:
        for p in passes:
            if impl in failed:
                out.append(record(impl, p, failed[impl][0], message=failed[impl][1]))
                continue
            ms = statistics.median(times[impl][p]) * 1e3
            out.append(record(impl, p, "ok", ms, mem.get((impl, p)), err.get(impl), n=len(times[impl][p])))
    return out


def run_interpreter_smoke(cases: list[Case]) -> list[Record]:
    """The Triton kernels through the CPU interpreter: forward and gradients vs the fp32 reference, no timings."""
    import flashattn_py
    from flashattn_py.reference import attention_reference

    records = []
    for case in cases:
        q, k, v, do = _cpu_inputs(case, True)
        base = dict(impl="flashattn_py", batch=case.batch, heads=case.heads, seqlen_q=case.seqlen_q,
                    seqlen_k=case.seqlen_k, head_dim=case.head_dim, causal=case.causal, dtype=case.dtype, ms=None,
                    tflops=None, peak_mem_bytes=None)
        try:
            out = flashattn_py.attention(q, k, v, causal=case.causal)
            grads = torch.autograd.grad(out, (q, k, v), do)
            ref_in = [t.detach().float().requires_grad_() for t in (q, k, v)]
            ref = attention_reference(*ref_in, causal=case.causal)
            ref_grads = torch.autograd.grad(ref, ref_in, do.float())
            fwd_err = float((out.detach().float() - ref.detach()).abs().max())
            bwd_err = max(float((a.float() - b).abs().max()) for a, b in zip(grads, ref_grads, strict=True))
            records += [Record(pass_="fwd", status="ok", max_abs_err=fwd_err, **base),
                        Record(pass_="fwd_bwd", status="ok", max_abs_err=bwd_err, **base)]
        except Exception as exc:  # noqa: BLE001
            status, msg = _failure(exc)
            records += [Record(pass_=p, status=status, message=msg, **base) for p in ("fwd", "fwd_bwd")]
    return records


# --- CPU: nn.MultiheadAttention, ours vs torch's ------------------------------------------------------------------

MHA_SHAPE = (512, 8, 4, 1024)  # embed_dim, heads, batch, sequence length


@dataclass
class MhaRecord:
    impl: str  # "flashattn_py" | "torch"
    mode: str  # "train" (forward + backward of a step) | "eval" (inference forward: torch's native fast path)
    embed_dim: int
    heads: int
    batch: int
    seqlen: int
    ms: float | None
    peak_mem_bytes: int | None
    status: str
    max_abs_diff: float | None = None  # output vs torch's module with the same weights
    repeats: int | None = None
    message: str | None = None

    def to_json(self) -> dict:
        return asdict(self)


def run_mha(quick: bool, repeats: int = 3) -> list[MhaRecord]:
    """batch_first self-attention with a key-padding mask: a training step and an inference forward."""
    from torch import nn

    import flashattn_py

    E, H, B, S = MHA_SHAPE
    if quick:
        S = 256
    torch.manual_seed(0)
    mods = {"torch": nn.MultiheadAttention(E, H, batch_first=True)}
    mods["flashattn_py"] = flashattn_py.MultiheadAttention(E, H, batch_first=True)
    mods["flashattn_py"].load_state_dict(mods["torch"].state_dict())
    x = torch.randn(B, S, E)
    grad = torch.randn(B, S, E)
    pad = torch.zeros(B, S, dtype=torch.bool)  # True = padding; row b pads its last S * b / (2B) keys
    for b in range(B):
        pad[b, S - S * b // (2 * B):] = True

    def train(m):
        def step():
            m.train()
            m.zero_grad(set_to_none=True)
            xx = x.detach().requires_grad_()
            out, _ = m(xx, xx, xx, key_padding_mask=pad, need_weights=False)
            out.backward(grad)
            return out
        return step

    def evaluate(m):
        def fwd():
            m.eval()
            with torch.inference_mode():
                return m(x, x, x, key_padding_mask=pad, need_weights=False)[0]
        return fwd

    records = []
    for mode, make in (("train", train), ("eval", evaluate)):
        calls = {name: make(m) for name, m in mods.items()}
        mem, outs, samples = {}, {}, {name: [] for name in calls}
        for name, call in calls.items():
            mem[name] = peak_rss_delta(call)
            outs[name] = call().detach()
        for _ in range(repeats):
            for name, call in calls.items():
                t0 = time.perf_counter()
                call()
                samples[name].append(time.perf_counter() - t0)
        for name in calls:
            diff = float((outs[name] - outs["torch"]).abs().max())
            records.append(MhaRecord(name, mode, E, H, B, S, statistics.median(samples[name]) * 1e3, mem[name], "ok",
                                     diff, repeats))
    return records
