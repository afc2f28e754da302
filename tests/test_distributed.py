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
from ppvilg.checkpoints import load_model, read_full_state, resolve_checkpoint, save_checkpoint, weight_file
from ppvilg.engine.tasks import build_task
from ppvilg.engine.trainer import Trainer
from ppvilg.models.vilg import ViLG, ViLGConfig
from ppvilg.models.vilg_pp import pipeline_bounds
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
    save_checkpoint(str(init), cfg, {"model": task.model.state_dict()}, {}, {"step": 0, "task": "vilg", "model": "vilg"})
    cfg = load_config(TINY, _overrides(tiny_shards, root / "ref", init) + ["Train.accum_steps=2"])
    trainer = Trainer(cfg, build_task(cfg))
    trainer.fit()
    final = read_full_state(resolve_checkpoint(str(root / "ref")))
    return tiny_shards, init, [h["loss"] for h in trainer.history], final, root


def _launch_two(config, overrides, out, name):
    """tests/dist_worker.py on 2 gloo processes with these -o overrides (Global.output_dir=out among them) ->
    each rank's per-step history; a failed run fails the test with both ranks' logs."""
    cmd = [sys.executable, "-m", "paddle.distributed.launch", "--nproc_per_node", "2", "--log_dir", str(out / "log"),
           WORKER, "-c", config] + [a for o in overrides for a in ("-o", o)]
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    if run.returncode:
        logs = "".join(open(os.path.join(out, "log", f)).read()[-3000:] for f in sorted(os.listdir(out / "log")))
        pytest.fail(f"{name} failed ({run.returncode}):\n{run.stdout[-2000:]}\n{run.stderr[-2000:]}\n{logs}")
    return [json.load(open(out / f"history.rank{r}.json")) for r in range(2)]


def _launch(reference, name, extra):
    shards, init, _, _, root = reference
    out = root / name
    return out, _launch_two(TINY, _overrides(shards, out, init) + extra, out, name)


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
    final = read_full_state(resolve_checkpoint(str(out)))
    assert sorted(final) == sorted(ref_final)
    for k in ref_final:
        np.testing.assert_allclose(final[k], ref_final[k], atol=TOL, rtol=0, err_msg=k)


@pytest.fixture(scope="module")
def lora_reference(tiny_shards, tmp_path_factory):
    """As `reference`, for a model with rank-2 LoRA adapters whose B factors start non-zero (so both factors of
    every adapter move in the first step): only the adapters train."""
    root = tmp_path_factory.mktemp("dist_lora")
    init = root / "init"
    lora = ["Model.lora_rank=2"]
    cfg = load_config(TINY, _overrides(tiny_shards, root / "ref", init) + lora)
    seed_everything(0)
    task = build_task(cfg)
    for name, p in task.model.named_parameters():
        if name.endswith(".lora_B"):
            p.set_value(paddle.randn(p.shape) * 0.05)
    save_checkpoint(str(init), cfg, {"model": task.model.state_dict()}, {}, {"step": 0, "task": "vilg", "model": "vilg"})
    cfg = load_config(TINY, _overrides(tiny_shards, root / "ref", init) + lora + ["Train.accum_steps=2"])
    trainer = Trainer(cfg, build_task(cfg))
    trainer.fit()
    final = read_full_state(resolve_checkpoint(str(root / "ref")))
    return tiny_shards, init, [h["loss"] for h in trainer.history], final, root


def test_tensor_parallel_lora_equals_one_process(lora_reference):
    """LoRA under mp = 2 (lora.LoRALinear: column layers split B, row layers split A): the same losses, adapters
    and (frozen) base weights as one process."""
    _, init, ref_losses, ref_final, _ = lora_reference
    out, hist = _launch(lora_reference, "mp2_lora", ["Distributed.mp_degree=2", "Train.accum_steps=2",
                                                     "Model.lora_rank=2"])
    np.testing.assert_allclose([h["loss"] for h in hist[0]], ref_losses, atol=TOL, rtol=0)
    final, start = read_full_state(resolve_checkpoint(str(out))), read_full_state(str(init))
    assert sorted(final) == sorted(ref_final)
    adapters = [k for k in ref_final if k.endswith((".lora_A", ".lora_B"))]
    assert len(adapters) == 2 * 6 * 2    # 2 layers x 6 projections x (A, B)
    for k in adapters:
        assert not np.allclose(ref_final[k], start[k]), k    # every factor trained
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
    assert ParallelState.single().mp == 1


