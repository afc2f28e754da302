"""Exported Paddle Inference predictor vs the dynamic graph, same run: per-token decode latency and
text->image images per second.

  python benchmarks/bench_deploy.py [--threads 1 2] [--batch 1 8] [--grid 8 32]

Random weights (speed does not depend on training), exported to a temporary folder for each image grid: at 8x8
the demo transformer (shapes preset: 4 layers x 128 hidden, 256 codes) and the demo VQ tokenizer; at 32x32
(1024 image tokens, the paper's grid) 4 layers x 256 hidden x 8 heads with 8192 codes (bench_generate.py's
WIDE_32, issue 15's configuration) and the demo VQ tokenizer's architecture with 8192 codes.
For each thread count (the same for both backends), grid and batch: the mean latency of a one-token cached decode step (after the prefill, over a whole
image's steps) in the dynamic graph (ppvilg.generation) and in the predictor (deploy/python), and images per
second for whole text->image generations (top-k sampling, decoding codes to pixels included). The last line is
one JSON object with the figures and the predictor / dynamic-graph speed-ups (`predictor_step_speedup_b1` /
`_b8`: decode step at the largest grid, each backend at its faster thread count).
"""
import argparse
import json
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "deploy", "python")]

from ppvilg.utils.runtime import setup_device  # noqa: E402
import numpy as np  # noqa: E402

from ppvilg.config import load_config  # noqa: E402
from ppvilg.engine.tasks import build_task  # noqa: E402
from ppvilg.export import export  # noqa: E402
from ppvilg.models.vilg import ViLG, ViLGConfig  # noqa: E402
from ppvilg.registry import model_config  # noqa: E402
from ppvilg.inference import ViLGInference  # noqa: E402
from ppvilg.text.tokenizer import TextTokenizer  # noqa: E402
from ppvilg_deploy.decoding import SamplerSettings  # noqa: E402
from ppvilg_deploy.predictor import DeployPipeline  # noqa: E402
from bench_generate import WIDE_32  # noqa: E402  (this folder: the same 32x32 model as bench_generate)

PROMPT = "左上角有一个小红色圆形"
SAMPLER = SamplerSettings(top_k=8)   # the same settings for both backends: one image per prompt, no guidance


def step_latency(backend, batch, grid):
    """Mean seconds of a one-token decode step over a whole image (the prefill is not counted)."""
    n = grid * grid
    ids, valid, _ = backend.seq.text_to_image(backend.seq.text([PROMPT] * batch), np.ones([batch, n], np.int64))
    dec = backend.make_decoder("t2i", ids, valid)
    dec.logits_at(dec.t0)
    t = time.perf_counter()
    for k in range(1, n):
        dec.logits_at(dec.t0 + k)
    return (time.perf_counter() - t) / (n - 1)


def images_per_second(generate, batch):
    t = time.perf_counter()
    generate(batch)
    return batch / (time.perf_counter() - t)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    p.add_argument("--grid", type=int, nargs="+", default=[8, 32])
    a = p.parse_args()
    results = {}
    vq_cfg = load_config(os.path.join(ROOT, "configs/demo/vqgan_shapes.yaml"))
    cfg = load_config(os.path.join(ROOT, "configs/demo/vilg_shapes.yaml"))  # its Eval section: sampler defaults
    setup_device("cpu", a.threads[0])
    downsample = model_config(vq_cfg.Model).downsample   # the demo VQ's factor, read from its config
    for grid in a.grid:
        config = WIDE_32 if grid == 32 else dict(ViLGConfig.PRESETS["shapes"], grid=grid)
        model = ViLG(ViLGConfig(**config))
        model.eval()
        vq_cfg_g = load_config(os.path.join(ROOT, "configs/demo/vqgan_shapes.yaml"),
                               [f"Data.image_size={grid * downsample}",
                                f"Model.resolution={grid * downsample}",
                                f"Model.num_codes={config['num_codes']}"])
        vq = build_task(vq_cfg_g).model
        vq.eval()
        pipe = ViLGInference(model, TextTokenizer(), vq, vq_cfg_g)
        with tempfile.TemporaryDirectory() as tmp:
            export(pipe, cfg, tmp)
            for threads in a.threads:
                setup_device("cpu", threads)
                dep = DeployPipeline(tmp, threads=threads)
                for b in a.batch:
                    dyn_step, pred_step = step_latency(pipe.gen, b, grid), step_latency(dep, b, grid)
                    dyn_ips = images_per_second(lambda n: pipe.decode(pipe.gen.text_to_image([PROMPT] * n, SAMPLER)), b)
                    pred_ips = images_per_second(lambda n: dep.text_to_image([PROMPT] * n, SAMPLER), b)
                    key = f"{grid}x{grid}_b{b}_t{threads}"
                    results[key] = {"dygraph_ms_per_token_step": dyn_step * 1e3,
                                    "predictor_ms_per_token_step": pred_step * 1e3,
                                    "step_speedup": dyn_step / pred_step, "dygraph_images_per_s": dyn_ips,
                                    "predictor_images_per_s": pred_ips, "images_per_s_speedup": pred_ips / dyn_ips}
                    r = results[key]
                    print(f"grid {grid}x{grid} batch {b} threads {threads}: decode step "
                          f"{r['dygraph_ms_per_token_step']:.2f} ms (dygraph) vs {r['predictor_ms_per_token_step']:.2f} ms "
                          f"(predictor), x{r['step_speedup']:.2f}; {dyn_ips:.2f} vs {pred_ips:.2f} images/s, "
                          f"x{r['images_per_s_speedup']:.2f}", flush=True)
    summary = {"results": results}
    top = f"{max(a.grid)}x{max(a.grid)}"
    for b in a.batch:   # each backend at its faster thread count
        cells = [results[f"{top}_b{b}_t{t}"] for t in a.threads]
        summary[f"predictor_step_speedup_b{b}"] = (min(c["dygraph_ms_per_token_step"] for c in cells)
                                                   / min(c["predictor_ms_per_token_step"] for c in cells))
        print(f"grid {top} batch {b}, each backend at its faster thread count: predictor x"
              f"{summary[f'predictor_step_speedup_b{b}']:.2f} per decode step")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
