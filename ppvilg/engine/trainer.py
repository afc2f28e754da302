"""The generic trainer shared by every stage.

Per optimizer step: `Train.accum_steps` micro-batches; for each, every phase of the task (e.g. generator then
discriminator) computes its loss under AMP autocast and back-propagates it (scaled for fp16, divided by the
accumulation count); then each phase's optimizer steps (global-norm clipping, loss-scaler update) and its LR
schedule (linear warmup, then cosine or constant) advances. Logs go to stdout (rank 0), a tqdm bar on a
terminal, VisualDL scalars and image grids; evaluation and checkpoints run every N steps and at the end.
Resume restores weights, optimizers, schedules, scalers, RNG states and the data position exactly.
"""
import os
import time

import paddle
from tqdm import tqdm

from ppvilg.data.datasets import build_dataset, check_batch, image_limits, train_loader
from ppvilg import checkpoints as ckpt
from ppvilg.checkpoints import CheckpointError
from ppvilg.config import save_config
from ppvilg.distributed.env import allreduce_mean_gradients
from ppvilg.models.lora import is_lora
from ppvilg.utils.runtime import get_logger, training_kernels


def build_schedule(ocfg, max_steps, lr):
    if ocfg.schedule == "cosine":
        main = paddle.optimizer.lr.CosineAnnealingDecay(lr, T_max=max(1, max_steps - ocfg.warmup_steps),
                                                        eta_min=lr * ocfg.min_lr_ratio)
    else:
        main = lr
    if ocfg.warmup_steps > 0:
        return paddle.optimizer.lr.LinearWarmup(main, ocfg.warmup_steps, 0.0, lr)
    if isinstance(main, float):
        return paddle.optimizer.lr.LambdaDecay(lr, lambda step: 1.0)
    return main


def build_optimizer(ocfg, params, schedule, grad_clip):
    clip = paddle.nn.ClipGradByGlobalNorm(grad_clip) if grad_clip and grad_clip > 0 else None
    b1, b2 = ocfg.betas
    if ocfg.name == "adamw":
        return paddle.optimizer.AdamW(schedule, beta1=b1, beta2=b2, parameters=params,
                                      weight_decay=ocfg.weight_decay, grad_clip=clip)
    if ocfg.name == "sgd":
        return paddle.optimizer.SGD(schedule, parameters=params, weight_decay=ocfg.weight_decay or None,
                                    grad_clip=clip)
    return paddle.optimizer.Adam(schedule, beta1=b1, beta2=b2, parameters=params, grad_clip=clip)


def rename_optimizer_state(state, mapping):
    """Optimizer state dicts are keyed by paddle's run-time parameter names (e.g. 'conv2d_38.w_0_moment1_0'),
    which depend on how many layers a process built before. Checkpoints key them by structured names instead
    ('model.encoder.conv_in.weight_moment1_0'); `mapping` translates one way or the other."""
    olds = sorted(mapping, key=len, reverse=True)
    out = {}
    for k, v in state.items():
        if k == "master_weights":
            out[k] = {mapping.get(n, n): w for n, w in v.items()}
            continue
        for old in olds:
            if k == old or k.startswith(old + "_"):
                k = mapping[old] + k[len(old):]
                break
        out[k] = v
    return out


def select_trainable(params, names, trainable, frozen, log=None):
    """The parameters of a phase that train. Without patterns: `params` as they are (a LoRA model has set
    stop_gradient on its base weights, which then get no gradient). With them: those the model leaves trainable,
    or only those matching `trainable` (globs over structured names, `model.blocks.*.attn.q.weight`) when given -
    with adapters, these train besides them - minus those matching `frozen`; the others get stop_gradient (no
    gradient is computed for them) and stay out of the optimizer. A pattern that matches no parameter, or a
    selection that leaves nothing to train, is an error."""
    import fnmatch
    named = [(names[id(p)], p) for p in params]
    if not trainable and not frozen:   # as the model built them (LoRA: its base weights have stop_gradient)
        if log is not None and any(is_lora(n) for n, _ in named):
            n_train = sum(int(p.size) for _, p in named if not p.stop_gradient)
            log.info(f"fine-tuning the LoRA adapters: {n_train:,} of {sum(int(p.size) for _, p in named):,} "
                     "parameters")
        return params
    for key, globs in (("trainable", trainable), ("frozen", frozen)):
        for g in globs:
            if not any(fnmatch.fnmatchcase(n, g) for n, _ in named):
                raise ValueError(f"Train.{key}: {g!r} matches no parameter (names look like {named[0][0]!r})")
    base = [p for _, p in named if not p.stop_gradient] if not trainable else []
    adapters = [p for n, p in named if is_lora(n)]
    picked = [p for n, p in named if any(fnmatch.fnmatchcase(n, g) for g in trainable)]
    keep = {id(p) for p in base + adapters + picked}
    chosen = [p for n, p in named if id(p) in keep and not any(fnmatch.fnmatchcase(n, g) for g in frozen)]
    ids = {id(p) for p in chosen}
    for _, p in named:
        p.stop_gradient = id(p) not in ids
    if not chosen:
        raise ValueError("Train.trainable / Train.frozen (and LoRA) leave no parameter to train")
    if log is not None:
        total = sum(int(p.size) for _, p in named)
        log.info(f"fine-tuning {sum(int(p.size) for p in chosen):,} of {total:,} parameters "
                 f"({len(chosen)} of {len(named)} tensors)")
    return chosen


