"""Caption metrics through pycocoevalcap's scorers, called directly (COCOEvalCap.evaluate() would also build
SPICE, which downloads Stanford CoreNLP and fails offline).

Tokenisation before scoring: `char` splits CJK text into characters and keeps ASCII words whole (the
character-level protocol used for COCO-CN); `space` lower-cases and splits on non-word characters (English).
`auto` picks `char` for a text containing CJK characters, else `space`.
"""
import re

from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.rouge.rouge import Rouge

_CJK = re.compile(r"[\u3400-\u9fff\uf900-\ufaff]")
_TOKEN = re.compile(r"[\u3400-\u9fff\uf900-\ufaff]|[a-z0-9]+")


def tokenize(text, mode="auto"):
    t = text.lower()
    if mode == "auto":
        mode = "char" if _CJK.search(t) else "space"
    if mode == "char":
        return " ".join(_TOKEN.findall(t))
    if mode == "space":
        return " ".join(re.findall(r"[a-z0-9]+", t))
    raise ValueError(f"unknown tokenisation mode {mode!r} (auto, char or space)")


def caption_scores(references, hypotheses, mode="auto"):
    """references: {id: [str, ...]}, hypotheses: {id: str} -> dict(bleu1..bleu4, rouge_l, cider) in [0, 1+]."""
    ids = list(hypotheses)
    missing = [i for i in ids if not references.get(i)]
    if missing:
        raise ValueError(f"no reference captions for ids {missing[:5]}")
    gts = {i: [tokenize(r, mode) for r in references[i]] for i in ids}
    res = {i: [tokenize(hypotheses[i], mode)] for i in ids}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    rouge, _ = Rouge().compute_score(gts, res)
    cider, _ = Cider().compute_score(gts, res)
    out = {f"bleu{n + 1}": float(b) for n, b in enumerate(bleu)}
    out.update(rouge_l=float(rouge), cider=float(cider))
    return out
