"""Generation outside the model: prefill + one-slot decode steps over a preallocated KV cache, driven by the
decoding algorithms of ppvilg_deploy.decoding (shared with the exported predictors):

- text->image: sampling with temperature / top-k / top-p, a seed, N candidates per prompt and classifier-free
  guidance (logits = uncond + scale * (cond - uncond), the unconditional text being [SEP] alone, as seen in
  training through Loss.cond_dropout);
- image->text and VQA: greedy, sampling, or beam search with a length penalty, up to a maximum length,
  stopping at [SEP];
- reranking of text->image candidates by the model's own image->text log-likelihood of the prompt, or by a
  user's scorer (`module:function` taking (texts, images) and returning scores, higher is better).

Every decode path also runs without the cache (the whole sequence re-encoded each step) for tests and
benchmarks. Sampling uses numpy's generator seeded per call, so a seed gives the same result everywhere.
"""
import importlib

import numpy as np
import paddle
import paddle.nn.functional as F

from ppvilg.models.layout import IMAGE_TGT, TEXT_TGT, direction_layouts
from ppvilg_deploy.decoding import Decoding, filter_logits, sample_from  # noqa: F401  (re-exported)


class Decoder:
    """Runs one layout: the source is given, the target is produced slot by slot."""

    def __init__(self, model, layout, ids, valid, use_cache=True):
        self.m, self.layout, self.use_cache = model, layout, use_cache
        self.ids, self.valid = ids.copy(), valid.copy()
        self.kind, self.pos = layout.arrays()
        self.t0 = layout.target_slice().start
        self.target_kind = layout.kinds[-1]
        self.masks = model.layer_masks(layout, valid)
        self.cache = model.new_cache(ids.shape[0], layout.length) if use_cache else None

    @paddle.no_grad()
    def logits_at(self, slot):
        """Logits predicting the token after `slot` (slots up to `slot` must be filled)."""
        m = self.m
        if not self.use_cache:
            h = m.hidden(paddle.to_tensor(self.ids), self.valid, self.layout)[:, slot:slot + 1]
        else:
            start = 0 if slot == self.t0 else slot
            sl = slice(start, slot + 1)
            h = m.step(paddle.to_tensor(self.ids[:, sl]), self.kind[sl], self.pos[sl],
                       [mk[:, :, sl] for mk in self.masks], self.cache, start)[:, -1:]
        return m.head(h, self.target_kind)[:, 0].astype("float32").numpy()

    def reorder(self, index):
        """Keep rows `index` (beam search)."""
        self.ids, self.valid = self.ids[index], self.valid[index]
        idx = paddle.to_tensor(index)
        self.masks = [paddle.gather(mk, idx) for mk in self.masks]
        if self.cache is not None:
            self.cache = [(paddle.gather(k, idx), paddle.gather(v, idx)) for k, v in self.cache]


class Generator(Decoding):
    """The decoding algorithms (ppvilg_deploy.decoding.Decoding) over the dynamic-graph model."""

    def __init__(self, model, tokenizer):
        self.m, self.tok = model, tokenizer
        self.c = model.config
        self.text_len, self.grid, self.boi_id = self.c.max_text_len, self.c.grid, model.boi_id
        self.layouts = direction_layouts(self.c.max_text_len, self.c.grid)
        self.t2i_layout, self.i2t_layout = self.layouts["t2i"], self.layouts["i2t"]

    def make_decoder(self, direction, ids, valid, use_cache=True):
        self.m.eval()
        return Decoder(self.m, self.layouts[direction], ids, valid, use_cache)

    def text_to_image(self, texts, num_candidates=1, temperature=1.0, top_k=0, top_p=1.0, cfg_scale=1.0,
                      seed=0, use_cache=True, truncate=False):
        """-> int64 codes [len(texts), num_candidates, grid, grid] (see Decoding.sample_codes)."""
        return self.sample_codes(texts, num_candidates, temperature, top_k, top_p, cfg_scale, seed, truncate,
                                 use_cache=use_cache)

    def image_to_text(self, codes, method="greedy", max_len=None, beam_size=4, length_penalty=1.0,
                      temperature=1.0, top_k=0, top_p=1.0, seed=0, question=None, use_cache=True):
        """codes [B, grid, grid] -> list of dicts(text, ids, score) (see Decoding.decode_text)."""
        return self.decode_text(codes, method, max_len, beam_size, length_penalty, temperature, top_k, top_p,
                                seed, question, use_cache=use_cache)

    # ---- scoring and reranking --------------------------------------------------------------------------
    @paddle.no_grad()
    def caption_logprob(self, codes, texts):
        """Sum of log p(text | image) for each (codes[i], texts[i]) pair, [SEP] included."""
        self.m.eval()
        codes = np.asarray(codes).reshape([len(texts), -1]).astype(np.int64)
        src, valid_t = self.text_source(texts, truncate=True)
        lens = valid_t.sum(1)
        L = self.c.max_text_len
        inp = np.concatenate([np.full([len(texts), 1], self.tok.bos_id), src[:, :-1]], 1)
        ids = np.concatenate([codes, inp], 1)
        valid = np.concatenate([np.ones(codes.shape, bool), np.arange(L)[None] < lens[:, None]], 1)
        logits, _ = self.m(paddle.to_tensor(ids), valid, self.i2t_layout)
        logp = F.log_softmax(logits[..., :self.tok.vocab_size].astype("float32"), -1).numpy()
        tok_lp = np.take_along_axis(logp, src[:, :, None], -1)[:, :, 0]
        return (tok_lp * (np.arange(L)[None] < lens[:, None])).sum(1)

    def rerank(self, texts, candidates, scorer=None, images=None):
        """candidates [len(texts), N, grid, grid] -> (order [len(texts), N] best first, scores [len(texts), N]).
        By default the score is the model's own log p(prompt | candidate image); `scorer` ('module:function'
        or a callable taking (texts, images) and returning scores, higher better) replaces it."""
        t, n = candidates.shape[:2]
        flat_texts = [x for x in texts for _ in range(n)]
        if scorer is None:
            scores = self.caption_logprob(candidates.reshape([t * n, -1]), flat_texts)
        else:
            fn = load_scorer(scorer)
            if images is None:
                raise ValueError("an external scorer needs the decoded candidate images")
            scores = np.asarray(fn(flat_texts, [im for row in images for im in row]), np.float64)
        scores = scores.reshape([t, n])
        return np.argsort(-scores, axis=1), scores


def load_scorer(spec):
    if callable(spec):
        return spec
    if not isinstance(spec, str) or ":" not in spec:
        raise ValueError(f"a scorer is 'module:function', got {spec!r}")
    mod, fn = spec.split(":", 1)
    try:
        return getattr(importlib.import_module(mod), fn)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"cannot load the scorer {spec!r}: {e}") from None


__all__ = ["Generator", "Decoder", "filter_logits", "sample_from", "load_scorer", "IMAGE_TGT", "TEXT_TGT"]
