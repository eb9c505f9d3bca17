"""The encoder-decoder Transformer: what each mask does, that it reads its source, and that it learns to copy."""
from __future__ import annotations

import json

import optuna
import pytest
import torch
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from test_cli import TINY, run_module

from model.config import GPTConfig, TrainConfig
from model.data import DataError, load_corpus
from model.seq2seq import SPECIALS, EncoderDecoder, special_ids
from model.tasks import NextLines
from study_helpers import run_study

CHARS = 6
VOCAB = CHARS + len(SPECIALS)
PAD, BOS, EOS = special_ids(VOCAB)


def tiny(dropout: float = 0.0, block_size: int = 16) -> EncoderDecoder:
    torch.manual_seed(0)
    return EncoderDecoder(GPTConfig(vocab_size=VOCAB, block_size=block_size, n_layer=2, n_head=2, n_embd=32,
                                    dropout=dropout))


# eval: the fused kernels with a padding mask; train with a drop too small to happen: the CPU's spelled-out path
MODES = pytest.mark.parametrize("training", [False, True], ids=["fused", "spelled-out"])


def run(model: EncoderDecoder, training: bool, src, tgt) -> torch.Tensor:
    model.train(training)
    return model(src, tgt)[0]


@MODES
def test_padding_the_source_leaves_the_decoder_outputs_unchanged(training):
    model = tiny(dropout=1e-9)
    src = torch.tensor([[0, 3, 1, 4, 2]])
    tgt = torch.tensor([[BOS, 1, 2, 5]])
    padded = torch.cat([src, torch.full((1, 6), PAD)], dim=1)
    torch.testing.assert_close(run(model, training, padded, tgt), run(model, training, src, tgt))
    # and in a batch beside a longer source, which is what padding is for
    batch = torch.cat([padded, torch.tensor([[5, 4, 3, 2, 1, 0, 1, 2, 3, 4, 5]])])
    torch.testing.assert_close(run(model, training, batch, tgt.expand(2, -1))[:1], run(model, training, src, tgt))


@MODES
def test_a_later_target_character_never_changes_earlier_outputs(training):
    model = tiny(dropout=1e-9)
    src = torch.tensor([[0, 3, 1, 4, 2]])
    tgt = torch.tensor([[BOS, 1, 2, 5, 0, 3]])
    changed = tgt.clone()
    changed[0, 4] = 2
    a, b = run(model, training, src, tgt), run(model, training, src, changed)
    torch.testing.assert_close(a[:, :4], b[:, :4])
    assert not torch.allclose(a[:, 4:], b[:, 4:])


@MODES
def test_the_decoder_reads_the_source_through_cross_attention(training):
    model = tiny(dropout=1e-9)
    tgt = torch.tensor([[BOS, 1, 2]])
    a = run(model, training, torch.tensor([[0, 3, 1, 4, 2]]), tgt)
    b = run(model, training, torch.tensor([[0, 3, 5, 4, 2]]), tgt)
    assert not torch.allclose(a, b)


def test_the_fused_and_spelled_out_paths_mask_padding_alike():
    model = tiny(dropout=1e-9)
    src = torch.tensor([[0, 3, 1, 4, 2, PAD, PAD], [5, 4, 3, 2, 1, 0, 1]])
    tgt = torch.tensor([[BOS, 1, 2, 5], [BOS, 0, 0, 3]])
    torch.testing.assert_close(run(model, True, src, tgt), run(model, False, src, tgt))


def test_an_encoder_decoder_checkpoint_loads_as_one_and_a_gpt_checkpoint_of_old_loads_as_a_gpt(tmp_path, corpus):
    from model.checkpoint import load_checkpoint, save_checkpoint
    from model.gpt import GPT

    model = tiny()
    save_checkpoint(tmp_path / "ed", model, corpus.tokenizer)
    loaded, _, payload = load_checkpoint(tmp_path / "ed")
    assert payload["arch"] == "encoder-decoder" and isinstance(loaded, EncoderDecoder)
    torch.testing.assert_close(loaded.state_dict(), model.state_dict())
    gpt = GPT(GPTConfig(vocab_size=corpus.vocab_size, block_size=8, n_layer=1, n_head=2, n_embd=16))
    path = save_checkpoint(tmp_path / "gpt", gpt, corpus.tokenizer)
    old = torch.load(path, weights_only=True)
    del old["arch"]  # written before there were two families
    torch.save(old, path)
    assert isinstance(load_checkpoint(path)[0], GPT)


def test_the_loss_leaves_out_target_padding():
    model = tiny().eval()
    src, tgt, out = torch.tensor([[0, 1, 2]]), torch.tensor([[BOS, 3, 4]]), torch.tensor([[3, 4, EOS]])
    loss = model(src, tgt, out)[1]
    padded = model(src, torch.cat([tgt, torch.full((1, 2), PAD)], 1), torch.cat([out, torch.full((1, 2), PAD)], 1))[1]
    torch.testing.assert_close(padded, loss)


def copy_batch(n: int, gen: torch.Generator, max_len: int = 6):
    """Random strings of 1..max_len characters as sources; the targets are the same strings."""
    lengths = torch.randint(1, max_len + 1, (n,), generator=gen)
    chars = torch.randint(CHARS, (n, max_len), generator=gen)
    live = torch.arange(max_len) < lengths[:, None]
    src = torch.where(live, chars, PAD)
    tgt = torch.cat([torch.full((n, 1), BOS), src], 1)
    out = torch.cat([src, torch.full((n, 1), PAD)], 1)
    out[torch.arange(n), lengths] = EOS
    return src, tgt, out, [row[:k].tolist() for row, k in zip(chars, lengths)]


