"""`--workers N`: N worker processes on one study, each with its share of the trials, replaced if killed."""
from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import optuna
import torch
from optuna.trial import TrialState

from study.recovery import STALE_ATTR, StaleTrialHandler, recover_dead_workers

RUN_PY = Path(__file__).resolve().parent / "run.py"
MAX_RESPAWNS = 2
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)


def shares(trials: int, workers: int) -> list[int]:
    """Split trials as evenly as possible: exactly the requested number in total."""
    return [trials // workers + (i < trials % workers) for i in range(workers)]


def worker_env(index: int, threads: int, spread_gpus: bool = True) -> dict:
    """Round-robin GPUs when there are several (unless told not to); on one GPU or the CPU the workers share it.

    torch.compile's code generation uses as many processes as there are cores unless told otherwise:
    each worker gets its share, as for training threads.
    """
    env = os.environ.copy()
    env.setdefault("TORCHINDUCTOR_COMPILE_THREADS", str(threads))
    gpus = torch.cuda.device_count()
    if gpus > 1 and spread_gpus:
        visible = env.get("CUDA_VISIBLE_DEVICES")
        ids = visible.split(",") if visible else [str(g) for g in range(gpus)]
        env["CUDA_VISIBLE_DEVICES"] = ids[index % len(ids)]
    return env


def done_by(study: optuna.Study, launch_id: str, index: int) -> int:
    """Trials worker `index` of this launch finished (those failed because a worker died do not count)."""
    return sum(1 for t in study.get_trials(deepcopy=False, states=FINISHED)
               if t.user_attrs.get("launch_id") == launch_id and t.user_attrs.get("worker_index") == index
               and not t.user_attrs.get(STALE_ATTR))


class Launcher:
    def __init__(self, argv: list[str], trials: int, workers: int, threads: int | None, device: str = "auto"):
        self.argv, self.trials, self.workers = argv, trials, workers
        self.spread_gpus = ":" not in device  # --device cuda:N keeps every worker on GPU N
        self.threads = threads or max(1, (os.cpu_count() or 1) // workers)
        self.launch_id = uuid.uuid4().hex[:12]
        self.procs: dict[int, subprocess.Popen] = {}

    def spawn(self, index: int, share: int) -> None:
        cmd = [sys.executable, str(RUN_PY), *self.argv, "--trials", str(share), "--workers", "1",
               "--worker-index", str(index), "--launch-id", self.launch_id, "--threads", str(self.threads)]
        self.procs[index] = subprocess.Popen(cmd, env=worker_env(index, self.threads, self.spread_gpus))

    def run(self, study: optuna.Study, handler: StaleTrialHandler) -> bool:
        """Start the workers and wait; a worker that dies is replaced for the rest of its share.

        Returns False when interrupted (Ctrl-C reaches the workers too; each fails its running trial).
        """
        plan = dict(enumerate(shares(self.trials, self.workers)))  # each index's share, replacements included
        respawns = dict.fromkeys(plan, 0)
        for index, share in plan.items():
            if share:
                self.spawn(index, share)
        gpus = min(torch.cuda.device_count(), self.workers) if self.spread_gpus else 1
        where = f"{gpus} GPU{'s' * (gpus > 1)}, " if torch.cuda.is_available() else ""
        print(f"{len(self.procs)} workers on {where}{self.threads} CPU threads each, trials {list(plan.values())}",
              flush=True)
        try:
            while self.procs:
                time.sleep(0.5)
                for index, proc in list(self.procs.items()):
                    code = proc.poll()
                    if code is None:
                        continue
                    del self.procs[index]
                    if code == 0:
                        continue
                    recovered = recover_dead_workers(study, handler)
                    left = plan[index] - done_by(study, self.launch_id, index)
                    print(f"worker {index} exited with {code}; trials {recovered} failed and re-queued; "
                          f"{left} of its trials left", flush=True)
                    if left > 0 and respawns[index] < MAX_RESPAWNS:
                        respawns[index] += 1
                        self.spawn(index, left)
        except KeyboardInterrupt:
            for proc in self.procs.values():
                proc.wait()
            recover_dead_workers(study, handler)
            return False
        recover_dead_workers(study, handler)
        return True
