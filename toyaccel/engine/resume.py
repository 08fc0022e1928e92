"""Which checkpoint a run resumes from: each one verified whole against its manifest, its state checked
for sense and against this run, before anything is loaded or written."""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from toyaccel.engine.checkpoint import (
    MAX_STATE_BYTES,
    MODEL_PREFIXES,
    OPTIMIZER_PREFIX,
    RNG_FILE,
    SEED_LIMIT,
    SHA256_HEX,
    STATE_DIGEST,
    STATE_FILE,
    STEP_DIR,
    TrainerState,
    _sha256,
    _short,
    _state_digest,
    checkpoint_dirs,
)
from toyaccel.engine.run_dir import read_config_json, restart_of_owning_launch
from toyaccel.errors import ToyaccelError


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
    max_steps = state.training.get("max_steps")
    if _is_int(max_steps) and 0 < max_steps < state.global_step:
        raise ValueError(f"global_step {state.global_step} is past the run's {max_steps} steps (max_steps)")
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


def plan_resume(config, expected: TrainerState, steps_per_epoch: int | None, say, identity=dict) -> ResumePlan:
    """Decide where to start, on the main process only (see on_main_process): every process then follows
    the same plan. ``config.resume``: None, 'latest', 'auto' or a checkpoint folder; ``expected``: this
    run's state at step 0, which a checkpoint must match; ``steps_per_epoch``: this run's, which a
    checkpoint's position must agree with; ``identity``: what of a run's training options makes it the same
    run (toyaccel.config.run_identity). Raises ToyaccelError before anything is written."""
    output_dir, resume = config.output_dir, config.resume
    # An elastic restart of the launch that owns the folder carries on in it.
    restarted = resume is None and restart_of_owning_launch(output_dir)
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
            return ResumePlan(resuming=restarted or same_run_in(output_dir, expected, identity))
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


def same_run_in(output_dir: str, expected: TrainerState, identity: Callable[[dict], Any]) -> bool:
    """Whether ``output_dir`` holds a run with the same training settings (its config.json). config.json
    keeps only the options that are set and apply, so both sides are compared as ``identity`` puts them."""
    try:
        saved = read_config_json(output_dir)["config"]
        return identity(saved) == identity(expected.training)
    except (ToyaccelError, KeyError, TypeError, AttributeError):
        return False
