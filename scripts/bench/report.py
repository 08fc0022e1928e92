"""The report: the target ratios from a run's medians, the tables printed at the end, the machine."""

from __future__ import annotations

import contextlib
import os
import platform
from pathlib import Path

import accelerate
import torch

from bench.common import find, fmt_rate
from bench.gpt import gpt_table
from bench.loops import COMPILED, LARGE_PRECISION
from bench.reader import READER_TARGETS, reader_table
from bench.shards import shard_table

LOOPS = ("book", "toyaccel", "ceiling")
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
    if result.get("shards"):
        lines += shard_table(result["shards"])
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
    info["accelerate"] = accelerate.__version__
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpus"] = torch.cuda.device_count()
    return info
