"""Parallel training == single-process training (2-process gloo runs on CPU, each compared with one process on
the same data, seed and initial weights), and weight merge / split round trips.

Every run starts from the same weights (Global.init_weights), uses plain SGD (so equal weights after the
steps mean equal gradients) with global-norm clipping, and trains 2 steps on batches of 8. The reference is one
process with 2 accumulated micro-batches of 4: a data-parallel rank (dp or sharding) sees one of them, tensor
and pipeline parallel ranks both (the pipeline as its 2 micro-batches), so each layout computes the same
mean of two micro-batch means. Tolerance: 2e-5 absolute on losses and weights (float32 sums in another
order).
"""
import json
import os
import subprocess
import sys

import numpy as np
import paddle
import pytest

from conftest import ROOT
from ppvilg.config import load_config
from ppvilg.distributed import convert
from ppvilg.distributed.env import ParallelState
from ppvilg.engine.checkpoint import resolve_checkpoint, save_checkpoint
from ppvilg.engine.tasks import build_task
from ppvilg.engine.trainer import Trainer
from ppvilg.models.vilg import ViLG, ViLGConfig, pipeline_bounds
from ppvilg.utils.runtime import seed_everything

TINY = os.path.join(ROOT, "configs/tests/vilg_tiny.yaml")
WORKER = os.path.join(ROOT, "tests", "dist_worker.py")
TOL = 2e-5


def _overrides(shards, out, init):
    return [f"Global.output_dir={out}", f"Data.train.path={shards / 'train'}", f"Data.eval.path={shards / 'eval'}",
            "Model.text_vocab_size=12296",  # the vocabulary (12,295) padded to a multiple of mp = 2
            "Model.num_layers=2", "Global.num_threads=1", f"Global.init_weights={init}",
            "Optimizer.name=sgd", "Optimizer.lr=0.5", "Optimizer.schedule=constant", "Optimizer.weight_decay=0.0",
            "Train.max_steps=2", "Train.batch_size=8", "Train.grad_clip=1.0", "Train.save_every=0"]


@pytest.fixture(scope="module")
def reference(tiny_shards, tmp_path_factory):
    """(shards, initial weights folder, single-process losses, final weights)."""
    root = tmp_path_factory.mktemp("dist")
    init = root / "init"
    cfg = load_config(TINY, _overrides(tiny_shards, root / "ref", init))
    seed_everything(0)
    task = build_task(cfg)
    save_checkpoint(str(init), cfg, task.modules(), {}, {"step": 0, "task": "vilg", "model": "vilg"})
    cfg = load_config(TINY, _overrides(tiny_shards, root / "ref", init) + ["Train.accum_steps=2"])
    trainer = Trainer(cfg, build_task(cfg))
    trainer.fit()
    final = convert.read_full_state(resolve_checkpoint(str(root / "ref")))
    return tiny_shards, init, [h["loss"] for h in trainer.history], final, root


def _launch(reference, name, extra):
    shards, init, _, _, root = reference
    out = root / name
    cmd = [sys.executable, "-m", "paddle.distributed.launch", "--nproc_per_node", "2", "--log_dir", str(out / "log"),
           WORKER, "-c", TINY] + [a for o in _overrides(shards, out, init) + extra for a in ("-o", o)]
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    if run.returncode:
        logs = "".join(open(os.path.join(out, "log", f)).read()[-3000:] for f in sorted(os.listdir(out / "log")))
        pytest.fail(f"{name} failed ({run.returncode}):\n{run.stdout[-2000:]}\n{logs}")
    hist = [json.load(open(out / f"history.rank{r}.json")) for r in range(2)]
    return out, hist


@pytest.mark.parametrize("name,extra,data_parallel", [
    ("dp2", ["Distributed.dp_degree=2"], True),
    ("sharding2", ["Distributed.sharding_degree=2"], True),
    ("mp2", ["Distributed.mp_degree=2", "Train.accum_steps=2"], False),
    ("pp2", ["Distributed.pp_degree=2", "Train.accum_steps=2"], False),
])
def test_two_processes_equal_one(reference, name, extra, data_parallel):
    _, _, ref_losses, ref_final, _ = reference
    out, hist = _launch(reference, name, extra)
    losses = [h["loss"] for h in hist[0]]
    if data_parallel:  # each rank logs the loss of its half of the batch
        losses = [(a["loss"] + b["loss"]) / 2 for a, b in zip(*hist)]
    np.testing.assert_allclose(losses, ref_losses, atol=TOL, rtol=0)
    final = convert.read_full_state(resolve_checkpoint(str(out)))
    assert sorted(final) == sorted(ref_final)
    for k in ref_final:
        np.testing.assert_allclose(final[k], ref_final[k], atol=TOL, rtol=0, err_msg=k)


def test_merge_split_round_trip():
    c = ViLGConfig(**dict(ViLGConfig.PRESETS["tiny"], num_layers=3, text_vocab_size=12296))
    paddle.seed(1)
    full = {k: v.numpy() for k, v in ViLG(c).state_dict().items()}
    for mp, pp in ((2, 1), (1, 3), (2, 2), (4, 1)):
        shards = {(m, p): convert.split(full, c.num_layers, mp, pp, m, p) for m in range(mp) for p in range(pp)}
        if mp > 1:  # split parameters really are split
            assert shards[(0, 0)]["blocks.0.attn.q.weight"].shape == (64, 64 // mp)
            assert shards[(0, 0)]["blocks.0.attn.proj.weight"].shape == (64 // mp, 64)
            assert shards[(0, 0)]["text_emb.weight"].shape == (12296 // mp, 64)
        if pp > 1:  # every parameter on exactly one stage
            names = [n for p in range(pp) for n in shards[(0, p)]]
            assert sorted(names) == sorted(full)
        merged = convert.merge(shards, mp, pp)
        assert sorted(merged) == sorted(full)
        for k in full:
            np.testing.assert_array_equal(merged[k], full[k])


def test_pipeline_bounds():
    assert pipeline_bounds(4, 2) == [0, 3, 6]       # [emb, b0, b1] [b2, b3, heads]
    assert pipeline_bounds(5, 2) == [0, 4, 7]
    assert pipeline_bounds(48, 4) == [0, 13, 25, 37, 50]
    with pytest.raises(ValueError, match="exceeds"):
        pipeline_bounds(2, 3)


def test_split_axes_match_the_parallel_layers_attributes():
    """MP_SPLIT_AXES (used by merge / split) says what the tensor-parallel layers set on their parameters;
    checked without collectives by building the layers' parameter shapes for mp = 2 by hand."""
    c = ViLGConfig(**dict(ViLGConfig.PRESETS["tiny"], text_vocab_size=12296))
    full = {k: v.numpy() for k, v in ViLG(c).state_dict().items()}
    half = convert.split(full, c.num_layers, 2, 1, 0, 0)
    assert half["blocks.1.mlp.0.weight"].shape == (64, 128) and half["blocks.1.mlp.0.bias"].shape == (128,)
    assert half["blocks.1.mlp.2.weight"].shape == (128, 64) and half["blocks.1.mlp.2.bias"].shape == (64,)
    assert half["text_bias"].shape == (6148,) and half["image_head.weight"].shape == (64, 64)
    assert ParallelState().mp == 1
