import numpy as np
import paddle
import pytest

from ppvilg.generation import Generator, SamplerSettings, filter_logits
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


def test_beam_search_scores_at_least_greedy(gen):
    codes = _codes(3, seed=4)
    greedy = gen.image_to_text(codes, caption_method="greedy", max_len=6, length_penalty=0.0)
    beam = gen.image_to_text(codes, caption_method="beam", max_len=6, beam_size=4, length_penalty=0.0)
    for g, b in zip(greedy, beam):
        assert b["logprob"] >= g["logprob"] - 1e-6
    # scores are the model's own log-likelihoods of the chosen sequences
    lp = gen.caption_logprob(codes, [b["text"] for b in beam])
    finished = [b["ids"][-1] == gen.seq.tok.eos_id for b in beam]
    for ok, got, want in zip(finished, lp, [b["logprob"] for b in beam]):
        if ok:
            assert abs(got - want) < 1e-3


def test_cfg_scale_1_equals_the_plain_conditional_path(gen):
    a = gen.text_to_image(["红色圆形"], cfg_scale=1.0, seed=7, top_k=10)
    b = gen.text_to_image(["红色圆形"], seed=7, top_k=10)
    c = gen.text_to_image(["红色圆形"], cfg_scale=3.0, seed=7, top_k=10)
    assert (a == b).all() and a.shape == c.shape


def test_rerank_orders_by_the_model_likelihood(gen):
    cands = gen.text_to_image(["红色圆形"], candidates=3, seed=1)
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