def test_convert_tool_round_trip(reference, tmp_path):
    from tools.convert_checkpoint import main as convert_main
    _, _, _, ref_final, root = reference
    convert_main(["--src", str(root / "ref"), "--dst", str(tmp_path / "mp2pp2"), "--mp", "2", "--pp", "2"])
    assert sorted(os.listdir(tmp_path / "mp2pp2")) == sorted(
        ["config.yaml", "index.json", "trainer_state.json"] + [weight_file("model", m, p, 2, 2) for m in range(2)
                                                                for p in range(2)])
    convert_main(["--src", str(tmp_path / "mp2pp2"), "--dst", str(tmp_path / "single")])
    back = read_full_state(str(tmp_path / "single"))
    for k in ref_final:
        np.testing.assert_array_equal(back[k], ref_final[k])
    # the merged folder is an ordinary single-process checkpoint for inference
    model, _, _ = load_model(str(tmp_path / "single"), "vilg")
    assert model.config.num_layers == 2
    with pytest.raises(SystemExit, match="exceeds"):
        convert_main(["--src", str(root / "ref"), "--dst", str(tmp_path / "bad"), "--pp", "3"])


def test_distributed_config_is_checked_against_the_world_size():
    from ppvilg.config import ConfigError
    with pytest.raises(ConfigError, match="world size 1 is not a multiple of .* = 2"):
        load_config(TINY, ["Distributed.mp_degree=2"])
    with pytest.raises(ConfigError, match=r"pad it: -o Model.text_vocab_size=12296"):
        load_config(TINY, ["Distributed.mp_degree=2", "Distributed.world_size=2"])
    with pytest.raises(ConfigError, match="dp 4 x mp 1 x pp 1 x sharding 1 = 4 processes, but the world size is 2"):
        load_config(TINY, ["Distributed.dp_degree=4", "Distributed.world_size=2"])
    with pytest.raises(ConfigError, match="sharding_stage 2 is supported with data parallel only"):
        load_config(TINY, ["Distributed.world_size=4", "Distributed.mp_degree=2", "Distributed.sharding_degree=2",
                           "Distributed.sharding_stage=2", "Model.text_vocab_size=12296"])
    with pytest.raises(ConfigError, match="offload needs"):
        load_config(TINY, ["Distributed.offload=true"])
    with pytest.raises(ConfigError, match="Distributed.recompute must be one of"):
        load_config(TINY, ["Distributed.recompute=some"])
    vq_tiny = os.path.join(ROOT, "configs/tests/vqgan_tiny.yaml")
    with pytest.raises(ConfigError, match="stage-1 tokenizer trains data parallel only"):
        load_config(vq_tiny, ["Distributed.world_size=2", "Distributed.mp_degree=2"])
    assert load_config(vq_tiny, ["Distributed.world_size=2"]).Distributed.dp_degree == 2
    cfg = load_config(TINY, ["Distributed.world_size=8", "Distributed.mp_degree=2", "Distributed.pp_degree=2",
                             "Model.text_vocab_size=12296", "Train.batch_size=8", "Train.accum_steps=2"])
    assert (cfg.Distributed.dp_degree, cfg.Train.rank_batch_size) == (2, 2)


def test_the_papers_10b_layout_validates_and_fits_on_64_gpus(capsys):
    from tools.plan_parallel import main as plan_main
    cfg = load_config(os.path.join(ROOT, "configs/vilg/10b.yaml"), ["Distributed.world_size=64"])
    d = cfg.Distributed
    assert (d.dp_degree, d.sharding_degree, d.sharding_stage, d.offload, d.recompute) == (8, 8, 3, True, "full")
    plan_main(["-c", os.path.join(ROOT, "configs/vilg/10b.yaml"), "--gpus", "64", "--gpu-mem", "80"])
    out = capsys.readouterr().out
    assert "the config's layout: dp=8 mp=1 pp=1 sharding=8 (stage 3)" in out and "- fits" in out


def test_recompute_gives_the_same_gradients():
    c = ViLGConfig(**ViLGConfig.PRESETS["tiny"])
    from ppvilg.models.layout import text_to_image
    lay = text_to_image(c.max_text_len, c.grid)
    ids = paddle.to_tensor(np.random.default_rng(0).integers(0, 60, [2, lay.length]))
    labels = paddle.to_tensor(np.random.default_rng(1).integers(0, 64, [2, 64]))
    grads = []
    for mode in ("none", "full", "core_attn"):
        paddle.seed(0)
        m = ViLG(c, recompute=mode)
        _, loss = m(ids, np.ones([2, lay.length], bool), lay, labels)
        loss.backward()
        grads.append({n: p.grad.numpy() for n, p in m.named_parameters() if p.grad is not None})
    for g in grads[1:]:
        assert sorted(g) == sorted(grads[0])
        for k in g:
            np.testing.assert_allclose(g[k], grads[0][k], atol=1e-6, err_msg=k)


