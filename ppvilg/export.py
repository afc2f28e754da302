"""Export a stage-2 checkpoint (and its stage-1 tokenizer) as static-graph programs for Paddle Inference.

The folder holds everything deploy/python needs and nothing else:

    vq_encoder/model.json|.pdiparams   image [B, 3, H, W] in [-1, 1] -> codes [B, h, w] int64
    vq_decoder/...                     codes [B, h, w] -> image [B, 3, H, W] in [-1, 1]
    step_image/...                     one cached step of the transformer, image head (text->image)
    step_text/...                      the same step, text head (image->text, VQA)
    sample_image/...                   step_image and the sampler in one program: returns the sampled codes
    score_text/...                     log p(token | image) of whole image->text sequences (reranking)
    reconstruct/...                    end-to-end checkpoints only: the generator's hidden states of whole
                                       text->image sequences through the end-to-end reconstructor -> images
    masks.npz                          additive attention masks [patterns, S, S] per direction (no padding)
    vocab.txt                          the text vocabulary
    inference.yml                      sizes, special ids, layer -> mask pattern, sampler defaults, files

A step program takes ids [B, s], kind [s], pos [s] (slot kinds / positions), masks_cache [P, B, H, s, S] (this
step's rows of each mask pattern over the cache, slots not filled before the step hidden, key padding added;
repeated for each head: Paddle's CPU add broadcasting over the heads costs ~20x a same-shape add),
masks_new [P, B, H, s, s] (the same rows over the step's own slots) and the KV cache as cache_k_0, cache_v_0, ...
[B, H, S, Dh] per layer, read only; it returns logits and the keys and values of the step's slots,
new_k_0, new_v_0, ... [B, H, s, Dh], which the runtime writes into its cache in place (ppvilg_deploy/predictor.py):
no program copies the cache. step_image returns the logits of every slot of the step [B, s, V] (speculative
Jacobi decoding verifies a window of drafts in one step), step_text those of its last slot [B, V] (a text
prefill runs ~n image slots, whose vocabulary-wide logits nobody reads). The prefill runs the source and the
first target slot as one step over an empty cache. The same ViLG code runs (Block.step_split).

The whole-sequence programs (score_text, reconstruct) take ids [B, S], kind [S], pos [S] and masks [P, B, 1, S, S]
(each pattern's mask with key padding added) and run ViLG's uncached blocks.
"""
import os
import shutil

import numpy as np
import paddle
import yaml

from ppvilg.models.layout import IMAGE_TGT, TEXT_TGT, direction_layouts, layer_pattern, static_mask
from ppvilg.utils.io import AtomicDir, atomic_write_text
from ppvilg_deploy.decoding import SamplerSettings
from ppvilg_deploy.predictor import FORMAT


class StepProgram(paddle.nn.Layer):
    def __init__(self, model, target_kind):
        super().__init__()
        self.m, self.target_kind = model, target_kind
        self.pattern_index = layer_pattern_index(model.config)

    def forward(self, ids, kind, pos, masks_cache, masks_new, cache):
        """cache: [k_0, v_0, k_1, v_1, ...] (one pair per layer: no stacking or slicing copies per step)."""
        x = self.m.embed(ids, kind, pos)
        new = []
        for i, block in enumerate(self.m.blocks):
            p = self.pattern_index[i]
            x, k, v = block.step_split(x, masks_cache[p], masks_new[p], cache[2 * i], cache[2 * i + 1])
            new += [k, v]
        if self.target_kind == IMAGE_TGT:
            logits = self.m.head(x, self.target_kind)
        else:
            logits = self.m.head(x[:, -1:], self.target_kind)[:, 0]
        return [logits if logits.dtype == paddle.float32 else logits.astype("float32")] + new


