"""Generation outside the model: prefill + one-slot decode steps over a preallocated KV cache, driven by the
decoding algorithms of ppvilg_deploy.decoding (shared with the exported predictors):

- text->image: sampling with temperature / top-k / top-p, a seed, N candidates per prompt and classifier-free
  guidance (logits = uncond + scale * (cond - uncond), the unconditional text being [SEP] alone, as seen in
  training through Loss.cond_dropout);
- image->text and VQA: greedy, sampling, or beam search with a length penalty, up to a maximum length,
  stopping at [SEP];
- reranking of text->image candidates by the model's own teacher-forced image->text probabilities of the
  prompt's tokens (summed as log-likelihood or as probabilities: SamplerSettings.rerank_score), or by a
  user's scorer (`module:function` taking (texts, images) and returning scores, higher is better).

Every decode path also runs without the cache (the whole sequence re-encoded each step) for tests and
benchmarks. Sampling uses numpy's generator seeded per call, so a seed gives the same result everywhere.
Sequences are assembled by ppvilg_deploy.sequences.SequenceBuilder and the options are one
ppvilg_deploy.decoding.SamplerSettings, as in the exported predictors.
"""
import importlib

import numpy as np
import paddle
import paddle.nn.functional as F

from ppvilg.models.layout import IMAGE_TGT, TEXT_TGT, direction_layouts
from ppvilg_deploy.decoding import (Decoding, SamplerSettings, filter_logits, rank_candidates,  # noqa: F401
                                    rerank_scores, sample_from)
from ppvilg_deploy.sequences import SequenceBuilder


class DygraphDecoder:
    """Runs one layout: the source is given, the target is produced slot by slot."""

    def __init__(self, model, layout, ids, valid, use_cache=True):
        self.m, self.layout, self.use_cache = model, layout, use_cache
        self.ids, self.valid = ids.copy(), valid.copy()
        self.kind, self.pos = layout.arrays()
        self.t0 = layout.target_slice().start
        self.target_kind = layout.kinds[-1]
        self.masks = model.layer_masks(layout, valid)
        self.cache = model.new_cache(ids.shape[0], layout.length) if use_cache else None

    def logits_at(self, slot):
        """Logits predicting the token after `slot` (slots up to `slot` must be filled)."""
        return self.logits_span(slot, slot)[:, 0]

    @paddle.no_grad()
    def logits_span(self, first, last):
        """Logits [B, last - first + 1, V] predicting the token after each of the slots first .. last, in one
        forward (slots up to `last` must be filled; with the cache, slots before `first` must have been run
        with the tokens they hold now). The cache holds these slots' keys and values afterwards; whatever it
        held beyond `last` is never attended (causal mask) and is overwritten when those slots run again, so
        rejecting drafts needs no copy (speculative Jacobi decoding)."""
        m = self.m
        if not self.use_cache:
            h = m.hidden(paddle.to_tensor(self.ids), self.valid, self.layout)[:, first:last + 1]
        else:
            start = 0 if first == self.t0 else first   # the prefill runs the source too
            sl = slice(start, last + 1)
            # attention over the whole cache buffer, the causal mask hiding the slots not filled yet: a key slice
            # [:last + 1] of the cache is a strided view that every attention matmul would first copy (~12 ms
            # against ~2 ms for the product over the full buffer at 1024 rows of the demo model)
            h = m.step(paddle.to_tensor(self.ids[:, sl]), self.kind[sl], self.pos[sl], self.step_masks(sl),
                       self.cache, start)[:, first - start:]
        return m.head(h, self.target_kind).astype("float32").numpy()

    def step_masks(self, sl):
        """The layers' masks for query slots `sl`, one copy per attention head [B, H, s, S], made once per
        step for the layers that share a pattern: Paddle's CPU add that broadcasts [B, 1, s, S] over the heads
        costs ~4x a same-shape add (6.3 against 1.4 ms at 2048 rows), once per layer."""
        heads, made = self.m.blocks[0].attn.heads, {}
        out = []
        for mk in self.masks:
            if id(mk) not in made:
                part = mk[:, :, sl]
                made[id(mk)] = paddle.expand(part, [part.shape[0], heads, part.shape[2], part.shape[3]])
            out.append(made[id(mk)])
        return out

    def reorder(self, index):
        """Keep rows `index` (beam search)."""
        self.ids, self.valid = self.ids[index], self.valid[index]
        idx = paddle.to_tensor(index)
        self.masks = [paddle.gather(mk, idx) for mk in self.masks]
        if self.cache is not None:
            self.cache = [(paddle.gather(k, idx), paddle.gather(v, idx)) for k, v in self.cache]


