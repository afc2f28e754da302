"""Low-rank adapters (LoRA, Hu et al. 2021) on the transformer's linear projections, for fine-tuning a trained
model with few trainable parameters: y = x W + b + (dropout(x) A B) * alpha / r, with A [in, r] (random) and
B [r, out] (zeros), so an adapted model starts equal to its base. The base weight and bias keep their names
(`blocks.0.attn.q.weight`) and are frozen; the adapters add `...q.lora_A` and `...q.lora_B`.

Why not paddlenlp.peft: its LoRAModel expects PaddleNLP's pretrained-model classes and config, and saves
adapters with paddle.save (pickle), which ppvilg never reads; the layer itself is a few lines.

`ViLGConfig.lora_rank > 0` builds ViLG with adapters on the projections named by `lora_targets` (globs over the
names inside a block: attn.q, attn.k, attn.v, attn.proj, mlp.0, mlp.2); `merge_lora(state, config)` folds them
into plain weights (tools/lora.py merge) for export and deployment.
"""
import fnmatch
import math

import numpy as np
import paddle
import paddle.nn as nn
import paddle.nn.functional as F

LORA_SUFFIXES = (".lora_A", ".lora_B")


def linear_kind(layer):
    """'plain' for paddle.nn.Linear, 'col' / 'row' for Fleet's tensor-parallel ColumnParallelLinear /
    RowParallelLinear (output / input split), None for any other layer."""
    if isinstance(layer, nn.Linear):
        return "plain"
    if type(layer).__module__.startswith("paddle.distributed"):
        from paddle.distributed.fleet.meta_parallel import ColumnParallelLinear, RowParallelLinear
        if isinstance(layer, ColumnParallelLinear):
            return "col"
        if isinstance(layer, RowParallelLinear):
            return "row"
    return None


class LoRALinear(nn.Layer):
    """A linear layer's weight and bias (the same Parameter objects, frozen, under the same names) plus a rank-r
    adapter. Under tensor parallel (Fleet's ColumnParallelLinear / RowParallelLinear) the adapter is split with
    its layer: for a column-split layer B [r, out / mp] is split and A [in, r] replicated, x A then entering the
    ranks' B through an identity whose backward sums the ranks' gradients; for a row-split layer A [in / mp, r]
    is split and B [r, out] replicated, the ranks' x A summed before B. Every rank then holds the same gradient
    for the replicated factor, and the merged weight W + A B * alpha / r is split as W is."""

    def __init__(self, base, rank, alpha, dropout=0.0):
        super().__init__()
        self.kind = linear_kind(base)
        if self.kind is None:
            raise TypeError(f"LoRA adapts paddle.nn.Linear and Fleet's Column/RowParallelLinear, got "
                            f"{type(base).__name__}")
        self._base = (base,)   # its forward (a tuple: not a sublayer, so the parameters keep their names here)
        self.weight, self.bias = base.weight, base.bias
        self.weight.stop_gradient = True
        if self.bias is not None:
            self.bias.stop_gradient = True
        d_in, d_out = base.weight.shape
        mp = 1 if self.kind == "plain" else base.world_size
        self.group = base.model_parallel_group if mp > 1 else None    # None: no collective in forward
        full_in = d_in * mp if self.kind == "row" else d_in
        self.rank, self.scale = rank, alpha / rank
        self.lora_A = self.create_parameter(
            [d_in, rank], attr=paddle.ParamAttr(initializer=nn.initializer.Uniform(-1 / math.sqrt(full_in),
                                                                                   1 / math.sqrt(full_in))))
        self.lora_B = self.create_parameter([rank, d_out], attr=paddle.ParamAttr(
            initializer=nn.initializer.Constant(0.0)))
        if mp > 1:   # what Fleet's gradient clipping and parameter broadcast read (the other factor: replicated)
            split = self.lora_B if self.kind == "col" else self.lora_A
            split.is_distributed, split.split_axis = True, 1 if self.kind == "col" else 0
        self.dropout = nn.Dropout(dropout) if dropout > 0 else None

    def forward(self, x):
        h = paddle.matmul(x if self.dropout is None else self.dropout(x), self.lora_A)
        if self.group is not None:
            from paddle.distributed.fleet.layers.mpu import mp_ops
            if self.kind == "col":
                h = mp_ops._c_identity(h, group=self.group)
            else:
                h = mp_ops._mp_allreduce(h, group=self.group, use_calc_stream=True, use_model_parallel=True)
        base = F.linear(x, self.weight, self.bias) if self.kind == "plain" else self._base[0](x)
        return base + paddle.matmul(h, self.lora_B) * self.scale


def matches(name, patterns):
    """Whether a block-relative layer name matches one of the comma-separated globs (Model.lora_targets)."""
    return any(fnmatch.fnmatchcase(name, g.strip()) for g in patterns.split(",") if g.strip())


def target_names(block, patterns):
    """The names of a block's linear sublayers (linear_kind) that match the comma-separated globs."""
    return [name for name, layer in block.named_sublayers() if linear_kind(layer) and matches(name, patterns)]


def add_lora(blocks, rank, alpha, dropout, patterns):
    """Replace the targeted linear layers of each block by LoRALinear, in place; -> the number of layers
    adapted. A pattern that matches nothing is an error."""
    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    names = target_names(blocks[0], patterns)
    if not names:
        raise ValueError(f"Model.lora_targets {patterns!r} matches no linear layer of a block (they are: "
                         f"{', '.join(n for n, layer in blocks[0].named_sublayers() if linear_kind(layer))})")
    for block in blocks:
        for name in names:
            parent_name, _, attr = name.rpartition(".")
            parent = block
            for part in parent_name.split(".") if parent_name else []:
                parent = getattr(parent, part)        # sublayers by name, "0" for a Sequential's first
            setattr(parent, attr, LoRALinear(getattr(parent, attr), rank, alpha, dropout))
    return len(names) * len(blocks)


def is_lora(name):
    return name.endswith(LORA_SUFFIXES)


def lora_state(state):
    """Only the adapters' tensors of a state dict."""
    return {k: v for k, v in state.items() if is_lora(k)}


def merge_lora(state, rank, alpha):
    """A state dict with adapters -> the plain one: W + A B * alpha / r for each adapted weight (float32 numpy
    in, float32 numpy out)."""
    out = {k: np.asarray(v) for k, v in state.items() if not is_lora(k)}
    for k in state:
        if k.endswith(".lora_A"):
            base = k[:-len(".lora_A")]
            a, b = np.asarray(state[k], np.float64), np.asarray(state[base + ".lora_B"], np.float64)
            w = out[base + ".weight"]
            out[base + ".weight"] = (w.astype(np.float64) + a @ b * (alpha / rank)).astype(w.dtype)
    return out
