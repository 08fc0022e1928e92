"""Scale-out setups: gradient accumulation, mixed precision, LR schedule and clipping,
multi-node, FSDP and torch.compile, each proven equal to the simple run where it should be.

Real launches (with torch.compile the expensive part: ~20-25 s on a quiet 2-core machine): one
2-process DDP run with gradient accumulation under an all-reduce recorder, two single-process
"machines" forming one world, and one refused FSDP launch. Everything else is in-process
``toyaccel.fit``.
"""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from accelerate.commands.config.config_args import load_config_from_file
from conftest import (
    CONFIGS,
    REPO,
    TRAIN_SCRIPT,
    accelerate_launch,
    as_cli,
    assert_weights_close,
    assert_weights_equal,
    check_ok,
    free_port,
    read_json,
    read_jsonl,
    step_losses,
    subprocess_env,
    weights,
)
from torch.utils.data import DataLoader, TensorDataset

from toyaccel import ToyaccelError, fit, load_model
from toyaccel.cli import train_main
from toyaccel.workloads.mlp.data import TOY_X_TRAIN, TOY_Y_TRAIN
from toyaccel.workloads.mlp.model import NeuralNetwork

# The shared scale-out run: 64 synthetic samples, global batch 8 -> 8 optimizer steps an epoch, 24 in
# all, with warm-up, cosine decay and clipping (max norm 1 clips some steps, see test_clipping_was_active).
GLOBAL_BATCH = 8
SCHEDULE = {
    "data": "synthetic", "num_samples": 64, "epochs": 3, "lr_schedule": "cosine", "warmup_steps": 3,
    "max_grad_norm": 1.0, "log_every": 1,
}  # fmt: skip
TOTAL_STEPS = 24
QUIET = {"plot": False, "progress": False}


def lrs(run_dir: Path) -> list[float]:
    return [r["lr"] for r in read_jsonl(Path(run_dir) / "metrics.jsonl") if r["kind"] == "step"]


def cosine_with_warmup(step: int, total: int, warmup: int, peak: float) -> float:
    """Linear warm-up that reaches ``peak`` at the last warm-up step, then half a cosine."""
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))


# ---------------------------------------------------------------------------------------------
# Shared runs


@pytest.fixture(scope="module", autouse=True)
def on_cpu():
    """These are the CPU versions (tests/test_gpu.py has the GPU ones): on a machine with GPUs, keep
    them on CPU. Launched processes inherit the variable too (conftest.subprocess_env)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ACCELERATE_USE_CPU", "true")
        yield


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """One process, the whole global batch in one step."""
    out = tmp_path_factory.mktemp("reference") / "run"
    fit(**SCHEDULE, **QUIET, batch_size=GLOBAL_BATCH, output_dir=str(out))
    return out


@pytest.fixture(scope="module")
def ddp_accum_run(tmp_path_factory) -> Path:
    """2 processes x batch 2 x 2 accumulated micro-steps, with every gradient all-reduce recorded."""
    out = tmp_path_factory.mktemp("ddp_accum") / "run"
    options = {**SCHEDULE, "batch_size": 2, "grad_accum": 2, "plot": False, "output_dir": out}
    check_ok(accelerate_launch("multi_cpu.yaml", *as_cli(options), script=REPO / "tests" / "allreduce_probe.py"))
    return out


def launch_machine(machine_rank: int, port: int, train_args: list[str], log: Path) -> subprocess.Popen:
    """One "machine" of multi_node.yaml: its own `accelerate launch`, as on a real cluster."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / "multi_node.yaml")]
    cmd += ["--machine_rank", str(machine_rank), "--main_process_ip", "127.0.0.1", "--main_process_port", str(port)]
    cmd += [str(TRAIN_SCRIPT), "--no-progress", *train_args]
    with open(log, "w") as f:
        return subprocess.Popen(cmd, cwd=REPO, env=subprocess_env(), stdout=f, stderr=subprocess.STDOUT)


