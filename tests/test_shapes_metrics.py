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
