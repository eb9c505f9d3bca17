"""`python study/run.py --trials 50`: an Optuna study over the GPT's hyperparameters, each trial tracked in MLflow."""
from __future__ import annotations

import sys
from pathlib import Path

# Runnable as a script from any directory: the project root, not study/, goes on the import path.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))

import argparse  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
from dataclasses import asdict, dataclass  # noqa: E402
from typing import Sequence  # noqa: E402

import optuna  # noqa: E402
from mlflow.exceptions import MlflowException  # noqa: E402
from optuna.distributions import distribution_to_json  # noqa: E402
import torch  # noqa: E402

from model.cli import (Parser, add_config_flags, config_overrides, fail, options_checked, parse_checked,  # noqa: E402
                       to_argv)
from model.config import ConfigError, TrainConfig  # noqa: E402
from model.data import Corpus, DataError, load_corpus  # noqa: E402
from model.train import resolve_device  # noqa: E402
from study.objective import OBJECTIVES, Objective, SampleSpec, release_gpu_memory  # noqa: E402
from study.progress import Progress, print_summary  # noqa: E402
from study.space import PRESETS, SEARCHED, Preset, SpaceError, check_space, load_space_file, values_of  # noqa: E402
from study.recovery import StaleTrialHandler, recover_dead_workers  # noqa: E402
from study.registry import settle_best_model  # noqa: E402
from study.summary import study_summary  # noqa: E402
from study.storage import (DEFAULT_JOURNAL, PRUNERS, SAMPLERS, StorageError, check_storage_arg,  # noqa: E402
                           init_lock, make_pruner, make_sampler, make_storage)
from study.tracking import StudyTracker, TrackingError, check_tracking, first_line, redact, resolve_tracking_uri  # noqa: E402
from study.workers import Launcher  # noqa: E402

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
    parser.add_argument("--pruner", choices=PRUNERS, default="hyperband",
                        help="prunes on the val loss at each eval (single-objective studies only)")
    parser.add_argument("--seed", type=int, default=1337, help="seeds the sampler and every trial's training")
    parser.add_argument("--study-name", help="default: <preset>-<corpus>[-loss-time]; an existing name resumes")
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
    parser.add_argument("--workers", type=int, help="worker processes on this machine (default: 1)")
    parser.add_argument("--trials-per-gpu", type=int, metavar="K", help="K worker processes per visible GPU, "
                        "training K trials at once on each (instead of --workers)")
    parser.add_argument("--threads", type=int, help="CPU threads per worker (default: the cores split between "
                        "the workers)")
    parser.add_argument("--heartbeat-interval", type=int, default=60, metavar="SECONDS",
                        help="RDB storages: a running trial silent for twice this is failed and re-queued")
    parser.add_argument("--worker-index", type=int, help=argparse.SUPPRESS)  # set by the --workers launcher
    parser.add_argument("--launch-id", help=argparse.SUPPRESS)
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
    if args.workers and args.trials_per_gpu and args.worker_index is None:
        raise ConfigError("--workers and --trials-per-gpu both set the number of workers: give one")
    if args.timeout is not None and args.timeout <= 0:
        raise ConfigError(f"--timeout must be positive, got {args.timeout}")
    if args.sample_tokens < 0:
        raise ConfigError(f"--sample-tokens must be >= 0, got {args.sample_tokens}")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    return parse_checked(build_parser(), argv, check_args)


@dataclass
class Plan:
    """Everything validated, nothing created yet."""

    preset: Preset
    space: dict
    base: TrainConfig
    corpus: Corpus
    study_name: str
    sample: SampleSpec
    tracking_uri: str
    workers: int


