"""The tracking spool on disk: a directory per MLflow run holding its writes as JSON lines, replay progress, a lock."""
from __future__ import annotations

import fcntl
import itertools
import json
import os
import shutil
import time
from pathlib import Path

DEFAULT_SPOOL_DIR = "mlflow-spool"
META, OPS, PROGRESS, LOCK, FILES = "meta.json", "ops.jsonl", "progress.json", "lock", "files"
SPOOL_PREFIX = "spool-"  # local ids of runs created while the server was away
_sequence = itertools.count()  # orders the directories one process creates within one nanosecond tick


class SpoolError(ValueError):
    """A spool directory that cannot be read; the message names it."""


def spool_root(spool_dir: str | None) -> Path:
    """--spool-dir, else ./mlflow-spool in the working directory."""
    return Path(spool_dir) if spool_dir else Path.cwd() / DEFAULT_SPOOL_DIR


def is_spool_id(ref: object) -> bool:
    return isinstance(ref, str) and ref.startswith(SPOOL_PREFIX)


def run_dirs(root: Path) -> list[Path]:
    """The run directories in the order they were created (their names start with the creation time)."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def read_meta(path: Path) -> dict:
    try:
        meta = json.loads((path / META).read_text(encoding="utf-8"))
        if not {"tracking_uri", "ref", "experiment_id", "ends_run"} <= meta.keys():
            raise ValueError("fields missing")
        return meta
    except (OSError, ValueError) as exc:
        raise SpoolError(f"{path}: not a run spooled by the study ({META}: {exc})") from None


def _write_json_atomically(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data), encoding="utf-8")
    os.replace(tmp, path)


class RunSpool:
    """One run's writes, in order. The writer holds the lock while it may still append; a replayer needs it too."""

    def __init__(self, path: Path, lock_fd: int):
        self.path, self._lock_fd = path, lock_fd
        self.meta = read_meta(path)

    @classmethod
    def create(cls, root: Path, ref: str, tracking_uri: str, experiment_id: str | None, ends_run: bool) -> RunSpool:
        """A new locked directory, appearing whole: readers never see it without its meta."""
        name = f"{time.time_ns():020d}-{next(_sequence):06d}-{os.getpid()}-{ref}"
        tmp = root / f".{name}"
        (tmp / FILES).mkdir(parents=True)
        _write_json_atomically(tmp / META, {"tracking_uri": tracking_uri, "ref": ref, "experiment_id": experiment_id,
                                            "ends_run": ends_run, "pid": os.getpid()})
        fd = os.open(tmp / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.rename(tmp, root / name)
        return cls(root / name, fd)

    @classmethod
    def claim(cls, path: Path) -> RunSpool | None:
        """The directory with its lock taken, or None while its writer (or another replayer) holds it or it is gone."""
        try:
            fd = os.open(path / LOCK, os.O_RDWR)
        except FileNotFoundError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if not (path / META).exists():  # replayed and deleted while we waited
                raise BlockingIOError
            return cls(path, fd)
        except BlockingIOError:
            os.close(fd)
            return None
        except BaseException:
            os.close(fd)
            raise

    @property
    def ref(self) -> str:
        return self.meta["ref"]

    def append(self, op: dict) -> None:
        with open(self.path / OPS, "a", encoding="utf-8") as f:
            f.write(json.dumps(op) + "\n")

    def keep_files(self, local_dir: str) -> str:
        """A copy of local_dir inside the spool (the caller's directory is temporary); returns its relative path."""
        relative = f"{FILES}/{len(list((self.path / FILES).iterdir()))}"
        shutil.copytree(local_dir, self.path / relative)
        return relative

    def ops(self) -> list[dict]:
        """The writes in order; a last line torn by a crash while it was written is left out."""
        try:
            lines = (self.path / OPS).read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            return []
        ops = []
        for number, line in enumerate(lines, 1):
            try:
                ops.append(json.loads(line))
            except ValueError:
                if number < len(lines):
                    raise SpoolError(f"{self.path / OPS}: line {number} is not JSON") from None
        return ops

    def progress(self) -> dict:
        """How far a replay got: ops applied, and the run id on the server once known."""
        try:
            return json.loads((self.path / PROGRESS).read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {"applied": 0, "run_id": None}

    def save_progress(self, applied: int, run_id: str | None) -> None:
        _write_json_atomically(self.path / PROGRESS, {"applied": applied, "run_id": run_id})

    def release(self) -> None:
        """Give up the lock: the directory is whole and anyone may replay it."""
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def delete(self) -> None:
        shutil.rmtree(self.path)
        self.release()
