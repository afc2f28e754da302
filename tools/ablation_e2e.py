"""The shape of the paper's Table 7 on the built-in shapes data: two-stage vs end-to-end generator, two-stage
(VQ decoder) vs end-to-end reconstructor, and real image tokens through both reconstructors.

  python tools/ablation_e2e.py [--steps 300] [--out output/ablation_e2e] [--skip-train]

Needs the demo's stage 1 (output/demo/vqgan) and held-out shards (output/demo/codes/dev): run `make demo`
first. Trains two stage-2 models from the same seed and data (shapes images encoded on the fly by the frozen
tokenizer, configs/demo/vilg_shapes.yaml otherwise): two-stage (L = L_t2i + L_i2t) and end-to-end
(+ the reconstruction loss through the end-to-end reconstructor). Then, on held-out prompts (unseen attribute
combinations): the text->image attribute accuracy of each generator's samples (one per prompt, top-k 8,
guidance 2, the same seed) decoded by each available reconstructor, read back by the shapes reader; and PSNR /
SSIM of the real images' own codes decoded by the VQ decoder and by the end-to-end reconstructor (fed the
end-to-end generator's hidden states over the true caption and the real codes). FID against the real held-out
images (of the same prompts) is added when the FID Inception weights are present; with 64 images it is a
biased, noisy estimate, useful only to compare rows of one run. Prints the table and writes
<out>/ablation.json and <out>/ablation.md.
"""
import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ppvilg.utils.runtime import get_logger, setup_device, seed_everything  # noqa: E402
import numpy as np  # noqa: E402

from ppvilg.config import load_config  # noqa: E402
from ppvilg.data.datasets import build_dataset  # noqa: E402
from ppvilg.data.images import to_uint8_image  # noqa: E402
from ppvilg.data.shapes import ATTRIBUTES  # noqa: E402
from ppvilg.data.shards import CodeShards  # noqa: E402
from ppvilg.engine.tasks import build_task  # noqa: E402
from ppvilg.engine.trainer import Trainer  # noqa: E402
from ppvilg.metrics.recon import psnr, ssim  # noqa: E402
from ppvilg.metrics.shapes_reader import attribute_accuracy, read_image  # noqa: E402
from ppvilg.inference import ViLGInference  # noqa: E402
from ppvilg_deploy.decoding import SamplerSettings  # noqa: E402
from ppvilg.utils.io import atomic_write_json, atomic_write_text  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def train(out, steps, e2e, batch):
    overrides = [f"Global.output_dir={out}", "Data.train.source=shapes", "Data.train.num_samples=4000",
                 "Data.eval.source=shapes", "Data.eval.split=heldout", "Data.eval.num_samples=64",
                 f"Train.max_steps={steps}", f"Train.batch_size={batch}", "Train.eval_every=0", "Train.save_every=0",
                 "Train.vdl=false", f"Loss.end_to_end={'true' if e2e else 'false'}"]
    cfg = load_config(os.path.join(ROOT, "configs/demo/vilg_shapes.yaml"), overrides)
    seed_everything(cfg.Global.seed)
    t0 = time.time()
    metrics = Trainer(cfg, build_task(cfg)).fit()
    return metrics, time.time() - t0


