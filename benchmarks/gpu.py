"""One run that measures the project on one GPU and writes docs/benchmarks/gpu.json (docs/gpu.md explains it).

Steps, in order, on one clock: each must end by the sum of its budget and those before it, so time a step leaves
unused goes to the steps after it, and a step still running at its mark is stopped and records how far it got.

  setup    install the carried wheels (--wheels DIR); read the device and the versions of torch, optuna and mlflow
  nanogpt  nanoGPT's train.py with its shakespeare-char config: training tokens/s, the reference
  train    python -m model.train --config shakespeare-char: tokens/s and the val loss after its 5000 iterations
  study    python study/run.py --trials 50 --preset gpu, with --timeout so that it ends by its mark
  confirm  the study's best configuration re-trained with the report's three fresh seeds: the confirmed val loss

Every figure goes into the JSON the moment it is known, so a run stopped part-way leaves the figures so far.
`--smoke` runs the same steps at toy sizes on the CPU in about a minute, into --out PATH.
Only the standard library here: the packages the steps need may not be importable until setup has installed them.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as a script: the runner beside it, by its package name as the tests import it
from benchmarks.runner import HEADLINE, KILL_GRACE_S, Figures, Run, last_json  # noqa: E402, F401

GPU_FIGURES = ROOT / "docs" / "benchmarks" / "gpu.json"
STEPS = ("setup", "nanogpt", "train", "study", "confirm")
# Seconds per step; they sum to 530, under 9 minutes with the process's own start and end (docs/gpu.md: why these).
BUDGET = {"setup": 20, "nanogpt": 80, "train": 150, "study": 150, "confirm": 130}
SMOKE_BUDGET = {"setup": 20, "nanogpt": 20, "train": 20, "study": 70, "confirm": 40}  # 170 s: under 3 minutes
STUDY_MARGIN_S = 40  # the study's start (imports, stores) and close, and reading its figures back, beyond --timeout
SEEDS = (10_000, 10_001, 10_002)  # the report's --confirm-seeds 3: seeds no trial trained with


PROBE = """
import importlib, json
out = {}
import torch
out["torch"] = torch.__version__
out["cuda"] = torch.cuda.is_available()
out["device"] = torch.cuda.get_device_name(0) if out["cuda"] else f"cpu ({torch.get_num_threads()} threads)"
out["cuda_version"] = torch.version.cuda
for name in ("optuna", "mlflow"):
    try:
        out[name] = importlib.import_module(name).__version__
    except Exception as exc:
        out[name + "_error"] = f"{type(exc).__name__}: {exc}"
