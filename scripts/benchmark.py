"""Training throughput of toyaccel against the book's loop and the bare-loop ceiling, in one run.

    python scripts/benchmark.py                          # full run, a few minutes on 2 cores
    python scripts/benchmark.py --quick --output b.json  # smoke run (what the test suite runs)

On the same synthetic data (64k samples x 32 features x 4 classes) it times one epoch of:
  book      the book's loop: per-sample Dataset.__getitem__, default DataLoader(shuffle=True), plain PyTorch;
  toyaccel  toyaccel's own loop under Accelerate (toyaccel.training.train_one_epoch on prepared objects);
  ceiling   the same model and SGD over pre-sliced batch tensors: no loader, no Accelerate;
for the book's MLP (hidden 30,20) and a large MLP whose matrix products dominate, at batch sizes 32,
256, 1024. Every figure is the median samples/s of several repeats after a warm-up epoch; the loops of
one group take turns, so a busy neighbour slows them all alike. The large MLP also gets GFLOP/s against
a torch matrix-product peak measured between its repeats, and 1 vs 2 processes (DDP over gloo, launched
with accelerate_configs/multi_cpu.yaml). Single-process CPU rows use one thread, like each DDP worker.
Last, the time from starting `python scripts/train.py` to its first training step's log line.
"""

from __future__ import annotations

import argparse
import contextlib
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
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run from a clone without installing

from toyaccel.config import TrainConfig, parse_hidden  # noqa: E402
from toyaccel.data import ToyDataset, synthetic_blobs  # noqa: E402
from toyaccel.model import NeuralNetwork  # noqa: E402

NUM_FEATURES, NUM_CLASSES, SEED = 32, 4, 123
LOOPS = ("book", "toyaccel", "ceiling")
TARGETS = {  # the targets, as ratios
    "toyaccel_vs_book_b256": 3.0,
    "toyaccel_vs_ceiling_b256": 0.9,
    "large_mlp_vs_matmul_peak": 0.85,
    "ddp2_vs_1_process": 1.6,
}
FIRST_STEP_LINE = re.compile(r"\bstep 1\b")


# ---------------------------------------------------------------------------------------------
# The three loops. Each `epoch()` trains one pass and returns the number of samples it trained on.


class BookDataset(Dataset):
    """The book's ToyDataset: one sample per __getitem__ (no __getitems__, so the DataLoader collates)."""

    def __init__(self, features, labels):
        self.features, self.labels = features, labels

    def __getitem__(self, index):
        return self.features[index], self.labels[index]

    def __len__(self):
        return self.labels.shape[0]


def seeded_model(hidden, device):
    torch.manual_seed(SEED)
    model = NeuralNetwork(NUM_FEATURES, NUM_CLASSES, hidden).to(device)
    return model, torch.optim.SGD(model.parameters(), lr=0.1)


