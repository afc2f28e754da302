"""Write built-in data as image files + a JSONL manifest (the format tools/train.py reads for your own pairs).

  python tools/prepare_data.py photos --out data/photos          # scikit-image's bundled photos + captions
  python tools/prepare_data.py shapes --out data/shapes_heldout --split heldout --num 64 --size 32
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ppvilg.data.images import write_png  # noqa: E402
from ppvilg.data.photos import export_photos  # noqa: E402
from ppvilg.data.shapes import ShapesPairs  # noqa: E402
from ppvilg.utils.io import atomic_write_text  # noqa: E402


def export_shapes(out, split, num, size, lang, seed):
    ds = ShapesPairs(split, num, size, lang, seed)
    os.makedirs(out, exist_ok=True)
    lines = []
    for i in range(len(ds)):
        it = ds.item(i)
        name = f"{it['id']}.png"
        write_png(os.path.join(out, name), it["image"])
        lines.append(json.dumps({"image": name, "text": it["text"], "lang": it["lang"], **it["attrs"]},
                                ensure_ascii=False))
    path = os.path.join(out, "manifest.jsonl")
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path, len(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["photos", "shapes"])
    p.add_argument("--out", required=True)
    p.add_argument("--split", default="train", choices=["train", "heldout"], help="shapes only")
    p.add_argument("--num", type=int, default=256, help="shapes only: number of pairs")
    p.add_argument("--size", type=int, default=32, help="shapes only: image size in pixels")
    p.add_argument("--lang", default="both", choices=["zh", "en", "both"], help="shapes only")
    p.add_argument("--seed", type=int, default=0, help="shapes only")
    a = p.parse_args(argv)
    if a.what == "photos":
        path, n = export_photos(a.out)
    else:
        path, n = export_shapes(a.out, a.split, a.num, a.size, a.lang, a.seed)
    print(f"wrote {n} pairs: {path}")


if __name__ == "__main__":
    main()
