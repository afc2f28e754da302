"""Evaluation the way the paper did it (driven by tools/eval.py).

- text->image: one image per caption (of `Eval.num_samples` images of the split, the first caption of each),
  sampled with the Eval sampler settings, best of `Eval.candidates` after reranking; FID of the generated set
  against the real images (center-cropped to the generator's size), TF-Inception pool3 features, statistics
  of the real set cached under `Eval.fid_cache`.
- image->text: a caption for each image, scored against all its reference captions with BLEU-1..4, METEOR 1.5,
  ROUGE-L, CIDEr-D (pycocoevalcap scorers; `Eval.tokenization`: jieba as AIC-ICC / COCO-CN, char, space, auto).
- VQA: an answer to each question of the split's images (the shapes questions, a manifest's question /
  answer fields), greedy or as the Eval sampler says; exact match after `normalize_answer` (lower case, no
  spaces or punctuation) against any given answer, overall and per question `type` where the data name one
  (short answers), and the caption metrics of the answers against the given ones (long answers).
- reconstruction: the stage-1 task's PSNR / SSIM / codebook statistics.
"""
import numpy as np

from ppvilg.data.corpora import group_references
from ppvilg.data.datasets import read_pairs
from ppvilg.data.images import BadImageError, read_image, resize_center_crop
from ppvilg.data.shapes import ShapesPairs, normalize_answer
from ppvilg.metrics.captions import caption_scores
from ppvilg.metrics.fid import cached_statistics, fingerprint, frechet_distance, statistics
from ppvilg.metrics.inception import inception_features, load_inception
from ppvilg.utils.runtime import get_logger
from ppvilg_deploy.decoding import SamplerSettings

EVAL_DEFAULTS = {
    "num_samples": 1000,        # images of the split to evaluate (the paper: 30,000 for MS-COCO FID)
    # the sampler (ppvilg_deploy.decoding.SamplerSettings: candidates > 1 are reranked by the model itself),
    # also the defaults of tools/infer.py on a checkpoint and of its export
    **SamplerSettings(caption_method="beam", beam_size=3).to_dict(),
    "fid_weights": None,        # converted FID Inception weights (default: the cache of get_fid_weights.py)
    "fid_cache": "output/fid_stats",  # cached statistics of real image sets
    "tokenization": "auto",     # auto | jieba | char | space
    "meteor": True,
}


def _load_images(loaders, limit):
    """{key: load} in order -> (RGB images, {key: index into them}) of the first `limit` keys whose image loads;
    an unreadable image is skipped with a warning."""
    log = get_logger()
    images, index, skipped = [], {}, 0
    for key, load in loaders.items():
        if len(images) >= limit:
            break
        try:
            images.append(load())
        except BadImageError as e:
            skipped += 1
            log.warning(f"skipped image: {e}")
            continue
        index[key] = len(images) - 1
    if skipped:
        log.warning(f"{skipped} images skipped")
    return images, index


def _image_loader(path, image_size):
    return lambda: resize_center_crop(read_image(path), image_size)


def image_caption_sets(section, image_size, limit):
    """-> (RGB uint8 images at image_size, {i: [reference captions]}, first caption of each, a key naming the
    image set for the statistics cache)."""
    if section.source == "shapes":
        ds = ShapesPairs(section.split, min(limit, section.num_samples), image_size, section.lang, section.seed)
        items = [ds.item(i) for i in range(len(ds))]
        return ([it["image"] for it in items], {i: [it["text"]] for i, it in enumerate(items)},
                [it["text"] for it in items], fingerprint([section.to_dict(), image_size, len(items)]))
    order, refs = group_references(read_pairs(section))
    images, index = _load_images({path: _image_loader(path, image_size) for path in order}, limit)
    references = {index[path]: refs[k] for k, path in enumerate(order) if path in index}
    prompts = [references[i][0] for i in range(len(images))]
    return images, references, prompts, fingerprint(list(index) + [image_size])


