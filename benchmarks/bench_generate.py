"""Text->image decoding speed: KV-cached vs uncached (whole sequence re-encoded every step), same run.

  python benchmarks/bench_generate.py [--threads 2] [--steps-uncached 16]

Two model sizes with random weights (speed does not depend on training): the demo transformer on its 8x8 grid,
and the same width on a 32x32 grid (1024 image tokens, the paper's grid). For each, batch 1 and 8: seconds per
decode step, image tokens per second and seconds per image. The cached decoder runs every step of a full
image; the uncached one, whose cost per step is the same at every step (it always encodes the whole masked
sequence), is timed over --steps-uncached steps. The last line is one JSON object with all figures.
"""
import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ppvilg.utils.runtime import setup_device  # noqa: E402
import numpy as np  # noqa: E402
import paddle  # noqa: E402

from ppvilg.generation import DygraphDecoder  # noqa: E402
from ppvilg.models.layout import text_to_image  # noqa: E402
from ppvilg.models.vilg import ViLG, ViLGConfig  # noqa: E402


def time_steps(model, layout, batch, steps, use_cache):
    ids = np.zeros([batch, layout.length], np.int64)
    ids[:, :layout.lengths[0]] = np.random.default_rng(0).integers(5, 500, [batch, layout.lengths[0]])
    ids[:, layout.lengths[0]] = model.boi_id
    dec = DygraphDecoder(model, layout, ids, np.ones(ids.shape, bool), use_cache)
    dec.logits_at(dec.t0)  # prefill / first step, not timed
    t = time.perf_counter()
    for k in range(1, steps):
        dec.ids[:, dec.t0 + k] = 1
        dec.logits_at(dec.t0 + k)
    return (time.perf_counter() - t) / (steps - 1)


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps-uncached", type=int, default=16)
    a = p.parse_args()
    setup_device("cpu", a.threads)
    paddle.seed(0)
    results = {}
    with paddle.no_grad():
        for name, grid in (("8x8", 8), ("32x32", 32)):
            cfg = ViLGConfig(**dict(ViLGConfig.PRESETS["shapes"], grid=grid))
            model = ViLG(cfg)
            model.eval()
            layout = text_to_image(cfg.max_text_len, grid)
            n = grid * grid
            for batch in (1, 8):
                cached = time_steps(model, layout, batch, n, True)
                uncached = time_steps(model, layout, batch, min(a.steps_uncached, n), False)
                key = f"{name}_b{batch}"
                results[key] = {"cached_s_per_step": cached, "uncached_s_per_step": uncached,
                                "cached_tokens_per_s": batch / cached, "uncached_tokens_per_s": batch / uncached,
                                "cached_s_per_image": cached * n / batch, "uncached_s_per_image": uncached * n / batch,
                                "speedup": uncached / cached}
                r = results[key]
                print(f"{key:10s} cached {r['cached_tokens_per_s']:9.1f} tok/s {r['cached_s_per_image']:8.3f} s/image"
                      f" | uncached {r['uncached_tokens_per_s']:8.1f} tok/s {r['uncached_s_per_image']:8.2f} s/image"
                      f" | speed-up x{r['speedup']:.1f}")
    summary = {"threads": a.threads, "results": results,
               "cache_speedup_8x8": results["8x8_b1"]["speedup"],
               "cache_speedup_32x32": results["32x32_b1"]["speedup"],
               "cache_speedup_32x32_b8": results["32x32_b8"]["speedup"]}
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
