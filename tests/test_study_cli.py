"""The study runner as a user starts it: bad arguments, the script from another directory, an MLflow server."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from study_helpers import free_port, run_study, start_mlflow_server

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("args, message", [
    (["--preset", "huge"], "argument --preset: invalid choice: 'huge'"),
    (["--trials", "0"], "--trials must be at least 1, got 0"),
    (["--data", "{tmp}/absent.txt"], "absent.txt: no such file"),
    (["--data", "{tmp}/binary.txt"], "binary.txt: not UTF-8 text"),
    (["--space", "{tmp}/broken.toml"], "broken.toml: not valid TOML"),
    (["--space", "{tmp}/unknown.yaml"], "unknown.yaml: unknown parameter(s) n_layers"),
    (["--space", "{tmp}/indivisible.yaml"], "n_embd 16 is not divisible by n_head 3"),
    (["--n-layer", "0"], "n_layer must be positive"),
    (["--storage", "postgresql://study:s3cret@127.0.0.1:{port}/optuna"], "cannot connect"),
    (["--storage", "sqlite:///{tmp}/missing/dir/optuna.db"], "does not exist"),
    (["--tracking-uri", "http://127.0.0.1:{port}"], "MLflow server unreachable"),
    (["--device", "cuda"], "device 'cuda' requested but CUDA is not available"),
    (["--device", "auto:1"], "device must be one of auto, cpu, cuda, mps or cuda:N, got 'auto:1'"),
    (["--device", "cpu:abc"], "got 'cpu:abc'"),
    (["--trials-per-gpu", "2"], "--trials-per-gpu needs CUDA, but trials train on cpu: use --workers"),
    (["--trials-per-gpu", "0"], "--trials-per-gpu must be at least 1, got 0"),
    (["--workers", "2", "--trials-per-gpu", "2"], "--workers and --trials-per-gpu both set the number of workers"),
])
def test_bad_arguments_exit_2_with_one_line_and_create_nothing(workdir, tmp_path, capsys, corpus_file, args,
                                                               message):
    (tmp_path / "binary.txt").write_bytes(b"\x80\x81 not text")
    (tmp_path / "broken.toml").write_text("[learning_rate\nlow = 1")
    (tmp_path / "unknown.yaml").write_text("n_layers:\n  choices: [2, 4]\n")
    (tmp_path / "indivisible.yaml").write_text("n_head:\n  choices: [2, 3]\nn_embd:\n  choices: [16, 20]\n")
    args = [a.format(tmp=tmp_path, port=free_port()) for a in args]
    if "--data" not in args:
        args += ["--data", corpus_file]
    assert run_study(*args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert "s3cret" not in err
    assert list(workdir.iterdir()) == []


@pytest.fixture
def mlflow_server(tmp_path):
    with start_mlflow_server(tmp_path / "server") as url:
        yield url


def rest(url: str, endpoint: str, body: dict | None = None) -> dict:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(f"{url}/api/2.0/mlflow/{endpoint}", data=data,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.load(response)


def test_script_from_another_directory_logs_to_an_mlflow_server(tmp_path, mlflow_server, corpus_file):
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    proc = subprocess.run([sys.executable, str(ROOT / "study" / "run.py"), "--preset", "smoke", "--trials", "2",
                           "--data", corpus_file, "--tracking-uri", mlflow_server, "--device", "cpu"],
                          cwd=work, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "trial   0 COMPLETE" in proc.stdout and "Write the report:" in proc.stdout
    assert sorted(p.name for p in work.iterdir()) == ["optuna.journal"]  # tracking went to the server

    experiment = rest(mlflow_server, "experiments/get-by-name?experiment_name=smoke-verse")["experiment"]
    runs = rest(mlflow_server, "runs/search", {"experiment_ids": [experiment["experiment_id"]]})["runs"]
    tags = [{t["key"]: t["value"] for t in r["data"].get("tags", [])} for r in runs]
    (parent_id,) = [r["info"]["run_id"] for r, t in zip(runs, tags) if t.get("role") == "study"]
    children = [t for t in tags if t.get("mlflow.parentRunId") == parent_id]
    assert sorted(t["trial_number"] for t in children) == ["0", "1"]
    child_id = next(r["info"]["run_id"] for r, t in zip(runs, tags) if t.get("trial_number") == "0")
    files = {f["path"] for f in rest(mlflow_server, f"artifacts/list?run_id={child_id}")["files"]}
    assert {"sample.txt", "loss_curves.csv"} <= files
