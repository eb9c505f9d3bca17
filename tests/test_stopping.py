"""Stopping a study: `kill`, Ctrl-C, a signal to one worker and a second signal each stop every worker, fail the
running trials as interrupted in both stores, start no trial after the signal, and leave a study that resumes.

The stopped trials are held inside training until the study stops them (tests/hold), so no outcome depends on how
fast the machine is or whether the suite runs in the foreground or as a background job.
"""
from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient
from optuna.trial import TrialState

from study_helpers import (
    child_runs,
    env_without_tracking,
    holding,
    load_study,
    parent_runs,
    study_cmd,
    wait_for_held_trials,
)

TRIALS, WORKERS = 4, 2  # two trials held in training, two left that no worker may start after the signal


class HeldStudy:
    """A two-worker study whose first two trials train until stopped; its output goes to a file."""

    def __init__(self, workdir: Path, corpus_file: str, tmp_path: Path, from_script: bool = False,
                 hold_cleanup: bool = False):
        self.workdir, self.hold, self.log_path = workdir, tmp_path / "hold", tmp_path / "study.log"
        self.cmd = study_cmd(corpus_file, "--trials", str(TRIALS), "--workers", str(WORKERS))
        env = holding(env_without_tracking(), self.hold, trials=WORKERS)
        if hold_cleanup:
            (self.hold / "hold-cleanup").touch()
        log = open(self.log_path, "w")
        if from_script:  # as batch jobs, nohup and cron start it: in the background, SIGINT inherited ignored
            pid_file = tmp_path / "study.pid"
            self.proc = subprocess.Popen(["bash", "-c", '"$@" & echo $! > "$PID_FILE"; wait $!', "bash", *self.cmd],
                                         cwd=workdir, env={**env, "PID_FILE": str(pid_file)}, stdout=log,
                                         stderr=subprocess.STDOUT)
            while not pid_file.exists() or not pid_file.read_text().strip():
                assert self.proc.poll() is None, self.output()
                time.sleep(0.05)
            self.pid = int(pid_file.read_text())
        else:  # as a terminal starts its foreground job: its own process group, SIGINT at its default, whether or
            # not this test runs in a background job (which inherits SIGINT ignored)
            self.proc = subprocess.Popen(self.cmd, cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True,
                                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
            self.pid = self.proc.pid
        log.close()
        self.workers = wait_for_held_trials(self.hold, WORKERS, alive=lambda: self.proc.poll() is None)

    def output(self) -> str:
        return self.log_path.read_text()

    def wait_for_clean_up(self, timeout: float = 300) -> None:
        """Until every held trial is stopped and waits, inside its clean-up, for release()."""
        deadline = time.time() + timeout  # guards against a hang only
        while len(list(self.hold.glob("stopping-*"))) < WORKERS:
            assert self.proc.poll() is None and time.time() < deadline, self.output()
            time.sleep(0.05)

    def release(self) -> None:
        (self.hold / "release").touch()

    def finish(self) -> int:
        try:
            return self.proc.wait(timeout=300)  # guards against a hang only; a stop takes seconds
        except subprocess.TimeoutExpired:
            os.killpg(os.getpgid(self.pid), signal.SIGKILL)
            pytest.fail("the study did not stop: " + self.output())

    def assert_stopped(self) -> None:
        """Exit 130; the held trials FAIL "interrupted" with their runs KILLED; nothing else started or RUNNING."""
        code, out = self.finish(), self.output()
        assert code == 130, out
        assert "Run the same command to resume" in out
        assert "database is locked" not in out and "Traceback" not in out, out
        study = load_study(self.workdir)
        assert [t.state for t in study.trials] == [TrialState.FAIL] * WORKERS, out  # none started after the signal
        assert {t.user_attrs["fail_reason"] for t in study.trials} == {"interrupted"}
        client = MlflowClient(f"sqlite:///{self.workdir / 'mlflow.db'}")
        runs = child_runs(client, "smoke-verse")
        assert sorted(r.info.status for r in runs) == ["KILLED"] * WORKERS
        assert {r.data.tags["optuna_state"] for r in runs} == {"FAIL"}
        assert [p.info.status for p in parent_runs(client, "smoke-verse")] == ["KILLED"]
        for pid in self.workers:  # no worker goes on drawing trials
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)

    def assert_resumes(self) -> None:
        """The same command, trials no longer held, adds its trials to the study and closes it."""
        proc = subprocess.run(self.cmd, cwd=self.workdir, env=env_without_tracking(), capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        study = load_study(self.workdir)
        assert [t.state for t in study.trials][WORKERS:] == [TrialState.COMPLETE] * TRIALS
        client = MlflowClient(f"sqlite:///{self.workdir / 'mlflow.db'}")
        assert [p.info.status for p in parent_runs(client, "smoke-verse")] == ["FINISHED"]
        assert not [r for r in child_runs(client, "smoke-verse") if r.info.status == "RUNNING"]


def sigint_ignored(pid: int) -> bool:
    ignored = next(line for line in Path(f"/proc/{pid}/status").read_text().splitlines() if line.startswith("SigIgn"))
    return bool(int(ignored.split()[1], 16) & (1 << (signal.SIGINT - 1)))


def test_kill_stops_a_study_started_in_the_background_from_a_script(workdir, corpus_file, tmp_path):
    study = HeldStudy(workdir, corpus_file, tmp_path, from_script=True)
    assert sigint_ignored(study.pid) and all(sigint_ignored(pid) for pid in study.workers)
    os.kill(study.pid, signal.SIGTERM)  # `kill PID`
    study.assert_stopped()
    study.assert_resumes()


def test_ctrl_c_stops_every_worker(workdir, corpus_file, tmp_path):
    study = HeldStudy(workdir, corpus_file, tmp_path)
    assert not sigint_ignored(study.pid)
    os.killpg(study.pid, signal.SIGINT)  # what a terminal sends its foreground job
    study.assert_stopped()
    study.assert_resumes()


def test_sigterm_to_one_worker_stops_the_whole_study(workdir, corpus_file, tmp_path):
    """A scheduler (or the OOM killer's neighbour) may signal one process of the job: the study stops as a whole."""
    study = HeldStudy(workdir, corpus_file, tmp_path)
    os.kill(study.workers[0], signal.SIGTERM)
    study.assert_stopped()


def test_a_second_signal_during_the_clean_up_leaves_it_whole(workdir, corpus_file, tmp_path):
    study = HeldStudy(workdir, corpus_file, tmp_path, hold_cleanup=True)
    os.kill(study.pid, signal.SIGTERM)
    study.wait_for_clean_up()
    os.killpg(study.pid, signal.SIGINT)  # an impatient Ctrl-C, to the launcher and its workers
    os.kill(study.pid, signal.SIGTERM)
    study.release()
    study.assert_stopped()
    assert "already stopping" in study.output()


def test_kill_9_of_the_study_ends_its_workers_and_the_next_run_requeues_their_trials(workdir, corpus_file, tmp_path):
    study = HeldStudy(workdir, corpus_file, tmp_path)
    os.kill(study.pid, signal.SIGKILL)
    assert study.finish() == -signal.SIGKILL
    for pid in study.workers:  # they die with their launcher; the deadline only guards against a hang
        deadline = time.time() + 60
        while pid_alive(pid):
            assert time.time() < deadline, f"worker {pid} outlived its launcher by a minute"
            time.sleep(0.1)
    rerun = subprocess.run(study.cmd, cwd=workdir, env=env_without_tracking(), capture_output=True, text=True,
                           timeout=300)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert "trials [0, 1] were left RUNNING by a worker that died: failed and re-queued" in rerun.stdout
    trials = load_study(workdir).trials
    assert [t.state for t in trials[:WORKERS]] == [TrialState.FAIL] * WORKERS
    retried = {t.user_attrs["retry_of"]: t for t in trials if "retry_of" in t.user_attrs}
    assert sorted(retried) == [0, 1] and all(t.state == TrialState.COMPLETE for t in retried.values())
    assert retried[0].params == trials[0].params and retried[0].user_attrs.get("baseline")
    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    assert not [r for r in child_runs(client, "smoke-verse") if r.info.status == "RUNNING"]
    assert [p.info.status for p in parent_runs(client, "smoke-verse")] == ["FINISHED"]


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a killed child of a dead launcher is reaped by init; until then it is a zombie, already ended
    state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] if Path(f"/proc/{pid}").exists() else "X"
    return state not in ("Z", "X")
