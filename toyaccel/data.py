"""Data sources (the book's toy set, synthetic blobs, CSV files) and the fast, resumable loaders."""

from __future__ import annotations

import csv
import hashlib
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, SequentialSampler

from toyaccel.config import TrainConfig
from toyaccel.errors import ToyaccelError

# The book's Appendix A data (listing A.9.2).
TOY_X_TRAIN = [[-1.2, 3.1], [-0.9, 2.9], [-0.5, 2.6], [2.3, -1.1], [2.7, -1.5]]
TOY_Y_TRAIN = [0, 0, 0, 1, 1]
TOY_X_TEST = [[-0.8, 2.8], [2.6, -1.6]]
TOY_Y_TEST = [0, 1]

FLOAT32_MAX = float(torch.finfo(torch.float32).max)
MAX_LABEL = 2**31 - 1  # far above any class count; keeps labels clear of int64 overflow


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


def dataset_tensors(dataset) -> dict[str, torch.Tensor]:
    """A dataset's tensor attributes (features and labels; token ids and window starts): what moves
    when the dataset is kept on a GPU."""
    return {name: value for name, value in vars(dataset).items() if isinstance(value, torch.Tensor)}


def dataset_device(dataset) -> torch.device:
    return next((t.device for t in dataset_tensors(dataset).values()), torch.device("cpu"))


def keep_batch(batch):
    """``__getitems__`` already returns a collated (features, labels) batch."""
    return batch


@dataclass
class DataBundle:
    train: ToyDataset
    val: ToyDataset | None
    num_features: int
    num_classes: int
    feature_names: list[str]
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
        train, names = read_csv(config.data, config.label_column, config.num_classes)
        val = None
    if config.val_data:
        val, val_names = read_csv(config.val_data, config.label_column, config.num_classes)
        if val_names != names:
            raise ToyaccelError(
                f"{config.val_data}: feature columns {val_names} differ from the training data's {names}"
            )
    if config.val_fraction:
        train, val = split(train, config.val_fraction, config.seed)
    num_classes = check_labels(train, val, config)
    bundle = DataBundle(train, val, train.features.shape[1], num_classes, names)
    if config.standardize:
        standardize(bundle)
    return bundle


def synthetic_blobs(num_samples: int, num_features: int, num_classes: int, seed: int) -> ToyDataset:
    """Gaussian blobs around seeded class centres; its own generator leaves the global RNG alone."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(num_classes, num_features, generator=g) * 3.0
    labels = torch.randint(0, num_classes, (num_samples,), generator=g)
    features = centres[labels] + torch.randn(num_samples, num_features, generator=g)
    return ToyDataset(features, labels)


def read_csv(path: str, label_column: str, num_classes: int | None = None) -> tuple[ToyDataset, list[str]]:
    """Training data: a header row, an integer label column and numeric feature columns (all the others)."""
    header, rows = read_rows(path)
    if label_column not in header:
        raise ToyaccelError(f"{path}: no label column '{label_column}' in header {header} (set --label-column)")
    names = [h for h in header if h != label_column]
    if not names:
        raise ToyaccelError(f"{path}: no feature columns besides '{label_column}'")
    features = parse_columns(path, header, rows, names)
    return ToyDataset(features, parse_labels(path, header, rows, label_column, num_classes)), names


def read_csv_columns(
    path: str, feature_names: list[str], label_column: str | None = None, num_classes: int | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The named feature columns (in that order) and, if asked for, the labels; other columns are ignored,
    so a file for a trained model may carry ids or notes, and may lack the label column for prediction."""
    header, rows = read_rows(path)
    missing = [name for name in feature_names if name not in header]
    if missing:
        raise ToyaccelError(
            f"{path}: missing feature column(s) {missing}; the model was trained on columns {feature_names}"
        )
    if label_column is not None and label_column not in header:
        raise ToyaccelError(f"{path}: no label column '{label_column}' in header {header} (set --label-column)")
    features = parse_columns(path, header, rows, feature_names)
    labels = parse_labels(path, header, rows, label_column, num_classes) if label_column is not None else None
    return features, labels