GPU = paddle.device.is_compiled_with_cuda() and paddle.device.cuda.device_count() >= 2


@pytest.mark.skipif(not GPU, reason="sharding stage 2/3, optimizer offload and fp16/bf16 training need 2 GPUs "
                                    "(gloo, the CPU backend, has no reduce_scatter; CPU has no fp16/bf16 kernels)")
@pytest.mark.parametrize("name,extra", [
    ("stage2", ["Distributed.sharding_degree=2", "Distributed.sharding_stage=2"]),
    ("stage3_offload", ["Distributed.sharding_degree=2", "Distributed.sharding_stage=3", "Distributed.offload=true"]),
    ("dp2_bf16", ["Distributed.dp_degree=2", "Train.amp.enable=true", "Train.amp.dtype=bfloat16"]),
    ("mp2_fp16", ["Distributed.mp_degree=2", "Train.accum_steps=2", "Train.amp.enable=true"]),
])
def test_gpu_only_layouts_run_and_track_one_process(reference, name, extra):
    _, _, ref_losses, _, _ = reference
    _, hist = _launch(reference, name, extra + ["Global.device=gpu"])
    losses = [np.mean([h[i]["loss"] for h in hist]) for i in range(len(ref_losses))]
    tol = 5e-2 if "amp" in " ".join(extra) else 1e-3   # half precision, or another reduction order
    np.testing.assert_allclose(losses, ref_losses, atol=tol, rtol=0)


def test_parallel_resume_equals_uninterrupted(reference):
    """pp = 2 stopped after step 1 and resumed from its per-rank checkpoint ends where the 2-step run ends."""
    _, _, ref_losses, ref_final, root = reference
    first, _ = _launch(reference, "pp2_first", ["Distributed.pp_degree=2", "Train.accum_steps=2", "Train.max_steps=1"])
    assert sorted(f for f in os.listdir(resolve_checkpoint(str(first))) if ".opt." in f or f.startswith("rng")) == \
        ["model.rank000.opt.json", "model.rank000.opt.safetensors", "model.rank001.opt.json",
         "model.rank001.opt.safetensors", "rng.rank000.json", "rng.rank001.json"]
    out, hist = _launch(reference, "pp2_resumed", ["Distributed.pp_degree=2", "Train.accum_steps=2",
                                                   f"Global.resume={first}"])
    assert [h["step"] for h in hist[0]] == [2]
    np.testing.assert_allclose(hist[0][0]["loss"], ref_losses[1], atol=TOL, rtol=0)
    final = read_full_state(resolve_checkpoint(str(out)))
    for k in ref_final:
        np.testing.assert_allclose(final[k], ref_final[k], atol=TOL, rtol=0, err_msg=k)


ADAMW_LR = 0.01
ADAMW = ["Optimizer.name=adamw", f"Optimizer.lr={ADAMW_LR}", "Optimizer.weight_decay=0.01", "Train.max_steps=3"]


def assert_adam_weights_close(final, ref):
    """Weights after AdamW steps taken in another summation order (sharded ranks sum half batches). Adam
    scales each update to about lr, so on a weight whose gradient is near zero the last-bit differences of
    the order become up to ~lr of difference (seen: 1 weight in 16384 off by 1.04e-4). So: all but 1 in 1000
    of each tensor's weights within TOL, and every weight within lr / 10, where a shard left unupdated or
    updated with another shard's moments is off by ~lr on most of its weights."""
    for k in ref:
        diff = np.abs(np.asarray(final[k], np.float64) - np.asarray(ref[k], np.float64))
        assert diff.max() <= ADAMW_LR / 10, f"{k}: max difference {diff.max():.3g} > lr / 10"
        assert (diff > TOL).mean() <= 1e-3, f"{k}: {(diff > TOL).sum()} of {diff.size} weights differ by > {TOL}"


@pytest.fixture(scope="module")
def reference_adamw(reference, tmp_path_factory):
    """The single-process reference of 3 AdamW steps from the same initial weights: unlike SGD, AdamW has
    moments to shard and to restore."""
    shards, init, _, _, _ = reference
    root = tmp_path_factory.mktemp("dist_adamw")
    cfg = load_config(TINY, _overrides(shards, root / "ref", init) + ["Train.accum_steps=2"] + ADAMW)
    trainer = Trainer(cfg, build_task(cfg))
    trainer.fit()
    return shards, init, [h["loss"] for h in trainer.history], read_full_state(resolve_checkpoint(str(root / "ref"))), root


