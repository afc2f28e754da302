"""Generative VQA training: only answer tokens are trained, questions ride along from the data, the loss is
the model's own cross-entropy over the answer, and a tiny run learns to answer."""
import json
import os

import numpy as np
import paddle
import paddle.nn.functional as F
import pytest

from conftest import ROOT
from ppvilg.config import ConfigError, load_config
from ppvilg.data.pairs import qa_from_meta, read_jsonl, ManifestError
from ppvilg.data.shapes import QUESTION_TYPES, ShapesPairs, normalize_answer
from ppvilg.engine.tasks import build_task
from ppvilg.engine.trainer import Trainer
from ppvilg.engine.vilg_task import PairBatcher
from ppvilg.utils.runtime import seed_everything

TINY = os.path.join(ROOT, "configs/tests/vilg_tiny.yaml")
VQ_TINY = os.path.join(ROOT, "configs/tests/vqgan_tiny.yaml")   # a Data section without a tokenizer


def _cfg(tiny_shards, out, *extra):
    return load_config(TINY, [f"Global.output_dir={out}", f"Data.train.path={tiny_shards / 'train'}",
                              f"Data.eval.path={tiny_shards / 'eval'}", "Loss.vqa_weight=1.0", *extra])


def test_shapes_questions_have_exact_answers():
    data = ShapesPairs("train", 40)
    for i in range(40):
        _, attrs = data.attrs(i)
        qa = data.questions(i)
        assert {q["type"] for q in qa} == set(QUESTION_TYPES) and {q["lang"] for q in qa} == {"zh", "en"}
        en = {q["type"]: q["answer"] for q in qa if q["lang"] == "en" and q["type"] != "yesno"}
        assert en == {"color": attrs["color"], "shape": attrs["shape"], "position": attrs["position"],
                      "size": attrs["size"]}
        yes = [q for q in qa if q["type"] == "yesno" and q["answer"] in ("yes", "有")]
        no = [q for q in qa if q["type"] == "yesno" and q["answer"] in ("no", "没有")]
        assert len(yes) == len(no) == 2
        assert f"{attrs['color']} {attrs['shape']}" in [q for q in yes if q["lang"] == "en"][0]["question"]
        assert f"{attrs['color']} {attrs['shape']}" not in [q for q in no if q["lang"] == "en"][0]["question"]
    assert normalize_answer(" Top-Left! ") == "topleft" and normalize_answer("没有。") == "没有"


def test_manifest_questions_are_read_and_bad_ones_name_the_line(tmp_path):
    (tmp_path / "a.png").write_bytes(b"")
    good = tmp_path / "good.jsonl"
    good.write_text('{"image": "a.png", "text": "一只猫", "question": "什么动物", "answer": "猫"}\n'
                    '{"image": "a.png", "text": "cat", "qa": [{"question": "what?", "answer": "a cat", "type": "what"},'
                    ' {"question": "how many?", "answer": "one"}]}\n'
                    '{"image": "a.png", "text": "no questions"}\n', encoding="utf-8")
    pairs = read_jsonl(str(good))
    assert [p.qa for p in pairs] == [[{"question": "什么动物", "answer": "猫"}],
                                     [{"question": "what?", "answer": "a cat", "type": "what"},
                                      {"question": "how many?", "answer": "one"}], []]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"image": "a.png", "text": "x"}\n{"image": "a.png", "text": "x", "question": "q", "answer": 3}\n',
                   encoding="utf-8")
    with pytest.raises(ManifestError, match=r"bad.jsonl:2: 'question' and 'answer'"):
        read_jsonl(str(bad))
    with pytest.raises(ValueError, match="question 0"):
        qa_from_meta({"qa": [{"question": "q"}]})


