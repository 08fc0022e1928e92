"""Training throughput of toyaccel against the book's loop and the bare-loop ceiling, in one run.

    python scripts/benchmark.py                          # everything: ~5 minutes on 2 cores
    python scripts/benchmark.py --parts ddp              # only the 1-vs-2-process rows
    python scripts/benchmark.py --quick --output b.json  # smoke run (the test suite runs it in-process)

On the same synthetic data (64k samples x 32 features x 4 classes) it times one epoch of:
  book      the book's loop: per-sample Dataset.__getitem__, default DataLoader(shuffle=True), plain PyTorch;
  toyaccel  toyaccel's own loop under Accelerate (toyaccel.training.train_one_epoch on what set_up_training,
            train()'s own set-up, prepares);
  ceiling   the same model and SGD over pre-sliced batch tensors: no loader, no Accelerate;
for the book's MLP (hidden 30,20) and a large MLP (2048,2048; its epoch is the first 8k rows) whose
matrix products dominate, at batch sizes 32, 256, 1024. Every figure is the median samples/s of
several repeats after a warm-up epoch. The loops of one group take turns, so a busy neighbour slows
them all alike; CPU-time figures (in the JSON, and in brackets under "targets") leave out the time other
processes held the core. The large MLP also gets GFLOP/s against a square fp32 matrix product timed
between the same repeats, and 1 vs 2 processes (DDP over gloo, accelerate_configs/multi_cpu.yaml; the
launches alternate). Single-process CPU rows use one thread, like each DDP worker. With a GPU, the same
rows on it (and DDP with multi_gpu.yaml on 2+ GPUs), except that the large MLP runs under bf16
autocast at larger batches against a bf16 matrix product, and that the book MLP at batch 256 also
gets per-step host synchronisations, copies to the GPU and GPU-busy time. Beside the loops, `epoch` is
what a user pays for one epoch of toyaccel.fit: the same loop plus its epoch-end evaluation (a
validation set a quarter the size of the training set, and the training-set sample) and checkpoint.
The CSV reader (`--parts reader`) reads a 200k x 32 file with toyaccel's reader and with
numpy.loadtxt, taking turns, each also once in a fresh process for its peak memory. Last, the time
from starting `python scripts/train.py` (fresh output dir) to its first training step's log line.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import io
import json
import os
import platform
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run from a clone without installing

from toyaccel import reference as book  # noqa: E402
from toyaccel.config import TrainConfig, parse_hidden  # noqa: E402
from toyaccel.data import DataBundle, ToyDataset, synthetic_blobs  # noqa: E402
from toyaccel.launch import MPI_AS_ROOT_ENV  # noqa: E402
from toyaccel.model import NeuralNetwork  # noqa: E402
from toyaccel.workloads.gpt import VOCAB_MULTIPLE  # noqa: E402

NUM_FEATURES, NUM_CLASSES, SEED = 32, 4, 123
LOOPS = ("book", "toyaccel", "ceiling")
COMPILED = "toyaccel_compiled"  # the large MLP's largest GPU batch, --compile
MIN_GPU_STEPS = 64
PARTS = ("loops", "ddp", "reader", "startup", "gpt")
# The issues' targets, as ratios, for each device. On a GPU the loop is held to the same ceiling as on CPU,
# and the large MLP runs under bf16 autocast against the bf16 matmul rate (issue 12); against the book's
# loop, and for DDP, the targets are the CPU's.
TARGETS = {
    "cpu": {
        "toyaccel_vs_book_b256": 3.0,
        "toyaccel_vs_ceiling_b256": 0.9,
        "epoch_vs_book_b256": 2.5,
        "large_mlp_vs_matmul_peak": 0.85,
        "ddp2_vs_1_process": 1.6,
    },
    "cuda": {"toyaccel_vs_ceiling_b256": 0.9, "large_mlp_vs_matmul_peak": 0.6},
}
# Mixed precision of the large MLP's rows: fp32 on CPU; bf16 on a GPU, where fp32 leaves the tensor cores idle.
LARGE_PRECISION = {"cpu": "no", "cuda": "bf16"}
READER_TARGETS = {"reader_vs_loadtxt_time": 1.5, "reader_peak_vs_tensor": 3.0}  # at most
FIRST_STEP_LINE = re.compile(r"\bstep 1\b")


# ---------------------------------------------------------------------------------------------
# The three loops. Each `epoch()` trains one pass and returns the number of samples it trained on.


def seeded_model(hidden, device):
    torch.manual_seed(SEED)
    model = NeuralNetwork(NUM_FEATURES, NUM_CLASSES, hidden).to(device)
    return model, torch.optim.SGD(model.parameters(), lr=0.1)


def autocast(device, precision: str):
    """What Accelerate's prepared model does under --mixed-precision bf16, for the loops without it."""
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=precision == "bf16")


class BookLoop:
    """Appendix A's loop as printed (toyaccel.reference): its ToyDataset, DataLoader(shuffle=True)."""

    def __init__(self, features, labels, hidden, batch_size, device, precision="no"):
        self.device = torch.device(device)
        self.precision = precision
        self.model, self.optimizer = seeded_model(hidden, self.device)
        dataset = book.ToyDataset(features, labels)
        self.loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, drop_last=True)

    def epoch(self) -> int:
        precision = functools.partial(autocast, self.device, self.precision)
        return book.train_epoch(self.model, self.loader, self.optimizer, self.device, precision)


