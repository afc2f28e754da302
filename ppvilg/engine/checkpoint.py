"""Checkpoints are self-describing folders, written atomically (temp folder + rename):

    step_00000100/
      model.pdparams        the main model (what infer / eval / export load)
      <name>.pdparams       other trained modules (e.g. disc.pdparams, the GAN discriminator)
      <phase>.pdopt         optimizer + LR schedule + loss-scaler state for each optimisation phase
      rng.pkl               python / numpy / paddle RNG states
      trainer_state.json    step, task, model name, paddle version, counters
      config.yaml           the resolved config of the run

`<output_dir>/checkpoints/latest` names the newest complete one. Loading is strict: a missing or unexpected
parameter, or a shape mismatch, is an error that names it.
"""
import glob
import json
import os
import pickle
import random
import shutil

import numpy as np
import paddle

from ppvilg.config import load_resolved, save_config
from ppvilg.utils.io import AtomicDir, atomic_write_json, atomic_write_text


class CheckpointError(RuntimeError):
    pass


def save_checkpoint(folder, cfg, modules, optimizers, state):
    """modules: {name: Layer} ('model' first); optimizers: {phase: dict of state dicts}; state: json-able."""
    with AtomicDir(folder) as tmp:
        for name, layer in modules.items():
            paddle.save(layer.state_dict(), os.path.join(tmp, f"{name}.pdparams"))
        for phase, opt_state in optimizers.items():
            paddle.save(opt_state, os.path.join(tmp, f"{phase}.pdopt"))
        save_rng(os.path.join(tmp, "rng.pkl"))
        atomic_write_json(os.path.join(tmp, "trainer_state.json"),
                          dict(state, paddle_version=paddle.__version__))
        save_config(cfg, os.path.join(tmp, "config.yaml"))
    return folder


def mark_latest(ckpt_dir, folder, keep):
    atomic_write_text(os.path.join(ckpt_dir, "latest"), os.path.basename(folder) + "\n")
    if keep and keep > 0:
        old = sorted(glob.glob(os.path.join(ckpt_dir, "step_*")))[:-keep]
        for f in old:
            shutil.rmtree(f, ignore_errors=True)


def resolve_checkpoint(path, output_dir=None):
    """A checkpoint folder, a run's checkpoints/ folder or run folder (-> its latest), or 'auto'."""
    if path == "auto":
        path = os.path.join(output_dir, "checkpoints")
    if os.path.isdir(path) and not os.path.isfile(os.path.join(path, "trainer_state.json")):
        for cand in (path, os.path.join(path, "checkpoints")):
            latest = os.path.join(cand, "latest")
            if os.path.isfile(latest):
                with open(latest) as f:
                    path = os.path.join(cand, f.read().strip())
                break
    if not os.path.isfile(os.path.join(path, "trainer_state.json")):
        raise CheckpointError(f"{path}: not a ppvilg checkpoint folder (no trainer_state.json; expected a "
                              "folder written by tools/train.py, e.g. output/<run>/checkpoints/step_00000100)")
    return path


def read_meta(folder):
    with open(os.path.join(folder, "trainer_state.json"), encoding="utf-8") as f:
        return json.load(f), load_resolved(os.path.join(folder, "config.yaml"))


def load_state_strict(layer, path):
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: missing (the checkpoint has no weights for this module)")
    set_state_strict(layer, paddle.load(path), path)


def set_state_strict(layer, state, origin):
    """Load `state` into `layer`; a missing or unexpected parameter or a shape mismatch is an error naming
    it and `origin` (the file or folder it came from)."""
    own = layer.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        raise CheckpointError(f"{origin}: parameters do not match the model: missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]}")
    for k, v in own.items():
        if list(v.shape) != list(state[k].shape):
            raise CheckpointError(f"{origin}: '{k}' has shape {list(state[k].shape)}, the model expects "
                                  f"{list(v.shape)}")
    layer.set_state_dict(state)


def _cuda():
    return paddle.device.is_compiled_with_cuda() and paddle.device.cuda.device_count() > 0


def save_rng(path, tracker=False):
    """Python / numpy / paddle (and CUDA) RNG states; with tracker, also Fleet's tensor-parallel RNG tracker."""
    rng = {"python": random.getstate(), "numpy": np.random.get_state(), "paddle": paddle.get_rng_state()}
    if _cuda():
        rng["cuda"] = paddle.get_cuda_rng_state()
    if tracker:
        from paddle.distributed.fleet.meta_parallel import get_rng_state_tracker
        rng["tracker"] = get_rng_state_tracker().get_states_tracker()
    with open(path, "wb") as f:
        pickle.dump(rng, f)


def restore_rng(folder, name="rng.pkl"):
    """The RNG states written by save_rng into folder/name."""
    with open(os.path.join(folder, name), "rb") as f:
        rng = pickle.load(f)
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    paddle.set_rng_state(rng["paddle"])
    if "cuda" in rng and _cuda():
        paddle.set_cuda_rng_state(rng["cuda"])
    if "tracker" in rng:
        from paddle.distributed.fleet.meta_parallel import get_rng_state_tracker
        get_rng_state_tracker().set_states_tracker(rng["tracker"])


def load_model(path, task, build, output_dir=None):
    """(model in eval mode, the checkpoint's resolved config, its folder) from a checkpoint of `task`."""
    folder = resolve_checkpoint(path, output_dir)
    meta, cfg = read_meta(folder)
    if meta.get("task") != task:
        raise CheckpointError(f"{folder}: a '{meta.get('task')}' checkpoint; this needs a '{task}' one")
    model = build(cfg.Model)
    load_state_strict(model, os.path.join(folder, "model.pdparams"))
    model.eval()
    return model, cfg, folder
