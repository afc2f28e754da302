"""Per-GPU memory of a parallel layout for the unified transformer, and a recommendation.

Arithmetic (bytes; P = parameters, counted analytically by ppvilg.models.vilg.count_parameters):
- parameters held per GPU P_gpu = P / (mp * pp)   (tensor parallel splits every matrix and the vocabularies,
  pipeline parallel splits the layers; embeddings/heads are assumed spread evenly, a small error for
  48 layers)
- mixed precision (the paper: AMP with fp32 master weights): weights 2 * P_gpu (bf16/fp16), gradients 2 * P_gpu,
  optimizer states 12 * P_gpu (fp32 master copy + Adam's two moments)
- group sharding over `sharding` GPUs: stage 1 divides the optimizer states, stage 2 also the gradients,
  stage 3 also the weights; `offload` moves optimizer states (and master weights) to CPU memory
- activations per transformer layer and sequence of length S with hidden h, a heads, micro-batch b, following
  Korthikanti et al. (2022) for pre-LN blocks in 16-bit: S*b*h*(10 + 24/mp) + 5*a*S^2*b/mp without recompute,
  2*S*b*h (the layer input only) with full recompute; each training pair contributes two sequences (text->image
  and image->text, "the bidirectional structure doubles activation memory", paper §3.2); with pipeline
  parallel the first stage holds pp micro-batches in flight (1F1B) of L/pp layers each
- logits: the float32 logits of the target segments, b * (S_img * V_img + S_txt * V_txt) * 4 / mp, plus their
  gradients (x2)
A layout fits when the total is below `usable` (default 90%) of the GPU memory. Transient buffers (a stage-3
layer's gathered weights, communication buckets, allocator fragmentation) are left to that 10% margin.
"""
from dataclasses import dataclass

from ppvilg.models.vilg import count_parameters

GIB = 1024 ** 3


@dataclass(frozen=True)
class ParallelLayout:
    dp: int = 1
    mp: int = 1
    pp: int = 1
    sharding: int = 1
    stage: int = 1           # sharding stage 1 / 2 / 3 (ignored when sharding == 1)
    recompute: bool = False
    offload: bool = False
    micro_batch: int = 1

    @property
    def gpus(self):
        return self.dp * self.mp * self.pp * self.sharding


def memory(model, layout):
    """{component: bytes per GPU} for a ViLGConfig and a ParallelLayout (the GPU of the first pipeline stage)."""
    c, lay = model, layout
    p_gpu = count_parameters(c) / (lay.mp * lay.pp)
    shard = lay.sharding if lay.sharding > 1 else 1
    weights = 2 * p_gpu / (shard if lay.stage >= 3 and shard > 1 else 1)
    grads = 2 * p_gpu / (shard if lay.stage >= 2 and shard > 1 else 1)
    optim = 0.0 if lay.offload else 12 * p_gpu / shard
    s = c.max_text_len + c.grid * c.grid                 # tokens per sequence (either direction)
    b, h, a = lay.micro_batch, c.hidden_size, c.num_heads
    if lay.recompute:
        per_layer = 2 * s * b * h
    else:
        per_layer = s * b * h * (10 + 24 / lay.mp) + 5 * a * s * s * b / lay.mp
    in_flight = lay.pp if lay.pp > 1 else 1
    activations = 2 * per_layer * (c.num_layers / lay.pp) * in_flight
    logits = 3 * b * (c.grid * c.grid * c.num_codes + c.max_text_len * c.text_vocab_size) * 4 / lay.mp
    return {"weights": weights, "gradients": grads, "optimizer": optim, "activations": activations,
            "logits": logits, "total": weights + grads + optim + activations + logits}


def candidates(gpus, gpus_per_node=8, micro_batches=(1, 2, 4)):
    """Layouts using exactly `gpus` GPUs: mp and sharding inside a node, dp/pp across nodes."""
    out = []
    for mp in (1, 2, 4, 8):
        for sharding in (1, 2, 4, 8):
            if mp * sharding > gpus_per_node:
                continue
            for pp in (1, 2, 4, 8):
                if gpus % (mp * sharding * pp):
                    continue
                dp = gpus // (mp * sharding * pp)
                for stage in ((1, 2, 3) if sharding > 1 else (1,)):
                    for recompute in (False, True):
                        for offload in (False, True):
                            for b in micro_batches:
                                out.append(ParallelLayout(dp, mp, pp, sharding, stage, recompute, offload, b))
    return out


def plan(model, gpus, gpu_mem_gib, usable=0.9, gpus_per_node=8):
    """(fitting layouts sorted best first, all evaluated) -> list of (layout, memory dict).
    Preference: no tensor or pipeline parallelism (the paper used neither), then no offload, no recompute,
    then the largest micro-batch, then the least memory."""
    budget = gpu_mem_gib * GIB * usable
    rows = [(lay, memory(model, lay)) for lay in candidates(gpus, gpus_per_node)]
    fits = [r for r in rows if r[1]["total"] <= budget]
    fits.sort(key=lambda r: (r[0].mp * r[0].pp, r[0].offload, r[0].recompute, -r[0].micro_batch, r[1]["total"]))
    return fits, rows
