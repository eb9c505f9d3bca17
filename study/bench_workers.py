"""Throughput of parallel workers: `python -m study.bench_workers` prints trials per hour for 1, 2, ... workers.

Every trial trains the preset's baseline configuration (the search space is pinned to it), so runs with
different worker counts do the same work; pruning is off. Each run uses fresh stores in a temp directory.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from study.space import PRESETS

RUN_PY = Path(__file__).resolve().parent / "run.py"
SPACE = """max_iters: {{choices: [{max_iters}]}}
block_size: {{choices: [{block_size}]}}
n_head: {{choices: [{n_head}]}}
n_embd: {{choices: [{n_embd}]}}
dropout: {{choices: [{dropout}]}}
learning_rate: {{choices: [{learning_rate}]}}
"""


def pinned_space(preset: str) -> str:
    """A YAML search space holding only the preset's baseline."""
    base = PRESETS[preset].baseline
    return SPACE.format(max_iters=base.max_iters, block_size=base.block_size, n_head=base.n_head,
                        n_embd=base.n_embd, dropout=base.dropout, learning_rate=base.learning_rate)


def run(workers: int, trials: int, preset: str, data: str | None) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        space = Path(tmp) / "space.yaml"
        space.write_text(pinned_space(preset))
        cmd = [sys.executable, str(RUN_PY), "--preset", preset, "--trials", str(trials), "--workers", str(workers),
               "--space", str(space), "--pruner", "none"]
        if data:
            cmd += ["--data", data]
        start = time.perf_counter()
        subprocess.run(cmd, cwd=tmp, check=True, stdout=subprocess.DEVNULL)
        return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--trials", type=int, default=4)
    parser.add_argument("--preset", default="cpu")
    parser.add_argument("--data", help="corpus (default: Tiny Shakespeare)")
    args = parser.parse_args()
    print(f"{args.trials} trials of the {args.preset} preset's baseline each, pruning off; "
          "workers on one GPU share it, as --trials-per-gpu does")
    print(f"{'workers':>7} {'wall s':>8} {'trials/hour':>12}")
    for n in args.workers:
        seconds = run(n, args.trials, args.preset, args.data)
        print(f"{n:>7} {seconds:8.1f} {3600 * args.trials / seconds:12.1f}", flush=True)


if __name__ == "__main__":
    main()
