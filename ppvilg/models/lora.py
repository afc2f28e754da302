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


class LoRALinear(nn.Layer):
    """A paddle.nn.Linear's weight and bias (the same Parameter objects, frozen) plus a rank-r adapter."""

    def __init__(self, base, rank, alpha, dropout=0.0):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"LoRA adapts paddle.nn.Linear layers, got {type(base).__name__}")
        d_in, d_out = base.weight.shape
        self.weight, self.bias = base.weight, base.bias
        self.weight.stop_gradient = True
        if self.bias is not None:
            self.bias.stop_gradient = True
        self.rank, self.scale = rank, alpha / rank
        self.lora_A = self.create_parameter(
            [d_in, rank], attr=paddle.ParamAttr(initializer=nn.initializer.Uniform(-1 / math.sqrt(d_in),
                                                                                   1 / math.sqrt(d_in))))
        self.lora_B = self.create_parameter([rank, d_out], attr=paddle.ParamAttr(
            initializer=nn.initializer.Constant(0.0)))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else None

    def forward(self, x):
        h = x if self.dropout is None else self.dropout(x)
        return F.linear(x, self.weight, self.bias) + paddle.matmul(paddle.matmul(h, self.lora_A), self.lora_B) * self.scale


def matches(name, patterns):
    """Whether a block-relative layer name matches one of the comma-separated globs (Model.lora_targets)."""
    return any(fnmatch.fnmatchcase(name, g.strip()) for g in patterns.split(",") if g.strip())


def target_names(block, patterns):
    """The names of a block's nn.Linear sublayers that match the comma-separated globs."""
    return [name for name, layer in block.named_sublayers() if isinstance(layer, nn.Linear)
            and matches(name, patterns)]


def add_lora(blocks, rank, alpha, dropout, patterns):
    """Replace the targeted linear layers of each block by LoRALinear, in place; -> the number of layers
    adapted. A pattern that matches nothing is an error."""
    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    names = target_names(blocks[0], patterns)
    if not names:
        raise ValueError(f"Model.lora_targets {patterns!r} matches no linear layer of a block (they are: "
                         f"{', '.join(n for n, layer in blocks[0].named_sublayers() if isinstance(layer, nn.Linear))})")
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
