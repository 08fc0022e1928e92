"""GPU setups: single_gpu.yaml, multi_gpu.yaml and fsdp.yaml, launched for real.

Each test skips cleanly without CUDA (or with fewer GPUs than it needs), so CPU-only CI runs none
of them; on a GPU machine `pytest tests/test_gpu.py` checks the configs the README recommends.
"""

from __future__ import annotations

import pytest
import torch
from conftest import (
    BOOK_LOSSES,
    accelerate_launch,
    accelerate_test_cmd,
    assert_weights_close,
    check_ok,
    read_json,
    run_concurrently,
    step_losses,
    weights,
)

from toyaccel import fit, load_model

GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0
needs_gpu = pytest.mark.skipif(GPUS < 1, reason="needs a CUDA GPU")
needs_2_gpus = pytest.mark.skipif(GPUS < 2, reason="needs 2 CUDA GPUs")

# The book's NeuralNetwork(2, 2): Linear(2, 30), ReLU, Linear(30, 20), ReLU, Linear(20, 2).
BOOK_SHAPES = {
    "layers.0.weight": (30, 2), "layers.0.bias": (30,),
    "layers.2.weight": (20, 30), "layers.2.bias": (20,),
    "layers.4.weight": (2, 20), "layers.4.bias": (2,),
}  # fmt: skip

# GPU kernels and NCCL sum in a different order than the CPU and one process: not bit-equal, but
# far closer than this.
GPU_ATOL = 1e-5
SYNTHETIC = ("--data", "synthetic", "--num-samples", "64", "--no-plot")


@needs_gpu
def test_single_gpu_reproduces_the_book(tmp_path):
    out = tmp_path / "run"
    proc = check_ok(accelerate_launch("single_gpu.yaml", "--output-dir", str(out)))
    assert "device cuda" in proc.stdout  # toyaccel's one-line description of the run
    assert [round(loss, 2) for loss in step_losses(out)] == BOOK_LOSSES
    results = read_json(out / "results.json")
    assert (results["train_accuracy"], results["val_accuracy"], results["world_size"]) == (1.0, 1.0, 1)


@needs_2_gpus
def test_two_gpus_equal_one_gpu_with_double_batch(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    check_ok(accelerate_launch("single_gpu.yaml", *SYNTHETIC, "--batch-size", "4", "--output-dir", str(one)))
    check_ok(accelerate_launch("multi_gpu.yaml", *SYNTHETIC, "--batch-size", "2", "--output-dir", str(two)))
    results = read_json(two / "results.json")
    assert (results["world_size"], results["distributed_type"], results["global_batch"]) == (2, "MULTI_GPU", 4)
    assert_weights_close(weights(two), weights(one), atol=GPU_ATOL)


@needs_gpu
def test_fsdp_saves_the_full_unsharded_weights(tmp_path):
    # fsdp.yaml asks for 2 GPUs; on a 1-GPU machine FSDP still runs (and saves) with one process.
    processes = min(GPUS, 2)
    out = tmp_path / "run"
    check_ok(accelerate_launch("fsdp.yaml", *SYNTHETIC, "--output-dir", str(out), num_processes=processes))
    results = read_json(out / "results.json")
    assert (results["distributed_type"], results["world_size"]) == ("FSDP", processes)
    saved = weights(out)
    assert {k: tuple(v.shape) for k, v in saved.items()} == BOOK_SHAPES
    load_model(out)
    # Sharding changes where the numbers live, not what they are: the same run on one GPU, unsharded.
    reference = tmp_path / "reference"
    fit(data="synthetic", num_samples=64, batch_size=2 * processes, plot=False, output_dir=str(reference))
    assert_weights_close(saved, weights(reference), atol=GPU_ATOL)


@pytest.mark.parametrize(
    "config, distributed_type, gpus",
    [
        pytest.param("single_gpu.yaml", "NO", 1, marks=needs_gpu),
        pytest.param("multi_gpu.yaml", "MULTI_GPU", 2, marks=needs_2_gpus),
        pytest.param("fsdp.yaml", "FSDP", 2, marks=needs_2_gpus),
    ],
)
def test_accelerate_test_passes_for_every_gpu_config(config, distributed_type, gpus, tmp_path):
    """Accelerate's own check, exactly as printed; the world each process saw is checked too, since N
    independent copies would pass as well (multi_node.yaml needs two machines: not run here)."""
    proc = check_ok(run_concurrently({config: (accelerate_test_cmd(config), {})}, tmp_path)[config])
    assert "Test is a success" in proc.stdout
    assert proc.stdout.count(f"Distributed environment: DistributedType.{distributed_type}") == gpus
    assert proc.stdout.count("Num processes: ") == proc.stdout.count(f"Num processes: {gpus}\n") == gpus
