"""Stage 1: the VQGAN image tokenizer (encoder -> vector quantizer -> decoder).

The paper (ERNIE-ViLG §3.1) uses a VQGAN with downsampling factor f=8 and 8192 codes: 256x256 -> 32x32 codes.
Choices the paper leaves open, made here: the taming-transformers layout (ResNet blocks with GroupNorm and
swish, self-attention at the listed resolutions, stride-2 conv downsampling, nearest+conv upsampling), a
1x1 projection into a `embed_dim`-wide codebook, commitment beta 0.25, and optionally EMA codebook updates
and dead-code restarts (a code whose running usage falls below `dead_code_threshold` is re-seeded from a
random encoder output of the current batch) so codebook usage does not collapse.
"""
import math
from dataclasses import dataclass, field

import paddle
import paddle.nn as nn
import paddle.nn.functional as F

from ppvilg.registry import MODEL_CONFIGS, MODELS


@MODEL_CONFIGS.register("vqgan")
@dataclass
class VQGANConfig:
    in_channels: int = 3
    base_channels: int = 64
    channel_mult: list = field(default_factory=lambda: [1, 2, 2])   # one entry per level; f = 2**(levels-1)
    num_res_blocks: int = 1
    attn_resolutions: list = field(default_factory=list)            # feature-map sizes that get self-attention
    norm_groups: int = 16
    z_channels: int = 64
    embed_dim: int = 32
    num_codes: int = 512
    beta: float = 0.25                  # commitment weight
    ema: bool = True                    # EMA codebook updates instead of the codebook loss
    ema_decay: float = 0.99
    restart_dead_codes: bool = True
    dead_code_threshold: float = 0.03   # running usage (EMA of assignments per step) below which a code restarts
    dropout: float = 0.0
    resolution: int = 32                # training image size (for attention resolutions)

    PRESETS = {
        "tiny": dict(base_channels=16, channel_mult=[1, 2], norm_groups=8, z_channels=16, embed_dim=8,
                     num_codes=64, resolution=16),
        "shapes": dict(base_channels=32, channel_mult=[1, 1, 2], norm_groups=8, z_channels=32, embed_dim=16,
                       num_codes=256, ema_decay=0.95, resolution=32),
        "paper_f8_8192": dict(base_channels=128, channel_mult=[1, 1, 2, 2], num_res_blocks=2,
                              attn_resolutions=[32], norm_groups=32, z_channels=256, embed_dim=256,
                              num_codes=8192, resolution=256),
    }

    @property
    def downsample(self):
        return 2 ** (len(self.channel_mult) - 1)


class Conv2D(nn.Conv2D):
    """nn.Conv2D (the same parameters and names) whose bias, in dygraph on CPU, is added over [N, C, H * W]:
    Paddle's CPU add that broadcasts a [1, C, 1, 1] bias over [N, C, H, W], and its gradient, cost ~5x that
    (convolution + bias forward and backward at [16, 32, 32, 32]: 23.3 ms against 18.2; without a bias 16.9).
    Elsewhere (static programs and export, GPU, other padding modes or layouts) nn.Conv2D's own forward."""

    def forward(self, x):
        if (self.bias is None or not paddle.in_dynamic_mode() or not x.place.is_cpu_place()
                or self._padding_mode != "zeros" or self._data_format != "NCHW"):
            return super().forward(x)
        y = F.conv2d(x, self.weight, None, self._stride, self._padding, self._dilation, self._groups)
        c = y.shape[1]
        return (y.reshape([0, c, -1]) + self.bias.reshape([c, 1])).reshape(y.shape)


def _norm(ch, groups):
    return nn.GroupNorm(groups, ch, epsilon=1e-6)


class ResBlock(nn.Layer):
    def __init__(self, cin, cout, groups, dropout):
        super().__init__()
        self.norm1, self.conv1 = _norm(cin, groups), Conv2D(cin, cout, 3, padding=1)
        self.norm2, self.conv2 = _norm(cout, groups), Conv2D(cout, cout, 3, padding=1)
        self.dropout = nn.Dropout(dropout)
        self.skip = Conv2D(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x):
        h = self.conv1(F.swish(self.norm1(x)))
        h = self.conv2(self.dropout(F.swish(self.norm2(h))))
        return self.skip(x) + h


class AttnBlock(nn.Layer):
    def __init__(self, ch, groups):
        super().__init__()
        self.norm = _norm(ch, groups)
        self.qkv = Conv2D(ch, 3 * ch, 1)
        self.proj = Conv2D(ch, ch, 1)

    def forward(self, x):
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape([b, 3, c, h * w]).unbind(1)
        attn = F.softmax(paddle.matmul(q, k, transpose_x=True) / math.sqrt(c), axis=-1)  # b, hw, hw
        out = paddle.matmul(v, attn, transpose_y=True).reshape([b, c, h, w])
        return x + self.proj(out)


