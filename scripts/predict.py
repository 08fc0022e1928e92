"""Predict with a trained run: the class and class probabilities for every row of a CSV file.

    python scripts/predict.py runs/mine --data new_rows.csv --output predictions.csv

The CSV needs the feature columns the model was trained on (by name); a label column may be there or not.
Every option: python scripts/predict.py --help. The work is done by toyaccel/inference.py.
"""

import sys
from pathlib import Path

# Run from a clone without installing: put the repository root on the path.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from toyaccel.cli import predict_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(predict_main())
