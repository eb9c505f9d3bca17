"""`python study/run.py --trials 50`: an Optuna study over the GPT's hyperparameters, each trial tracked in MLflow."""
from __future__ import annotations

import sys
from pathlib import Path

# Runnable as a script from any directory: the project root, not study/, goes on the import path.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))

import argparse  # noqa: E402
from typing import Sequence  # noqa: E402

import optuna  # noqa: E402
from mlflow.exceptions import MlflowException  # noqa: E402
import torch  # noqa: E402

from model.cli import Parser, add_config_flags, fail, options_checked, parse_checked  # noqa: E402
from model.config import ConfigError, TrainConfig  # noqa: E402
from model.data import Corpus  # noqa: E402
from study.objective import OBJECTIVES  # noqa: E402
from study.progress import print_summary  # noqa: E402
from study.recovery import StaleTrialHandler  # noqa: E402
from study.registry import settle_best_model  # noqa: E402
from study.settings import StudySettings, settings_from_args  # noqa: E402
from study.setup import create_stores  # noqa: E402
from study.space import PRESETS, SEARCHED  # noqa: E402
from study.storage import PRUNERS, SAMPLERS  # noqa: E402
from study.summary import study_summary  # noqa: E402
from study.tracking import first_line, redact, resolve_tracking_uri  # noqa: E402
from study.stopping import Stop, stop_on_signals  # noqa: E402
from study.workers import SETUP_ERRORS, Launcher, configure_libraries, run_trials  # noqa: E402

PROG = "python study/run.py"


def build_parser() -> Parser:
    parser = Parser(prog=PROG, description=__doc__.split(":", 1)[1].strip())
    default_preset = "gpu" if torch.cuda.is_available() else "cpu"
    parser.add_argument("--trials", type=int, default=50, help="trials to add to the study (default: 50)")
    parser.add_argument("--preset", choices=list(PRESETS), default=default_preset,
                        help=f"baseline and ranges (default here: {default_preset}; gpu when CUDA is available)")
    parser.add_argument("--space", metavar="FILE", help="TOML or YAML file overriding the preset's ranges")
    parser.add_argument("--data", metavar="PATH", help="UTF-8 text corpus (default: Tiny Shakespeare)")
    parser.add_argument("--objective", choices=list(OBJECTIVES), default="loss",
                        help="loss: minimise best val loss; loss-time: val loss and runtime, a Pareto front")
    parser.add_argument("--sampler", choices=SAMPLERS, default="tpe")
    parser.add_argument("--pruner", choices=PRUNERS, default="asha",
                        help="prunes on the val loss at each eval, against the other trials at the same point of "
                        "their schedules (default: asha, successive halving; single-objective studies only)")
    parser.add_argument("--seed", type=int, default=1337, help="seeds the sampler and every trial's training")
    parser.add_argument("--study-name", help="default: <preset>-<corpus>[-encoder-decoder][-loss-time]; an "
                        "existing name resumes")
    parser.add_argument("--storage", metavar="URL", help="RDB URL (sqlite:///..., postgresql://...) or journal "
                        f"file path (default: ./{'optuna.journal'})")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, else "
                        "sqlite:///mlflow.db here, artifacts in ./mlruns)")
    parser.add_argument("--spool-dir", metavar="DIR", help="where runs wait while the tracking server is away, "
                        "until replayed (default: ./mlflow-spool)")
    parser.add_argument("--timeout", type=float, metavar="SECONDS", help="stop starting trials after this long")
    parser.add_argument("--sample-prompt", help="prompt for every trial's sample (default: 'ROMEO:' when the "
                        "corpus has those characters, else its first 8 characters)")
    parser.add_argument("--sample-tokens", type=int, default=500, help="characters per sample (default: 500)")
    parser.add_argument("--workers", type=int, help="worker processes on this machine (default: 1; "
                        "with the cpu preset on the CPU, one per core or per --threads cores, at most 8)")
    parser.add_argument("--trials-per-gpu", type=int, metavar="K", help="K worker processes per visible GPU, "
                        "training K trials at once on each (instead of --workers)")
    parser.add_argument("--threads", type=int, help="CPU threads per worker (default: the cores split between "
                        "the workers)")
    parser.add_argument("--heartbeat-interval", type=int, default=60, metavar="SECONDS",
                        help="RDB storages: a running trial silent for twice this is failed and re-queued")
    fixed = [name for name in TrainConfig.__dataclass_fields__ if name not in SEARCHED and name != "seed"]
    add_config_flags(parser, only=fixed)
    return parser


