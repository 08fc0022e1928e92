"""The book's Appendix A workload: the NeuralNetwork classifier on tabular data (toy, synthetic or CSV)."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from toyaccel.config import EVAL_TRAIN_SAMPLE, TrainConfig, check_count, check_fits, mlp_parameters, parse_hidden
from toyaccel.data import DataBundle, ToyDataset, load_data, training_sample
from toyaccel.engine.batches import eval_batches
from toyaccel.engine.evaluation import eval_count
from toyaccel.engine.workload import Workload
from toyaccel.errors import ToyaccelError
from toyaccel.model import NeuralNetwork

# Scoring is a forward pass only: large batches amortise each layer's per-call cost (a 16k-row validation set:
# ~4 ms at 4096 rows a batch against ~10 ms at 256, on one CPU thread), and activations stay small.
EVAL_BATCH_SIZE = 4096


class MLPWorkload(Workload):
    name = "mlp"
    MODEL_KEYS = ("num_inputs", "num_outputs", "hidden")  # config.json's "model" section

    def load_data(self, config: TrainConfig) -> DataBundle:
        return load_data(config)

    def build_model(self, config: TrainConfig, data: DataBundle) -> NeuralNetwork:
        return NeuralNetwork(data.num_features, data.num_classes, config.hidden)

    def model_shape(self, config: TrainConfig, data: DataBundle) -> dict[str, Any]:
        """What NeuralNetwork(...) needs: the input and output sizes come from the data."""
        return {"num_inputs": data.num_features, "num_outputs": data.num_classes, "hidden": list(config.hidden)}

    def model_from_shape(self, shape: dict[str, Any]) -> NeuralNetwork:
        return NeuralNetwork(shape["num_inputs"], shape["num_outputs"], tuple(shape["hidden"]))

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, labels)

    def evaluator(self, accelerator, config: TrainConfig, data: DataBundle, placement):
        """What scores the model at an epoch's end: the training rows (a fixed sample of them unless
        --eval-train full) and the validation rows, straight from the tensors (no loader to prepare), kept
        where ``placement`` (toyaccel.engine.placement) keeps the training data; with --eval-batches M, the
        first M x --batch-size rows of each."""
        sets = {name: leading_rows(placement.place(dataset), eval_count(len(dataset), config))
                for name, dataset in evaluation_sets(config, data).items()}  # fmt: skip
        return lambda model: evaluate_sets(accelerator, model, sets, data.num_classes, config)

    def epoch_fields(self, metrics: dict[str, dict[str, Any]]) -> dict[str, Any]:
        record = {}
        for name, m in metrics.items():
            record[f"{name}_loss"], record[f"{name}_acc"] = m["loss"], m["accuracy"]
        return record

    def result_metrics(self, metrics: dict[str, dict[str, Any]], samples_per_s: float, config: TrainConfig):
        return {
            "train_accuracy": metrics["train"]["accuracy"],
            "val_accuracy": metrics["val"]["accuracy"] if "val" in metrics else None,
        }

    def run_description(self, config: TrainConfig, data: DataBundle) -> dict[str, Any]:
        """config.json's part: enough to rebuild the model, its input scaling and its class names without
        toyaccel's pickles."""
        return {
            "model": self.model_shape(config, data),
            "data": {
                "feature_names": data.feature_names,
                "label_column": config.label_column,
                "ignore_columns": list(config.ignore_columns),
                "num_classes": data.num_classes,
                "classes": data.classes,
                "mean": data.mean,
                "std": data.std,
            },
        }

    def check_run_description(self, saved: dict[str, Any]) -> None:
        check_run_description(saved)

    def describe_data(self, data: DataBundle) -> str:
        """``data train.csv: 150 rows, 4 features (a, b, c, d), 3 classes: setosa, versicolor, virginica; train
        120, val 30 (0.2 of the rows held out)``"""
        words = f"data {data.source}: {data.rows_read} rows, {data.num_features} features ({few(data.feature_names)})"
        words += f", {data.num_classes} classes: {few(data.classes, 10)}; train {len(data.train)}"
        if data.val is not None:
            words += f", val {len(data.val)} ({data.val_source})"
        return words


def evaluation_sets(config: TrainConfig, data: DataBundle) -> dict[str, ToyDataset]:
    sample = config.eval_train == "sample"
    sets = {"train": training_sample(data.train, EVAL_TRAIN_SAMPLE, config.seed) if sample else data.train}
    if data.val is not None:
        sets["val"] = data.val
    return sets


