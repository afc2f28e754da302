"""The unified bidirectional transformer of ERNIE-ViLG (stage 2): one set of weights for text->image,
image->text and generative VQA, over ERNIE WordPiece text tokens and VQ image codes.

Embedding of slot s = token embedding (text table, or image table whose extra last row is [BOI])
                      + position (1D text position, or 2D row + column of the image cell)
                      + segment kind (text source / text target / image source / image target).
Blocks are pre-LN (x + attn(LN x), x + MLP(LN x)), then a final LN; a text head and an image head give the
logits of text target slots and image target slots. See ppvilg/models/layout.py for sequences and masks.

Parallel execution (the `Distributed` config section) changes layers, not the model; the degree comes in as an
argument (`ViLG(config, mp=..., recompute=..., mp_group=...)`), never from process-global state. With tensor
parallel (mp > 1) q/k/v and the first MLP layer are ColumnParallelLinear, the attention output and
second MLP layer RowParallelLinear, the text embedding VocabParallelEmbedding and the text head column-parallel
with ParallelCrossEntropy (each rank holds heads / mp attention heads and text_vocab_size / mp text logits);
`MP_SPLIT_AXES` lists which axis of which parameter is split, `parallel_layout_errors` is the one check that a
layout fits a model. With pipeline parallel the same embedding, Block and head code runs as stages of a
PipelineLayer (ppvilg/models/vilg_pp.py). Recompute (full block or attention scores) is a flag of Block.
"""
import math
import re
from dataclasses import dataclass

import numpy as np
import paddle
import paddle.nn as nn
import paddle.nn.functional as F
from paddle.autograd import PyLayer

