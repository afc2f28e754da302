"""Grow the text vocabulary of a stage-2 checkpoint, for fine-tuning on words it lacks:

  # whole-word tokens for new words (English words are otherwise cut into WordPiece fragments)
  python tools/add_tokens.py output/demo/vilg --tokens diamond --out output/demo/vilg_diamond
  # every word of a manifest's texts (captions, questions, answers) the vocabulary can only write as [UNK]
  python tools/add_tokens.py output/demo/vilg --manifest data/mine.jsonl --out output/demo/vilg_mine

Writes a checkpoint folder with the grown vocab.txt inside it (the config's Text.vocab_file points there),
Model.text_vocab_size raised, and the text embedding, text head and text bias grown: the existing rows are
bit-identical, a new token's rows start as the mean of the pieces it was cut into before. Start fine-tuning
from it with -o Global.init_weights=<out> -o Text.vocab_file=<out>/vocab.txt -o Model.text_vocab_size=<printed>.
A CJK word adds its missing characters (the tokenizer splits CJK text into characters).
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ppvilg.utils.runtime import setup_device  # noqa: E402  (sets up warnings first)
import ppvilg.engine.tasks  # noqa: E402,F401  (registers the tasks whose configs checkpoints hold)
from ppvilg import checkpoints as ckpt  # noqa: E402
from ppvilg.checkpoints import CheckpointError  # noqa: E402
from ppvilg.data.pairs import ManifestError, read_jsonl, read_tsv  # noqa: E402
from ppvilg.models.vilg import grow_text_vocab  # noqa: E402
from ppvilg.text.tokenizer import TextTokenizer, grown_vocab, unknown_words  # noqa: E402


def manifest_texts(path):
    pairs = read_tsv(path) if path.endswith(".tsv") else read_jsonl(path)
    texts = []
    for p in pairs:
        texts.append(p.text)
        for q in p.qa:
            texts += [q["question"], q["answer"]]
    return texts


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="a stage-2 checkpoint folder or run folder")
    p.add_argument("--tokens", nargs="+", default=[], help="words to make whole tokens")
    p.add_argument("--manifest", help="a JSONL / TSV manifest: add the words of its texts that map to [UNK]")
    p.add_argument("--out", required=True, help="the checkpoint folder to write")
    a = p.parse_args(argv)
    setup_device("cpu", 1)
    try:
        folder = ckpt.resolve_checkpoint(a.checkpoint)
        meta, cfg = ckpt.read_meta(folder)
        if meta.get("task") != "vilg":
            raise CheckpointError(f"{folder}: a '{meta.get('task')}' checkpoint; the text vocabulary is stage 2's")
        tok = TextTokenizer(cfg.Text.vocab_file)
        words = list(a.tokens) + (unknown_words(tok, manifest_texts(a.manifest)) if a.manifest else [])
        new, pieces = grown_vocab(tok, words)
        if not new:
            sys.exit("add_tokens: every word is already in the vocabulary; nothing to add")
        with open(tok.vocab_file, encoding="utf-8") as f:
            lines = [ln.rstrip("\n") for ln in f if ln.rstrip("\n")]
        old_len = len(lines)
        size = max(cfg.Model.text_vocab_size, old_len + len(new))
        state = grow_text_vocab(ckpt.read_full_state(folder), size,
                                {old_len + k: pieces[w] for k, w in enumerate(new)})
        changes = {"Model": {"text_vocab_size": size},
                   "Text": {"vocab_file": os.path.join(os.path.abspath(a.out), "vocab.txt")}}
        ckpt.write_derived(a.out, folder, cfg, changes, state,
                           {"step": meta.get("step"), "task": "vilg", "model": "vilg",
                            "grown_from": os.path.abspath(folder), "added_tokens": new},
                           files={"vocab.txt": "\n".join(lines + new) + "\n"})
    except (CheckpointError, ManifestError, FileNotFoundError) as e:
        sys.exit(f"add_tokens: {e}")
    print(json.dumps({"out": os.path.abspath(a.out), "added": new,
                      "ids": list(range(old_len, old_len + len(new))), "text_vocab_size": size,
                      "vocab_file": os.path.join(os.path.abspath(a.out), "vocab.txt")}, ensure_ascii=False))


if __name__ == "__main__":
    main()
