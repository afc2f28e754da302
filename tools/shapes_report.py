"""The demo's report: generate and caption held-out shapes with a stage-2 checkpoint and score them exactly.

  python tools/shapes_report.py -c configs/demo/vilg_shapes.yaml [-o Global.checkpoint=...] [--split test|dev]

The items are the shapes `test` split (default) or `dev` split: attribute combinations never seen in training,
disjoint between the two (ppvilg/data/shapes.py); `novel_test` holds the fine-tuning recipe's new shape (the
images are then read telling four shapes apart). Every setting (learning rate, steps, sampler) is chosen on
`dev`; `test` is scored once per change. Text->image: each item's caption (a quarter in unseen phrasings) is a
prompt; candidates are sampled, reranked by the model's own image->text likelihood, and the best is read back
by the OpenCV shapes reader (colour, shape, position, size). Image->text: each item's image is encoded by the
image tokenizer and captioned; the caption's attribute words are read back, and BLEU-4 / CIDEr / ROUGE-L are
computed against every template phrasing of the true attributes (Chinese and English). VQA: each item's image
is asked one question in the item's language, the types in turn (colour, shape, position, size, yes/no with
yes and no answers alternating), and the answer must match exactly (lower case, spaces and punctuation
ignored): `vqa_accuracy` overall and per type. The image tokenizer's own reconstructions of the real images are
read back the same way (`vq_readback_*`: what the generated images can at best score) next to their PSNR.
Accuracies come with 95% intervals (Wilson for rates, a percentile bootstrap over prompts for the mean attribute
accuracy). The sampler is the checkpoint's Eval section unless a flag changes it. Writes <out>/report.json,
<out>/t2i/*.png and <out>/t2i_grid.png.
"""
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ppvilg.utils.runtime import get_logger, setup_from_config  # noqa: E402
from ppvilg.utils.cli import config_parser, load_or_exit  # noqa: E402
import cv2  # noqa: E402
import numpy as np  # noqa: E402
from scipy import stats  # noqa: E402

from ppvilg.data.images import make_grid, write_png  # noqa: E402
from ppvilg.data.shapes import ATTRIBUTES, QUESTION_TYPES, TEMPLATES, ShapesPairs, caption, normalize_answer  # noqa: E402
from ppvilg.metrics.captions import caption_scores  # noqa: E402
from ppvilg.metrics.recon import psnr  # noqa: E402
from ppvilg.metrics.shapes_reader import attribute_accuracy, read_caption, read_image, split_shapes  # noqa: E402
from ppvilg.inference import ViLGInference  # noqa: E402
from ppvilg.utils.io import atomic_write_json  # noqa: E402
from ppvilg_deploy.cli import add_sampler_arguments, apply_sampler_flags  # noqa: E402


def proportion_interval(k, n):
    """95% Wilson interval of k successes in n."""
    ci = stats.binomtest(int(k), int(n)).proportion_ci(confidence_level=0.95, method="wilson")
    return [round(float(ci.low), 4), round(float(ci.high), 4)]


def mean_interval(values):
    """95% percentile-bootstrap interval of a mean over prompts (2000 resamples, fixed seed)."""
    values = np.asarray(values, np.float64)
    if values.min() == values.max():
        return [float(values[0])] * 2
    res = stats.bootstrap((values,), np.mean, confidence_level=0.95, n_resamples=2000, method="percentile",
                          random_state=0)
    return [round(float(res.confidence_interval.low), 4), round(float(res.confidence_interval.high), 4)]


def score(read, truth):
    """Accuracy, per-attribute accuracy, all-correct rate and their intervals of read-back attributes."""
    acc, per = attribute_accuracy(read, truth)
    per_item = [np.mean([r.get(a) == t[a] for a in ATTRIBUTES]) for r, t in zip(read, truth)]
    all_ok = [r == t for r, t in zip(read, truth)]
    n = len(truth)
    intervals = {"attribute_accuracy": mean_interval(per_item),
                 "all_correct": proportion_interval(sum(all_ok), n),
                 **{a: proportion_interval(round(per[a] * n), n) for a in ATTRIBUTES}}
    return acc, per, float(np.mean(all_ok)), intervals


