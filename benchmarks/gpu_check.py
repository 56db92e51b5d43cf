"""One command for a lent GPU: the `gpu` tests and a short benchmark, written where RESULTS.md can cite them.

    python -m benchmarks.gpu_check --out DIR            # tests + benchmark: <= 8 minutes on an H100 / H200
    python -m benchmarks.gpu_check --out DIR --quick    # fewer tests and shapes (~3 minutes)
    python -m benchmarks.gpu_check --out DIR --only bench      # or --only tests
    python -m benchmarks.gpu_check --list [--quick]     # print the plan, run nothing (no GPU needed)

Writes DIR/gpu_check.json (schema `SCHEMA`; rewritten after every step, so a run cut short
still leaves what it did), DIR/gpu_check.md (the same, as tables), and per test selection
DIR/tests-<slug>.xml (JUnit) and DIR/tests-<slug>.log (pytest -v output). Needs no network.

What runs is `plan(quick)`, a list of steps, executed in order by `run(plan, out_dir)`:

* `TestStep`: a pytest selection under ``-m gpu``, in a subprocess (TRITON_INTERPRET removed from its
  environment) with ``--junitxml`` and a timeout; each test's outcome, duration and failure text go
  into the JSON. A selection that runs out of time is killed, and its results so far are read from
  its ``-v`` log (the test it was in is marked ``timeout``).
* `CopyStep`: device-to-device copy bandwidth (`decode.copy_bandwidth_gbps`), the ceiling for decoding.
* `AttnCase`: one implementation (flashattn_py, or torch SDPA forced to its flash or cuDNN backend with
  `sdpa_kernel`), one pass (``fwd`` or ``fwd_bwd``), one standard shape of ANCHORS.md (bf16, S 1k/4k/8k,
  D 64/128, H = 2048 / D, causal and not). Timed with `triton.testing.do_bench` medians through the
  suite's own helpers (`suite._inputs`, `suite._timed_call`, `suite._time_ms`); TFLOP/s by
  FlashAttention's convention (`suite.Case.flops`: fwd 4·B·H·Sq·Sk·D, halved when causal, fwd+bwd 3.5x).
  An SDPA backend that is unavailable or raises is recorded as ``unavailable`` with its reason (the
  exception and torch's warnings), and the run goes on.
* `DecodeCase`: one `attention_with_kvcache` step (one new token appended, automatic split-K) against
  a bf16 KV cache; GB/s of the cache read (2·B·H_kv·S·D·2 bytes) and its fraction of the copy bandwidth.

The benchmark cases are built by ``case.build(device, dtype=None)``, which makes the inputs and returns
the zero-argument call that is timed. tests/test_gpu_check.py builds and calls every flashattn_py case
of the plan on CPU tensors inside ``flashattn_py._launch.virtual_gpu("sm_90")``, which records the
launches instead of running them: the CPU machines check each benchmark call reaches the kernels with
the real shapes.

Time: the tests get at most `TESTS_BUDGET_S` in all (each selection its own timeout), the benchmark at
most `BENCH_BUDGET_S` (cases past it are recorded as ``skipped``); a watchdog ends the process
`WATCHDOG_GRACE_S` after the whole budget. Exit status: 0 all passed and every flashattn_py case ran,
1 something failed, 2 no CUDA GPU (the JSON says so), 3 the watchdog fired.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import json
import os
import platform
import re
import signal
import subprocess
import sys
import threading
import time
import warnings
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from .impls import Unsupported
from .suite import Case, _inputs, _n_sets, _time_ms, _timed_call, standard_cases

REPO = Path(__file__).resolve().parent.parent
SCHEMA = "flashattn_py.gpu_check/1"
TOTAL_BUDGET_S = 450.0  # tests + benchmark; the watchdog allows WATCHDOG_GRACE_S more, all within 8 minutes
TESTS_BUDGET_S = 300.0
BENCH_BUDGET_S = 150.0
WATCHDOG_GRACE_S = 20.0
FAILURE_TEXT_CHARS = 4000
SDPA_IMPLS = ("sdpa_flash", "sdpa_cudnn")
IMPLS = ("flashattn_py", *SDPA_IMPLS)
BENCH_PASSES = ("fwd", "fwd_bwd")


# --- the plan ---------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TestStep:
    """A pytest selection, run as ``pytest -m gpu <args>`` in a subprocess."""

    name: str
    args: tuple[str, ...]
    timeout_s: float
    kind: ClassVar[str] = "tests"

    @property
    def slug(self) -> str:
        return re.sub(r"[^a-z0-9]+", "-", self.name.lower()).strip("-")


@dataclass(frozen=True)
class CopyStep:
    """Device-to-device copy bandwidth: what decoding is measured against."""

    name: str = "copy bandwidth"
    kind: ClassVar[str] = "copy"


@dataclass(frozen=True)
class AttnCase:
    """One implementation, one pass, one `suite.Case`: ``build(device)`` gives the call to time."""

    impl: str
    pass_: str
    case: Case
    kind: ClassVar[str] = "attention"

    @property
    def name(self) -> str:
        return f"{self.impl} {self.pass_} {self.case.label()}"

    def with_case(self, **changes) -> AttnCase:
        """The same implementation and pass on another shape (the CPU tests use tiny ones)."""
        return dataclasses.replace(self, case=dataclasses.replace(self.case, **changes))

    def fn(self) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
        from .impls import IMPLEMENTATIONS

        return IMPLEMENTATIONS[self.impl](self.case.causal)

    def build(self, device: torch.device, dtype: torch.dtype | None = None) -> Callable[[], object]:
        """Random inputs on `device` (rotated over several sets on a GPU, as the suite does) and the call."""
        case = self.case if dtype is None else dataclasses.replace(self.case, dtype=str(dtype).split(".")[-1])
        sets = _inputs(case, device, self.pass_ != "fwd", _n_sets(case, device.type == "cuda"))
        return _timed_call(self.fn(), sets, self.pass_)

    def describe(self) -> dict[str, Any]:
        c = self.case
        return dict(impl=self.impl, pass_=self.pass_, batch=c.batch, heads=c.heads, seqlen_q=c.seqlen_q,
                    seqlen_k=c.seqlen_k, head_dim=c.head_dim, causal=c.causal, dtype=c.dtype,
                    flops=c.flops(self.pass_))


@dataclass(frozen=True)
class DecodeCase:
    """One decoding step: a new token appended to a (B, H_kv, cache_len, D) cache, then attended to."""

    batch: int
    heads: int
    heads_kv: int
    head_dim: int
    cache_len: int
    dtype: str = "bfloat16"
    num_splits: int = 0  # 0: automatic (the default a user gets)
    impl: ClassVar[str] = "flashattn_py"
    pass_: ClassVar[str] = "decode"
    kind: ClassVar[str] = "decode"

    @property
    def name(self) -> str:
        return (f"flashattn_py decode B{self.batch} H{self.heads} H_kv{self.heads_kv} D{self.head_dim} "
                f"cache {self.cache_len} {self.dtype}")

    def cache_bytes(self) -> int:
        elt = torch.empty((), dtype=getattr(torch, self.dtype)).element_size()
        return 2 * self.batch * self.heads_kv * self.cache_len * self.head_dim * elt

    def build(self, device: torch.device, dtype: torch.dtype | None = None) -> Callable[[], object]:
        import flashattn_py

        dtype = dtype or getattr(torch, self.dtype)
        gen = torch.Generator(device=device).manual_seed(0)
        B, H, H_kv, D, S = self.batch, self.heads, self.heads_kv, self.head_dim, self.cache_len
        q = torch.randn(B, H, 1, D, device=device, dtype=dtype, generator=gen)
        k_cache, v_cache = (torch.randn(B, H_kv, S, D, device=device, dtype=dtype, generator=gen) for _ in range(2))
        k_new, v_new = (torch.randn(B, H_kv, 1, D, device=device, dtype=dtype, generator=gen) for _ in range(2))
        lens = torch.full((B,), S - 1, dtype=torch.int32, device=device)
        # appends the same token at the same slot every call: the cache does not grow (as benchmarks.decode does)
        return functools.partial(flashattn_py.attention_with_kvcache, q, k_cache, v_cache, lens, k_new=k_new,
                                 v_new=v_new, num_splits=self.num_splits)

    def describe(self) -> dict[str, Any]:
        return dict(impl=self.impl, pass_=self.pass_, batch=self.batch, heads=self.heads, heads_kv=self.heads_kv,
                    head_dim=self.head_dim, cache_len=self.cache_len, dtype=self.dtype, num_splits=self.num_splits,
                    bytes=self.cache_bytes())


Step = TestStep | CopyStep | AttnCase | DecodeCase
BenchStep = AttnCase | DecodeCase


def attention_cases(quick: bool = False) -> list[AttnCase]:
    """ANCHORS.md's standard shapes at S 1k, 4k, 8k (B 16 / 4 / 2, H = 2048 / D), bf16; D 128 first."""
    seqlens = (4096,) if quick else (8192, 4096, 1024)
    head_dims = (128,) if quick else (128, 64)
    cases = standard_cases(head_dims=head_dims, seqlens=seqlens, dtypes=("bfloat16",), causals=(False, True))
    order = {s: i for i, s in enumerate(seqlens)}
    cases.sort(key=lambda c: (head_dims.index(c.head_dim), c.causal, order[c.seqlen_q]))
    return [AttnCase(impl, pass_, c) for c in cases for pass_ in BENCH_PASSES for impl in IMPLS]


