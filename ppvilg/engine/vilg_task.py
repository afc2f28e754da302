"""Stage 2 task: the unified transformer trained on both directions of every pair,
L = t2i_weight * L_text->image + i2t_weight * L_image->text (the paper: 1 : 1), and, with Loss.end_to_end, the
paper's end-to-end training (§3.1.3): + recon_weight * L_reconstruction, where the generator's hidden states
at the image positions go through ppvilg.models.reconstructor.E2EReconstructor (initialised from the stage-1
decoder) to pixels, compared with the real image (recon_weight 1: generation and reconstruction weighted
equally), so the reconstruction loss trains the transformer too.

Inputs are VQ code shards (Data.<split>.source: shards, written by tools/tokenize_images.py) or images encoded
on the fly by the frozen stage-1 image tokenizer named in ImageTokenizer.checkpoint (the section was called
`Tokenizer` before; that name is accepted in this release with a deprecation message). Optional condition dropout replaces
a pair's text by the empty text ([SEP] alone) in the text->image direction, so that sampling can use
classifier-free guidance.

Generative VQA (the paper's third task) trains with Loss.vqa_weight > 0: for the items of a batch that come with
questions (the shapes demo's, or a manifest's question / answer fields), one of its questions is drawn per step
(for a Loss.vqa_fraction share of them, from step Loss.vqa_start on), and the sequence [codes][question][CLS]
answer (image and question as the bidirectional source, the answer as the causal target, the same weights) adds
vqa_weight * L_vqa.
"""
import numpy as np
import paddle

from ppvilg.config import ConfigError, check_range
from ppvilg.data.datasets import eval_batches
from ppvilg.checkpoints import CheckpointError, load_matching_image_tokenizer, rng_preserved
from ppvilg.distributed import convert
from ppvilg.engine.task_interface import Task
from ppvilg.evaluation import EVAL_DEFAULTS
from ppvilg.models.layout import direction_layouts, trim_text
from ppvilg.models.reconstructor import E2EReconstructor
from ppvilg.models.vilg import ATTENTION_KERNELS, ViLG, parallel_layout_errors
from ppvilg.models.vilg_pp import build_pipeline, to_model_names, to_pipeline_names
from ppvilg.registry import TASKS, model_config
from ppvilg.text.tokenizer import DEFAULT_VOCAB, TextTokenizer
from ppvilg_deploy.decoding import SamplerSettings
from ppvilg_deploy.sequences import SequenceBuilder


def _vocab_size(path):
    with open(path, encoding="utf-8") as f:
        return sum(1 for line in f if line.rstrip("\n"))


class PairBatcher:
    """Turns (codes [B, h, w], texts) into the id / validity / label arrays of both directions (the sequences of
    ppvilg_deploy.sequences.SequenceBuilder, shared with generation and deployment); `truncated` counts the
    distinct texts that were cut (each once, however many epochs see it)."""

    def __init__(self, tokenizer, config):
        self.tok, self.c = tokenizer, config
        self.seq = SequenceBuilder(tokenizer, config.max_text_len, config.grid, config.num_codes)
        lays = direction_layouts(config.max_text_len, config.grid)
        self.t2i, self.i2t, self.vqa_layout = lays["t2i"], lays["i2t"], lays["vqa"]
        self.cut_texts = set()

    @property
    def truncated(self):
        return len(self.cut_texts)

    def _text(self, texts, drop=None):
        ids, valid, cut = self.seq.encode_texts(texts, truncate=True, drop=drop)
        self.cut_texts.update(texts[k] for k in cut)
        return ids, valid

    def text_to_image(self, codes, texts, drop=None):
        """-> (ids, valid, labels = the codes [B, n]); drop[k]: text k replaced by the empty text."""
        return self.seq.text_to_image(self._text(texts, drop), codes)

    def image_to_text(self, codes, texts):
        """-> (ids, valid, labels: text ids, -100 on padding)."""
        return self.seq.image_to_text(codes, text=self._text(texts))

    def vqa(self, codes, questions, answers):
        """-> (ids, valid, labels: the answers' ids, -100 elsewhere) of [codes][question][CLS] answer."""
        return self.seq.image_to_text(codes, text=self._text(answers), question=self._text(questions))

    @staticmethod
    def pick_questions(qa, uniform=None, fraction=1.0, type_weights=None):
        """Items' question lists -> (rows, questions, answers): one question per item that has any; with
        `uniform` [B, 2] (random numbers in [0, 1)) the question is drawn and an item takes part with probability
        `fraction`; without, item k asks its question k mod count (evaluation: deterministic). `type_weights`
        ({question type: weight >= 0}, types not named weigh 1; a question without a type is type None): the
        draw picks a question with probability proportional to its type's weight; an item whose questions all
        weigh 0 takes no part."""
        rows, qs, ans = [], [], []
        for k, items in enumerate(qa):
            if not items:
                continue
            if uniform is None:
                j = k % len(items)
            else:
                if uniform[k, 1] >= fraction:
                    continue
                w = np.array([float((type_weights or {}).get(q.get("type"), 1.0)) for q in items])
                if w.sum() <= 0:
                    continue
                j = min(int(np.searchsorted(np.cumsum(w), uniform[k, 0] * w.sum(), side="right")), len(items) - 1)
            rows.append(k)
            qs.append(items[j]["question"])
            ans.append(items[j]["answer"])
        return np.array(rows, np.int64), qs, ans


