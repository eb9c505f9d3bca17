"""`python study/run.py --trials 50`: an Optuna study over the GPT's hyperparameters, each trial tracked in MLflow.

From Python: `from study.run import run_study` (study/command.py).
"""
import sys
from pathlib import Path

# Runnable as a script from any directory: the project root, not study/, goes on the import path.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))

from study.command import execute, main, run_study  # noqa: E402

__all__ = ["execute", "main", "run_study"]

if __name__ == "__main__":
    sys.exit(main())
