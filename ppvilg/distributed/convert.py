"""Model weights across parallel layouts.

A run with tensor parallel degree mp and pipeline degree pp keeps one weight state per (mp rank, pp rank),
keyed by ViLG's parameter names, each with its rank's slice of the tensor-parallel parameters
(ppvilg.models.vilg.MP_SPLIT_AXES) and its stage's layers (ppvilg.models.vilg_pp.stage_of); ppvilg.checkpoints
stores them one file each. `merge` turns any layout into the single-process state; `split` cuts that state for
one rank of another layout; tools/convert_checkpoint.py and Global.init_weights use both.
"""
import numpy as np
import paddle

from ppvilg.models.vilg import mp_split_axis
from ppvilg.models.vilg_pp import stage_of


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
