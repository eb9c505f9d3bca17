"""Search spaces: per preset, the baseline configuration and the ranges of the six searched hyperparameters."""
from __future__ import annotations

import itertools
import tomllib
from dataclasses import dataclass
from pathlib import Path

import optuna
import yaml
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution

from model.config import NAMED, ConfigError, TrainConfig

# The searched hyperparameters; the names are TrainConfig fields, so replace(base, **trial.params) works.
SEARCHED = ("max_iters", "block_size", "n_head", "n_embd", "dropout", "learning_rate")
INT_PARAMS = {"max_iters", "block_size", "n_head", "n_embd"}


class SpaceError(ValueError):
    """A search space that cannot be searched; the message names the parameter."""


@dataclass(frozen=True)
class Preset:
    name: str
    baseline: TrainConfig
    space: dict[str, BaseDistribution]
    description: str
    # on the CPU, a worker process per core by default: its small networks keep one core busy better than two
    # (docs/benchmarks.md: 1.1x to 1.2x the trials per hour)
    worker_per_core: bool = False

    def baseline_params(self) -> dict:
        return {name: getattr(self.baseline, name) for name in SEARCHED}


def _choices(*values) -> CategoricalDistribution:
    return CategoricalDistribution(values)


# Every n_embd choice is divisible by every n_head choice: the space stays static (multivariate TPE).
PRESETS = {p.name: p for p in (
    Preset(
        "gpu",
        NAMED["shakespeare-char"].replace(eval_iters=50),  # a quarter of nanoGPT's eval batches: cheaper evals
        # capped at the baseline's compute until measured on a GPU: TPE climbs to the largest trials
        {"max_iters": IntDistribution(1000, 5000, step=500),
         "block_size": _choices(128, 192, 256),
         "n_head": _choices(4, 6, 8),
         "n_embd": _choices(192, 288, 384),
         # stepped: the dropout probability is a constant of the compiled graph, so trials that share a shape and
         # a dropout value reuse torch.compile's on-disk cache instead of compiling again
         "dropout": FloatDistribution(0.0, 0.3, step=0.05),
         "learning_rate": FloatDistribution(3e-4, 3e-3, log=True)},
        "nanoGPT's shakespeare-char scale (~10M parameters), for one GPU"),
    Preset(
        "cpu",
        TrainConfig(n_layer=4, n_head=4, n_embd=128, block_size=64, batch_size=12, dropout=0.0,
                    learning_rate=1e-3, max_iters=2000, warmup_iters=100, eval_interval=250, eval_iters=20),
        # past the baseline in every direction that may pay: more iterations, wider, longer context (the largest
        # corner is about 10x its compute). Pruning at equal points of the trials' schedules (successive halving)
        # stops most trials at a sixteenth of their length.
        {"max_iters": IntDistribution(1000, 6000, step=500),
         "block_size": _choices(32, 64, 96),
         "n_head": _choices(2, 4, 8),
         "n_embd": _choices(64, 96, 128, 192),
         # stepped, so that a negligible dropout is exactly 0: the best trials of earlier studies drew 0.004 to 0.03,
         # which regularises nothing and, on a CPU without bf16, costs up to a fifth of a step
         "dropout": FloatDistribution(0.0, 0.2, step=0.05),
         "learning_rate": FloatDistribution(5e-4, 1e-2, log=True)},
        "nanoGPT's CPU recipe (the baby GPT); a trial in seconds to 10 minutes on a core", worker_per_core=True),
    Preset(
        "smoke",
        TrainConfig(n_layer=1, n_head=2, n_embd=16, block_size=16, batch_size=8, dropout=0.0,
                    learning_rate=3e-3, max_iters=40, warmup_iters=5, eval_interval=10, eval_iters=2),
        {"max_iters": IntDistribution(20, 60, step=10),
         "block_size": _choices(8, 16),
         "n_head": _choices(1, 2),
         "n_embd": _choices(16, 32),
         "dropout": FloatDistribution(0.0, 0.2),
         "learning_rate": FloatDistribution(1e-3, 1e-2, log=True)},
        "a toy network, seconds per trial: for trying the tools out and for tests"),
)}


def values_of(dist: BaseDistribution) -> list | None:
    """Every value a discrete distribution can take (None for a continuous one)."""
    if isinstance(dist, CategoricalDistribution):
        return list(dist.choices)
    if isinstance(dist, IntDistribution) and not dist.log:
        return list(range(dist.low, dist.high + 1, dist.step))
    if isinstance(dist, IntDistribution):
        return list(range(dist.low, dist.high + 1))
    return None


