"""Merge a checkpoint written by a parallel run into a single-process one, or split one for another tensor /
pipeline parallel layout:

  python tools/convert_checkpoint.py --src output/vilg_10b/checkpoints/step_00005000 --dst output/vilg_10b_merged
  python tools/convert_checkpoint.py --src output/demo/vilg --dst output/demo/vilg_mp2 --mp 2

The result holds the model weights (and the source's config): tools/eval.py, tools/infer.py and export read a
merged one; any training run starts from either with -o Global.init_weights=<dst> (a fresh optimizer: optimizer
states are per rank and are not converted). The whole model is held in CPU memory while converting.
"""
import argparse
import json
import os
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import paddle  # noqa: E402

from ppvilg.distributed import convert  # noqa: E402
from ppvilg.models.vilg import parallel_layout_errors  # noqa: E402
from ppvilg.registry import model_config  # noqa: E402
from ppvilg.engine.checkpoint import CheckpointError, read_meta, resolve_checkpoint  # noqa: E402
from ppvilg.utils.io import AtomicDir, atomic_write_json  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--src", required=True, help="a checkpoint folder (or a run folder: its latest checkpoint)")
    p.add_argument("--dst", required=True, help="the folder to write (replaced if it exists)")
    p.add_argument("--mp", type=int, default=1, help="tensor parallel degree of the result")
    p.add_argument("--pp", type=int, default=1, help="pipeline parallel degree of the result")
    a = p.parse_args(argv)
    try:
        src = resolve_checkpoint(a.src)
        meta, cfg = read_meta(src)
        if meta.get("model") != "vilg":
            raise CheckpointError(f"{src}: a '{meta.get('model')}' checkpoint; only the stage-2 transformer "
                                  "(vilg) trains in parallel layouts")
        errors = parallel_layout_errors(model_config(cfg.Model), a.mp, a.pp)
        if errors:
            raise CheckpointError(f"--mp {a.mp} --pp {a.pp} does not fit {src}: "
                                  + "; ".join(msg + (f" ({hint})" if hint else "") for _, msg, hint in errors))
        full = convert.read_full_state(src)
        layers = cfg.Model.num_layers
        with AtomicDir(a.dst) as tmp:
            for m in range(a.mp):
                for s in range(a.pp):
                    part = convert.split(full, layers, a.mp, a.pp, m, s)
                    paddle.save(part, os.path.join(tmp, convert.weight_file(m, s, a.mp, a.pp)))
            shutil.copy(os.path.join(src, "config.yaml"), os.path.join(tmp, "config.yaml"))
            layout = {"dp": 1, "mp": a.mp, "pp": a.pp, "sharding": 1, "sharding_stage": 1}
            atomic_write_json(os.path.join(tmp, "trainer_state.json"),
                              {"step": meta.get("step"), "task": meta.get("task"), "model": meta.get("model"),
                               "parallel": layout, "converted_from": os.path.abspath(src),
                               "source_parallel": meta.get("parallel"), "paddle_version": paddle.__version__})
    except (CheckpointError, FileNotFoundError, ValueError) as e:
        sys.exit(f"convert_checkpoint: {e}")
    n = sum(v.size for v in full.values())
    print(json.dumps({"src": src, "dst": os.path.abspath(a.dst), "parameters": int(n), "mp": a.mp, "pp": a.pp}))


if __name__ == "__main__":
    main()
