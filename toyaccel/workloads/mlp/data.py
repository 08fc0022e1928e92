"""Data sources (the book's toy set, synthetic blobs, CSV files) and the fast, resumable loaders."""

from __future__ import annotations

import csv
import hashlib
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from toyaccel.config import TrainConfig, check_fits, require_regular_file
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


# ---------------------------------------------------------------------------------------------
# CSV files: numpy's C reader first; the row-by-row scan only to word an error


@dataclass
class Table:
    """One CSV file as read: the feature columns as float32, the label cells as codes into
    ``label_cells`` (its distinct stripped values, in the order first seen) and the text of the
    columns asked to be kept (ids for predictions.csv)."""

    path: str
    label_column: str | None
    feature_names: list[str]
    features: torch.Tensor
    label_codes: torch.Tensor | None
    label_cells: list[str]
    kept: dict[str, list[str]]

    def __len__(self) -> int:
        return self.features.shape[0]


def read_table(
    path: str,
    label_column: str | None,
    feature_names: list[str] | None = None,
    ignore: tuple[str, ...] = (),
    keep: tuple[str, ...] = (),
    training: bool = False,
) -> Table:
    """Read ``path``: every column not ignored and not the label is a feature unless ``feature_names``
    names them (a trained model's columns, found by name). Bad input raises ToyaccelError naming file,
    row (as a spreadsheet counts it: the header is row 1), column and value."""
    header_row, header = read_header(path)
    if label_column is not None and label_column not in header:
        raise ToyaccelError(f"{path}: no label column '{label_column}' in header {header} (set --label-column)")
    for name in (*ignore, *keep):
        if name not in header:
            raise ToyaccelError(f"{path}: --ignore-columns names '{name}', which is not in header {header}")
        if name == label_column:
            raise ToyaccelError(f"{path}: --ignore-columns names '{name}', the label column")
    if feature_names is None:
        feature_names = [h for h in header if h != label_column and h not in ignore]
        if not feature_names:
            ignored = f" and the ignored columns {list(ignore)}" if ignore else ""
            raise ToyaccelError(f"{path}: no feature columns besides '{label_column}'{ignored}")
    else:
        missing = [name for name in feature_names if name not in header]
        if missing:
            raise ToyaccelError(
                f"{path}: missing feature column(s) {missing}; the model was trained on columns {feature_names}"
            )
        clash = [name for name in ignore if name in feature_names]
        if clash:
            raise ToyaccelError(f"{path}: --ignore-columns names {clash}, which the model takes as features")
    columns = Columns(header, feature_names, label_column, keep)
    # numpy holds every cell as a float32 (4 bytes for a cell of at least 2, "1,"), and the text it reads.
    check_fits(2 * Path(path).stat().st_size, f"{path}: its values")
    try:
        table = read_fast(path, header_row, columns)
    except (ValueError, OSError):  # numpy's message has no spreadsheet row or column name: scan to word it
        table = None
    if table is None:
        table = read_slow(path, columns, suggest_ignore=training)
    return table


def columns_present(path: str, names: tuple[str, ...]) -> tuple[str, ...]:
    """Those of ``names`` that ``path``'s header has."""
    header = read_header(path)[1]
    return tuple(name for name in names if name in header)


@dataclass
class Columns:
    """Where the wanted columns are in a file's header."""

    header: list[str]
    feature_names: list[str]
    label_column: str | None
    keep: tuple[str, ...]

    @property
    def features_at(self) -> list[int]:
        return [self.header.index(name) for name in self.feature_names]

    @property
    def label_at(self) -> int | None:
        return None if self.label_column is None else self.header.index(self.label_column)


def read_header(path: str) -> tuple[int, list[str]]:
    """The header's row number and its names, after checking that the file exists, is not empty,
    names every column once and has at least one data row."""
    header_row, header = scan_rows(path, limit=2)[0]
    return header_row, [h.strip() for h in header]


def check_header(path: str, header: list[str]) -> None:
    for i, name in enumerate(header):
        if not name:
            raise ToyaccelError(f"{path}: column {i + 1} of the header has no name")
        if name in header[:i]:
            raise ToyaccelError(f"{path}: column name '{name}' appears twice in the header")


