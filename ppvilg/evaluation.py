"""Evaluation the way the paper did it (driven by tools/eval.py).

- text->image: one image per caption (of `Eval.num_samples` images of the split, the first caption of each),
  sampled with the Eval sampler settings, best of `Eval.candidates` after reranking; FID of the generated set
  against the real images (center-cropped to the generator's size), TF-Inception pool3 features, statistics
  of the real set cached under `Eval.fid_cache`.
- image->text: a caption for each image, scored against all its reference captions with BLEU-1..4, METEOR 1.5,
  ROUGE-L, CIDEr-D (pycocoevalcap scorers; `Eval.tokenization`: jieba as AIC-ICC / COCO-CN, char, space, auto).
- reconstruction: the stage-1 task's PSNR / SSIM / codebook statistics.
"""
from ppvilg.data.corpora import group_references
from ppvilg.data.datasets import read_pairs
from ppvilg.data.images import BadImageError, read_image, resize_center_crop
from ppvilg.data.shapes import ShapesPairs
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


def image_caption_sets(section, image_size, limit):
    """-> (RGB uint8 images at image_size, {i: [reference captions]}, first caption of each, a key naming the
    image set for the statistics cache)."""
    log = get_logger()
    if section.source == "shapes":
        ds = ShapesPairs(section.split, min(limit, section.num_samples), image_size, section.lang, section.seed)
        items = [ds.item(i) for i in range(len(ds))]
        return ([it["image"] for it in items], {i: [it["text"]] for i, it in enumerate(items)},
                [it["text"] for it in items], fingerprint([section.to_dict(), image_size, len(items)]))
    order, refs = group_references(read_pairs(section))
    images, references, prompts, used, skipped = [], {}, [], [], 0
    for k, path in enumerate(order):
        if len(images) >= limit:
            break
        try:
            images.append(resize_center_crop(read_image(path), image_size))
        except BadImageError as e:
            skipped += 1
            log.warning(f"skipped image: {e}")
            continue
        references[len(images) - 1] = refs[k]
        prompts.append(refs[k][0])
        used.append(path)
    if skipped:
        log.warning(f"{skipped} images skipped")
    return images, references, prompts, fingerprint(used + [image_size])


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
