"""Train the book's Appendix A MLP with Accelerate: the same script on CPU, one GPU or many processes.

    python scripts/train.py                                                           # one process, best device
    accelerate launch --config_file accelerate_configs/cpu.yaml scripts/train.py       # one process, CPU
    accelerate launch --config_file accelerate_configs/multi_cpu.yaml scripts/train.py # DDP, 2 CPU processes (gloo)
    accelerate launch --config_file accelerate_configs/single_gpu.yaml scripts/train.py
    accelerate launch --config_file accelerate_configs/multi_gpu.yaml scripts/train.py # DDP, 2 GPUs
    accelerate launch scripts/train.py        # whatever `accelerate config` saved as your default

Every option: python scripts/train.py --help. The work is done by toyaccel.fit (toyaccel/runner.py, toyaccel/engine/).
"""

import sys
from pathlib import Path

# Run from a clone without installing: put the repository root on the path.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from toyaccel.cli import train_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(train_main())
