"""Text->image, image->text and VQA with Paddle Inference predictors over a folder from tools/export_model.py.

    pipe = DeployPipeline("output/demo/export", device="cpu", threads=1)
    images, codes, scores = pipe.text_to_image(["左上角有一个小红色圆形"], candidates=4, seed=0, rerank=True)
    pipe.caption(images_rgb)                 # -> list of dicts(text, ids, score, logprob)
    pipe.answer(images_rgb, "这是什么颜色")

Only paddle (its inference predictors and tensors), numpy, OpenCV and the tokenizer are used; the sequences and
decoding algorithms are the ones the training package runs (ppvilg_deploy.sequences, ppvilg_deploy.decoding), so
seeds and greedy decoding give the same results. Unset sampler options take the export's defaults
(inference.yml's sampler: the Eval section of the exported checkpoint) in `pipe.sampler`.
"""
import os

import numpy as np
import yaml

from ppvilg_deploy.decoding import Decoding, SamplerSettings, kept_candidates, rank_candidates, rerank_scores
from ppvilg_deploy.images import resize_center_crop, to_tensor_array, to_uint8_image
from ppvilg_deploy.kvcache import write_slots
from ppvilg_deploy.sequences import SequenceBuilder
from ppvilg_deploy.tokenizer import TextTokenizer


# written by ppvilg/export.py (2: step_image returns every slot's logits; 3: score_text, and reconstruct for
# end-to-end checkpoints; 4: score_text returns each token's log-probability instead of their sum)
FORMAT = "ppvilg-inference/4"
OLDER_FORMATS = ("ppvilg-inference/1", "ppvilg-inference/2", "ppvilg-inference/3")   # re-export them


class ExportError(RuntimeError):
    pass


class Program:
    """One exported program behind a paddle.inference predictor; call it with {input name: array}."""

    def __init__(self, prefix, device="cpu", threads=1, mkldnn=False, memory_optim=False, precision="fp32",
                 gpu_id=0):
        from paddle import inference
        files = (prefix + ".json", prefix + ".pdiparams")
        for f in files:
            if not os.path.isfile(f):
                raise ExportError(f"{f}: missing (not a folder written by tools/export_model.py?)")
        config = inference.Config(*files)
        if device == "gpu":
            kinds = {"fp32": inference.PrecisionType.Float32, "fp16": inference.PrecisionType.Half,
                     "bf16": inference.PrecisionType.Bfloat16}
            if precision not in kinds:
                raise ValueError(f"precision must be one of {', '.join(kinds)}, got {precision!r}")
            config.enable_use_gpu(256, gpu_id, kinds[precision])
        elif device == "cpu":
            if precision != "fp32":
                raise ValueError("on CPU the exported programs run in fp32 (paddle's CPU build has no "
                                 "half-precision matmul)")
            config.disable_gpu()
            config.set_cpu_math_library_num_threads(threads)
            if mkldnn:  # off by default: same results, but slower per step on the demo-size model
                config.enable_mkldnn()
            else:
                config.disable_mkldnn()
        else:
            raise ValueError(f"device must be cpu or gpu, got {device!r}")
        if memory_optim:  # off by default: with paddle 3.3.1 (CPU) predictor creation fails with it on PIR programs
            config.enable_memory_optim()
        config.disable_glog_info()
        self.predictor = inference.create_predictor(config)
        self.inputs = self.predictor.get_input_names()
        self.outputs = self.predictor.get_output_names()

    def __call__(self, **inputs):
        """inputs: {name: numpy array or paddle Tensor} -> the outputs as paddle Tensors (no copy: a decode
        step hands its KV cache outputs to the next step as they are)."""
        import paddle
        missing = sorted(set(self.inputs) - set(inputs))
        if missing:
            raise ValueError(f"missing inputs {missing}")
        return self.predictor.run([v if isinstance(v, paddle.Tensor) else paddle.to_tensor(np.ascontiguousarray(v))
                                   for v in (inputs[n] for n in self.inputs)])


