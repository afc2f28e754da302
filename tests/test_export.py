"""Exported programs == dynamic graph, and deploy/python == tools/infer.py, on a tiny trained checkpoint.

Tolerance for logits: 1e-4 absolute (the same float32 kernels; the exported step places the cache with a
one-hot matmul and adds the key padding to the mask instead of selecting it, so sums run in another order)."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import yaml

from conftest import ROOT
sys.path.insert(0, os.path.join(ROOT, "deploy", "python"))
from ppvilg_deploy.decoding import SamplerSettings  # noqa: E402
from ppvilg_deploy.predictor import DeployPipeline, ExportError  # noqa: E402

TOL = 1e-4


def test_the_folder_is_self_contained(exported):
    _, dep, out = exported
    assert sorted(os.listdir(out)) == ["inference.yml", "masks.npz", "sample_image", "score_text", "step_image",
                                       "step_text", "vocab.txt", "vq_decoder", "vq_encoder"]
    assert dep.sampler.top_k == 5 and dep.reconstructor == "vq_decoder"
    with pytest.raises(ExportError, match="inference.yml"):
        DeployPipeline(str(out / "step_text"))


def test_a_folder_of_an_older_format_is_refused_with_the_command_to_export_again(exported, tmp_path):
    """Format 3 summed score_text's log-probabilities in the program; this runtime needs them per token."""
    _, _, out = exported
    info = yaml.safe_load((out / "inference.yml").read_text(encoding="utf-8"))
    for fmt, hint in (("ppvilg-inference/3", True), ("ppvilg-inference/2", True), ("something-else/1", False)):
        (tmp_path / "inference.yml").write_text(yaml.safe_dump(dict(info, format=fmt)), encoding="utf-8")
        with pytest.raises(ExportError, match="this runtime reads 'ppvilg-inference/4'") as e:
            DeployPipeline(str(tmp_path))
        assert ("tools/export_model.py" in str(e.value)) == hint, str(e.value)


def test_exported_scores_and_rerank_equal_the_dynamic_graph(exported):
    """score_text == Generator.caption_logprob (teacher-forced log p(text | image)), so both rerank alike."""
    pipe, dep, _ = exported
    rng = np.random.default_rng(3)
    codes = rng.integers(0, 64, [2, 3, 8, 8])
    texts = ["左上角有一个小红色圆形", "a big blue square on the right"]
    want = pipe.gen.caption_logprob(codes.reshape([6, -1]), [t for t in texts for _ in range(3)])
    got = dep.caption_logprob(codes.reshape([6, -1]), [t for t in texts for _ in range(3)], chunk=4)
    np.testing.assert_allclose(got, want, atol=1e-3, rtol=1e-5)
    assert len(set(np.round(got, 3))) == 6          # the texts and images matter
    order, scores = dep.rerank(texts, codes)
    np.testing.assert_array_equal(order, pipe.gen.rerank(texts, codes)[0])
    # per token too, so the token-probability score (rerank_score token_prob) is the same in both
    got_t, w_t = dep.caption_token_logprobs(codes.reshape([6, -1]), [t for t in texts for _ in range(3)], chunk=4)
    want_t, _ = pipe.gen.caption_token_logprobs(codes.reshape([6, -1]), [t for t in texts for _ in range(3)])
    np.testing.assert_allclose(got_t, want_t, atol=1e-4, rtol=1e-5)
    assert (got_t[w_t == 0] == 0).all() and (got_t[w_t > 0] < 0).all()
    o_dep, s_dep = dep.rerank(texts, codes, "token_prob")
    o_dyg, s_dyg = pipe.gen.rerank(texts, codes, how="token_prob")
    np.testing.assert_allclose(s_dep, s_dyg, atol=1e-4)
    np.testing.assert_array_equal(o_dep, o_dyg)
    images, got_codes, got_scores = dep.text_to_image(texts, candidates=3, top_k=5, seed=4, rerank=True)
    raw = pipe.gen.text_to_image(texts, candidates=3, top_k=5, seed=4)
    o, s = pipe.gen.rerank(texts, raw)
    np.testing.assert_array_equal(got_codes, raw[np.arange(2)[:, None], o])
    np.testing.assert_allclose(got_scores, np.take_along_axis(s, o, 1), atol=1e-3, rtol=1e-5)
    assert (np.diff(got_scores, axis=1) <= 0).all()
    # the sampler's rerank_score reaches the reranking in both backends (ViLGInference and DeployPipeline)
    _, codes_p, scores_p = dep.text_to_image(texts, candidates=3, top_k=5, seed=4, rerank=True,
                                             rerank_score="token_prob")
    _, codes_v, scores_v = pipe.text_to_image(texts, rerank=True, candidates=3, top_k=5, seed=4,
                                              rerank_score="token_prob")
    o_p = pipe.gen.rerank(texts, raw, how="token_prob")[0]
    np.testing.assert_array_equal(codes_p, raw[np.arange(2)[:, None], o_p])
    np.testing.assert_array_equal(codes_v, codes_p)
    np.testing.assert_allclose(scores_v, scores_p, atol=1e-4)
    n_tokens = w_t.reshape([2, 3, -1]).sum(-1)                  # each text's tokens, [SEP] included
    assert (scores_p > 0).all() and (scores_p <= n_tokens).all()   # probabilities: at most one per token
    # the exported VQ decoder sums in another order: a pixel may round the other way
    np.testing.assert_allclose(images.astype(int), pipe.decode(got_codes).astype(int), atol=1, rtol=0)
    # keep=1: the same draw and ranking, only the best candidate's image decoded, in both backends
    best_dep, codes_1, scores_1 = dep.text_to_image(texts, candidates=3, top_k=5, seed=4, rerank=True, keep=1)
    np.testing.assert_array_equal(codes_1, got_codes)
    np.testing.assert_array_equal(scores_1, got_scores)
    np.testing.assert_array_equal(best_dep, images[:, :1])
    best_dyg, codes_v1, _ = pipe.text_to_image(texts, rerank=True, candidates=3, top_k=5, seed=4, keep=1)
    np.testing.assert_array_equal(codes_v1, got_codes)
    np.testing.assert_array_equal(best_dyg, pipe.decode(got_codes[:, :1]))
    for bad in (0, 4, 1.5):
        with pytest.raises(ValueError, match="keep must be an integer from 1 to the 3 candidates"):
            dep.text_to_image(texts, candidates=3, keep=bad)


