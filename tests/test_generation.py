import numpy as np
import paddle
import pytest

from ppvilg.generation import Generator, filter_logits
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


def test_cached_text_to_image_equals_uncached(gen):
    kw = dict(num_candidates=2, temperature=1.0, top_k=20, seed=3)
    a = gen.text_to_image(["红色圆形", "a blue square"], use_cache=True, **kw)
    b = gen.text_to_image(["红色圆形", "a blue square"], use_cache=False, **kw)
    assert a.shape == (2, 2, 8, 8) and (a == b).all() and a.max() < 64


def test_greedy_is_deterministic_and_top_k_1_equals_greedy(gen):
    g1 = gen.image_to_text(_codes(), "greedy", max_len=8)
    g2 = gen.image_to_text(_codes(), "greedy", max_len=8)
    s = gen.image_to_text(_codes(), "sample", max_len=8, top_k=1, seed=5)
    assert [r["ids"] for r in g1] == [r["ids"] for r in g2] == [r["ids"] for r in s]
    t_greedy = gen.text_to_image(["红色"], temperature=1.0, top_k=1, seed=0)
    t_other = gen.text_to_image(["红色"], temperature=1.0, top_k=1, seed=99)
    assert (t_greedy == t_other).all()


def test_beam_search_scores_at_least_greedy(gen):
    codes = _codes(3, seed=4)
    greedy = gen.image_to_text(codes, "greedy", max_len=6, length_penalty=0.0)
    beam = gen.image_to_text(codes, "beam", max_len=6, beam_size=4, length_penalty=0.0)
    for g, b in zip(greedy, beam):
        assert b["logprob"] >= g["logprob"] - 1e-6
    # scores are the model's own log-likelihoods of the chosen sequences
    lp = gen.caption_logprob(codes, [b["text"] for b in beam])
    finished = [b["ids"][-1] == gen.tok.eos_id for b in beam]
    for ok, got, want in zip(finished, lp, [b["logprob"] for b in beam]):
        if ok:
            assert abs(got - want) < 1e-3


def test_cfg_scale_1_equals_the_plain_conditional_path(gen):
    a = gen.text_to_image(["红色圆形"], cfg_scale=1.0, seed=7, top_k=10)
    b = gen.text_to_image(["红色圆形"], seed=7, top_k=10)
    c = gen.text_to_image(["红色圆形"], cfg_scale=3.0, seed=7, top_k=10)
    assert (a == b).all() and a.shape == c.shape


def test_rerank_orders_by_the_model_likelihood(gen):
    cands = gen.text_to_image(["红色圆形"], num_candidates=3, seed=1)
    order, scores = gen.rerank(["红色圆形"], cands)
    assert scores.shape == (1, 3) and list(scores[0, order[0]]) == sorted(scores[0], reverse=True)
    order2, _ = gen.rerank(["红色圆形"], cands, scorer=lambda texts, ims: [float(i) for i in range(len(texts))],
                           images=[[None] * 3])
    assert list(order2[0]) == [2, 1, 0]


def test_filter_logits():
    x = np.log(np.array([[0.5, 0.3, 0.15, 0.05]]))
    assert np.isinf(filter_logits(x, top_k=2)[0, 2:]).all()
    kept = np.isfinite(filter_logits(x, top_p=0.7)[0])
    assert list(kept) == [True, True, False, False]
    np.testing.assert_allclose(np.exp(filter_logits(x)).sum(), 1.0)
