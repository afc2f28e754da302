import os

import numpy as np
import paddle
import pytest

from conftest import ROOT
from ppvilg.config import load_config
from ppvilg.data.datasets import build_dataset
from ppvilg.checkpoints import CheckpointError, load_image_tokenizer, load_module, resolve_checkpoint
from ppvilg.engine.tasks import build_task
from ppvilg.engine.trainer import Trainer
from ppvilg.utils.runtime import seed_everything

TINY = os.path.join(ROOT, "configs/tests/vqgan_tiny.yaml")


def _cfg(tmp_path, *over):
    return load_config(TINY, [f"Global.output_dir={tmp_path}", *over])


def _train(cfg):
    seed_everything(cfg.Global.seed)
    trainer = Trainer(cfg, build_task(cfg))
    metrics = trainer.fit()
    return trainer, metrics


def test_encode_decode_shapes_and_code_range(tmp_path):
    cfg = _cfg(tmp_path)
    model = build_task(cfg).model
    model.eval()
    x = paddle.uniform([3, 3, 16, 16], min=-1, max=1)
    codes = model.encode(x)
    assert codes.shape == [3, 8, 8] and codes.dtype == paddle.int64
    assert int(codes.min()) >= 0 and int(codes.max()) < cfg.Model.num_codes
    assert model.decode_codes(codes).shape == [3, 3, 16, 16]
    x_hat, _, codes_fwd, _ = model(x)
    assert (codes_fwd.numpy() == codes.numpy()).all() and x_hat.shape == x.shape


def test_tiny_vq_loss_falls_and_codebook_is_used(tmp_path):
    cfg = _cfg(tmp_path, "Train.max_steps=40", "Loss.disc_start=100", "Train.log_every=100")
    trainer, metrics = _train(cfg)
    rec = [h["rec"] for h in trainer.history]
    assert np.mean(rec[-5:]) < 0.5 * np.mean(rec[:5])
    assert metrics["codebook_usage"] > 0.2 and np.isfinite(metrics["psnr"])


def test_generator_phase_does_not_train_the_discriminator(tmp_path):
    task = build_task(_cfg(tmp_path))
    batch = {"image": paddle.uniform([2, 3, 16, 16], min=-1, max=1)}
    trainable = [not p.stop_gradient for p in task.disc.parameters()]
    loss, logs = task.phase_loss("generator", batch, step=10)  # past disc_start: GAN term included
    assert "g_loss" in logs and logs["gan_weight"] > 0
    loss.backward()
    assert all(p.grad is None or float(p.grad.abs().sum()) == 0 for p in task.disc.parameters())
    assert task.model.decoder.conv_out.weight.grad is not None
    assert [not p.stop_gradient for p in task.disc.parameters()] == trainable  # restored after the block
    d_loss, _ = task.phase_loss("discriminator", batch, step=10)
    for p in task.model.parameters():
        p.clear_gradient()
    d_loss.backward()
    assert all(p.grad is None or float(p.grad.abs().sum()) == 0 for p in task.model.parameters())
    assert any(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in task.disc.parameters())
    assert task.phase_loss("discriminator", batch, step=0)[0] is None  # before disc_start


def test_dead_codes_restart_from_encoder_outputs(tmp_path):
    model = build_task(_cfg(tmp_path)).model
    q = model.quantizer
    model.train()
    z = paddle.randn([2, q.dim, 4, 4]) * 5 + 100  # far from every initial code
    q(z)  # usage starts at zero: every code is re-seeded from the batch
    flat = z.transpose([0, 2, 3, 1]).reshape([-1, q.dim]).numpy()
    book = q.codebook.numpy()
    dists = ((book[:, None, :] - flat[None]) ** 2).sum(-1).min(1)
    assert dists.max() < 1e-6


