"""Evaluate a checkpoint on a data split: python tools/eval.py -c CONFIG [-o Global.checkpoint=FOLDER]
[--split eval|train]. Stage-1 (vqgan) checkpoints report PSNR, SSIM, codebook usage and perplexity.

The model's architecture comes from the checkpoint; data and evaluation settings from CONFIG. Without
Global.checkpoint, the newest checkpoint under CONFIG's Global.output_dir is used. Results are printed and
written to <output_dir>/eval/<split>.json and .md, with the task's image grids as <split>_<name>.png.
"""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ppvilg.utils.runtime import get_logger, setup_from_config  # noqa: E402
from ppvilg.utils.cli import config_parser, load_or_exit  # noqa: E402
from ppvilg.config import _to_config  # noqa: E402
from ppvilg.data.datasets import build_dataset  # noqa: E402
from ppvilg.data.images import write_png  # noqa: E402
from ppvilg.engine.checkpoint import load_state_strict, read_meta, resolve_checkpoint  # noqa: E402
from ppvilg.engine.tasks import build_task  # noqa: E402
from ppvilg.utils.io import atomic_write_json, atomic_write_text  # noqa: E402


def main(argv=None):
    p = config_parser(__doc__)
    p.add_argument("--split", default="eval", choices=["eval", "train"], help="which Data.<split> to score")
    args = p.parse_args(argv)
    cfg = load_or_exit(args)
    setup_from_config(cfg)
    log = get_logger()
    folder = resolve_checkpoint(cfg.Global.checkpoint or "auto", cfg.Global.output_dir)
    meta, ckpt_cfg = read_meta(folder)
    merged = cfg.to_dict()
    merged["Global"]["task"] = meta["task"]
    for section in ("Model", "Loss"):
        if section in ckpt_cfg:
            merged[section] = ckpt_cfg[section].to_dict()
    task = build_task(_to_config(merged).freeze())
    load_state_strict(task.modules()["model"], os.path.join(folder, "model.pdparams"))
    task.eval()
    dataset = build_dataset(cfg.Data[args.split], cfg.Data.image_size)
    log.info(f"evaluating {folder} on Data.{args.split} ({len(dataset)} pairs)")
    metrics, images = task.evaluate(dataset)
    result = {"checkpoint": os.path.abspath(folder), "step": meta["step"], "split": args.split, **metrics}
    out = os.path.join(cfg.Global.output_dir, "eval")
    atomic_write_json(os.path.join(out, f"{args.split}.json"), result)
    table = "| metric | value |\n|---|---|\n" + "".join(f"| {k} | {v:.4f} |\n" for k, v in metrics.items())
    atomic_write_text(os.path.join(out, f"{args.split}.md"), table)
    for name, img in images.items():
        write_png(os.path.join(out, f"{args.split}_{name}.png"), img)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
