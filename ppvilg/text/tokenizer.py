"""The text tokenizer (ppvilg_deploy.tokenizer, shared with deployment) with ppvilg's default vocabulary."""
import os

from ppvilg_deploy.tokenizer import TextTokenizer as _TextTokenizer, TextTooLongError  # noqa: F401

DEFAULT_VOCAB = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "vocab.txt")


class TextTokenizer(_TextTokenizer):
    def __init__(self, vocab_file=None):
        super().__init__(vocab_file or DEFAULT_VOCAB)
