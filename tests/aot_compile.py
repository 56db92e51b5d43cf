"""Compile the kernels for Hopper (sm_90) without a GPU, the way the launchers would launch them.

    python tests/aot_compile.py            # run by tests/test_aot_compile.py in a clean subprocess

The Triton interpreter runs kernels as Python and so accepts code the real
compiler rejects (a global annotated `x: tl.constexpr = ...`, say). This builds
each launch's signature from the arguments the launchers pass, compiles it with
`triton.compile` for `cuda:90` (Triton ships ptxas), and checks the SASS: 16-bit
kernels must use warpgroup tensor-core MMAs (HGMMA). Prints one line per kernel
and exits 1 on any failure. TRITON_INTERPRET must be unset.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile

import torch
import triton
from triton.backends.compiler import GPUTarget

from flashattn_py import _config, ops

CAPABILITY = (9, 0)
_captured: list = []


def _capture(name, kernel, args, grid, constexprs, configs, cache_key):
    _captured.append((name, kernel, args, constexprs(configs[0]), configs[0]))


def _type(a) -> str:
    if isinstance(a, torch.Tensor):
        names = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.int32: "i32",
                 torch.uint8: "u8", torch.int64: "i64"}
        return "*" + names[a.dtype]
    if isinstance(a, bool):
        return "i1"
    if isinstance(a, int):
        return "i64" if abs(a) >= 2**31 else "i32"
    if isinstance(a, float):
        return "fp32"
    raise TypeError(type(a))


def compile_sm90(kernel, args, consts, cfg) -> tuple[int, int]:
    """(number of HGMMA instructions, shared memory bytes) of one compiled launch."""
    runtime = [n for n, p in zip(kernel.arg_names, kernel.params, strict=True) if not p.is_constexpr]
    signature = dict(zip(runtime, map(_type, args), strict=True))
    signature.update({n: "constexpr" for n in consts})
    src = triton.compiler.ASTSource(fn=kernel, signature=signature,
                                    constexprs={(kernel.arg_names.index(k),): v for k, v in consts.items()})
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 128),
                              options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})
    nvdisasm = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "nvdisasm")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        sass = subprocess.run([nvdisasm, "-c", f.name], capture_output=True, text=True, check=True).stdout
    return len(re.findall(r"\bHGMMA\b", sass)), compiled.metadata.shared


def _cases():
    def dense(D, dtype, backward=True, **spec_kw):
        def run():
            q = torch.randn(1, 2, 256, D, dtype=dtype)
            spec = ops.AttnSpec(scale=D ** -0.5, **spec_kw)
            ops.triton_fwd(q, q, q, None, None, spec)
            if backward:
                ops.triton_bwd(q, q, q, q, q, torch.zeros(1, 2, 256), None, None, None, False, spec)
        return run

    def features():
        q = torch.randn(1, 4, 256, 64, dtype=torch.bfloat16)
        kv = torch.randn(1, 2, 256, 64, dtype=torch.bfloat16)
        spec = ops.AttnSpec(scale=0.1, window_left=64, window_right=0, softcap=30.0)
        ops.triton_fwd(q, kv, kv, None, torch.rand(4), spec)
        ops.triton_bwd(q, q, kv, kv, q, torch.zeros(1, 4, 256), None, None, torch.rand(4), False, spec)

    def mask_dropout():
        q = torch.randn(2, 2, 256, 128, dtype=torch.float16)
        bias = torch.randn(2, 1, 1, 256, dtype=torch.float16)
        spec = ops.AttnSpec(scale=0.1, bias_kind=ops.BIAS_FLOAT, dropout_p=0.1, seed=123)
        ops.triton_fwd(q, q, q, bias, None, spec)
        ops.triton_bwd(q, q, q, q, q, torch.zeros(2, 2, 256), None, bias, None, True, spec)

    def varlen():
        q4 = torch.randn(300, 4, 128, dtype=torch.bfloat16).unsqueeze(0).transpose(1, 2)
        cu = torch.tensor([0, 100, 300], dtype=torch.int32)
        seq = ops.SeqLayout(mode=1, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=200, max_seqlen_k=200)
        ops.triton_fwd(q4, q4, q4, None, None, ops.AttnSpec(scale=0.1, window_right=0), seq)

    def decode():
        q = torch.randn(4, 8, 1, 128, dtype=torch.bfloat16)
        cache = torch.randn(64, 2, 256, 128, dtype=torch.bfloat16)
        seq = ops.SeqLayout(mode=2, seqlens_k=torch.full((4,), 4000, dtype=torch.int32),
                            block_table=torch.arange(64, dtype=torch.int32).view(4, 16))
        ops.triton_fwd(q, cache, cache, None, None, ops.AttnSpec(scale=0.1, window_right=0), seq, num_splits=8)

    return [("fp16 D128 causal", dense(128, torch.float16, window_right=0)),
            ("bf16 D64 GQA window alibi softcap", features),
            ("fp16 D128 bias dropout dbias", mask_dropout),
            ("bf16 varlen causal fwd", varlen),
            ("bf16 paged split-K decode", decode),
            ("fp32 D80 fwd", dense(80, torch.float32, backward=False))]


def main() -> int:
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("unset TRITON_INTERPRET to compile for the GPU")
        return 2
    ops._launch = _capture
    ops._capability = lambda t: CAPABILITY
    tables = {"fwd": _config.fwd_configs, "dkdv": _config.dkdv_configs, "dq": _config.dq_configs}
    ops._configs = lambda kind, q, block_d: tables[kind](block_d, q.element_size(), CAPABILITY)
    failures = 0
    for label, run in _cases():
        _captured.clear()
        run()
        for name, kernel, args, consts, cfg in _captured:
            tag = f"{label:36s} {name:20s} BM{cfg.block_m} BN{cfg.block_n} w{cfg.num_warps} s{cfg.num_stages}"
            try:
                hgmma, smem = compile_sm90(kernel, args, consts, cfg)
            except Exception as exc:  # noqa: BLE001 - report every kernel, then fail
                failures += 1
                print(f"FAIL {tag}: {type(exc).__name__}: {str(exc)[-1500:]}", flush=True)
                continue
            needs_mma = name != "attn_bwd_preprocess" and "fp32" not in label
            if needs_mma and hgmma == 0:
                failures += 1
                print(f"FAIL {tag}: no HGMMA in the SASS", flush=True)
            else:
                print(f"ok   {tag} HGMMA={hgmma} smem={smem}", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
