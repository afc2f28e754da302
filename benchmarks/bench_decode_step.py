"""Two costs of a cached decode step, side by side in one run: writing the step's keys and values into the KV cache
(ppvilg_deploy.kvcache.write_slots, rows of the cache's flat view by paddle.scatter_, against Paddle's slice
assignment `cache[:, :, start:start + s] = k`, what the decoder and the predictors did before) and the attention
masks (one copy per head made once per step, DygraphDecoder.step_masks, against [B, 1, s, S] rows that each
layer's add broadcasts over the heads):

  python benchmarks/bench_decode_step.py [--threads 2] [--batches 1 8 1024] [--steps 64] [--rounds 2]

The demo transformer (random weights: speed does not depend on training) on its 8x8 grid, greedy text->image
decode steps at each batch size (1024 rows: the report's 256 prompts x 4 candidates x guidance); ms per step for
the four combinations, the rounds alternating, the median of the rounds, and the largest difference of the
logits against the current decoder (the same arithmetic: 0). The last line is one JSON object.
"""
import argparse
import json
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ppvilg.utils.runtime import setup_device  # noqa: E402
import numpy as np  # noqa: E402

import ppvilg.models.vilg as vilg_module  # noqa: E402
from ppvilg.generation import DygraphDecoder  # noqa: E402
from ppvilg_deploy.kvcache import write_slots  # noqa: E402
from bench_cache_keys import demo_model, run as decode_steps  # noqa: E402  (this folder)


def slice_assign(caches, start, new, rows=None):
    """The cache write as it was: Paddle's slice assignment (the set_value kernel)."""
    for cache, kv in zip(caches, new):
        cache[:, :, start:start + kv.shape[2]] = kv


class BroadcastMasks(DygraphDecoder):
    """The step's masks as [B, 1, s, S] rows of the layer masks, broadcast over the heads by each layer's add."""

    def step_masks(self, sl):
        return [mk[:, :, sl] for mk in self.masks]


VARIANTS = {   # name -> (decoder class, cache write)
    "now": (DygraphDecoder, write_slots),
    "slice_assign_writes": (DygraphDecoder, slice_assign),
    "broadcast_masks": (BroadcastMasks, write_slots),
    "before": (BroadcastMasks, slice_assign),
}


def run(variant, model, layout, batch, steps):
    """ms per decode step over `steps` steps after the prefill, and the logits of every step (bench_cache_keys'
    decode loop, with this variant's decoder and cache write)."""
    cls, write = VARIANTS[variant]
    vilg_module.write_slots = write
    try:
        return decode_steps(cls, model, layout, batch, steps)
    finally:
        vilg_module.write_slots = write_slots


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 1024])
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("--rounds", type=int, default=2)
    a = p.parse_args(argv)
    setup_device("cpu", a.threads)
    model, layout = demo_model(text_vocab_size=94)   # the demo's (shapes vocabulary)
    steps = min(a.steps, model.config.grid * model.config.grid)
    res = {}
    for batch in a.batches:
        run("now", model, layout, batch, 3)   # warm-up
        times, diffs, ref = {v: [] for v in VARIANTS}, {}, None
        for r in range(a.rounds):
            for v in (list(VARIANTS) if r % 2 == 0 else list(VARIANTS)[::-1]):
                ms, logits = run(v, model, layout, batch, steps)
                times[v].append(ms)
                if v == "now":
                    ref = logits
                else:
                    diffs[v] = logits
        med = {v: statistics.median(t) for v, t in times.items()}
        diff = max(float(np.abs(x - y).max()) for lg in diffs.values() for x, y in zip(ref, lg))
        res[f"b{batch}"] = {**{f"{v}_ms": m for v, m in med.items()}, "speedup": med["before"] / med["now"],
                            "max_logit_diff": diff}
        print(f"batch {batch:5d}: now {med['now']:8.2f} ms per step; slice-assigned cache writes "
              f"{med['slice_assign_writes']:8.2f}; broadcast masks {med['broadcast_masks']:8.2f}; both (before) "
              f"{med['before']:8.2f} (x{med['before'] / med['now']:.2f}); largest logit difference {diff:.1e}",
              flush=True)
    res.update(threads=a.threads, steps=steps, rounds=a.rounds)
    print(json.dumps(res))


if __name__ == "__main__":
    main()
