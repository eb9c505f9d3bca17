"""`python reports/generate.py --study-name NAME`: baseline-vs-tuned tables, plots and samples for a study.

From Python: `from reports.generate import generate_report, load_trials` (reports/report.py).
"""
import sys
from pathlib import Path

# Runnable as a script from any directory: the project root, not reports/, goes on the import path.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))

from reports.report import generate_report, load_trials, main  # noqa: E402

__all__ = ["generate_report", "load_trials", "main"]

if __name__ == "__main__":
    sys.exit(main())
