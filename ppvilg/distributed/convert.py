"""Model weights across parallel layouts.

A checkpoint written by a run with tensor parallel degree mp and pipeline degree pp holds one weight file per
(mp rank, pp rank): `model.mp{m:02d}.pp{p:02d}.pdparams`, keyed by ViLG's parameter names, each with its
rank's slice of the tensor-parallel parameters (ppvilg.models.vilg.MP_SPLIT_AXES) and its stage's layers
(ppvilg.models.vilg_pp.stage_of). With mp = pp = 1 (any data parallel / sharding degree) it is one
`model.pdparams`. `merge` turns any layout into the single-process state; `split` cuts that state for one rank
of another layout; tools/convert_checkpoint.py and Global.init_weights use both.
"""
import os

import numpy as np
import paddle

from ppvilg.models.vilg import mp_split_axis
from ppvilg.models.vilg_pp import stage_of


def weight_file(mp_rank=0, pp_rank=0, mp=1, pp=1, module="model"):
    if mp == 1 and pp == 1:
        return f"{module}.pdparams"
    return f"{module}.mp{mp_rank:02d}.pp{pp_rank:02d}.pdparams"


def _numpy(v):
    return v.numpy() if isinstance(v, paddle.Tensor) else np.asarray(v)


def split(full, num_layers, mp, pp, mp_rank, pp_rank):
    """The weights of rank (mp_rank, pp_rank) of an mp x pp layout, from a single-process state (of a model
    the layout fits: ppvilg.models.vilg.parallel_layout_errors)."""
    out = {}
    for name, value in full.items():
        if pp > 1 and stage_of(name, num_layers, pp) != pp_rank:
            continue
        value = _numpy(value)
        axis = mp_split_axis(name) if mp > 1 else None
        if axis is not None:
            value = np.split(value, mp, axis=axis)[mp_rank]
        out[name] = value
    return out


def merge(shards, mp, pp):
    """shards: {(mp_rank, pp_rank): state} of a whole layout -> the single-process state."""
    missing = [(m, p) for m in range(mp) for p in range(pp) if (m, p) not in shards]
    if missing:
        raise ValueError(f"weights of ranks (mp, pp) {missing} are missing")
    full = {}
    for p in range(pp):
        names = list(shards[(0, p)])
        for name in names:
            parts = [_numpy(shards[(m, p)][name]) for m in range(mp)]
            axis = mp_split_axis(name) if mp > 1 else None
            full[name] = np.concatenate(parts, axis=axis) if axis is not None else parts[0]
    return full


def read_layout(folder):
    """(mp, pp) of a checkpoint folder, from its trainer_state.json (single process if absent)."""
    import json
    with open(os.path.join(folder, "trainer_state.json"), encoding="utf-8") as f:
        par = json.load(f).get("parallel") or {}
    return par.get("mp", 1), par.get("pp", 1)


def read_full_state(folder, module="model"):
    """The single-process weights of `module` in a checkpoint folder of any layout."""
    mp, pp = read_layout(folder)
    shards = {}
    for m in range(mp):
        for p in range(pp):
            path = os.path.join(folder, weight_file(m, p, mp, pp, module))
            if not os.path.isfile(path):
                raise FileNotFoundError(f"{path}: missing (the checkpoint was written with mp={mp}, pp={pp})")
            shards[(m, p)] = paddle.load(path)
    return merge(shards, mp, pp)
