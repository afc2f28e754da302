"""Merge a checkpoint written by a parallel run into a single-process one, or split one for another tensor /
pipeline parallel layout:

  python tools/convert_checkpoint.py --src output/vilg_10b/checkpoints/step_00005000 --dst output/vilg_10b_merged
  python tools/convert_checkpoint.py --src output/demo/vilg --dst output/demo/vilg_mp2 --mp 2

The result holds the model weights (and the source's config): tools/eval.py, tools/infer.py and export read
any layout; any training run starts from either with -o Global.init_weights=<dst> (a fresh optimizer: optimizer
states are per rank and are not converted). The whole model is held in CPU memory while converting.

Pickle files from ppvilg 0.1 (a checkpoint folder with *.pdparams / *.pdopt / rng.pkl, or one .pdparams file such
as Loss.perceptual_weights) are rewritten in the safe format with --legacy-pickle. Reading pickle RUNS CODE that
the file contains: use it only on files you made or trust. Nothing else in ppvilg reads pickle.

  python tools/convert_checkpoint.py --legacy-pickle --src old/step_00000400 --dst new/step_00000400
  python tools/convert_checkpoint.py --legacy-pickle --src vgg16.pdparams --dst vgg16.safetensors
"""
import argparse
import glob
import json
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import ppvilg.engine.tasks  # noqa: E402,F401  (registers the tasks, models and their renamed config sections)
from ppvilg import checkpoints as ckpt  # noqa: E402
from ppvilg.checkpoints import CheckpointError  # noqa: E402
from ppvilg.config import parse_resolved  # noqa: E402
from ppvilg.distributed import convert  # noqa: E402
from ppvilg.models.vilg import parallel_layout_errors  # noqa: E402
from ppvilg.registry import model_config  # noqa: E402
from ppvilg.utils.io import AtomicDir  # noqa: E402


def convert_layout(a):
    src = ckpt.resolve_checkpoint(a.src)
    meta, cfg = ckpt.read_meta(src)
    if meta.get("model") != "vilg":
        raise CheckpointError(f"{src}: a '{meta.get('model')}' checkpoint; only the stage-2 transformer "
                              "(vilg) trains in parallel layouts")
    errors = parallel_layout_errors(model_config(cfg.Model), a.mp, a.pp)
    if errors:
        raise CheckpointError(f"--mp {a.mp} --pp {a.pp} does not fit {src}: "
                              + "; ".join(msg + (f" ({hint})" if hint else "") for _, msg, hint in errors))
    full = ckpt.read_full_state(src)
    layers = cfg.Model.num_layers
    with AtomicDir(a.dst) as tmp:
        for m in range(a.mp):
            for s in range(a.pp):
                ckpt.write_weights(tmp, convert.split(full, layers, a.mp, a.pp, m, s), "model", m, s, a.mp, a.pp)
        layout = {"dp": 1, "mp": a.mp, "pp": a.pp, "sharding": 1, "sharding_stage": 1}
        ckpt.finish(tmp, cfg, {"step": meta.get("step"), "task": meta.get("task"), "model": meta.get("model"),
                               "parallel": layout, "converted_from": os.path.abspath(src),
                               "source_parallel": meta.get("parallel")})
    n = sum(v.size for v in full.values())
    return {"src": src, "dst": os.path.abspath(a.dst), "parameters": int(n), "mp": a.mp, "pp": a.pp}


# ---- pickle from ppvilg 0.1 (explicit opt-in only) ---------------------------------------------------------------

def _unpickle_paddle(path):
    import paddle
    return paddle.load(path)   # runs code from the file: only on the user's explicit --legacy-pickle


def _legacy_rng(path):
    import pickle
    with open(path, "rb") as f:
        return ckpt.rng_to_json(pickle.load(f))   # runs code from the file: only on the explicit --legacy-pickle


def convert_legacy_folder(src, dst):
    with open(os.path.join(src, "trainer_state.json"), encoding="utf-8") as f:
        meta = json.load(f)
    with open(os.path.join(src, "config.yaml"), encoding="utf-8") as f:
        cfg = parse_resolved(f.read(), os.path.join(src, "config.yaml"))
    written = []
    with AtomicDir(dst) as tmp:
        for path in sorted(glob.glob(os.path.join(src, "*.pdparams"))):
            name = os.path.basename(path)[:-len(".pdparams")]
            ckpt.write_tensors(os.path.join(tmp, name + ".safetensors"), _unpickle_paddle(path))
            written.append(name + ".safetensors")
        for path in sorted(glob.glob(os.path.join(src, "*.pdopt"))):
            m = re.fullmatch(r"(.+?)(?:\.rank(\d{3}))?\.pdopt", os.path.basename(path))
            ckpt.write_optimizer(tmp, m.group(1), _unpickle_paddle(path), None if m.group(2) is None else int(m.group(2)))
            written.append(os.path.basename(path))
        for path in sorted(glob.glob(os.path.join(src, "rng*.pkl"))):
            m = re.fullmatch(r"rng(?:\.rank(\d{3}))?\.pkl", os.path.basename(path))
            rank = None if m.group(1) is None else int(m.group(1))
            with open(os.path.join(tmp, ckpt.rng_file(rank)), "w", encoding="utf-8") as f:
                json.dump(_legacy_rng(path), f)
            written.append(os.path.basename(path))
        state = {k: v for k, v in meta.items() if k not in ("paddle_version", "format")}
        ckpt.finish(tmp, cfg, dict(state, converted_from=os.path.abspath(src)))
    ckpt.verify(dst)
    return {"src": os.path.abspath(src), "dst": os.path.abspath(dst), "converted": written}


def convert_legacy_file(src, dst):
    if not dst.endswith(".safetensors"):
        raise CheckpointError(f"--dst {dst}: give a .safetensors path for a single weights file")
    os.makedirs(os.path.dirname(os.path.abspath(dst)) or ".", exist_ok=True)
    tmp = dst + ".partial"
    ckpt.write_tensors(tmp, _unpickle_paddle(src))
    os.replace(tmp, dst)
    return {"src": os.path.abspath(src), "dst": os.path.abspath(dst)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--src", required=True, help="a checkpoint folder (or a run folder: its latest checkpoint)")
    p.add_argument("--dst", required=True, help="the folder to write (replaced if it exists)")
    p.add_argument("--mp", type=int, default=1, help="tensor parallel degree of the result")
    p.add_argument("--pp", type=int, default=1, help="pipeline parallel degree of the result")
    p.add_argument("--legacy-pickle", action="store_true",
                   help="rewrite a ppvilg 0.1 pickle checkpoint folder or .pdparams file in the safe format. "
                        "Reading pickle runs code from the file: only for files you trust")
    a = p.parse_args(argv)
    try:
        if a.legacy_pickle:
            if a.mp != 1 or a.pp != 1:
                raise CheckpointError("--legacy-pickle keeps the layout; convert the result with --mp / --pp after")
            if os.path.isfile(a.src):
                result = convert_legacy_file(a.src, a.dst)
            elif os.path.isfile(os.path.join(a.src, "trainer_state.json")):
                result = convert_legacy_folder(a.src, a.dst)
            else:
                raise CheckpointError(f"--src {a.src}: neither a .pdparams file nor a ppvilg 0.1 checkpoint folder")
        else:
            result = convert_layout(a)
    except (CheckpointError, FileNotFoundError, ValueError, KeyError) as e:
        sys.exit(f"convert_checkpoint: {e}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
