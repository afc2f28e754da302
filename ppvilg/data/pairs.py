"""Image-text pair readers: JSONL / TSV manifests and COCO-captions JSON.

Manifest formats (relative image paths are resolved against the manifest's folder):
- JSONL: one object per line with "image" and "text" (also accepted: "caption"); other keys are kept as meta.
- TSV: a header line naming at least the columns `image` and `text`, then one pair per line.
COCO captions JSON (2014/2017): {"images": [{id, file_name}], "annotations": [{image_id, caption}]}; images
are looked up under `image_root` (default: the JSON's folder). One pair per caption.
A malformed line is an error naming the file and line; a missing or bad *image* is only found when it is read,
and is then skipped with a warning (see ppvilg.data.datasets).
"""
import csv
import json
import os
from dataclasses import dataclass, field


class ManifestError(ValueError):
    pass


@dataclass
class Pair:
    image: str
    text: str
    meta: dict = field(default_factory=dict)


def _resolve(base, p):
    return p if os.path.isabs(p) else os.path.normpath(os.path.join(base, p))


def read_jsonl(path):
    base = os.path.dirname(os.path.abspath(path))
    pairs = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ManifestError(f"{path}:{n}: not valid JSON ({e.msg})") from None
            if not isinstance(obj, dict):
                raise ManifestError(f"{path}:{n}: expected a JSON object with 'image' and 'text'")
            text = obj.get("text", obj.get("caption"))
            if not isinstance(obj.get("image"), str) or not isinstance(text, str):
                raise ManifestError(f"{path}:{n}: expected string fields 'image' and 'text' (or 'caption'), "
                                    f"got keys {sorted(obj)}")
            meta = {k: v for k, v in obj.items() if k not in ("image", "text", "caption")}
            pairs.append(Pair(_resolve(base, obj["image"]), text, meta))
    return pairs


def read_tsv(path):
    base = os.path.dirname(os.path.abspath(path))
    pairs = []
    with open(path, encoding="utf-8", newline="") as f:
        rows = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = next(rows, None)
        if header is None or "image" not in header or "text" not in header:
            raise ManifestError(f"{path}:1: expected a header line with the columns 'image' and 'text', "
                                f"got {header}")
        ii, ti = header.index("image"), header.index("text")
        for n, row in enumerate(rows, 2):
            if not row or not any(row):
                continue
            if len(row) != len(header):
                raise ManifestError(f"{path}:{n}: expected {len(header)} tab-separated fields, got {len(row)}")
            meta = {k: v for k, v in zip(header, row) if k not in ("image", "text")}
            pairs.append(Pair(_resolve(base, row[ii]), row[ti], meta))
    return pairs


def read_coco_captions(path, image_root=None):
    with open(path, encoding="utf-8") as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as e:
            raise ManifestError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    for key in ("images", "annotations"):
        if not isinstance(data.get(key), list):
            raise ManifestError(f"{path}: COCO captions JSON needs a list '{key}'")
    root = image_root or os.path.dirname(os.path.abspath(path))
    files = {}
    for k, im in enumerate(data["images"]):
        if "id" not in im or "file_name" not in im:
            raise ManifestError(f"{path}: images[{k}] needs 'id' and 'file_name'")
        files[im["id"]] = im["file_name"]
    pairs = []
    for k, ann in enumerate(data["annotations"]):
        if "image_id" not in ann or "caption" not in ann:
            raise ManifestError(f"{path}: annotations[{k}] needs 'image_id' and 'caption'")
        if ann["image_id"] not in files:
            raise ManifestError(f"{path}: annotations[{k}] refers to unknown image_id {ann['image_id']}")
        pairs.append(Pair(_resolve(root, files[ann["image_id"]]), ann["caption"].strip(),
                          {"image_id": ann["image_id"], "id": ann.get("id")}))
    return pairs


def read_manifest(path):
    if not os.path.isfile(path):
        raise ManifestError(f"manifest not found: {path}")
    ext = os.path.splitext(path)[1].lower()
    if ext in (".jsonl", ".json"):
        return read_jsonl(path)
    if ext in (".tsv", ".txt"):
        return read_tsv(path)
    raise ManifestError(f"{path}: unknown manifest type '{ext}' (expected .jsonl or .tsv)")
