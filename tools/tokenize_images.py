"""Turn a data split into VQ code shards for stage 2:
python tools/tokenize_images.py -c CONFIG -o Global.checkpoint=VQ_CKPT --split train --out output/demo/codes/train

Writes <out>/shard_NNNNN.npz (codes [N, h, w] int32, index, text, meta as JSON strings) and <out>/index.json
(the tokenizer checkpoint, grid, codebook size, the data section, per-shard counts, skipped images and
whether it is complete). Each shard and the index are written atomically; running the same command again
after an interruption continues after the last complete shard. Shards written by other tokenizer weights or
another data section are an error, or are replaced with --overwrite.
"""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ppvilg.utils.runtime import get_logger, setup_from_config  # noqa: E402
from ppvilg.utils.cli import config_parser, load_or_exit  # noqa: E402
from ppvilg.data.datasets import build_dataset, image_limits  # noqa: E402
from ppvilg.data.shards import tokenize_to_shards  # noqa: E402
from ppvilg.checkpoints import load_image_tokenizer  # noqa: E402


def main(argv=None):
    p = config_parser(__doc__)
    p.add_argument("--split", default="train", choices=["train", "eval"], help="which Data.<split> to encode")
    p.add_argument("--out", required=True, help="output folder for the shards and index.json")
    p.add_argument("--shard-size", type=int, default=4096, help="pairs per shard")
    p.add_argument("--batch-size", type=int, default=16,
                   help="images per encoder batch (the codes do not depend on it; on CPU 16 is ~15%% faster than 64)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace shards in --out that another tokenizer, other weights or other data wrote")
    args = p.parse_args(argv)
    cfg = load_or_exit(args)
    setup_from_config(cfg)
    model, _, folder = load_image_tokenizer(cfg.Global.checkpoint or "auto", cfg.Global.output_dir)
    dataset = build_dataset(cfg.Data[args.split], cfg.Data.image_size, **image_limits(cfg.Data))
    index = tokenize_to_shards(model, folder, dataset, args.out, args.shard_size, args.batch_size,
                               cfg.Data.num_workers, args.overwrite)
    get_logger().info(f"{args.out}: {index['num_items']} pairs in {len(index['shards'])} shards, "
                      f"{len(index['skipped'])} images skipped")
    print(json.dumps({k: index[k] for k in ("num_items", "grid", "num_codes", "complete")}))


if __name__ == "__main__":
    main()
