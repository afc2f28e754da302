"""Inference from one stage-2 checkpoint folder: the transformer, its text tokenizer, the image tokenizer
(stage 1) named in its config (`ImageTokenizer.checkpoint`), the sampler defaults of its `Eval` section and a
Generator.

    vilg = ViLGInference.from_checkpoint("output/demo/vilg")
    images, codes, scores = vilg.text_to_image(["左上角有一个小红色圆形"], candidates=4, rerank=True)
    vilg.caption(images_rgb)                  # -> list of dicts(text, score, ...)
    vilg.answer(images_rgb, "这是什么颜色")

Unset sampler options take `vilg.sampler` (a SamplerSettings: the checkpoint's Eval section), as the exported
predictors take the export's; any of its fields can be given per call (`temperature=0.7, cfg_scale=1.5`).

A checkpoint trained end to end (Loss.end_to_end: it holds reconstructor.safetensors) turns generated codes into
pixels the paper's way: one forward over the generated sequence collects the generator's hidden states at the
image positions and the end-to-end reconstructor decodes them (`reconstructor == "end_to_end"`); otherwise the
image tokenizer's decoder decodes the codes (`"vq_decoder"`). `use_e2e=False` forces the tokenizer's decoder.
"""

import numpy as np
import paddle

from ppvilg.data.images import BadImageError, read_image, resize_center_crop, to_tensor_array, to_uint8_image
from ppvilg.checkpoints import CheckpointError, has_module, load_matching_image_tokenizer, load_model, load_module
from ppvilg.generation import Generator, SamplerSettings
from ppvilg.models.reconstructor import E2EReconstructor
from ppvilg.text.tokenizer import TextTokenizer
from ppvilg_deploy.decoding import kept_candidates


class ViLGInference:
    def __init__(self, model, text_tokenizer, image_tokenizer, image_tokenizer_cfg, folder=None, e2e=None,
                 sampler=None):
        self.model, self.text_tokenizer, self.folder = model, text_tokenizer, folder
        self.image_tokenizer, self.image_tokenizer_cfg = image_tokenizer, image_tokenizer_cfg
        self.e2e = e2e   # the end-to-end reconstructor, or None
        self.image_size = image_tokenizer_cfg.Data.image_size
        self.gen = Generator(model, text_tokenizer, sampler)

    @property
    def sampler(self):
        """The default SamplerSettings (the checkpoint's Eval section)."""
        return self.gen.sampler

    @property
    def reconstructor(self):
        return "end_to_end" if self.e2e is not None else "vq_decoder"

    @classmethod
    def from_checkpoint(cls, path, image_tokenizer_checkpoint=None, use_e2e=True):
        model, cfg, folder = load_model(path, "vilg")
        tok_path = image_tokenizer_checkpoint or cfg.ImageTokenizer.checkpoint
        if not tok_path:
            raise CheckpointError(f"{folder}: its config names no ImageTokenizer.checkpoint; give the stage-1 "
                                  "checkpoint")
        image_tokenizer, image_tokenizer_cfg = load_matching_image_tokenizer(tok_path, model.config)
        e2e = None
        if use_e2e and has_module(folder, "reconstructor"):
            e2e = E2EReconstructor(model.config.hidden_size, image_tokenizer.config)
            load_module(e2e, folder, "reconstructor")
            e2e.eval()
        sampler = SamplerSettings.from_mapping(cfg.Eval.to_dict() if "Eval" in cfg else {})
        return cls(model, TextTokenizer(cfg.Text.vocab_file), image_tokenizer, image_tokenizer_cfg, folder, e2e,
                   sampler)

    @paddle.no_grad()
    def reconstruct_e2e(self, texts, codes, truncate=True):
        """End-to-end path: texts [T] and their codes [T, N, g, g] -> RGB uint8 images [T, N, S, S, 3] from the
        generator's hidden states over each (text, codes) sequence."""
        codes = np.asarray(codes)
        t, n = codes.shape[:2]
        flat = codes.reshape([t * n, -1]).astype(np.int64)
        seq = self.gen.seq
        src, valid_s = seq.text([x for x in texts for _ in range(n)], truncate)
        out = []
        for s in range(0, len(flat), 32):
            sl = slice(s, s + 32)
            ids, valid, _ = seq.text_to_image((src[sl], valid_s[sl]), flat[sl])
            _, _, hid = self.model(paddle.to_tensor(ids), valid, self.gen.layouts["t2i"], return_hidden=True)
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
            x = self.image_tokenizer.decode_codes(paddle.to_tensor(flat[s:s + 64])).numpy()
            out += [to_uint8_image(a) for a in x]
        return np.stack(out).reshape(codes.shape[:-2] + out[0].shape)

    @paddle.no_grad()
    def encode(self, images):
        """RGB uint8 images (any size: resized + center-cropped) -> codes [B, grid, grid]."""
        x = np.stack([to_tensor_array(resize_center_crop(im, self.image_size)) for im in images])
        return self.image_tokenizer.encode(paddle.to_tensor(x)).numpy()

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
            self.text_tokenizer.encode(t, max_len=self.model.config.max_text_len, truncate=False)

    def text_to_image(self, texts, rerank=False, scorer=None, truncate=False, sampler=None, keep=None, **changes):
        """-> (images [T, K, S, S, 3], codes [T, N, g, g] best first when reranked, scores [T, N] or None).
        N = candidates; K = `keep` (default N): only each prompt's first K candidates, the best when reranked,
        are decoded into images. `changes`: SamplerSettings fields over `sampler` (default: self.sampler). A
        prompt longer than the model's text length is an error (TextTooLongError), or cut with truncate."""
        if not truncate:
            self.check_text(texts)
        settings = self.gen.settings(sampler, **changes)
        keep = kept_candidates(keep, settings.candidates)
        codes = self.gen.text_to_image(texts, settings, truncate)
        images = scores = None
        if rerank:
            if scorer is not None:   # a user's scorer reads the pixels of every candidate
                images = self.pixels(texts, codes)
            order, scores = self.gen.rerank(texts, codes, scorer=scorer, images=images, how=settings.rerank_score)
            idx = np.arange(len(texts))[:, None]
            codes, scores = codes[idx, order], scores[idx, order]
            if images is not None:
                images = images[idx, order]
        images = self.pixels(texts, codes[:, :keep]) if images is None else images[:, :keep]
        return images, codes, scores

    def pixels(self, texts, codes):
        """codes [T, N, g, g] of the prompts `texts` -> RGB uint8 images [T, N, S, S, 3]: the end-to-end
        reconstructor's when the checkpoint has one, else the VQ decoder's."""
        return self.reconstruct_e2e(texts, codes) if self.e2e is not None else self.decode(codes)

    def caption(self, images, sampler=None, **changes):
        return self.gen.image_to_text(self.encode(images), sampler, **changes)

    def answer(self, images, question, sampler=None, **changes):
        self.check_text([question])
        return self.gen.image_to_text(self.encode(images), sampler, question=question, **changes)