def report_questions(items):
    """One question per item: the types in turn, in the item's language; yes/no alternating yes and no."""
    out = []
    for k, it in enumerate(items):
        kind = QUESTION_TYPES[k % len(QUESTION_TYPES)]
        of_kind = [q for q in it["qa"] if q["type"] == kind and q["lang"] == it["lang"]]
        out.append(of_kind[(k // len(QUESTION_TYPES)) % len(of_kind)])
    return out


def references(attrs):
    return [caption(attrs, lang, t) for split in TEMPLATES.values() for lang, ts in split.items() for t in ts]


def main(argv=None):
    p = config_parser(__doc__)
    p.add_argument("--out", default="output/demo", help="folder for report.json and the images")
    p.add_argument("--split", default="test", choices=["test", "dev", "novel_test"],
                   help="test: the report; dev: where settings are chosen; novel_test: the fine-tuning recipe's "
                        "new shape")
    p.add_argument("--num-prompts", type=int, default=256)
    p.add_argument("--seed-data", type=int, default=0, help="the shapes generator's seed for the items")
    add_sampler_arguments(p, "the checkpoint's Eval section")
    args = p.parse_args(argv)
    ignored = [o for o in args.override if o.startswith("Eval.")]
    if ignored:   # the sampler is the checkpoint's, so such an override would change nothing
        sys.exit(f"shapes_report: -o {ignored[0]}: the report samples with the checkpoint's Eval section; change "
                 f"it with the sampler options (--num, --temperature, --top-k, --cfg-scale, ...; see --help)")
    cfg = load_or_exit(args)
    setup_from_config(cfg)
    log = get_logger()
    vilg = ViLGInference.from_checkpoint(cfg.Global.checkpoint or cfg.Global.output_dir)
    try:
        sampler = apply_sampler_flags(vilg.sampler, args)
    except ValueError as e:
        sys.exit(f"shapes_report: {e}")
    data = ShapesPairs(args.split, args.num_prompts, vilg.image_size, "both", args.seed_data)
    items = [data.item(i) for i in range(len(data))]
    n = len(items)
    prompts, truth = [it["text"] for it in items], [it["attrs"] for it in items]
    real = [it["image"] for it in items]

    limit = vilg.model.config.max_text_len
    cut = sum(len(vilg.text_tokenizer.encode(t)) > limit for t in prompts)
    if cut:
        log.warning(f"{cut} of {n} prompts are longer than the model's {limit} text tokens; they are cut")
    t0 = time.time()
    images, codes, scores = vilg.text_to_image(prompts, rerank=sampler.candidates > 1, sampler=sampler,
                                               truncate=True, keep=1)   # only the best is read back
    t_t2i = time.time() - t0
    best = images[:, 0]
    shapes = split_shapes(args.split)
    read = [read_image(im, shapes=shapes) for im in best]
    t2i_acc, t2i_per, t2i_all, t2i_ci = score(read, truth)
    os.makedirs(os.path.join(args.out, "t2i"), exist_ok=True)
    for k, im in enumerate(best):
        write_png(os.path.join(args.out, "t2i", f"{k:03d}.png"), im)
    big = [cv2.resize(im, (96, 96), interpolation=cv2.INTER_NEAREST) for im in best[:32]]
    write_png(os.path.join(args.out, "t2i_grid.png"), make_grid(big, 8))

    t0 = time.time()
    real_codes = np.concatenate([vilg.encode(real[s:s + 64]) for s in range(0, n, 64)])
    caps = vilg.gen.image_to_text(real_codes, sampler)
    t_i2t = time.time() - t0
    cap_read = [read_caption(c["text"]) for c in caps]
    cap_acc, cap_per, cap_all, cap_ci = score(cap_read, truth)
    metrics = caption_scores({i: references(t) for i, t in enumerate(truth)},
                             {i: c["text"] for i, c in enumerate(caps)})
    t0 = time.time()
    asked = report_questions(items)
    answers = vilg.gen.image_to_text(real_codes, sampler, question=[q["question"] for q in asked])
    t_vqa = time.time() - t0
    right = [normalize_answer(a["text"]) == normalize_answer(q["answer"]) for a, q in zip(answers, asked)]
    vqa_per_type = {kind: float(np.mean([r for r, q in zip(right, asked) if q["type"] == kind]))
                    for kind in QUESTION_TYPES}
    vqa_ci = {"accuracy": proportion_interval(sum(right), n),
              **{kind: proportion_interval(sum(r for r, q in zip(right, asked) if q["type"] == kind),
                                           sum(q["type"] == kind for q in asked)) for kind in QUESTION_TYPES}}
    # the image tokenizer's reconstructions of the same images (what stage 2 can at best reproduce): PSNR, and
    # their attributes read back like the generated images (the ceiling of the text->image figures)
    recon = list(np.concatenate([vilg.decode(real_codes[s:s + 64]) for s in range(0, n, 64)]))
    vq_psnr = psnr(real, recon)
    vq_acc, vq_per, vq_all, vq_ci = score([read_image(im, shapes=shapes) for im in recon], truth)
    report = {
        "split": args.split,
        "t2i_attribute_accuracy": t2i_acc, "t2i_per_attribute": t2i_per,
        "t2i_all_attributes_correct": t2i_all, "t2i_all_correct": t2i_all,
        "caption_attribute_accuracy": cap_acc, "caption_per_attribute": cap_per, "caption_all_correct": cap_all,
        "caption_bleu4": metrics["bleu4"], "caption_cider": metrics["cider"], "caption_rouge_l": metrics["rouge_l"],
        "vqa_accuracy": float(np.mean(right)), "vqa_per_type": vqa_per_type,
        "vq_psnr": vq_psnr, "vq_readback_attribute_accuracy": vq_acc, "vq_readback_per_attribute": vq_per,
        "vq_readback_all_correct": vq_all,
        "intervals": {"t2i": t2i_ci, "caption": cap_ci, "vqa": vqa_ci, "vq_readback": vq_ci, "confidence": 0.95},
        "num_prompts": n, "truncated_prompts": cut, "first_item": 0, "candidates": sampler.candidates, "sampler": sampler.to_dict(),
        "sampling": {"temperature": sampler.temperature, "top_k": sampler.top_k, "cfg_scale": sampler.cfg_scale,
                     "seed": sampler.seed},
        "caption_decoding": {"method": sampler.caption_method, "beam_size": sampler.beam_size},
        "seconds": {"text_to_image": round(t_t2i, 2), "image_to_text": round(t_i2t, 2), "vqa": round(t_vqa, 2)},
        "checkpoint": vilg.folder,
        "examples": [{"prompt": prompts[k], "read_back": read[k], "caption": caps[k]["text"], "truth": truth[k],
                      "question": asked[k]["question"], "answer": answers[k]["text"], "expected": asked[k]["answer"]}
                     for k in range(min(8, n))],
        "images": os.path.abspath(os.path.join(args.out, "t2i")),
    }
    atomic_write_json(os.path.join(args.out, "report.json"), report)
    log.info(f"wrote {os.path.join(args.out, 'report.json')}")
    ci = report["intervals"]
    print(f"[{args.split} split, {n} prompts, 95% intervals]")
    print(f"text->image attribute accuracy: {t2i_acc:.3f} {ci['t2i']['attribute_accuracy']}  all correct: "
          f"{t2i_all:.3f} {ci['t2i']['all_correct']}  {t2i_per}")
    print(f"caption attribute accuracy:     {cap_acc:.3f} {ci['caption']['attribute_accuracy']}  all correct: "
          f"{cap_all:.3f} {ci['caption']['all_correct']}  {cap_per}")
    print(f"caption BLEU-4 {metrics['bleu4']:.3f}  CIDEr {metrics['cider']:.3f}  ROUGE-L {metrics['rouge_l']:.3f}")
    print(f"VQA exact-match accuracy:       {report['vqa_accuracy']:.3f} {ci['vqa']['accuracy']}  "
          f"{ {k: round(v, 3) for k, v in vqa_per_type.items()} }")
    print(f"VQ PSNR ({args.split}): {vq_psnr:.2f} dB; its reconstructions read back: attribute accuracy "
          f"{vq_acc:.3f}, all correct {vq_all:.3f} {ci['vq_readback']['all_correct']} (the text->image ceiling)")
    print(f"images: {report['images']}  report: {os.path.join(args.out, 'report.json')}")


if __name__ == "__main__":
    main()