def plan(args: argparse.Namespace) -> Plan:
    preset = PRESETS[args.preset]
    base = preset.baseline.replace(**{**config_overrides(args), "seed": args.seed})
    resolve_device(base.device)  # a device this machine lacks fails here, not in every trial
    space = load_space_file(args.space, preset) if args.space else dict(preset.space)
    check_space(space, base)
    corpus = load_corpus(args.data)
    blocks = values_of(space["block_size"]) or [space["block_size"].high]
    corpus.check_block_size(max(blocks))
    prompt = args.sample_prompt
    if prompt is None:
        prompt = "ROMEO:" if not corpus.tokenizer.unknown("ROMEO:") else corpus.tokenizer.decode(corpus.train[:8])
    if not prompt or corpus.tokenizer.unknown(prompt):
        raise DataError(f"--sample-prompt has characters outside the corpus vocabulary: "
                        f"{' '.join(map(repr, corpus.tokenizer.unknown(prompt))) or '(empty prompt)'}")
    suffix = "-loss-time" if args.objective == "loss-time" else ""
    name = args.study_name or f"{preset.name}-{corpus.name}{suffix}"
    check_storage_arg(args.storage)
    tracking_uri = resolve_tracking_uri(args.tracking_uri)
    check_tracking(tracking_uri)
    return Plan(preset, space, base, corpus, name, SampleSpec(prompt, args.sample_tokens, seed=args.seed), tracking_uri,
                worker_count(args, base))


def worker_count(args: argparse.Namespace, base: TrainConfig) -> int:
    """Worker processes for this run: --workers, or --trials-per-gpu times the GPUs in use (one for --device cuda:N)."""
    if args.worker_index is not None:
        return 1  # a process the launcher started
    if not args.trials_per_gpu:
        return args.workers or 1
    device = resolve_device(base.device)
    if device.type != "cuda":
        raise ConfigError(f"--trials-per-gpu needs CUDA, but trials train on {device.type}: use --workers")
    return args.trials_per_gpu * (1 if device.index is not None else torch.cuda.device_count())


def effective_pruner(args: argparse.Namespace) -> str:
    """Optuna prunes single-objective studies only: a loss-time study runs every trial to the end."""
    return args.pruner if len(OBJECTIVES[args.objective]) == 1 else "none"


def open_study(args: argparse.Namespace, p: Plan, handler: StaleTrialHandler) -> optuna.Study:
    storage = make_storage(args.storage, args.heartbeat_interval, handler)
    directions = OBJECTIVES[args.objective]
    pruner = make_pruner(effective_pruner(args), p.base.eval_interval,
                         max(values_of(p.space["max_iters"]) or [p.space["max_iters"].high]))
    study = optuna.create_study(storage=storage, study_name=p.study_name, directions=list(directions),
                                pruner=pruner, load_if_exists=True)
    if len(study.directions) != len(directions):
        raise StorageError(f"study {p.study_name!r} has {len(study.directions)} objective(s); "
                           f"--objective {args.objective} needs {len(directions)}: pick another --study-name")
    check_same_setup(study, p)
    # offset the seed by the trials already run, so a resumed study does not replay its sampler
    # and by the worker, so parallel workers do not propose the same parameters
    study.sampler = make_sampler(args.sampler, args.seed + len(study.trials) + 1000 * (args.worker_index or 0))
    if not study.trials:
        study.enqueue_trial(p.preset.baseline_params(), user_attrs={"baseline": True})
    return study


def check_same_setup(study: optuna.Study, p: Plan) -> None:
    """A resumed study must keep its corpus, search space and fixed settings, or its trials stop comparing."""
    setup = {"corpus_sha256": p.corpus.sha256,
             "space": {k: distribution_to_json(v) for k, v in p.space.items()},
             "fixed": {k: v for k, v in asdict(p.base).items() if k not in ("device", "compile")}}
    stored = study.user_attrs.get("setup")
    if stored is None:
        if not study.trials:
            study.set_user_attr("setup", setup)
        return
    differs = [k for k in setup if stored.get(k) != setup[k]]
    if differs:
        raise StorageError(f"study {p.study_name!r} was created with another {' and '.join(differs)} "
                           "(corpus, --space, preset or fixed flags); resume it unchanged or pick another --study-name")


def open_stores(args: argparse.Namespace, p: Plan, handler: StaleTrialHandler) -> tuple[optuna.Study, StudyTracker]:
    """Study, baseline, MLflow database, experiment and parent run: created once, before any trial runs."""
    with init_lock(args.storage, p.study_name):
        study = open_study(args, p, handler)
        tracker = StudyTracker(p.tracking_uri, p.study_name, args.spool_dir)
        tracker.open(study, {"preset": p.preset.name, "objective": args.objective, "sampler": args.sampler,
                             "pruner": effective_pruner(args), "seed": args.seed,
                             "corpus": p.corpus.name, "corpus_path": str(p.corpus.path),
                             "corpus_sha256": p.corpus.sha256, "storage": redact(args.storage or DEFAULT_JOURNAL),
                             **{f"base.{k}": v for k, v in asdict(p.base).items()}})
        handler.tracker = tracker
        recovered = recover_dead_workers(study, handler)
    if recovered:
        print(f"trials {recovered} were left RUNNING by a worker that died: failed and re-queued", flush=True)
    return study, tracker


