"""Shared fixtures: a small corpus written to a temporary directory, and tiny configurations."""
from __future__ import annotations

import pytest

from model.config import TrainConfig
from model.data import load_corpus

pytest.register_assert_rewrite("study_helpers")  # its assert helpers explain their failures as tests' asserts do

VERSE = """First Citizen:
Before we proceed any further, hear me speak.

All:
Speak, speak.

First Citizen:
You are all resolved rather to die than to famish?

All:
Resolved. resolved.

First Citizen:
First, you know Caius Marcius is chief enemy to the people.
"""


def tiny_config(**overrides) -> TrainConfig:
    """A network small enough to train in a second on one CPU core."""
    base = dict(n_layer=2, n_head=2, n_embd=32, block_size=16, batch_size=8, max_iters=30,
                eval_interval=10, eval_iters=4, warmup_iters=5, learning_rate=3e-3, device="cpu", seed=7)
    return TrainConfig(**{**base, **overrides})


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "verse.txt"
    path.write_text(VERSE * 12, encoding="utf-8")  # ~3 KB
    return path


@pytest.fixture
def corpus(text_file):
    return load_corpus(text_file)


@pytest.fixture
def corpus_file(text_file) -> str:
    return str(text_file)


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """An empty working directory for the study's default stores (optuna.journal, mlflow.db, mlruns/)."""
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return work