class PredictorDecoder:
    """One direction's sequence decoded with a step program and an explicit KV cache (see ppvilg/export.py)."""

    def __init__(self, pipe, direction, ids, valid):
        self.kind, self.pos = pipe.slots[direction]
        self.t0 = sum(pipe.info["layouts"][direction]["lengths"][:-1])
        self.program = pipe.step_image if direction == "t2i" else pipe.step_text
        self.all_slots = direction == "t2i"                             # step_image: logits of every slot
        self.pipe = pipe
        if direction != "t2i":
            self.sample_at = None                                       # sampling in the program: images only
        self.static = pipe.masks[direction]                              # [P, S, S]
        self.ids = ids.copy()
        self.pad = np.where(valid, 0.0, -1e9).astype(np.float32)[:, None, None, :]   # [B, 1, 1, S]
        m = pipe.info["model"]
        shape = [ids.shape[0], m["num_heads"], ids.shape[1], m["head_dim"]]
        self.names = [f"cache_{kv}_{i}" for i in range(m["num_layers"]) for kv in ("k", "v")]
        import paddle
        place = paddle.CUDAPlace(pipe.gpu_id) if pipe.device == "gpu" else paddle.CPUPlace()
        # the runtime's own cache, on the predictors' device, written in place after each step
        self.cache = [paddle.to_tensor(np.zeros(shape, np.float32), place=place) for _ in self.names]

    def _inputs(self, first, last):
        """The step's inputs for slots start .. last (start = 0 for the prefill: the source and the first
        target slot)."""
        start = 0 if first == self.t0 else first
        sl = slice(start, last + 1)
        masks_cache = self.static[:, None, None, sl, :] + self.pad[None]     # [P, B, 1, s, S]
        masks_cache[..., start:] = -1e9                                      # not filled before this step
        masks_new = self.static[:, None, None, sl, sl] + self.pad[None, :, :, :, sl]
        heads = self.pipe.info["model"]["num_heads"]   # one copy per head: see ppvilg/export.py

        def per_head(m):
            return np.ascontiguousarray(np.broadcast_to(m, m.shape[:2] + (heads,) + m.shape[3:]), np.float32)
        return start, dict(ids=self.ids[:, sl], kind=self.kind[sl], pos=self.pos[sl],
                           masks_cache=per_head(masks_cache), masks_new=per_head(masks_new),
                           **dict(zip(self.names, self.cache)))

    def _store(self, start, new):
        """Write the step's keys and values [B, H, s, Dh] into the cache at `start`, in place."""
        write_slots(self.cache, start, new)

    def _run(self, first, last):
        start, inputs = self._inputs(first, last)
        logits, *new = self.program(**inputs)
        self._store(start, new)
        return logits.numpy(), first - start

    def logits_at(self, slot):
        logits, _ = self._run(slot, slot)
        return logits[:, -1] if self.all_slots else logits

    def sample_at(self, slot, uniform, settings, rows):
        """Text->image: run `slot` and sample the next code of the `rows` prompts inside the program
        (guidance, temperature, top-k, top-p; `uniform` [rows, 1]: the host generator's draws, as sample_from
        draws them) -> codes [rows]."""
        start, inputs = self._inputs(slot, slot)
        v = self.pipe.info["model"]["num_codes"]
        st = settings
        codes, *new = self.pipe.sample_image(
            uniform=np.asarray(uniform, np.float64), temperature=np.array([max(st.temperature, 1e-6)], np.float64),
            top_k=np.array([st.top_k if 0 < st.top_k < v else v], np.int64),
            top_p=np.array([st.top_p if st.top_p < 1.0 else 2.0], np.float64),
            cfg_scale=np.array([st.cfg_scale], np.float32), **inputs)
        self._store(start, new)
        return codes.numpy()

    def logits_span(self, first, last):
        """Logits [B, n, V] after each of the slots first .. last from one step (text->image programs)."""
        if not self.all_slots:
            raise ValueError("the text step program returns its last slot's logits only")
        logits, offset = self._run(first, last)
        return logits[:, offset:]

    def reorder(self, rows):
        import paddle
        self.ids, self.pad = self.ids[rows], self.pad[rows]
        index = paddle.to_tensor(np.asarray(rows, np.int64))
        self.cache = [paddle.gather(c, index) for c in self.cache]


