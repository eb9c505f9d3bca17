"""A study's options, declared once: `StudyOptions` is the command line's flags and `run_study()`'s keywords, with
their defaults, help and checks; the parser is derived from it, as TrainConfig's fields are the training flags.
"""
from __future__ import annotations

import argparse
import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Sequence

import torch

from model.cli import Parser, add_config_flags, config_overrides, flag
from model.config import ConfigError, TrainConfig
from study.space import PRESETS, SEARCHED
from study.storage import DEFAULT_JOURNAL, PRUNERS, SAMPLERS

PROG = "python study/run.py"
# What a study minimises: the best val loss, or with loss-time also the runtime (a Pareto front).
OBJECTIVES = {"loss": ("minimize",), "loss-time": ("minimize", "minimize")}
# TrainConfig fields a study keeps fixed for every trial (--n-layer, --batch-size, ...): the searched ones and the
# seed (--seed seeds the sampler too) are not among them.
FIXED = tuple(name for name in TrainConfig.__dataclass_fields__ if name not in SEARCHED and name != "seed")


def _opt(default, help: str, *, choices: Sequence[str] | None = None, at_least: int | None = None,
         metavar: str | None = None):
    return field(default=default, metadata={"help": help, "choices": choices, "at_least": at_least,
                                            "metavar": metavar})


def _kind(hint) -> type:
    """int for `int | None`, and so on."""
    return next(t for t in typing.get_args(hint) or (hint,) if t is not type(None))


def default_preset() -> str:
    return "gpu" if torch.cuda.is_available() else "cpu"


@dataclass(frozen=True)
class StudyOptions:
    """What a user sets for a study. Each field is a flag (study_name -> --study-name) and a keyword of run_study();
    `config` holds the fixed TrainConfig flags given (--n-layer 2 -> {"n_layer": 2}). Impossible values raise
    ConfigError (a wrong type, TypeError), naming the flag."""

    trials: int = _opt(50, "trials to add to the study (default: 50)", at_least=1)
    preset: str | None = _opt(None, "baseline and ranges (default: gpu where CUDA is available, else cpu)",
                              choices=tuple(PRESETS))
    space: str | None = _opt(None, "TOML or YAML file overriding the preset's ranges", metavar="FILE")
    data: str | None = _opt(None, "UTF-8 text corpus (default: Tiny Shakespeare)", metavar="PATH")
    objective: str = _opt("loss", "loss: minimise best val loss; loss-time: val loss and runtime, a Pareto front",
                          choices=tuple(OBJECTIVES))
    sampler: str = _opt("tpe", "Optuna's sampler (default: tpe)", choices=SAMPLERS)
    pruner: str = _opt("asha", "prunes on the val loss at each eval, against the other trials at the same point of "
                       "their schedules (default: asha, successive halving; single-objective studies only)",
                       choices=PRUNERS)
    seed: int = _opt(1337, "seeds the sampler and every trial's training")
    study_name: str | None = _opt(None, "default: <preset>-<corpus>[-encoder-decoder][-loss-time]; an existing name "
                                  "resumes")
    storage: str | None = _opt(None, "RDB URL (sqlite:///..., postgresql://...) or journal file path (default: "
                               f"./{DEFAULT_JOURNAL})", metavar="URL")
    tracking_uri: str | None = _opt(None, "MLflow tracking URI (default: MLFLOW_TRACKING_URI, else sqlite:///mlflow.db "
                                    "here, artifacts in ./mlruns)")
    spool_dir: str | None = _opt(None, "where runs wait while the tracking server is away, until replayed (default: "
                                 "./mlflow-spool)", metavar="DIR")
    timeout: float | None = _opt(None, "end the study this long after its trials start: no trial starts after it, and "
                                 "a running trial is cut at its next step, PRUNED", metavar="SECONDS")
    sample_prompt: str | None = _opt(None, "prompt for every trial's sample (default: 'ROMEO:' when the corpus has "
                                     "those characters, else its first 8 characters)")
    sample_tokens: int = _opt(500, "characters per sample (default: 500)", at_least=0)
    workers: int | None = _opt(None, "worker processes on this machine (default: 1; with the cpu preset on the CPU, "
                               "one per core or per --threads cores, at most 8)", at_least=1)
    trials_per_gpu: int | None = _opt(None, "K worker processes per visible GPU, training K trials at once on each "
                                      "(instead of --workers)", at_least=1, metavar="K")
    threads: int | None = _opt(None, "CPU threads per worker (default: the cores split between the workers)",
                               at_least=1)
    ray_address: str | None = _opt(None, "run each trial as a Ray task on this cluster: auto, ray://HOST:PORT or "
                                   "HOST:PORT (--threads: CPUs per trial; --trials-per-gpu K: 1/K GPU; --workers: "
                                   "trials at once, default what the cluster holds)", metavar="ADDRESS")
    heartbeat_interval: int = _opt(60, "RDB storages: a running trial silent for twice this is failed and re-queued",
                                   at_least=1, metavar="SECONDS")
    config: dict = field(default_factory=dict, metadata={"help": None})  # the fixed TrainConfig flags given

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(StudyOptions)
        for f in _flag_fields():
            value, meta = getattr(self, f.name), f.metadata
            kind = _kind(hints[f.name])
            if value is None:
                continue
            if kind in (int, float) and (isinstance(value, bool) or not isinstance(value, (int, float))
                                         or kind is int and not isinstance(value, int)):
                raise TypeError(f"option {f.name} must be {kind.__name__}, got {value!r}")
            if meta["choices"] and value not in meta["choices"]:
                raise ConfigError(f"{flag(f.name)} must be one of {', '.join(meta['choices'])}, got {value!r}")
            if meta["at_least"] is not None and value < meta["at_least"]:
                word = "at least 1" if meta["at_least"] == 1 else f">= {meta['at_least']}"
                raise ConfigError(f"{flag(f.name)} must be {word}, got {value}")
        if self.workers and self.trials_per_gpu:
            raise ConfigError("--workers and --trials-per-gpu both set the number of workers: give one")
        if self.ray_address and str(self.config.get("device", "")).startswith("cuda:"):
            raise ConfigError(f"--device {self.config['device']} with --ray-address: Ray gives each trial its GPU; "
                              "use --device cuda or auto")
        if self.timeout is not None and self.timeout <= 0:
            raise ConfigError(f"--timeout must be positive, got {self.timeout}")
        unknown = sorted(set(self.config) - set(FIXED))
        if unknown:
            raise TypeError(f"unknown option{'s' * (len(unknown) > 1)} {', '.join(unknown)}")
        if self.preset is None:
            object.__setattr__(self, "preset", default_preset())


