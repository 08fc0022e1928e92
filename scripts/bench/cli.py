"""scripts/benchmark.py's options and the order the parts run in; each part's rows are saved as they come."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import tempfile
from pathlib import Path

import torch

import bench
from bench.common import parse_hidden
from bench.ddp import ddp_rows, worker_main
from bench.gpt import gpt_memory_worker, gpt_rows
from bench.loops import loop_rows
from bench.reader import reader_peak_main, reader_result
from bench.report import machine, ratios, table
from bench.shards import shard_rows
from bench.startup import time_to_first_step

PARTS = ("loops", "ddp", "reader", "startup", "gpt", "shards")
# The shards part writes gigabytes of tokens to disk and runs for minutes: asked for by name only.
DEFAULT_PARTS = ("loops", "ddp", "reader", "startup", "gpt")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=bench.__doc__.split("\n")[0])
    p.add_argument("--output", default="benchmark.json", help="where the JSON results go (default: %(default)s)")
    p.add_argument("--quick", action="store_true", help="a tiny smoke run: small data, small 'large' MLP, 1 repeat")
    p.add_argument("--samples", type=int, default=65536, help="book MLP: samples per epoch")
    p.add_argument("--batch-sizes", default="32,256,1024")
    p.add_argument("--large-hidden", default="2048,2048", help="hidden sizes of the large MLP")
    p.add_argument("--large-samples", type=int, default=8192, help="large MLP: samples per epoch (first rows)")
    p.add_argument("--gpu-large-samples", type=int, default=262144, help="large MLP on a GPU: samples per epoch")
    p.add_argument("--gpu-large-batch-sizes", default="1024,8192,32768", help="large MLP on a GPU (bf16)")
    p.add_argument("--warmup", type=int, default=1, help="untimed epochs before the repeats")
    p.add_argument("--peak-seconds", type=float, default=0.3, help="length of one timed run of matrix products")
    p.add_argument("--repeats", type=int, default=9, help="timed epochs per loop, book MLP")
    p.add_argument("--repeats-large", type=int, default=3, help="timed epochs per loop, large MLP")
    p.add_argument("--ddp-batch-sizes", default="256,1024", help="batch sizes per process for the DDP rows")
    p.add_argument("--ddp-samples", type=int, default=16384, help="large MLP: samples per DDP epoch")
    p.add_argument("--ddp-repeats", type=int, default=2, help="timed epochs per launch")
    p.add_argument("--ddp-rounds", type=int, default=2, help="alternating 1-process / N-process launches")
    p.add_argument("--parts", default=",".join(DEFAULT_PARTS),
                   help=f"which measurements to run, of {','.join(PARTS)} (default: %(default)s)")
    p.add_argument("--shards-text-mb", type=float, default=20, help="shards: MB of text toyaccel-prepare tokenizes")
    p.add_argument("--shards-gb", default="0.1,1,4", help="shards: GB of tokens the training processes read")
    p.add_argument("--reader-rows", type=int, default=200_000, help="rows of the CSV file the readers read")
    p.add_argument("--reader-repeats", type=int, default=3, help="timed reads per reader")
    p.add_argument("--gpt-batch-size", type=int, default=8, help="GPT: windows per step (default: %(default)s)")
    p.add_argument("--gpt-gpu-batch-size", type=int, default=32, help="GPU fast row: windows of 1024 per step")
    p.add_argument("--gpt-steps", type=int, default=8, help="GPT: optimizer steps per timed epoch")
    p.add_argument("--gpt-repeats", type=int, default=3, help="GPT: timed epochs per loop")
    p.add_argument("--startup-repeats", type=int, default=3)
    p.add_argument("--devices", default="auto", help="cpu, cuda or cpu,cuda (auto: cpu, plus cuda if present)")
    p.add_argument("--timeout", type=float, default=600, help="seconds allowed for each launched process")
    p.add_argument("--worker", help=argparse.SUPPRESS)  # set by launch_workers
    p.add_argument("--gpt-memory", choices=("book", "toyaccel"), help=argparse.SUPPRESS)  # set by cpu_memory_rows
    p.add_argument("--reader-peak", nargs=2, help=argparse.SUPPRESS)  # set by reader_result
    args = p.parse_args(argv)
    if args.quick:
        args.samples, args.large_samples, args.ddp_samples, args.peak_seconds = 2048, 512, 512, 0.05
        args.batch_sizes, args.large_hidden, args.ddp_batch_sizes = "32,256", "256,256", "128"
        args.gpu_large_samples, args.gpu_large_batch_sizes = 4096, "256,1024"
        args.repeats = args.repeats_large = args.ddp_repeats = args.ddp_rounds = args.startup_repeats = 1
        args.gpt_batch_size, args.gpt_steps, args.gpt_repeats = 4, 3, 1
        args.reader_rows, args.reader_repeats = 5000, 1
        args.shards_text_mb, args.shards_gb = 1, "0.01,0.05"
    args.batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    args.gpu_large_batch_sizes = [int(b) for b in args.gpu_large_batch_sizes.split(",")]
    args.ddp_batch_sizes = [int(b) for b in args.ddp_batch_sizes.split(",")]
    args.large_hidden = parse_hidden(args.large_hidden)
    args.shards_gb = [float(g) for g in args.shards_gb.split(",")]
    args.parts = set(args.parts.split(","))
    if not args.parts <= set(PARTS):
        p.error(f"--parts: expected a comma-separated subset of {','.join(PARTS)}, got {','.join(sorted(args.parts))}")
    if args.devices == "auto":
        args.devices = "cpu,cuda" if torch.cuda.is_available() else "cpu"
    args.devices = args.devices.split(",")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        worker_main(json.loads(args.worker), args.output)
        return 0
    if args.gpt_memory:
        torch.set_num_threads(1)
        with contextlib.redirect_stdout(io.StringIO()):
            memory = gpt_memory_worker(args, args.gpt_memory)
        print(json.dumps(memory))
        return 0
    if args.reader_peak:
        reader_peak_main(*args.reader_peak)
        return 0
    torch.set_num_threads(1)  # one thread, like each DDP worker: the 1-vs-2-process comparison is per core
    result = {"machine": machine(), "threads": 1, "devices": args.devices, "batch_sizes": args.batch_sizes,
              "quick": args.quick, "rows": [], "ratios": {}, "finished": []}  # fmt: skip

    def save() -> None:
        """What is measured so far goes to the JSON at once: a run stopped at a time limit keeps it."""
        Path(args.output).write_text(json.dumps(result, indent=1) + "\n")

    def finished(part: str) -> None:
        result["finished"].append(part)
        save()

    with tempfile.TemporaryDirectory() as work_dir:
        for device in args.devices:
            if "loops" in args.parts:
                for rows in loop_rows(args, device, work_dir):
                    result["rows"] += rows
                    save()
                finished(f"{device} loops")
            if "ddp" in args.parts and (device == "cpu" or torch.cuda.device_count() > 1):
                print(f"{device} DDP launches ...", file=sys.stderr, flush=True)
                result["rows"] += ddp_rows(args, device)
                finished(f"{device} ddp")
            result["ratios"][device] = ratios(result["rows"], device)
            if "gpt" in args.parts:
                print(f"{device} GPT ...", file=sys.stderr, flush=True)
                result.setdefault("gpt", {})[device] = gpt_rows(args, device, work_dir)
                finished(f"{device} gpt")
        if "reader" in args.parts:
            print("CSV readers ...", file=sys.stderr, flush=True)
            result["reader"] = reader_result(args, work_dir)
            finished("reader")
        if "shards" in args.parts:
            print("token shards: prepare, and training at " + ", ".join(f"{g} GB" for g in args.shards_gb) + " ...",
                  file=sys.stderr, flush=True)  # fmt: skip
            result["shards"] = shard_rows(args, work_dir)
            finished("shards")
        if "startup" in args.parts:
            print("start-up of scripts/train.py ...", file=sys.stderr, flush=True)
            result["startup"] = time_to_first_step(work_dir, args.startup_repeats, args.timeout)
            finished("startup")
    result["table"] = table(result)
    print(result["table"])
    Path(args.output).write_text(json.dumps(result, indent=1) + "\n")
    print(f"\nwrote {args.output}")
    return 0
