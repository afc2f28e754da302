"""The demo (`make demo`): stage 1 on the built-in shapes (its dev PSNR, SSIM and codebook usage in the log's
final eval; `tools/eval.py -c configs/demo/vqgan_shapes.yaml` writes them to a file), the code shards, stage 2 and
the report on the test split; prints the elapsed time of each stage at the end. Both training stages run data
parallel on 2 processes (`_data_parallel`). Stops at the first stage that
fails, with its exit status. `--long` (`make demo-long`, after the demo in the same folder): the demo's stage 2
trained 2000 steps longer (configs/demo/vilg_shapes_long.yaml) and its report, in <out>/vilg_long and <out>/long.

  python tools/run_demo.py                      (everything under output/demo, as configs/demo/*.yaml say)
  python tools/run_demo.py --seed 1 --out output/demo_seed1   (another training seed, in another folder)
  python tools/run_demo.py --long [--seed 1 --out output/demo_seed1]   (then: the longer stage 2 of that demo)
"""
import argparse
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


OUT = "output/demo"
PROCESSES = 2


def _data_parallel(folder, train_cmd):
    """A tools/train.py command run data parallel on PROCESSES one-thread processes (Fleet over gloo; the logs of
    each in <folder>/launch_logs). On these 2-core CPUs two processes of one thread do ~1.9x the images per second
    of one process with two threads in stage 1 (Paddle's convolutions gain little from a second thread) and
    ~1.2x the pairs in stage 2 (docs/demo.md, benchmarks/bench_processes.py). Always PROCESSES, whatever the
    machine: the same layout, so the same computation for a seed (up to the CPU's own kernels)."""
    return ["-m", "paddle.distributed.launch", "--nproc_per_node", str(PROCESSES), "--log_dir",
            f"{folder}/launch_logs", *train_cmd, "-o", "Global.num_threads=1"]


def _stage2_paths(out):
    """-o overrides pointing a stage-2 config at the demo folder `out` (its tokenizer and code shards)."""
    return ["-o", f"ImageTokenizer.checkpoint={out}/vqgan",
            "-o", f"Data.train.path={out}/codes/train", "-o", f"Data.eval.path={out}/codes/dev"]


def stages(out=OUT, seed=None):
    """The demo's commands; `out` other than output/demo and `seed` (Global.seed of both training stages)
    become -o overrides of the configs."""
    vq = ["-c", "configs/demo/vqgan_shapes.yaml"]
    vilg = ["-c", "configs/demo/vilg_shapes.yaml"]
    train_vq, train_vilg = [], []
    if out != OUT:
        vq += ["-o", f"Global.output_dir={out}/vqgan"]
        vilg += ["-o", f"Global.output_dir={out}/vilg", *_stage2_paths(out)]
    if seed is not None:
        train_vq, train_vilg = ["-o", f"Global.seed={seed}"], ["-o", f"Global.seed={seed}"]
    return [
        ("stage 1: image tokenizer", _data_parallel(f"{out}/vqgan", ["tools/train.py", *vq, *train_vq])),
        ("code shards (train)", ["tools/tokenize_images.py", *vq, "--split", "train", "--out",
                                 f"{out}/codes/train", "--overwrite"]),
        ("code shards (dev)", ["tools/tokenize_images.py", *vq, "--split", "eval", "--out",
                               f"{out}/codes/dev", "--overwrite"]),
        ("stage 2: unified transformer", _data_parallel(f"{out}/vilg", ["tools/train.py", *vilg, *train_vilg])),
        ("report (test split)", ["tools/shapes_report.py", *vilg, "--out", out]),
    ]


def long_stages(out=OUT, seed=None):
    """`make demo-long`: configs/demo/vilg_shapes_long.yaml continuing the stage 2 of the demo in `out` (run with
    the same `seed`), then its report in <out>/long."""
    cfg = ["-c", "configs/demo/vilg_shapes_long.yaml"]
    if out != OUT:
        cfg += ["-o", f"Global.output_dir={out}/vilg_long", "-o", f"Global.init_weights={out}/vilg",
                *_stage2_paths(out)]
    train = [] if seed is None else ["-o", f"Global.seed={seed}"]
    return [
        ("stage 2, 2000 steps longer", _data_parallel(f"{out}/vilg_long", ["tools/train.py", *cfg, *train])),
        ("report (test split)", ["tools/shapes_report.py", *cfg, "--out", f"{out}/long"]),
    ]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seed", type=int, default=None,
                   help="Global.seed of the training stages (default: the configs' 42)")
    p.add_argument("--out", default=OUT, help=f"folder for every output (default: {OUT})")
    p.add_argument("--long", action="store_true",
                   help="continue the demo already run in --out: its stage 2 2000 steps longer, and the report")
    args = p.parse_args(argv)
    out = args.out.rstrip("/")
    if args.long:
        if not os.path.isdir(os.path.join(ROOT, out, "vilg", "checkpoints")):
            p.error(f"--long continues the demo's stage 2 in {out}/vilg, which has no checkpoints: run the demo "
                    f"first (tools/run_demo.py{'' if args.seed is None else f' --seed {args.seed}'}"
                    f"{'' if out == OUT else f' --out {out}'})")
        todo = long_stages(out, args.seed)
    else:
        todo = stages(out, args.seed)
    times = []
    for name, cmd in todo:
        print(f"==> {name}: python {' '.join(cmd)}", flush=True)
        t0 = time.time()
        env = dict(os.environ, OMP_NUM_THREADS="1") if cmd[:2] == ["-m", "paddle.distributed.launch"] else None
        rc = subprocess.call([sys.executable, *cmd], cwd=ROOT, env=env)
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
