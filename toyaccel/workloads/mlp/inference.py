"""The MLP's part of toyaccel-evaluate and toyaccel-predict (toyaccel.inference is the shell): the rows to score
or predict, read and standardized as in training, the scoring itself, and predictions.csv's rows.

Scoring runs under ``accelerate launch`` like training does: every process scores its share of the rows and
one all-reduce makes the loss, accuracy and confusion matrix those of the whole data set.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from toyaccel.engine.batches import eval_batches
from toyaccel.engine.placement import choose_placement
from toyaccel.engine.workload import EvaluateRequest, SavedRun
from toyaccel.errors import ToyaccelError
from toyaccel.workloads.mlp.classes import Classes, class_indices, saved_classes
from toyaccel.workloads.mlp.csv_reader import columns_present, read_table
from toyaccel.workloads.mlp.data import TOY_X_TEST, TOY_Y_TEST, ToyDataset, apply_standardization, load_data
from toyaccel.workloads.mlp.model import NeuralNetwork

if TYPE_CHECKING:
    from toyaccel.config import TrainConfig

# Scoring is a forward pass only: large batches amortise each layer's per-call cost (a 16k-row validation set:
# ~4 ms at 4096 rows a batch against ~10 ms at 256, on one CPU thread), and activations stay small.
EVAL_BATCH_SIZE = 4096


class ClassifierRun(SavedRun):
    """A saved MLP run and what its ``config.json`` says about the data it expects."""

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


def evaluation_set(run: SavedRun, request: EvaluateRequest) -> tuple[ToyDataset, dict[str, Any]]:
    """toyaccel-evaluate's rows and what its figures are reported with: the rows in words and the class names."""
    run = ClassifierRun(**vars(run))
    dataset, description = evaluation_data(run, request.data, request.label_column, request.ignore_columns)
    return dataset, {"data": description, "classes": run.classes.names}


def evaluation_data(
    run: ClassifierRun, data: str | None, label_column: str | None = None, ignore_columns: tuple[str, ...] = ()
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


def run_validation_set(run: ClassifierRun) -> tuple[torch.Tensor, torch.Tensor]:
    """Rebuild the run's validation rows from its saved options, unscaled (the saved scaling is applied after)."""
    config = run.rebuild_config(standardize=False)
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


def book_test_features(run: ClassifierRun) -> torch.Tensor:
    if run.num_inputs != len(TOY_X_TEST[0]):
        raise ToyaccelError(
            f"--data toy: the book's test set has {len(TOY_X_TEST[0])} features, the model in {run.run_dir} "
            f"takes {run.num_inputs}"
        )
    return torch.tensor(TOY_X_TEST)


def prediction_features(
    run: ClassifierRun, data: str, ignore_columns: tuple[str, ...] | None = None
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


def evaluate_prepared(accelerator, model: NeuralNetwork, dataset: ToyDataset, config: TrainConfig) -> dict[str, Any]:
    """The training loop's evaluation of the prepared model, the rows kept where training keeps them."""
    num_classes = model.layers[-1].out_features
    dataset = choose_placement([dataset], accelerator.device, 0).place(dataset)
    return evaluate(accelerator, accelerator.prepare(model), dataset, num_classes, config.batch_size)


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


def format_evaluation(metrics: dict[str, Any]) -> str:
    """``loss 0.016851 | accuracy 1.000 (2/2)`` and the confusion matrix, rows true and columns predicted."""
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


def predict(run: SavedRun, data: str, ignore_columns: tuple[str, ...] | None) -> tuple[str, int]:
    """predictions.csv's text for every data row of ``data`` (the ignored columns (ids), ``predicted`` and one
    ``prob_<class>`` per class) and the row count."""
    run = ClassifierRun(**vars(run))
    features, kept = prediction_features(run, data, ignore_columns)
    probabilities = class_probabilities(run.model, features)
    return predictions_csv(probabilities, run.classes.names, kept), probabilities.shape[0]


@torch.no_grad()
def class_probabilities(model: NeuralNetwork, features: torch.Tensor) -> torch.Tensor:
    return torch.softmax(model(features).double(), dim=1)


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
