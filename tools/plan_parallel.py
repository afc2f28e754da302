"""Per-GPU memory of parallel layouts for a stage-2 config, and the one to use:

  python tools/plan_parallel.py -c configs/vilg/10b.yaml --gpus 64 --gpu-mem 80

Candidates use exactly --gpus GPUs (tensor parallel and sharding inside a node of --gpus-per-node, data and
pipeline parallel across nodes), sharding stages 1-3, full recompute on/off, optimizer offload on/off and
micro-batches 1/2/4. The config's own Distributed layout, validated for --gpus processes, is shown first.
See ppvilg/distributed/planner.py for the arithmetic.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import ppvilg.utils.runtime  # noqa: E402,F401  (quiet imports first)
from ppvilg.utils.cli import config_parser, load_or_exit  # noqa: E402
from ppvilg.distributed.planner import GIB, ParallelLayout, memory, plan  # noqa: E402
from ppvilg.models.vilg import count_parameters  # noqa: E402
from ppvilg.registry import model_config  # noqa: E402


def main(argv=None):
    p = config_parser(__doc__)
    p.add_argument("--gpus", type=int, required=True)
    p.add_argument("--gpu-mem", type=float, required=True, help="GiB per GPU")
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--usable", type=float, default=0.9, help="fraction of GPU memory a layout may use")
    p.add_argument("--top", type=int, default=10)
    a = p.parse_args(argv)
    a.override = a.override + [f"Distributed.world_size={a.gpus}"]  # validate the layout for --gpus processes
    cfg = load_or_exit(a)
    if cfg.Model.name != "vilg":
        sys.exit("plan_parallel plans the stage-2 transformer: give a vilg config")
    model = model_config(cfg.Model)
    fits, rows = plan(model, a.gpus, a.gpu_mem, a.usable, a.gpus_per_node)
    print(f"{cfg.Model.preset or 'custom'} model: {count_parameters(model) / 1e9:.2f}B parameters; {a.gpus} GPUs x "
          f"{a.gpu_mem:g} GiB (usable {a.usable:.0%}); {len(fits)} of {len(rows)} layouts fit")
    d = cfg.Distributed
    own = ParallelLayout(d.dp_degree, d.mp_degree, d.pp_degree, d.sharding_degree, d.sharding_stage,
                 d.recompute != "none", d.offload, cfg.Train.rank_batch_size)
    own_mem = memory(model, own)
    verdict = "fits" if own_mem["total"] <= a.gpu_mem * GIB * a.usable else "does NOT fit"
    print(f"the config's layout: {_describe(own)}: {own_mem['total'] / GIB:.1f} GiB per GPU - {verdict}")
    head = (f"{'dp':>3} {'mp':>3} {'pp':>3} {'shard':>5} {'stage':>5} {'recomp':>6} {'offload':>7} {'mb':>3} | "
            f"{'weights':>8} {'grads':>8} {'optim':>8} {'activ':>8} {'logits':>7} {'total':>8}  GiB")
    print(head)
    for lay, m in fits[:a.top]:
        print(f"{lay.dp:>3} {lay.mp:>3} {lay.pp:>3} {lay.sharding:>5} {lay.stage:>5} {str(lay.recompute):>6} "
              f"{str(lay.offload):>7} {lay.micro_batch:>3} | " + " ".join(
                  f"{m[k] / GIB:>8.2f}" if k != "logits" else f"{m[k] / GIB:>7.2f}"
                  for k in ("weights", "gradients", "optimizer", "activations", "logits", "total")))
    if not fits:
        smallest = min(rows, key=lambda r: r[1]["total"])
        sys.exit(f"no layout fits; the smallest needs {smallest[1]['total'] / GIB:.1f} GiB per GPU ({smallest[0]})")
    print(f"recommended: {_describe(fits[0][0])}: {fits[0][1]['total'] / GIB:.1f} GiB per GPU")


def _describe(lay):
    return (f"dp={lay.dp} mp={lay.mp} pp={lay.pp} sharding={lay.sharding} (stage {lay.stage}) "
            f"recompute={lay.recompute} offload={lay.offload} micro_batch={lay.micro_batch}")


if __name__ == "__main__":
    main()
