"""Configuration: YAML files with `_base_` inheritance, `-o a.b.c=value` overrides, one validate/derive step,
then a frozen, attribute-accessible tree that is saved beside every run.

Every key that may appear is known in advance: the generic sections are in `GENERIC_SECTIONS`, the task named
by `Global.task` adds its own sections (for example `Loss`), and `Model.name` picks a dataclass whose fields
(plus `preset`) are the valid `Model` keys. An unknown key is an error that names the nearest valid one.
Override values are parsed with `yaml.safe_load` (never eval): `-o Train.lr=3e-4 -o Data.train.lang=zh`.

This module is a schema and a loader only: it imports no training code. Tasks and models register themselves
(ppvilg.registry: `TASKS` with each task's `config_sections`, `renamed_sections` and `validate_config`;
`MODEL_CONFIGS` with each model's dataclass) when their modules are imported; `import ppvilg.engine.tasks`
registers all of them (the tools do it through ppvilg.utils.cli).
"""
import copy
import dataclasses
import difflib
import os
import warnings

import yaml

from ppvilg.distributed.env import DISTRIBUTED_DEFAULTS, validate_distributed
from ppvilg.registry import MODEL_CONFIGS, TASKS


class ConfigError(ValueError):
    """A configuration problem; the message names the file or option and the key."""


DATASET_DEFAULTS = {
    # shapes | manifest | coco | coco_cn | aic_icc | shards (VQ codes from tools/tokenize_images.py)
    "source": "shapes",
    "path": None,            # manifest (.jsonl/.tsv), COCO / AIC-ICC captions JSON, COCO-CN captions, shard folder
    "image_root": None,      # COCO / COCO-CN / AIC-ICC: folder of the images (COCO default: beside the JSON)
    "translations": None,    # COCO: JSONL {"id": annotation id, "caption": ...} replacing the English captions
    "split_file": None,      # COCO-CN: the list of image ids of a split (e.g. coco-cn_test.txt)
    "questions": None,       # manifest / coco / coco_cn / aic_icc: an FMIQA-format JSON whose questions join the
                             # pairs of the same image (by file name or COCO id): VQA training and evaluation
    "questions_split": None, # its split, when the JSON maps split names to lists
    "split": "train",        # shapes: train | dev | test | heldout (= dev + test; see ppvilg/data/shapes.py)
    "num_samples": 2000,     # shapes: how many pairs
    "lang": "both",          # shapes captions: zh | en | both
    "seed": 0,               # shapes: generator seed
    "limit": None,           # read at most this many pairs (None: all)
    "on_bad_line": "error",  # manifest / benchmark lines that cannot be read: error (stop, naming the line) | skip
    "allow_outside_paths": False,  # manifest image paths outside the manifest's folder: skipped unless true
}

SOURCES = ("shapes", "manifest", "coco", "coco_cn", "aic_icc", "shards")

