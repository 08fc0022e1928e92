"""The one place options are checked, together, after their defaults are resolved: the first bad one is
raised as one line naming it (``error: ...``, exit code 2 on the command line)."""

from __future__ import annotations

import math
import os
from typing import Any

from toyaccel.errors import ToyaccelError
from toyaccel.limits import check_fits, training_memory
from toyaccel.options import (
    belongs_to,
    check_output_dir,
    check_seed,
    declared,
    flag,
    option_types,
    parse_hidden,
    parse_names,
)
from toyaccel.workloads import workload_names

# The optimizers compute in float32: a larger rate overflows in their first step.
MAX_LR = 3.4028234663852886e38
WORKERS_PER_CORE = 4  # DataLoader workers beyond this many per core only wait for a CPU


def check_options(config: Any) -> None:
    """Check every option of ``config`` (a TrainConfig) once; raise ToyaccelError naming the first bad one."""
    for f in declared(type(config)):
        value = getattr(config, f.name)
        kind, optional = option_types(type(config))[f.name]
        if kind is tuple or (value is None and (optional or f.metadata["resolved"])):
            continue  # tuples are parsed below; None: not given, and nothing gave it a default
        expected = {int: int, float: (int, float), bool: bool, str: str}[kind]
        if not isinstance(value, expected) or (kind in (int, float) and isinstance(value, bool)):
            raise ToyaccelError(f"{f.name} must be {kind.__name__}, got {value!r}")
        # --model's choices on the command line are toyaccel's own; in Python, any registered workload.
        choices = workload_names() if f.name == "model" else f.metadata["choices"]
        if choices and value is not None and value not in choices:
            raise ToyaccelError(f"{f.name} must be one of {', '.join(choices)}, got {value!r}")
    if config.hidden is not None:  # None: a GPT run, refused below if given one
        config.hidden = parse_hidden(config.hidden)
    if config.ignore_columns is not None:
        config.ignore_columns = parse_names(config.ignore_columns)
    positive = ("epochs", "batch_size", "grad_accum", "num_samples", "num_features", "eval_every")
    for name in positive:
        if getattr(config, name) is not None and getattr(config, name) < 1:
            raise ToyaccelError(f"{name} must be at least 1, got {getattr(config, name)}")
    non_negative = ("warmup_steps", "checkpoint_every", "keep_last", "log_every", "num_workers", "max_steps",
                    "eval_every_steps", "eval_batches")  # fmt: skip
    for name in non_negative:
        if getattr(config, name) < 0:
            raise ToyaccelError(f"{name} must be 0 or more, got {getattr(config, name)}")
    if config.num_classes is not None and config.num_classes < 2:
        raise ToyaccelError(f"num_classes must be at least 2, got {config.num_classes}")
    if not (math.isfinite(config.weight_decay) and config.weight_decay >= 0):
        raise ToyaccelError(f"weight_decay must be 0 or positive, got {config.weight_decay}")
    if config.lr is None or not (math.isfinite(config.lr) and config.lr > 0):
        raise ToyaccelError(f"lr must be a positive number, got {config.lr}")
    if config.lr > MAX_LR:
        raise ToyaccelError(f"lr must be at most {MAX_LR:.4g} (float32's largest number), got {config.lr:g}")
    check_seed(config.seed, "seed")
    most_workers = WORKERS_PER_CORE * (os.cpu_count() or 1)
    if config.num_workers > most_workers:
        raise ToyaccelError(
            f"num_workers must be at most {most_workers} ({WORKERS_PER_CORE} x the {os.cpu_count() or 1} "
            f"cores of this machine), got {config.num_workers}"
        )
    if not (math.isfinite(config.max_grad_norm) and config.max_grad_norm >= 0):
        raise ToyaccelError(f"max_grad_norm must be 0 (off) or positive, got {config.max_grad_norm}")
    if not 0.0 <= config.val_fraction < 1.0:
        raise ToyaccelError(f"val_fraction must be in [0, 1), got {config.val_fraction}")
    if config.val_fraction and config.val_data:
        raise ToyaccelError("give either val_data or val_fraction, not both")
    if config.output_dir is not None:
        check_output_dir(config.output_dir)
    validate_workload(config)
    check_fits(training_memory(config), "the model and data")


def validate_workload(config: Any) -> None:
    # An option of another model family is refused, not silently ignored.
    given = [
        f for f in declared(type(config)) if not belongs_to(f, config.model) and getattr(config, f.name) is not None
    ]
    if given:
        owner = given[0].metadata["workload"]
        raise ToyaccelError(f"{flag(given[0].name)} is an option of --model {owner}, not of --model {config.model}")
    if config.model != "gpt":
        return
    for name in ("vocab_size", "context_length", "emb_dim", "n_heads", "n_layers", "stride"):
        if getattr(config, name) < 1:
            raise ToyaccelError(f"{name} must be at least 1, got {getattr(config, name)}")
    if config.emb_dim % config.n_heads:
        raise ToyaccelError(f"emb_dim ({config.emb_dim}) must be divisible by n_heads ({config.n_heads})")
    if not 0.0 <= config.drop_rate < 1.0:
        raise ToyaccelError(f"drop_rate must be in [0, 1), got {config.drop_rate}")
    if config.tokenizer == "bpe" and config.vocab_size < 256:
        raise ToyaccelError(f"vocab_size must be at least 256 for the byte-level BPE, got {config.vocab_size}")
