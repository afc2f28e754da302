"""Deterministic synthetic "shapes" pairs: one coloured shape on a black background, with Chinese and English
captions that state its size, colour, shape and position.

Attributes: 6 colours x 3 shapes x 9 positions (3x3 grid) x 2 sizes. A fixed ninth of the
(colour, shape, position) triples (18 of 162) never occurs in the train split; the held-out splits use only
those triples (every single attribute value still occurs in training, only the combination is new): `dev`
(9 of them: every choice of settings is made here) and `test` (the other 9: reported, never tuned on), with
disjoint items too; `heldout` is their union. Captions come from templates; the held-out splits also use
templates never seen in training. Sample i of a split is a
pure function of (seed, split, i), so any subset can be regenerated exactly, and because the generator knows
the ground truth, `ppvilg.metrics.shapes_reader` can score images and captions exactly. Each item also comes with
questions about it in Chinese and English and their exact answers (`questions`: colour, shape, position, size
and yes/no questions about a colour-shape pair, true or not), for generative VQA.
"""
import itertools

import cv2
import numpy as np

COLORS = {  # name: (RGB, zh)
    "red": ((230, 30, 30), "红色"),
    "green": ((30, 200, 30), "绿色"),
    "blue": ((40, 60, 240), "蓝色"),
    "yellow": ((240, 220, 20), "黄色"),
    "magenta": ((220, 40, 220), "紫色"),
    "cyan": ((30, 220, 230), "青色"),
}
SHAPES = {"circle": "圆形", "square": "正方形", "triangle": "三角形"}
# never in the built-in train / held-out splits: the new concept of the fine-tuning recipe (configs/demo/finetune_*)
NOVEL_SHAPES = {"diamond": "菱形"}
ALL_SHAPES = {**SHAPES, **NOVEL_SHAPES}
POSITIONS = {  # name: (row, col, zh) on a 3x3 grid
    "top left": (0, 0, "左上角"), "top": (0, 1, "上方"), "top right": (0, 2, "右上角"),
    "left": (1, 0, "左边"), "center": (1, 1, "中间"), "right": (1, 2, "右边"),
    "bottom left": (2, 0, "左下角"), "bottom": (2, 1, "下方"), "bottom right": (2, 2, "右下角"),
}
SIZES = {"small": "小", "large": "大"}

TEMPLATES = {
    "train": {
        "en": ["a {size} {color} {shape} at the {position}",
               "{size} {color} {shape}, {position}",
               "a picture of a {size} {color} {shape} at the {position}"],
        "zh": ["{position}有一个{size}{color}{shape}",
               "一个{size}{color}{shape}在{position}",
               "图片{position}是{size}{color}{shape}"],
    },
    "heldout": {
        "en": ["there is a {size} {color} {shape} placed at the {position} of the image"],
        "zh": ["画面的{position}位置画着一个{size}的{color}{shape}"],
    },
}

ATTRIBUTES = ("color", "shape", "position", "size")

# question type -> {lang: question template}; answers are the attribute's words (yes/no: 有/没有, yes/no)
QUESTIONS = {
    "color": {"zh": "这个图形是什么颜色?", "en": "what color is the shape?"},
    "shape": {"zh": "这是什么形状?", "en": "what shape is it?"},
    "position": {"zh": "图形在哪里?", "en": "where is the shape?"},
    "size": {"zh": "它是大还是小?", "en": "is it large or small?"},
    "yesno": {"zh": "图中有{color}{shape}吗?", "en": "is there a {color} {shape}?"},
}
QUESTION_TYPES = tuple(QUESTIONS)
YES_NO = {"zh": ("有", "没有"), "en": ("yes", "no")}


def _triples():
    return list(itertools.product(range(len(COLORS)), range(len(SHAPES)), range(len(POSITIONS))))


def is_heldout(ci, si, pi):
    """The held-out (colour, shape, position) triples: 18 of 162, every attribute value kept in training."""
    return (ci + 2 * si + 4 * pi) % 9 == 0


