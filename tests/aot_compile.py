"""Compile every kernel variant without a GPU, exactly as a launch would, and check the tensor-core code.

    python tests/aot_compile.py                    # sm_90, sm_80, and sm_100 where this triton supports it
    python tests/aot_compile.py --arch sm_90       # one target
    python tests/aot_compile.py --full             # the whole grid of `python -m benchmarks.codegen`
    python tests/aot_compile.py --arch sm_80 --dense-only   # the compact set's dense variants only

Run by tests/test_aot_compile.py in a clean subprocess. The Triton interpreter
runs kernels as Python and so accepts code the real compiler rejects; this
compiles them for real. It shares `benchmarks/codegen.py`'s faithful compile:
the launch layer records each launch (`_launch.capture_launches`: arguments and
the config it picks for the target), and Triton's own `JITFunction.run(...,
warmup=True)` compiles it under a stand-in driver for the target, so the JIT
binder sets the signature, constexprs and 16-byte alignment / divisibility
attributes as a launch on that GPU would (bare `triton.compile` calls without
them give scalar loads and spills: not the code that runs).

Checks: every kernel compiles; every 16-bit kernel except the preprocess has
tensor-core MMAs in its SASS: HGMMA (wgmma) on sm_90, HMMA (mma.sync) on sm_80,
tcgen05 (UTC*MMA) or HMMA on sm_100, HMMA on sm_86 / sm_89 / sm_120 (consumer parts:
no wgmma, no tcgen05); a forward tile under 64 query rows (decode)
may use HMMA anywhere, as wgmma and tcgen05 need 64. Prints one line per kernel and exits 1 on
any failure. TRITON_INTERPRET must be unset.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import codegen  # noqa: E402
from benchmarks import codegen_sass as sass_tools  # noqa: E402

# what a 16-bit kernel's SASS must contain, per target
# (sm_86 / sm_89 / sm_120: the consumer parts have mma.sync only; sm_120 has TMA but neither wgmma nor tcgen05)
REQUIRED_MMA = {"sm_80": ("HMMA",), "sm_86": ("HMMA",), "sm_89": ("HMMA",), "sm_90": ("HGMMA",),
                "sm_100": ("UTCHMMA", "UTCQMMA", "UTCMMA", "HMMA"), "sm_120": ("HMMA",)}
# the CUDA release whose ptxas first targets an arch (sm_100a and sm_120a: CUDA 12.8)
MIN_PTXAS = {"sm_100": (12, 8), "sm_120": (12, 8)}
# a forward tile of fewer than 64 query rows (the decode configs) cannot use wgmma / tcgen05: mma.sync is right there
SMALL_M_MMA = ("HMMA",)


def required_mma(arch: str, entry: dict) -> tuple[str, ...]:
    if entry["pass"] == "fwd" and entry["config"]["block_m"] < 64:
        return REQUIRED_MMA[arch] + SMALL_M_MMA
    return REQUIRED_MMA[arch]
# the compact set: every feature variant, and one dense variant per head-dim config table
COMPACT = ("fp16 D128 causal", "bf16 D64", "bf16 D256 causal")


def _ptxas_for(arch: int) -> str:
    """The ptxas this triton compiles `arch` with (triton 3.9: ptxas-blackwell from sm_90 on), by path."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        return get_ptxas(arch).path
    except (ImportError, AttributeError, RuntimeError):  # older triton: the newest bundled ptxas
        pass
    for name in ("ptxas-blackwell", "ptxas") if arch >= 100 else ("ptxas",):
        try:
            return sass_tools.tool(name)
        except FileNotFoundError:
            continue
    raise FileNotFoundError("no ptxas")


def supports(arch: str) -> bool:
    """Whether this triton's bundled ptxas can target `arch` (sm_100 and sm_120 need CUDA 12.8 or newer)."""
    if arch not in MIN_PTXAS:
        return True
    try:
        out = subprocess.run([_ptxas_for(codegen.ARCHS[arch]), "--version"], capture_output=True, text=True).stdout
    except (FileNotFoundError, OSError):
        return False
    release = out.rsplit("release", 1)[-1].split(",")[0].strip()
    try:
        major, minor = (int(x) for x in release.split(".")[:2])
    except ValueError:
        return False
    return (major, minor) >= MIN_PTXAS[arch]


def check_variants(full: bool, dense_only: bool = False) -> list[codegen.Variant]:
    every = codegen.variants(2, 16, 8192)
    if full:
        return every
    return [v for v in every if (v.kind == "feature" and not dense_only) or v.label in COMPACT]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", nargs="+", choices=sorted(codegen.ARCHS), default=["sm_90", "sm_80", "sm_100"])
    parser.add_argument("--full", action="store_true", help="every variant of the codegen report, not the compact set")
    parser.add_argument("--dense-only", action="store_true", help="the compact set's dense variants only")
    opts = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("unset TRITON_INTERPRET to compile for the GPU")
        return 2
    failures = 0
    for arch in opts.arch:
        if not supports(arch):
            print(f"skip {arch}: this triton's ptxas cannot target it", flush=True)
            continue
        args = codegen.build_parser().parse_args(["--arch", arch])
        report = codegen.run_report(args, check_variants(opts.full, opts.dense_only), verbose=False)
        for failure in report["failures"]:
            failures += 1
            print(f"FAIL {arch:6s} {failure['variant']:46s} {failure['name']:20s} {failure['error'][-1500:]}",
                  flush=True)
        for entry in report["kernels"]:
            c = entry["config"]
            tag = (f"{arch:6s} {entry['variant']:46s} {entry['name']:20s} "
                   f"BM{c['block_m']} BN{c['block_n']} w{c['num_warps']} s{c['num_stages']}")
            mma = entry["kernel_totals"]["mma"]
            needs_mma = entry["pass"] != "bwd_preprocess" and entry["dtype"] != "fp32"
            wanted = required_mma(arch, entry)
            found = sum(n for op, n in mma.items() if op.split(".")[0] in wanted)
            if needs_mma and not found:
                failures += 1
                print(f"FAIL {tag}: no {'/'.join(wanted)} in the SASS ({mma or 'no MMA'})", flush=True)
                continue
            fits = "" if entry["fits_shared_memory"] else " (over the shared-memory limit: a launch falls back)"
            print(f"ok   {tag} MMA={found} regs={entry['registers']} spill={entry['spill_bytes']} "
                  f"smem={entry['shared_bytes']}{fits}", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
