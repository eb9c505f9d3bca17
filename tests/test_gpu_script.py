"""benchmarks/gpu.sh, proven on the CPU before it meets a GPU: --smoke runs every step at toy sizes, end to end."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from benchmarks import gpu

ROOT = Path(__file__).resolve().parent.parent
NANOGPT = next((p for p in (ROOT / ".peers" / "nanoGPT", ROOT.parent / "shared" / "peers" / "nanoGPT")
                if (p / "train.py").is_file()), None)


def stamp(path: Path):
    return path.stat().st_mtime_ns if path.exists() else None


def listing(folder: Path) -> set[str]:
    return set(os.listdir(folder)) if folder.is_dir() else set()


@pytest.mark.skipif(NANOGPT is None, reason="nanoGPT is neither in .peers/nanoGPT nor in ../shared/peers/nanoGPT")
def test_smoke_run_writes_every_figure(text_file, tmp_path):
    out, before, runs = tmp_path / "gpu.json", stamp(gpu.GPU_FIGURES), listing(ROOT / "mlruns")
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}  # the study's stores stay in tmp_path
    # budgets four times the smoke's own: a busy machine must not turn this test into a test of its speed
    budgets = [f"--budget={step}={4 * seconds}" for step, seconds in gpu.SMOKE_BUDGET.items()]
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu.sh"), "--smoke", "--out", str(out), "--data",
                           str(text_file), "--nanogpt", str(NANOGPT), "--work", str(tmp_path / "work"), *budgets],
                          env={**env, "PYTHON": sys.executable}, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    figures = json.loads(out.read_text())
    assert {k: figures[k] for k in gpu.HEADLINE if figures[k] is None} == {}
    assert {name: step["status"] for name, step in figures["steps"].items()} == dict.fromkeys(gpu.STEPS, "ok")
    assert figures["mode"] == "smoke" and figures["device"].startswith("cpu") and figures["torch"]
    assert figures["speedup_vs_nanogpt"] == pytest.approx(figures["tokens_per_s"] / figures["nanogpt_tokens_per_s"],
                                                          rel=1e-2)
    assert 0 < figures["val_loss_5000"] < 5 and figures["steps"]["train"]["iters"] == 60  # vocabulary 35: ln 35 = 3.6
    assert 0 < figures["study_trials"] <= 4 and 0 < figures["study_wall_s"] < figures["total_s"]
    assert figures["steps"]["confirm"]["seeds_done"] == 3 and 0 < figures["confirmed_val_loss_mean"] < 5
    assert {p.name for p in (tmp_path / "work" / "logs").iterdir()} == {f"{s}.log" for s in gpu.STEPS}
    assert (tmp_path / "work" / "study" / "mlflow.db").is_file() and listing(ROOT / "mlruns") == runs
    assert stamp(gpu.GPU_FIGURES) == before  # the GPU's figures are never touched by a smoke run


def test_a_step_is_stopped_at_its_mark_keeping_what_it_printed(tmp_path):
    run, seen = gpu.Run({**os.environ, "PYTHONUNBUFFERED": "1"}, tmp_path), []
    start = time.monotonic()
    code, cut = run("slow", [sys.executable, "-c", "import time; print('step 1'); time.sleep(60)"], tmp_path,
                    start + 2, lambda t, line: seen.append(line))
    assert cut and code != 0 and seen == ["step 1"]
    assert time.monotonic() - start < 2 + gpu.KILL_GRACE_S
    assert "step 1" in (tmp_path / "slow.log").read_text()


@pytest.mark.parametrize("args, message", [
    (["--smoke"], "--smoke needs --out PATH"),
    (["--smoke", "--out", str(gpu.GPU_FIGURES)], "--smoke never writes docs/benchmarks/gpu.json"),
    (["--data", "{tmp}/missing.txt"], "no corpus at"),
    (["--data", "{corpus}", "--nanogpt", "{tmp}"], "no nanoGPT at"),
    (["--data", "{corpus}", "--nanogpt", "{fake}", "--wheels", "{tmp}"], "no wheels in"),
    (["--data", "{corpus}", "--nanogpt", "{fake}", "--budget", "study=soon"], "--budget study=soon: expected"),
    (["--data", "{corpus}", "--nanogpt", "{fake}", "--steps", "study,report"], "--steps: unknown report"),
])
def test_bad_input_is_one_line_and_exit_2(args, message, text_file, tmp_path):
    fake = tmp_path / "nanoGPT"
    fake.mkdir()
    (fake / "train.py").touch()
    args = [a.format(tmp=tmp_path, corpus=text_file, fake=fake) for a in args]
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu.py"), *args], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.startswith("benchmarks/gpu.sh: error: ") and proc.stderr.count("\n") == 1
    assert message in proc.stderr
