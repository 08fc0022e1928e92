"""Checkpoints: atomic, bounded, verified, and restorable into the exact same training state.

A checkpoint is a folder ``checkpoints/step_<global_step>/`` holding what ``accelerator.save_state``
writes (weights, optimizer, per-process RNG files) plus two files of ours, neither of them a pickle:
``rng_state.safetensors`` (the global torch RNG, which decides each epoch's data order) and
``trainer_state.json`` (where training stands, what it was trained with, and a manifest with the
size and SHA-256 of every file, written last).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import itertools
import json
import os
import re
import shutil
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from toyaccel.config import run_identity
from toyaccel.errors import ToyaccelError
from toyaccel.faults import maybe_inject_fault
from toyaccel.outputs import current_umask, read_run_config, respect_umask

STATE_FILE = "trainer_state.json"
RNG_FILE = "rng_state.safetensors"
STEP_DIR = re.compile(r"^step_(\d+)$")


@dataclass
class TrainerState:
    """Where training stands. Checkpoints are taken only between optimizer steps."""

    epoch: int = 0  # the epoch in progress (0-based)
    step_in_epoch: int = 0  # optimizer steps done in this epoch
    global_step: int = 0  # optimizer steps done in the whole run
    epoch_seed: int | None = None  # the shuffle seed of the epoch in progress (None: not drawn yet)
    next_epoch_seed: int | None = None  # the next epoch's, drawn one epoch ahead (None: not drawn yet)
    global_batch: int = 0  # samples per optimizer step, over all processes
    world_size: int = 1
    training: dict[str, Any] = field(default_factory=dict)  # TrainConfig.training_dict()
    model_shape: dict[str, Any] = field(default_factory=dict)
    data_fingerprint: str = ""

    @property
    def samples_in_epoch(self) -> int:
        return self.step_in_epoch * self.global_batch

    def finish_step(self) -> None:
        self.step_in_epoch += 1
        self.global_step += 1

    def finish_epoch(self) -> None:
        self.epoch, self.step_in_epoch, self.epoch_seed = self.epoch + 1, 0, None

    def differences(self, other: TrainerState) -> list[str]:
        """What makes ``other`` (this run) unable to continue from this checkpoint, in words."""
        diffs = [
            f"{name}: checkpoint {self.training.get(name)!r}, now {value!r}"
            for name, value in other.training.items()
            if self.training.get(name) != value
        ]
        if self.model_shape != other.model_shape:
            diffs.append(f"model shape: checkpoint {self.model_shape}, now {other.model_shape}")
        if self.global_batch != other.global_batch:
            diffs.append(
                f"global batch (processes x batch_size x grad_accum): checkpoint {self.global_batch}, "
                f"now {other.global_batch}"
            )
        if self.data_fingerprint != other.data_fingerprint:
            diffs.append("the data: its contents changed since the checkpoint")
        return diffs


def checkpoint_dirs(output_dir: str | Path) -> list[Path]:
    """Complete checkpoint folders, newest first (temporary folders are never listed)."""
    root = Path(output_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found, reverse=True)]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_all(paths: list[Path]) -> None:
    """fsync every file at once: the disk serves the requests together (a checkpoint's six files wait about
    as long as two did one after the other), and fsync lets other threads run while it waits."""
    with ThreadPoolExecutor(max_workers=min(8, len(paths))) as pool:
        for _ in pool.map(_fsync_path, paths):
            pass


def _fsync_path(path: Path) -> None:
    """fsync a file, or a folder (its entries: a rename is durable once its folder is synced)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# The main process's checkpoint being published (hashed, synced, renamed, pruned) in the background.
_publishing: Future | None = None
_publisher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="toyaccel-checkpoint")


def save_checkpoint(accelerator, output_dir: str, state: TrainerState, keep_last: int) -> Path:
    """Write a checkpoint of the current step; every process must call this.

    The files are written before this returns, so they hold this step's state; making them durable and
    publishing the folder under its final name (the fsyncs wait on the disk, ~5-10 ms a checkpoint, about
    5% of a small model's epoch) goes on in a thread while training continues. Until then the folder is
    a ``.tmp-`` one that resume never reads, so a crash meanwhile resumes from the checkpoint before.
    ``wait_for_checkpoint`` waits for it; the next checkpoint, the end of training, an interrupt and the
    interpreter's exit do.
    """
    global _publishing
    wait_for_checkpoint()
    root = Path(output_dir) / "checkpoints"
    final = root / f"step_{state.global_step}"
    tmp = root / f".tmp-step_{state.global_step}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)  # left by a crash in an earlier attempt
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    maybe_inject_fault("checkpoint", state.global_step, accelerator.process_index)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        # Every process holds the same global RNG state (same seed, same draws), so one copy serves
        # any number of processes on resume, including a different number.
        save_file({"torch": torch.get_rng_state()}, str(tmp / RNG_FILE))
        # The state as of this step: training goes on changing ``state`` while the thread runs.
        _publishing = _publisher.submit(_publish, tmp, final, dataclasses.replace(state), output_dir, keep_last)
    accelerator.wait_for_everyone()
    return final


