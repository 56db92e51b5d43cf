"""Per-GPU fit: every launch of the representative set fits its target on the first config choice.

    python tests/fit_check.py                          # every NVIDIA target, a table on stdout
    python tests/fit_check.py --target sm_86 sm_120    # some of them
    python tests/fit_check.py --json OUT.json

Each target is a virtual GPU (`_launch.virtual_gpu(target, compile=True)`): the
public functions run the CUDA launch path, and every config the launcher
considers is compiled for the target by Triton's own JIT (the bundled ptxas)
and chosen as on the real GPU, by its shared memory. All cases of a target run
in one virtual GPU, in order, so the config cache sees what one process on that
GPU would (a masked call after an unmasked one among them). For each launch:
config, whether it was the first choice, grid, shared bytes, registers and
spills (cuobjdump). Exits 1 if any launch needed a fallback, passes a grid
limit, or failed to compile. Run by tests/test_fit.py; TRITON_INTERPRET must be unset.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import flashattn_py  # noqa: E402
from flashattn_py import _launch, _targets  # noqa: E402

NVIDIA = ("sm_80", "sm_86", "sm_89", "sm_90", "sm_100", "sm_120")
S = 1024  # shared memory and registers do not depend on the lengths; the grid does, and is checked


def _qkv(B, H, S_, D, dtype, H_kv=None, grad=True):
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(B, H, S_, D, generator=gen).to(dtype).requires_grad_(grad)
    k, v = (torch.randn(B, H_kv or H, S_, D, generator=gen).to(dtype).requires_grad_(grad) for _ in range(2))
    return q, k, v


def _fwd_bwd(out: torch.Tensor) -> None:
    out.float().sum().backward()


def dense(D: int, dtype: torch.dtype, causal: bool) -> Callable[[], None]:
    def run():
        _fwd_bwd(flashattn_py.attention(*_qkv(2, 8, S, D, dtype), causal=causal))
    return run


def bias_dropout():
    q, k, v = _qkv(2, 8, S, 128, torch.float16)
    bias = torch.randn(2, 1, 1, S).to(torch.float16).requires_grad_()
    _fwd_bwd(flashattn_py.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=0.1))


def gqa_window_alibi_softcap():
    q, k, v = _qkv(2, 8, S, 64, torch.bfloat16, H_kv=2)
    slopes = torch.rand(8)
    _fwd_bwd(flashattn_py.attention(q, k, v, causal=True, window=(256, 0), alibi_slopes=slopes, softcap=30.0))


def varlen():
    lengths = [300, 1000, 17, 700]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    q, k, v = (torch.randn(sum(lengths), 8, 128).to(torch.bfloat16).requires_grad_() for _ in range(3))
    _fwd_bwd(flashattn_py.attention_varlen(q, k, v, cu, cu, max(lengths), max(lengths), causal=True))


def decode(num_splits: int, paged: bool, dtype: torch.dtype = torch.bfloat16, D: int = 128):
    def run():
        B, H, H_kv = 1, 32, 8
        q = torch.randn(B, H, 1, D).to(dtype)
        if paged:
            cache = torch.randn(64, H_kv, 64, D).to(dtype)
            table = torch.arange(64, dtype=torch.int32).view(1, 64)
        else:
            cache, table = torch.randn(B, H_kv, 4096, D).to(dtype), None
        lens = torch.tensor([4000], dtype=torch.int32)
        flashattn_py.attention_with_kvcache(q, cache, cache, lens, block_table=table, num_splits=num_splits)
    return run


def flat_grid_dense():
    """B * H = 65,600 > 65,535: the FLAT_GRID kernels (uninitialised inputs: nothing runs, nothing is read)."""
    q, k, v = (torch.empty(4100, 16, 16, 64, dtype=torch.float16).requires_grad_() for _ in range(3))
    _fwd_bwd(flashattn_py.attention(q, k, v, causal=True))


def flat_grid_decode():
    q = torch.empty(1024, 64, 1, 128, dtype=torch.bfloat16)
    cache = torch.empty(1024, 8, 256, 128, dtype=torch.bfloat16)
    flashattn_py.attention_with_kvcache(q, cache, cache, torch.full((1024,), 200, dtype=torch.int32))


def unaligned_views():
    """Views 8 bytes past a 16-byte boundary, in the (B, S, H, D) layout: the plan must key on alignment and
    strides, or it would hand this call the kernel compiled for aligned, contiguous tensors."""
    def view(t: torch.Tensor) -> torch.Tensor:
        flat = torch.empty(t.numel() + 4, dtype=t.dtype)
        flat[4:] = t.transpose(1, 2).reshape(-1)
        return flat[4:].view(t.shape[0], t.shape[2], t.shape[1], t.shape[3]).transpose(1, 2).requires_grad_()
    q, k, v = (view(t.detach()) for t in _qkv(2, 8, S, 64, torch.float16))
    _fwd_bwd(flashattn_py.attention(q, k, v, causal=True))


CASES: dict[str, Callable[[], None]] = {
    "fp16 D64 causal": dense(64, torch.float16, True),
    "fp16 D64 causal, unaligned (B, S, H, D) views": unaligned_views,
    "fp16 D64 causal, again (the cached plan)": dense(64, torch.float16, True),
    "fp16 D128": dense(128, torch.float16, False),
    "bf16 D128 causal": dense(128, torch.bfloat16, True),
    "fp16 D256 causal": dense(256, torch.float16, True),
    "bf16 D256": dense(256, torch.bfloat16, False),
    "fp16 D128 float bias (grad) + dropout": bias_dropout,  # after "fp16 D128": masked after unmasked
    "bf16 D64 GQA4 window ALiBi softcap causal": gqa_window_alibi_softcap,
    "bf16 D128 varlen causal": varlen,
    "bf16 D128 decode, default splits": decode(0, False),
    "bf16 D128 decode, 3 splits": decode(3, False),
    "fp16 D64 decode, default splits": decode(0, False, torch.float16, 64),
    "bf16 D128 paged decode, default splits": decode(0, True),
    "bf16 D256 decode, default splits": decode(0, False, torch.bfloat16, 256),
    "fp32 D128": dense(128, torch.float32, False),
    "fp16 D64 causal, B*H 65,600 (flat grid)": flat_grid_dense,
    "bf16 D128 decode B1024 H64 (flat grid)": flat_grid_decode,
}


def _resources(compiled) -> tuple[int | None, int | None]:
    if compiled is None or "cubin" not in compiled.asm:
        return None, None
    from benchmarks import codegen_sass

    usage = codegen_sass.resource_usage(compiled.asm["cubin"])
    return usage.get("REG"), usage.get("STACK", 0)


def _plan_is_the_binders(where: str, r, gpu) -> list[str]:
    """A planned launch skips Triton's binder: its positional arguments must follow the kernel's parameters, and
    the kernel it holds must be the one the binder would specialize and pick for these very arguments."""
    found = []
    if tuple(r.order) != tuple(r.kernel.arg_names):
        found.append(f"{where}: positional order differs from the kernel's parameters")
    binder = _launch._compile(r.kernel, r.grid, r.args, r.config, gpu, True)  # Triton's cache: a lookup
    if r.compiled is None or binder is None or binder.hash != r.compiled.hash:
        found.append(f"{where}: the plan's compiled kernel is not the one Triton's binder picks for its arguments")
    return found


def check_target(name: str) -> tuple[list[dict], list[str]]:
    gpu = _targets.TARGETS[name]
    rows, failures = [], []
    with _launch.virtual_gpu(gpu, compile=True) as records:
        for label, case in CASES.items():
            start = len(records)
            try:
                case()
            except Exception as exc:  # noqa: BLE001 - report every case
                failures.append(f"{name} {label}: {type(exc).__name__}: {str(exc)[-800:]}")
                continue
            for r in records[start:]:
                regs, spills = _resources(r.compiled)
                c = r.config
                row = dict(target=name, case=label, kernel=r.name, grid=list(r.grid), shared=r.shared_bytes,
                           max_shared=gpu.max_shared, registers=regs, spill_bytes=spills, first_choice=not r.refused,
                           config=f"{c.block_m}x{c.block_n} w{c.num_warps} s{c.num_stages}"
                                  + (f" m{c.masked_block_m}" if c.masked_block_m else ""),
                           refused=[str(x) for x in r.refused])
                rows.append(row)
                if r.refused:
                    failures.append(f"{name} {label} {r.name}: first choice {r.refused[0]} does not fit")
                if r.shared_bytes is None or r.shared_bytes > gpu.max_shared:
                    failures.append(f"{name} {label} {r.name}: {r.shared_bytes} B shared > {gpu.max_shared}")
                if r.grid[0] > _targets.MAX_GRID_X or any(n > _targets.MAX_GRID_YZ for n in r.grid[1:]):
                    failures.append(f"{name} {label} {r.name}: grid {r.grid} past CUDA's limits")
                failures += _plan_is_the_binders(f"{name} {label} {r.name}", r, gpu)
    return rows, failures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", nargs="+", choices=NVIDIA, default=list(NVIDIA))
    parser.add_argument("--json", type=Path)
    opts = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("unset TRITON_INTERPRET to compile for the GPU")
        return 2
    from aot_compile import supports

    all_rows, all_failures = [], []
    for name in opts.target:
        if not supports(name):
            print(f"skip {name}: this triton's ptxas cannot target it", flush=True)
            continue
        rows, failures = check_target(name)
        for row in rows:
            print(f"{'ok  ' if row['first_choice'] else 'FALL'} {row['target']:6s} {row['case']:42s} "
                  f"{row['kernel']:20s} {row['config']:18s} smem {row['shared']:>6} regs {row['registers']} "
                  f"spill {row['spill_bytes']} grid {tuple(row['grid'])}", flush=True)
        for failure in failures:
            print(f"FAIL {failure}", flush=True)
        all_rows += rows
        all_failures += failures
    if opts.json:
        opts.json.write_text(json.dumps({"rows": all_rows, "failures": all_failures}, indent=1) + "\n")
    return 1 if all_failures else 0


if __name__ == "__main__":
    sys.exit(main())
