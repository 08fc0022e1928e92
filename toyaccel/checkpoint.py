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
import functools
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

from toyaccel.config import run_identity
from toyaccel.errors import ToyaccelError
from toyaccel.faults import maybe_inject_fault
from toyaccel.outputs import current_umask, read_run_config, respect_umask

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


def save_checkpoint(accelerator, output_dir: str, state: TrainerState, keep_last: int) -> Path:
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
    root = Path(output_dir) / "checkpoints"
    final = root / f"step_{state.global_step}"
    tmp = root / f".tmp-step_{state.global_step}"
    problem = _unwritable(wait_for_checkpoint)
    if accelerator.is_main_process and problem is None:
        shutil.rmtree(tmp, ignore_errors=True)  # left by a crash in an earlier attempt
        problem = _unwritable(lambda: tmp.mkdir(parents=True), final)
    accelerator.wait_for_everyone()
    if problem is None:
        problem = _unwritable(lambda: accelerator.save_state(str(tmp)), final)
    maybe_inject_fault("checkpoint", state.global_step, accelerator.process_index)
    if accelerator.is_main_process and problem is None:
        # Every process holds the same global RNG state (same seed, same draws), so one copy serves
        # any number of processes on resume, including a different number.
        problem = _unwritable(lambda: save_file({"torch": torch.get_rng_state()}, str(tmp / RNG_FILE)), final)
    # Also the barrier before publishing: every process has written its part by now.
    _raise_if_any(accelerator, problem, tmp)
    if accelerator.is_main_process:
        # The state as of this step: training goes on changing ``state`` while the thread runs.
        _publishing = _publisher.submit(_publish, tmp, final, dataclasses.replace(state), output_dir, keep_last)
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


def verify_checkpoint(path: str | Path, say=None) -> TrainerState:
    """Read a checkpoint's state and check every file against its manifest, or say what is wrong
    (ToyaccelError). ``say``, if given, is told when the state has no checksum of its own (a checkpoint
    written before toyaccel kept one: its fields are then checked for sense only)."""
    path = Path(path)
    if not path.is_dir():
        raise ToyaccelError(f"checkpoint {path}: no such directory")
    state_file = path / STATE_FILE
    state, manifest, checked = _read_state(state_file)
    if not checked and say is not None:
        say(f"checkpoint {path.name} comes from an older toyaccel: {STATE_FILE} has no checksum of its own, "
            "so its fields were checked for sense only")  # fmt: skip
    if (m := STEP_DIR.match(path.name)) and int(m.group(1)) != state.global_step:
        raise ToyaccelError(f"{state_file}: damaged (global_step {state.global_step} in folder {path.name})")
    _check_required_files(state_file, manifest, state.world_size)
    on_disk = _files_on_disk(path)
    for name, (size, digest) in manifest.items():
        f = path / name
        if name not in on_disk:
            raise ToyaccelError(f"{f}: missing from checkpoint")
        if f.stat().st_size != size or _sha256(f) != digest:
            raise ToyaccelError(f"{f}: damaged (size or checksum differs from {STATE_FILE})")
    unlisted = sorted(set(on_disk) - set(manifest) - {STATE_FILE})
    if unlisted:
        raise ToyaccelError(f"{path / unlisted[0]}: not listed in {STATE_FILE} (a checkpoint holds only its own files)")
    return state


def _files_on_disk(folder: Path) -> set[str]:
    """The regular files under ``folder``, as manifest names; a link or anything but a file or folder
    is damage (a checkpoint never holds one, and a link could lead anywhere)."""
    found = set()
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            entry = Path(root) / name
            if entry.is_symlink() or not (entry.is_dir() or entry.is_file()):
                raise ToyaccelError(f"{entry}: damaged (a link or special file; a checkpoint holds only its own files)")
        found.update((Path(root) / name).relative_to(folder).as_posix() for name in files)
    return found


def _check_required_files(state_file: Path, manifest: dict[str, tuple[int, str]], world_size: int) -> None:
    """A manifest must list what a resume loads: without a file, accelerate would quietly load less."""
    tops = {name.split("/")[0] for name in manifest}
    needed = {
        "the model's weights": any(t.startswith(MODEL_PREFIXES) for t in tops),
        "the optimizer's state": any(t.startswith(OPTIMIZER_PREFIX) for t in tops),
        RNG_FILE: RNG_FILE in tops,
        **{f"random_states_{rank}.pkl": f"random_states_{rank}.pkl" in tops for rank in range(world_size)},
    }
    missing = [what for what, listed in needed.items() if not listed]
    if missing:
        raise ToyaccelError(f"{state_file}: damaged (its manifest does not list {', '.join(missing)})")


