"""One writer per run folder, and no process of a run outlives the way it was stopped (issue 21).

A run is kept in training with TOYACCEL_FAULT=stall:5 (it waits after step 5 for a stop signal) while
another run tries its folder, or while its launcher alone is signalled, as `timeout` or `kill PID` do.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import (
    TRAIN_SCRIPT,
    accelerate_launch_cmd,
    assert_weights_close,
    assert_weights_equal,
    start_stalled,
    weights,
)

from toyaccel.cli import train_main
from toyaccel.engine.checkpoint import checkpoint_dirs
from toyaccel.engine.resume import verify_checkpoint

RUN = ("--data", "synthetic", "--num-samples", "64", "--epochs", "1", "--no-plot", "--no-progress")
ELASTIC_FLAGS = ("--max_restarts", "0", "--monitor_interval", "1", "--rdzv_backend", "c10d")
ELASTIC_ENV = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1", "PET_RDZV_ENDPOINT": "localhost:0"}


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def processes_naming(text: str) -> list[int]:
    """The pids of the live processes whose command line holds ``text`` (a run's unique output folder)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if text in entry.joinpath("cmdline").read_bytes().decode(errors="replace"):
                state = entry.joinpath("stat").read_text().rpartition(")")[2].split()[0]
                if state != "Z":
                    found.append(int(entry.name))
        except OSError:
            continue
    return found


def children_of(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and int(entry.joinpath("stat").read_text().rpartition(")")[2].split()[1]) == pid:
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def gone_within(pids, seconds: float) -> list[int]:
    """The pids among ``pids`` still alive after ``seconds``."""
    deadline = time.monotonic() + seconds
    while True:
        left = [pid for pid in pids if Path(f"/proc/{pid}").exists() and not _zombie(pid)]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.1)


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] == "Z"
    except OSError:
        return True


# ---------------------------------------------------------------------------------------------
# One writer per folder


@pytest.mark.slow
def test_a_held_folder_is_refused_naming_its_holder_and_left_untouched(tmp_path, capsys):
    """A second run, a --resume latest and an --overwrite into the folder of a run that trains all
    stop with one line naming the holder, exit 2, and the training run's files unchanged."""
    out = tmp_path / "run"
    cmd = [sys.executable, str(TRAIN_SCRIPT), *RUN, "--batch-size", "1", "--output-dir", str(out)]
    first, _ = start_stalled(cmd)
    try:
        before = snapshot(out)
        holder = f"host {os.uname().nodename}, pid {first.pid}"
        for extra in ((), ("--resume", "latest"), ("--overwrite",), ("--lr", "0.1", "--overwrite")):
            capsys.readouterr()
            assert train_main([*RUN, "--batch-size", "1", "--output-dir", str(out), *extra]) == 2, extra
            error = f"error: {out} is in use by another run ({holder}); wait for it to end, or choose another "
            error += "--output-dir\n"
            assert capsys.readouterr().err == error, extra
            assert snapshot(out) == before, extra
        os.kill(first.pid, signal.SIGINT)
        assert first.wait(timeout=120) == 130
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
    # The hold ends with the run: its folder continues, and keeps no lock file.
    assert not (out / ".lock").exists()
    assert train_main([*RUN, "--batch-size", "1", "--output-dir", str(out), "--resume", "latest"]) == 0


# ---------------------------------------------------------------------------------------------
# A signal to the launcher alone ends every process of the run, with a checkpoint


LAUNCHES = {
    # config: (signal sent to `accelerate launch` alone, processes, launch arguments, environment)
    "cpu.yaml": (signal.SIGTERM, 1, (), {}),
    "multi_cpu.yaml": (signal.SIGINT, 2, (), {}),
    "elastic_cpu.yaml": (signal.SIGUSR1, 2, ELASTIC_FLAGS, ELASTIC_ENV),
}


def launcher_signalled(config: str, out: Path) -> dict:
    sig, processes, launch_args, env = LAUNCHES[config]
    cmd = accelerate_launch_cmd(config, *RUN, "--batch-size", "1", "--output-dir", str(out), launch_args=launch_args)
    proc, seen = start_stalled(cmd, env, stalls=processes)
    try:
        os.kill(proc.pid, sig)
        stdout, stderr = proc.communicate(timeout=120)  # the pipes close when every process of the run has
        left = gone_within(processes_naming(str(out)), 10)
    finally:
        for pid in processes_naming(str(out)):
            os.kill(pid, signal.SIGKILL)
    return {"stdout": stdout, "stderr": "".join(seen) + stderr, "left": left}


@pytest.fixture(scope="module")
def signalled(tmp_path_factory):
    root = tmp_path_factory.mktemp("launcher_signalled")
    with ThreadPoolExecutor(max_workers=len(LAUNCHES)) as pool:
        jobs = {config: pool.submit(launcher_signalled, config, root / config.split(".")[0]) for config in LAUNCHES}
        yield root, jobs


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """One process, global batch 1 (cpu.yaml's run) and 2 (the two-process runs')."""
    root = tmp_path_factory.mktemp("uninterrupted")
    for batch in ("1", "2"):
        assert train_main([*RUN, "--batch-size", batch, "--output-dir", str(root / batch)]) == 0
    return root


@pytest.mark.slow
@pytest.mark.parametrize("config", list(LAUNCHES))
def test_a_signal_to_the_launcher_alone_ends_every_process_with_a_checkpoint(config, signalled, uninterrupted):
    root, jobs = signalled
    out, job = root / config.split(".")[0], jobs[config].result()
    assert job["left"] == [], job["stderr"][-3000:]
    checkpoints = checkpoint_dirs(out)
    assert checkpoints, job["stderr"][-3000:]
    stopped_at = verify_checkpoint(checkpoints[0]).global_step
    assert stopped_at >= 5
    # Said once, by the main process, on the launcher's terminal (the training processes outlived it).
    lines = [line for line in job["stdout"].splitlines() if line.startswith("interrupted by SIGTERM")]
    assert lines == [f"interrupted by SIGTERM: saved checkpoint {checkpoints[0]} (epoch 1/1, step {stopped_at}); "
                     "to continue, run the same command with --resume latest"], job["stdout"][-3000:]  # fmt: skip
    assert not (out / "model.safetensors").exists()

    processes = LAUNCHES[config][1]
    assert train_main([*RUN, "--batch-size", str(processes), "--output-dir", str(out), "--resume", "latest"]) == 0
    reference = weights(uninterrupted / str(processes))
    if processes == 1:
        assert_weights_equal(weights(out), reference)
    else:  # the same global batch and data order on one process: equal up to the order of the sums
        assert_weights_close(weights(out), reference, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# DataLoader workers


@pytest.mark.slow
def test_dataloader_workers_die_with_their_training_process(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, str(TRAIN_SCRIPT), *RUN, "--batch-size", "1", "--num-workers", "2", "--output-dir", str(out)]
    proc, _ = start_stalled(cmd)
    try:
        workers = children_of(proc.pid)
        assert len(workers) >= 2
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        # At once: PyTorch's own watchdog would notice the orphaning only at its next 5 s check, and
        # not at all in a worker that is busy or still starting.
        assert gone_within(workers, 1) == []
    finally:
        for pid in processes_naming(str(out)):
            os.kill(pid, signal.SIGKILL)
