"""ppvilg deploy: text->image, captions and answers with Paddle Inference, from a folder written by
tools/export_model.py. Needs paddlepaddle (or paddlepaddle-gpu), numpy, OpenCV, PyYAML and paddlenlp's
tokenizer; never the training package.

  python deploy/python/infer.py --model-dir output/demo/export --text "左上角有一个小红色圆形" --num 4 --out out/
  python deploy/python/infer.py --model-dir output/demo/export --image out/00.png
  python deploy/python/infer.py --model-dir output/demo/export --image out/00.png --question "是什么颜色"

Unset sampling options take the exported defaults (inference.yml: the Eval section of the export config).
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import cv2  # noqa: E402
import numpy as np  # noqa: E402

from ppvilg_deploy.predictor import DeployPipeline, ExportError  # noqa: E402
from ppvilg_deploy.tokenizer import TextTooLongError  # noqa: E402


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", required=True, help="a folder written by tools/export_model.py")
    p.add_argument("--text", help="prompt for text->image")
    p.add_argument("--image", help="image to caption, or to ask --question about")
    p.add_argument("--question", help="question about --image (generative VQA)")
    p.add_argument("--num", type=int, default=None, help="text->image: candidates to sample")
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--cfg-scale", type=float, default=None, help="classifier-free guidance scale (1: off)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--method", default=None, choices=["greedy", "beam", "sample"], help="caption decoding")
    p.add_argument("--beam-size", type=int, default=None)
    p.add_argument("--length-penalty", type=float, default=1.0)
    p.add_argument("--max-len", type=int, default=None)
    p.add_argument("--out", default="output/deploy", help="text->image: folder for the PNGs")
    p.add_argument("--device", default="cpu", choices=["cpu", "gpu"])
    p.add_argument("--gpu-id", type=int, default=0)
    p.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "bf16"], help="GPU only: fp16 / bf16")
    p.add_argument("--threads", type=int, default=1, help="CPU math threads (1 was fastest for the demo-size "
                   "model; raise it for larger ones)")
    p.add_argument("--mkldnn", action="store_true", help="CPU: enable oneDNN (off by default, see README)")
    p.add_argument("--memory-optim", action="store_true", help="reuse buffers (paddle 3.3.1 on CPU rejects it for "
                   "these programs; try it on GPU)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    return p.parse_args(argv)


def read_rgb(path):
    img = cv2.imread(path, cv2.IMREAD_COLOR)
    if img is None:
        raise ExportError(f"{path}: cannot read the image (missing, or not an image OpenCV can decode)")
    return img[:, :, ::-1]


def main(argv=None):
    a = parse(argv)
    try:
        pipe = DeployPipeline(a.model_dir, device=a.device, threads=a.threads, mkldnn=a.mkldnn,
                              memory_optim=a.memory_optim, precision=a.precision, gpu_id=a.gpu_id)
        if a.text:
            images, _ = pipe.text_to_image([a.text], num_candidates=a.num, temperature=a.temperature,
                                           top_k=a.top_k, top_p=a.top_p, cfg_scale=a.cfg_scale, seed=a.seed)
            os.makedirs(a.out, exist_ok=True)
            paths = []
            for k, im in enumerate(images[0]):
                paths.append(os.path.abspath(os.path.join(a.out, f"{k:02d}.png")))
                if not cv2.imwrite(paths[-1], np.ascontiguousarray(im[:, :, ::-1])):
                    raise ExportError(f"{paths[-1]}: cannot write")
            result = {"text": a.text, "images": paths}
        elif a.image:
            s = pipe.sampler
            kw = dict(method=a.method or s.get("caption_method", "greedy"), beam_size=a.beam_size or s.get("beam_size", 4),
                      length_penalty=a.length_penalty, max_len=a.max_len, temperature=a.temperature or 1.0,
                      top_k=a.top_k or 0, top_p=a.top_p or 1.0, seed=a.seed or 0)
            images = [read_rgb(a.image)]
            out = pipe.answer(images, a.question, **kw)[0] if a.question else pipe.caption(images, **kw)[0]
            result = {"image": a.image, "question": a.question, "text": out["text"], "score": out["score"]}
        else:
            sys.exit("give --text, or --image (with --question for VQA)")
    except (ExportError, TextTooLongError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    if a.json:
        print(json.dumps(result, ensure_ascii=False))
    elif a.text:
        print(f"{len(result['images'])} images in {a.out}")
    else:
        print(result["text"])


if __name__ == "__main__":
    main()
