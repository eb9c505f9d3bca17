"""The training loop: learning, determinism, callbacks, divergence, schedule, checkpoints, sampling."""
from __future__ import annotations

import math

import pytest
import torch
from conftest import tiny_config

from model.checkpoint import load_checkpoint, save_checkpoint
from model.sample import sample_text
from model.train import TrainingDiverged, lr_at, train


def test_a_tiny_text_is_overfit(corpus):
    result = train(tiny_config(max_iters=150, eval_interval=50), corpus)
    initial = math.log(corpus.vocab_size)
    assert result.train_loss < 0.5 * initial
    assert [h["step"] for h in result.history] == [50, 100, 150]
    assert result.best_val_loss == min(h["val_loss"] for h in result.history)
    assert result.tokens_per_s > 0 and result.runtime_s > 0 and result.n_params == result.model.num_params()


def test_same_seed_same_losses_other_seed_other_losses(corpus):
    a = train(tiny_config(dropout=0.1), corpus)
    b = train(tiny_config(dropout=0.1), corpus)
    c = train(tiny_config(dropout=0.1, seed=8), corpus)
    losses = lambda r: [(h["train_loss"], h["val_loss"]) for h in r.history]  # noqa: E731
    assert losses(a) == losses(b)
    assert losses(a) != losses(c)


def test_callbacks_see_every_eval_and_the_result(corpus):
    seen = []

    class Recorder:
        def on_eval(self, step, metrics):
            seen.append((step, set(metrics)))

        def on_train_end(self, result):
            seen.append(("end", result.val_loss))

    result = train(tiny_config(max_iters=25), corpus, callbacks=[Recorder()])
    assert [s for s, _ in seen] == [10, 20, 25, "end"]
    assert seen[0][1] >= {"train_loss", "val_loss", "lr", "tokens_per_s"}
    assert seen[-1][1] == result.val_loss


def test_a_callback_that_raises_stops_training(corpus):
    class Stop(Exception):
        pass

    class StopAtTwenty:
        def on_eval(self, step, metrics):
            if step == 20:
                raise Stop

    with pytest.raises(Stop):
        train(tiny_config(max_iters=100), corpus, callbacks=[StopAtTwenty()])


def test_a_huge_learning_rate_diverges(corpus):
    with pytest.raises(TrainingDiverged, match="non-finite"):
        train(tiny_config(learning_rate=1e6, grad_clip=0.0, warmup_iters=0), corpus)


def test_schedule_warms_up_then_decays_to_min_lr():
    cfg = tiny_config(max_iters=100, warmup_iters=10, learning_rate=1e-3, min_lr_ratio=0.1)
    lrs = [lr_at(s, cfg) for s in range(101)]
    assert lrs[0] < lrs[5] < lrs[9] < lrs[10] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lrs[100] == pytest.approx(1e-4)


def test_checkpoint_round_trip_gives_identical_logits(corpus, tmp_path):
    result = train(tiny_config(max_iters=10), corpus)
    save_checkpoint(tmp_path / "ck", result.model, corpus.tokenizer, result.config)
    model, tokenizer, payload = load_checkpoint(tmp_path / "ck")  # weights_only=True inside
    idx = torch.randint(corpus.vocab_size, (2, 16))
    result.model.eval()
    assert torch.equal(model(idx)[0], result.model(idx)[0])
    assert tokenizer.vocab == corpus.tokenizer.vocab
    assert payload["train_config"]["n_embd"] == 32


def test_samples_have_the_asked_length_vocabulary_and_are_seeded(corpus):
    model = train(tiny_config(max_iters=10), corpus).model
    text = sample_text(model, corpus.tokenizer, "All:", 50, seed=3)
    assert text.startswith("All:") and len(text) == 54
    assert set(text) <= set(corpus.tokenizer.vocab)
    assert sample_text(model, corpus.tokenizer, "All:", 50, seed=3) == text
    assert sample_text(model, corpus.tokenizer, "All:", 50, seed=4) != text


def test_every_network_in_a_process_is_compiled(corpus, monkeypatch):
    """A study worker trains many shapes in one process; the tenth must not fall back to eager silently."""
    import functools

    import torch._dynamo.utils as dynamo_utils

    # dynamo's capture and recompile limit are what is tested: the eager backend skips code generation
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    graphs = dynamo_utils.counters["stats"]
    for i, shape in enumerate([dict(n_embd=32), dict(n_embd=48), dict(block_size=8), dict(n_head=4)] * 3):
        before = graphs["unique_graphs"]
        train(tiny_config(compile=True, max_iters=4, eval_interval=2, eval_iters=1, **shape), corpus)
        assert graphs["unique_graphs"] > before, f"network {i + 1} ran uncompiled"


def test_compilation_is_startup_not_runtime(corpus, monkeypatch):
    """A trial's runtime is what its configuration costs; a slow first compile must not inflate it."""
    import time

    def slow_first_call_compile(model):
        compiled = set()

        def forward(*args):  # like dynamo: one graph for training, another for evals (no grad)
            if torch.is_grad_enabled() not in compiled:
                compiled.add(torch.is_grad_enabled())
                time.sleep(0.5)
            return model(*args)
        return forward

    monkeypatch.setattr(torch, "compile", slow_first_call_compile)
    start = time.perf_counter()
    result = train(tiny_config(compile=True, max_iters=20, eval_interval=5), corpus)
    wall = time.perf_counter() - start
    assert result.startup_s >= 0.9
    assert result.runtime_s <= wall - 0.9
    assert result.summary()["startup_s"] == result.startup_s
