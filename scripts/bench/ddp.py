"""DDP: 1 process against N on the large MLP. `accelerate launch` starts scripts/benchmark.py in each
process with the hidden --worker option, which runs worker_main."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from bench.common import BENCHMARK_SCRIPT, MPI_AS_ROOT_ENV, REPO, dataset, device_accelerator, measure, summary
from bench.loops import ToyaccelLoop, flops_per_sample


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_workers(config_file: str, spec: dict, timeout: float) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        result_path = f"{tmp}/result.json"
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(REPO / config_file),
               "--main_process_port", str(free_port()), str(BENCHMARK_SCRIPT),
               "--worker", json.dumps({**spec, "output_dir": tmp}), "--output", result_path]  # fmt: skip
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
        # multi_cpu.yaml runs mpirun, which refuses to start as root (containers, CI) without these.
        env.update(MPI_AS_ROOT_ENV)
        for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
            env.pop(key, None)
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
        if not Path(result_path).exists():
            raise RuntimeError(f"{config_file} workers failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
        return json.loads(Path(result_path).read_text())


def worker_main(spec: dict, output: str) -> None:
    """One process of a DDP (or 1-process) launch: time the toyaccel loop at each batch size."""
    torch.set_num_threads(1)
    features, labels = dataset(spec["samples"])
    results = {}
    with device_accelerator(spec["device"], spec["output_dir"]) as accelerator:
        for batch_size in spec["batch_sizes"]:
            loop = ToyaccelLoop(features, labels, tuple(spec["hidden"]), batch_size, accelerator,
                                f"{spec['output_dir']}/{batch_size}")  # fmt: skip
            try:
                rates = measure({"toyaccel": loop}, spec["device"], spec["warmup"], spec["repeats"])[0]["toyaccel"]
            finally:
                loop.close()
            results[str(batch_size)] = {"rates": rates, "world_size": accelerator.num_processes}
        if accelerator.is_main_process:
            Path(output).write_text(json.dumps(results))


def ddp_rows(args, device: str) -> list[dict]:
    """1 process vs N processes on the large MLP; launches alternate so both see the same load."""
    configs = {"cpu": ("accelerate_configs/cpu.yaml", "accelerate_configs/multi_cpu.yaml"),
               "cuda": ("accelerate_configs/single_gpu.yaml", "accelerate_configs/multi_gpu.yaml")}[device]  # fmt: skip
    spec = {"samples": args.ddp_samples, "hidden": list(args.large_hidden), "batch_sizes": args.ddp_batch_sizes,
            "device": device, "warmup": args.warmup, "repeats": args.ddp_repeats}  # fmt: skip
    rates: dict[tuple[int, int], list[float]] = {}
    for _ in range(args.ddp_rounds):
        for config_file in configs:
            for b, r in launch_workers(config_file, spec, args.timeout).items():
                rates.setdefault((r["world_size"], int(b)), []).extend(r["rates"])
    rows = []
    for (world_size, batch_size), r in sorted(rates.items()):
        row = {"model": "large", "hidden": list(args.large_hidden), "device": device, "processes": world_size,
               "batch_size": batch_size, "loop": "toyaccel", "samples": args.ddp_samples, "launched": True,
               **summary(r)}  # fmt: skip
        row["gflops"] = row["samples_per_s"] * flops_per_sample(args.large_hidden) / 1e9
        rows.append(row)
    return rows
