"""What every part of the benchmark shares: the one block that imports toyaccel, the seeded data, the
timing, memory and matmul-peak helpers, and toyaccel's loop as the benchmark drives it.

Everything the benchmark takes from toyaccel is imported here and nowhere else in scripts/bench/, so that
a change in what the engine exports changes this block only.
"""

from __future__ import annotations

import contextlib
import io
import os
import statistics
import time
from pathlib import Path

import torch

from toyaccel import reference as book
from toyaccel.config import TrainConfig, parse_hidden
from toyaccel.engine import (
    MPI_AS_ROOT_ENV,
    Trainer,
    TrainingJob,
    apply_tf32,
    build_accelerator,
    release,
    wait_for_checkpoint,
)
from toyaccel.workloads import get_workload
from toyaccel.workloads.gpt.text import synthetic_text
from toyaccel.workloads.gpt.tokenizers import ByteTokenizer
from toyaccel.workloads.gpt.windows import TextBundle, TextWindows
from toyaccel.workloads.gpt.workload import VOCAB_MULTIPLE
from toyaccel.workloads.mlp.data import DataBundle, ToyDataset, load_data, synthetic_blobs
from toyaccel.workloads.mlp.model import NeuralNetwork

__all__ = [  # what the parts use from toyaccel, besides the helpers defined here
    "book", "wait_for_checkpoint", "TrainConfig", "parse_hidden", "DataBundle", "ToyDataset", "load_data",
    "synthetic_blobs", "MPI_AS_ROOT_ENV", "NeuralNetwork", "ByteTokenizer", "TextBundle", "TextWindows",
    "synthetic_text", "VOCAB_MULTIPLE",
]  # fmt: skip

REPO = Path(__file__).resolve().parents[2]
# The script the launched workers and the fresh measuring processes run (its hidden modes).
BENCHMARK_SCRIPT = REPO / "scripts" / "benchmark.py"
NUM_FEATURES, NUM_CLASSES, SEED = 32, 4, 123


@contextlib.contextmanager
def forced_cpu(device: str):
    """Accelerate picks the GPU when there is one; ACCELERATE_USE_CPU keeps a CPU row on the CPU."""
    saved = os.environ.get("ACCELERATE_USE_CPU")
    if device == "cpu":
        os.environ["ACCELERATE_USE_CPU"] = "true"
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("ACCELERATE_USE_CPU", None)
        else:
            os.environ["ACCELERATE_USE_CPU"] = saved


@contextlib.contextmanager
def device_accelerator(device: str, output_dir: str, mixed_precision: str = "no", compile: bool = False):
    """One Accelerator (built as toyaccel.fit builds it, TF32 on where the GPU has it) for a device's
    toyaccel loops of one precision: setting one up costs ~0.5 s, and a launched worker cannot set its
    process group up a second time."""
    with forced_cpu(device):
        config = TrainConfig(output_dir=output_dir, mixed_precision=mixed_precision, compile=compile)
        accelerator = build_accelerator(config)
    apply_tf32(True, accelerator.device)
    try:
        yield accelerator
    finally:
        release(accelerator)


class PreparedLoop:
    """toyaccel's training loop for any workload, set up by toyaccel.engine.Trainer as fit sets it up
    (minus outputs): the data where --data-placement keeps it, the seeded model, its optimizer, all
    prepared. ``epoch()`` returns samples (windows for the GPT: ``tokens_per_sample`` turns them into tokens)."""

    tokens_per_sample = 1

    def __init__(self, data, config, accelerator, output_dir):
        self.config = config
        self.accelerator = accelerator
        self.trainer = Trainer(accelerator, TrainingJob(config, get_workload(config.model), data, {}))
        self.trainer.prepare()
        self.state, self.score = self.trainer.state, self.trainer.score
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        with contextlib.redirect_stdout(io.StringIO()):
            self.logger = self.trainer.open_log()

    @property
    def model(self):
        return self.trainer.model

    @model.setter
    def model(self, model):
        self.trainer.use_model(model)

    @property
    def loader(self):
        return self.trainer.loader

    def epoch(self) -> int:
        first_step = self.state.global_step
        # The log lines are part of the loop's cost, but not of this script's output.
        with contextlib.redirect_stdout(io.StringIO()):
            self.trainer.train_epoch()
        self.state.finish_epoch()
        return (self.state.global_step - first_step) * self.state.global_batch * self.tokens_per_sample

    def save_checkpoint(self) -> None:
        """fit's epoch-end checkpoint (published in the background: see wait_for_checkpoint)."""
        self.trainer.checkpointer.save(self.state)

    def close(self) -> None:
        del self.trainer
        self.accelerator.free_memory()  # drop its references to what it prepared for this loop