def read_rows(path: str) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """The header and every non-blank row with its row number as a spreadsheet shows it (the header is
    row 1), after checking that the file exists, is not empty and that every row has the header's length."""
    p = Path(path)
    if not path or not p.is_file():
        raise ToyaccelError(f"{path or repr(path)}: {'no such file' if not path or not p.exists() else 'not a file'}")
    rows = []
    try:
        # utf-8-sig: spreadsheet programs often start the file with a byte-order mark, which would
        # otherwise become part of the first column's name.
        with p.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            for row in reader:
                if any(cell.strip() for cell in row):  # skip blank lines, e.g. a trailing newline
                    rows.append((reader.line_num, row))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise ToyaccelError(f"{path}: cannot read as CSV: {e}") from None
    if not rows:
        raise ToyaccelError(f"{path}: file is empty (expected a header row and data rows)")
    (_, header), rows = rows[0], rows[1:]
    header = [h.strip() for h in header]
    for i, name in enumerate(header):
        if not name:
            raise ToyaccelError(f"{path}: column {i + 1} of the header has no name")
        if name in header[:i]:
            raise ToyaccelError(f"{path}: column name '{name}' appears twice in the header")
    if not rows:
        raise ToyaccelError(f"{path}: header only, no data rows")
    for row_no, row in rows:
        if len(row) != len(header):
            raise ToyaccelError(f"{path}: row {row_no} has {len(row)} columns, the header has {len(header)}")
    return header, rows


def parse_columns(path: str, header: list[str], rows: list[tuple[int, list[str]]], columns: list[str]) -> torch.Tensor:
    """The named columns as float32, naming the row and column of the first cell that is not a finite number."""
    at = [header.index(name) for name in columns]
    values = []
    for row_no, row in rows:
        values.append([parse_number(path, row_no, name, row[i]) for name, i in zip(columns, at)])
    return torch.tensor(values, dtype=torch.float32)


def parse_number(path: str, row_no: int, column: str, cell: str) -> float:
    try:
        value = float(cell)
    except ValueError:
        raise ToyaccelError(f"{path}: row {row_no}, column '{column}': not a number: {cell.strip()!r}") from None
    if not math.isfinite(value):
        raise ToyaccelError(f"{path}: row {row_no}, column '{column}': {cell.strip()} is not a finite number")
    if abs(value) > FLOAT32_MAX:
        raise ToyaccelError(f"{path}: row {row_no}, column '{column}': {cell.strip()} is too large for float32")
    return value


def parse_labels(
    path: str, header: list[str], rows: list[tuple[int, list[str]]], label_column: str, num_classes: int | None
) -> torch.Tensor:
    """Class indices 0..num_classes-1, naming the row of the first label that is not one."""
    at = header.index(label_column)
    labels = []
    for row_no, row in rows:
        cell = row[at].strip()
        value = parse_number(path, row_no, label_column, cell)
        where = f"{path}: row {row_no}, column '{label_column}'"
        if value != int(value) or value < 0:
            raise ToyaccelError(f"{where}: a label must be a class number 0, 1, 2, ..., got {cell}")
        if num_classes is not None and value >= num_classes:
            raise ToyaccelError(
                f"{where}: label {cell} is out of range for num_classes={num_classes} "
                f"(labels 0..{num_classes - 1})"
            )
        if value > MAX_LABEL:
            raise ToyaccelError(f"{where}: label {cell} is too large to be a class number")
        labels.append(int(value))
    return torch.tensor(labels, dtype=torch.int64)


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


# ---------------------------------------------------------------------------------------------
# Sampling and loaders


def draw_epoch_seed() -> int:
    """One epoch's shuffle seed, drawn from the global RNG as the book's DataLoader does.

    A DataLoader draws its ``_base_seed`` and then ``RandomSampler`` draws the shuffle seed, both from
    the global RNG, when an epoch's iteration starts. We draw the same two numbers at the same moment
    and keep the second, so the default run reproduces the book's numbers exactly, while our loaders
    use private generators and evaluation between epochs cannot shift the stream.
    """
    torch.empty((), dtype=torch.int64).random_()
    return int(torch.empty((), dtype=torch.int64).random_().item())


