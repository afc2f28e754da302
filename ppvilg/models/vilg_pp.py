"""ViLG under pipeline parallel: the same embedding, Block and head code (ppvilg/models/vilg.py) as the stages
of a PipelineLayer, and the one place that maps pipeline items and stages to ViLG's parameter names.

The items of the pipeline are [embedding, block 0 .. block L-1, heads]; `pipeline_bounds` cuts them into pp
stages. A PipelineLayer names its parameters '<item>.<name inside the item>' ('3.attn.q.weight'); checkpoints
always use ViLG's names ('blocks.2.attn.q.weight'), so weights of every layout merge and split by name
(`to_model_names` / `to_pipeline_names` for a stage's state, `stage_of` for the file a weight belongs to).

A pipeline step trains both directions of each pair at once. Stage inputs: ids [b, 2, S] (row 0 the
text->image sequence, row 1 the image->text one; both have S = max_text_len + grid^2 slots) and valid
[b, 2, S] (float, 1 = real slot); between stages flow (x [b, 2, S, D], key padding [b, 2, S] additive); the
last stage returns (image logits of row 0's target, text logits of row 1's target) and the loss is
t2i_weight * CE(image) + i2t_weight * CE(text), the same as ViLGTask's two forward passes.
"""
import re

import numpy as np
import paddle
import paddle.nn as nn

from ppvilg.models.layout import IMAGE_TGT, TEXT_TGT, direction_layouts, layer_pattern, static_mask
from ppvilg.models.vilg import Block, EmbeddingsMixin, HeadsMixin, init_layer, target_loss

# ViLG parameters that live in the last item (the heads); everything not in a block or here is the embedding
HEAD_NAMES = ("ln_f.", "text_head.", "text_bias", "image_head.")


def pipeline_bounds(num_layers, pp):
    """Stage boundaries over the items [embedding, block 0 .. block L-1, heads]: blocks spread evenly
    (earlier stages take the remainder), the embedding with the first stage, the heads with the last."""
    if num_layers < pp:
        raise ValueError(f"pipeline degree {pp} exceeds Model.num_layers {num_layers}")
    per, extra = divmod(num_layers, pp)
    bounds, b = [0], 1
    for s in range(pp):
        b += per + (1 if s < extra else 0)
        bounds.append(b)
    bounds[-1] = num_layers + 2
    return bounds


# ---- names ----------------------------------------------------------------------------------------------------

def item_of(name, num_layers):
    """Index of the pipeline item [embedding, blocks..., heads] holding ViLG parameter `name`."""
    m = re.match(r"blocks\.(\d+)\.", name)
    if m:
        return int(m.group(1)) + 1
    return num_layers + 1 if name.startswith(HEAD_NAMES) else 0


def stage_of(name, num_layers, pp):
    """The pipeline stage holding ViLG parameter `name`."""
    bounds = pipeline_bounds(num_layers, pp)
    item = item_of(name, num_layers)
    return next(s for s in range(pp) if bounds[s] <= item < bounds[s + 1])


def _prefixes(num_layers):
    """PipelineLayer item index -> prefix of ViLG parameter names ('' for the embedding and the heads)."""
    return {0: "", **{i + 1: f"blocks.{i}." for i in range(num_layers)}, num_layers + 1: ""}


def _model_name(pipe_name, prefixes):
    item, rest = pipe_name.split(".", 1)
    return prefixes[int(item)] + rest


def to_model_names(state, num_layers):
    """A stage's state keyed by the PipelineLayer ('3.attn.q.weight') -> keyed by ViLG ('blocks.2.attn.q.weight')."""
    prefixes = _prefixes(num_layers)
    return {_model_name(k, prefixes): v for k, v in state.items()}


