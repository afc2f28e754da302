import json
import os

import cv2
import numpy as np
import pytest
import skimage.data
from scipy import linalg

from conftest import ROOT
from ppvilg.data.corpora import aic_icc, coco_captions, coco_cn, fmiqa, group_references
from ppvilg.data.pairs import ManifestError
from ppvilg.metrics.captions import caption_scores, tokenize
from ppvilg.metrics.fid import cached_statistics, frechet_distance, statistics
from ppvilg.metrics.inception import default_weights_path

FIXTURE = os.path.join(ROOT, "tests", "fixtures", "fid_reference_features.npz")
HAVE_WEIGHTS = os.path.isfile(default_weights_path())
NEED_WEIGHTS = pytest.mark.skipif(not HAVE_WEIGHTS, reason=f"FID weights absent at {default_weights_path()} "
                                  "(python tools/get_fid_weights.py; .ci/run fetches them)")


def test_frechet_distance_closed_form_diagonal():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    d1, d2 = rng.uniform(0.5, 2, 5), rng.uniform(0.5, 2, 5)
    want = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(d1) - np.sqrt(d2)) ** 2).sum()
    assert frechet_distance(mu1, np.diag(d1), mu2, np.diag(d2)) == pytest.approx(want, rel=1e-10)
    assert frechet_distance(mu1, np.diag(d1), mu1, np.diag(d1)) == pytest.approx(0.0, abs=1e-9)


def test_frechet_distance_matches_scipy_sqrtm():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(200, 8)), rng.normal(size=(150, 8)) @ rng.normal(size=(8, 8)) * 0.5 + 1
    (m1, s1), (m2, s2) = statistics(a), statistics(b)
    want = ((m1 - m2) ** 2).sum() + np.trace(s1 + s2 - 2 * linalg.sqrtm(s1 @ s2).real)
    assert frechet_distance(m1, s1, m2, s2) == pytest.approx(want, rel=1e-9)


def test_statistics_cache(tmp_path):
    calls = []

    def compute():
        calls.append(1)
        return np.random.default_rng(0).normal(size=(10, 3))
    m1, s1, hit1 = cached_statistics(str(tmp_path), "k", compute)
    m2, s2, hit2 = cached_statistics(str(tmp_path), "k", compute)
    assert (hit1, hit2) == (False, True) and len(calls) == 1 and np.allclose(m1, m2) and np.allclose(s1, s2)


@NEED_WEIGHTS
def test_paddle_inception_matches_the_reference_network():
    from ppvilg.metrics.inception import inception_features, load_inception
    ref = np.load(FIXTURE)
    ims = []
    for name in ["astronaut", "coffee", "chelsea", "rocket"]:
        im = getattr(skimage.data, name)()
        ims += [im, cv2.resize(im, (64, 64), interpolation=cv2.INTER_AREA)]
    net = load_inception()
    feats = np.concatenate([inception_features(net, [im]) for im in ims])
    assert list(ref["keys"]) == [f"{n}/{k}" for n in ["astronaut", "coffee", "chelsea", "rocket"] for k in ("orig", "64")]
    diff = np.abs(feats - ref["features"]).max()
    assert diff < 2e-4, diff  # measured 4.2e-5 (features up to ~4.5)


def test_torchscript_reader_rejects_a_wrong_file(tmp_path):
    from ppvilg.metrics.inception import convert_reference
    (tmp_path / "x.pt").write_bytes(b"not it")
    with pytest.raises(ValueError, match="SHA-1"):
        convert_reference(str(tmp_path / "x.pt"), str(tmp_path / "out.safetensors"))


def test_missing_weights_error_names_the_command(tmp_path):
    from ppvilg.metrics.inception import MissingWeightsError, load_inception
    with pytest.raises(MissingWeightsError, match="tools/get_fid_weights.py"):
        load_inception(str(tmp_path / "none.safetensors"))


