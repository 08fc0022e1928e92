"""The GPT: toyaccel's (fused kernels, toyaccel's loop) against the book's chapter 4-5 code as printed
(toyaccel.reference: stored-mask attention, its LayerNorm and GELU, GPTDatasetV1 and a DataLoader,
train_model_simple's steps), same config, same seed, same data order: same losses at dropout 0. On a
GPU, also toyaccel's fast path (GPT-124M's shape, bf16, compiled) with its MFU."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile

import torch
from torch.utils.data import DataLoader

from bench.common import (
    BENCHMARK_SCRIPT,
    SEED,
    VOCAB_MULTIPLE,
    ByteTokenizer,
    MatmulPeak,
    PreparedLoop,
    TextBundle,
    TextWindows,
    TrainConfig,
    book,
    device_accelerator,
    first_epoch_memory,
    fmt_rate,
    measure,
    summary,
    synthetic_text,
    timed,
)

GPT_SMALL = {"vocab_size": 1024, "context_length": 256, "emb_dim": 256, "n_heads": 4, "n_layers": 4,
             "drop_rate": 0.0, "qkv_bias": False}  # fmt: skip
GPT_QUICK = {**GPT_SMALL, "context_length": 32, "emb_dim": 32, "n_heads": 2, "n_layers": 1}
GPT_124M = {"vocab_size": 50257, "context_length": 1024, "emb_dim": 768, "n_heads": 12, "n_layers": 12,
            "drop_rate": 0.0, "qkv_bias": False}  # fmt: skip


def gpt_tokens(num_tokens: int) -> torch.Tensor:
    """The synthetic text read byte by byte: ids below 256, inside any vocabulary used here."""
    return torch.tensor(ByteTokenizer().encode(synthetic_text(num_tokens, SEED)), dtype=torch.int64)


class BookGPTLoop:
    def __init__(self, ids, cfg, batch_size, device):
        self.book = book
        context = cfg["context_length"]
        dataset = self.book.GPTDatasetV1(ids.tolist(), context, context)
        self.loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, drop_last=True, num_workers=0)
        torch.manual_seed(SEED)
        self.model = self.book.GPTModel(cfg).to(device)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=0.0004, weight_decay=0.1)
        self.device, self.tokens_per_step, self.losses = device, batch_size * context, []

    def epoch(self) -> int:
        steps = len(self.loader)
        self.losses = self.book.train_steps_simple(self.model, self.loader, self.optimizer, self.device, steps)
        return len(self.losses) * self.tokens_per_step


class GPTLoop(PreparedLoop):
    """toyaccel's GPT in toyaccel's loop, one log line per step (its losses are compared with the book's)."""

    def __init__(self, ids, cfg, batch_size, accelerator, output_dir, **options):
        config = TrainConfig(model="gpt", data="synthetic", batch_size=batch_size, seed=SEED, progress=False,
                             plot=False, output_dir=output_dir, log_every=1, **cfg, **options)  # fmt: skip
        context = cfg["context_length"]
        data = TextBundle(TextWindows(ids, context, context), None, ByteTokenizer(), "the synthetic text")
        super().__init__(data, config, accelerator, output_dir)
        self.tokens_per_sample = context

    @property
    def losses(self) -> list[float]:
        return [r["loss"] for r in self.logger.history if r.get("kind") == "step"]


def gpt_memory_worker(args, loop_name: str) -> dict:
    """One loop's first epoch in this fresh process: its peak RSS, and how far it rose during the epoch."""
    cfg = GPT_QUICK if args.quick else GPT_SMALL
    ids = gpt_tokens(args.gpt_steps * args.gpt_batch_size * cfg["context_length"] + 1)
    with tempfile.TemporaryDirectory() as work_dir, device_accelerator("cpu", work_dir) as accelerator:
        if loop_name == "book":
            return first_epoch_memory(BookGPTLoop(ids, cfg, args.gpt_batch_size, "cpu"), "cpu")
        loop = GPTLoop(ids, cfg, args.gpt_batch_size, accelerator, f"{work_dir}/gpt")
        try:
            return first_epoch_memory(loop, "cpu")
        finally:
            loop.close()


def cpu_memory_rows(args) -> dict[str, dict]:
    out = {}
    for name in ("book", "toyaccel"):
        cmd = [sys.executable, str(BENCHMARK_SCRIPT), "--gpt-memory", name, "--gpt-steps", str(args.gpt_steps),
               "--gpt-batch-size", str(args.gpt_batch_size), *(["--quick"] if args.quick else [])]  # fmt: skip
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout, check=True)
        out[name] = json.loads(proc.stdout.strip().splitlines()[-1])
    return out


def gpt_flops_per_token(cfg: dict) -> float:
    """6 x the matrix-product parameters (all but the embedding tables) + causal attention's
    12 x layers x width x context (the PaLM paper's count, as nanoGPT's MFU)."""
    emb, layers, context = cfg["emb_dim"], cfg["n_layers"], cfg["context_length"]
    per_block = 4 * emb * emb + 8 * emb * emb  # q, k, v, out projections; the 4x feed-forward
    matmul_params = layers * per_block + emb * cfg["vocab_size"]
    return 6 * matmul_params + 12 * layers * emb * context


