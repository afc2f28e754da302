"""Real photos that ship inside scikit-image (no download), with captions written for ppvilg, exported as PNG
files plus a JSONL manifest so that they go through the same reader as a user's own data."""
import json
import os

import cv2
import numpy as np

from ppvilg.data.images import to_rgb_uint8, write_png
from ppvilg.utils.io import atomic_write_text

CAPTIONS = os.path.join(os.path.dirname(__file__), "assets", "photo_captions.jsonl")


def export_photos(out_dir, langs=("en", "zh")):
    """Write <out_dir>/<name>.png for each bundled photo and <out_dir>/manifest.jsonl (one line per caption)."""
    import skimage.data

    with open(CAPTIONS, encoding="utf-8") as f:
        entries = [json.loads(line) for line in f if line.strip()]
    os.makedirs(out_dir, exist_ok=True)
    lines = []
    for e in entries:
        img = np.asarray(getattr(skimage.data, e["name"])())
        if img.ndim == 3 and img.shape[2] == 4:
            img = cv2.cvtColor(img, cv2.COLOR_RGBA2BGRA)
        elif img.ndim == 3:
            img = img[:, :, ::-1]
        rgb = to_rgb_uint8(img, e["name"])
        write_png(os.path.join(out_dir, e["name"] + ".png"), rgb)
        for lang in langs:
            lines.append(json.dumps({"image": e["name"] + ".png", "text": e[lang], "lang": lang},
                                    ensure_ascii=False))
    path = os.path.join(out_dir, "manifest.jsonl")
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path, len(lines)
