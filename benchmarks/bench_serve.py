"""Load test of the HTTP service on loopback: requests/s, p50 / p95 latency and errors with 1, 4 and 16 concurrent
clients, with batching on (--max-batch 64) and off (--max-batch 1: one request at a time), in one run, for one
image per request (n = 1, OpenAI's default) and for the export's candidates per request (4 for the demo).

  python benchmarks/bench_serve.py --model-dir output/demo/export [--requests 48] [--clients 1 4 16] [--n 1 4]

Each client sends text->image requests (the export's default sampler but for n: guidance, top-k; a seed per
request; prompts from the built-in shapes templates) one after another until the fixed number of requests is
spent. The server is started fresh for each mode (deploy/python/serve.py, one worker, --threads 1) and warmed up
with two requests of each n. The last line is one JSON object with every figure and the ratios batched / one at a
time, `batching_speedup_n{n}_c{clients}`.
"""
import argparse
import json
import os
import sys
import threading
import time

import httpx
import numpy as np
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "deploy", "python"))

from ppvilg_deploy.decoding import SamplerSettings  # noqa: E402
from ppvilg_deploy.server import spawn  # noqa: E402
PROMPTS = ["左上角有一个小红色圆形", "a big blue square in the bottom right", "中间有一个大绿色三角形",
           "a small yellow circle at the top right", "右下角有一个小紫色正方形", "a big red triangle in the middle"]


def start_server(model_dir, max_batch, max_queue, threads):
    try:
        return spawn(model_dir, "--max-batch", max_batch, "--max-queue", max_queue, threads=threads, timeout=180)
    except RuntimeError as e:
        sys.exit(f"bench_serve: {e}")


def load(url, clients, requests, n):
    """`clients` threads send `requests` requests in all -> figures."""
    latencies, errors, counter, lock = [], [], [0], threading.Lock()

    def client():
        with httpx.Client(timeout=600) as c:
            while True:
                with lock:
                    k = counter[0]
                    if k >= requests:
                        return
                    counter[0] += 1
                body = {"prompt": PROMPTS[k % len(PROMPTS)], "seed": k, "n": n}
                t0 = time.perf_counter()
                try:
                    r = c.post(url + "/v1/images/generations", json=body)
                    ok = r.status_code == 200 and len(r.json()["data"]) >= 1
                    status = r.status_code
                except httpx.HTTPError as e:
                    ok, status = False, type(e).__name__
                dt = time.perf_counter() - t0
                with lock:
                    (latencies if ok else errors).append(dt if ok else status)

    before = httpx.get(url + "/healthz").json()["served"]
    t0 = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    after = httpx.get(url + "/healthz").json()["served"]
    lat = np.array(latencies) if latencies else np.array([np.nan])
    batches = after["batches"] - before["batches"]
    return {"requests": requests, "ok": len(latencies), "errors": len(errors), "error_kinds": sorted(set(map(str, errors))),
            "wall_s": wall, "rps": len(latencies) / wall, "p50_ms": float(np.percentile(lat, 50) * 1e3),
            "p95_ms": float(np.percentile(lat, 95) * 1e3), "batches": batches,
            "requests_per_batch": (after["jobs"] - before["jobs"]) / max(batches, 1)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", default=os.path.join(ROOT, "output", "demo", "export"),
                   help="an export folder (default: the demo's, after make demo and tools/export_model.py)")
    p.add_argument("--requests", type=int, default=48, help="requests per (mode, clients) cell")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--n", type=int, nargs="+", default=None,
                   help="images per request, each measured (default: 1 and the export's candidates)")
    p.add_argument("--max-batch", type=int, default=64, help="the batching server's --max-batch")
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    if not os.path.isfile(os.path.join(a.model_dir, "inference.yml")):
        sys.exit(f"bench_serve: {a.model_dir} is not an export folder; after `make demo` run:\n  python "
                 "tools/export_model.py -c configs/demo/vilg_shapes.yaml -o Global.checkpoint=output/demo/vilg "
                 "--out output/demo/export")
    if a.n is None:
        with open(os.path.join(a.model_dir, "inference.yml"), encoding="utf-8") as f:
            a.n = sorted({1, SamplerSettings.from_mapping(yaml.safe_load(f).get("sampler")).candidates})
    max_queue = max(64, max(a.clients) * 2)
    results = {}
    for mode, max_batch in (("batched", a.max_batch), ("one_at_a_time", 1)):
        proc, url = start_server(a.model_dir, max_batch, max_queue, a.threads)
        try:
            for n in a.n:
                load(url, 1, 2, n)   # warm-up
            for n in a.n:
                for c in a.clients:
                    r = load(url, c, a.requests, n)
                    results[f"{mode}_n{n}_c{c}"] = r
                    print(f"{mode:>14} n {n:>2} clients {c:>3}: {r['rps']:6.2f} req/s  p50 {r['p50_ms']:7.0f} ms  "
                          f"p95 {r['p95_ms']:7.0f} ms  errors {r['errors']}  requests/batch "
                          f"{r['requests_per_batch']:.1f}", flush=True)
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    summary = {"model_dir": a.model_dir, "requests": a.requests, "max_batch": a.max_batch, "threads": a.threads,
               "n": a.n, "cells": results}
    for n in a.n:
        for c in a.clients:
            b, o = results[f"batched_n{n}_c{c}"], results[f"one_at_a_time_n{n}_c{c}"]
            summary[f"batching_speedup_n{n}_c{c}"] = b["rps"] / o["rps"]
            print(f"n {n:>2} clients {c:>3}: batched / one at a time = x{b['rps'] / o['rps']:.2f} req/s")
    summary["errors"] = sum(r["errors"] for r in results.values())
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
