"""python -m benchmarks: fused vs naive vs PyTorch's kernels; TFLOP/s or times, memory, plots.

    python -m benchmarks                      # GPU: the standard shapes of ANCHORS.md, fp16 + bf16
                                              # CPU: the PyTorch path vs torch SDPA vs naive, S 1k..8k (~10 min)
    python -m benchmarks --quick --out DIR    # a handful of small shapes (CPU: under a minute)
    python -m benchmarks --impl flashattn_py sdpa_flash --pass fwd --head-dim 128 --seqlen 4096 8192
    python -m benchmarks --interpret          # no GPU: the Triton kernels through the CPU interpreter,
                                              # a correctness smoke run on tiny shapes (no timings)
    python -m benchmarks --codegen ...        # the compiled-code report (benchmarks.codegen)
    python -m benchmarks --context-parallel ...  # the context-parallel benchmark (benchmarks.context_parallel)
    python -m benchmarks --host-overhead      # host µs per call, every public function (benchmarks.host_overhead)

Without a GPU the suite times flashattn_py's PyTorch path (TRITON_INTERPRET is
ignored there; use --interpret for the interpreter) against torch's fused CPU
kernel (`sdpa`) and the naive path, plus sliding-window / ALiBi / softcap /
bottom-right variants, nn.MultiheadAttention, and KV-cache decoding.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available() and "--interpret" in sys.argv[1:]:
    # before Triton is imported: its own @triton.jit helpers (tl.sum, tl.max, ...) are built for the interpreter
    # only when TRITON_INTERPRET is set at that point
    os.environ.setdefault("TRITON_INTERPRET", "1")

from .decode import decode_markdown, run_decode  # noqa: E402
from .decode import to_json as decode_to_json  # noqa: E402
from .impls import CPU_IMPLEMENTATIONS, IMPLEMENTATIONS  # noqa: E402
from .report import cpu_markdown, environment, markdown, plots, smoke_markdown, write_json  # noqa: E402
from .suite import (  # noqa: E402
    NAIVE_BUDGET_BYTES,
    PASSES,
    cpu_cases,
    cpu_variant_cases,
    quick_cases,
    run_case,
    run_cpu_case,
    run_interpreter_smoke,
    run_mha,
    standard_cases,
)

SMOKE_NOTE = ("No GPU, --interpret: the Triton kernels ran through Triton's CPU interpreter on tiny shapes, "
              "checked against the reference. No timings: interpreted kernels' times mean nothing.")
GPU_DEFAULT_IMPLS = [name for name in IMPLEMENTATIONS if name != "sdpa"]  # "sdpa" is one of the sdpa_* on a GPU
SUBCOMMANDS = {"--context-parallel": "context_parallel", "--codegen": "codegen", "--host-overhead": "host_overhead"}


def _progress(total: int):
    if not sys.stderr.isatty():  # logs get one line per record instead
        return None
    try:
        from tqdm import tqdm

        return tqdm(total=total, unit="case", file=sys.stderr)
    except ImportError:
        return None


def _kernels_loaded() -> bool:
    return "flashattn_py.kernels" in sys.modules


def _select_cpu_backend(interpret: bool) -> str | None:
    """Make the CPU run use the interpreter (smoke) or the PyTorch path (timings); an error message if it cannot.

    The kernels read TRITON_INTERPRET when they are first imported (first call), so
    this must run before anything launches.
    """
    wanted = "1" if interpret else None
    current = os.environ.get("TRITON_INTERPRET") or None
    current = None if current == "0" else current
    if interpret and "triton" in sys.modules:
        import triton.language.standard as tl_standard

        if type(tl_standard.sum).__name__ != "InterpretedFunction":
            return ("Triton was imported without TRITON_INTERPRET=1, so its helpers cannot run interpreted; "
                    "run `python -m benchmarks --interpret` in a fresh process")
    if _kernels_loaded():
        from flashattn_py import ops

        if ops.interpreter_active() != interpret:
            return ("this process already built the kernels " + ("without" if interpret else "with")
                    + " TRITON_INTERPRET; run in a fresh process" + ("" if interpret else " without it"))
        return None
    if current != wanted:
        if interpret:
            os.environ["TRITON_INTERPRET"] = "1"
        else:
            print("note: TRITON_INTERPRET ignored: the CPU suite times the PyTorch path (--interpret runs the "
                  "interpreter smoke)", file=sys.stderr)
            os.environ.pop("TRITON_INTERPRET", None)
    return None


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    for flag, module in SUBCOMMANDS.items():
        if flag in argv:  # another benchmark program: imported only when asked for
            return importlib.import_module(f"{__package__ or 'benchmarks'}.{module}").main(
                [a for a in argv if a != flag])

    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--impl", nargs="+", choices=sorted(set(IMPLEMENTATIONS) | set(CPU_IMPLEMENTATIONS)),
                        help="implementations (GPU default: all; CPU: flashattn_py sdpa naive)")
    parser.add_argument("--pass", dest="passes", nargs="+", choices=PASSES, default=list(PASSES))
    parser.add_argument("--dtype", nargs="+", choices=["float16", "bfloat16", "float32"])
    parser.add_argument("--head-dim", nargs="+", type=int)
    parser.add_argument("--seqlen", nargs="+", type=int, help="sequence lengths to keep (GPU: B·S = 16k stays)")
    parser.add_argument("--causal", choices=["both", "yes", "no"], default="both")
    parser.add_argument("--quick", action="store_true", help="a handful of small shapes")
    parser.add_argument("--out", type=Path, default=Path("bench-out"), help="directory for json, md and png")
    parser.add_argument("--decode", choices=["yes", "no", "only"], default="yes",
                        help="also run the KV-cache decode bandwidth benchmark (default yes)")
    parser.add_argument("--interpret", action="store_true",
                        help="no GPU: run the Triton kernels through the CPU interpreter as a correctness smoke")
    parser.add_argument("--variants", choices=["yes", "no", "only"], default="yes",
                        help="CPU: also the window / ALiBi / softcap / bottom-right variants (default yes)")
    parser.add_argument("--mha", choices=["yes", "no"], default="yes",
                        help="CPU: also nn.MultiheadAttention, ours vs torch's (default yes)")
    parser.add_argument("--repeats", type=int,
                        help="CPU: timed calls per implementation and pass, at least (default 5, --quick 3; short "
                             "cases get more)")
    parser.add_argument("--naive-budget-gib", type=float, default=NAIVE_BUDGET_BYTES / 2**30,
                        help="CPU: skip the naive path where its S×S matrices would exceed this")
    args = parser.parse_args(argv)

    on_gpu = torch.cuda.is_available()
    device = torch.device("cuda" if on_gpu else "cpu")
    if not on_gpu:
        problem = _select_cpu_backend(args.interpret)
        if problem:
            print(f"error: {problem}", file=sys.stderr)
            return 2
    args.out.mkdir(parents=True, exist_ok=True)
    causals = {"both": (False, True), "yes": (True,), "no": (False,)}[args.causal]
    env = environment(device)
    print(f"device: {env['device']} | torch {env['torch']} | triton {env['triton']} | CUDA {env['cuda']} | "
          f"{env['threads']} threads")
    if on_gpu:
        return _gpu(args, device, env, causals)
    if args.interpret:
        return _interpreter_smoke(args, device, env, causals)
    return _cpu(args, env, causals)


def _gpu(args, device, env, causals) -> int:
    impls = args.impl or GPU_DEFAULT_IMPLS
    if args.quick:
        cases = [c for c in quick_cases(True, tuple(args.dtype) if args.dtype else None)
                 if c.causal in causals and (not args.head_dim or c.head_dim in args.head_dim)]
    else:
        cases = standard_cases(args.head_dim or [64, 128, 256], args.seqlen,
                               tuple(args.dtype or ("float16", "bfloat16")), causals)
    if args.decode == "only":
        cases = []
    records = []
    bar = _progress(len(cases) * len(impls))
    for case in cases:
        for impl in impls:
            label = f"{impl} {case.label()}"
            if bar is not None:
                bar.set_description(label)
            for rec in run_case(impl, case, args.passes, device):
                records.append(rec)
                if bar is None:
                    shown = f"{rec.tflops:8.2f} TFLOP/s" if rec.status == "ok" else rec.status
                    print(f"{label} {rec.pass_:8s} {shown}")
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    decode = _decode(args, device)
    write_json(args.out / "results.json", env, records, decode_to_json(decode))
    as_dicts = [r.to_json() for r in records]
    (args.out / "results.md").write_text(markdown(env, as_dicts) + (decode_markdown(decode) if decode else ""))
    return _finish(args, records, decode, plots(args.out, as_dicts))


def _cpu(args, env, causals) -> int:
    impls = args.impl or list(CPU_IMPLEMENTATIONS)
    unknown = [i for i in impls if i not in CPU_IMPLEMENTATIONS]
    if unknown:
        print(f"error: on CPU the implementations are {list(CPU_IMPLEMENTATIONS)}, not {unknown}", file=sys.stderr)
        return 2
    cases = [] if args.variants == "only" else cpu_cases(args.quick, args.dtype, args.head_dim, args.seqlen, causals)
    if args.variants != "no":
        cases += cpu_variant_cases(args.quick, max(args.seqlen) if args.seqlen else None)
    if args.decode == "only":
        cases = []
    budget = int(args.naive_budget_gib * 2**30)
    repeats = args.repeats or (3 if args.quick else 5)
    records = []
    bar = _progress(len(cases))
    for case in cases:
        if bar is not None:
            bar.set_description(case.label())
        recs = run_cpu_case(case, impls, args.passes, repeats, budget, 0.5 if args.quick else 3.0)
        records += recs
        if bar is not None:
            bar.update(1)
        else:
            for rec in recs:
                shown = f"{rec.ms:10.2f} ms" if rec.status == "ok" else rec.status
                print(f"{rec.impl:12s} {case.label()} {rec.pass_:8s} {shown}", flush=True)
    if bar is not None:
        bar.close()
    mha = run_mha(args.quick, repeats) if args.mha == "yes" and args.decode != "only" else []
    for r in mha:
        print(f"MultiheadAttention {r.mode:5s} {r.impl:12s} {r.ms:10.2f} ms (max abs diff {r.max_abs_diff:.1e})")
    decode = _decode(args, torch.device("cpu"))
    write_json(args.out / "results.json", env, records, decode_to_json(decode), [r.to_json() for r in mha])
    as_dicts = [r.to_json() for r in records]
    md = cpu_markdown(env, as_dicts, [r.to_json() for r in mha]) + (decode_markdown(decode) if decode else "")
    (args.out / "results.md").write_text(md)
    return _finish(args, records, decode, plots(args.out, as_dicts))


def _interpreter_smoke(args, device, env, causals) -> int:
    cases = [c for c in quick_cases(False, tuple(args.dtype) if args.dtype else None)
             if c.causal in causals and (not args.head_dim or c.head_dim in args.head_dim)]
    records = run_interpreter_smoke(cases) if args.decode != "only" else []
    for r in records:
        print(f"interpreter {r.pass_:8s} {r.seqlen_q:5d} {'causal' if r.causal else 'full':6s} {r.dtype}: "
              f"{r.status}" + (f" (max abs err {r.max_abs_err:.1e})" if r.max_abs_err is not None else ""))
    decode = []
    if args.decode != "no":  # the decode path end to end; its bandwidth figures mean nothing here
        decode = run_decode(device, True, interpreter=True)
        for d in decode:
            d.ms = d.gbps = d.copy_gbps = d.fraction_of_copy = None
    write_json(args.out / "results.json", env, records, decode_to_json(decode))
    md = smoke_markdown(env, [r.to_json() for r in records], SMOKE_NOTE)
    if decode:
        md += "\nKV-cache decode (interpreter): " + ", ".join(
            f"{'paged' if d.paged else 'dense'} {d.status}" for d in decode) + "\n"
    (args.out / "results.md").write_text(md)
    return _finish(args, records, decode, [])


def _decode(args, device):
    decode = run_decode(device, args.quick) if args.decode != "no" else []
    for r in decode:
        shown = f"{r.gbps:.1f} GB/s = {r.fraction_of_copy:.1%} of copy" if r.status == "ok" else r.status
        print(f"decode B{r.batch} H{r.heads}/{r.heads_kv} D{r.head_dim} cache {r.cache_len} "
              f"{'paged' if r.paged else 'dense'}: {shown}")
    return decode


def _finish(args, records, decode, pngs) -> int:
    print(f"wrote {args.out / 'results.json'}, {args.out / 'results.md'}"
          + (f" and {len(pngs)} plots" if pngs else " (no plots)"))
    failed = [r for r in records if r.status == "error" and r.impl == "flashattn_py"]
    failed += [r for r in decode if r.status == "error"]
    for r in failed:
        print(f"flashattn_py failed: {r.message}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