def sample_in_graph(logits, uniform, temperature, top_k, top_p, cfg_scale):
    """The text->image sampler inside a program: ppvilg_deploy.decoding's guidance mix, filter_logits and
    sample_from, step for step in the same precision (the mix in float32, the rest in float64), so that the
    uniform numbers the host draws give the codes the numpy path gives. logits [R, V] float32 (R = b, or 2b with
    guidance: the conditional rows first); uniform [b, 1] float64; temperature [1] float64 (> 0); top_k [1]
    int64 in 1 .. V (V: off); top_p [1] float64 (>= 1: off); cfg_scale [1] float32 (1: off) -> codes [b]."""
    b = paddle.shape(uniform)[0]
    rows = paddle.shape(logits)[0]
    cond, uncond = logits[:b], logits[rows - b:]          # without guidance both are the b rows
    x = (uncond + cfg_scale * (cond - uncond)).astype("float64") / temperature
    kth = paddle.topk(x, k=top_k)[0][:, -1:]
    x = paddle.where(x < kth, paddle.full_like(x, float("-inf")), x)
    x = x - x.max(-1, keepdim=True)
    logp = x - paddle.log(paddle.exp(x).sum(-1, keepdim=True))
    order = paddle.argsort(-logp, axis=-1)
    sorted_p = paddle.exp(paddle.take_along_axis(logp, order, -1))
    keep_sorted = (paddle.cumsum(sorted_p, -1) - sorted_p < top_p).astype("float64")
    keep = paddle.put_along_axis(paddle.zeros_like(keep_sorted), order, keep_sorted, -1) > 0
    nucleus = paddle.where(keep, logp, paddle.full_like(logp, float("-inf")))
    nucleus = nucleus - paddle.log(paddle.exp(nucleus).sum(-1, keepdim=True))
    logp = paddle.where(top_p < 1.0, nucleus, logp)
    p = paddle.exp(logp)
    below = (paddle.cumsum(p, -1) < uniform * p.sum(-1, keepdim=True)).astype("int64").sum(-1)
    return paddle.minimum(below, paddle.full_like(below, paddle.shape(p)[1] - 1))


class SampleStepProgram(StepProgram):
    """step_image followed by the sampler (sample_in_graph): returns the sampled codes [b] instead of logits,
    so a decode step hands the host b integers, not b x V floats."""

    def __init__(self, model):
        super().__init__(model, IMAGE_TGT)

    def forward(self, ids, kind, pos, masks_cache, masks_new, uniform, temperature, top_k, top_p, cfg_scale, cache):
        logits, *new = super().forward(ids, kind, pos, masks_cache, masks_new, cache)
        return [sample_in_graph(logits[:, -1], uniform, temperature, top_k, top_p, cfg_scale)] + new


class _WholeSequence(paddle.nn.Layer):
    """The hidden states of the last `target_len` slots of whole sequences (uncached blocks, before the
    final LN)."""

    def __init__(self, model, target_len):
        super().__init__()
        self.m, self.target_len = model, target_len
        self.pattern_index = layer_pattern_index(model.config)

    def target_hidden(self, ids, kind, pos, masks):
        x = self.m.embed(ids, kind, pos)
        for i, block in enumerate(self.m.blocks):
            x = block(x, masks[self.pattern_index[i]])
        return x[:, -self.target_len:]


class ScoreTextProgram(_WholeSequence):
    """log p(token | image, earlier tokens) of the target text's tokens, times their weights (0 on padding):
    what ppvilg.generation.Generator.caption_token_logprobs computes, for reranking text->image candidates in
    deploy (ppvilg_deploy.decoding.rank_candidates sums them as the sampler's rerank_score says)."""

    def __init__(self, model, vocab_size):
        super().__init__(model, model.config.max_text_len)
        self.vocab_size = vocab_size

    def forward(self, ids, kind, pos, masks, labels, weights):
        """labels [B, L] int64 (the target text), weights [B, L] float32 (1 on its real tokens) -> [B, L]."""
        logits = self.m.head(self.target_hidden(ids, kind, pos, masks), TEXT_TGT)[..., :self.vocab_size]
        nll = paddle.nn.functional.cross_entropy(logits.astype("float32"), labels.unsqueeze(-1), reduction="none")
        return -nll[..., 0] * weights


class ReconstructProgram(_WholeSequence):
    """End-to-end checkpoints: images [B, 3, H, W] in [-1, 1] from the final-LN'd hidden states at the image
    slots of whole (prompt, codes) sequences through the end-to-end reconstructor (ViLGInference.reconstruct_e2e)."""

    def __init__(self, model, reconstructor):
        super().__init__(model, model.config.grid ** 2)
        self.rec = reconstructor

    def forward(self, ids, kind, pos, masks):
        h = self.m.ln_f(self.target_hidden(ids, kind, pos, masks))
        return self.rec(h, self.m.config.grid)


class _Method(paddle.nn.Layer):
    """One method of a layer as a program (the VQ model's encode / decode_codes)."""

    def __init__(self, layer, method):
        super().__init__()
        self.layer, self.method = layer, method

    def forward(self, x):
        return getattr(self.layer, self.method)(x)


def pattern_names(c):
    names = []
    for i in range(c.num_layers):
        p = layer_pattern(i, c.num_layers, c.attention)
        if p not in names:
            names.append(p)
    return names


def layer_pattern_index(c):
    """Each layer's mask pattern as an index into pattern_names(c) (the first axis of the exported masks)."""
    names = pattern_names(c)
    return [names.index(layer_pattern(i, c.num_layers, c.attention)) for i in range(c.num_layers)]


