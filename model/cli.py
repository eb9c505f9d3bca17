"""Command-line plumbing shared by the entry points: config flags and one-line errors."""
from __future__ import annotations

import argparse
import dataclasses
import sys
import typing
from typing import NoReturn

from model.config import ConfigError, TrainConfig

USAGE_ERROR = 2


def fail(message: str, prog: str | None = None) -> NoReturn:
    """Print one line naming the problem and exit 2: the convention for bad input."""
    print(f"{prog or _prog()}: error: {message}", file=sys.stderr)
    raise SystemExit(USAGE_ERROR)


def _prog() -> str:
    return argparse.ArgumentParser().prog


class Parser(argparse.ArgumentParser):
    """argparse whose errors are one line (no usage dump) and exit 2."""

    def error(self, message: str) -> NoReturn:
        fail(message, self.prog)


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_config_flags(parser: argparse.ArgumentParser, cls=TrainConfig, defaults=None,
                     only: typing.Iterable[str] | None = None) -> None:
    """One flag per dataclass field (n_embd -> --n-embd); unset flags stay None so defaults come from elsewhere."""
    hints = typing.get_type_hints(cls)
    group = parser.add_argument_group(f"{cls.__name__} fields")
    for f in dataclasses.fields(cls):
        if only is not None and f.name not in only:
            continue
        hint = hints[f.name]
        default = getattr(defaults, f.name) if defaults is not None else f.default
        help_text = f"{f.metadata.get('help', '')} (default: {default})"
        if hint in (bool, bool | None):
            group.add_argument(flag(f.name), dest=f.name, action=argparse.BooleanOptionalAction,
                               default=None, help=help_text)
        else:
            kind = next(t for t in typing.get_args(hint) or (hint,) if t is not type(None))
            group.add_argument(flag(f.name), dest=f.name, type=kind, default=None,
                               metavar=f.name.upper(), help=help_text)


def config_overrides(args: argparse.Namespace, cls=TrainConfig) -> dict:
    """The config fields the user set on the command line."""
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in vars(args).items() if k in names and v is not None}


def parse_checked(parser: argparse.ArgumentParser, argv, check) -> argparse.Namespace:
    """Parse argv, then check(args), whose ConfigError becomes the parser's one-line error."""
    args = parser.parse_args(argv)
    try:
        check(args)
    except ConfigError as exc:
        parser.error(str(exc))
    return args


def options_checked(parser: argparse.ArgumentParser, check, **options) -> argparse.Namespace:
    """The namespace a command line would give, from keyword arguments named as the flags' dests, then check(args).

    What the Python API uses in place of parsing, so it takes exactly the CLI's options, defaults and checks.
    """
    actions = {act.dest: act for act in parser._actions if act.help != argparse.SUPPRESS and act.dest != "help"}
    unknown = sorted(set(options) - set(actions))
    if unknown:
        raise TypeError(f"unknown option{'s' * (len(unknown) > 1)} {', '.join(unknown)} "
                        f"(options: {', '.join(sorted(actions))})")
    missing = [dest for dest, act in actions.items() if act.required and dest not in options]
    if missing:
        raise TypeError(f"missing option{'s' * (len(missing) > 1)} {', '.join(missing)}")
    for dest, value in options.items():
        kind = actions[dest].type
        if value is None or kind not in (int, float):
            continue
        if isinstance(value, bool) or not isinstance(value, int if kind is int else (int, float)):
            raise TypeError(f"option {dest} must be {kind.__name__}, got {value!r}")
    defaults = {act.dest: act.default for act in parser._actions if act.dest != "help"}
    args = argparse.Namespace(**{**defaults, **options})
    check(args)
    return args