def wait_for_checkpoint() -> None:
    """Return once the last checkpoint this process started is published; raise what publishing it raised."""
    global _publishing
    pending, _publishing = _publishing, None
    if pending is not None:
        pending.result()


def _publish(tmp: Path, final: Path, state: TrainerState, output_dir: str, keep_last: int) -> None:
    write_manifest(tmp, state)
    _move_into_place(tmp, final)
    if keep_last:
        # The newest of this timeline: a resumed run has set aside any later ones (set_aside_abandoned).
        for old in checkpoint_dirs(output_dir)[keep_last:]:
            if old != final:
                shutil.rmtree(old, ignore_errors=True)


def write_manifest(folder: Path, state: TrainerState) -> None:
    """Write ``trainer_state.json``: the state and the size and SHA-256 of every file under ``folder``,
    sub-folders included (FSDP's SHARDED_STATE_DICT saves each model and optimizer as a folder); then
    make them all durable. The folder is not a checkpoint until it is renamed, so the manifest needs no
    write-and-rename of its own, and it is synced with the data rather than after it."""
    paths = sorted(p for p in folder.rglob("*") if p.is_file())
    umask = current_umask()
    files = {}
    for path in paths:
        respect_umask(path, umask)
        files[path.relative_to(folder).as_posix()] = {"bytes": path.stat().st_size, "sha256": _sha256(path)}
    manifest = folder / STATE_FILE
    manifest.write_text(json.dumps({**dataclasses.asdict(state), "files": files}, indent=2) + "\n")  # umask's mode
    # accelerate does not fsync what it writes; the rename that publishes the folder must not outlive the data.
    _fsync_all([*paths, manifest])


def _move_into_place(tmp: Path, final: Path) -> None:
    """Rename the finished ``tmp`` to ``final``. A run resumed from an older checkpoint meets the
    folders of its crashed attempt again; those may be damaged, so they are replaced, not kept.
    A crash between the two renames leaves only the older checkpoints, which are whole."""
    old = final.with_name(f".old-{final.name}")
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    _fsync_path(final.parent)
    shutil.rmtree(old, ignore_errors=True)


def verify_checkpoint(path: str | Path) -> TrainerState:
    """Read a checkpoint's state and check every file against its manifest, or say which file is bad."""
    path = Path(path)
    if not path.is_dir():
        raise ToyaccelError(f"checkpoint {path}: no such directory")
    state, manifest = _read_state(path / STATE_FILE)
    for name, (size, digest) in manifest.items():
        f = path / name
        if not f.is_file():
            raise ToyaccelError(f"{f}: missing from checkpoint")
        if f.stat().st_size != size or _sha256(f) != digest:
            raise ToyaccelError(f"{f}: damaged (size or checksum differs from {STATE_FILE})")
    return state


def _read_state(state_file: Path) -> tuple[TrainerState, dict[str, tuple[int, str]]]:
    try:
        raw = json.loads(state_file.read_text())
        manifest = {name: (int(entry["bytes"]), str(entry["sha256"])) for name, entry in raw.pop("files").items()}
        return TrainerState(**raw), manifest
    except FileNotFoundError:
        raise ToyaccelError(f"{state_file}: missing (incomplete checkpoint)") from None
    except OSError as e:
        raise ToyaccelError(f"{state_file}: cannot read: {e.strerror or e}") from None
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        raise ToyaccelError(f"{state_file}: damaged ({type(e).__name__}: {e})") from None


@dataclass
class ResumePlan:
    """Where a run starts: decided once, on the main process, and sent to every process, so that no
    process decides alone (another hostname, or a file system that caches listings, would differ)."""

    resuming: bool = False  # the output folder holds this run: carry on in it, keeping its log up to the start
    checkpoint: str | None = None  # the verified checkpoint to load; None: start at step 0
    state: dict[str, Any] | None = None  # its TrainerState, as a dict

    def trainer_state(self) -> TrainerState | None:
        return TrainerState(**self.state) if self.state is not None else None


