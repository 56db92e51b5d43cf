"""Launch configurations: every block shape, warp and stage count lives here.

Each kernel gets an ordered list of candidate configs for a (head dim, dtype,
compute capability). The launcher tries them in order and caches the first
that compiles, so a config too large for a GPU's shared memory falls back to
a smaller one instead of failing. Under the Triton interpreter one fixed,
small config is used; its block shapes are deliberately unequal (BLOCK_M !=
BLOCK_N) so the CPU test suite exercises the general causal-band logic.

The GPU configs are chosen from the compiled code (``python -m benchmarks.codegen``:
registers, spills, shared memory and hot-loop instructions per score on sm_90),
not from timings: no GPU was available to time them.
"""

from __future__ import annotations

from dataclasses import dataclass

from ._targets import GpuTarget


@dataclass(frozen=True)
class KernelConfig:
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    # dK/dV pass: query rows per step in the masked stages (causal diagonal, window edges, ragged
    # block); 0 means block_m. Half-height masked tiles free the registers their index tiles take.
    masked_block_m: int = 0

    @property
    def masked_rows(self) -> int:
        return self.masked_block_m or self.block_m


# Interpreter: warps and stages mean nothing there; small blocks keep CPU tests quick.
INTERPRETER = {
    "fwd": KernelConfig(block_m=32, block_n=16, num_warps=4, num_stages=1),
    "dkdv": KernelConfig(block_m=32, block_n=16, num_warps=4, num_stages=1, masked_block_m=16),
    "dq": KernelConfig(block_m=32, block_n=16, num_warps=4, num_stages=1),
    "preprocess": KernelConfig(block_m=32, block_n=32, num_warps=4, num_stages=1),
}
# Whether the interpreter reads streamed operands (K/V in the forward and dQ pass, Q/dO in the dK/dV pass)
# through tensor descriptors (TMA on a GPU, taken there from sm_90 on). Off by default on CPU, where the
# pointer path is the general one; tests switch it on to cover both.
INTERPRETER_STREAM_DESCRIPTORS = False
# The backward's row-wise preprocess (delta = rowsum(O * dO)); block_n is unused. It holds no tile in
# shared memory (512 B on every target); the second is there so no launch site has a single candidate.
PREPROCESS = (KernelConfig(block_m=128, block_n=128, num_warps=4, num_stages=1),
              KernelConfig(block_m=32, block_n=32, num_warps=4, num_stages=1))

# KV-cache calls with at most this many query rows use `decode_configs` (16-row tiles).
DECODE_MAX_QUERIES = 16
# Split-K decoding (num_splits=0): enough splits to fill the multiprocessors, each at least
# SPLIT_MIN_KEYS keys long, and at most MAX_SPLITS.
SPLIT_MIN_KEYS = 256
MAX_SPLITS = 64


def _large(gpu: GpuTarget) -> bool:
    """Hopper-class shared memory (227 KB: sm_90, sm_100): the tables' 128-wide tiles fit."""
    return gpu.max_shared >= 200 * 1024