GENERIC_SECTIONS = {
    "Global": {
        "task": "vqgan",
        "output_dir": "output/run",
        "seed": 42,
        "device": "auto",        # auto | cpu | gpu | gpu:N
        "num_threads": 2,        # CPU threads for paddle's kernels
        "resume": None,          # a checkpoint folder, or 'auto' for the newest in output_dir/checkpoints
        "checkpoint": None,      # the checkpoint folder that eval / tokenize / infer use
        "init_weights": None,    # start training from this checkpoint's model weights (any parallel layout)
    },
    "Data": {
        "image_size": 32,
        "num_workers": 0,
        "max_image_pixels": 89478485,     # larger images (read from the header, never decoded) are skipped
        "max_image_bytes": 268435456,     # larger files are skipped (256 MiB)
        "train": dict(DATASET_DEFAULTS),
        "eval": dict(DATASET_DEFAULTS, split="heldout", num_samples=256),
    },
    "Train": {
        "max_steps": 1000,
        "batch_size": 16,         # global batch per optimizer step
        "accum_steps": 1,         # micro-batches per step; batch_size must divide evenly
        "grad_clip": 1.0,         # global-norm clip; 0 disables
        "log_every": 20,
        "eval_every": 500,        # 0: only at the end
        "save_every": 500,        # 0: only at the end
        "keep_checkpoints": 2,
        "trainable": [],          # fine-tuning: globs over parameter names (model.blocks.*.attn.*); non-empty:
                                  # only these train (with LoRA: these train besides the adapters)
        "frozen": [],             # globs of parameters that never train (applied after `trainable`)
        "vdl": True,              # VisualDL scalars and image grids under output_dir/vdl
        "amp": {"enable": False, "dtype": "float16", "level": "O1", "init_loss_scaling": 32768.0},
    },
    "Distributed": dict(DISTRIBUTED_DEFAULTS),  # see ppvilg/distributed/env.py
    "Optimizer": {
        "name": "adamw",          # adamw | adam | sgd (plain, no momentum)
        "lr": 2.0e-4,
        "betas": [0.9, 0.99],
        "weight_decay": 0.0,
        "warmup_steps": 0,
        "schedule": "cosine",     # cosine | constant
        "min_lr_ratio": 0.1,
    },
}


class Config(dict):
    """A nested dict with attribute access; frozen after `load_config` returns it."""

    _frozen = False

    def __getattr__(self, key):
        try:
            return self[key]
        except KeyError:
            raise AttributeError(f"config has no key '{key}'") from None

    def __setattr__(self, key, value):
        self[key] = value

    def __setitem__(self, key, value):
        if self._frozen:
            raise ConfigError(f"the config is frozen; cannot set '{key}' (use -o on the command line)")
        super().__setitem__(key, value)

    def freeze(self):
        for v in self.values():
            if isinstance(v, Config):
                v.freeze()
        object.__setattr__(self, "_frozen", True)
        return self

    def to_dict(self):
        return {k: (v.to_dict() if isinstance(v, Config) else copy.deepcopy(v)) for k, v in self.items()}


def to_config(d):
    """A nested dict as an (unfrozen) Config tree."""
    return Config({k: to_config(v) if isinstance(v, dict) else v for k, v in d.items()})


def _deep_merge(base, over):
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def _read_yaml(path, chain=()):
    path = os.path.abspath(path)
    if path in chain:
        raise ConfigError(f"{path}: _base_ cycle: {' -> '.join(chain + (path,))}")
    if not os.path.isfile(path):
        where = f" (a _base_ of {chain[-1]})" if chain else ""
        raise ConfigError(f"config file not found: {path}{where}")
    with open(path, encoding="utf-8") as f:
        try:
            data = yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level, got {type(data).__name__}")
    bases = data.pop("_base_", [])
    bases = [bases] if isinstance(bases, str) else bases
    merged = {}
    for b in bases:
        merged = _deep_merge(merged, _read_yaml(os.path.join(os.path.dirname(path), b), chain + (path,)))
    return _deep_merge(merged, data)


def parse_override(text):
    """'a.b.c=value' -> (['a','b','c'], value parsed by yaml.safe_load)."""
    if "=" not in text:
        raise ConfigError(f"-o {text}: expected KEY=VALUE, e.g. -o Train.max_steps=100")
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"-o {text}: empty part in key '{key}'")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        raise ConfigError(f"-o {text}: value is not valid YAML: {e}") from None
    return parts, value


def _set_path(tree, parts, value):
    node = tree
    for p in parts[:-1]:
        if not isinstance(node.get(p), dict):
            node[p] = {}
        node = node[p]
    node[parts[-1]] = value


def _unknown(key_path, valid, origin):
    name = key_path.rsplit(".", 1)[-1]
    prefix = key_path.rsplit(".", 1)[0] + "." if "." in key_path else ""
    near = difflib.get_close_matches(name, list(valid), n=1, cutoff=0.4)
    hint = f"; did you mean '{prefix}{near[0]}'?" if near else ""
    choices = ", ".join(sorted(valid))
    return ConfigError(f"{origin}: unknown config key '{key_path}'{hint} (valid keys here: {choices})")


