"""Evaluate and predict with a saved run, reading only ``model.safetensors`` and ``config.json`` (no pickle).

``evaluate_run`` runs under ``accelerate launch`` like training does: every process scores its share of the
rows and one all-reduce makes the loss, accuracy and confusion matrix those of the whole data set.
``predict_file`` is a single process job: the model is small and the output is one file.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from toyaccel.config import TrainConfig, build_config
from toyaccel.engine.launch import launched_world_size
from toyaccel.engine.placement import choose_placement
from toyaccel.engine.run_dir import write_atomic
from toyaccel.errors import ToyaccelError
from toyaccel.saved import load_model, read_run_config
from toyaccel.workloads import workload_of_run
from toyaccel.workloads.mlp.classes import Classes, class_indices, saved_classes
from toyaccel.workloads.mlp.csv_reader import columns_present, read_table
from toyaccel.workloads.mlp.data import TOY_X_TEST, TOY_Y_TEST, ToyDataset, apply_standardization, load_data
from toyaccel.workloads.mlp.model import NeuralNetwork
from toyaccel.workloads.mlp.workload import EVAL_BATCH_SIZE, evaluate


@dataclass
class SavedRun:
    """A trained model and what ``config.json`` says about the data it expects."""

    run_dir: str
    model: NeuralNetwork
    saved: dict[str, Any]  # config.json

    @property
    def data_info(self) -> dict[str, Any]:
        return self.saved.get("data", {})

    @property
    def num_inputs(self) -> int:
        return self.saved["model"]["num_inputs"]

    @property
    def num_classes(self) -> int:
        return self.saved["model"]["num_outputs"]

    @property
    def feature_names(self) -> list[str]:
        return self.data_info.get("feature_names") or [f"x{i + 1}" for i in range(self.num_inputs)]

    @property
    def label_column(self) -> str:
        return self.data_info.get("label_column") or "label"

    @property
    def classes(self) -> Classes:
        return saved_classes(self.data_info.get("classes"), self.num_classes)

    @property
    def ignore_columns(self) -> list[str]:
        return list(self.data_info.get("ignore_columns") or [])

    def standardize(self, features: torch.Tensor) -> torch.Tensor:
        """The training run's feature scaling, from the mean and std it saved."""
        return apply_standardization(features, self.data_info.get("mean"), self.data_info.get("std"))


def gpt_workload():
    from toyaccel.workloads.gpt import workload as gpt

    return gpt


def load_run(run_dir: str | Path) -> SavedRun:
    saved = read_run_config(run_dir)
    if workload_of_run(saved) != "mlp":
        raise ToyaccelError(
            f"{run_dir} holds a {workload_of_run(saved)} run: use toyaccel-generate or toyaccel-evaluate"
        )
    return SavedRun(str(run_dir), load_model(run_dir), saved)


# ---------------------------------------------------------------------------------------------
# Data to score


def evaluation_data(
    run: SavedRun, data: str | None, label_column: str | None = None, ignore_columns: tuple[str, ...] = ()
) -> tuple[ToyDataset, str]:
    """Labelled rows for ``run`` (standardized as in training) and a few words saying what they are.

    ``data``: None for the run's own validation set (what ``results.json`` reports), ``toy`` for the
    book's test set, or a CSV path with the model's feature columns and a label column.
    """
    if data is None:
        features, labels = run_validation_set(run)
        description = "the run's validation set"
    elif data == "toy":
        features, labels = book_test_features(run), torch.tensor(TOY_Y_TEST)
        description = "the book's test set"
    elif data == "synthetic":
        raise ToyaccelError(
            "--data synthetic: leave out --data to evaluate on the run's own validation rows (a synthetic run "
            "has them when trained with --val-fraction), or pass a CSV file"
        )
    else:
        label = label_column or run.label_column
        if not columns_present(data, (label,)):
            raise ToyaccelError(
                f"{data}: no label column '{label}': evaluation needs labels (name their column with --label-column); "
                "for predictions on unlabelled rows use toyaccel-predict"
            )
        table = read_table(data, label, run.feature_names, ignore=ignore_columns)
        features, labels = table.features, class_indices(table, run.classes)
        description = data
    return ToyDataset(run.standardize(features), labels), f"{description} ({labels.shape[0]} rows)"


def run_validation_set(run: SavedRun) -> tuple[torch.Tensor, torch.Tensor]:
    """Rebuild the run's validation rows from its saved options, unscaled (the saved scaling is applied after)."""
    options = {k: v for k, v in run.saved.get("config", {}).items() if k in TrainConfig.TRAINING_FIELDS}
    config = build_config(None, **{**options, "standardize": False})
    saved = Path(run.run_dir) / "config.json"
    for path in (config.data, config.val_data):
        if path and path not in ("toy", "synthetic") and not Path(path).exists():
            raise ToyaccelError(f"{saved}: the run's data {path} is gone (moved or deleted); pass --data FILE.csv")
    try:
        bundle = load_data(config)
    except ToyaccelError:
        # The files config.json names may be anything by now (an edited config.json can name /etc/passwd):
        # what they hold is not quoted, as the messages about a user's own --data do.
        files = " and ".join(p for p in (config.data, config.val_data) if p and p not in ("toy", "synthetic"))
        raise ToyaccelError(
            f"{saved}: the run's data ({files}) no longer reads as the rows it was trained on (changed, replaced, "
            "or config.json edited); pass --data FILE.csv to evaluate on a file"
        ) from None
    if bundle.val is None:
        raise ToyaccelError(
            f"{run.run_dir} was trained without validation data; pass --data toy or --data FILE.csv to evaluate"
        )
    return bundle.val.features, bundle.val.labels