def fid_or_none(generated, real):
    from ppvilg.metrics.inception import MissingWeightsError, inception_features, load_inception
    from ppvilg.metrics.fid import frechet_distance, statistics
    try:
        net = load_inception()
    except MissingWeightsError:
        return None
    return frechet_distance(*statistics(inception_features(net, real)), *statistics(inception_features(net, generated)))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=300, help="stage-2 steps of each model")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--prompts", type=int, default=64, help="held-out prompts / images scored")
    p.add_argument("--out", default="output/ablation_e2e")
    p.add_argument("--heldout", default="output/demo/codes/dev", help="held-out shards of the demo")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--skip-train", action="store_true", help="score the two checkpoints already in --out")
    a = p.parse_args(argv)
    setup_device("cpu", a.threads)
    log = get_logger()
    if not os.path.isdir(a.heldout) or not os.path.isdir("output/demo/vqgan"):
        sys.exit("ablation_e2e needs the demo's stage 1 and held-out shards: run `make demo` first")

    runs, seconds = {}, {}
    for name, e2e in (("two_stage", False), ("end_to_end", True)):
        if a.skip_train:
            continue
        log.info(f"training the {name} generator for {a.steps} steps")
        runs[name], seconds[name] = train(os.path.join(a.out, name), a.steps, e2e, a.batch)

    held = CodeShards(a.heldout)
    n = min(a.prompts, len(held))
    items = [held.item(i) for i in range(n)]
    prompts = [it["text"] for it in items]
    truth = [{a: it["meta"][a] for a in ATTRIBUTES} for it in items]
    real_codes = np.stack([it["codes"] for it in items])[:, None]
    two = ViLGInference.from_checkpoint(os.path.join(a.out, "two_stage"))
    e2e = ViLGInference.from_checkpoint(os.path.join(a.out, "end_to_end"))
    ds = build_dataset(two.image_tokenizer_cfg.Data.eval, two.image_size)
    real = [to_uint8_image(ds[i]["image"]) for i in range(n)]
    if [ds[i]["text"] for i in range(n)] != prompts:
        sys.exit(f"{a.heldout} does not hold the stage-1 config's held-out split in order; re-run tokenize_images")

    sampling = SamplerSettings(candidates=1, top_k=8, cfg_scale=2.0, seed=0)
    rows = []

    def row(generator, reconstructor, images, recon_of_real=None):
        images = np.asarray(images)
        acc, per = attribute_accuracy([read_image(im) for im in images], truth)
        r = {"generator": generator, "reconstructor": reconstructor, "t2i_attribute_accuracy": acc,
             "per_attribute": per, "fid": fid_or_none(list(images), real)}
        rows.append(r)
        log.info(f"{generator} + {reconstructor}: accuracy {acc:.3f}")
        return r

    codes_two = two.gen.text_to_image(prompts, sampling)
    row("two-stage", "VQ decoder", two.decode(codes_two)[:, 0])
    codes_e2e = e2e.gen.text_to_image(prompts, sampling)
    row("end-to-end", "VQ decoder", e2e.decode(codes_e2e)[:, 0])
    row("end-to-end", "end-to-end", e2e.reconstruct_e2e(prompts, codes_e2e)[:, 0])
    real_rows = []
    for name, images in (("VQ decoder", e2e.decode(real_codes)[:, 0]),
                         ("end-to-end", e2e.reconstruct_e2e(prompts, real_codes)[:, 0])):
        acc, _ = attribute_accuracy([read_image(im) for im in images], truth)
        real_rows.append({"reconstructor": name, "psnr": psnr(real, list(images)), "ssim": ssim(real, list(images)),
                          "attribute_accuracy": acc, "fid": fid_or_none(list(images), real)})

    result = {"steps": a.steps, "prompts": n, "sampling": sampling.to_dict(), "train_seconds": seconds,
              "final_eval": runs, "generated": rows, "real_tokens": real_rows}
    os.makedirs(a.out, exist_ok=True)
    atomic_write_json(os.path.join(a.out, "ablation.json"), result)
    fid_col = any(r["fid"] is not None for r in rows)
    lines = [f"Generated from {n} held-out prompts ({a.steps} training steps per generator):", "",
             "| generator | reconstructor | text->image attribute accuracy |" + (" FID |" if fid_col else ""),
             "|---|---|---|" + ("---|" if fid_col else "")]
    for r in rows:
        lines.append(f"| {r['generator']} | {r['reconstructor']} | {r['t2i_attribute_accuracy']:.3f} |"
                     + (f" {r['fid']:.1f} |" if fid_col else ""))
    lines += ["", f"Real image tokens of the same {n} held-out images:", "",
              "| reconstructor | PSNR (dB) | SSIM | attributes read back |" + (" FID |" if fid_col else ""),
              "|---|---|---|---|" + ("---|" if fid_col else "")]
    for r in real_rows:
        lines.append(f"| {r['reconstructor']} | {r['psnr']:.2f} | {r['ssim']:.3f} | {r['attribute_accuracy']:.3f} |"
                     + (f" {r['fid']:.1f} |" if fid_col else ""))
    table = "\n".join(lines) + "\n"
    atomic_write_text(os.path.join(a.out, "ablation.md"), table)
    print(table)
    print(json.dumps({"ablation": os.path.abspath(os.path.join(a.out, "ablation.json"))}))


if __name__ == "__main__":
    main()
