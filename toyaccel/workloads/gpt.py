"""The book's chapters 4-5 workload: GPTModel pretrained on text with next-token cross-entropy."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from toyaccel.config import TrainConfig
from toyaccel.gpt_model import GPT_CONFIG_KEYS, GPTModel
from toyaccel.text import TextBundle, load_text_data, perplexity

# Chapter 5 prints a greedy continuation of this after every epoch.
START_CONTEXT = "Every effort moves you"
SAMPLE_TOKENS = 50
MODEL_KEYS = GPT_CONFIG_KEYS  # config.json's "model" section: the book's GPT_CONFIG dict


def load_data(config: TrainConfig) -> TextBundle:
    return load_text_data(config)


def model_shape(config: TrainConfig, data: TextBundle | None = None) -> dict[str, Any]:
    """The book's GPT_CONFIG dict."""
    return {k: getattr(config, k) for k in GPT_CONFIG_KEYS}


def build_model(config: TrainConfig, data: TextBundle) -> GPTModel:
    return GPTModel(model_shape(config))


def model_from_shape(shape: dict[str, Any]) -> GPTModel:
    return GPTModel(shape)


def loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


def uses_dropout(config: TrainConfig) -> bool:
    return config.drop_rate > 0


def eval_batch_size(config: TrainConfig) -> int:
    return config.batch_size


@torch.no_grad()
def evaluate(accelerator, model, loader) -> dict[str, Any]:
    """Token-weighted cross-entropy over every window exactly once, and its perplexity."""
    model.eval()
    loss_sum = torch.zeros((), device=accelerator.device, dtype=torch.float64)
    tokens = torch.zeros((), device=accelerator.device, dtype=torch.int64)
    for inputs, targets in loader:
        logits = model(inputs).float()
        per_token = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none")
        # Per-window sums, gathered: gather_for_metrics drops the windows accelerate repeated to give
        # every process a full batch, and float64 sums of float32 terms do not depend on their order.
        window_sums = per_token.view(targets.shape).sum(dim=1, dtype=torch.float64)
        window_tokens = torch.full_like(window_sums, targets.shape[1], dtype=torch.int64)
        window_sums, window_tokens = accelerator.gather_for_metrics((window_sums, window_tokens))
        loss_sum += window_sums.sum()
        tokens += window_tokens.sum()
    model.train()
    mean = loss_sum.item() / int(tokens)
    return {"loss": mean, "perplexity": perplexity(mean), "tokens": int(tokens)}


def epoch_fields(metrics: dict[str, dict[str, Any]]) -> dict[str, Any]:
    record = {}
    for name, m in metrics.items():
        record[f"{name}_loss"], record[f"{name}_ppl"] = m["loss"], m["perplexity"]
    return record


def result_metrics(metrics: dict[str, dict[str, Any]], samples_per_s: float, config: TrainConfig) -> dict[str, Any]:
    return {
        "val_perplexity": metrics["val"]["perplexity"] if "val" in metrics else None,
        "train_perplexity": metrics["train"]["perplexity"],
        "tokens_per_s": samples_per_s * config.context_length,
    }


def run_description(config: TrainConfig, data: TextBundle) -> dict[str, Any]:
    return {
        "model": model_shape(config),
        "tokenizer": {"type": data.tokenizer.kind, "size": data.tokenizer.size},
        "data": {"source": data.source, "train_tokens": data.train.tokens.numel(),
                 "val_tokens": data.val.tokens.numel() if data.val is not None else 0},
    }  # fmt: skip


def save_extras(output_dir: str, data: TextBundle) -> None:
    """tokenizer.json: with config.json, all toyaccel-generate needs (a gpt2 run names tiktoken's)."""
    from toyaccel.outputs import write_atomic

    write_atomic(Path(output_dir) / "tokenizer.json", lambda p: Path(p).write_text(data.tokenizer.to_json()))


def start_ids(tokenizer, train: torch.Tensor) -> list[int]:
    """The book's start context where the vocabulary has it, else the training text's first tokens."""
    try:
        tokenizer.check_prompt(START_CONTEXT)
        return tokenizer.encode(START_CONTEXT)
    except Exception:  # noqa: BLE001 - a byte vocabulary without these letters
        return train[:8].tolist()


def after_epoch(accelerator, model, config: TrainConfig, data: TextBundle) -> dict[str, Any]:
    """Chapter 5's greedy sample from the start context, on the main process; it draws no random
    numbers, so the data order of the next epoch does not depend on it."""
    if not accelerator.is_main_process:
        return {}
    net = accelerator.unwrap_model(model, keep_torch_compile=False)
    ids = start_ids(data.tokenizer, data.train.tokens)
    device = next(net.parameters()).device
    out = generate(net, torch.tensor([ids], device=device), SAMPLE_TOKENS, config.context_length)
    sample = data.tokenizer.decode(out[0].tolist())
    accelerator.print(f"sample: {sample!r}")
    return {"sample": sample}


@torch.no_grad()
def generate(model, idx: torch.Tensor, max_new_tokens: int, context_size: int, temperature: float = 0.0,
             top_k: int | None = None, generator: torch.Generator | None = None) -> torch.Tensor:  # fmt: skip
    """The book's ``generate`` (chapter 5): greedy at temperature 0 (``generate_text_simple``), else
    sampled from the temperature-scaled softmax of the ``top_k`` largest logits."""
    was_training = model.training
    model.eval()
    for _ in range(max_new_tokens):
        logits = model(idx[:, -context_size:])[:, -1, :].float()
        if top_k:
            top_logits, _ = torch.topk(logits, min(top_k, logits.shape[-1]))
            logits = torch.where(logits < top_logits[:, -1:], torch.tensor(float("-inf"), device=logits.device), logits)
        if temperature > 0.0:
            probs = torch.softmax(logits / temperature, dim=-1)
            idx_next = torch.multinomial(probs.cpu(), num_samples=1, generator=generator).to(idx.device)
        else:
            idx_next = torch.argmax(logits, dim=-1, keepdim=True)
        idx = torch.cat((idx, idx_next), dim=1)
    model.train(was_training)
    return idx