@pytest.fixture(scope="module")
def multi_node_run(tmp_path_factory) -> Path:
    """Two machines (ranks 0 and 1 on 127.0.0.1) x 1 process x batch 4."""
    root = tmp_path_factory.mktemp("multi_node")
    out = root / "run"
    train_args = as_cli({**SCHEDULE, "batch_size": 4, "plot": False, "output_dir": out})
    port = free_port()
    machines = {rank: launch_machine(rank, port, train_args, root / f"machine{rank}.log") for rank in (1, 0)}
    try:
        for machine in machines.values():
            machine.wait(timeout=240)
    finally:
        for machine in machines.values():
            if machine.poll() is None:  # one machine hung waiting for the other: let torchrun stop its worker
                machine.terminate()
                machine.wait(timeout=60)
    for rank, machine in machines.items():
        log = (root / f"machine{rank}.log").read_text()
        assert machine.returncode == 0, f"machine {rank} exited {machine.returncode}:\n{log[-5000:]}"
    return out


@pytest.fixture(scope="module")
def fp32_toy(tmp_path_factory) -> Path:
    """The book's run in fp32, in-process: what bf16 and compile are compared with."""
    out = tmp_path_factory.mktemp("fp32_toy") / "run"
    fit(**QUIET, output_dir=str(out))
    return out


# ---------------------------------------------------------------------------------------------
# 1. Gradient accumulation


def test_grad_accum_one_process_equals_one_big_batch(reference, tmp_path):
    result = fit(**SCHEDULE, **QUIET, batch_size=2, grad_accum=4, output_dir=str(tmp_path / "run"))
    assert (result.global_batch, result.global_step) == (GLOBAL_BATCH, TOTAL_STEPS)
    assert_weights_close(weights(tmp_path / "run"), weights(reference), atol=1e-6)
    assert step_losses(tmp_path / "run") == pytest.approx(step_losses(reference), abs=1e-6)


def assert_two_processes_train_as_one(run: Path, reference: Path) -> None:
    """A run of two CPU processes: the schedule of one big batch, and (to float32's rounding) its weights."""
    results = read_json(run / "results.json")
    assert (results["world_size"], results["distributed_type"]) == (2, "MULTI_CPU")
    assert (results["global_batch"], results["global_step"]) == (GLOBAL_BATCH, TOTAL_STEPS)
    assert_weights_close(weights(run), weights(reference), atol=1e-6)


@pytest.mark.slow
def test_grad_accum_on_ddp_equals_one_big_batch(ddp_accum_run, reference):
    assert_two_processes_train_as_one(ddp_accum_run, reference)
    assert step_losses(ddp_accum_run) == pytest.approx(step_losses(reference), abs=1e-6)


@pytest.mark.slow
def test_ddp_all_reduces_gradients_only_on_the_last_micro_step(ddp_accum_run):
    # Recorded by tests/allreduce_probe.py: the training micro-step in which each gradient bucket
    # was all-reduced. With 2 micro-steps per optimizer step: micro-steps 2, 4, ..., 48 only.
    for rank in (0, 1):
        record = read_json(ddp_accum_run / f"allreduce_rank{rank}.json")
        assert record["micro_steps"] == 2 * TOTAL_STEPS
        assert sorted(set(record["allreduce_at"])) == list(range(2, 2 * TOTAL_STEPS + 1, 2))


# ---------------------------------------------------------------------------------------------
# 2. Mixed precision


def test_bf16_on_cpu_learns_the_toy_data_like_fp32(fp32_toy, tmp_path):
    run = tmp_path / "run"
    result = fit(**QUIET, mixed_precision="bf16", output_dir=str(run))
    assert read_json(run / "config.json")["mixed_precision"] == "bf16"
    assert (result.train_accuracy, result.val_accuracy) == (1.0, 1.0)
    # bf16 keeps 8 bits of mantissa (relative error ~0.4%): every logged loss within 0.01 of fp32's.
    assert step_losses(run) == pytest.approx(step_losses(fp32_toy), abs=0.01)
    assert result.train_loss == pytest.approx(read_json(fp32_toy / "results.json")["train_loss"], abs=0.01)
    assert step_losses(run) != step_losses(fp32_toy)  # autocast really ran in bf16


