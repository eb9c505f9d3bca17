"""Confirmation: re-train the baseline and the tuned configuration with fresh seeds, to see past the noise."""
from __future__ import annotations

import dataclasses
import math
import statistics

import pandas as pd
from mlflow import MlflowClient
from mlflow.entities import Param
from optuna.trial import FrozenTrial

from model.config import TrainConfig
from model.data import Corpus
from model.train import train
from reports.collect import ReportError
from study.errors import describe_error
from study.tracking import TrialRun


def trial_config(t: FrozenTrial) -> TrainConfig:
    if "config" not in t.user_attrs:
        raise ReportError(f"trial {t.number} has no stored config to re-run")
    return TrainConfig(**t.user_attrs["config"])


def _tracked_run(client: MlflowClient, parent_run_id: str, label: str, config: TrainConfig) -> TrialRun:
    experiment_id = client.get_run(parent_run_id).info.experiment_id
    run_id = client.create_run(experiment_id, run_name=f"confirm-{label}-seed{config.seed}", tags={
        "mlflow.parentRunId": parent_run_id, "role": "confirmation", "confirmation": "true",
        "configuration": label, "seed": str(config.seed)}).info.run_id
    client.log_batch(run_id, params=[Param(k, str(v)) for k, v in dataclasses.asdict(config).items()])
    return TrialRun(client, run_id)


def confirm(configs: dict[str, TrainConfig], corpus: Corpus, seeds: list[int], client: MlflowClient,
            parent_run_id: str | None, progress=print) -> dict:
    """Train each configuration once per seed; returns per-run rows, a mean/std table and a verdict."""
    rows = []
    for label, config in configs.items():
        for seed in seeds:
            cfg = config.replace(seed=seed)
            run = _tracked_run(client, parent_run_id, label, cfg) if parent_run_id else None
            try:
                result = train(cfg, corpus, [run] if run else [])
            except Exception as exc:
                if run:
                    run.end("FAIL", describe_error(exc))
                raise ReportError(f"confirmation of the {label} configuration with seed {seed} failed: "
                                  f"{describe_error(exc)}") from None
            if run:
                run.end()
            rows.append({"configuration": label, "seed": seed, "best_val_loss": result.best_val_loss,
                         "runtime_s": result.runtime_s})
            progress(f"confirmation {label} seed {seed}: best val loss {result.best_val_loss:.4f}, "
                     f"{result.runtime_s:.1f} s")
    runs = pd.DataFrame(rows)
    summary = runs.groupby("configuration", sort=False).agg(
        best_val_loss_mean=("best_val_loss", "mean"), best_val_loss_std=("best_val_loss", "std"),
        runtime_s_mean=("runtime_s", "mean"), runtime_s_std=("runtime_s", "std"), seeds=("seed", "count"))
    return {"runs": runs, "summary": summary, "verdict": verdict(runs)}


def verdict(runs: pd.DataFrame) -> str:
    """Does the improvement exceed seed-to-seed noise? Two standard errors of the difference of means."""
    by = {k: list(g["best_val_loss"]) for k, g in runs.groupby("configuration")}
    if set(by) != {"baseline", "tuned"}:
        return "Confirmation re-trained only the baseline: there is no distinct tuned configuration."
    b, t = by["baseline"], by["tuned"]
    diff = statistics.mean(b) - statistics.mean(t)
    if len(b) < 2 or len(t) < 2:
        return (f"With one seed each the confirmation cannot measure noise: the tuned configuration is "
                f"{diff:+.4f} lower in val loss (positive means better).")
    se = math.sqrt(statistics.variance(b) / len(b) + statistics.variance(t) / len(t))
    if diff > 2 * se:
        return (f"Confirmed over {len(b)} fresh seeds: the tuned configuration's val loss is {diff:.4f} lower, "
                f"more than twice the standard error of the difference ({se:.4f}).")
    return (f"Not confirmed over {len(b)} fresh seeds: the difference in val loss ({diff:+.4f}) is within twice "
            f"its standard error ({se:.4f}); the best trial's advantage may be seed luck.")
