"""The MLP's datasets: the book's toy set, synthetic blobs and CSV files (csv_reader.py, classes.py), split and
standardized as training and evaluation read them."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch.utils.data import Dataset

from toyaccel.errors import ToyaccelError
from toyaccel.workloads.mlp.classes import class_indices, index_classes, training_classes
from toyaccel.workloads.mlp.csv_reader import columns_present, read_table

if TYPE_CHECKING:
    from toyaccel.config import TrainConfig

# The book's Appendix A data (listing A.9.2).
TOY_X_TRAIN = [[-1.2, 3.1], [-0.9, 2.9], [-0.5, 2.6], [2.3, -1.1], [2.7, -1.5]]
TOY_Y_TRAIN = [0, 0, 0, 1, 1]
TOY_X_TEST = [[-0.8, 2.8], [2.6, -1.6]]
TOY_Y_TEST = [0, 1]


class ToyDataset(Dataset):
    """The book's ToyDataset, plus ``__getitems__`` so a DataLoader fetches a whole batch with one
    tensor index instead of collating one sample at a time (3-4x faster on small models)."""

    def __init__(self, features: torch.Tensor, labels: torch.Tensor):
        self.features = features
        self.labels = labels

    def __getitem__(self, index):
        return self.features[index], self.labels[index]

    def __getitems__(self, indices):
        # index_select copies whole rows; advanced indexing (features[indices]) gathers element by
        # element and costs ~5x more on a shuffled batch (~150 vs ~30 us for 256 x 32 floats).
        # On a GPU the training sampler's indices are already there (no copy); lists move with the data.
        indices = torch.as_tensor(indices, dtype=torch.long, device=self.features.device)
        return self.features.index_select(0, indices), self.labels.index_select(0, indices)

    def __len__(self) -> int:
        return self.labels.shape[0]


@dataclass
class DataBundle:
    train: ToyDataset
    val: ToyDataset | None
    num_features: int
    num_classes: int
    feature_names: list[str]
    classes: list[str] = field(default_factory=list)  # class names in output order ("0", "1", ... for numbers)
    source: str = ""  # where the training rows came from, in words
    rows_read: int = 0  # rows of that source, before any validation split
    val_source: str = ""  # where the validation rows came from, in words ("" for none)
    mean: list[float] | None = None
    std: list[float] | None = None

    def fingerprint(self) -> str:
        """Changes when any training or validation value changes: a resume must see the same data."""
        h = hashlib.sha256()
        for ds in (self.train, self.val):
            if ds is not None:
                h.update(ds.features.numpy().tobytes())
                h.update(ds.labels.numpy().tobytes())
        return h.hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# Loading


def load_data(config: TrainConfig) -> DataBundle:
    """Training and validation sets for ``config``; raises ToyaccelError for any bad input."""
    classes = index_classes(config.num_classes or 2)
    source = None
    if config.data == "toy":
        train = ToyDataset(torch.tensor(TOY_X_TRAIN), torch.tensor(TOY_Y_TRAIN))
        book_test_set = ToyDataset(torch.tensor(TOY_X_TEST), torch.tensor(TOY_Y_TEST))
        val = None if config.val_data or config.val_fraction else book_test_set
        names = ["x1", "x2"]
    elif config.data == "synthetic":
        train = synthetic_blobs(config.num_samples, config.num_features, config.num_classes or 2, config.seed)
        val, names = None, [f"x{i + 1}" for i in range(config.num_features)]
    elif config.data and not Path(config.data).exists():  # a typo of toy or synthetic reads as a path
        raise ToyaccelError(f"{config.data}: no such file (--data takes toy, synthetic or the path of a CSV file)")
    else:
        source = read_table(config.data, config.label_column, ignore=config.ignore_columns, training=True)
        classes = training_classes(source, config.num_classes)
        train, names, val = ToyDataset(source.features, class_indices(source, classes)), source.feature_names, None
    if config.val_data:
        ignore = columns_present(config.val_data, config.ignore_columns)  # a validation file may lack an id column
        val_table = read_table(config.val_data, config.label_column, ignore=ignore, training=True)
        if val_table.feature_names != names:
            raise ToyaccelError(
                f"{config.val_data}: feature columns {val_table.feature_names} differ from the training data's {names}"
            )
        if source is None:  # toy or synthetic training data: classes are numbers 0..K-1
            classes = index_classes(max(len(classes), int(train.labels.max()) + 1))
        val = ToyDataset(val_table.features, class_indices(val_table, classes))
    rows_read = len(train)
    if config.val_fraction:
        train, val = split(train, config.val_fraction, config.seed)
    if source is None:  # toy or synthetic training data: classes are numbers 0..K-1
        num_classes = check_labels(train, val, config)
        classes = index_classes(num_classes)
    else:
        num_classes = len(classes.names)
    bundle = DataBundle(
        train, val, train.features.shape[1], num_classes, names, classes=classes.names,
        source=source_words(config), rows_read=rows_read, val_source=val_source_words(config, val),
    )  # fmt: skip
    if config.standardize:
        standardize(bundle)
    return bundle


def source_words(config: TrainConfig) -> str:
    if config.data == "toy":
        return "the book's toy set"
    if config.data == "synthetic":
        return f"synthetic blobs (seed {config.seed})"
    return config.data


def val_source_words(config: TrainConfig, val: ToyDataset | None) -> str:
    if val is None:
        return ""
    if config.val_fraction:
        return f"{config.val_fraction:g} of the rows held out"
    return config.val_data or "the book's test set"


def synthetic_blobs(num_samples: int, num_features: int, num_classes: int, seed: int) -> ToyDataset:
    """Gaussian blobs around seeded class centres; its own generator leaves the global RNG alone."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(num_classes, num_features, generator=g) * 3.0
    labels = torch.randint(0, num_classes, (num_samples,), generator=g)
    features = centres[labels] + torch.randn(num_samples, num_features, generator=g)
    return ToyDataset(features, labels)