def _check_type(key_path, default, value, origin):
    if default is None or value is None:
        return value
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, float):
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, (list, tuple)):
        ok = isinstance(value, (list, tuple))
        value = list(value) if ok else value
    else:
        ok = isinstance(value, type(default))
    if not ok:
        raise ConfigError(f"{origin}: '{key_path}' expects {type(default).__name__} (like {default!r}), "
                          f"got {type(value).__name__} {value!r}")
    return value


def _merge_checked(defaults, user, path, origin):
    """Defaults updated by user values; every user key must exist in defaults."""
    out = copy.deepcopy(defaults)
    for k, v in user.items():
        kp = f"{path}.{k}" if path else k
        if k not in defaults:
            raise _unknown(kp, defaults, origin)
        if isinstance(defaults[k], dict):
            if not isinstance(v, dict):
                raise ConfigError(f"{origin}: '{kp}' is a section; expected a mapping, got {v!r}")
            out[k] = _merge_checked(defaults[k], v, kp, origin)
        else:
            out[k] = _check_type(kp, defaults[k], v, origin)
    return out


def model_defaults(model_section, origin):
    """The full Model section for a (partial) user Model section: dataclass defaults, then the preset."""
    name = model_section.get("name")
    if name is None:
        raise ConfigError(f"{origin}: 'Model.name' is required (one of: {', '.join(MODEL_CONFIGS.names())})")
    try:
        cls = MODEL_CONFIGS.get(name)
    except KeyError as e:
        raise ConfigError(f"{origin}: Model.name: {e.args[0]}") from None
    base = dataclasses.asdict(cls())
    preset = model_section.get("preset")
    if preset is not None:
        if preset not in cls.PRESETS:
            raise ConfigError(f"{origin}: Model.preset '{preset}' is not a preset of {name} "
                              f"(presets: {', '.join(cls.PRESETS)})")
        base.update(cls.PRESETS[preset])
    return dict({"name": name, "preset": None}, **base)


def _origin(path, overrides):
    return f"{path}" + (f" with -o {' -o '.join(overrides)}" if overrides else "")


def load_config(path, overrides=()):
    """Read `path` (+ its `_base_` files), apply `-o` overrides, validate, derive, freeze."""
    raw = _read_yaml(path)
    for text in overrides:
        parts, value = parse_override(text)
        _set_path(raw, parts, value)
    origin = _origin(path, overrides)
    task_name = raw.get("Global", {}).get("task", GENERIC_SECTIONS["Global"]["task"])
    task_cls = registered_task(task_name, origin)
    _rename_sections(raw, task_cls.renamed_sections, origin)
    sections = dict(GENERIC_SECTIONS, **copy.deepcopy(task_cls.config_sections))
    model_user = raw.get("Model") or {}
    if not isinstance(model_user, dict):
        raise ConfigError(f"{origin}: 'Model' must be a mapping")
    sections["Model"] = model_defaults(model_user, origin)
    for k in raw:
        if k not in sections:
            raise _unknown(k, sections, origin)
    tree = _merge_checked(sections, raw, "", origin)
    cfg = to_config(tree)
    validate_and_derive(cfg, origin)
    task_cls.validate_config(cfg, origin)
    return cfg.freeze()


def registered_task(name, origin):
    """The task class registered as `name` (ppvilg.registry.TASKS), or a ConfigError saying what is known."""
    if not TASKS.names():
        raise ConfigError(f"{origin}: Global.task {name!r}: no task is registered in this process; import "
                          "ppvilg.engine.tasks first (the tools do)")
    try:
        return TASKS.get(name)
    except KeyError as e:
        raise ConfigError(f"{origin}: Global.task: {e.args[0]}") from None