def gpt_rows(args, device: str, work_dir: str) -> dict:
    """The book's code and toyaccel's GPT side by side (fp32); on a GPU, also toyaccel's fast path:
    GPT-124M's shape, bf16, fused AdamW, flash attention, vocab padded to 64, torch.compile."""
    cfg = GPT_QUICK if args.quick else GPT_SMALL
    batch, steps = args.gpt_batch_size, args.gpt_steps
    if device == "cuda":  # the book's fp32 attention keeps a T x T score tensor per head: batch 8 fits
        cfg = GPT_124M
    ids = gpt_tokens(steps * batch * cfg["context_length"] + 1)
    out = {"config": cfg, "batch_size": batch, "steps_per_epoch": steps, "rows": []}
    with device_accelerator(device, work_dir) as accelerator:
        loops = {"book": BookGPTLoop(ids, cfg, batch, device)}
        memory = {"book": first_epoch_memory(loops["book"], device)}
        loops["toyaccel"] = GPTLoop(ids, cfg, batch, accelerator, f"{work_dir}/gpt")
        try:
            memory["toyaccel"] = first_epoch_memory(loops["toyaccel"], device)
            if device == "cpu":
                memory = cpu_memory_rows(args)
            book_losses, our_losses = loops["book"].losses, loops["toyaccel"].losses
            out["max_loss_difference"] = max(abs(a - b) for a, b in zip(book_losses, our_losses))
            out["first_losses"] = {"book": book_losses[:3], "toyaccel": our_losses[:3]}
            wall, cpu = measure(loops, device, 0, args.gpt_repeats)
        finally:
            loops["toyaccel"].close()
    names = list(loops)
    loops.clear()  # the fast row's peak memory must not count these models
    if device == "cuda":
        torch.cuda.empty_cache()
    for name in names:
        # On a GPU with TF32 (toyaccel's default, and device_accelerator's) the fp32 matmuls round to TF32.
        precision = "tf32" if torch.device(device).type == "cuda" and torch.backends.cuda.matmul.allow_tf32 else "fp32"
        row = {"loop": name, "device": device, "precision": precision, **memory[name]}
        row.update({k.replace("samples", "tokens"): v for k, v in summary(wall[name], cpu[name]).items()})
        out["rows"].append(row)
    out["toyaccel_vs_book"] = out["rows"][1]["tokens_per_s"] / out["rows"][0]["tokens_per_s"]
    if device == "cpu":
        out["toyaccel_vs_book_cpu"] = out["rows"][1]["tokens_per_cpu_s"] / out["rows"][0]["tokens_per_cpu_s"]
    if device == "cuda":
        out["rows"].append(gpt_fast_row(args, cfg, work_dir))
    return out


def gpt_fast_row(args, cfg: dict, work_dir: str, device: str = "cuda", compile: bool = True) -> dict:
    options = {"mixed_precision": "bf16", "compile": compile}
    with device_accelerator(device, work_dir, **options) as accelerator:
        batch = args.gpt_gpu_batch_size if device == "cuda" else args.gpt_batch_size
        ids = gpt_tokens(args.gpt_steps * batch * cfg["context_length"] + 1)
        loop = GPTLoop(ids, cfg, batch, accelerator, f"{work_dir}/gpt-fast", **options)
        try:
            memory = first_epoch_memory(loop, device)  # includes compiling
            wall, _ = measure({"fast": loop}, device, 0, args.gpt_repeats)
        finally:
            loop.close()
    peak = MatmulPeak(8192 if device == "cuda" else 512, device, precision="bf16")
    rates = []
    for _ in range(3):
        products, seconds, _ = timed(peak, device)
        rates.append(products * peak.flops_per_product / seconds)
    peak_flops = statistics.median(rates)
    row = {"loop": "toyaccel-fast", "device": device, "precision": "bf16", "compile": compile, "batch_size": batch,
           "vocab_padded_to": VOCAB_MULTIPLE,
           **memory, **{k.replace("samples", "tokens"): v for k, v in summary(wall["fast"]).items()}}  # fmt: skip
    row["bf16_matmul_tflops"] = peak_flops / 1e12
    row["mfu"] = row["tokens_per_s"] * gpt_flops_per_token(cfg) / peak_flops
    return row


def gpt_table(gpt: dict) -> list[str]:
    cfg = gpt["config"]
    lines = [f"\nGPT ({cfg['n_layers']} layers, emb {cfg['emb_dim']}, {cfg['n_heads']} heads, context "
             f"{cfg['context_length']}, vocab {cfg['vocab_size']}, batch {gpt['batch_size']}, dropout 0), "
             "tokens/s, median of the repeats:", ""]  # fmt: skip
    for row in gpt["rows"]:
        memory = ", ".join(f"{k} {v:.0f}" for k, v in row.items() if k.startswith(("peak_", "growth_")))
        extra = f" | MFU {row['mfu']:.1%} of {row['bf16_matmul_tflops']:.0f} TFLOP/s" if "mfu" in row else ""
        lines.append(f"  {row['loop']:<14} {row['device']} {row['precision']}: {fmt_rate(row['tokens_per_s'])} "
                     f"(noise {row['spread']:.2f}) | {memory} MiB{extra}")  # fmt: skip
    cpu = f" ({gpt['toyaccel_vs_book_cpu']:.2f}x from CPU time)" if "toyaccel_vs_book_cpu" in gpt else ""
    lines.append(f"  toyaccel vs book: {gpt['toyaccel_vs_book']:.2f}x{cpu} (target >= 1.5); largest step-loss "
                 f"difference over the first epoch: {gpt['max_loss_difference']:.2g}")  # fmt: skip
    return lines