class Generator(Decoding):
    """The decoding algorithms (ppvilg_deploy.decoding.Decoding) over the dynamic-graph model.
    sampler: the default SamplerSettings of this generator (default: SamplerSettings())."""

    def __init__(self, model, tokenizer, sampler=None):
        self.m = model
        c = model.config
        self.seq = SequenceBuilder(tokenizer, c.max_text_len, c.grid, model.boi_id)
        self.sampler = sampler or SamplerSettings()
        self.layouts = direction_layouts(c.max_text_len, c.grid)

    def make_decoder(self, direction, ids, valid, use_cache=True):
        self.m.eval()
        return DygraphDecoder(self.m, self.layouts[direction], ids, valid, use_cache)

    def settings(self, sampler=None, **changes):
        """`sampler` (default: this generator's) with `changes` (SamplerSettings fields; None: unchanged)."""
        return (sampler or self.sampler).replace(**changes)

    def text_to_image(self, texts, sampler=None, truncate=False, use_cache=True, **changes):
        """-> int64 codes [len(texts), candidates, grid, grid] (see Decoding.sample_codes)."""
        return self.sample_codes(texts, self.settings(sampler, **changes), truncate, use_cache=use_cache)

    def image_to_text(self, codes, sampler=None, question=None, use_cache=True, **changes):
        """codes [B, grid, grid] -> list of dicts(text, ids, score, logprob) (see Decoding.decode_text)."""
        return self.decode_text(codes, self.settings(sampler, **changes), question, use_cache=use_cache)

    # ---- scoring and reranking --------------------------------------------------------------------------
    @paddle.no_grad()
    def caption_token_logprobs(self, codes, texts):
        """log p(token | image, earlier tokens) of each text's tokens, teacher-forced, for each (codes[i],
        texts[i]) pair -> (numpy [B, L], 0 on padding; weights [B, L] float32, 1 on the real tokens, [SEP]
        included)."""
        self.m.eval()
        text, valid_t = self.seq.text(texts, truncate=True)
        ids, valid, _ = self.seq.image_to_text(codes, text=(text, valid_t))
        logits, _ = self.m(paddle.to_tensor(ids), valid, self.layouts["i2t"])
        # -log p(token) by the fused softmax-with-cross-entropy kernel: Paddle's CPU log_softmax over a text
        # vocabulary is ~200x slower (80 s against 0.4 s for 256 x 24 x 12295 logits on 2 cores)
        nll = F.cross_entropy(logits[..., :self.seq.tok.vocab_size].astype("float32"),
                              paddle.to_tensor(text).unsqueeze(-1), reduction="none")
        weights = valid_t.astype(np.float32)
        return -nll[..., 0].numpy() * weights, weights

    def caption_logprob(self, codes, texts):
        """Sum of log p(text | image) for each (codes[i], texts[i]) pair, [SEP] included."""
        return rerank_scores(*self.caption_token_logprobs(codes, texts), "logprob")

    def rerank(self, texts, candidates, scorer=None, images=None, how="logprob"):
        """candidates [len(texts), N, grid, grid] -> (order [len(texts), N] best first, scores [len(texts), N]).
        By default the score comes from the model's own p(prompt token | candidate image, earlier tokens),
        summed as `how` says (SamplerSettings.rerank_score: log-likelihood or token probabilities); `scorer`
        ('module:function' or a callable taking (texts, images) and returning scores, higher better) replaces it."""
        t, n = candidates.shape[:2]
        flat_texts = [x for x in texts for _ in range(n)]
        if scorer is None:
            token_lp, weights = self.caption_token_logprobs(candidates.reshape([t * n, -1]), flat_texts)
            return rank_candidates(token_lp, weights, t, how)
        fn = load_scorer(scorer)
        if images is None:
            raise ValueError("an external scorer needs the decoded candidate images")
        scores = np.asarray(fn(flat_texts, [im for row in images for im in row]), np.float64).reshape([t, n])
        return np.argsort(-scores, axis=1, kind="stable"), scores


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


__all__ = ["Generator", "DygraphDecoder", "SamplerSettings", "filter_logits", "sample_from", "load_scorer",
           "IMAGE_TGT", "TEXT_TGT"]
