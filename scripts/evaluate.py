"""Evaluate a trained run: loss, accuracy and confusion matrix, on one process or many.

    python scripts/evaluate.py runs/toy --data toy                 # the book's test set
    python scripts/evaluate.py runs/mine --data test.csv           # your labelled CSV
    python scripts/evaluate.py runs/mine                           # the run's own validation set
    accelerate launch --config_file accelerate_configs/multi_cpu.yaml scripts/evaluate.py runs/mine --data test.csv

Every option: python scripts/evaluate.py --help. The work is done by toyaccel/inference.py.
"""

import sys
from pathlib import Path

# Run from a clone without installing: put the repository root on the path.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from toyaccel.cli import evaluate_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(evaluate_main())
