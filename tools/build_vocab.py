"""Build ppvilg's offline WordPiece vocabulary (ppvilg/text/assets/vocab.txt), used when no ERNIE vocab.txt
is given: ERNIE's special tokens, every distinct character of jieba's dictionary (CJK characters ordered by
frequency), CJK punctuation, printable ASCII characters and their '##' continuations (so any English word can be spelled),
and a list of common English words (ppvilg/text/assets/english_words.txt) so that everyday English is not
spelled letter by letter.   python tools/build_vocab.py [--out PATH]

--shapes: the vocabulary of the built-in shapes data instead (ppvilg/text/assets/shapes_vocab.txt, the demo's
Text.vocab_file): the special tokens and the tokens of the default vocabulary that its texts use (every caption,
question and answer ppvilg/data/shapes.py can write, novel shapes included), in the default vocabulary's order, so
that each of those texts becomes the same tokens. A demo-sized model with ~100 text tokens instead of 12,295
trains ~15% faster on these CPUs (docs/demo.md): the text head (untied by default) and its gradient, the Adam updates
and the gradient all-reduce all scale with the vocabulary.   python tools/build_vocab.py --shapes [--out PATH]
"""
import argparse
import os
import string
import sys
from collections import Counter

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
SPECIALS = ["[PAD]", "[CLS]", "[SEP]", "[MASK]", "[UNK]"]
CJK_PUNCTUATION = list("。，、；：？！“”‘’（）《》〈〉【】「」『』…—～·")


def build(jieba_dict, english_words):
    freq = Counter()
    with open(jieba_dict, encoding="utf-8") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 2:
                for ch in parts[0]:
                    freq[ch] += int(parts[1])
    chars = [c for c, _ in freq.most_common() if not c.isspace() and not (c.isascii() and c.isupper())]
    ascii_chars = [c for c in string.printable if not c.isspace() and not c.isupper()]
    vocab, seen = [], set()
    pieces = ["##" + c for c in ascii_chars if c.isalnum()]
    for tok in SPECIALS + ascii_chars + pieces + CJK_PUNCTUATION + english_words + chars:
        if tok not in seen:
            seen.add(tok)
            vocab.append(tok)
    return vocab


def shapes_vocab(default_vocab):
    """The shapes data's vocabulary (see the module doc): a list of tokens, from the vocab.txt `default_vocab`."""
    from ppvilg.data.shapes import all_texts
    from ppvilg.text.tokenizer import TextTokenizer
    tok = TextTokenizer(default_vocab)
    used = set(SPECIALS)
    for text in all_texts():
        for word in tok.words(text):
            pieces = tok.pieces(word)
            if tok.tok.unk_token in pieces:
                raise ValueError(f"{default_vocab} cannot encode {word!r} of the shapes text {text!r}")
            used.update(pieces)
    with open(default_vocab, encoding="utf-8") as f:
        return [t for t in (line.rstrip("\n") for line in f) if t in used]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", action="store_true", help="the shapes data's vocabulary (above)")
    p.add_argument("--out", default=None, help="default: ppvilg/text/assets/vocab.txt (shapes_vocab.txt)")
    a = p.parse_args()
    assets = os.path.join(ROOT, "ppvilg/text/assets")
    if a.shapes:
        vocab = shapes_vocab(os.path.join(assets, "vocab.txt"))
        out = a.out or os.path.join(assets, "shapes_vocab.txt")
        with open(out, "w", encoding="utf-8") as f:
            f.write("\n".join(vocab) + "\n")
        print(f"wrote {len(vocab)} tokens to {out} (Model.text_vocab_size: {len(vocab)})")
        return 0
    a.out = a.out or os.path.join(assets, "vocab.txt")
    import jieba
    with open(os.path.join(ROOT, "ppvilg/text/assets/english_words.txt"), encoding="utf-8") as f:
        words = [w.strip().lower() for w in f if w.strip() and not w.startswith("#")]
    vocab = build(os.path.join(os.path.dirname(jieba.__file__), "dict.txt"), words)
    with open(a.out, "w", encoding="utf-8") as f:
        f.write("\n".join(vocab) + "\n")
    print(f"wrote {len(vocab)} tokens to {a.out}")


if __name__ == "__main__":
    sys.exit(main())
