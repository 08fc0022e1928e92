"""The GPT's training samples: chapter 5's windows of ``context_length`` token ids taken every ``stride``
tokens, each with the window shifted by one token as its targets (the book's GPTDatasetV1).

Tokenizing happens once per machine: the first process to take a file lock tokenizes and caches the
ids; the others (and later runs on the same text) read the cache.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from toyaccel.errors import ToyaccelError
from toyaccel.workloads.gpt.text import best_possible_loss, read_text, source_text, split_text
from toyaccel.workloads.gpt.token_ids import compact, encode_compact
from toyaccel.workloads.gpt.tokenizers import BPETokenizer, ByteTokenizer, GPT2Tokenizer

# ---------------------------------------------------------------------------------------------
# Tokenizing once, with a cache


def cache_dir() -> Path:
    root = (
        os.environ.get("TOYACCEL_CACHE_DIR")
        or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "toyaccel"
    )
    return Path(root) / "tokens"


@contextlib.contextmanager
def file_lock(path: Path):
    """One process at a time per machine (the others wait), released even if the holder dies."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def tokenize(kind: str, vocab_size: int, train_text: str, val_text: str | None, given=None):
    """The tokenizer and the ids of both texts, computed by the first process and cached for the rest.
    ``given``: a ready tokenizer (an --init-from folder's) used as it is, instead of one trained here."""
    if kind == "bytes":  # nothing to learn and nothing slow: no cache
        train = torch.frombuffer(bytearray(train_text.encode("utf-8")), dtype=torch.uint8)
        val = torch.frombuffer(bytearray(val_text.encode("utf-8")), dtype=torch.uint8) if val_text else None
        return ByteTokenizer(torch.bincount(train, minlength=256).nonzero().flatten().tolist()), train, val
    h = hashlib.sha256(f"{kind}\0{vocab_size}\0{len(train_text)}\0".encode())
    h.update(train_text.encode("utf-8"))
    h.update(b"\0" + (val_text or "").encode("utf-8"))
    if given is not None:
        h.update(b"\0" + given.to_json().encode("utf-8"))
    folder = cache_dir() / h.hexdigest()[:32]
    try:
        with file_lock(folder.with_suffix(".lock")):
            if not (folder / "tokens.safetensors").exists():
                write_cache(folder, kind, vocab_size, train_text, val_text, given)
            tokens = load_file(str(folder / "tokens.safetensors"))
            tokenizer = (
                GPT2Tokenizer() if kind == "gpt2" else BPETokenizer.from_str((folder / "tokenizer.json").read_text())
            )
    except OSError as e:
        raise ToyaccelError(
            f"cannot use the token cache {folder} (set TOYACCEL_CACHE_DIR): {e.strerror or e}"
        ) from None
    # A cache written before tokens were kept compactly holds int64.
    return tokenizer, *(compact(tokens[k], tokenizer.size) if k in tokens else None for k in ("train", "val"))


def write_cache(folder: Path, kind: str, vocab_size: int, train_text: str, val_text: str | None, given=None) -> None:
    tokenizer = given or (GPT2Tokenizer() if kind == "gpt2" else BPETokenizer.train(train_text, vocab_size))
    tokens = {"train": encode_compact(tokenizer, train_text)}
    if val_text:
        tokens["val"] = encode_compact(tokenizer, val_text)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)  # left by a process that died here
    tmp.mkdir(parents=True)
    (tmp / "tokenizer.json").write_text(tokenizer.to_json())
    save_file(tokens, str(tmp / "tokens.safetensors"))
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)


# ---------------------------------------------------------------------------------------------
# Windows


class TextWindows:
    """The book's GPTDatasetV1 over a token tensor: window i is ids[s:s+L], its targets ids[s+1:s+L+1],
    s = i * stride. ``__getitems__`` gathers a whole batch with one index (as the MLP's ToyDataset does)."""

    def __init__(self, tokens: torch.Tensor, context_length: int, stride: int):
        self.tokens = tokens
        self.context_length = context_length
        # The book's range(0, len(ids) - max_length, stride): every window has its next-token targets.
        self.starts = torch.arange(0, max(0, tokens.numel() - context_length), stride)
        self.offsets = torch.arange(context_length + 1)

    def __len__(self) -> int:
        return self.starts.numel()

    @property
    def num_tokens(self) -> int:
        return self.tokens.numel()

    def __getitem__(self, index):
        inputs, targets = self.__getitems__([index])
        return inputs[0], targets[0]

    def __getitems__(self, indices):
        # The sampler's indices are already where the tokens are (on a GPU: toyaccel.engine.placement); lists move.
        indices = torch.as_tensor(indices, dtype=torch.long, device=self.starts.device)
        rows = self.tokens[self.starts[indices].unsqueeze(1) + self.offsets].long()  # kept compactly, read as int64
        return rows[:, :-1], rows[:, 1:]


@dataclass
class TextBundle:
    train: TextWindows
    val: TextWindows | None
    tokenizer: Any
    source: str
    best_loss: float | None = None  # see best_possible_loss

    def fingerprint(self) -> str:
        """Changes when any training or validation token, or the tokenizer, changes."""
        h = hashlib.sha256(self.tokenizer.to_json().encode())
        for ds in (self.train, self.val):
            if ds is not None:
                for part in ds.tokens.split(1 << 22):  # as int64, as before tokens were kept compactly
                    h.update(part.long().numpy().tobytes())
                h.update(f"{ds.context_length}:{ds.starts[1:2].tolist()}".encode())
        return h.hexdigest()[:16]


def load_text_data(config, tokenizer=None) -> TextBundle:
    """Training and validation windows for a ``--model gpt`` config; ToyaccelError on any bad input.
    ``tokenizer``: a ready one (an --init-from folder's) rather than the one --tokenizer makes."""
    text = source_text(config.data, config.num_samples, config.seed)
    source = "the synthetic text" if config.data == "synthetic" else config.data
    train_text, val_text = split_text(text, config.val_fraction)
    if config.val_data:
        val_text = read_text(config.val_data)
    tokenizer, train_ids, val_ids = tokenize(config.tokenizer, config.vocab_size, train_text, val_text, tokenizer)
    largest = max(int(ids.max()) for ids in (train_ids, val_ids) if ids is not None and ids.numel())
    if largest >= config.vocab_size:
        raise ToyaccelError(
            f"the {tokenizer.kind} tokenizer gives token id {largest}, beyond the model's vocab_size of "
            f"{config.vocab_size}; raise --vocab-size"
        )
    train = windows(train_ids, config, f"{source} (training part)")
    val = windows(val_ids, config, f"{config.val_data or source} (validation part)") if val_ids is not None else None
    return TextBundle(train, val, tokenizer, source, best_possible_loss(config))


def windows(ids: torch.Tensor, config, what: str) -> TextWindows:
    ds = TextWindows(ids, config.context_length, config.stride)
    if len(ds) == 0:
        raise ToyaccelError(
            f"{what} is {ids.numel()} tokens, too short for one window of context_length {config.context_length} "
            f"plus its next-token target; give more text or lower --context-length"
        )
    return ds
