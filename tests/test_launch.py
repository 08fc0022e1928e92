"""Launches: the config files give what they say, and the launches that would not are refused.

Issue 10 item 1: accelerate 1.15's simple launcher (`accelerate config`'s multi-CPU answer without
an MPI hostfile, `--num_processes 2`, `--cpu --num_processes 2`) starts ONE process when asked for
several. Issue 15: every CPU config passes Accelerate's own `accelerate test`, exactly as printed.
"""

from __future__ import annotations

import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import (
    CONFIGS,
    REPO,
    TRAIN_SCRIPT,
    accelerate_launch,
    accelerate_launch_cmd,
    accelerate_test_cmd,
    check_ok,
    free_port,
    read_json,
    run_concurrently,
    run_python,
)

# What `accelerate config` writes for "multi-CPU, 2 processes, no mpirun" (accelerate 1.15).
ACCELERATE_CONFIG_MULTI_CPU = """\
compute_environment: LOCAL_MACHINE
debug: false
distributed_type: MULTI_CPU
downcast_bf16: 'no'
enable_cpu_affinity: false
machine_rank: 0
main_training_function: main
mixed_precision: 'no'
num_machines: 1
num_processes: 2
rdzv_backend: static
same_network: true
tpu_env: []
tpu_use_cluster: false
tpu_use_sudo: false
use_cpu: true
"""
LAUNCH = [sys.executable, "-m", "accelerate.commands.launch"]
ONE_FOR_MANY = "error: accelerate launch was asked for 2 processes but started one"
ONE_FOR_MANY_LAUNCHES = ["accelerate config's MULTI_CPU", "--num_processes 2", "--cpu --num_processes 2"]
# accelerate test, config -> (the environment it needs, the world and mixed precision it must report).
CPU_CONFIGS = {
    "cpu.yaml": ({}, "NO", 1, "no"),
    "cpu_bf16.yaml": ({}, "NO", 1, "bf16"),
    "multi_cpu.yaml": ({}, "MULTI_CPU", 2, "no"),
    # torchrun (needed for restarts) never exports ACCELERATE_USE_CPU in accelerate 1.15: a script
    # building plain Accelerator() needs it in the environment (see elastic_cpu.yaml).
    "elastic_cpu.yaml": ({"ACCELERATE_USE_CPU": "1"}, "MULTI_CPU", 2, "no"),
}


@pytest.fixture(scope="module")
def refused(tmp_path_factory) -> dict[str, tuple[subprocess.CompletedProcess, Path]]:
    """The launches that must stop at start-up, run side by side: name -> (result, its --output-dir)."""
    root = tmp_path_factory.mktemp("refused")
    config = root / "default_config.yaml"
    config.write_text(ACCELERATE_CONFIG_MULTI_CPU)
    outs = {name: root / f"run{i}" for i, name in enumerate([*ONE_FOR_MANY_LAUNCHES, "port 0", "0 processes"])}
    # No config file, and no default_config.yaml saved on this machine either.
    no_config = {"HF_HOME": str(root / "hf_home")}
    commands = {
        name: ([*LAUNCH, *name.split(), str(TRAIN_SCRIPT), "--no-progress", "--output-dir", str(outs[name])], no_config)
        for name in ONE_FOR_MANY_LAUNCHES[1:]
    }
    commands[ONE_FOR_MANY_LAUNCHES[0]] = (
        accelerate_launch_cmd(str(config), "--output-dir", str(outs[ONE_FOR_MANY_LAUNCHES[0]])),
        {},
    )
    port_0 = ("--main_process_port", "0")
    commands["port 0"] = (
        accelerate_launch_cmd("multi_cpu.yaml", "--output-dir", str(outs["port 0"]), launch_args=port_0),
        {},
    )
    commands["0 processes"] = (
        accelerate_launch_cmd("multi_cpu.yaml", "--output-dir", str(outs["0 processes"]), num_processes=0),
        {},
    )
    results = run_concurrently(commands, root)
    return {name: (results[name], outs[name]) for name in commands}


@pytest.mark.slow
@pytest.mark.parametrize("launch", ONE_FOR_MANY_LAUNCHES)
def test_a_launch_that_starts_one_process_of_several_stops_with_the_command_that_works(launch, refused):
    proc, out = refused[launch]
    fix = f"accelerate launch --config_file accelerate_configs/multi_cpu.yaml --num_processes 2 {TRAIN_SCRIPT} "
    fix += f"--no-progress --output-dir {out}"
    assert proc.returncode != 0
    # Our process prints one line and exits 2; accelerate's simple launcher reports that as its own
    # exit 1 with a traceback (accelerate 1.15 does so for any failing script).
    ours = proc.stderr[proc.stderr.index("error: ") :].splitlines()[0]
    assert ours.startswith(ONE_FOR_MANY) and ours.endswith(fix)
    assert proc.stderr.count(ONE_FOR_MANY) == 1
    assert "returned non-zero exit status 2" in proc.stderr
    assert not out.exists()


@pytest.mark.slow
def test_mpi_launch_with_port_0_stops_instead_of_hanging(refused):
    proc, out = refused["port 0"]
    assert proc.returncode != 0
    assert "error: an MPI launch with main_process_port 0 cannot form a world" in proc.stderr
    assert not out.exists()


@pytest.mark.slow
def test_a_launch_asked_for_no_processes_is_refused(refused):
    """multi_cpu.yaml with --num_processes 0: accelerate 1.15 leaves -n out of mpirun's command, which then
    starts one process; that trained alone and exited 0."""
    proc, out = refused["0 processes"]
    assert proc.returncode != 0
    message = (
        "error: accelerate launch was asked for --num_processes 0; a run needs at least one process: "
        "pass --num_processes 1 or more\n"
    )
    assert proc.stderr.count(message) == 1, proc.stderr[-3000:]
    assert not out.exists()