from ppvilg.models.lora import add_lora, is_lora, matches as lora_matches
from ppvilg.models.layout import IMAGE_KINDS, TEXT_TGT, IMAGE_TGT, base_mask, layer_pattern, pattern_mask
from ppvilg.registry import MODEL_CONFIGS, MODELS
from ppvilg_deploy.kvcache import slot_rows, write_slots


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
    attention_kernel: str = "matmul"  # matmul | sdpa (F.scaled_dot_product_attention: flash / memory-efficient
                                      # kernels on GPU; the same masks, the same result within rounding)
    tie_text_head: bool = False      # share the text embedding with the text output head
    lora_rank: int = 0               # > 0: LoRA adapters of this rank on the lora_targets (ppvilg/models/lora.py)
    lora_alpha: float = 16.0         # adapter scale alpha / rank
    lora_dropout: float = 0.0
    lora_targets: str = "attn.q,attn.k,attn.v,attn.proj,mlp.0,mlp.2"   # globs over a block's linear layers

    PRESETS = {
        "tiny": dict(num_layers=2, hidden_size=64, num_heads=4, max_text_len=16, num_codes=64, grid=8),
        "shapes": dict(num_layers=4, hidden_size=96, num_heads=4, ffn_mult=2, max_text_len=24, num_codes=256,
                       grid=8),
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
    if c.lora_rank > 0:   # A [in, r] + B [r, out] per adapted projection
        dims = {"attn.q": (d, d), "attn.k": (d, d), "attn.v": (d, d), "attn.proj": (d, d), "mlp.0": (d, f),
                "mlp.2": (f, d)}
        per_layer += sum(c.lora_rank * (i + o) for name, (i, o) in dims.items() if lora_matches(name, c.lora_targets))
    return c.num_layers * per_layer + emb + 2 * d + heads


def grow_text_vocab(state, new_size, sources):
    """A ViLG state dict with the text vocabulary grown to `new_size` rows (new words added to vocab.txt):
    text_emb rows, text_head columns (untied heads) and text_bias entries; the existing rows stay bit-identical.
    sources: {new id: old ids} - a new row starts as the mean of those rows (the pieces the word was cut into
    before), or of all rows when the list is empty. numpy in, numpy out."""
    import numpy as np
    out = dict(state)
    old = state["text_emb.weight"].shape[0]
    if new_size < old:
        raise ValueError(f"cannot shrink the text vocabulary from {old} to {new_size}")

    def grown(arr, axis):
        arr = np.asarray(arr)
        pad = [(0, 0)] * arr.ndim
        pad[axis] = (0, new_size - arr.shape[axis])
        g = np.pad(arr, pad)
        take = (lambda ids: arr.take(ids, axis=axis).mean(axis=axis))
        for new_id in range(old, new_size):
            ids = sources.get(new_id) or list(range(old))
            index = [slice(None)] * arr.ndim
            index[axis] = new_id
            g[tuple(index)] = take(ids)
        return g.astype(arr.dtype)

    out["text_emb.weight"] = grown(state["text_emb.weight"], 0)
    out["text_bias"] = grown(state["text_bias"], 0)
    if "text_head.weight" in state:
        out["text_head.weight"] = grown(state["text_head.weight"], 1)
    return out


# Parameters split under tensor parallel: name pattern -> axis (ColumnParallelLinear weights [in, out/mp] and
# biases, RowParallelLinear weights [in/mp, out], the text vocabulary's rows, the text logits' bias).
MP_SPLIT_AXES = {
    r"text_emb\.weight": 0,
    r"text_head\.weight": 1,
    r"text_bias": 0,
    r"blocks\.\d+\.attn\.(q|k|v)\.weight": 1,
    r"blocks\.\d+\.attn\.(q|k|v)\.bias": 0,
    r"blocks\.\d+\.attn\.proj\.weight": 0,
    r"blocks\.\d+\.mlp\.0\.weight": 1,
    r"blocks\.\d+\.mlp\.0\.bias": 0,
    r"blocks\.\d+\.mlp\.2\.weight": 0,
    r"blocks\.\d+\.(attn\.(q|k|v)|mlp\.0)\.lora_B": 1,      # LoRA adapters split with their layer (lora.LoRALinear)
    r"blocks\.\d+\.(attn\.proj|mlp\.2)\.lora_A": 0,
}


def mp_split_axis(name):
    """The axis along which tensor parallel splits parameter `name` (ViLG naming), or None if replicated."""
    for pattern, axis in MP_SPLIT_AXES.items():
        if re.fullmatch(pattern, name):
            return axis
    return None


def _normal():
    return paddle.ParamAttr(initializer=nn.initializer.Normal(0.0, 0.02))


class _BiasAdd(PyLayer):
    """y + b (b broadcast over y's leading axes) whose bias gradient is ones @ grad: Paddle's CPU backward of a
    broadcast add reduces over the rows with a column reduction ~60x slower than that matmul ([5632, 128]: 3.9
    ms vs 0.06 ms), which made bias gradients ~15% of a stage-2 training step."""

    @staticmethod
    def forward(ctx, y, b):
        return y + b

    @staticmethod
    def backward(ctx, grad):
        rows = grad.reshape([-1, grad.shape[-1]])
        return grad, paddle.matmul(paddle.ones([1, rows.shape[0]], rows.dtype), rows).reshape([-1])


class Linear(nn.Linear):
    """nn.Linear (the same parameters and names) whose bias gradient in dygraph float32 training on CPU comes
    from _BiasAdd; elsewhere (GPU, whose reduction is fast and where AMP may run; static programs, export, half
    precision, frozen bias) plain F.linear."""

    def forward(self, x):
        if (not self.training or self.bias is None or self.bias.stop_gradient or not paddle.in_dynamic_mode()
                or not x.place.is_cpu_place() or x.dtype != paddle.float32 or self.weight.dtype != paddle.float32):
            return F.linear(x, self.weight, self.bias)
        return _BiasAdd.apply(paddle.matmul(x, self.weight), self.bias)


def _linear(d_in, d_out, split, mp, bias=True):
    """Linear, or its tensor-parallel version when mp > 1 ('col': output split, 'row': input split)."""
    if mp == 1 or split is None:
        return Linear(d_in, d_out, bias_attr=None if bias else False)
    from paddle.distributed.fleet.meta_parallel import ColumnParallelLinear, RowParallelLinear
    if split == "col":
        return ColumnParallelLinear(d_in, d_out, weight_attr=_normal(), has_bias=bias, gather_output=False)
    return RowParallelLinear(d_in, d_out, weight_attr=_normal(), has_bias=bias, input_is_parallel=True)


def init_layer(m):
    """N(0, 0.02) weights and zero biases of plain Linear / Embedding layers (tensor-parallel layers are
    initialised through their weight_attr: a per-rank RNG for split weights)."""
    if type(m) in (nn.Linear, Linear, nn.Embedding):
        nn.initializer.Normal(0.0, 0.02)(m.weight)
    if type(m) in (nn.Linear, Linear) and m.bias is not None:
        nn.initializer.Constant(0.0)(m.bias)


def parallel_layout_errors(c, mp=1, pp=1):
    """What keeps a tensor parallel degree mp and a pipeline degree pp from running model config c: a list of
    (Model key, problem, hint) - empty when the layout fits. The one place this is decided (the stage-2
    config validation and tools/convert_checkpoint.py ask it)."""
    errors = []
    for key, n in (("num_heads", c.num_heads), ("text_vocab_size", c.text_vocab_size),
                   ("hidden_size * ffn_mult", c.hidden_size * c.ffn_mult)):
        if n % mp:
            hint = (f"pad it: -o Model.text_vocab_size={-(-n // mp) * mp}" if key == "text_vocab_size" else "")
            errors.append((key, f"the tensor parallel degree {mp} must divide Model.{key} = {n}", hint))
    if pp > 1:
        if c.num_layers < pp:
            errors.append(("num_layers", f"the pipeline degree {pp} exceeds Model.num_layers {c.num_layers}", ""))
        if c.tie_text_head:
            errors.append(("tie_text_head", "Model.tie_text_head cannot be used with pipeline parallel (the text "
                           "embedding and head live on different stages)", "use tie_text_head=false"))
    return errors


ATTENTION_KERNELS = ("matmul", "sdpa")


class Attention(nn.Layer):
    def __init__(self, d, heads, dropout, mp=1, recompute="none", kernel="matmul"):
        super().__init__()
        self.heads, self.head_dim = heads // mp, d // heads   # this rank's heads
        self.q, self.k, self.v = (_linear(d, d, "col", mp) for _ in range(3))
        self.proj = _linear(d, d, "row", mp)
        self.dropout = dropout
        self.recompute_scores = recompute == "core_attn"
        self.kernel = kernel

    def _scores(self, q, k, v, mask):
        """q, k, v [B, H, s, Dh] / [B, H, S_keys, Dh]; mask additive [B, 1, s, S_keys] -> [B, H, s, Dh]."""
        if self.kernel == "sdpa":   # paddle's fused attention takes [B, S, H, Dh]
            t = [0, 2, 1, 3]
            out = F.scaled_dot_product_attention(q.transpose(t), k.transpose(t), v.transpose(t),
                                                 attn_mask=mask.astype(q.dtype), dropout_p=self.dropout,
                                                 training=self.training)
            return out.transpose(t)
        att = paddle.matmul(q, k, transpose_y=True) / math.sqrt(self.head_dim) + mask
        if att.dtype == paddle.float32:  # (no casts in float32: they are ops of their own in exported programs)
            att = F.softmax(att, axis=-1)
        else:   # half precision: the softmax in float32
            att = F.softmax(att.astype("float32"), axis=-1).astype(q.dtype)
        att = F.dropout(att, self.dropout, training=self.training)
        return paddle.matmul(att, v)

    def _qkv(self, x, rows=None):
        """q, k, v [B, H, s, Dh] of x [B, s, D]; with rows (a slice of the slots) q of those slots only."""
        # separate projections: on CPU the backward of slicing or splitting a fused qkv is slower than them
        return [f(y).reshape([y.shape[0], y.shape[1], self.heads, self.head_dim]).transpose([0, 2, 1, 3])
                for f, y in ((self.q, x if rows is None else x[:, rows]), (self.k, x), (self.v, x))]

    def _out(self, o):
        return self.proj(o.transpose([0, 2, 1, 3]).reshape([o.shape[0], o.shape[2], -1]))

    def forward(self, x, mask, cache=None, start=0, cache_rows=None, rows=None):
        """x [B, s, D] (slots start .. start+s-1); mask: additive [B, 1 or H, s, S_keys] (with rows: [B, 1 or H,
        those rows' count, S_keys]). rows (no cache): a slice of the slots whose outputs are wanted: only they
        query, every slot is a key; returns [B, len(rows), D].
        cache: None (keys = these slots), or a preallocated (k, v) pair [B, H, S_max, Dh] into which these
        slots' keys and values are written in place at `start` (inference only); attention then runs over the
        first S_keys >= start + s slots of the buffer, the mask hiding the slots not filled yet (generation passes
        the whole buffer: a shorter key slice is a strided view that the matmuls would copy first). cache_rows:
        where these slots lie in the cache (ppvilg_deploy.kvcache.write_slots; None: computed here)."""
        q, k, v = self._qkv(x, rows)
        if cache is not None:
            keys = mask.shape[-1]
            write_slots(cache, start, (k, v), cache_rows)
            k, v = (cache[0], cache[1]) if keys == cache[0].shape[2] else (cache[0][:, :, :keys], cache[1][:, :, :keys])
        if self.recompute_scores and self.training:
            from paddle.distributed.fleet.utils import recompute
            return self._out(recompute(self._scores, q, k, v, mask))
        return self._out(self._scores(q, k, v, mask))

    def step_split(self, x, mask_cache, mask_new, cache_k, cache_v):
        """The cached step of exported programs, which never write the cache: attention runs over the cache
        (mask_cache [B, H, s, S]: only slots filled before this step are visible) and over these slots' own keys
        (mask_new [B, H, s, s]) under one softmax; these slots' keys and values are returned, (out, k, v)
        [B, H, s, Dh], for the caller to store in its cache in place (no copy of the cache per step)."""
        q, k, v = self._qkv(x)
        scale = math.sqrt(self.head_dim)
        s1 = paddle.matmul(q, cache_k, transpose_y=True) / scale + mask_cache
        s2 = paddle.matmul(q, k, transpose_y=True) / scale + mask_new
        att = paddle.concat([s1, s2], axis=-1)
        att = F.softmax(att, axis=-1) if att.dtype == paddle.float32 else \
            F.softmax(att.astype("float32"), axis=-1).astype(q.dtype)
        n = paddle.shape(cache_k)[2]
        out = paddle.matmul(att[:, :, :, :n], cache_v) + paddle.matmul(att[:, :, :, n:], v)
        return self._out(out), k, v


class Block(nn.Layer):
    def __init__(self, c: ViLGConfig, mp=1, recompute="none"):
        super().__init__()
        d = c.hidden_size
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = Attention(d, c.num_heads, c.dropout, mp, recompute, c.attention_kernel)
        self.mlp = nn.Sequential(_linear(d, d * c.ffn_mult, "col", mp), nn.GELU(),
                                 _linear(d * c.ffn_mult, d, "row", mp), nn.Dropout(c.dropout))
        self.recompute_block = recompute == "full"

    def _forward(self, x, mask, cache=None, start=0, cache_rows=None, rows=None):
        a = self.attn(self.ln1(x), mask, cache, start, cache_rows, rows)
        x = (x if rows is None else x[:, rows]) + a
        return x + self.mlp(self.ln2(x))

    def step_split(self, x, mask_cache, mask_new, cache_k, cache_v):
        a, k, v = self.attn.step_split(self.ln1(x), mask_cache, mask_new, cache_k, cache_v)
        x = x + a
        return x + self.mlp(self.ln2(x)), k, v

    def forward(self, x, mask, cache=None, start=0, cache_rows=None, rows=None):
        """rows: a slice of the slots whose outputs are wanted (see Attention.forward); mask then covers them."""
        if self.recompute_block and self.training and cache is None:
            from paddle.distributed.fleet.utils import recompute
            return recompute(self._forward, x, mask, None, 0, None, rows)
        return self._forward(x, mask, cache, start, cache_rows, rows)


class EmbeddingsMixin:
    """Token, position and kind embeddings (mixed into ViLG and its first pipeline stage)."""

    def _build_embeddings(self, c, mp):
        d = c.hidden_size
        if mp > 1:
            from paddle.distributed.fleet.meta_parallel import VocabParallelEmbedding
            self.text_emb = VocabParallelEmbedding(c.text_vocab_size, d, weight_attr=_normal())
        else:
            self.text_emb = nn.Embedding(c.text_vocab_size, d)
        self.image_emb = nn.Embedding(c.num_codes + 1, d)
        self.text_pos = nn.Embedding(c.max_text_len, d)
        self.row_emb, self.col_emb = nn.Embedding(c.grid, d), nn.Embedding(c.grid, d)
        self.kind_emb = nn.Embedding(4, d)

    def embed(self, ids, kind, pos):
        """ids [B, S] int64; kind, pos [S] int64 (numpy or tensor) -> [B, S, D]."""
        kind = paddle.to_tensor(kind) if isinstance(kind, np.ndarray) else kind
        pos = paddle.to_tensor(pos) if isinstance(pos, np.ndarray) else pos
        is_img = ((kind == IMAGE_KINDS[0]) | (kind == IMAGE_KINDS[1])).unsqueeze(0).unsqueeze(-1)
        c = self.config
        tok = paddle.where(is_img, self.image_emb(ids.clip(0, c.num_codes)),
                           self.text_emb(ids.clip(0, c.text_vocab_size - 1)))
        p_img = self.row_emb(pos.clip(0, c.grid * c.grid - 1) // c.grid) + self.col_emb(pos % c.grid)
        p_txt = self.text_pos(pos.clip(0, c.max_text_len - 1))
        return tok + paddle.where(is_img[0], p_img, p_txt).unsqueeze(0) + self.kind_emb(kind).unsqueeze(0)


class HeadsMixin:
    """Final LN, text and image heads and their losses (mixed into ViLG and its last pipeline stage)."""

    def _build_heads(self, c, mp, mp_group=None):
        d = c.hidden_size
        self.mp, self.mp_group = mp, mp_group
        self.ln_f = nn.LayerNorm(d)
        self.text_head = None if c.tie_text_head else _linear(d, c.text_vocab_size, "col", mp, bias=False)
        self.text_bias = self.create_parameter([c.text_vocab_size // mp], is_bias=True)
        if mp > 1:
            self.text_bias.is_distributed, self.text_bias.split_axis = True, 0
        self.image_head = Linear(d, c.num_codes)

    def head(self, h, target_kind):
        """Logits of target slots: image codes [.., num_codes], or text [.., text_vocab_size / mp]."""
        h = self.ln_f(h)
        if target_kind == IMAGE_TGT:
            return self.image_head(h)
        if self.text_head is None:
            if self.mp > 1:
                from paddle.distributed.fleet.layers.mpu import mp_ops
                h = mp_ops._c_identity(h, group=self.mp_group)
            return paddle.matmul(h, self.text_emb.weight, transpose_y=True) + self.text_bias
        return self.text_head(h) + self.text_bias

    def loss(self, logits, labels, target_kind):
        return target_loss(logits, labels, target_kind, self.mp)


def target_loss(logits, labels, target_kind, mp=1):
    """Mean cross-entropy over the labels != -100 (text logits vocabulary-parallel when mp > 1).
    The mean is taken here: paddle's cross_entropy(reduction='mean', ignore_index=-100) divides by all
    labels, ignored ones included (PaddlePaddle/Paddle#48663)."""
    if target_kind == TEXT_TGT and mp > 1:
        from paddle.distributed.fleet.meta_parallel import ParallelCrossEntropy
        per_token = ParallelCrossEntropy(ignore_index=-100)(logits.astype("float32"), labels.unsqueeze(-1))
    else:
        per_token = F.cross_entropy(logits.astype("float32"), labels.unsqueeze(-1), ignore_index=-100,
                                    reduction="none")
    keep = (labels != -100).astype("float32")
    return (per_token.reshape(labels.shape) * keep).sum() / keep.sum().clip(min=1.0)


@MODELS.register("vilg")
class ViLG(nn.Layer, EmbeddingsMixin, HeadsMixin):
    def __init__(self, config: ViLGConfig, mp=1, recompute="none", mp_group=None):
        """mp: the tensor parallel degree (a layout that passes `parallel_layout_errors`); recompute: none |
        full | core_attn; mp_group: the tensor-parallel communication group (mp > 1 with a tied text head)."""
        super().__init__()
        c = self.config = config
        if c.hidden_size % c.num_heads:
            raise ValueError(f"hidden_size {c.hidden_size} is not a multiple of num_heads {c.num_heads}")
        self.boi_id = c.num_codes  # [BOI]: the extra last row of the image table
        self._build_embeddings(c, mp)
        self.blocks = nn.LayerList([Block(c, mp, recompute) for _ in range(c.num_layers)])
        self._build_heads(c, mp, mp_group)
        self.apply(init_layer)
        if c.lora_rank > 0:   # after the initialisation: the adapters keep their own (B = 0)
            add_lora(self.blocks, c.lora_rank, c.lora_alpha, c.lora_dropout, c.lora_targets)
            for name, p in self.named_parameters():   # only the adapters train (Train.trainable adds more)
                p.stop_gradient = not is_lora(name)

    # ---- pieces used by forward and by generation ----------------------------------------------------

    def layer_masks(self, layout, valid, dtype="float32", heads=1):
        """Additive masks [B, heads, S, S] per layer (shared objects for equal patterns): heads 1 broadcasts
        over the attention heads; `hidden` passes them all in CPU training (see there)."""
        base = base_mask(layout, valid)
        cache, out = {}, []
        for i in range(self.config.num_layers):
            pat = layer_pattern(i, self.config.num_layers, self.config.attention)
            if pat not in cache:
                allowed = base & pattern_mask(layout, self.config.grid, pat)[None]
                m = np.where(allowed, 0.0, -1e9).astype(np.float32)[:, None]
                cache[pat] = paddle.to_tensor(np.repeat(m, heads, axis=1) if heads > 1 else m).astype(dtype)
            out.append(cache[pat])
        return out

    # ---- training / scoring ---------------------------------------------------------------------------
    def hidden(self, ids, valid, layout, rows=None):
        """Last-layer hidden states [B, S, D] (before the final LN) of a full sequence; rows: a slice of the slots
        whose states are wanted (default all; [B, len(rows), D]): the last block then runs those slots only
        (every slot stays a key of its attention), which for a caption or an answer after 64 image slots is a
        fraction of that block."""
        kind, pos = layout.arrays()
        x = self.embed(ids, kind, pos)
        # Paddle's CPU add with broadcasting is ~15x slower than a same-shape add (3.9 against 0.23 ms for the
        # demo's scores [32, 4, 88, 88] + [32, 1, 88, 88]): in CPU training the masks come per head, built once
        # per forward (training keeps every layer's scores for backward anyway; inference does not pay the memory)
        per_head = self.training and x.place.is_cpu_place() and self.config.attention_kernel == "matmul"
        heads = self.blocks[0].attn.heads if per_head else 1
        masks = self.layer_masks(layout, np.asarray(valid), x.dtype, heads)
        last = len(self.blocks) - 1
        for i, (block, m) in enumerate(zip(self.blocks, masks)):
            sel = rows if i == last and rows is not None and rows != slice(0, layout.length) else None
            x = block(x, m if sel is None else m[:, :, sel], rows=sel)
        return x

    # ---- inference with a preallocated KV cache (driven by ppvilg.generation) ---------------------------
    def new_cache(self, batch, length, dtype="float32"):
        c = self.config
        shape = [batch, self.blocks[0].attn.heads, length, c.hidden_size // c.num_heads]
        return [(paddle.zeros(shape, dtype), paddle.zeros(shape, dtype)) for _ in range(c.num_layers)]

    def step(self, ids, kind, pos, masks, cache, start):
        """Run slots start .. start+s-1 (ids [B, s], kind/pos [s]) against the cache; masks: per layer
        additive [B, 1 or H, s, S_keys] (rows of `layer_masks` for these slots, over the first S_keys >= start + s
        slots: the keys attended). Returns hidden [B, s, D]."""
        x = self.embed(ids, kind, pos)
        k0 = cache[0][0]   # where these slots lie in every layer's cache, found once per step
        rows = paddle.to_tensor(slot_rows(*k0.shape[:3], start, ids.shape[1]), place=k0.place)
        for block, m, kv in zip(self.blocks, masks, cache):
            x = block(x, m, kv, start, rows)
        return x

    def forward(self, ids, valid, layout, labels=None, return_hidden=False, loss_only=False):
        """ids [B, S] int64, valid [B, S] bool (numpy), layout: Layout.
        Returns (logits of the target segment [B, T, V], mean cross-entropy over labels != -100 or None), plus
        the final-LN'd hidden states of the target segment [B, T, D] with return_hidden (the end-to-end
        reconstructor's input). With loss_only (training) a text target's head runs on the labelled slots only
        and the logits come back as None: a caption or answer fills a fraction of its slots, and the text head
        over the whole vocabulary is the largest matmul of a step. Lists of ids / valid / layouts / labels run
        several sequences (e.g. both directions of a batch) in one call and return a list of such results: a
        data-parallel wrapper then sees one forward per backward."""
        if isinstance(layout, (list, tuple)):
            labels = labels if labels is not None else [None] * len(layout)
            return [self.forward(*args, return_hidden=return_hidden, loss_only=loss_only)
                    for args in zip(ids, valid, layout, labels)]
        x = self.hidden(ids, valid, layout, layout.target_slice())
        if loss_only and labels is not None and layout.kinds[-1] == TEXT_TGT and self.mp == 1:
            where = paddle.nonzero(labels != -100)                       # [N, 2]: (row, slot) of real tokens
            logits = self.head(paddle.gather_nd(x, where), TEXT_TGT)     # [N, V]
            loss = target_loss(logits, paddle.gather_nd(labels, where), TEXT_TGT)
            return (None, loss, self.ln_f(x)) if return_hidden else (None, loss)
        logits = self.head(x, layout.kinds[-1])
        loss = None if labels is None else self.loss(logits, labels, layout.kinds[-1])
        return (logits, loss, self.ln_f(x)) if return_hidden else (logits, loss)
