"""The GPU-ready paths that a CPU can check: the fp16 fast path's stepping, and scripts/gpu_check.sh itself.

The fp16 path steps the optimizer through the GradScaler without Accelerate's optimizer wrapper; a
CPU GradScaler runs the same scaler code (scale, unscale, inf check, skipped step, back-off), so its
equivalence with the wrapper is checked here, bit for bit, including a step skipped for overflow.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.optimizer import AcceleratedOptimizer
from conftest import REPO, subprocess_env

from toyaccel.engine.accelerator import release
from toyaccel.engine.optim import DirectStepper
from toyaccel.workloads.mlp.data import TOY_X_TRAIN, TOY_Y_TRAIN
from toyaccel.workloads.mlp.model import NeuralNetwork

# Large enough that the first steps' scaled gradients overflow float32 and are skipped.
OVERFLOWING_SCALE = 2.0**127


def train_fp16_steps(direct: bool, clip: float | None, steps: int = 12):
    torch.manual_seed(123)
    model = NeuralNetwork(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    scaler = torch.amp.GradScaler("cpu", init_scale=OVERFLOWING_SCALE, growth_interval=2)
    wrapped = AcceleratedOptimizer(optimizer, device_placement=False, scaler=scaler)
    stepper = DirectStepper(optimizer, scaler) if direct else wrapped
    # Inputs scaled up and labels swapped: large gradients, so the first scaled ones overflow.
    features, labels = 10 * torch.tensor(TOY_X_TRAIN), 1 - torch.tensor(TOY_Y_TRAIN)
    scales = []
    for _ in range(steps):
        loss = F.cross_entropy(model(features), labels)
        if direct:
            stepper.backward(loss)
        else:
            scaler.scale(loss).backward()  # what accelerator.backward does under fp16
        if clip:
            scaler.unscale_(optimizer)  # what accelerator.clip_grad_norm_ does under fp16
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        stepper.step()
        stepper.zero_grad(set_to_none=True)
        scales.append(scaler.get_scale())
    return model.state_dict(), scales


def test_fp16_fast_path_steps_exactly_as_accelerates_wrapper():
    accelerator = Accelerator(cpu=True)  # AcceleratedOptimizer reads the accelerator state
    try:
        for clip in (None, 1.0):
            wrapped_weights, wrapped_scales = train_fp16_steps(direct=False, clip=clip)
            direct_weights, direct_scales = train_fp16_steps(direct=True, clip=clip)
            assert direct_scales == wrapped_scales
            # The scale halves at each skipped step: some were skipped, some taken.
            skipped = sum(b < a for a, b in zip([OVERFLOWING_SCALE, *direct_scales], direct_scales))
            assert 0 < skipped < len(direct_scales)
            for name, value in wrapped_weights.items():
                assert torch.equal(direct_weights[name], value), name
    finally:
        release(accelerator)


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine scripts/gpu_check.sh runs for real")
def test_gpu_check_script_runs_on_cpu_and_reports_every_skip(tmp_path):
    """CI's run of the device check: it must work on a machine without CUDA, say why each GPU test was
    skipped, skip the benchmark, leave its logs in $OUT and exit 0."""
    out = tmp_path / "out"
    env = subprocess_env({"OUT": str(out), "PYTHON": sys.executable})
    proc = subprocess.run(
        ["bash", str(REPO / "scripts" / "gpu_check.sh")], cwd=REPO, env=env, capture_output=True, text=True, timeout=240
    )
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    summary = (out / "summary.txt").read_text()
    assert "GPU tests: 0 passed, 0 failed," in summary
    assert "skipped: test_single_gpu_reproduces_the_book: needs a CUDA GPU" in summary
    assert "skipped: test_two_gpus_equal_one_gpu_with_double_batch: needs 2 CUDA GPUs" in summary
    # The GPT's GPU tests run too: its own (test_gpt.py) and its exact resume with dropout (test_gpu.py).
    assert "skipped: test_gpu_bf16_run_keeps_the_books_vocabulary_rows: needs a CUDA GPU" in summary
    assert "skipped: test_gpt_with_dropout_resumes_bit_exact_on_gpu: needs a CUDA GPU" in summary
    assert "benchmark, GPU rows: skipped (no CUDA GPU)" in proc.stdout
    assert proc.stdout.rstrip().endswith(f"gpu_check: OK (logs in {out})")
    assert {"environment.txt", "gpu_tests.log", "gpu_tests.xml", "summary.txt"} <= {p.name for p in out.iterdir()}