class MatmulPeak:
    """Square matrix products of the large MLP's width, in its precision (fp32 or bf16): the best a
    dense layer can do here."""

    def __init__(self, size, device, seconds=0.3, precision="no"):
        dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        self.a = torch.randn(size, size, device=device, dtype=dtype)
        self.b = torch.randn(size, size, device=device, dtype=dtype)
        self.flops_per_product = 2 * size**3
        torch.mm(self.a, self.b)  # the first product pays for library set-up (cuBLAS handles, heuristics)
        synchronize(device)
        start = time.perf_counter()
        torch.mm(self.a, self.b)
        synchronize(device)
        self.products = max(1, round(seconds / max(time.perf_counter() - start, 1e-6)))

    def epoch(self) -> int:
        for _ in range(self.products):
            torch.mm(self.a, self.b)
        return self.products  # "samples" here are products; flops = samples * flops_per_product


def synchronize(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed(loop, device) -> tuple[int, float, float]:
    """Samples, wall seconds and this process's CPU seconds of one epoch."""
    synchronize(device)
    start, cpu_start = time.perf_counter(), time.process_time()
    samples = loop.epoch()
    synchronize(device)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    if hasattr(loop, "settle"):
        loop.settle()
    return samples, seconds, cpu_seconds


def measure(loops: dict, device, warmup: int, repeats: int) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Samples per wall second and per CPU second of each repeat of each loop. The loops take turns,
    so a busy neighbour slows them all alike; CPU time leaves out the time other processes took the
    core, which makes single-process figures steadier on a shared machine."""
    for _ in range(warmup):
        for loop in loops.values():
            timed(loop, device)
    wall, cpu = {name: [] for name in loops}, {name: [] for name in loops}
    for _ in range(repeats):
        for name, loop in loops.items():
            samples, seconds, cpu_seconds = timed(loop, device)
            wall[name].append(samples / seconds)
            cpu[name].append(samples / max(cpu_seconds, 1e-9))
    return wall, cpu


def summary(wall: list[float], cpu: list[float] | None = None) -> dict:
    """Median samples/s of the repeats, and how noisy they were: spread = (max - min) / median."""
    out = {"samples_per_s": statistics.median(wall), "repeats": wall,
           "spread": (max(wall) - min(wall)) / statistics.median(wall)}  # fmt: skip
    if cpu:
        out.update(samples_per_cpu_s=statistics.median(cpu), repeats_cpu=cpu)
    return out


def reset_peak_memory(device: str) -> float:
    """Start a new peak; return the memory in use now (MiB): CUDA allocated, or this process's RSS."""
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated() / 2**20
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")  # Linux: resets VmHWM, the peak RSS
    return proc_status_mib("VmRSS")


def peak_memory(device: str) -> float:
    return torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else proc_status_mib("VmHWM")


def proc_status_mib(field: str) -> float:
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def first_epoch_memory(loop, device: str) -> dict:
    """The loop's first (warm-up) epoch, with the peak memory it reached. On a CPU only a process of
    its own tells one loop's peak RSS (freed memory stays with the process): see gpt_memory_worker."""
    before = reset_peak_memory(device)
    timed(loop, device)
    synchronize(device)
    peak = peak_memory(device)
    kind = "max_allocated" if device == "cuda" else "rss"
    return {f"peak_{kind}_mib": peak, f"growth_{kind}_mib": peak - before}


def dataset(num_samples: int):
    """The same seeded blobs for every loop (a smaller run takes the first rows of the same set)."""
    data = synthetic_blobs(max(num_samples, 65536), NUM_FEATURES, NUM_CLASSES, SEED)
    return data.features[:num_samples].contiguous(), data.labels[:num_samples].contiguous()


def find(rows, **match) -> dict | None:
    for row in rows:
        if all(row.get(k) == v for k, v in match.items()):
            return row
    return None


def fmt_rate(rate) -> str:
    return "-" if rate is None else f"{rate / 1000:,.1f}k"
