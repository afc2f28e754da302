"""Text tokenizer: ERNIE's WordPiece through PaddleNLP's ErnieTokenizer (shared by training and deployment).

With no network, the default vocabulary is ppvilg's own `ppvilg/text/assets/vocab.txt` (built by
tools/build_vocab.py: ERNIE's special tokens, the characters of jieba's dictionary, ASCII and common English
words); any ERNIE vocab.txt path can be given instead (`Text.vocab_file`); an exported model carries its
vocabulary. [CLS] starts a text target ("begin of text") and [SEP] ends every text; [PAD] pads.
"""
import functools
import os
import sys
import warnings


class TextTooLongError(ValueError):
    pass


def _wordlike(tok):
    return tok.isascii() and tok[:1].isalnum()


class TextTokenizer:
    def __init__(self, vocab_file):
        if not os.path.isfile(vocab_file):
            raise FileNotFoundError(f"Text.vocab_file: no vocabulary at {vocab_file!r} (give an ERNIE vocab.txt "
                                    "or leave it empty for ppvilg's own)")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from paddlenlp.transformers import ErnieTokenizer
        self.vocab_file = vocab_file
        self.tok = ErnieTokenizer(vocab_file=vocab_file)
        self.pad_id, self.bos_id, self.eos_id = self.tok.pad_token_id, self.tok.cls_token_id, self.tok.sep_token_id
        self.unk_id = self.tok.unk_token_id
        self.vocab_size = len(self.tok.vocab)
        # a text's ids, remembered: training meets the same captions every epoch and in both directions of a step
        # (WordPiece in Python was ~5% of a demo stage-2 step)
        self._ids_of = functools.lru_cache(maxsize=1 << 16)(self._ids)

    def _ids(self, text):
        return tuple(self.tok.convert_tokens_to_ids(self.tok.tokenize(text)))

    def encode(self, text, max_len=None, truncate=True):
        """Text -> ids followed by [SEP]. Longer than max_len (with [SEP]): cut, or TextTooLongError."""
        ids = list(self._ids_of(text)) + [self.eos_id]
        if max_len is not None and len(ids) > max_len:
            if not truncate:
                raise TextTooLongError(f"text has {len(ids)} tokens with [SEP], the model allows {max_len}: "
                                       f"{text[:60]!r}")
            ids = ids[:max_len - 1] + [self.eos_id]
        return ids

    def pieces(self, word):
        """The vocabulary pieces of one word (WordPiece; [UNK] where none fits)."""
        return self.tok.tokenize(word)

    def words(self, text):
        """The words of a text as the tokenizer splits it before WordPiece (every CJK character alone)."""
        return self.tok.basic_tokenizer.tokenize(text)

    def decode(self, ids):
        """ids -> text, stopping at [SEP]; no spaces between CJK characters, spaces between English words."""
        out = []
        for i in ids:
            i = int(i)
            if i == self.eos_id:
                break
            if i in (self.pad_id, self.bos_id):
                continue
            tok = self.tok.convert_ids_to_tokens(i)
            if tok.startswith("##") and out:
                out[-1] += tok[2:]
            else:
                out.append(tok)
        text = ""
        for k, tok in enumerate(out):
            if k and _wordlike(tok) and _wordlike(out[k - 1]):
                text += " "
            text += tok
        return text


def unknown_words(tokenizer, texts):
    """The words of `texts` that the vocabulary can only encode with [UNK], in first-seen order."""
    out = []
    for t in texts:
        for w in tokenizer.words(t):
            if tokenizer.tok.unk_token in tokenizer.pieces(w) and w not in out:
                out.append(w)
    return out


def warn_unknown_words(tokenizer, texts):
    """The CLIs' check of a prompt or question: its `unknown_words`, named in a warning on stderr when there are
    any (the model reads [UNK] there; a small vocabulary, like the demo's, lacks most words)."""
    unknown = unknown_words(tokenizer, [t for t in texts if t])
    if unknown:
        print(f"warning: the model's vocabulary ({tokenizer.vocab_file}) has no token for "
              f"{', '.join(map(repr, unknown))}: the model reads [UNK] there (tools/add_tokens.py adds words, to "
              "train them)", file=sys.stderr)
    return unknown
