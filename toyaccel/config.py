"""The training configuration: one dataclass, one place that validates it.

Precedence, lowest first: the defaults below (the book's Appendix A run) < a YAML/JSON file given
with ``--config`` < options on the command line (or keyword arguments in Python).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from toyaccel.errors import ToyaccelError

LR_SCHEDULES = ("constant", "cosine", "linear")
EVAL_TRAIN = ("sample", "full")
EVAL_TRAIN_SAMPLE = 8192  # rows of the fixed training-set sample that --eval-train sample scores
MIXED_PRECISION = ("no", "bf16", "fp16")
DATA_PLACEMENTS = ("auto", "device", "host")


def _opt(default: Any, help: str, **extra: Any):
    return field(default=default, metadata={"help": help, **extra})


@dataclass
class TrainConfig:
    """Everything one training run depends on. The defaults are the book's Appendix A run."""

    # --- data ---------------------------------------------------------------------------------
    data: str = _opt("toy", "'toy' (the book's 5+2 points), 'synthetic' (seeded Gaussian blobs) or a CSV path")
    val_data: str | None = _opt(None, "CSV file with validation rows (default: the book's test set for 'toy')")
    val_fraction: float = _opt(0.0, "hold out this fraction of the training rows for validation (seeded split)")
    label_column: str = _opt(
        "label", "CSV column holding the class: numbers 0..K-1, or any values (names, other numbers) as class names"
    )
    ignore_columns: tuple[str, ...] = _opt(
        (), "CSV columns that are not features, comma separated, e.g. id,name (predict copies them to its output)"
    )
    num_samples: int = _opt(1000, "'synthetic': number of rows")
    num_features: int = _opt(2, "'synthetic': number of input features")
    num_classes: int | None = _opt(None, "number of classes (default: inferred from the labels; 2 for 'synthetic')")
    standardize: bool = _opt(False, "standardize features with training-set mean/std (saved in config.json)")
    # --- model --------------------------------------------------------------------------------
    hidden: tuple[int, ...] = _opt((30, 20), "hidden layer sizes, comma separated (the book: 30,20)")
    # --- optimisation -------------------------------------------------------------------------
    epochs: int = _opt(3, "number of passes over the training data")
    batch_size: int = _opt(2, "samples per process per micro-step; global batch = processes x this x grad_accum")
    lr: float = _opt(0.5, "peak learning rate of SGD")
    seed: int = _opt(123, "seed for model init and data order, applied as the book does")
    grad_accum: int = _opt(1, "accumulate gradients over this many micro-steps per optimizer step")
    lr_schedule: str = _opt("constant", "learning-rate schedule after warm-up", choices=LR_SCHEDULES)
    warmup_steps: int = _opt(0, "optimizer steps of linear warm-up from 0 to --lr")
    max_grad_norm: float = _opt(0.0, "clip the global gradient norm to this value (0 = off)")
    mixed_precision: str | None = _opt(
        None, "no | bf16 | fp16 (default: what the accelerate config says)", choices=MIXED_PRECISION
    )
    compile: bool = _opt(False, "torch.compile the model (same results within tolerance, slower start)")
    tf32: bool = _opt(True, "TF32 matmuls on GPUs that have them (Ampere+); --no-tf32 for exact fp32")
    data_placement: str = _opt(
        "auto", "on a GPU: keep the data on it (device) or in pinned host memory (host); auto: on it when it "
        "fits in a quarter of its free memory", choices=DATA_PLACEMENTS,
    )  # fmt: skip
    # --- outputs ------------------------------------------------------------------------------
    output_dir: str | None = _opt(
        None,
        "where model, config, results, metrics and checkpoints go (default: a fresh folder per run: "
        "runs/toy, runs/toy-2, ...; named after --data)",
    )
    overwrite: bool = _opt(False, "replace the toyaccel files of a previous run in --output-dir")
    resume: str | None = _opt(
        None, "'latest' (newest complete checkpoint), 'auto' (latest if any, else start) or a checkpoint folder"
    )
    checkpoint_every: int = _opt(0, "also checkpoint every N optimizer steps (0 = only at epoch ends)")
    eval_every: int = _opt(1, "evaluate every N epochs (the last epoch always)")
    eval_train: str = _opt(
        "sample",
        f"training-set metrics: 'sample' scores a fixed seeded sample of {EVAL_TRAIN_SAMPLE} rows (every row of a "
        "smaller set), 'full' every row",
        choices=EVAL_TRAIN,
    )
    keep_last: int = _opt(3, "keep only the newest K checkpoints (0 = keep all)")
    log_every: int = _opt(0, "log every N optimizer steps (0 = about ten lines per epoch)")
    progress: bool = _opt(True, "show a progress bar when writing to a terminal")
    log_with: str | None = _opt(None, "also send metrics to this accelerate tracker (e.g. tensorboard)")
    plot: bool = _opt(True, "write loss.png (needs matplotlib)")
    num_workers: int = _opt(0, "DataLoader worker processes (0 is fastest for in-memory tensors)")

    # Fields that change what is computed: a resumed run must match the checkpoint in all of them.
    # (batch_size and grad_accum enter through the global batch, so a resume may change how the
    # global batch is split over processes.)
    TRAINING_FIELDS = (
        "data", "val_data", "val_fraction", "label_column", "ignore_columns", "num_samples", "num_features",
        "num_classes", "standardize", "hidden", "epochs", "lr", "seed", "lr_schedule",
        "warmup_steps", "max_grad_norm",
    )  # fmt: skip

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check every field once; raise ToyaccelError naming the first bad one."""
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name in ("hidden", "ignore_columns"):
                continue
            if value is None and "None" in str(f.type):
                continue
            expected = {"int": int, "float": (int, float), "bool": bool, "str": str}
            kind = str(f.type).split(" |")[0]
            if kind in expected and (
                not isinstance(value, expected[kind]) or (kind in ("int", "float") and isinstance(value, bool))
            ):
                raise ToyaccelError(f"{f.name} must be {kind}, got {value!r}")
            choices = f.metadata.get("choices")
            if choices and value is not None and value not in choices:
                raise ToyaccelError(f"{f.name} must be one of {', '.join(choices)}, got {value!r}")
        self.hidden = parse_hidden(self.hidden)
        self.ignore_columns = parse_names(self.ignore_columns)
        positive = ("epochs", "batch_size", "grad_accum", "num_samples", "num_features", "eval_every")
        for name in positive:
            if getattr(self, name) < 1:
                raise ToyaccelError(f"{name} must be at least 1, got {getattr(self, name)}")
        non_negative = ("warmup_steps", "checkpoint_every", "keep_last", "log_every", "num_workers")
        for name in non_negative:
            if getattr(self, name) < 0:
                raise ToyaccelError(f"{name} must be 0 or more, got {getattr(self, name)}")
        if self.num_classes is not None and self.num_classes < 2:
            raise ToyaccelError(f"num_classes must be at least 2, got {self.num_classes}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ToyaccelError(f"lr must be a positive number, got {self.lr}")
        if not (math.isfinite(self.max_grad_norm) and self.max_grad_norm >= 0):
            raise ToyaccelError(f"max_grad_norm must be 0 (off) or positive, got {self.max_grad_norm}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ToyaccelError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.val_fraction and self.val_data:
            raise ToyaccelError("give either val_data or val_fraction, not both")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["hidden"] = list(self.hidden)
        d["ignore_columns"] = list(self.ignore_columns)
        return d

    def training_dict(self) -> dict[str, Any]:
        d = self.to_dict()
        return {name: d[name] for name in self.TRAINING_FIELDS}

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)


def parse_hidden(value: Any) -> tuple[int, ...]:
    """'30,20', [30, 20] or (30, 20) -> (30, 20); '' or [] -> () (a linear model)."""
    if isinstance(value, str):
        parts = [p.strip() for p in value.split(",") if p.strip()]
    elif isinstance(value, (list, tuple)):
        parts = list(value)
    else:
        raise ToyaccelError(f"hidden must be comma-separated sizes like 30,20, got {value!r}")
    try:
        sizes = tuple(int(p) for p in parts)
    except (TypeError, ValueError):
        raise ToyaccelError(f"hidden must be comma-separated sizes like 30,20, got {value!r}") from None
    if any(s < 1 for s in sizes) or any(isinstance(p, (bool, float)) for p in parts):
        raise ToyaccelError(f"hidden sizes must be positive integers, got {value!r}")
    return sizes


def parse_names(value: Any) -> tuple[str, ...]:
    """'id, name', ['id', 'name'] -> ('id', 'name'); '' or [] -> ()."""
    if isinstance(value, str):
        return tuple(p.strip() for p in value.split(",") if p.strip())
    if isinstance(value, (list, tuple)) and all(isinstance(p, str) for p in value):
        return tuple(p.strip() for p in value if p.strip())
    raise ToyaccelError(f"ignore_columns must be comma-separated column names like id,name, got {value!r}")


def applicable_options(config: TrainConfig) -> dict[str, Any]:
    """The options that take part in this run: unset ones and those of another data source left out.
    What the start-up line prints and config.json keeps."""
    csv_only = ("label_column", "ignore_columns")
    synthetic_only = ("num_samples", "num_features")
    d = config.to_dict()
    for name, value in config.to_dict().items():
        if value is None or value == [] or value == "" or (name == "val_fraction" and not value):
            del d[name]
        elif name in csv_only and config.data in ("toy", "synthetic"):
            del d[name]
        elif name in synthetic_only and config.data != "synthetic":
            del d[name]
    return d


def field_names() -> list[str]:
    return [f.name for f in dataclasses.fields(TrainConfig)]


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Options from a YAML or JSON file: keys are TrainConfig fields (dashes or underscores)."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise ToyaccelError(f"cannot read config file {path}: {e.strerror or e}") from None
    try:
        if path.suffix == ".json":
            values = json.loads(text)
        else:
            import yaml  # accelerate depends on PyYAML

            values = yaml.safe_load(text)
    except Exception as e:  # noqa: BLE001 - any parser error becomes one line naming the file
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ToyaccelError(f"config file {path} does not parse: {first_line}") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ToyaccelError(f"config file {path} must hold a mapping of option: value")
    values = {str(k).replace("-", "_"): v for k, v in values.items()}
    unknown = sorted(set(values) - set(field_names()))
    if unknown:
        raise ToyaccelError(f"config file {path}: unknown option(s) {', '.join(unknown)}")
    return values


def build_config(file_values: dict[str, Any] | None = None, **overrides: Any) -> TrainConfig:
    """Defaults < file values < overrides, validated once."""
    values = {**(file_values or {}), **overrides}
    try:
        return TrainConfig(**values)
    except TypeError as e:
        raise ToyaccelError(str(e)) from None
