"""The unified bidirectional transformer of ERNIE-ViLG (stage 2): one set of weights for text->image,
image->text and generative VQA, over ERNIE WordPiece text tokens and VQ image codes.

Embedding of slot s = token embedding (text table, or image table whose extra last row is [BOI])
                      + position (1D text position, or 2D row + column of the image cell)
                      + segment kind (text source / text target / image source / image target).
Blocks are pre-LN (x + attn(LN x), x + MLP(LN x)), then a final LN; a text head and an image head give the
logits of text target slots and image target slots. See ppvilg/models/layout.py for sequences and masks.
"""
import math
from dataclasses import dataclass

import numpy as np
import paddle
import paddle.nn as nn
import paddle.nn.functional as F

from ppvilg.models.layout import IMAGE_KINDS, TEXT_TGT, IMAGE_TGT, base_mask, layer_pattern, pattern_mask
from ppvilg.registry import MODEL_CONFIGS


@MODEL_CONFIGS.register("vilg")
@dataclass
class ViLGConfig:
    num_layers: int = 4
    hidden_size: int = 256
    num_heads: int = 8
    ffn_mult: int = 4
    dropout: float = 0.0
    text_vocab_size: int = 12295     # the project's vocab.txt; set to your ERNIE vocab's size
    max_text_len: int = 32           # text slots per segment, [SEP] included
    num_codes: int = 256             # image vocabulary = the VQ tokenizer's codebook
    grid: int = 8                    # image codes per side (image_size / downsampling factor)
    attention: str = "dense"         # dense | sparse (DALL-E row / column / conv patterns over image slots)
    tie_text_head: bool = False      # share the text embedding with the text output head

    PRESETS = {
        "tiny": dict(num_layers=2, hidden_size=64, num_heads=4, max_text_len=16, num_codes=64, grid=8),
        "shapes": dict(num_layers=4, hidden_size=128, num_heads=4, max_text_len=24, num_codes=256, grid=8),
        "base_300m": dict(num_layers=24, hidden_size=1024, num_heads=16, max_text_len=64, num_codes=8192,
                          grid=32),
        "10b": dict(num_layers=48, hidden_size=4096, num_heads=64, max_text_len=64, num_codes=8192, grid=32),
    }


def count_parameters(c: ViLGConfig):
    """Analytic parameter count (equals sum(p.size) of the built model; tested)."""
    d, f = c.hidden_size, c.hidden_size * c.ffn_mult
    per_layer = (2 * 2 * d) + (d * 3 * d + 3 * d) + (d * d + d) + (d * f + f) + (f * d + d)
    emb = c.text_vocab_size * d + (c.num_codes + 1) * d + c.max_text_len * d + 2 * c.grid * d + 4 * d
    heads = (0 if c.tie_text_head else c.text_vocab_size * d) + c.text_vocab_size + c.num_codes * d + c.num_codes
    return c.num_layers * per_layer + emb + 2 * d + heads


class Attention(nn.Layer):
    def __init__(self, d, heads, dropout):
        super().__init__()
        self.heads, self.head_dim = heads, d // heads
        self.q, self.k, self.v = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.proj = nn.Linear(d, d)
        self.dropout = dropout

    def forward(self, x, mask, cache=None, start=0):
        """x [B, s, D] (slots start .. start+s-1); mask: additive [B, 1, s, S_keys].
        cache: None (keys = these slots), or a preallocated (k, v) pair [B, H, S_max, Dh] into which these
        slots' keys and values are written at `start` (inference only); attention then runs over the whole
        buffer and the mask hides the slots not written yet."""
        b, s, _ = x.shape
        # separate projections: on CPU the backward of slicing or splitting a fused qkv is slower than them
        q, k, v = [f(x).reshape([b, s, self.heads, self.head_dim]).transpose([0, 2, 1, 3])
                   for f in (self.q, self.k, self.v)]
        if cache is not None:
            cache[0][:, :, start:start + s] = k
            cache[1][:, :, start:start + s] = v
            k, v = cache
        att = paddle.matmul(q, k, transpose_y=True) / math.sqrt(self.head_dim) + mask
        att = F.softmax(att.astype("float32"), axis=-1).astype(q.dtype)
        att = F.dropout(att, self.dropout, training=self.training)
        out = paddle.matmul(att, v).transpose([0, 2, 1, 3]).reshape([b, s, -1])
        return self.proj(out)


class Block(nn.Layer):
    def __init__(self, c: ViLGConfig):
        super().__init__()
        d = c.hidden_size
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = Attention(d, c.num_heads, c.dropout)
        self.mlp = nn.Sequential(nn.Linear(d, d * c.ffn_mult), nn.GELU(), nn.Linear(d * c.ffn_mult, d),
                                 nn.Dropout(c.dropout))

    def forward(self, x, mask, cache=None, start=0):
        x = x + self.attn(self.ln1(x), mask, cache, start)
        return x + self.mlp(self.ln2(x))


