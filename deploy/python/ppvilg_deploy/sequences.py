"""The token sequences of the three directions, built in one place for training (the stage-2 task), scoring,
the dynamic-graph generator and the exported predictors. The slot layouts they fill are those of
ppvilg/models/layout.py (exported to inference.yml):

    text->image   [text source: L slots] [BOI] z_1 .. z_{n-1}          targets z_1 .. z_n
    image->text   [codes: n slots] [CLS] t_1 .. t_{L-1}                targets t_1 .. t_L ([SEP]-terminated)
    VQA           [codes: n slots] [question: L slots] [CLS] a_1 ..    targets the answer

Texts are tokenizer ids ending in [SEP], padded with [PAD] to L = the model's text length; `valid` marks the
real slots (False = padding, masked as keys). With no target given (generation), the target slots after [BOI]
/ [CLS] hold placeholders that the decoding algorithms fill in slot by slot.
"""
import numpy as np


class SequenceBuilder:
    def __init__(self, tokenizer, text_len, grid, boi_id):
        self.tok, self.text_len, self.grid, self.boi_id = tokenizer, text_len, grid, boi_id
        self.num_cells = grid * grid

    def encode_texts(self, texts, truncate=False, drop=None):
        """-> (ids int64 [B, L], valid bool [B, L], positions of the texts that were cut). A text longer than L tokens with
        [SEP] is an error (TextTooLongError) or, with truncate, cut keeping [SEP]; drop[k] replaces text k by
        the empty text ([SEP] alone: the unconditional input of classifier-free guidance)."""
        L = self.text_len
        ids = np.full([len(texts), L], self.tok.pad_id, np.int64)
        valid = np.zeros([len(texts), L], bool)
        cut = []
        for k, t in enumerate(texts):
            tt = self.tok.encode(t)
            if len(tt) > L:
                tt = self.tok.encode(t, max_len=L, truncate=truncate)   # cut, or TextTooLongError
                cut.append(k)
            if drop is not None and drop[k]:
                tt = [self.tok.eos_id]
            ids[k, :len(tt)], valid[k, :len(tt)] = tt, True
        return ids, valid, cut

    def text(self, texts, truncate=False):
        """-> (ids [B, L], valid [B, L]) of texts used as a source (see encode_texts)."""
        ids, valid, _ = self.encode_texts(texts, truncate)
        return ids, valid

    def _codes(self, codes):
        return np.asarray(codes).reshape([len(codes), self.num_cells]).astype(np.int64)

    def text_to_image(self, text, codes=None):
        """text: (ids, valid) from text(); codes [B, grid, grid] (or [B, n]) teacher-forced, or None to generate.
        -> (ids [B, L + n], valid [B, L + n], labels: the codes [B, n], or None)."""
        t_ids, t_valid = text
        b = len(t_ids)
        z = self._codes(codes) if codes is not None else None
        shifted = z[:, :-1] if z is not None else np.zeros([b, self.num_cells - 1], np.int64)
        ids = np.concatenate([t_ids, np.full([b, 1], self.boi_id, np.int64), shifted], 1)
        valid = np.concatenate([t_valid, np.ones([b, self.num_cells], bool)], 1)
        return ids, valid, z

    def image_to_text(self, codes, text=None, question=None):
        """codes [B, grid, grid]; text: (ids, valid) of the target caption / answer, teacher-forced, or None to
        generate; question: (ids, valid) for VQA. -> (ids, valid, labels: the text ids with -100 on padding
        [B, L], or None)."""
        z = self._codes(codes)
        b, L = len(z), self.text_len
        parts, valid = [z], [np.ones(z.shape, bool)]
        if question is not None:
            parts.append(question[0])
            valid.append(question[1])
        bos = np.full([b, 1], self.tok.bos_id, np.int64)
        if text is None:   # [CLS] then placeholders; every target slot counts as valid (causal anyway)
            parts.append(np.concatenate([bos, np.full([b, L - 1], self.tok.pad_id, np.int64)], 1))
            valid.append(np.ones([b, L], bool))
            labels = None
        else:
            t_ids, t_valid = text
            parts.append(np.concatenate([bos, t_ids[:, :-1]], 1))
            valid.append(t_valid)
            labels = np.where(t_valid, t_ids, -100)
        return np.concatenate(parts, 1), np.concatenate(valid, 1), labels