class DeployPipeline(Decoding):
    def __init__(self, folder, device="cpu", threads=1, mkldnn=False, memory_optim=False, precision="fp32",
                 gpu_id=0):
        path = os.path.join(folder, "inference.yml")
        if not os.path.isfile(path):
            raise ExportError(f"{folder}: no inference.yml (export a checkpoint with tools/export_model.py)")
        with open(path, encoding="utf-8") as f:
            self.info = yaml.safe_load(f)
        if self.info.get("format") != FORMAT:
            raise ExportError(f"{path}: format {self.info.get('format')!r}, this runtime reads {FORMAT!r}"
                              + (" (export the checkpoint again with tools/export_model.py)"
                                 if self.info.get("format") in OLDER_FORMATS
                                 else ""))
        m = self.info["model"]
        self.grid, self.image_size = m["grid"], self.info["image"]["size"]
        try:
            self.sampler = SamplerSettings.from_mapping(self.info.get("sampler"))
        except ValueError as e:
            raise ExportError(f"{path}: sampler: {e}") from None
        self.text_tokenizer = TextTokenizer(os.path.join(folder, self.info["tokenizer"]["vocab_file"]))
        self.seq = SequenceBuilder(self.text_tokenizer, m["text_len"], m["grid"], m["boi_id"])
        with np.load(os.path.join(folder, "masks.npz")) as z:
            self.masks = {k: z[k] for k in z.files}
        # per direction, each slot's kind and position (the exported layouts)
        self.slots = {d: (np.concatenate([np.full(n, k, np.int64) for k, n in zip(lay["kinds"], lay["lengths"])]),
                          np.concatenate([np.arange(n, dtype=np.int64) for n in lay["lengths"]]))
                      for d, lay in self.info["layouts"].items()}
        opts = dict(device=device, threads=threads, mkldnn=mkldnn, memory_optim=memory_optim, precision=precision,
                    gpu_id=gpu_id)
        self.device, self.gpu_id = device, gpu_id
        progs = self.info["programs"]
        self.vq_encoder = Program(os.path.join(folder, progs["vq_encoder"]), **opts)
        self.vq_decoder = Program(os.path.join(folder, progs["vq_decoder"]), **opts)
        self.step_image = Program(os.path.join(folder, progs["step_image"]), **opts)
        self.step_text = Program(os.path.join(folder, progs["step_text"]), **opts)
        self.sample_image = Program(os.path.join(folder, progs["sample_image"]), **opts)
        self.score_text = Program(os.path.join(folder, progs["score_text"]), **opts)
        self.reconstructor = self.info["reconstructor"]
        if self.reconstructor not in ("vq_decoder", "end_to_end"):
            raise ExportError(f"{path}: reconstructor must be vq_decoder or end_to_end, got {self.reconstructor!r}")
        self.reconstruct_program = None
        if self.reconstructor == "end_to_end":
            if "reconstruct" not in progs:
                raise ExportError(f"{path}: reconstructor end_to_end without a reconstruct program")
            self.reconstruct_program = Program(os.path.join(folder, progs["reconstruct"]), **opts)

    def make_decoder(self, direction, ids, valid):
        return PredictorDecoder(self, direction, ids, valid)

    # ---- images <-> codes -------------------------------------------------------------------------------
    def encode(self, images):
        """RGB uint8 images (any size: resized + center-cropped) -> codes [B, grid, grid]."""
        x = np.stack([to_tensor_array(resize_center_crop(im, self.image_size)) for im in images])
        return self.vq_encoder(image=x)[0].numpy().astype(np.int64)

    def decode(self, codes):
        """codes [..., grid, grid] -> RGB uint8 images [..., S, S, 3]."""
        codes = np.asarray(codes, np.int64)
        flat = codes.reshape([-1, self.grid, self.grid])
        out = np.stack([to_uint8_image(a) for a in self.vq_decoder(codes=flat)[0].numpy()])
        return out.reshape(codes.shape[:-2] + out.shape[1:])

    # ---- whole sequences: reranking and the end-to-end reconstructor -----------------------------------
    def _whole(self, direction, ids, valid):
        """The inputs of a whole-sequence program: ids, kind, pos and masks [P, B, 1, S, S] (key padding
        added)."""
        kind, pos = self.slots[direction]
        pad = np.where(valid, 0.0, -1e9).astype(np.float32)[:, None, None, :]
        masks = (self.masks[direction][:, None, None] + pad[None]).astype(np.float32)
        return dict(ids=ids, kind=kind, pos=pos, masks=masks)

    def caption_token_logprobs(self, codes, texts, chunk=32):
        """log p(token | image, earlier tokens) of each text's tokens for each (codes[i], texts[i]) pair -> (numpy
        [B, L], 0 on padding; weights [B, L], 1 on the real tokens, [SEP] included): the score_text program, the
        dynamic graph's Generator.caption_token_logprobs."""
        codes = np.asarray(codes, np.int64).reshape([len(texts), -1])
        text, valid_t = self.seq.text(texts, truncate=True)
        ids, valid, _ = self.seq.image_to_text(codes, text=(text, valid_t))
        weights = valid_t.astype(np.float32)
        out = []
        for s in range(0, len(texts), chunk):
            sl = slice(s, s + chunk)
            out.append(self.score_text(labels=text[sl], weights=weights[sl],
                                       **self._whole("i2t", ids[sl], valid[sl]))[0].numpy())
        return np.concatenate(out), weights

    def caption_logprob(self, codes, texts, chunk=32):
        """Sum of log p(text | image) for each (codes[i], texts[i]) pair, [SEP] included."""
        return rerank_scores(*self.caption_token_logprobs(codes, texts, chunk), "logprob")

    def rerank(self, texts, candidates, how="logprob"):
        """candidates [len(texts), N, grid, grid] -> (order [len(texts), N] best first, scores [len(texts), N])
        from the model's own p(prompt token | candidate image, earlier tokens), summed as `how` says
        (SamplerSettings.rerank_score)."""
        t, n = candidates.shape[:2]
        flat_texts = [x for x in texts for _ in range(n)]
        return rank_candidates(*self.caption_token_logprobs(candidates.reshape([t * n, -1]), flat_texts), t, how)

    def reconstruct(self, texts, codes, truncate=True, chunk=32):
        """End-to-end exports: texts [T] and their codes [T, N, g, g] -> RGB uint8 images [T, N, S, S, 3] from
        the generator's hidden states over each (text, codes) sequence (ViLGInference.reconstruct_e2e)."""
        if self.reconstruct_program is None:
            raise ExportError("this export has no end-to-end reconstructor (its checkpoint was not trained end "
                              "to end): use decode()")
        codes = np.asarray(codes, np.int64)
        t, n = codes.shape[:2]
        flat = codes.reshape([t * n, -1])
        src, valid_s = self.seq.text([x for x in texts for _ in range(n)], truncate)
        out = []
        for s in range(0, len(flat), chunk):
            sl = slice(s, s + chunk)
            ids, valid, _ = self.seq.text_to_image((src[sl], valid_s[sl]), flat[sl])
            out += [to_uint8_image(a) for a in self.reconstruct_program(**self._whole("t2i", ids, valid))[0].numpy()]
        return np.stack(out).reshape([t, n] + list(out[0].shape))

    # ---- the three tasks --------------------------------------------------------------------------------
    def settings(self, sampler=None, **changes):
        """`sampler` (default: the export's, self.sampler) with `changes` (SamplerSettings fields)."""
        return (sampler or self.sampler).replace(**changes)

    def text_to_image(self, texts, sampler=None, truncate=False, rerank=False, seeds=None, keep=None, **changes):
        """-> (RGB uint8 images [len(texts), K, S, S, 3], codes [len(texts), N, grid, grid], scores [len(texts),
        N] or None), N = candidates, K = `keep` (default N): only each text's first K candidates are decoded
        into images; reranked (best first, by the model's own caption token probabilities, as
        settings.rerank_score says) with rerank.
        Pixels come from the end-to-end reconstructor when the export has one, else the VQ decoder. `seeds`:
        one sampling seed per text (see Decoding.sample_codes)."""
        settings = self.settings(sampler, **changes)
        keep = kept_candidates(keep, settings.candidates)
        codes = self.sample_codes(texts, settings, truncate, seeds=seeds)
        scores = None
        if rerank:
            order, scores = self.rerank(texts, codes, settings.rerank_score)
            idx = np.arange(len(texts))[:, None]
            codes, scores = codes[idx, order], scores[idx, order]
        best = codes[:, :keep]
        images = self.reconstruct(texts, best, truncate) if self.reconstructor == "end_to_end" else self.decode(best)
        return images, codes, scores

    def caption(self, images, sampler=None, **changes):
        return self.decode_text(self.encode(images), self.settings(sampler, **changes))

    def answer(self, images, question, sampler=None, **changes):
        return self.decode_text(self.encode(images), self.settings(sampler, **changes), question=question)
