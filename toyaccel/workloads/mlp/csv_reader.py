"""CSV files for the MLP: numpy's C reader first; the row-by-row scan only to word an error (file, row as a
spreadsheet counts it, column and value)."""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from toyaccel.engine.files import require_regular_file
from toyaccel.errors import ToyaccelError
from toyaccel.limits import check_fits

FLOAT32_MAX = float(torch.finfo(torch.float32).max)


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