def test_resume_equals_uninterrupted(tmp_path):
    over = ["Train.max_steps=6", "Train.save_every=3", "Loss.disc_start=2", "Train.accum_steps=2"]
    full, _ = _train(_cfg(tmp_path / "full", *over))
    resumed, _ = _train(_cfg(tmp_path / "resumed", *over,
                             f"Global.resume={tmp_path / 'full' / 'checkpoints' / 'step_00000003'}"))
    assert resumed.history[0]["step"] == 4
    for name in ("model", "disc"):
        a, b = full.task.modules()[name].state_dict(), resumed.task.modules()[name].state_dict()
        for k in a:
            np.testing.assert_array_equal(a[k].numpy(), b[k].numpy(), err_msg=f"{name}.{k}")
    assert [h["generator_loss"] for h in full.history[3:]] == [h["generator_loss"] for h in resumed.history]


def test_checkpoint_folder_round_trip_and_strict_loading(tmp_path):
    trainer, _ = _train(_cfg(tmp_path, "Train.max_steps=2"))
    folder = resolve_checkpoint(str(tmp_path))
    assert sorted(os.listdir(folder)) == ["config.yaml", "disc.safetensors", "discriminator.opt.json",
                                          "discriminator.opt.safetensors", "generator.opt.json",
                                          "generator.opt.safetensors", "index.json", "model.safetensors", "rng.json",
                                          "trainer_state.json"]
    model, ckpt_cfg, _ = load_image_tokenizer(str(tmp_path))
    assert ckpt_cfg.Model == trainer.cfg.Model
    for k, v in trainer.task.model.state_dict().items():
        np.testing.assert_array_equal(v.numpy(), model.state_dict()[k].numpy())
    bigger = build_task(_cfg(tmp_path, "Model.num_codes=32")).model
    with pytest.raises(CheckpointError, match="codebook.*shape"):
        load_module(bigger, folder, "model")
    with pytest.raises(CheckpointError, match="not a ppvilg checkpoint"):
        resolve_checkpoint(str(tmp_path / "nowhere"))


def test_perceptual_loss_reads_user_weights(tmp_path):
    from paddle.vision.models import vgg16
    from ppvilg.checkpoints import write_tensors
    from ppvilg.vq.losses import VGGPerceptual
    with pytest.raises(FileNotFoundError, match="perceptual_weights"):
        VGGPerceptual(str(tmp_path / "none.safetensors"))
    write_tensors(str(tmp_path / "v.safetensors"), vgg16(pretrained=False, with_pool=False, num_classes=0).state_dict())
    loss = VGGPerceptual(str(tmp_path / "v.safetensors"))
    x = paddle.uniform([1, 3, 32, 32], min=-1, max=1)
    assert float(loss(x, x).sum()) == 0.0 and float(loss(x, -x).sum()) > 0


def test_adaptive_gan_weight_is_the_gradient_norm_ratio():
    from ppvilg.vq.losses import adaptive_weight
    w = paddle.create_parameter([3], "float32", default_initializer=paddle.nn.initializer.Assign(
        np.array([1.0, 2.0, 3.0], np.float32)))
    a, b = np.array([3.0, 0.0, 4.0], np.float32), np.array([0.0, 1.0, 0.0], np.float32)
    rec = (w * paddle.to_tensor(a)).sum()          # d rec / d w = a, |a| = 5
    gan = (w * w * paddle.to_tensor(b)).sum()      # d gan / d w = 2 w b = [0, 4, 0], norm 4
    assert float(adaptive_weight(rec, gan, w)) == pytest.approx(5.0 / (4.0 + 1e-4), rel=1e-6)
    assert float(adaptive_weight(rec * 1e6, gan, w, max_weight=100.0)) == 100.0   # clipped


