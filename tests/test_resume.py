"""Checkpoints, exact resume and surviving crashes.

Every crash here is real: TOYACCEL_FAULT makes a training process SIGKILL itself at a chosen point.
Runs that must die are subprocesses: one process killed mid-training, two DDP processes with rank 0
killed while writing a checkpoint, and an elastic launch whose rank 1 is killed mid-training.
Single-process runs that must live go in-process through the command line's entry point (the same
code path as ``toyaccel-train``, without paying for another interpreter). The uninterrupted
reference runs are shared by the whole module.

The run: 24 synthetic samples, global batch 2, 2 epochs = 24 optimizer steps; checkpoints at
steps 3, 6, 9, ... and at each epoch end; a log line every 2 steps (and at each checkpoint).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import (
    CONFIGS,
    REPO,
    TRAIN_SCRIPT,
    accelerate_launch,
    assert_weights_close,
    assert_weights_equal,
    check_ok,
    free_port,
    read_jsonl,
    run_python,
    start_stalled,
    subprocess_env,
    weights,
)

from toyaccel.cli import train_main
from toyaccel.engine.checkpoint import STATE_FILE, checkpoint_dirs
from toyaccel.engine.resume import verify_checkpoint

RUN = ("--data", "synthetic", "--num-samples", "24", "--epochs", "2", "--checkpoint-every", "3", "--log-every", "2")
RUN += ("--no-plot", "--no-progress")
ONE_PROCESS = ("--batch-size", "2")
TWO_PROCESSES = ("--batch-size", "1")  # the same global batch of 2, so the same steps and data order
# The fault-tolerant launch exactly as accelerate_configs/elastic_cpu.yaml documents it (these
# settings cannot live in the YAML): torchrun restarts the whole worker group, re-rendezvousing over
# c10d on a free port, with a fresh store per attempt (pytorch issue #135712).
ELASTIC_FLAGS = ("--max_restarts", "2", "--monitor_interval", "1", "--rdzv_backend", "c10d")
ELASTIC_ENV = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1", "PET_RDZV_ENDPOINT": "localhost:0"}


def train_here(out: Path, *args: str) -> int:
    """One process, in this interpreter, through the command line's own entry point."""
    return train_main([*RUN, *ONE_PROCESS, "--output-dir", str(out), *args])


def train_killed(out: Path, fault: str, *args: str) -> Path:
    """One process in a subprocess that SIGKILLs itself at ``fault``."""
    proc = run_python(
        "scripts/train.py", *RUN, *ONE_PROCESS, "--output-dir", str(out), *args, env={"TOYACCEL_FAULT": fault}
    )
    assert proc.returncode == -signal.SIGKILL, f"exit {proc.returncode}\n{proc.stderr[-3000:]}"
    return out


def launch_two(out: Path, *args: str, **kwargs):
    return accelerate_launch("multi_cpu.yaml", *RUN, *TWO_PROCESSES, "--output-dir", str(out), *args, **kwargs)


