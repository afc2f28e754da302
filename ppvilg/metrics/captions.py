"""Caption metrics through pycocoevalcap's scorers, called directly (COCOEvalCap.evaluate() would also build
SPICE, which downloads Stanford CoreNLP and fails offline).

Tokenisation before scoring: `jieba` segments Chinese in jieba's precise mode and drops '。' (the AIC-ICC /
COCO-CN official protocol); `char` splits CJK text into characters and keeps ASCII words whole; `space`
lower-cases and splits on non-word characters (English). `auto` picks `char` for a text containing CJK
characters, else `space`.

METEOR 1.5 runs pycocoevalcap's Java scorer (Java must be installed: tools/install_deps.py installs a JRE
where it can); SPICE is never computed here (it downloads Stanford CoreNLP) and is reported as unavailable.
"""
import re
import shutil

from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.rouge.rouge import Rouge

_CJK = re.compile(r"[\u3400-\u9fff\uf900-\ufaff]")
_TOKEN = re.compile(r"[\u3400-\u9fff\uf900-\ufaff]|[a-z0-9]+")


SPICE_UNAVAILABLE = "SPICE needs Stanford CoreNLP, which pycocoevalcap downloads at run time; not computed offline"


def tokenize(text, mode="auto"):
    t = text.lower()
    if mode == "auto":
        mode = "char" if _CJK.search(t) else "space"
    if mode == "jieba":
        import jieba
        jieba.setLogLevel(60)
        words = [w.strip() for w in jieba.cut(t.replace("。", ""), cut_all=False)]
        return " ".join(w for w in words if w)
    if mode == "char":
        return " ".join(_TOKEN.findall(t))
    if mode == "space":
        return " ".join(re.findall(r"[a-z0-9]+", t))
    raise ValueError(f"unknown tokenisation mode {mode!r} (auto, jieba, char or space)")


def caption_scores(references, hypotheses, mode="auto", meteor=False):
    """references: {id: [str, ...]}, hypotheses: {id: str} -> dict(bleu1..bleu4, rouge_l, cider[, meteor]).
    With meteor=True, METEOR 1.5 is added (or `meteor_unavailable` with the reason when Java is missing)."""
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
    if meteor:
        if shutil.which("java") is None:
            out["meteor_unavailable"] = "METEOR 1.5 needs Java (java not on PATH; run tools/install_deps.py)"
        else:
            from pycocoevalcap.meteor.meteor import Meteor
            scorer = Meteor()
            out["meteor"] = float(scorer.compute_score(gts, res)[0])
            del scorer  # its __del__ stops the Java process
    out["spice_unavailable"] = SPICE_UNAVAILABLE
    return out
