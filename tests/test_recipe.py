"""nanoGPT's CPU recipe on Tiny Shakespeare reaches its reported loss (slow: about 80 s on 2 cores)."""
from __future__ import annotations

import pytest

from model.config import TrainConfig
from model.data import TINY_SHAKESPEARE_SHA256, data_dir, load_corpus
from model.train import train

CORPUS = data_dir() / "tinyshakespeare" / "input.txt"


@pytest.mark.slow
@pytest.mark.skipif(not CORPUS.is_file(), reason=f"Tiny Shakespeare not at {CORPUS} (set CHARGPT_DATA_DIR)")
def test_baby_gpt_reaches_val_loss_1_90():
    corpus = load_corpus(CORPUS)
    assert corpus.sha256 == TINY_SHAKESPEARE_SHA256
    result = train(TrainConfig(device="cpu"), corpus)  # the defaults are the recipe
    assert result.val_loss <= 1.90
