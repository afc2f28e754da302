"""Checkpoints never run code from a file, every file is verified, and killed writes / corrupt files are handled:
a crafted pickle is refused without being executed, a flipped bit is an error naming the file, resume=auto
falls back to the newest checkpoint that verifies, leftover temporary folders go away, and a ppvilg 0.1 pickle
checkpoint converts (explicit opt-in) into one that resumes exactly."""
import json
import os
import pickle
import random
import shutil
import subprocess
import sys

import numpy as np
import paddle
import pytest

from conftest import ROOT
from ppvilg import checkpoints as ckpt
from ppvilg.checkpoints import CheckpointError
from ppvilg.config import load_config
from ppvilg.engine.tasks import build_task
from ppvilg.engine.trainer import Trainer
from ppvilg.utils.runtime import seed_everything

TINY = os.path.join(ROOT, "configs/tests/vqgan_tiny.yaml")


def _train(out, *over):
    cfg = load_config(TINY, [f"Global.output_dir={out}", *over])
    seed_everything(cfg.Global.seed)
    trainer = Trainer(cfg, build_task(cfg))
    trainer.fit()
    return trainer


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A stage-1 run of 4 steps with checkpoints at steps 2 and 4."""
    out = tmp_path_factory.mktemp("ckpt") / "run"
    trainer = _train(out, "Train.max_steps=4", "Train.save_every=2")
    return out, trainer


class _Exploit:
    """Unpickling this creates a file (builtins.open(marker, "w")): the side effect a crafted checkpoint would
    have, with any callable in its place."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _crafted_folder(src, dst, marker):
    """A copy of a checkpoint's metadata with pickle files that would run code when unpickled."""
    os.makedirs(dst)
    for name in ("trainer_state.json", "config.yaml"):
        shutil.copy(os.path.join(src, name), os.path.join(dst, name))
    payload = pickle.dumps({"weight": _Exploit(str(marker))})
    for name in ("model.pdparams", "generator.pdopt", "rng.pkl"):
        with open(os.path.join(dst, name), "wb") as f:
            f.write(payload)


def test_a_crafted_pickle_checkpoint_is_refused_without_running_it(run, tmp_path):
    out, _ = run
    src = ckpt.resolve_checkpoint(str(out))
    marker = tmp_path / "side_effect"
    bad = tmp_path / "crafted"
    _crafted_folder(src, str(bad), marker)
    # the payload really runs code when unpickled (so its absence below means something)
    pickle.loads(open(bad / "model.pdparams", "rb").read())
    assert marker.exists()
    marker.unlink()
    with pytest.raises(CheckpointError, match="pickle format, which can run code"):
        ckpt.load_model(str(bad), "vqgan")
    cfg = load_config(TINY, [f"Global.output_dir={tmp_path / 'x'}"])
    with pytest.raises(CheckpointError, match="pickle format"):
        Trainer(cfg, build_task(cfg)).resume(str(bad))
    r = subprocess.run([sys.executable, "tools/tokenize_images.py", "-c", TINY, "-o", f"Global.checkpoint={bad}",
                        "--out", str(tmp_path / "codes")], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "pickle format" in r.stderr
    assert not marker.exists()


def test_a_flipped_bit_is_an_error_naming_the_file(run, tmp_path):
    out, _ = run
    folder = tmp_path / "copy"
    shutil.copytree(ckpt.resolve_checkpoint(str(out)), folder)
    ckpt.verify(str(folder))
    path = folder / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x04
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: SHA-256 / size mismatch"):
        ckpt.load_model(str(folder), "vqgan")
    (folder / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"model\.safetensors: missing"):
        ckpt.read_full_state(str(folder))
    (folder / "extra.safetensors").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="not listed"):
        ckpt.read_tensors(str(folder), "extra.safetensors")


def test_resume_auto_skips_a_corrupt_newest_checkpoint_and_leftovers_go(run, tmp_path):
    out, full = run
    copy = tmp_path / "run"
    shutil.copytree(out, copy)
    newest = ckpt.resolve_checkpoint(str(copy))
    assert newest.endswith("step_00000004")
    with open(os.path.join(newest, "rng.json"), "a") as f:   # a torn write
        f.write(" ")
    leftover = copy / "checkpoints" / ".tmp-step_00000006-abc"
    leftover.mkdir()
    cfg = load_config(TINY, [f"Global.output_dir={copy}", "Train.max_steps=5", "Train.save_every=2",
                             "Global.resume=auto"])
    seed_everything(cfg.Global.seed)
    trainer = Trainer(cfg, build_task(cfg))
    trainer.fit()
    assert [h["step"] for h in trainer.history] == [3, 4, 5]   # resumed from step 2, the newest that verifies
    assert [h["generator_loss"] for h in trainer.history[:2]] == [h["generator_loss"] for h in full.history[2:4]]
    assert not leftover.exists()


