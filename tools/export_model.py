"""Export a stage-2 checkpoint and its stage-1 tokenizer for Paddle Inference (deploy/python reads the folder):

  python tools/export_model.py -c configs/demo/vilg_shapes.yaml -o Global.checkpoint=output/demo/vilg \
      --out output/demo/export

Global.checkpoint: a stage-2 checkpoint folder or run folder (its newest checkpoint; a parallel run's
checkpoint is merged first with tools/convert_checkpoint.py). The sampler defaults written to inference.yml
come from the config's Eval section. See ppvilg/export.py for the folder's contents.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ppvilg.utils.runtime import get_logger, setup_from_config  # noqa: E402  (sets up warnings first)
from ppvilg.utils.cli import config_parser, load_or_exit  # noqa: E402
from ppvilg.checkpoints import CheckpointError  # noqa: E402


def main(argv=None):
    p = config_parser(__doc__)
    p.add_argument("--out", default=None, help="export folder (default: <output_dir>/export)")
    a = p.parse_args(argv)
    cfg = load_or_exit(a)
    setup_from_config(cfg)
    from ppvilg.export import export
    from ppvilg.inference import ViLGInference
    if not cfg.Global.checkpoint:
        sys.exit("export_model: set -o Global.checkpoint=<stage-2 checkpoint folder>")
    try:
        vilg = ViLGInference.from_checkpoint(cfg.Global.checkpoint)
    except (CheckpointError, FileNotFoundError) as e:
        sys.exit(f"export_model: {e}")
    out = a.out or os.path.join(cfg.Global.output_dir, "export")
    export(vilg, cfg, out)
    get_logger().info(f"exported {vilg.folder} -> {out}")


if __name__ == "__main__":
    main()
