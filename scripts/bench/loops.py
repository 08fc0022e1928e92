"""The MLP's loops side by side: the book's, toyaccel's, the bare-loop ceiling, a whole epoch as fit runs
it, and the matmul peak beside the large MLP; on a GPU, also host synchronisations and GPU-busy time."""

from __future__ import annotations

import functools
import sys
import time
import warnings

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile
from torch.utils.data import DataLoader

from bench.common import (
    NUM_CLASSES,
    NUM_FEATURES,
    SEED,
    DataBundle,
    MatmulPeak,
    NeuralNetwork,
    PreparedLoop,
    ToyDataset,
    TrainConfig,
    book,
    dataset,
    device_accelerator,
    measure,
    summary,
    synchronize,
    synthetic_blobs,
    wait_for_checkpoint,
)

COMPILED = "toyaccel_compiled"  # the large MLP's largest GPU batch, --compile
MIN_GPU_STEPS = 64
# Mixed precision of the large MLP's rows: fp32 on CPU; bf16 on a GPU, where fp32 leaves the tensor cores idle.
LARGE_PRECISION = {"cpu": "no", "cuda": "bf16"}


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
        samples = super().epoch()
        self.score(self.model)  # fit's epoch-end evaluation: the validation set and the training-set sample
        self.save_checkpoint()
        return samples

    def settle(self) -> None:
        """Untimed, after each epoch: fit publishes a checkpoint (fsyncs, rename) in a thread while the next
        epoch trains, so the epoch does not wait for it; nor should the next loop's timing pay for it."""
        wait_for_checkpoint()


def flops_per_sample(hidden) -> int:
    """Forward 2*in*out per layer, backward twice that, except no input gradient for the first layer."""
    sizes = [NUM_FEATURES, *hidden, NUM_CLASSES]
    layers = [fan_in * fan_out for fan_in, fan_out in zip(sizes, sizes[1:])]
    return 6 * sum(layers) - 2 * layers[0]


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
