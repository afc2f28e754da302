import numpy as np
import paddle
import pytest

from ppvilg.generation import Decoding, Generator, SamplerSettings, filter_logits, rank_candidates, rerank_scores
from ppvilg_deploy.decoding import SamplerSettingError
from ppvilg_deploy.kvcache import slot_rows, write_slots
from ppvilg_deploy.sequences import SequenceBuilder
from ppvilg.models.vilg import ViLG, ViLGConfig
from ppvilg.text.tokenizer import TextTokenizer

TOL = 1e-4  # float32, 2 layers: cached and full logits agree to ~1e-6; the bound leaves room for kernels


@pytest.fixture(scope="module")
def gen():
    paddle.seed(1)
    m = ViLG(ViLGConfig(**dict(ViLGConfig.PRESETS["tiny"], attention="sparse")))
    m.eval()
    return Generator(m, TextTokenizer())


def _codes(b=2, seed=0):
    return np.random.default_rng(seed).integers(0, 64, [b, 8, 8])


@pytest.mark.parametrize("question", [None, "什么颜色"])
def test_cached_decode_equals_full_forward_at_every_step(gen, question):
    dec_c = gen._text_decoder(_codes(), question, {"use_cache": True})
    dec_f = gen._text_decoder(_codes(), question, {"use_cache": False})
    rng = np.random.default_rng(0)
    for k in range(10):
        a, b = dec_c.logits_at(dec_c.t0 + k), dec_f.logits_at(dec_f.t0 + k)
        np.testing.assert_allclose(a, b, atol=TOL, rtol=0)
        tok = rng.integers(5, 100, 2)
        dec_c.ids[:, dec_c.t0 + k + 1] = tok
        dec_f.ids[:, dec_f.t0 + k + 1] = tok



def test_cached_steps_attend_over_the_whole_cache_buffer(gen, monkeypatch):
    """The causal mask hides the slots not filled yet, so every cached step (the prefill included) passes masks
    over all the buffer's slots: a key slice of the cache would be a strided view each attention matmul copies
    first (benchmarks/bench_cache_keys.py); the values are those of the full forward (the test above)."""
    keys, step = [], gen.m.step
    monkeypatch.setattr(gen.m, "step", lambda ids, kind, pos, masks, cache, start:
                        keys.append({m.shape[-1] for m in masks} | {c.shape[2] for kv in cache for c in kv})
                        or step(ids, kind, pos, masks, cache, start))
    dec = gen._text_decoder(_codes(), None, {"use_cache": True})
    for k in range(4):
        dec.logits_at(dec.t0 + k)
    assert keys == [{dec.layout.length}] * 4


@pytest.mark.parametrize("start,count", [(0, 5), (3, 1), (6, 2)])
def test_write_slots_writes_those_slots_of_every_row_and_head_in_place(start, count):
    """ppvilg_deploy.kvcache.write_slots (the dygraph decoder's and the predictors' cache write) against numpy's
    slice assignment: the same slots of every (row, head), nothing else, into the caller's own tensors."""
    rng = np.random.default_rng(start)
    b, h, s, dh = 3, 2, 8, 4
    before = [rng.normal(size=[b, h, s, dh]).astype(np.float32) for _ in range(2)]
    new = [rng.normal(size=[b, h, count, dh]).astype(np.float32) for _ in range(2)]
    caches = [paddle.to_tensor(a) for a in before]
    write_slots(caches, start, [paddle.to_tensor(a) for a in new])
    for cache, old, kv in zip(caches, before, new):
        want = old.copy()
        want[:, :, start:start + count] = kv
        np.testing.assert_array_equal(cache.numpy(), want)
    assert slot_rows(b, h, s, start, count).tolist() == [
        (bi * h + hi) * s + start + j for bi in range(b) for hi in range(h) for j in range(count)]
    with pytest.raises(ValueError, match="do not fit a cache of 8 slots"):
        write_slots(caches, s - count + 1, [paddle.to_tensor(a) for a in new])
    with pytest.raises(ValueError, match="cannot write keys / values of shape"):
        write_slots(caches, 0, [paddle.to_tensor(a[:, :1]) for a in new])
    old = paddle.get_flags(["FLAGS_use_stride_kernel"])["FLAGS_use_stride_kernel"]
    paddle.set_flags({"FLAGS_use_stride_kernel": True})   # (as in decoding: a transpose is then a strided view)
    try:
        strided = paddle.to_tensor(np.zeros([b, s, h, dh], np.float32)).transpose([0, 2, 1, 3])
        with pytest.raises(ValueError, match="must be a contiguous tensor"):   # its reshape would be a copy
            write_slots([strided], start, [paddle.to_tensor(new[0])])
    finally:
        paddle.set_flags({"FLAGS_use_stride_kernel": old})


