"""The default evaluation: the mean training loss over every sample of each set (or its first --eval-batches
batches), and how many samples of a set an evaluation during training scores."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from toyaccel.engine.batches import eval_shares, to_device

EVAL_BATCH_SIZE = 4096  # a forward pass only: large batches amortise each layer's per-call cost


def mean_loss_evaluator(accelerator, loss: Callable, data, placement, config):
    """A function of the model: {"train": {"loss": ...}, "val": {...}} (val where ``data`` has one), each
    sample scored once by one process and the sums all-reduced, so any number of processes agrees."""
    sets = {"train": data.train} if data.val is None else {"train": data.train, "val": data.val}
    placed = {name: Leading(placement.place(ds), eval_count(len(ds), config)) for name, ds in sets.items()}
    batch_size = max(EVAL_BATCH_SIZE, config.batch_size)
    return lambda model: {name: mean_loss(accelerator, model, ds, loss, batch_size) for name, ds in placed.items()}


@torch.no_grad()
def mean_loss(accelerator, model, dataset, loss: Callable, batch_size: int) -> dict[str, Any]:
    model.eval()
    total = torch.zeros((), device=accelerator.device, dtype=torch.float64)
    share = (accelerator.process_index, accelerator.num_processes)
    # Every process makes the same number of forward passes, empty ones included: a sharded model (FSDP)
    # needs every process in each.
    for low, high in eval_shares(len(dataset), batch_size, *share):
        inputs, targets = to_device(dataset.__getitems__(torch.arange(low, high)), accelerator.device)
        outputs = model(inputs)
        if high > low:
            total += loss(outputs.float(), targets).double() * (high - low)
    model.train()
    if accelerator.num_processes > 1:
        total = accelerator.reduce(total, "sum")
    return {"loss": total.item() / len(dataset), "count": len(dataset)}


def eval_count(num_samples: int, config) -> int:
    """How many samples of a set of ``num_samples`` an evaluation during training scores: all of them, or with
    --eval-batches M the first M x --batch-size, in the set's order. Counted in the batches of one process, not
    of the world, so the figure is the same on any number of processes (chapter 5's eval_iter)."""
    return min(num_samples, config.eval_batches * config.batch_size) if config.eval_batches else num_samples


class Leading:
    """The first ``count`` samples of ``dataset``, read through its ``__getitems__``."""

    def __init__(self, dataset, count: int):
        self.dataset, self.count = dataset, count

    def __len__(self) -> int:
        return self.count

    def __getitems__(self, indices):
        return self.dataset.__getitems__(indices)
