"""Stage 1 task: train the image tokenizer (a VQGAN) (generator phase, then discriminator phase, every step)."""
import contextlib

import numpy as np
import paddle

from ppvilg.config import ConfigError, check_range
from ppvilg.data.datasets import eval_batches
from ppvilg.data.images import make_grid, to_uint8_image
from ppvilg.engine.task_interface import Task
from ppvilg.metrics.recon import codebook_stats, psnr, ssim
from ppvilg.metrics.shapes_reader import attribute_accuracy, read_image, split_shapes
from ppvilg.registry import TASKS, model_config
from ppvilg.vq.losses import (PatchDiscriminator, VGGPerceptual, adaptive_weight, hinge_d_loss,
                              reconstruction_loss)
from ppvilg.vq.model import VQGAN


def build_vqgan(model_section, dp_group=None):
    """A VQGAN (the image tokenizer) from a resolved `Model` config section; dp_group: see VQGAN."""
    return VQGAN(model_config(model_section), dp_group)


@contextlib.contextmanager
def no_param_grads(layer):
    """Parameters of `layer` get no gradient inside the block (the generator's GAN term must not train D)."""
    params = [p for p in layer.parameters() if not p.stop_gradient]
    for p in params:
        p.stop_gradient = True
    try:
        yield
    finally:
        for p in params:
            p.stop_gradient = False


