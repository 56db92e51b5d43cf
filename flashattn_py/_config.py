"""Launch configurations: every block shape, warp and stage count lives here.

Each kernel gets an ordered list of candidate configs for a (head dim, dtype,
compute capability). The launcher tries them in order and caches the first
that compiles, so a config too large for a GPU's shared memory falls back to
a smaller one instead of failing. Under the Triton interpreter one fixed,
small config is used; its block shapes are deliberately unequal (BLOCK_M !=
BLOCK_N) so the CPU test suite exercises the general causal-band logic.

These are starting points, not tuned figures: tuning on Hopper is its own work
(see benchmarks/TUNING.md when it exists).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class KernelConfig:
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


# Interpreter: warps and stages mean nothing there; small blocks keep CPU tests quick.
INTERPRETER_FWD = KernelConfig(block_m=32, block_n=16, num_warps=4, num_stages=1)
INTERPRETER_DKDV = KernelConfig(block_m=16, block_n=32, num_warps=4, num_stages=1)
INTERPRETER_DQ = KernelConfig(block_m=32, block_n=16, num_warps=4, num_stages=1)
INTERPRETER_PREPROCESS_BLOCK_M = 32
PREPROCESS_BLOCK_M = 128


def fwd_configs(block_d: int, elem_bytes: int, capability: tuple[int, int]) -> list[KernelConfig]:
    """Forward candidates, best first. BLOCK_M query rows stay in registers; K/V tiles stream."""
    hopper = capability >= (9, 0)
    if elem_bytes == 4:  # fp32 tiles are twice the size: halve them
        return [KernelConfig(64, 32, 4, 2), KernelConfig(32, 32, 4, 1), KernelConfig(16, 16, 4, 1)]
    if block_d <= 64:
        return [KernelConfig(128, 64, 4, 3), KernelConfig(64, 64, 4, 2), KernelConfig(32, 32, 4, 1)]
    if block_d <= 128:
        first = KernelConfig(128, 64, 8, 3) if hopper else KernelConfig(128, 64, 4, 2)
        return [first, KernelConfig(64, 64, 4, 2), KernelConfig(32, 32, 4, 1)]
    return [KernelConfig(64, 64, 8, 2), KernelConfig(64, 32, 4, 2), KernelConfig(32, 32, 4, 1),
            KernelConfig(16, 16, 4, 1)]


def dkdv_configs(block_d: int, elem_bytes: int, capability: tuple[int, int]) -> list[KernelConfig]:
    """dK/dV candidates: K/V tiles of BLOCK_N rows resident, query tiles of BLOCK_M rows stream."""
    del capability
    if elem_bytes == 4:
        return [KernelConfig(32, 64, 4, 2), KernelConfig(16, 32, 4, 1), KernelConfig(16, 16, 4, 1)]
    if block_d <= 64:
        return [KernelConfig(32, 128, 4, 3), KernelConfig(32, 64, 4, 2), KernelConfig(16, 32, 4, 1)]
    if block_d <= 128:
        return [KernelConfig(32, 128, 8, 2), KernelConfig(32, 64, 4, 2), KernelConfig(16, 32, 4, 1)]
    return [KernelConfig(32, 64, 8, 1), KernelConfig(16, 64, 4, 1), KernelConfig(16, 32, 4, 1),
            KernelConfig(16, 16, 4, 1)]


def dq_configs(block_d: int, elem_bytes: int, capability: tuple[int, int]) -> list[KernelConfig]:
    """dQ candidates: Q/dO tiles of BLOCK_M rows resident, K/V tiles of BLOCK_N rows stream."""
    del capability
    if elem_bytes == 4:
        return [KernelConfig(64, 32, 4, 2), KernelConfig(32, 16, 4, 1), KernelConfig(16, 16, 4, 1)]
    if block_d <= 64:
        return [KernelConfig(128, 32, 4, 3), KernelConfig(64, 32, 4, 2), KernelConfig(32, 16, 4, 1)]
    if block_d <= 128:
        return [KernelConfig(128, 32, 8, 2), KernelConfig(64, 32, 4, 2), KernelConfig(32, 16, 4, 1)]
    return [KernelConfig(64, 32, 8, 1), KernelConfig(64, 16, 4, 1), KernelConfig(32, 16, 4, 1),
            KernelConfig(16, 16, 4, 1)]


def decode_configs(block_d: int, elem_bytes: int, capability: tuple[int, int]) -> list[KernelConfig]:
    """KV-cache decoding: a handful of query rows, so the smallest M tl.dot takes and long key blocks."""
    del capability
    if elem_bytes == 4 or block_d > 128:
        return [KernelConfig(16, 64, 4, 2), KernelConfig(16, 32, 4, 1), KernelConfig(16, 16, 4, 1)]
    return [KernelConfig(16, 128, 4, 3), KernelConfig(16, 64, 4, 2), KernelConfig(16, 32, 4, 1)]
