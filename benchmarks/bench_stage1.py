"""Stage-1 training step time of the demo tokenizer (configs/demo/vqgan_shapes.yaml, its data, batch 16 of 32x32
images): Trainer.train_step with the adversarial phases (the generator's GAN term with its adaptive weight, and the
discriminator's own step) against without them, interleaved in one process so that both see the same machine:

  python benchmarks/bench_stage1.py [--rounds 4] [--steps 5] [--threads 2]

Each round times --steps steps without the adversarial loss (a step before Loss.disc_start) and --steps with it
(after), both from the same weights, alternating. The last line is one JSON object.
"""
import argparse
import json
import os
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from ppvilg.utils.runtime import setup_from_config  # noqa: E402
from ppvilg.config import load_config  # noqa: E402
from ppvilg.data.datasets import build_dataset, image_limits, train_loader  # noqa: E402
from ppvilg.engine.tasks import build_task  # noqa: E402
from ppvilg.engine.trainer import Trainer  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as out:
        cfg = load_config(os.path.join(ROOT, "configs/demo/vqgan_shapes.yaml"),
                          [f"Global.output_dir={out}", f"Global.num_threads={a.threads}", "Loss.disc_weight=0.1"])
        setup_from_config(cfg)
        trainer = Trainer(cfg, build_task(cfg, None))
        data = build_dataset(cfg.Data.train, cfg.Data.image_size, **image_limits(cfg.Data))
        batches = iter(train_loader(data, cfg.Train.batch_size, cfg.Global.seed, 0, 0, 0, 1))
        trainer.task.train()
        gan_step = cfg.Loss.disc_start    # the first step with the adversarial loss
        times = {"without_gan_ms": [], "with_gan_ms": []}

        def timed(step):
            trainer.step = step
            t0 = time.perf_counter()
            for _ in range(a.steps):
                logs = trainer.train_step(batches)
            return (time.perf_counter() - t0) / a.steps * 1e3, logs

        timed(0), timed(gan_step)   # warm-up, both paths
        for r in range(a.rounds):
            ms0, _ = timed(0)
            ms1, logs = timed(gan_step)
            times["without_gan_ms"].append(ms0)
            times["with_gan_ms"].append(ms1)
            print(f"round {r + 1}: without the adversarial loss {ms0:7.1f} ms per step, with it {ms1:7.1f} ms "
                  f"(x{ms1 / ms0:.2f}; its weight in the generator loss: gan_weight {logs['gan_weight']:.2g} x "
                  f"g_loss {logs['g_loss']:.3g} against rec {logs['rec']:.3g})", flush=True)
    res = {k: statistics.median(v) for k, v in times.items()}
    res["gan_cost_ratio"] = res["with_gan_ms"] / res["without_gan_ms"]
    res.update(rounds=a.rounds, steps=a.steps, threads=a.threads, batch=cfg.Train.batch_size)
    print(f"median: without {res['without_gan_ms']:.1f} ms, with {res['with_gan_ms']:.1f} ms per step: "
          f"x{res['gan_cost_ratio']:.2f}")
    print(json.dumps(res))


if __name__ == "__main__":
    main()
