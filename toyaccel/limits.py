"""What a run needs of the machine, known before it starts: a lower bound of its memory, checked against
this machine's, so that a run too large for it is refused in one line rather than killed part way."""

from __future__ import annotations

import os
from typing import Any

from toyaccel.errors import ToyaccelError


def mlp_parameters(num_inputs: int, hidden: tuple[int, ...], num_outputs: int) -> int:
    sizes = [num_inputs, *hidden, num_outputs]
    return sum((fan_in + 1) * fan_out for fan_in, fan_out in zip(sizes, sizes[1:]))


def gpt_parameters(config: Any) -> int:
    emb, vocab = config.emb_dim, config.vocab_size + -config.vocab_size % 64  # padded rows (workloads.gpt)
    block = 12 * emb * emb + 13 * emb + (3 * emb if config.qkv_bias else 0)
    return 2 * vocab * emb + config.context_length * emb + config.n_layers * block + 2 * emb


def training_memory(config: Any) -> int:
    """Bytes a run needs at the least: float32 parameters, their gradients and AdamW's two moments, and the
    synthetic data (the GPT's text is made through Python lists, ~56 bytes a character). Activations and
    a file's data are left out: a lower bound, so that a refusal is never wrong."""
    copies = 4 if config.optimizer == "adamw" else 2
    synthetic = config.data == "synthetic"
    if config.model == "gpt":
        parameters = gpt_parameters(config)
        data = 56 * config.num_samples if synthetic else 0
    elif config.model == "mlp":
        num_inputs = config.num_features if synthetic else 2 if config.data == "toy" else 1
        parameters = mlp_parameters(num_inputs, config.hidden, config.num_classes or 2)
        data = config.num_samples * (2 * 4 * config.num_features + 8) if synthetic else 0
    else:
        return 0  # a workload registered from outside toyaccel: nothing here knows its size
    return 4 * parameters * copies + data


def machine_memory() -> int | None:
    """This machine's memory in bytes (not what is free now: a busy moment must not refuse a run)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def in_bytes(n: float) -> str:
    for unit, size in (("PB", 1e15), ("TB", 1e12), ("GB", 1e9), ("MB", 1e6)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n:.0f} bytes"


def check_fits(needed: int, what: str) -> None:
    total = machine_memory()
    if total and needed > total:
        raise ToyaccelError(f"{what} need at least {in_bytes(needed)}, this machine has {in_bytes(total)} of memory")
