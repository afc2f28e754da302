"""The `Distributed` config section, its validation against the world size, and the one place where it
becomes Fleet's DistributedStrategy.

    Distributed:
      dp_degree: -1          # data parallel; -1: world_size / (mp * pp * sharding)
      mp_degree: 1           # tensor (model) parallel: attention heads, MLP, text vocabulary, heads split
      pp_degree: 1           # pipeline parallel: blocks split into stages, 1F1B over Train.accum_steps micro-batches
      sharding_degree: 1     # group-sharded data parallel (ZeRO); the paper: stage 3 within a machine
      sharding_stage: 1      # 1: optimizer states, 2: + gradients, 3: + parameters
      offload: false         # optimizer states on CPU (sharding stage 2/3)
      recompute: none        # none | full (each block) | core_attn (attention scores only)
      world_size: null       # null: the launcher's; set it to validate a layout without launching

Micro-batching, gradient accumulation and mixed precision stay where single-process runs keep them
(Train.batch_size / Train.accum_steps / Train.amp): the batch of one optimizer step is Train.batch_size over all
data-parallel ranks (dp * sharding), split into Train.accum_steps micro-batches per rank (the pipeline's
micro-batches when pp > 1). A process launched by paddle.distributed.launch knows its rank and the world size
from PADDLE_TRAINER_ID / PADDLE_TRAINERS_NUM.
"""
import os

DISTRIBUTED_DEFAULTS = {
    "dp_degree": -1,
    "mp_degree": 1,
    "pp_degree": 1,
    "sharding_degree": 1,
    "sharding_stage": 1,
    "offload": False,
    "recompute": "none",
    "world_size": None,
}

RECOMPUTE = ("none", "full", "core_attn")


def launched_world_size():
    return int(os.environ.get("PADDLE_TRAINERS_NUM", 1))


def validate_distributed(cfg, origin, error):
    """Check and derive cfg.Distributed (not yet frozen) against the world size; `error` is the config error
    class. Sets dp_degree and world_size, and Train.rank_batch_size (a micro-batch on one rank)."""
    d, t = cfg.Distributed, cfg.Train
    env_world = launched_world_size()
    if d.world_size is None:
        d.world_size = env_world
    elif "PADDLE_TRAINERS_NUM" in os.environ and d.world_size != env_world:
        raise error(f"{origin}: Distributed.world_size is {d.world_size} but this run was launched with "
                    f"{env_world} processes")
    for key in ("mp_degree", "pp_degree", "sharding_degree", "world_size"):
        if d[key] < 1:
            raise error(f"{origin}: Distributed.{key} must be >= 1, got {d[key]}")
    inner = d.mp_degree * d.pp_degree * d.sharding_degree
    if d.dp_degree == -1:
        if d.world_size % inner:
            raise error(f"{origin}: the world size {d.world_size} is not a multiple of mp_degree x pp_degree x "
                        f"sharding_degree = {inner} (launch a multiple of {inner} processes, e.g. "
                        f"python -m paddle.distributed.launch --nproc_per_node {inner} tools/train.py ...)")
        d.dp_degree = d.world_size // inner
    elif d.dp_degree < 1 or d.dp_degree * inner != d.world_size:
        raise error(f"{origin}: Distributed degrees dp {d.dp_degree} x mp {d.mp_degree} x pp {d.pp_degree} x "
                    f"sharding {d.sharding_degree} = {d.dp_degree * inner} processes, but the world size is "
                    f"{d.world_size} (set Distributed.dp_degree=-1 to derive it)")
    if d.sharding_stage not in (1, 2, 3):
        raise error(f"{origin}: Distributed.sharding_stage must be 1, 2 or 3, got {d.sharding_stage}")
    if d.offload and not (d.sharding_degree > 1 and d.sharding_stage in (2, 3)):
        raise error(f"{origin}: Distributed.offload needs sharding_degree > 1 and sharding_stage 2 or 3")
    if d.sharding_degree > 1 and d.sharding_stage > 1 and (d.mp_degree > 1 or d.pp_degree > 1):
        raise error(f"{origin}: sharding_stage {d.sharding_stage} is supported with data parallel only "
                    "(mp_degree = pp_degree = 1, the paper's layout); use sharding_stage 1 with tensor or "
                    "pipeline parallel")
    if d.recompute not in RECOMPUTE:
        raise error(f"{origin}: Distributed.recompute must be one of {', '.join(RECOMPUTE)}, got {d.recompute!r}")
    data_ranks = d.dp_degree * d.sharding_degree
    if t.batch_size % (data_ranks * t.accum_steps):
        raise error(f"{origin}: Train.batch_size ({t.batch_size}) must be a multiple of the data-parallel ranks "
                    f"(dp {d.dp_degree} x sharding {d.sharding_degree}) x Train.accum_steps ({t.accum_steps})")
    t.rank_batch_size = t.batch_size // (data_ranks * t.accum_steps)


