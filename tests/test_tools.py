import json
import os
import subprocess
import sys

import numpy as np
import paddle
import pytest

from conftest import ROOT
from ppvilg.config import load_config
from ppvilg.data.datasets import build_dataset
from ppvilg.data.shards import CodeShards, ShardError, tokenize_to_shards
from ppvilg.engine.tasks import build_task
from ppvilg.engine.trainer import Trainer
from ppvilg.checkpoints import load_image_tokenizer

TINY = os.path.join(ROOT, "configs/tests/vqgan_tiny.yaml")


def _run(*args):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)


def test_train_rejects_an_unknown_key_at_once():
    r = _run("tools/train.py", "-c", "configs/demo/vqgan_shapes.yaml", "-o", "Global.no_such_key=1")
    assert r.returncode == 2 and "no_such_key" in r.stderr and "Traceback" not in r.stderr


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    cfg = load_config(TINY, [f"Global.output_dir={out}", "Train.max_steps=3"])
    Trainer(cfg, build_task(cfg)).fit()
    return out


def test_train_and_eval_tools_end_to_end(tiny_run, tmp_path):
    r = _run("tools/eval.py", "-c", TINY, "-o", f"Global.output_dir={tiny_run}")
    assert r.returncode == 0, r.stderr
    result = json.loads((tiny_run / "eval" / "eval.json").read_text())
    assert result["step"] == 3 and result["num_images"] == 16 and 0 < result["psnr"] < 100
    assert 0 < result["codebook_usage"] <= 1 and (tiny_run / "eval" / "eval.md").exists()


def test_tokenize_shards_resume_after_interruption(tiny_run, tmp_path):
    cfg = load_config(TINY, [f"Global.output_dir={tiny_run}", "Data.train.num_samples=21"])
    model, _, folder = load_image_tokenizer(str(tiny_run))
    full, part = tmp_path / "full", tmp_path / "part"
    index = tokenize_to_shards(model, folder, build_dataset(cfg.Data.train, 16), str(full), shard_size=8, batch_size=4)
    assert index["complete"] and index["num_items"] == 21 and [s["count"] for s in index["shards"]] == [8, 8, 5]
    tokenize_to_shards(model, folder, build_dataset(cfg.Data.train, 16), str(part), shard_size=8, batch_size=4)
    # simulate a run that stopped after its first shard
    idx = json.loads((part / "index.json").read_text())
    for s in idx["shards"][1:]:
        os.remove(part / s["file"])
    idx.update(shards=idx["shards"][:1], num_items=8, complete=False)
    (part / "index.json").write_text(json.dumps(idx))
    with pytest.raises(ShardError, match="incomplete"):
        CodeShards(str(part))
    tokenize_to_shards(model, folder, build_dataset(cfg.Data.train, 16), str(part), shard_size=8, batch_size=4)
    a, b = CodeShards(str(full)), CodeShards(str(part))
    assert len(a) == len(b) == 21 and (a.codes == b.codes).all() and a.text == b.text
    item = a.item(20)
    assert item["index"] == 20 and set(item["meta"]) == {"color", "shape", "position", "size", "qa"}
    assert item["meta"]["qa"] == build_dataset(cfg.Data.train, 16).qa(20) and len(item["meta"]["qa"]) == 12
    x = paddle.to_tensor(build_dataset(cfg.Data.train, 16)[20]["image"][None])
    assert (model.encode(x).numpy()[0] == item["codes"]).all()
    other = load_config(TINY, [f"Global.output_dir={tiny_run}", "Data.train.num_samples=5"])
    with pytest.raises(ShardError, match="another tokenizer"):
        tokenize_to_shards(model, folder, build_dataset(other.Data.train, 16), str(full), shard_size=8, batch_size=4)
    index = tokenize_to_shards(model, folder, build_dataset(other.Data.train, 16), str(full), shard_size=8, batch_size=4,
                               overwrite=True)
    assert index["num_items"] == 5 and len(CodeShards(str(full))) == 5
    assert sorted(os.listdir(full)) == ["index.json", "shard_00000.npz"]


def test_prepare_photos_manifest_reads_back(tmp_path):
    r = _run("tools/prepare_data.py", "photos", "--out", str(tmp_path / "photos"))
    assert r.returncode == 0, r.stderr
    from ppvilg.data.pairs import read_manifest
    from ppvilg.data.images import read_image
    pairs = read_manifest(str(tmp_path / "photos" / "manifest.jsonl"))
    assert len(pairs) == 40 and any("猫" in p.text for p in pairs)
    img = read_image(pairs[0].image)
    assert img.ndim == 3 and img.shape[2] == 3 and img.dtype == np.uint8
