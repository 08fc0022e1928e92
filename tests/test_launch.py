"""Launches: the config files give what they say, and the launches that would not are refused.

Issue 10 item 1: accelerate 1.15's simple launcher (`accelerate config`'s multi-CPU answer without
an MPI hostfile, `--num_processes 2`, `--cpu --num_processes 2`) starts ONE process when asked for
several. Issue 15: every CPU config passes Accelerate's own `accelerate test`, exactly as printed.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import (
    CONFIGS,
    REPO,
    TRAIN_SCRIPT,
    accelerate_launch_cmd,
    accelerate_test_cmd,
    check_ok,
    free_port,
    read_json,
    run_concurrently,
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
    outs = {name: root / f"run{i}" for i, name in enumerate([*ONE_FOR_MANY_LAUNCHES, "port 0"])}
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