def test_cached_steps_get_masks_per_head_equal_to_the_broadcast_ones(gen):
    """Each step's masks are [B, H, s, S] copies of the layer masks' rows (made once per step for the layers that
    share a pattern: a same-shape add instead of a broadcast one per layer)."""
    dec = gen._text_decoder(_codes(), None, {"use_cache": True})
    sl = slice(dec.t0 + 2, dec.t0 + 3)
    masks = dec.step_masks(sl)
    heads = gen.m.blocks[0].attn.heads
    for m, full in zip(masks, dec.masks):
        assert m.shape == [2, heads, 1, dec.layout.length]
        np.testing.assert_array_equal(m.numpy(), np.broadcast_to(full[:, :, sl].numpy(), m.shape))
    assert len({id(m) for m in masks}) == len({id(m) for m in dec.masks})


def test_cached_text_to_image_equals_uncached(gen):
    kw = dict(candidates=2, temperature=1.0, top_k=20, seed=3)
    a = gen.text_to_image(["红色圆形", "a blue square"], use_cache=True, **kw)
    b = gen.text_to_image(["红色圆形", "a blue square"], use_cache=False, **kw)
    assert a.shape == (2, 2, 8, 8) and (a == b).all() and a.max() < 64


def test_greedy_is_deterministic_and_top_k_1_equals_greedy(gen):
    g1 = gen.image_to_text(_codes(), caption_method="greedy", max_len=8)
    g2 = gen.image_to_text(_codes(), caption_method="greedy", max_len=8)
    s = gen.image_to_text(_codes(), caption_method="sample", max_len=8, top_k=1, seed=5)
    assert [r["ids"] for r in g1] == [r["ids"] for r in g2] == [r["ids"] for r in s]
    t_greedy = gen.text_to_image(["红色"], temperature=1.0, top_k=1, seed=0)
    t_other = gen.text_to_image(["红色"], temperature=1.0, top_k=1, seed=99)
    assert (t_greedy == t_other).all()


class _ScriptedBackend(Decoding):
    """A decoding backend whose next-token log-probabilities are a hand-written function of the target so far:
    the algorithms' results can be worked out on paper."""

    def __init__(self, tok, text_len, table, image=None):
        self.seq = SequenceBuilder(tok, text_len, 2, 4)
        self.table, self.image = table, image   # table: tuple(prefix) -> {token: prob}; image: row -> logits

    def make_decoder(self, direction, ids, valid):
        return _ScriptedDecoder(self, ids, valid)


class _ScriptedDecoder:
    def __init__(self, backend, ids, valid):
        self.b, self.ids = backend, ids.copy()
        # text->image: the target starts after the text; image->text: after the 2x2 cells
        self.t0 = backend.seq.text_len if backend.image is not None else backend.seq.num_cells
        self.rows = np.arange(len(ids))

    def logits_at(self, slot):
        if self.b.image is not None:
            return np.stack([self.b.image(r) for r in self.rows])
        v = self.b.seq.tok.vocab_size
        out = np.full([len(self.ids), v], -1e9)
        for r in range(len(self.ids)):
            prefix = tuple(int(t) for t in self.ids[r, self.t0 + 1:slot + 1])
            for tok, p in self.b.table.get(prefix, {}).items():
                out[r, tok] = np.log(p)
        return out

    def reorder(self, rows):
        self.ids, self.rows = self.ids[rows], self.rows[rows]