@TASKS.register("vqgan")
class VQGANTask(Task):
    config_sections = {
        "Loss": {
            "recon": "l1",                # l1 | l2 (the paper writes ||x - x_hat||^2)
            "codebook_weight": 1.0,
            "perceptual_weight": 0.0,     # > 0 needs perceptual_weights
            "perceptual_weights": None,   # path of a paddle.vision vgg16 state dict (.safetensors)
            "disc_weight": 0.5,
            "disc_start": 1000,           # step at which the adversarial terms switch on
            "disc_channels": 64,
            "disc_layers": 2,
            "disc_lr_scale": 1.0,         # discriminator lr = Optimizer.lr * this
        },
        "Eval": {
            "batch_size": 32,
            "num_visuals": 8,             # image pairs (input | reconstruction) in the VisualDL grid
        },
    }

    @classmethod
    def validate_config(cls, cfg, origin):
        m, loss = cfg.Model, cfg.Loss
        for key in ("codebook_weight", "perceptual_weight", "disc_weight", "disc_start", "disc_lr_scale"):
            check_range(loss[key], f"Loss.{key}", 0, origin=origin)
        for key in ("disc_channels", "disc_layers"):
            check_range(loss[key], f"Loss.{key}", 1, origin=origin)
        check_range(cfg.Eval.batch_size, "Eval.batch_size", 1, origin=origin)
        check_range(cfg.Eval.num_visuals, "Eval.num_visuals", 0, zero="no image grid", origin=origin)
        if m.name != "vqgan":
            raise ConfigError(f"{origin}: Global.task 'vqgan' needs Model.name 'vqgan', got {m.name!r}")
        d = cfg.Distributed
        if d.world_size > 1 and d.dp_degree != d.world_size:
            raise ConfigError(f"{origin}: the stage-1 tokenizer trains data parallel only (Distributed.dp_degree "
                              f"{d.dp_degree} must equal the world size {d.world_size}); tensor, pipeline and "
                              "sharding degrees apply to stage 2 (Global.task vilg)")
        f = 2 ** (len(m.channel_mult) - 1)
        if cfg.Data.image_size % f:
            raise ConfigError(f"{origin}: Data.image_size ({cfg.Data.image_size}) must be a multiple of the "
                              f"downsampling factor {f} (from Model.channel_mult)")
        if m.resolution != cfg.Data.image_size:
            raise ConfigError(f"{origin}: Model.resolution ({m.resolution}) must equal Data.image_size "
                              f"({cfg.Data.image_size})")
        for ch in [m.base_channels * k for k in m.channel_mult] + [m.base_channels]:
            if ch % m.norm_groups:
                raise ConfigError(f"{origin}: Model.norm_groups ({m.norm_groups}) must divide every channel "
                                  f"width (got {ch})")
        for split in ("train", "eval"):
            if cfg.Data[split].source == "shards":
                raise ConfigError(f"{origin}: Data.{split}.source 'shards' holds VQ codes; the VQGAN trains on "
                                  "images (shapes, manifest or coco)")
        if loss.recon not in ("l1", "l2"):
            raise ConfigError(f"{origin}: Loss.recon must be l1 or l2, got {loss.recon!r}")
        if loss.perceptual_weight > 0 and not loss.perceptual_weights:
            raise ConfigError(f"{origin}: Loss.perceptual_weight > 0 needs Loss.perceptual_weights (a VGG16 "
                              ".safetensors path); nothing is downloaded")

    def __init__(self, cfg, parallel):
        super().__init__(cfg, parallel)
        # several processes: each takes part of every batch; the trainer averages the gradients of both phases
        # (Trainer.distribute) and the quantizer sums its EMA statistics over the data-parallel group
        dp_group = parallel.hcg.get_data_parallel_group() if parallel is not None and parallel.enabled else None
        self.dp_group = dp_group
        self.model = build_vqgan(cfg.Model, dp_group)
        loss = cfg.Loss
        self.disc = PatchDiscriminator(cfg.Model.in_channels, loss.disc_channels, loss.disc_layers)
        self.perceptual = VGGPerceptual(loss.perceptual_weights) if loss.perceptual_weight > 0 else None
        self._fake = None

    def modules(self):
        return {"model": self.model, "disc": self.disc}

    def phases(self):
        gen = [p for p in self.model.parameters() if not p.stop_gradient]
        return {"generator": (gen, {}),
                "discriminator": (self.disc.parameters(), {"lr_scale": self.cfg.Loss.disc_lr_scale})}

    def phase_loss(self, phase, batch, step):
        loss_cfg = self.cfg.Loss
        gan_on = step >= loss_cfg.disc_start
        x = batch["image"]
        if phase == "generator":
            x_hat, q_loss, codes, stats = self.model(x)
            rec = reconstruction_loss(x, x_hat, loss_cfg.recon)
            total = rec + loss_cfg.codebook_weight * q_loss
            logs = {"rec": float(rec), "vq": float(q_loss), "perplexity": float(stats["perplexity"])}
            if self.perceptual is not None:
                p = self.perceptual(x, x_hat).mean()
                total = total + loss_cfg.perceptual_weight * p
                logs["perceptual"] = float(p)
            if gan_on and loss_cfg.disc_weight > 0:
                with no_param_grads(self.disc):
                    g_loss = -self.disc(x_hat).mean()
                w = adaptive_weight(total, g_loss, self.model.last_layer_weight(),
                                    dp_group=self.dp_group) * loss_cfg.disc_weight
                total = total + w * g_loss
                logs.update(g_loss=float(g_loss), gan_weight=float(w))
            self._fake = x_hat.detach()
            return total, logs
        if not gan_on or loss_cfg.disc_weight <= 0:
            return None, {}
        d_loss = hinge_d_loss(self.disc(x), self.disc(self._fake))
        return d_loss, {"d_loss": float(d_loss)}

    @paddle.no_grad()
    def evaluate(self, dataset):
        self.model.eval()
        bs, nvis = self.cfg.Eval.batch_size, self.cfg.Eval.num_visuals
        counts = np.zeros(self.model.config.num_codes, np.int64)
        p_sum, s_sum, n, skipped, visuals = 0.0, 0.0, 0, 0, []
        # built-in shapes: the reconstructions read back by the exact reader (the ceiling of stage 2's images)
        section = dataset.section
        shapes = split_shapes(section.split) if section.source == "shapes" else None
        reads, truths = [], []
        for batch in eval_batches(dataset, bs):
            skipped += len(batch["skipped"])
            if "image" not in batch:
                continue
            x = paddle.to_tensor(batch["image"])
            codes = self.model.encode(x)
            x_hat = self.model.decode_codes(codes)
            counts += np.bincount(codes.numpy().ravel(), minlength=len(counts))
            real = [to_uint8_image(a) for a in batch["image"]]
            fake = [to_uint8_image(a) for a in x_hat.numpy()]
            p_sum += psnr(real, fake) * len(real)
            s_sum += ssim(real, fake) * len(real)
            n += len(real)
            if shapes is not None:
                reads += [read_image(f, shapes=shapes) for f in fake]
                truths += [dataset.meta(int(i)) for i in batch["index"]]
            for r, f in zip(real, fake):
                if len(visuals) < 2 * nvis:
                    visuals += [r, f]
        self.model.train()
        if n == 0:
            raise RuntimeError("evaluation found no readable image")
        usage, perplexity = codebook_stats(counts)
        metrics = {"psnr": p_sum / n, "ssim": s_sum / n, "codebook_usage": usage,
                   "codebook_perplexity": perplexity, "num_images": n, "skipped_images": skipped}
        if shapes is not None:
            metrics.update(readback_attribute_accuracy=attribute_accuracy(reads, truths)[0],
                           readback_all_correct=float(np.mean([r == t for r, t in zip(reads, truths)])))
        return metrics, {"input_vs_reconstruction": make_grid(visuals, 2 * min(4, nvis))}, {}