def _rename_sections(raw, renamed, origin):
    """Sections renamed in this release: the old name still works, with a deprecation message."""
    for old, new in renamed.items():
        if old not in raw:
            continue
        if new in raw:
            raise ConfigError(f"{origin}: both '{old}' and its new name '{new}' are given; keep '{new}' only")
        warnings.warn(f"{origin}: the config section '{old}' is now '{new}'; the old name is accepted "
                      "in this release only", FutureWarning, stacklevel=3)
        raw[new] = raw.pop(old)


# the built-in shapes splits (ppvilg.data.shapes.SPLITS, which tests/test_config.py checks this against)
SHAPES_SPLITS = ("train", "heldout", "dev", "test", "novel_train", "novel_test")
POSITIVE = 1e-30   # as the lowest allowed value: "> 0"

# (key, lowest allowed, highest allowed or None, what 0 means where 0 is allowed)
NUMBER_RANGES = (
    ("Global.num_threads", 0, None, "paddle's default"),
    ("Data.image_size", 1, None, None),
    ("Data.num_workers", 0, None, "read in the main process"),
    ("Data.max_image_pixels", 1, None, None),
    ("Data.max_image_bytes", 1, None, None),
    ("Train.max_steps", 1, None, None),
    ("Train.batch_size", 1, None, None),
    ("Train.accum_steps", 1, None, None),
    ("Train.grad_clip", 0, None, "no clipping"),
    ("Train.log_every", 1, None, None),
    ("Train.eval_every", 0, None, "only at the end"),
    ("Train.save_every", 0, None, "only at the end"),
    ("Train.keep_checkpoints", 0, None, "keep all"),
    ("Train.amp.init_loss_scaling", POSITIVE, None, None),
    ("Optimizer.lr", POSITIVE, None, None),
    ("Optimizer.weight_decay", 0, None, "none"),
    ("Optimizer.warmup_steps", 0, None, "no warmup"),
    ("Optimizer.min_lr_ratio", 0, 1, "decay to 0"),
)


def _get(cfg, key):
    node = cfg
    for part in key.split("."):
        node = node[part]
    return node


def check_range(value, key, lo, hi=None, zero=None, origin=""):
    """A ConfigError unless lo <= value (<= hi); `zero` says what 0 means where it is allowed."""
    if value is None or (lo <= value and (hi is None or value <= hi)):
        return
    if lo == POSITIVE:
        want = "> 0"
    elif hi is None:
        want = f">= {lo}" + (f" (0: {zero})" if zero else "")
    else:
        want = f"in [{lo}, {hi}]"
    raise ConfigError(f"{origin}: '{key}' must be {want}, got {value!r}")


