"""Generation outside the model: prefill + one-slot decode steps over a preallocated KV cache.

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

from ppvilg.models.layout import IMAGE_TGT, TEXT_TGT, image_to_text, text_to_image, vqa


def filter_logits(logits, temperature=1.0, top_k=0, top_p=1.0):
    """numpy [B, V] -> log-probabilities after temperature, top-k and nucleus filtering (-inf outside)."""
    x = logits.astype(np.float64) / max(temperature, 1e-6)
    if top_k and top_k < x.shape[-1]:
        kth = np.partition(x, -top_k, axis=-1)[:, -top_k][:, None]
        x = np.where(x < kth, -np.inf, x)
    x = x - x.max(-1, keepdims=True)
    logp = x - np.log(np.exp(x).sum(-1, keepdims=True))
    if top_p < 1.0:
        order = np.argsort(-logp, axis=-1)
        sorted_p = np.exp(np.take_along_axis(logp, order, -1))
        keep_sorted = np.cumsum(sorted_p, -1) - sorted_p < top_p  # always keeps the most likely token
        keep = np.zeros_like(keep_sorted)
        np.put_along_axis(keep, order, keep_sorted, -1)
        logp = np.where(keep, logp, -np.inf)
        logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
    return logp


def sample_from(logp, rng):
    p = np.exp(logp)
    u = rng.random((p.shape[0], 1))
    return np.minimum((np.cumsum(p, -1) < u * p.sum(-1, keepdims=True)).sum(-1), p.shape[-1] - 1)


class Decoder:
    """Runs one layout: the source is given, the target is produced slot by slot."""

    def __init__(self, model, layout, ids, valid, use_cache=True, text_vocab=None):
        """text_vocab: the tokenizer's size; text logits beyond it (padding rows of Model.text_vocab_size,
        e.g. for tensor parallel) are never produced."""
        self.m, self.layout, self.use_cache, self.text_vocab = model, layout, use_cache, text_vocab
        self.ids, self.valid = ids.copy(), valid.copy()
        self.kind, self.pos = layout.arrays()
        self.t0 = layout.target_slice().start
        self.target_kind = layout.kinds[-1]
        self.masks = model.layer_masks(layout, valid)
        self.cache = model.new_cache(ids.shape[0], layout.length) if use_cache else None

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
        logits = m.head(h, self.target_kind)[:, 0].astype("float32").numpy()
        if self.target_kind == TEXT_TGT and self.text_vocab is not None:
            logits[:, self.text_vocab:] = -np.inf
        return logits

    def reorder(self, index):
        """Keep rows `index` (beam search)."""
        self.ids, self.valid = self.ids[index], self.valid[index]
        idx = paddle.to_tensor(index)
        self.masks = [paddle.gather(mk, idx) for mk in self.masks]
        if self.cache is not None:
            self.cache = [(paddle.gather(k, idx), paddle.gather(v, idx)) for k, v in self.cache]


class Generator:
    def __init__(self, model, tokenizer):
        self.m, self.tok = model, tokenizer
        self.c = model.config
        self.t2i_layout = text_to_image(self.c.max_text_len, self.c.grid)
        self.i2t_layout = image_to_text(self.c.max_text_len, self.c.grid)

    # ---- building sources -----------------------------------------------------------------------------
    def text_source(self, texts, truncate=False):
        L = self.c.max_text_len
        ids = np.full([len(texts), L], self.tok.pad_id, np.int64)
        valid = np.zeros([len(texts), L], bool)
        for i, t in enumerate(texts):
            tt = self.tok.encode(t, max_len=L, truncate=truncate)
            ids[i, :len(tt)], valid[i, :len(tt)] = tt, True
        return ids, valid

    # ---- text -> image ----------------------------------------------------------------------------------
    @paddle.no_grad()
    def text_to_image(self, texts, num_candidates=1, temperature=1.0, top_k=0, top_p=1.0, cfg_scale=1.0,
                      seed=0, use_cache=True, truncate=False):
        """-> int64 codes [len(texts), num_candidates, grid, grid]. A text longer than the model's text length
        is an error, or is cut (keeping [SEP]) with truncate=True."""
        self.m.eval()
        n, lay = self.c.grid ** 2, self.t2i_layout
        src, src_valid = self.text_source(texts, truncate)
        src, src_valid = np.repeat(src, num_candidates, 0), np.repeat(src_valid, num_candidates, 0)
        b = src.shape[0]
        guided = cfg_scale != 1.0
        if guided:
            null, null_valid = self.text_source([""] * b)
            src, src_valid = np.concatenate([src, null]), np.concatenate([src_valid, null_valid])
        ids = np.zeros([src.shape[0], lay.length], np.int64)
        ids[:, :lay.lengths[0]] = src
        ids[:, lay.lengths[0]] = self.m.boi_id
        valid = np.concatenate([src_valid, np.ones([src.shape[0], n], bool)], 1)
        dec = Decoder(self.m, lay, ids, valid, use_cache)
        rng = np.random.default_rng(seed)
        out = np.zeros([b, n], np.int64)
        for k in range(n):
            logits = dec.logits_at(dec.t0 + k)
            if guided:
                logits = logits[b:] + cfg_scale * (logits[:b] - logits[b:])
            tok = sample_from(filter_logits(logits, temperature, top_k, top_p), rng)
            out[:, k] = tok
            if k + 1 < n:
                dec.ids[:, dec.t0 + k + 1] = np.concatenate([tok, tok]) if guided else tok
        return out.reshape([len(texts), num_candidates, self.c.grid, self.c.grid])

    # ---- image -> text (and VQA) ------------------------------------------------------------------------
    def _text_decoder(self, codes, question, use_cache):
        codes = np.asarray(codes).reshape([len(codes), -1]).astype(np.int64)
        b, L = codes.shape[0], self.c.max_text_len
        if question is None:
            lay, parts, pvalid = self.i2t_layout, [codes], [np.ones(codes.shape, bool)]
        else:
            q, qv = self.text_source([question] * b if isinstance(question, str) else question)
            lay = vqa(L, L, self.c.grid)
            parts, pvalid = [codes, q], [np.ones(codes.shape, bool), qv]
        tgt = np.full([b, L], self.tok.pad_id, np.int64)
        tgt[:, 0] = self.tok.bos_id
        ids = np.concatenate(parts + [tgt], 1)
        valid = np.concatenate(pvalid + [np.ones([b, L], bool)], 1)
        return Decoder(self.m, lay, ids, valid, use_cache, text_vocab=self.tok.vocab_size)

    @paddle.no_grad()
    def image_to_text(self, codes, method="greedy", max_len=None, beam_size=4, length_penalty=1.0,
                      temperature=1.0, top_k=0, top_p=1.0, seed=0, question=None, use_cache=True):
        """codes [B, grid, grid] -> list of dicts(text, ids, score: sum of log-probs / length**penalty)."""
        self.m.eval()
        max_len = min(max_len or self.c.max_text_len, self.c.max_text_len)
        if method == "beam":
            return self._beam(codes, max_len, beam_size, length_penalty, question, use_cache)
        if method not in ("greedy", "sample"):
            raise ValueError(f"unknown decoding method {method!r} (greedy, sample or beam)")
        dec = self._text_decoder(codes, question, use_cache)
        rng = np.random.default_rng(seed)
        b = dec.ids.shape[0]
        out, score, done = [[] for _ in range(b)], np.zeros(b), np.zeros(b, bool)
        for k in range(max_len):
            logp = filter_logits(dec.logits_at(dec.t0 + k), temperature if method == "sample" else 1.0,
                                 top_k if method == "sample" else 0, top_p if method == "sample" else 1.0)
            tok = sample_from(logp, rng) if method == "sample" else logp.argmax(-1)
            for i in np.nonzero(~done)[0]:
                out[i].append(int(tok[i]))
                score[i] += logp[i, tok[i]]
            done |= tok == self.tok.eos_id
            if done.all() or k + 1 == max_len:
                break
            dec.ids[:, dec.t0 + k + 1] = tok
        return [{"text": self.tok.decode(o), "ids": o, "score": float(s / max(len(o), 1) ** length_penalty),
                 "logprob": float(s)} for o, s in zip(out, score)]

    def _beam(self, codes, max_len, k, alpha, question, use_cache):
        b = len(codes)
        dec = self._text_decoder(np.repeat(np.asarray(codes), k, 0), question, use_cache)
        eos = self.tok.eos_id
        beam_logp = np.tile(np.r_[0.0, np.full(k - 1, -np.inf)], b)  # start from one live beam per item
        seqs = [[] for _ in range(b * k)]
        finished = [[] for _ in range(b)]  # (score, logprob, ids)
        for step in range(max_len):
            logp = filter_logits(dec.logits_at(dec.t0 + step))
            total = (beam_logp[:, None] + logp).reshape([b, -1])  # [b, k*V]
            v = logp.shape[-1]
            top = np.argsort(-total, axis=1)[:, :2 * k]
            new_rows, new_tok, new_lp, new_seqs = [], [], [], []
            for i in range(b):
                kept = 0
                for flat in top[i]:
                    lp = total[i, flat]
                    if not np.isfinite(lp):
                        break
                    row, tok = i * k + flat // v, int(flat % v)
                    if tok == eos or step + 1 == max_len:
                        ids = seqs[row] + [tok]
                        finished[i].append((lp / len(ids) ** alpha, lp, ids))
                        if tok == eos:
                            continue
                    new_rows.append(row), new_tok.append(tok), new_lp.append(lp), new_seqs.append(seqs[row] + [tok])
                    kept += 1
                    if kept == k:
                        break
                while kept < k:  # pad with dead beams
                    new_rows.append(i * k), new_tok.append(eos), new_lp.append(-np.inf)
                    new_seqs.append(seqs[i * k] + [eos])
                    kept += 1
            open_left = np.isfinite(np.array(new_lp)).any()
            # stop when every item has k finished hypotheses, no beam is open, or at max_len
            if step + 1 == max_len or not open_left or all(len(fs) >= k for fs in finished):
                break
            dec.reorder(np.array(new_rows))
            beam_logp, seqs = np.array(new_lp), new_seqs
            dec.ids[:, dec.t0 + step + 1] = new_tok
        results = []
        for i in range(b):
            score, lp, ids = max(finished[i], key=lambda f: f[0])
            results.append({"text": self.tok.decode(ids), "ids": ids, "score": float(score), "logprob": float(lp)})
        return results

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