class Trainer:
    def __init__(self, cfg, task):
        """task: a ppvilg.engine.task_interface.Task, built with this process's ParallelState (task.parallel)."""
        self.cfg, self.task = cfg, task
        self.log = get_logger()
        self.par = task.parallel
        self.rank, self.world = self.par.rank, self.par.world
        self.pipeline_parallel = self.par.pp > 1   # the pipeline schedule runs forward, backward and the optimizer step
        self.out = cfg.Global.output_dir
        self.ckpt_dir = os.path.join(self.out, "checkpoints")
        amp = cfg.Train.amp
        if amp.enable and paddle.get_device() == "cpu":
            raise RuntimeError("Train.amp.enable=true needs a GPU (CPU has no float16/bfloat16 training "
                               "kernels); set Train.amp.enable=false")
        self.amp_kwargs = dict(enable=amp.enable, dtype=amp.dtype, level=amp.level)
        self.opts, self.scheds, self.scalers = {}, {}, {}
        structured = {id(p): f"{m}.{n}" for m, layer in task.modules().items()
                      for n, p in layer.named_parameters()}
        self.param_names = {}  # phase -> {run-time name: structured name}
        self.phase_params = {}
        self.average_gradients = False   # set by distribute() for data parallel over several phases
        for phase, (params, extra) in task.phases().items():
            params = select_trainable(list(params), structured, cfg.Train.trainable, cfg.Train.frozen, self.log)
            self.phase_params[phase] = params
            self.param_names[phase] = {p.name: structured[id(p)] for p in params}
            lr = cfg.Optimizer.lr * extra.get("lr_scale", 1.0)
            self.scheds[phase] = build_schedule(cfg.Optimizer, cfg.Train.max_steps, lr)
            self.opts[phase] = build_optimizer(cfg.Optimizer, params, self.scheds[phase], cfg.Train.grad_clip)
            self.scalers[phase] = paddle.amp.GradScaler(enable=amp.enable and amp.dtype == "float16",
                                                        init_loss_scaling=amp.init_loss_scaling)
        if cfg.Global.init_weights:
            self.init_weights(cfg.Global.init_weights)
        if amp.enable and amp.level == "O2":
            mods = list(task.modules().values())
            paddle.amp.decorate(models=mods, optimizers=list(self.opts.values()), level="O2", dtype=amp.dtype)
        if self.par.enabled:
            self.distribute()
        self.step = 0
        self.skipped_items = set()   # indices of the training items skipped as unreadable (distinct files)
        self.vdl = None
        self.history = []  # per-step logged values of this process's run

    # ---- parallel layouts ----------------------------------------------------------------------------
    def distribute(self):
        """Wrap the model and its optimizer for the layout of the Distributed section."""
        from paddle.distributed import fleet
        par = self.par
        if len(self.opts) != 1:
            # several phases (stage 1: the generator, then the discriminator, which also runs inside the
            # generator's loss): no wrapper around one model; every rank starts from rank 0's weights and
            # train_step averages each phase's gradients over the data-parallel group before its update
            if par.dp != par.world:
                raise RuntimeError(f"{self.cfg.Global.task}: a task with several optimisation phases trains data "
                                   f"parallel only (dp_degree {par.dp}, world size {par.world})")
            from paddle.distributed.fleet.utils.hybrid_parallel_util import broadcast_dp_parameters
            for layer in self.task.modules().values():
                broadcast_dp_parameters(layer, par.hcg)
            self.average_gradients = True
            return
        phase = next(iter(self.opts))
        if par.sharding > 1 and par.stage > 1:  # GPU only (checked in init_parallel)
            from paddle.distributed.sharding import group_sharded_parallel
            level = "os_g" if par.stage == 2 else "p_g_os"
            model, opt, scaler = group_sharded_parallel(self.task.model, self.opts[phase], level,
                                                        self.scalers[phase], offload=par.offload)
            self.opts[phase], self.scalers[phase] = opt, scaler
        else:
            model = fleet.distributed_model(self.task.model)
            self.opts[phase] = fleet.distributed_optimizer(self.opts[phase])
            if self.scalers[phase]._enable:
                self.scalers[phase] = fleet.distributed_scaler(self.scalers[phase])
        self.task.distribute(model)

    def init_weights(self, path):
        """Model weights from a checkpoint of any parallel layout, cut for this rank; a fresh optimizer."""
        folder = ckpt.resolve_checkpoint(path)
        meta, _ = ckpt.read_meta(folder)
        if meta.get("task") != self.cfg.Global.task:
            raise CheckpointError(f"{folder}: a '{meta.get('task')}' checkpoint cannot initialise a "
                                  f"'{self.cfg.Global.task}' run")
        self.task.load_model_weights(ckpt.read_full_state(folder), folder)
        par = self.par
        self.log.info(f"initialised the model from {folder} (mp={par.mp}, pp={par.pp} slice of rank {par.rank})")

    # ---- state -------------------------------------------------------------------------------------
    def optimizer_states(self):
        return {p: {"optimizer": rename_optimizer_state(self.opts[p].state_dict(), self.param_names[p]),
                    "schedule": self.scheds[p].state_dict(),
                    "scaler": self.scalers[p].state_dict()} for p in self.opts}

    def save(self):
        folder = os.path.join(self.ckpt_dir, f"step_{self.step:08d}")
        state = {"step": self.step, "task": self.cfg.Global.task, "model": self.cfg.Model.name,
                 "skipped_images": len(self.skipped_items), "skipped_items": sorted(self.skipped_items),
                 "world_size": self.world}
        if not self.par.enabled:
            weights = {name: self.task.checkpoint_state(name) for name in self.task.modules()}
            ckpt.save_checkpoint(folder, self.cfg, weights, self.optimizer_states(), state)
            ckpt.mark_latest(self.ckpt_dir, folder, self.cfg.Train.keep_checkpoints)
            self.log.info(f"saved checkpoint {folder}")
            return folder
        return self.save_parallel(folder, dict(state, parallel=self.par.describe()))

    def save_parallel(self, folder, state):
        """Every rank writes its files into one temporary folder (shared storage across nodes), which rank 0
        indexes and renames when all are done: weights once per (mp rank, pp rank), optimizer and RNG state per
        rank."""
        from paddle import distributed as dist
        par, tmp = self.par, folder + ".partial"
        if self.rank == 0:
            ckpt.remove_leftovers(self.ckpt_dir)
            os.makedirs(tmp)
        dist.barrier()
        if par.sharding > 1 and par.stage == 3:
            self.task.gather_sharded_parameters()
        if par.writes_weights:
            for name in self.task.modules():
                ckpt.write_weights(tmp, self.task.checkpoint_state(name), name, par.mp_rank, par.pp_rank, par.mp,
                                   par.pp)
        for phase, st in self.optimizer_states().items():
            ckpt.write_optimizer(tmp, phase, st, self.rank)
        ckpt.write_rng(tmp, self.rank, tracker=True)
        dist.barrier()
        if self.rank == 0:
            ckpt.finish(tmp, self.cfg, state)
            ckpt.publish(tmp, folder)
            ckpt.mark_latest(self.ckpt_dir, folder, self.cfg.Train.keep_checkpoints)
            self.log.info(f"saved checkpoint {folder} ({self.world} ranks)")
        dist.barrier()
        return folder

    def resume(self, path):
        """Restore weights, optimizers, schedules, scalers, RNG states and the step; with 'auto', the newest
        checkpoint whose files all verify (a corrupt newer one is reported and skipped)."""
        if path == "auto":
            folder = self._newest_verified()
            if folder is None:
                self.log.info(f"Global.resume=auto: no checkpoint in {self.ckpt_dir}; starting from step 0")
                return
        else:   # (every file read below is checked against the index as it is read)
            folder = ckpt.resolve_checkpoint(path, self.out)
        meta, _ = ckpt.read_meta(folder)
        if meta.get("task") != self.cfg.Global.task:
            raise CheckpointError(f"{folder}: a '{meta.get('task')}' checkpoint cannot resume a "
                                  f"'{self.cfg.Global.task}' run")
        saved = meta.get("parallel") or {"dp": 1, "mp": 1, "pp": 1, "sharding": 1, "sharding_stage": 1}
        if self.par.enabled and saved != self.par.describe() or not self.par.enabled and meta.get("parallel"):
            raise CheckpointError(f"{folder}: written with the layout {saved}, this run has {self.par.describe()}; "
                                  "resume with the same layout, or convert the weights (tools/convert_checkpoint.py) "
                                  "and start from them with -o Global.init_weights=... (a fresh optimizer)")
        par = self.par
        for name in self.task.modules():
            state = ckpt.read_weights(folder, name, par.mp_rank, par.pp_rank, par.mp, par.pp)
            origin = os.path.join(folder, ckpt.weight_file(name, par.mp_rank, par.pp_rank, par.mp, par.pp))
            self.task.load_checkpoint_state(name, state, origin)
        rank = self.rank if par.enabled else None
        for phase in self.opts:
            st = ckpt.read_optimizer(folder, phase, rank)
            back = {v: k for k, v in self.param_names[phase].items()}
            self.opts[phase].set_state_dict(rename_optimizer_state(st["optimizer"], back))
            self.scheds[phase].set_state_dict(st["schedule"])
            self.scalers[phase].load_state_dict(st["scaler"])
        ckpt.restore_rng(folder, rank)
        self.step = meta["step"]
        self.skipped_items = set(meta.get("skipped_items", []))
        self.log.info(f"resumed from {folder} at step {self.step}")

    def _newest_verified(self):
        latest = os.path.join(self.ckpt_dir, "latest")
        if not os.path.isfile(latest):
            return None
        for folder in ckpt.checkpoints_newest_first(self.ckpt_dir):
            try:
                ckpt.verify(folder)
                return folder
            except CheckpointError as e:
                self.log.warning(f"Global.resume=auto: skipping {folder}: {e}")
        raise CheckpointError(f"Global.resume=auto: no checkpoint in {self.ckpt_dir} verifies")

    # ---- logging -----------------------------------------------------------------------------------
    def _vdl(self):
        if self.vdl is None and self.rank == 0 and self.cfg.Train.vdl:
            from visualdl import LogWriter
            self.vdl = LogWriter(logdir=os.path.join(self.out, "vdl"))
        return self.vdl

    def log_scalars(self, prefix, values):
        w = self._vdl()
        if w is not None:
            for k, v in values.items():
                w.add_scalar(f"{prefix}/{k}", float(v), self.step)

    def evaluate(self, dataset):
        if self.pipeline_parallel:
            self.log.info(f"step {self.step}: no evaluation under pipeline parallel; merge a checkpoint with "
                          "tools/convert_checkpoint.py and run tools/eval.py on it")
            return {}
        t0 = time.time()
        self.task.eval()
        metrics, images, texts = self.task.evaluate(dataset)
        self.task.train()
        self.log.info(f"eval @ step {self.step}: " + ", ".join(f"{k}={v:.4g}" for k, v in metrics.items())
                      + f" ({time.time() - t0:.1f}s)")
        self.log_scalars("eval", metrics)
        w = self._vdl()
        if w is not None:
            for k, img in images.items():
                w.add_image(f"eval/{k}", img, self.step, dataformats="HWC")
            for k, text in texts.items():
                w.add_text(f"eval/{k}", text, self.step)
        return metrics

    # ---- loop --------------------------------------------------------------------------------------
    def fit(self):
        cfg, tc = self.cfg, self.cfg.Train
        os.makedirs(self.out, exist_ok=True)
        if self.rank == 0:
            save_config(cfg, os.path.join(self.out, "config.yaml"))
        if cfg.Global.resume:
            self.resume(cfg.Global.resume)
        train_set = build_dataset(cfg.Data.train, cfg.Data.image_size, **image_limits(cfg.Data))
        eval_set = build_dataset(cfg.Data.eval, cfg.Data.image_size, **image_limits(cfg.Data))
        for name, ds in (("train", train_set), ("eval", eval_set)):
            if ds.bad_lines:
                self.log.warning(f"Data.{name}: {len(ds.bad_lines)} manifest lines skipped, e.g. {ds.bad_lines[0]}")
        par = self.par
        if self.pipeline_parallel:  # a step's whole batch per call; the pipeline cuts it into accum_steps micro-batches
            loader = train_loader(train_set, tc.batch_size, cfg.Global.seed, self.step, cfg.Data.num_workers,
                                  par.data_rank, par.data_world)
        else:
            loader = train_loader(train_set, tc.micro_batch_size, cfg.Global.seed, self.step * tc.accum_steps,
                                  cfg.Data.num_workers, par.data_rank, par.data_world)
        batches = iter(loader)
        self.log.info(f"training {cfg.Global.task}: {sum(p.size for p in self.task.model.parameters()):,} "
                      f"model parameters, {len(train_set)} train / {len(eval_set)} eval pairs, "
                      f"steps {self.step} -> {tc.max_steps}, batch {tc.batch_size} "
                      f"({tc.accum_steps} x {tc.micro_batch_size}), device {paddle.get_device()}"
                      + (f", {self.world} processes {par.describe()}" if par.enabled else ""))
        self.task.train()
        bar = tqdm(total=tc.max_steps, initial=self.step, disable=None if self.rank == 0 else True,
                   dynamic_ncols=True, mininterval=2.0)
        t_last, n_last, metrics = time.time(), 0, {}
        while self.step < tc.max_steps:
            with training_kernels():   # restored for evaluation: decoding is faster with Paddle's defaults
                logs = self.train_step(batches)
            self.step += 1
            n_last += logs.pop("_samples")
            self.history.append(dict(logs, step=self.step))
            bar.update(1)
            if self.step % tc.log_every == 0 or self.step == tc.max_steps:
                dt = time.time() - t_last
                # pairs of the whole step per second: every data-parallel rank trains as many as this one
                logs["samples_per_s"] = n_last * self.par.data_world / max(dt, 1e-9)
                logs["lr"] = self.scheds[next(iter(self.scheds))].last_lr
                t_last, n_last = time.time(), 0
                bar.set_postfix({k: f"{v:.3g}" for k, v in logs.items() if k in ("loss", "samples_per_s")})
                self.log.info(f"step {self.step}/{tc.max_steps} " + " ".join(f"{k}={v:.4g}" for k, v in logs.items()))
                self.log_scalars("train", logs)
            last = self.step == tc.max_steps
            if last or (tc.eval_every and self.step % tc.eval_every == 0):
                metrics = self.evaluate(eval_set)
            if last or (tc.save_every and self.step % tc.save_every == 0):
                self.save()
        bar.close()
        if self.vdl is not None:
            self.vdl.close()
        return metrics

    def train_step(self, batches):
        if self.pipeline_parallel:
            return self.pipeline_step(check_batch(next(batches)))
        tc = self.cfg.Train
        sums, used, n_samples = {}, set(), 0
        for _ in range(tc.accum_steps):
            batch = self.note_skipped(check_batch(next(batches)))
            if not batch["text"]:  # every item of this micro-batch was skipped
                continue
            n_samples += len(batch["text"])
            for phase in self.opts:
                with paddle.amp.auto_cast(**self.amp_kwargs):
                    loss, logs = self.task.phase_loss(phase, batch, self.step)
                if loss is None:
                    continue
                used.add(phase)
                self.scalers[phase].scale(loss / tc.accum_steps).backward()
                logs[f"{phase}_loss"] = float(loss)
                for k, v in logs.items():
                    sums[k] = sums.get(k, 0.0) + v / tc.accum_steps
        if self.average_gradients:   # (the same phases are used on every rank: they depend on the step only)
            for phase in self.opts:
                if phase in used:
                    allreduce_mean_gradients(self.phase_params[phase], self.par.hcg.get_data_parallel_group())
        for phase in self.opts:
            if phase in used:
                self.scalers[phase].step(self.opts[phase])
                self.scalers[phase].update()
            self.opts[phase].clear_grad()
            self.scheds[phase].step()
        first = next(iter(self.opts))
        if f"{first}_loss" in sums:
            sums["loss"] = sums[f"{first}_loss"]
        sums["skipped_images"] = len(self.skipped_items)
        sums["_samples"] = n_samples
        return sums

    def note_skipped(self, batch):
        """Count and report unreadable images once per file (the same file comes back every epoch)."""
        for i, msg in zip(batch["skipped_index"], batch["skipped"]):
            if i not in self.skipped_items:
                self.skipped_items.add(i)
                self.log.warning(f"skipped image: {msg} ({len(self.skipped_items)} distinct images skipped so far)")
        return batch

    def pipeline_step(self, batch):
        """One optimizer step through the pipeline schedule (1F1B over Train.accum_steps micro-batches)."""
        if batch["skipped"]:
            raise RuntimeError(f"unreadable data under pipeline parallel (every stage needs the same batch): "
                               f"{batch['skipped'][0]}")
        phase = next(iter(self.opts))
        scaler = self.scalers[phase] if self.scalers[phase]._enable else None
        with paddle.amp.auto_cast(**self.amp_kwargs):
            loss, logs = self.task.pipeline_step(batch, self.opts[phase], scaler, self.step)
        self.scheds[phase].step()
        return dict(logs, loss=loss, **{f"{phase}_loss": loss}, skipped_images=len(self.skipped_items),
                    _samples=len(batch["text"]))
