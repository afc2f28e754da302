"""MKL's code path on this CPU: what ppvilg sets (ppvilg_deploy/cpu.py: MKL_DEBUG_CPU_TYPE=5, its AVX2 path, on
AMD CPUs) against MKL's own dispatch (PPVILG_KEEP_MKL_DISPATCH=1), each in a child process (MKL reads the
setting once), one run:

  python benchmarks/bench_cpu_math.py [--threads 2] [--steps 5]

Measured in each child: GFLOP/s of paddle's linear at two shapes the models run ([64, 256] x [256, 768] and
[16, 256] x [256, 8192]); ms per training step of the demo tokenizer (stage 1: the shapes VQGAN, batch 16 of
32x32 images, L1 + codebook loss, backward, Adam) and of the demo transformer (stage 2: both directions, batch 32,
benchmarks/bench_train.py's step); ms per cached decode step of the 4 x 256 model on its 32x32 grid (8192 codes,
batch 1). On an Intel CPU both children run the same path (ratios ~1). The last line is one JSON object.
"""
import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def _timed(fn, repeats):
    fn()
    t = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - t) / repeats


def child(threads, steps):
    from ppvilg.utils.runtime import setup_device
    import paddle
    import paddle.nn.functional as F
    from ppvilg.models.layout import text_to_image
    from ppvilg.models.vilg import ViLG, ViLGConfig
    from ppvilg.utils.runtime import training_kernels
    from ppvilg.vq.model import VQGAN, VQGANConfig
    from bench_generate import WIDE_32, time_steps
    from bench_train import stage2_step

    setup_device("cpu", threads)
    out = {"MKL_DEBUG_CPU_TYPE": os.environ.get("MKL_DEBUG_CPU_TYPE")}
    for m, k, n in ((64, 256, 768), (16, 256, 8192)):
        x, w = paddle.rand([m, k]), paddle.rand([k, n])
        out[f"linear_{m}x{k}x{n}_gflops"] = 2 * m * k * n / _timed(lambda: F.linear(x, w), 200) / 1e9

    paddle.seed(0)
    vq = VQGAN(VQGANConfig(**{**VQGANConfig.PRESETS["shapes"], "restart_dead_codes": False}))
    opt = paddle.optimizer.Adam(1e-4, parameters=vq.parameters())
    images = paddle.rand([16, 3, 32, 32]) * 2 - 1

    def stage1():
        rec, q_loss, _, _ = vq(images)
        ((rec - images).abs().mean() + q_loss).backward()
        opt.step()
        opt.clear_grad()

    with training_kernels():
        out["stage1_step_ms"] = _timed(stage1, steps) * 1e3
        _, step, _, _ = stage2_step(32)
        out["stage2_step_ms"] = _timed(lambda: step(False, True), steps) * 1e3
    with paddle.no_grad():
        model = ViLG(ViLGConfig(**WIDE_32))
        model.eval()
        out["decode_32x32_b1_step_ms"] = time_steps(model, text_to_image(WIDE_32["max_text_len"], WIDE_32["grid"]),
                                                    1, 128, True) * 1e3
    print(json.dumps(out))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        return child(a.threads, a.steps)
    runs = {}
    for name, extra in (("ppvilg", {}), ("mkl_dispatch", {"PPVILG_KEEP_MKL_DISPATCH": "1"})):
        env = {k: v for k, v in os.environ.items() if k not in ("MKL_DEBUG_CPU_TYPE", "PPVILG_KEEP_MKL_DISPATCH")}
        env.update(extra)
        r = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", "--threads", str(a.threads),
                            "--steps", str(a.steps)], env=env, capture_output=True, text=True)
        if r.returncode:
            sys.exit(f"the {name} child failed:\n{r.stderr[-3000:]}")
        runs[name] = json.loads(r.stdout.strip().splitlines()[-1])
        print(f"{name:13s} " + "  ".join(f"{k} {v:.1f}" if isinstance(v, float) else f"{k} {v}"
                                         for k, v in runs[name].items()), flush=True)
    fast, base = runs["ppvilg"], runs["mkl_dispatch"]
    ratios = {k: (fast[k] / base[k] if k.endswith("gflops") else base[k] / fast[k])
              for k in fast if isinstance(fast[k], float)}
    print("speed-up of ppvilg's setting: " + ", ".join(f"{k} x{v:.2f}" for k, v in ratios.items()))
    print(json.dumps({"runs": runs, "speedup": ratios, "threads": a.threads, "steps": a.steps}))


if __name__ == "__main__":
    main()
