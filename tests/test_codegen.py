"""The compiled-code report (`python -m benchmarks.codegen`): its SASS analysis, and one narrow run end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import codegen_sass as cs

ROOT = Path(__file__).resolve().parent.parent

# A kernel with two MMA loops (a mask-free one and a masked one with a select per element), an out-of-line
# wait block after EXIT that branches back into the second loop (not a loop of its own), and a spin loop.
SASS = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
.L_x_0:
        /*0010*/                   LDGSTS.E.BYPASS.128 [R2], desc[UR4][R4.64] ;
        /*0020*/                   WARPGROUP.ARRIVE ;
        /*0030*/                   HGMMA.64x64x16.F32 R24, gdesc[UR8], RZ, !UPT ;
        /*0040*/                   HGMMA.64x64x16.F32 R24, gdesc[UR8], R24, gsb0 ;
        /*0050*/                   WARPGROUP.DEPBAR.LE gsb0, 0x0 ;
        /*0060*/                   MUFU.EX2 R8, R8 ;
        /*0070*/                   IADD3 R3, R3, 0x40, RZ ;
        /*0080*/                   ISETP.GE.AND P0, PT, R3, R9, PT ;
        /*0090*/              @!P0 BRA `(.L_x_0) ;
.L_x_1:
        /*00a0*/                   HGMMA.64x64x16.F32 R24, gdesc[UR8], RZ, !UPT ;
        /*00b0*/                   HGMMA.64x64x16.F32 R24, gdesc[UR8], R24, gsb0 ;
        /*00c0*/                   ISETP.GE.AND P1, PT, R3, R10, PT ;
        /*00d0*/                   FSEL R24, R24, -INF , !P1 ;
        /*00e0*/                   ISETP.GE.AND P1, PT, R3, R11, PT ;
        /*00f0*/                   FSEL R25, R25, -INF , !P1 ;
        /*0100*/              @!P2 BRA `(.L_x_3) ;
.L_x_2:
        /*0110*/                   IADD3 R3, R3, 0x40, RZ ;
        /*0120*/                   ISETP.GE.AND P0, PT, R3, R12, PT ;
        /*0130*/              @!P0 BRA `(.L_x_1) ;
        /*0140*/                   EXIT ;
.L_x_3:
        /*0150*/                   SYNCS.PHASECHK.TRANS64.TRYWAIT P2, [R5], R6 ;
        /*0160*/              @!P2 BRA `(.L_x_3) ;
        /*0170*/                   BRA `(.L_x_2) ;
"""


def test_natural_loops_and_hot_loop_choice():
    instrs, labels = cs.parse_sass(SASS)
    assert len(instrs) == 24 and labels[".L_x_1"] == 0xA0
    loops = cs.find_loops(instrs, labels)
    # three loops: the two MMA loops and the spin loop; the out-of-line block's branch back is no loop header
    assert sorted((lp.start, lp.end) for lp in loops) == [(0x10, 0x90), (0xA0, 0x170), (0x150, 0x160)]
    rows, hot = cs.loop_table(instrs, labels, mask_tolerance=0.5)
    assert len(rows) == 2 and hot == 0
    assert rows[0]["instructions"] == 9 and rows[0]["mma"] == {"HGMMA.64x64x16.F32": 2}
    assert rows[0]["tensor_core_waits"] == {"HGMMA gsb0 (commit)": 1, "WARPGROUP.ARRIVE": 1, "WARPGROUP.DEPBAR": 1}
    # its blocks, each once, are 10 + 3 out of line; the steady path skips the wait that retries
    assert rows[1]["compare_select"] == 5 and rows[1]["static_instructions"] == 13
    assert rows[1]["instructions"] == 10
    assert sorted(b["instructions"] for b in rows[1]["off_path"]) == [1, 2]
    assert rows[0]["instructions"] == rows[0]["static_instructions"] == 9 and rows[0]["off_path"] == []
    # with a tolerance that swallows the masked loop's extra selects, the earlier loop still wins
    assert cs.loop_table(instrs, labels, mask_tolerance=100)[1] == 0
    assert cs.mma_flops(rows[0]["_loop"].instrs, num_warps=8) == 2 * 8 * (2 * 64 * 64 * 16 / 4)