SPLITS = ("train", "heldout", "dev", "test", "novel_train", "novel_test")


def split_triples(split):
    """(colour, shape, position) index triples of a split; shape indices count ALL_SHAPES. The novel splits
    draw only the novel shapes, a third of their (colour, position) pairs kept for novel_test (novel_train's items
    alternate with items of the train split: see ShapesPairs.attrs)."""
    if split not in SPLITS:
        raise ValueError(f"shapes split must be one of {', '.join(SPLITS)}, got {split!r}")
    if split.startswith("novel"):
        novel = [(ci, len(SHAPES) + k, pi) for ci in range(len(COLORS)) for k in range(len(NOVEL_SHAPES))
                 for pi in range(len(POSITIONS))]
        return [t for t in novel if ((t[0] + t[2]) % 3 == 0) == (split == "novel_test")]
    if split == "train":
        return [t for t in _triples() if not is_heldout(*t)]
    held = [t for t in _triples() if is_heldout(*t)]
    if split == "heldout":
        return held
    return held[0::2] if split == "dev" else held[1::2]


def cell_centre(pi, size_px):
    row, col, _ = list(POSITIONS.values())[pi]
    step = size_px * 9 / 32.0
    return (size_px / 2 + (col - 1) * step, size_px / 2 + (row - 1) * step)


def radius_px(size_name, size_px):
    return size_px * (3.5 if size_name == "small" else 6.0) / 32.0


