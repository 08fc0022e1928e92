"""Token shards: a corpus tokenized once into memory-mapped files, for corpora bigger than memory.

``toyaccel-prepare SOURCE OUT_DIR`` streams a text file, a folder of ``.txt`` files or JSON Lines through
a tokenizer into ``train_000000.bin``, ... and ``val_000000.bin``, ... (raw token ids, uint16 where the
vocabulary fits, else uint32, as nanoGPT's ``train.bin``) and writes ``manifest.json`` (tokenizer, token
counts, largest id and SHA-256 per shard) last. Training reads only what the manifest lists, so a killed
prepare leaves nothing a training run would read; running it again continues after the last whole shard.
Training opens the shards with ``numpy.memmap``: memory does not grow with the corpus, and start-up
checks the shards' sizes against the manifest without reading them (checksums: ``--verify``).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from toyaccel.engine.faults import maybe_inject_fault
from toyaccel.errors import ToyaccelError

MANIFEST = "manifest.json"
PROGRESS = "progress.json"  # a prepare under way: the settings and the whole shards so far
FORMAT = "toyaccel-shards"
BLOCK_BYTES = 1 << 20  # text tokenized per batch: a block of whole lines (or one JSON Lines record)
BATCH_BLOCKS = 16  # blocks per encode_batch call, which spreads them over every core
END_OF_TEXT = "<|endoftext|>"  # between documents (files, records), for the tokenizers that have it


# ---------------------------------------------------------------------------------------------
# Reading the source, a block at a time


def regular_file(path: Path) -> Path:
    if not path.is_file():
        raise ToyaccelError(f"{path}: {'not a regular file' if path.exists() else 'no such file'}")
    return path


def source_files(source: str) -> list[Path]:
    path = Path(source)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in (".txt", ".jsonl") and p.is_file())
        if not files:
            raise ToyaccelError(f"{source}: a folder without .txt or .jsonl files")
        return files
    return [regular_file(path)]


def blocks(files: list[Path], text_field: str) -> Iterator[tuple[str, int, bool]]:
    """(text, byte offset in the whole source, ends a document) for every block, in order."""
    offset = 0
    for f in files:
        try:
            with f.open("rb") as stream:
                if f.suffix == ".jsonl":
                    for number, line in enumerate(stream, 1):
                        if line.strip():
                            yield record_text(f, number, line, text_field), offset, True
                        offset += len(line)
                    continue
                # One block held back, so that the file's last block is the one that ends the document.
                held, pending = None, b""
                while chunk := stream.read(BLOCK_BYTES):
                    chunk, pending = pending + chunk, b""
                    cut = chunk.rfind(b"\n") + 1
                    if 0 < cut < len(chunk):  # whole lines only: a character never spans two blocks
                        chunk, pending = chunk[:cut], chunk[cut:]
                    if held is not None:
                        yield decode(f, held), offset, False
                        offset += len(held)
                    held = chunk
                for last, block in ((False, held), (True, pending)) if pending else ((True, held),):
                    if block is not None:
                        yield decode(f, block), offset, last
                        offset += len(block)
        except OSError as e:
            raise ToyaccelError(f"{f}: cannot read: {e.strerror or e}") from None


def decode(path: Path, chunk: bytes) -> str:
    try:
        return chunk.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ToyaccelError(f"{path}: not UTF-8 text (byte {e.start} of a block cannot be decoded)") from None


def record_text(path: Path, number: int, line: bytes, text_field: str) -> str:
    try:
        record = json.loads(line)
    except ValueError:
        raise ToyaccelError(f"{path}: line {number} is not JSON") from None
    text = record.get(text_field) if isinstance(record, dict) else None
    if not isinstance(text, str):
        raise ToyaccelError(f"{path}: line {number} has no text field {text_field!r} (set --text-field)")
    return text


# ---------------------------------------------------------------------------------------------
# Writing shards


@dataclass
class ShardWriter:
    """Token ids of one split into shards of about ``shard_tokens`` (cut after a whole batch, so a restart
    knows where the next shard begins); each written as a temporary file and renamed whole."""

    folder: Path
    split: str
    dtype: np.dtype
    shard_tokens: int
    shards: list[dict[str, Any]]

    def __post_init__(self):
        self.pending: list[np.ndarray] = []
        self.count = 0

    def add(self, ids: np.ndarray) -> None:
        self.pending.append(ids.astype(self.dtype, copy=False))
        self.count += ids.size

    def flush(self, final: bool = False) -> bool:
        if not self.count or (self.count < self.shard_tokens and not final):
            return False
        tokens = np.concatenate(self.pending)
        name = f"{self.split}_{len(self.shards):06d}.bin"
        tmp = self.folder / f".tmp-{name}"
        with tmp.open("wb") as f:
            tokens.tofile(f)
            f.flush()
            os.fsync(f.fileno())
        maybe_inject_fault("prepare", len(self.shards), 0)  # a kill with a shard half published
        os.replace(tmp, self.folder / name)
        digest = hashlib.sha256(tokens.tobytes()).hexdigest()
        self.shards.append({"file": name, "tokens": int(tokens.size), "max_id": int(tokens.max()), "sha256": digest})
        self.pending, self.count = [], 0
        return True


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


def write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w") as f:
        f.write(json.dumps(obj, indent=2) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------
# Reading shards for training


@dataclass
class Shard:
    path: Path
    tokens: int


def read_manifest(folder: str | Path) -> dict[str, Any]:
    """A prepared folder's manifest, or nanoGPT's ``train.bin``/``val.bin`` (raw uint16) described as one."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.exists() and (folder / "train.bin").is_file():
        splits = {}
        for split in ("train", "val"):
            f = folder / f"{split}.bin"
            if f.is_file():
                splits[split] = [{"file": f.name, "tokens": f.stat().st_size // 2}]
        return {"format": "nanogpt", "dtype": "uint16", "tokenizer": None, **splits}
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        hint = " (a prepare that did not finish: run it again)" if (folder / PROGRESS).exists() else ""
        raise ToyaccelError(f"{path}: no such file{hint}") from None
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise ToyaccelError(f"{path}: damaged ({type(e).__name__})") from None
    if not (isinstance(manifest, dict) and manifest.get("format") == FORMAT and manifest.get("dtype") in ("uint16",
                                                                                                         "uint32")):
        raise ToyaccelError(f"{path}: not a toyaccel shard manifest")
    return manifest


def is_shard_folder(data: str | None) -> bool:
    """Whether ``--data`` names prepared shards: a folder with a manifest, or nanoGPT's train.bin."""
    if not data or data in ("synthetic", "toy"):
        return False
    folder = Path(data)
    return folder.is_dir() and ((folder / MANIFEST).is_file() or (folder / "train.bin").is_file())


def shard_defaults(data: str | None) -> dict[str, Any]:
    """The options a shard folder decides when left unset: its tokenizer, vocabulary and split. Empty for
    anything else, or a manifest that cannot be read (loading the data names what is wrong with it)."""
    if not is_shard_folder(data):
        return {}
    try:
        manifest = read_manifest(data)
    except ToyaccelError:
        return {}
    if manifest["format"] == "nanogpt":  # GPT-2's tiktoken ids, as nanoGPT's prepare.py writes them
        return {"tokenizer": "gpt2", "vocab_size": 50257, "val_fraction": 0.0}
    tokenizer = manifest.get("tokenizer") or {}
    defaults = {"tokenizer": tokenizer.get("type"), "vocab_size": manifest.get("vocab_size"),
                "val_fraction": manifest.get("val_fraction")}  # fmt: skip
    return {name: value for name, value in defaults.items() if value is not None}


def manifest_fingerprint(manifest: dict[str, Any]) -> str:
    """What identifies a shard folder's tokens for a resume, from its manifest alone (its checksums and
    counts; nanoGPT's files, which have none: their names and sizes): start-up reads no token."""
    kept = {key: manifest.get(key) for key in ("format", "dtype", "tokenizer", "train", "val", "windows")}
    return hashlib.sha256(json.dumps(kept, sort_keys=True).encode()).hexdigest()


def split_shards(folder: str | Path, manifest: dict[str, Any], split: str) -> list[Shard]:
    """The shards of ``split``, each found with the size its manifest gives (no reading: start-up stays
    the same for any corpus size)."""
    folder = Path(folder)
    itemsize = np.dtype(manifest["dtype"]).itemsize
    shards = []
    for entry in manifest.get(split) or []:
        name = str(entry.get("file", ""))
        path = folder / name
        if Path(name).name != name or not name:
            raise ToyaccelError(f"{folder / MANIFEST}: shard name {name!r} is not a file of its folder")
        if not path.is_file():
            raise ToyaccelError(f"{path}: missing (listed in {MANIFEST})")
        if path.stat().st_size != int(entry["tokens"]) * itemsize:
            raise ToyaccelError(
                f"{path}: {path.stat().st_size} bytes, {MANIFEST} says {int(entry['tokens']) * itemsize} (truncated?)"
            )
        shards.append(Shard(path, int(entry["tokens"])))
    return shards


def verify_shards(folder: str | Path) -> None:
    """Every shard's SHA-256 against the manifest (reads the whole corpus once)."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    for split in ("train", "val"):
        split_shards(folder, manifest, split)
        for entry in manifest.get(split) or []:
            h = hashlib.sha256()
            with (folder / entry["file"]).open("rb") as f:
                while chunk := f.read(1 << 24):
                    h.update(chunk)
            if "sha256" in entry and h.hexdigest() != entry["sha256"]:
                raise ToyaccelError(f"{folder / entry['file']}: damaged (checksum differs from {MANIFEST})")


class ShardWindows:
    """The book's GPTDatasetV1 over token shards: windows of ``context_length`` ids every ``stride`` ids
    inside each shard, with the next ids as targets. ``maps`` views every shard through a memory map;
    ``__getitems__`` reads just a batch's windows, each with one ``pread`` from the page cache. Not through
    the maps: a fault on a mapped shard maps a whole page-cache folio (up to 2 MB on ext4 here, measured
    with MADV_RANDOM set too), so a process that sampled windows from a large corpus would count hundreds
    of MB of it in its RSS."""

    def __init__(self, shards: list[Shard], dtype: str, context_length: int, stride: int,
                 check_below: int | None = None):  # fmt: skip
        self.context_length, self.stride = context_length, stride
        # Ids no manifest vouches for (nanoGPT's files) are checked batch by batch against the vocabulary.
        self.check_below = check_below
        self.paths = [s.path for s in shards]
        self.dtype = np.dtype(dtype)
        self.maps = [np.memmap(s.path, dtype=dtype, mode="r", shape=(s.tokens,)) for s in shards]
        # The book's range(0, len(ids) - max_length, stride), per shard.
        counts = [max(0, -(-(s.tokens - context_length) // stride)) for s in shards]
        self.first = np.cumsum([0, *counts])
        self.num_tokens = sum(s.tokens for s in shards)
        self._files: tuple[int, list[int]] | None = None  # (pid, descriptors): opened by each process

    def __getstate__(self):  # a copy (copy.copy, a spawned worker) opens its own descriptors
        return {**self.__dict__, "_files": None}

    def __del__(self):
        if getattr(self, "_files", None) and self._files[0] == os.getpid():
            for fd in self._files[1]:
                os.close(fd)

    def descriptors(self) -> list[int]:
        if self._files is None or self._files[0] != os.getpid():
            self._files = (os.getpid(), [os.open(path, os.O_RDONLY) for path in self.paths])
        return self._files[1]

    def __len__(self) -> int:
        return int(self.first[-1])

    def __getitem__(self, index):
        inputs, targets = self.__getitems__([index])
        return inputs[0], targets[0]

    def __getitems__(self, indices):
        indices = np.asarray(torch.as_tensor(indices, dtype=torch.long).cpu())
        shard_of = np.searchsorted(self.first, indices, side="right") - 1
        offsets = (indices - self.first[shard_of]) * self.stride * self.dtype.itemsize
        width = (self.context_length + 1) * self.dtype.itemsize
        files = self.descriptors()
        raw = b"".join(os.pread(files[k], width, int(at)) for k, at in zip(shard_of, offsets))
        rows = np.frombuffer(raw, dtype=self.dtype).reshape(indices.size, self.context_length + 1)
        if self.check_below is not None and rows.size and rows.max() >= self.check_below:
            k = shard_of[int(np.argmax(rows.max(axis=1)))]
            raise ToyaccelError(
                f"{self.paths[k]}: token id {int(rows.max())} is beyond the model's vocab_size "
                f"of {self.check_below}; raise --vocab-size"
            )
        rows = torch.from_numpy(rows.astype(np.int64))
        return rows[:, :-1], rows[:, 1:]
