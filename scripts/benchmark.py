"""Training throughput of toyaccel against the book's loop and the bare-loop ceiling, in one run.

    python scripts/benchmark.py                          # everything: ~5 minutes on 2 cores
    python scripts/benchmark.py --parts ddp              # only the 1-vs-2-process rows
    python scripts/benchmark.py --quick --output b.json  # smoke run (the test suite runs it in-process)

What each part measures: scripts/bench/__init__.py; the parts are the modules of scripts/bench/.
This file is also what `accelerate launch` starts in each DDP worker, and what the memory measurements
start fresh (the hidden --worker, --gpt-memory and --reader-peak modes).
"""

from __future__ import annotations

import sys
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parent
sys.path[:0] = [str(SCRIPTS.parent), str(SCRIPTS)]  # toyaccel and bench, from a clone without installing

from bench.cli import main  # noqa: E402
from bench.ddp import worker_main  # noqa: E402, F401 - tests/test_benchmark.py runs the worker in-process

if __name__ == "__main__":
    sys.exit(main())