print(json.dumps(out))
"""


def setup(ctx) -> str:
    args, fig = ctx.args, ctx.fig
    if args.wheels:
        wheels = sorted(str(p) for p in Path(args.wheels).glob("*.whl"))
        # --isolated and no config file: a machine's own pip settings (constraints, indexes) must not refuse them
        code, cut = ctx.run("setup", [sys.executable, "-m", "pip", "install", "--isolated", "-q", "--no-index",
                                      "--no-deps", "--no-compile", "--no-cache-dir", "--upgrade", "--target",
                                      str(ctx.site), *wheels], ctx.work, ctx.mark,
                            env={**ctx.run.env, "PIP_CONFIG_FILE": os.devnull})
        fig.step("setup", wheels=len(wheels), install_exit=code)
        if code or cut:
            return "cut" if cut else "failed"
    out: list[str] = []
    code, cut = ctx.run("setup", [sys.executable, "-c", PROBE], ctx.work, ctx.mark, lambda t, line: out.append(line))
    probe = last_json(out)
    if probe is None:  # cut: the steps may still work, and say so themselves
        if not cut:
            ctx.abort = "torch could not be imported (see setup's log)"
        fig.step("setup", error=ctx.abort or "the import of torch, optuna and mlflow did not finish by the mark")
        return "cut" if cut else "failed"
    fig.set(device=probe["device"], torch=probe["torch"])
    fig.step("setup", **{k: v for k, v in probe.items() if k not in ("device", "torch")})
    ctx.study_ok = "optuna" in probe and "mlflow" in probe  # without them nanoGPT and model.train still run
    if not args.smoke and not probe["cuda"]:
        ctx.abort = "no CUDA device: the full run needs one GPU (--smoke runs on the CPU)"
        fig.step("setup", error=ctx.abort)
    return "ok" if ctx.study_ok and not ctx.abort else "failed"


NANO_ITER = re.compile(r"^iter (\d+): loss [\d.]+, time ([\d.]+)ms")


def nanogpt(ctx) -> str:
    """Training tokens/s of nanoGPT, from the arrival times of its log lines after the warm-up (compilation and its
    first steps): each line follows a loss.item(), so it marks the end of that iteration on the GPU."""
    src = ctx.work / "nanoGPT"
    shutil.copytree(ctx.args.nanogpt, src, ignore=shutil.ignore_patterns("*.bin", "*.pkl", "out*", "__pycache__"))
    for path in (src, *src.rglob("*")):  # a read-only source makes a read-only copy; prepare.py writes beside it
        path.chmod(path.stat().st_mode | 0o200)
    data = src / "data" / "shakespeare_char"
    shutil.copyfile(ctx.corpus, data / "input.txt")  # prepare.py downloads only when input.txt is missing
    env = {**ctx.run.env, "PYTHONPATH": str(ctx.site)}  # nanoGPT's own model.py, not the project's model package
    code, cut = ctx.run("nanogpt", [sys.executable, str(data / "prepare.py")], src, ctx.mark, env=env)
    if code or cut:
        return "cut" if cut else "failed"
    # its shakespeare-char config as it runs on a GPU (compiled, bf16), for 500 iterations, timed from the 100th; its
    # one eval (at iteration 0) cut to 20 batches: evals are outside the timed stretch
    flags, warm = ["--max_iters=500", "--eval_interval=100000", "--eval_iters=20", "--log_interval=10"], 100
    if ctx.args.smoke:
        flags, warm = ["--max_iters=60", "--eval_interval=100000", "--eval_iters=2", "--log_interval=10",
                       "--device=cpu", "--compile=False", "--dtype=float32", "--n_layer=1", "--n_head=2",
                       "--n_embd=16", "--block_size=16", "--batch_size=4"], 10
    seen: list[tuple[float, int, float]] = []  # (arrival, iteration, its own ms)
    tokens = {}

    def on_line(t: float, line: str) -> None:
        if line.startswith("tokens per iteration will be:"):
            tokens["per_iter"] = int(line.rsplit(":", 1)[1].replace(",", ""))
        m = NANO_ITER.match(line)
        if m and int(m[1]) >= warm:
            seen.append((t, int(m[1]), float(m[2])))
            if len(seen) >= 2 and "per_iter" in tokens:
                (t0, i0, _), (t1, i1, _) = seen[0], seen[-1]
                rate = (i1 - i0) * tokens["per_iter"] / (t1 - t0)
                ctx.fig.set(nanogpt_tokens_per_s=round(rate))
                ctx.fig.step("nanogpt", iters_timed=[i0, i1], tokens_per_iter=tokens["per_iter"],
                             ms_per_iter=round(1000 * (t1 - t0) / (i1 - i0), 3),
                             its_own_ms_median=statistics.median(s[2] for s in seen))

    code, cut = ctx.run("nanogpt", [sys.executable, "train.py", "config/train_shakespeare_char.py", *flags], src,
                        ctx.mark, on_line, env)
    if cut:
        return "cut"
    return "ok" if code == 0 and ctx.fig.data["nanogpt_tokens_per_s"] else "failed"


OUR_EVAL = re.compile(r"^step\s+(\d+):.*val loss ([\d.]+).*?([\d,]+) tokens/s")


def train(ctx) -> str:
    cmd = [sys.executable, "-m", "model.train", "--config", "shakespeare-char", "--data", str(ctx.corpus), "--json"]
    if ctx.args.smoke:
        cmd += ["--device", "cpu", "--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--block-size", "16",
                "--batch-size", "4", "--max-iters", "60", "--eval-interval", "20"]
    lines: list[str] = []

    def on_line(t: float, line: str) -> None:
        lines.append(line)
        m = OUR_EVAL.match(line)
        if m:  # tokens/s so far (evals excluded): a throughput figure even if the run is stopped part-way
            ctx.fig.set(tokens_per_s=round(float(m[3].replace(",", ""))))
            ctx.fig.step("train", last_step=int(m[1]), last_val_loss=float(m[2]))

    code, cut = ctx.run("train", cmd, ROOT, ctx.mark, on_line)
    result = last_json(lines)
    if code or cut or not result:
        return "cut" if cut else "failed"
    ctx.fig.set(tokens_per_s=round(result["tokens_per_s"]), val_loss_5000=round(result["val_loss"], 4))
    ctx.fig.step("train", **{k: result.get(k) for k in ("iters", "best_val_loss", "runtime_s", "startup_s",
                                                          "n_params", "device")})
    return "ok"


TRIAL_DONE = re.compile(r"^(\[\S+\] )?trial\s+\d+ (COMPLETE|PRUNED)")


def study(ctx) -> str:
    if not ctx.study_ok:
        ctx.fig.step("study", error="optuna or mlflow not importable (see setup)")
        return "skipped"
    ctx.study_dir.mkdir()
    timeout = max(10, round(ctx.mark - time.monotonic() - STUDY_MARGIN_S))
    preset, trials = ("smoke", 4) if ctx.args.smoke else ("gpu", 50)
    cmd = [sys.executable, str(ROOT / "study" / "run.py"), "--trials", str(trials), "--preset", preset,
           "--data", str(ctx.corpus), "--study-name", ctx.study_name, "--timeout", str(timeout)]
    if ctx.args.smoke:
        cmd += ["--device", "cpu"]
    ctx.fig.step("study", trials_asked=trials, preset=preset, timeout_s=timeout)
    done = [0]

    def on_line(t: float, line: str) -> None:
        if TRIAL_DONE.match(line) and "cut by --timeout" not in line:
            done[0] += 1
            ctx.fig.set(study_trials=done[0], study_wall_s=round(time.monotonic() - start, 1))

    start = time.monotonic()
    code, cut = ctx.run("study", cmd, ctx.study_dir, ctx.mark, on_line)
    ctx.fig.set(study_wall_s=round(time.monotonic() - start, 1))
    ctx.fig.step("study", exit_code=code)
    out: list[str] = []
    ctx.run("study", [sys.executable, str(ROOT / "benchmarks" / "gpu_study.py"), "figures", ctx.study_name],
            ctx.study_dir, max(ctx.mark, time.monotonic() + 30), lambda t, line: out.append(line))
    figures = last_json(out)
    if figures:  # from the study's own store: trials finished, not cut by the deadline
        ctx.fig.set(study_trials=figures["n_complete"] + figures["n_pruned"] - figures["n_cut_by_timeout"])
        ctx.fig.step("study", **figures)
    if cut or (figures and (figures["n_cut_by_timeout"] or figures["n_trials"] < trials)):
        return "cut"  # stopped at the mark, or --timeout came before the last trial
    return "ok" if code == 0 and figures else "failed"


def confirm(ctx) -> str:
    if not ctx.study_dir.is_dir() or not ctx.fig.data["study_trials"]:
        ctx.fig.step("confirm", error="no study to confirm (see study)")
        return "skipped"
    losses: list[float] = []

    def on_line(t: float, line: str) -> None:
        row = last_json([line]) if line.startswith("{") else None
        if row and "seed" in row:
            losses.append(row["best_val_loss"])
            ctx.fig.set(confirmed_val_loss_mean=round(statistics.mean(losses), 4))
            ctx.fig.step("confirm", seeds_done=len(losses), **{f"seed_{row['seed']}": row})
        elif row:
            ctx.fig.step("confirm", **row)

    cmd = [sys.executable, str(ROOT / "benchmarks" / "gpu_study.py"), "confirm", ctx.study_name,
           "--data", str(ctx.corpus), "--seeds", *map(str, SEEDS)]
    code, cut = ctx.run("confirm", cmd, ctx.study_dir, ctx.mark, on_line)
    if cut:
        return "cut"
    return "ok" if code == 0 and len(losses) == len(SEEDS) else "failed"


def parse_args(argv):
    p = argparse.ArgumentParser(prog="benchmarks/gpu.sh", description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true", help="toy sizes on the CPU, to prove the script (needs --out)")
    p.add_argument("--out", type=Path, help=f"the JSON to write (default: {GPU_FIGURES.relative_to(ROOT)}; "
                   "with --smoke, required and never that file)")
    p.add_argument("--wheels", type=Path, help="install these *.whl (no deps, no index) before measuring")
    p.add_argument("--data", type=Path, help="Tiny Shakespeare (default: $CHARGPT_DATA_DIR or data/, "
                   "tinyshakespeare/input.txt)")
    p.add_argument("--nanogpt", type=Path, default=ROOT / ".peers" / "nanoGPT", help="nanoGPT's checkout "
                   "(default: .peers/nanoGPT, from benchmarks/prepare_gpu.sh)")
    p.add_argument("--work", type=Path, help="scratch directory, new or empty (default: a new temporary one)")
    p.add_argument("--logs", type=Path, help="one log per step (default: WORK/logs)")
    p.add_argument("--steps", default=",".join(STEPS), help=f"which steps, comma-separated; setup always runs "
                   f"(default: all: {','.join(STEPS)})")
    p.add_argument("--budget", action="append", default=[], metavar="STEP=SECONDS",
                   help="change a step's budget, e.g. --budget study=300 (repeatable)")
    args = p.parse_args(argv)

    def bad(message: str):
        print(f"benchmarks/gpu.sh: error: {message}", file=sys.stderr)
        raise SystemExit(2)

    if args.smoke and not args.out:
        bad("--smoke needs --out PATH: its toy figures never go into the GPU's")
    args.out = (args.out or GPU_FIGURES).resolve()
    if args.smoke and args.out == GPU_FIGURES.resolve():
        bad(f"--smoke never writes {GPU_FIGURES.relative_to(ROOT)}: give another --out")
    data_dir = Path(os.environ.get("CHARGPT_DATA_DIR") or ROOT / "data")
    args.data = (args.data or data_dir / "tinyshakespeare" / "input.txt").resolve()
    if not args.data.is_file():
        bad(f"no corpus at {args.data}: run benchmarks/prepare_gpu.sh, set CHARGPT_DATA_DIR or pass --data")
    if not (args.nanogpt / "train.py").is_file():
        bad(f"no nanoGPT at {args.nanogpt}: run benchmarks/prepare_gpu.sh or pass --nanogpt DIR")
    if args.wheels and not any(args.wheels.glob("*.whl")):
        bad(f"no wheels in {args.wheels}: run benchmarks/prepare_gpu.sh")
    args.steps = ["setup", *(s for s in args.steps.split(",") if s)]  # setup always: the wheels, the device
    if set(args.steps) - set(STEPS):
        bad(f"--steps: unknown {', '.join(sorted(set(args.steps) - set(STEPS)))} (steps: {', '.join(STEPS)})")
    args.budget_s = dict(SMOKE_BUDGET if args.smoke else BUDGET)
    for item in args.budget:
        name, _, seconds = item.partition("=")
        if name not in STEPS or not seconds.replace(".", "", 1).isdigit():
            bad(f"--budget {item}: expected STEP=SECONDS with STEP one of {', '.join(STEPS)}")
        args.budget_s[name] = float(seconds)
    if args.work and args.work.exists() and any(args.work.iterdir()):
        bad(f"--work {args.work}: not empty; give a new or empty directory")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    work = (args.work or Path(tempfile.mkdtemp(prefix="chargpt-gpu-"))).resolve()
    logs = (args.logs or work / "logs").resolve()
    work.mkdir(parents=True, exist_ok=True)
    logs.mkdir(parents=True, exist_ok=True)
    site = work / "site"
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}  # the study's stores: in work/study
    env.update(PYTHONUNBUFFERED="1", PYTHONPATH=os.pathsep.join(
        [str(ROOT), *([str(site)] if args.wheels else []), *filter(None, [os.environ.get("PYTHONPATH")])]))
    if args.smoke:  # toy networks gain nothing from threads, and threads waiting on a busy core slow them many-fold
        env.setdefault("OMP_NUM_THREADS", "1")
    budget = {s: args.budget_s[s] for s in STEPS if s in args.steps}
    fig = Figures(args.out, {"mode": "smoke" if args.smoke else "gpu", "started": datetime.now(timezone.utc)
                             .isoformat(timespec="seconds"), "budget_s": budget, "total_s": None})
    ctx = argparse.Namespace(args=args, fig=fig, work=work, site=site, corpus=args.data, study_dir=work / "study",
                             study_name="smoke-benchmark" if args.smoke else "gpu-benchmark", study_ok=True, abort=None,
                             run=Run(env, logs))
    print(f"work {work}, logs {logs}, figures {args.out}; budget {budget} (s)", flush=True)
    begin, mark, failed = time.monotonic(), time.monotonic(), False
    for name, func in (("setup", setup), ("nanogpt", nanogpt), ("train", train), ("study", study),
                       ("confirm", confirm)):
        if name not in budget:
            continue
        mark += budget[name]  # the step's mark on the shared clock: what earlier steps left unused rolls on
        ctx.mark, started = mark, time.monotonic()
        fig.step(name, status="running", budget_s=budget[name], allowed_s=round(mark - started, 1))
        try:
            if ctx.abort:
                fig.step(name, error=ctx.abort)
                status = "skipped"
            else:
                status = func(ctx)
        except Exception as exc:  # a bug or a missing file in one step must not cost the steps after it
            fig.step(name, error=f"{type(exc).__name__}: {exc}")
            status = "failed"
        fig.step(name, status=status, seconds=round(time.monotonic() - started, 1))
        failed |= status in ("failed", "skipped")
    fig.set(total_s=round(time.monotonic() - begin, 1))
    print(f"\n{'step':<8} {'status':<8} {'seconds':>8} {'budget':>7}")
    for name, step in fig.data["steps"].items():
        print(f"{name:<8} {step['status']:<8} {step.get('seconds', 0):>8.1f} {step['budget_s']:>7.0f}")
    print(json.dumps({k: fig.data[k] for k in HEADLINE}, indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
