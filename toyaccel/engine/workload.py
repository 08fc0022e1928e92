"""What the engine trains: the typed interface every workload implements.

A workload is a subclass of ``Workload`` registered by name (toyaccel.workloads: ``register_workload``).
The engine calls only what is declared here; the abstract methods are what every workload must give,
the others have defaults that suit a model scored by its training loss alone.

Imports nothing heavy: the registry, and with it the command line's option errors, needs no torch.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from toyaccel.errors import ToyaccelError

if TYPE_CHECKING:
    import torch


@dataclass
class SavedRun:
    """A trained run read back (toyaccel.inference): what a workload's evaluate, predict and generate read."""

    run_dir: str  # as the user wrote it: messages name it so
    model: torch.nn.Module  # the saved weights loaded, in eval mode
    saved: dict[str, Any]  # its config.json, checked (toyaccel.saved.read_run_config)
    extras: Any = None  # what the workload's load_extras read beside the weights (a tokenizer)
    # The run's saved training options as its TrainConfig, keyword overrides applied: the top layer's
    # (toyaccel.saved.saved_config), handed down so that a workload imports nothing above it.
    rebuild_config: Callable[..., Any] | None = None


@dataclass(frozen=True)
class EvaluateRequest:
    """What toyaccel-evaluate asks for: ``data`` None for the run's own validation set; a ``batch_size`` of
    None for the workload's ``eval_batch_size``; the columns options for tabular data."""

    data: str | None = None
    batch_size: int | None = None
    label_column: str | None = None
    ignore_columns: tuple[str, ...] = ()


@dataclass(frozen=True)
class GenerateRequest:
    """What toyaccel-generate asks for: ``prompt`` continued by ``max_new_tokens`` tokens, greedy at
    temperature 0; ``context_length`` None for the model's own."""

    prompt: str
    max_new_tokens: int
    temperature: float = 0.0
    top_k: int | None = None
    seed: int = 123
    context_length: int | None = None


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
    eval_batch_size: int = 256  # samples per process per batch that toyaccel-evaluate scores by default

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

    def flops_per_sample(self, config) -> float | None:
        """The model FLOPs one training sample costs, forward and backward; None (the default) where not
        counted. Where it is, and the device is a known GPU, the engine adds ``mfu`` (samples/s x this over
        the world's dense bf16 peak) to the step records, metrics.jsonl and results.json."""
        return None

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

    def saved_shape_options(self, saved: dict[str, Any]) -> dict[str, Any] | None:
        """Training options that check a saved config.json's sections (after ``check_run_description``) as
        the same options given to a run are checked: the top layer validates them (its errors start
        "model: "). None, by default: no such check."""
        return None

    def save_extras(self, output_dir: str, data) -> None:  # noqa: B027 - optional: most workloads save none
        """Files beside the weights that loading the model needs (a tokenizer); none by default."""

    def after_epoch(self, accelerator, model, config, data) -> dict[str, Any]:
        """Run on every process after each epoch's evaluation; what it returns joins the epoch's record."""
        return {}

    # --- a saved run: toyaccel-evaluate, -predict and -generate (optional) --------------------
    # toyaccel.inference loads the run, refuses a launch where one process is meant, writes and prints;
    # these do the workload's part. A workload without one refuses that command (``offers``).

    def offers(self, method: str) -> bool:
        """Whether this workload gives ``method`` ("evaluation_set", "predict", "generate") itself."""
        return getattr(type(self), method) is not getattr(Workload, method)

    def load_extras(self, run_dir: str, saved: dict[str, Any]) -> Any:
        """What ``save_extras`` wrote, read back for a saved run (SavedRun.extras); None by default."""
        return None

    def evaluation_set(self, run: SavedRun, request: EvaluateRequest) -> tuple[Any, dict[str, Any]]:
        """The dataset toyaccel-evaluate scores, read by every process before any waits for another (bad
        input fails on all of them), and what the figures are reported with: at least "data", the set in
        words."""
        raise ToyaccelError(f"the {self.name} workload has no evaluation of a saved run")

    def evaluate_prepared(self, accelerator, model, dataset, config) -> dict[str, Any]:
        """The figures of ``model`` (not yet prepared) over ``dataset`` in batches of ``config.batch_size``,
        at least "loss": every sample once, the same on every process."""
        raise ToyaccelError(f"the {self.name} workload has no evaluation of a saved run")

    def format_evaluation(self, metrics: dict[str, Any]) -> str:
        """What toyaccel-evaluate prints."""
        return f"evaluated on {metrics['data']}\nloss {metrics['loss']:.6f}"

    def predict(self, run: SavedRun, data: str, ignore_columns: tuple[str, ...] | None) -> tuple[str, int]:
        """predictions.csv's text for every row of ``data``, and the row count."""
        raise ToyaccelError(f"the {self.name} workload has no predictions")

    def generate(self, run: SavedRun, request: GenerateRequest) -> str:
        """The prompt and its continuation."""
        raise ToyaccelError(f"the {self.name} workload generates no text")
