"""The entry points as users run them: flags, JSON output, sampling, and one-line errors with exit 2."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from model import sample as sample_cli
from model import train as train_cli

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--block-size", "16", "--batch-size", "4",
        "--eval-interval", "5", "--eval-iters", "2", "--device", "cpu"]


def run_module(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_train_json_then_sample_the_checkpoint(text_file, tmp_path):
    out = tmp_path / "ck"
    proc = run_module("model.train", "--data", str(text_file), *TINY, "--max-iters", "10", "--json", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert any(line.startswith("step      5: train loss") for line in lines)
    summary = json.loads(lines[-1])
    assert {"val_loss", "best_val_loss", "train_loss", "runtime_s", "tokens_per_s", "n_params", "iters",
            "device"} <= summary.keys()
    assert summary["iters"] == 10 and summary["device"] == "cpu"

    args = ["model.sample", "--checkpoint", str(out), "--prompt", "All:", "--max-new-tokens", "40", "--seed", "5"]
    first, second = run_module(*args), run_module(*args)
    assert first.returncode == 0, first.stderr
    assert first.stdout.startswith("All:") and len(first.stdout.rstrip("\n")) >= 40
    assert first.stdout == second.stdout


def one_line_error(capsys, main, argv) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    return err


@pytest.mark.parametrize("content, flags, message", [
    (None, [], "no such file"),
    ("", [], "is empty"),
    (b"\xff\xfe\x00", [], "not UTF-8 text"),
    ("tiny text", [], "too short for block_size 16"),
    ("ok", ["--n-embd", "30", "--n-head", "4"], "n_embd (30) must be divisible by n_head (4)"),
    ("ok", ["--batch-size", "0"], "batch_size must be positive"),
    ("ok", ["--max-iters", "-5"], "max_iters must be positive"),
    ("ok", ["--dropout", "1.0"], "dropout must be in [0, 1)"),
    ("ok", ["--dropout", "-0.1"], "dropout must be in [0, 1)"),
    ("ok", ["--n-layer", "two"], "invalid int value"),
    ("ok", ["--device", "tpu"], "device must be one of"),
    ("ok", ["--device", "auto:1"], "device must be one of auto, cpu, cuda, mps or cuda:N, got 'auto:1'"),
    ("ok", ["--device", "cpu:abc"], "got 'cpu:abc'"),
    ("ok", ["--device", "cuda:x"], "got 'cuda:x'"),
    ("ok", ["--arch", "rnn"], "arch must be one of gpt, encoder-decoder, got 'rnn'"),
])
@pytest.mark.parametrize("arch", ["gpt", "encoder-decoder"])
def test_bad_training_input_exits_2_with_one_line(tmp_path, capsys, content, flags, message, arch):
    path = tmp_path / "corpus.txt"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    if arch == "encoder-decoder" and content == "tiny text":  # lines are cut to the block, never too short
        message = "the training split has 1 non-empty line(s); the next-line task needs at least two"
    err = one_line_error(capsys, train_cli.main, ["--data", str(path), *TINY[:-2], "--arch", arch, *flags])
    assert message in err
    if content is None or isinstance(content, bytes) or content in ("", "tiny text"):
        assert str(path) in err  # a problem with the file names the file


def test_prompt_outside_the_vocabulary_lists_the_characters(corpus, tmp_path, capsys):
    from conftest import tiny_config

    from model.checkpoint import save_checkpoint

    result = train_cli.train(tiny_config(max_iters=2), corpus)
    save_checkpoint(tmp_path, result.model, corpus.tokenizer)
    err = one_line_error(capsys, sample_cli.main, ["--checkpoint", str(tmp_path), "--prompt", "Zebra~"])
    assert err.rstrip().endswith("vocabulary: 'Z' 'b' '~'")


def test_missing_checkpoint_is_named(tmp_path, capsys):
    err = one_line_error(capsys, sample_cli.main, ["--checkpoint", str(tmp_path / "nope")])
    assert "nope" in err and "no checkpoint" in err


def test_real_entry_point_prints_no_traceback(tmp_path):
    proc = run_module("model.train", "--data", str(tmp_path / "absent.txt"))
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"python -m model.train: error: {tmp_path / 'absent.txt'}: no such file"


def test_a_named_config_is_the_start_and_flags_change_it(text_file, tmp_path, capsys):
    from model.checkpoint import load_checkpoint

    out = tmp_path / "ck"
    train_cli.main(["--config", "shakespeare-char", "--data", str(text_file), *TINY, "--max-iters", "2",
                    "--out", str(out)])
    config = load_checkpoint(out)[2]["train_config"]
    assert (config["dropout"], config["eval_iters"], config["max_iters"]) == (0.2, 2, 2)  # named, flag, flag
    assert (config["n_layer"], config["n_embd"], config["block_size"]) == (1, 16, 16)


def test_bench_prints_throughput_and_loop_overhead(text_file):
    proc = run_module("model.bench", "--data", str(text_file), "--device", "cpu", "--iters", "3", "--repeats", "1")
    assert proc.returncode == 0, proc.stderr
    header, row = proc.stdout.splitlines()[1:3]
    assert header.split()[:4] == ["config", "params", "dev", "ms/iter"]
    name, params, device, ms, tokens_per_s, mfu, bare, ratio, vs_first = row.split()
    assert (name, params, device, mfu, vs_first) == ("baby", "0.80M", "cpu", "n/a", "1.000")  # no bf16 CPU peak
    assert float(ms) > 0 and float(tokens_per_s.replace(",", "")) > 0 and 0 < float(ratio) < 2


@pytest.mark.parametrize("flag, values, labels", [
    ("--dropout", ["0", "0.1"], [["baby", "dropout=0"], ["baby", "dropout=0.1"]]),
    ("--precision", ["fp32", "bf16"], [["baby", "fp32"], ["baby", "bf16"]]),
])
def test_bench_measures_one_row_per_value(text_file, flag, values, labels):
    proc = run_module("model.bench", "--data", str(text_file), "--device", "cpu", "--iters", "2", "--repeats", "1",
                      flag, *values)
    assert proc.returncode == 0, proc.stderr
    rows = [line.split() for line in proc.stdout.splitlines()[2:]]
    assert [row[:2] for row in rows] == labels
    assert rows[0][-1] == "1.000" and float(rows[1][-1]) > 0


def test_mfu_accounting_follows_nanogpt():
    from model.bench import flops_per_iter, peak_flops
    from model.config import NAMED

    # 6 FLOPs per matmul parameter (position embeddings excluded) and token, plus 12 L H Q T for attention
    expected = (6 * (10_745_088 - 256 * 384) + 12 * 6 * 6 * 64 * 256) * 64 * 256
    assert flops_per_iter(NAMED["shakespeare-char"], 10_745_088) == expected
    assert peak_flops("NVIDIA H100 80GB HBM3") == 989e12 and peak_flops("NVIDIA H100 PCIe") == 756e12
    assert peak_flops("NVIDIA A100-SXM4-80GB") == 312e12 and peak_flops("NVIDIA A10") == 125e12
    assert peak_flops("NVIDIA L40") == 181e12 and peak_flops("NVIDIA L40S") == 362e12
    assert peak_flops("Some Future GPU") is None


def test_a_gpu_index_beyond_the_gpus_present_is_refused(monkeypatch):
    import torch

    from model.config import ConfigError
    from model.train import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda:1") == torch.device("cuda:1")
    with pytest.raises(ConfigError, match="'cuda:2' requested but this machine has 2 GPU"):
        resolve_device("cuda:2")
