"""The corpus: Tiny Shakespeare download and cache, character vocabulary, train/val split, batches."""
from __future__ import annotations

import hashlib
import os
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import torch

TINY_SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
TINY_SHAKESPEARE_SIZE = 1_115_394
TINY_SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
DATA_DIR_ENV = "CHARGPT_DATA_DIR"
PROJECT_ROOT = Path(__file__).resolve().parent.parent
TRAIN_FRACTION = 0.9


class DataError(ValueError):
    """A corpus that cannot be used; the message names the file and the problem."""


def data_dir() -> Path:
    return Path(os.environ.get(DATA_DIR_ENV) or PROJECT_ROOT / "data")


def _check_tiny_shakespeare(blob: bytes, where: str) -> None:
    if len(blob) != TINY_SHAKESPEARE_SIZE:
        raise DataError(f"{where}: expected {TINY_SHAKESPEARE_SIZE} bytes of Tiny Shakespeare, got {len(blob)}")
    digest = hashlib.sha256(blob).hexdigest()
    if digest != TINY_SHAKESPEARE_SHA256:
        raise DataError(f"{where}: SHA-256 {digest} does not match Tiny Shakespeare's {TINY_SHAKESPEARE_SHA256}")


def download_tiny_shakespeare(dest: Path, url: str | None = None, timeout: float = 30.0) -> Path:
    """Fetch the corpus to dest, verified by size and SHA-256; dest is written whole or not at all."""
    url = url or TINY_SHAKESPEARE_URL
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            blob = response.read()
    except (OSError, ValueError) as exc:
        raise DataError(f"could not download Tiny Shakespeare from {url} ({exc}); "
                        f"put input.txt at {dest}, set {DATA_DIR_ENV}, or pass --data FILE") from None
    _check_tiny_shakespeare(blob, url)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=".input.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(blob)
        os.replace(tmp, dest)
    except BaseException:
        os.unlink(tmp)
        raise
    return dest


def tiny_shakespeare_path() -> Path:
    """The cached Tiny Shakespeare file, downloaded on first use."""
    path = data_dir() / "tinyshakespeare" / "input.txt"
    if not path.exists():
        download_tiny_shakespeare(path)
    return path


def resolve_corpus_path(data: str | os.PathLike | None) -> Path:
    return Path(data) if data is not None else tiny_shakespeare_path()


class CharTokenizer:
    """Maps each character of the vocabulary to its index in the sorted vocabulary."""

    def __init__(self, vocab: str):
        self.vocab = vocab
        self.stoi = {ch: i for i, ch in enumerate(vocab)}

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def unknown(self, text: str) -> list[str]:
        return sorted(set(text) - self.stoi.keys())

    def encode(self, text: str) -> list[int]:
        missing = self.unknown(text)
        if missing:
            raise DataError(f"characters not in the vocabulary: {' '.join(repr(c) for c in missing)}")
        return [self.stoi[c] for c in text]

    def decode(self, ids) -> str:
        return "".join(self.vocab[int(i)] for i in ids)


@dataclass
class Corpus:
    """A text encoded once: first 90% for training, last 10% for validation."""

    name: str
    path: Path
    sha256: str
    tokenizer: CharTokenizer
    train: torch.Tensor  # (N_train,) int64
    val: torch.Tensor  # (N_val,) int64

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    def check_block_size(self, block_size: int) -> None:
        for split, ids in (("training", self.train), ("validation", self.val)):
            if len(ids) < block_size + 1:
                raise DataError(f"{self.path}: too short for block_size {block_size}: the {split} split has "
                                f"{len(ids)} characters, needs at least {block_size + 1}")

    def to(self, device: torch.device | str) -> Corpus:
        return Corpus(self.name, self.path, self.sha256, self.tokenizer,
                      self.train.to(device), self.val.to(device))


def load_corpus(data: str | os.PathLike | None = None) -> Corpus:
    """Read a UTF-8 text file (default: Tiny Shakespeare), build its vocabulary and encode it."""
    path = resolve_corpus_path(data)
    try:
        blob = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a directory, expected a text file") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror})") from None
    if not blob:
        raise DataError(f"{path}: is empty")
    try:
        text = blob.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text (byte 0x{blob[exc.start]:02x} at offset {exc.start})") from None
    tokenizer = CharTokenizer("".join(sorted(set(text))))
    ids = torch.tensor(tokenizer.encode(text), dtype=torch.long)
    n_train = int(TRAIN_FRACTION * len(ids))
    name = "tinyshakespeare" if data is None else path.stem
    return Corpus(name, path, hashlib.sha256(blob).hexdigest(), tokenizer, ids[:n_train], ids[n_train:])


def get_batch(ids: torch.Tensor, block_size: int, batch_size: int,
              generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Random windows of ids as (inputs, targets), built on ids' device without a host round trip."""
    starts = torch.randint(len(ids) - block_size, (batch_size, 1), device=ids.device, generator=generator)
    windows = ids[starts + torch.arange(block_size + 1, device=ids.device)]  # (B, T+1)
    return windows[:, :-1], windows[:, 1:]