def test_steady_path_never_skips_work():
    """A side block holding an MMA or a load is real work: the loop is then counted whole."""
    for work in ("HGMMA.64x64x16.F32 R24, gdesc[UR8], R24, gsb0", "LDG.E.128 R4, desc[UR4][R2.64]"):
        sass = f"""
        /*0000*/                   MOV R1, c[0x0][0x28] ;
.L_x_0:
        /*0010*/                   HGMMA.64x64x16.F32 R24, gdesc[UR8], RZ, !UPT ;
        /*0020*/              @!P1 BRA `(.L_x_1) ;
        /*0030*/                   {work} ;
        /*0040*/                   FMUL R8, R8, R9 ;
.L_x_1:
        /*0050*/                   IADD3 R3, R3, 0x40, RZ ;
        /*0060*/                   ISETP.GE.AND P0, PT, R3, R9, PT ;
        /*0070*/              @!P0 BRA `(.L_x_0) ;
        /*0080*/                   EXIT ;
"""
        instrs, labels = cs.parse_sass(sass)
        rows, hot = cs.loop_table(instrs, labels)
        assert rows[hot]["instructions"] == rows[hot]["static_instructions"] == 7 and rows[hot]["off_path"] == []
    # a side block of plain arithmetic (the forward's rare rescale) is off the steady path
    instrs, labels = cs.parse_sass(sass.replace(work, "FMUL R10, R10, R9"))
    rows, hot = cs.loop_table(instrs, labels)
    assert rows[hot]["instructions"] == 5 and rows[hot]["static_instructions"] == 7
    assert rows[hot]["off_path"] == [{"source": "?", "instructions": 2}]


def test_mma_shapes():
    hgmma = cs.Instr(0, "", "HGMMA.64x128x16.F32", "R24, R120, gdesc[UR8].tnspB, R24")
    hmma = cs.Instr(0, "", "HMMA.16816.F32.BF16", "R4, R8, R12, R4")
    tcgen05 = cs.Instr(0, "", "UTCHMMA", "gdesc[UR20], gdesc[UR4], tmem[UR16], tmem[UR18], idesc[UR19], UPT")
    assert all(cs.is_mma(i) for i in (hgmma, hmma, tcgen05))
    assert cs.mma_flops_per_warp(hgmma) == 2 * 64 * 128 * 16 / 4
    assert cs.mma_flops_per_warp(hmma) == 2 * 16 * 8 * 16
    assert cs.mma_flops_per_warp(tcgen05) is None


@pytest.mark.skipif(not cs.has_bundled_toolchain(), reason="this Triton has no bundled NVIDIA toolchain")
def test_report_end_to_end(tmp_path):
    import triton

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-m", "benchmarks.codegen", "--dtype", "fp16", "--head-dim", "64", "--causal", "false",
           "--variants", "dense", "--pass", "fwd", "bwd_dq", "--out", str(tmp_path), "--dump", str(tmp_path / "sass")]
    result = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    report = json.loads((tmp_path / "codegen.json").read_text())
    assert report["arch"] == "sm_90" and report["triton"] == triton.__version__
    assert [k["name"] for k in report["kernels"]] == ["attn_fwd", "attn_bwd_dq"]
    for k in report["kernels"]:
        assert k["pass"] in ("fwd", "bwd_dq") and k["dtype"] == "fp16" and k["head_dim"] == 64
        assert k["causal"] is False
        assert set(k["config"]) == {"block_m", "block_n", "num_warps", "num_stages", "masked_block_m"}
        assert k["registers"] > 0 and k["spill_bytes"] >= 0 and k["shared_bytes"] > 0
        hot = k["hot_loop"]
        assert hot is not None and hot["instructions_per_iteration"] > 0 and hot["warp_instr_per_1k_scores"] > 0
        assert hot["static_instructions_per_iteration"] >= hot["instructions_per_iteration"]
        assert any(op.startswith("HGMMA") for op in hot["mma"]), hot["mma"]
        assert hot["scores_per_iteration"] == k["config"]["block_m"] * k["config"]["block_n"] * hot["unroll"]
        assert hot["mma_flops_per_iteration"] == hot["expected_mma_flops_per_iteration"] * hot["unroll"]
        assert "WARPGROUP.DEPBAR" in hot["tensor_core_waits"]
        assert isinstance(hot["model"]["issue_vs_tensor"], float)
        assert sum(loop["chosen"] for loop in k["loops"]) == 1
        # the JIT binder's specialization, as on a GPU: aligned pointers, and kv_group == 1 folded to a constant
        spec = k["specialization"]
        assert "Q" in spec["divisible_by_16"] and "stride_qm" in spec["divisible_by_16"]
        assert spec["folded_to_constants"].get("kv_group") == 1
    markdown = (tmp_path / "codegen.md").read_text()
    assert "warp-instr/1K" in markdown and "HGMMA" in markdown
    dumped = sorted(p.suffix for p in (tmp_path / "sass").iterdir())
    assert dumped.count(".sass") == 2 and dumped.count(".ptx") == 2