def test_fmiqa_questions_join_the_caption_pairs_of_their_image(tmp_path):
    """Data.<split>.questions: FMIQA-format questions (by file name, or a bare COCO id) join every caption pair of
    their image; questions about other images are left out with a warning; none matching is an error naming the
    file; the dataset (and so training, shards and tools/eval.py --task vqa) sees them as the pairs' questions."""
    from ppvilg.data.datasets import PairDataset
    from ppvilg.data.images import write_png
    for name in ("COCO_val2014_000000000042", "COCO_val2014_000000000007"):
        write_png(str(tmp_path / f"{name}.jpg"), np.zeros((8, 8, 3), np.uint8))
    coco = {"images": [{"id": 42, "file_name": "COCO_val2014_000000000042.jpg"},
                       {"id": 7, "file_name": "COCO_val2014_000000000007.jpg"}],
            "annotations": [{"id": 1, "image_id": 42, "caption": "一只猫"}, {"id": 2, "image_id": 42, "caption": "猫"},
                            {"id": 3, "image_id": 7, "caption": "一条狗"}]}
    (tmp_path / "captions.json").write_text(json.dumps(coco, ensure_ascii=False), encoding="utf-8")
    fm = {"train": [{"image_id": "COCO_val2014_000000000042", "Question": {"Chinese": "这是什么动物?"},
                     "Answer": {"Chinese": "猫"}},
                    {"image_id": "42", "question": "有几只?", "answer": "一只"},
                    {"image_id": "COCO_val2014_000000000099", "question": "别的图?", "answer": "是"}]}
    (tmp_path / "fm.json").write_text(json.dumps(fm, ensure_ascii=False), encoding="utf-8")
    cfg = load_config(VQ_TINY, ["Data.eval.source=coco", f"Data.eval.path={tmp_path / 'captions.json'}",
                             f"Data.eval.questions={tmp_path / 'fm.json'}", "Data.eval.questions_split=train"])
    ds = PairDataset(cfg.Data.eval, 8)
    want = [{"question": "这是什么动物?", "answer": "猫"}, {"question": "有几只?", "answer": "一只"}]
    assert [ds.qa(i) for i in range(len(ds))] == [want, want, []]
    assert ds[0]["qa"] == want and ds[2]["qa"] == []
    (tmp_path / "other.json").write_text(json.dumps([{"image_id": "COCO_val2014_000000000099", "question": "q",
                                                      "answer": "a"}]), encoding="utf-8")
    other = load_config(VQ_TINY, ["Data.eval.source=coco", f"Data.eval.path={tmp_path / 'captions.json'}",
                               f"Data.eval.questions={tmp_path / 'other.json'}"])
    with pytest.raises(ManifestError, match=r"other.json: none of its 1 questions"):
        PairDataset(other.Data.eval, 8)
    with pytest.raises(ConfigError, match="Data.train.questions joins questions"):
        load_config(VQ_TINY, [f"Data.train.questions={tmp_path / 'fm.json'}"])


def test_vqa_loss_is_the_cross_entropy_of_the_answer_tokens_only(tiny_shards, tmp_path):
    cfg = _cfg(tiny_shards, tmp_path)
    seed_everything(0)
    task = build_task(cfg)
    task.model.eval()
    b = task.batcher
    codes = np.random.default_rng(0).integers(0, 64, [2, 8, 8])
    qs, ans = ["这个图形是什么颜色?", "where is the shape?"], ["红色", "top left"]
    ids, valid, labels = b.vqa(codes, qs, ans)
    lay = b.vqa_layout
    t0 = lay.target_slice().start
    ans_ids = [task.text_tokenizer.encode(a) for a in ans]
    for k in range(2):   # labels: exactly the answer's tokens and [SEP]; the answer enters shifted after [CLS]
        assert labels[k][labels[k] >= 0].tolist() == ans_ids[k]
        assert ids[k, t0] == task.text_tokenizer.bos_id and ids[k, t0 + 1:t0 + len(ans_ids[k])].tolist() == ans_ids[k][:-1]
    *_, l_vqa, lab_vqa, _ = task.losses(codes, ["红色圆形", "a circle"], vqa=(np.arange(2), qs, ans))
    np.testing.assert_array_equal(lab_vqa, labels[:, :lab_vqa.shape[1]])   # training cuts the unfilled text slots
    assert (labels[:, lab_vqa.shape[1]:] == -100).all()
    logits, _ = task.model(paddle.to_tensor(ids), valid, lay)
    nll = F.cross_entropy(logits, paddle.to_tensor(labels).unsqueeze(-1), ignore_index=-100, reduction="none")
    want = float(nll.sum()) / int((labels >= 0).sum())
    assert float(l_vqa) == pytest.approx(want, rel=1e-5)
    # the question is part of the source: another question changes the answer's loss
    *_, other, _, _ = task.losses(codes, ["红色圆形", "a circle"], vqa=(np.arange(2), ["它是大还是小?"] * 2, ans))
    assert abs(float(other) - float(l_vqa)) > 1e-4


