import numpy as np
import pytest

from ppvilg.data.shapes import COLORS, POSITIONS, SHAPES, SIZES, ShapesPairs, render
from ppvilg.metrics.captions import caption_scores, tokenize
from ppvilg.metrics.shapes_reader import attribute_accuracy, read_caption, read_image


@pytest.mark.parametrize("split", ["train", "heldout"])
def test_reader_reads_every_generated_shape_exactly(split):
    items = [ShapesPairs(split, 300, 32, "both", 1).item(i) for i in range(300)]
    acc, per = attribute_accuracy([read_image(it["image"]) for it in items], [it["attrs"] for it in items])
    assert acc == 1.0, per
    cap_acc, _ = attribute_accuracy([read_caption(it["text"]) for it in items], [it["attrs"] for it in items])
    assert cap_acc == 1.0


def test_reader_on_blank_and_dim_images():
    assert read_image(np.zeros((32, 32, 3), np.uint8)) == {"color": None, "shape": None, "position": None,
                                                             "size": None}
    attrs = {"color": "cyan", "shape": "triangle", "position": "bottom right", "size": "large"}
    dim = (render(attrs).astype(np.float32) * 0.6).astype(np.uint8)  # darker reconstruction keeps its hue
    assert read_image(dim) == attrs
    assert len(COLORS) * len(SHAPES) * len(POSITIONS) * len(SIZES) == 324


def test_caption_reader_prefers_longest_and_whole_words():
    assert read_caption("a large reddish shape at the top left") == {"color": None, "shape": None,
                                                                     "position": "top left", "size": "large"}
    assert read_caption("右下角有一个大绿色三角形") == {"color": "green", "shape": "triangle",
                                                        "position": "bottom right", "size": "large"}


def test_caption_metrics_match_pycocoevalcap_on_a_fixed_example():
    refs = {0: ["a small red circle at the top left", "small red circle, top left"],
            1: ["左上角有一个小红色圆形"]}
    hyps = {0: "a small red circle at the top left", 1: "左上角有一个大红色圆形"}
    s = caption_scores(refs, hyps)
    assert tokenize("左上角有 a RED circle。") == "左 上 角 有 a red circle"
    assert s["bleu1"] == pytest.approx((8 + 10) / 19, abs=1e-6)  # clipped unigram matches / hypothesis length
    assert 0 < s["bleu4"] < 1 and s["cider"] > 0 and 0 < s["rouge_l"] <= 1
    perfect = caption_scores({0: ["a b c d e"]}, {0: "a b c d e"})
    assert perfect["bleu4"] == pytest.approx(1.0, abs=1e-6) and perfect["rouge_l"] == pytest.approx(1.0)


def _cider_d(refs, hyps, n_max=4, sigma=6.0):
    """CIDEr-D written from its definition (Vedantam et al. 2015; the variant pycocoevalcap computes): per n,
    tf-idf n-gram vectors (idf = log(#images / #images whose references hold the n-gram)), the hypothesis'
    counts clipped by the reference's, cosine similarity x a Gaussian length penalty; mean over n and
    references, x 10, averaged over images."""
    from collections import Counter
    grams = lambda words, n: Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))  # noqa: E731
    docs = {k: [r.split() for r in v] for k, v in refs.items()}
    df = [Counter() for _ in range(n_max)]
    for rs in docs.values():
        for n in range(n_max):
            df[n].update(set(g for r in rs for g in grams(r, n + 1)))
    log_n = np.log(len(docs))

    def vec(words):
        out, norms = [], []
        for n in range(n_max):
            c = grams(words, n + 1)
            v = {g: tf * (log_n - np.log(max(1.0, df[n][g]))) for g, tf in c.items()}
            out.append((v, c))
            norms.append(np.sqrt(sum(x * x for x in v.values())))
        return out, norms

    scores = []
    for k, h in hyps.items():
        hw = h.split()
        vh, nh = vec(hw)
        total = np.zeros(n_max)
        for r in docs[k]:
            vr, nr = vec(r)
            for n in range(n_max):
                dot = sum(min(vh[n][0][g], vr[n][0].get(g, 0.0)) * vr[n][0].get(g, 0.0) for g in vh[n][0])
                if nh[n] and nr[n]:
                    total[n] += dot / (nh[n] * nr[n]) * np.exp(-((len(hw) - len(r)) ** 2) / (2 * sigma ** 2))
        scores.append(total.mean() / len(docs[k]) * 10.0)
    return float(np.mean(scores))


def test_caption_metrics_equal_values_worked_out_by_hand():
    refs = {0: ["a b c d f"], 1: ["x y z w v u"], 2: ["a small red circle", "a red circle"]}
    hyps = {0: "a b c d e", 1: "x y z q", 2: "a red circle"}
    s = caption_scores(refs, hyps, mode="space")
    # BLEU (corpus level, as pycocoevalcap): clipped n-gram matches / hypothesis n-grams over all sentences,
    # hypothesis length 12 vs closest reference lengths 5 + 6 + 3 = 14: brevity penalty exp(1 - 14/12)
    p = [(4 + 3 + 3) / 12, (3 + 2 + 2) / 9, (2 + 1 + 1) / 6, (1 + 0 + 0) / 3]
    bp = np.exp(1 - 14 / 12)
    assert s["bleu1"] == pytest.approx(bp * p[0], abs=1e-6)
    assert s["bleu4"] == pytest.approx(bp * np.prod(p) ** 0.25, abs=1e-6)
    # ROUGE-L with beta 1.2, per image the best reference by LCS, then the mean
    def f(lcs, h, r, beta=1.2):
        prec, rec = lcs / h, lcs / r
        return (1 + beta ** 2) * prec * rec / (rec + beta ** 2 * prec)
    assert s["rouge_l"] == pytest.approx((f(4, 5, 5) + f(3, 4, 6) + 1.0) / 3, abs=1e-6)
    assert s["cider"] == pytest.approx(_cider_d(refs, hyps), abs=1e-6)
