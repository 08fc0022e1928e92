"""The book's Appendix A workload: the NeuralNetwork classifier on tabular data (toy, synthetic or CSV)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from toyaccel.config import TrainConfig
from toyaccel.data import DataBundle, load_data  # noqa: F401 - load_data is this workload's data source
from toyaccel.model import NeuralNetwork

EVAL_BATCH_SIZE = 256
MODEL_KEYS = ("num_inputs", "num_outputs", "hidden")  # config.json's "model" section


def build_model(config: TrainConfig, data: DataBundle) -> NeuralNetwork:
    return NeuralNetwork(data.num_features, data.num_classes, config.hidden)


def model_shape(config: TrainConfig, data: DataBundle) -> dict[str, Any]:
    """What NeuralNetwork(...) needs: the input and output sizes come from the data."""
    return {"num_inputs": data.num_features, "num_outputs": data.num_classes, "hidden": list(config.hidden)}


def model_from_shape(shape: dict[str, Any]) -> NeuralNetwork:
    return NeuralNetwork(shape["num_inputs"], shape["num_outputs"], tuple(shape["hidden"]))


def loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, labels)


def uses_dropout(config: TrainConfig) -> bool:
    return False


def eval_batch_size(config: TrainConfig) -> int:
    return max(EVAL_BATCH_SIZE, config.batch_size)


@torch.no_grad()
def evaluate(accelerator, model, loader) -> dict[str, Any]:
    """Loss, accuracy and confusion matrix over the whole dataset, each sample counted once."""
    model.eval()
    num_classes = None
    loss_sum = torch.zeros((), device=accelerator.device, dtype=torch.float64)
    confusion = None
    for features, labels in loader:
        logits = model(features)
        # gather_for_metrics drops the samples accelerate repeated to give every process a full batch.
        logits, labels = accelerator.gather_for_metrics((logits, labels))
        if confusion is None:
            num_classes = logits.shape[1]
            confusion = torch.zeros(num_classes * num_classes, device=accelerator.device, dtype=torch.int64)
        loss_sum += F.cross_entropy(logits.float(), labels, reduction="sum")
        confusion += torch.bincount(labels * num_classes + logits.argmax(dim=1), minlength=num_classes**2)
    model.train()
    confusion = confusion.view(num_classes, num_classes).cpu()
    count = int(confusion.sum())
    return {
        "loss": loss_sum.item() / count,
        "accuracy": int(confusion.diag().sum()) / count,
        "count": count,
        "confusion": confusion.tolist(),  # rows: true class, columns: predicted class
    }


def epoch_fields(metrics: dict[str, dict[str, Any]]) -> dict[str, Any]:
    record = {}
    for name, m in metrics.items():
        record[f"{name}_loss"], record[f"{name}_acc"] = m["loss"], m["accuracy"]
    return record


def result_metrics(metrics: dict[str, dict[str, Any]], samples_per_s: float, config: TrainConfig) -> dict[str, Any]:
    return {
        "train_accuracy": metrics["train"]["accuracy"],
        "val_accuracy": metrics["val"]["accuracy"] if "val" in metrics else None,
    }


def run_description(config: TrainConfig, data: DataBundle) -> dict[str, Any]:
    """config.json's part: enough to rebuild the model and its input scaling without toyaccel's pickles."""
    return {
        "model": model_shape(config, data),
        "data": {
            "feature_names": data.feature_names,
            "label_column": config.label_column,
            "num_classes": data.num_classes,
            "mean": data.mean,
            "std": data.std,
        },
    }


def save_extras(output_dir: str, data: DataBundle) -> None:
    """Nothing besides the weights: config.json carries the scaling."""


def after_epoch(accelerator, model, config: TrainConfig, data: DataBundle) -> dict[str, Any]:
    return {}
