"""Readers for the paper's benchmark formats -> lists of Pair(image, text, meta) (or VQA triples).

Where users get the data (none of it ships with ppvilg, nothing is downloaded):
- MS-COCO captions 2014 / 2017: cocodataset.org (annotations/captions_{train,val}{2014,2017}.json + images).
  `translations` replaces COCO's English captions by yours (the paper machine-translated them to Chinese): a
  JSONL file of {"id": <annotation id>, "caption": "..."}; every caption must be covered.
- COCO-CN (github.com/li-xirong/coco-cn): a captions file with lines `<image id>#<k>\\t<caption>` and a split
  file listing image ids (e.g. coco-cn_test.txt); image ids like COCO_val2014_000000000042 resolve to
  <image_root>/val2014/COCO_val2014_000000000042.jpg (or directly under image_root).
- AIC-ICC (AI Challenger image Chinese captioning): caption_{train,validation}_annotations_*.json, a list of
  {"image_id": "<file>.jpg", "caption": ["...", ...]} with images under image_root.
- FMIQA (FM-IQA, Baidu): a JSON list, or a mapping of split -> list, of entries with an image id and a
  question and answer (keys matched case-insensitively: image_id / image, question, answer; a dict-valued
  question or answer uses its "Chinese" entry). Image ids resolve under image_root as COCO ids do.
"""
import json
import os

from ppvilg.data.pairs import ManifestError, Pair, read_coco_captions


def _load_json(path):
    with open(path, encoding="utf-8") as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise ManifestError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None


