"""Token shards: toyaccel-prepare's tokens/s against the ``tokenizers`` library's own ``encode_batch`` on the
same text and tokenizer, and a training process on memory-mapped shards of about 0.1, 1 and 4 GB of tokens:
its time to the first step and its peak RSS (which must not grow with the corpus)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from bench.common import REPO
from toyaccel.prepare import prepare
from toyaccel.workloads.gpt.shards import FORMAT, MANIFEST, token_dtype, write_json_atomic

VOCAB = 1024
SHARD_TOKENS = 100_000_000  # toyaccel-prepare's default shard
ENCODE_BATCH_BYTES = 1 << 20  # the library's encode_batch gets blocks of about this many bytes, 16 at a time
STEPS = 5  # steps the training process runs before its memory is read


def english_like_text(path: Path, megabytes: float, seed: int = 0) -> Path:
    """Sentences of made-up words with English's commonest ones mixed in: BPE merges like real text's."""
    rng = np.random.default_rng(seed)
    syllables = np.array(["ka", "lo", "mi", "ne", "ta", "ri", "su", "po", "an", "el", "or", "is", "th", "st", "qu"])
    words = ["".join(rng.choice(syllables, rng.integers(1, 4))) for _ in range(5000)]
    words += ["the", "of", "and", "to", "a", "in", "is", "that", "it", "was"] * 100
    with path.open("w") as f:
        written = 0
        while written < megabytes * 1e6:
            picks = rng.choice(len(words), 100_000)
            line = " ".join(words[i] for i in picks).replace(" the ", ". The ")
            written += f.write(line + ".\n")
    return path


def prepare_rates(work_dir: str, megabytes: float) -> dict:
    """Tokens/s of toyaccel-prepare (read, encode, write shards, checksums) and of Tokenizer.encode_batch
    alone, both with the same trained BPE, on every core of this machine."""
    from tokenizers import Tokenizer

    work = Path(work_dir) / "prepare"
    work.mkdir(exist_ok=True)
    text = english_like_text(work / "text.txt", megabytes)
    tokenizer_dir = work / "tokenizer"
    prepare(str(text), str(tokenizer_dir), "bpe", VOCAB, 0.0, progress_bar=False)  # trains the BPE
    for stale in tokenizer_dir.glob("*.bin"):
        stale.unlink()
    (tokenizer_dir / MANIFEST).unlink()
    start = time.perf_counter()
    manifest = prepare(str(text), str(work / "shards"), str(tokenizer_dir), val_fraction=0.0, progress_bar=False)
    prepare_s = time.perf_counter() - start
    tokens = sum(s["tokens"] for s in manifest["train"])
    library = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    raw = text.read_text()
    blocks = [raw[i : i + ENCODE_BATCH_BYTES] for i in range(0, len(raw), ENCODE_BATCH_BYTES)]
    rates = {}
    for method in ("encode_batch", "encode_batch_fast"):  # _fast leaves out the offsets, as prepare does
        batches = (blocks[i : i + 16] for i in range(0, len(blocks), 16))
        start = time.perf_counter()
        library_tokens = sum(len(e.ids) for batch in batches for e in getattr(library, method)(batch))
        rates[f"{method}_tokens_per_s"] = library_tokens / (time.perf_counter() - start)
    shutil.rmtree(work)
    return {"text_mb": megabytes, "cores": os.cpu_count(), "tokens": tokens, "prepare_tokens_per_s": tokens / prepare_s,
            **rates}  # fmt: skip


def write_shards(folder: Path, tokens: int, seed: int = 0) -> Path:
    """``tokens`` random ids in shards of SHARD_TOKENS plus a validation shard and their manifest, written
    directly (tokenizing gigabytes would take hours here); no checksums: training never reads them."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    dtype = token_dtype(VOCAB)
    manifest = {"format": FORMAT, "version": 1, "dtype": dtype.name,
                "tokenizer": {"type": "bytes", "size": 256, "end_of_text": None}, "vocab_size": 256,
                "val_fraction": 0.0, "train": [], "val": []}  # fmt: skip
    left = tokens
    for split in ("train", "val"):
        while left > 0:
            count = min(left, SHARD_TOKENS)
            name = f"{split}_{len(manifest[split]):06d}.bin"
            rng.integers(0, 256, count, dtype=dtype).tofile(folder / name)
            manifest[split].append({"file": name, "tokens": count, "max_id": 255})
            left -= count
        left = 1_000_000  # one small validation shard
    write_json_atomic(folder / MANIFEST, manifest)
    return folder