class CeilingLoop:
    def __init__(self, features, labels, hidden, batch_size, device, precision="no"):
        self.device, self.precision = device, precision
        self.model, self.optimizer = seeded_model(hidden, device)
        order = torch.randperm(labels.shape[0], generator=torch.Generator().manual_seed(SEED))
        order = order[: labels.shape[0] // batch_size * batch_size]
        features, labels = features[order].to(device), labels[order].to(device)
        self.batches = list(zip(features.split(batch_size), labels.split(batch_size)))

    def epoch(self) -> int:
        model, optimizer = self.model, self.optimizer
        model.train()
        for features, labels in self.batches:
            with autocast(self.device, self.precision):
                logits = model(features)
            loss = F.cross_entropy(logits.float(), labels)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return len(self.batches) * self.batches[0][1].shape[0]


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
    from toyaccel.device import apply_tf32
    from toyaccel.training import build_accelerator, release

    with forced_cpu(device):
        config = TrainConfig(output_dir=output_dir, mixed_precision=mixed_precision, compile=compile)
        accelerator = build_accelerator(config)
    apply_tf32(True, accelerator.device)
    try:
        yield accelerator
    finally:
        release(accelerator)


class PreparedLoop:
    """toyaccel's training loop for any workload, set up by toyaccel.training.set_up_training as train() sets
    it up (minus outputs): the data where --data-placement keeps it, the seeded model, its optimizer, all
    prepared. ``epoch()`` returns samples (windows for the GPT: ``tokens_per_sample`` turns them into tokens)."""

    tokens_per_sample = 1

    def __init__(self, data, config, accelerator, output_dir):
        from toyaccel.metrics import MetricsLogger
        from toyaccel.training import set_up_training

        self.config = config
        self.accelerator = accelerator
        run = set_up_training(accelerator, config, data)
        self.model, self.optimizer, self.loader = run.model, run.optimizer, run.train_loader
        self.sampler, self.state, self.score = run.sampler, run.state, run.score
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        with contextlib.redirect_stdout(io.StringIO()):
            self.logger = MetricsLogger(self.accelerator, output_dir, self.config.epochs, False, None)
        self.log_every = config.log_every or max(1, self.sampler.steps_per_epoch // 10)  # as train() sets it

    def epoch(self) -> int:
        from toyaccel.training import train_one_epoch

        first_step = self.state.global_step
        # The log lines are part of the loop's cost, but not of this script's output.
        with contextlib.redirect_stdout(io.StringIO()):
            train_one_epoch(
                self.accelerator, self.model, self.optimizer, self.loader, self.sampler, self.state, self.config,
                self.logger, self.log_every,
            )  # fmt: skip
        self.state.finish_epoch()
        return (self.state.global_step - first_step) * self.state.global_batch * self.tokens_per_sample

    def close(self) -> None:
        del self.model, self.optimizer, self.loader
        self.accelerator.free_memory()  # drop its references to what it prepared for this loop


class ToyaccelLoop(PreparedLoop):
    """The MLP under toyaccel's loop."""

    def __init__(self, features, labels, hidden, batch_size, accelerator, output_dir, placement="auto", val=None,
                 compile=False):  # fmt: skip
        config = TrainConfig(
            data="synthetic", num_samples=labels.shape[0], num_features=NUM_FEATURES, num_classes=NUM_CLASSES,
            hidden=hidden, batch_size=batch_size, lr=0.1, seed=SEED, progress=False, plot=False,
            output_dir=output_dir, data_placement=placement,
            epochs=1_000_000,  # more than the repeats: each epoch shuffles the next one's order ahead, as in fit
        )  # fmt: skip
        data = DataBundle(ToyDataset(features, labels), val, NUM_FEATURES, NUM_CLASSES, [])
        super().__init__(data, config, accelerator, output_dir)
        if compile:  # as accelerate's prepare does under --compile (dynamo_backend="inductor")
            self.model = torch.compile(self.model, backend="inductor")


class EpochLoop(ToyaccelLoop):
    """A whole epoch as toyaccel.fit runs it: the loop, then the epoch-end evaluation and checkpoint."""

    def __init__(self, features, labels, hidden, batch_size, accelerator, output_dir):
        val_rows = labels.shape[0] // 4  # a 20% hold-out: 16k validation rows beside 64k training rows
        held_out = synthetic_blobs(labels.shape[0] + val_rows, NUM_FEATURES, NUM_CLASSES, SEED)
        val = ToyDataset(held_out.features[-val_rows:], held_out.labels[-val_rows:])
        super().__init__(features, labels, hidden, batch_size, accelerator, output_dir, val=val)

    def epoch(self) -> int:
        from toyaccel.checkpoint import save_checkpoint

        samples = super().epoch()
        self.score(self.model)  # fit's epoch-end evaluation: the validation set and the training-set sample
        save_checkpoint(self.accelerator, self.config.output_dir, self.state, self.config.keep_last)
        return samples

    def settle(self) -> None:
        """Untimed, after each epoch: fit publishes a checkpoint (fsyncs, rename) in a thread while the next
        epoch trains, so the epoch does not wait for it; nor should the next loop's timing pay for it."""
        from toyaccel.checkpoint import wait_for_checkpoint

        wait_for_checkpoint()


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


def flops_per_sample(hidden) -> int:
    """Forward 2*in*out per layer, backward twice that, except no input gradient for the first layer."""
    sizes = [NUM_FEATURES, *hidden, NUM_CLASSES]
    layers = [fan_in * fan_out for fan_in, fan_out in zip(sizes, sizes[1:])]
    return 6 * sum(layers) - 2 * layers[0]


def summary(wall: list[float], cpu: list[float] | None = None) -> dict:
    """Median samples/s of the repeats, and how noisy they were: spread = (max - min) / median."""
    out = {"samples_per_s": statistics.median(wall), "repeats": wall,
           "spread": (max(wall) - min(wall)) / statistics.median(wall)}  # fmt: skip
    if cpu:
        out.update(samples_per_cpu_s=statistics.median(cpu), repeats_cpu=cpu)
    return out


# ---------------------------------------------------------------------------------------------
# Single-process groups: the three loops side by side for one model, batch size and device


def loop_group(features, labels, model_name, hidden, batch_size, accelerator, args, work_dir, book_rows) -> list[dict]:
    """The loops side by side; the book's (host-bound: its DataLoader collates sample by sample) on the
    first ``book_rows`` samples only, which keeps a GPU's large epochs short."""
    device, precision = accelerator.device.type, accelerator.mixed_precision
    loops = {
        "book": BookLoop(features[:book_rows], labels[:book_rows], hidden, batch_size, device, precision),
        "toyaccel": ToyaccelLoop(
            features, labels, hidden, batch_size, accelerator, f"{work_dir}/{model_name}-{batch_size}"
        ),
        "ceiling": CeilingLoop(features, labels, hidden, batch_size, device, precision),
    }
    large = model_name == "large"
    if not large:
        loops["epoch"] = EpochLoop(features, labels, hidden, batch_size, accelerator, f"{work_dir}/epoch-{batch_size}")
    # On a GPU, the large MLP's largest batch also runs with --compile, whose fused elementwise kernels
    # spare the memory traffic that bounds the eager model there (the first epoch, untimed, compiles).
    compiled = large and device == "cuda" and batch_size == max(args.gpu_large_batch_sizes)
    if compiled:
        loops[COMPILED] = ToyaccelLoop(features, labels, hidden, batch_size, accelerator,
                                       f"{work_dir}/{model_name}-{batch_size}-compiled", compile=True)  # fmt: skip
    if large:  # measured between the same repeats, so the peak sees the same neighbours
        loops["matmul_peak"] = MatmulPeak(max(hidden), device, args.peak_seconds, precision)
    steps = None
    try:
        wall, cpu = measure(loops, device, args.warmup, args.repeats_large if large else args.repeats)
        if device == "cuda" and model_name == "book" and batch_size == 256:
            steps = gpu_step_profile(loops["toyaccel"], batch_size)
    finally:
        for loop in loops.values():
            if isinstance(loop, PreparedLoop):
                loop.close()
    if device != "cpu":
        cpu = {name: None for name in loops}  # CPU time says nothing about a GPU's throughput
    rows = []
    for name in [name for name in loops if name != "matmul_peak"]:
        row = {"model": model_name, "hidden": list(hidden), "device": device, "processes": 1, "batch_size": batch_size}
        samples = min(book_rows, labels.shape[0]) if name == "book" else labels.shape[0]
        row.update(loop=name, samples=samples, launched=False, precision=precision)
        row.update(summary(wall[name], cpu[name]))
        if name == "toyaccel" and steps:
            row["steps"] = steps
        row["gflops"] = row["samples_per_s"] * flops_per_sample(hidden) / 1e9
        rows.append(row)
    if large:
        peak = {"model": "matmul", "size": max(hidden), "device": device, "processes": 1, "batch_size": batch_size}
        peak.update(loop="matmul_peak", launched=False, precision=precision)
        peak.update(summary(wall["matmul_peak"], cpu["matmul_peak"]))
        peak["gflops"] = peak["samples_per_s"] * loops["matmul_peak"].flops_per_product / 1e9
        for row in rows:
            # flops per sample / flops per product turns a ratio of rates into a ratio of GFLOP/s.
            for clock, suffix in (("samples_per_s", ""), ("samples_per_cpu_s", "_cpu")):
                if clock in peak:
                    work = flops_per_sample(hidden) / loops["matmul_peak"].flops_per_product
                    row["of_matmul_peak" + suffix] = row[clock] * work / peak[clock]
        rows.append(peak)
    return rows


def loop_rows(args, device: str, work_dir: str):
    """The rows of each group of loops, one group at a time (so a run stopped at its limit keeps them)."""
    for model_name, hidden, samples, batch_sizes, precision in loop_plan(args, device):
        # A GPU's large-batch epoch holds at least MIN_GPU_STEPS steps: at 8 steps an epoch, its fixed
        # costs and the log lines' synchronisations (about ten an epoch, as in fit) would be what is timed.
        rows = {b: samples if device == "cpu" else max(samples, MIN_GPU_STEPS * b) for b in batch_sizes}
        with device_accelerator(device, work_dir, precision) as accelerator:
            features, labels = dataset(max(rows.values()))
            for b in batch_sizes:
                print(f"{device} {model_name} MLP, batch {b} ...", end="", file=sys.stderr, flush=True)
                start = time.perf_counter()
                yield loop_group(features[: rows[b]], labels[: rows[b]], model_name, hidden, b, accelerator, args,
                                 work_dir, book_rows=samples)  # fmt: skip
                print(f" {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)


def loop_plan(args, device: str) -> list[tuple]:
    """(model, hidden, samples, batch sizes, mixed precision) of each group of loops on ``device``.
    A GPU needs far larger batches than a CPU before the large MLP's matmuls outweigh launching them."""
    large = (args.large_samples, args.batch_sizes) if device == "cpu" else (args.gpu_large_samples,
                                                                             args.gpu_large_batch_sizes)  # fmt: skip
    return [("book", (30, 20), args.samples, args.batch_sizes, "no"),
            ("large", args.large_hidden, *large, LARGE_PRECISION.get(device, "no"))]  # fmt: skip


def host_syncs_per_epoch(loop) -> tuple[int, int]:
    """Host synchronisations (torch's CUDA sync debug mode reports each one) in one epoch of ``loop``,
    and the epoch's optimizer steps."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            samples = loop.epoch()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = sum("synchroniz" in str(w.message) for w in caught)
    return syncs, samples // loop.config.batch_size


def gpu_step_profile(loop, batch_size: int) -> dict:
    """Does a step ever wait for the host? Per step of one epoch: host synchronisations, wall time,
    and the time the GPU spent in kernels and copies (torch.profiler); a GPU busy all the wall time
    would be the device's limit, a gap the host's (launching, Python) but not a wait on a copy."""
    from torch.profiler import ProfilerActivity, profile

    syncs, steps = host_syncs_per_epoch(loop)
    figures = {"host_syncs_per_step": syncs / steps, "steps": steps, "batch_size": batch_size}
    synchronize("cuda")
    try:
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            start = time.perf_counter()
            loop.epoch()
            synchronize("cuda")
            wall = time.perf_counter() - start
        events = prof.key_averages()
    except RuntimeError as e:  # no CUPTI, say: the sync count above still stands
        return {**figures, "profiler_error": str(e).splitlines()[0]}
    busy_us = sum(e.self_device_time_total for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
    copies = sum(e.count for e in events if "Memcpy HtoD" in e.key)
    if busy_us == 0:  # a profiler without CUPTI may record no kernels rather than fail: no figure beats a false 0%
        return {**figures, "profiler_error": "no CUDA activity recorded"}
    return {**figures, "wall_us_per_step": wall / steps * 1e6, "gpu_busy_us_per_step": busy_us / steps,
            "gpu_busy_of_wall": busy_us / (wall * 1e6), "copies_to_device_per_step": copies / steps}  # fmt: skip


# ---------------------------------------------------------------------------------------------
# The GPT: toyaccel's (fused kernels, toyaccel's loop) against the book's chapter 4-5 code as printed
# (toyaccel/reference.py: stored-mask attention, its LayerNorm and GELU, GPTDatasetV1 and a DataLoader,
# train_model_simple's steps), same config, same seed, same data order: same losses at dropout 0.

GPT_SMALL = {"vocab_size": 1024, "context_length": 256, "emb_dim": 256, "n_heads": 4, "n_layers": 4,
             "drop_rate": 0.0, "qkv_bias": False}  # fmt: skip
GPT_QUICK = {**GPT_SMALL, "context_length": 32, "emb_dim": 32, "n_heads": 2, "n_layers": 1}
GPT_124M = {"vocab_size": 50257, "context_length": 1024, "emb_dim": 768, "n_heads": 12, "n_layers": 12,
            "drop_rate": 0.0, "qkv_bias": False}  # fmt: skip


def gpt_tokens(num_tokens: int) -> torch.Tensor:
    """The synthetic text read byte by byte: ids below 256, inside any vocabulary used here."""
    from toyaccel.text import ByteTokenizer, synthetic_text

    return torch.tensor(ByteTokenizer().encode(synthetic_text(num_tokens, SEED)), dtype=torch.int64)


class BookGPTLoop:
    def __init__(self, ids, cfg, batch_size, device):
        self.book = book
        context = cfg["context_length"]
        dataset = self.book.GPTDatasetV1(ids.tolist(), context, context)
        self.loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, drop_last=True, num_workers=0)
        torch.manual_seed(SEED)
        self.model = self.book.GPTModel(cfg).to(device)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=0.0004, weight_decay=0.1)
        self.device, self.tokens_per_step, self.losses = device, batch_size * context, []

    def epoch(self) -> int:
        steps = len(self.loader)
        self.losses = self.book.train_steps_simple(self.model, self.loader, self.optimizer, self.device, steps)
        return len(self.losses) * self.tokens_per_step


class GPTLoop(PreparedLoop):
    """toyaccel's GPT in toyaccel's loop, one log line per step (its losses are compared with the book's)."""

    def __init__(self, ids, cfg, batch_size, accelerator, output_dir, **options):
        from toyaccel.text import ByteTokenizer, TextBundle, TextWindows

        config = TrainConfig(model="gpt", data="synthetic", batch_size=batch_size, seed=SEED, progress=False,
                             plot=False, output_dir=output_dir, log_every=1, **cfg, **options)  # fmt: skip
        context = cfg["context_length"]
        data = TextBundle(TextWindows(ids, context, context), None, ByteTokenizer(), "the synthetic text")
        super().__init__(data, config, accelerator, output_dir)
        self.tokens_per_sample = context

    @property
    def losses(self) -> list[float]:
        return [r["loss"] for r in self.logger.history if r.get("kind") == "step"]


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


def gpt_memory_worker(args, loop_name: str) -> dict:
    """One loop's first epoch in this fresh process: its peak RSS, and how far it rose during the epoch."""
    cfg = GPT_QUICK if args.quick else GPT_SMALL
    ids = gpt_tokens(args.gpt_steps * args.gpt_batch_size * cfg["context_length"] + 1)
    with tempfile.TemporaryDirectory() as work_dir, device_accelerator("cpu", work_dir) as accelerator:
        if loop_name == "book":
            return first_epoch_memory(BookGPTLoop(ids, cfg, args.gpt_batch_size, "cpu"), "cpu")
        loop = GPTLoop(ids, cfg, args.gpt_batch_size, accelerator, f"{work_dir}/gpt")
        try:
            return first_epoch_memory(loop, "cpu")
        finally:
            loop.close()


def cpu_memory_rows(args) -> dict[str, dict]:
    out = {}
    for name in ("book", "toyaccel"):
        cmd = [sys.executable, str(Path(__file__).resolve()), "--gpt-memory", name, "--gpt-steps", str(args.gpt_steps),
               "--gpt-batch-size", str(args.gpt_batch_size), *(["--quick"] if args.quick else [])]  # fmt: skip
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout, check=True)
        out[name] = json.loads(proc.stdout.strip().splitlines()[-1])
    return out


def gpt_flops_per_token(cfg: dict) -> float:
    """6 x the matrix-product parameters (all but the embedding tables) + causal attention's
    12 x layers x width x context (the PaLM paper's count, as nanoGPT's MFU)."""
    emb, layers, context = cfg["emb_dim"], cfg["n_layers"], cfg["context_length"]
    per_block = 4 * emb * emb + 8 * emb * emb  # q, k, v, out projections; the 4x feed-forward
    matmul_params = layers * per_block + emb * cfg["vocab_size"]
    return 6 * matmul_params + 12 * layers * emb * context


def gpt_rows(args, device: str, work_dir: str) -> dict:
    """The book's code and toyaccel's GPT side by side (fp32); on a GPU, also toyaccel's fast path:
    GPT-124M's shape, bf16, fused AdamW, flash attention, vocab padded to 64, torch.compile."""
    cfg = GPT_QUICK if args.quick else GPT_SMALL
    batch, steps = args.gpt_batch_size, args.gpt_steps
    if device == "cuda":  # the book's fp32 attention keeps a T x T score tensor per head: batch 8 fits
        cfg = GPT_124M
    ids = gpt_tokens(steps * batch * cfg["context_length"] + 1)
    out = {"config": cfg, "batch_size": batch, "steps_per_epoch": steps, "rows": []}
    with device_accelerator(device, work_dir) as accelerator:
        loops = {"book": BookGPTLoop(ids, cfg, batch, device)}
        memory = {"book": first_epoch_memory(loops["book"], device)}
        loops["toyaccel"] = GPTLoop(ids, cfg, batch, accelerator, f"{work_dir}/gpt")
        try:
            memory["toyaccel"] = first_epoch_memory(loops["toyaccel"], device)
            if device == "cpu":
                memory = cpu_memory_rows(args)
            book_losses, our_losses = loops["book"].losses, loops["toyaccel"].losses
            out["max_loss_difference"] = max(abs(a - b) for a, b in zip(book_losses, our_losses))
            out["first_losses"] = {"book": book_losses[:3], "toyaccel": our_losses[:3]}
            wall, cpu = measure(loops, device, 0, args.gpt_repeats)
        finally:
            loops["toyaccel"].close()
    names = list(loops)
    loops.clear()  # the fast row's peak memory must not count these models
    if device == "cuda":
        torch.cuda.empty_cache()
    for name in names:
        # On a GPU with TF32 (toyaccel's default, and device_accelerator's) the fp32 matmuls round to TF32.
        precision = "tf32" if torch.device(device).type == "cuda" and torch.backends.cuda.matmul.allow_tf32 else "fp32"
        row = {"loop": name, "device": device, "precision": precision, **memory[name]}
        row.update({k.replace("samples", "tokens"): v for k, v in summary(wall[name], cpu[name]).items()})
        out["rows"].append(row)
    out["toyaccel_vs_book"] = out["rows"][1]["tokens_per_s"] / out["rows"][0]["tokens_per_s"]
    if device == "cpu":
        out["toyaccel_vs_book_cpu"] = out["rows"][1]["tokens_per_cpu_s"] / out["rows"][0]["tokens_per_cpu_s"]
    if device == "cuda":
        out["rows"].append(gpt_fast_row(args, cfg, work_dir))
    return out


def gpt_fast_row(args, cfg: dict, work_dir: str, device: str = "cuda", compile: bool = True) -> dict:
    options = {"mixed_precision": "bf16", "compile": compile}
    with device_accelerator(device, work_dir, **options) as accelerator:
        batch = args.gpt_gpu_batch_size if device == "cuda" else args.gpt_batch_size
        ids = gpt_tokens(args.gpt_steps * batch * cfg["context_length"] + 1)
        loop = GPTLoop(ids, cfg, batch, accelerator, f"{work_dir}/gpt-fast", **options)
        try:
            memory = first_epoch_memory(loop, device)  # includes compiling
            wall, _ = measure({"fast": loop}, device, 0, args.gpt_repeats)
        finally:
            loop.close()
    peak = MatmulPeak(8192 if device == "cuda" else 512, device, precision="bf16")
    rates = []
    for _ in range(3):
        products, seconds, _ = timed(peak, device)
        rates.append(products * peak.flops_per_product / seconds)
    peak_flops = statistics.median(rates)
    row = {"loop": "toyaccel-fast", "device": device, "precision": "bf16", "compile": compile, "batch_size": batch,
           "vocab_padded_to": VOCAB_MULTIPLE,
           **memory, **{k.replace("samples", "tokens"): v for k, v in summary(wall["fast"]).items()}}  # fmt: skip
    row["bf16_matmul_tflops"] = peak_flops / 1e12
    row["mfu"] = row["tokens_per_s"] * gpt_flops_per_token(cfg) / peak_flops
    return row


def gpt_table(gpt: dict) -> list[str]:
    cfg = gpt["config"]
    lines = [f"\nGPT ({cfg['n_layers']} layers, emb {cfg['emb_dim']}, {cfg['n_heads']} heads, context "
             f"{cfg['context_length']}, vocab {cfg['vocab_size']}, batch {gpt['batch_size']}, dropout 0), "
             "tokens/s, median of the repeats:", ""]  # fmt: skip
    for row in gpt["rows"]:
        memory = ", ".join(f"{k} {v:.0f}" for k, v in row.items() if k.startswith(("peak_", "growth_")))
        extra = f" | MFU {row['mfu']:.1%} of {row['bf16_matmul_tflops']:.0f} TFLOP/s" if "mfu" in row else ""
        lines.append(f"  {row['loop']:<14} {row['device']} {row['precision']}: {fmt_rate(row['tokens_per_s'])} "
                     f"(noise {row['spread']:.2f}) | {memory} MiB{extra}")  # fmt: skip
    cpu = f" ({gpt['toyaccel_vs_book_cpu']:.2f}x from CPU time)" if "toyaccel_vs_book_cpu" in gpt else ""
    lines.append(f"  toyaccel vs book: {gpt['toyaccel_vs_book']:.2f}x{cpu} (target >= 1.5); largest step-loss "
                 f"difference over the first epoch: {gpt['max_loss_difference']:.2g}")  # fmt: skip
    return lines


# ---------------------------------------------------------------------------------------------
# DDP: this script is also the worker that `accelerate launch` starts in each process


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_workers(config_file: str, spec: dict, timeout: float) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        result_path = f"{tmp}/result.json"
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(REPO / config_file),
               "--main_process_port", str(free_port()), __file__,
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


# ---------------------------------------------------------------------------------------------
# The CSV reader: toyaccel's against numpy.loadtxt on the same file


def write_csv_file(path: str, rows: int, columns: int) -> None:
    import numpy as np

    data = synthetic_blobs(rows, columns, NUM_CLASSES, SEED)
    table = np.column_stack([data.features.double().numpy(), data.labels.numpy()])
    header = ",".join([*(f"x{i + 1}" for i in range(columns)), "label"])
    np.savetxt(path, table, delimiter=",", fmt=["%.9g"] * columns + ["%d"], header=header, comments="")


def read_csv_with(reader: str, path: str):
    """One read of ``path``: toyaccel's as training does it (classes included), or numpy.loadtxt's plain call."""
    if reader == "toyaccel":
        from toyaccel.data import load_data

        return load_data(TrainConfig(data=path)).train.features
    import numpy as np

    return np.loadtxt(path, delimiter=",", skiprows=1)


def reader_peak_main(reader: str, path: str) -> None:
    """In a fresh process: the most memory one read added on top of what the process held before it
    (Linux's peak resident size, reset just before the read)."""
    import numpy  # noqa: F401 - imported before the baseline, as toyaccel.data imports it

    import toyaccel.data  # noqa: F401

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
        cmd = [sys.executable, __file__, "--reader-peak", reader, path]
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


# ---------------------------------------------------------------------------------------------
# Start-up: time to the first training step of the default run


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


# ---------------------------------------------------------------------------------------------
# Putting it together


def dataset(num_samples: int):
    """The same seeded blobs for every loop (a smaller run takes the first rows of the same set)."""
    data = synthetic_blobs(max(num_samples, 65536), NUM_FEATURES, NUM_CLASSES, SEED)
    return data.features[:num_samples].contiguous(), data.labels[:num_samples].contiguous()


def find(rows, **match) -> dict | None:
    for row in rows:
        if all(row.get(k) == v for k, v in match.items()):
            return row
    return None


def ratios(rows: list[dict], device: str) -> dict:
    """The issue's target ratios from this run's medians; ``*_cpu``: the same from CPU time."""
    out = {}
    for clock in ("samples_per_s", "samples_per_cpu_s"):
        suffix = "" if clock == "samples_per_s" else "_cpu"
        at_256 = {loop: find(rows, device=device, model="book", batch_size=256, loop=loop, launched=False)
                  for loop in LOOPS}  # fmt: skip
        if all(at_256.values()) and at_256["toyaccel"].get(clock):
            toyaccel = at_256["toyaccel"][clock]
            out["toyaccel_vs_book_b256" + suffix] = toyaccel / at_256["book"][clock]
            out["toyaccel_vs_ceiling_b256" + suffix] = toyaccel / at_256["ceiling"][clock]
        epoch = find(rows, device=device, model="book", batch_size=256, loop="epoch", launched=False)
        if epoch and at_256["book"] and epoch.get(clock):
            out["epoch_vs_book_b256" + suffix] = epoch[clock] / at_256["book"][clock]
        large = [r for r in rows if r["device"] == device and r["model"] == "large" and r["loop"] == "toyaccel"
                 and not r["launched"] and r.get("of_matmul_peak" + suffix)]  # fmt: skip
        if large:
            best = max(large, key=lambda r: r["of_matmul_peak" + suffix])
            out["large_mlp_vs_matmul_peak" + suffix] = best["of_matmul_peak" + suffix]
            out["large_mlp_vs_matmul_peak_batch" + suffix] = best["batch_size"]
        compiled = find(rows, device=device, model="large", loop=COMPILED, launched=False)
        if compiled and compiled.get("of_matmul_peak" + suffix):
            out["large_mlp_compiled_vs_matmul_peak" + suffix] = compiled["of_matmul_peak" + suffix]
            out["large_mlp_compiled_vs_matmul_peak_batch" + suffix] = compiled["batch_size"]
    peaks = [r["gflops"] for r in rows if r["device"] == device and r["loop"] == "matmul_peak"]
    if peaks:
        out["matmul_peak_gflops"] = max(peaks)
    steps = [r["steps"] for r in rows if r["device"] == device and r.get("steps")]
    if steps:
        out["steps"] = steps[0]
    for batch_size, one, many in ddp_pairs(rows, device):
        out[f"ddp{many['processes']}_vs_1_process_b{batch_size}"] = many["samples_per_s"] / one["samples_per_s"]
        out["ddp2_vs_1_process"] = many["samples_per_s"] / one["samples_per_s"]  # the largest batch's
        out["ddp_batch_per_process"] = batch_size
    return out


def ddp_pairs(rows: list[dict], device: str) -> list[tuple[int, dict, dict]]:
    """(batch per process, 1-process row, N-process row) of the launched runs, smallest batch first."""
    launched = [r for r in rows if r["device"] == device and r["launched"]]
    pairs = []
    for batch_size in sorted({r["batch_size"] for r in launched}):
        one = find(launched, batch_size=batch_size, processes=1)
        many = next((r for r in launched if r["batch_size"] == batch_size and r["processes"] > 1), None)
        if one and many:
            pairs.append((batch_size, one, many))
    return pairs


def fmt_rate(rate) -> str:
    return "-" if rate is None else f"{rate / 1000:,.1f}k"


def loop_table(rows: list[dict], device: str) -> list[str]:
    lines = ["| model (hidden) | batch | book loop | toyaccel | ceiling | toyaccel / book | toyaccel / ceiling "
             "| toyaccel GFLOP/s | of matmul peak | whole epoch | epoch / book | noise |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for model in ("book", "large"):
        for b in sorted({r["batch_size"] for r in rows if r["device"] == device and r["model"] == model}):
            got = {loop: find(rows, device=device, model=model, batch_size=b, loop=loop, launched=False)
                   for loop in LOOPS}  # fmt: skip
            if not all(got.values()):
                continue
            rate = {loop: row["samples_per_s"] for loop, row in got.items()}
            toyaccel = got["toyaccel"]
            of_peak = toyaccel.get("of_matmul_peak")
            epoch = find(rows, device=device, model=model, batch_size=b, loop="epoch", launched=False)
            epoch_cells = "- | -"
            if epoch:
                epoch_cells = f"{fmt_rate(epoch['samples_per_s'])} | {epoch['samples_per_s'] / rate['book']:.2f}x"
            lines.append(
                f"| {model} ({','.join(map(str, toyaccel['hidden']))}){precision_note(toyaccel)} | {b} "
                f"| {fmt_rate(rate['book'])} "
                f"| {fmt_rate(rate['toyaccel'])} | {fmt_rate(rate['ceiling'])} "
                f"| {rate['toyaccel'] / rate['book']:.2f}x | {rate['toyaccel'] / rate['ceiling']:.2f} "
                f"| {toyaccel['gflops']:.1f} | {'-' if of_peak is None else f'{of_peak:.2f}'} | {epoch_cells} "
                f"| {max(got[loop]['spread'] for loop in LOOPS):.0%} |"
            )
    return lines


def steps_line(steps: dict, device: str) -> str:
    """Whether the GPU ever waits for the host: synchronisations and copies per step, GPU vs wall time."""
    line = (f"book MLP, batch {steps['batch_size']}, toyaccel loop on {device}, per step: "
            f"{steps['host_syncs_per_step']:.3f} host synchronisations")  # fmt: skip
    if "profiler_error" in steps:
        return f"{line}; no profile ({steps['profiler_error']})"
    return (f"{line}, {steps['copies_to_device_per_step']:.3f} copies to the device, wall "
            f"{steps['wall_us_per_step']:.0f} us, GPU busy {steps['gpu_busy_us_per_step']:.0f} us "
            f"({steps['gpu_busy_of_wall']:.0%} of wall)")  # fmt: skip


def precision_note(row: dict) -> str:
    return "" if row.get("precision", "no") == "no" else f" {row['precision']}"


def ddp_table(rows: list[dict], device: str) -> list[str]:
    lines = ["| batch per process | 1 process | 2 processes | speed-up | noise 1 / 2 |", "|---:|---:|---:|---:|---:|"]
    for b, one, many in ddp_pairs(rows, device):
        lines.append(
            f"| {b} | {fmt_rate(one['samples_per_s'])} | {fmt_rate(many['samples_per_s'])} "
            f"| {many['samples_per_s'] / one['samples_per_s']:.2f}x | {one['spread']:.0%} / {many['spread']:.0%} |"
        )
    return lines


def table(result: dict) -> str:
    rows, lines = result["rows"], []
    for device in result["devices"]:
        if any(r["device"] == device and not r["launched"] for r in rows):
            lines += [f"\n{device}, one process, one thread: samples/s, median of the repeats (noise: the largest "
                      "(max - min) / median of the row's three loops)", ""]  # fmt: skip
            lines += loop_table(rows, device)
        peak = result["ratios"][device].get("matmul_peak_gflops")
        if peak:
            precision = LARGE_PRECISION.get(device, "no").replace("no", "fp32")
            lines.append(f"\nmatmul peak ({device}, {precision}, one thread): {peak:.1f} GFLOP/s")
        compiled = result["ratios"][device].get("large_mlp_compiled_vs_matmul_peak")
        if compiled:
            batch = result["ratios"][device]["large_mlp_compiled_vs_matmul_peak_batch"]
            lines.append(f"large MLP, toyaccel loop with --compile, batch {batch}: {compiled:.2f} of the matmul peak")
        steps = result["ratios"][device].get("steps")
        if steps:
            lines.append(steps_line(steps, device))
        if ddp_pairs(rows, device):
            lines += ["", f"DDP, large MLP, toyaccel loop, {device}, one thread per process:", ""]
            lines += ddp_table(rows, device)
    if result.get("reader"):
        lines += reader_table(result["reader"])
    startup = result.get("startup")
    if startup:
        lines.append(
            f"\nstart-up: `python scripts/train.py` logged its first step after {startup['first_step_s']:.2f} s "
            f"(`python -c 'import torch, accelerate'` alone: {startup['import_torch_accelerate_s']:.2f} s)"
        )
    for gpt in result.get("gpt", {}).values():
        lines += gpt_table(gpt)
    lines.append("\ntargets (ratios of this run's medians; in brackets: the same from CPU time):")
    for device in result["devices"]:
        got = result["ratios"][device]
        for name, target in TARGETS[device].items():
            if got.get(name) is None:
                continue
            cpu = got.get(name + "_cpu")
            verdict = "met" if got[name] >= target else "MISSED"
            lines.append(f"  {device} {name}: {got[name]:.3f}{'' if cpu is None else f' ({cpu:.3f})'} "
                         f"target >= {target}: {verdict}")  # fmt: skip
    reader = result.get("reader")
    for name, target in READER_TARGETS.items() if reader else ():
        verdict = "met" if reader[name] <= target else "MISSED"
        lines.append(f"  {name}: {reader[name]:.3f} target <= {target}: {verdict}")
    return "\n".join(lines)


def machine() -> dict:
    cpu = platform.processor()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    info = {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability()}  # fmt: skip
    with contextlib.suppress(ImportError):
        import accelerate

        info["accelerate"] = accelerate.__version__
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpus"] = torch.cuda.device_count()
    return info


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
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
    p.add_argument("--parts", default=",".join(PARTS), help="which measurements to run (default: %(default)s)")
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
    args.batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    args.gpu_large_batch_sizes = [int(b) for b in args.gpu_large_batch_sizes.split(",")]
    args.ddp_batch_sizes = [int(b) for b in args.ddp_batch_sizes.split(",")]
    args.large_hidden = parse_hidden(args.large_hidden)
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
        if "startup" in args.parts:
            print("start-up of scripts/train.py ...", file=sys.stderr, flush=True)
            result["startup"] = time_to_first_step(work_dir, args.startup_repeats, args.timeout)
            finished("startup")
    result["table"] = table(result)
    print(result["table"])
    Path(args.output).write_text(json.dumps(result, indent=1) + "\n")
    print(f"\nwrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