SETUP_ERRORS = (ConfigError, DataError, SpaceError, StorageError, TrackingError)


def execute(args: argparse.Namespace) -> tuple[optuna.Study, dict | None, str]:
    """Plan, create or resume the stores, run this process's trials (or launch workers), close the study.

    Returns the study, its summary (None in a launched worker) and the parent run's end status. Raises the
    SETUP_ERRORS (and MlflowException) when the stores cannot be set up: nothing has run then.
    """
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # one line per trial is ours to print
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    # A write to a tracking server that is away fails in seconds (MLflow's defaults retry for minutes) and is
    # spooled; the timeout is per socket operation, so large uploads still go through.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    if args.threads:
        torch.set_num_threads(args.threads)
    handler = StaleTrialHandler()
    p = plan(args)
    study, tracker = open_stores(args, p, handler)
    tracker.client.catch_up()  # runs an earlier run spooled while the server was away
    worker = args.worker_index is not None
    if not worker:
        prune = effective_pruner(args) != "none"
        print(f"study {p.study_name}: +{args.trials} trials ({len(study.trials)} stored), preset {p.preset.name}, "
              f"{args.sampler} sampler, {'pruner ' + args.pruner if prune else 'no pruning'}, "
              f"objective {args.objective}; tracking {redact(p.tracking_uri)}", flush=True)
    status, summary = "FINISHED", None
    try:
        if p.workers > 1:
            launcher = Launcher(to_argv(build_parser(), args), args.trials, p.workers, args.threads, p.base.device)
            if not launcher.run(study, handler):
                status = "KILLED"
        elif not run_trials(args, p, study, tracker, handler):
            status = "KILLED"
    finally:
        if not worker:
            summary = study_summary(study)
            tracker.finish(summary, summary.get("checkpoint_run_id"), status)
            settle_best_model(tracker, summary, p.sample)
        tracker.client.close()
    if not worker:
        print_summary(study, summary, p.tracking_uri, args, tracker.runs_url())
    return study, summary, status


def run_study(**options) -> optuna.Study:
    """Run (or resume) a study from Python, as `python study/run.py` does, and return it.

    Options are the command line's, named as its flags with underscores: `run_study(trials=20, preset="cpu",
    data="input.txt", n_layer=2)`. Impossible options raise ValueError (or TypeError for unknown names);
    Ctrl-C fails the running trial, closes the study's run, and raises KeyboardInterrupt.
    """
    study, _, status = execute(options_checked(build_parser(), check_args, **options))
    if status == "KILLED":
        raise KeyboardInterrupt
    return study


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        _, _, status = execute(args)
    except SETUP_ERRORS as exc:
        fail(str(exc), PROG)
    except MlflowException as exc:
        fail(f"MLflow tracking at {redact(resolve_tracking_uri(args.tracking_uri))}: {first_line(exc)}", PROG)
    if status != "KILLED":
        return 0
    if args.worker_index is None:
        print(f"{PROG}: interrupted; the running trial is marked FAIL. Run the same command to resume.",
              file=sys.stderr)
    return 130


def run_trials(args: argparse.Namespace, p: Plan, study: optuna.Study, tracker: StudyTracker,
               handler: StaleTrialHandler) -> bool:
    """This process's trials; False when interrupted by Ctrl-C."""
    prune = effective_pruner(args) != "none"
    attrs = {} if args.worker_index is None else {"worker_index": args.worker_index, "launch_id": args.launch_id}
    objective = Objective(p.space, p.base, p.corpus, tracker, args.objective, p.sample, prune, handler, attrs)
    progress = Progress(args.trials, bar=args.worker_index is None,
                        prefix="" if args.worker_index is None else f"[worker {args.worker_index}] ")
    try:
        study.optimize(objective, n_trials=args.trials, timeout=args.timeout, catch=(Exception,),
                       callbacks=[release_gpu_memory, progress], gc_after_trial=True)
    except KeyboardInterrupt:
        return False
    finally:
        progress.close()
    return True


if __name__ == "__main__":
    sys.exit(main())