def training_memory(folder: Path, output_dir: Path, timeout: float) -> dict:
    """Seconds from starting scripts/train.py to its first step, and its peak RSS after STEPS steps."""
    cmd = [sys.executable, str(REPO / "scripts" / "train.py"), "--model", "gpt", "--data", str(folder),
           "--output-dir", str(output_dir), "--no-progress", "--log-every", "1", "--no-plot"]  # fmt: skip
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    first, tail = None, []
    try:
        deadline = start + timeout
        for line in proc.stdout:
            tail = [*tail[-20:], line]
            if first is None and " step 1 " in line:
                first = time.perf_counter() - start
            if f" step {STEPS} " in line:
                status = Path(f"/proc/{proc.pid}/status").read_text()
                fields = ("VmHWM", "VmRSS", "RssAnon", "RssFile")  # MiB; RssFile: page cache mapped here
                return {"first_step_s": first, **{key: kib_field(status, key) / 1024 for key in fields}}
            if time.perf_counter() > deadline:
                break
        raise RuntimeError(f"scripts/train.py did not reach step {STEPS}:\n{''.join(tail)}")
    finally:
        proc.kill()
        proc.wait()


def kib_field(status: str, key: str) -> float:
    return float(next(line.split()[1] for line in status.splitlines() if line.startswith(key + ":")))


def shard_rows(args, work_dir: str) -> dict:
    """The prepare comparison and one training row per corpus size; each corpus deleted after its row."""
    result = {"prepare": prepare_rates(work_dir, args.shards_text_mb), "training": []}
    for gigabytes in args.shards_gb:
        tokens = int(gigabytes * 1e9) // np.dtype(token_dtype(VOCAB)).itemsize
        folder = write_shards(Path(work_dir) / f"corpus-{gigabytes}", tokens)
        try:
            row = training_memory(folder, Path(work_dir) / f"run-{gigabytes}", args.timeout)
        finally:
            shutil.rmtree(folder)
        result["training"].append({"gigabytes": gigabytes, "tokens": tokens, **row})
        print(json.dumps(result["training"][-1]), file=sys.stderr, flush=True)
    peaks = [row["VmHWM"] for row in result["training"]]
    result["peak_rss_growth_mib"] = peaks[-1] - peaks[0]
    return result


RSS_GROWTH_TARGET_MIB = 100  # issue 22: from the smallest corpus to the largest


def shard_table(shards: dict) -> list[str]:
    prep = shards["prepare"]
    lines = [f"\ntoken shards: toyaccel-prepare {prep['prepare_tokens_per_s']:,.0f} tokens/s on {prep['cores']} cores "
             f"({prep['text_mb']} MB of text; the tokenizers library's encode_batch alone "
             f"{prep['encode_batch_tokens_per_s']:,.0f}, encode_batch_fast "
             f"{prep['encode_batch_fast_tokens_per_s']:,.0f})",
             "training from shards (scripts/train.py --model gpt --data SHARDS): GB of tokens | first step s | "
             f"peak RSS MiB after {STEPS} steps"]  # fmt: skip
    for row in shards["training"]:
        lines.append(f"  {row['gigabytes']:>5} | {row['first_step_s']:.2f} | {row['VmHWM']:.0f}")
    growth = shards["peak_rss_growth_mib"]
    verdict = "met" if growth <= RSS_GROWTH_TARGET_MIB else "MISSED"
    lines.append(f"  peak RSS growth {growth:.0f} MiB, target <= {RSS_GROWTH_TARGET_MIB}: {verdict}")
    return lines
