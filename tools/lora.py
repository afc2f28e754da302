"""LoRA adapters of a stage-2 checkpoint (trained with -o Model.lora_rank=R; see ppvilg/models/lora.py):

  # the adapters on their own (a small safetensors file with rank, alpha and targets in its metadata)
  python tools/lora.py extract output/demo/finetune_lora --out output/demo/diamond.lora.safetensors
  # fold them into plain weights: a checkpoint without adapters, for tools/export_model.py and deploy
  python tools/lora.py merge output/demo/finetune_lora --out output/demo/finetune_merged
  # a base checkpoint + an adapter file -> the merged checkpoint
  python tools/lora.py apply output/demo/vilg output/demo/diamond.lora.safetensors --out output/demo/finetune_merged

A checkpoint argument is a checkpoint folder or a run folder (its newest checkpoint). Written atomically.
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ppvilg.utils.runtime import setup_device  # noqa: E402  (sets up warnings first)
import ppvilg.engine.tasks  # noqa: E402,F401  (registers the tasks whose configs checkpoints hold)
from ppvilg import checkpoints as ckpt  # noqa: E402
from ppvilg.checkpoints import CheckpointError  # noqa: E402
from ppvilg.models.lora import lora_state, merge_lora  # noqa: E402

INFO_KEYS = ("lora_rank", "lora_alpha", "lora_targets")
SIZE_KEYS = ("num_layers", "hidden_size", "num_heads", "ffn_mult", "text_vocab_size", "max_text_len", "num_codes",
             "grid")


def _source(path):
    folder = ckpt.resolve_checkpoint(path)
    meta, cfg = ckpt.read_meta(folder)
    if meta.get("task") != "vilg":
        raise CheckpointError(f"{folder}: a '{meta.get('task')}' checkpoint; adapters belong to stage-2 (vilg) ones")
    return folder, meta, cfg


def _write_plain(dst, folder, meta, cfg, model_state, note):
    """A checkpoint at `dst`: `cfg` with Model.lora_rank 0, `model_state`, the source's other modules copied."""
    return ckpt.write_derived(dst, folder, cfg, {"Model": {"lora_rank": 0}}, model_state,
                              {"step": meta.get("step"), "task": "vilg", "model": "vilg", **note})


def extract(a):
    folder, meta, cfg = _source(a.checkpoint)
    if cfg.Model.lora_rank < 1:
        raise CheckpointError(f"{folder}: trained without adapters (Model.lora_rank is 0)")
    tensors = lora_state(ckpt.read_full_state(folder))
    info = {k: cfg.Model[k] for k in INFO_KEYS} | {"base": {k: cfg.Model[k] for k in SIZE_KEYS},
                                                    "from": os.path.abspath(folder), "step": meta.get("step")}
    ckpt.write_adapter(a.out, tensors, info)
    return {"adapter": os.path.abspath(a.out), "tensors": len(tensors),
            "parameters": int(sum(v.size for v in tensors.values())), "rank": cfg.Model.lora_rank}


def merge(a):
    folder, meta, cfg = _source(a.checkpoint)
    if cfg.Model.lora_rank < 1:
        raise CheckpointError(f"{folder}: trained without adapters (Model.lora_rank is 0): nothing to merge")
    state = ckpt.read_full_state(folder)
    merged = merge_lora(state, cfg.Model.lora_rank, cfg.Model.lora_alpha)
    _write_plain(a.out, folder, meta, cfg, merged, {"merged_from": os.path.abspath(folder)})
    return {"merged": os.path.abspath(a.out), "adapters": len(state) - len(merged)}


def apply(a):
    folder, meta, cfg = _source(a.checkpoint)
    if cfg.Model.lora_rank > 0:
        raise CheckpointError(f"{folder}: already has adapters; merge it first")
    tensors, info = ckpt.read_adapter(a.adapter)
    mismatch = {k: (v, cfg.Model[k]) for k, v in info.get("base", {}).items() if cfg.Model.get(k) != v}
    if mismatch:
        raise CheckpointError(f"{a.adapter}: made for another model ({', '.join(f'{k} {v[0]} here {v[1]}' for k, v in mismatch.items())})")
    state = ckpt.read_full_state(folder)
    for k, v in tensors.items():
        base = k.rsplit(".", 1)[0] + ".weight"
        if base not in state:
            raise CheckpointError(f"{a.adapter}: {k} adapts {base}, which {folder} does not have")
        want = (state[base].shape[0], info["lora_rank"]) if k.endswith("lora_A") else (info["lora_rank"], state[base].shape[1])
        if tuple(v.shape) != want:
            raise CheckpointError(f"{a.adapter}: {k} has shape {tuple(v.shape)}, expected {want}")
    merged = merge_lora({**state, **tensors}, info["lora_rank"], info["lora_alpha"])
    _write_plain(a.out, folder, meta, cfg, merged, {"merged_from": os.path.abspath(folder),
                                                   "adapter": os.path.abspath(a.adapter)})
    return {"merged": os.path.abspath(a.out), "adapters": len(tensors)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    e = sub.add_parser("extract", help="write the adapters of a LoRA checkpoint on their own")
    e.add_argument("checkpoint")
    e.add_argument("--out", required=True, help="the adapter file to write (.safetensors)")
    m = sub.add_parser("merge", help="fold a LoRA checkpoint's adapters into plain weights")
    m.add_argument("checkpoint")
    m.add_argument("--out", required=True, help="the checkpoint folder to write")
    ap = sub.add_parser("apply", help="merge an adapter file into a base checkpoint")
    ap.add_argument("checkpoint")
    ap.add_argument("adapter")
    ap.add_argument("--out", required=True, help="the checkpoint folder to write")
    a = p.parse_args(argv)
    setup_device("cpu", 1)
    try:
        result = {"extract": extract, "merge": merge, "apply": apply}[a.command](a)
    except (CheckpointError, FileNotFoundError) as e:
        sys.exit(f"lora: {e}")
    print(json.dumps(result, ensure_ascii=False))


if __name__ == "__main__":
    main()
