"""Loaded at start-up by every Python process of a test that puts this folder first on PYTHONPATH.

With CHARGPT_TEST_HOLD=DIR:N, the first N trials to start training (whichever processes run them) stop just after
their first eval and wait there, still inside training, until the test creates DIR/release or their study stops them;
each writes DIR/training-K holding its pid when it starts waiting. A test can then signal a study, kill a worker or
restart a server while trials are certainly in the middle of training, however busy the machine: no race with a
short trial. Trials after the first N train as usual. Where DIR/hold-cleanup exists, a held trial that is stopped
writes DIR/stopping-K and waits for DIR/release before its clean-up goes on, so a test can signal again during it.
"""
import os
import time

_spec = os.environ.get("CHARGPT_TEST_HOLD")
if _spec:
    import model.train

    _dir, _held = _spec.rsplit(":", 1)
    _real_train = model.train.train
    _GUARD_S = 600  # a forgotten release must not hang a test run forever

    def _path(name: str) -> str:
        return os.path.join(_dir, name)

    def _claim() -> int | None:
        for k in range(int(_held)):
            try:
                os.close(os.open(_path(f"held-{k}"), os.O_CREAT | os.O_EXCL))
                return k
            except FileExistsError:
                continue
        return None

    def _wait_for_release(poll=lambda: None) -> None:
        deadline = time.monotonic() + _GUARD_S
        while not os.path.exists(_path("release")) and time.monotonic() < deadline:
            poll()
            time.sleep(0.02)

    class _Hold:
        """A training callback: at the step after the first eval, wait, still calling the other step hooks (the
        study's stop among them), until released."""

        def __init__(self, ticket: int, at_step: int, hooks: list):
            self.ticket, self.at_step, self.hooks = ticket, at_step, hooks

        def on_step(self, step: int) -> None:
            if step != self.at_step:
                return
            with open(_path(f"training-{self.ticket}.tmp"), "w") as f:
                f.write(str(os.getpid()))
            os.replace(_path(f"training-{self.ticket}.tmp"), _path(f"training-{self.ticket}"))
            _wait_for_release(lambda: [hook(step) for hook in self.hooks])

    def _held_train(config, corpus, callbacks=(), task=None):
        ticket = _claim()
        if ticket is None:
            return _real_train(config, corpus, callbacks, task)
        hooks = [cb.on_step for cb in callbacks if hasattr(cb, "on_step")]
        try:
            return _real_train(config, corpus, [*callbacks, _Hold(ticket, config.eval_interval + 1, hooks)], task)
        except KeyboardInterrupt:
            if os.path.exists(_path("hold-cleanup")):
                open(_path(f"stopping-{ticket}"), "w").close()
                _wait_for_release()
            raise

    model.train.train = _held_train
