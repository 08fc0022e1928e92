"""What the engine trains: the typed interface every workload implements.

A workload is a subclass of ``Workload`` registered by name (toyaccel.workloads: ``register_workload``).
The engine calls only what is declared here; the abstract methods are what every workload must give,
the others have defaults that suit a model scored by its training loss alone.

Imports nothing heavy: the registry, and with it the command line's option errors, needs no torch.
"""

from __future__ import annotations

import abc
from typing import TYPE_CHECKING, Any

from toyaccel.errors import ToyaccelError

if TYPE_CHECKING:
    import torch


class Workload(abc.ABC):
    """One model family and its data. ``config`` is the run's TrainConfig, ``data`` what ``load_data``
    returned: an object with ``train`` and ``val`` (None for no validation set) datasets, each with
    ``__len__`` and ``__getitems__(indices)`` returning a collated ``(inputs, targets)`` batch, and a
    ``fingerprint()`` that changes when any of their values does (a resume must see the same data)."""

    name: str = ""  # the registry's key: what --model / fit(model=...) names
    MODEL_KEYS: tuple[str, ...] = ()  # config.json's "model" section must hold these (read_run_config checks)
    # What the options left unset mean for this workload (its data source, optimizer, lr, ...), for a
    # workload registered from outside toyaccel.
    option_defaults: dict[str, Any] = {}

    # --- what every workload gives -------------------------------------------------------------
    @abc.abstractmethod
    def load_data(self, config) -> Any:
        """The training and validation sets (see the class docstring); raises ToyaccelError on bad input."""

    @abc.abstractmethod
    def build_model(self, config, data) -> torch.nn.Module:
        """The model to train, freshly initialised (the engine seeds the global RNG just before)."""

    @abc.abstractmethod
    def model_shape(self, config, data) -> dict[str, Any]:
        """The dict config.json and checkpoints record for the model: all ``model_from_shape`` needs."""

    @abc.abstractmethod
    def model_from_shape(self, shape: dict[str, Any]) -> torch.nn.Module:
        """The model rebuilt from ``model_shape``'s dict (its weights are loaded afterwards)."""

    @abc.abstractmethod
    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The training loss of one batch: the mean over its samples."""

    # --- optional hooks -----------------------------------------------------------------------
    def uses_dropout(self, config) -> bool:
        """Whether the forward pass draws random numbers (each process then draws from its own stream)."""
        return False

    def evaluator(self, accelerator, config, data, placement):
        """What scores the model at an epoch's end (or every --eval-every-steps): a function of the model
        returning, per set ("train" and "val" where there is one), a dict with at least "loss", over the set's
        first ``toyaccel.engine.evaluation.eval_count(len(set), config)`` samples. By default the mean loss over
        every such sample, each counted once whatever the number of processes, the sets kept where ``placement``
        (toyaccel.engine.placement) keeps the training data."""
        from toyaccel.engine.evaluation import mean_loss_evaluator  # torch: not for the registry's importers

        return mean_loss_evaluator(accelerator, self.loss, data, placement, config)

    def epoch_fields(self, metrics: dict[str, dict[str, Any]]) -> dict[str, Any]:
        """What an epoch's log line and metrics.jsonl record carry from the evaluation."""
        return {f"{name}_loss": m["loss"] for name, m in metrics.items()}

    def result_metrics(self, metrics: dict[str, dict[str, Any]], samples_per_s: float, config) -> dict[str, Any]:
        """The workload's own figures in results.json (and RunResult.metrics), beside the losses."""
        return {}

    def throughput(self, samples_per_s: float, config) -> dict[str, float]:
        """What a step's log line adds to samples/s (a language model's tokens/s)."""
        return {}

    def describe_data(self, data) -> str:
        """The data as read, for the start-up line."""
        val = f", val {len(data.val)}" if data.val is not None else ""
        return f"data: train {len(data.train)}{val}"

    def run_description(self, config, data) -> dict[str, Any]:
        """config.json's part besides the options: at least the "model" section (``model_shape``)."""
        return {"model": self.model_shape(config, data)}

    def check_run_description(self, saved: dict[str, Any]) -> None:
        """Raise ToyaccelError (its caller names the file) where a saved config.json's sections cannot be
        this workload's run; by default, where its model section lacks one of MODEL_KEYS."""
        missing = [key for key in self.MODEL_KEYS if key not in saved["model"]]
        if missing:
            raise ToyaccelError(f"model: {missing[0]} is missing")

    def save_extras(self, output_dir: str, data) -> None:  # noqa: B027 - optional: most workloads save none
        """Files beside the weights that loading the model needs (a tokenizer); none by default."""

    def after_epoch(self, accelerator, model, config, data) -> dict[str, Any]:
        """Run on every process after each epoch's evaluation; what it returns joins the epoch's record."""
        return {}
