"""The text tokenizer (ppvilg_deploy.tokenizer, shared with deployment) with ppvilg's default vocabulary."""
import os

from ppvilg_deploy.tokenizer import (TextTokenizer as _TextTokenizer, TextTooLongError,  # noqa: F401
                                     unknown_words, warn_unknown_words)

DEFAULT_VOCAB = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "vocab.txt")


class TextTokenizer(_TextTokenizer):
    def __init__(self, vocab_file=None):
        super().__init__(vocab_file or DEFAULT_VOCAB)


def grown_vocab(tokenizer, words):
    """The tokens to add so that each of `words` becomes whole tokens: each of its words (the tokenizer splits
    CJK text into characters, so a CJK word adds its missing characters) that the vocabulary lacks -> (new
    tokens in order, {token: the ids of the pieces it was cut into before, [UNK] left out})."""
    vocab = tokenizer.tok.vocab.token_to_idx
    new, sources = [], {}
    for word in words:
        for w in tokenizer.words(word):
            if w in vocab or w in sources:
                continue
            new.append(w)
            sources[w] = [vocab[p] for p in tokenizer.pieces(w) if p != tokenizer.tok.unk_token and p in vocab]
    return new, sources
