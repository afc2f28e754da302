"""Exact scoring of the synthetic shapes: read (colour, shape, position, size) back from an image with OpenCV,
and from a caption (Chinese or English) by matching the attribute words.

Image reader: pixels brighter than a threshold form the foreground; its largest connected component is the
shape. Colour = the palette colour nearest in hue to the component's mean (its brightest half, so
anti-aliased edges do not dilute it). Shape and size = the best fit (least L1 difference of anti-aliased
coverage) among the six (shape, size) templates drawn by the generator itself and moved onto the observed
centroid; position = the 3x3 grid cell nearest to the fitted template's centre. An image with no foreground
reads as None for every attribute.
"""
import re

import cv2
import numpy as np

from ppvilg.data.shapes import ALL_SHAPES, ATTRIBUTES, COLORS, POSITIONS, SHAPES, SIZES, cell_centre, render


def _coverage(shape, size, position, jitter, size_px):
    """Anti-aliased coverage in [0, 1] of a shape drawn by the generator itself."""
    img = render({"color": "red", "shape": shape, "size": size, "position": position}, size_px, jitter)
    return img.max(axis=2).astype(np.float64) / max(COLORS["red"][0])


def _centroid(cover):
    return (np.indices(cover.shape)[::-1] * cover).reshape(2, -1).sum(1) / max(cover.sum(), 1e-9)


def read_image(rgb, threshold=60, shapes=tuple(SHAPES)):
    """RGB uint8 HxWx3 -> dict(color, shape, position, size), values None when nothing is found. `shapes`: the
    shapes to tell apart (the built-in three; the fine-tuning recipe adds the novel ones)."""
    size_px = rgb.shape[0]
    fg = (rgb.max(axis=2) > threshold).astype(np.uint8)
    n, labels, stats, _ = cv2.connectedComponentsWithStats(fg, connectivity=8)
    if n <= 1:
        return {a: None for a in ATTRIBUTES}
    k = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    mask = labels == k
    pix = rgb[mask].astype(np.float64)
    bright = pix[pix.max(1) >= np.median(pix.max(1))]
    mean = bright.mean(0)
    palette = {name: np.array(c[0], np.float64) for name, c in COLORS.items()}
    # compare chromaticity (colour up to brightness) so a dim reconstruction keeps its hue
    unit = lambda v: v / (np.linalg.norm(v) + 1e-9)  # noqa: E731
    color = min(palette, key=lambda c: np.linalg.norm(unit(mean) - unit(palette[c])))
    # anti-aliased coverage of each pixel: brightness relative to the shape's own full brightness
    cover = np.clip(rgb.max(axis=2).astype(np.float64) / max(mean.max(), 1.0), 0, 1) * mask
    area = float(cover.sum())
    centroid = (np.indices(cover.shape)[::-1] * cover).reshape(2, -1).sum(1) / max(area, 1e-9)  # (x, y)
    # shape and size: the best-fitting of the six drawn templates, each moved onto the observed centroid
    best = None
    for shape in shapes:
        for size in SIZES:
            t = _coverage(shape, size, "center", (0.0, 0.0), size_px)
            shift = centroid - _centroid(t)
            err = np.abs(_coverage(shape, size, "center", tuple(shift), size_px) - cover).sum()
            if best is None or err < best[0]:
                best = (err, shape, size, shift)
    _, shape, size, shift = best
    # position: the grid cell whose centre is nearest to the fitted template's nominal centre
    nominal = np.array(cell_centre(list(POSITIONS).index("center"), size_px)) + shift
    position = min(POSITIONS, key=lambda p: np.hypot(*(np.array(cell_centre(list(POSITIONS).index(p), size_px))
                                                        - nominal)))
    return {"color": color, "shape": shape, "position": position, "size": size}


# caption words: English names, Chinese names; positions longest first so "top left" wins over "top"
_WORDS = {
    "color": {**{c: c for c in COLORS}, **{v[1]: c for c, v in COLORS.items()}, "purple": "magenta"},
    "shape": {**{s: s for s in ALL_SHAPES}, **{v: s for s, v in ALL_SHAPES.items()}, "方形": "square",
              "圆": "circle"},
    "position": {**{p: p for p in POSITIONS}, **{v[2]: p for p, v in POSITIONS.items()}, "centre": "center",
                 "middle": "center"},
    "size": {**{s: s for s in SIZES}, **{v: s for s, v in SIZES.items()}, "big": "large"},
}


def read_caption(text):
    """Attribute values named in a caption (None where it names none); the longest match wins."""
    t = text.lower()
    out = {}
    for attr, words in _WORDS.items():
        best = None
        for w in sorted(words, key=len, reverse=True):
            if w.isascii():  # whole English words only ("red" is not in "reddish")
                hit = re.search(r"(?<![a-z])" + re.escape(w) + r"(?![a-z])", t)
            else:
                hit = w in t
            if hit:
                best = words[w]
                break
        out[attr] = best
    return out


def split_shapes(split):
    """The shapes an image of a shapes split can show: the novel splits add the fine-tuning recipe's new ones."""
    return tuple(ALL_SHAPES) if split.startswith("novel") else tuple(SHAPES)


def attribute_accuracy(predicted, truth):
    """Mean over items and attributes of exact matches, and per attribute: (overall, {attr: acc})."""
    per = {a: float(np.mean([p[a] == t[a] for p, t in zip(predicted, truth)])) for a in ATTRIBUTES}
    return float(np.mean(list(per.values()))), per