class EpochBatchSampler:
    """Shuffled batches of one process's size, in an order that does not depend on the world size.

    Each epoch is one permutation of all samples (seeded by ``start_epoch``'s seed) cut into batches of
    ``batch_size``. Accelerate's BatchSamplerShard hands batch i to process i % N, so with N processes
    one optimizer step consumes N * batch_size * grad_accum consecutive samples of the permutation:
    exactly what one process with that whole global batch would see. We drop the incomplete global
    batch at the end (the book's drop_last) so no process ever repeats a sample. ``start`` skips the
    samples of a resumed epoch that were already trained on.
    """

    drop_last = True  # read by accelerate: never pad training batches with repeated samples

    def __init__(self, num_samples: int, batch_size: int, global_batch: int, device: torch.device | str = "cpu"):
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.global_batch = global_batch
        self.device = torch.device(device)  # where the data is: batches are index tensors there
        self.epoch_seed: int | None = None
        self.start = 0

    # Not named set_epoch: accelerate calls a sampler's set_epoch(iteration) on its own.
    def start_epoch(self, epoch_seed: int, start: int = 0) -> None:
        self.epoch_seed, self.start = epoch_seed, start

    @property
    def steps_per_epoch(self) -> int:
        """Optimizer steps in a whole epoch, over all processes."""
        return self.num_samples // self.global_batch

    def steps_in_epoch(self) -> int:
        return (self.num_samples - self.start) // self.global_batch

    def __len__(self) -> int:
        return self.steps_in_epoch() * (self.global_batch // self.batch_size)

    def __iter__(self):
        if self.epoch_seed is None:
            raise RuntimeError("start_epoch() must be called before iterating")
        generator = torch.Generator().manual_seed(self.epoch_seed)
        # Drawn on the CPU whatever the device, so the order is the same everywhere; then one copy per
        # epoch, so that no step waits for its indices.
        order = torch.randperm(self.num_samples, generator=generator).to(self.device)
        end = self.start + self.steps_in_epoch() * self.global_batch
        return iter(order[self.start : end].split(self.batch_size))


def _loader(dataset: ToyDataset, batch_sampler, config: TrainConfig, pin_memory: bool = False) -> DataLoader:
    # A private generator: the DataLoader draws a base seed per iteration and must not take it from
    # the global RNG, which decides the model init and the epoch order (see draw_epoch_seed).
    return DataLoader(
        dataset,
        batch_sampler=batch_sampler,
        collate_fn=keep_batch,
        num_workers=config.num_workers,
        pin_memory=pin_memory,
        generator=torch.Generator().manual_seed(config.seed),
    )


def build_train_loader(
    dataset: ToyDataset, config: TrainConfig, world_size: int, pin_memory: bool = False
) -> DataLoader:
    global_batch = world_size * config.batch_size * config.grad_accum
    if len(dataset) < global_batch:
        raise ToyaccelError(
            f"the training set has {len(dataset)} samples but one optimizer step needs {global_batch} "
            f"({world_size} process{'es' if world_size > 1 else ''} x batch size {config.batch_size} "
            f"x grad_accum {config.grad_accum}): "
            "zero training batches; lower --batch-size or --grad-accum, or use fewer processes"
        )
    sampler = EpochBatchSampler(len(dataset), config.batch_size, global_batch, dataset_device(dataset))
    return _loader(dataset, sampler, config, pin_memory)


def build_eval_loader(
    dataset: ToyDataset, config: TrainConfig, batch_size: int = 256, pin_memory: bool = False
) -> DataLoader:
    """Every sample once, in order; accelerate pads the last round and gather_for_metrics trims it."""
    sampler = BatchSampler(SequentialSampler(range(len(dataset))), max(batch_size, config.batch_size), False)
    return _loader(dataset, sampler, config, pin_memory)
