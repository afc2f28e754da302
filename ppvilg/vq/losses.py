"""Stage-1 losses: reconstruction (+ optional perceptual) + VQ loss, and a PatchGAN hinge adversarial game.

Generator loss = rec + perceptual_weight * perceptual + codebook_weight * vq_loss
                 + disc_factor * adaptive_weight * disc_weight * (-mean D(x_hat))
with adaptive_weight = ||grad_last(rec)|| / (||grad_last(gan)|| + 1e-4), clipped to [0, 1e4] (the VQGAN recipe);
disc_factor switches from 0 to 1 at `disc_start`. Discriminator loss = hinge: mean(relu(1 - D(x))) +
mean(relu(1 + D(x_hat))), halved. The perceptual term compares normalised VGG16 features (an LPIPS-like
distance without learned channel weights); its weights come from a user path, nothing is downloaded.
"""
import os

import paddle
import paddle.nn as nn
import paddle.nn.functional as F

from ppvilg.vq.model import Conv2D


class PatchDiscriminator(nn.Layer):
    """PatchGAN (pix2pix) discriminator: a grid of real/fake logits, one per receptive-field patch."""

    def __init__(self, in_channels=3, base_channels=64, n_layers=3):
        super().__init__()
        layers = [Conv2D(in_channels, base_channels, 4, 2, 1), nn.LeakyReLU(0.2)]
        ch = base_channels
        for i in range(1, n_layers + 1):
            out = base_channels * min(2 ** i, 8)
            stride = 2 if i < n_layers else 1
            layers += [Conv2D(ch, out, 4, stride, 1, bias_attr=False), nn.BatchNorm2D(out), nn.LeakyReLU(0.2)]
            ch = out
        layers.append(Conv2D(ch, 1, 4, 1, 1))
        self.net = nn.Sequential(*layers)
        for m in self.sublayers():
            if isinstance(m, nn.Conv2D):
                nn.initializer.Normal(0.0, 0.02)(m.weight)
            elif isinstance(m, nn.BatchNorm2D):
                nn.initializer.Normal(1.0, 0.02)(m.weight)
                nn.initializer.Constant(0.0)(m.bias)

    def forward(self, x):
        return self.net(x)


class VGGPerceptual(nn.Layer):
    """Distance between channel-normalised VGG16 features at relu1_2 .. relu5_3, summed over layers.
    `weights_path`: a .safetensors file of paddle.vision.models.vgg16's state dict (keys 'features.N.weight' ...;
    convert a .pdparams you trust with tools/convert_checkpoint.py --legacy-pickle)."""

    TAPS = (3, 8, 15, 22, 29)

    def __init__(self, weights_path):
        super().__init__()
        if not weights_path or not os.path.isfile(weights_path):
            raise FileNotFoundError(
                f"Loss.perceptual_weights: VGG16 weights not found at {weights_path!r}. Give the path of a "
                "paddle.vision.models.vgg16 state dict (.safetensors), or set Loss.perceptual_weight=0.")
        from paddle.vision.models import vgg16
        from ppvilg.checkpoints import read_weights_file
        net = vgg16(pretrained=False, with_pool=False, num_classes=0)
        state = read_weights_file(weights_path, "Loss.perceptual_weights")
        feats = {k[len("features."):]: v for k, v in state.items() if k.startswith("features.")}
        own = net.features.state_dict()
        missing = sorted(set(own) - set(feats))
        if missing:
            raise ValueError(f"{weights_path}: not a VGG16 state dict (missing {missing[:3]} ...)")
        net.features.set_state_dict({k: feats[k] for k in own})
        self.features = net.features[:self.TAPS[-1] + 1]
        for p in self.features.parameters():
            p.stop_gradient = True
        self.features.eval()
        self.register_buffer("mean", paddle.to_tensor([0.485, 0.456, 0.406]).reshape([1, 3, 1, 1]),
                             persistable=False)
        self.register_buffer("std", paddle.to_tensor([0.229, 0.224, 0.225]).reshape([1, 3, 1, 1]),
                             persistable=False)

    def train(self):  # the feature network always stays in eval mode
        super().train()
        self.features.eval()
        return self

    def _taps(self, x):
        x = ((x + 1) / 2 - self.mean) / self.std
        out = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in self.TAPS:
                out.append(x / (x.pow(2).sum(1, keepdim=True).sqrt() + 1e-10))
        return out

    def forward(self, x, y):
        return sum(((a - b).pow(2).sum(1).mean([1, 2]) for a, b in zip(self._taps(x), self._taps(y))))


def adaptive_weight(rec_loss, gan_loss, last_weight, max_weight=1e4, dp_group=None):
    """||d rec / d W|| / ||d gan / d W|| at the decoder's last layer W. dp_group (data parallel over several
    processes, each with part of the batch): both gradients are averaged over it first, so that every rank gets
    the weight one process would compute on the whole batch."""
    g_rec = paddle.grad(rec_loss, last_weight, retain_graph=True)[0]
    g_gan = paddle.grad(gan_loss, last_weight, retain_graph=True)[0]
    if dp_group is not None:
        both = paddle.stack([g_rec, g_gan])
        paddle.distributed.all_reduce(both, group=dp_group)
        g_rec, g_gan = both[0] / dp_group.nranks, both[1] / dp_group.nranks
    w = paddle.linalg.norm(g_rec) / (paddle.linalg.norm(g_gan) + 1e-4)
    return paddle.clip(w, 0.0, max_weight).detach()


def hinge_d_loss(logits_real, logits_fake):
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def reconstruction_loss(x, x_hat, kind):
    return (x - x_hat).abs().mean() if kind == "l1" else (x - x_hat).pow(2).mean()