def build_strategy(cfg):
    """fleet.DistributedStrategy of a validated config."""
    from paddle.distributed import fleet
    d, t = cfg.Distributed, cfg.Train
    s = fleet.DistributedStrategy()
    hybrid = {"dp_degree": d.dp_degree, "mp_degree": d.mp_degree, "pp_degree": d.pp_degree,
              "sharding_degree": d.sharding_degree}
    if d.pp_degree > 1:
        s.pipeline_configs = {"accumulate_steps": t.accum_steps, "micro_batch_size": t.rank_batch_size}
        hybrid["pp_configs"] = {"use_batch_p2p_comm": False}  # gloo (CPU) has no batched send/recv
    s.hybrid_configs = hybrid
    return s


class ParallelState:
    """Where this process sits in the layout (all 1 / 0 when not distributed). Made once by the entry point
    (`init_parallel`, or `ParallelState.single()` for one process) and passed to the task, the model and the
    trainer: nothing reads it from a module global."""

    def __init__(self, cfg=None):
        d = cfg.Distributed if cfg is not None else dict(DISTRIBUTED_DEFAULTS, dp_degree=1, world_size=1)
        self.world, self.enabled = d["world_size"], d["world_size"] > 1
        self.dp, self.mp, self.pp = d["dp_degree"], d["mp_degree"], d["pp_degree"]
        self.sharding, self.stage = d["sharding_degree"], d["sharding_stage"]
        self.offload, self.recompute = bool(d["offload"]), d["recompute"]
        self.rank = self.dp_rank = self.mp_rank = self.pp_rank = self.sharding_rank = 0
        self.hcg = None

    @classmethod
    def single(cls, recompute="none"):
        """One process: every degree 1."""
        st = cls()
        st.recompute = recompute
        return st

    @property
    def data_rank(self):
        return self.dp_rank * self.sharding + self.sharding_rank

    @property
    def data_world(self):
        return self.dp * self.sharding

    @property
    def writes_weights(self):
        """One process per (mp, pp) coordinate saves the weights."""
        return self.dp_rank == 0 and self.sharding_rank == 0

    @property
    def mp_group(self):
        """The tensor-parallel communication group (None in one process)."""
        return self.hcg.get_model_parallel_group() if self.hcg is not None and self.mp > 1 else None

    def describe(self):
        return {"dp": self.dp, "mp": self.mp, "pp": self.pp, "sharding": self.sharding,
                "sharding_stage": self.stage}


def init_parallel(cfg, cpu_collectives_installed=False):
    """The ParallelState of this process for a validated config. A multi-process run initialises Fleet first
    (before the model is built: tensor-parallel layers read the communication groups); a single process is
    left as it is (ParallelState(cfg) with every degree 1, recompute from the config).
    cpu_collectives_installed: the caller replaced Fleet's tensor-parallel collectives with CPU versions
    (tests/cpu_collectives.py does, for the tests only)."""
    st = ParallelState(cfg)
    if st.enabled:
        import paddle
        from paddle.distributed import fleet
        from paddle.distributed.fleet.meta_parallel import model_parallel_random_seed
        if st.sharding > 1 and st.stage > 1 and paddle.get_device() == "cpu":
            raise RuntimeError("Distributed.sharding_stage 2/3 needs GPUs (gloo, the CPU backend, has no "
                               "reduce_scatter); use sharding_stage 1 on CPU")
        if st.mp > 1 and paddle.get_device() == "cpu" and not cpu_collectives_installed:
            raise RuntimeError("Distributed.mp_degree > 1 needs GPUs: paddle's CPU build has no kernels for the "
                               "tensor-parallel collectives (c_identity, c_concat, c_softmax_with_cross_entropy); "
                               "on CPU use data parallel, sharding stage 1 or pipeline parallel")
        if st.pp > 1 and paddle.get_device() == "cpu":
            # the pipeline's p2p helper asks the parallel environment for a device id, which CPU runs lack
            paddle.distributed.ParallelEnv._device_id = 0
        fleet.init(is_collective=True, strategy=build_strategy(cfg))
        hcg = fleet.get_hybrid_communicate_group()
        st.hcg = hcg
        st.rank = hcg.get_global_rank()
        st.dp_rank = hcg.get_data_parallel_rank()
        st.mp_rank = hcg.get_model_parallel_rank()
        st.pp_rank = hcg.get_stage_id()
        st.sharding_rank = hcg.get_sharding_parallel_rank()
        # the same seed on every rank for replicated weights, a per-mp-rank one for split weights
        model_parallel_random_seed(cfg.Global.seed)
    return st


def allreduce_mean_gradients(params, group):
    """Average the gradients of `params` over the data-parallel `group` in place: one all-reduce of all of them
    concatenated (the parameters without a gradient are skipped; every rank must pass the same ones). Fleet's
    fused_allreduce_gradients computes the same values (each gradient scaled by 1/n, then summed) but on CPU
    spends ~4x its all-reduce rebuilding and copying its buckets: 12-15 ms a step for the demo's stage-1 tokenizer
    (144 tensors, 764k floats; the all-reduce alone 2-3 ms on gloo), ~6 ms this way."""
    import paddle
    import paddle.distributed as dist
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = paddle.concat([g.reshape([-1]) for g in grads])
    flat.scale_(1.0 / group.nranks)
    dist.all_reduce(flat, group=group)
    for g, piece in zip(grads, paddle.split(flat, [g.size for g in grads])):
        g.copy_(piece.reshape(g.shape), False)