def _read_state(state_file: Path) -> tuple[TrainerState, dict[str, tuple[int, str]], bool]:
    """The state, its manifest, and whether the file carried its own checksum (and it matched)."""
    try:
        if state_file.is_symlink() or not state_file.is_file():
            if not state_file.exists() and not state_file.is_symlink():
                raise FileNotFoundError
            raise ValueError("not a plain file")
        with open(state_file, "rb") as f:
            text = f.read(MAX_STATE_BYTES + 1)
        if len(text) > MAX_STATE_BYTES:
            raise ValueError(f"larger than {MAX_STATE_BYTES >> 20} MiB")
        raw = json.loads(text)
        if not isinstance(raw, dict):
            raise ValueError(f"a JSON {type(raw).__name__}, not an object")
        digest = raw.pop(STATE_DIGEST, None)
        if digest is not None and digest != _state_digest(raw):
            raise ValueError("its contents do not match its checksum: edited or corrupted")
        manifest = _read_manifest(raw.pop("files", None))
        state = _valid_state(raw)
        return state, manifest, digest is not None
    except FileNotFoundError:
        raise ToyaccelError(f"{state_file}: missing (incomplete checkpoint)") from None
    except OSError as e:
        raise ToyaccelError(f"{state_file}: cannot read: {e.strerror or e}") from None
    except RecursionError:
        raise ToyaccelError(f"{state_file}: damaged (nested too deeply)") from None
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        raise ToyaccelError(f"{state_file}: damaged ({_short(str(e))})") from None


def _short(text: str, limit: int = 200) -> str:
    """One line of at most ``limit`` characters: a damaged file must not flood or split the message."""
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _read_manifest(files: Any) -> dict[str, tuple[int, str]]:
    """``files`` as {name: (bytes, sha256)}; every name a plain relative path inside the checkpoint."""
    if not isinstance(files, dict):
        raise ValueError(f"'files' is {_kind(files)}, not a manifest")
    manifest = {}
    for name, entry in files.items():
        parts = name.split("/")
        if not name or name.startswith("/") or any(p in ("", ".", "..") for p in parts) or "\\" in name or "\0" in name:
            raise ValueError(f"its manifest names {name[:100]!r}, not a file inside the checkpoint")
        if name == STATE_FILE:
            raise ValueError(f"its manifest lists {STATE_FILE} itself")
        if not (isinstance(entry, dict) and set(entry) == {"bytes", "sha256"}):
            raise ValueError(f"manifest entry {name[:100]!r} is not {{bytes, sha256}}")
        size, digest = entry["bytes"], entry["sha256"]
        if not (_is_int(size) and size >= 0 and isinstance(digest, str) and SHA256_HEX.match(digest)):
            raise ValueError(f"manifest entry {name[:100]!r} holds no size and SHA-256")
        manifest[name] = (size, digest)
    return manifest


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _kind(value: Any) -> str:
    return "null" if value is None else f"a {type(value).__name__}"