def unigram_entropy(targets, vocab):
    """Cross-entropy (nats) of targets under their own empirical unigram distribution: the best any
    context-free model can do on this very set."""
    t = np.asarray(targets).ravel()
    t = t[t >= 0]
    p = np.bincount(t, minlength=vocab) / max(len(t), 1)
    nz = p[p > 0]
    return float(-(nz * np.log(nz)).sum())


@TASKS.register("vilg")
class ViLGTask(Task):
    config_sections = {
        "Text": {"vocab_file": None},            # None: ppvilg/text/assets/vocab.txt
        "ImageTokenizer": {"checkpoint": None},  # stage-1 checkpoint: encodes images on the fly, decodes codes
        "Loss": {"t2i_weight": 1.0, "i2t_weight": 1.0, "cond_dropout": 0.0,
                 "vqa_weight": 0.0,      # generative VQA on the items that come with questions (0: off)
                 "vqa_fraction": 1.0,    # share of those items that train VQA in a step
                 "vqa_start": 0,         # the step from which VQA trains (the captions first: see configs/demo)
                 "vqa_type_weights": None,   # {question type: weight}: how often each type is drawn (None: alike)
                 "end_to_end": False,    # train the E2E reconstructor and, through it, the generator
                 "recon_weight": 1.0,    # weight of the pixel reconstruction loss (the paper: equal weights)
                 "recon": "l2"},         # l2 | l1
        "Eval": dict(batch_size=64, num_visuals=8, **EVAL_DEFAULTS),   # num_visuals: prompts / images shown in
                                                                       # VisualDL at each evaluation (0: none)
    }

    renamed_sections = {"Tokenizer": "ImageTokenizer"}

    @classmethod
    def validate_config(cls, cfg, origin):
        if cfg.Model.name != "vilg":
            raise ConfigError(f"{origin}: Global.task 'vilg' needs Model.name 'vilg', got {cfg.Model.name!r}")
        vocab = cfg.Text.vocab_file or DEFAULT_VOCAB
        try:
            n = _vocab_size(vocab)
        except OSError as e:
            raise ConfigError(f"{origin}: Text.vocab_file: cannot read {vocab!r} ({e.strerror})") from None
        if cfg.Model.text_vocab_size < n:
            raise ConfigError(f"{origin}: Model.text_vocab_size is {cfg.Model.text_vocab_size} but the vocabulary "
                              f"{vocab} has {n} tokens; set -o Model.text_vocab_size={n} (or more: padding rows "
                              "for tensor parallel, never generated)")
        d = cfg.Distributed
        for _, msg, hint in parallel_layout_errors(model_config(cfg.Model), d.mp_degree, d.pp_degree):
            raise ConfigError(f"{origin}: Distributed (mp_degree {d.mp_degree}, pp_degree {d.pp_degree}): {msg}"
                              + (f" ({hint})" if hint else ""))
        if cfg.Model.lora_rank > 0 and d.pp_degree > 1:   # (>= 0: the Model checks; tensor parallel splits them)
            raise ConfigError(f"{origin}: Model.lora_rank {cfg.Model.lora_rank}: adapters train with pp_degree 1 "
                              f"(got {d.pp_degree}; mp_degree > 1 is fine)")
        if cfg.Model.attention not in ("dense", "sparse"):
            raise ConfigError(f"{origin}: Model.attention must be dense or sparse, got {cfg.Model.attention!r}")
        if cfg.Model.attention_kernel not in ATTENTION_KERNELS:
            raise ConfigError(f"{origin}: Model.attention_kernel must be one of {', '.join(ATTENTION_KERNELS)}, "
                              f"got {cfg.Model.attention_kernel!r}")
        if cfg.Model.hidden_size % cfg.Model.num_heads:
            raise ConfigError(f"{origin}: Model.hidden_size must be a multiple of Model.num_heads")
        if not 0.0 <= cfg.Loss.cond_dropout < 1.0:
            raise ConfigError(f"{origin}: Loss.cond_dropout must be in [0, 1), got {cfg.Loss.cond_dropout}")
        for key in ("t2i_weight", "i2t_weight", "recon_weight", "vqa_weight", "vqa_start"):
            check_range(cfg.Loss[key], f"Loss.{key}", 0, origin=origin)
        tw = cfg.Loss.vqa_type_weights
        if tw is not None and (not isinstance(tw, dict) or not tw or any(
                not isinstance(v, (int, float)) or isinstance(v, bool) or v < 0 for v in tw.values())):
            raise ConfigError(f"{origin}: Loss.vqa_type_weights must map question types to weights >= 0 (e.g. "
                              f"{{yesno: 3.0}}; types not named weigh 1), got {tw!r}")
        if not 0.0 < cfg.Loss.vqa_fraction <= 1.0:
            raise ConfigError(f"{origin}: Loss.vqa_fraction must be in (0, 1], got {cfg.Loss.vqa_fraction}")
        if cfg.Loss.vqa_weight > 0 and d.pp_degree > 1:
            raise ConfigError(f"{origin}: Loss.vqa_weight > 0 is not trained through the pipeline schedule yet "
                              "(pp_degree 1 only)")
        check_range(cfg.Eval.batch_size, "Eval.batch_size", 1, origin=origin)
        check_range(cfg.Eval.num_samples, "Eval.num_samples", 1, origin=origin)
        check_range(cfg.Eval.num_visuals, "Eval.num_visuals", 0, zero="none", origin=origin)
        try:
            SamplerSettings.from_mapping(cfg.Eval)
        except ValueError as e:
            raise ConfigError(f"{origin}: Eval: {e}") from None
        if cfg.Loss.recon not in ("l1", "l2"):
            raise ConfigError(f"{origin}: Loss.recon must be l1 or l2, got {cfg.Loss.recon!r}")
        if cfg.Loss.end_to_end:
            if not cfg.ImageTokenizer.checkpoint:
                raise ConfigError(f"{origin}: Loss.end_to_end needs ImageTokenizer.checkpoint (the stage-1 model whose "
                                  "decoder initialises the reconstructor)")
            if cfg.Data.train.source == "shards":
                raise ConfigError(f"{origin}: Loss.end_to_end compares reconstructions with the real images; "
                                  "Data.train.source 'shards' holds codes only (use the images: shapes, manifest, "
                                  "coco ...)")
            if d.world_size > 1:
                raise ConfigError(f"{origin}: Loss.end_to_end trains in one process for now (the reconstructor is "
                                  "not wrapped for data / tensor / pipeline parallel)")
        for split in ("train", "eval"):
            if cfg.Data[split].source != "shards" and not cfg.ImageTokenizer.checkpoint:
                raise ConfigError(f"{origin}: Data.{split}.source '{cfg.Data[split].source}' gives images; "
                                  "set ImageTokenizer.checkpoint to the stage-1 checkpoint that encodes them, or "
                                  "use shards from tools/tokenize_images.py")

    def __init__(self, cfg, parallel):
        super().__init__(cfg, parallel)
        par = parallel
        config = model_config(cfg.Model)
        if par.pp > 1:  # this rank's stages of the same layers (ppvilg.models.vilg_pp.build_pipeline)
            self.model = build_pipeline(config, par, cfg.Loss.t2i_weight, cfg.Loss.i2t_weight)
            self.model.config = config
        else:
            self.model = ViLG(config, par.mp, par.recompute, par.mp_group)
        self.train_model = self.model   # replaced by the parallel wrapper (Trainer.distribute)
        self.text_tokenizer = TextTokenizer(cfg.Text.vocab_file)
        self.batcher = PairBatcher(self.text_tokenizer, config)
        self._image_tokenizer = None
        self.reconstructor = None
        if cfg.Loss.end_to_end:
            self.reconstructor = E2EReconstructor.from_vq(config.hidden_size, self.image_tokenizer)

    @property
    def image_tokenizer(self):
        """The frozen stage-1 image tokenizer (ImageTokenizer.checkpoint), loaded on first use."""
        if self._image_tokenizer is None:
            if not self.cfg.ImageTokenizer.checkpoint:
                raise RuntimeError("images need the stage-1 image tokenizer: set ImageTokenizer.checkpoint")
            with rng_preserved():   # built on first use, possibly mid-training: training's streams stay as they were
                vq, _ = load_matching_image_tokenizer(self.cfg.ImageTokenizer.checkpoint, self.model.config)
            for p in vq.parameters():
                p.stop_gradient = True
            self._image_tokenizer = vq
        return self._image_tokenizer

    def modules(self):
        mods = {"model": self.model}
        if self.reconstructor is not None:
            mods["reconstructor"] = self.reconstructor
        return mods

    def distribute(self, model):
        self.train_model = model

    # ---- checkpoints and parallel layouts -------------------------------------------------------------
    def checkpoint_state(self, name):
        state = super().checkpoint_state(name)
        if name == "model" and self.parallel.pp > 1:   # a stage's PipelineLayer names -> ViLG's
            return to_model_names(state, self.model.config.num_layers)
        return state

    def load_checkpoint_state(self, name, state, origin):
        if name == "model" and self.parallel.pp > 1:
            try:
                state = to_pipeline_names(state, self.model.state_dict(), self.model.config.num_layers)
            except KeyError as e:
                raise CheckpointError(f"{origin}: {e.args[0]}") from None
        super().load_checkpoint_state(name, state, origin)

    def load_model_weights(self, full_state, origin):
        if self.model.config.lora_rank > 0:   # a base checkpoint under new adapters: they keep their start (B = 0)
            from ppvilg.models.lora import is_lora
            own = self.model.state_dict()
            missing = [k for k in own if is_lora(k) and k not in full_state]
            full_state = dict(full_state, **{k: own[k].numpy() for k in missing})
        par = self.parallel
        mine = convert.split(full_state, self.model.config.num_layers, par.mp, par.pp, par.mp_rank, par.pp_rank)
        self.load_checkpoint_state("model", mine, origin)

    def pipeline_step(self, batch, optimizer, scaler, step):
        """Forward, backward and the optimizer step of one batch through the pipeline schedule.
        Both directions of each pair travel together: ids / valid [b, 2, S], labels per direction."""
        codes = self.codes_of(batch)
        drop = None
        if self.cfg.Loss.cond_dropout > 0:
            drop = (paddle.rand([len(batch["text"])]) < self.cfg.Loss.cond_dropout).numpy()
        ids1, valid1, lab_img = self.batcher.text_to_image(codes, batch["text"], drop)
        ids2, valid2, lab_txt = self.batcher.image_to_text(codes, batch["text"])
        ids = paddle.to_tensor(np.stack([ids1, ids2], 1))
        valid = paddle.to_tensor(np.stack([valid1, valid2], 1).astype(np.float32))
        data = [(ids, valid), (paddle.to_tensor(lab_img), paddle.to_tensor(lab_txt))]
        loss = self.train_model.train_batch(data, optimizer, None, scaler)
        return float(np.asarray(loss).mean()), {"truncated_texts": self.batcher.truncated}

    def gather_sharded_parameters(self):
        """Sharding stage 3 keeps a slice of each weight per rank; gather them before saving (GPU only)."""
        self.train_model.get_all_parameters()

    def phases(self):
        params = list(self.model.parameters())
        if self.reconstructor is not None:  # one optimizer: the generator and the reconstructor learn jointly
            params += list(self.reconstructor.parameters())
        return {"model": (params, {})}

    def codes_of(self, batch):
        if "codes" in batch:
            codes = batch["codes"]
            codes = codes.numpy() if isinstance(codes, paddle.Tensor) else np.asarray(codes)
            if codes.shape[1:] != (self.model.config.grid, self.model.config.grid):
                raise CheckpointError(f"the data's code grid is {codes.shape[1:]}, the model expects "
                                      f"{self.model.config.grid}x{self.model.config.grid} (Model.grid)")
            if codes.max() >= self.model.config.num_codes:
                raise CheckpointError(f"the data has code {codes.max()}, the model knows "
                                      f"{self.model.config.num_codes} (Model.num_codes)")
            return codes
        with paddle.no_grad():
            return self.image_tokenizer.encode(paddle.to_tensor(batch["image"])).numpy()

    def losses(self, codes, texts, drop=None, images=None, vqa=None):
        """(text->image loss, image->text loss, their label arrays, VQA loss and its label array (None, None
        without VQA), reconstruction loss or None) for one batch; vqa: (rows, questions, answers) from
        PairBatcher.pick_questions (rows with none: no VQA loss); the reconstruction loss needs the real images
        [B, 3, H, W] and Loss.end_to_end. The text slots no row of the batch fills are cut from every sequence
        (trim_text: the same losses, less work) and from the label arrays returned."""
        b = self.batcher
        t = paddle.to_tensor
        e2e = self.reconstructor is not None and images is not None
        seqs = [[], [], [], []]    # ids, valid, layouts, labels of each direction (text slots no row fills cut)

        def add(layout, ids, valid, labels):
            layout, keep, labels = trim_text(layout, valid, labels)
            for part, x in zip(seqs, (t(ids[:, keep]), valid[:, keep], layout, t(labels))):
                part.append(x)
            return labels

        lab_img = add(b.t2i, *b.text_to_image(codes, texts, drop))
        lab_txt = add(b.i2t, *b.image_to_text(codes, texts))
        lab_vqa = None
        if vqa is not None and len(vqa[0]):
            lab_vqa = add(b.vqa_layout, *b.vqa(codes[vqa[0]], vqa[1], vqa[2]))
        (_, l_t2i, *hid), (_, l_i2t, *_), *rest = self.train_model(*seqs, return_hidden=e2e,  # one call: see
                                                                   loss_only=True)                # ViLG.forward
        l_vqa = rest[0][1] if rest else None
        l_rec = None
        if e2e:
            x_hat = self.reconstructor(hid[0], self.model.config.grid)
            diff = x_hat - (images if isinstance(images, paddle.Tensor) else paddle.to_tensor(images))
            l_rec = (diff * diff).mean() if self.cfg.Loss.recon == "l2" else diff.abs().mean()
        return l_t2i, l_i2t, lab_img, lab_txt, l_vqa, lab_vqa, l_rec

    def phase_loss(self, phase, batch, step):
        codes = self.codes_of(batch)
        drop = None
        if self.cfg.Loss.cond_dropout > 0:
            drop = (paddle.rand([len(batch["text"])]) < self.cfg.Loss.cond_dropout).numpy()  # paddle RNG: resumable
        vqa = None
        if self.cfg.Loss.vqa_weight > 0 and step >= self.cfg.Loss.vqa_start and any(batch.get("qa", [])):
            draws = paddle.rand([len(batch["text"]), 2]).numpy()      # paddle RNG: resumable
            vqa = self.batcher.pick_questions(batch["qa"], draws, self.cfg.Loss.vqa_fraction,
                                              self.cfg.Loss.vqa_type_weights)
        l_t2i, l_i2t, _, _, l_vqa, _, l_rec = self.losses(codes, batch["text"], drop, batch.get("image"), vqa)
        loss = self.cfg.Loss.t2i_weight * l_t2i + self.cfg.Loss.i2t_weight * l_i2t
        logs = {"t2i_loss": float(l_t2i), "i2t_loss": float(l_i2t), "truncated_texts": self.batcher.truncated}
        if l_vqa is not None:
            loss = loss + self.cfg.Loss.vqa_weight * l_vqa
            logs["vqa_loss"] = float(l_vqa)
        if l_rec is not None:
            loss = loss + self.cfg.Loss.recon_weight * l_rec
            logs["recon_loss"] = float(l_rec)
        return loss, logs

    @paddle.no_grad()
    def evaluate(self, dataset):
        self.model.eval()
        sums = {"t2i": 0.0, "i2t": 0.0}
        counts = {"t2i": 0, "i2t": 0}
        t2i_targets, i2t_targets = [], []
        for batch in eval_batches(dataset, self.cfg.Eval.batch_size):
            if "codes" not in batch and "image" not in batch:
                continue
            codes = self.codes_of(batch)
            vqa = self.batcher.pick_questions(batch.get("qa", [])) if self.cfg.Loss.vqa_weight > 0 else None
            l_t2i, l_i2t, lab_img, lab_txt, l_vqa, lab_vqa, l_rec = self.losses(
                codes, batch["text"], images=batch.get("image"), vqa=vqa)
            if l_vqa is not None:
                n_ans = int((lab_vqa >= 0).sum())
                sums["vqa"] = sums.get("vqa", 0.0) + float(l_vqa) * n_ans
                counts["vqa"] = counts.get("vqa", 0) + n_ans
            if l_rec is not None:
                sums["recon"] = sums.get("recon", 0.0) + float(l_rec) * len(codes)
                counts["recon"] = counts.get("recon", 0) + len(codes)
            n_img, n_txt = lab_img.size, int((lab_txt >= 0).sum())
            sums["t2i"] += float(l_t2i) * n_img
            sums["i2t"] += float(l_i2t) * n_txt
            counts["t2i"] += n_img
            counts["i2t"] += n_txt
            t2i_targets.append(lab_img.ravel())
            i2t_targets.append(lab_txt.ravel())
        self.model.train()
        if not counts["t2i"]:
            raise RuntimeError("evaluation found no data")
        c = self.model.config
        out = {"t2i_loss": sums["t2i"] / counts["t2i"], "i2t_loss": sums["i2t"] / counts["i2t"],
               "t2i_unigram": unigram_entropy(np.concatenate(t2i_targets), c.num_codes),
               "i2t_unigram": unigram_entropy(np.concatenate(i2t_targets), c.text_vocab_size)}
        if counts.get("recon"):
            out["recon_loss"] = sums["recon"] / counts["recon"]
        if counts.get("vqa"):
            out["vqa_loss"] = sums["vqa"] / counts["vqa"]
        images, texts = self.samples(dataset)
        return out, images, texts

    @paddle.no_grad()
    def samples(self, dataset):
        """What VisualDL shows at each evaluation: images generated from the first Eval.num_visuals prompts of
        the evaluation set (when an image tokenizer is configured to draw them) and the captions of its first
        images, next to the truth. The sampler is the Eval section's (one candidate, its seed): the same
        prompts and settings at every evaluation, so the grids show training progress."""
        n = min(self.cfg.Eval.num_visuals, len(dataset))
        par = self.parallel
        # only where VisualDL is written (rank 0), and not on split weights: tensor-parallel ranks hold part of
        # the text vocabulary and decode in lock-step collectives; sharding stage 3 holds slices of every weight
        if n == 0 or par.rank != 0 or par.mp > 1 or (par.sharding > 1 and par.stage == 3):
            return {}, {}
        from ppvilg.data.images import make_grid, to_uint8_image
        from ppvilg.generation import Generator
        self.model.eval()
        batch = next(eval_batches(dataset, n))
        codes, texts = self.codes_of(batch), batch["text"]
        gen = Generator(self.model, self.text_tokenizer, SamplerSettings.from_mapping(self.cfg.Eval).replace(
            candidates=1))
        caps = gen.image_to_text(codes)
        lines = [f"{k}. truth: {t}  \n   caption: {c['text']}" for k, (t, c) in enumerate(zip(texts, caps))]
        images = {}
        if self.cfg.ImageTokenizer.checkpoint:
            made = gen.text_to_image(texts, truncate=True)[:, 0]
            pixels = self.image_tokenizer.decode_codes(paddle.to_tensor(made)).numpy()
            images["generated_from_eval_prompts"] = make_grid([to_uint8_image(a) for a in pixels], min(8, n))
        self.model.train()
        return images, {"captions_of_eval_images": "\n\n".join(lines),
                        "eval_prompts": "\n\n".join(f"{k}. {t}" for k, t in enumerate(texts))}
