"""Inference tools on tiny checkpoints trained for a few steps here (quality is not the point; plumbing is)."""
import json
import os
import subprocess
import sys

import numpy as np
import paddle
import pytest

from conftest import ROOT
from ppvilg.data.images import read_image


def _run(*args):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)


def test_infer_text_to_image_writes_pngs_and_grid(run_dirs, tmp_path):
    r = _run("tools/infer.py", str(run_dirs / "vilg"), "--text", "左上角有一个小红色圆形", "--num", "3", "--rerank",
             "--top-k", "5", "--out", str(tmp_path), "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert len(out["images"]) == 3 and all(os.path.isfile(p) for p in out["images"]) and os.path.isfile(out["grid"])
    # the same generation in this process: the PNGs are its images, best first by the model's own
    # log p(prompt | codes), and the printed scores are those log-likelihoods
    vilg = _inference(run_dirs)
    images, codes, scores = vilg.text_to_image(["左上角有一个小红色圆形"], rerank=True, candidates=3, top_k=5)
    for path, want in zip(out["images"], images[0]):
        np.testing.assert_array_equal(read_image(path), want)
    lp = vilg.gen.caption_logprob(codes[0], ["左上角有一个小红色圆形"] * 3)
    np.testing.assert_allclose(out["scores"], lp, rtol=0, atol=1e-4)
    assert list(lp) == sorted(lp, reverse=True)
    # a user's scorer sees every candidate's pixels; keep=2 then returns the two it ranks first
    def darkest_first(texts, ims):
        assert len(ims) == 3 and all(im.shape == images[0, 0].shape for im in ims)
        return [-float(im.mean()) for im in ims]
    kept, codes2, scores2 = vilg.text_to_image(["左上角有一个小红色圆形"], rerank=True, candidates=3, top_k=5,
                                              scorer=darkest_first, keep=2)
    assert kept.shape[:2] == (1, 2) and codes2.shape[:2] == (1, 3)
    np.testing.assert_array_equal(scores2[0], sorted(scores2[0], reverse=True))
    np.testing.assert_array_equal(kept[0], vilg.decode(codes2[0, :2]))
    np.testing.assert_allclose(-scores2[0], [im.mean() for im in vilg.decode(codes2[0])])


def _inference(run_dirs):
    from ppvilg.inference import ViLGInference
    return ViLGInference.from_checkpoint(str(run_dirs / "vilg"))


def test_infer_caption_and_answer(run_dirs):
    r = _run("tools/infer.py", str(run_dirs / "vilg"), "--image", str(run_dirs / "red.png"), "--json",
             "--method", "greedy", "--max-len", "6")
    assert r.returncode == 0, r.stderr
    vilg = _inference(run_dirs)
    want = vilg.caption([read_image(str(run_dirs / "red.png"))], caption_method="greedy", max_len=6)[0]["text"]
    assert json.loads(r.stdout.strip().splitlines()[-1])["text"] == want
    assert json.loads(r.stdout.strip().splitlines()[-1])["unknown_words"] == [] and "warning" not in r.stderr
    r = _run("tools/infer.py", str(run_dirs / "vilg"), "--image", str(run_dirs / "red.png"), "--question", "什么颜色🙂",
             "--json", "--max-len", "4")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["question"] == "什么颜色🙂" and out["unknown_words"] == ["🙂"]   # a word the vocabulary lacks is named
    assert "warning: the model's vocabulary" in r.stderr and "'🙂'" in r.stderr


def test_infer_takes_its_sampler_defaults_from_the_checkpoint(run_dirs):
    from ppvilg.config import load_resolved
    from ppvilg.checkpoints import resolve_checkpoint
    from ppvilg_deploy.decoding import SamplerSettings
    ev = load_resolved(os.path.join(resolve_checkpoint(str(run_dirs / "vilg")), "config.yaml")).Eval
    r = _run("tools/infer.py", str(run_dirs / "vilg"), "--image", str(run_dirs / "red.png"), "--json",
             "--max-len", "3", "--temperature", "0")
    assert r.returncode == 0, r.stderr
    used = json.loads(r.stdout.strip().splitlines()[-1])["sampler"]
    assert used == SamplerSettings.from_mapping(ev).replace(max_len=3, temperature=0.0).to_dict()
    assert used["temperature"] == 0.0 and used["caption_method"] == ev.caption_method
    for flag, value, message in (("--top-p", "0", "--top-p must be a number in (0, 1]"),
                                 ("--num", "0", "--num must be an integer >= 1"),
                                 ("--beam-size", "0", "--beam-size must be an integer >= 1"),
                                 ("--max-len", "-1", "--max-len must be an integer >= 1 or None"),
                                 ("--top-k", "-3", "--top-k must be an integer >= 0 (0: off)"),
                                 ("--temperature", "-1", "--temperature must be a number >= 0")):
        r = _run("tools/infer.py", str(run_dirs / "vilg"), "--text", "红色", flag, value)
        assert r.returncode == 2 and message in r.stderr, (flag, r.stderr[-500:])
    r = _run("tools/infer.py", str(run_dirs / "vilg"), "--text", "")
    assert r.returncode == 2 and "--text is empty" in r.stderr


def test_infer_errors_are_clear(run_dirs, tmp_path):
    r = _run("tools/infer.py", str(tmp_path / "nope"), "--text", "x")
    assert r.returncode == 2 and "not a ppvilg checkpoint" in r.stderr
    r = _run("tools/infer.py", str(run_dirs / "vq"), "--text", "x")
    assert r.returncode == 2 and "this needs a 'vilg' one" in r.stderr
    (tmp_path / "bad.png").write_text("no")
    r = _run("tools/infer.py", str(run_dirs / "vilg"), "--image", str(tmp_path / "bad.png"))
    assert r.returncode == 2 and "bad.png" in r.stderr
    r = _run("tools/infer.py", str(run_dirs / "vilg"), "--text", "红" * 40)
    assert r.returncode == 2 and "the model allows 16" in r.stderr


def test_shapes_report_scores_what_it_wrote(run_dirs, tmp_path):
    r = _run("tools/shapes_report.py", "-c", "configs/tests/vilg_tiny.yaml", "-o", f"Global.output_dir={run_dirs / 'vilg'}",
             "-o", f"ImageTokenizer.checkpoint={run_dirs / 'vq'}", "--out", str(tmp_path), "--num-prompts", "6",
             "--num", "2")
    assert r.returncode == 0, r.stderr
    rep = json.loads((tmp_path / "report.json").read_text())
    assert rep["split"] == "test" and rep["num_prompts"] == 6 and rep["sampler"]["candidates"] == 2
    assert rep["vq_psnr"] > 0 and len(os.listdir(tmp_path / "t2i")) == 6
    # recomputed here from what the report wrote and the test split's truth
    from ppvilg.data.shapes import ShapesPairs
    from ppvilg.metrics.shapes_reader import attribute_accuracy, read_image as read_shape
    truth = [ShapesPairs("test", 6, 16, "both", 0).item(i)["attrs"] for i in range(6)]
    read = [read_shape(read_image(str(tmp_path / "t2i" / f"{k:03d}.png"))) for k in range(6)]
    acc, per = attribute_accuracy(read, truth)
    assert rep["t2i_attribute_accuracy"] == pytest.approx(acc) and rep["t2i_per_attribute"] == per
    assert rep["t2i_all_correct"] == pytest.approx(np.mean([r == t for r, t in zip(read, truth)]))
    assert [e["truth"] for e in rep["examples"]] == truth
    lo, hi = rep["intervals"]["t2i"]["all_correct"]
    assert 0 <= lo <= rep["t2i_all_correct"] <= hi <= 1
    # the tokenizer's reconstructions of the real images, read back: recomputed through the image tokenizer
    from ppvilg.checkpoints import load_image_tokenizer
    from ppvilg_deploy.images import to_tensor_array, to_uint8_image
    vq = load_image_tokenizer(str(run_dirs / "vq"))[0]
    real = np.stack([to_tensor_array(ShapesPairs("test", 6, 16, "both", 0).item(i)["image"]) for i in range(6)])
    recon = vq.decode_codes(vq.encode(paddle.to_tensor(real))).numpy()
    read = [read_shape(to_uint8_image(a)) for a in recon]
    acc, per = attribute_accuracy(read, truth)
    assert rep["vq_readback_attribute_accuracy"] == pytest.approx(acc) and rep["vq_readback_per_attribute"] == per
    assert rep["vq_readback_all_correct"] == pytest.approx(np.mean([r == t for r, t in zip(read, truth)]))
    assert set(rep["intervals"]["vq_readback"]) == set(rep["intervals"]["t2i"])
    # an Eval override would be ignored (the sampler is the checkpoint's): refused, naming the flags
    r = _run("tools/shapes_report.py", "-c", "configs/tests/vilg_tiny.yaml", "-o", "Eval.candidates=8")
    assert r.returncode != 0 and "-o Eval.candidates=8" in r.stderr and "--num" in r.stderr


def test_report_intervals_by_hand():
    """Wilson's interval for 8 of 10 (worked out from its formula) and a bootstrap that covers the mean."""
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    from shapes_report import mean_interval, proportion_interval
    z, k, n = 1.959963984540054, 8, 10
    p = k / n
    centre, half = (p + z * z / (2 * n)) / (1 + z * z / n), z / (1 + z * z / n) * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    assert proportion_interval(8, 10) == [round(centre - half, 4), round(centre + half, 4)]
    lo, hi = mean_interval([0.0, 0.25, 0.5, 1.0, 1.0, 1.0, 0.75, 1.0])
    assert lo < np.mean([0.0, 0.25, 0.5, 1.0, 1.0, 1.0, 0.75, 1.0]) < hi and 0 <= lo and hi <= 1


@pytest.mark.skipif(not os.path.isfile(__import__("ppvilg.metrics.inception", fromlist=["x"]).default_weights_path()),
                    reason="FID weights absent (python tools/get_fid_weights.py; .ci/run fetches them)")
def test_eval_tool_fid_and_caption_metrics(run_dirs, tmp_path):
    r = _run("tools/eval.py", "-c", "configs/tests/vilg_tiny.yaml", "-o", f"Global.output_dir={run_dirs / 'vilg'}",
             "-o", f"ImageTokenizer.checkpoint={run_dirs / 'vq'}", "-o", "Data.eval.source=shapes",
             "-o", "Data.eval.split=heldout", "-o", "Data.eval.num_samples=16", "-o", "Eval.num_samples=16",
             "-o", f"Eval.fid_cache={tmp_path}", "-o", "Eval.caption_method=greedy", "--task", "all")
    assert r.returncode == 0, r.stderr[-2000:]
    t2i = json.loads((run_dirs / "vilg" / "eval" / "eval_t2i.json").read_text())
    i2t = json.loads((run_dirs / "vilg" / "eval" / "eval_i2t.json").read_text())
    assert t2i["num_images"] == 16 and t2i["fid"] > 0 and not t2i["real_stats_cached"]
    for k in ("bleu4", "rouge_l", "cider"):
        assert k in i2t and i2t[k] >= 0
    assert ("meteor" in i2t) or ("meteor_unavailable" in i2t)
    assert (run_dirs / "vilg" / "eval" / "eval_t2i.md").exists()
