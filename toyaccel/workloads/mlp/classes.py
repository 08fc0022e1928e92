"""The MLP's classes: the label cells of a CSV file as people write them, mapped to the model's outputs."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from toyaccel.errors import ToyaccelError
from toyaccel.workloads.mlp.csv_reader import Table, checked_float, data_row_number

MAX_LABEL = 2**31 - 1  # far above any class count; keeps labels clear of int64 overflow


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

