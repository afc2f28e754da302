"""Sequence layouts and attention masks of the unified transformer (ERNIE-ViLG §3.1.2).

A layout is a fixed list of segments, each a run of slots of one kind:
    TEXT_SRC  text the model conditions on          (bidirectional among the source)
    IMAGE_SRC image codes the model conditions on   (bidirectional among the source)
    TEXT_TGT  [CLS] t_1 .. t_{m-1}  -> predicts t_1 .. t_m ([SEP]-terminated), causal
    IMAGE_TGT [BOI] z_1 .. z_{n-1}  -> predicts z_1 .. z_n, causal
Directions: text->image = [TEXT_SRC, IMAGE_TGT]; image->text = [IMAGE_SRC, TEXT_TGT];
generative VQA = [IMAGE_SRC, TEXT_SRC (question), TEXT_TGT (answer)].

Mask (the paper's UniLM-style rule): a source slot sees every valid source slot and no target slot; a target
slot sees every valid source slot and the target slots at or before itself.

Positions: text slots count 0.. within their segment; image slot j (source or target) sits at grid cell j
(row j // w, column j % w). A target image slot j holds the previous code z_j ([BOI] at j = 0) and predicts
the code of cell j, so its position is the cell it predicts.

Sparse image attention (DALL-E's patterns, `attention: sparse`), applied between image slots only (text is
always fully visible): layer i (0-based) uses column attention when i % 4 == 2, row attention otherwise, and
the last layer uses an 11x11 convolutional window. Row: same grid row; column: same grid column; conv:
|drow| <= 5 and |dcol| <= 5. Within an image target the causal rule still applies on top; within an image
source they are bidirectional. The patterns are applied as masks over a dense attention (correct, not the
paper's block-sparse kernel: no speed or memory gain on CPU).
"""
from dataclasses import dataclass

import numpy as np

TEXT_SRC, TEXT_TGT, IMAGE_SRC, IMAGE_TGT = 0, 1, 2, 3
IMAGE_KINDS = (IMAGE_SRC, IMAGE_TGT)
TARGET_KINDS = (TEXT_TGT, IMAGE_TGT)


@dataclass(frozen=True)
class Layout:
    kinds: tuple      # per segment
    lengths: tuple    # per segment

    @property
    def length(self):
        return sum(self.lengths)

    def segment_start(self, k):
        return sum(self.lengths[:k])

    def arrays(self):
        """Per-slot (kind, position) int64 arrays."""
        kind = np.concatenate([np.full(n, k, np.int64) for k, n in zip(self.kinds, self.lengths)])
        pos = np.concatenate([np.arange(n, dtype=np.int64) for n in self.lengths])
        return kind, pos

    def target_slice(self):
        k = [i for i, kd in enumerate(self.kinds) if kd in TARGET_KINDS]
        assert len(k) == 1 and k[0] == len(self.kinds) - 1, "the target must be the last segment"
        return slice(self.segment_start(k[0]), self.length)


def text_to_image(text_len, grid):
    return Layout((TEXT_SRC, IMAGE_TGT), (text_len, grid * grid))


def image_to_text(text_len, grid):
    return Layout((IMAGE_SRC, TEXT_TGT), (grid * grid, text_len))


def vqa(question_len, answer_len, grid):
    return Layout((IMAGE_SRC, TEXT_SRC, TEXT_TGT), (grid * grid, question_len, answer_len))


def direction_layouts(text_len, grid):
    """{"t2i", "i2t", "vqa"} -> Layout, the names generation, export and deployment use (VQA: question and
    answer both text_len long)."""
    return {"t2i": text_to_image(text_len, grid), "i2t": image_to_text(text_len, grid),
            "vqa": vqa(text_len, text_len, grid)}


def trim_text(layout, valid, labels=None):
    """Shorten each text segment of a batch's layout to the slots some row fills: (layout, the kept slots'
    indices into the full sequence, labels cut to the new target length). Texts are padded at their end to
    max_text_len, padding slots are invalid keys and their outputs are never used, and image positions do not
    depend on text lengths, so the kept slots compute what they compute in the full sequence (training on short
    captions then skips the padding: see ViLGTask.losses). valid: bool [B, S]; labels [B, target length] with
    -100 on unlabelled slots, whose cut part must be unlabelled."""
    valid = np.asarray(valid)
    lengths, keep = [], []
    for k, (kind, n) in enumerate(zip(layout.kinds, layout.lengths)):
        start = layout.segment_start(k)
        m = n
        if kind in (TEXT_SRC, TEXT_TGT):
            filled = np.flatnonzero(valid[:, start:start + n].any(0))
            m = int(filled[-1]) + 1 if len(filled) else 1   # one slot at least: a segment never vanishes
        lengths.append(m)
        keep.append(np.arange(start, start + m))
    trimmed = Layout(layout.kinds, tuple(lengths))
    if labels is not None:
        labels = np.asarray(labels)
        if (labels[:, lengths[-1]:] != -100).any():
            raise ValueError("trim_text: labels on text slots that no row fills")
        labels = labels[:, :lengths[-1]]
    return trimmed, np.concatenate(keep), labels


def layer_pattern(layer, num_layers, attention):
    if attention == "dense":
        return "dense"
    if layer == num_layers - 1:
        return "conv"
    return "col" if layer % 4 == 2 else "row"


def base_mask(layout, valid):
    """valid: bool [B, S] (False = padding). Returns bool [B, S, S]: query i may attend to key j."""
    kind, _ = layout.arrays()
    tgt = np.isin(kind, TARGET_KINDS)
    s = layout.length
    causal = np.tril(np.ones((s, s), bool))
    allowed = (~tgt[None, :]) | (tgt[:, None] & tgt[None, :] & causal)  # [S, S]
    return allowed[None] & valid[:, None, :]


def pattern_mask(layout, grid, pattern):
    """bool [S, S]: extra restriction between image slots for a sparse pattern (True = allowed)."""
    kind, pos = layout.arrays()
    s = layout.length
    if pattern == "dense":
        return np.ones((s, s), bool)
    img = np.isin(kind, IMAGE_KINDS)
    row, col = pos // grid, pos % grid
    if pattern == "row":
        ok = row[:, None] == row[None, :]
    elif pattern == "col":
        ok = col[:, None] == col[None, :]
    elif pattern == "conv":
        ok = (np.abs(row[:, None] - row[None, :]) <= 5) & (np.abs(col[:, None] - col[None, :]) <= 5)
    else:
        raise ValueError(f"unknown attention pattern {pattern!r}")
    both = img[:, None] & img[None, :]
    return ~both | ok


def static_mask(layout, grid, pattern):
    """Additive float32 [S, S] mask of one layer pattern without key padding (0 allowed, -1e9 not): the part
    of a layer's mask that does not depend on the batch (pipeline stages and exported programs add padding)."""
    allowed = base_mask(layout, np.ones([1, layout.length], bool))[0] & pattern_mask(layout, grid, pattern)
    return np.where(allowed, 0.0, -1e9).astype(np.float32)