def coco_captions(path, image_root=None, translations=None):
    pairs = read_coco_captions(path, image_root)
    if translations:
        table = {}
        with open(translations, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        obj = json.loads(line)
                        table[obj["id"]] = obj["caption"]
                    except (json.JSONDecodeError, KeyError, TypeError):
                        raise ManifestError(f"{translations}:{n}: expected {{\"id\": <annotation id>, "
                                            f"\"caption\": \"...\"}}") from None
        missing = [p.meta["id"] for p in pairs if p.meta["id"] not in table]
        if missing:
            raise ManifestError(f"{translations}: no translation for {len(missing)} captions (e.g. id {missing[0]})")
        pairs = [Pair(p.image, table[p.meta["id"]], dict(p.meta, original=p.text)) for p in pairs]
    return pairs


def coco_image_path(image_root, image_id):
    name = image_id if os.path.splitext(image_id)[1] else image_id + ".jpg"
    for sub in ("val2014", "train2014", "val2017", "train2017", ""):
        cand = os.path.join(image_root, sub, name)
        if os.path.isfile(cand):
            return cand
    sub = "val2014" if "val2014" in image_id else "train2014" if "train2014" in image_id else ""
    return os.path.join(image_root, sub, name)


def coco_cn(captions_path, image_root, split_path=None):
    keep = None
    if split_path:
        with open(split_path, encoding="utf-8") as f:
            keep = {line.strip() for line in f if line.strip()}
    pairs = []
    with open(captions_path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            if "\t" not in line or "#" not in line.split("\t", 1)[0]:
                raise ManifestError(f"{captions_path}:{n}: expected '<image id>#<k>\\t<caption>'")
            key, text = line.rstrip("\n").split("\t", 1)
            image_id = key.rsplit("#", 1)[0]
            if keep is None or image_id in keep:
                pairs.append(Pair(coco_image_path(image_root, image_id), text.strip(), {"image_id": image_id}))
    return pairs


def aic_icc(path, image_root):
    data = _load_json(path)
    if not isinstance(data, list):
        raise ManifestError(f"{path}: expected a list of {{image_id, caption: [...]}}")
    pairs = []
    for k, item in enumerate(data):
        if not isinstance(item, dict) or "image_id" not in item or not isinstance(item.get("caption"), list):
            raise ManifestError(f"{path}: entry {k} needs 'image_id' and a list 'caption'")
        for c in item["caption"]:
            pairs.append(Pair(os.path.join(image_root, item["image_id"]), c.strip(), {"image_id": item["image_id"]}))
    return pairs


def _field(entry, *names):
    low = {k.lower(): v for k, v in entry.items()}
    for n in names:
        if n in low:
            v = low[n]
            return v.get("Chinese", v.get("chinese")) if isinstance(v, dict) else v
    return None


def fmiqa_entries(path, split=None):
    """An FMIQA-format JSON's entries -> list of dict(image_id, question, answer) (no image paths resolved)."""
    data = _load_json(path)
    if isinstance(data, dict):
        if split is None:
            raise ManifestError(f"{path}: holds splits {sorted(data)}; choose one")
        if split not in data:
            raise ManifestError(f"{path}: no split {split!r} (has {sorted(data)})")
        data = data[split]
    out = []
    for k, e in enumerate(data):
        image_id, q, a = _field(e, "image_id", "image"), _field(e, "question"), _field(e, "answer")
        if image_id is None or not isinstance(q, str) or not isinstance(a, str):
            raise ManifestError(f"{path}: entry {k} needs an image id, a question and an answer (got keys "
                                f"{sorted(e)})")
        out.append({"image_id": str(image_id), "question": q.strip(), "answer": a.strip()})
    return out


def fmiqa(path, image_root, split=None):
    """-> list of dict(image, question, answer, image_id), the image ids resolved under image_root."""
    return [dict(e, image=coco_image_path(image_root, e["image_id"])) for e in fmiqa_entries(path, split)]


def _image_key(path_or_id):
    """The key FMIQA questions and caption pairs meet on: the image file's name without folder or extension
    (COCO_val2014_000000000042), so an id matches whichever folder the captions' images were resolved under."""
    return os.path.splitext(os.path.basename(str(path_or_id)))[0]


def attach_questions(pairs, path, split=None, log=None):
    """Join FMIQA-format questions (see fmiqa) to the caption pairs of the same image -> the pairs, with their
    questions in meta["qa"] (kept after any they had). An image id
    matches a pair by file name without extension, or, when it is a bare number, the pair's COCO image_id.
    ManifestError when no question matches any pair (naming both files); `log` (a logger) hears of the
    questions about images not among the pairs."""
    questions = fmiqa_entries(path, split)
    by_name, by_id = {}, {}
    for k, p in enumerate(pairs):
        by_name.setdefault(_image_key(p.image), []).append(k)
        if isinstance(p.meta.get("image_id"), int):
            by_id.setdefault(p.meta["image_id"], []).append(k)
    attached, matched = {}, 0
    for q in questions:
        key = q["image_id"]
        rows = by_name.get(_image_key(key)) or (by_id.get(int(key)) if key.isdigit() else None)
        if not rows:
            continue
        matched += 1
        for k in rows:
            attached.setdefault(k, []).append({"question": q["question"], "answer": q["answer"]})
    if not matched:
        raise ManifestError(f"{path}: none of its {len(questions)} questions is about an image of the caption "
                            f"pairs (image ids are matched by file name without extension, e.g. "
                            f"{_image_key(pairs[0].image) if pairs else '?'}, or by COCO image id)")
    if matched < len(questions) and log is not None:
        log.warning(f"{path}: {len(questions) - matched} of {len(questions)} questions are about images that are "
                    "not among the caption pairs; they are not used")
    out = []
    for k, p in enumerate(pairs):
        if k in attached:
            p = Pair(p.image, p.text, dict(p.meta, qa=p.qa + attached[k]))
        out.append(p)
    return out


def group_references(pairs):
    """Pairs -> (list of unique image paths, {index: [captions]}) for captioning evaluation."""
    order, refs = [], {}
    for p in pairs:
        if p.image not in refs:
            order.append(p.image)
            refs[p.image] = []
        refs[p.image].append(p.text)
    return order, {i: refs[img] for i, img in enumerate(order)}
