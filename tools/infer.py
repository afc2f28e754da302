"""Generate with a stage-2 checkpoint folder (its config names the stage-1 tokenizer).

  python tools/infer.py output/demo/vilg --text "左上角有一个小红色圆形" --num 8 --rerank --out output/infer
  python tools/infer.py output/demo/vilg --image picture.png                  # caption
  python tools/infer.py output/demo/vilg --image picture.png --question "这个图形是什么颜色?"   # answer
  add --json for one JSON object on stdout (with the sampler settings used)

Sampler options not given take the checkpoint's defaults: its config's Eval section (as an export of it does).
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ppvilg.utils.runtime import setup_device  # noqa: E402
import cv2  # noqa: E402

from ppvilg.data.images import BadImageError, make_grid, write_png  # noqa: E402
from ppvilg.checkpoints import CheckpointError  # noqa: E402
from ppvilg.text.tokenizer import TextTooLongError, warn_unknown_words  # noqa: E402
from ppvilg_deploy.cli import add_sampler_arguments, apply_sampler_flags, check_arguments  # noqa: E402


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="a stage-2 checkpoint folder, or a run folder (its newest checkpoint)")
    p.add_argument("--text", help="prompt for text->image")
    p.add_argument("--image", help="image to caption, or to ask --question about")
    p.add_argument("--question", help="question about --image (generative VQA)")
    p.add_argument("--rerank", action="store_true", help="text->image: order candidates by the model's own "
                   "image->text probabilities of the prompt's tokens (summed as --rerank-score says)")
    p.add_argument("--scorer", help="text->image: rerank with module:function(texts, images) -> scores instead")
    p.add_argument("--out", default="output/infer", help="text->image: folder for the PNGs and the grid")
    p.add_argument("--device", default="auto")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    add_sampler_arguments(p, "the checkpoint's Eval section")
    a = p.parse_args(argv)
    check_arguments(p, a)
    return a


def main(argv=None):
    a = parse(argv)
    setup_device(a.device)
    from ppvilg.inference import ViLGInference
    try:
        vilg = ViLGInference.from_checkpoint(a.checkpoint)
        settings = apply_sampler_flags(vilg.sampler, a)
        unknown = warn_unknown_words(vilg.text_tokenizer, (a.text, a.question))
        if a.text:
            images, codes, scores = vilg.text_to_image([a.text], rerank=a.rerank or bool(a.scorer), scorer=a.scorer,
                                                       sampler=settings)
            paths = []
            for k, im in enumerate(images[0]):
                paths.append(os.path.abspath(os.path.join(a.out, f"{k:02d}.png")))
                write_png(paths[-1], im)
            scale = max(1, 128 // images.shape[2])
            big = [cv2.resize(im, None, fx=scale, fy=scale, interpolation=cv2.INTER_NEAREST) for im in images[0]]
            grid = os.path.abspath(os.path.join(a.out, "grid.png"))
            write_png(grid, make_grid(big, min(4, len(big))))
            result = {"text": a.text, "images": paths, "grid": grid, "reconstructor": vilg.reconstructor,
                      "scores": None if scores is None else [float(s) for s in scores[0]]}
        else:
            images = vilg.load_images([a.image])
            out = (vilg.answer(images, a.question, sampler=settings) if a.question
                   else vilg.caption(images, sampler=settings))[0]
            result = {"image": a.image, "question": a.question, "text": out["text"], "score": out["score"]}
        result["sampler"] = settings.to_dict()
        result["unknown_words"] = unknown
    except (CheckpointError, BadImageError, TextTooLongError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    if a.json:
        print(json.dumps(result, ensure_ascii=False))
    elif a.text:
        print(f"{len(result['images'])} images in {a.out} (grid: {result['grid']})")
    else:
        print(result["text"])


if __name__ == "__main__":
    main()