def _valid_state(raw: dict[str, Any]) -> TrainerState:
    """A TrainerState from a state file's fields, each of the right type and in range."""
    names = {f.name for f in dataclasses.fields(TrainerState)}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise ValueError(f"unknown field {unknown[0][:100]!r}")
    state = TrainerState(**raw)

    def whole(name: str, least: int, value: Any = None) -> int:
        value = getattr(state, name) if value is None else value
        if not (_is_int(value) and value >= least):
            raise ValueError(f"{name}: {_short(repr(value), 60)} is not a whole number >= {least}")
        return value

    for name in ("epoch", "step_in_epoch", "global_step"):
        whole(name, 0)
    whole("global_batch", 1)
    whole("world_size", 1)
    for name in ("epoch_seed", "next_epoch_seed"):
        value = getattr(state, name)
        if value is not None and not (_is_int(value) and 0 <= value < SEED_LIMIT):
            raise ValueError(f"{name}: {_short(repr(value), 60)} is not a seed (a whole number in [0, 2**63))")
    for name, kind in (("training", dict), ("model_shape", dict), ("data_fingerprint", str)):
        if not isinstance(getattr(state, name), kind):
            raise ValueError(f"{name} is {_kind(getattr(state, name))}, not a {kind.__name__}")
    if state.step_in_epoch > state.global_step:
        raise ValueError(f"step_in_epoch {state.step_in_epoch} is past global_step {state.global_step}")
    if state.step_in_epoch and state.epoch_seed is None:
        raise ValueError(f"step_in_epoch {state.step_in_epoch} with no epoch_seed")
    epochs = state.training.get("epochs")
    if _is_int(epochs) and (state.epoch > epochs or (state.epoch == epochs and state.step_in_epoch)):
        raise ValueError(f"epoch {state.epoch}, step {state.step_in_epoch} of it, is past the run's {epochs} epochs")
    return state


def check_position(state_file: Path, state: TrainerState, steps_per_epoch: int) -> None:
    """That the checkpoint's epoch, step in it and global step agree with this run's epoch length
    (asked once the checkpoint is known to be of this run: same data, same global batch)."""
    position = state.epoch * steps_per_epoch + state.step_in_epoch
    if state.global_step != position or state.step_in_epoch > steps_per_epoch:
        raise ToyaccelError(
            f"{state_file}: damaged (epoch {state.epoch}, step_in_epoch {state.step_in_epoch} and global_step "
            f"{state.global_step} disagree with this run's {steps_per_epoch} steps an epoch)"
        )


@dataclass
class ResumePlan:
    """Where a run starts: decided once, on the main process, and sent to every process, so that no
    process decides alone (another hostname, or a file system that caches listings, would differ)."""

    resuming: bool = False  # the output folder holds this run: carry on in it, keeping its log up to the start
    checkpoint: str | None = None  # the verified checkpoint to load; None: start at step 0
    state: dict[str, Any] | None = None  # its TrainerState, as a dict

    def trainer_state(self) -> TrainerState | None:
        return TrainerState(**self.state) if self.state is not None else None


def plan_resume(
    output_dir: str, resume: str | None, expected: TrainerState, restarted: bool, say=print, steps_per_epoch=None
) -> ResumePlan:
    """Decide where to start. ``resume``: None, 'latest', 'auto' or a checkpoint folder; ``restarted``:
    this is an elastic restart of the launch that owns ``output_dir``; ``expected``: this run's state
    at step 0, which a checkpoint must match; ``steps_per_epoch``: this run's, which a checkpoint's
    position must agree with. Raises ToyaccelError before anything is written."""
    check = functools.partial(verify_for_run, expected=expected, steps_per_epoch=steps_per_epoch, say=say)
    if resume not in (None, "latest", "auto"):
        path, state = Path(resume), check(resume)
    elif resume or restarted:
        found = newest_complete_checkpoint(output_dir, say, check)
        if found is None:
            root = Path(output_dir) / "checkpoints"
            if resume == "latest":
                raise ToyaccelError(f"--resume latest: no complete checkpoint in {root}")
            if checkpoint_dirs(output_dir):
                # Starting over would set those aside and empty the log, on the word of files that failed.
                raise ToyaccelError(
                    f"{root}: no checkpoint there verifies (see above), so this run neither resumes nor starts "
                    "over on top of them; resume from a checkpoint you trust with --resume PATH, or start afresh "
                    "with --overwrite"
                )
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


def verify_for_run(
    path: str | Path, expected: TrainerState, steps_per_epoch: int | None = None, say=None
) -> TrainerState:
    """verify_checkpoint, and where the checkpoint is of this run, that its position fits this run's epochs."""
    state = verify_checkpoint(path, say)
    if steps_per_epoch and not state.differences(expected):
        check_position(Path(path) / STATE_FILE, state, steps_per_epoch)
    return state


def newest_complete_checkpoint(
    output_dir: str, say=print, verify=verify_checkpoint
) -> tuple[Path, TrainerState] | None:
    """The newest checkpoint that verifies, and its state (hashing a large checkpoint once is enough)."""
    for candidate in checkpoint_dirs(output_dir):
        try:
            return candidate, verify(candidate)
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
