"""The study's figures and its confirmation, for benchmarks/gpu.py; run in the study's directory (its default stores).

  python benchmarks/gpu_study.py figures NAME             one JSON line: trials by state, best, search time
  python benchmarks/gpu_study.py confirm NAME --data FILE --seeds S [S ...]
                                                          the best trial's configuration re-trained once per seed
                                                          with the report's confirmation (reports/confirm.py): one
                                                          JSON line per seed as it finishes

The confirmation re-trains the tuned configuration only: its mean is the figure, and the baseline's three runs would
double the step's time.
"""
import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from model.data import load_corpus  # noqa: E402
from reports.collect import load, open_study  # noqa: E402
from reports.confirm import confirm, trial_config  # noqa: E402
from study.summary import study_summary  # noqa: E402
from study.tracking import resolve_tracking_uri  # noqa: E402

KEPT = ("n_trials", "n_complete", "n_pruned", "n_failed", "search_wall_s", "trials_s", "best_trial", "best_val_loss",
        "best_params", "best_found_after_s", "baseline_best_val_loss")


def figures(name: str) -> dict:
    study = open_study(name, None)
    summary = study_summary(study)
    cut = sum(bool(t.user_attrs.get("cut_by_timeout")) for t in study.get_trials(deepcopy=False))
    return {**{k: summary[k] for k in KEPT if k in summary}, "n_cut_by_timeout": cut}


def confirm_best(name: str, data: str, seeds: list[int]) -> None:
    study = load(name, None, resolve_tracking_uri(None))
    best = study.best()
    if best is None:
        raise SystemExit(f"gpu_study.py: error: study {name} has no completed trial to confirm")
    config = trial_config(best)
    print(json.dumps({"tuned_trial": best.number, "trial_best_val_loss": best.values[0], "params": best.params}),
          flush=True)
    corpus = load_corpus(data)  # the file the study trained on: benchmarks/gpu.py gives both the same
    for seed in seeds:  # one seed at a time, so that each figure is out as soon as it is known
        runs = confirm({"tuned": config}, corpus, [seed], study.client, study.parent_run_id, progress=print)["runs"]
        print(json.dumps({"seed": seed, "best_val_loss": float(runs.best_val_loss.iloc[0]),
                          "runtime_s": round(float(runs.runtime_s.iloc[0]), 1)}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(prog="benchmarks/gpu_study.py")
    parser.add_argument("command", choices=("figures", "confirm"))
    parser.add_argument("study_name")
    parser.add_argument("--data")
    parser.add_argument("--seeds", type=int, nargs="+", default=[])
    args = parser.parse_args()
    if args.command == "figures":
        print(json.dumps(figures(args.study_name)))
    else:
        confirm_best(args.study_name, args.data, args.seeds)


if __name__ == "__main__":
    main()
