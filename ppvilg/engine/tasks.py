"""Every training stage, registered by name (importing this module registers them and the model configs they
use), and `build_task`, which makes the one named by `Global.task`."""
from ppvilg.distributed.env import ParallelState
from ppvilg.engine import vilg_task, vqgan_task  # noqa: F401  (registration)
from ppvilg.registry import TASKS


def build_task(cfg, parallel=None):
    """The task of `cfg`; parallel: the ParallelState from ppvilg.distributed.env.init_parallel (default: one
    process, for a single-process config)."""
    if parallel is None:
        if cfg.Distributed.world_size > 1:
            raise RuntimeError(f"a {cfg.Distributed.world_size}-process config: build the task with the "
                               "ParallelState of ppvilg.distributed.env.init_parallel(cfg)")
        parallel = ParallelState(cfg)
    return TASKS.get(cfg.Global.task)(cfg, parallel)