@pytest.fixture
def one_thread():
    """A network this small runs fastest on one thread, and a second one waits on a busy machine's other work."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_a_tiny_model_learns_to_copy_its_source(one_thread):
    model = tiny(block_size=8).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(300):  # 100% exact on the held-out strings by then; a few seconds on one core
        src, tgt, out, _ = copy_batch(64, gen)
        loss = model(src, tgt, out)[1]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()
    src, _, _, strings = copy_batch(500, torch.Generator().manual_seed(1))
    written = model.generate(src, temperature=0)
    exact = sum(w == s for w, s in zip(written, strings)) / len(strings)
    assert exact >= 0.99, f"copied {exact:.1%} of 500 strings exactly"


def test_sampling_is_seeded():
    model = tiny().eval()
    src = torch.tensor([[0, 3, 1, 4, 2]])
    a = model.generate(src, temperature=1.0, generator=torch.Generator().manual_seed(7))
    b = model.generate(src, temperature=1.0, generator=torch.Generator().manual_seed(7))
    assert a == b and all(PAD not in line and BOS not in line for line in a)


def test_next_line_pairs_follow_the_corpus_lines(tmp_path):
    path = tmp_path / "poem.txt"
    text = "ab\ncd\n\nefghij\nk\n" * 20
    path.write_text(text)
    corpus = load_corpus(path)
    task = NextLines(corpus, TrainConfig(arch="encoder-decoder", block_size=4))
    decode, train = corpus.tokenizer.decode, task.splits["train"]
    n = int(train.src_len[0]), int(train.tgt_len[0])
    assert decode(train.src[0, :n[0]]) == "ab" and decode(train.out[0, :n[1] - 1]) == "cd"
    assert decode(train.src[1, :2]) == "cd" and decode(train.out[1, :3]) == "efg"  # cut to block - 1
    assert train.cut_sources > 0 and train.cut_targets > 0
    (src, tgt), out = task.batch("train", torch.Generator().manual_seed(0))
    assert src.shape[1] <= 4 and tgt.shape == out.shape and (tgt[:, 0] == special_ids(task.vocab_size)[1]).all()


@pytest.mark.parametrize("text", ["one line only\n", "one\n\n\n", "a\nb\n"])
def test_a_corpus_without_two_lines_in_each_split_is_refused(tmp_path, text):
    path = tmp_path / "short.txt"
    path.write_text(text)
    with pytest.raises(DataError, match="needs at least two"):
        NextLines(load_corpus(path), TrainConfig(arch="encoder-decoder", block_size=8))


def test_train_json_then_sample_the_next_line(text_file, tmp_path):
    out = tmp_path / "ck"
    proc = run_module("model.train", "--arch", "encoder-decoder", "--data", str(text_file), *TINY, "--max-iters", "10",
                      "--json", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert "line pairs" in lines[0] and any(line.startswith("step      5: train loss") for line in lines)
    summary = json.loads(lines[-1])
    assert summary["iters"] == 10 and summary["best_val_loss"] > 0

    args = ["model.sample", "--checkpoint", str(out), "--prompt", "All:", "--seed", "5", "--temperature", "1"]
    first, second = run_module(*args), run_module(*args)
    assert first.returncode == 0, first.stderr
    assert first.stdout == second.stdout and first.stdout.count("\n") == 1  # one line: the next one
    assert first.stdout.strip()  # ten steps at temperature 1 write something before <eos>
    for prompt in ("", "two\nlines"):
        refused = run_module("model.sample", "--checkpoint", str(out), "--prompt", prompt)
        assert refused.returncode == 2 and "one non-empty line" in refused.stderr


def test_train_refuses_a_corpus_of_one_line(tmp_path):
    path = tmp_path / "one.txt"
    path.write_text("a single line of text, long enough for any block\n" * 1)
    proc = run_module("model.train", "--arch", "encoder-decoder", "--data", str(path), *TINY, "--max-iters", "2")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "needs at least two" in proc.stderr


def test_a_study_records_its_architecture_and_resuming_with_another_refuses(workdir, corpus_file, capsys):
    assert run_study("--arch", "encoder-decoder", "--data", corpus_file, "--trials", "2") == 0
    study = optuna.load_study(study_name="smoke-verse-encoder-decoder",
                              storage=JournalStorage(JournalFileBackend("optuna.journal")))
    assert study.user_attrs["setup"]["fixed"]["arch"] == "encoder-decoder"
    done = [t for t in study.trials if t.state.name == "COMPLETE"]
    assert done and all(t.user_attrs["config"]["arch"] == "encoder-decoder" for t in done)
    capsys.readouterr()
    assert run_study("--data", corpus_file, "--trials", "1", "--study-name", "smoke-verse-encoder-decoder") == 2
    assert "arch 'encoder-decoder' (now 'gpt')" in capsys.readouterr().err


def test_the_gpt_reads_source_and_target_as_one_line_pair_and_is_scored_on_the_target(tmp_path):
    from model.tasks import GPTNextLines

    path = tmp_path / "poem.txt"
    path.write_text("ab\ncde\n" * 20)
    corpus = load_corpus(path)
    task = GPTNextLines(corpus, TrainConfig(block_size=8))
    (x,), y = task.rows("train", torch.tensor([0]))
    decode = corpus.tokenizer.decode
    assert decode(x[0]) == "ab\ncde"  # source, newline, target; the final newline is only predicted
    assert decode([t for t in y[0].tolist() if t != -100]) == "cde\n"
    assert (y[0, :2] == -100).all()  # the source's own characters are not scored
