"""``toyaccel-prepare SOURCE OUT_DIR``: tokenize a corpus once into memory-mapped shards
(toyaccel.workloads.gpt.shards).

It streams the source (never holding it in memory), tokenizes a batch of blocks at a time through the
tokenizer's batch encoder (Hugging Face ``tokenizers`` and tiktoken spread a batch over every core),
shows a progress bar on a terminal, and can be killed and run again: it continues after the last
whole shard, and a training run reads nothing until the manifest is written, last.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from toyaccel.cli import _Parser, run_cli
from toyaccel.errors import ToyaccelError
from toyaccel.workloads.gpt.shards import (
    BATCH_BLOCKS,
    END_OF_TEXT,
    FORMAT,
    MANIFEST,
    PROGRESS,
    ShardWriter,
    blocks,
    source_files,
    token_dtype,
    write_json_atomic,
)
from toyaccel.workloads.gpt.tokenizers import BPETokenizer, ByteTokenizer, GPT2Tokenizer

DEFAULT_SHARD_TOKENS = 100_000_000  # 200 MB of uint16: nanoGPT's and llm.c's shards are of this order


def hf_tokenizer(folder: Path) -> BPETokenizer:
    """An HF folder's tokenizer: tokenizer.json, or GPT-2's vocab.json + merges.txt (byte-level BPE)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    try:
        if (folder / "tokenizer.json").is_file():
            return BPETokenizer(Tokenizer.from_file(str(folder / "tokenizer.json")))
        if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
            tokenizer = Tokenizer(models.BPE.from_file(str(folder / "vocab.json"), str(folder / "merges.txt")))
            tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
            tokenizer.decoder = decoders.ByteLevel()
            return BPETokenizer(tokenizer)
    except Exception as e:  # noqa: BLE001 - a damaged tokenizer file: one line naming the folder
        first_line = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ToyaccelError(f"{folder}: cannot load its tokenizer ({first_line})") from None
    raise ToyaccelError(f"{folder}: no tokenizer.json, nor vocab.json and merges.txt")


def end_of_text_id(tokenizer) -> int | None:
    if isinstance(tokenizer, GPT2Tokenizer):
        return tokenizer.encoding.eot_token
    if isinstance(tokenizer, BPETokenizer):
        return tokenizer.tokenizer.token_to_id(END_OF_TEXT)
    return None


def train_blocks(files, settings: dict[str, Any]) -> Iterator[str]:
    """The lines of the training part, streamed (for a tokenizer trained here)."""
    for text, _split, _end in split_blocks(files, settings, "train"):
        yield from text.splitlines(keepends=True)


def split_blocks(files, settings: dict[str, Any], only: str | None = None):
    """(text, split, ends a document) for every block: the last ``val_fraction`` of the source's bytes
    validate, cut inside the block that straddles that point as the book cuts its text."""
    val_start = (1.0 - settings["val_fraction"]) * settings["source_bytes"] if settings["val_fraction"] else None
    for text, offset, doc_end in blocks(files, settings["text_field"]):
        parts = [(text, "train", doc_end)]
        if val_start is not None and offset >= val_start:
            parts = [(text, "val", doc_end)]
        elif val_start is not None and offset + len(text.encode()) > val_start:
            cut = len(text.encode()[: int(val_start - offset)].decode("utf-8", errors="ignore"))
            parts = [(text[:cut], "train", False), (text[cut:], "val", doc_end)]
        for part in parts:
            if only in (None, part[1]):
                yield part


def choose_tokenizer(files, settings: dict[str, Any], out: Path):
    """The tokenizer (trained on the training part for bpe), saved as out/tokenizer.json first, so a
    restarted prepare encodes with the very same one."""
    saved = out / "tokenizer.json"
    kind = settings["tokenizer"]
    if kind == "gpt2":
        return GPT2Tokenizer()
    if kind == "bytes":
        return ByteTokenizer()
    if saved.exists():
        return BPETokenizer.from_str(saved.read_text())
    if kind == "bpe":
        specials = (END_OF_TEXT,) if settings["documents"] else ()
        tokenizer = BPETokenizer.train_from_lines(train_blocks(files, settings), settings["vocab_size"], specials)
    else:
        tokenizer = hf_tokenizer(Path(kind))
    tmp = saved.with_name(".tokenizer.json.tmp")
    tmp.write_text(tokenizer.to_json())
    os.replace(tmp, saved)
    return tokenizer


def start_folder(out: Path, settings: dict[str, Any], overwrite: bool) -> dict[str, Any] | None:
    """The progress of an earlier attempt with the same settings (None: start afresh). Refuses a folder
    that holds a finished corpus (unless ``overwrite``) or anything that is not a prepare's."""
    progress = out / PROGRESS
    if out.exists() and not out.is_dir():
        raise ToyaccelError(f"{out} exists and is not a directory")
    if (out / MANIFEST).exists() and not overwrite:
        raise ToyaccelError(f"{out} already holds prepared shards; pass --overwrite to replace them")
    if out.exists() and any(out.iterdir()) and not ((out / MANIFEST).exists() or progress.exists()):
        raise ToyaccelError(f"{out} is not empty and holds no prepared shards; choose another OUT_DIR")
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob(".tmp-*"):  # a shard cut short by a kill
        stale.unlink()
    if progress.exists() and not overwrite:
        earlier = json.loads(progress.read_text())
        if earlier.get("settings") == settings:
            return earlier
    for name in os.listdir(out):
        target = out / name
        shutil.rmtree(target) if target.is_dir() and not target.is_symlink() else target.unlink()
    return None


