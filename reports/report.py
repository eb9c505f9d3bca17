"""`python reports/generate.py --study-name NAME`: baseline-vs-tuned tables, plots and samples for a study.

The command's work; reports/generate.py is its script. From Python: `generate_report()` and `load_trials()`.
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Sequence

from mlflow.exceptions import MlflowException

from model.cli import Parser, fail, options_checked, parse_checked
from model.config import ConfigError
from model.data import DataError, load_corpus
from reports import analysis, plots
from reports.collect import ReportError, StudyData, load, loss_curves, open_study, run_params, run_text
from reports.confirm import confirm, trial_config
from reports.render import Report
from study.errors import first_line, redact
from study.space import SEARCHED
from study.storage import StorageError
from study.summary import comparison_table, study_summary, trials_table
from study.tracking import TrackingError, check_tracking, resolve_tracking_uri

PROG = "python reports/generate.py"


def build_parser() -> Parser:
    parser = Parser(prog=PROG, description="baseline-vs-tuned tables, plots and samples for a study.")
    parser.add_argument("--study-name", required=True)
    parser.add_argument("--storage", metavar="URL", help="the study's storage (default: ./optuna.journal)")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, else ./mlflow.db)")
    parser.add_argument("--out", metavar="DIR", help="output directory (default: reports/<study-name>)")
    parser.add_argument("--confirm-seeds", type=int, default=0, metavar="K",
                        help="re-train baseline and tuned configurations with K fresh seeds (default: 0, off)")
    parser.add_argument("--data", metavar="PATH", help="the study's corpus, if not at the path the study recorded")
    return parser


def check_args(args) -> None:
    if args.confirm_seeds < 0:
        raise ConfigError(f"--confirm-seeds must be >= 0, got {args.confirm_seeds}")


def parse_args(argv: Sequence[str] | None):
    return parse_checked(build_parser(), argv, check_args)


def study_corpus(data: StudyData, path: str | None):
    """The corpus the study trained on (verified by SHA-256), or None when it is not at hand."""
    params = run_params(data.client, data.parent_run_id) if data.parent_run_id else {}
    if path is None:
        path = params.get("corpus_path")
        if not path or not Path(path).is_file():
            return None  # only samples' word share and --confirm-seeds need it; they say so

    corpus = load_corpus(path)
    expected = params.get("corpus_sha256")
    if expected and corpus.sha256 != expected:
        raise DataError(f"{path}: SHA-256 {corpus.sha256[:12]}... differs from the study's corpus {expected[:12]}...")
    return corpus


def add_samples(report: Report, data: StudyData, trials: dict, corpus, tmp: Path) -> None:
    words = analysis.corpus_words(corpus.tokenizer.decode(corpus.train.tolist())) if corpus else None
    items = []
    for label, t in trials.items():
        text = run_text(data.client, data.run_id(t) or "", "sample.txt", tmp / "dl" / label)
        if text is None:
            continue
        share = analysis.word_share(text, words) if words else None
        quality = f"{share:.0%} of generated words occur in the training corpus" if share is not None else \
            "corpus not at hand: no word-share figure"
        items.append((f"{label} (trial {t.number}): {quality}", text))
    report.heading("Samples")
    if items:
        report.paragraph("Same prompt, seed, length and temperature for every trial.")
        report.samples(items)
    else:
        report.paragraph("No stored samples for these trials.")


def add_plots(report: Report, data: StudyData, trials: dict, out: Path, importance) -> None:
    report.heading("Plots")
    df, space = data.trials, plots.search_space(data.study)
    attempts = [("optimization_history.png", "Optimization history", lambda: plots.plot_history(df))]
    run_ids = {label: data.run_id(t) for label, t in trials.items()}
    curves = {label: loss_curves(data.client, run_id) for label, run_id in run_ids.items() if run_id}
    if curves:
        attempts.append(("loss_curves.png", "Loss curves", lambda: plots.plot_loss_curves(curves)))
    if importance is not None:
        attempts.append(("importance.png", "Hyperparameter importance", lambda: plots.plot_importance(importance)))
    attempts += [("param_slices.png", "Val loss against each hyperparameter",
                  lambda: plots.plot_param_slices(df, space)),
                 ("loss_vs_runtime.png", "Val loss against runtime", lambda: plots.plot_loss_vs_runtime(df))]
    if len(data.completed()) >= 2:
        attempts.append(("parallel_coordinates.png", "Parallel coordinates", lambda: plots.plot_parallel(df, space)))
    for name, title, draw in attempts:
        report.image(plots.save(draw(), out / name), title)
    if importance is None or len(data.completed()) < 2:
        report.paragraph("Importance and parallel coordinates need at least two completed trials.")


def build(data: StudyData, args, out: Path, corpus) -> Report:
    name = data.study.study_name
    report = Report(f"Tuning report: {name}")
    data.trials.to_csv(out / "trials.csv")
    baseline, best = data.baseline(), data.best()
    counts = {"total": len(data.trials), **{s: int((data.trials["state"] == s).sum())
                                             for s in ("COMPLETE", "PRUNED", "FAIL", "RUNNING")}}
    table = None
    if baseline is not None and baseline.state.name == "COMPLETE" and best is not None:
        table = comparison_table(baseline, best, data.pareto())
        table.to_csv(out / "comparison.csv")
    only_baseline = counts["COMPLETE"] == 1 and table is not None
    importance = analysis.importances(data.study) if counts["COMPLETE"] >= 2 else None

    confirmation = None
    if args.confirm_seeds and table is not None:
        if corpus is None:
            raise DataError("--confirm-seeds needs the corpus: pass --data")
        configs = {"baseline": trial_config(baseline)}
        if best.number != baseline.number:
            configs["tuned"] = trial_config(best)
        seeds = [10_000 + i for i in range(args.confirm_seeds)]  # fresh: no trial trained with these
        confirmation = confirm(configs, corpus, seeds, data.client, data.parent_run_id)

    missing = None
    if only_baseline:
        missing = "Only the baseline trial has finished so far: run more trials to compare."
    elif table is None:
        missing = (f"The baseline trial is {baseline.state.name if baseline else 'missing'}: "
                   "no before/after comparison.")
    report.heading("Findings")
    summary = study_summary(data.study)
    spent = {k: summary[k] for k in ("search_wall_s", "trials_s", "best_found_after_s") if k in summary}
    for sentence in analysis.findings(None if missing else table, importance, counts, confirmation, missing, spent):
        report.paragraph(sentence)
    report.heading("Baseline vs tuned")
    if table is not None:
        report.table(table)
    else:
        report.paragraph(missing)
    if confirmation:
        report.heading(f"Confirmation over {args.confirm_seeds} fresh seeds")
        report.table(confirmation["summary"])
        report.paragraph(confirmation["verdict"])
        confirmation["summary"].to_csv(out / "confirmation.csv")
    trials = {"baseline": baseline, "tuned": best} if baseline and best and best.number != baseline.number else \
        {k: v for k, v in {"baseline": baseline, "best": best}.items() if v is not None}
    add_plots(report, data, {k: t for k, t in trials.items() if t.state.name != "FAIL"}, out, importance)
    add_samples(report, data, trials, corpus, out)
    report.heading("Top trials")
    top = data.trials[data.trials["state"] == "COMPLETE"].sort_values("best_val_loss").head(10)
    report.table(top[["best_val_loss", "runtime_s", *SEARCHED]])
    shutil.rmtree(out / "dl", ignore_errors=True)
    return report


def write_report(data: StudyData, args, out: Path, corpus) -> None:
    """Build in a temporary directory beside out, then swap it in: out is never left half-written."""
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / "report.md").exists())):
        raise ReportError(f"--out {out}: exists and is not an earlier report; pick an empty or new directory")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        report = build(data, args, tmp, corpus)
        (tmp / "report.md").write_text(report.markdown(), encoding="utf-8")
        (tmp / "report.html").write_text(report.html(), encoding="utf-8")
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


ERRORS = (ReportError, StorageError, DataError, ConfigError, TrackingError)


def execute(args) -> Path:
    """Write the report and log it on the study's parent run; raises ERRORS (or MlflowException) on bad input."""
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    out = Path(args.out or Path("reports") / args.study_name)
    tracking_uri = resolve_tracking_uri(args.tracking_uri)
    check_tracking(tracking_uri)
    data = load(args.study_name, args.storage, tracking_uri)
    corpus = study_corpus(data, args.data)
    write_report(data, args, out, corpus)
    if data.parent_run_id:
        data.client.log_artifacts(data.parent_run_id, str(out), "report")
    return out


def generate_report(study_name: str, **options) -> Path:
    """Write a study's report from Python, as `python reports/generate.py` does; returns its directory.

    Options are the command line's, with underscores: out, storage, tracking_uri, confirm_seeds, data.
    """
    return execute(options_checked(build_parser(), check_args, study_name=study_name, **options))


def load_trials(study_name: str, storage: str | None = None):
    """A study's trials as a DataFrame, one row per trial (the table trials.csv holds), finished or not."""
    return trials_table(open_study(study_name, storage))


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        out = execute(args)
    except ERRORS as exc:
        fail(str(exc), PROG)
    except MlflowException as exc:
        fail(f"MLflow tracking at {redact(resolve_tracking_uri(args.tracking_uri))}: {first_line(exc)}", PROG)
    print(f"report written to {out}/ (report.md, report.html, comparison.csv, trials.csv, plots)")
    return 0