def book_test_features(run: SavedRun) -> torch.Tensor:
    if run.num_inputs != len(TOY_X_TEST[0]):
        raise ToyaccelError(
            f"--data toy: the book's test set has {len(TOY_X_TEST[0])} features, the model in {run.run_dir} "
            f"takes {run.num_inputs}"
        )
    return torch.tensor(TOY_X_TEST)


def prediction_features(
    run: SavedRun, data: str, ignore_columns: tuple[str, ...] | None = None
) -> tuple[torch.Tensor, dict[str, list[str]]]:
    """Feature rows to predict on (standardized as in training), and the text of the ignored columns to
    copy into predictions.csv: ``ignore_columns``, or by default those of the training run that the file has.
    A label column may be present or not."""
    if data == "toy":
        return run.standardize(book_test_features(run)), {}
    if ignore_columns is None:
        ignore_columns = columns_present(data, tuple(run.ignore_columns))
    table = read_table(data, None, run.feature_names, ignore=ignore_columns, keep=ignore_columns)
    return run.standardize(table.features), table.kept


# ---------------------------------------------------------------------------------------------
# Evaluate


def evaluate_run(
    run_dir: str | Path,
    data: str | None = None,
    label_column: str | None = None,
    batch_size: int | None = None,
    ignore_columns: tuple[str, ...] = (),
) -> dict[str, Any]:
    """Loss, accuracy and confusion matrix of a saved model; the same on every process of a launch."""
    from toyaccel.engine.accelerator import on_accelerator  # accelerate is slow to import

    if workload_of_run(read_run_config(run_dir)) == "gpt":
        return gpt_workload().evaluate_text_run(run_dir, data, batch_size)
    batch_size = EVAL_BATCH_SIZE if batch_size is None else batch_size
    config = build_config(None, batch_size=batch_size, output_dir=str(run_dir))
    # Bad input fails here, on every process, before any process waits for another.
    run = load_run(run_dir)
    dataset, description = evaluation_data(run, data, label_column, ignore_columns)
    metrics = on_accelerator(config, evaluate_prepared, run.model, dataset, config)
    return {"data": description, "classes": run.classes.names, **metrics}


def evaluate_prepared(accelerator, model: NeuralNetwork, dataset: ToyDataset, config: TrainConfig) -> dict[str, Any]:
    """The training loop's evaluation of the prepared model, the rows kept where training keeps them."""
    num_classes = model.layers[-1].out_features
    dataset = choose_placement([dataset], accelerator.device, 0).place(dataset)
    return evaluate(accelerator, accelerator.prepare(model), dataset, num_classes, config.batch_size)


def format_evaluation(metrics: dict[str, Any]) -> str:
    """``loss 0.016851 | accuracy 1.000 (2/2)`` and the confusion matrix, rows true and columns predicted."""
    if "perplexity" in metrics:
        return gpt_workload().format_evaluation(metrics)
    confusion = metrics["confusion"]
    names = metrics.get("classes") or [str(k) for k in range(len(confusion))]
    correct = sum(confusion[i][i] for i in range(len(confusion)))
    width = max(6, *(len(str(v)) for row in confusion for v in row), *(len(name) + 5 for name in names))
    first = max(8, *(len(name) + 6 for name in names))
    lines = [
        f"evaluated on {metrics['data']}",
        f"loss {metrics['loss']:.6f} | accuracy {metrics['accuracy']:.4f} ({correct}/{metrics['count']})",
        "confusion matrix (rows: true class, columns: predicted class):",
        " " * first + "".join(f"{'pred ' + name:>{width + 2}}" for name in names),
    ]
    for name, row in zip(names, confusion):
        lines.append(f"{'true ' + name:<{first}}" + "".join(f"{v:>{width + 2}}" for v in row))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Predict


@torch.no_grad()
def class_probabilities(model: NeuralNetwork, features: torch.Tensor) -> torch.Tensor:
    return torch.softmax(model(features).double(), dim=1)


def predict_file(
    run_dir: str | Path,
    data: str,
    output: str | Path,
    overwrite: bool = False,
    ignore_columns: tuple[str, ...] | None = None,
) -> int:
    """Write the ignored columns (ids), ``predicted`` and one ``prob_<class>`` per class for every data row
    of ``data`` to ``output``; return the row count."""
    if launched_world_size() > 1:
        raise ToyaccelError(
            "predict runs in one process: start it with python or toyaccel-predict, not a multi-process launch"
        )
    output = Path(output)
    if output.exists() and not overwrite:
        raise ToyaccelError(f"{output} already exists; pass --overwrite to replace it")
    if output.is_dir():
        raise ToyaccelError(f"{output} is a directory; --output takes a file name")
    run = load_run(run_dir)
    features, kept = prediction_features(run, data, ignore_columns)
    probabilities = class_probabilities(run.model, features)
    text = predictions_csv(probabilities, run.classes.names, kept)
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(output, lambda p: Path(p).write_text(text))
    except OSError as e:
        raise ToyaccelError(f"cannot write {output}: {e.strerror or e}") from None
    return probabilities.shape[0]


def predictions_csv(
    probabilities: torch.Tensor, classes: list[str], kept: dict[str, list[str]] | None = None
) -> str:
    """One row per input row: the kept columns as they were, the most probable class's name, then each
    class's probability (9 digits: float32's)."""
    kept = kept or {}
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow([*kept, "predicted", *(f"prob_{name}" for name in classes)])
    kept_rows = zip(*kept.values()) if kept else iter(tuple, None)
    for ids, predicted, row in zip(kept_rows, probabilities.argmax(dim=1).tolist(), probabilities.tolist()):
        writer.writerow([*ids, classes[predicted], *(f"{p:.9g}" for p in row)])
    return buffer.getvalue()
