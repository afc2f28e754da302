"""Single-GPU checks of the code paths CPU cannot run (`make gpu-check`; skipped with the reason below without
a CUDA GPU): fp16 / bf16 AMP training against fp32, the fused attention kernel in half precision, exported
predictors in fp16 against fp32. The 2-GPU layouts (sharding stage 2 / 3 with offload, mp + fp16, dp + bf16)
are tests/test_distributed.py::test_gpu_only_layouts_run_and_track_one_process. Tolerances are stated per test.
"""
import os

import numpy as np
import paddle
import pytest

from conftest import ROOT

GPU = paddle.device.is_compiled_with_cuda() and paddle.device.cuda.device_count() >= 1
pytestmark = pytest.mark.skipif(not GPU, reason="needs a CUDA GPU and paddlepaddle-gpu (this paddle: "
                                                f"compiled_with_cuda={paddle.device.is_compiled_with_cuda()})")
TINY = os.path.join(ROOT, "configs/tests/vilg_tiny.yaml")


@pytest.fixture(autouse=True)
def _on_gpu():
    paddle.set_device("gpu:0")
    yield
    paddle.set_device("cpu")


def _losses(tiny_shards, tmp_path, name, extra):
    from ppvilg.config import load_config
    from ppvilg.engine.tasks import build_task
    from ppvilg.engine.trainer import Trainer
    from ppvilg.utils.runtime import seed_everything
    cfg = load_config(TINY, [f"Global.output_dir={tmp_path / name}", f"Data.train.path={tiny_shards / 'train'}",
                             f"Data.eval.path={tiny_shards / 'eval'}", "Global.device=gpu", "Train.max_steps=20",
                             "Train.batch_size=8", "Train.log_every=1", "Optimizer.lr=1e-3"] + extra)
    seed_everything(0)
    trainer = Trainer(cfg, build_task(cfg))
    trainer.fit()
    return np.array([h["loss"] for h in trainer.history])


@pytest.mark.parametrize("dtype,tol", [("float16", 0.05), ("bfloat16", 0.1)])
def test_amp_training_tracks_fp32(tiny_shards, tmp_path, dtype, tol):
    """20 steps from the same seed: every AMP loss within `tol` (absolute, nats) of fp32's, and the loss falls."""
    ref = _losses(tiny_shards, tmp_path, "fp32", [])
    amp = _losses(tiny_shards, tmp_path, dtype, ["Train.amp.enable=true", f"Train.amp.dtype={dtype}"])
    print(f"{dtype}: max |loss - fp32 loss| = {np.abs(amp - ref).max():.4f} over {len(ref)} steps")
    np.testing.assert_allclose(amp, ref, atol=tol, rtol=0)
    assert amp[-1] < amp[0]


@pytest.mark.parametrize("dtype,tol", [("float16", 5e-3), ("bfloat16", 3e-2)])
def test_fused_attention_in_half_precision_matches_fp32_matmul(dtype, tol):
    """Model.attention_kernel=sdpa under AMP (flash / memory-efficient kernels) against the fp32 matmul path:
    hidden states within `tol` (absolute; LayerNorm'd scale ~1)."""
    from ppvilg.models.layout import text_to_image
    from ppvilg.models.vilg import ViLG, ViLGConfig
    lay = text_to_image(16, 8)
    ids = paddle.to_tensor(np.random.default_rng(0).integers(0, 60, [4, lay.length]))
    valid = np.ones([4, lay.length], bool)
    valid[1, 10:16] = False
    outs = {}
    for kernel in ("matmul", "sdpa"):
        paddle.seed(0)
        m = ViLG(ViLGConfig(**dict(ViLGConfig.PRESETS["tiny"], attention_kernel=kernel)))
        m.eval()
        with paddle.amp.auto_cast(enable=kernel == "sdpa", dtype=dtype, level="O1"):
            outs[kernel] = m.ln_f(m.hidden(ids, valid, lay)).astype("float32").numpy()
    err = np.abs(outs["sdpa"] - outs["matmul"]).max()
    print(f"sdpa {dtype} vs matmul fp32: max abs difference {err:.2e}")
    assert err < tol


def test_exported_predictor_in_fp16_matches_fp32(run_dirs, tmp_path):
    """The exported step programs run by Paddle Inference in fp16 against fp32: logits of the prefill and of
    8 decode steps within 5e-2 (absolute) and the same greedy codes for most cells."""
    import sys
    sys.path.insert(0, os.path.join(ROOT, "deploy", "python"))
    from ppvilg.config import load_config
    from ppvilg.export import export
    from ppvilg.inference import ViLGInference
    from ppvilg_deploy.predictor import DeployPipeline
    vilg = ViLGInference.from_checkpoint(str(run_dirs / "vilg"))
    export(vilg, load_config(TINY), str(tmp_path / "export"))
    pipes = {p: DeployPipeline(str(tmp_path / "export"), device="gpu", precision=p) for p in ("fp32", "fp16")}
    texts = ["左上角有一个小红色圆形", "a big blue square"]
    decs = {}
    for p, pipe in pipes.items():
        ids, valid, _ = pipe.seq.text_to_image(pipe.seq.text(texts))
        decs[p] = pipe.make_decoder("t2i", ids, valid)
    t0 = decs["fp32"].t0
    for k in range(8):
        a, b = decs["fp32"].logits_at(t0 + k), decs["fp16"].logits_at(t0 + k)
        err = np.abs(a - b).max()
        assert err < 5e-2, (k, err)
        tok = a.argmax(-1)
        for d in decs.values():
            d.ids[:, t0 + k + 1] = tok
    codes = {p: pipe.text_to_image(texts, temperature=0.0)[1] for p, pipe in pipes.items()}
    agree = (codes["fp32"] == codes["fp16"]).mean()
    print(f"fp16 vs fp32 exported predictor: greedy codes agree in {100 * agree:.1f}% of the cells")
    assert agree > 0.9