def test_sharded_adamw_states_equal_one_process(reference_adamw):
    _, _, ref_losses, ref_final, _ = reference_adamw
    out, hist = _launch(reference_adamw, "sharding2_adamw", ["Distributed.sharding_degree=2"] + ADAMW)
    losses = [(a["loss"] + b["loss"]) / 2 for a, b in zip(*hist)]
    np.testing.assert_allclose(losses, ref_losses, atol=TOL, rtol=0)
    assert_adam_weights_close(read_full_state(resolve_checkpoint(str(out))), ref_final)


def test_pipeline_resume_with_adamw_equals_uninterrupted(reference_adamw):
    """pp = 2 with AdamW: stopped after step 1 and resumed from its per-rank checkpoint (moments, schedule, RNG),
    it ends where the uninterrupted pp = 2 run ends; both track one process's losses. (Weights are compared
    within the layout: Adam's normalisation turns the last-bit differences of another summation order into
    ~1e-4 on weights whose gradients are near zero.)"""
    _, _, ref_losses, _, _ = reference_adamw
    pp = ["Distributed.pp_degree=2", "Train.accum_steps=2"] + ADAMW
    whole, hist_whole = _launch(reference_adamw, "pp2_adamw", pp)
    first, _ = _launch(reference_adamw, "pp2_adamw_first", pp + ["Train.max_steps=1"])
    out, hist = _launch(reference_adamw, "pp2_adamw_resumed", pp + [f"Global.resume={first}"])
    assert [h["step"] for h in hist[0]] == [2, 3]
    np.testing.assert_allclose([h["loss"] for h in hist_whole[0]], ref_losses, atol=TOL, rtol=0)
    np.testing.assert_allclose([h["loss"] for h in hist[0]], [h["loss"] for h in hist_whole[0][1:]], atol=1e-6, rtol=0)
    want = read_full_state(resolve_checkpoint(str(whole)))
    final = read_full_state(resolve_checkpoint(str(out)))
    for k in want:
        np.testing.assert_allclose(final[k], want[k], atol=1e-6, rtol=0, err_msg=k)


VQ_TINY = os.path.join(ROOT, "configs/tests/vqgan_tiny.yaml")


def _vq_overrides(out, init, gan):
    return [f"Global.output_dir={out}", "Global.num_threads=1", f"Global.init_weights={init}",
            "Model.restart_dead_codes=false", "Optimizer.name=sgd", "Optimizer.lr=0.02",
            "Optimizer.schedule=constant", "Optimizer.weight_decay=0.0", "Train.max_steps=4", "Train.batch_size=8",
            "Train.save_every=0", "Train.grad_clip=0", f"Loss.disc_weight={0.5 if gan else 0.0}",
            "Loss.disc_start=2"]   # no clipping: it would hide a wrong gradient scale


def test_stage1_data_parallel_equals_one_process(tmp_path):
    """Stage 1 on 2 processes (4 images each) == one process on the batches of 8: losses, weights and the EMA
    codebook (its statistics summed over the ranks). With the adversarial loss on (whose discriminator's
    BatchNorm sees each rank's half, as any unsynchronised data-parallel BatchNorm) the ranks still agree on
    the adaptive GAN weight (its gradients averaged first) and so keep the same generator."""
    init = tmp_path / "init"
    cfg = load_config(VQ_TINY, _vq_overrides(tmp_path / "ref", init, False))
    seed_everything(0)
    task = build_task(cfg)
    save_checkpoint(str(init), cfg, {"model": task.model.state_dict()}, {}, {"step": 0, "task": "vqgan",
                                                                              "model": "vqgan"})
    ref = Trainer(cfg, build_task(cfg))
    ref.fit()
    ref_final = read_full_state(resolve_checkpoint(str(tmp_path / "ref")))
    for gan in (False, True):
        out = tmp_path / f"dp2_gan{int(gan)}"
        hist = _launch_two(VQ_TINY, _vq_overrides(out, init, gan), out, f"stage-1 dp2 (gan {gan})")
        final = read_full_state(resolve_checkpoint(str(out)))
        if not gan:
            for key in ("rec", "vq", "loss"):
                np.testing.assert_allclose([(a[key] + b[key]) / 2 for a, b in zip(*hist)],
                                           [h[key] for h in ref.history], atol=TOL, rtol=0, err_msg=key)
            for k in ref_final:
                if k.startswith("model."):
                    np.testing.assert_allclose(final[k], ref_final[k], atol=TOL, rtol=0, err_msg=k)
            assert any("quantizer.ema_sum" in k for k in ref_final)
        else:
            weights = [[h["gan_weight"] for h in rank if "gan_weight" in h] for rank in hist]
            assert len(weights[0]) == 2 and weights[0] == weights[1], weights