def validate_and_derive(cfg, origin):
    for key, lo, hi, zero in NUMBER_RANGES:
        check_range(_get(cfg, key), key, lo, hi, zero, origin)
    for split in ("train", "eval"):
        check_range(cfg.Data[split].num_samples, f"Data.{split}.num_samples", 1, origin=origin)
        check_range(cfg.Data[split].limit, f"Data.{split}.limit", 1, origin=origin)
    for k, b in enumerate(cfg.Optimizer.betas):
        if not (isinstance(b, (int, float)) and 0 <= b < 1):
            raise ConfigError(f"{origin}: 'Optimizer.betas[{k}]' must be in [0, 1), got {b!r}")
    for key, value in cfg.Model.items():   # model sizes: counts are >= 1, rates and weights >= 0
        if isinstance(value, bool) or key in ("name", "preset"):
            continue
        if isinstance(value, int):
            zero = {"lora_rank": "no adapters"}.get(key)   # counts where 0 means "none"
            check_range(value, f"Model.{key}", 0 if zero else 1, zero=zero, origin=origin)
        elif isinstance(value, float):
            check_range(value, f"Model.{key}", 0, origin=origin)
    t = cfg.Train
    if t.batch_size % t.accum_steps:
        raise ConfigError(f"{origin}: Train.batch_size ({t.batch_size}) must be a multiple of "
                          f"Train.accum_steps ({t.accum_steps})")
    t.micro_batch_size = t.batch_size // t.accum_steps   # over all data-parallel ranks
    validate_distributed(cfg, origin, ConfigError)        # + Train.rank_batch_size: on one rank
    if t.amp.dtype not in ("float16", "bfloat16"):
        raise ConfigError(f"{origin}: Train.amp.dtype must be float16 or bfloat16, got {t.amp.dtype!r}")
    if t.amp.level not in ("O1", "O2"):
        raise ConfigError(f"{origin}: Train.amp.level must be O1 or O2, got {t.amp.level!r}")
    o = cfg.Optimizer
    if o.name not in ("adamw", "adam", "sgd"):
        raise ConfigError(f"{origin}: Optimizer.name must be adamw, adam or sgd, got {o.name!r}")
    if o.schedule not in ("cosine", "constant"):
        raise ConfigError(f"{origin}: Optimizer.schedule must be cosine or constant, got {o.schedule!r}")
    if len(o.betas) != 2:
        raise ConfigError(f"{origin}: Optimizer.betas must have two values, got {o.betas!r}")
    for split in ("train", "eval"):
        d = cfg.Data[split]
        if d.source not in SOURCES:
            raise ConfigError(f"{origin}: Data.{split}.source must be one of {', '.join(SOURCES)}, got {d.source!r}")
        if d.source in ("coco_cn", "aic_icc") and not d.image_root:
            raise ConfigError(f"{origin}: Data.{split}.image_root is required for source '{d.source}'")
        if d.source != "shapes" and not d.path:
            raise ConfigError(f"{origin}: Data.{split}.path is required for source '{d.source}'")
        if d.source == "shapes" and d.split not in SHAPES_SPLITS:
            raise ConfigError(f"{origin}: Data.{split}.split must be one of {', '.join(SHAPES_SPLITS)} for shapes, "
                              f"got {d.split!r}")
        if d.lang not in ("zh", "en", "both"):
            raise ConfigError(f"{origin}: Data.{split}.lang must be zh, en or both, got {d.lang!r}")
        if d.on_bad_line not in ("error", "skip"):
            raise ConfigError(f"{origin}: Data.{split}.on_bad_line must be error or skip, got {d.on_bad_line!r}")
        if d.questions and d.source in ("shapes", "shards"):
            raise ConfigError(f"{origin}: Data.{split}.questions joins questions to caption pairs of a manifest, coco, "
                              f"coco_cn or aic_icc source, not {d.source} (shapes has its own; shards carry theirs)")
    g = cfg.Global
    if not (g.device in ("auto", "cpu", "gpu") or g.device.startswith("gpu:")):
        raise ConfigError(f"{origin}: Global.device must be auto, cpu, gpu or gpu:N, got {g.device!r}")


def save_config(cfg, path):
    """Write the resolved config as YAML (atomically)."""
    from ppvilg.utils.io import atomic_write_text
    atomic_write_text(path, yaml.safe_dump(cfg.to_dict(), allow_unicode=True, sort_keys=False))


def load_resolved(path):
    """Read a config written by save_config (a checkpoint's config.yaml), frozen, without re-deriving."""
    with open(path, encoding="utf-8") as f:
        return parse_resolved(f.read(), path)


def parse_resolved(text, origin):
    """A resolved config from its YAML text (yaml.safe_load), frozen; sections renamed since it was written get
    their new names (when its task is registered)."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{origin}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{origin}: expected a mapping of sections, got {type(data).__name__}")
    task = (data.get("Global") or {}).get("task")
    if task in TASKS:
        for old, new in TASKS.get(task).renamed_sections.items():
            if old in data and new not in data:
                data[new] = data.pop(old)
    return to_config(data).freeze()
