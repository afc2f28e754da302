"""The cached decode step's attention over the whole KV-cache buffer (what ppvilg.generation.DygraphDecoder
runs: the causal mask hides the slots not filled yet) against over the filled prefix only (a key slice of the
cache, as before: a strided view that each attention matmul first copies), side by side in one run:

  python benchmarks/bench_cache_keys.py [--threads 2] [--batches 1 8 1024] [--steps 64]

The demo transformer (random weights: speed does not depend on training) on its 8x8 grid, text->image decode
steps at each batch size (1024 rows: the report's 256 prompts x 4 candidates x guidance); ms per step for both and
the largest difference of their logits. The last line is one JSON object.
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


class PrefixKeysDecoder(DygraphDecoder):
    """The cached decoder with attention over the filled prefix only: the masks' key length last + 1."""

    @paddle.no_grad()
    def logits_span(self, first, last):
        m = self.m
        start = 0 if first == self.t0 else first
        sl = slice(start, last + 1)
        h = m.step(paddle.to_tensor(self.ids[:, sl]), self.kind[sl], self.pos[sl],
                   [mk[:, :, sl, :last + 1] for mk in self.masks], self.cache, start)[:, first - start:]
        return m.head(h, self.target_kind).astype("float32").numpy()


def demo_model(**changes):
    """The demo transformer (the `shapes` preset with `changes`; random weights: speed does not depend on
    training) in eval mode, and its text->image layout."""
    paddle.seed(0)
    cfg = ViLGConfig(**dict(ViLGConfig.PRESETS["shapes"], **changes))
    model = ViLG(cfg)
    model.eval()
    return model, text_to_image(cfg.max_text_len, cfg.grid)


def run(cls, model, layout, batch, steps):
    """ms per decode step over `steps` steps after the prefill, and the logits of every step."""
    ids = np.zeros([batch, layout.length], np.int64)
    words = min(500, model.config.text_vocab_size)   # text ids of the model's vocabulary
    ids[:, :layout.lengths[0]] = np.random.default_rng(0).integers(5, words, [batch, layout.lengths[0]])
    ids[:, layout.lengths[0]] = model.boi_id
    dec = cls(model, layout, ids, np.ones(ids.shape, bool))
    logits = [dec.logits_at(dec.t0)]
    t = time.perf_counter()
    for k in range(1, steps):
        dec.ids[:, dec.t0 + k] = logits[-1].argmax(-1)
        logits.append(dec.logits_at(dec.t0 + k))
    return (time.perf_counter() - t) / (steps - 1) * 1e3, logits


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 1024])
    p.add_argument("--steps", type=int, default=64)
    a = p.parse_args(argv)
    setup_device("cpu", a.threads)
    model, layout = demo_model()
    steps = min(a.steps, model.config.grid * model.config.grid)
    res = {}
    for batch in a.batches:
        run(DygraphDecoder, model, layout, batch, 3)   # warm-up
        whole, lw = run(DygraphDecoder, model, layout, batch, steps)
        prefix, lp = run(PrefixKeysDecoder, model, layout, batch, steps)
        diff = max(float(np.abs(x - y).max()) for x, y in zip(lw, lp))
        res[f"b{batch}"] = {"whole_buffer_ms": whole, "prefix_keys_ms": prefix, "speedup": prefix / whole,
                            "max_logit_diff": diff}
        print(f"batch {batch:5d}: whole buffer {whole:8.2f} ms per step, filled prefix {prefix:8.2f} ms "
              f"(x{prefix / whole:.2f}); largest logit difference {diff:.1e}", flush=True)
    res.update(threads=a.threads, steps=steps)
    print(json.dumps(res))


if __name__ == "__main__":
    main()
