"""ppvilg HTTP service: a web page and a JSON API (text->image, captions, answers) over a folder written by
tools/export_model.py, with batching of concurrent requests. Never imports the training package.

  python deploy/python/serve.py --model-dir output/demo/export [--host 127.0.0.1] [--port 8080]

then open http://127.0.0.1:8080/ , or call the API:

  curl -s localhost:8080/v1/images/generations -H 'Content-Type: application/json' \\
       -d '{"prompt": "左上角有一个小红色圆形", "n": 4, "rerank": true, "seed": 1}'
  curl -s localhost:8080/v1/captions -F image=@out.png
  curl -s localhost:8080/v1/answers -F image=@out.png -F "question=这个图形是什么颜色?"

Sampler options a request does not give take the export's defaults (inference.yml's sampler). See
deploy/README.md for the API, the batching and the limits.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from ppvilg_deploy.predictor import DeployPipeline, ExportError  # noqa: E402
from ppvilg_deploy.server import ServerSettings, create_app  # noqa: E402


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", required=True, help="a folder written by tools/export_model.py")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--device", default="cpu", choices=["cpu", "gpu"])
    p.add_argument("--gpu-id", type=int, default=0)
    p.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "bf16"], help="GPU only: fp16 / bf16")
    p.add_argument("--threads", type=int, default=1, help="CPU math threads of the predictors")
    p.add_argument("--max-batch", type=int, default=64, help="images (text->image candidates) or input images "
                   "(captions, answers) decoded together at most (a bigger request runs alone); 1: one request at "
                   "a time")
    p.add_argument("--max-n", type=int, default=16, help="text->image: images one request may ask for")
    p.add_argument("--gather-ms", type=float, default=50.0, help="under concurrent load, a batch with room waits "
                   "this long for more requests before it starts (0: never waits)")
    p.add_argument("--max-queue", type=int, default=64, help="requests waiting before new ones get 503")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds a request may wait for its result (504)")
    p.add_argument("--max-body-bytes", type=int, default=8 * 1024 * 1024, help="request body limit (413)")
    p.add_argument("--max-image-pixels", type=int, default=4096 * 4096,
                   help="an uploaded image whose header declares more pixels is refused before decoding")
    p.add_argument("--log-level", default="warning", choices=["critical", "error", "warning", "info", "debug"])
    a = p.parse_args(argv)
    for name in ("max_batch", "max_queue", "max_body_bytes", "max_image_pixels", "max_n"):
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if a.gather_ms < 0:
        p.error("--gather-ms must be >= 0")
    if a.timeout <= 0:
        p.error("--timeout must be > 0")
    return a


def main(argv=None):
    a = parse(argv)
    try:
        pipe = DeployPipeline(a.model_dir, device=a.device, threads=a.threads, precision=a.precision,
                              gpu_id=a.gpu_id)
    except (ExportError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    settings = ServerSettings(a.max_batch, a.max_queue, a.timeout, a.max_body_bytes, a.max_image_pixels, a.max_n,
                              a.gather_ms / 1000.0, name=os.path.basename(os.path.normpath(a.model_dir)))
    app = create_app(pipe, settings)
    import uvicorn
    print(f"ppvilg: serving {a.model_dir} on http://{a.host}:{a.port}/ (max batch {a.max_batch}, queue "
          f"{a.max_queue})", flush=True)
    uvicorn.run(app, host=a.host, port=a.port, log_level=a.log_level, workers=1)


if __name__ == "__main__":
    main()