class ImageEncoder(nn.Layer):
    def __init__(self, c: VQGANConfig):
        super().__init__()
        g = c.norm_groups
        self.conv_in = Conv2D(c.in_channels, c.base_channels, 3, padding=1)
        blocks, ch, res = [], c.base_channels, c.resolution
        for i, m in enumerate(c.channel_mult):
            out = c.base_channels * m
            for _ in range(c.num_res_blocks):
                blocks.append(ResBlock(ch, out, g, c.dropout))
                ch = out
                if res in c.attn_resolutions:
                    blocks.append(AttnBlock(ch, g))
            if i != len(c.channel_mult) - 1:
                blocks.append(Conv2D(ch, ch, 3, stride=2, padding=1))
                res //= 2
        blocks += [ResBlock(ch, ch, g, c.dropout), AttnBlock(ch, g), ResBlock(ch, ch, g, c.dropout)]
        self.blocks = nn.Sequential(*blocks)
        self.norm_out = _norm(ch, g)
        self.conv_out = Conv2D(ch, c.z_channels, 3, padding=1)

    def forward(self, x):
        return self.conv_out(F.swish(self.norm_out(self.blocks(self.conv_in(x)))))


class Upsample(nn.Layer):
    def __init__(self, ch):
        super().__init__()
        self.conv = Conv2D(ch, ch, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class ImageDecoder(nn.Layer):
    def __init__(self, c: VQGANConfig):
        super().__init__()
        g = c.norm_groups
        ch = c.base_channels * c.channel_mult[-1]
        res = c.resolution // c.downsample
        self.conv_in = Conv2D(c.z_channels, ch, 3, padding=1)
        blocks = [ResBlock(ch, ch, g, c.dropout), AttnBlock(ch, g), ResBlock(ch, ch, g, c.dropout)]
        for i, m in reversed(list(enumerate(c.channel_mult))):
            out = c.base_channels * m
            for _ in range(c.num_res_blocks + 1):
                blocks.append(ResBlock(ch, out, g, c.dropout))
                ch = out
                if res in c.attn_resolutions:
                    blocks.append(AttnBlock(ch, g))
            if i != 0:
                blocks.append(Upsample(ch))
                res *= 2
        self.blocks = nn.Sequential(*blocks)
        self.norm_out = _norm(ch, g)
        self.conv_out = Conv2D(ch, c.in_channels, 3, padding=1)

    def forward(self, z):
        return self.conv_out(F.swish(self.norm_out(self.blocks(self.conv_in(z)))))


class VectorQuantizer(nn.Layer):
    """Nearest-neighbour quantizer with a straight-through gradient.

    Loss = ||sg[z_q] - z||^2 * beta (commitment) + ||z_q - sg[z]||^2 (codebook; omitted with EMA updates,
    where the codebook follows the running mean of its assigned encoder outputs instead).
    """

    def __init__(self, num_codes, dim, beta, ema, decay, restart, threshold, dp_group=None):
        """dp_group: the data-parallel communication group when several processes train one tokenizer on parts
        of each batch (None: one process): the EMA statistics are summed over it and dead codes restart from rank
        0's encoder outputs, so that every rank keeps the same codebook."""
        super().__init__()
        self.dp_group = dp_group
        self.num_codes, self.dim, self.beta = num_codes, dim, beta
        self.ema, self.decay, self.restart, self.threshold = ema, decay, restart, threshold
        init = paddle.uniform([num_codes, dim], min=-1.0 / num_codes, max=1.0 / num_codes)
        if ema:
            self.register_buffer("codebook", init)
            self.register_buffer("ema_sum", init.clone())
            self.register_buffer("ema_count", paddle.ones([num_codes]))
        else:
            self.codebook = self.create_parameter([num_codes, dim], default_initializer=nn.initializer.Assign(init))
        # EMA of assignments per step; starting at zero makes the first training step seed every code from
        # the batch's encoder outputs when restarts are on (a data-dependent initialisation)
        self.register_buffer("usage", paddle.zeros([num_codes]))

    def codes_for(self, z_flat):
        d = (z_flat.pow(2).sum(1, keepdim=True) - 2 * paddle.matmul(z_flat, self.codebook, transpose_y=True)
             + self.codebook.pow(2).sum(1).unsqueeze(0))
        return d.argmin(1)

    def lookup(self, codes):
        """int codes [..., h, w] -> z_q [..., dim, h, w]"""
        z = F.embedding(codes, self.codebook)
        return z.transpose([0, 3, 1, 2])

    def forward(self, z):
        b, c, h, w = z.shape
        z_flat = z.transpose([0, 2, 3, 1]).reshape([-1, c])
        codes = self.codes_for(z_flat.detach())
        z_q_flat = F.embedding(codes, self.codebook)
        onehot = F.one_hot(codes, self.num_codes).astype(z_flat.dtype)
        counts = onehot.sum(0)
        commit = self.beta * F.mse_loss(z_flat, z_q_flat.detach())
        loss = commit if self.ema else commit + F.mse_loss(z_q_flat, z_flat.detach())
        if self.training:
            with paddle.no_grad():
                self._update(z_flat.detach(), onehot, counts)
        z_q = z_flat + (z_q_flat - z_flat).detach()
        z_q = z_q.reshape([b, h, w, c]).transpose([0, 3, 1, 2])
        probs = counts / counts.sum()
        perplexity = paddle.exp(-(probs * paddle.log(probs + 1e-10)).sum())
        return z_q, loss, codes.reshape([b, h, w]), {"perplexity": perplexity, "commitment": commit}

    def _update(self, z_flat, onehot, counts):
        dead = (self.usage < self.threshold).astype(z_flat.dtype).unsqueeze(1)  # judged before this step
        sums = paddle.matmul(onehot, z_flat, transpose_x=True)   # [K, dim]: the encoder outputs given each code
        if self.dp_group is not None:   # the whole batch's statistics: one all-reduce of [K, 1 + dim]
            stats = paddle.concat([counts.unsqueeze(1), sums], axis=1)
            paddle.distributed.all_reduce(stats, group=self.dp_group)
            counts, sums = stats[:, 0], stats[:, 1:]
        self.usage.set_value(self.usage * self.decay + counts * (1 - self.decay))
        if self.ema:
            self.ema_count.set_value(self.ema_count * self.decay + counts * (1 - self.decay))
            self.ema_sum.set_value(self.ema_sum * self.decay + sums * (1 - self.decay))
            n = self.ema_count.sum()
            smoothed = (self.ema_count + 1e-5) / (n + self.num_codes * 1e-5) * n
            self.codebook.set_value(self.ema_sum / smoothed.unsqueeze(1))
        if self.restart and float(dead.sum()) > 0:
            pick = paddle.randint(0, z_flat.shape[0], [self.num_codes])
            fresh = paddle.gather(z_flat, pick)
            if self.dp_group is not None:   # every rank takes rank 0's picks (the dead set is the same everywhere)
                paddle.distributed.broadcast(fresh, src=self.dp_group.ranks[0], group=self.dp_group)
            self.codebook.set_value(self.codebook * (1 - dead) + fresh * dead)
            self.usage.set_value(self.usage * (1 - dead.squeeze(1)) + dead.squeeze(1))
            if self.ema:
                self.ema_sum.set_value(self.ema_sum * (1 - dead) + fresh * dead)
                self.ema_count.set_value(self.ema_count * (1 - dead.squeeze(1)) + dead.squeeze(1))


@MODELS.register("vqgan")
class VQGAN(nn.Layer):
    """encode(images in [-1,1]) -> codes [B, h, w]; decode_codes(codes) -> images; forward for training."""

    def __init__(self, config: VQGANConfig, dp_group=None):
        """dp_group: the data-parallel group of a training run over several processes (VectorQuantizer)."""
        super().__init__()
        self.config = config
        c = config
        self.encoder = ImageEncoder(c)
        self.quant_conv = Conv2D(c.z_channels, c.embed_dim, 1)
        self.quantizer = VectorQuantizer(c.num_codes, c.embed_dim, c.beta, c.ema, c.ema_decay,
                                         c.restart_dead_codes, c.dead_code_threshold, dp_group)
        self.post_quant_conv = Conv2D(c.embed_dim, c.z_channels, 1)
        self.decoder = ImageDecoder(c)

    def forward(self, x):
        z = self.quant_conv(self.encoder(x))
        z_q, q_loss, codes, stats = self.quantizer(z)
        return self.decoder(self.post_quant_conv(z_q)), q_loss, codes, stats

    def encode(self, x):
        return self.quantizer.codes_for(
            self.quant_conv(self.encoder(x)).transpose([0, 2, 3, 1]).reshape([-1, self.config.embed_dim])
        ).reshape([x.shape[0], x.shape[2] // self.config.downsample, x.shape[3] // self.config.downsample])

    def decode_latents(self, z_q):
        """Codebook-space latents [B, embed_dim, h, w] -> images (the path the end-to-end reconstructor uses)."""
        return self.decoder(self.post_quant_conv(z_q))

    def decode_codes(self, codes):
        return self.decode_latents(self.quantizer.lookup(codes))

    def last_layer_weight(self):
        return self.decoder.conv_out.weight