def test_caption_metrics_jieba_and_char_modes():
    assert tokenize("左上角有一个小红色圆形。", "jieba") == "左上角 有 一个 小 红色 圆形"
    assert tokenize("左上角有一个小红色圆形。", "char") == "左 上 角 有 一 个 小 红 色 圆 形"
    refs = {0: ["左上角有一个小红色圆形。"]}
    hyp = {0: "左上角有一个大红色圆形"}
    j, c = caption_scores(refs, hyp, mode="jieba"), caption_scores(refs, hyp, mode="char")
    assert j["bleu1"] == pytest.approx(5 / 6, abs=1e-6) and c["bleu1"] == pytest.approx(10 / 11, abs=1e-6)
    assert "SPICE" in j["spice_unavailable"]


@pytest.mark.skipif(__import__("shutil").which("java") is None, reason="METEOR 1.5 needs Java")
def test_meteor_matches_pycocoevalcap_directly():
    from pycocoevalcap.meteor.meteor import Meteor
    refs = {0: ["a small red circle at the top left"], 1: ["a big blue square in the middle"]}
    hyps = {0: "a small red circle at the top", 1: "a blue square"}
    ours = caption_scores(refs, hyps, meteor=True)["meteor"]
    direct = Meteor().compute_score({k: [tokenize(v[0])] for k, v in refs.items()},
                                    {k: [tokenize(v)] for k, v in hyps.items()})[0]
    assert ours == pytest.approx(direct) and 0 < ours < 1


def test_benchmark_readers(tmp_path):
    (tmp_path / "val2014").mkdir()
    coco = {"images": [{"id": 42, "file_name": "COCO_val2014_000000000042.jpg"}],
            "annotations": [{"image_id": 42, "id": 7, "caption": "A cat."}, {"image_id": 42, "id": 8, "caption": "cat"}]}
    (tmp_path / "captions.json").write_text(json.dumps(coco))
    (tmp_path / "zh.jsonl").write_text('{"id": 7, "caption": "一只猫"}\n{"id": 8, "caption": "猫"}\n', encoding="utf-8")
    pairs = coco_captions(str(tmp_path / "captions.json"), str(tmp_path / "val2014"), str(tmp_path / "zh.jsonl"))
    assert [p.text for p in pairs] == ["一只猫", "猫"] and pairs[0].meta["original"] == "A cat."
    (tmp_path / "zh.jsonl").write_text('{"id": 7, "caption": "一只猫"}\n', encoding="utf-8")
    with pytest.raises(ManifestError, match="no translation for 1 captions"):
        coco_captions(str(tmp_path / "captions.json"), None, str(tmp_path / "zh.jsonl"))
    (tmp_path / "cn.txt").write_text("COCO_val2014_000000000042#0\t一只猫在睡觉\nCOCO_val2014_000000000043#0\t狗\n",
                                     encoding="utf-8")
    (tmp_path / "test.txt").write_text("COCO_val2014_000000000042\n")
    cn = coco_cn(str(tmp_path / "cn.txt"), str(tmp_path), str(tmp_path / "test.txt"))
    assert len(cn) == 1 and cn[0].image == str(tmp_path / "val2014" / "COCO_val2014_000000000042.jpg")
    (tmp_path / "bad.txt").write_text("no tab here\n")
    with pytest.raises(ManifestError, match="bad.txt:1"):
        coco_cn(str(tmp_path / "bad.txt"), str(tmp_path))
    aic = [{"url": "u", "image_id": "a.jpg", "caption": ["一个人。", "两个人"]}]
    (tmp_path / "aic.json").write_text(json.dumps(aic, ensure_ascii=False), encoding="utf-8")
    pairs = aic_icc(str(tmp_path / "aic.json"), str(tmp_path / "imgs"))
    images, refs = group_references(pairs)
    assert images == [str(tmp_path / "imgs" / "a.jpg")] and refs == {0: ["一个人。", "两个人"]}
    fm = {"val": [{"image_id": "COCO_val2014_000000000042", "Question": {"Chinese": "这是什么?"},
                   "Answer": {"Chinese": "猫"}}]}
    (tmp_path / "fm.json").write_text(json.dumps(fm, ensure_ascii=False), encoding="utf-8")
    qa = fmiqa(str(tmp_path / "fm.json"), str(tmp_path), split="val")
    assert qa[0]["question"] == "这是什么?" and qa[0]["answer"] == "猫"
    with pytest.raises(ManifestError, match="choose one"):
        fmiqa(str(tmp_path / "fm.json"), str(tmp_path))
