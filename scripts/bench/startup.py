"""Start-up: the time from starting `python scripts/train.py` (fresh output dir) to its first step's log line."""

from __future__ import annotations

import os
import re
import statistics
import subprocess
import sys
import time

from bench.common import REPO

FIRST_STEP_LINE = re.compile(r"\bstep 1\b")


def time_to_first_step(work_dir: str, repeats: int, timeout: float) -> dict:
    """Wall time from starting `python scripts/train.py` (fresh output dir) to its 'step 1' log line.
    The run is stopped there: what comes after is the training this script measures above."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONWARNINGS": "ignore"}
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "ACCELERATE_USE_CPU", "OMP_NUM_THREADS"):
        env.pop(key, None)
    first = [first_step_seconds(f"{work_dir}/startup-{i}", env, timeout) for i in range(repeats)]
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import torch, accelerate"], env=env, check=True, timeout=timeout)
    return {"first_step_s": statistics.median(first), "first_step_repeats_s": first,
            "import_torch_accelerate_s": time.perf_counter() - start}  # fmt: skip


def first_step_seconds(output_dir: str, env: dict, timeout: float) -> float:
    cmd = [sys.executable, str(REPO / "scripts" / "train.py"), "--output-dir", output_dir, "--no-progress"]
    with open(f"{output_dir}.stderr", "w+") as err:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=err, text=True)
        try:
            for line in proc.stdout:
                if FIRST_STEP_LINE.search(line):
                    return time.perf_counter() - start
            proc.wait(timeout=timeout)
            err.seek(0)
            raise RuntimeError(f"scripts/train.py logged no first step (exit {proc.returncode}):\n{err.read()[-3000:]}")
        finally:
            proc.kill()
            proc.wait()