def signalled_mid_epoch(cmd: list[str], sig: int, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run ``cmd`` in its own session, as a terminal or a scheduler starts a job; when it reports
    (TOYACCEL_FAULT=stall:8) that it has trained step 8 of 12 in epoch 1, send ``sig`` to its whole
    process group, and the same signal again shortly after (a second Ctrl-C, or a scheduler's repeat)."""
    proc, seen = start_stalled(cmd, env, step=8)
    os.killpg(proc.pid, sig)
    time.sleep(0.2)
    os.killpg(proc.pid, sig)
    try:
        stdout, stderr = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, "".join(seen) + stderr)


def interrupted_one(out: Path):
    """One process, started as `toyaccel-train` is (no launcher in between), and SIGINT (Ctrl-C)."""
    cmd = [sys.executable, str(TRAIN_SCRIPT), *RUN, *ONE_PROCESS, "--output-dir", str(out), "--keep-last", "0"]
    return signalled_mid_epoch(cmd, signal.SIGINT)


def interrupted_two_then_resumed(out: Path) -> dict:
    """Two processes under `accelerate launch` and SIGTERM (a scheduler); then `--resume latest`.
    torchrun's launch (elastic_cpu.yaml): mpirun (multi_cpu.yaml) SIGKILLs its ranks too soon to save."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / "elastic_cpu.yaml")]
    cmd += ["--main_process_port", str(free_port()), str(TRAIN_SCRIPT), "--no-progress", *RUN, *TWO_PROCESSES]
    cmd += ["--output-dir", str(out), "--checkpoint-every", "0"]  # the interrupt checkpoints anyway
    stopped = signalled_mid_epoch(cmd, signal.SIGTERM)
    left = {"checkpoints": step_names(out), "model": (out / "model.safetensors").exists()}
    resumed = launch_two(out, "--checkpoint-every", "0", "--resume", "latest")
    return {"stopped": stopped, "left": left, "resumed": resumed}


def elastic_two_machines(root: Path) -> dict:
    """The fault-tolerant launch (elastic_cpu.yaml) on two "machines": one `accelerate launch` each,
    one process each, hostnames machine0 and machine1 as toyaccel sees them, one c10d world. Machine
    1's process is killed at step 8; both machines restart their workers, and after the restart the
    main process may sit on either machine (c10d hands out ranks in arrival order). The machine whose
    worker was merely stopped restarts it with TORCHELASTIC_RESTART_COUNT unchanged (0)."""
    port, out = free_port(), root / "run"
    root.mkdir()
    env = subprocess_env(ELASTIC_ENV)
    env.pop("PET_RDZV_ENDPOINT")  # the machines meet at --main_process_ip:--main_process_port
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / "elastic_cpu.yaml")]
    cmd += ["--num_machines", "2", "--num_processes", "2", "--main_process_ip", "127.0.0.1"]
    cmd += ["--main_process_port", str(port), *ELASTIC_FLAGS]
    cmd += [str(TRAIN_SCRIPT), "--no-progress", *RUN, *TWO_PROCESSES, "--output-dir", str(out)]
    machines = {}
    for rank in (0, 1):
        machine_env = {**env, "TOYACCEL_HOSTNAME_FOR_TESTS": f"machine{rank}"}
        if rank == 1:
            machine_env["TOYACCEL_FAULT"] = "step:8"
        with open(root / f"machine{rank}.log", "w") as log:
            machines[rank] = subprocess.Popen(
                [*cmd[:5], "--machine_rank", str(rank), *cmd[5:]], cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                env=machine_env,
            )  # fmt: skip
        # The first machine to arrive hosts the rendezvous; accelerate refuses machine 0 a port in use.
        wait_for_port(port, machines[0])
    try:
        codes = {rank: machine.wait(timeout=240) for rank, machine in machines.items()}
    finally:
        for machine in machines.values():
            if machine.poll() is None:  # one machine hung waiting for the other
                machine.kill()
    logs = {rank: (root / f"machine{rank}.log").read_text() for rank in machines}
    return {"out": out, "codes": codes, "logs": logs}


def wait_for_port(port: int, server: subprocess.Popen) -> None:
    for _ in range(1200):
        if server.poll() is not None:
            return
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)


def logged(run: Path) -> list[tuple]:
    """What metrics.jsonl says happened, without the timings."""
    return [(r["kind"], r["step"], r.get("loss"), r.get("train_loss")) for r in read_jsonl(run / "metrics.jsonl")]


def step_names(run: Path) -> list[str]:
    return [p.name for p in checkpoint_dirs(run)]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------------------------------
# Shared runs. Every process spends seconds importing torch; the subprocess runs that do not need
# each other start together in threads, so those start-ups overlap (about halving this module's
# time on 2 cores) while the in-process tests go on.


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """Uninterrupted, one process, every checkpoint kept (the damaged-checkpoint tests copy them)."""
    out = tmp_path_factory.mktemp("reference") / "run"
    assert train_here(out, "--keep-last", "0") == 0
    return out


def crash_in_checkpoint_then_resume_ddp(out: Path) -> dict:
    """Two processes; rank 0 is killed while checkpoint 9 is half written; then `--resume latest`."""
    crashed = launch_two(out, env={"TOYACCEL_FAULT": "checkpoint:9", "TOYACCEL_FAULT_RANK": "0"})
    half_written = out / "checkpoints" / ".tmp-step_9"
    left = {
        "checkpoints": step_names(out),
        # rank 0 died after writing its part; rank 1 may or may not have written its RNG file by then
        "half_written": {"model.safetensors", "optimizer.bin", STATE_FILE} & {p.name for p in half_written.iterdir()},
        "newest_whole": verify_checkpoint(out / "checkpoints" / "step_6").global_step,
        "model": (out / "model.safetensors").exists(),
    }
    return {"crashed": crashed, "left": left, "resumed": launch_two(out, "--resume", "latest")}


def continue_on_two(crashed: Future, out: Path):
    """Two processes x batch 1 finish what one process x batch 2 started."""
    shutil.copytree(crashed.result(), out)
    return launch_two(out, "--keep-last", "2", "--resume", "latest")


@pytest.fixture(scope="module")
def background(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    with ThreadPoolExecutor(max_workers=6) as pool:
        jobs = {
            "crashed_at_step_5": pool.submit(train_killed, root / "crashed", "step:5", "--keep-last", "2"),
            "reference_ddp": pool.submit(launch_two, root / "reference_ddp"),
            "ddp": pool.submit(crash_in_checkpoint_then_resume_ddp, root / "ddp"),
            "interrupted_one": pool.submit(interrupted_one, root / "interrupted_one"),
            "interrupted_two": pool.submit(interrupted_two_then_resumed, root / "interrupted_two"),
            "two_machines": pool.submit(elastic_two_machines, root / "two_machines"),
        }
        jobs["two_continue_one"] = pool.submit(continue_on_two, jobs["crashed_at_step_5"], root / "two_continue_one")
        yield root, jobs


@pytest.fixture(scope="module")
def reference_ddp(background) -> Path:
    """Uninterrupted, two processes (gloo DDP)."""
    root, jobs = background
    check_ok(jobs["reference_ddp"].result())
    return root / "reference_ddp"


def copy_run(run: Path, to: Path) -> Path:
    shutil.copytree(run, to)
    return to


# ---------------------------------------------------------------------------------------------
# Crash, then --resume latest: bitwise the uninterrupted run


@pytest.mark.slow
def test_crash_mid_training_then_resume_is_bitwise_equal(background, reference, tmp_path):
    """Killed after step 5: the newest checkpoint is step 3; steps 4-5 were trained (4 logged) and are lost.
    (Step 3 is not a multiple of --log-every, so this also checks that log windows restart there.)"""
    run = copy_run(background[1]["crashed_at_step_5"].result(), tmp_path / "run")
    assert step_names(run) == ["step_3"]
    assert [r["step"] for r in read_jsonl(run / "metrics.jsonl")][-1] == 4

    assert train_here(run, "--keep-last", "2", "--resume", "latest") == 0

    assert_weights_equal(weights(run), weights(reference))
    assert logged(run) == logged(reference)  # no step missing, none twice, the same losses
    # --keep-last 2: of the 8 checkpoints written, exactly the newest 2 remain, complete.
    assert step_names(run) == ["step_24", "step_21"]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_21", "step_24"]
    for path in checkpoint_dirs(run):
        verify_checkpoint(path)


@pytest.mark.slow
def test_two_process_crash_while_writing_a_checkpoint_then_resume_is_bitwise_equal(reference_ddp, background):
    """The previous checkpoint stays whole and the half-written one is never taken for a checkpoint."""
    root, jobs = background
    run, ddp = root / "ddp", jobs["ddp"].result()
    assert ddp["crashed"].returncode != 0
    assert ddp["left"] == {
        "checkpoints": ["step_6", "step_3"],
        "half_written": {"model.safetensors", "optimizer.bin"},  # no trainer_state.json: not a checkpoint
        "newest_whole": 6,
        "model": False,
    }
    check_ok(ddp["resumed"])
    assert f"resumed from {run / 'checkpoints' / 'step_6'} at epoch 1/2, step 6" in ddp["resumed"].stdout
    assert_weights_equal(weights(run), weights(reference_ddp))
    assert logged(run) == logged(reference_ddp)
    # checkpoint 9 was written again, whole, and later pruned by the default --keep-last 3
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_18", "step_21", "step_24"]


@pytest.mark.slow
def test_two_processes_continue_a_one_process_run(reference, background):
    """1 process x batch 2 crashed after step 5; 2 processes x batch 1 finish it: same global batch, same data order."""
    root, jobs = background
    run = root / "two_continue_one"
    check_ok(jobs["two_continue_one"].result())

    assert_weights_close(weights(run), weights(reference), atol=1e-6)
    resumed, uninterrupted = logged(run), logged(reference)
    assert [r[:2] for r in resumed] == [r[:2] for r in uninterrupted]
    for (*_, loss, train_loss), (*_, ref_loss, ref_train_loss) in zip(resumed, uninterrupted):
        assert loss == pytest.approx(ref_loss, abs=1e-6) and train_loss == pytest.approx(ref_train_loss, abs=1e-6)


# ---------------------------------------------------------------------------------------------
# Damaged checkpoints and runs that do not match


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def flip_a_bit(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 1  # the last byte of a weight: the file still loads, with a wrong number in it
    path.write_bytes(bytes(data))


DAMAGE = {
    "truncated weights": ("model.safetensors", truncate),
    "flipped bit in weights": ("model.safetensors", flip_a_bit),
    "truncated optimizer": ("optimizer.bin", truncate),
    "missing file": ("rng_state.safetensors", Path.unlink),
    "missing state": (STATE_FILE, Path.unlink),
    "state does not parse": (STATE_FILE, lambda p: p.write_text('{"epoch": 0, "global_')),
}


def run_with_checkpoints(reference: Path, to: Path, steps: tuple[int, ...]) -> Path:
    """A copy of the reference run as it stood after the newest of ``steps``."""
    (to / "checkpoints").mkdir(parents=True)
    shutil.copy(reference / "config.json", to)
    shutil.copy(reference / "metrics.jsonl", to)
    for step in steps:
        shutil.copytree(reference / "checkpoints" / f"step_{step}", to / "checkpoints" / f"step_{step}")
    return to


def assert_refused(out: Path, capsys, *args: str) -> str:
    """Exit code 2, one line on stderr, no traceback, and nothing in the run folder changed."""
    before = snapshot(out)
    capsys.readouterr()
    assert train_here(out, *args) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, err
    assert snapshot(out) == before
    return errors[0]


@pytest.mark.parametrize("damage", DAMAGE)
def test_damaged_checkpoint_is_refused_naming_the_file(reference, tmp_path, capsys, damage):
    run = run_with_checkpoints(reference, tmp_path / "run", (6,))
    name, spoil = DAMAGE[damage]
    bad_file = run / "checkpoints" / "step_6" / name
    spoil(bad_file)
    error = assert_refused(run, capsys, "--resume", str(bad_file.parent))
    assert str(bad_file) in error


@pytest.mark.parametrize(
    ("change", "difference"),
    [
        (("--lr", "0.1"), "lr: checkpoint 0.5, now 0.1"),
        (("--hidden", "8"), "hidden: checkpoint [30, 20], now [8]"),  # a checkpoint of a different model
    ],
)
def test_resume_with_a_different_config_is_refused(reference, tmp_path, capsys, change, difference):
    run = run_with_checkpoints(reference, tmp_path / "run", (3, 6))
    error = assert_refused(run, capsys, *change, "--resume", "latest")
    assert str(run / "checkpoints" / "step_6" / STATE_FILE) in error and difference in error


def test_resume_latest_skips_a_damaged_checkpoint(reference, tmp_path, capsys):
    run = run_with_checkpoints(reference, tmp_path / "run", (3, 6, 9))
    truncate(run / "checkpoints" / "step_9" / "optimizer.bin")
    capsys.readouterr()

    assert train_here(run, "--keep-last", "0", "--resume", "latest") == 0

    out = capsys.readouterr().out
    assert f"skipping checkpoint step_9: {run / 'checkpoints' / 'step_9' / 'optimizer.bin'}: damaged" in out
    assert f"resumed from {run / 'checkpoints' / 'step_6'} at epoch 1/2, step 6" in out
    assert_weights_equal(weights(run), weights(reference))
    assert logged(run) == logged(reference)
    verify_checkpoint(run / "checkpoints" / "step_9")  # rewritten whole by the resumed run


def edit_state(path: Path, edit, keep_checksum: bool = False) -> None:
    """Edit a checkpoint's trainer_state.json as a hand (or a corrupted disk) would; with
    ``keep_checksum``, give it the checksum of its new contents, as a knowing forger would."""
    import json

    from toyaccel.engine.checkpoint import STATE_DIGEST, _state_digest

    raw = json.loads(path.read_text())
    edit(raw)
    if keep_checksum:
        raw[STATE_DIGEST] = _state_digest(raw)
    path.write_text(json.dumps(raw))


def set_field(name, value):
    return lambda raw: raw.__setitem__(name, value)


def set_training(name, value):
    return lambda raw: raw["training"].__setitem__(name, value)


def set_files(files):
    return lambda raw: raw.__setitem__("files", files(raw["files"]))


def outside(files):
    return {**files, "/etc/hostname": files["rng_state.safetensors"]}


def climbing(files):
    return {**files, "../../../../etc/hostname": files["rng_state.safetensors"]}


# Each edit, made by hand (the checksum no longer matches) and forged (checksum recomputed): the
# checksum catches the first, the state's own checks the second.
TAMPERING = {
    "negative global step": (set_field("global_step", -7), "global_step: -7 is not a whole number >= 0"),
    "global step of another folder": (set_field("global_step", 9), "global_step 9 in folder step_6"),
    "epoch seed out of range": (set_field("epoch_seed", 2**64), "epoch_seed: 18446744073709551616 is not a seed"),
    "step in epoch past the epoch": (set_field("step_in_epoch", 13), "step_in_epoch 13 is past global_step 6"),
    "world size zero": (set_field("world_size", 0), "world_size: 0 is not a whole number >= 1"),
    "wrong type": (set_field("global_step", "6"), "global_step: '6' is not a whole number >= 0"),
    "training not a dict": (set_field("training", [1]), "training is a list, not a dict"),
    "empty manifest": (set_files(lambda f: {}), "its manifest does not list the model's weights, the optimizer's"),
    "manifest without the RNG": (
        set_files(lambda f: {k: v for k, v in f.items() if k != "random_states_0.pkl"}),
        "its manifest does not list random_states_0.pkl",
    ),
    "absolute path": (set_files(outside), "its manifest names '/etc/hostname', not a file inside the checkpoint"),
    "path out of the folder": (set_files(climbing), "names '../../../../etc/hostname', not a file inside"),
    "manifest of the wrong type": (set_files(lambda f: list(f)), "'files' is a list, not a manifest"),
    "entry of the wrong type": (
        set_files(lambda f: {**f, "optimizer.bin": [1465]}), "manifest entry 'optimizer.bin' is not {bytes, sha256}"
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("forged", [False, True], ids=["edited", "forged"])
@pytest.mark.parametrize("tampering", TAMPERING)
def test_a_tampered_state_is_damaged_skipped_and_nothing_is_set_aside(reference, tmp_path, capsys, tampering, forged):
    """--resume latest skips the tampered step_6 to step_3, sets nothing aside on its word, and trains
    the uninterrupted run's weights; --resume PATH refuses it in one line, touching nothing."""
    edit, reason = TAMPERING[tampering]
    run = run_with_checkpoints(reference, tmp_path / "run", (3, 6))
    state_file = run / "checkpoints" / "step_6" / STATE_FILE
    edit_state(state_file, edit, keep_checksum=forged)
    expected = reason if forged else "its contents do not match its checksum: edited or corrupted"

    error = assert_refused(run, capsys, "--resume", str(state_file.parent))
    assert error.startswith(f"error: {state_file}: damaged (") and expected in error

    assert train_here(run, "--keep-last", "0", "--resume", "latest") == 0
    out = capsys.readouterr().out
    assert f"skipping checkpoint step_6: {state_file}: damaged (" in out and expected in out
    assert f"resumed from {run / 'checkpoints' / 'step_3'} at epoch 1/2, step 3" in out
    assert_weights_equal(weights(run), weights(reference))
    assert logged(run) == logged(reference)
    aside = [p for p in (run / "checkpoints").iterdir() if p.name.startswith("abandoned-")]
    assert [p.name for a in aside for p in a.iterdir()] == ["step_6"]  # only what comes after step 3


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


@pytest.mark.parametrize(
    ("spoil", "reason"),
    [
        (lambda p: p.write_text(nested(100_000)), "nested too deeply"),
        (lambda p: p.write_text('{"files": ' + nested(5000) + "}"), "nested too deeply"),
        (lambda p: p.write_text("[]"), "a JSON list, not an object"),
        (lambda p: p.write_text("7"), "a JSON int, not an object"),
    ],
    ids=["deep list", "deep manifest", "a list", "a number"],
)
def test_a_malformed_state_file_is_damaged(reference, tmp_path, capsys, spoil, reason):
    run = run_with_checkpoints(reference, tmp_path / "run", (6,))
    state_file = run / "checkpoints" / "step_6" / STATE_FILE
    spoil(state_file)
    assert assert_refused(run, capsys, "--resume", str(state_file.parent)) == f"error: {state_file}: damaged ({reason})"


def test_files_the_manifest_does_not_list_or_links_are_damage(reference, tmp_path, capsys):
    run = run_with_checkpoints(reference, tmp_path / "run", (6,))
    checkpoint = run / "checkpoints" / "step_6"
    (checkpoint / "pytorch_model.bin").write_bytes(b"not listed")
    error = assert_refused(run, capsys, "--resume", str(checkpoint))
    unlisted = checkpoint / "pytorch_model.bin"
    assert error == f"error: {unlisted}: not listed in {STATE_FILE} (a checkpoint holds only its own files)"
    (checkpoint / "pytorch_model.bin").unlink()

    # The same bytes, reached through a link: still not the checkpoint's own file.
    (tmp_path / "elsewhere.bin").write_bytes((checkpoint / "optimizer.bin").read_bytes())
    (checkpoint / "optimizer.bin").unlink()
    (checkpoint / "optimizer.bin").symlink_to(tmp_path / "elsewhere.bin")
    error = assert_refused(run, capsys, "--resume", str(checkpoint))
    assert error.startswith(f"error: {checkpoint / 'optimizer.bin'}: damaged (a link or special file")


def test_resume_auto_refuses_to_start_over_on_checkpoints_that_fail(reference, tmp_path, capsys):
    """Starting afresh would set the checkpoints aside and empty metrics.jsonl on the word of a file
    that failed verification (issue 21: global_step -7 did exactly that)."""
    run = run_with_checkpoints(reference, tmp_path / "run", (3,))
    edit_state(run / "checkpoints" / "step_3" / STATE_FILE, set_field("global_step", -7))
    error = assert_refused(run, capsys, "--resume", "auto")
    assert error.startswith(f"error: {run / 'checkpoints'}: no checkpoint there verifies (see above)")


def test_a_checkpoint_of_the_previous_format_still_resumes(reference, tmp_path, capsys):
    """Checkpoints written before the state carried its own checksum resume, saying so; their fields
    are still checked (an edited one is skipped)."""
    from toyaccel.engine.checkpoint import STATE_DIGEST

    run = run_with_checkpoints(reference, tmp_path / "run", (3, 6))
    for step in (3, 6):
        edit_state(run / "checkpoints" / f"step_{step}" / STATE_FILE, lambda raw: raw.pop(STATE_DIGEST))
    edit_state(run / "checkpoints" / "step_6" / STATE_FILE, set_field("global_step", -7))
    capsys.readouterr()

    assert train_here(run, "--keep-last", "0", "--resume", "latest") == 0

    out = capsys.readouterr().out
    assert "skipping checkpoint step_6: " in out and "global_step: -7 is not a whole number >= 0" in out
    assert f"checkpoint step_3 comes from an older toyaccel: {STATE_FILE} has no checksum of its own" in out
    assert f"resumed from {run / 'checkpoints' / 'step_3'} at epoch 1/2, step 3" in out
    assert_weights_equal(weights(run), weights(reference))


def test_overwrite_never_follows_a_linked_checkpoints_folder(reference, tmp_path, capsys):
    """A `checkpoints` link (to a bigger disk, say) is refused in one line; what it points to stays."""
    run = run_with_checkpoints(reference, tmp_path / "run", ())
    (run / "checkpoints").rmdir()
    target = copy_run(reference / "checkpoints", tmp_path / "elsewhere")
    before = snapshot(target)
    (run / "checkpoints").symlink_to(target, target_is_directory=True)
    error = assert_refused(run, capsys, "--overwrite")
    assert error == (
        f"error: {run / 'checkpoints'} is a symbolic link, which --overwrite neither follows nor removes: "
        "remove it yourself, or choose another --output-dir"
    )
    assert (run / "checkpoints").is_symlink() and snapshot(target) == before


def test_a_diverging_loss_stops_the_run_at_the_log_line_that_shows_it(tmp_path, capsys):
    """The loss is read only at log lines (no wait on the device per step): the run stops at the first
    one whose window mean is not finite, before logging or checkpointing it; the checkpoints before it stay."""
    out = tmp_path / "run"
    args = ("--data", "synthetic", "--num-samples", "64", "--epochs", "2", "--batch-size", "2", "--lr", "1e5")
    args += ("--checkpoint-every", "2", "--log-every", "4", "--no-plot", "--no-progress", "--output-dir", str(out))
    capsys.readouterr()
    assert train_main(list(args)) == 2
    err = capsys.readouterr().err
    assert err == (
        "error: the training loss became nan in steps 3-4: training diverged; lower --lr (now 100000) "
        f"(the newest checkpoint is {out / 'checkpoints' / 'step_2'})\n"
    )
    assert step_names(out) == ["step_2"] and verify_checkpoint(out / "checkpoints" / "step_2").global_step == 2
    assert [r["step"] for r in read_jsonl(out / "metrics.jsonl")] == [2]
    assert not (out / "results.json").exists() and not (out / "model.safetensors").exists()


def test_weights_made_non_finite_by_an_epochs_last_steps_stop_at_its_evaluation(tmp_path, capsys):
    out = tmp_path / "run"
    capsys.readouterr()
    assert train_main(["--lr", "1e6", "--no-plot", "--no-progress", "--output-dir", str(out)]) == 2
    assert capsys.readouterr().err == (
        "error: the training loss became inf on the train data after epoch 1 (step 2): training diverged; "
        "lower --lr (now 1e+06) (no checkpoint was written)\n"
    )
    assert not (out / "checkpoints").exists() and not (out / "results.json").exists()


@pytest.fixture
def small_disk(tmp_path):
    """A 160 KiB file system of its own (tmpfs): room for a few of the RUN's checkpoints, not all.
    Needs mount privileges (root, as in CI and most containers); skipped where there are none."""
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=160k", "tmpfs", str(mount_point)],
                             capture_output=True, text=True)  # fmt: skip
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