def split(ds: ToyDataset, val_fraction: float, seed: int) -> tuple[ToyDataset, ToyDataset]:
    n = len(ds)
    n_val = max(1, round(n * val_fraction))
    if n_val >= n:
        raise ToyaccelError(f"val_fraction {val_fraction} leaves no training rows out of {n}")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    val_idx, train_idx = order[:n_val].sort().values, order[n_val:].sort().values
    return ToyDataset(*ds.__getitems__(train_idx)), ToyDataset(*ds.__getitems__(val_idx))


def check_labels(train: ToyDataset, val: ToyDataset | None, config: TrainConfig) -> int:
    """The number of classes: given (the CSV readers checked each label against it), or one more than
    the largest label seen."""
    largest = int(max(train.labels.max(), val.labels.max() if val is not None else 0))
    if config.num_classes is not None:
        if largest >= config.num_classes:
            raise ToyaccelError(f"label {largest} is out of range for num_classes={config.num_classes}")
        return config.num_classes
    rows = len(train) + (len(val) if val is not None else 0)
    if largest + 1 > max(2, rows):
        # Almost always the wrong column (an id, a year, a price): the model would get one output per
        # number up to it.
        where = config.data if int(train.labels.max()) == largest else config.val_data or config.data
        raise ToyaccelError(
            f"{where}: the largest label, {largest}, would mean {largest + 1} classes for {rows} rows; labels must "
            f"be class numbers 0..K-1 (check --label-column, or set --num-classes if this is intended)"
        )
    return max(2, largest + 1)


def standardize(bundle: DataBundle) -> None:
    """Scale features with training statistics only, so validation data stays unseen."""
    mean = bundle.train.features.mean(0)
    std = bundle.train.features.std(0, unbiased=False)
    std = torch.where(std > 0, std, torch.ones_like(std))
    bundle.mean, bundle.std = mean.tolist(), std.tolist()
    for ds in (bundle.train, bundle.val):
        if ds is not None:
            ds.features = apply_standardization(ds.features, bundle.mean, bundle.std)


def apply_standardization(features: torch.Tensor, mean: list[float] | None, std: list[float] | None) -> torch.Tensor:
    if mean is None or std is None:
        return features
    return (features - torch.tensor(mean)) / torch.tensor(std)


def training_sample(dataset: ToyDataset, rows: int, seed: int) -> ToyDataset:
    """The training rows that epoch-end metrics score: all of them, or a fixed seeded sample of ``rows``
    (its own generator: the global RNG, which orders the epochs, is left alone)."""
    if len(dataset) <= rows:
        return dataset
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))
    return ToyDataset(*dataset.__getitems__(order[:rows].sort().values))
