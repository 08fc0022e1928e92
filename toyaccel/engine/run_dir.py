"""The files of a run's folder: atomic writes, the output-directory guard, the launch that owns it."""

from __future__ import annotations

import json
import os
import shutil
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from toyaccel.engine.files import read_json_object, require_regular_file
from toyaccel.errors import ToyaccelError

# Everything toyaccel writes into an output directory; --overwrite removes these and nothing else.
RUN_FILES = (
    "config.json", "results.json", "model.safetensors", "tokenizer.json", "metrics.jsonl", "loss.png",
    "checkpoints", "logs",
)  # fmt: skip
# Names the launch that owns the folder (see launch_id); an elastic restart of it may carry on.
LAUNCH_FILE = ".launch"


def write_atomic(path: Path, write) -> None:
    """Write through a temporary file and rename, so a crash never leaves a half-written file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    respect_umask(tmp)
    os.replace(tmp, path)


def respect_umask(path: Path, umask: int | None = None) -> None:
    """Give ``path`` the mode a plain ``open()`` would have: safetensors creates its files 0600
    whatever the umask, and on a shared cluster nobody else could read the model."""
    wanted = 0o666 & ~(current_umask() if umask is None else umask)
    if Path(path).stat().st_mode & 0o777 != wanted:
        os.chmod(path, wanted)


def current_umask() -> int:
    try:  # Linux tells it without changing it (os.umask can only read it by setting it)
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_json(path: Path, obj: Any) -> None:
    write_atomic(path, lambda p: Path(p).write_text(json.dumps(obj, indent=2) + "\n"))


def save_weights(state_dict: dict[str, torch.Tensor], path: Path) -> None:
    tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    write_atomic(path, lambda p: save_file(tensors, str(p)))


def existing_run_files(output_dir: Path) -> list[str]:
    return [name for name in RUN_FILES if (Path(output_dir) / name).exists()]


def prepare_output_dir(output_dir: str, overwrite: bool, resuming: bool, read_run: Callable | None = None) -> None:
    """Refuse to mix two runs in one folder, and find an unwritable folder before training starts.
    ``read_run``: reads a folder's config.json as a run's, raising ToyaccelError where it is not one."""
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise ToyaccelError(f"output directory {out} exists and is not a directory")
    found = existing_run_files(out) if out.exists() else []
    foreign = not_a_run_because(out, read_run or read_config_json) if found and not resuming else None
    if foreign:
        raise ToyaccelError(
            f"{out} holds {', '.join(found)} but is not a toyaccel run ({foreign}): toyaccel neither writes over "
            "nor removes them (--overwrite included); choose another --output-dir"
        )
    if found and not (overwrite or resuming):
        raise ToyaccelError(
            f"{out} already holds a run ({', '.join(found)}); pass --overwrite to replace it, "
            "--resume latest to continue it, or choose another --output-dir"
        )
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise ToyaccelError(f"cannot write to output directory {out}: {e.strerror or e}") from None
    if overwrite and not resuming:
        refuse_linked_run_entries(out)
        for name in found:
            target = out / name
            shutil.rmtree(target) if target.is_dir() else target.unlink()


def refuse_linked_run_entries(out: Path) -> None:
    """--overwrite removes what toyaccel wrote; a link in its place was made by someone else, and
    removing through it would delete what it points to (checked before anything is removed)."""
    for name in RUN_FILES:
        if (out / name).is_symlink():
            raise ToyaccelError(
                f"{out / name} is a symbolic link, which --overwrite neither follows nor removes: remove it "
                "yourself, or choose another --output-dir"
            )


def not_a_run_because(folder: Path, read_run: Callable) -> str | None:
    """Why ``folder`` is not a toyaccel run, or None where it is one: a toyaccel run is recognised by its
    config.json, which toyaccel writes first (once training has taken its first step) and which must read as
    a run's. Files of the same names written by anything else are not toyaccel's to replace or delete."""
    if not (Path(folder) / "config.json").is_file():
        return "no config.json"
    try:
        read_run(folder)
    except ToyaccelError:
        return "its config.json is not a toyaccel run's"
    return None


def claim_for_this_launch(output_dir: str, launch_ids: list[str]) -> None:
    """Mark the folder as this launch's, once the run in it has started (or resumed) for real.
    ``launch_ids``: every process's ``launch_id()``; on several machines they differ, and after an
    elastic restart any machine may hold the main process."""
    (Path(output_dir) / LAUNCH_FILE).write_text("".join(f"{i}\n" for i in sorted(set(launch_ids))))


def launch_id() -> str:
    """The same in every attempt of one elastic launch on this machine, different for the next launch:
    the workers' parent is the launcher's agent, which lives across restarts (TORCHELASTIC_RUN_ID is
    'none'); its start time tells it from a later process that got the same pid.
    TOYACCEL_HOSTNAME_FOR_TESTS stands in for the hostname, so that one host can play two machines."""
    hostname = os.environ.get("TOYACCEL_HOSTNAME_FOR_TESTS") or socket.gethostname()
    try:  # field 22 of /proc/PID/stat: the start time; the name before it (in parentheses) may hold spaces
        started = Path(f"/proc/{os.getppid()}/stat").read_text().rpartition(")")[2].split()[19]
    except (OSError, IndexError):
        started = "?"
    return f"{hostname}:{os.getppid()}:{started}"


def restart_of_owning_launch(output_dir: str) -> bool:
    """True in a restarted attempt of the elastic launch that claimed this folder (asked on the main
    process, which after a restart may be on any of its machines).

    torchrun restarts workers after any failure, a refused output folder included: only the launch
    that owns the folder may carry on in it, or a restart would slip past the guard above. Not
    TORCHELASTIC_RESTART_COUNT > 0: a machine whose workers were stopped because another machine's
    failed restarts them with the count unchanged.
    """
    if "TORCHELASTIC_RESTART_COUNT" not in os.environ:
        return False
    try:
        return launch_id() in (Path(output_dir) / LAUNCH_FILE).read_text().splitlines()
    except OSError:
        return False


def read_config_json(run_dir: str | Path) -> dict[str, Any]:
    """A run's config.json as JSON: a regular file holding an object whose config and model sections are
    mappings (what the sections hold is its reader's to check). Any problem is one line naming the file."""
    path = Path(run_dir) / "config.json"
    require_regular_file(path)
    saved = read_json_object(
        path, f"no such file (is {run_dir} a toyaccel run directory?)",
        lambda e: f"not a toyaccel run config ({type(e).__name__}: {e})",
        "not a toyaccel run config (a JSON object with config and model sections)",
    )  # fmt: skip
    for section in ("config", "model"):
        if not isinstance(saved.get(section, {}), dict):
            raise ToyaccelError(f"{path}: {section} must be a mapping, got {type(saved[section]).__name__}")
    if "model" not in saved:
        raise ToyaccelError(f"{path}: not a toyaccel run config (no model section)")
    return saved


def default_output_dir(data: str, resuming: bool) -> str:
    """The folder of a run started without --output-dir: ``runs/<data>`` for the first, then
    ``runs/<data>-2``, ``-3``, ... so the quick start can be run again; resuming, the newest of them; in
    an elastic restart, the one this launch claimed."""
    base = Path("runs") / (data if data in ("toy", "synthetic") else Path(data).stem or "run")
    taken = []
    for n in range(1, 1_000_000):
        path = base if n == 1 else base.with_name(f"{base.name}-{n}")
        if not path.exists() or not existing_run_files(path):
            break
        taken.append(path)
    for folder in taken:
        if restart_of_owning_launch(str(folder)):
            return str(folder)
    if resuming and taken:
        return str(taken[-1])
    return str(path)
