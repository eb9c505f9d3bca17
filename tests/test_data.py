"""Corpus loading, vocabulary, batches and the Tiny Shakespeare download."""
from __future__ import annotations

import hashlib

import pytest
import torch

from model import data
from model.data import CharTokenizer, DataError, get_batch, load_corpus


def test_tokenizer_round_trip(corpus):
    text = "First Citizen:\nSpeak, speak."
    assert corpus.tokenizer.decode(corpus.tokenizer.encode(text)) == text
    assert corpus.tokenizer.vocab == "".join(sorted(set(corpus.tokenizer.vocab)))


def test_tokenizer_names_unknown_characters():
    with pytest.raises(DataError, match="'z'"):
        CharTokenizer("abc").encode("abz")


def test_split_is_first_90_percent_then_last_10(text_file, corpus):
    ids = corpus.tokenizer.encode(text_file.read_text())
    n = int(0.9 * len(ids))
    assert corpus.train.tolist() == ids[:n]
    assert corpus.val.tolist() == ids[n:]
    assert corpus.sha256 == hashlib.sha256(text_file.read_bytes()).hexdigest()


def test_batches_are_shifted_windows_of_the_corpus(corpus):
    gen = torch.Generator().manual_seed(0)
    x, y = get_batch(corpus.train, 16, 5, gen)
    assert x.shape == y.shape == (5, 16)
    assert torch.equal(x[:, 1:], y[:, :-1])
    text = corpus.tokenizer.decode(corpus.train.tolist())
    for row in x:
        assert corpus.tokenizer.decode(row.tolist()) in text


@pytest.mark.parametrize("content, message", [
    (None, "no such file"),
    (b"", "is empty"),
    (b"abc\xff\xfedef", "not UTF-8 text (byte 0xff at offset 3)"),
])
def test_unusable_files_are_named(tmp_path, content, message):
    path = tmp_path / "corpus.txt"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(DataError) as err:
        load_corpus(path)
    assert str(path) in str(err.value) and message in str(err.value)


def test_too_short_for_block_size(tmp_path):
    path = tmp_path / "short.txt"
    path.write_text("x" * 100)
    corpus = load_corpus(path)  # 90 train, 10 val characters
    corpus.check_block_size(9)
    with pytest.raises(DataError, match="validation split has 10 characters, needs at least 11"):
        corpus.check_block_size(10)


def test_download_verifies_and_caches(tmp_path, monkeypatch):
    good = tmp_path / "good.txt"
    good.write_bytes(b"x" * 10)
    monkeypatch.setattr(data, "TINY_SHAKESPEARE_SIZE", 10)
    monkeypatch.setattr(data, "TINY_SHAKESPEARE_SHA256", hashlib.sha256(b"x" * 10).hexdigest())
    dest = tmp_path / "cache" / "input.txt"
    data.download_tiny_shakespeare(dest, url=good.as_uri())
    assert dest.read_bytes() == b"x" * 10
    assert [p.name for p in dest.parent.iterdir()] == ["input.txt"]  # no partial file left behind


def test_download_rejects_a_wrong_file_and_writes_nothing(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"not shakespeare")
    dest = tmp_path / "cache" / "input.txt"
    with pytest.raises(DataError, match="expected 1115394 bytes"):
        data.download_tiny_shakespeare(dest, url=bad.as_uri())
    assert not dest.parent.exists()


def test_unreachable_download_says_where_to_put_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv(data.DATA_DIR_ENV, str(tmp_path))
    monkeypatch.setattr(data, "TINY_SHAKESPEARE_URL", (tmp_path / "absent.txt").as_uri())
    with pytest.raises(DataError) as err:
        load_corpus()
    message = str(err.value)
    assert str(tmp_path / "tinyshakespeare" / "input.txt") in message and "--data" in message