def test_ema_codebook_update_by_value():
    from ppvilg.vq.model import VectorQuantizer
    q = VectorQuantizer(num_codes=3, dim=2, beta=0.25, ema=True, decay=0.9, restart=False, threshold=0.0)
    book = np.array([[0.0, 0.0], [1.0, 1.0], [5.0, 5.0]], np.float32)
    q.codebook.set_value(book)
    q.ema_sum.set_value(book.copy())
    q.ema_count.set_value(np.ones(3, np.float32))
    z = np.array([[0.1, -0.1], [0.9, 1.2], [1.1, 0.8], [0.2, 0.0]], np.float32)   # codes 0, 1, 1, 0
    q.train()
    _, _, codes, _ = q(paddle.to_tensor(z.reshape(1, 2, 2, 2).transpose(0, 3, 1, 2)))
    assert codes.numpy().ravel().tolist() == [0, 1, 1, 0]
    onehot = np.eye(3, dtype=np.float64)[[0, 1, 1, 0]]
    count = 0.9 * np.ones(3) + 0.1 * onehot.sum(0)                 # [1.1, 1.1, 0.9]
    ema_sum = 0.9 * book + 0.1 * onehot.T @ z
    n = count.sum()
    smoothed = (count + 1e-5) / (n + 3 * 1e-5) * n
    np.testing.assert_allclose(q.ema_count.numpy(), count, rtol=1e-6)
    np.testing.assert_allclose(q.ema_sum.numpy(), ema_sum, rtol=1e-5)
    np.testing.assert_allclose(q.codebook.numpy(), ema_sum / smoothed[:, None], rtol=1e-5)
    np.testing.assert_allclose(q.usage.numpy(), 0.1 * onehot.sum(0), rtol=1e-6)


@pytest.mark.parametrize("stride,padding", [(1, 1), (2, 1)])
def test_conv_bias_over_flattened_pixels_equals_paddle_conv(stride, padding):
    """ppvilg.vq.model.Conv2D adds its bias over [N, C, H * W] on CPU: outputs and every gradient equal
    paddle.nn.Conv2D's own forward with the same parameters."""
    from ppvilg.vq.model import Conv2D
    paddle.seed(0)
    conv = Conv2D(8, 16, 3, stride=stride, padding=padding)
    conv.bias.set_value(paddle.randn([16]))
    x = paddle.randn([3, 8, 10, 12])
    x.stop_gradient = False
    results = []
    for forward in (conv.forward, lambda t: paddle.nn.Conv2D.forward(conv, t)):
        conv.clear_gradients()
        x.clear_gradient()
        y = forward(x)
        y.backward(paddle.to_tensor(np.random.default_rng(1).standard_normal(y.shape).astype("float32")))
        results.append([y.numpy(), x.grad.numpy(), conv.weight.grad.numpy(), conv.bias.grad.numpy()])
    for got, want in zip(*results):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_evaluation_reads_shapes_reconstructions_back(tmp_path):
    """On the built-in shapes the stage-1 evaluation reads each reconstruction back with the exact reader and
    compares it with that item's own attributes: a perfect reconstruction scores 1, a black one 0."""
    task = build_task(_cfg(tmp_path))
    data = build_dataset(task.cfg.Data.eval, task.cfg.Data.image_size)
    seen = []
    task.model.encode = lambda x: seen.append(x) or paddle.zeros([x.shape[0], 8, 8], "int64")
    task.model.decode_codes = lambda codes: seen[-1]                  # the input itself
    metrics, _, _ = task.evaluate(data)
    assert metrics["readback_all_correct"] == 1.0 and metrics["readback_attribute_accuracy"] == 1.0
    task.model.decode_codes = lambda codes: -paddle.ones_like(seen[-1])   # black: nothing to read
    metrics, _, _ = task.evaluate(data)
    assert metrics["readback_all_correct"] == 0.0 and metrics["readback_attribute_accuracy"] == 0.0
    # another item's image in each place: the attributes are compared with each item's own
    task.model.decode_codes = lambda codes: paddle.roll(seen[-1], 1, axis=0)
    metrics, _, _ = task.evaluate(data)
    assert metrics["readback_all_correct"] < 0.5