def read_fast(path: str, header_row: int, columns: Columns) -> Table | None:
    """numpy's C reader (``loadtxt``), ~10x faster than a Python scan and with about the final array's
    memory. It reads every column, so a row of another length fails here as it should; the label and
    other non-feature columns go through converters. Raises ValueError, or returns None, where the
    row-by-row scan must word the error (or accept what numpy does not, such as blank lines with spaces)."""
    features_at, label_at = columns.features_at, columns.label_at
    codes: dict[str, int] = {}
    kept: dict[str, list[str]] = {name: [] for name in columns.keep}

    def label_code(cell: str) -> int:
        cell = cell.strip()
        if is_missing_label(cell):
            raise ValueError("missing label")
        return codes.setdefault(cell, len(codes))

    def keep_cell(texts: list[str]):
        return lambda cell: texts.append(cell) or 0.0

    converters = {}
    for i, name in enumerate(columns.header):
        if name in kept:
            converters[i] = keep_cell(kept[name])
        elif i == label_at:
            converters[i] = label_code
        elif i not in features_at:
            converters[i] = skip_cell
    # float32 straight from the text: numpy parses each cell as a double and rounds it once, exactly as
    # float() and torch.tensor(..., dtype=float32) did, so the values are bit-for-bit the scan's.
    values = np.loadtxt(
        path, delimiter=",", comments=None, quotechar='"', dtype=np.float32, skiprows=header_row,
        converters=converters, ndmin=2, encoding="utf-8",
    )  # fmt: skip
    if values.shape[1] != len(columns.header) or values.shape[0] == 0:
        return None
    label_codes = None
    if label_at is not None:
        label_codes = torch.from_numpy(values[:, label_at].astype(np.int64))
    features = keep_columns(values, features_at)
    # NaN, inf and values beyond float32 (read as inf, or rounded onto its largest value) are for the scan
    # to word. min/max instead of isfinite/abs: no temporary array the size of the data.
    low, high = features.min(), features.max()
    if not (-FLOAT32_MAX < low and high < FLOAT32_MAX):
        return None
    return Table(path, columns.label_column, columns.feature_names, torch.from_numpy(features), label_codes,
                 list(codes), kept)  # fmt: skip


def keep_columns(values: np.ndarray, at: list[int], rows_per_chunk: int = 4096) -> np.ndarray:
    """``values[:, at]``, contiguous, made in ``values``' own memory: copying it out would double the
    peak memory of a read. Row block i moves to an earlier or the same place, never over a later
    block not yet moved, and numpy buffers each block's overlapping copy."""
    rows, width = values.shape
    if at == list(range(width)):
        return values
    flat = values.reshape(-1)
    kept = len(at)
    for start in range(0, rows, rows_per_chunk):
        end = min(rows, start + rows_per_chunk)
        flat[start * kept : end * kept] = values[start:end, at].reshape(-1)
    result = flat[: rows * kept].reshape(rows, kept)
    # A view keeps all of ``values``' buffer alive: worth a copy of the kept part only when it is small.
    return result.copy() if kept * 2 < width else result


def is_missing_label(cell: str) -> bool:
    """An empty cell, or NaN as pandas and numpy write a missing value ('nan', 'NaN', '-nan'): a class
    named 'nan' is never what the file meant."""
    return not cell or cell.lstrip("+-").lower() == "nan"


def skip_cell(cell: str) -> float:
    return 0.0


def read_slow(path: str, columns: Columns, suggest_ignore: bool = False) -> Table:
    """The row-by-row scan: slow, but it names file, row, column and value of the first bad cell."""
    header, rows = read_rows(path)
    features = parse_columns(path, header, rows, columns.feature_names, suggest_ignore)
    codes: dict[str, int] = {}
    label_codes = None
    if columns.label_at is not None:
        at, values = columns.label_at, []
        for row_no, row in rows:
            cell = row[at].strip()
            if is_missing_label(cell):
                shown = f" ({cell!r})" if cell else ""
                raise ToyaccelError(f"{path}: row {row_no}, column '{columns.label_column}': missing label{shown}")
            values.append(codes.setdefault(cell, len(codes)))
        label_codes = torch.tensor(values, dtype=torch.int64)
    kept = {name: [row[header.index(name)] for _, row in rows] for name in columns.keep}
    return Table(path, columns.label_column, columns.feature_names, features, label_codes, list(codes), kept)


