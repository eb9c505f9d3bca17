"""`python study/sync.py`: replay the runs a study spooled while its MLflow tracking server was away."""
import sys
from pathlib import Path

# Runnable as a script from any directory: the project root, not study/, goes on the import path.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))

from study.spool.sync import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