class BookLoop:
    def __init__(self, features, labels, hidden, batch_size, device):
        self.device = torch.device(device)
        self.model, self.optimizer = seeded_model(hidden, self.device)
        self.loader = DataLoader(BookDataset(features, labels), batch_size=batch_size, shuffle=True, drop_last=True)

    def epoch(self) -> int:
        model, optimizer, samples = self.model, self.optimizer, 0
        model.train()
        for features, labels in self.loader:
            features, labels = features.to(self.device), labels.to(self.device)
            loss = F.cross_entropy(model(features), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            samples += labels.shape[0]
        return samples


class CeilingLoop:
    def __init__(self, features, labels, hidden, batch_size, device):
        self.model, self.optimizer = seeded_model(hidden, device)
        order = torch.randperm(labels.shape[0], generator=torch.Generator().manual_seed(SEED))
        order = order[: labels.shape[0] // batch_size * batch_size]
        self.batches = list(zip(features[order].to(device).split(batch_size), labels[order].to(device).split(batch_size)))

    def epoch(self) -> int:
        model, optimizer = self.model, self.optimizer
        model.train()
        for features, labels in self.batches:
            loss = F.cross_entropy(model(features), labels)
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


class ToyaccelLoop:
    """toyaccel's training loop, set up as toyaccel.training.train() sets it up (minus outputs)."""

    def __init__(self, features, labels, hidden, batch_size, device, output_dir):
        from toyaccel.checkpoint import TrainerState
        from toyaccel.data import build_train_loader
        from toyaccel.metrics import MetricsLogger
        from toyaccel.training import build_accelerator

        self.config = TrainConfig(
            data="synthetic", num_samples=labels.shape[0], num_features=NUM_FEATURES, num_classes=NUM_CLASSES,
            hidden=hidden, batch_size=batch_size, lr=0.1, seed=SEED, progress=False, plot=False,
            output_dir=output_dir,
        )  # fmt: skip
        with forced_cpu(device):
            self.accelerator = build_accelerator(self.config)
        loader = build_train_loader(ToyDataset(features, labels), self.config, self.accelerator.num_processes)
        self.sampler = loader.batch_sampler
        model, optimizer = seeded_model(hidden, "cpu")
        self.model, self.optimizer, self.loader = self.accelerator.prepare(model, optimizer, loader)
        self.state = TrainerState(global_batch=self.sampler.global_batch, world_size=self.accelerator.num_processes)
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        with contextlib.redirect_stdout(io.StringIO()):
            self.logger = MetricsLogger(self.accelerator, output_dir, self.config.epochs, False, None)
        steps_per_epoch = labels.shape[0] // self.sampler.global_batch
        self.log_every = max(1, steps_per_epoch // 10)  # fit's default: about ten log lines an epoch

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
        return (self.state.global_step - first_step) * self.state.global_batch

    def close(self) -> None:
        from toyaccel.training import release

        del self.model, self.optimizer, self.loader
        release(self.accelerator)


class MatmulPeak:
    """Square fp32 matrix products of the large MLP's width: the best a dense layer can do here."""

    def __init__(self, size, device, seconds=0.3):
        self.a = torch.randn(size, size, device=device)
        self.b = torch.randn(size, size, device=device)
        self.flops_per_product = 2 * size**3
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


def timed(loop, device) -> tuple[int, float]:
    synchronize(device)
    start = time.perf_counter()
    samples = loop.epoch()
    synchronize(device)
    return samples, time.perf_counter() - start


def measure(loops: dict, device, warmup: int, repeats: int) -> dict[str, list[float]]:
    """Samples/s of each repeat of each loop; the loops take turns so load changes hit them alike."""
    for _ in range(warmup):
        for loop in loops.values():
            timed(loop, device)
    rates = {name: [] for name in loops}
    for _ in range(repeats):
        for name, loop in loops.items():
            samples, seconds = timed(loop, device)
            rates[name].append(samples / seconds)
    return rates


def flops_per_sample(hidden) -> int:
    """Forward 2*in*out per layer, backward twice that, except no input gradient for the first layer."""
    sizes = [NUM_FEATURES, *hidden, NUM_CLASSES]
    layers = [fan_in * fan_out for fan_in, fan_out in zip(sizes, sizes[1:])]
    return 6 * sum(layers) - 2 * layers[0]


def summary(rates: list[float]) -> dict:
    median = statistics.median(rates)
    return {
        "samples_per_s": median,
        "repeats": rates,
        "spread": (max(rates) - min(rates)) / median,  # (max - min) / median: how noisy the repeats were
    }


# ---------------------------------------------------------------------------------------------
# Single-process groups: the three loops side by side for one model, batch size and device


def loop_group(features, labels, model_name, hidden, batch_size, device, args, work_dir) -> list[dict]:
    loops = {
        "book": BookLoop(features, labels, hidden, batch_size, device),
        "toyaccel": ToyaccelLoop(features, labels, hidden, batch_size, device, f"{work_dir}/{model_name}-{batch_size}"),
        "ceiling": CeilingLoop(features, labels, hidden, batch_size, device),
    }
    large = model_name == "large"
    if large:
        loops["matmul_peak"] = MatmulPeak(max(hidden), device)
    try:
        rates = measure(loops, device, args.warmup, args.repeats_large if large else args.repeats)
    finally:
        loops["toyaccel"].close()
    rows = []
    for name in LOOPS:
        row = {"model": model_name, "hidden": list(hidden), "device": device, "processes": 1, "batch_size": batch_size}
        row.update(loop=name, samples=labels.shape[0], launched=False, **summary(rates[name]))
        row["gflops"] = row["samples_per_s"] * flops_per_sample(hidden) / 1e9
        rows.append(row)
    if large:
        peak = [r * loops["matmul_peak"].flops_per_product / 1e9 for r in rates["matmul_peak"]]
        rows.append({"model": "matmul_peak", "size": max(hidden), "device": device, "batch_size": batch_size,
                     "loop": "matmul_peak", "gflops": statistics.median(peak), "repeats_gflops": peak})  # fmt: skip
    return rows


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
    for batch_size in spec["batch_sizes"]:
        loop = ToyaccelLoop(features, labels, tuple(spec["hidden"]), batch_size, spec["device"],
                            f"{spec['output_dir']}/{batch_size}")  # fmt: skip
        try:
            rates = measure({"toyaccel": loop}, spec["device"], spec["warmup"], spec["repeats"])["toyaccel"]
            world_size, is_main = loop.accelerator.num_processes, loop.accelerator.is_main_process
        finally:
            loop.close()
        results[str(batch_size)] = {"rates": rates, "world_size": world_size}
    if is_main:
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
# Start-up: time to the first training step of the default run


def time_to_first_step(work_dir: str, repeats: int, timeout: float) -> dict:
    """Wall time from starting `python scripts/train.py` (fresh output dir) to its 'step 1' log line."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONWARNINGS": "ignore"}
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "ACCELERATE_USE_CPU"):
        env.pop(key, None)
    first, total = [], []
    for i in range(repeats):
        out = f"{work_dir}/startup-{i}"
        with open(f"{work_dir}/startup-{i}.err", "w+") as err:
            start = time.perf_counter()
            proc = subprocess.Popen([sys.executable, str(REPO / "scripts" / "train.py"), "--output-dir", out,
                                     "--no-progress"], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=err,
                                    text=True)  # fmt: skip
            seen = None
            for line in proc.stdout:
                if seen is None and FIRST_STEP_LINE.search(line):
                    seen = time.perf_counter() - start
            proc.wait(timeout=timeout)
            total.append(time.perf_counter() - start)
            if proc.returncode != 0 or seen is None:
                err.seek(0)
                raise RuntimeError(f"scripts/train.py failed (exit {proc.returncode}):\n{err.read()[-3000:]}")
            first.append(seen)
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import torch, accelerate"], env=env, check=True, timeout=timeout)
    imports = time.perf_counter() - start
    return {"first_step_s": statistics.median(first), "first_step_repeats_s": first,
            "total_s": statistics.median(total), "import_torch_accelerate_s": imports}  # fmt: skip


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


def ratios(rows: list[dict], device: str, ddp_batch: int | None) -> dict:
    """The issue's target ratios from this run's medians (None where a row was not measured)."""

    def rate(**match):
        row = find(rows, device=device, **match)
        return row and row.get("samples_per_s")

    def div(a, b):
        return a / b if a and b else None

    b256 = {"model": "book", "batch_size": 256, "processes": 1}
    peaks = [r["gflops"] for r in rows if r["loop"] == "matmul_peak" and r["device"] == device]
    large = [r for r in rows if r["model"] == "large" and r["loop"] == "toyaccel" and r["device"] == device
             and r.get("launched") is False]  # fmt: skip
    best_large = max(large, key=lambda r: r["gflops"]) if large else None
    out = {
        "toyaccel_vs_book_b256": div(rate(loop="toyaccel", **b256), rate(loop="book", **b256)),
        "toyaccel_vs_ceiling_b256": div(rate(loop="toyaccel", **b256), rate(loop="ceiling", **b256)),
        "large_mlp_vs_matmul_peak": div(best_large and best_large["gflops"], max(peaks) if peaks else None),
        "large_mlp_vs_matmul_peak_batch": best_large and best_large["batch_size"],
        "matmul_peak_gflops": max(peaks) if peaks else None,
    }
    launched = [r for r in rows if r.get("launched") and r["device"] == device and r["batch_size"] == ddp_batch]
    if launched:
        one = find(launched, processes=1)
        many = next((r for r in launched if r["processes"] > 1), None)
        out["ddp2_vs_1_process"] = div(many and many["samples_per_s"], one and one["samples_per_s"])
        out["ddp_batch_per_process"] = ddp_batch
    return out


def fmt_rate(rate) -> str:
    return "-" if rate is None else f"{rate / 1000:,.1f}k"


def table(result: dict) -> str:
    rows, lines = result["rows"], []
    for device in result["devices"]:
        peak = result["ratios"][device].get("matmul_peak_gflops")
        lines += [f"\n{device}, 1 process, {result['threads']} thread(s): samples/s (median of repeats; spread = "
                  "(max-min)/median of the toyaccel repeats)", "",
                  "| model | batch | book loop | toyaccel | ceiling | toyaccel / book | toyaccel / ceiling "
                  "| toyaccel GFLOP/s | of matmul peak | spread |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
        for model in ("book", "large"):
            for b in result["batch_sizes"]:
                got = {loop: find(rows, device=device, model=model, batch_size=b, loop=loop, launched=False)
                       for loop in LOOPS}  # fmt: skip
                if not got["toyaccel"]:
                    continue
                rate = {k: v and v["samples_per_s"] for k, v in got.items()}
                of_peak = got["toyaccel"]["gflops"] / peak if model == "large" and peak else None
                lines.append(
                    f"| {model} ({','.join(map(str, got['toyaccel']['hidden']))}) | {b} | {fmt_rate(rate['book'])} "
                    f"| {fmt_rate(rate['toyaccel'])} | {fmt_rate(rate['ceiling'])} "
                    f"| {rate['toyaccel'] / rate['book']:.2f}x | {rate['toyaccel'] / rate['ceiling']:.2f} "
                    f"| {got['toyaccel']['gflops']:.1f} | {'-' if of_peak is None else f'{of_peak:.2f}'} "
                    f"| {got['toyaccel']['spread']:.0%} |"
                )
        if peak:
            lines.append(f"\nmatmul peak ({device}, {result['threads']} thread(s)): {peak:.1f} GFLOP/s")
        ddp = [r for r in rows if r["device"] == device and r.get("launched")]
        if ddp:
            lines += ["", f"DDP, large MLP, toyaccel loop, {device} (one thread per process):", "",
                      "| batch per process | 1 process | 2 processes | speed-up | spread 1 / 2 |", "|---:|---:|---:|---:|---:|"]  # fmt: skip
            for b in sorted({r["batch_size"] for r in ddp}):
                one = find(ddp, batch_size=b, processes=1)
                many = next((r for r in ddp if r["batch_size"] == b and r["processes"] > 1), None)
                if one and many:
                    lines.append(f"| {b} | {fmt_rate(one['samples_per_s'])} | {fmt_rate(many['samples_per_s'])} "
                                 f"| {many['samples_per_s'] / one['samples_per_s']:.2f}x "
                                 f"| {one['spread']:.0%} / {many['spread']:.0%} |")  # fmt: skip
    startup = result.get("startup")
    if startup:
        lines.append(f"\nstart-up: first training step of `python scripts/train.py` after {startup['first_step_s']:.2f} s "
                     f"(whole run {startup['total_s']:.2f} s; `import torch, accelerate` alone "
                     f"{startup['import_torch_accelerate_s']:.2f} s)")  # fmt: skip
    lines.append("\ntargets (ratios of this run's medians):")
    for device in result["devices"]:
        for name, target in TARGETS.items():
            got = result["ratios"][device].get(name)
            if got is not None:
                verdict = "met" if got >= target else "MISSED"
                lines.append(f"  {device} {name}: {got:.2f} (target >= {target}) {verdict}")
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
    p.add_argument("--warmup", type=int, default=1, help="untimed epochs before the repeats")
    p.add_argument("--repeats", type=int, default=5, help="timed epochs per loop, book MLP")
    p.add_argument("--repeats-large", type=int, default=3, help="timed epochs per loop, large MLP")
    p.add_argument("--ddp-batch-sizes", default="256,1024", help="batch sizes per process for the DDP rows")
    p.add_argument("--ddp-samples", type=int, default=8192)
    p.add_argument("--ddp-repeats", type=int, default=2, help="timed epochs per launch")
    p.add_argument("--ddp-rounds", type=int, default=2, help="alternating 1-process / N-process launches")
    p.add_argument("--no-ddp", dest="ddp", action="store_false", help="skip the multi-process rows")
    p.add_argument("--no-startup", dest="startup", action="store_false", help="skip the start-up timing")
    p.add_argument("--startup-repeats", type=int, default=3)
    p.add_argument("--devices", default="auto", help="cpu, cuda or cpu,cuda (auto: cpu, plus cuda if present)")
    p.add_argument("--timeout", type=float, default=600, help="seconds allowed for each launched process")
    p.add_argument("--worker", help=argparse.SUPPRESS)  # set by launch_workers
    args = p.parse_args(argv)
    if args.quick:
        args.samples, args.large_samples, args.ddp_samples = 2048, 512, 512
        args.batch_sizes, args.large_hidden, args.ddp_batch_sizes = "32,256", "256,256", "128"
        args.repeats = args.repeats_large = args.ddp_repeats = args.ddp_rounds = args.startup_repeats = 1
    args.batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    args.ddp_batch_sizes = [int(b) for b in args.ddp_batch_sizes.split(",")]
    args.large_hidden = parse_hidden(args.large_hidden)
    if args.devices == "auto":
        args.devices = "cpu,cuda" if torch.cuda.is_available() else "cpu"
    args.devices = args.devices.split(",")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        worker_main(json.loads(args.worker), args.output)
        return 0
    torch.set_num_threads(1)  # one thread, like each DDP worker: the 1-vs-2-process comparison is per core
    result = {"machine": machine(), "threads": 1, "devices": args.devices, "batch_sizes": args.batch_sizes,
              "quick": args.quick, "rows": [], "ratios": {}}  # fmt: skip
    with tempfile.TemporaryDirectory() as work_dir:
        for device in args.devices:
            for model_name, hidden, samples in (("book", (30, 20), args.samples),
                                                ("large", args.large_hidden, args.large_samples)):  # fmt: skip
                features, labels = dataset(samples)
                for b in args.batch_sizes:
                    print(f"{device} {model_name} MLP, batch {b} ...", file=sys.stderr, flush=True)
                    result["rows"] += loop_group(features, labels, model_name, hidden, b, device, args, work_dir)
            if args.ddp and (device == "cpu" or torch.cuda.device_count() > 1):
                print(f"{device} DDP launches ...", file=sys.stderr, flush=True)
                result["rows"] += ddp_rows(args, device)
            result["ratios"][device] = ratios(result["rows"], device, args.ddp_batch_sizes[-1] if args.ddp else None)
        if args.startup:
            print("start-up of scripts/train.py ...", file=sys.stderr, flush=True)
            result["startup"] = time_to_first_step(work_dir, args.startup_repeats, args.timeout)
    result["table"] = table(result)
    print(result["table"])
    Path(args.output).write_text(json.dumps(result, indent=1) + "\n")
    print(f"\nwrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
