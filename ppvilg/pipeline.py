"""Everything inference needs, loaded from one stage-2 checkpoint folder: the transformer, its text tokenizer,
the stage-1 tokenizer named in its config (Tokenizer.checkpoint) and a Generator.

    pipe = ViLGPipeline.from_checkpoint("output/demo/vilg")
    images, codes, scores = pipe.text_to_image(["左上角有一个小红色圆形"], num_candidates=4, rerank=True)
    pipe.caption(images_rgb)                  # -> list of dicts(text, score, ...)
    pipe.answer(images_rgb, "这是什么颜色")

A checkpoint trained end to end (Loss.end_to_end: it holds reconstructor.pdparams) turns generated codes into
pixels the paper's way: one forward over the generated sequence collects the generator's hidden states at the
image positions and the end-to-end reconstructor decodes them (`reconstructor == "end_to_end"`); otherwise the
stage-1 decoder decodes the codes (`"vq_decoder"`). `use_e2e=False` forces the stage-1 decoder.
"""
import os

import numpy as np
import paddle

from ppvilg.data.images import BadImageError, read_image, resize_center_crop, to_tensor_array, to_uint8_image
from ppvilg.engine.checkpoint import CheckpointError, load_model, load_state_strict
from ppvilg.engine.vilg_task import build_vilg, load_matching_tokenizer
from ppvilg.generation import Generator
from ppvilg.models.reconstructor import E2EReconstructor
from ppvilg.text.tokenizer import TextTokenizer


class ViLGPipeline:
    def __init__(self, model, tokenizer, vq, vq_cfg, folder=None, e2e=None):
        self.model, self.tok, self.vq, self.vq_cfg, self.folder = model, tokenizer, vq, vq_cfg, folder
        self.e2e = e2e   # the end-to-end reconstructor, or None
        self.image_size = vq_cfg.Data.image_size
        self.gen = Generator(model, tokenizer)

    @property
    def reconstructor(self):
        return "end_to_end" if self.e2e is not None else "vq_decoder"

    @classmethod
    def from_checkpoint(cls, path, vq_checkpoint=None, use_e2e=True):
        model, cfg, folder = load_model(path, "vilg", build_vilg)
        vq_path = vq_checkpoint or cfg.Tokenizer.checkpoint
        if not vq_path:
            raise CheckpointError(f"{folder}: its config names no Tokenizer.checkpoint; give the stage-1 checkpoint")
        vq, vq_cfg = load_matching_tokenizer(vq_path, model.config)
        e2e = None
        if use_e2e and os.path.isfile(os.path.join(folder, "reconstructor.pdparams")):
            e2e = E2EReconstructor(model.config.hidden_size, vq.config)
            load_state_strict(e2e, os.path.join(folder, "reconstructor.pdparams"))
            e2e.eval()
        return cls(model, TextTokenizer(cfg.Text.vocab_file), vq, vq_cfg, folder, e2e)

    @paddle.no_grad()
    def reconstruct_e2e(self, texts, codes, truncate=True):
        """End-to-end path: texts [T] and their codes [T, N, g, g] -> RGB uint8 images [T, N, S, S, 3] from the
        generator's hidden states over each (text, codes) sequence."""
        codes = np.asarray(codes)
        t, n = codes.shape[:2]
        flat = codes.reshape([t * n, -1]).astype(np.int64)
        src, valid_s = self.gen.text_source([x for x in texts for _ in range(n)], truncate)
        out = []
        for s in range(0, len(flat), 32):
            sl = slice(s, s + 32)
            ids = np.concatenate([src[sl], np.full([len(flat[sl]), 1], self.model.boi_id), flat[sl, :-1]], 1)
            valid = np.concatenate([valid_s[sl], np.ones(flat[sl].shape, bool)], 1)
            _, _, hid = self.model(paddle.to_tensor(ids), valid, self.gen.t2i_layout, return_hidden=True)
            out += [to_uint8_image(a) for a in self.e2e(hid, self.model.config.grid).numpy()]
        return np.stack(out).reshape([t, n] + list(out[0].shape))

    # ---- images <-> codes -------------------------------------------------------------------------------
    @paddle.no_grad()
    def decode(self, codes):
        """int codes [..., grid, grid] -> RGB uint8 images [..., S, S, 3]."""
        codes = np.asarray(codes)
        flat = codes.reshape([-1, codes.shape[-2], codes.shape[-1]]).astype(np.int64)
        out = []
        for s in range(0, len(flat), 64):
            x = self.vq.decode_codes(paddle.to_tensor(flat[s:s + 64])).numpy()
            out += [to_uint8_image(a) for a in x]
        return np.stack(out).reshape(codes.shape[:-2] + out[0].shape)

    @paddle.no_grad()
    def encode(self, images):
        """RGB uint8 images (any size: resized + center-cropped) -> codes [B, grid, grid]."""
        x = np.stack([to_tensor_array(resize_center_crop(im, self.image_size)) for im in images])
        return self.vq.encode(paddle.to_tensor(x)).numpy()

    @staticmethod
    def load_images(paths):
        out = []
        for p in paths:
            try:
                out.append(read_image(p))
            except BadImageError as e:
                raise BadImageError(f"cannot use this image: {e}") from None
        return out

    # ---- tasks ----------------------------------------------------------------------------------------------
    def check_text(self, texts):
        for t in texts:
            self.tok.encode(t, max_len=self.model.config.max_text_len, truncate=False)

    def text_to_image(self, texts, num_candidates=1, rerank=False, scorer=None, truncate=False, **sampling):
        """-> (images [T, N, S, S, 3] best first when reranked, codes [T, N, g, g], scores [T, N] or None).
        A prompt longer than the model's text length is an error (TextTooLongError), or cut with truncate."""
        if not truncate:
            self.check_text(texts)
        codes = self.gen.text_to_image(texts, num_candidates=num_candidates, truncate=truncate, **sampling)
        images = self.reconstruct_e2e(texts, codes) if self.e2e is not None else self.decode(codes)
        scores = None
        if rerank:
            order, scores = self.gen.rerank(texts, codes, scorer=scorer, images=images)
            idx = np.arange(len(texts))[:, None]
            codes, images, scores = codes[idx, order], images[idx, order], scores[idx, order]
        return images, codes, scores

    def caption(self, images, **decoding):
        return self.gen.image_to_text(self.encode(images), **decoding)

    def answer(self, images, question, **decoding):
        self.check_text([question])
        return self.gen.image_to_text(self.encode(images), question=question, **decoding)
