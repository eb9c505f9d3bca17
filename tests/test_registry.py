"""The best trial as a registered MLflow model: alias `best`, pyfunc predict, and `mlflow models serve`."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from conftest import VERSE
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from optuna.trial import TrialState

from model.sample import SampleSpec
from study import registry
from study.registry import settle_best_model
from study.summary import study_summary
from study.tracking import StudyTracker
from study_helpers import free_port, load_study, run_study, wait_until_up

STUDY = "smoke-verse"
ROMEO = "ROMEO:\nBut soft, what light through yonder window breaks?\n\n"
SAMPLE_TOKENS = 30  # the study's sample length: the model's default max_new_tokens


@pytest.fixture(scope="module")
def study_dir(tmp_path_factory):
    """One short study for the module; MLFLOW_TRACKING_URI points at its sqlite store."""
    work = tmp_path_factory.mktemp("registry")
    (work / "verse.txt").write_text((VERSE + ROMEO) * 10, encoding="utf-8")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(work)
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        assert run_study("--trials", "3", "--pruner", "none", "--data", str(work / "verse.txt"),
                         "--sample-tokens", str(SAMPLE_TOKENS)) == 0
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{work / 'mlflow.db'}")
        yield work


def test_alias_best_points_at_the_best_trials_version(study_dir):
    study = load_study(study_dir, STUDY)
    version = MlflowClient().get_model_version_by_alias(STUDY, "best")
    assert version.run_id == study.best_trial.user_attrs["mlflow_run_id"]
    assert version.tags["trial_number"] == str(study.best_trial.number)
    assert float(version.tags["best_val_loss"]) == pytest.approx(study.best_value)


def test_the_study_end_gives_alias_best_back_to_the_best_trial(study_dir):
    """A worse trial of another worker that registered last holds the alias: the study's end takes it back."""
    client = MlflowClient()
    best = client.get_model_version_by_alias(STUDY, "best")
    others = [v for v in client.search_model_versions(f"name='{STUDY}'") if v.version != best.version]
    if others:
        client.set_registered_model_alias(STUDY, "best", others[0].version)
    else:  # the baseline was the best: only one version, so lose the alias instead
        client.delete_registered_model_alias(STUDY, "best")
    tracker = StudyTracker(os.environ["MLFLOW_TRACKING_URI"], STUDY)
    settle_best_model(tracker, study_summary(load_study(study_dir, STUDY)), SampleSpec("ROMEO:"))
    assert client.get_model_version_by_alias(STUDY, "best").version == best.version


def test_the_registered_model_generates_from_each_prompt_at_any_length(study_dir):
    model = mlflow.pyfunc.load_model(f"models:/{STUDY}@best")
    block_size = load_study(study_dir, STUDY).best_trial.params["block_size"]
    prompts = pd.DataFrame([{"prompt": "First", "max_new_tokens": 5, "seed": 1},
                            {"prompt": "All:", "max_new_tokens": 3 * block_size, "seed": 2, "temperature": 1.0}])
    texts = model.predict(prompts)
    # each text is its prompt followed by max_new_tokens characters, beyond the trained context too
    assert [len(t) for t in texts] == [5 + 5, 4 + 3 * block_size]
    assert texts[0].startswith("First") and texts[1].startswith("All:")
    assert model.predict(prompts) == texts  # the same seed gives the same text
    (default,) = model.predict(pd.DataFrame({"prompt": ["ROMEO:"]}))
    assert len(default) == len("ROMEO:") + SAMPLE_TOKENS  # defaults are the study's sample settings
    with pytest.raises(MlflowException, match="outside the model's vocabulary: '#' '%'"):
        model.predict(pd.DataFrame({"prompt": ["ROMEO: %#"]}))


def test_mlflow_models_serve_answers_invocations_with_generated_text(study_dir, tmp_path):
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # the model brings its own code
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # serve runs the venv's uvicorn
    log = open(tmp_path / "serve.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "models", "serve", "-m", f"models:/{STUDY}@best",
                             "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)],
                            cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(proc, url + "/ping", tmp_path / "serve.log", "mlflow models serve", timeout=180)
        body = {"dataframe_records": [{"prompt": "ROMEO:", "max_new_tokens": 20, "seed": 1}]}
        (text,) = json.loads(_post(url, body).read())["predictions"]
        assert text.startswith("ROMEO:") and len(text) == len("ROMEO:") + 20
        with pytest.raises(urllib.error.HTTPError) as bad:
            _post(url, {"dataframe_records": [{"prompt": "ROMEO: #"}]})
        assert bad.value.code == 400 and "outside the model's vocabulary: '#'" in bad.value.read().decode()
        cap = 10_000  # study/pyfunc_model.py's MAX_NEW_TOKENS_PER_REQUEST (importing it would set a model)
        greedy = {"dataframe_records": [{"prompt": "ROMEO:", "max_new_tokens": cap},
                                        {"prompt": "All:", "max_new_tokens": 1}]}
        with pytest.raises(urllib.error.HTTPError) as too_long:  # refused at once, nothing generated
            _post(url, greedy)
        assert too_long.value.code == 400
        assert f"a request may ask for at most {cap} (all its rows together)" in too_long.value.read().decode()
    finally:
        _kill_group(proc)
        log.close()


def _kill_group(proc: subprocess.Popen) -> None:
    """The serve command and the server process it started (its own session)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
            proc.wait(timeout=30)
            return
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            continue


def test_an_unavailable_registry_warns_and_the_trial_completes(workdir, corpus_file, monkeypatch, capsys):
    def unavailable(*args, **kwargs):
        raise MlflowException("registry unavailable")

    monkeypatch.setattr(registry, "log_model", unavailable)
    assert run_study("--trials", "1", "--data", corpus_file, "--sample-tokens", "5") == 0
    assert "warning: model not registered (MlflowException: registry unavailable)" in capsys.readouterr().err
    (trial,) = load_study(workdir).trials
    assert trial.state == TrialState.COMPLETE
    run = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}").get_run(trial.user_attrs["mlflow_run_id"])
    assert run.data.tags["model_registry_warning"].startswith("model not registered")


def _post(url: str, body: dict):
    request = urllib.request.Request(url + "/invocations", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
    return urllib.request.urlopen(request, timeout=120)