def read_rows(path: str) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """The header and every non-blank row with its row number as a spreadsheet shows it (the header is
    row 1), after checking that the file exists, is not empty and that every row has the header's length."""
    (_, header), *rows = scan_rows(path)
    header = [h.strip() for h in header]
    for row_no, row in rows:
        if len(row) != len(header):
            raise ToyaccelError(f"{path}: row {row_no} has {len(row)} columns, the header has {len(header)}")
    return header, rows


def scan_rows(path: str, limit: int | None = None) -> list[tuple[int, list[str]]]:
    """The header row and (up to ``limit`` rows in all) the non-blank data rows, each with its row number,
    after checking that the file exists, reads as CSV, has a well-named header and a data row."""
    p = Path(path)
    if not path or not p.exists():
        raise ToyaccelError(f"{path or repr(path)}: no such file")
    require_regular_file(p)
    rows = []
    try:
        # utf-8-sig: spreadsheet programs often start the file with a byte-order mark, which would
        # otherwise become part of the first column's name.
        with p.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            for row in reader:
                if any(cell.strip() for cell in row):  # skip blank lines, e.g. a trailing newline
                    rows.append((reader.line_num, row))
                    if len(rows) == limit:
                        break
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise ToyaccelError(f"{path}: cannot read as CSV: {e}") from None
    if not rows:
        raise ToyaccelError(f"{path}: file is empty (expected a header row and data rows)")
    check_header(path, [h.strip() for h in rows[0][1]])
    if len(rows) < 2:
        raise ToyaccelError(f"{path}: header only, no data rows (a CSV file: a header line, then one row per sample)")
    return rows


def data_row_number(path: str, index: int) -> int:
    """The spreadsheet row number of data row ``index`` (0-based): to word an error found after a fast read."""
    _, rows = read_rows(path)
    return rows[index][0]


def parse_columns(
    path: str, header: list[str], rows: list[tuple[int, list[str]]], columns: list[str], suggest_ignore: bool = False
) -> torch.Tensor:
    """The named columns as float32, naming the row and column of the first cell that is not a finite number."""
    at = [header.index(name) for name in columns]
    values = []
    for row_no, row in rows:
        try:
            values.append([parse_number(path, row_no, name, row[i]) for name, i in zip(columns, at)])
        except ToyaccelError as e:
            if suggest_ignore and row_no == rows[0][0]:
                raise ToyaccelError(with_ignore_hint(str(e), row, columns, at)) from None
            raise
    return torch.tensor(values, dtype=torch.float32)


def with_ignore_hint(message: str, row: list[str], columns: list[str], at: list[int]) -> str:
    """A column whose very first value is text (an id, a name) is not a feature: say how to leave it out."""
    for name, i in zip(columns, at):
        cell = row[i].strip()
        if f"column '{name}': not a number" in message and cell:
            return f"{message} (if '{name}' is not a feature, leave it out with --ignore-columns {name})"
    return message


def parse_number(path: str, row_no: int, column: str, cell: str) -> float:
    if not cell.strip():
        raise ToyaccelError(f"{path}: row {row_no}, column '{column}': empty cell (every feature needs a number)")
    try:
        return checked_float(cell)
    except ValueError as e:
        raise ToyaccelError(f"{path}: row {row_no}, column '{column}': {e}") from None


def checked_float(cell: str) -> float:
    """``cell`` as a number a float32 tensor holds; ValueError saying why it is not one."""
    text = cell.strip()
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"not a number: {text!r}") from None
    if not math.isfinite(value):
        raise ValueError(f"{text} is not a finite number")
    if abs(value) > FLOAT32_MAX:
        raise ValueError(f"{text} is too large for float32")
    return value


# ---------------------------------------------------------------------------------------------
# Classes: the label cells as people write them


@dataclass
class Classes:
    """The model's classes in output order. ``index``: labels are the class numbers 0..K-1 themselves
    (the book's data, and any file labelled that way); otherwise each class is a label value, numbers
    sorted by value and other names as text."""

    names: list[str]
    index: bool

    @property
    def numeric(self) -> bool:
        return not self.index and all(as_number(name) is not None for name in self.names)


