"""Evaluate a checkpoint:  python tools/eval.py -c CONFIG [-o Global.checkpoint=FOLDER] [--split eval|train]
[--task auto|recon|t2i|i2t|vqa|all]

- stage 1 (vqgan) checkpoints: reconstruction PSNR, SSIM, codebook usage and perplexity (recon);
- stage 2 (vilg) checkpoints: text->image FID (t2i) and captioning BLEU-1..4 / METEOR / ROUGE-L / CIDEr (i2t)
  on Data.<split>, with the settings of the Eval section (auto = both); VQA (vqa: an answer to each question of
  the split's images, exact match overall and per question type, and the caption metrics of the answers).

The model comes from the checkpoint; data and evaluation settings from CONFIG. Without Global.checkpoint, the
newest checkpoint under CONFIG's Global.output_dir is used. Results are printed and written to
<output_dir>/eval/<split>_<task>.json and .md (plus image grids as PNG) and logged to VisualDL.
"""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ppvilg.utils.runtime import get_logger, setup_from_config  # noqa: E402
from ppvilg.utils.cli import config_parser, load_or_exit  # noqa: E402
from ppvilg.config import to_config  # noqa: E402
from ppvilg.data.datasets import build_dataset, image_limits  # noqa: E402
from ppvilg.data.images import make_grid, write_png  # noqa: E402
from ppvilg.checkpoints import load_module, read_meta, resolve_checkpoint  # noqa: E402
from ppvilg.engine.tasks import build_task  # noqa: E402
from ppvilg.metrics.inception import MissingWeightsError  # noqa: E402
from ppvilg.utils.io import atomic_write_json, atomic_write_text  # noqa: E402


def reconstruction(cfg, folder, meta, ckpt_cfg, split):
    merged = cfg.to_dict()
    merged["Global"]["task"] = meta["task"]
    for section in ("Model", "Loss"):
        if section in ckpt_cfg:
            merged[section] = ckpt_cfg[section].to_dict()
    task = build_task(to_config(merged).freeze())
    load_module(task.model, folder, "model")
    task.eval()
    dataset = build_dataset(cfg.Data[split], cfg.Data.image_size, **image_limits(cfg.Data))
    get_logger().info(f"evaluating {folder} on Data.{split} ({len(dataset)} pairs)")
    metrics, images, _ = task.evaluate(dataset)
    return metrics, images


def stage2(cfg, folder, split, which):
    from ppvilg.evaluation import evaluate_image_to_text, evaluate_text_to_image, image_caption_sets
    from ppvilg.inference import ViLGInference
    vilg = ViLGInference.from_checkpoint(folder)
    ev = cfg.Eval
    images, refs, prompts, key = image_caption_sets(cfg.Data[split], vilg.image_size, ev.num_samples)
    get_logger().info(f"evaluating {folder} on Data.{split}: {len(images)} images, "
                      f"{sum(len(r) for r in refs.values())} captions")
    results, grids = {}, {}
    if which in ("t2i", "all"):
        metrics, generated = evaluate_text_to_image(vilg, images, prompts, ev, key)
        results["t2i"] = metrics
        grids["t2i_generated"] = make_grid(generated[:16], 8)
    if which in ("i2t", "all"):
        metrics, caps = evaluate_image_to_text(vilg, images, refs, ev)
        results["i2t"] = dict(metrics, examples=[{"caption": c["text"], "references": refs[i]}
                                                 for i, c in enumerate(caps[:5])])
    return results, grids


def vqa(cfg, folder, split):
    from ppvilg.evaluation import evaluate_vqa, question_sets
    from ppvilg.inference import ViLGInference
    vilg = ViLGInference.from_checkpoint(folder)
    try:
        images, questions = question_sets(cfg.Data[split], vilg.image_size, cfg.Eval.num_samples)
    except ValueError as e:
        sys.exit(f"error: Data.{split}: {e}")
    get_logger().info(f"evaluating {folder} on Data.{split}: {len(questions)} questions about {len(images)} images")
    metrics, answers = evaluate_vqa(vilg, images, questions, cfg.Eval)
    examples = [{"question": q["question"], "answer": a["text"], "expected": q["answers"]}
                for q, a in zip(questions[:8], answers)]
    return {"vqa": dict(metrics, examples=examples)}, {}


def main(argv=None):
    p = config_parser(__doc__)
    p.add_argument("--split", default="eval", choices=["eval", "train"], help="which Data.<split> to score")
    p.add_argument("--task", default="auto", choices=["auto", "recon", "t2i", "i2t", "vqa", "all"])
    args = p.parse_args(argv)
    cfg = load_or_exit(args)
    setup_from_config(cfg)
    log = get_logger()
    folder = resolve_checkpoint(cfg.Global.checkpoint or "auto", cfg.Global.output_dir)
    meta, ckpt_cfg = read_meta(folder)
    which = args.task if args.task != "auto" else ("recon" if meta["task"] == "vqgan" else "all")
    if (which == "recon") != (meta["task"] == "vqgan"):
        sys.exit(f"--task {which} needs a {'stage-1 (vqgan)' if which == 'recon' else 'stage-2 (vilg)'} checkpoint; "
                 f"{folder} is '{meta['task']}'")
    if which == "recon":
        metrics, images = reconstruction(cfg, folder, meta, ckpt_cfg, args.split)
        results = {"recon": metrics}
    elif which == "vqa":
        results, images = vqa(cfg, folder, args.split)
    else:
        try:
            results, images = stage2(cfg, folder, args.split, which)
        except MissingWeightsError as e:
            sys.exit(f"error: {e}")
    out = os.path.join(cfg.Global.output_dir, "eval")
    vdl = None
    if cfg.Train.vdl:
        from visualdl import LogWriter
        vdl = LogWriter(logdir=os.path.join(cfg.Global.output_dir, "vdl"))
    for name, metrics in results.items():
        result = {"checkpoint": os.path.abspath(folder), "step": meta["step"], "split": args.split, "task": name,
                  **metrics}
        stem = args.split if name == "recon" else f"{args.split}_{name}"
        atomic_write_json(os.path.join(out, f"{stem}.json"), result)
        flat = dict(metrics)
        for k, v in metrics.items():   # per-type figures (VQA) as rows of their own
            if isinstance(v, dict):
                flat.update({f"{k}/{t}": x for t, x in v.items()})
        rows = [(k, v) for k, v in flat.items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
        atomic_write_text(os.path.join(out, f"{stem}.md"), "| metric | value |\n|---|---|\n"
                          + "".join(f"| {k} | {v:.4f} |\n" for k, v in rows))
        if vdl is not None:
            for k, v in rows:
                vdl.add_scalar(f"eval_{args.split}/{name}/{k}", float(v), meta["step"])
        print(json.dumps(result, indent=2, ensure_ascii=False))
    for name, img in images.items():
        write_png(os.path.join(out, f"{args.split}_{name}.png"), img)
    if vdl is not None:
        vdl.close()
    log.info(f"results in {out}")


if __name__ == "__main__":
    main()
