"""The demo (`make demo`): stage 1 on the built-in shapes, its evaluation, the code shards, stage 2 and the
report on the test split; prints the elapsed time of each stage at the end. Stops at the first stage that
fails, with its exit status.

  python tools/run_demo.py        (everything under output/demo, where configs/demo/*.yaml read and write)
"""
import argparse
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


OUT = "output/demo"


def stages(out=OUT):
    vq, vilg = "configs/demo/vqgan_shapes.yaml", "configs/demo/vilg_shapes.yaml"
    return [
        ("stage 1: image tokenizer", ["tools/train.py", "-c", vq]),
        ("stage 1: evaluation (dev)", ["tools/eval.py", "-c", vq]),
        ("code shards (train)", ["tools/tokenize_images.py", "-c", vq, "--split", "train", "--out",
                                 f"{out}/codes/train", "--overwrite"]),
        ("code shards (dev)", ["tools/tokenize_images.py", "-c", vq, "--split", "eval", "--out",
                               f"{out}/codes/dev", "--overwrite"]),
        ("stage 2: unified transformer", ["tools/train.py", "-c", vilg]),
        ("report (test split)", ["tools/shapes_report.py", "-c", vilg, "--out", out]),
    ]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.parse_args(argv)
    times = []
    for name, cmd in stages():
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
