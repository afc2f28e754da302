"""Train a stage: python tools/train.py -c configs/demo/vqgan_shapes.yaml [-o Train.max_steps=100 ...]

Several processes (the Distributed section; docs/distributed.md):
  python -m paddle.distributed.launch --nproc_per_node 2 tools/train.py -c ... -o Distributed.mp_degree=2
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ppvilg.utils.runtime import get_logger, setup_from_config  # noqa: E402  (sets up warnings first)
from ppvilg.utils.cli import config_parser, load_or_exit  # noqa: E402
from ppvilg.engine.tasks import build_task  # noqa: E402
from ppvilg.engine.trainer import Trainer  # noqa: E402
from ppvilg.distributed.env import init_parallel  # noqa: E402


def main(argv=None):
    args = config_parser(__doc__).parse_args(argv)
    cfg = load_or_exit(args)
    device = setup_from_config(cfg)
    parallel = init_parallel(cfg)   # before the model is built: tensor-parallel layers need the groups
    get_logger().info(f"config {args.config} -> {cfg.Global.output_dir} on {device}")
    metrics = Trainer(cfg, build_task(cfg, parallel)).fit()
    get_logger().info("final eval: " + ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()))


if __name__ == "__main__":
    main()