def check_args(args: argparse.Namespace) -> None:
    """Refuse impossible option values, from the command line or the Python API alike."""
    choices = {act.dest: act.choices for act in build_parser()._actions if act.choices}
    for name, allowed in choices.items():
        if getattr(args, name) not in allowed:
            raise ConfigError(f"--{name.replace('_', '-')} must be one of {', '.join(allowed)}, "
                              f"got {getattr(args, name)!r}")
    if args.trials < 1:
        raise ConfigError(f"--trials must be at least 1, got {args.trials}")
    for name in ("workers", "trials_per_gpu", "threads", "heartbeat_interval"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.workers and args.trials_per_gpu:
        raise ConfigError("--workers and --trials-per-gpu both set the number of workers: give one")
    if args.timeout is not None and args.timeout <= 0:
        raise ConfigError(f"--timeout must be positive, got {args.timeout}")
    if args.sample_tokens < 0:
        raise ConfigError(f"--sample-tokens must be >= 0, got {args.sample_tokens}")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    return parse_checked(build_parser(), argv, check_args)


def execute(s: StudySettings, corpus: Corpus) -> tuple[optuna.Study, dict, str]:
    """Create or resume the study's stores, run its trials here or in launched workers, close the study.

    Returns the study, its summary and the parent run's end status. Raises the SETUP_ERRORS (and MlflowException)
    when the stores cannot be set up: nothing has run then.
    """
    configure_libraries()
    if s.threads:
        torch.set_num_threads(s.threads)
    handler = StaleTrialHandler()
    study, tracker = create_stores(s, corpus, handler)
    tracker.client.catch_up()  # runs an earlier run spooled while the tracking server was away
    print(f"study {s.study_name}: +{s.trials} trials ({len(study.trials)} stored), preset {s.preset}, "
          f"{s.sampler} sampler, {'no pruning' if s.pruner == 'none' else 'pruner ' + s.pruner}, "
          f"objective {s.objective}; tracking {redact(s.tracking_uri)}", flush=True)
    status = "FINISHED"
    try:
        if s.workers > 1:
            done = Launcher(s).run(study, handler)
        else:
            with stop_on_signals(Stop()) as stop:
                done = run_trials(s, corpus, study, tracker, handler, s.trials, stop)
        status = "FINISHED" if done else "KILLED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    except BaseException:
        status = "FAILED"
        raise
    finally:
        summary = study_summary(study)
        tracker.finish(summary, summary.get("checkpoint_run_id"), status)
        settle_best_model(tracker, summary, s.sample)
        tracker.client.close()
    print_summary(study, summary, s, tracker.runs_url())
    return study, summary, status


def run_study(**options) -> optuna.Study:
    """Run (or resume) a study from Python, as `python study/run.py` does, and return it.

    Options are the command line's, named as its flags with underscores: `run_study(trials=20, preset="cpu",
    data="input.txt", n_layer=2)`. Impossible options raise ValueError (or TypeError for unknown names);
    Ctrl-C fails the running trial, closes the study's run, and raises KeyboardInterrupt. Trials run in this process
    unless `workers` (or `trials_per_gpu`) is given, whatever the preset.
    """
    if "workers" not in options and "trials_per_gpu" not in options:
        options["workers"] = 1  # workers are spawned processes: a script without a __main__ guard would re-run
    study, _, status = execute(*settings_from_args(options_checked(build_parser(), check_args, **options)))
    if status == "KILLED":
        raise KeyboardInterrupt
    return study


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        _, _, status = execute(*settings_from_args(args))
    except SETUP_ERRORS as exc:
        fail(str(exc), PROG)
    except MlflowException as exc:
        fail(f"MLflow tracking at {redact(resolve_tracking_uri(args.tracking_uri))}: {first_line(exc)}", PROG)
    if status != "KILLED":
        return 0
    print(f"{PROG}: interrupted; the running trials are marked FAIL. Run the same command to resume.",
          file=sys.stderr)
    return 130


if __name__ == "__main__":
    sys.exit(main())
