"""How this process was launched: the world it belongs to, and launches that would not train as asked.

Accelerate 1.15 has launches that run, but not as asked, and say nothing:
- without an MPI hostfile, `accelerate launch --num_processes N` (with or without `--cpu`) and a
  `distributed_type: MULTI_CPU` config take the simple launcher, which starts ONE process;
- under torchrun on a machine without CUDA, `Accelerator()` gives N processes that each train alone;
- an MPI launch with `MASTER_PORT=0` has every rank wait for a port only rank 0 knows (a hang).
Everything here runs before anything is written, so a refused launch leaves no output folder behind.
"""

from __future__ import annotations

import logging
import os
import shlex
from pathlib import Path

from toyaccel.errors import ToyaccelError

# The variables a launcher sets to the number of processes it started, in the order Accelerate
# reads them (accelerate.state): MPI's own (Open MPI, Intel MPI/MPICH, MVAPICH), then torchrun's.
WORLD_SIZE_VARIABLES = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE", "WORLD_SIZE")
MPI_SIZE_VARIABLES = WORLD_SIZE_VARIABLES[:3]
RANK_VARIABLES = ("RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_RANK")
# Open MPI refuses to start as root without these (containers and CI run as root).
MPI_AS_ROOT_ENV = {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}
MPI_AS_ROOT = " ".join(f"{k}={v}" for k, v in MPI_AS_ROOT_ENV.items())
# What a rank of an MPI launch has for its parent: Open MPI 5's mpirun runs as prterun (older: orterun).
MPI_LAUNCHERS = ("mpirun", "mpiexec", "prterun", "prte", "orterun")


def launched_world_size() -> int:
    """How many processes the launcher started (1 when started by hand)."""
    return _first_int(WORLD_SIZE_VARIABLES, 1)


def launched_rank() -> int:
    """This process's global rank, known before Accelerate starts (an MPI launch sets no RANK)."""
    return _first_int(RANK_VARIABLES, 0)


def _first_int(names: tuple[str, ...], default: int) -> int:
    for name in names:
        if os.environ.get(name):
            return int(os.environ[name])
    return default


# ---------------------------------------------------------------------------------------------
# Launches refused at start-up


def check_launch() -> None:
    """Stop a launch that would train with another number of processes than asked, or hang."""
    refuse_no_processes()
    refuse_one_process_for_many()
    refuse_mpi_without_port()


def refuse_no_processes() -> None:
    """`--num_processes 0` (or less) would otherwise train as one process: accelerate's mpirun command
    then leaves out -n, and its simple launcher starts one process whatever the number."""
    if "ACCELERATE_USE_CPU" not in os.environ:  # set by the simple launcher, alone or with mpirun
        return
    launch_argv = parent_accelerate_launch_argv()
    args = None if launch_argv is None else parse_launch(launch_argv)
    if args is not None and args.num_processes is not None and args.num_processes < 1:
        raise ToyaccelError(
            f"accelerate launch was asked for --num_processes {args.num_processes}; a run needs at least one "
            "process: pass --num_processes 1 or more",
            every_process=True,
        )


def refuse_one_process_for_many() -> None:
    launch = simple_launch_of_many()
    if launch is None:
        return
    asked, fix = launch
    raise ToyaccelError(
        f"accelerate launch was asked for {asked} processes but started one (its simple launcher, taken without "
        f"an MPI hostfile, starts one), which would train alone; run: {fix}"
    )


def refuse_mpi_without_port() -> None:
    mpi_world = any(int(os.environ.get(name) or 1) > 1 for name in MPI_SIZE_VARIABLES)
    if mpi_world and os.environ.get("MASTER_PORT") == "0":
        raise ToyaccelError(
            "an MPI launch with main_process_port 0 cannot form a world (each process would wait on a port "
            "only the first one knows); pass --main_process_port with a free port, e.g. 29500",
            every_process=True,
        )


def simple_launch_of_many() -> tuple[int, str] | None:
    """(processes asked for, the command that starts them) when this lone process was started by
    accelerate's simple launcher asked for several; None for every other launch.

    The environment alone cannot tell: the simple launcher exports MASTER_ADDR/MASTER_PORT when asked
    for several processes, but so do Slurm scripts for a run started by hand. So only a process whose
    parent is `accelerate launch` is looked at, and the parent's own command line (with its config
    file) says how many processes were asked for.
    """
    in_a_world = launched_world_size() > 1 or os.environ.get("LOCAL_RANK") is not None
    from_simple_launcher = "ACCELERATE_USE_CPU" in os.environ and "MASTER_ADDR" in os.environ
    if in_a_world or not from_simple_launcher:
        return None
    launch_argv = parent_accelerate_launch_argv()
    if launch_argv is None:
        return None
    args = parse_launch(launch_argv)
    if args is None or (args.num_processes or 1) <= 1 or args.mpirun_hostfile:
        return None
    return args.num_processes, working_command(args)


def parent_accelerate_launch_argv() -> list[str] | None:
    """The arguments after `accelerate launch` in the parent's command line, if it is one (or in the
    grandparent's, where the parent is the mpirun that `accelerate launch` started)."""
    parent = os.getppid()
    argv = command_line(parent)
    if argv and os.path.basename(argv[0]) in MPI_LAUNCHERS:
        argv = command_line(parent_of(parent))
    for i, arg in enumerate(argv):
        name = os.path.basename(arg)
        if name in ("accelerate-launch", "accelerate.commands.launch"):
            return argv[i + 1 :]
        if name in ("accelerate", "accelerate.commands.accelerate_cli") and argv[i + 1 : i + 2] == ["launch"]:
            return argv[i + 2 :]
    return None


def command_line(pid: int | None) -> list[str]:
    """A process's argv; empty where it cannot be read (no /proc, as on macOS, or the process is gone)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")[:-1] if pid else []
    except (OSError, UnicodeDecodeError):
        return []


def parent_of(pid: int) -> int | None:
    try:  # the field after the command name, which may itself hold spaces and parentheses
        return int(Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def parse_launch(launch_argv: list[str]):
    """The launcher's arguments as accelerate itself resolves them (config file and defaults)."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    logging.disable(logging.WARNING)  # accelerate launch already printed its warnings about missing values
    try:
        args = launch_command_parser().parse_args(launch_argv)
        _validate_launch_command(args)
    except (Exception, SystemExit):  # an argument list we cannot read: no alarm rather than a false one
        return None
    finally:
        logging.disable(logging.NOTSET)
    return args


def working_command(args) -> str:
    """The launch that gives ``args.num_processes`` real processes, for the same script and options."""
    import torch  # slow to import: the command line reads this module before any option is checked

    if torch.cuda.is_available():
        config, prefix = "accelerate_configs/multi_gpu.yaml", ""
    else:
        config = "accelerate_configs/multi_cpu.yaml"
        prefix = f"{MPI_AS_ROOT} " if hasattr(os, "geteuid") and os.geteuid() == 0 else ""
    script = ["-m"] if args.module else []
    script += [args.training_script, *args.training_script_args]
    launch = ["accelerate", "launch", "--config_file", config, "--num_processes", str(args.num_processes)]
    return prefix + shlex.join(launch + script)