class ViLG(nn.Layer):
    def __init__(self, config: ViLGConfig):
        super().__init__()
        c = self.config = config
        d = c.hidden_size
        if d % c.num_heads:
            raise ValueError(f"hidden_size {d} is not a multiple of num_heads {c.num_heads}")
        self.boi_id = c.num_codes  # [BOI]: the extra last row of the image table
        self.text_emb = nn.Embedding(c.text_vocab_size, d)
        self.image_emb = nn.Embedding(c.num_codes + 1, d)
        self.text_pos = nn.Embedding(c.max_text_len, d)
        self.row_emb, self.col_emb = nn.Embedding(c.grid, d), nn.Embedding(c.grid, d)
        self.kind_emb = nn.Embedding(4, d)
        self.blocks = nn.LayerList([Block(c) for _ in range(c.num_layers)])
        self.ln_f = nn.LayerNorm(d)
        self.text_head = None if c.tie_text_head else nn.Linear(d, c.text_vocab_size, bias_attr=False)
        self.text_bias = self.create_parameter([c.text_vocab_size], is_bias=True)
        self.image_head = nn.Linear(d, c.num_codes)
        self.apply(self._init)

    @staticmethod
    def _init(m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.initializer.Normal(0.0, 0.02)(m.weight)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.initializer.Constant(0.0)(m.bias)

    # ---- pieces used by forward and by generation ----------------------------------------------------
    def embed(self, ids, kind, pos):
        """ids [B, S] int64; kind, pos [S] int64 (numpy or tensor) -> [B, S, D]."""
        kind, pos = paddle.to_tensor(kind), paddle.to_tensor(pos)
        is_img = ((kind == IMAGE_KINDS[0]) | (kind == IMAGE_KINDS[1])).unsqueeze(0).unsqueeze(-1)
        c = self.config
        tok = paddle.where(is_img, self.image_emb(ids.clip(0, c.num_codes)),
                           self.text_emb(ids.clip(0, c.text_vocab_size - 1)))
        p_img = self.row_emb(pos.clip(0, c.grid * c.grid - 1) // c.grid) + self.col_emb(pos % c.grid)
        p_txt = self.text_pos(pos.clip(0, c.max_text_len - 1))
        return tok + paddle.where(is_img[0], p_img, p_txt).unsqueeze(0) + self.kind_emb(kind).unsqueeze(0)

    def layer_masks(self, layout, valid, dtype="float32"):
        """Additive masks [B, 1, S, S] per layer (shared objects for equal patterns)."""
        base = base_mask(layout, valid)
        cache, out = {}, []
        for i in range(self.config.num_layers):
            pat = layer_pattern(i, self.config.num_layers, self.config.attention)
            if pat not in cache:
                allowed = base & pattern_mask(layout, self.config.grid, pat)[None]
                cache[pat] = paddle.to_tensor(np.where(allowed, 0.0, -1e9).astype(np.float32)[:, None]).astype(dtype)
            out.append(cache[pat])
        return out

    def head(self, h, target_kind):
        h = self.ln_f(h)
        if target_kind == IMAGE_TGT:
            return self.image_head(h)
        if self.text_head is None:
            return paddle.matmul(h, self.text_emb.weight, transpose_y=True) + self.text_bias
        return self.text_head(h) + self.text_bias

    # ---- training / scoring ---------------------------------------------------------------------------
    def hidden(self, ids, valid, layout):
        """Last-layer hidden states [B, S, D] (before the final LN) of a full sequence."""
        kind, pos = layout.arrays()
        x = self.embed(ids, kind, pos)
        masks = self.layer_masks(layout, np.asarray(valid), x.dtype)
        for block, m in zip(self.blocks, masks):
            x = block(x, m)
        return x

    # ---- inference with a preallocated KV cache (driven by ppvilg.generation) ---------------------------
    def new_cache(self, batch, length, dtype="float32"):
        c = self.config
        shape = [batch, c.num_heads, length, c.hidden_size // c.num_heads]
        return [(paddle.zeros(shape, dtype), paddle.zeros(shape, dtype)) for _ in range(c.num_layers)]

    def step(self, ids, kind, pos, masks, cache, start):
        """Run slots start .. start+s-1 (ids [B, s], kind/pos [s]) against the cache; masks: per layer
        additive [B, 1, s, S_max] (rows of `layer_masks` for these slots). Returns hidden [B, s, D]."""
        x = self.embed(ids, kind, pos)
        for block, m, kv in zip(self.blocks, masks, cache):
            x = block(x, m, kv, start)
        return x

    def forward(self, ids, valid, layout, labels=None):
        """ids [B, S] int64, valid [B, S] bool (numpy), layout: Layout.
        Returns (logits of the target segment [B, T, V], mean cross-entropy over labels != -100 or None)."""
        x = self.hidden(ids, valid, layout)
        logits = self.head(x[:, layout.target_slice()], layout.kinds[-1])
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.astype("float32"), labels.unsqueeze(-1), ignore_index=-100,
                                   reduction="mean")
        return logits, loss
