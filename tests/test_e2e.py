"""End-to-end generator + reconstructor training (paper §3.1.3): the gradient path, the equal default weights,
and inference picking the end-to-end path from the checkpoint."""
import os

import numpy as np
import paddle
import pytest

from conftest import ROOT
from ppvilg.config import ConfigError, load_config
from ppvilg.data.datasets import build_dataset, collate_pairs
from ppvilg.engine.tasks import build_task
from ppvilg.engine.trainer import Trainer
from ppvilg.inference import ViLGInference
from ppvilg.utils.runtime import seed_everything

TINY = os.path.join(ROOT, "configs/tests/vilg_tiny.yaml")


def _cfg(run_dirs, out, *extra):
    return load_config(TINY, [f"Global.output_dir={out}", f"ImageTokenizer.checkpoint={run_dirs / 'vq'}",
                              "Data.image_size=16", "Data.train.source=shapes", "Data.train.num_samples=32",
                              "Data.eval.source=shapes", "Data.eval.split=heldout", "Data.eval.num_samples=8",
                              "Loss.end_to_end=true", *extra])


def _batch(cfg, n=4):
    ds = build_dataset(cfg.Data.train, cfg.Data.image_size)
    return collate_pairs([ds[i] for i in range(n)])


def test_equal_default_weights_and_the_total(run_dirs, tmp_path):
    cfg = _cfg(run_dirs, tmp_path)
    assert cfg.Loss.recon_weight == cfg.Loss.t2i_weight == cfg.Loss.i2t_weight == 1.0
    seed_everything(0)
    task = build_task(cfg)
    loss, logs = task.phase_loss("model", _batch(cfg), 0)
    np.testing.assert_allclose(float(loss), logs["t2i_loss"] + logs["i2t_loss"] + logs["recon_loss"], rtol=1e-5)


def test_reconstruction_loss_reaches_the_transformer(run_dirs, tmp_path):
    cfg = _cfg(run_dirs, tmp_path)
    seed_everything(0)
    task = build_task(cfg)
    batch = _batch(cfg)
    *_, l_rec = task.losses(task.codes_of(batch), batch["text"], images=batch["image"])
    l_rec.backward()  # the reconstruction loss alone
    grads = {n: p.grad for n, p in task.model.named_parameters()}
    for name in ("blocks.0.attn.q.weight", "blocks.1.mlp.2.weight", "image_emb.weight", "ln_f.weight"):
        assert grads[name] is not None and float(grads[name].abs().max()) > 0, name
    # the text head plays no part in reconstructing the image
    assert grads["text_head.weight"] is None or float(grads["text_head.weight"].abs().max()) == 0
    rec = dict(task.reconstructor.named_parameters())
    assert float(rec["mapping.0.weight"].grad.abs().max()) > 0 and float(rec["decoder.conv_out.weight"].grad.abs().max()) > 0
    # the reconstructor starts from the stage-1 decoder
    np.testing.assert_array_equal(task.reconstructor.decoder.conv_out.weight.numpy(),
                                  task.image_tokenizer.decoder.conv_out.weight.numpy())


def test_end_to_end_checkpoint_drives_inference(run_dirs, tmp_path):
    cfg = _cfg(run_dirs, tmp_path, "Train.max_steps=2")
    seed_everything(0)
    metrics = Trainer(cfg, build_task(cfg)).fit()
    assert np.isfinite(metrics["recon_loss"])
    pipe = ViLGInference.from_checkpoint(str(tmp_path))
    assert pipe.reconstructor == "end_to_end"
    images, codes, _ = pipe.text_to_image(["红色圆形"], candidates=2, top_k=4)
    assert images.shape == (1, 2, 16, 16, 3) and images.dtype == np.uint8
    plain = ViLGInference.from_checkpoint(str(tmp_path), use_e2e=False)
    assert plain.reconstructor == "vq_decoder"
    assert not np.array_equal(plain.decode(codes), images)  # a different decoder made them
    # the images are the reconstructor applied to the final-LN'd hidden states at the image slots of the
    # (prompt, generated codes) sequence, computed here by hand: embed + blocks + ln_f
    from ppvilg.data.images import to_uint8_image
    m, seq = pipe.model, pipe.gen.seq
    ids, valid, _ = seq.text_to_image(seq.text(["红色圆形"] * 2), codes[0])
    lay = pipe.gen.layouts["t2i"]
    with paddle.no_grad():
        h = m.ln_f(m.hidden(paddle.to_tensor(ids), valid, lay)[:, lay.target_slice()])
        want = np.stack([to_uint8_image(a) for a in pipe.e2e(h, m.config.grid).numpy()])
    np.testing.assert_array_equal(images[0], want)
    # the export carries the reconstructor: deploy draws the same codes and makes the same pixels from them
    import sys
    from ppvilg.export import export
    sys.path.insert(0, os.path.join(ROOT, "deploy", "python"))
    from ppvilg_deploy.predictor import DeployPipeline
    export(pipe, cfg, str(tmp_path / "export"))
    dep = DeployPipeline(str(tmp_path / "export"))
    assert dep.reconstructor == "end_to_end"
    dep_images, dep_codes, _ = dep.text_to_image(["红色圆形"], candidates=2, top_k=4, seed=3)
    gen_images, gen_codes, _ = pipe.text_to_image(["红色圆形"], candidates=2, top_k=4, seed=3)
    np.testing.assert_array_equal(dep_codes, gen_codes)
    np.testing.assert_allclose(dep_images.astype(int), gen_images.astype(int), atol=1, rtol=0)
    assert np.abs(dep_images.astype(int) - dep.decode(dep_codes).astype(int)).max() > 8   # not the VQ decoder


def test_end_to_end_needs_images(run_dirs, tmp_path):
    with pytest.raises(ConfigError, match="holds codes only"):
        load_config(TINY, [f"ImageTokenizer.checkpoint={run_dirs / 'vq'}", "Loss.end_to_end=true"])
    with pytest.raises(ConfigError, match="trains in one process"):
        load_config(TINY, [f"ImageTokenizer.checkpoint={run_dirs / 'vq'}", "Loss.end_to_end=true", "Data.train.source=shapes",
                           "Distributed.world_size=2"])
    with pytest.raises(ConfigError, match="needs ImageTokenizer.checkpoint"):
        load_config(TINY, ["Loss.end_to_end=true", "Data.train.source=shapes"])