def test_one_seed_per_text_gives_each_text_what_it_gets_alone(exported):
    """Per-text generators (a server batching requests): a prompt's codes do not depend on its neighbours."""
    _, dep, _ = exported
    texts, seeds = ["红色圆形", "a big blue square", "绿色三角形"], [11, 5, 11]
    both = dep.sample_codes(texts, dep.sampler.replace(candidates=2, top_k=8, cfg_scale=1.5), seeds=seeds)
    for k, (t, sd) in enumerate(zip(texts, seeds)):
        alone = dep.sample_codes([t], dep.sampler.replace(candidates=2, top_k=8, cfg_scale=1.5, seed=sd))
        np.testing.assert_array_equal(both[k], alone[0])
    assert not np.array_equal(both[0], both[2])     # same seed, other text
    with pytest.raises(ValueError, match="sequential"):
        dep.sample_codes(texts, dep.sampler.replace(decoding="sjd"), seeds=seeds)


@pytest.mark.parametrize("direction", ["t2i", "i2t", "vqa"])
def test_exported_steps_equal_dynamic_graph_logits(exported, direction):
    pipe, dep, _ = exported
    gen = pipe.gen
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 64, [2, 8, 8])
    if direction == "t2i":
        ids, valid, _ = gen.seq.text_to_image(gen.seq.text(["左上角有一个小红色圆形", "blue square"]), codes)
    else:
        dyn = gen._text_decoder(codes, None if direction == "i2t" else "什么颜色", {})
        ids, valid = dyn.ids.copy(), dyn.valid.copy()
        ids[:, dyn.t0 + 1:] = rng.integers(5, 100, ids[:, dyn.t0 + 1:].shape)
    a, b = gen.make_decoder(direction, ids, valid), dep.make_decoder(direction, ids, valid)
    for slot in range(a.t0, a.t0 + 5):  # the prefill, then single-slot steps
        np.testing.assert_allclose(b.logits_at(slot), a.logits_at(slot), atol=TOL, rtol=0)
    if direction == "t2i":  # oneDNN (an option on CPU) computes the same
        a, b = gen.make_decoder(direction, ids, valid), DeployPipeline(str(exported[2]), mkldnn=True).make_decoder(
            direction, ids, valid)
        for slot in range(a.t0, a.t0 + 3):
            np.testing.assert_allclose(b.logits_at(slot), a.logits_at(slot), atol=TOL, rtol=0)


def test_deploy_generates_what_the_dynamic_graph_generates(exported, run_dirs):
    pipe, dep, _ = exported
    texts = ["左上角有一个小红色圆形", "a big blue square"]
    want = pipe.gen.text_to_image(texts, candidates=2, top_k=5, cfg_scale=2.0, seed=7)
    images, got, scores = dep.text_to_image(texts, candidates=2, top_k=5, cfg_scale=2.0, seed=7)
    assert scores is None
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(images, pipe.decode(want))
    # speculative Jacobi decoding over the exported step (logits of a window of slots per step)
    sjd = dict(candidates=2, top_k=5, cfg_scale=2.0, seed=7, decoding="sjd", sjd_window=6)
    np.testing.assert_array_equal(dep.text_to_image(texts, **sjd)[1], pipe.gen.text_to_image(texts, **sjd))
    np.testing.assert_array_equal(dep.encode(list(images[0])), pipe.encode(list(images[0])))
    for method in ("greedy", "beam"):
        a = pipe.gen.image_to_text(want[:, 0], caption_method=method, beam_size=3)
        b = dep.decode_text(want[:, 0], SamplerSettings(caption_method=method, beam_size=3))
        assert [x["ids"] for x in a] == [x["ids"] for x in b]
    a = pipe.gen.image_to_text(want[:, 0], SamplerSettings(), question="什么颜色")
    assert [x["ids"] for x in a] == [x["ids"] for x in dep.decode_text(want[:, 0], SamplerSettings(), question="什么颜色")]