@pytest.mark.slow
def test_a_full_disk_stops_the_run_in_one_line_and_keeps_the_checkpoints_before(small_disk, capsys):
    """The real error (SafetensorError or torch.save's "unexpected pos", from ENOSPC): one line saying
    the disk is full and which checkpoint could not be written, exit 2; the earlier ones verify."""
    out = small_disk / "run"
    capsys.readouterr()
    code = train_main([*RUN, *ONE_PROCESS, "--output-dir", str(out), "--keep-last", "0", "--checkpoint-every", "1",
                       "--log-every", "100"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2, err
    kept = step_names(out)
    assert kept and [int(name[5:]) for name in kept] == list(range(len(kept), 0, -1))
    failed = out / "checkpoints" / f"step_{len(kept) + 1}"
    assert err.startswith(f"error: the disk is full: cannot write checkpoint {failed} (") and err.count("\n") == 1
    conventions = "the checkpoints before it are whole: make room, then run the same command with --resume latest"
    assert err.endswith(f"; {conventions}\n")
    for path in checkpoint_dirs(out):
        verify_checkpoint(path)
    assert [p.name for p in (out / "checkpoints").iterdir() if p.name.startswith(".")] == []  # its space is freed


def test_resume_may_split_the_global_batch_differently(tmp_path):
    """2 micro-steps of 4 continued as 4 micro-steps of 2: the same optimizer steps as before."""
    args = ("--data", "synthetic", "--num-samples", "32", "--epochs", "1", "--no-plot", "--no-progress")
    args += ("--checkpoint-every", "1", "--keep-last", "0", "--log-every", "1")
    assert train_main([*args, "--grad-accum", "2", "--batch-size", "4", "--output-dir", str(tmp_path / "a")]) == 0
    resumed = ("--grad-accum", "4", "--batch-size", "2", "--output-dir", str(tmp_path / "b"))
    assert train_main([*args, *resumed, "--resume", str(tmp_path / "a" / "checkpoints" / "step_1")]) == 0
    steps = [r["step"] for r in read_jsonl(tmp_path / "b" / "metrics.jsonl") if r["kind"] == "step"]
    assert steps == [2, 3, 4]  # 32 samples / global batch 8, resumed after step 1
    assert_weights_close(weights(tmp_path / "b"), weights(tmp_path / "a"), atol=1e-6)


@pytest.mark.slow
def test_elastic_restarts_do_not_slip_past_the_output_folder_guard(reference, tmp_path):
    """torchrun restarts workers after any failure, the refusal of a folder holding another run too;
    the restarted workers must refuse again, not resume or overwrite that run."""
    shutil.copytree(reference, tmp_path / "other")
    before = snapshot(tmp_path / "other")
    proc = accelerate_launch(
        "elastic_cpu.yaml", *RUN, *TWO_PROCESSES, "--lr", "0.1", "--output-dir", str(tmp_path / "other"),
        launch_args=("--max_restarts", "1", *ELASTIC_FLAGS[2:]), env=ELASTIC_ENV,
    )  # fmt: skip
    assert proc.returncode != 0
    refusals = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(refusals) == 2 and "already holds a run" in refusals[0]  # the first attempt and the restart
    assert "resumed from" not in proc.stdout
    assert snapshot(tmp_path / "other") == before


@pytest.mark.slow
def test_elastic_launch_on_two_machines_survives_a_killed_worker(reference_ddp, background):
    """Where to resume is decided once, on the main process, whichever machine it is on, and sent
    to every process: both machines continue from step 6 and end with the uninterrupted weights."""
    job = background[1]["two_machines"].result()
    logs = "".join(job["logs"].values())
    assert job["codes"] == {0: 0, 1: 0}, "\n".join(log[-3000:] for log in job["logs"].values())
    # Said once per run, by the main process, on whichever machine; one restart: the fault fires only in
    # the first attempt. That both machines resumed there shows in the weights.
    assert logs.count(f"resumed from {job['out'] / 'checkpoints' / 'step_6'} at epoch 1/2, step 6") == 1
    assert logs.count("resumed from") == 1 and "already holds a run" not in logs
    assert_weights_equal(weights(job["out"]), weights(reference_ddp))
    assert logged(job["out"]) == logged(reference_ddp)


# ---------------------------------------------------------------------------------------------
# Interrupts: a signal mid-epoch stops every process after the same step, with a checkpoint


@pytest.mark.slow
def test_ctrl_c_saves_a_checkpoint_and_resume_is_bitwise_equal(background, reference, capsys):
    """SIGINT twice to the process group after step 8 of 12 (and no checkpoint due there): the run
    stops after step 8, saves it, says where and how to continue, and exits 130 without a traceback."""
    root, jobs = background
    run, proc = root / "interrupted_one", jobs["interrupted_one"].result()
    assert proc.returncode == 130, proc.stderr[-3000:]
    checkpoint = run / "checkpoints" / "step_8"
    line = (
        f"interrupted by SIGINT: saved checkpoint {checkpoint} (epoch 1/2, step 8); "
        "to continue, run the same command with --resume latest"
    )
    assert proc.stdout.splitlines()[-1] == line
    assert "Traceback" not in proc.stderr and "interrupted" not in proc.stderr
    assert step_names(run) == ["step_8", "step_6", "step_3"]
    assert verify_checkpoint(checkpoint).step_in_epoch == 8
    assert not (run / "model.safetensors").exists()

    capsys.readouterr()
    assert train_here(run, "--keep-last", "0", "--resume", "latest") == 0

    assert f"resumed from {checkpoint} at epoch 1/2, step 8" in capsys.readouterr().out
    assert_weights_equal(weights(run), weights(reference))
    assert logged(run) == logged(reference)  # step 8 ends a log window in both


@pytest.mark.slow
def test_sigterm_to_two_processes_saves_a_checkpoint_and_resume_is_bitwise_equal(background, reference_ddp):
    """SIGTERM to `accelerate launch`'s process group: both workers stop after the same step (within
    about 0.1 s of the signal, when they next agree) and save it, with --checkpoint-every 0.
    What the user sees: toyaccel's line once, then torchrun's agent reports the signal it got itself
    (its own traceback, not toyaccel's) and `accelerate launch` exits 1."""
    root, jobs = background
    run, job = root / "interrupted_two", jobs["interrupted_two"].result()
    stopped = job["stopped"]
    assert stopped.returncode == 1, stopped.stderr[-3000:]
    lines = [line for line in stopped.stdout.splitlines() if line.startswith("interrupted")]
    assert len(lines) == 1, stopped.stdout
    assert lines[0].startswith(f"interrupted by SIGTERM: saved checkpoint {run / 'checkpoints' / 'step_'}")
    assert str(REPO / "toyaccel") not in stopped.stderr and "KeyboardInterrupt" not in stopped.stderr
    checkpoint = job["left"]["checkpoints"][0]  # the interrupt's, and epoch 1's if it stopped in epoch 2
    stopped_at = int(checkpoint.removeprefix("step_"))
    assert stopped_at >= 8 and job["left"]["checkpoints"] == [checkpoint] + (["step_12"] if stopped_at > 12 else [])
    assert not job["left"]["model"]

    check_ok(job["resumed"])
    assert f"resumed from {run / 'checkpoints' / checkpoint} at epoch " in job["resumed"].stdout
    assert_weights_equal(weights(run), weights(reference_ddp))
    steps = [r["step"] for r in read_jsonl(run / "metrics.jsonl") if r["kind"] == "step"]
    assert steps == sorted(set(steps)) and steps[-1] == 24  # every log line once, in order


# ---------------------------------------------------------------------------------------------
# Timelines: resuming from an older checkpoint abandons the later ones


@pytest.mark.slow
def test_resuming_from_an_older_checkpoint_abandons_the_later_ones(reference, tmp_path, capsys):
    """The sequence of issue 10: every checkpoint kept up to step 24; resumed from step 6 with
    --keep-last 1; killed at step 10. The new step 9 survives, --resume latest continues this
    timeline, and the old run's later checkpoints are set aside, never chosen."""
    run = copy_run(reference, tmp_path / "run")
    old = {name: snapshot(run / "checkpoints" / name) for name in step_names(run) if int(name[5:]) > 6}
    train_killed(run, "step:10", "--keep-last", "1", "--resume", str(run / "checkpoints" / "step_6"))

    assert step_names(run) == ["step_9"]
    [aside] = [p for p in (run / "checkpoints").iterdir() if p.name.startswith("abandoned-")]
    assert {p.name: snapshot(p) for p in aside.iterdir()} == old  # moved whole, not chosen, not deleted

    capsys.readouterr()
    assert train_here(run, "--keep-last", "1", "--resume", "auto") == 0

    assert f"resumed from {run / 'checkpoints' / 'step_9'} at epoch 1/2, step 9" in capsys.readouterr().out
    assert_weights_equal(weights(run), weights(reference))
    assert step_names(run) == ["step_24"]


def test_resume_auto_starts_fresh_without_a_checkpoint_and_refuses_another_run(reference, tmp_path, capsys):
    fresh = tmp_path / "fresh"
    assert train_here(fresh, "--resume", "auto") == 0
    assert_weights_equal(weights(fresh), weights(reference))
    # A folder holding a run with other settings and no checkpoint is refused, as without --resume.
    other = run_with_checkpoints(reference, tmp_path / "other", ())
    error = assert_refused(other, capsys, "--lr", "0.1", "--resume", "auto")
    assert "already holds a run" in error


def test_resume_latest_without_a_checkpoint_writes_nothing(tmp_path, capsys):
    capsys.readouterr()
    assert train_here(tmp_path / "missing", "--resume", "latest") == 2
    expected = f"error: --resume latest: no complete checkpoint in {tmp_path / 'missing' / 'checkpoints'}\n"
    assert capsys.readouterr().err == expected
    assert not (tmp_path / "missing").exists()
