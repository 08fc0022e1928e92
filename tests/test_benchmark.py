"""scripts/benchmark.py: a smoke run of its quick mode, in this process, and of its DDP worker.

No timing is asserted (the machine is shared); what is checked is that every row the README's table is
built from is there, with positive throughputs, and that the JSON and the table agree. The launched
1-vs-2-process rows need ~15 s of process start-up alone, so the suite runs their worker in-process.
"""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from conftest import REPO

pytestmark = pytest.mark.slow  # the quick run takes most of a minute, and starts scripts/train.py
LOOPS = {"book", "toyaccel", "ceiling"}


def load_benchmark():
    spec = importlib.util.spec_from_file_location("benchmark", REPO / "scripts" / "benchmark.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench():  # not "benchmark": pytest-benchmark owns that fixture name
    return load_benchmark()


@pytest.fixture(scope="module")
def quick(bench, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    threads = torch.get_num_threads()
    try:  # main() sets one thread for the whole process: give the other tests theirs back
        assert bench.main(["--quick", "--devices", "cpu", "--parts", "loops,reader,startup", "--output", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    return json.loads(out.read_text())


def test_quick_run_has_every_loop_model_and_batch(quick):
    loop_rows = [r for r in quick["rows"] if r["loop"] in LOOPS]
    got = {(r["model"], r["batch_size"], r["loop"]) for r in loop_rows}
    assert got == {(m, b, loop) for m in ("book", "large") for b in (32, 256) for loop in LOOPS}
    assert len(loop_rows) == len(got)
    for row in loop_rows:
        assert row["device"] == "cpu" and row["processes"] == 1 and not row["launched"]
        assert row["samples_per_s"] > 0 and row["samples_per_cpu_s"] > 0 and row["gflops"] > 0
        assert len(row["repeats"]) == 1 and row["spread"] == 0  # --quick: one repeat
    assert {r["hidden"][0] for r in loop_rows if r["model"] == "large"} == {256}


def test_quick_run_measures_the_matmul_peak_beside_the_large_mlp(quick):
    peaks = [r for r in quick["rows"] if r["loop"] == "matmul_peak"]
    assert sorted(r["batch_size"] for r in peaks) == [32, 256]
    assert all(r["gflops"] > 0 and r["size"] == 256 for r in peaks)
    large = [r for r in quick["rows"] if r["model"] == "large" and r["loop"] == "toyaccel"]
    assert all(r["of_matmul_peak"] > 0 and r["of_matmul_peak_cpu"] > 0 for r in large)


def test_quick_run_reports_the_target_ratios_and_startup(quick):
    ratios = quick["ratios"]["cpu"]
    for name in ("toyaccel_vs_book_b256", "toyaccel_vs_ceiling_b256", "large_mlp_vs_matmul_peak"):
        assert ratios[name] > 0 and ratios[name + "_cpu"] > 0
    assert ratios["matmul_peak_gflops"] == max(r["gflops"] for r in quick["rows"] if r["loop"] == "matmul_peak")
    assert "ddp2_vs_1_process" not in ratios  # not in --parts
    assert quick["startup"]["first_step_s"] > 0 and quick["startup"]["import_torch_accelerate_s"] > 0
    table = quick["table"]
    assert "| book (30,20) | 256 |" in table and "| large (256,256) | 32 |" in table
    assert "toyaccel_vs_ceiling_b256" in table and "first step after" in table


def test_ddp_worker_reports_its_world_and_rates(bench, tmp_path):
    """What each process of a launched run does, here as a world of one."""
    spec = {"samples": 512, "hidden": [64, 64], "batch_sizes": [64, 128], "device": "cpu", "warmup": 1,
            "repeats": 2, "output_dir": str(tmp_path / "run")}  # fmt: skip
    threads = torch.get_num_threads()
    try:
        bench.worker_main(spec, str(tmp_path / "worker.json"))
    finally:
        torch.set_num_threads(threads)
    result = json.loads((tmp_path / "worker.json").read_text())
    assert set(result) == {"64", "128"}
    for got in result.values():
        assert got["world_size"] == 1 and len(got["rates"]) == 2 and min(got["rates"]) > 0


def test_quick_run_times_a_whole_epoch_beside_the_loops(quick):
    epochs = [r for r in quick["rows"] if r["loop"] == "epoch"]
    assert sorted(r["batch_size"] for r in epochs) == [32, 256] and all(r["model"] == "book" for r in epochs)
    assert all(r["samples_per_s"] > 0 and r["samples_per_cpu_s"] > 0 for r in epochs)
    assert quick["ratios"]["cpu"]["epoch_vs_book_b256"] > 0
    assert "| whole epoch | epoch / book |" in quick["table"] and "epoch_vs_book_b256" in quick["table"]


def test_quick_run_reads_the_csv_with_both_readers(quick):
    reader = quick["reader"]
    assert reader["rows"] == 5000 and reader["columns"] == 33 and reader["tensor_bytes"] == 5000 * 32 * 4
    assert set(reader["seconds"]) == set(reader["peak_bytes"]) == {"toyaccel", "numpy_loadtxt"}
    assert all(v > 0 for v in reader["seconds"].values())
    assert reader["reader_vs_loadtxt_time"] == reader["seconds"]["toyaccel"] / reader["seconds"]["numpy_loadtxt"]
    assert "| toyaccel (load_data) |" in quick["table"] and "reader_peak_vs_tensor" in quick["table"]