def test_pick_questions_draws_one_per_item_and_respects_the_fraction():
    qa = [[{"question": "a", "answer": "1"}, {"question": "b", "answer": "2"}], [], [{"question": "c", "answer": "3"}]]
    rows, qs, ans = PairBatcher.pick_questions(qa)
    assert rows.tolist() == [0, 2] and qs == ["a", "c"] and ans == ["1", "3"]
    u = np.array([[0.9, 0.1], [0.5, 0.5], [0.2, 0.7]])
    rows, qs, _ = PairBatcher.pick_questions(qa, u, fraction=0.5)
    assert rows.tolist() == [0] and qs == ["b"]          # item 2 drew 0.7 >= 0.5: not this step
    assert PairBatcher.pick_questions(qa, u, fraction=1.0)[0].tolist() == [0, 2]


def test_pick_questions_type_weights_set_how_often_each_type_is_drawn():
    qa = [[{"question": "c?", "answer": "red", "type": "color"}, {"question": "y?", "answer": "yes", "type": "yesno"},
           {"question": "n?", "answer": "no", "type": "yesno"}, {"question": "free?", "answer": "x"}]]
    # weights color 1, yesno 3 (each), untyped 1 -> cumulative 1, 4, 7, 8 of 8: draws below 1/8 ask the colour
    # question, up to 4/8 the first yes/no, up to 7/8 the second, the rest the untyped one
    weights = {"yesno": 3.0}
    picks = [PairBatcher.pick_questions(qa, np.array([[u, 0.0]]), 1.0, weights)[1][0]
             for u in (0.0, 0.12, 0.13, 0.49, 0.51, 0.87, 0.88, 0.999)]
    assert picks == ["c?", "c?", "y?", "y?", "n?", "n?", "free?", "free?"]
    # over many draws the shares follow the weights (1 : 6 : 1 for colour, yes/no, untyped)
    u = np.random.default_rng(0).random((4000, 2))
    drawn = [PairBatcher.pick_questions(qa, u[k:k + 1], 1.0, weights)[1][0] for k in range(4000)]
    share = np.mean([q in ("y?", "n?") for q in drawn])
    assert abs(share - 6 / 8) < 0.03
    # weight 0 never draws a type; an item whose questions all weigh 0 takes no part
    assert all(PairBatcher.pick_questions(qa, u[k:k + 1], 1.0, {"yesno": 0})[1][0] in ("c?", "free?")
               for k in range(200))
    assert len(PairBatcher.pick_questions(qa, u[:1], 1.0, {"yesno": 0, "color": 0, None: 0})[0]) == 0
    with pytest.raises(ConfigError, match="vqa_type_weights"):
        load_config(TINY, ["Loss.vqa_type_weights={yesno: -1}"])
    assert load_config(TINY, ["Loss.vqa_type_weights={yesno: 4}"]).Loss.vqa_type_weights["yesno"] == 4


def test_vqa_joins_at_its_start_step(tiny_shards, tmp_path):
    from ppvilg.data.datasets import build_dataset, eval_batches
    cfg = _cfg(tiny_shards, tmp_path, "Loss.vqa_start=5")
    task = build_task(cfg)
    batch = next(eval_batches(build_dataset(cfg.Data.train, cfg.Data.image_size), 4))
    assert all(batch["qa"]) and "vqa_loss" not in task.phase_loss("model", batch, 4)[1]
    assert "vqa_loss" in task.phase_loss("model", batch, 5)[1]


def test_vqa_type_weights_reach_the_training_step(tiny_shards, tmp_path):
    from ppvilg.data.datasets import build_dataset, eval_batches
    none = "{" + ", ".join(f"{t}: 0" for t in QUESTION_TYPES) + "}"     # every type of the shapes questions
    task = build_task(_cfg(tiny_shards, tmp_path, f"Loss.vqa_type_weights={none}"))
    batch = next(eval_batches(build_dataset(task.cfg.Data.train, task.cfg.Data.image_size), 4))
    assert all(batch["qa"]) and "vqa_loss" not in task.phase_loss("model", batch, 0)[1]
    only_yesno = none.replace("yesno: 0", "yesno: 1")
    task = build_task(_cfg(tiny_shards, tmp_path, f"Loss.vqa_type_weights={only_yesno}"))
    assert "vqa_loss" in task.phase_loss("model", batch, 0)[1]


