"""`python study/sync.py` (or `python -m study.spool.sync`): replay the runs a study spooled while its MLflow
tracking server was away."""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Sequence

from mlflow import MlflowClient

from model.cli import Parser, fail
from study.errors import redact
from study.spool.client import server_up
from study.spool.files import SpoolError, read_meta, run_dirs, spool_root
from study.spool.replay import replay_root

PROG = "python study/sync.py"


def build_parser() -> Parser:
    parser = Parser(prog=PROG, description=__doc__.split(":", 1)[1].strip())
    parser.add_argument("--spool-dir", metavar="DIR", help="the study's spool (default: ./mlflow-spool)")
    parser.add_argument("--tracking-uri", help="the tracking server the runs are for (default: the one the spool "
                        "names); another server is refused")
    return parser


def spooled_uris(root: Path) -> dict[str, int]:
    """Runs waiting in the spool, by tracking URI; SpoolError for a directory that is not a spool."""
    if not root.is_dir():
        raise SpoolError(f"--spool-dir {root}: no such directory")
    uris: dict[str, int] = {}
    for path in run_dirs(root):
        uri = read_meta(path)["tracking_uri"]
        uris[uri] = uris.get(uri, 0) + 1
    return uris


def sync(root: Path, uri: str) -> tuple[int, int]:
    """Replay the spool's runs for uri; returns (runs replayed, runs left: held by a running study or waiting)."""
    result = replay_root(MlflowClient(uri), root, uri)
    for ref, run_id in result.replayed.items():
        print(f"{ref} -> run {run_id}" if ref != run_id else f"run {run_id}: spooled writes replayed")
    if result.outage is not None:
        raise ConnectionError(f"MLflow server at {redact(uri)} went away during the replay ({result.outage}); "
                              "run this again once it is back")
    return len(result.replayed), len(result.held) + len(result.deferred)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    root = spool_root(args.spool_dir)
    try:
        uris = spooled_uris(root)
    except SpoolError as exc:
        fail(str(exc), PROG)
    if args.tracking_uri and uris and args.tracking_uri not in uris:
        fail(f"--tracking-uri {redact(args.tracking_uri)}: the spool at {root} holds runs for "
             f"{', '.join(map(redact, uris))} only", PROG)
    targets = [args.tracking_uri] if args.tracking_uri else sorted(uris)
    if not any(uris.get(uri) for uri in targets):
        print(f"nothing to replay in {root}")
        return 0
    status = 0
    for uri in targets:
        if not server_up(uri):
            print(f"{PROG}: error: MLflow server at {redact(uri)} unreachable; {uris[uri]} runs stay spooled in "
                  f"{root}", file=sys.stderr)
            status = 1
            continue
        try:
            replayed, left = sync(root, uri)
        except ConnectionError as exc:
            print(f"{PROG}: error: {exc}", file=sys.stderr)
            status = 1
            continue
        held = f"; {left} left, still written by a running study or waiting on one" if left else ""
        print(f"{replayed} runs replayed to {redact(uri)}{held}")
    return status


if __name__ == "__main__":
    sys.exit(main())