def evaluate_text_to_image(vilg, images, prompts, ev, key, batch=16):
    log = get_logger()
    net = load_inception(ev.fid_weights)
    limit = vilg.model.config.max_text_len
    cut = sum(len(vilg.text_tokenizer.encode(t)) > limit for t in prompts)
    if cut:
        log.warning(f"{cut} of {len(prompts)} captions are longer than the model's {limit} text tokens; cut")
    generated = []
    for s in range(0, len(prompts), batch):
        chunk = prompts[s:s + batch]
        ims, _, _ = vilg.text_to_image(chunk, rerank=ev.candidates > 1, truncate=True,
                                       sampler=SamplerSettings.from_mapping(ev), seed=ev.seed + s)
        generated += list(ims[:, 0])
        log.info(f"text->image: {len(generated)}/{len(prompts)} generated")
    mu_r, sig_r, cached = cached_statistics(ev.fid_cache, key, lambda: inception_features(net, images))
    mu_g, sig_g = statistics(inception_features(net, generated))
    fid = frechet_distance(mu_r, sig_r, mu_g, sig_g)
    return {"fid": fid, "num_images": len(generated), "real_stats_cached": cached, "truncated_prompts": cut}, generated


def evaluate_image_to_text(vilg, images, references, ev):
    caps = vilg.caption(images, sampler=SamplerSettings.from_mapping(ev))
    hyps = {i: c["text"] for i, c in enumerate(caps)}
    scores = caption_scores(references, hyps, mode=ev.tokenization, meteor=ev.meteor)
    return dict(scores, num_images=len(images)), caps


def question_sets(section, image_size, limit):
    """The questions about the first `limit` images of a split that have any -> (RGB uint8 images at
    image_size, [dict(image=index into the images, question, answers=[str], type=str or None)]). A question asked
    about the same image on several manifest lines keeps every answer given."""
    if section.source == "shapes":
        ds = ShapesPairs(section.split, min(limit, section.num_samples), image_size, section.lang, section.seed)
        entries = [(("shapes", i), lambda i=i: ds.item(i)["image"], ds.questions(i)) for i in range(len(ds))]
    else:
        entries = [(p.image, _image_loader(p.image, image_size), p.qa) for p in read_pairs(section) if p.qa]
    loaders = {}
    for key, load, _ in entries:
        loaders.setdefault(key, load)
    images, index = _load_images(loaders, limit)
    asked = {}
    for key, _, qa in entries:
        if key not in index:
            continue
        for q in qa:
            entry = asked.setdefault((index[key], q["question"]), {"image": index[key], "question": q["question"],
                                                                   "answers": [], "type": q.get("type")})
            if q["answer"] not in entry["answers"]:
                entry["answers"].append(q["answer"])
    if not asked:
        raise ValueError(f"Data section ({section.source}"
                         + (f" {section.path}" if section.get("path") else "")
                         + "): no questions (a manifest line gives them as 'question' / 'answer' or 'qa')")
    return images, list(asked.values())


def evaluate_vqa(vilg, images, questions, ev, batch=64):
    """Answers to `questions` (from question_sets) -> (metrics, answers). Metrics: exact_match (the share of
    questions whose normalised answer equals a normalised given one), exact_match_by_type (questions with a
    type), the caption metrics of the answers against the given ones, num_questions, num_images."""
    sampler = SamplerSettings.from_mapping(ev)
    codes = vilg.encode(images)
    answers = []
    for s in range(0, len(questions), batch):
        chunk = questions[s:s + batch]
        vilg.check_text([q["question"] for q in chunk])
        rows = np.array([q["image"] for q in chunk])
        answers += vilg.gen.image_to_text(codes[rows], sampler, question=[q["question"] for q in chunk])
        get_logger().info(f"VQA: {len(answers)}/{len(questions)} answered")
    right = [normalize_answer(a["text"]) in {normalize_answer(x) for x in q["answers"]}
             for a, q in zip(answers, questions)]
    by_type = {}
    for r, q in zip(right, questions):
        if q["type"] is not None:
            by_type.setdefault(q["type"], []).append(r)
    scores = caption_scores({i: q["answers"] for i, q in enumerate(questions)},
                            {i: a["text"] for i, a in enumerate(answers)}, mode=ev.tokenization, meteor=ev.meteor)
    metrics = {"exact_match": float(np.mean(right)),
               "exact_match_by_type": {k: float(np.mean(v)) for k, v in sorted(by_type.items())},
               **scores, "num_questions": len(questions), "num_images": len(images)}
    return metrics, answers