def test_vqa_trains_from_the_shards_questions_and_is_evaluated(tiny_shards, tmp_path):
    from ppvilg.data.datasets import build_dataset
    cfg = _cfg(tiny_shards, tmp_path, "Train.max_steps=30", "Train.batch_size=8", "Train.eval_every=30",
               "Eval.num_visuals=0")
    seed_everything(0)
    task = build_task(cfg)
    before = task.evaluate(build_dataset(cfg.Data.eval, cfg.Data.image_size))[0]["vqa_loss"]
    metrics = Trainer(cfg, task).fit()
    assert np.isfinite(metrics["vqa_loss"]) and metrics["vqa_loss"] < before - 1.0, (before, metrics["vqa_loss"])
    with pytest.raises(ConfigError, match="vqa_fraction"):
        load_config(TINY, ["Loss.vqa_fraction=0"])


def test_eval_vqa_scores_exact_match_per_type_against_any_given_answer(run_dirs, tmp_path):
    """tools/eval.py --task vqa on a manifest: a question asked about the same image on two lines keeps both
    answers; exact match (after normalize_answer) against any of them, per type where given; giving the model's
    own answer (other case, punctuation added) as a reference turns exactly that question right."""
    import shutil
    from ppvilg.data.images import write_png
    from tools.eval import main as eval_main
    shutil.copy(run_dirs / "red.png", tmp_path / "a.png")
    blue = np.zeros((16, 16, 3), np.uint8)
    blue[2:9, 8:15] = (40, 60, 240)
    write_png(str(tmp_path / "b.png"), blue)
    lines = [{"image": "a.png", "text": "红色", "qa": [{"question": "什么颜色", "answer": "红色", "type": "color"},
                                                       {"question": "大还是小", "answer": "小", "type": "size"}]},
             {"image": "a.png", "text": "red", "question": "什么颜色", "answer": "Crimson"},
             {"image": "b.png", "text": "蓝色", "question": "什么颜色", "answer": "蓝色"}]

    def run(extra_lines, name):
        manifest = tmp_path / f"{name}.jsonl"
        manifest.write_text("".join(json.dumps(x, ensure_ascii=False) + "\n" for x in lines + extra_lines),
                            encoding="utf-8")
        out = tmp_path / name
        eval_main(["-c", TINY, "-o", f"Global.checkpoint={run_dirs / 'vilg'}", "-o", f"Global.output_dir={out}",
                   "-o", f"ImageTokenizer.checkpoint={run_dirs / 'vq'}", "-o", "Data.eval.source=manifest",
                   "-o", f"Data.eval.path={manifest}", "--task", "vqa"])
        return json.loads((out / "eval" / "eval_vqa.json").read_text(encoding="utf-8"))

    first = run([], "first")
    ex = first["examples"]
    assert first["num_questions"] == 3 and first["num_images"] == 2
    assert [(e["question"], e["expected"]) for e in ex] == [("什么颜色", ["红色", "Crimson"]), ("大还是小", ["小"]),
                                                              ("什么颜色", ["蓝色"])]
    right = [normalize_answer(e["answer"]) in {normalize_answer(x) for x in e["expected"]} for e in ex]
    assert first["exact_match"] == pytest.approx(np.mean(right))
    assert first["exact_match_by_type"] == {"color": float(right[0]), "size": float(right[1])}
    assert {"bleu4", "rouge_l", "cider"} <= set(first)
    own = ex[2]["answer"]
    assert normalize_answer(own) and not right[2], own   # the random tiny model does not say 蓝色
    second = run([{"image": "b.png", "text": "x", "question": "什么颜色", "answer": own.upper() + " !"}], "second")
    assert second["examples"][2]["expected"] == ["蓝色", own.upper() + " !"]
    assert second["exact_match"] == pytest.approx(first["exact_match"] + 1 / 3)
