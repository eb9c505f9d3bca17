"""The objective: suggest -> config -> train (pruned, tracked) -> sample -> value(s)."""
from __future__ import annotations

import dataclasses
import time

import optuna
import torch

from model.checkpoint import save_checkpoint
from model.data import Corpus
from model.tasks import count_params
from model.train import resolve_device, resolve_precision, train
from study.errors import describe_error, format_traceback
from study.recovery import StaleTrialHandler, mark_worker, recover_dead_workers
from study.registry import register_best_model
from study.settings import StudySettings
from study.space import suggest_params
from study.stopping import Stop
from study.storage import schedule_point
from study.summary import completed_trials
from study.tracking import StudyTracker, code_version

# Every configuration spends its first steps near the same loss (at step 250 of the cpu preset's trials, 2.43 to
# 2.51 whatever they end at), ranked by how fast it warms up; no trial is judged before five warm-ups are done.
JUDGED_AFTER_WARMUPS = 5


class ReportToOptuna:
    """Training callback: report val loss at each eval, at its point of the schedule, and stop the trial when the
    pruner says so (the training step it stopped at is user attribute `pruned_at_step`). Evals before step
    judge_from are reported but not judged: the pruner first sees the trial at its first eval from there on. An
    exempt trial (the baseline) is judged, so the others compare with it, but never stopped."""

    def __init__(self, trial: optuna.Trial, max_iters: int, judge_from: int = 0, exempt: bool = False):
        self.trial, self.max_iters, self.judge_from, self.exempt = trial, max_iters, judge_from, exempt
        self.last_point = None

    def on_eval(self, step: int, metrics: dict[str, float]) -> None:
        point = schedule_point(step, self.max_iters)
        if point == self.last_point:  # evals closer than a thousandth of the schedule: the first one counts
            return
        self.last_point = point
        self.trial.report(metrics["val_loss"], point)
        # at the last step there is nothing left to save
        if self.judge_from <= step < self.max_iters and self.trial.should_prune() and not self.exempt:
            self.trial.set_user_attr("pruned_at_step", step)
            raise optuna.TrialPruned(f"pruned at step {step} (val loss {metrics['val_loss']:.4f})")


class CutAtDeadline:
    """Training callback: once the study's --timeout has passed, the trial stops at its next step, PRUNED with the
    step it reached (user attributes `pruned_at_step` and `cut_by_timeout`) and its last eval's val loss: a study
    ends within its timeout plus one step, and a trial cut short is never recorded as complete."""

    def __init__(self, trial: optuna.Trial, deadline: float | None):
        self.trial, self.deadline = trial, deadline

    def on_step(self, step: int) -> None:
        if self.deadline is not None and time.time() >= self.deadline:
            self.trial.set_user_attr("pruned_at_step", step)
            self.trial.set_user_attr("cut_by_timeout", True)
            raise optuna.TrialPruned(f"cut by --timeout at step {step}")


class Objective:
    """suggest -> config -> train (pruned, tracked) -> sample -> value(s), for the study the settings describe."""

    def __init__(self, settings: StudySettings, corpus: Corpus, tracker: StudyTracker,
                 stale_handler: StaleTrialHandler | None = None, attrs: dict | None = None, stop: Stop | None = None):
        self.space, self.base, self.corpus, self.tracker = settings.space, settings.base, corpus, tracker
        self.objective, self.sample, self.prune = settings.objective, settings.sample, settings.pruner != "none"
        self.stale_handler, self.attrs, self.deadline = stale_handler, attrs or {}, settings.deadline
        self.stop = stop or Stop()  # a flag nothing sets: the trial runs to its end

    def __call__(self, trial: optuna.Trial) -> float | tuple[float, float]:
        run = None
        try:
            self.stop.check()  # asked between the last trial's end and this one's start
            mark_worker(trial)
            for key, value in self.attrs.items():
                trial.set_user_attr(key, value)
            if self.stale_handler is not None:  # a living worker fails and re-queues the trials of dead ones
                recover_dead_workers(trial.study, self.stale_handler)
            config = self.base.replace(**suggest_params(trial, self.space))
            device = resolve_device(config.device)
            baseline = bool(trial.user_attrs.get("baseline", False))
            run = self.tracker.start_trial(trial, config, baseline, {
                "n_params": count_params(config, self.corpus.vocab_size),
                "device": str(device), "precision": resolve_precision(config.precision, device),
                "corpus": self.corpus.name, "corpus_sha256": self.corpus.sha256,
                "code_version": code_version(), "trial_number": trial.number})
            trial.set_user_attr("mlflow_run_id", run.run_id)
            trial.set_user_attr("config", dataclasses.asdict(config))  # the full config, to re-run it exactly
            judge_from = JUDGED_AFTER_WARMUPS * config.warmup_iters
            reporter = ReportToOptuna(trial, config.max_iters, judge_from, exempt=baseline)  # the "before" runs whole
            callbacks = [self.stop, run, *([reporter] if self.prune else [])]
            if self.deadline is not None:  # nothing more on every step than the study asked for
                callbacks.append(CutAtDeadline(trial, self.deadline))
            result = train(config, self.corpus, callbacks)
            return self._finish(trial, run, result)
        except optuna.TrialPruned:
            run.end("PRUNED")
            raise
        except KeyboardInterrupt:
            trial.set_user_attr("fail_reason", "interrupted")
            if run is not None:
                run.end("FAIL", "interrupted", status="KILLED")
            raise
        except Exception as exc:
            reason = describe_error(exc)
            trial.set_user_attr("fail_reason", reason)
            if run is not None:
                run.log_text(format_traceback(exc), "error.txt")
                run.end("FAIL", reason)
            raise
        finally:
            if run is not None:  # end() stops it; this also covers an end() that was not reached
                run.stop_system_metrics()

    def _finish(self, trial: optuna.Trial, run, result) -> float | tuple[float, float]:
        text = self.sample.write(result.model, self.corpus.tokenizer)
        run.log_text(text, "sample.txt")
        self.stop.check()  # a trial running when the stop came is failed as interrupted, even this close to its end
        for key, value in result.outcome().items():  # the report reads the outcome record back from here
            trial.set_user_attr(key, value)
        if self._is_best_so_far(trial, result.best_val_loss):
            run.log_checkpoint(lambda d: save_checkpoint(d, result.model, self.corpus.tokenizer, result.config,
                                                         extra={"trial": trial.number, **result.summary()}))
            trial.set_user_attr("checkpoint", True)
            register_best_model(self.tracker, run.run_id, trial.number, result.best_val_loss, self.sample)
        run.end("COMPLETE")
        if self.objective == "loss-time":
            return result.best_val_loss, result.runtime_s
        return result.best_val_loss

    @staticmethod
    def _is_best_so_far(trial: optuna.Trial, loss: float) -> bool:
        return all(loss <= t.values[0] for t in completed_trials(trial.study))


def release_gpu_memory(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
    """Study callback: hand the finished trial's cached GPU memory back to the driver.

    Optuna calls it after collecting the trial's garbage (a failed trial's traceback holds its tensors until then),
    so workers sharing the GPU (--trials-per-gpu) can use what this one no longer needs.
    """
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()
