"""The CSV reader: toyaccel's against numpy.loadtxt on the same file, taking turns, each also once in a
fresh process (scripts/benchmark.py's hidden --reader-peak) for its peak memory."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from bench.common import (
    BENCHMARK_SCRIPT,
    NUM_CLASSES,
    NUM_FEATURES,
    REPO,
    SEED,
    TrainConfig,
    load_data,
    peak_memory,
    reset_peak_memory,
    synthetic_blobs,
)

READER_TARGETS = {"reader_vs_loadtxt_time": 1.5, "reader_peak_vs_tensor": 3.0}  # at most


def write_csv_file(path: str, rows: int, columns: int) -> None:
    data = synthetic_blobs(rows, columns, NUM_CLASSES, SEED)
    table = np.column_stack([data.features.double().numpy(), data.labels.numpy()])
    header = ",".join([*(f"x{i + 1}" for i in range(columns)), "label"])
    np.savetxt(path, table, delimiter=",", fmt=["%.9g"] * columns + ["%d"], header=header, comments="")


def read_csv_with(reader: str, path: str):
    """One read of ``path``: toyaccel's as training does it (classes included), or numpy.loadtxt's plain call."""
    if reader == "toyaccel":
        return load_data(TrainConfig(data=path)).train.features
    return np.loadtxt(path, delimiter=",", skiprows=1)


def reader_peak_main(reader: str, path: str) -> None:
    """In a fresh process: the most memory one read added on top of what the process held before it
    (Linux's peak resident size, reset just before the read)."""
    before = reset_peak_memory("cpu")
    read_csv_with(reader, path)
    print(json.dumps({"peak_bytes": round((peak_memory("cpu") - before) * 2**20)}))


def reader_result(args, work_dir: str) -> dict:
    path = f"{work_dir}/reader.csv"
    write_csv_file(path, args.reader_rows, NUM_FEATURES)
    tensor_bytes = args.reader_rows * NUM_FEATURES * 4  # the final float32 feature tensor
    seconds = {"toyaccel": [], "numpy_loadtxt": []}
    read_csv_with("toyaccel", path)  # warm-up: the file in the page cache for both
    for _ in range(args.reader_repeats):
        for reader in seconds:  # taking turns, so a busy neighbour slows both alike
            start = time.perf_counter()
            read_csv_with(reader, path)
            seconds[reader].append(time.perf_counter() - start)
    peaks = {}
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    for reader in seconds:
        cmd = [sys.executable, str(BENCHMARK_SCRIPT), "--reader-peak", reader, path]
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=args.timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"reader peak of {reader} failed:\n{proc.stderr[-3000:]}")
        peaks[reader] = json.loads(proc.stdout.splitlines()[-1])["peak_bytes"]
    median = {reader: statistics.median(s) for reader, s in seconds.items()}
    return {
        "rows": args.reader_rows, "columns": NUM_FEATURES + 1, "file_bytes": Path(path).stat().st_size,
        "tensor_bytes": tensor_bytes, "seconds": median, "repeats_s": seconds, "peak_bytes": peaks,
        "reader_vs_loadtxt_time": median["toyaccel"] / median["numpy_loadtxt"],
        "reader_peak_vs_tensor": peaks["toyaccel"] / tensor_bytes,
        "loadtxt_peak_vs_tensor": peaks["numpy_loadtxt"] / tensor_bytes,
    }  # fmt: skip


def reader_table(reader: dict) -> list[str]:
    mb = 1e6
    return [
        f"\nCSV reader, {reader['rows']:,} rows x {reader['columns']} columns ({reader['file_bytes'] / mb:.0f} MB; "
        f"final float32 features {reader['tensor_bytes'] / mb:.1f} MB), median of the repeats:",
        "",
        "| reader | seconds | peak memory | peak / final tensor |",
        "|---|---:|---:|---:|",
        *(
            f"| {name} | {reader['seconds'][key]:.3f} | {reader['peak_bytes'][key] / mb:.0f} MB "
            f"| {reader['peak_bytes'][key] / reader['tensor_bytes']:.2f} |"
            for name, key in (("toyaccel (load_data)", "toyaccel"), ("numpy.loadtxt (float64)", "numpy_loadtxt"))
        ),
    ]