def _flag_fields() -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(StudyOptions) if f.name != "config"]


def build_parser() -> Parser:
    parser = Parser(prog=PROG, description="an Optuna study over the GPT's hyperparameters, each trial tracked in "
                    "MLflow.")
    hints = typing.get_type_hints(StudyOptions)
    for f in _flag_fields():
        meta = f.metadata
        parser.add_argument(flag(f.name), dest=f.name, type=_kind(hints[f.name]), default=None, choices=meta["choices"],
                            metavar=meta["metavar"], help=meta["help"])
    add_config_flags(parser, only=FIXED)
    return parser


def parse_options(argv: Sequence[str] | None = None) -> StudyOptions:
    """The command line's options; an impossible one is the parser's one-line error (exit 2)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return options_from_args(args)
    except (ConfigError, TypeError) as exc:
        parser.error(str(exc))


def options_from_args(args: argparse.Namespace) -> StudyOptions:
    given = {f.name: getattr(args, f.name) for f in _flag_fields() if getattr(args, f.name) is not None}
    return StudyOptions(**given, config=config_overrides(args))


def options_from_keywords(**keywords) -> StudyOptions:
    """run_study()'s keywords: the flags' names with underscores, fixed TrainConfig fields among them."""
    names = {f.name for f in _flag_fields()}
    unknown = sorted(set(keywords) - names - set(FIXED))
    if unknown:
        raise TypeError(f"unknown option{'s' * (len(unknown) > 1)} {', '.join(unknown)} "
                        f"(options: {', '.join(sorted(names | set(FIXED)))})")
    config = {k: v for k, v in keywords.items() if k in FIXED and v is not None}
    return StudyOptions(**{k: v for k, v in keywords.items() if k in names}, config=config)
