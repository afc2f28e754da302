"""The memory planner's arithmetic against hand-computed cases (see ppvilg/distributed/planner.py)."""
import os

import pytest

from conftest import ROOT
from ppvilg.distributed.planner import GIB, ParallelLayout, candidates, memory, plan
from ppvilg.models.vilg import ViLGConfig, count_parameters

# d=8, ffn 32, 2 layers: per layer 32 (2 LN) + 216 (q,k,v) + 72 (proj) + 288 + 264 (MLP) = 872;
# embeddings 80 + 56 + 32 + 32 + 32 = 232; final LN 16; heads 80 + 10 + 48 + 6 = 144  -> 2136 parameters
SMALL = ViLGConfig(num_layers=2, hidden_size=8, num_heads=2, ffn_mult=4, text_vocab_size=10, max_text_len=4,
                   num_codes=6, grid=2)


def test_parameter_count_of_the_hand_case():
    assert count_parameters(SMALL) == 2136


def test_single_gpu_no_recompute():
    m = memory(SMALL, ParallelLayout(micro_batch=2))
    # S = 4 + 4 = 8; per layer 8*2*8*(10+24) + 5*2*8*8*2 = 4352 + 1280 = 5632; x2 directions x2 layers
    assert (m["weights"], m["gradients"], m["optimizer"]) == (4272, 4272, 25632)
    assert m["activations"] == 22528
    assert m["logits"] == 3 * 2 * (4 * 6 + 4 * 10) * 4 == 1536
    assert m["total"] == 58240


def test_tensor_parallel_sharding_stage3_recompute():
    m = memory(SMALL, ParallelLayout(mp=2, sharding=4, stage=3, recompute=True))
    # P/mp = 1068; stage 3 divides weights, gradients and optimizer states by 4; recompute keeps 2*S*b*h per layer
    assert (m["weights"], m["gradients"], m["optimizer"]) == (534, 534, 3204)
    assert m["activations"] == 2 * (2 * 8 * 1 * 8) * 2 == 512
    assert m["logits"] == 384 and m["total"] == 5168


def test_stages_and_offload_and_pipeline():
    s1, s2 = memory(SMALL, ParallelLayout(sharding=2, stage=1)), memory(SMALL, ParallelLayout(sharding=2, stage=2))
    assert s1["gradients"] == 4272 and s2["gradients"] == 2136 and s1["optimizer"] == s2["optimizer"] == 12816
    assert memory(SMALL, ParallelLayout(offload=True))["optimizer"] == 0
    pp = memory(SMALL, ParallelLayout(pp=2))
    # half the parameters; the first stage keeps 2 micro-batches of its 1 layer in flight
    assert pp["weights"] == 2136 and pp["activations"] == 2 * 2816 * 1 * 2 and pp["total"] == 29120


def test_candidates_use_exactly_the_gpus_and_nodes():
    for lay in candidates(16, gpus_per_node=8):
        assert lay.gpus == 16 and lay.mp * lay.sharding <= 8


def test_the_paper_10b_layout_fits_on_64_80gb_gpus():
    c = ViLGConfig(**ViLGConfig.PRESETS["10b"])
    fits, rows = plan(c, 64, 80)
    best = fits[0][0]
    assert (best.mp, best.pp) == (1, 1) and best.sharding == 8 and best.stage == 3  # the paper's choice
    assert fits[0][1]["total"] <= 0.9 * 80 * GIB
    assert not plan(c, 1, 16)[0]  # one 16 GB GPU cannot even hold the 16-bit weights (19.7 GB)


def test_plan_tool_runs():
    import subprocess
    import sys
    r = subprocess.run([sys.executable, "tools/plan_parallel.py", "-c", "configs/vilg/10b.yaml", "--gpus", "64",
                        "--gpu-mem", "80"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "recommended: dp=8 mp=1 pp=1 sharding=8 (stage 3)" in r.stdout
