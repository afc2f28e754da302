"""Decoding algorithms over any backend, in numpy: the dynamic-graph model (ppvilg.generation.Generator) and
the exported Paddle Inference programs (ppvilg_deploy.predictor.DeployPipeline) run the same code, so a seed
gives the same image codes and greedy decoding the same captions in both.

- text->image: temperature / top-k / top-p sampling, N candidates per prompt, classifier-free guidance
  (logits = uncond + scale * (cond - uncond); the unconditional text is [SEP] alone);
- image->text and VQA: greedy, sampling, or beam search with a length penalty, stopping at [SEP].

A backend mixes in `Decoding` and provides `make_decoder(direction, ids, valid)` (direction: "t2i", "i2t" or
"vqa") returning an object with `ids` (int64 [B, S], filled in by the algorithms), `t0` (first target slot),
`logits_at(slot)` (numpy [B, V]: the logits predicting the token after `slot`) and `reorder(rows)`.
"""
import numpy as np


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


class Decoding:
    """Needs: self.tok (TextTokenizer), self.text_len, self.grid, self.boi_id and make_decoder()."""

    def text_source(self, texts, truncate=False):
        L = self.text_len
        ids = np.full([len(texts), L], self.tok.pad_id, np.int64)
        valid = np.zeros([len(texts), L], bool)
        for i, t in enumerate(texts):
            tt = self.tok.encode(t, max_len=L, truncate=truncate)
            ids[i, :len(tt)], valid[i, :len(tt)] = tt, True
        return ids, valid

    # ---- text -> image ----------------------------------------------------------------------------------
    def sample_codes(self, texts, num_candidates=1, temperature=1.0, top_k=0, top_p=1.0, cfg_scale=1.0, seed=0,
                     truncate=False, **decoder_options):
        """-> int64 codes [len(texts), num_candidates, grid, grid]. A text longer than the model's text length
        is an error, or is cut (keeping [SEP]) with truncate=True."""
        n = self.grid ** 2
        src, src_valid = self.text_source(texts, truncate)
        src, src_valid = np.repeat(src, num_candidates, 0), np.repeat(src_valid, num_candidates, 0)
        b = src.shape[0]
        guided = cfg_scale != 1.0
        if guided:
            null, null_valid = self.text_source([""] * b)
            src, src_valid = np.concatenate([src, null]), np.concatenate([src_valid, null_valid])
        ids = np.zeros([src.shape[0], self.text_len + n], np.int64)
        ids[:, :self.text_len] = src
        ids[:, self.text_len] = self.boi_id
        valid = np.concatenate([src_valid, np.ones([src.shape[0], n], bool)], 1)
        dec = self.make_decoder("t2i", ids, valid, **decoder_options)
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
        return out.reshape([len(texts), num_candidates, self.grid, self.grid])

    # ---- image -> text (and VQA) ------------------------------------------------------------------------
    def _text_decoder(self, codes, question, decoder_options):
        codes = np.asarray(codes).reshape([len(codes), -1]).astype(np.int64)
        b, L = codes.shape[0], self.text_len
        if question is None:
            direction, parts, pvalid = "i2t", [codes], [np.ones(codes.shape, bool)]
        else:
            q, qv = self.text_source([question] * b if isinstance(question, str) else question)
            direction, parts, pvalid = "vqa", [codes, q], [np.ones(codes.shape, bool), qv]
        tgt = np.full([b, L], self.tok.pad_id, np.int64)
        tgt[:, 0] = self.tok.bos_id
        ids = np.concatenate(parts + [tgt], 1)
        valid = np.concatenate(pvalid + [np.ones([b, L], bool)], 1)
        return self.make_decoder(direction, ids, valid, **decoder_options)

    def decode_text(self, codes, method="greedy", max_len=None, beam_size=4, length_penalty=1.0,
                    temperature=1.0, top_k=0, top_p=1.0, seed=0, question=None, **decoder_options):
        """codes [B, grid, grid] -> list of dicts(text, ids, score: sum of log-probs / length**penalty)."""
        max_len = min(max_len or self.text_len, self.text_len)
        if method == "beam":
            return self._beam(codes, max_len, beam_size, length_penalty, question, decoder_options)
        if method not in ("greedy", "sample"):
            raise ValueError(f"unknown decoding method {method!r} (greedy, sample or beam)")
        dec = self._text_decoder(codes, question, decoder_options)
        rng = np.random.default_rng(seed)
        b = dec.ids.shape[0]
        out, score, done = [[] for _ in range(b)], np.zeros(b), np.zeros(b, bool)
        for k in range(max_len):
            logp = filter_logits(self._text_logits(dec, dec.t0 + k), temperature if method == "sample" else 1.0,
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

    def _text_logits(self, dec, slot):
        """Text logits without the padding rows of a vocabulary padded beyond the tokenizer (never produced)."""
        logits = dec.logits_at(slot)
        logits[:, self.tok.vocab_size:] = -np.inf
        return logits

    def _beam(self, codes, max_len, k, alpha, question, decoder_options):
        b = len(codes)
        dec = self._text_decoder(np.repeat(np.asarray(codes), k, 0), question, decoder_options)
        eos = self.tok.eos_id
        beam_logp = np.tile(np.r_[0.0, np.full(k - 1, -np.inf)], b)  # start from one live beam per item
        seqs = [[] for _ in range(b * k)]
        finished = [[] for _ in range(b)]  # (score, logprob, ids)
        for step in range(max_len):
            logp = filter_logits(self._text_logits(dec, dec.t0 + step))
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