def test_cpu_bf16_config_asks_for_bf16_on_cpu():
    config = load_config_from_file(str(CONFIGS / "cpu_bf16.yaml"))
    assert (config.mixed_precision, config.use_cpu, config.num_processes) == ("bf16", True, 1)


def test_fp16_on_cpu_is_refused_in_one_line(capsys, tmp_path):
    # In-process through the command line's entry point (scripts/train.py exits with what it returns).
    out = tmp_path / "run"
    assert train_main(["--mixed-precision", "fp16", "--output-dir", str(out), "--no-progress"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "error: fp16 mixed precision does nothing on CPU; use bf16 (accelerate_configs/cpu_bf16.yaml) or no"
    ]
    assert not out.exists()


def test_fp16_from_an_accelerate_config_is_refused_too(monkeypatch, tmp_path):
    # `accelerate launch` passes a config's mixed_precision to the script in this variable.
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")
    with pytest.raises(ToyaccelError, match="^fp16 mixed precision does nothing on CPU"):
        fit(**QUIET, output_dir=str(tmp_path / "run"))


# ---------------------------------------------------------------------------------------------
# 3. Learning-rate schedule and clipping


@pytest.mark.slow
def test_lr_per_optimizer_step_is_the_same_on_one_and_two_processes(reference, ddp_accum_run, multi_node_run):
    expected = [cosine_with_warmup(s, TOTAL_STEPS, 3, 0.5) for s in range(TOTAL_STEPS)]
    assert lrs(reference) == pytest.approx(expected, abs=1e-12)
    assert lrs(ddp_accum_run) == lrs(reference)
    assert lrs(multi_node_run) == lrs(reference)


@pytest.mark.parametrize(
    "schedule, expected",
    [
        ("constant", [0.25, 0.5, 0.5, 0.5, 0.5, 0.5]),
        ("linear", [0.25, 0.5, 0.5, 0.375, 0.25, 0.125]),
        ("cosine", [0.25, 0.5, 0.5, 0.25 * (1 + math.cos(math.pi / 4)), 0.25, 0.25 * (1 + math.cos(3 * math.pi / 4))]),
    ],
)
def test_lr_schedules_follow_the_formula(schedule, expected, tmp_path):
    # The book's run has 6 optimizer steps; 2 warm-up steps reach the peak 0.5 at step 2, then the
    # decay runs over the remaining 4 (0-based step s: progress (s - 2) / 4).
    fit(**QUIET, lr_schedule=schedule, warmup_steps=2, log_every=1, output_dir=str(tmp_path / "run"))
    assert lrs(tmp_path / "run") == pytest.approx(expected, abs=1e-12)


def plain_pytorch_book_run(max_norm: float, lr_at: list[float]) -> dict[str, torch.Tensor]:
    """The book's training loop (listing A.9/A.10) plus gradient clipping and a per-step lr: an
    independent computation of what --max-grad-norm and --lr-schedule should give."""
    torch.manual_seed(123)
    dataset = TensorDataset(torch.tensor(TOY_X_TRAIN), torch.tensor(TOY_Y_TRAIN))
    loader = DataLoader(dataset, batch_size=2, shuffle=True, drop_last=True)
    torch.manual_seed(123)
    model = NeuralNetwork(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    steps = iter(lr_at)
    for _ in range(3):
        for features, labels in loader:
            loss = F.cross_entropy(model(features), labels)
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
            for group in optimizer.param_groups:
                group["lr"] = next(steps)
            optimizer.step()
    return model.state_dict()


def test_max_grad_norm_clips_like_plain_pytorch(fp32_toy, tmp_path):
    run = tmp_path / "run"
    fit(**QUIET, max_grad_norm=0.05, lr_schedule="cosine", warmup_steps=2, output_dir=str(run))
    expected = plain_pytorch_book_run(0.05, [cosine_with_warmup(s, 6, 2, 0.5) for s in range(6)])
    assert_weights_equal(weights(run), expected)
    unclipped, clipped = weights(fp32_toy), weights(run)
    assert max((clipped[k] - unclipped[k]).abs().max() for k in clipped) > 0.1


def test_clipping_was_active_in_the_shared_runs(reference, tmp_path):
    # Otherwise the DDP and multi-node comparisons above would say nothing about clipping.
    fit(**{**SCHEDULE, "max_grad_norm": 0.0}, **QUIET, batch_size=GLOBAL_BATCH, output_dir=str(tmp_path / "run"))
    unclipped, clipped = weights(tmp_path / "run"), weights(reference)
    assert max((unclipped[k] - clipped[k]).abs().max() for k in clipped) > 1e-3


# ---------------------------------------------------------------------------------------------
# 4. Multi-node


@pytest.mark.slow
def test_two_machines_form_one_world_equal_to_one_process(multi_node_run, reference):
    assert_two_processes_train_as_one(multi_node_run, reference)


# ---------------------------------------------------------------------------------------------
# 5. FSDP (GPU runs are in tests/test_gpu.py)


@pytest.mark.slow
def test_fsdp_config_on_cpu_is_refused_clearly(tmp_path):
    # accelerate 1.15 only turns a run into FSDP on GPUs (and similar devices): on CPU these 2
    # processes would silently train as plain gloo DDP. toyaccel stops them before any output.
    out = tmp_path / "run"
    proc = accelerate_launch("fsdp.yaml", "--output-dir", str(out))
    assert proc.returncode != 0
    errors = [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("error:")]
    assert errors == [
        "error: the accelerate config asks for FSDP but this run got MULTI_CPU "
        "(FSDP needs GPUs); use accelerate_configs/multi_cpu.yaml on CPU"
    ]
    # Said once by toyaccel; torchrun's failure report may quote it once more (as its root cause), never once
    # per process. Not the report's own format (its exit codes, sections): under load it varies from run to run.
    assert (proc.stdout + proc.stderr).count(errors[0]) <= 2
    assert not out.exists()


def test_fsdp_and_multi_node_configs_load():
    fsdp = load_config_from_file(str(CONFIGS / "fsdp.yaml"))
    assert (fsdp.distributed_type.value, fsdp.fsdp_config["fsdp_version"]) == ("FSDP", 2)
    assert fsdp.fsdp_config["fsdp_state_dict_type"] == "FULL_STATE_DICT"
    multi_node = load_config_from_file(str(CONFIGS / "multi_node.yaml"))
    assert (multi_node.num_machines, multi_node.num_processes, multi_node.machine_rank) == (2, 2, 0)


# ---------------------------------------------------------------------------------------------
# 6. torch.compile: the slowest test here, all of it inductor compiling the first steps (about 17 s on
# an idle 2-core machine, 40-60 s on a loaded one; 5-10 s once /tmp/torchinductor_<user> caches it)


@pytest.mark.slow
def test_compile_gives_the_same_run_and_plain_keys(fp32_toy, tmp_path):
    run = tmp_path / "run"
    result = fit(**QUIET, compile=True, output_dir=str(run))
    assert (result.train_accuracy, result.val_accuracy) == (1.0, 1.0)
    assert step_losses(run) == pytest.approx(step_losses(fp32_toy), abs=1e-6)
    assert_weights_close(weights(run), weights(fp32_toy), atol=1e-6)  # same keys: no "_orig_mod." prefix
    assert not any("_orig_mod" in k for k in weights(run))
    load_model(run)
