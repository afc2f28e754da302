"""Decoding algorithms over any backend, in numpy: the dynamic-graph model (ppvilg.generation.Generator) and
the exported Paddle Inference programs (ppvilg_deploy.predictor.DeployPipeline) run the same code, so a seed
gives the same image codes and greedy decoding the same captions in both.

- text->image: temperature / top-k / top-p sampling, N candidates per prompt, classifier-free guidance
  (logits = uncond + scale * (cond - uncond); the unconditional text is [SEP] alone); one code per forward
  (`decoding="sequential"`) or speculative Jacobi decoding (`decoding="sjd"`, Teng et al., ICLR 2025): a
  window of draft codes refined in parallel, several accepted per forward, the output distribution unchanged;
- image->text and VQA: greedy, sampling, or beam search with a length penalty, stopping at [SEP];
- reranking text->image candidates by the model's own teacher-forced probabilities of the prompt's tokens given
  each candidate (`rank_candidates`; the backends compute the per-token log-probabilities).

A backend mixes in `Decoding`, sets `self.seq` (a ppvilg_deploy.sequences.SequenceBuilder: the tokenizer and
the sequence assembly) and provides `make_decoder(direction, ids, valid)` (direction: "t2i", "i2t" or "vqa")
returning an object with `ids` (int64 [B, S], filled in by the algorithms), `t0` (first target slot),
`logits_at(slot)` (numpy [B, V]: the logits predicting the token after `slot`) and `reorder(rows)`; a
text->image decoder may also sample inside its program, `sample_at(slot, uniform, settings, rows)` -> codes
(the exported predictor does; the uniform numbers are drawn here, so seeds give the same codes); for
speculative Jacobi decoding the text->image decoder also has `logits_span(first, last)` (numpy [B, n, V]: the
logits after each of the slots first .. last, from one forward).

Every sampler and caption-decoding option is a field of one `SamplerSettings`; defaults come from the
checkpoint's `Eval` section or the export's inference.yml (`SamplerSettings.from_mapping`), and a call changes
some of them with `settings.replace(...)`.
"""
import dataclasses
from dataclasses import dataclass
from typing import Optional

import numpy as np

CAPTION_METHODS = ("greedy", "beam", "sample")
IMAGE_DECODINGS = ("sequential", "sjd")
# how reranking scores a candidate image from log p(token | image, earlier tokens) of the prompt's tokens:
# logprob: their sum, log p(prompt | image); token_prob: the sum of the token probabilities (rank_candidates)
RERANK_SCORES = ("logprob", "token_prob")


class SamplerSettingError(ValueError):
    """An out-of-range sampler setting: `field`, what was `expected`, the `value` given."""

    def __init__(self, field, expected, value):
        self.field, self.expected, self.value = field, expected, value
        super().__init__(self.named(f"sampler setting '{field}'"))

    def named(self, name):
        """The message with the setting called `name` (a command-line flag, a request field)."""
        return f"{name} must be {self.expected}, got {self.value!r}"


