"""The fine-tuning recipe, after `make demo`: teach the demo model a shape it has never seen (the diamond, 菱形)
from 128 pairs, with LoRA adapters and with full fine-tuning, and measure the new concept and forgetting:

  python tools/run_finetune_demo.py [--base output/demo/vilg] [--out output/demo/finetune]

1. tools/add_tokens.py: "diamond" becomes one token (it was 7 WordPiece fragments) -> <out>/base
2. the demo model before: tools/shapes_report.py on `novel_test` (diamonds in colour-position pairs the
   fine-tuning never shows) and on `test` (the old attributes)
3. LoRA (configs/demo/finetune_diamond_lora.yaml) and full fine-tuning (finetune_diamond_full.yaml)
4. the same two reports for each; a table on stdout and <out>/summary.json; the LoRA adapters merged into plain
   weights (tools/lora.py merge) for export and deploy
"""
import argparse
import json
import os
import subprocess
import sys
import time

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LORA, FULL = "configs/demo/finetune_diamond_lora.yaml", "configs/demo/finetune_diamond_full.yaml"


def run(name, cmd, times):
    print(f"==> {name}: python {' '.join(cmd)}", flush=True)
    t0 = time.time()
    rc = subprocess.call([sys.executable, *cmd], cwd=ROOT)
    times[name] = time.time() - t0
    if rc:
        print(f"run_finetune_demo: '{name}' failed with exit status {rc}", file=sys.stderr)
        sys.exit(rc)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", default="output/demo/vilg", help="the demo's stage-2 checkpoint (run folder)")
    p.add_argument("--out", default="output/demo/finetune")
    p.add_argument("--num-prompts", type=int, default=256, help="prompts of the `test` (forgetting) reports")
    a = p.parse_args(argv)
    out, times = a.out.rstrip("/"), {}
    run("add the token 'diamond'", ["tools/add_tokens.py", a.base, "--tokens", "diamond", "--out", f"{out}/base"],
        times)
    with open(os.path.join(ROOT, out, "base", "config.yaml"), encoding="utf-8") as f:
        grown = yaml.safe_load(f)
    over = ["-o", f"Global.init_weights={out}/base", "-o", f"Text.vocab_file={grown['Text']['vocab_file']}",
            "-o", f"Model.text_vocab_size={grown['Model']['text_vocab_size']}"]
    models = {"before": a.base, "lora": f"{out}/lora", "full": f"{out}/full"}

    def reports(name):
        for split, n in (("novel_test", 72), ("test", a.num_prompts)):
            run(f"{name}: report ({split})", ["tools/shapes_report.py", "-c", "configs/demo/vilg_shapes.yaml", "-o",
                                             f"Global.checkpoint={models[name]}", "--split", split, "--num-prompts",
                                             str(n), "--out", f"{out}/report_{name}_{split}"], times)

    reports("before")
    for name, cfg in (("lora", LORA), ("full", FULL)):
        run(f"{name}: fine-tune", ["tools/train.py", "-c", cfg, "-o", f"Global.output_dir={models[name]}", *over],
            times)
        reports(name)
    run("lora: merge the adapters", ["tools/lora.py", "merge", models["lora"], "--out", f"{out}/lora_merged"], times)

    rows = {}
    for name in models:
        r = {}
        for split in ("novel_test", "test"):
            with open(os.path.join(ROOT, out, f"report_{name}_{split}", "report.json"), encoding="utf-8") as f:
                rep = json.load(f)
            r[split] = {"t2i_attribute_accuracy": rep["t2i_attribute_accuracy"],
                        "t2i_shape": rep["t2i_per_attribute"]["shape"], "t2i_all_correct": rep["t2i_all_correct"],
                        "caption_attribute_accuracy": rep["caption_attribute_accuracy"],
                        "caption_shape": rep["caption_per_attribute"]["shape"],
                        "vqa_accuracy": rep["vqa_accuracy"], "vqa_shape": rep["vqa_per_type"]["shape"],
                        "intervals": rep["intervals"]}
        rows[name] = r
    rows["seconds"] = times
    summary = os.path.join(ROOT, out, "summary.json")
    with open(summary + ".partial", "w", encoding="utf-8") as f:
        json.dump(rows, f, indent=1, ensure_ascii=False)
    os.replace(summary + ".partial", summary)
    print("\n                 new shape (novel_test)                      old attributes (test)")
    print("model    t2i shape  t2i attrs  caption shape  VQA shape | t2i attrs  caption attrs  VQA")
    for name in models:
        n, t = rows[name]["novel_test"], rows[name]["test"]
        print(f"{name:<8} {n['t2i_shape']:9.3f}  {n['t2i_attribute_accuracy']:9.3f}  {n['caption_shape']:13.3f}  "
              f"{n['vqa_shape']:9.3f} | {t['t2i_attribute_accuracy']:9.3f}  {t['caption_attribute_accuracy']:13.3f}  "
              f"{t['vqa_accuracy']:.3f}")
    print(f"fine-tuning: LoRA {times['lora: fine-tune'] / 60:.1f} min, full {times['full: fine-tune'] / 60:.1f} min; "
          f"summary: {summary}")


if __name__ == "__main__":
    main()