A_, B_ = 300, 400   # two ordinary vocabulary tokens


def _table(eos):
    # greedy takes A (0.6) then can only end with [SEP] at 0.3: 0.18; B (0.4) then [SEP] at 0.9 is 0.36; the long
    # path A A [SEP] is 0.6 * 0.7 * 1.0 = 0.42 over 3 tokens
    return {(): {A_: 0.6, B_: 0.4}, (A_,): {eos: 0.3, A_: 0.7}, (B_,): {eos: 0.9, A_: 0.1},
            (A_, A_): {eos: 1.0}, (B_, A_): {eos: 1.0}}


def test_beam_search_finds_what_greedy_misses_and_applies_the_length_penalty():
    tok = TextTokenizer()
    eos = tok.eos_id
    be = _ScriptedBackend(tok, 8, _table(eos))
    codes = np.zeros([1, 2, 2], np.int64)
    greedy = be.decode_text(codes, SamplerSettings(caption_method="greedy", length_penalty=0.0))[0]
    assert greedy["ids"] == [A_, A_, eos] and greedy["logprob"] == pytest.approx(np.log(0.42))
    # alpha 0: raw log-probability; the best is A A [SEP] (0.42) over B [SEP] (0.36) and A [SEP] (0.18)
    b0 = be.decode_text(codes, SamplerSettings(caption_method="beam", beam_size=3, length_penalty=0.0))[0]
    assert b0["ids"] == [A_, A_, eos] and b0["score"] == pytest.approx(np.log(0.42))
    # alpha 1: per-token mean: A A [SEP] log(0.42) / 3 = -0.289 beats B [SEP] log(0.36) / 2 = -0.511
    b1 = be.decode_text(codes, SamplerSettings(caption_method="beam", beam_size=3, length_penalty=1.0))[0]
    assert b1["ids"] == [A_, A_, eos] and b1["score"] == pytest.approx(np.log(0.42) / 3)
    # a table where the greedy first step is a trap: A (0.55) then [SEP] 0.2 only, B (0.45) then [SEP] 1.0
    trap = {(): {A_: 0.55, B_: 0.45}, (A_,): {eos: 0.2, A_: 0.8}, (A_, A_): {eos: 0.1, B_: 0.9},
            (A_, A_, B_): {eos: 1.0}, (B_,): {eos: 1.0}}
    be = _ScriptedBackend(tok, 8, trap)
    g = be.decode_text(codes, SamplerSettings(caption_method="greedy"))[0]
    assert g["ids"] == [A_, A_, B_, eos] and g["logprob"] == pytest.approx(np.log(0.55 * 0.8 * 0.9))
    b = be.decode_text(codes, SamplerSettings(caption_method="beam", beam_size=2, length_penalty=0.0))[0]
    assert b["ids"] == [B_, eos] and b["logprob"] == pytest.approx(np.log(0.45))   # 0.45 > 0.396 found by greedy
    # the search stops once each item has beam_size finished hypotheses (here after step 2: B [SEP] and
    # A [SEP]), so a longer sequence that a large length penalty would favour is not explored; the score is
    # the penalised one
    b = be.decode_text(codes, SamplerSettings(caption_method="beam", beam_size=2, length_penalty=2.0))[0]
    assert b["ids"] == [B_, eos] and b["score"] == pytest.approx(np.log(0.45) / 4)



