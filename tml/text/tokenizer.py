"""Text tokenizer: a byte-level BPE (``tokenizers`` library) saved as one tokenizer.json.

Byte-level means every string encodes (unknown characters fall back to bytes), so no ``<unk>``. Words are
placed one by one on the micro-turn clock, so the main entry point is ``word_ids(word)``: the tokens of a word as
it appears after a space (GPT-2 style, the space is part of the word's first token).

Special tokens (ids fixed by ``train_bpe``; a brought tokenizer.json gets any missing ones appended):
    <pad> = 0        an empty text slot
    <bos>, <eos>     episode / utterance boundaries
    <delegate>, </delegate>   the model hands a request to the background model
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

PAD, BOS, EOS, DELEGATE, END_DELEGATE = "<pad>", "<bos>", "<eos>", "<delegate>", "</delegate>"
SPECIAL_TOKENS = [PAD, BOS, EOS, DELEGATE, END_DELEGATE]


class TokenizerError(ValueError):
    """A tokenizer file is unreadable or unusable; the message names the path and the fix."""


class TextTokenizer:
    """Thin wrapper over a ``tokenizers.Tokenizer`` with the special ids tml relies on."""

    def __init__(self, tok: Tokenizer, path: str | Path | None = None):
        missing = [t for t in SPECIAL_TOKENS if tok.token_to_id(t) is None]
        if missing:
            tok.add_special_tokens(missing)
        self.tok = tok
        self.path = None if path is None else Path(path)
        self.pad_id: int = tok.token_to_id(PAD)
        self.bos_id: int = tok.token_to_id(BOS)
        self.eos_id: int = tok.token_to_id(EOS)
        self.delegate_id: int = tok.token_to_id(DELEGATE)
        self.end_delegate_id: int = tok.token_to_id(END_DELEGATE)

    @classmethod
    def load(cls, path: str | Path) -> "TextTokenizer":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file {path} does not exist; build one with "
                                    f"`python -m data_prep.synth_dialogues --out DIR` (writes DIR/tokenizer.json) "
                                    f"or point the config at an existing tokenizer.json")
        try:
            tok = Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception for malformed JSON / unknown models
            raise TokenizerError(f"tokenizer file {path} is not a valid `tokenizers` tokenizer.json ({e}); "
                                 f"regenerate it with data_prep") from e
        return cls(tok, path)

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.tok.save(str(path))
        self.path = path

    @property
    def vocab_size(self) -> int:
        """Number of ids, special tokens included (embedding tables need this many rows)."""
        return self.tok.get_vocab_size(with_added_tokens=True)

    def word_ids(self, word: str) -> list[int]:
        """Token ids of one word as it appears after a space; never empty for a non-empty word."""
        if not word or word.isspace():
            raise ValueError(f"word_ids needs a non-empty word, got {word!r}")
        return self.tok.encode(" " + word, add_special_tokens=False).ids

    def encode(self, text: str) -> list[int]:
        """Token ids of a running text (no special tokens added); words after the first keep their spaces."""
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int]) -> str:
        """Ids -> text. ``<pad>`` (empty slots) is skipped; other special tokens are kept; the leading space
        of the first word is dropped."""
        ids = [int(i) for i in ids if int(i) != self.pad_id]
        text = self.tok.decode(ids, skip_special_tokens=False)
        return text[1:] if text.startswith(" ") else text


    def decode_turns(self, turns: Iterable[Iterable[int]]) -> list[str]:
        """Token ids per micro-turn -> the text each turn adds. A byte-level BPE can split one character's bytes
        over turns; the character then appears whole in the turn of its last byte instead of as two U+FFFD halves.
        The concatenation equals ``decode`` of all ids (an unfinished character at the very end is kept as is)."""
        turns = [[int(i) for i in t if int(i) != self.pad_id] for t in turns]
        out, done, ids = [], "", []
        for k, turn in enumerate(turns):
            ids += turn
            text = self.tok.decode(ids, skip_special_tokens=False)
            if k < len(turns) - 1:
                text = text.rstrip("\ufffd")  # bytes of a character still being written decode to U+FFFD
            out.append(text[len(done):])
            done = text
        if out and out[0].startswith(" "):
            out[0] = out[0][1:]  # like decode: the first word's leading space
        return out


def train_bpe(texts: Iterable[str], vocab_size: int, path: str | Path) -> TextTokenizer:
    """Train a byte-level BPE of ``vocab_size`` ids (special tokens first, so ``<pad>`` = 0) on ``texts`` and save
    it as ``path`` (a tokenizer.json). The vocabulary can come out smaller when the corpus has few merges."""
    min_size = len(SPECIAL_TOKENS) + len(pre_tokenizers.ByteLevel.alphabet())
    if vocab_size < min_size:
        raise ValueError(f"vocab_size={vocab_size}: a byte-level BPE needs at least {min_size} ids "
                         f"(256 bytes + {len(SPECIAL_TOKENS)} special tokens)")
    tok = Tokenizer(models.BPE())
    # add_prefix_space: the first word of a text gets its leading space too, so every word is trained (and later
    # tokenised by word_ids) in its after-a-space form, alone or inside a text.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, min_frequency=2, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer=trainer)
    out = TextTokenizer(tok)
    out.save(path)
    return out


__all__ = ["SPECIAL_TOKENS", "TextTokenizer", "TokenizerError", "train_bpe"]
