"""The demo (`make demo`): stage 1 on the built-in shapes (its dev PSNR, SSIM and codebook usage in the log's
final eval; `tools/eval.py -c configs/demo/vqgan_shapes.yaml` writes them to a file), the code shards, stage 2 and
the report on the test split; prints the elapsed time of each stage at the end. Stops at the first stage that
fails, with its exit status.

  python tools/run_demo.py                      (everything under output/demo, as configs/demo/*.yaml say)
  python tools/run_demo.py --seed 1 --out output/demo_seed1   (another training seed, in another folder)
"""
import argparse
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


OUT = "output/demo"


def stages(out=OUT, seed=None):
    """The demo's commands; `out` other than output/demo and `seed` (Global.seed of both training stages)
    become -o overrides of the configs."""
    vq = ["-c", "configs/demo/vqgan_shapes.yaml"]
    vilg = ["-c", "configs/demo/vilg_shapes.yaml"]
    train_vq, train_vilg = [], []
    if out != OUT:
        vq += ["-o", f"Global.output_dir={out}/vqgan"]
        vilg += ["-o", f"Global.output_dir={out}/vilg", "-o", f"ImageTokenizer.checkpoint={out}/vqgan",
                 "-o", f"Data.train.path={out}/codes/train", "-o", f"Data.eval.path={out}/codes/dev"]
    if seed is not None:
        train_vq, train_vilg = ["-o", f"Global.seed={seed}"], ["-o", f"Global.seed={seed}"]
    return [
        ("stage 1: image tokenizer", ["tools/train.py", *vq, *train_vq]),
        ("code shards (train)", ["tools/tokenize_images.py", *vq, "--split", "train", "--out",
                                 f"{out}/codes/train", "--overwrite"]),
        ("code shards (dev)", ["tools/tokenize_images.py", *vq, "--split", "eval", "--out",
                               f"{out}/codes/dev", "--overwrite"]),
        ("stage 2: unified transformer", ["tools/train.py", *vilg, *train_vilg]),
        ("report (test split)", ["tools/shapes_report.py", *vilg, "--out", out]),
    ]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seed", type=int, default=None,
                   help="Global.seed of both training stages (default: the configs' 42)")
    p.add_argument("--out", default=OUT, help=f"folder for every output (default: {OUT})")
    args = p.parse_args(argv)
    times = []
    for name, cmd in stages(args.out.rstrip("/"), args.seed):
        print(f"==> {name}: python {' '.join(cmd)}", flush=True)
        t0 = time.time()
        rc = subprocess.call([sys.executable, *cmd], cwd=ROOT)
        times.append((name, time.time() - t0))
        if rc:
            print(f"run_demo: '{name}' failed with exit status {rc}", file=sys.stderr)
            sys.exit(rc)
    width = max(len(n) for n, _ in times)
    print("\nelapsed time per stage:")
    for name, secs in times:
        print(f"  {name:<{width}}  {secs / 60:5.1f} min")
    print(f"  {'total':<{width}}  {sum(s for _, s in times) / 60:5.1f} min")


if __name__ == "__main__":
    main()