def check_space(space: dict[str, BaseDistribution], baseline: TrainConfig) -> None:
    """Refuse a space with an impossible corner (such as n_embd not divisible by n_head) before any trial runs."""
    for name, dist in space.items():  # Optuna takes an enqueued number outside a range, but not a missing choice
        if isinstance(dist, CategoricalDistribution) and getattr(baseline, name) not in dist.choices:
            raise SpaceError(f"{name}: the baseline value {getattr(baseline, name)} is not among the choices "
                             f"{list(dist.choices)}; trial 0 runs the baseline")
    heads, widths = values_of(space["n_head"]), values_of(space["n_embd"])
    if heads is None or widths is None:
        raise SpaceError("n_head and n_embd must be integer ranges or choices")
    for n_head, n_embd in itertools.product(heads, widths):
        if n_embd % n_head:
            raise SpaceError(f"n_embd {n_embd} is not divisible by n_head {n_head}: "
                             "every pair in the space must divide (the space is static)")
    corners = {name: [dist.low, dist.high] if values_of(dist) is None else [min(values_of(dist)), max(values_of(dist))]
               for name, dist in space.items() if name not in ("n_head", "n_embd")}
    for combo in itertools.product(*corners.values()):
        try:
            baseline.replace(**dict(zip(corners, combo)))
        except ConfigError as exc:
            raise SpaceError(str(exc)) from None


def _distribution(name: str, spec) -> BaseDistribution:
    if not isinstance(spec, dict):
        raise SpaceError(f"{name}: expected a table with 'choices' or 'low' and 'high', got {spec!r}")
    unknown = set(spec) - {"choices", "low", "high", "step", "log"}
    if unknown:
        raise SpaceError(f"{name}: unknown key(s) {', '.join(sorted(unknown))}")
    try:
        if "choices" in spec:
            choices = spec["choices"]
            if not isinstance(choices, list) or not choices:
                raise SpaceError(f"{name}: 'choices' must be a non-empty list")
            kind = int if name in INT_PARAMS else float
            return CategoricalDistribution([kind(c) for c in choices])
        if "low" not in spec or "high" not in spec:
            raise SpaceError(f"{name}: needs 'choices', or 'low' and 'high'")
        if name in INT_PARAMS:
            return IntDistribution(int(spec["low"]), int(spec["high"]), log=bool(spec.get("log", False)),
                                   step=int(spec.get("step", 1)))
        return FloatDistribution(float(spec["low"]), float(spec["high"]), log=bool(spec.get("log", False)),
                                 step=spec.get("step"))
    except (TypeError, ValueError) as exc:
        if isinstance(exc, SpaceError):
            raise
        raise SpaceError(f"{name}: {exc}") from None


def load_space_file(path: str | Path, preset: Preset) -> dict[str, BaseDistribution]:
    """The preset's space with the ranges a TOML or YAML file gives (one table per parameter) replaced."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
        table = tomllib.loads(text) if path.suffix == ".toml" else yaml.safe_load(text)
    except FileNotFoundError:
        raise SpaceError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SpaceError(f"{path}: cannot read ({exc})") from None
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as exc:
        raise SpaceError(f"{path}: not valid {'TOML' if path.suffix == '.toml' else 'YAML'} "
                         f"({str(exc).splitlines()[0]})") from None
    if not isinstance(table, dict) or not table:
        raise SpaceError(f"{path}: expected a table of parameters ({', '.join(SEARCHED)})")
    unknown = set(table) - set(SEARCHED)
    if unknown:
        raise SpaceError(f"{path}: unknown parameter(s) {', '.join(sorted(unknown))}; "
                         f"searchable: {', '.join(SEARCHED)}")
    try:
        return {**preset.space, **{name: _distribution(name, spec) for name, spec in table.items()}}
    except SpaceError as exc:
        raise SpaceError(f"{path}: {exc}") from None


def suggest_params(trial: optuna.Trial, space: dict[str, BaseDistribution]) -> dict:
    """Ask the sampler for one value of each searched hyperparameter."""
    params = {}
    for name, dist in space.items():
        if isinstance(dist, CategoricalDistribution):
            params[name] = trial.suggest_categorical(name, dist.choices)
        elif isinstance(dist, IntDistribution):
            params[name] = trial.suggest_int(name, dist.low, dist.high, step=dist.step, log=dist.log)
        else:
            params[name] = trial.suggest_float(name, dist.low, dist.high, step=dist.step, log=dist.log)
    return params
