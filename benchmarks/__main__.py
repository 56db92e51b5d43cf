"""python -m benchmarks: fused vs naive vs PyTorch's kernels; TFLOP/s, memory, plots.

    python -m benchmarks                      # the standard shapes of ANCHORS.md, fp16 + bf16
    python -m benchmarks --quick --out DIR    # a handful of small shapes
    python -m benchmarks --impl flashattn_py sdpa_flash --pass fwd --head-dim 128 --seqlen 4096 8192

Without a GPU the kernels run through Triton's CPU interpreter on tiny shapes:
the run proves the pipeline end to end; its timings mean nothing.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():  # before flashattn_py's kernels are imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

from .decode import decode_markdown, run_decode  # noqa: E402
from .decode import to_json as decode_to_json  # noqa: E402
from .impls import IMPLEMENTATIONS  # noqa: E402
from .report import environment, markdown, plots, write_json  # noqa: E402
from .suite import PASSES, quick_cases, run_case, standard_cases  # noqa: E402

CPU_NOTE = ("No GPU: kernels ran through Triton's CPU interpreter on tiny shapes. "
            "These timings mean nothing; they only show the suite runs end to end.")


def _progress(total: int):
    if not sys.stderr.isatty():  # logs get one line per record instead
        return None
    try:
        from tqdm import tqdm

        return tqdm(total=total, unit="case", file=sys.stderr)
    except ImportError:
        return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--impl", nargs="+", choices=list(IMPLEMENTATIONS), default=list(IMPLEMENTATIONS))
    parser.add_argument("--pass", dest="passes", nargs="+", choices=PASSES, default=list(PASSES))
    parser.add_argument("--dtype", nargs="+", choices=["float16", "bfloat16", "float32"])
    parser.add_argument("--head-dim", nargs="+", type=int)
    parser.add_argument("--seqlen", nargs="+", type=int, help="standard lengths to keep (B·S = 16k stays)")
    parser.add_argument("--causal", choices=["both", "yes", "no"], default="both")
    parser.add_argument("--quick", action="store_true", help="a handful of small shapes")
    parser.add_argument("--out", type=Path, default=Path("bench-out"), help="directory for json, md and png")
    parser.add_argument("--decode", choices=["yes", "no", "only"], default="yes",
                        help="also run the KV-cache decode bandwidth benchmark (default yes)")
    args = parser.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    on_gpu = device.type == "cuda"
    causals = {"both": (False, True), "yes": (True,), "no": (False,)}[args.causal]
    if args.quick or not on_gpu:
        if not args.quick:
            print("No GPU: running the --quick set on CPU.", file=sys.stderr)
        cases = [c for c in quick_cases(on_gpu, tuple(args.dtype) if args.dtype else None)
                 if c.causal in causals and (not args.head_dim or c.head_dim in args.head_dim)]
    else:
        cases = standard_cases(args.head_dim or [64, 128, 256], args.seqlen,
                               tuple(args.dtype or ("float16", "bfloat16")), causals)

    env = environment(device)
    print(f"device: {env['device']} | torch {env['torch']} | triton {env['triton']} | CUDA {env['cuda']}")
    if not on_gpu:
        print(f"NOTE: {CPU_NOTE}")

    args.out.mkdir(parents=True, exist_ok=True)
    records = []
    if args.decode == "only":
        cases = []
    bar = _progress(len(cases) * len(args.impl))
    for case in cases:
        for impl in args.impl:
            label = f"{impl} B{case.batch} H{case.heads} S{case.seqlen_q} D{case.head_dim} " \
                    f"{'causal' if case.causal else 'full'} {case.dtype}"
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

    decode = run_decode(device, args.quick) if args.decode != "no" else []
    for r in decode:
        shown = f"{r.gbps:.1f} GB/s = {r.fraction_of_copy:.1%} of copy" if r.status == "ok" else r.status
        print(f"decode B{r.batch} H{r.heads}/{r.heads_kv} D{r.head_dim} cache {r.cache_len} "
              f"{'paged' if r.paged else 'dense'}: {shown}")

    write_json(args.out / "results.json", env, records, decode_to_json(decode))
    as_dicts = [r.to_json() for r in records]
    md = markdown(env, as_dicts, None if on_gpu else CPU_NOTE) + (decode_markdown(decode) if decode else "")
    (args.out / "results.md").write_text(md)
    pngs = plots(args.out, as_dicts)
    print(f"wrote {args.out / 'results.json'}, {args.out / 'results.md'}"
          + (f" and {len(pngs)} plots" if pngs else " (no plots: pip install matplotlib)"))
    failed = [r for r in records if r.status == "error" and r.impl == "flashattn_py"]
    failed += [r for r in decode if r.status == "error"]
    for r in failed:
        print(f"flashattn_py failed: {r.message}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
