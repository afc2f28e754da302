"""ppvilg deploy: text->image, captions and answers with Paddle Inference, from a folder written by
tools/export_model.py. Needs paddlepaddle (or paddlepaddle-gpu), numpy, OpenCV, Pillow, PyYAML and paddlenlp's
tokenizer; never the training package.

  python deploy/python/infer.py --model-dir output/demo/export --text "左上角有一个小红色圆形" --num 4 --rerank --out out/
  python deploy/python/infer.py --model-dir output/demo/export --image out/00.png
  python deploy/python/infer.py --model-dir output/demo/export --image out/00.png --question "这个图形是什么颜色?"

Sampler options not given take the export's defaults (inference.yml's sampler: the Eval section of the exported
checkpoint's config), as tools/infer.py takes the checkpoint's.
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import cv2  # noqa: E402
import numpy as np  # noqa: E402

from ppvilg_deploy.cli import add_sampler_arguments, apply_sampler_flags, check_arguments  # noqa: E402
from ppvilg_deploy.images import BadImageError, read_image  # noqa: E402
from ppvilg_deploy.predictor import DeployPipeline, ExportError  # noqa: E402
from ppvilg_deploy.tokenizer import TextTooLongError, warn_unknown_words  # noqa: E402


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", required=True, help="a folder written by tools/export_model.py")
    p.add_argument("--text", help="prompt for text->image")
    p.add_argument("--image", help="image to caption, or to ask --question about")
    p.add_argument("--question", help="question about --image (generative VQA)")
    p.add_argument("--rerank", action="store_true", help="text->image: order the candidates by the model's own "
                   "caption probabilities of the prompt's tokens (summed as --rerank-score says), best first")
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
    add_sampler_arguments(p, "the export's inference.yml")
    a = p.parse_args(argv)
    check_arguments(p, a)
    return a


def main(argv=None):
    a = parse(argv)
    try:
        pipe = DeployPipeline(a.model_dir, device=a.device, threads=a.threads, mkldnn=a.mkldnn,
                              memory_optim=a.memory_optim, precision=a.precision, gpu_id=a.gpu_id)
        settings = apply_sampler_flags(pipe.sampler, a)
        unknown = warn_unknown_words(pipe.text_tokenizer, (a.text, a.question))
        if a.text:
            images, _, scores = pipe.text_to_image([a.text], sampler=settings, rerank=a.rerank)
            os.makedirs(a.out, exist_ok=True)
            paths = []
            for k, im in enumerate(images[0]):
                paths.append(os.path.abspath(os.path.join(a.out, f"{k:02d}.png")))
                if not cv2.imwrite(paths[-1], np.ascontiguousarray(im[:, :, ::-1])):
                    raise ExportError(f"{paths[-1]}: cannot write")
            result = {"text": a.text, "images": paths, "reconstructor": pipe.reconstructor,
                      "scores": None if scores is None else [float(x) for x in scores[0]]}
        else:
            images = [read_image(a.image)]
            out = (pipe.answer(images, a.question, sampler=settings) if a.question
                   else pipe.caption(images, sampler=settings))[0]
            result = {"image": a.image, "question": a.question, "text": out["text"], "score": out["score"]}
        result["sampler"] = settings.to_dict()
        result["unknown_words"] = unknown
    except (ExportError, BadImageError, TextTooLongError, FileNotFoundError, ValueError) as e:
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
