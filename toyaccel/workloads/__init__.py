"""Workloads: what is trained. The training loop, checkpoints, command lines and inference are shared;
each workload is one module that provides the rest:

``load_data(config)``
    the training and validation sets (datasets with ``__len__`` and ``__getitems__`` returning a
    collated ``(inputs, targets)`` batch) and ``fingerprint()``; raises ToyaccelError on bad input.
``build_model(config, data)``, ``model_shape(config, data)``, ``model_from_shape(shape)``
    the model, the dict config.json and checkpoints record for it, and the model rebuilt from that dict.
``loss(outputs, targets)``
    the training loss of one batch.
``uses_dropout(config)``
    whether the forward pass draws random numbers (each process then draws its own, see training.py).
``evaluator(accelerator, config, data)``, ``epoch_fields(metrics)``, ``result_metrics(metrics, samples_per_s,
config)``, ``throughput(samples_per_s, config)``
    a function that scores the model on the training and validation sets (each sample counted once),
    what an epoch's log line and results.json carry, and the throughput a step's log line adds (tokens/s).
``describe_data(data)``, ``run_description(config, data)``, ``save_extras(output_dir, data)``,
``after_epoch(accelerator, model, config, data)``
    the data as read (the start-up line), config.json's model and data sections, files beside the
    weights (a tokenizer), and what the main process does after each epoch's evaluation (a sample).
"""

from __future__ import annotations

import importlib
from types import ModuleType

from toyaccel.errors import ToyaccelError

WORKLOADS = {"mlp": "toyaccel.workloads.mlp", "gpt": "toyaccel.workloads.gpt"}


def get_workload(name: str) -> ModuleType:
    if name not in WORKLOADS:
        raise ToyaccelError(f"unknown model {name!r}; choose one of {', '.join(WORKLOADS)}")
    return importlib.import_module(WORKLOADS[name])


def workload_of_run(saved: dict) -> str:
    """The workload of a saved run's config.json (runs saved before there were two are MLP runs)."""
    return saved.get("config", {}).get("model") or "mlp"
