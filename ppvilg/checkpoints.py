"""Checkpoint folders: the one module that reads and writes them (training, resume, parallel ranks, layout
conversion, inference). Nothing in a checkpoint can run code when it is read, and every file is verified:

    step_00000100/
      model.safetensors          the main model's weights (what infer / eval / export load); a run with tensor /
                                 pipeline parallel degree mp / pp writes model.mp{m:02d}.pp{p:02d}.safetensors
      <name>.safetensors         other trained modules (disc: the GAN discriminator, reconstructor: end to end)
      <phase>.opt.safetensors    each optimisation phase's optimizer tensors (moments, master weights ...)
      <phase>.opt.json           the rest of its state: LR schedule, loss scaler, scalars ([*.rank{r:03d}.opt.*]
                                 per rank in parallel runs)
      rng.json                   python / numpy / paddle (+ CUDA, + Fleet's tensor-parallel tracker) RNG states
                                 (rng.rank{r:03d}.json per rank in parallel runs)
      trainer_state.json         step, task, model name, parallel layout, paddle version, counters
      config.yaml                the resolved config of the run
      index.json                 the format and the SHA-256 and size of every other file

Tensors are safetensors, everything else JSON or YAML read with yaml.safe_load: no pickle. Every file is
checked against index.json when it is read; a mismatch, a missing file or a file the index does not list is a
CheckpointError naming the file. A checkpoint is written in a temporary folder (files fsynced), indexed, renamed
into place and the parent folder fsynced; temporary folders that a killed write left behind are removed at the
next save. Checkpoints written by ppvilg 0.1 (pickle: *.pdparams, *.pdopt, rng.pkl) are refused;
`tools/convert_checkpoint.py --legacy-pickle` rewrites one you trust in this format.
"""
import contextlib
import glob
import hashlib
import json
import os
import random
import shutil

import numpy as np
import paddle
import yaml
from safetensors import SafetensorError
from safetensors.numpy import load as st_load, save as st_save

from ppvilg.config import ConfigError, parse_resolved, save_config
import ppvilg.vq.model  # noqa: F401  (registers the image tokenizer's model class; vilg comes with convert)
from ppvilg.distributed import convert
from ppvilg.registry import build_model
from ppvilg.utils.io import AtomicDir, file_digest

FORMAT = "ppvilg-checkpoint/2"
INDEX = "index.json"
LEGACY_HINT = ("it was written by ppvilg 0.1 in pickle format, which can run code when read; if you trust it, "
               "rewrite it with: python tools/convert_checkpoint.py --legacy-pickle --src <it> --dst <new folder>")


class CheckpointError(RuntimeError):
    pass


# ---- file names ---------------------------------------------------------------------------------------------

def weight_file(module="model", mp_rank=0, pp_rank=0, mp=1, pp=1):
    if mp == 1 and pp == 1:
        return f"{module}.safetensors"
    return f"{module}.mp{mp_rank:02d}.pp{pp_rank:02d}.safetensors"


def _rank_suffix(rank):
    return "" if rank is None else f".rank{rank:03d}"


def optimizer_files(phase, rank=None):
    stem = f"{phase}{_rank_suffix(rank)}.opt"
    return stem + ".safetensors", stem + ".json"


def rng_file(rank=None):
    return f"rng{_rank_suffix(rank)}.json"


# ---- low level: bytes, fsync, the index ------------------------------------------------------------------------

def _write(path, data):
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _index(folder):
    path = os.path.join(folder, INDEX)
    if not os.path.isfile(path):
        if glob.glob(os.path.join(folder, "*.pdparams")) or os.path.isfile(os.path.join(folder, "rng.pkl")):
            raise CheckpointError(f"{folder}: not loaded: {LEGACY_HINT}")
        raise CheckpointError(f"{path}: missing (not a complete ppvilg checkpoint)")
    try:
        with open(path, encoding="utf-8") as f:
            index = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not a valid index ({e})") from None
    if not isinstance(index, dict) or index.get("format") != FORMAT or not isinstance(index.get("files"), dict):
        raise CheckpointError(f"{path}: unknown checkpoint index format {index.get('format') if isinstance(index, dict) else index!r}"
                              f" (expected {FORMAT})")
    return index


