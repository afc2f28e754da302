"""Read every entry of a data split the way training would and say what would be used and what skipped, and why:

  python tools/check_data.py -c configs/demo/vqgan_shapes.yaml [--split train]
  python tools/check_data.py -c configs/vilg/base_300m.yaml --manifest data/pairs.jsonl [-o Data.train.on_bad_line=skip]

Prints a summary (entries loaded; skipped by reason with the first few names of each) and then one JSON line.
Manifest lines are read with the split's on_bad_line / allow_outside_paths settings; images with Data's size
limits (max_image_pixels, max_image_bytes: checked on the header before decoding). For a stage-2 config, texts
longer than the model's text length are counted (training cuts them). Exit status 0 when the source could be
read (whatever was skipped), 2 when it could not be read at all (a missing manifest, a bad line with
on_bad_line=error, a config error), 1 when an entry failed for a reason that is not a bad image (a bug: its
message is printed).
"""
import json
import os
import sys
from collections import OrderedDict

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ppvilg.utils.runtime import get_logger  # noqa: E402  (quiet imports first)
from ppvilg.utils.cli import config_parser, load_or_exit  # noqa: E402
from ppvilg.config import to_config  # noqa: E402
from ppvilg.data.datasets import build_dataset, image_limits  # noqa: E402
from ppvilg.data.pairs import ManifestError, line_reason  # noqa: E402

EXAMPLES = 3


def check(dataset, max_text_len=None, tokenizer=None, progress=None):
    """{"entries", "loaded", "skipped": {reason: {"count", "examples"}}, "errors": [...], "long_texts"}."""
    skipped = OrderedDict()

    def add(reason, name):
        entry = skipped.setdefault(reason, {"count": 0, "examples": []})
        entry["count"] += 1
        if len(entry["examples"]) < EXAMPLES:
            entry["examples"].append(name)

    for msg in dataset.bad_lines:
        add(line_reason(msg), msg)
    loaded, errors, long_texts = 0, [], set()
    for i in range(len(dataset)):
        item = dataset[i]
        if "skipped" in item:
            add(item.get("reason", "unreadable"), item["skipped"])
        elif "error" in item:
            errors.append(item["error"])
        else:
            loaded += 1
            if tokenizer is not None and len(tokenizer.encode(item["text"])) > max_text_len:
                long_texts.add(item["text"])
        if progress and (i + 1) % 1000 == 0:
            progress(f"{i + 1}/{len(dataset)} entries read")
    return {"entries": len(dataset) + len(dataset.bad_lines), "loaded": loaded, "skipped": skipped,
            "errors": errors, "long_texts": len(long_texts)}


def main(argv=None):
    p = config_parser(__doc__)
    p.add_argument("--split", default="train", choices=["train", "eval"], help="which Data.<split> to read")
    p.add_argument("--manifest", help="read this JSONL / TSV manifest instead of the split's source (with the "
                   "split's other settings)")
    a = p.parse_args(argv)
    cfg = load_or_exit(a)
    log = get_logger()
    section = cfg.Data[a.split]
    if a.manifest:
        section = to_config(dict(section.to_dict(), source="manifest", path=a.manifest)).freeze()
    try:
        dataset = build_dataset(section, cfg.Data.image_size, **image_limits(cfg.Data))
    except (ManifestError, ValueError, OSError) as e:
        print(f"check_data: cannot read Data.{a.split} ({section.source} {section.path or ''}): {e}", file=sys.stderr)
        sys.exit(2)
    tokenizer = max_len = None
    if "Text" in cfg and "max_text_len" in cfg.Model:
        from ppvilg.text.tokenizer import TextTokenizer
        tokenizer, max_len = TextTokenizer(cfg.Text.vocab_file), cfg.Model.max_text_len
    result = check(dataset, max_len, tokenizer, log.info)
    where = a.manifest or section.path or section.source
    print(f"{where}: {result['entries']} entries, {result['loaded']} loaded, "
          f"{sum(v['count'] for v in result['skipped'].values())} skipped, {len(result['errors'])} errors")
    for reason, entry in result["skipped"].items():
        print(f"  skipped ({reason}): {entry['count']}")
        for name in entry["examples"]:
            print(f"      {name}")
    for msg in result["errors"][:EXAMPLES]:
        print(f"  error: {msg}")
    if tokenizer is not None:
        print(f"  texts longer than the model's {max_len} tokens (cut in training): {result['long_texts']}")
    print(json.dumps(dict(result, source=where, split=a.split), ensure_ascii=False))
    sys.exit(1 if result["errors"] else 0)


if __name__ == "__main__":
    main()