def prepare(source: str, out_dir: str, tokenizer: str = "bpe", vocab_size: int = 1024, val_fraction: float = 0.1,
            shard_tokens: int = DEFAULT_SHARD_TOKENS, text_field: str = "text", overwrite: bool = False,
            progress_bar: bool = True) -> dict[str, Any]:  # fmt: skip
    """Tokenize ``source`` into shards in ``out_dir``; return the manifest."""
    files = source_files(source)
    if not 0.0 <= val_fraction < 1.0:
        raise ToyaccelError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    if shard_tokens < 1:
        raise ToyaccelError(f"--shard-tokens must be at least 1, got {shard_tokens}")
    settings = {
        "source": str(Path(source).resolve()), "source_bytes": sum(f.stat().st_size for f in files),
        # Several documents (files, records) get an end-of-text token between them.
        "documents": len(files) > 1 or any(f.suffix == ".jsonl" for f in files),
        "tokenizer": tokenizer, "vocab_size": vocab_size, "val_fraction": val_fraction,
        "shard_tokens": shard_tokens, "text_field": text_field,
    }  # fmt: skip
    out = Path(out_dir)
    earlier = start_folder(out, settings, overwrite)
    tok = choose_tokenizer(files, settings, out)
    dtype = token_dtype(tok.size)
    writers = {split: ShardWriter(out, split, dtype, shard_tokens, list((earlier or {}).get(split, [])))
               for split in ("train", "val")}  # fmt: skip
    skip = (earlier or {}).get("blocks_done", 0)
    eot = end_of_text_id(tok) if settings["documents"] else None
    bar = progress(settings["source_bytes"], progress_bar)
    started, encoded, done = time.perf_counter(), 0, 0
    batch: list[tuple[str, str, bool]] = []
    for item in itertools.chain(split_blocks(files, settings), [None]):
        if item is not None:
            done += 1
            if done <= skip:
                continue
            batch.append(item)
            if len(batch) < BATCH_BLOCKS:
                continue
        texts = [text for text, _, _ in batch]
        first = done - len(batch)  # blocks before this batch
        for j, ((text, split, doc_end), ids) in enumerate(zip(batch, tok.encode_batch(texts))):
            if split == "val" and writers["train"].count:
                writers["train"].flush(final=True)
            writers[split].add(ids)
            if doc_end and eot is not None:
                writers[split].add(np.array([eot]))
            encoded += ids.size
            if bar is not None:
                bar.update(len(text.encode()))
            # A shard ends after a whole block, and nothing else is pending then: a restart skips the
            # blocks done and goes on with the next shard.
            if writers[split].flush():
                shards = {name: w.shards for name, w in writers.items()}
                write_json_atomic(out / PROGRESS, {"settings": settings, "blocks_done": first + j + 1, **shards})
        batch = []
    for writer in writers.values():
        writer.flush(final=True)
    if bar is not None:
        bar.close()
    if not writers["train"].shards:
        raise ToyaccelError(f"{source}: no text to train on")
    manifest = {
        "format": FORMAT, "version": 1, "dtype": dtype.name,
        "tokenizer": {"type": tok.kind, "size": tok.size, "end_of_text": eot}, "vocab_size": tok.size,
        "source": settings["source"], "val_fraction": val_fraction,
        "train": writers["train"].shards, "val": writers["val"].shards,
    }  # fmt: skip
    write_json_atomic(out / MANIFEST, manifest)
    (out / PROGRESS).unlink(missing_ok=True)
    seconds = time.perf_counter() - started
    manifest["tokens_per_s"] = encoded / seconds if seconds else 0.0
    return manifest


def progress(total: int, wanted: bool):
    if not (wanted and sys.stderr.isatty()):
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # an optional extra: the closing line says what was done
        return None
    return tqdm(total=total, unit="B", unit_scale=True, desc="tokenizing")


def main(argv: list[str] | None = None) -> int:
    parser = _Parser(prog="toyaccel-prepare", description=__doc__.splitlines()[0].split(": ", 1)[1])
    parser.add_argument("source", metavar="SOURCE", help="a text file, a folder of .txt/.jsonl files, or JSON Lines")
    parser.add_argument("out_dir", metavar="OUT_DIR", help="the folder of shards (--data OUT_DIR trains from it)")
    parser.add_argument("--tokenizer", default="bpe",
                        help="bpe (trained here, default), bytes, gpt2 (tiktoken), or a Hugging Face folder or its "
                             "tokenizer.json")  # fmt: skip
    parser.add_argument("--vocab-size", type=int, default=1024, help="bpe: most tokens to learn (default 1024)")
    parser.add_argument("--val-fraction", type=float, default=0.1, help="the last fraction of the source validates")
    parser.add_argument("--shard-tokens", type=int, default=DEFAULT_SHARD_TOKENS, help="tokens per shard")
    parser.add_argument("--text-field", default="text", help="JSON Lines: the field holding the text (default text)")
    parser.add_argument("--overwrite", action="store_true", help="replace prepared shards in OUT_DIR")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")

    def run() -> None:
        args = parser.parse_args(argv)
        m = prepare(args.source, args.out_dir, args.tokenizer, args.vocab_size, args.val_fraction, args.shard_tokens,
                    args.text_field, args.overwrite, args.progress)  # fmt: skip
        train, val = (sum(s["tokens"] for s in m[split]) for split in ("train", "val"))
        print(f"prepared {args.out_dir}: train {train} tokens in {len(m['train'])} shard(s), val {val} tokens, "
              f"{m['dtype']}, {m['tokenizer']['type']} tokenizer ({m['vocab_size']} tokens); "
              f"{m['tokens_per_s']:,.0f} tokens/s", flush=True)  # fmt: skip

    return run_cli(run)


if __name__ == "__main__":
    sys.exit(main())