def decode_cases(quick: bool = False) -> list[DecodeCase]:
    cases = [DecodeCase(1, 32, 32, 128, 8192)]
    return cases if quick else cases + [DecodeCase(1, 32, 8, 128, 8192)]


def plan(quick: bool = False) -> list[Step]:
    """Every test selection and benchmark case, in the order `run` executes them."""
    tests: list[Step] = [TestStep("gpu tests: features", ("tests/test_gpu.py", "-k", "not test_large"), 150.0)]
    if not quick:
        tests.append(TestStep("gpu tests: large shapes", ("tests/test_gpu.py", "-k", "test_large"), 170.0))
    return [*tests, CopyStep(), *decode_cases(quick), *attention_cases(quick)]


def bench_steps(steps: list[Step]) -> list[BenchStep]:
    """The steps that call the library: what capture mode (virtual_gpu) can record."""
    return [s for s in steps if isinstance(s, (AttnCase, DecodeCase))]


# --- the environment --------------------------------------------------------------------------------------------------

def _git_commit() -> dict[str, Any] | None:
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, timeout=10)
        return {"commit": head.stdout.strip(), "dirty": bool(dirty.stdout.strip())}
    except (OSError, subprocess.SubprocessError):
        return None


def _nvidia_smi() -> dict[str, str] | None:
    fields = ("driver_version", "name", "clocks.max.sm", "clocks.max.memory", "power.limit")
    try:
        run = subprocess.run(["nvidia-smi", f"--query-gpu={','.join(fields)}", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=15)
    except (OSError, subprocess.SubprocessError):
        return None
    if run.returncode != 0 or not run.stdout.strip():
        return None
    values = [v.strip() for v in run.stdout.strip().splitlines()[0].split(",")]
    return dict(zip(fields, values, strict=False))


def environment() -> dict[str, Any]:
    """Versions, and the GPU (name, capability, memory, what flashattn_py's launch layer sees) when there is one."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    import flashattn_py

    env: dict[str, Any] = {
        "torch": torch.__version__, "triton": triton_version, "cuda": torch.version.cuda,
        "hip": getattr(torch.version, "hip", None), "flashattn_py": flashattn_py.__version__,
        "python": platform.python_version(), "host": platform.node(), "git": _git_commit(),
        "cuda_available": torch.cuda.is_available(),
        "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET"),
    }
    if not torch.cuda.is_available():
        return env
    props = torch.cuda.get_device_properties(0)
    env.update(device=props.name, capability=f"{props.major}.{props.minor}", device_count=torch.cuda.device_count(),
               multiprocessors=props.multi_processor_count, memory_gib=round(props.total_memory / 2**30, 1),
               cudnn=torch.backends.cudnn.version(), nvidia_smi=_nvidia_smi())
    try:
        from flashattn_py import _targets

        gpu = _targets.device_target(torch.device("cuda", 0))
        env["target"] = {"name": gpu.name, "max_shared": gpu.max_shared, "multiprocessors": gpu.multiprocessors,
                         "tma": gpu.tma}
    except Exception as exc:  # noqa: BLE001 - the environment is a record, not a check
        env["target"] = f"{type(exc).__name__}: {exc}"
    return env


# --- tests: a pytest subprocess, its JUnit XML (or its -v log when it was cut short) ----------------------------------

# pytest -v: "<id> PASSED  [ 5%]" once a test ends; "<id> " alone while it runs (ids may hold spaces)
_VERBOSE_OUTCOME = re.compile(r"^(?P<id>\S+::.+?)\s+(?P<outcome>PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)(?:\s|$)")


def parse_junit(path: Path) -> list[dict[str, Any]]:
    """One dict per testcase: id, outcome (passed / failed / error / skipped), duration_s, message, text."""
    results = []
    for tc in ET.parse(path).getroot().iter("testcase"):
        classname, name = tc.get("classname", ""), tc.get("name", "")
        file = classname.replace(".", "/") + ".py"
        parts = classname.split(".")
        for i in range(len(parts), 0, -1):  # tests.test_gpu.TestX -> tests/test_gpu.py::TestX
            if (REPO / Path(*parts[:i])).with_suffix(".py").exists():
                file = "/".join(parts[:i]) + ".py" + "".join(f"::{p}" for p in parts[i:])
                break
        outcome, message, text = "passed", None, None
        for child in tc:
            tag = child.tag
            if tag in ("failure", "error", "skipped"):
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[tag]
                message = child.get("message")
                text = (child.text or "")[-FAILURE_TEXT_CHARS:] or None
                if tag != "skipped":
                    break
        results.append({"id": f"{file}::{name}", "outcome": outcome, "duration_s": float(tc.get("time", 0) or 0),
                        "message": message, "text": text if outcome in ("failed", "error") else None})
    return results


def parse_verbose_log(log: str) -> list[dict[str, Any]]:
    """Outcomes from pytest -v output (no durations); the test still running when it was killed: ``timeout``."""
    results: list[dict[str, Any]] = []
    seen = set()
    last_started = None
    for line in log.splitlines():
        if "::" not in line.split(" ", 1)[0]:  # not a test line (headers, the -rfE summary, tracebacks)
            continue
        m = _VERBOSE_OUTCOME.match(line)
        if m is None:
            last_started = line.strip()
            continue
        test_id, outcome = m.group("id"), m.group("outcome").lower()
        outcome = {"xfail": "skipped", "xpass": "passed"}.get(outcome, outcome)
        if test_id not in seen:  # a test that fails in teardown is reported twice
            seen.add(test_id)
            results.append({"id": test_id, "outcome": outcome, "duration_s": None, "message": None, "text": None})
        last_started = None
    if last_started and last_started not in seen:
        results.append({"id": last_started, "outcome": "timeout", "duration_s": None,
                        "message": "the selection ran out of time during this test", "text": None})
    return results


def _summary(tests: list[dict[str, Any]]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for t in tests:
        counts[t["outcome"]] = counts.get(t["outcome"], 0) + 1
    return counts


def run_test_step(step: TestStep, out_dir: Path, timeout_s: float | None = None) -> dict[str, Any]:
    """Run one selection; its record: command, rc, timed_out, duration_s, tests, summary, log tail."""
    timeout_s = step.timeout_s if timeout_s is None else timeout_s
    xml, log = out_dir / f"tests-{step.slug}.xml", out_dir / f"tests-{step.slug}.log"
    xml.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", *step.args, f"--junitxml={xml}", "-v", "-rfE",
           "-p", "no:cacheprovider", "--color=no"]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # a GPU check runs the real kernels
    env.setdefault("PYTHONUNBUFFERED", "1")
    record: dict[str, Any] = {"kind": step.kind, "name": step.name, "command": cmd[1:], "timeout_s": timeout_s,
                              "junit": xml.name, "log": log.name}
    t0 = time.monotonic()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        timed_out = False
        try:
            rc = proc.wait(timeout=max(timeout_s, 1.0))
        except subprocess.TimeoutExpired:
            timed_out = True
            for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
                try:
                    os.killpg(proc.pid, sig)  # the pytest process we started, and its children
                except ProcessLookupError:
                    break
                try:
                    proc.wait(timeout=wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
            rc = proc.returncode
    record.update(rc=rc, timed_out=timed_out, duration_s=round(time.monotonic() - t0, 2))
    text = log.read_text(errors="replace")
    if xml.exists() and not timed_out:
        try:
            tests = parse_junit(xml)
        except ET.ParseError as exc:
            tests = parse_verbose_log(text)
            record["parse_error"] = str(exc)
    else:
        tests = parse_verbose_log(text)
    record["tests"] = tests
    record["summary"] = _summary(tests)
    # pytest's rc: 0 all passed, 1 failures, 5 nothing collected; anything else (2-4, signals) is trouble
    ok = rc == 0 and not timed_out and not any(t["outcome"] in ("failed", "error", "timeout") for t in tests)
    record["status"] = "passed" if ok else ("timeout" if timed_out else "failed")
    if not ok:
        record["log_tail"] = text[-FAILURE_TEXT_CHARS:]
    return record


# --- benchmark --------------------------------------------------------------------------------------------------------

def _failure(exc: BaseException, caught: list[warnings.WarningMessage]) -> str:
    text = f"{type(exc).__name__}: {str(exc).strip()[:600]}"
    reasons = list(dict.fromkeys(str(w.message).strip()[:300] for w in caught))[:6]
    return text + ("".join(f"\n  warning: {r}" for r in reasons) if reasons else "")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_bench_step(step: BenchStep, device: torch.device,
                   time_fn: Callable[[Callable[[], object]], float] | None = None,
                   check: bool = True) -> dict[str, Any]:
    """Build, call once (compiles; a backend that cannot run the case raises here), check, time.

    The record has status ``ok`` / ``unavailable`` (an SDPA backend that refused or raised) / ``oom`` /
    ``error``, ms, tflops (attention) or gbps (decode), max_abs_err of the forward on a slice (attention,
    `check`), first_call_s and message.
    """
    on_gpu = device.type == "cuda"
    time_fn = time_fn or (lambda call: _time_ms(call, on_gpu))
    record: dict[str, Any] = {"kind": step.kind, "name": step.name, **step.describe(), "status": None, "ms": None,
                              "message": None}
    record["pass"] = record.pop("pass_")
    call = None
    t0 = time.monotonic()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            call = step.build(device)
            call()
            _sync(device)
            record["first_call_s"] = round(time.monotonic() - t0, 3)
            if check and isinstance(step, AttnCase) and step.pass_ == "fwd":
                from .suite import _check

                record["max_abs_err"] = _check(step.fn(), step.case, device)
            ms = float(time_fn(call))
            record.update(status="ok", ms=ms)
            if isinstance(step, AttnCase):
                record["tflops"] = step.case.flops(step.pass_) / (ms * 1e-3) / 1e12
            else:
                record["gbps"] = step.cache_bytes() / (ms * 1e-3) / 1e9
        except torch.cuda.OutOfMemoryError as exc:
            record.update(status="oom", message=_failure(exc, []))
        except Exception as exc:  # noqa: BLE001 - a backend refusing a case is data, not a crash
            refused = isinstance(exc, Unsupported) or step.impl in SDPA_IMPLS
            record.update(status="unavailable" if refused else "error", message=_failure(exc, caught))
        finally:
            del call
            if on_gpu:
                torch.cuda.empty_cache()
    record["duration_s"] = round(time.monotonic() - t0, 3)
    return record


def run_copy_step(step: CopyStep, device: torch.device) -> dict[str, Any]:
    from .decode import copy_bandwidth_gbps

    t0 = time.monotonic()
    try:
        record = {"kind": step.kind, "name": step.name, "status": "ok", "gbps": copy_bandwidth_gbps(device)}
    except Exception as exc:  # noqa: BLE001
        record = {"kind": step.kind, "name": step.name, "status": "error", "gbps": None,
                  "message": _failure(exc, [])}
    record["duration_s"] = round(time.monotonic() - t0, 3)
    return record


# --- the run ----------------------------------------------------------------------------------------------------------

class _Report:
    """The JSON document, rewritten after every step (a lock: the watchdog may write it too)."""

    def __init__(self, out_dir: Path, data: dict[str, Any]):
        self.path = out_dir / "gpu_check.json"
        self.data = data
        self.lock = threading.Lock()

    def write(self, **changes) -> None:
        with self.lock:
            self.data.update(changes)
            tmp = self.path.with_suffix(".json.tmp")
            tmp.write_text(json.dumps(self.data, indent=1, default=str) + "\n")
            tmp.replace(self.path)


def _overall_status(data: dict[str, Any]) -> str:
    tests_ok = all(s["status"] == "passed" for s in data["tests"])
    ours_ok = all(r["status"] in ("ok", "skipped") for r in data["bench"] if r.get("impl") == "flashattn_py")
    return "passed" if tests_ok and ours_ok else "failed"


def run(steps: list[Step], out_dir: Path, budget_s: float = TOTAL_BUDGET_S, quick: bool = False,
        watchdog: bool = True, device: torch.device | None = None) -> int:
    """Execute `steps` into out_dir/gpu_check.json and .md; the exit status (see the module docstring).

    `device` None is the first CUDA GPU (refused without one); the CPU tests pass the CPU, inside `virtual_gpu`.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    deadline = start + budget_s
    data: dict[str, Any] = {"schema": SCHEMA, "status": "running", "quick": quick,
                            "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                            "budget_s": budget_s, "env": environment(), "tests": [], "bench": [],
                            "plan": [s.name for s in steps]}
    report = _Report(out_dir, data)
    if device is None and not torch.cuda.is_available():
        message = (f"no CUDA GPU: torch.cuda.is_available() is False (torch {torch.__version__}, "
                   f"built for CUDA {torch.version.cuda}); nothing was run")
        report.write(status="no_gpu", message=message, wall_s=round(time.monotonic() - start, 2))
        (out_dir / "gpu_check.md").write_text(markdown(report.data))
        print(f"gpu_check: {message}", file=sys.stderr)
        return 2
    report.write()

    if watchdog:
        def fire():
            report.write(status="incomplete", message=f"watchdog: still running {budget_s + WATCHDOG_GRACE_S:.0f} s "
                                                      f"after the start; the process was ended",
                         wall_s=round(time.monotonic() - start, 2))
            try:
                (out_dir / "gpu_check.md").write_text(markdown(report.data))
            finally:
                os._exit(3)

        timer = threading.Timer(budget_s + WATCHDOG_GRACE_S, fire)
        timer.daemon = True
        timer.start()

    device = device or torch.device("cuda", 0)
    tests_deadline = start + min(TESTS_BUDGET_S, budget_s)
    bench_deadline = None
    for step in steps:
        now = time.monotonic()
        print(f"gpu_check [{now - start:6.1f} s] {step.name}", file=sys.stderr, flush=True)
        if isinstance(step, TestStep):
            left = min(tests_deadline, deadline) - now
            if left < 10:
                data["tests"].append({"kind": step.kind, "name": step.name, "status": "skipped", "tests": [],
                                      "summary": {}, "message": "the tests' time budget was spent"})
            else:
                data["tests"].append(run_test_step(step, out_dir, min(step.timeout_s, left)))
        else:
            if bench_deadline is None:
                bench_deadline = min(now + BENCH_BUDGET_S, deadline)
            if now > bench_deadline:
                record = {"kind": step.kind, "name": step.name, "status": "skipped",
                          "message": "the benchmark's time budget was spent"}
                if not isinstance(step, CopyStep):
                    record.update(step.describe())
                    record["pass"] = record.pop("pass_")
                data["bench"].append(record)
            elif isinstance(step, CopyStep):
                data["bench"].append(run_copy_step(step, device))
            else:
                data["bench"].append(run_bench_step(step, device))
        report.write()
    if watchdog:
        timer.cancel()
    _add_copy_fractions(data)
    status = _overall_status(data)
    report.write(status=status, wall_s=round(time.monotonic() - start, 2))
    (out_dir / "gpu_check.md").write_text(markdown(report.data))
    print(f"gpu_check: {status} in {time.monotonic() - start:.0f} s; wrote {out_dir / 'gpu_check.json'}",
          file=sys.stderr)
    return 0 if status == "passed" else 1


def _add_copy_fractions(data: dict[str, Any]) -> None:
    copy = next((r["gbps"] for r in data["bench"] if r["kind"] == "copy" and r.get("gbps")), None)
    for r in data["bench"]:
        if r["kind"] == "decode" and r.get("gbps") and copy:
            r["copy_gbps"], r["fraction_of_copy"] = copy, r["gbps"] / copy


# --- markdown ---------------------------------------------------------------------------------------------------------

def _fmt(x: float | None, spec: str = ".3g") -> str:
    return "–" if x is None else format(x, spec)


def _first_line(text: str | None, limit: int = 300) -> str:
    return text.strip().splitlines()[0][:limit] if text and text.strip() else ""


def markdown(data: dict[str, Any]) -> str:
    env = data["env"]
    git = env.get("git") or {}
    commit = f"commit {git['commit'][:12]}{' (dirty)' if git.get('dirty') else ''}" if git else "no git commit"
    device = env.get("device", "no GPU")
    lines = [f"# GPU check: {device}" + (f" (capability {env['capability']})" if "capability" in env else ""), "",
             f"{data['started']}; status **{data['status']}**"
             + (f", {data['wall_s']:.0f} s" if data.get("wall_s") is not None else "")
             + (" (quick)" if data.get("quick") else "") + ".",
             f"torch {env['torch']}, triton {env['triton']}, CUDA {env['cuda']}"
             + (f", cuDNN {env['cudnn']}" if env.get("cudnn") else "")
             + f"; flashattn_py {env['flashattn_py']}, {commit}. From `gpu_check.json` (schema {data['schema']}).", ""]
    if data.get("message"):
        lines += [f"> {data['message']}", ""]
    if data["tests"]:
        lines += ["## Tests (`pytest -m gpu`)", "", "| selection | status | passed | failed | errors | skipped | "
                  "timeout | s |", "|---|---|---|---|---|---|---|---|"]
        for s in data["tests"]:
            n = s.get("summary", {})
            lines.append(f"| {s['name']} | {s['status']} | {n.get('passed', 0)} | {n.get('failed', 0)} | "
                         f"{n.get('error', 0)} | {n.get('skipped', 0)} | {n.get('timeout', 0)} | "
                         f"{_fmt(s.get('duration_s'), '.0f')} |")
        bad = [t for s in data["tests"] for t in s.get("tests", []) if t["outcome"] in ("failed", "error", "timeout")]
        if bad:
            lines += ["", "Failures:", ""]
            lines += [f"- `{t['id']}` ({t['outcome']}): {_first_line(t.get('message'))}" for t in bad]
        lines.append("")
    attn = [r for r in data["bench"] if r["kind"] == "attention"]
    if attn:
        lines += ["## Attention, TFLOP/s", "",
                  "FlashAttention's convention: fwd 4·B·H·Sq·Sk·D, halved when causal; fwd+bwd 3.5× fwd. "
                  "`triton.testing.do_bench` medians. sdpa_* = torch SDPA forced to one backend.", "",
                  "| pass | dtype | causal | D | B×H | S | " + " | ".join(IMPLS) + " | ours ÷ best SDPA |",
                  "|" + "---|" * (7 + len(IMPLS))]
        rows: dict[tuple, dict[str, dict]] = {}
        for r in attn:
            key = (r["pass"], r["dtype"], r["causal"], r["head_dim"], r["batch"], r["heads"], r["seqlen_q"])
            rows.setdefault(key, {})[r["impl"]] = r
        for (pass_, dtype, causal, d, b, h, s), by in rows.items():
            cells = []
            for impl in IMPLS:
                r = by.get(impl)
                cells.append("–" if r is None else _fmt(r.get("tflops")) if r["status"] == "ok" else r["status"])
            ours = by.get("flashattn_py", {}).get("tflops") if by.get("flashattn_py", {}).get("status") == "ok" \
                else None
            best = max((by[i]["tflops"] for i in SDPA_IMPLS if i in by and by[i]["status"] == "ok"), default=None)
            ratio = _fmt(ours / best, ".2f") if ours and best else "–"
            lines.append(f"| {pass_} | {dtype} | {'yes' if causal else 'no'} | {d} | {b}×{h} | {s} | "
                         + " | ".join(cells) + f" | {ratio} |")
        lines.append("")
    decode = [r for r in data["bench"] if r["kind"] == "decode"]
    copy = next((r for r in data["bench"] if r["kind"] == "copy"), None)
    if decode:
        lines += ["## Decode (one new token, `attention_with_kvcache`, automatic split-K), GB/s of the cache read",
                  "", f"Device-to-device copy: {_fmt(copy.get('gbps') if copy else None, '.4g')} GB/s.", "",
                  "| B | H | H_kv | D | cache | dtype | status | µs | GB/s | fraction of copy |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for r in decode:
            us = r["ms"] * 1e3 if r.get("ms") else None
            frac = _fmt(r.get("fraction_of_copy"), ".1%")
            lines.append(f"| {r['batch']} | {r['heads']} | {r['heads_kv']} | {r['head_dim']} | {r['cache_len']} | "
                         f"{r['dtype']} | {r['status']} | {_fmt(us, '.4g')} | {_fmt(r.get('gbps'), '.4g')} | {frac} |")
        lines.append("")
    notes = [r for r in data["bench"] if r.get("status") not in ("ok", None) and r.get("message")]
    if notes:
        lines += ["## Not measured", ""]
        lines += [f"- {r['name']}: {r['status']}: {_first_line(r['message'])}" for r in notes]
        lines.append("")
    return "\n".join(lines)


# --- command line -----------------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.gpu_check",
        description="The gpu tests and a short benchmark against torch SDPA (flash, cuDNN) on a CUDA GPU; writes "
                    "DIR/gpu_check.json and DIR/gpu_check.md.")
    parser.add_argument("--out", type=Path, help="directory for gpu_check.json, gpu_check.md and the test logs")
    parser.add_argument("--quick", action="store_true", help="one test selection, D128 S4096 and one decode shape")
    parser.add_argument("--only", choices=("tests", "bench"), help="run only the tests or only the benchmark")
    parser.add_argument("--budget", type=float, default=TOTAL_BUDGET_S,
                        help=f"seconds for the whole run (default {TOTAL_BUDGET_S:.0f}; a watchdog ends it "
                             f"{WATCHDOG_GRACE_S:.0f} s later)")
    parser.add_argument("--list", action="store_true", help="print the plan and exit (no GPU needed)")
    args = parser.parse_args(argv)
    steps = plan(args.quick)
    if args.only == "tests":
        steps = [s for s in steps if isinstance(s, TestStep)]
    elif args.only == "bench":
        steps = [s for s in steps if not isinstance(s, TestStep)]
    if args.list:
        for s in steps:
            extra = f"  (timeout {s.timeout_s:.0f} s: pytest -m gpu {' '.join(s.args)})" if isinstance(s, TestStep) \
                else ""
            print(f"{s.kind:9} {s.name}{extra}")
        return 0
    if args.out is None:
        parser.error("--out DIR is required (or --list)")
    return run(steps, args.out, budget_s=args.budget, quick=args.quick)


if __name__ == "__main__":
    sys.exit(main())
