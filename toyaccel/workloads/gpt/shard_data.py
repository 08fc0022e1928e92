"""Training the GPT from prepared token shards (``--data SHARD_FOLDER``): toyaccel-prepare's folder or
nanoGPT's ``train.bin``/``val.bin``, read through memory maps.

Start-up reads the manifest and the shards' sizes, never their tokens: memory and start-up time stay the
same for any corpus size. The manifest also identifies the data for a resume, and its largest ids are
checked against the model's vocabulary; nanoGPT's files, which have no manifest, are checked batch by
batch. Checksums are read by ``--verify-data`` only (a pass over the whole corpus).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from toyaccel.errors import ToyaccelError
from toyaccel.workloads.gpt.shards import (
    MANIFEST,
    ShardWindows,
    manifest_fingerprint,
    read_manifest,
    split_shards,
    verify_shards,
)
from toyaccel.workloads.gpt.tokenizers import BPETokenizer, ByteTokenizer, GPT2Tokenizer


@dataclass
class ShardBundle:
    """What load_text_data's TextBundle holds, over memory-mapped shards."""

    train: ShardWindows
    val: ShardWindows | None
    tokenizer: Any
    source: str
    manifest: dict[str, Any]
    best_loss: float | None = None  # unknown for a corpus

    def fingerprint(self) -> str:
        """The manifest's (checksums, counts, tokenizer) and the windows': no token is read."""
        windows = {"windows": [self.train.context_length, self.train.stride]}
        return manifest_fingerprint({**self.manifest, **windows})[:16]


def manifest_tokenizer(folder: Path, manifest: dict[str, Any]):
    kind = (manifest.get("tokenizer") or {}).get("type") if manifest["format"] != "nanogpt" else "gpt2"
    if kind == "gpt2":
        return GPT2Tokenizer()
    if kind == "bytes":
        return ByteTokenizer()
    path = folder / "tokenizer.json"
    try:
        return BPETokenizer.from_str(path.read_text())
    except FileNotFoundError:
        raise ToyaccelError(f"{path}: no such file (the tokenizer {MANIFEST} names)") from None
    except Exception as e:  # noqa: BLE001 - a damaged file: one line naming it
        raise ToyaccelError(f"{path}: cannot load the tokenizer: {str(e).splitlines()[0]}") from None


def check_options(folder: Path, manifest: dict[str, Any], tokenizer, config) -> None:
    """Options that contradict the folder, found before anything is written."""
    where = folder / MANIFEST if manifest["format"] != "nanogpt" else folder / "train.bin"
    if config.tokenizer != tokenizer.kind:
        raise ToyaccelError(
            f"{where}: prepared with the {tokenizer.kind} tokenizer, not --tokenizer {config.tokenizer}"
        )
    given_fraction = "val_fraction" not in config.defaulted
    if config.val_data or (given_fraction and config.val_fraction != manifest.get("val_fraction", 0.0)):
        option = "--val-data" if config.val_data else "--val-fraction"
        raise ToyaccelError(f"{where}: a shard folder holds its own validation split; drop {option}")
    for split in ("train", "val"):
        for entry in manifest.get(split) or []:
            if int(entry.get("max_id", -1)) >= config.vocab_size:
                raise ToyaccelError(
                    f"{folder / entry['file']}: token id {entry['max_id']} is beyond the model's vocab_size of "
                    f"{config.vocab_size}; raise --vocab-size"
                )


def load_shard_data(config) -> ShardBundle:
    """Training and validation windows over the shards ``config.data`` names; ToyaccelError on bad input."""
    folder = Path(config.data)
    manifest = read_manifest(folder)
    tokenizer = manifest_tokenizer(folder, manifest)
    check_options(folder, manifest, tokenizer, config)
    if getattr(config, "verify_data", False):
        verify_shards(folder)
    # nanoGPT's files record no largest id: each batch is checked as it is read.
    check_below = config.vocab_size if manifest["format"] == "nanogpt" else None
    sets = {}
    for split in ("train", "val"):
        shards = split_shards(folder, manifest, split)
        if not shards:
            continue
        ds = ShardWindows(shards, manifest["dtype"], config.context_length, config.stride, check_below)
        if len(ds) == 0:
            raise ToyaccelError(
                f"{folder}: its {split} shards ({ds.num_tokens} tokens) are each too short for one window of "
                f"context_length {config.context_length} plus its next-token target; lower --context-length"
            )
        sets[split] = ds
    if "train" not in sets:
        raise ToyaccelError(f"{folder / MANIFEST}: no training shards")
    return ShardBundle(sets["train"], sets.get("val"), tokenizer, str(folder), manifest)


def first_tokens(windows, count: int) -> list[int]:
    """The first ``count`` token ids of a set of windows (in memory or memory-mapped)."""
    inputs, _targets = windows.__getitems__(torch.tensor([0]))
    return inputs[0, :count].tolist()


def shard_validation_windows(folder: str, saved: dict[str, Any]) -> ShardWindows:
    """A saved run's windows over a shard folder's validation split (toyaccel-evaluate), each batch's ids
    checked against the run's vocabulary: the folder may not be the one it trained on."""
    manifest = read_manifest(folder)
    shards = split_shards(folder, manifest, "val")
    if not shards:
        raise ToyaccelError(f"{Path(folder) / MANIFEST}: no validation shards to evaluate on")
    context = saved["model"]["context_length"]
    stride = saved["config"].get("stride") or context
    ds = ShardWindows(shards, manifest["dtype"], context, stride, saved["model"]["vocab_size"])
    if len(ds) == 0:
        raise ToyaccelError(f"{folder}: its validation shards are too short for one window of {context} tokens")
    return ds