def render(attrs, size_px=32, jitter=(0.0, 0.0)):
    """Draw one shape; attrs = dict(color=, shape=, position=, size=) by English names. RGB uint8."""
    img = np.zeros((size_px, size_px, 3), np.uint8)
    pi = list(POSITIONS).index(attrs["position"])
    cx, cy = cell_centre(pi, size_px)
    cx, cy = cx + jitter[0], cy + jitter[1]
    r = radius_px(attrs["size"], size_px)
    color = tuple(int(v) for v in COLORS[attrs["color"]][0])
    s = 16  # sub-pixel precision for anti-aliased drawing
    if attrs["shape"] == "circle":
        cv2.circle(img, (round(cx * s), round(cy * s)), round(r * s), color, -1, cv2.LINE_AA, shift=4)
    else:
        if attrs["shape"] == "square":
            pts = [(cx - r, cy - r), (cx + r, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
        elif attrs["shape"] == "diamond":
            h = r * 1.3
            pts = [(cx, cy - h), (cx + h, cy), (cx, cy + h), (cx - h, cy)]
        else:
            h = r * 1.15
            pts = [(cx, cy - h), (cx + h, cy + 0.8 * h), (cx - h, cy + 0.8 * h)]
        pts = np.array([[round(x * s), round(y * s)] for x, y in pts], np.int32)
        cv2.fillPoly(img, [pts], color, cv2.LINE_AA, shift=4)
    return img


def _word(attr, value, lang):
    """An attribute value (its English name) as the captions and answers of `lang` write it."""
    if lang == "en":
        return value
    return {"color": lambda v: COLORS[v][1], "shape": ALL_SHAPES.get, "position": lambda v: POSITIONS[v][2],
            "size": SIZES.get}[attr](value)


def caption(attrs, lang, template):
    return template.format(**{a: _word(a, attrs[a], lang) for a in ATTRIBUTES})


def questions(attrs, other):
    """Every question about a shape with attributes `attrs`, in both languages: a list of dicts(question,
    answer, type, lang). `other`: a (colour, shape) pair that differs from the item's, for the yes/no question
    whose answer is no (the one whose answer is yes asks about the item's own pair)."""
    out = []
    for lang in ("zh", "en"):
        for kind in ("color", "shape", "position", "size"):
            out.append({"question": QUESTIONS[kind][lang], "answer": _word(kind, attrs[kind], lang), "type": kind,
                        "lang": lang})
        for (color, shape), answer in (((attrs["color"], attrs["shape"]), YES_NO[lang][0]), (other, YES_NO[lang][1])):
            q = QUESTIONS["yesno"][lang].format(color=_word("color", color, lang), shape=_word("shape", shape, lang))
            out.append({"question": q, "answer": answer, "type": "yesno", "lang": lang})
    return out


def all_texts():
    """Every text the generator can write, in every split (the novel shapes too): each caption template of each
    language with each attribute combination, and each question and answer. The vocabulary of the built-in data
    (tools/build_vocab.py --shapes)."""
    out = []
    for values in itertools.product(COLORS, ALL_SHAPES, POSITIONS, SIZES):
        attrs = dict(zip(ATTRIBUTES, values))
        out += [caption(attrs, lang, tpl) for group in TEMPLATES.values() for lang in ("zh", "en")
                for tpl in group[lang]]
        # each (colour, shape) pair is some item's own, so asking about it covers every yes/no question
        out += [text for qa in questions(attrs, (attrs["color"], attrs["shape"]))
                for text in (qa["question"], qa["answer"])]
    return list(dict.fromkeys(out))


def normalize_answer(text):
    """Exact-match form of an answer: lower case, no spaces or punctuation."""
    return "".join(ch for ch in str(text).lower() if ch.isalnum())


class ShapesPairs:
    """A split of synthetic pairs. item(i) -> dict(image=RGB uint8, text=str, attrs=dict, lang=str)."""

    def __init__(self, split="train", num_samples=2000, image_size=32, lang="both", seed=0):
        self.split, self.num_samples, self.image_size, self.lang, self.seed = (
            split, int(num_samples), int(image_size), lang, int(seed))
        self.triples = split_triples(split)
        self.replay = split_triples("train") if split == "novel_train" else None
        self.langs = ["zh", "en"] if lang == "both" else [lang]
        templates = TEMPLATES["train"]
        if split in ("heldout", "dev", "test"):  # held-out prompts mix unseen and seen phrasings
            templates = {k: TEMPLATES["heldout"][k] + TEMPLATES["train"][k] for k in ("en", "zh")}
        self.templates = templates

    def __len__(self):
        return self.num_samples

    def attrs(self, i):
        rng = np.random.default_rng([self.seed, SPLITS.index(self.split), i])
        triples, k = self.triples, i
        if self.split == "novel_train":   # odd items replay the training split's shapes (against forgetting)
            triples, k = (self.replay, i // 2) if i % 2 else (self.triples, i // 2)
        ci, si, pi = triples[k % len(triples)]
        return rng, {"color": list(COLORS)[ci], "shape": list(ALL_SHAPES)[si],
                     "position": list(POSITIONS)[pi], "size": list(SIZES)[(k // len(triples)) % 2]}

    def item(self, i):
        if not 0 <= i < self.num_samples:
            raise IndexError(i)
        rng, attrs = self.attrs(i)
        jitter = rng.uniform(-1.0, 1.0, size=2) * self.image_size / 32.0
        lang = self.langs[int(rng.integers(len(self.langs)))]
        tpl = self.templates[lang][int(rng.integers(len(self.templates[lang])))]
        return {"image": render(attrs, self.image_size, tuple(jitter)), "text": caption(attrs, lang, tpl),
                "attrs": attrs, "lang": lang, "id": f"shapes-{self.split}-{i}", "qa": self.questions(i)}

    def questions(self, i):
        """The questions about item i and their answers (see `questions`); the 'no' yes/no question asks about
        another colour (even i) or shape (odd i) than the item's."""
        _, attrs = self.attrs(i)
        colors, shapes = list(COLORS), list(SHAPES) + [s for s in NOVEL_SHAPES if s == attrs["shape"]]
        if i % 2 == 0:
            other = (colors[(colors.index(attrs["color"]) + 1 + i // 2 % (len(colors) - 1)) % len(colors)],
                     attrs["shape"])
        else:
            other = (attrs["color"], shapes[(shapes.index(attrs["shape"]) + 1 + i // 2 % (len(shapes) - 1))
                                            % len(shapes)])
        return questions(attrs, other)