@pytest.mark.slow
def test_no_false_alarm_in_a_shell_that_exports_master_addr_and_port(tmp_path):
    """Slurm scripts export MASTER_ADDR/MASTER_PORT: a run by hand, or a one-process launch, is fine."""
    slurm = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "ACCELERATE_USE_CPU": "true"}
    by_hand = [sys.executable, str(TRAIN_SCRIPT), "--no-progress", "--output-dir", str(tmp_path / "hand")]
    one = accelerate_launch_cmd("cpu.yaml", "--output-dir", str(tmp_path / "one"))
    for proc in run_concurrently({"hand": (by_hand, slurm), "one": (one, slurm)}, tmp_path).values():
        check_ok(proc)
    for run in ("hand", "one"):
        assert read_json(tmp_path / run / "results.json")["world_size"] == 1


@pytest.fixture(scope="module")
def accelerate_tests(tmp_path_factory) -> dict[str, subprocess.CompletedProcess]:
    commands = {config: (accelerate_test_cmd(config), env) for config, (env, *_) in CPU_CONFIGS.items()}
    return run_concurrently(commands, tmp_path_factory.mktemp("accelerate_test"))


@pytest.mark.slow
@pytest.mark.parametrize("config", CPU_CONFIGS)
def test_accelerate_test_passes_for_every_cpu_config(config, accelerate_tests):
    """Accelerate's own check, run as the README prints it. Passing is not enough: in accelerate 1.15
    N independent one-process copies pass too, so the world every process saw is checked."""
    proc = check_ok(accelerate_tests[config])
    _, distributed_type, processes, precision = CPU_CONFIGS[config]
    assert "Test is a success" in proc.stdout
    assert proc.stdout.count(f"Distributed environment: DistributedType.{distributed_type}") == processes
    assert proc.stdout.count("Num processes: ") == proc.stdout.count(f"Num processes: {processes}\n") == processes
    assert proc.stdout.count(f"Mixed precision type: {precision}\n") == processes


def test_configs_name_files_that_exist():
    """multi_cpu.yaml's hostfile is a path relative to the repository root, where the README runs."""
    text = (CONFIGS / "multi_cpu.yaml").read_text()
    assert "mpirun_hostfile: accelerate_configs/localhost.hostfile" in text
    assert (REPO / "accelerate_configs" / "localhost.hostfile").is_file()


@pytest.mark.parametrize("config", ["cpu.yaml", "cpu_bf16.yaml", "multi_cpu.yaml"])
def test_cpu_configs_start_one_thread_per_process_without_a_warning(config, monkeypatch, caplog):
    """accelerate 1.15 otherwise sets OMP_NUM_THREADS to cores / processes and warns on every launch; on a
    shared 2-core machine 2 threads trained the MLP about 5x slower than 1. The command line still wins."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_simple_launcher_cmd_env

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.chdir(REPO)  # multi_cpu.yaml's hostfile is relative to the repository root
    for extra, threads in (([], "1"), (["--num_cpu_threads_per_process", "3"], "3")):
        caplog.clear()
        argv = ["--config_file", str(CONFIGS / config), *extra, str(TRAIN_SCRIPT)]
        args, _, _ = _validate_launch_command(launch_command_parser().parse_args(argv))
        _, env = prepare_simple_launcher_cmd_env(args)
        assert env["OMP_NUM_THREADS"] == threads
        assert "num_cpu_threads_per_process" not in caplog.text


@pytest.mark.slow
def test_the_process_left_when_another_dies_says_one_line(tmp_path):
    """elastic_cpu.yaml without restarts, rank 1 killed after step 2: rank 0's next collective fails. It used
    to print a ~45-line gloo traceback under torchrun's report; now one line saying why it stops."""
    out = tmp_path / "run"
    proc = accelerate_launch(
        "elastic_cpu.yaml", "--batch-size", "1", "--epochs", "30", "--output-dir", str(out),
        launch_args=("--max_restarts", "0", "--monitor_interval", "1", "--rdzv_backend", "c10d"),
        env={"TOYACCEL_FAULT": "step:2", "TOYACCEL_FAULT_RANK": "1", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1",
             "PET_RDZV_ENDPOINT": "localhost:0"},
    )  # fmt: skip
    assert proc.returncode != 0
    assert not re.search(rf'File "{re.escape(str(REPO))}/(toyaccel|scripts)/', proc.stderr), proc.stderr[-5000:]
    said = "error: another process of the run stopped ("
    lines = [line for line in proc.stderr.splitlines() if line.startswith(said)]
    assert len(lines) <= 1, proc.stderr[-5000:]  # rank 0 may also be stopped by torchrun before its collective fails


@pytest.mark.slow
def test_a_port_in_use_is_named_with_the_option_that_changes_it(tmp_path):
    """The main process of a launch whose port another run holds (torchrun's and mpirun's workers alike
    set MASTER_PORT): one line naming --main_process_port, not torch's EADDRINUSE message."""
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        world = {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1"}
        world["MASTER_PORT"] = str(port)
        out = tmp_path / "run"
        proc = run_python(str(TRAIN_SCRIPT), "--no-progress", "--output-dir", str(out), env=world, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr == (
        f"error: cannot set up Accelerate: port {port} is already in use (another run on this machine?); "
        "pass --main_process_port with a free port to accelerate launch\n"
    )
    assert not out.exists()