def plan_resume(output_dir: str, resume: str | None, expected: TrainerState, restarted: bool, say=print) -> ResumePlan:
    """Decide where to start. ``resume``: None, 'latest', 'auto' or a checkpoint folder; ``restarted``:
    this is an elastic restart of the launch that owns ``output_dir``; ``expected``: this run's state
    at step 0, which a checkpoint must match. Raises ToyaccelError before anything is written."""
    if resume not in (None, "latest", "auto"):
        path, state = Path(resume), verify_checkpoint(resume)
    elif resume or restarted:
        found = newest_complete_checkpoint(output_dir, say)
        if found is None:
            if resume == "latest":
                raise ToyaccelError(f"--resume latest: no complete checkpoint in {Path(output_dir) / 'checkpoints'}")
            # An elastic restart or a requeued job before its first checkpoint starts over in its folder;
            # --resume auto still refuses a folder that holds another run.
            return ResumePlan(resuming=restarted or same_run_in(output_dir, expected))
        path, state = found
    else:
        return ResumePlan()
    diffs = state.differences(expected)
    if diffs:
        raise ToyaccelError(f"{path / STATE_FILE}: cannot resume, this run differs from it: {'; '.join(diffs)}")
    return ResumePlan(resuming=True, checkpoint=str(path), state=dataclasses.asdict(state))


def newest_complete_checkpoint(output_dir: str, say=print) -> tuple[Path, TrainerState] | None:
    """The newest checkpoint that verifies, and its state (hashing a large checkpoint once is enough)."""
    for candidate in checkpoint_dirs(output_dir):
        try:
            return candidate, verify_checkpoint(candidate)
        except ToyaccelError as e:
            say(f"skipping checkpoint {candidate.name}: {e}")
    return None


def same_run_in(output_dir: str, expected: TrainerState) -> bool:
    """Whether ``output_dir`` holds a run with the same training settings (its config.json). config.json
    keeps only the options that are set and apply, so both sides are compared as run_identity puts them."""
    try:
        saved = read_run_config(output_dir)["config"]
        return run_identity(saved) == run_identity(expected.training)
    except (ToyaccelError, KeyError, TypeError, AttributeError):
        return False


def set_aside_abandoned(output_dir: str, start_step: int) -> Path | None:
    """Move the checkpoints after ``start_step`` (the future of an older timeline, which this run
    abandons by starting there) into ``checkpoints/abandoned-<time>/``, so that neither --resume
    latest nor --keep-last ever counts them. Returns that folder, if anything was moved."""
    later = [p for p in checkpoint_dirs(output_dir) if int(STEP_DIR.match(p.name).group(1)) > start_step]
    if not later:
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    for n in itertools.count(1):
        aside = later[0].parent / (f"abandoned-{stamp}" if n == 1 else f"abandoned-{stamp}-{n}")
        with contextlib.suppress(FileExistsError):
            aside.mkdir()
            break
    for path in later:
        os.replace(path, aside / path.name)
    _fsync_path(aside.parent)
    return aside


def _load_accelerate_state(accelerator, path: Path) -> None:
    """``accelerator.load_state``, except where torch cannot load the optimizer: under FSDP with full
    state dicts, torch's ``set_optimizer_state_dict`` asserts ("Expected device to be set") on an
    optimizer that keeps no tensors, such as the book's SGD without momentum. All such an optimizer
    holds is its param_groups (lr, ...), so those are restored from the same file instead."""
    plugin = getattr(accelerator.state, "fsdp_plugin", None)
    full = plugin is not None and getattr(plugin.state_dict_type, "name", None) == "FULL_STATE_DICT"
    optimizers = accelerator._optimizers
    if not (full and optimizers and all(_keeps_no_tensors(o.optimizer) for o in optimizers)):
        accelerator.load_state(str(path))
        return
    accelerator._optimizers = []
    try:
        accelerator.load_state(str(path))
    finally:
        accelerator._optimizers = optimizers
    for index, optimizer in enumerate(optimizers):
        saved = torch.load(path / ("optimizer.bin" if index == 0 else f"optimizer_{index}.bin"), weights_only=True)
        for group, saved_group in zip(optimizer.param_groups, saved["param_groups"], strict=True):
            group.update({k: v for k, v in saved_group.items() if k != "params"})


def _keeps_no_tensors(optimizer: torch.optim.Optimizer) -> bool:
    return isinstance(optimizer, torch.optim.SGD) and all(g["momentum"] == 0 for g in optimizer.param_groups)


def load_checkpoint(accelerator, path: Path, state: TrainerState, expected: TrainerState) -> TrainerState:
    """Restore model, optimizer and RNG from the verified checkpoint ``path`` (whose state is ``state``,
    checked against this run's ``expected`` state by ``plan_resume``)."""
    try:
        _load_accelerate_state(accelerator, path)
        torch.set_rng_state(load_file(str(path / RNG_FILE))["torch"])
        # load_state restores accelerate's micro-step counter, which decides where gradients sync.
        # Checkpoints sit between optimizer steps, so the next micro-step starts a new step whatever
        # --grad-accum this run splits the global batch with.
        accelerator.step = 0
    except Exception as e:  # noqa: BLE001 - the manifest passed, so this is a foreign or corrupt file
        raise ToyaccelError(f"checkpoint {path}: cannot be loaded: {str(e).splitlines()[0]}") from None
    state.world_size = expected.world_size
    return state
