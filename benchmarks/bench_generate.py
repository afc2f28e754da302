"""Text->image decoding speed in the dynamic graph, measured side by side in one run.

  python benchmarks/bench_generate.py [--threads 2] [--steps-uncached 16] [--checkpoint output/demo/vilg]
                                      [--windows 4 8 16] [--no-roofline] [--windows-300m 8]

1. KV-cached vs uncached (whole sequence re-encoded every step), random weights (speed does not depend on
   training): the demo transformer on its 8x8 grid, and 4 layers x 256 hidden x 8 heads with 8192 codes on a
   32x32 grid (1024 image tokens, the paper's grid); batch 1 and 8: seconds per decode step, image tokens
   per second, seconds per image. The cached decoder runs every step of a full image; the uncached one,
   whose cost per step is the same at every step, is timed over --steps-uncached steps.
2. Speculative Jacobi decoding vs sequential sampling (top-k 50, temperature 1, batch 1, windows 4 / 8 / 16):
   model forwards per image, codes accepted per forward, wall time, on the 32x32 model above (the JSON's
   `sjd_pass_ratio` / `sjd_wall_speedup` are those of the window with the best wall time, `sjd_window`); with
   --checkpoint also at that window on that trained model over 64 dev prompts of the shapes demo (its Eval
   sampler), where the codes are meaningful.
3. A roofline line at the base_300m preset (random weights): ms per cached decode step at batch 1 and 8
   against the time to read the weights a step touches (every block, the final LN, the image head and the
   image embedding rows; not the text tables) once at the memory bandwidth measured in the same run (a numpy
   copy of 1 GiB: read + write bytes / time), and image tokens/s per batch size. Then SJD against sequential
   sampling on that model (32x32, batch 1, --windows-300m; `sjd_300m_pass_ratio` / `sjd_300m_wall_speedup`):
   there a step reads 1.2 GB of weights, while the small model's ~20 MB stay in the CPU's caches, so a
   window's extra slots cost little beside the weights' reading.
The last line is one JSON object with all figures.
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

from ppvilg.generation import DygraphDecoder, Generator  # noqa: E402
from ppvilg.models.layout import text_to_image  # noqa: E402
from ppvilg.models.vilg import ViLG, ViLGConfig  # noqa: E402
from ppvilg.text.tokenizer import TextTokenizer  # noqa: E402
from ppvilg_deploy.decoding import SamplerSettings  # noqa: E402

WIDE_32 = dict(num_layers=4, hidden_size=256, num_heads=8, max_text_len=24, num_codes=8192, grid=32)


def time_steps(model, layout, batch, steps, use_cache):
    ids = np.zeros([batch, layout.length], np.int64)
    ids[:, :layout.lengths[0]] = np.random.default_rng(0).integers(5, 500, [batch, layout.lengths[0]])
    ids[:, layout.lengths[0]] = model.boi_id
    dec = DygraphDecoder(model, layout, ids, np.ones(ids.shape, bool), use_cache)
    dec.logits_at(dec.t0)  # prefill / first step, not timed
    _sync()
    t = time.perf_counter()
    for k in range(1, steps):
        dec.ids[:, dec.t0 + k] = 1
        dec.logits_at(dec.t0 + k)
    _sync()
    return (time.perf_counter() - t) / (steps - 1)


SJD_PROMPT, SJD_SAMPLER = ["左上角有一个小红色圆形"], SamplerSettings(top_k=50, temperature=1.0)


def compare_sjd(gen, texts, sampler, windows):
    """Sequential vs speculative Jacobi decoding of the same prompts at each window: seconds, forwards, codes
    per forward; keys "sequential" and "sjd_w<window>"."""
    out = {}
    for mode, window in [("sequential", sampler.sjd_window)] + [("sjd", w) for w in windows]:
        stats = {}
        t = time.perf_counter()
        gen.sample_codes(texts, sampler.replace(decoding=mode, sjd_window=window), truncate=True, stats=stats)
        out[mode if mode == "sequential" else f"sjd_w{window}"] = {
            "seconds": time.perf_counter() - t, "forwards": stats["forwards"],
            "codes_per_forward": stats["codes_per_forward"]}
    return out


def report_sjd(label, r, windows):
    """Prints one line per window of compare_sjd's result `r`; -> (the window with the best wall time, its
    forward-pass ratio, its wall-time speed-up over sequential sampling)."""
    seq = r["sequential"]
    for w in windows:
        sjd = r[f"sjd_w{w}"]
        print(f"SJD {label}, window {w}: {sjd['forwards']} forwards vs {seq['forwards']} "
              f"(x{seq['forwards'] / sjd['forwards']:.2f} fewer, {sjd['codes_per_forward']:.2f} codes/forward), "
              f"{sjd['seconds']:.1f} s vs {seq['seconds']:.1f} s (x{seq['seconds'] / sjd['seconds']:.2f})", flush=True)
    best = min(windows, key=lambda w: r[f"sjd_w{w}"]["seconds"])
    return best, seq["forwards"] / r[f"sjd_w{best}"]["forwards"], seq["seconds"] / r[f"sjd_w{best}"]["seconds"]


def memory_bandwidth(nbytes=1 << 30, repeats=3):
    """Bytes moved per second by a copy (read + write) of nbytes into a buffer already allocated, on the
    current device (CPU: numpy's copy; paddle's CPU clone allocates and measured ~10x lower), best of
    `repeats`."""
    if paddle.device.get_device().startswith("gpu"):
        a = paddle.ones([nbytes // 4], "float32")
        return 2 * nbytes / min(_timed(lambda: a.clone()) for _ in range(repeats))
    a = np.ones(nbytes // 4, np.float32)
    b = np.zeros_like(a)
    return 2 * nbytes / min(_timed(lambda: np.copyto(b, a)) for _ in range(repeats))


def _sync():
    if paddle.device.get_device().startswith("gpu"):
        paddle.device.synchronize()


def _timed(fn):
    _sync()
    t = time.perf_counter()
    fn()
    _sync()
    return time.perf_counter() - t


def roofline(batches=(1, 8), steps=12, sjd_windows=()):
    """The roofline figures at base_300m; with sjd_windows also SJD vs sequential sampling on that model
    (32x32 grid, batch 1, top-k 50), where a step reads more weights than the caches hold."""
    cfg = ViLGConfig(**ViLGConfig.PRESETS["base_300m"])
    model = ViLG(cfg)
    model.eval()
    touched = sum(p.size for n, p in model.named_parameters() if not n.startswith("text_"))
    touched -= cfg.num_codes * cfg.hidden_size   # of the image table's num_codes + 1 rows a step reads one
    bw = memory_bandwidth()
    bound = touched * 4 / bw
    layout = text_to_image(cfg.max_text_len, cfg.grid)
    out = {"parameters": sum(p.size for p in model.parameters()), "bytes_touched_per_step": touched * 4,
           "bandwidth_gb_s": bw / 1e9, "bound_ms_per_step": bound * 1e3}
    for batch in batches:
        s = time_steps(model, layout, batch, steps, True)
        out[f"b{batch}"] = {"ms_per_step": s * 1e3, "tokens_per_s": batch / s, "of_bound": bound / s}
    if sjd_windows:
        out["sjd"] = compare_sjd(Generator(model, TextTokenizer()), SJD_PROMPT, SJD_SAMPLER, sjd_windows)
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps-uncached", type=int, default=16)
    p.add_argument("--windows", type=int, nargs="+", default=[4, 8, 16],
                   help="speculative Jacobi decoding: drafts per forward, each measured")
    p.add_argument("--checkpoint", default=None, help="a trained shapes-demo checkpoint for SJD on real codes")
    p.add_argument("--no-roofline", action="store_true", help="skip the base_300m roofline line")
    p.add_argument("--roofline-batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--windows-300m", type=int, nargs="*", default=[8],
                   help="SJD windows measured at base_300m (none: skip; ~1.5 min sequential + ~45 s per window)")
    p.add_argument("--device", default="cpu", help="cpu or gpu (the bandwidth is then the GPU memory's)")
    a = p.parse_args()
    setup_device(a.device, a.threads)
    paddle.seed(0)
    results = {}
    summary = {"threads": a.threads, "results": results}
    with paddle.no_grad():
        wide = None
        for name, cfg in (("8x8", ViLGConfig(**ViLGConfig.PRESETS["shapes"])), ("32x32", ViLGConfig(**WIDE_32))):
            model = ViLG(cfg)
            model.eval()
            wide = model
            layout = text_to_image(cfg.max_text_len, cfg.grid)
            n = cfg.grid * cfg.grid
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
                      f" | speed-up x{r['speedup']:.1f}", flush=True)
        summary.update({"cache_speedup_8x8": results["8x8_b1"]["speedup"],
                        "cache_speedup_32x32": results["32x32_b1"]["speedup"],
                        "cache_speedup_32x32_b8": results["32x32_b8"]["speedup"],
                        "dygraph_tokens_per_s_32x32_b1": results["32x32_b1"]["cached_tokens_per_s"],
                        "dygraph_tokens_per_s_32x32_b8": results["32x32_b8"]["cached_tokens_per_s"]})

        gen = Generator(wide, TextTokenizer())
        r = summary["sjd_32x32_random"] = compare_sjd(gen, SJD_PROMPT, SJD_SAMPLER, a.windows)
        best, summary["sjd_pass_ratio"], summary["sjd_wall_speedup"] = report_sjd("32x32 random weights", r, a.windows)
        summary["sjd_window"] = best

        if a.checkpoint:
            from ppvilg.data.shapes import ShapesPairs
            from ppvilg.inference import ViLGInference
            vilg = ViLGInference.from_checkpoint(a.checkpoint)
            data = ShapesPairs("dev", 64, vilg.image_size)
            texts = [data.item(i)["text"] for i in range(len(data))]
            r = compare_sjd(vilg.gen, texts, vilg.sampler, [best])
            seq, sjd = r["sequential"], r[f"sjd_w{best}"]
            summary["sjd_demo"] = dict(r, sampler=vilg.sampler.to_dict())
            print(f"SJD demo checkpoint (8x8, 64 dev prompts x {vilg.sampler.candidates} candidates, batch "
                  f"together, window {best}): {sjd['forwards']} forwards vs {seq['forwards']}, {sjd['seconds']:.1f} s vs "
                  f"{seq['seconds']:.1f} s", flush=True)

        if not a.no_roofline:
            r = summary["roofline_base_300m"] = roofline(a.roofline_batches, sjd_windows=a.windows_300m)
            first = f"b{a.roofline_batches[0]}"
            if first == "b1":
                summary["roofline_fraction_b1"] = r["b1"]["of_bound"]
            print(f"roofline base_300m ({r['parameters'] / 1e6:.0f}M parameters, "
                  f"{r['bytes_touched_per_step'] / 1e9:.2f} GB read per step at {r['bandwidth_gb_s']:.1f} GB/s "
                  f"= {r['bound_ms_per_step']:.1f} ms): " + ", ".join(
                      f"batch {b} {r[f'b{b}']['ms_per_step']:.1f} ms/step ({100 * r[f'b{b}']['of_bound']:.0f}% "
                      f"of the bound, {r[f'b{b}']['tokens_per_s'] / r[first]['tokens_per_s']:.1f}x the tokens/s of "
                      f"batch {a.roofline_batches[0]})" for b in a.roofline_batches), flush=True)
            if a.windows_300m:
                (summary["sjd_300m_window"], summary["sjd_300m_pass_ratio"],
                 summary["sjd_300m_wall_speedup"]) = report_sjd("base_300m 32x32 random weights", r["sjd"],
                                                                a.windows_300m)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