def test_beam_search_stops_once_no_open_beam_can_win_with_the_same_result(monkeypatch):
    """A (0.9) then [SEP] (0.95) is settled after two tokens: the other beams (A A ..., B B ...) run on with
    probability 1 per token and never end before max_len, but their log-probabilities (log 0.045, log 0.1) are
    already below it, so the search stops there instead of at max_len, with the same hypothesis and score."""
    import ppvilg_deploy.decoding as decoding
    tok = TextTokenizer()
    eos, text_len = tok.eos_id, 8
    table = {(): {A_: 0.9, B_: 0.1}, (A_,): {eos: 0.95, A_: 0.05}}
    for n in range(1, text_len):
        table[(B_,) * n] = {B_: 1.0}
        if n >= 2:
            table[(A_,) * n] = {A_: 1.0}
    be = _ScriptedBackend(tok, text_len, table)
    calls = []
    logits_at = _ScriptedDecoder.logits_at
    monkeypatch.setattr(_ScriptedDecoder, "logits_at",
                        lambda self, slot: calls.append(len(self.ids)) or logits_at(self, slot))
    codes = np.zeros([3, 2, 2], np.int64)   # three images, the same table
    runs = {}
    for settle in (True, False):
        if not settle:   # the search without the rule: until each item has beam_size finished hypotheses
            monkeypatch.setattr(decoding, "beam_settled", lambda *a: False)
        for alpha in (0.0, 1.0):
            calls.clear()
            out = be.decode_text(codes, SamplerSettings(caption_method="beam", beam_size=2, length_penalty=alpha))
            assert all(o == out[0] for o in out)
            r = out[0]
            runs[settle, alpha] = (r["ids"], r["score"], r["logprob"], len(calls))
            # the first step reads each image once (one row per item), then 2 beams per item
            assert calls == [3] + [6] * (len(calls) - 1)
    for alpha in (0.0, 1.0):
        ids, score, logprob, n_with = runs[True, alpha]
        assert ids == [A_, eos] and logprob == pytest.approx(np.log(0.9 * 0.95))
        assert score == pytest.approx(np.log(0.9 * 0.95) / 2 ** alpha)
        assert runs[False, alpha][:3] == (ids, score, logprob)
        assert (n_with, runs[False, alpha][3]) == (2, text_len)


def test_beam_settled_bounds_what_an_open_beam_can_still_reach():
    from ppvilg_deploy.decoding import beam_settled
    best = [(-0.1, -0.2, [A_, 2])]            # (score, logprob, ids)
    # alpha 1: an open beam at log p -0.5 can reach -0.5 / 8 = -0.0625 > -0.1 at max_len 8: not settled
    assert not beam_settled(best, np.array([-0.5, -np.inf]), 2, 8, 1.0)
    assert beam_settled(best, np.array([-0.9, -np.inf]), 2, 8, 1.0)        # -0.9 / 8 = -0.1125 < -0.1
    # alpha 0: the raw log-probability bounds it; alpha -1 (longer is worse): the next length, 3, is its best
    assert beam_settled(best, np.array([-0.1]), 2, 8, 0.0) and not beam_settled(best, np.array([-0.09]), 2, 8, 0.0)
    assert beam_settled(best, np.array([-0.04]), 2, 8, -1.0) and not beam_settled(best, np.array([-0.03]), 2, 8, -1.0)
    assert not beam_settled([], np.array([-5.0]), 2, 8, 0.0)               # nothing finished yet
    assert beam_settled(best, np.array([-np.inf, -np.inf]), 2, 8, 0.0)     # no open beam left



def test_top_candidates_is_a_stable_sort_of_each_row_cut_to_n():
    """Beam search ranks a step's beam_size x vocabulary continuations by top_candidates: the same order as a
    stable full sort (highest first, equal scores in column order), ties at the cut and -inf rows included."""
    from ppvilg_deploy.decoding import top_candidates
    rng = np.random.default_rng(0)
    x = np.round(rng.standard_normal([40, 30]), 1)      # many exact ties
    x[:, :4] = -np.inf
    x[0] = -np.inf
    for n in (1, 2, 6, 30, 50):
        want = np.argsort(-x, axis=1, kind="stable")[:, :n]
        np.testing.assert_array_equal(top_candidates(x, n), want)
    assert top_candidates(np.array([[0.0, 2.0, 2.0, 1.0]]), 2).tolist() == [[1, 2]]

