"""How benchmarks/gpu.py runs its steps: each command on the run's clock, stopped at its mark with what it printed kept,
and the figures file, rewritten whole at every change. Only the standard library, as gpu.py.
"""
from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import threading
import time
from pathlib import Path

KILL_GRACE_S = 15  # after SIGTERM at a step's mark, before SIGKILL: the study stops its trials in about 4 s
GIVE_UP_S = 5  # after SIGKILL, before no longer waiting for the step's output (a process outside its group may hold it)

# The headline figures, always present (null until measured): the keys docs/gpu.md describes.
HEADLINE = ("device", "torch", "speedup_vs_nanogpt", "val_loss_5000", "study_trials", "study_wall_s",
            "confirmed_val_loss_mean", "tokens_per_s", "nanogpt_tokens_per_s")


class Figures:
    """The JSON file, rewritten whole (atomically) at every change."""

    def __init__(self, path: Path, head: dict):
        self.path, self.data = path, {**dict.fromkeys(HEADLINE), **head, "steps": {}}
        self.save()

    def set(self, **values) -> None:
        self.data.update(values)
        nano, ours = self.data["nanogpt_tokens_per_s"], self.data["tokens_per_s"]
        if nano and ours:
            self.data["speedup_vs_nanogpt"] = round(ours / nano, 3)
        self.save()

    def step(self, name: str, **values) -> None:
        self.data["steps"].setdefault(name, {}).update(values)
        self.save()

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.write_text(json.dumps(self.data, indent=2) + "\n")
        os.replace(tmp, self.path)


class Run:
    """Runs one step's commands: output to its log and the console, stopped at the step's mark."""

    def __init__(self, env: dict, logs: Path):
        self.env, self.logs = env, logs

    def __call__(self, step: str, cmd: list[str], cwd: Path, mark: float, on_line=None,
                 env: dict | None = None) -> tuple[int | None, bool]:
        """(exit code, whether the mark cut it); on_line(seconds, line) sees each line as it arrives."""
        proc = subprocess.Popen(cmd, cwd=cwd, env=env or self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True)  # its own group: a stop reaches its workers too
        lines: queue.Queue = queue.Queue()  # read in a thread, so that the mark is kept while the step is silent

        def read() -> None:
            for line in proc.stdout:
                lines.put(line)
            lines.put(None)

        threading.Thread(target=read, daemon=True).start()
        cut, kill_at, give_up_at = False, None, None
        with open(self.logs / f"{step}.log", "a") as log:
            log.write(f"$ {' '.join(cmd)}\n")
            while True:
                now = time.monotonic()
                if not cut and now >= mark:
                    cut, kill_at = True, now + KILL_GRACE_S
                    self._signal(proc, signal.SIGTERM)
                    print(f"[{step}] stopped at its mark", flush=True)
                elif kill_at and now >= kill_at:
                    self._signal(proc, signal.SIGKILL)
                    kill_at, give_up_at = None, now + GIVE_UP_S
                elif give_up_at and now >= give_up_at:
                    break
                try:
                    line = lines.get(timeout=0.2)
                except queue.Empty:
                    continue
                if line is None:
                    break
                log.write(line)
                if not line.startswith("trials:"):  # the study's progress bar: in the log only
                    print(f"[{step}] {line}", end="", flush=True)
                if on_line:
                    on_line(time.perf_counter(), line.rstrip("\n"))
        try:
            return proc.wait(timeout=GIVE_UP_S), cut
        except subprocess.TimeoutExpired:
            return None, cut

    @staticmethod
    def _signal(proc: subprocess.Popen, sig: int) -> None:
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass


def last_json(lines: list[str]) -> dict | None:
    for line in reversed(lines):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                return None
    return None
