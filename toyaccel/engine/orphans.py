"""No process of a run outlives its launcher: a stop that reaches only the launcher stops the run.

`timeout 20 accelerate launch ...`, a scheduler or `kill PID` signal the launcher alone. accelerate's
simple launcher (cpu.yaml, and the mpirun it starts for multi_cpu.yaml) forwards nothing and dies, and
torchrun's agent (elastic_cpu.yaml) dies at once on SIGUSR1; their training processes would train on
unwatched. So each training process started by a launcher watches the launchers above it (up to
`accelerate launch`) and, when one ends, sends itself SIGTERM: the usual stop (every process agrees on
a step, checkpoints it, exits 143). A watching thread, not PR_SET_PDEATHSIG: that sees only the direct
parent, and under mpirun it is mpirun that outlives a killed `accelerate launch`.

DataLoader worker processes are killed with their training process (PR_SET_PDEATHSIG, SIGKILL): they
hold nothing that needs saving.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import signal
import sys
import threading
from pathlib import Path

# Process names (or the script or module a Python runs) of the launchers whose end stops a run.
LAUNCHERS = {
    "accelerate", "accelerate-launch", "accelerate.commands.launch", "accelerate.commands.accelerate_cli",
    "torchrun", "torch.distributed.run", "torch.distributed.launch",
    "mpirun", "mpiexec", "prterun", "prte", "prted", "orterun", "orted",
}  # fmt: skip
POLL_SECONDS = 0.25
PR_SET_PDEATHSIG = 1


def _stat(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat after the name (state first), or None when there is no such process."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return None


def _is_launcher(pid: int) -> bool:
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")[:3]
    except OSError:
        return False
    return any(os.path.basename(arg) in LAUNCHERS for arg in argv)


def launchers_above() -> list[tuple[int, str]]:
    """(pid, start time) of this process's launcher ancestors, nearest first: none for a run started
    by hand (a shell's nohup must keep working), a notebook, or a scheduler's own step daemon."""
    found, pid = [], os.getppid()
    while pid > 1 and _is_launcher(pid):
        fields = _stat(pid)
        if fields is None:
            break
        found.append((pid, fields[19]))
        pid = int(fields[1])
    return found


def _alive(pid: int, started: str) -> bool:
    fields = _stat(pid)
    # A killed launcher stays a zombie until its own parent reaps it; a new process may reuse its pid.
    return fields is not None and fields[0] not in ("Z", "X") and fields[19] == started


@contextlib.contextmanager
def stop_when_launcher_ends():
    """While active, SIGTERM this process as soon as a launcher above it has ended."""
    watched = launchers_above() if sys.platform.startswith("linux") else []
    if not watched:
        yield
        return
    done = threading.Event()

    def watch() -> None:
        while not done.wait(POLL_SECONDS):
            if not all(_alive(pid, started) for pid, started in watched):
                os.kill(os.getpid(), signal.SIGTERM)
                return

    watcher = threading.Thread(target=watch, name="toyaccel-launcher-watch", daemon=True)
    watcher.start()
    try:
        yield
    finally:
        done.set()


def die_with_parent(parent_pid: int, _worker_id: int = 0) -> None:
    """A DataLoader ``worker_init_fn``: the worker is SIGKILLed when the training process ends
    (a worker left behind would hold its memory and cores until it is killed by hand)."""
    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent_pid:  # the parent ended before the death signal was armed
        os._exit(1)