def _write_legacy(folder, src):
    """The same checkpoint as ppvilg 0.1 wrote it: paddle.save pickles and a pickled RNG state."""
    os.makedirs(folder)
    for name in ("trainer_state.json", "config.yaml"):
        shutil.copy(os.path.join(src, name), os.path.join(folder, name))
    for module in ("model", "disc"):
        paddle.save({k: paddle.to_tensor(v) for k, v in ckpt.read_weights(src, module).items()},
                    os.path.join(folder, f"{module}.pdparams"))
    for phase in ("generator", "discriminator"):
        paddle.save(ckpt.read_optimizer(src, phase), os.path.join(folder, f"{phase}.pdopt"))
    legacy = ckpt.rng_from_json(json.loads(ckpt.read_verified(src, "rng.json")))   # python / numpy / paddle objects
    with open(os.path.join(folder, "rng.pkl"), "wb") as f:
        pickle.dump(legacy, f)


def test_a_legacy_pickle_checkpoint_converts_on_explicit_request_and_resumes_exactly(run, tmp_path):
    from tools.convert_checkpoint import main as convert_main
    out, full = run
    src = os.path.join(out, "checkpoints", "step_00000002")
    legacy, new = str(tmp_path / "legacy"), str(tmp_path / "new")
    _write_legacy(legacy, src)
    with pytest.raises(CheckpointError, match="pickle format"):
        ckpt.read_meta(legacy)
    convert_main(["--legacy-pickle", "--src", legacy, "--dst", new])
    ckpt.verify(new)
    for module in ("model", "disc"):
        a, b = ckpt.read_weights(src, module), ckpt.read_weights(new, module)
        assert sorted(a) == sorted(b) and all((a[k] == b[k]).all() for k in a)
    cfg = load_config(TINY, [f"Global.output_dir={tmp_path / 'resumed'}", "Train.max_steps=4",
                             "Train.save_every=2", f"Global.resume={new}"])
    random.seed(123)   # resume restores every RNG from the converted state
    trainer = Trainer(cfg, build_task(cfg))
    trainer.fit()
    assert [h["generator_loss"] for h in trainer.history] == [h["generator_loss"] for h in full.history[2:]]


def test_standalone_weight_files_must_be_safetensors(tmp_path):
    from ppvilg.vq.losses import VGGPerceptual
    (tmp_path / "vgg16.pdparams").write_bytes(b"\x80\x04")
    with pytest.raises(CheckpointError, match="pickle file.*--legacy-pickle"):
        VGGPerceptual(str(tmp_path / "vgg16.pdparams"))
    (tmp_path / "bad.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}")
    with pytest.raises(CheckpointError, match="not a valid safetensors file"):
        ckpt.read_weights_file(str(tmp_path / "bad.safetensors"), "Loss.perceptual_weights")


def test_kill_9_during_training_and_checkpoint_writes_still_resumes_to_the_same_result(tmp_path):
    """A run killed with SIGKILL (checkpoints every step, so the kill often lands inside a write) and resumed
    with Global.resume=auto ends with the weights of an uninterrupted run."""
    import signal
    import time
    env = dict(os.environ, OMP_NUM_THREADS="1")
    base = ["-c", TINY, "-o", "Train.max_steps=24", "-o", "Train.save_every=1", "-o", "Train.keep_checkpoints=3",
            "-o", "Train.eval_every=0", "-o", "Global.num_threads=1"]

    def train(out, *extra):
        return subprocess.run([sys.executable, "tools/train.py", *base, "-o", f"Global.output_dir={out}", *extra],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)

    r = train(tmp_path / "full")
    assert r.returncode == 0, r.stderr[-2000:]
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "tools/train.py", *base, "-o", f"Global.output_dir={killed}"],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    latest, deadline = killed / "checkpoints" / "latest", time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if latest.exists() and latest.read_text().strip() >= "step_00000008":
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    r = train(killed, "-o", "Global.resume=auto")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resumed from" in r.stdout
    a = ckpt.read_full_state(ckpt.resolve_checkpoint(str(tmp_path / "full")))
    b = ckpt.read_full_state(ckpt.resolve_checkpoint(str(killed)))
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
