"""Build ppvilg's offline WordPiece vocabulary (ppvilg/text/assets/vocab.txt), used when no ERNIE vocab.txt
is given: ERNIE's special tokens, every distinct character of jieba's dictionary (CJK characters ordered by
frequency), CJK punctuation, printable ASCII characters and their '##' continuations (so any English word can be spelled),
and a list of common English words (ppvilg/text/assets/english_words.txt) so that everyday English is not
spelled letter by letter.   python tools/build_vocab.py [--out PATH]
"""
import argparse
import os
import string
import sys
from collections import Counter

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
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


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", default=os.path.join(ROOT, "ppvilg/text/assets/vocab.txt"))
    a = p.parse_args()
    import jieba
    with open(os.path.join(ROOT, "ppvilg/text/assets/english_words.txt"), encoding="utf-8") as f:
        words = [w.strip().lower() for w in f if w.strip() and not w.startswith("#")]
    vocab = build(os.path.join(os.path.dirname(jieba.__file__), "dict.txt"), words)
    with open(a.out, "w", encoding="utf-8") as f:
        f.write("\n".join(vocab) + "\n")
    print(f"wrote {len(vocab)} tokens to {a.out}")


if __name__ == "__main__":
    sys.exit(main())
