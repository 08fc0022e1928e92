"""Checkpoints: atomic, bounded, verified, and restorable into the exact same training state.

A checkpoint is a folder ``checkpoints/step_<global_step>/`` holding what ``accelerator.save_state``
writes (weights, optimizer, per-process RNG files) plus two files of ours, neither of them a pickle:
``rng_state.safetensors`` (the global torch RNG, which decides each epoch's data order) and
``trainer_state.json`` (where training stands, what it was trained with, and a manifest with the
size and SHA-256 of every file, written last). The state file carries the SHA-256 of its own contents
(``state_sha256``), so no part of a checkpoint is taken on trust: a checkpoint verifies only if every
file in its folder is listed and matches, the listed names stay inside the folder, the files a resume
needs are there, and the state's fields make sense.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
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
from accelerate.utils import gather_object
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from toyaccel.engine.run_dir import current_umask, respect_umask
from toyaccel.errors import ToyaccelError

STATE_FILE = "trainer_state.json"
RNG_FILE = "rng_state.safetensors"
STEP_DIR = re.compile(r"^step_(\d+)$")
# The key of the state file's own checksum: the SHA-256 of its other contents in canonical JSON.
STATE_DIGEST = "state_sha256"
# A manifest of a few thousand shards is ~1 MB; anything far larger is not one of ours.
MAX_STATE_BYTES = 64 << 20
# What accelerate names the files of a model and of an optimizer (model.safetensors, pytorch_model.bin,
# pytorch_model_fsdp_0.bin or a folder of FSDP shards; optimizer.bin, optimizer_0/ ...).
MODEL_PREFIXES = ("model", "pytorch_model")
OPTIMIZER_PREFIX = "optimizer"
SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")
SEED_LIMIT = 1 << 63  # epoch seeds are drawn as non-negative int64


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


class Checkpointer:
    """Writes this run's checkpoints into ``output_dir/checkpoints``, keeping the newest ``keep_last``
    (0: all); ``hooks`` (toyaccel.engine.faults) is called with a checkpoint half written."""

    def __init__(self, accelerator, output_dir: str, keep_last: int, hooks=None):
        self.accelerator, self.output_dir, self.keep_last, self.hooks = accelerator, output_dir, keep_last, hooks

    def save(self, state: TrainerState) -> Path:
        """Write a checkpoint of the current step; every process must call this.

        The files are written before this returns, so they hold this step's state; making them durable and
        publishing the folder under its final name (the fsyncs wait on the disk, ~5-10 ms a checkpoint, about
        5% of a small model's epoch) goes on in a thread while training continues. Until then the folder is
        a ``.tmp-`` one that resume never reads, so a crash meanwhile resumes from the checkpoint before.
        ``wait_for_checkpoint`` waits for it; the next checkpoint, the end of training, an interrupt and the
        interpreter's exit do.

        A checkpoint that cannot be written (a full disk) stops every process with one line (ToyaccelError):
        training on without checkpoints would risk hours for a disk that will not empty itself.
        """
        global _publishing
        accelerator = self.accelerator
        root = Path(self.output_dir) / "checkpoints"
        final = root / f"step_{state.global_step}"
        tmp = root / f".tmp-step_{state.global_step}"
        problem = _unwritable(wait_for_checkpoint)
        if accelerator.is_main_process and problem is None:
            shutil.rmtree(tmp, ignore_errors=True)  # left by a crash in an earlier attempt
            problem = _unwritable(lambda: tmp.mkdir(parents=True), final)
        accelerator.wait_for_everyone()
        if problem is None:
            problem = _unwritable(lambda: accelerator.save_state(str(tmp)), final)
        if self.hooks is not None:
            self.hooks.in_checkpoint(state.global_step)
        if accelerator.is_main_process and problem is None:
            # Every process holds the same global RNG state (same seed, same draws), so one copy serves
            # any number of processes on resume, including a different number.
            rng = {"torch": torch.get_rng_state()}
            problem = _unwritable(lambda: save_file(rng, str(tmp / RNG_FILE)), final)
        # Also the barrier before publishing: every process has written its part by now.
        _raise_if_any(accelerator, problem, tmp)
        if accelerator.is_main_process:
            # The state as of this step: training goes on changing ``state`` while the thread runs.
            snapshot = dataclasses.replace(state)
            _publishing = _publisher.submit(_publish, tmp, final, snapshot, self.output_dir, self.keep_last)
        accelerator.wait_for_everyone()
        return final


def finish_checkpoint(accelerator) -> None:
    """wait_for_checkpoint on every process: where publishing failed, every process stops with its line."""
    _raise_if_any(accelerator, _unwritable(wait_for_checkpoint))


def _raise_if_any(accelerator, problem: str | None, tmp: Path | None = None) -> None:
    problems = [p for p in gather_object([problem]) if p]
    if problems:
        if accelerator.is_main_process and tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)  # the space it took is what the user is short of
        raise ToyaccelError(problems[0], every_process=True)


# Errors that say a file could not be written (torch.save's says only "unexpected pos": the free
# space left tells it apart).
NO_SPACE = ("No space left on device", "Disk quota exceeded", "File too large")


def _unwritable(write, final: Path | None = None) -> str | None:
    """Run ``write``; if the disk refused it, return the one line that says so (None: it worked)."""
    try:
        write()
        return None
    except ToyaccelError as e:  # publishing the previous checkpoint failed: its line is ready
        return str(e)
    except (OSError, RuntimeError, SafetensorError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e).strip().splitlines()[0]
        free = _free_bytes(final.parent if final is not None else Path("."))
        full = isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
        full = full or any(text in reason for text in NO_SPACE) or (free is not None and free < 1 << 20)
        if not (full or isinstance(e, OSError)):
            raise
        what = "the disk is full: " if full else ""
        room = f", {free >> 10} KiB free there" if free is not None else ""
        return (
            f"{what}cannot write checkpoint {final} ({_short(reason, 120)}{room}); the checkpoints before it "
            "are whole: make room, then run the same command with --resume latest"
        )


def _free_bytes(folder: Path) -> int | None:
    for candidate in (folder, *folder.parents):
        try:
            st = os.statvfs(candidate)
        except OSError:
            continue
        return st.f_bfree * st.f_frsize if os.geteuid() == 0 else st.f_bavail * st.f_frsize
    return None


def _short(text: str, limit: int = 200) -> str:
    """One line of at most ``limit`` characters: a damaged file must not flood or split the message."""
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def wait_for_checkpoint() -> None:
    """Return once the last checkpoint this process started is published; raise what publishing it raised."""
    global _publishing
    pending, _publishing = _publishing, None
    if pending is not None:
        pending.result()


def _publish(tmp: Path, final: Path, state: TrainerState, output_dir: str, keep_last: int) -> None:
    problem = _unwritable(lambda: (write_manifest(tmp, state), _move_into_place(tmp, final)), final)
    if problem:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ToyaccelError(problem)
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
    paths = sorted(p for p in folder.rglob("*") if p.is_file() and p != folder / STATE_FILE)
    umask = current_umask()
    files = {}
    for path in paths:
        respect_umask(path, umask)
        files[path.relative_to(folder).as_posix()] = {"bytes": path.stat().st_size, "sha256": _sha256(path)}
    manifest = folder / STATE_FILE
    body = {**dataclasses.asdict(state), "files": files}
    body[STATE_DIGEST] = _state_digest(json.loads(json.dumps(body)))  # hashed as it will be read back
    manifest.write_text(json.dumps(body, indent=2) + "\n")  # umask's mode
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


def _state_digest(body: dict[str, Any]) -> str:
    """The SHA-256 of a state file's contents without its own checksum, in one canonical form (key
    order and spacing do not count: the numbers and names do)."""
    rest = {k: v for k, v in body.items() if k != STATE_DIGEST}
    return hashlib.sha256(json.dumps(rest, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


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