def index_classes(count: int) -> Classes:
    return Classes([str(k) for k in range(count)], index=True)


def saved_classes(names: list[str] | None, num_classes: int) -> Classes:
    """The classes config.json holds (runs saved before class names existed had numbers 0..K-1)."""
    if not names or names == [str(k) for k in range(num_classes)]:
        return index_classes(num_classes)
    return Classes(list(names), index=False)


def as_number(cell: str) -> float | None:
    try:
        value = float(cell)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def as_class_number(cell: str) -> int | None:
    value = as_number(cell)
    return int(value) if value is not None and value == int(value) and 0 <= value <= MAX_LABEL else None


def training_classes(table: Table, num_classes: int | None) -> Classes:
    """The classes of a training file: its labels as class numbers when they are exactly 0..K-1 (or
    --num-classes says they are numbers), else the sorted distinct label values as class names."""
    numbers = [as_class_number(cell) for cell in table.label_cells]
    if num_classes is not None:
        check_class_numbers(table, num_classes)
        return index_classes(num_classes)
    if None not in numbers and set(numbers) == set(range(max(numbers) + 1)):
        return index_classes(max(2, max(numbers) + 1))
    by_value = [as_number(cell) for cell in table.label_cells]
    if None not in by_value:
        first = {}
        for cell, value in zip(table.label_cells, by_value):
            first.setdefault(value, cell)  # "1" and "1.0" are one class, named as first written
        names = [first[value] for value in sorted(first)]
    else:
        names = sorted(table.label_cells)
    where = f"{table.path}: column '{table.label_column}'"
    if len(names) < 2:
        raise ToyaccelError(f"{where}: only one class ({names[0]!r}); a classifier needs at least two")
    if len(names) > max(2, len(table) // 2):
        # Almost always the wrong column (an id, a price): one output per distinct value.
        raise ToyaccelError(
            f"{where} has {len(names)} distinct values in {len(table)} rows, too many to be classes "
            "(check --label-column)"
        )
    return Classes(names, index=False)


def check_class_numbers(table: Table, num_classes: int) -> None:
    """Labels that must be class numbers below ``num_classes``: name the first row of one that is not."""
    bad = [code for code, cell in enumerate(table.label_cells) if class_number_error(cell, num_classes)]
    if bad:
        first = int(torch.isin(table.label_codes, torch.tensor(bad)).nonzero()[0])
        cell = table.label_cells[int(table.label_codes[first])]
        row_no = data_row_number(table.path, first)
        where = f"{table.path}: row {row_no}, column '{table.label_column}'"
        raise ToyaccelError(f"{where}: {class_number_error(cell, num_classes)}")


def class_number_error(cell: str, num_classes: int) -> str | None:
    """Why ``cell`` is not a class number 0..num_classes-1 (the messages labels always had), or None."""
    try:
        value = checked_float(cell)
    except ValueError as e:
        return str(e)
    if value != int(value) or value < 0:
        return f"a label must be a class number 0, 1, 2, ..., got {cell}"
    if value >= num_classes:
        return f"label {cell} is out of range for num_classes={num_classes} (labels 0..{num_classes - 1})"
    return None


def class_indices(table: Table, classes: Classes) -> torch.Tensor:
    """Each row's class index under ``classes``; a label the classes do not have names file, row and value."""
    if classes.index:
        check_class_numbers(table, len(classes.names))
        lookup = [as_class_number(cell) for cell in table.label_cells]
    else:
        key = as_number if classes.numeric else (lambda cell: cell)
        position = {key(name): k for k, name in enumerate(classes.names)}
        lookup = [position.get(key(cell), -1) for cell in table.label_cells]
        if -1 in lookup:
            first = int((torch.tensor(lookup)[table.label_codes] < 0).nonzero()[0])
            cell = table.label_cells[int(table.label_codes[first])]
            raise ToyaccelError(
                f"{table.path}: row {data_row_number(table.path, first)}, column '{table.label_column}': "
                f"label {cell!r} is not one of the training data's classes ({', '.join(classes.names)})"
            )
    return torch.tensor(lookup, dtype=torch.int64)[table.label_codes]


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
