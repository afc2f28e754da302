"""One process with 2 threads against 2 data-parallel processes of 1 thread each (what `make demo` runs), for a
training step of each demo stage (configs/demo/vqgan_shapes.yaml: batch 16 of 32x32 images; configs/demo/
vilg_shapes.yaml: batch 16 pairs, both directions and VQA; it needs the demo's code shards, output/demo/codes):

  python benchmarks/bench_processes.py [--steps 40] [--rounds 2] [--stage 1 2]

Each round times --steps steps of `Trainer.train_step` (after 3 warm-up steps) in one process with 2 threads, then
under `paddle.distributed.launch --nproc_per_node 2` with 1 thread per process (gradients averaged over the
two, each with half the batch); the rounds alternate so that both see the same machine. The last line is one
JSON object: the median ms per step of the whole batch for each, and their ratio.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
CONFIGS = {1: "configs/demo/vqgan_shapes.yaml", 2: "configs/demo/vilg_shapes.yaml"}


def worker(config, steps, threads, result):
    """Time `steps` training steps of `config` in this process (one rank of a launch, or alone)."""
    from ppvilg.config import load_config
    from ppvilg.data.datasets import build_dataset, image_limits, train_loader
    from ppvilg.distributed.env import init_parallel
    from ppvilg.engine.tasks import build_task
    from ppvilg.engine.trainer import Trainer
    from ppvilg.utils.runtime import setup_from_config, training_kernels
    with tempfile.TemporaryDirectory() as out:
        overrides = [f"Global.output_dir={out}", f"Global.num_threads={threads}"]
        if config == CONFIGS[2]:
            overrides.append("Loss.vqa_start=0")   # the demo's last steps: both directions and VQA
        cfg = load_config(os.path.join(ROOT, config), overrides)
        setup_from_config(cfg)
        par = init_parallel(cfg)
        trainer = Trainer(cfg, build_task(cfg, par))
        data = build_dataset(cfg.Data.train, cfg.Data.image_size, **image_limits(cfg.Data))
        batches = iter(train_loader(data, cfg.Train.micro_batch_size, cfg.Global.seed, 0, 0, par.data_rank,
                                    par.data_world))
        trainer.task.train()
        with training_kernels():
            for _ in range(3):
                trainer.train_step(batches)
            t0 = time.perf_counter()
            for _ in range(steps):
                trainer.train_step(batches)
            ms = (time.perf_counter() - t0) / steps * 1e3
        if par.rank == 0:
            with open(result, "w") as f:
                json.dump({"ms": ms}, f)
    sys.stdout.flush()
    os._exit(0)   # (as tests/dist_worker.py: leave without gloo's C++ teardown)


def timed(stage, steps, processes, tmp):
    result = os.path.join(tmp, f"s{stage}_p{processes}.json")
    me = [os.path.abspath(__file__), "--worker", CONFIGS[stage], str(steps), "1" if processes > 1 else "2", result]
    cmd = [sys.executable, *me] if processes == 1 else [
        sys.executable, "-m", "paddle.distributed.launch", "--nproc_per_node", str(processes), "--log_dir",
        os.path.join(tmp, "logs"), *me]
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1" if processes > 1 else "2")
    run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if run.returncode:
        sys.exit(f"stage {stage}, {processes} process(es) failed:\n{run.stdout[-2000:]}\n{run.stderr[-2000:]}")
    with open(result) as f:
        return json.load(f)["ms"]


def main(argv=None):
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--worker":
        return worker(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5])
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--stage", type=int, nargs="+", default=[1, 2], choices=[1, 2])
    a = p.parse_args(argv)
    res = {}
    with tempfile.TemporaryDirectory() as tmp:
        for stage in a.stage:
            one, two = [], []
            for r in range(a.rounds):
                one.append(timed(stage, a.steps, 1, tmp))
                two.append(timed(stage, a.steps, 2, tmp))
                print(f"stage {stage} round {r + 1}: one process x 2 threads {one[-1]:7.1f} ms per step, "
                      f"2 processes x 1 thread {two[-1]:7.1f} ms (x{one[-1] / two[-1]:.2f})", flush=True)
            res[f"stage{stage}_one_process_ms"] = statistics.median(one)
            res[f"stage{stage}_two_processes_ms"] = statistics.median(two)
            res[f"stage{stage}_speedup"] = res[f"stage{stage}_one_process_ms"] / res[f"stage{stage}_two_processes_ms"]
    res.update(steps=a.steps, rounds=a.rounds)
    print(json.dumps(res))


if __name__ == "__main__":
    main()
