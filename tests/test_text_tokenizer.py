"""Byte-level BPE: special ids, per-word round trips, pad skipping, clear errors for bad files."""

import pytest

from tml.text import SPECIAL_TOKENS, TextTokenizer, TokenizerError, train_bpe

CORPUS = ["hello there, how are you today?", "I am fine, thanks! what is 42 times 3?",
          "the capital of France is Paris.", "let me check. result: 126", "it's sunny in Tokyo, 21 degrees."] * 10


@pytest.fixture(scope="module")
def tok_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("bpe") / "tokenizer.json"
    train_bpe(CORPUS, 320, path)
    return path


def test_special_ids_and_size(tok_path):
    tok = TextTokenizer.load(tok_path)
    assert tok.pad_id == 0
    assert [tok.tok.token_to_id(t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3, 4]
    assert 256 + len(SPECIAL_TOKENS) < tok.vocab_size <= 320


def test_word_round_trip(tok_path):
    tok = TextTokenizer.load(tok_path)
    words = [w for line in CORPUS for w in line.split()] + ["zebra", "naïve", "日本", "3.14", "x"]
    for w in words:
        ids = tok.word_ids(w)
        assert ids and all(0 < i < tok.vocab_size for i in ids), w
        assert tok.decode(ids) == w
    sentence = "what is 42 times 3? zebra naïve"
    ids = [i for w in sentence.split() for i in tok.word_ids(w)]
    assert ids == tok.encode(sentence)  # a word tokenises the same alone and inside a text
    assert tok.decode([0, 0] + ids[:2] + [0] + ids[2:] + [0]) == sentence  # <pad> = empty slot, skipped
    assert len(tok.word_ids("hello")) < len("hello")  # the BPE learned merges from the corpus


def test_rejects_empty_word(tok_path):
    with pytest.raises(ValueError, match="non-empty"):
        TextTokenizer.load(tok_path).word_ids("")


def test_missing_and_corrupt_files_name_the_path(tmp_path):
    missing = tmp_path / "nope" / "tokenizer.json"
    with pytest.raises(FileNotFoundError, match="nope/tokenizer.json"):
        TextTokenizer.load(missing)
    bad = tmp_path / "tokenizer.json"
    bad.write_text('{"model": ')
    with pytest.raises(TokenizerError, match=str(bad)):
        TextTokenizer.load(bad)