def auto_splits(multiprocessors: int, batch_heads: int, cache_len: int) -> int:
    """Split-K factor for decoding: fill the GPU, but never splits shorter than SPLIT_MIN_KEYS."""
    return max(1, min(multiprocessors // max(batch_heads, 1), cache_len // SPLIT_MIN_KEYS, MAX_SPLITS))


def fwd_configs(block_d: int, elem_bytes: int, gpu: GpuTarget) -> list[KernelConfig]:
    """Forward candidates, best first. BLOCK_M query rows stay in registers; K/V tiles stream.

    Hopper (sm_90, codegen report, fp16 = bf16, K/V through descriptors, warp-instructions per
    1K scores in the unmasked loop's steady path, triton 3.9): D=64 128x128 8/3 218 (128x64 4/3:
    256); D=128 128x128 8/3 225, 194 registers, 0 spills, 225 KB shared (128x64 8/3: 364 with
    pointers); D=256 128x64 8/2 337 (64x64 8/2: 551). benchmarks/TUNING.md has the log.
    """
    hopper = _large(gpu)
    if elem_bytes == 4:  # fp32 tiles are twice the size: halve them
        return [KernelConfig(64, 32, 4, 2), KernelConfig(32, 32, 4, 1), KernelConfig(16, 16, 4, 1)]
    if block_d <= 64:
        first = [KernelConfig(128, 128, 8, 3)] if hopper else []
        return [*first, KernelConfig(128, 64, 4, 3), KernelConfig(64, 64, 4, 2), KernelConfig(32, 32, 4, 1)]
    if block_d <= 128:
        if hopper:
            return [KernelConfig(128, 128, 8, 3), KernelConfig(128, 64, 8, 3), KernelConfig(64, 64, 4, 2),
                    KernelConfig(32, 32, 4, 1)]
        return [KernelConfig(128, 64, 4, 2), KernelConfig(64, 64, 4, 2), KernelConfig(32, 32, 4, 1)]
    first = [KernelConfig(128, 64, 8, 2)] if hopper else []
    return [*first, KernelConfig(64, 64, 8, 2), KernelConfig(64, 32, 4, 2), KernelConfig(32, 32, 4, 1),
            KernelConfig(16, 16, 4, 1)]


def dkdv_configs(block_d: int, elem_bytes: int, gpu: GpuTarget,
                 descriptors: bool = False) -> list[KernelConfig]:
    """dK/dV candidates: K/V tiles of BLOCK_N rows resident, query tiles of BLOCK_M rows stream.

    Hopper (codegen report, warp-instructions per 1K scores, triton 3.9 / 3.6): D=64 32x128 4/3
    with 16-row masked steps 362, causal 356, 0 spills (64x128 8/2: 377); D=128 with Q/dO
    descriptors 64x128 8/2 with 32-row masked steps 415 / 408, causal 415 / 458, 0 spills
    (without bias or dropout: see `stream_descriptors`; 64-row masked steps spill 72 B causal on
    3.9); with pointers 64x64 8/3 493 (32x128 8/2: 598; 64x128 spills).
    """
    hopper = _large(gpu)
    if elem_bytes == 4:
        return [KernelConfig(32, 64, 4, 2), KernelConfig(16, 32, 4, 1), KernelConfig(16, 16, 4, 1)]
    if block_d <= 64:
        return [KernelConfig(32, 128, 4, 3, masked_block_m=16), KernelConfig(32, 64, 4, 2), KernelConfig(16, 32, 4, 1)]
    if block_d <= 128:
        if hopper and descriptors:  # Q/dO through TMA free the registers a 64x128 tile needs
            first = [KernelConfig(64, 128, 8, 2, masked_block_m=32), KernelConfig(64, 64, 8, 3)]
        else:
            first = [KernelConfig(64, 64, 8, 3)] if hopper else []
        return [*first, KernelConfig(32, 128, 8, 2), KernelConfig(32, 64, 4, 2), KernelConfig(16, 32, 4, 1)]
    # D=256 spills in every config tried (320 B; 16-row masked steps: causal 440 -> 336 B)
    return [KernelConfig(32, 64, 8, 1, masked_block_m=16), KernelConfig(16, 64, 4, 1), KernelConfig(16, 32, 4, 1),
            KernelConfig(16, 16, 4, 1)]


def dq_configs(block_d: int, elem_bytes: int, gpu: GpuTarget) -> list[KernelConfig]:
    """dQ candidates: Q/dO tiles of BLOCK_M rows resident, K/V tiles of BLOCK_N rows stream.

    Hopper (codegen report): BLOCK_N=64 pays the per-iteration fixed work over twice the keys:
    D=64 128x64 4/3 215 (128x32 4/3: 281); D=128 128x64 8/3 305 with K/V descriptors (128x32 8/2: 479).
    """
    hopper = _large(gpu)
    if elem_bytes == 4:
        return [KernelConfig(64, 32, 4, 2), KernelConfig(32, 16, 4, 1), KernelConfig(16, 16, 4, 1)]
    if block_d <= 64:
        first = [KernelConfig(128, 64, 4, 3)] if hopper else []
        return [*first, KernelConfig(128, 32, 4, 3), KernelConfig(64, 32, 4, 2), KernelConfig(32, 16, 4, 1)]
    if block_d <= 128:
        first = [KernelConfig(128, 64, 8, 3)] if hopper else []
        return [*first, KernelConfig(128, 32, 8, 2), KernelConfig(64, 32, 4, 2), KernelConfig(32, 16, 4, 1)]
    first = [KernelConfig(128, 32, 8, 2)] if hopper else []  # D=256: 789, 0 spills (64x32 8/1: 1127, 160 B spilled)
    return [*first, KernelConfig(64, 32, 8, 1), KernelConfig(64, 16, 4, 1), KernelConfig(32, 16, 4, 1),
            KernelConfig(16, 16, 4, 1)]


def decode_configs(block_d: int, elem_bytes: int, gpu: GpuTarget) -> list[KernelConfig]:
    """KV-cache decoding: a handful of query rows, so the smallest M tl.dot takes and long key blocks."""
    del gpu
    if elem_bytes == 4 or block_d > 128:
        return [KernelConfig(16, 64, 4, 2), KernelConfig(16, 32, 4, 1), KernelConfig(16, 16, 4, 1)]
    return [KernelConfig(16, 128, 4, 3), KernelConfig(16, 64, 4, 2), KernelConfig(16, 32, 4, 1)]


def candidates(kind: str, block_d: int, elem_bytes: int, gpu: GpuTarget,
               descriptors: bool = False, heavy_scores: bool = False) -> list[KernelConfig]:
    """The GPU candidates of one pass: "fwd", "dkdv" or "dq" (the dBias pass uses dq's).

    `heavy_scores`: a bias/mask tile loaded per score tile (pipelined in shared memory like K
    and V) or dropout's Philox state. The forward's 128x128 tile then no longer fits (295 KB of
    shared memory at D=128): it starts one size down. (dK/dV: see `stream_descriptors`.)
    """
    if kind == "dkdv":
        return dkdv_configs(block_d, elem_bytes, gpu, descriptors)
    if kind == "fwd":
        configs = fwd_configs(block_d, elem_bytes, gpu)
        return [c for c in configs if c.block_m * c.block_n < 128 * 128] or configs if heavy_scores else configs
    return dq_configs(block_d, elem_bytes, gpu)


def stream_descriptors(kind: str, block_d: int, heavy_scores: bool = False) -> bool:
    """Whether a pass reads its streamed operands through tensor descriptors where the inputs allow (sm_90+).

    From the codegen report: the forward and dQ gain at every head dim (D=128: fwd 269 -> 257,
    dQ 330 -> 305 warp-instructions per 1K scores, and far fewer registers). dK/dV gains at
    D=128 with the 64x128 tile it allows (493 -> 415, causal too), but not with a bias tile or
    dropout (`heavy_scores`: that tile then spills); it loses at D=64 (356 -> 367) and spills
    either way at D=256.
    """
    if kind == "dkdv":
        return not heavy_scores and 64 < block_d <= 128
    return True