def test_classifier_free_guidance_samples_from_u_plus_s_times_c_minus_u():
    """The conditional rows (first half) give c = [3, 2, 0], the unconditional ones u = [3, 0, 0]: both put
    token 0 first, but u + s (c - u) = [3, 2 s, 0] puts token 1 first once s > 1.5."""
    tok = TextTokenizer()
    c, u = np.array([3.0, 2.0, 0.0]), np.array([3.0, 0.0, 0.0])
    # rows 0-1: the two prompts; guided runs stack their two unconditional rows (2-3) after them
    be = _ScriptedBackend(tok, 4, {}, image=lambda row: c if row < 2 else u)
    for s, want in ((1.0, 0), (1.4, 0), (1.6, 1), (3.0, 1), (0.0, 0)):
        codes = be.sample_codes(["红色", "蓝色"], SamplerSettings(cfg_scale=s, top_k=1))
        assert (codes == want).all(), (s, codes)


def test_rerank_scores_are_the_models_caption_log_likelihoods(gen):
    """Each candidate's score is log p(prompt | its codes), checked against the cached decoder stepping through
    the prompt's tokens (an independent path), and the order follows the scores."""
    prompt = "红色圆形"
    cands = gen.text_to_image([prompt], candidates=3, seed=1)
    order, scores = gen.rerank([prompt], cands)
    ids = gen.seq.tok.encode(prompt)
    token_probs = {}
    for k in range(3):
        dec = gen.make_decoder("i2t", *gen.seq.image_to_text(cands[0, k:k + 1])[:2])
        total, probs = 0.0, []
        for j, t in enumerate(ids):
            logits = dec.logits_at(dec.t0 + j)[0, :gen.seq.tok.vocab_size].astype(np.float64)
            m = logits.max()
            lp = logits[t] - m - np.log(np.exp(logits - m).sum())
            total += lp
            probs.append(np.exp(lp))
            dec.ids[:, dec.t0 + j + 1] = t
        assert scores[0, k] == pytest.approx(total, abs=1e-3)
        token_probs[k] = probs
    assert list(order[0]) == list(np.argsort(-scores[0]))
    # rerank_score token_prob: the same tokens' probabilities, summed
    order_p, scores_p = gen.rerank([prompt], cands, how="token_prob")
    np.testing.assert_allclose(scores_p[0], [sum(token_probs[k]) for k in range(3)], atol=1e-4)
    assert list(order_p[0]) == list(np.argsort(-scores_p[0], kind="stable"))
    order2, _ = gen.rerank([prompt], cands, scorer=lambda texts, ims: [float(i) for i in range(len(texts))],
                           images=[[None] * 3])
    assert list(order2[0]) == [2, 1, 0]


def test_rerank_scores_sum_log_probabilities_or_probabilities():
    """Hand-made token log-probabilities of one prompt (3 tokens + padding) under two candidates: A gets every
    token fairly likely, B the first two near-certain and the third (wording the model never saw, say) very
    unlikely. Summed log-probabilities prefer A, summed probabilities B; padding counts in neither."""
    lp = np.log(np.array([[0.5, 0.5, 0.5, 0.9], [0.99, 0.99, 1e-4, 0.9]]))
    w = np.array([[1, 1, 1, 0], [1, 1, 1, 0]], np.float32)
    np.testing.assert_allclose(rerank_scores(lp, w, "logprob"), [3 * np.log(0.5), 2 * np.log(0.99) + np.log(1e-4)])
    np.testing.assert_allclose(rerank_scores(lp, w, "token_prob"), [1.5, 1.9801], rtol=1e-6)
    order, scores = rank_candidates(lp, w, 1, "logprob")
    assert order.tolist() == [[0, 1]] and scores.shape == (1, 2)
    assert rank_candidates(lp, w, 1, "token_prob")[0].tolist() == [[1, 0]]
    # ties keep the sampling order; a padding slot's value is ignored even when it is -inf
    lp2 = np.array([[-1.0, -np.inf], [-1.0, -np.inf], [-0.5, 0.0]])
    w2 = np.array([[1, 0], [1, 0], [1, 0]], np.float32)
    assert rank_candidates(lp2, w2, 1, "token_prob")[0].tolist() == [[2, 0, 1]]
    with pytest.raises(ValueError, match="rerank score"):
        rerank_scores(lp, w, "clip")
    with pytest.raises(SamplerSettingError, match="rerank_score"):
        SamplerSettings(rerank_score="probability")