def leading_rows(dataset: ToyDataset, count: int) -> ToyDataset:
    """The first ``count`` rows of ``dataset``, as views (no copy)."""
    return dataset if count == len(dataset) else ToyDataset(dataset.features[:count], dataset.labels[:count])


def evaluate_sets(accelerator, model, sets: dict[str, ToyDataset], num_classes: int, config: TrainConfig):
    batch_size = max(EVAL_BATCH_SIZE, config.batch_size)
    return {name: evaluate(accelerator, model, dataset, num_classes, batch_size) for name, dataset in sets.items()}


@torch.no_grad()
def evaluate(accelerator, model, dataset: ToyDataset, num_classes: int, batch_size: int = EVAL_BATCH_SIZE) -> dict:
    """Loss, accuracy and confusion matrix over the whole dataset, each sample counted once: every process
    scores its own share (``eval_batches``) and one all-reduce per pass sums the counts."""
    model.eval()
    loss_sum = torch.zeros((), device=accelerator.device, dtype=torch.float64)
    confusion = torch.zeros(num_classes * num_classes, device=accelerator.device, dtype=torch.int64)
    share = (accelerator.process_index, accelerator.num_processes)
    for features, labels in eval_batches(dataset, batch_size, accelerator.device, *share):
        logits = model(features)
        loss_sum += F.cross_entropy(logits.float(), labels, reduction="sum")
        confusion += torch.bincount(labels * num_classes + logits.argmax(dim=1), minlength=num_classes**2)
    model.train()
    totals = torch.cat([loss_sum.view(1), confusion.double()])  # counts below 2**53 stay exact as float64
    if accelerator.num_processes > 1:
        totals = accelerator.reduce(totals, "sum")
    totals = totals.cpu()
    confusion = totals[1:].long().view(num_classes, num_classes)
    count = int(confusion.sum())
    return {
        "loss": totals[0].item() / count,
        "accuracy": int(confusion.diag().sum()) / count,
        "count": count,
        "confusion": confusion.tolist(),  # rows: true class, columns: predicted class
    }


def check_run_description(saved: dict[str, Any]) -> None:
    """config.json's model and data sections, by the rules training options follow (its caller names the file)."""
    shape = saved["model"]
    num_inputs, num_outputs = shape.get("num_inputs"), shape.get("num_outputs")
    check_count("model: num_inputs", num_inputs, 1)
    check_count("model: num_outputs", num_outputs, 2)
    try:
        hidden = parse_hidden(shape.get("hidden"))
    except ToyaccelError as e:
        raise ToyaccelError(f"model: {e}") from None
    # The weights as read and the model they are copied into.
    check_fits(2 * 4 * mlp_parameters(num_inputs, hidden, num_outputs), "model: its weights")
    data = saved.get("data") or {}
    if not isinstance(data, dict):
        raise ToyaccelError(f"data must be a mapping, got {type(data).__name__}")
    names_of = {"feature_names": num_inputs, "classes": num_outputs}
    for key, count in names_of.items():
        names = data.get(key)
        if names in (None, []):
            continue
        if not (isinstance(names, list) and all(isinstance(n, str) for n in names)) or len(set(names)) != len(names):
            raise ToyaccelError(f"data: {key} must be a list of distinct names, got {names!r:.80}")
        if len(names) != count:
            raise ToyaccelError(f"data: {key} has {len(names)} names, the model has {count}")
    for key in ("mean", "std"):
        values = data.get(key)
        if values is None:
            continue
        numbers = isinstance(values, list) and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values
        )
        if not numbers or len(values) != num_inputs:
            raise ToyaccelError(f"data: {key} must be a list of {num_inputs} finite numbers, got {values!r:.80}")
        if key == "std" and min(values, default=1) <= 0:
            raise ToyaccelError(f"data: std must be positive, got {values!r:.80}")
    if (data.get("mean") is None) != (data.get("std") is None):
        raise ToyaccelError("data: mean and std go together: one of them is missing")
    if not isinstance(data.get("label_column") or "", str):
        raise ToyaccelError(f"data: label_column must be a column name, got {data['label_column']!r:.80}")
    ignore = data.get("ignore_columns") or []
    if not (isinstance(ignore, list) and all(isinstance(n, str) for n in ignore)):
        raise ToyaccelError(f"data: ignore_columns must be a list of column names, got {ignore!r:.80}")


def few(names: list[str], most: int = 6) -> str:
    return ", ".join(names[:most]) + (f", ... ({len(names) - most} more)" if len(names) > most else "")
