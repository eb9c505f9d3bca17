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
import urllib.request  # noqa: E402
from dataclasses import asdict, dataclass  # noqa: E402
from typing import Sequence  # noqa: E402

import optuna  # noqa: E402
import torch  # noqa: E402

from model.cli import Parser, add_config_flags, config_overrides, fail  # noqa: E402
from model.config import ConfigError, TrainConfig  # noqa: E402
from model.data import Corpus, DataError, load_corpus  # noqa: E402
from study.objective import OBJECTIVES, Objective, SampleSpec  # noqa: E402
from study.progress import Progress, print_summary, study_summary  # noqa: E402
from study.space import PRESETS, SEARCHED, Preset, SpaceError, check_space, load_space_file, values_of  # noqa: E402
from study.storage import PRUNERS, SAMPLERS, StorageError, check_storage_arg, make_pruner, make_sampler, make_storage  # noqa: E402,E501
from study.tracking import StudyTracker, redact, resolve_tracking_uri  # noqa: E402

PROG = "python study/run.py"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
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
    parser.add_argument("--timeout", type=float, metavar="SECONDS", help="stop starting trials after this long")
    parser.add_argument("--sample-prompt", help="prompt for every trial's sample (default: 'ROMEO:' when the "
                        "corpus has those characters, else its first 8 characters)")
    parser.add_argument("--sample-tokens", type=int, default=500, help="characters per sample (default: 500)")
    fixed = [name for name in TrainConfig.__dataclass_fields__ if name not in SEARCHED and name != "seed"]
    add_config_flags(parser, only=fixed)
    args = parser.parse_args(argv)
    if args.trials < 1:
        parser.error(f"--trials must be at least 1, got {args.trials}")
    if args.timeout is not None and args.timeout <= 0:
        parser.error(f"--timeout must be positive, got {args.timeout}")
    if args.sample_tokens < 0:
        parser.error(f"--sample-tokens must be >= 0, got {args.sample_tokens}")
    return args


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


def plan(args: argparse.Namespace) -> Plan:
    preset = PRESETS[args.preset]
    base = preset.baseline.replace(**{**config_overrides(args), "seed": args.seed})
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
    return Plan(preset, space, base, corpus, name, SampleSpec(prompt, args.sample_tokens, seed=args.seed), tracking_uri)


def check_tracking(uri: str) -> None:
    """Reach a tracking server (or the sqlite file's directory) before anything is created."""
    if uri.startswith(("http://", "https://")):
        try:
            urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=10).close()
        except OSError as exc:
            raise StorageError(f"--tracking-uri {redact(uri)}: MLflow server unreachable ({exc})") from None
    elif uri.startswith("sqlite:///"):
        directory = Path(uri.removeprefix("sqlite:///")).parent
        if not directory.is_dir():
            raise StorageError(f"--tracking-uri {uri}: directory {directory} does not exist")


def open_study(args: argparse.Namespace, p: Plan) -> optuna.Study:
    storage = make_storage(args.storage)
    directions = OBJECTIVES[args.objective]
    pruner = make_pruner(args.pruner if len(directions) == 1 else "none", p.base.eval_interval,
                         max(values_of(p.space["max_iters"]) or [p.space["max_iters"].high]))
    study = optuna.create_study(storage=storage, study_name=p.study_name, directions=list(directions),
                                pruner=pruner, load_if_exists=True)
    if len(study.directions) != len(directions):
        raise StorageError(f"study {p.study_name!r} has {len(study.directions)} objective(s); "
                           f"--objective {args.objective} needs {len(directions)}: pick another --study-name")
    # offset the seed by the trials already run, so a resumed study does not replay its sampler
    study.sampler = make_sampler(args.sampler, args.seed + len(study.trials))
    if not study.trials:
        study.enqueue_trial(p.preset.baseline_params(), user_attrs={"baseline": True})
    return study


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # one line per trial is ours to print
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    try:
        p = plan(args)
        study = open_study(args, p)
    except (ConfigError, DataError, SpaceError, StorageError) as exc:
        fail(str(exc), PROG)
    prune = args.pruner != "none" and len(study.directions) == 1
    tracker = StudyTracker(p.tracking_uri, p.study_name)
    tracker.open(study, {"preset": p.preset.name, "objective": args.objective, "sampler": args.sampler,
                         "pruner": args.pruner if prune else "none", "seed": args.seed,
                         "corpus": p.corpus.name, "corpus_path": str(p.corpus.path), "corpus_sha256": p.corpus.sha256,
                         "storage": redact(args.storage or "optuna.journal"),
                         **{f"base.{k}": v for k, v in asdict(p.base).items()}})
    objective = Objective(p.space, p.base, p.corpus, tracker, args.objective, p.sample, prune)
    print(f"study {p.study_name}: +{args.trials} trials ({len(study.trials)} stored), preset {p.preset.name}, "
          f"{args.sampler} sampler, {'pruner ' + args.pruner if prune else 'no pruning'}, "
          f"objective {args.objective}; tracking {redact(p.tracking_uri)}", flush=True)
    progress = Progress(args.trials, multi_objective=len(study.directions) > 1)
    status = "FINISHED"
    try:
        study.optimize(objective, n_trials=args.trials, timeout=args.timeout, catch=(Exception,),
                       callbacks=[progress], gc_after_trial=True)
    except KeyboardInterrupt:
        status = "KILLED"
    finally:
        progress.close()
        summary = study_summary(study)
        tracker.finish(summary, summary.get("best_run_id"), status)
    print_summary(study, summary, p.tracking_uri, args)
    if status == "KILLED":
        print(f"{PROG}: interrupted; the running trial is marked FAIL. Run the same command to resume.",
              file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
