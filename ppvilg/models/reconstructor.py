"""The end-to-end reconstructor of ERNIE-ViLG §3.1.3: the generator's last-layer hidden states at the image
positions are mapped non-linearly into the codebook-embedding space and decoded to pixels, bypassing the id
lookup, so the reconstruction loss trains the generator too.

Choices the paper leaves open, made here:
- mapping: the final-LayerNorm'd hidden state (what the image head sees) -> Linear(d, 2d) -> GELU ->
  Linear(2d, embed_dim), a two-layer MLP into the codebook-embedding space (freshly initialised);
- grid cell k is fed by the hidden state of the target slot that *predicts* code k (slot k holds code k-1,
  [BOI] for k = 0), so no state needs a look-ahead;
- the reconstructor has the VQ decoder's architecture (post-quantization 1x1 conv + decoder) and starts from
  the trained stage-1 weights.
"""
import paddle.nn as nn

from ppvilg.vq.model import Conv2D, ImageDecoder


class E2EReconstructor(nn.Layer):
    def __init__(self, hidden_size, vq_config):
        super().__init__()
        self.vq_config = vq_config
        self.mapping = nn.Sequential(nn.Linear(hidden_size, 2 * hidden_size), nn.GELU(),
                                     nn.Linear(2 * hidden_size, vq_config.embed_dim))
        self.post_quant_conv = Conv2D(vq_config.embed_dim, vq_config.z_channels, 1)
        self.decoder = ImageDecoder(vq_config)

    @classmethod
    def from_vq(cls, hidden_size, vq):
        """Initialised from a trained stage-1 model's decoder (post_quant_conv + decoder weights)."""
        rec = cls(hidden_size, vq.config)
        rec.post_quant_conv.set_state_dict(vq.post_quant_conv.state_dict())
        rec.decoder.set_state_dict(vq.decoder.state_dict())
        return rec

    def forward(self, hidden, grid):
        """hidden [B, grid*grid, d] (final-LN'd states of the image target slots) -> images [B, 3, H, W]."""
        b = hidden.shape[0]
        z = self.mapping(hidden).reshape([b, grid, grid, -1]).transpose([0, 3, 1, 2])
        return self.decoder(self.post_quant_conv(z))