def test_deploy_cli_matches_tools_infer(exported, run_dirs):
    _, _, out = exported
    env = dict(os.environ, OMP_NUM_THREADS="1")
    img = str(run_dirs / "red.png")
    a = subprocess.run([sys.executable, "tools/infer.py", str(run_dirs / "vilg"), "--image", img, "--json",
                        "--method", "greedy"], cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    b = subprocess.run([sys.executable, "deploy/python/infer.py", "--model-dir", str(out), "--image", img, "--json",
                        "--method", "greedy"], cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    assert a.returncode == 0 and b.returncode == 0, a.stderr + b.stderr
    ja, jb = json.loads(a.stdout.strip().splitlines()[-1]), json.loads(b.stdout.strip().splitlines()[-1])
    assert ja["text"] == jb["text"]
    # unset options: the checkpoint's Eval section vs the export's (exported with -o Eval.top_k=5)
    assert ja["sampler"]["top_k"] == 0 and jb["sampler"]["top_k"] == 5
    assert ja["sampler"]["caption_method"] == jb["sampler"]["caption_method"] == "greedy"
    # a word the vocabulary has no token for is named by both, in the JSON and in a warning
    q = ["--image", img, "--question", "什么颜色🙂", "--json", "--max-len", "3"]
    a = subprocess.run([sys.executable, "tools/infer.py", str(run_dirs / "vilg"), *q], cwd=ROOT, capture_output=True,
                       text=True, env=env, timeout=300)
    b = subprocess.run([sys.executable, "deploy/python/infer.py", "--model-dir", str(out), *q], cwd=ROOT,
                       capture_output=True, text=True, env=env, timeout=300)
    for r in (a, b):
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout.strip().splitlines()[-1])["unknown_words"] == ["🙂"] and "'🙂'" in r.stderr
    # deployment never imports the training package
    probe = subprocess.run([sys.executable, "-c", f"""
import sys
sys.path.insert(0, 'deploy/python')
import cv2
from ppvilg_deploy.predictor import DeployPipeline
p = DeployPipeline({str(out)!r}, threads=1)
p.caption([cv2.imread({img!r})[:, :, ::-1]], caption_method='greedy')
p.text_to_image(['红色'], candidates=1)
assert not [m for m in sys.modules if m == 'ppvilg' or m.startswith('ppvilg.')], 'imported ppvilg'
print('ok')
"""], cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    assert probe.returncode == 0 and probe.stdout.strip() == "ok", probe.stderr[-2000:]


@pytest.mark.parametrize("settings", [dict(), dict(temperature=0.7, top_k=8, cfg_scale=1.5),
                                      dict(temperature=1.3, top_p=0.6), dict(top_k=3, top_p=0.5, cfg_scale=3.0),
                                      dict(temperature=0.0)])
def test_sampling_inside_the_program_draws_what_the_numpy_sampler_draws(settings):
    """sample_in_graph (the exported sample_image program's sampler) against ppvilg_deploy.decoding's numpy
    filter_logits + sample_from, given the same uniform numbers: the same codes, row for row."""
    import paddle
    from ppvilg.export import sample_in_graph
    from ppvilg_deploy.decoding import filter_logits, sample_from
    st = SamplerSettings(**settings)
    rng = np.random.default_rng(0)
    b, v = 64, 50
    logits = (rng.standard_normal([2 * b if st.cfg_scale != 1 else b, v]) * 3).astype(np.float32)
    mixed = logits[b:] + st.cfg_scale * (logits[:b] - logits[b:]) if st.cfg_scale != 1 else logits
    want = sample_from(filter_logits(mixed, st.temperature, st.top_k, st.top_p), np.random.default_rng(1))
    uniform = np.random.default_rng(1).random((b, 1))
    got = sample_in_graph(paddle.to_tensor(logits), paddle.to_tensor(uniform),
                          paddle.to_tensor([max(st.temperature, 1e-6)], "float64"),
                          paddle.to_tensor([st.top_k if 0 < st.top_k < v else v], "int64"),
                          paddle.to_tensor([st.top_p if st.top_p < 1 else 2.0], "float64"),
                          paddle.to_tensor([st.cfg_scale], "float32")).numpy()
    np.testing.assert_array_equal(got, want)
    assert len(set(got.tolist())) > (1 if st.temperature > 0 and st.top_k != 1 else 0)
