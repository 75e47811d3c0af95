"""Text tokenizer: byte-level BPE trained by data_prep, or any tokenizer.json a user brings."""

from tml.text.tokenizer import SPECIAL_TOKENS, TextTokenizer, TokenizerError, train_bpe

__all__ = ["SPECIAL_TOKENS", "TextTokenizer", "TokenizerError", "train_bpe"]