@dataclass(frozen=True)
class SamplerSettings:
    """How to decode. Text->image: `candidates` images per prompt sampled with `temperature` (0: always the
    most likely code), `top_k` (0: off), `top_p` (1: off), classifier-free guidance `cfg_scale` (1: off) and
    `seed`, decoded one code per forward (`decoding="sequential"`) or by speculative Jacobi decoding
    (`decoding="sjd"`, `sjd_window` draft codes per forward; the same distribution). Image->text / VQA: `caption_method` (greedy, beam or sample, the latter with the sampling options
    above), `beam_size`, `length_penalty` (score = log-prob / length ** penalty) and `max_len` (None: the
    model's text length). Reranking (`rerank_score`): how a candidate's score is made from the prompt's token
    probabilities (RERANK_SCORES, `rank_candidates`)."""
    candidates: int = 1
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    cfg_scale: float = 1.0
    seed: int = 0
    decoding: str = "sequential"
    sjd_window: int = 16
    caption_method: str = "greedy"
    beam_size: int = 4
    length_penalty: float = 1.0
    max_len: Optional[int] = None
    rerank_score: str = "logprob"

    def __post_init__(self):
        def bad(field, expected):
            raise SamplerSettingError(field, expected, getattr(self, field))

        def is_int(v):
            return isinstance(v, (int, np.integer)) and not isinstance(v, bool)

        def is_num(v):
            return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)

        if not is_int(self.candidates) or self.candidates < 1:
            bad("candidates", "an integer >= 1")
        if not is_num(self.temperature) or self.temperature < 0:
            bad("temperature", "a number >= 0")
        if not is_int(self.top_k) or self.top_k < 0:
            bad("top_k", "an integer >= 0 (0: off)")
        if not is_num(self.top_p) or not 0 < self.top_p <= 1:
            bad("top_p", "a number in (0, 1]")
        if not is_num(self.cfg_scale) or self.cfg_scale < 0:
            bad("cfg_scale", "a number >= 0 (1: off)")
        if not is_int(self.seed):
            bad("seed", "an integer")
        if self.decoding not in IMAGE_DECODINGS:
            bad("decoding", f"one of {', '.join(IMAGE_DECODINGS)}")
        if not is_int(self.sjd_window) or self.sjd_window < 1:
            bad("sjd_window", "an integer >= 1")
        if self.caption_method not in CAPTION_METHODS:
            bad("caption_method", f"one of {', '.join(CAPTION_METHODS)}")
        if not is_int(self.beam_size) or self.beam_size < 1:
            bad("beam_size", "an integer >= 1")
        if not is_num(self.length_penalty):
            bad("length_penalty", "a number")
        if self.max_len is not None and (not is_int(self.max_len) or self.max_len < 1):
            bad("max_len", "an integer >= 1 or None")
        if self.rerank_score not in RERANK_SCORES:
            bad("rerank_score", f"one of {', '.join(RERANK_SCORES)}")

    @classmethod
    def from_mapping(cls, mapping):
        """The settings named in `mapping` (an Eval config section, inference.yml's sampler: other keys are
        ignored); the rest at their defaults."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in dict(mapping or {}).items() if k in names})

    def replace(self, **changes):
        """A copy with `changes` applied; a change of None keeps the current value (an option not given).
        An unknown name is an error."""
        names = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(changes) - names)
        if unknown:
            raise TypeError(f"unknown sampler settings {unknown} (known: {', '.join(sorted(names))})")
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})

    def to_dict(self):
        return dataclasses.asdict(self)


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


def top_candidates(scores, n):
    """The column indices of each row's n highest scores [B, n], highest first, equal scores in column order:
    np.argsort(-scores, kind="stable")[:, :n] without sorting whole rows (a beam step's rows are beam_size x
    the text vocabulary: 256 x 36,885 took ~0.96 s to sort against ~0.3 s to partition)."""
    n = min(n, scores.shape[1])
    neg = -scores
    kth = np.partition(neg, n - 1, axis=1)[:, n - 1:n]          # each row's n-th smallest of -scores
    out = np.empty([len(scores), n], np.int64)
    for i, row in enumerate(neg <= kth):                        # n or more columns (ties at the n-th)
        cols = np.flatnonzero(row)
        out[i] = cols[np.argsort(neg[i, cols], kind="stable")[:n]]
    return out


def beam_settled(finished, open_logprobs, length, max_len, alpha):
    """Whether beam search may stop for one item: it has a finished hypothesis (score, logprob, ids) that no open
    beam (log-probabilities `open_logprobs` after `length` tokens; -inf: none) can still beat. An open beam only
    loses log-probability as it grows (to at most `max_len` tokens), so its best reachable score
    logprob / length'**alpha is at length' = max_len for alpha >= 0 (the next token for alpha < 0)."""
    if not finished:
        return False
    live = open_logprobs[np.isfinite(open_logprobs)]
    if not len(live):
        return True
    reach = max_len if alpha >= 0 else min(length + 1, max_len)
    return max(f[0] for f in finished) >= float(live.max()) / reach ** alpha


def rerank_scores(token_logprobs, weights, how="logprob"):
    """A score per row (higher: better) from token_logprobs [B, L] (log p(token | image, earlier tokens) of a
    prompt's tokens, teacher-forced) and weights [B, L] (1 on the prompt's real tokens, [SEP] included, 0 on
    padding). logprob: sum of the log-probabilities, log p(prompt | image). token_prob: sum of the
    probabilities, the expected number of the prompt's tokens the model would predict from the image; a token
    the model finds unlikely whatever the image (wording it never saw) adds ~0 instead of a large negative term
    that varies from candidate to candidate and can outweigh the words that tell the images apart (docs/demo.md
    has the comparison on the demo's dev prompts)."""
    lp = np.asarray(token_logprobs, np.float64)
    w = np.asarray(weights, np.float64)
    if lp.shape != w.shape:
        raise ValueError(f"token log-probabilities {lp.shape} and weights {w.shape} differ in shape")
    if how == "logprob":
        return (np.where(w > 0, lp, 0.0) * w).sum(-1)
    if how == "token_prob":
        return (np.where(w > 0, np.exp(lp), 0.0) * w).sum(-1)
    raise ValueError(f"rerank score must be one of {', '.join(RERANK_SCORES)}, got {how!r}")


def rank_candidates(token_logprobs, weights, num_texts, how="logprob"):
    """Rows of num_texts x N candidates (text-major) -> (order [num_texts, N] best first, scores [num_texts, N])
    by rerank_scores; ties keep the sampling order."""
    scores = rerank_scores(token_logprobs, weights, how).reshape([num_texts, -1])
    return np.argsort(-scores, axis=1, kind="stable"), scores


def kept_candidates(keep, candidates):
    """How many of a prompt's `candidates` (best first when reranked) a text->image call turns into images:
    all with keep=None, else `keep`, from 1 to `candidates` (decoding the others would be wasted work)."""
    if keep is None:
        return candidates
    if isinstance(keep, bool) or not isinstance(keep, (int, np.integer)) or not 1 <= keep <= candidates:
        raise ValueError(f"keep must be an integer from 1 to the {candidates} candidates, got {keep!r}")
    return int(keep)


def _log(p):
    with np.errstate(divide="ignore"):   # log(0) = -inf: a filtered-out token
        return np.log(p)


def sample_from(logp, rng):
    p = np.exp(logp)
    u = rng.random((p.shape[0], 1))
    return np.minimum((np.cumsum(p, -1) < u * p.sum(-1, keepdims=True)).sum(-1), p.shape[-1] - 1)


class _RowGenerators:
    """Uniform draws for blocks of `rows` consecutive rows, each block from its own generator: block k's
    numbers are those np.random.default_rng(seeds[k]) gives alone (what sequential decoding draws: one
    number per row per step)."""

    def __init__(self, seeds, rows):
        self.gens, self.rows = [np.random.default_rng(s) for s in seeds], rows

    def random(self, shape):
        if len(shape) != 2 or shape != (self.rows * len(self.gens), 1):
            raise ValueError(f"per-text generators draw [rows, 1], asked for {shape}")
        return np.concatenate([g.random((self.rows, 1)) for g in self.gens])


class Decoding:
    """Needs: self.seq (SequenceBuilder) and make_decoder()."""

    # ---- text -> image ----------------------------------------------------------------------------------
    def sample_codes(self, texts, settings, truncate=False, stats=None, seeds=None, **decoder_options):
        """-> int64 codes [len(texts), settings.candidates, grid, grid]. A text longer than the model's text
        length is an error, or is cut (keeping [SEP]) with truncate=True. `stats` (a dict) receives the
        number of model forwards and codes decoded. Random numbers come from one generator seeded with
        settings.seed, or with `seeds` (one per text) from one generator per text, so that a text's codes do
        not depend on the texts decoded beside it (a server batching requests); per-text seeds need
        sequential decoding."""
        seq, st = self.seq, settings
        n = seq.num_cells
        src, src_valid = seq.text(texts, truncate)
        src, src_valid = np.repeat(src, st.candidates, 0), np.repeat(src_valid, st.candidates, 0)
        b = src.shape[0]
        guided = st.cfg_scale != 1.0
        if guided:
            null, null_valid = seq.text([""] * b)
            src, src_valid = np.concatenate([src, null]), np.concatenate([src_valid, null_valid])
        ids, valid, _ = seq.text_to_image((src, src_valid))
        dec = self.make_decoder("t2i", ids, valid, **decoder_options)
        if seeds is None:
            rng = np.random.default_rng(st.seed)
        else:
            if len(seeds) != len(texts):
                raise ValueError(f"{len(seeds)} seeds for {len(texts)} texts")
            if st.decoding != "sequential" and len(texts) > 1:
                raise ValueError("one seed per text needs decoding='sequential' (speculative Jacobi decoding "
                                 "draws for all rows from one generator)")
            rng = (np.random.default_rng(seeds[0]) if len(seeds) == 1
                   else _RowGenerators(seeds, st.candidates))
        if st.decoding == "sjd":
            out, forwards = self._jacobi(dec, b, n, st, rng, guided)
        else:
            out, forwards = np.zeros([b, n], np.int64), n
            in_program = getattr(dec, "sample_at", None)   # a backend that samples inside its step program
            for k in range(n):
                if in_program is not None:   # the same uniform draws as sample_from's
                    tok = in_program(dec.t0 + k, rng.random((b, 1)), st, b)
                else:
                    logits = dec.logits_at(dec.t0 + k)
                    if guided:
                        logits = logits[b:] + st.cfg_scale * (logits[:b] - logits[b:])
                    tok = sample_from(filter_logits(logits, st.temperature, st.top_k, st.top_p), rng)
                out[:, k] = tok
                if k + 1 < n:
                    dec.ids[:, dec.t0 + k + 1] = np.concatenate([tok, tok]) if guided else tok
        if stats is not None:
            stats.update(forwards=forwards, codes=b * n, codes_per_forward=n / forwards)   # per row
        return out.reshape([len(texts), st.candidates, seq.grid, seq.grid])

    def _jacobi(self, dec, b, n, st, rng, guided):
        """Speculative Jacobi decoding -> (codes [b, n], forwards). Each forward runs the slots of a window of
        W codes after the shortest accepted prefix, each slot holding an accepted code or a draft; it gives the
        distribution p of every window position given the codes before it. Per row, from its first
        unaccepted position on, a draft x drawn from q is accepted with probability min(1, p(x) / q(x));
        the first rejected one is replaced by a draw from max(0, p - q) (normalised) and the row stops
        there: the accepted codes are distributed as sequential sampling's (speculative sampling's rule).
        The positions after it get new drafts drawn from this forward's p (the Jacobi update), which becomes
        their q; positions never drafted start from uniformly random codes (q uniform). A position without a
        draft reached with its prefix accepted is sampled from p directly. Every forward accepts at least one
        code of the rows at the shortest prefix, so there are at most n forwards; the decoder overwrites the
        cache of rejected slots when it runs them again."""
        v = self.seq.boi_id                       # image codes 0 .. v-1 ([BOI] is the extra last id)
        window = max(1, min(st.sjd_window, n))
        out = np.zeros([b, n], np.int64)
        q = {}                                    # position -> [b, v] the distributions its drafts came from
        acc = np.zeros(b, np.int64)               # accepted codes per row
        drafted, forwards = 0, 0                  # positions < drafted hold a code (accepted or draft)
        t0 = dec.t0
        while acc.min() < n:
            start = int(acc.min())
            end = min(start + window, n)
            for k in range(drafted, end - 1):     # new positions used as inputs: random drafts
                out[:, k] = rng.integers(0, v, b)
                q[k] = np.full([b, v], 1.0 / v)
            drafted = max(drafted, end - 1)
            for k in range(max(start - 1, 0), end - 1):   # the input of slot t0 + k + 1 is code k (the last
                # accepted code start - 1 included: it may have replaced a rejected draft)
                dec.ids[:, t0 + k + 1] = np.concatenate([out[:, k], out[:, k]]) if guided else out[:, k]
            logits = dec.logits_span(t0 + start, t0 + end - 1)
            forwards += 1
            if guided:
                logits = logits[b:] + st.cfg_scale * (logits[:b] - logits[b:])
            w = end - start
            p = np.exp(filter_logits(logits.reshape([b * w, -1])[:, :v], st.temperature, st.top_k,
                                     st.top_p)).reshape([b, w, v])
            for r in range(b):
                k = int(acc[r])
                while k < end:
                    pk = p[r, k - start]
                    if k >= drafted:              # no draft here and the prefix is accepted: sample p
                        out[r, k] = sample_from(_log(pk)[None], rng)[0]
                        k += 1
                        continue
                    x, qk = out[r, k], q[k][r]
                    if rng.random() * qk[x] < pk[x]:   # accept with probability min(1, p(x) / q(x))
                        k += 1
                        continue
                    resid = np.maximum(pk - qk, 0.0)   # > 0 somewhere: x was rejected, so p(x) < q(x)
                    out[r, k] = sample_from(_log(resid / resid.sum())[None], rng)[0]
                    k += 1
                    break
                acc[r] = max(acc[r], k)
                if k < end:                       # Jacobi update of the rest of the window
                    rest = p[r, k - start:]
                    out[r, k:end] = sample_from(_log(rest), rng)
                    for j in range(k, end):
                        q.setdefault(j, np.full([b, v], 1.0 / v))[r] = p[r, j - start]
            drafted = max(drafted, end)
            for j in [j for j in q if j < acc.min()]:
                del q[j]
        return out, forwards

    # ---- image -> text (and VQA) ------------------------------------------------------------------------
    def _text_decoder(self, codes, question, decoder_options):
        q = None
        if question is not None:
            q = self.seq.text([question] * len(codes) if isinstance(question, str) else question)
        ids, valid, _ = self.seq.image_to_text(codes, question=q)
        return self.make_decoder("i2t" if question is None else "vqa", ids, valid, **decoder_options)

    def decode_text(self, codes, settings, question=None, **decoder_options):
        """codes [B, grid, grid] -> list of dicts(text, ids, score: sum of log-probs / length**penalty, logprob)
        decoded by settings.caption_method; with `question` (a string, or one per image) the answers (VQA)."""
        st, tok = settings, self.seq.tok
        max_len = min(st.max_len or self.seq.text_len, self.seq.text_len)
        if st.caption_method == "beam":
            return self._beam(codes, max_len, st.beam_size, st.length_penalty, question, decoder_options)
        sample = st.caption_method == "sample"
        dec = self._text_decoder(codes, question, decoder_options)
        rng = np.random.default_rng(st.seed)
        b = dec.ids.shape[0]
        out, score, done = [[] for _ in range(b)], np.zeros(b), np.zeros(b, bool)
        for k in range(max_len):
            logp = filter_logits(self._text_logits(dec, dec.t0 + k), st.temperature if sample else 1.0,
                                 st.top_k if sample else 0, st.top_p if sample else 1.0)
            nxt = sample_from(logp, rng) if sample else logp.argmax(-1)
            for i in np.nonzero(~done)[0]:
                out[i].append(int(nxt[i]))
                score[i] += logp[i, nxt[i]]
            done |= nxt == tok.eos_id
            if done.all() or k + 1 == max_len:
                break
            dec.ids[:, dec.t0 + k + 1] = nxt
        return [{"text": tok.decode(o), "ids": o, "score": float(s / max(len(o), 1) ** st.length_penalty),
                 "logprob": float(s)} for o, s in zip(out, score)]

    def _text_logits(self, dec, slot):
        """Text logits without the padding rows of a vocabulary padded beyond the tokenizer (never produced)."""
        logits = dec.logits_at(slot)
        logits[:, self.seq.tok.vocab_size:] = -np.inf
        return logits

    def _beam(self, codes, max_len, k, alpha, question, decoder_options):
        b = len(codes)
        # the decoder starts with one row per item (the image and question are read once); only one beam per item
        # is live at the first step, and the first reorder makes the k rows of each item from it
        dec = self._text_decoder(np.asarray(codes), question, decoder_options)
        eos = self.seq.tok.eos_id
        beam_logp = np.tile(np.r_[0.0, np.full(k - 1, -np.inf)], b)  # start from one live beam per item
        seqs = [[] for _ in range(b * k)]
        finished = [[] for _ in range(b)]  # (score, logprob, ids)
        for step in range(max_len):
            logp = filter_logits(self._text_logits(dec, dec.t0 + step))
            if step == 0:
                logp = np.repeat(logp, k, 0)
            total = (beam_logp[:, None] + logp).reshape([b, -1])  # [b, k*V]
            v = logp.shape[-1]
            top = top_candidates(total, 2 * k)
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
            new_lp_arr = np.array(new_lp).reshape([b, k])
            open_left = np.isfinite(new_lp_arr).any()
            # stop when every item has k finished hypotheses, no beam is open, or at max_len; or when no open
            # beam of any item can still beat that item's best finished hypothesis (the result is the same)
            if (step + 1 == max_len or not open_left or all(len(fs) >= k for fs in finished)
                    or all(beam_settled(fs, lp, step + 1, max_len, alpha) for fs, lp in zip(finished, new_lp_arr))):
                break
            dec.reorder(np.array(new_rows) // (k if step == 0 else 1))   # step 0: rows of the one-row-per-item decoder
            beam_logp, seqs = new_lp_arr.ravel(), new_seqs
            dec.ids[:, dec.t0 + step + 1] = new_tok
        results = []
        for i in range(b):
            score, lp, ids = max(finished[i], key=lambda f: f[0])
            results.append({"text": self.seq.tok.decode(ids), "ids": ids, "score": float(score), "logprob": float(lp)})
        return results