def to_pipeline_names(state, stage_names, num_layers):
    """The inverse of to_model_names for one stage, whose own PipelineLayer names are `stage_names`; a weight
    of another stage is an error (KeyError naming it)."""
    prefixes = _prefixes(num_layers)
    own = {_model_name(k, prefixes): k for k in stage_names}
    unknown = sorted(set(state) - set(own))
    if unknown:
        raise KeyError(f"weights {unknown[:5]} do not belong to this pipeline stage")
    return {own[k]: v for k, v in state.items()}


# ---- stages -----------------------------------------------------------------------------------------------------

def _layouts(c):
    lays = direction_layouts(c.max_text_len, c.grid)
    return lays["t2i"], lays["i2t"]


class PipeEmbed(nn.Layer, EmbeddingsMixin):
    def __init__(self, config, mp=1):
        super().__init__()
        self.config = config
        self._build_embeddings(config, mp)
        self.arrays = [lay.arrays() for lay in _layouts(config)]

    def forward(self, inputs):
        ids, valid = inputs
        x = paddle.stack([self.embed(ids[:, r], *self.arrays[r]) for r in range(2)], 1)
        return x, (1.0 - valid.astype("float32")) * -1e9


class PipeBlock(Block):
    def __init__(self, config, index, mp=1, recompute="none"):
        super().__init__(config, mp, recompute)
        pattern = layer_pattern(index, config.num_layers, config.attention)
        # the masks of ViLG.layer_masks without the key padding, which comes per batch
        static = np.stack([static_mask(lay, config.grid, pattern) for lay in _layouts(config)])
        self.register_buffer("static_mask", paddle.to_tensor(static), persistable=False)

    def forward(self, inputs):
        x, pad = inputs
        b, _, s, d = x.shape
        mask = (self.static_mask.unsqueeze(0).unsqueeze(2) + pad.unsqueeze(2).unsqueeze(3)).reshape([2 * b, 1, s, s])
        y = super().forward(x.reshape([2 * b, s, d]), mask.astype(x.dtype))
        return y.reshape([b, 2, s, d]), pad


class PipeHeads(nn.Layer, HeadsMixin):
    def __init__(self, config, mp=1, mp_group=None):
        super().__init__()
        self.config = config
        self._build_heads(config, mp, mp_group)

    def forward(self, inputs):
        x, _ = inputs
        c = self.config
        return self.head(x[:, 0, c.max_text_len:], IMAGE_TGT), self.head(x[:, 1, c.grid * c.grid:], TEXT_TGT)


class PipeLoss(nn.Layer):
    def __init__(self, mp=1, t2i_weight=1.0, i2t_weight=1.0):
        super().__init__()
        self.mp, self.w = mp, (t2i_weight, i2t_weight)

    def forward(self, outputs, labels):
        (img, txt), (lab_img, lab_txt) = outputs, labels
        return (self.w[0] * target_loss(img, lab_img, IMAGE_TGT, self.mp)
                + self.w[1] * target_loss(txt, lab_txt, TEXT_TGT, self.mp))


def build_pipeline(config, parallel, t2i_weight=1.0, i2t_weight=1.0):
    """The ViLG model as a PipelineLayer over `parallel`'s topology (a ParallelState with pp > 1, Fleet
    initialised; the layout checked by ppvilg.models.vilg.parallel_layout_errors)."""
    from paddle.distributed.fleet.meta_parallel import LayerDesc, PipelineLayer
    c, mp = config, parallel.mp
    descs = ([LayerDesc(PipeEmbed, c, mp)]
             + [LayerDesc(PipeBlock, c, i, mp, parallel.recompute) for i in range(c.num_layers)]
             + [LayerDesc(PipeHeads, c, mp, parallel.mp_group)])
    layer = PipelineLayer(layers=descs, num_stages=parallel.pp, topology=parallel.hcg.topology(),
                          loss_fn=PipeLoss(mp, t2i_weight, i2t_weight),
                          seg_method=pipeline_bounds(c.num_layers, parallel.pp))
    for m in layer.sublayers():
        init_layer(m)
    return layer