def test_filter_logits():
    x = np.log(np.array([[0.5, 0.3, 0.15, 0.05]]))
    assert np.isinf(filter_logits(x, top_k=2)[0, 2:]).all()
    kept = np.isfinite(filter_logits(x, top_p=0.7)[0])
    assert list(kept) == [True, True, False, False]
    np.testing.assert_allclose(np.exp(filter_logits(x)).sum(), 1.0)


# ---- one sampler-settings object, one sequence builder ------------------------------------------------------

def test_sampler_settings_validate_and_replace():
    s = SamplerSettings.from_mapping({"temperature": 0.7, "cfg_scale": 1.5, "fid_cache": "x", "batch_size": 8})
    assert (s.temperature, s.cfg_scale, s.top_k, s.candidates) == (0.7, 1.5, 0, 1)   # other Eval keys ignored
    assert s.replace(temperature=None, top_k=5) == SamplerSettings(temperature=0.7, cfg_scale=1.5, top_k=5)
    assert s.replace(temperature=0).temperature == 0            # 0 is a value, not "unset"
    with pytest.raises(TypeError, match="unknown sampler settings"):
        s.replace(temprature=1.0)
    for field, value in (("top_p", 0.0), ("top_p", 1.5), ("top_k", -1), ("temperature", -0.5), ("candidates", 0),
                         ("beam_size", 0), ("max_len", -1), ("caption_method", "nucleus"), ("cfg_scale", -1.0)):
        with pytest.raises(ValueError, match=f"'{field}'"):
            SamplerSettings(**{field: value})


def test_every_sampler_setting_has_a_command_line_flag():
    import dataclasses
    from ppvilg_deploy.cli import FLAGS
    assert sorted(f for f, _, _ in FLAGS.values()) == sorted(f.name for f in dataclasses.fields(SamplerSettings))


def test_teacher_forced_sequences_are_the_generated_ones_filled_in(gen):
    """Training's sequences (codes / text given) are exactly what the decoding algorithms build and fill in slot by
    slot, for both directions: one builder, one layout."""
    seq, codes = gen.seq, _codes()
    text = seq.text(["红色圆形", "a blue square"])
    full, valid, labels = seq.text_to_image(text, codes)
    gen_ids, gen_valid, none = seq.text_to_image(text)
    assert none is None and full.shape == (2, gen.layouts["t2i"].length) and (valid == gen_valid).all()
    t0 = gen.layouts["t2i"].target_slice().start
    assert (gen_ids[:, t0] == gen.m.boi_id).all()
    for k in range(seq.num_cells - 1):       # what sample_codes writes after sampling code k
        gen_ids[:, t0 + k + 1] = labels[:, k]
    assert (gen_ids == full).all() and (labels == codes.reshape(2, -1)).all()

    caption = seq.text(["红色圆形", "a blue square"])
    full, valid, labels = seq.image_to_text(codes, text=caption)
    gen_ids, _, _ = seq.image_to_text(codes)
    t0 = gen.layouts["i2t"].target_slice().start
    n = int(caption[1][0].sum())             # the first caption's tokens, [SEP] included
    for k in range(n - 1):                   # what decode_text writes after choosing token k
        gen_ids[:, t0 + k + 1] = labels[:, k]
    assert (gen_ids[0, :t0 + n] == full[0, :t0 + n]).all()
    assert (labels[0, :n] == caption[0][0, :n]).all() and (labels[0, n:] == -100).all()


