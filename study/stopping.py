"""Stopping a study: a signal asks, the running trials stop at their next training step, and no trial starts after.

A signal handler here never raises. It sets the process's flag, and the study reads the flag where stopping is safe:
at each training step, at the start of a trial and between trials. A KeyboardInterrupt raised wherever the signal
happened to land could surface inside a database driver as an ordinary error (taken for a trial's failure, after which
the worker drew the next trial) or cut a store write in half.

A launcher is its workers' channel: it sets a shared event and sends each worker SIGTERM, which every worker handles
itself whatever dispositions it inherited (a study started in the background from a script inherits SIGINT ignored,
and a SIGINT forwarded to its workers did nothing). A worker also dies with its launcher (kill -9): the next run of
the study fails and re-queues the trials it left.
"""
from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
import threading
import time

# A launcher waits this long for its workers to close their trials after a stop, then kills them (a worker busy
# compiling a graph reads the flag only at its next training step).
STOP_GRACE_S = 60.0


class StudyStopped(KeyboardInterrupt):
    """Raised where stopping is safe. A KeyboardInterrupt: Optuna fails the running trial and re-raises it, never
    catching it as an ordinary trial error."""


class Stop:
    """A process's stop flag, and its launcher's shared event (a multiprocessing Event) where it has one.

    As a training callback it stops the trial at the next step; as an Optuna study callback it starts no next trial.
    """

    def __init__(self, shared=None):
        self.shared = shared
        self.reason: str | None = None  # what asked to stop; None until something does

    @property
    def requested(self) -> bool:
        return self.reason is not None or (self.shared is not None and self.shared.is_set())

    def request(self, reason: str) -> None:
        if self.reason is None:
            self.reason = reason
        if self.shared is not None:
            self.shared.set()

    def check(self) -> None:
        if self.requested:
            raise StudyStopped(self.reason or "stopped by the study's launcher")

    def on_step(self, step: int) -> None:
        # the launcher signals every worker it stops, so the local flag suffices here: no lock taken per step
        if self.reason is not None:
            raise StudyStopped(self.reason)

    def __call__(self, study, trial) -> None:
        if self.requested:
            study.stop()


def _say(text: str) -> None:
    """A line on stderr from a signal handler: os.write, as print() may be in the middle of a write already."""
    with contextlib.suppress(OSError):
        os.write(sys.stderr.fileno(), (text + "\n").encode())


@contextlib.contextmanager
def stop_on_signals(stop: Stop, who: str = "study", relayed: bool = False):
    """SIGTERM, and SIGINT unless the process inherited it ignored (a background job's convention), set the flag.

    A second signal is reported and otherwise ignored, so that the clean-up runs to its end. relayed: a launcher
    relays the stop to this process (a worker), and says so itself; a worker then speaks only of a signal that came
    to it alone. Signal handlers belong
    to the main thread; elsewhere this does nothing (Ctrl-C then raises KeyboardInterrupt as Python's default).
    """
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def handle(signum, frame):
        name = signal.Signals(signum).name
        if stop.reason is not None:
            if not relayed:
                _say(f"{who}: {name}: already stopping, closing the running trials")
            return
        told = relayed and stop.requested  # by the launcher, which has said so
        stop.request(name)
        if not told:
            _say(f"{who}: {name}: stopping; the running trials are failed as interrupted")

    signals = [signal.SIGTERM] + ([signal.SIGINT] if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN else [])
    previous = {sig: signal.signal(sig, handle) for sig in signals}
    try:
        yield stop
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


PR_SET_PDEATHSIG = 1


def die_with_parent(parent_pid: int) -> None:
    """End this process the moment its parent (the launcher) dies, even by kill -9.

    Linux kills it at once (PR_SET_PDEATHSIG); elsewhere a thread checks the parent every second. A parent that died
    before this was set up is seen at once.
    """
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        armed = libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0
    except (OSError, AttributeError):  # no prctl: not Linux
        armed = False
    if os.getppid() != parent_pid:
        os._exit(1)
    if armed:
        return

    def watch() -> None:
        while True:
            time.sleep(1.0)
            if os.getppid() != parent_pid:
                os._exit(1)

    threading.Thread(target=watch, name="watch-launcher", daemon=True).start()