def static_masks(c):
    """{direction: additive float32 [P, S, S]} of the UniLM mask and each sparse pattern, before key padding."""
    out = {}
    for name, lay in direction_layouts(c.max_text_len, c.grid).items():
        out[name] = np.stack([static_mask(lay, c.grid, p) for p in pattern_names(c)])
    return out


def _save(layer, specs, path):
    layer.eval()
    static = paddle.jit.to_static(layer, input_spec=specs, full_graph=True)
    paddle.jit.save(static, path)


def export(vilg, cfg, out):
    """Write the export folder for a loaded ppvilg.inference.ViLGInference; cfg: the export's config (-c, with
    -o overrides), whose Eval section gives the exported sampler defaults."""
    model, vq, tok = vilg.model, vilg.image_tokenizer, vilg.text_tokenizer
    c = model.config
    heads, head_dim = model.blocks[0].attn.heads, c.hidden_size // c.num_heads
    size = vilg.image_size
    spec = paddle.static.InputSpec
    npat = len(pattern_names(c))
    step_specs = [spec([None, None], "int64", "ids"), spec([None], "int64", "kind"), spec([None], "int64", "pos"),
                  spec([npat, None, heads, None, None], "float32", "masks_cache"),
                  spec([npat, None, heads, None, None], "float32", "masks_new")]
    step_specs.append([spec([None, heads, None, head_dim], "float32", f"cache_{kv}_{i}")
                       for i in range(c.num_layers) for kv in ("k", "v")])
    with AtomicDir(out) as tmp:
        _save(_Method(vq, "encode"), [spec([None, 3, size, size], "float32", "image")], os.path.join(tmp, "vq_encoder", "model"))
        _save(_Method(vq, "decode_codes"), [spec([None, c.grid, c.grid], "int64", "codes")], os.path.join(tmp, "vq_decoder", "model"))
        _save(StepProgram(model, IMAGE_TGT), step_specs, os.path.join(tmp, "step_image", "model"))
        _save(StepProgram(model, TEXT_TGT), step_specs, os.path.join(tmp, "step_text", "model"))
        sample_specs = step_specs[:5] + [spec([None, 1], "float64", "uniform"), spec([1], "float64", "temperature"),
                                         spec([1], "int64", "top_k"), spec([1], "float64", "top_p"),
                                         spec([1], "float32", "cfg_scale"), step_specs[5]]
        _save(SampleStepProgram(model), sample_specs, os.path.join(tmp, "sample_image", "model"))
        whole = step_specs[:3] + [spec([npat, None, 1, None, None], "float32", "masks")]
        _save(ScoreTextProgram(model, tok.vocab_size),
              whole + [spec([None, c.max_text_len], "int64", "labels"),
                       spec([None, c.max_text_len], "float32", "weights")], os.path.join(tmp, "score_text", "model"))
        programs = ["vq_encoder", "vq_decoder", "step_image", "step_text", "sample_image", "score_text"]
        if vilg.e2e is not None:
            _save(ReconstructProgram(model, vilg.e2e), whole, os.path.join(tmp, "reconstruct", "model"))
            programs.append("reconstruct")
        np.savez(os.path.join(tmp, "masks.npz"), **static_masks(c))
        shutil.copy(tok.vocab_file, os.path.join(tmp, "vocab.txt"))
        ev = cfg.Eval
        lays = direction_layouts(c.max_text_len, c.grid)
        info = {
            "format": FORMAT,
            "model": {"text_len": c.max_text_len, "grid": c.grid, "num_codes": c.num_codes,
                      "text_vocab_size": c.text_vocab_size, "num_layers": c.num_layers, "num_heads": heads,
                      "head_dim": head_dim, "boi_id": model.boi_id,
                      "layer_pattern": layer_pattern_index(c)},
            "layouts": {k: {"kinds": list(map(int, v.kinds)), "lengths": list(map(int, v.lengths))}
                        for k, v in lays.items()},
            "tokenizer": {"vocab_file": "vocab.txt", "pad_id": tok.pad_id, "bos_id": tok.bos_id,
                          "eos_id": tok.eos_id, "vocab_size": tok.vocab_size},
            "image": {"size": size, "preprocess": "resize short side (area / cubic) + center crop, RGB, x/127.5-1"},
            "sampler": SamplerSettings.from_mapping(ev).to_dict(),
            "programs": {k: f"{k}/model" for k in programs},
            # how generated codes become pixels: the VQ decoder, or (a checkpoint trained end to end) one
            # whole-sequence forward + the end-to-end reconstructor (the `reconstruct` program)
            "reconstructor": vilg.reconstructor,
            "source": {"checkpoint": os.path.abspath(vilg.folder or ""), "paddle_version": paddle.__version__},
        }
        atomic_write_text(os.path.join(tmp, "inference.yml"),
                          yaml.safe_dump(info, allow_unicode=True, sort_keys=False))
    return out