# ---- speculative Jacobi decoding ----------------------------------------------------------------------------
def test_jacobi_decoding_with_a_deterministic_sampler_is_the_sequential_result(gen):
    texts = ["红色圆形", "a blue square"]
    for kw in (dict(top_k=1), dict(temperature=0.0, cfg_scale=2.0, candidates=2)):
        want = gen.text_to_image(texts, **kw)
        for window in (1, 5, 64):
            stats = {}
            got = gen.sample_codes(texts, gen.settings(decoding="sjd", sjd_window=window, **kw), stats=stats)
            np.testing.assert_array_equal(got, want)
            assert stats["forwards"] <= 64 and (window > 1 or stats["forwards"] == 64)


def test_jacobi_decoding_samples_the_sequential_distribution(gen):
    """Per-position code frequencies of 1200 SJD samples against 1200 sequential ones (different seeds), at a
    temperature that makes the tiny model's distributions peaked and position-dependent: a chi-square
    two-sample test at each of the first 12 positions, Bonferroni-corrected to a 0.1% family-wise error. An
    implementation that accepts drafts too easily keeps random codes and fails it (checked: accepting with
    probability min(1, 2 p / q) instead of min(1, p / q) fails)."""
    from scipy.stats import chi2_contingency
    kw = dict(candidates=1200, temperature=0.3, top_k=0, cfg_scale=1.0)
    seq = gen.text_to_image(["红色圆形"], seed=1, **kw).reshape(1200, -1)
    stats = {}
    sjd = gen.sample_codes(["红色圆形"], gen.settings(decoding="sjd", sjd_window=8, seed=2, **kw),
                           stats=stats).reshape(1200, -1)
    assert stats["forwards"] < 64     # several codes accepted per forward
    for k in range(12):
        codes = np.union1d(seq[:, k], sjd[:, k])
        table = np.array([[np.sum(x[:, k] == c) for c in codes] for x in (seq, sjd)])
        table = table[:, table.sum(0) >= 5] if (table.sum(0) >= 5).sum() >= 2 else table
        if table.shape[1] < 2:
            assert (seq[:, k] == sjd[:, k][0]).all()
            continue
        p = chi2_contingency(table)[1]
        assert p > 0.001 / 12, (k, p, table)


def test_jacobi_decoding_leaves_the_cache_of_a_fresh_computation(gen):
    """Rejected drafts leave keys / values in the cache; the accepted sequence's slots must end up holding
    exactly what a fresh prefill of the final codes computes."""
    st = gen.settings(decoding="sjd", sjd_window=6, temperature=1.0, seed=4)
    src, src_valid = gen.seq.text(["a small red circle", "绿色"])
    ids, valid, _ = gen.seq.text_to_image((src, src_valid))
    dec = gen.make_decoder("t2i", ids, valid)
    codes, forwards = gen._jacobi(dec, 2, 64, st, np.random.default_rng(st.seed), False)
    assert forwards < 64
    fresh = gen.make_decoder("t2i", ids, valid)
    fresh.ids[:, fresh.t0 + 1:] = codes[:, :-1]
    fresh.logits_span(fresh.t0, fresh.t0 + 63)
    n = fresh.t0 + 64
    for (k1, v1), (k2, v2) in zip(dec.cache, fresh.cache):
        np.testing.assert_allclose(k1.numpy()[:, :, :n], k2.numpy()[:, :, :n], atol=1e-5, rtol=0)
        np.testing.assert_allclose(v1.numpy()[:, :, :n], v2.numpy()[:, :, :n], atol=1e-5, rtol=0)
