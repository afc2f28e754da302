"""Image-text pair readers: JSONL / TSV manifests and COCO-captions JSON.

Manifest formats (relative image paths are resolved against the manifest's folder, and must stay inside it:
a path that leaves it - `../`, an absolute path elsewhere, a symlink out - is skipped naming the line, unless
`allow_outside=True` (Data.<split>.allow_outside_paths)):
- JSONL: one object per line with "image" and "text" (also accepted: "caption"); other keys are kept as meta.
  Questions about the image (generative VQA) ride along: "question" and "answer" (strings, or lists of equal
  length), or "qa": [{"question": ..., "answer": ...}, ...]; optional "type" per question for per-type scores.
- TSV: a header line naming at least the columns `image` and `text`, then one pair per line (optional columns
  `question` and `answer`: one question per line).
COCO captions JSON (2014/2017): {"images": [{id, file_name}], "annotations": [{image_id, caption}]}; images
are looked up under `image_root` (default: the JSON's folder). One pair per caption.
A malformed line (invalid UTF-8 or JSON, missing or non-string fields, wrong column count) is an error naming
the file and line, or with on_bad_line="skip" (Data.<split>.on_bad_line) a skip recorded in `skipped`; an empty
or whitespace-only caption is always skipped and recorded. A missing or bad *image* is only found when it is
read, and is then skipped with a warning (see ppvilg.data.datasets).
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

    @property
    def qa(self):
        """The questions about the image: [{"question", "answer", "type"?}] (checked when the line was read)."""
        return qa_from_meta(self.meta)


def qa_from_meta(meta):
    """A pair's questions and answers from its meta fields (see the module doc) -> list of dicts(question,
    answer[, type]); ValueError saying what is wrong."""
    if "qa" in meta:
        items = meta["qa"]
        if not isinstance(items, list):
            raise ValueError(f"'qa' must be a list of question-answer objects, got {type(items).__name__}")
    elif "question" in meta or "answer" in meta:
        q, a = meta.get("question"), meta.get("answer")
        if isinstance(q, str) and isinstance(a, str):
            q, a = [q], [a]
        if not (isinstance(q, list) and isinstance(a, list) and len(q) == len(a)):
            raise ValueError("'question' and 'answer' must both be strings, or lists of the same length")
        items = [{"question": x, "answer": y} for x, y in zip(q, a)]
    else:
        return []
    out = []
    for k, it in enumerate(items):
        if not isinstance(it, dict) or not isinstance(it.get("question"), str) or not isinstance(it.get("answer"), str):
            raise ValueError(f"question {k}: expected an object with string 'question' and 'answer', got {it!r}")
        if not it["question"].strip() or not it["answer"].strip():
            raise ValueError(f"question {k}: empty question or answer")
        out.append({"question": it["question"].strip(), "answer": it["answer"].strip(),
                    **({"type": str(it["type"])} if "type" in it else {})})
    return out


# the reason of a skipped line (the text after "file:line: ") -> its category (tools/check_data.py groups by it)
LINE_REASONS = (("not valid UTF-8", "invalid UTF-8"), ("not valid JSON", "invalid JSON"),
                ("expected a JSON object", "not a JSON object"), ("expected string fields", "missing fields"),
                ("tab-separated fields", "wrong column count"), ("empty caption", "empty caption"),
                ("outside the manifest's folder", "image path outside the manifest's folder"))


def line_reason(message):
    """The category of a skipped-line message recorded by the readers below."""
    text = message.split(": ", 1)[-1]
    return next((cat for phrase, cat in LINE_REASONS if phrase in text), "bad line")


def _resolve(base, p):
    return p if os.path.isabs(p) else os.path.normpath(os.path.join(base, p))


class _Lines:
    """Bad-line policy of one manifest: error, or skip and record."""

    def __init__(self, path, on_bad_line, allow_outside, skipped):
        if on_bad_line not in ("error", "skip"):
            raise ValueError(f"on_bad_line must be error or skip, got {on_bad_line!r}")
        self.path, self.skip_bad, self.allow_outside = path, on_bad_line == "skip", allow_outside
        self.base = os.path.dirname(os.path.abspath(path))
        self.real_base = os.path.realpath(self.base)
        self.skipped = skipped if skipped is not None else []

    def bad(self, n, reason):
        msg = f"{self.path}:{n}: {reason}"
        if not self.skip_bad:
            raise ManifestError(msg)
        self.skipped.append(msg)

    def pair(self, n, image, text, meta):
        """The Pair of line n, or None (recorded) for an empty caption, an image path outside the folder, or
        (a bad line) malformed questions."""
        try:
            qa_from_meta(meta)
        except ValueError as e:
            self.bad(n, str(e))
            return None
        if not text.strip():
            self.skipped.append(f"{self.path}:{n}: empty caption")
            return None
        resolved = _resolve(self.base, image)
        if not self.allow_outside:
            real = os.path.realpath(resolved)
            if os.path.commonpath([self.real_base, real]) != self.real_base:
                self.skipped.append(f"{self.path}:{n}: image path {image!r} is outside the manifest's folder "
                                    "(set Data.<split>.allow_outside_paths=true to allow it)")
                return None
        return Pair(resolved, text, meta)


def _decoded_lines(path, lines):
    """(line number, text or None when the line is not UTF-8) of a manifest opened in binary mode."""
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                yield n, raw.decode("utf-8")
            except UnicodeDecodeError as e:
                lines.bad(n, f"not valid UTF-8 ({e.reason} at byte {e.start})")
                yield n, None


def read_jsonl(path, on_bad_line="error", allow_outside=False, skipped=None):
    lines = _Lines(path, on_bad_line, allow_outside, skipped)
    pairs = []
    for n, line in _decoded_lines(path, lines):
        if line is None or not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            lines.bad(n, f"not valid JSON ({e.msg})")
            continue
        if not isinstance(obj, dict):
            lines.bad(n, "expected a JSON object with 'image' and 'text'")
            continue
        text = obj.get("text", obj.get("caption"))
        if not isinstance(obj.get("image"), str) or not isinstance(text, str):
            lines.bad(n, f"expected string fields 'image' and 'text' (or 'caption'), got keys {sorted(obj)}")
            continue
        meta = {k: v for k, v in obj.items() if k not in ("image", "text", "caption")}
        pair = lines.pair(n, obj["image"], text, meta)
        if pair is not None:
            pairs.append(pair)
    return pairs


def read_tsv(path, on_bad_line="error", allow_outside=False, skipped=None):
    lines = _Lines(path, on_bad_line, allow_outside, skipped)
    pairs, header = [], None
    for n, line in _decoded_lines(path, lines):
        if line is None:
            if header is None:
                raise ManifestError(f"{path}:{n}: the header line is not valid UTF-8")
            continue
        row = next(csv.reader([line.rstrip("\r\n")], delimiter="\t", quoting=csv.QUOTE_NONE), [])
        if header is None:
            if "image" not in row or "text" not in row:
                raise ManifestError(f"{path}:{n}: expected a header line with the columns 'image' and 'text', "
                                    f"got {row}")
            header = row
            ii, ti = header.index("image"), header.index("text")
            continue
        if not row or not any(row):
            continue
        if len(row) != len(header):
            lines.bad(n, f"expected {len(header)} tab-separated fields, got {len(row)}")
            continue
        meta = {k: v for k, v in zip(header, row) if k not in ("image", "text")}
        pair = lines.pair(n, row[ii], row[ti], meta)
        if pair is not None:
            pairs.append(pair)
    if header is None:
        raise ManifestError(f"{path}:1: expected a header line with the columns 'image' and 'text', got nothing")
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


def read_manifest(path, on_bad_line="error", allow_outside=False, skipped=None):
    """The pairs of a JSONL / TSV manifest; `skipped` (a list) receives "file:line: reason" of every line not
    used (see the module's docstring)."""
    if not os.path.isfile(path):
        raise ManifestError(f"manifest not found: {path}")
    ext = os.path.splitext(path)[1].lower()
    if ext in (".jsonl", ".json"):
        return read_jsonl(path, on_bad_line, allow_outside, skipped)
    if ext in (".tsv", ".txt"):
        return read_tsv(path, on_bad_line, allow_outside, skipped)
    raise ManifestError(f"{path}: unknown manifest type '{ext}' (expected .jsonl or .tsv)")