def read_verified(folder, name):
    """The bytes of file `name` of a checkpoint folder, after checking its size and SHA-256 against index.json."""
    entry = _index(folder)["files"].get(name)
    path = os.path.join(folder, name)
    if entry is None:
        raise CheckpointError(f"{path}: not listed in {os.path.join(folder, INDEX)}")
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: missing (listed in the checkpoint's index)")
    with open(path, "rb") as f:
        data = f.read()
    if len(data) != entry.get("bytes") or hashlib.sha256(data).hexdigest() != entry.get("sha256"):
        raise CheckpointError(f"{path}: SHA-256 / size mismatch with the checkpoint's index (the file is corrupt, "
                              "truncated or was changed after the checkpoint was written)")
    return data


def verify(folder):
    """Check every file of a checkpoint against its index (CheckpointError naming the first bad one)."""
    for name in sorted(_index(folder)["files"]):
        read_verified(folder, name)


def write_index(folder):
    """Index every file in `folder` (a checkpoint being written)."""
    files = {}
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if name == INDEX or not os.path.isfile(path):
            continue
        files[name] = {"sha256": file_digest(path), "bytes": os.path.getsize(path)}
    _write(os.path.join(folder, INDEX), (json.dumps({"format": FORMAT, "files": files}, indent=1) + "\n").encode())


# ---- tensors and nested states ----------------------------------------------------------------------------------

def _numpy(v):
    return v.numpy() if isinstance(v, paddle.Tensor) else np.asarray(v)


def write_tensors(path, tensors):
    """{name: Tensor or ndarray} -> a safetensors file (fsynced)."""
    _write(path, st_save({k: np.ascontiguousarray(_numpy(v)) for k, v in tensors.items()}))


def read_tensors(folder, name):
    """{name: ndarray} of a verified safetensors file (bfloat16 comes back as uint16, as paddle's .numpy() gives
    it; paddle.to_tensor turns it back into bfloat16)."""
    data = read_verified(folder, name)
    try:
        return st_load(data)
    except (SafetensorError, ValueError) as e:
        raise CheckpointError(f"{os.path.join(folder, name)}: not a valid safetensors file ({e})") from None


def split_state(state):
    """A nested state (dicts / lists of tensors, arrays and scalars: optimizer, LR schedule, loss scaler) ->
    (tensors {path: ndarray}, a JSON-able skeleton that names them)."""
    tensors = {}

    def walk(v, path):
        if isinstance(v, paddle.Tensor):
            tensors[path] = v.numpy()
            return {"__tensor__": path}
        if isinstance(v, np.ndarray):
            tensors[path] = v
            return {"__ndarray__": path}
        if isinstance(v, np.generic):
            return v.item()
        if isinstance(v, dict):
            bad = [k for k in v if not isinstance(k, str)]
            if bad:
                raise CheckpointError(f"cannot store the non-string key {bad[0]!r} at '{path}' in a checkpoint")
            return {"__dict__": {k: walk(x, f"{path}/{k}") for k, x in v.items()}}
        if isinstance(v, (list, tuple)):
            return [walk(x, f"{path}/{i}") for i, x in enumerate(v)]
        if v is None or isinstance(v, (bool, int, float, str)):
            return v
        raise CheckpointError(f"cannot store a {type(v).__name__} at '{path}' in a checkpoint")

    return tensors, walk(state, "")


def join_state(tensors, skeleton, origin):
    def walk(v):
        if isinstance(v, dict):
            if "__dict__" in v:
                return {k: walk(x) for k, x in v["__dict__"].items()}
            key = v.get("__tensor__", v.get("__ndarray__"))
            if key not in tensors:
                raise CheckpointError(f"{origin}: names the tensor '{key}', which its tensor file lacks")
            return paddle.to_tensor(tensors[key]) if "__tensor__" in v else tensors[key]
        if isinstance(v, list):
            return [walk(x) for x in v]
        return v

    return walk(skeleton)


def _read_json(folder, name):
    try:
        return json.loads(read_verified(folder, name).decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{os.path.join(folder, name)}: not valid JSON ({e})") from None


# ---- RNG states (JSON) ----------------------------------------------------------------------------------------

def _cuda():
    return paddle.device.is_compiled_with_cuda() and paddle.device.cuda.device_count() > 0


def _generator_state(values):
    cls = type(paddle.get_rng_state()[0])
    state = cls.__new__(cls)
    state.__setstate__(tuple(values))
    return state


def live_rng(tracker=False):
    """This process's RNG states as python / numpy / paddle objects (the form ppvilg 0.1 pickled): python,
    numpy, paddle (and CUDA); with tracker, Fleet's tensor-parallel RNG tracker too."""
    out = {"python": random.getstate(), "numpy": np.random.get_state(), "paddle": paddle.get_rng_state()}
    if _cuda():
        out["cuda"] = paddle.get_cuda_rng_state()
    if tracker:
        from paddle.distributed.fleet.meta_parallel import get_rng_state_tracker
        out["tracker"] = get_rng_state_tracker().get_states_tracker()   # name -> a paddle.get_rng_state() list
    return out


def restore_live_rng(rng):
    """Set the RNG states that live_rng (or rng_from_json) gave."""
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    paddle.set_rng_state(rng["paddle"])
    if "cuda" in rng and _cuda():
        paddle.set_cuda_rng_state(rng["cuda"])
    if "tracker" in rng:
        from paddle.distributed.fleet.meta_parallel import get_rng_state_tracker
        get_rng_state_tracker().set_states_tracker(rng["tracker"])


def rng_to_json(rng):
    """live_rng's objects -> JSON-able data (a GeneratorState as its own state tuple)."""
    version, internal, gauss = rng["python"]
    name, keys, pos, has_gauss, cached = rng["numpy"]
    out = {"python": [version, list(internal), gauss], "numpy": [name, np.asarray(keys).tolist(), pos, has_gauss,
                                                                 cached],
           "paddle": [list(g.__getstate__()) for g in rng["paddle"]]}
    if "cuda" in rng:
        out["cuda"] = [list(g.__getstate__()) for g in rng["cuda"]]
    if "tracker" in rng:
        out["tracker"] = {k: [list(g.__getstate__()) for g in states] for k, states in rng["tracker"].items()}
    return out


def rng_from_json(data):
    """The inverse of rng_to_json."""
    version, internal, gauss = data["python"]
    name, keys, pos, has_gauss, cached = data["numpy"]
    out = {"python": (version, tuple(internal), gauss),
           "numpy": (name, np.asarray(keys, np.uint32), pos, has_gauss, cached),
           "paddle": [_generator_state(g) for g in data["paddle"]]}
    if "cuda" in data:
        out["cuda"] = [_generator_state(g) for g in data["cuda"]]
    if "tracker" in data:
        out["tracker"] = {k: [_generator_state(g) for g in states] for k, states in data["tracker"].items()}
    return out


def rng_state(tracker=False):
    """This process's RNG states as JSON-able data (see live_rng)."""
    return rng_to_json(live_rng(tracker))


def set_rng_state(data):
    restore_live_rng(rng_from_json(data))


@contextlib.contextmanager
def rng_preserved():
    """Run a block (e.g. building a model for evaluation) without changing the python / numpy / paddle (and
    CUDA) random streams that training draws from."""
    saved = live_rng()
    try:
        yield
    finally:
        restore_live_rng(saved)


# ---- writing ------------------------------------------------------------------------------------------------

def remove_leftovers(ckpt_dir):
    """Temporary folders of checkpoint writes that were killed (never complete checkpoints)."""
    for path in glob.glob(os.path.join(ckpt_dir, ".tmp-step_*")) + glob.glob(os.path.join(ckpt_dir, "step_*.partial")):
        shutil.rmtree(path, ignore_errors=True)


def write_weights(folder, state, module="model", mp_rank=0, pp_rank=0, mp=1, pp=1):
    write_tensors(os.path.join(folder, weight_file(module, mp_rank, pp_rank, mp, pp)), state)


def write_optimizer(folder, phase, state, rank=None):
    tensors, skeleton = split_state(state)
    st_name, json_name = optimizer_files(phase, rank)
    write_tensors(os.path.join(folder, st_name), tensors)
    _write(os.path.join(folder, json_name), json.dumps(skeleton).encode())


def write_rng(folder, rank=None, tracker=False):
    _write(os.path.join(folder, rng_file(rank)), json.dumps(rng_state(tracker)).encode())


def finish(folder, cfg, state):
    """Write trainer_state.json, config.yaml and the index of a filled checkpoint folder (not yet in place)."""
    _write(os.path.join(folder, "trainer_state.json"),
           json.dumps(dict(state, paddle_version=paddle.__version__, format=FORMAT), indent=2).encode())
    save_config(cfg, os.path.join(folder, "config.yaml"))
    write_index(folder)


def save_checkpoint(folder, cfg, weights, optimizers, state, rng=True):
    """One process: weights {module: state dict}; optimizers {phase: state}; state: JSON-able trainer state."""
    os.makedirs(os.path.dirname(os.path.abspath(folder)), exist_ok=True)
    remove_leftovers(os.path.dirname(os.path.abspath(folder)))
    with AtomicDir(folder) as tmp:
        for name, sd in weights.items():
            write_weights(tmp, sd, name)
        for phase, st in optimizers.items():
            write_optimizer(tmp, phase, st)
        if rng:
            write_rng(tmp)
        finish(tmp, cfg, state)
    _fsync_dir(os.path.dirname(os.path.abspath(folder)))
    return folder


def publish(tmp, folder):
    """Put a finished temporary checkpoint folder (of a parallel run) in place."""
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
    _fsync_dir(os.path.dirname(os.path.abspath(folder)))


def mark_latest(ckpt_dir, folder, keep):
    from ppvilg.utils.io import atomic_write_text
    atomic_write_text(os.path.join(ckpt_dir, "latest"), os.path.basename(folder) + "\n")
    if keep and keep > 0:
        for old in sorted(glob.glob(os.path.join(ckpt_dir, "step_*")))[:-keep]:
            if not old.endswith(".partial"):
                shutil.rmtree(old, ignore_errors=True)


# ---- reading ------------------------------------------------------------------------------------------------

def is_checkpoint(path):
    return os.path.isfile(os.path.join(path, "trainer_state.json"))


def resolve_checkpoint(path, output_dir=None):
    """A checkpoint folder, a run's checkpoints/ folder or run folder (-> its latest), or 'auto'."""
    if path == "auto":
        path = os.path.join(output_dir, "checkpoints")
    if os.path.isdir(path) and not is_checkpoint(path):
        for cand in (path, os.path.join(path, "checkpoints")):
            latest = os.path.join(cand, "latest")
            if os.path.isfile(latest):
                with open(latest, encoding="utf-8") as f:
                    path = os.path.join(cand, f.read().strip())
                break
    if not is_checkpoint(path):
        raise CheckpointError(f"{path}: not a ppvilg checkpoint folder (no trainer_state.json; expected a "
                              "folder written by tools/train.py, e.g. output/<run>/checkpoints/step_00000100)")
    return path


def checkpoints_newest_first(ckpt_dir):
    return sorted((p for p in glob.glob(os.path.join(ckpt_dir, "step_*")) if is_checkpoint(p)), reverse=True)


def read_meta(folder):
    """(trainer state dict, resolved config) of a checkpoint folder, both verified."""
    meta = _read_json(folder, "trainer_state.json")
    path = os.path.join(folder, "config.yaml")
    try:
        cfg = parse_resolved(read_verified(folder, "config.yaml").decode("utf-8"), path)
    except (ConfigError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: {e}") from None
    return meta, cfg


def read_layout(meta):
    """(mp, pp) of a checkpoint's trainer state (single process if it has no layout)."""
    par = meta.get("parallel") or {}
    return par.get("mp", 1), par.get("pp", 1)


def read_weights(folder, module="model", mp_rank=0, pp_rank=0, mp=1, pp=1):
    return read_tensors(folder, weight_file(module, mp_rank, pp_rank, mp, pp))


def read_full_state(folder, module="model"):
    """The single-process weights of `module` in a checkpoint folder of any layout."""
    meta = _read_json(folder, "trainer_state.json")
    mp, pp = read_layout(meta)
    shards = {(m, p): read_weights(folder, module, m, p, mp, pp) for m in range(mp) for p in range(pp)}
    return convert.merge(shards, mp, pp)


def read_optimizer(folder, phase, rank=None):
    st_name, json_name = optimizer_files(phase, rank)
    return join_state(read_tensors(folder, st_name), _read_json(folder, json_name), os.path.join(folder, json_name))


def restore_rng(folder, rank=None):
    set_rng_state(_read_json(folder, rng_file(rank)))


def read_weights_file(path, what):
    """{name: ndarray} of a standalone safetensors weights file (Loss.perceptual_weights, the FID network);
    `what` names the option in errors. A pickle file (.pdparams) is refused with the way to convert it."""
    if path.endswith((".pdparams", ".pkl", ".pt", ".pth")):
        raise CheckpointError(f"{what}: {path} is a pickle file, which can run code when read; if you trust it, "
                              "convert it once: python tools/convert_checkpoint.py --legacy-pickle --src "
                              f"{path} --dst {os.path.splitext(path)[0]}.safetensors")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what}: no file at {path!r}")
    with open(path, "rb") as f:
        data = f.read()
    try:
        return st_load(data)
    except (SafetensorError, ValueError) as e:
        raise CheckpointError(f"{what}: {path} is not a valid safetensors file ({e})") from None


def write_derived(dst, src, cfg, changes, model_state, state, files=None, copy_modules=("reconstructor",)):
    """A single-process checkpoint at `dst` made from the one at `src` (tools/lora.py, tools/add_tokens.py): `cfg`
    with `changes` ({section: {key: value}}), the model weights `model_state`, the source's `copy_modules` that it
    has copied as they are, extra text `files` ({name: text}) and `state` as its trainer state; written
    atomically."""
    data = cfg.to_dict()
    for section, values in changes.items():
        data[section].update(values)
    new_cfg = parse_resolved(yaml.safe_dump(data, allow_unicode=True), f"{src} (derived)")
    with AtomicDir(dst) as tmp:
        for name, text in (files or {}).items():
            _write(os.path.join(tmp, name), text.encode("utf-8"))
        write_weights(tmp, model_state, "model")
        for m in copy_modules:
            if has_module(src, m):
                write_weights(tmp, read_full_state(src, m), m)
        finish(tmp, new_cfg, state)
    return dst


ADAPTER_FORMAT = "ppvilg-lora/1"


def write_adapter(path, tensors, info):
    """LoRA adapters on their own (tools/lora.py extract): a safetensors file of the `...lora_A` / `...lora_B`
    tensors whose metadata holds the format and `info` (rank, alpha, targets, the base model's sizes) as JSON;
    written atomically."""
    meta = {"format": ADAPTER_FORMAT, "info": json.dumps(info, sort_keys=True)}
    data = st_save({k: np.ascontiguousarray(_numpy(v)) for k, v in tensors.items()}, metadata=meta)
    tmp = path + ".partial"
    _write(tmp, data)
    os.replace(tmp, path)


def read_adapter(path):
    """(tensors, info) of a file from write_adapter; anything else is a CheckpointError naming it."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no adapter file")
    from safetensors import safe_open
    try:
        with safe_open(path, "np") as f:
            meta = f.metadata() or {}
        tensors = read_weights_file(path, "adapter")
    except (SafetensorError, ValueError, OSError) as e:
        raise CheckpointError(f"{path}: not a valid safetensors file ({e})") from None
    if meta.get("format") != ADAPTER_FORMAT:
        raise CheckpointError(f"{path}: not a ppvilg LoRA adapter file (format {meta.get('format')!r}, expected "
                              f"{ADAPTER_FORMAT!r}; write one with tools/lora.py extract)")
    return tensors, json.loads(meta["info"])


def set_state_strict(layer, state, origin):
    """Load `state` into `layer`; a missing or unexpected parameter or a shape mismatch is an error naming
    it and `origin` (the file or folder it came from)."""
    own = layer.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        raise CheckpointError(f"{origin}: parameters do not match the model: missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]}")
    for k, v in own.items():
        if list(v.shape) != list(state[k].shape):
            raise CheckpointError(f"{origin}: '{k}' has shape {list(state[k].shape)}, the model expects "
                                  f"{list(v.shape)}")
    layer.set_state_dict(state)


def load_module(layer, folder, module):
    """Strictly load module `module` of a single-layout checkpoint folder into `layer`."""
    set_state_strict(layer, read_full_state(folder, module), os.path.join(folder, weight_file(module)))


def has_module(folder, module):
    return weight_file(module) in _index(folder)["files"]


# ---- models for inference -------------------------------------------------------------------------------------

def load_model(path, task, output_dir=None):
    """(model in eval mode, the checkpoint's resolved config, its folder) from a checkpoint of `task` (any
    parallel layout: the weights are merged)."""
    folder = resolve_checkpoint(path, output_dir)
    meta, cfg = read_meta(folder)
    if meta.get("task") != task:
        raise CheckpointError(f"{folder}: a '{meta.get('task')}' checkpoint; this needs a '{task}' one")
    model = build_model(cfg.Model)
    set_state_strict(model, read_full_state(folder), folder)
    model.eval()
    return model, cfg, folder


def load_image_tokenizer(path, output_dir=None):
    """(the image tokenizer: a VQGAN in eval mode, its checkpoint's config, the folder) from a stage-1 checkpoint."""
    return load_model(path, "vqgan", output_dir)


def load_matching_image_tokenizer(path, config):
    """The frozen stage-1 image tokenizer at `path` and its config, checked against the transformer config's
    codes / grid."""
    vq, vq_cfg, folder = load_image_tokenizer(path)
    grid = vq_cfg.Data.image_size // vq.config.downsample
    if (vq.config.num_codes, grid) != (config.num_codes, config.grid):
        raise CheckpointError(f"{folder}: the image tokenizer makes {vq.config.num_codes} codes on a {grid}x{grid} "
                              f"grid, the transformer expects Model.num_codes={config.num_codes}, "
                              f"Model.grid={config.grid}")
    return vq, vq_cfg
