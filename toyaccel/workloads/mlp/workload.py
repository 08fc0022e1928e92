"""The book's Appendix A workload: the NeuralNetwork classifier on tabular data (toy, synthetic or CSV)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from toyaccel.engine.evaluation import eval_count
from toyaccel.engine.workload import Workload
from toyaccel.errors import ToyaccelError
from toyaccel.limits import check_fits, mlp_parameters
from toyaccel.options import check_count, parse_hidden
from toyaccel.workloads.mlp import EVAL_TRAIN_SAMPLE, inference
from toyaccel.workloads.mlp.data import DataBundle, ToyDataset, load_data, training_sample
from toyaccel.workloads.mlp.inference import EVAL_BATCH_SIZE, evaluate
from toyaccel.workloads.mlp.model import NeuralNetwork

if TYPE_CHECKING:
    from toyaccel.config import TrainConfig


class MLPWorkload(Workload):
    name = "mlp"
    MODEL_KEYS = ("num_inputs", "num_outputs", "hidden")  # config.json's "model" section
    eval_batch_size = EVAL_BATCH_SIZE

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

    # A saved run (toyaccel.inference): workloads/mlp/inference.py does the work.
    evaluation_set = staticmethod(inference.evaluation_set)
    evaluate_prepared = staticmethod(inference.evaluate_prepared)
    format_evaluation = staticmethod(inference.format_evaluation)
    predict = staticmethod(inference.predict)


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
