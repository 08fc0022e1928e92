"""The optimizer side of the loop: the book's optimizers, the learning-rate schedule, stepping the
optimizer directly, and the dropout RNG stream each process draws from."""

from __future__ import annotations

import contextlib
import hashlib
import math
from typing import Any

import torch
from accelerate.utils import DistributedType


def learning_rate(config, step: int, total_steps: int) -> float:
    """The rate for optimizer step ``step`` (0-based). A function of the global step alone, so it is
    the same on any number of processes (accelerate's prepared schedulers step once per process)."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, total_steps - config.warmup_steps)
    if config.lr_schedule == "cosine":
        return config.lr * 0.5 * (1.0 + math.cos(math.pi * progress))
    if config.lr_schedule == "linear":
        return config.lr * (1.0 - progress)
    return config.lr


def build_optimizer(config, model: torch.nn.Module) -> torch.optim.Optimizer:
    """The book's optimizers: SGD (Appendix A) or AdamW with weight decay on every parameter (chapter 5)."""
    if config.optimizer == "adamw":
        # fused: one kernel for all parameters (the book's bonus "fused AdamW"), same math; on CPU too,
        # where it saves ~8% of a small GPT's step. Not with fp16's gradient scaler.
        fused = config.mixed_precision != "fp16"
        decay = config.weight_decay
        return torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=decay, fused=fused or None)
    if config.weight_decay:
        return torch.optim.SGD(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.SGD(model.parameters(), lr=config.lr)


@contextlib.contextmanager
def own_random_stream(seed: int, process_index: int, global_step: int, micro_step: int):
    """Dropout masks from a stream of this process's own, leaving the shared RNG as it was.

    Every process holds the same global RNG state on purpose: it draws each epoch's data order. Dropout
    drawing from it would give every process the same masks, and would shift the data order by an
    amount that depends on the batch each process holds (so on the world size). Instead each forward
    pass is seeded from (seed, process, step, micro-step): reproducible, exact on resume (no state to
    save), different on every process.
    """
    cpu_state = torch.get_rng_state()
    cuda_states = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    key = hashlib.blake2b(f"{seed}/{process_index}/{global_step}/{micro_step}".encode(), digest_size=8).digest()
    torch.manual_seed(int.from_bytes(key, "little") >> 1)
    try:
        yield
    finally:
        torch.set_rng_state(cpu_state)
        if cuda_states is not None:
            torch.cuda.set_rng_state_all(cuda_states)


def optimizer_to_step(accelerator, optimizer):
    """What the loop calls ``step``/``zero_grad`` (and, with one micro-step per step, ``backward``) on.

    AcceleratedOptimizer costs ~50 us a step in package look-ups (shared/notes/perf-findings.md),
    a third of a small model's step. Its other jobs are the fp16 gradient scaler, XLA, and skipping
    steps while accumulating; we step only when ``sync_gradients`` is set, so outside XLA stepping
    the wrapped optimizer directly, through the scaler under fp16, is exactly equivalent.
    """
    if accelerator.distributed_type == DistributedType.XLA:
        return optimizer
    return DirectStepper(optimizer.optimizer, accelerator.scaler)


class DirectStepper:
    """The optimizer, stepped as AcceleratedOptimizer steps it when gradients are in sync: through
    the GradScaler under fp16 (its one host synchronisation per step, the inf check, is the only one
    on that path), plainly otherwise."""

    def __init__(self, optimizer: torch.optim.Optimizer, scaler=None):
        self.optimizer, self.scaler = optimizer, scaler

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.optimizer.param_groups

    def backward(self, loss: torch.Tensor) -> None:
        """accelerator.backward with nothing to accumulate: scale the loss under fp16."""
        (loss if self.scaler is None else self.scaler.scale(loss)).backward()

    def step(self) -> None:
        if self.scaler is None:
            self.optimizer.step()
        else:
            self.scaler.step(self.optimizer)
            self.scaler.update()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)
