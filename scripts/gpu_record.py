"""The single-GPU record row (issue 22): GPT-2 124M's shape at context 1024, bf16, compiled, trained by
scripts/train.py itself on memory-mapped shards, for a fixed number of optimizer steps. Prints tokens/s,
MFU and the peak GPU memory on one line, and writes them to OUT/record.json.

    python scripts/gpu_record.py --out /tmp/record                 # what scripts/gpu_check.sh runs
    python scripts/gpu_record.py --out /tmp/record --batch-size 48 -- --lr 6e-4   # more train.py options

The data is nanoGPT's format (train.bin / val.bin, raw uint16 token ids), here random ids below GPT-2's
50257: a throughput measurement needs no tokenizer. scripts/train.py runs in this process (runpy), so
that the peak memory is the CUDA allocator's own figure for the training. tokens/s and MFU are the median
of the step lines after the first, which holds the compilation.
"""

from __future__ import annotations

import argparse
import json
import runpy
import statistics
import sys
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
GPT2_VOCAB = 50257
CONTEXT = 1024
VAL_WINDOWS = 64
TARGETS = {"tokens_per_s": 470_000, "mfu": 0.40}  # issue 22's single-H200 record


def write_token_files(folder: Path, train_tokens: int, seed: int = 0) -> None:
    """train.bin and val.bin of random GPT-2 token ids, uint16, as nanoGPT's prepare.py writes them."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for name, count in (("train.bin", train_tokens), ("val.bin", VAL_WINDOWS * CONTEXT + 1)):
        rng.integers(0, GPT2_VOCAB, size=count, dtype=np.uint16).tofile(folder / name)


def train(argv: list[str]) -> int:
    """scripts/train.py with ``argv``, in this process; its exit code."""
    sys.argv = [str(REPO / "scripts" / "train.py"), *argv]
    try:
        runpy.run_path(sys.argv[0], run_name="__main__")
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 1
    return 0


def steady(records: list[dict], key: str) -> float | None:
    """The median of ``key`` over the step lines after the first (compilation), None where none has it."""
    values = [r[key] for r in records[1:] if r.get(key) is not None]
    return statistics.median(values) if values else None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder for the data, the run and record.json")
    parser.add_argument("--steps", type=int, default=150, help="optimizer steps (--max-steps)")
    parser.add_argument("--batch-size", type=int, default=32, help="windows of 1024 tokens per step")
    parser.add_argument("--log-every", type=int, default=25, help="steps per step line (one tokens/s figure each)")
    parser.add_argument("train_args", nargs="*", help="more scripts/train.py options, after --")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("record: skipped (needs a CUDA GPU)")
        return 0
    out = Path(args.out)
    data, run = out / "data", out / "run"
    # Enough windows that no step reads a window twice: the steps run inside the first epoch.
    write_token_files(data, (args.steps + 1) * args.batch_size * CONTEXT + 1)
    options = ["--model", "gpt", "--preset", "gpt2-124m", "--drop-rate", "0", "--data", str(data),
               "--mixed-precision", "bf16", "--compile", "--batch-size", str(args.batch_size),
               "--max-steps", str(args.steps), "--eval-batches", "4", "--log-every", str(args.log_every),
               "--output-dir", str(run), "--overwrite", "--no-plot", "--no-progress", *args.train_args]  # fmt: skip
    print("record: python scripts/train.py " + " ".join(options), flush=True)
    torch.cuda.reset_peak_memory_stats()
    code = train(options)
    if code != 0:
        print(f"record: FAILED: scripts/train.py exited {code}")
        return code
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if r.get("kind") == "step"]
    record = {
        "gpu": torch.cuda.get_device_name(), "batch_size": args.batch_size, "steps": args.steps,
        "tokens_per_s": steady(steps, "tokens_per_s"), "mfu": steady(steps, "mfu"),
        "peak_memory_allocated_gib": torch.cuda.max_memory_allocated() / 2**30,
        "peak_memory_reserved_gib": torch.cuda.max_memory_reserved() / 2**30,
        "targets": TARGETS,
    }  # fmt: skip
    (out / "record.json").write_text(json.dumps(record, indent=2) + "\n")
    rate = f"{record['tokens_per_s']:,.0f} tokens/s" if record["tokens_per_s"] else "no steady step line"
    mfu = f"MFU {record['mfu']:.1%}" if record["mfu"] is not None else "MFU n/a (GPU not in the table of peaks)"
    print(
        f"record: GPT-2 124M, context {CONTEXT}, bf16, compiled, batch {args.batch_size}, {args.steps} steps on "
        f"{record['gpu']}: {rate}, {mfu}, peak GPU memory {record['peak_memory_allocated_gib']:.1f} GiB allocated "
        f"({record['peak_memory_reserved_gib']:.1f} GiB reserved); targets >= 470k tokens/s, >= 40% MFU"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
