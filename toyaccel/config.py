"""The training configuration: one dataclass, one place that validates it.

Precedence, lowest first: the defaults below (the book's Appendix A run) < a YAML/JSON file given
with ``--config`` < options on the command line (or keyword arguments in Python).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from toyaccel.engine.files import require_regular_file
from toyaccel.errors import ToyaccelError
from toyaccel.shards import shard_defaults
from toyaccel.workloads import get_workload, workload_names

LR_SCHEDULES = ("constant", "cosine", "linear")
EVAL_TRAIN = ("sample", "full")
EVAL_TRAIN_SAMPLE = 8192  # rows of the fixed training-set sample that --eval-train sample scores
MIXED_PRECISION = ("no", "bf16", "fp16")
MODELS = ("mlp", "gpt")
OPTIMIZERS = ("sgd", "adamw")
TOKENIZERS = ("bpe", "bytes", "gpt2")
# The book's GPT_CONFIG_124M (chapter 4); a preset fills the model options the user left unset.
PRESETS = {
    "gpt2-124m": {
        "vocab_size": 50257, "context_length": 1024, "emb_dim": 768, "n_heads": 12, "n_layers": 12,
        "drop_rate": 0.1, "qkv_bias": False,
    },
}  # fmt: skip
# What an option left at None means, per --model: the MLP keeps the book's Appendix A run; the GPT
# gets chapter 5's optimizer (AdamW, lr 0.0004, weight decay 0.1) and a model small enough for a CPU.
WORKLOAD_DEFAULTS = {
    "mlp": {"data": "toy", "num_samples": 1000, "val_fraction": 0.0,
            "optimizer": "sgd", "lr": 0.5,
            "label_column": "label", "ignore_columns": (), "num_features": 2, "standardize": False,
            "hidden": (30, 20), "eval_train": "sample"},
    "gpt": {"data": "synthetic", "num_samples": 50_000, "val_fraction": 0.1,
            "optimizer": "adamw", "lr": 0.0004, "weight_decay": 0.1,
            "vocab_size": 1024, "context_length": 128, "emb_dim": 128, "n_heads": 4, "n_layers": 4,
            "drop_rate": 0.1, "qkv_bias": False},
}  # fmt: skip
# What a workload registered from outside toyaccel (register_workload) starts from, before its option_defaults.
OWN_WORKLOAD_DEFAULTS = {"val_fraction": 0.0, "optimizer": "sgd"}
GPT_OPTIONS = ("preset", "tokenizer", "vocab_size", "stride", "context_length", "emb_dim", "n_heads", "n_layers",
               "drop_rate", "qkv_bias")  # fmt: skip
# The GPT scores every training window (its evaluation is cheap next to its training step): --eval-train is
# an MLP option. Each family's options default to None (filled from WORKLOAD_DEFAULTS), so that one given to
# the other model is refused, not silently ignored.
MLP_OPTIONS = ("label_column", "ignore_columns", "num_features", "num_classes", "standardize", "hidden", "eval_train")
# --help and --config files group the options; an option not listed here is a "run" option.
SECTIONS = {
    "data": ("data", "val_data", "val_fraction", "label_column", "ignore_columns", "num_samples", "num_features",
             "num_classes", "standardize", "tokenizer", "vocab_size", "stride", "verify_data"),
    "model": ("model", "preset", "hidden", "context_length", "emb_dim", "n_heads", "n_layers", "drop_rate",
              "qkv_bias"),
    "optimizer": ("optimizer", "lr", "weight_decay", "epochs", "batch_size", "grad_accum", "lr_schedule",
                  "warmup_steps", "max_grad_norm"),
}  # fmt: skip
DATA_PLACEMENTS = ("auto", "device", "host")
# torch.manual_seed takes 0..2**64-1, and the synthetic text seeds a second generator with seed + 1.
MAX_SEED = 2**64 - 2
# The optimizers compute in float32: a larger rate overflows in their first step.
MAX_LR = 3.4028234663852886e38
WORKERS_PER_CORE = 4  # DataLoader workers beyond this many per core only wait for a CPU


def _opt(default: Any, help: str, **extra: Any):
    return field(default=default, metadata={"help": help, **extra})


@dataclass
class TrainConfig:
    """Everything one training run depends on. The defaults are the book's Appendix A run."""

    # --- workload -----------------------------------------------------------------------------
    model: str = _opt("mlp", "mlp (the book's Appendix A classifier) or gpt (chapter 4's GPTModel)", choices=MODELS)
    # --- data ---------------------------------------------------------------------------------
    data: str | None = _opt(
        None,
        "mlp: 'toy' (the book's 5+2 points, default), 'synthetic' (seeded Gaussian blobs) or a CSV path; "
        "gpt: 'synthetic' (seeded text of known entropy, default), a UTF-8 text file, a folder of .txt files, or a "
        "folder of token shards (toyaccel-prepare's, or nanoGPT's train.bin/val.bin) read through a memory map",
    )
    val_data: str | None = _opt(
        None, "validation data: CSV rows (mlp; default: the book's test set for 'toy') or text (gpt)"
    )
    val_fraction: float | None = _opt(
        None, "mlp: hold out this fraction of the rows (seeded split; default 0); gpt: the last fraction of the text "
        "(default 0.1, the book's train_ratio 0.9)"
    )
    label_column: str | None = _opt(
        None, "mlp: CSV column holding the class: numbers 0..K-1, or any values (names, other numbers) as class "
        "names (default: label)"
    )
    ignore_columns: tuple[str, ...] | None = _opt(
        None, "mlp: CSV columns that are not features, comma separated, e.g. id,name (predict copies them to its "
        "output)"
    )
    num_samples: int | None = _opt(None, "'synthetic': number of rows (mlp, default 1000) or characters (gpt, 50000)")
    num_features: int | None = _opt(None, "mlp, 'synthetic': number of input features (default: 2)")
    num_classes: int | None = _opt(
        None, "mlp: number of classes (default: inferred from the labels; 2 for 'synthetic')"
    )
    standardize: bool | None = _opt(None, "mlp: standardize features with training-set mean/std (saved in config.json)")
    tokenizer: str | None = _opt(
        None, "gpt: bpe (byte-level BPE trained on the training text, default), bytes (default for synthetic) "
        "or gpt2 (tiktoken, needs its files)", choices=TOKENIZERS,
    )
    vocab_size: int | None = _opt(
        None, "gpt: vocabulary size of the model (the BPE learns at most this many; default 1024)"
    )
    stride: int | None = _opt(None, "gpt: tokens between the starts of two windows (default: the context length)")
    verify_data: bool = _opt(False, "gpt, a shard folder: check every shard's SHA-256 against its manifest first "
                             "(reads the whole corpus once)")
    # --- model --------------------------------------------------------------------------------
    hidden: tuple[int, ...] | None = _opt(None, "mlp: hidden layer sizes, comma separated (the book: 30,20)")
    preset: str | None = _opt(
        None, "gpt: the book's GPT_CONFIG_124M shape (options given override it)", choices=tuple(PRESETS)
    )
    context_length: int | None = _opt(None, "gpt: tokens per window and size of the position table (default 128)")
    emb_dim: int | None = _opt(None, "gpt: embedding size (default 128)")
    n_heads: int | None = _opt(None, "gpt: attention heads (default 4)")
    n_layers: int | None = _opt(None, "gpt: transformer blocks (default 4)")
    drop_rate: float | None = _opt(None, "gpt: dropout rate (default 0.1)")
    qkv_bias: bool | None = _opt(None, "gpt: bias in the query, key and value projections (default: no)")
    # --- optimisation -------------------------------------------------------------------------
    optimizer: str | None = _opt(None, "sgd (mlp default) or adamw (gpt default)", choices=OPTIMIZERS)
    weight_decay: float | None = _opt(None, "weight decay (default: 0 for sgd, 0.1 for adamw as the book's chapter 5)")
    epochs: int = _opt(3, "number of passes over the training data")
    batch_size: int = _opt(2, "samples per process per micro-step; global batch = processes x this x grad_accum")
    lr: float | None = _opt(None, "peak learning rate (default: 0.5 for the MLP's SGD, 0.0004 for the GPT's AdamW)")
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
    eval_train: str | None = _opt(
        None,
        f"mlp: training-set metrics: 'sample' (default) scores a fixed seeded sample of {EVAL_TRAIN_SAMPLE} rows "
        "(every row of a smaller set), 'full' every row (the GPT scores every window)",
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
        "model", "tokenizer", "vocab_size", "stride", "context_length", "emb_dim", "n_heads", "n_layers",
        "drop_rate", "qkv_bias", "optimizer", "weight_decay",
    )  # fmt: skip

    def __post_init__(self) -> None:
        self.resolve_defaults()
        self.validate()

    def resolve_defaults(self) -> None:
        """Fill the options left at None from --preset and the model's defaults. The names filled are
        remembered, so that replace(model=...) gives them the new model's defaults, not the old ones."""
        if not hasattr(self, "_defaulted"):
            self._defaulted: set[str] = set()
        if self.model not in workload_names():
            return  # validate() names the bad model
        gpt = self.model == "gpt"
        # A workload registered from outside toyaccel brings its own defaults.
        own = WORKLOAD_DEFAULTS.get(self.model) or {**OWN_WORKLOAD_DEFAULTS, **get_workload(self.model).option_defaults}
        fills = dict(own)
        if self.val_data:
            fills["val_fraction"] = 0.0
        optimizer = self.optimizer or fills["optimizer"]
        fills["weight_decay"] = 0.1 if optimizer == "adamw" else 0.0
        if gpt:
            # The synthetic text's entropy is known per character, so it is read byte by byte.
            fills["tokenizer"] = "bytes" if (self.data or fills["data"]) == "synthetic" else "bpe"
            tokenizer = self.tokenizer or fills["tokenizer"]
            fills["vocab_size"] = {"bytes": 256, "gpt2": 50257}.get(tokenizer, fills["vocab_size"])
            # A shard folder decides its tokenizer, vocabulary and split where the options leave them unset.
            fills.update(shard_defaults(self.data or fills["data"]))
            fills.update(PRESETS.get(self.preset, {}))
        for name, value in fills.items():
            self._fill(name, value)
        if gpt:
            self._fill("stride", self.context_length)

    def _fill(self, name: str, value: Any) -> None:
        if getattr(self, name) is None:
            setattr(self, name, value)
            self._defaulted.add(name)

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
            # --model's choices on the command line are toyaccel's own; in Python, any registered workload.
            choices = workload_names() if f.name == "model" else f.metadata.get("choices")
            if choices and value is not None and value not in choices:
                raise ToyaccelError(f"{f.name} must be one of {', '.join(choices)}, got {value!r}")
        if self.hidden is not None:  # None: a GPT run, refused below if given one
            self.hidden = parse_hidden(self.hidden)
        if self.ignore_columns is not None:
            self.ignore_columns = parse_names(self.ignore_columns)
        positive = ("epochs", "batch_size", "grad_accum", "num_samples", "num_features", "eval_every")
        for name in positive:
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ToyaccelError(f"{name} must be at least 1, got {getattr(self, name)}")
        non_negative = ("warmup_steps", "checkpoint_every", "keep_last", "log_every", "num_workers")
        for name in non_negative:
            if getattr(self, name) < 0:
                raise ToyaccelError(f"{name} must be 0 or more, got {getattr(self, name)}")
        if self.num_classes is not None and self.num_classes < 2:
            raise ToyaccelError(f"num_classes must be at least 2, got {self.num_classes}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ToyaccelError(f"weight_decay must be 0 or positive, got {self.weight_decay}")
        if self.lr is None or not (math.isfinite(self.lr) and self.lr > 0):
            raise ToyaccelError(f"lr must be a positive number, got {self.lr}")
        if self.lr > MAX_LR:
            raise ToyaccelError(f"lr must be at most {MAX_LR:.4g} (float32's largest number), got {self.lr:g}")
        check_seed(self.seed, "seed")
        most_workers = WORKERS_PER_CORE * (os.cpu_count() or 1)
        if self.num_workers > most_workers:
            raise ToyaccelError(
                f"num_workers must be at most {most_workers} ({WORKERS_PER_CORE} x the {os.cpu_count() or 1} "
                f"cores of this machine), got {self.num_workers}"
            )
        if not (math.isfinite(self.max_grad_norm) and self.max_grad_norm >= 0):
            raise ToyaccelError(f"max_grad_norm must be 0 (off) or positive, got {self.max_grad_norm}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ToyaccelError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.val_fraction and self.val_data:
            raise ToyaccelError("give either val_data or val_fraction, not both")
        if self.output_dir is not None:
            check_output_dir(self.output_dir)
        self.validate_workload()
        check_fits(training_memory(self), "the model and data")

    def validate_workload(self) -> None:
        other_family = MLP_OPTIONS if self.model == "gpt" else GPT_OPTIONS
        given = [name for name in other_family if getattr(self, name) is not None]
        if given:
            owner = "mlp" if self.model == "gpt" else "gpt"
            raise ToyaccelError(f"{flag(given[0])} is an option of --model {owner}, not of --model {self.model}")
        if self.model != "gpt":
            return
        for name in ("vocab_size", "context_length", "emb_dim", "n_heads", "n_layers", "stride"):
            if getattr(self, name) < 1:
                raise ToyaccelError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.emb_dim % self.n_heads:
            raise ToyaccelError(f"emb_dim ({self.emb_dim}) must be divisible by n_heads ({self.n_heads})")
        if not 0.0 <= self.drop_rate < 1.0:
            raise ToyaccelError(f"drop_rate must be in [0, 1), got {self.drop_rate}")
        if self.tokenizer == "bpe" and self.vocab_size < 256:
            raise ToyaccelError(f"vocab_size must be at least 256 for the byte-level BPE, got {self.vocab_size}")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for name in ("hidden", "ignore_columns"):
            d[name] = None if d[name] is None else list(d[name])
        return d

    def training_dict(self) -> dict[str, Any]:
        """The training fields that take part in this run (a CSV run has no num_samples): what a checkpoint
        records and must match."""
        d = self.to_dict()
        return {name: d[name] for name in self.TRAINING_FIELDS if option_applies(name, d)}

    def replace(self, **changes: Any) -> TrainConfig:
        unset = {name: None for name in getattr(self, "_defaulted", ()) if name not in changes}
        return dataclasses.replace(self, **unset, **changes)


def check_seed(value: int, name: str) -> None:
    if not 0 <= value <= MAX_SEED:
        raise ToyaccelError(f"{name} must be in 0..{MAX_SEED}, got {value}")


def check_count(name: str, value: Any, least: int) -> None:
    """A size read from a file (config.json): an int, at least ``least``."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise ToyaccelError(f"{name} must be int, got {value!r}")
    if value < least:
        raise ToyaccelError(f"{name} must be at least {least}, got {value}")


def mlp_parameters(num_inputs: int, hidden: tuple[int, ...], num_outputs: int) -> int:
    sizes = [num_inputs, *hidden, num_outputs]
    return sum((fan_in + 1) * fan_out for fan_in, fan_out in zip(sizes, sizes[1:]))


def gpt_parameters(config: TrainConfig) -> int:
    emb, vocab = config.emb_dim, config.vocab_size + -config.vocab_size % 64  # padded rows (workloads.gpt)
    block = 12 * emb * emb + 13 * emb + (3 * emb if config.qkv_bias else 0)
    return 2 * vocab * emb + config.context_length * emb + config.n_layers * block + 2 * emb


def training_memory(config: TrainConfig) -> int:
    """Bytes a run needs at the least: float32 parameters, their gradients and AdamW's two moments, and the
    synthetic data (the GPT's text is made through Python lists, ~56 bytes a character). Activations and
    a file's data are left out: a lower bound, so that a refusal is never wrong."""
    if config.model not in WORKLOAD_DEFAULTS:
        return 0  # a workload registered from outside toyaccel: nothing here knows its size
    copies = 4 if config.optimizer == "adamw" else 2
    synthetic = config.data == "synthetic"
    if config.model == "gpt":
        parameters = gpt_parameters(config)
        data = 56 * config.num_samples if synthetic else 0
    else:
        num_inputs = config.num_features if synthetic else 2 if config.data == "toy" else 1
        parameters = mlp_parameters(num_inputs, config.hidden, config.num_classes or 2)
        data = config.num_samples * (2 * 4 * config.num_features + 8) if synthetic else 0
    return 4 * parameters * copies + data


def machine_memory() -> int | None:
    """This machine's memory in bytes (not what is free now: a busy moment must not refuse a run)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def in_bytes(n: float) -> str:
    for unit, size in (("PB", 1e15), ("TB", 1e12), ("GB", 1e9), ("MB", 1e6)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n:.0f} bytes"


def check_fits(needed: int, what: str) -> None:
    total = machine_memory()
    if total and needed > total:
        raise ToyaccelError(f"{what} need at least {in_bytes(needed)}, this machine has {in_bytes(total)} of memory")


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
    options = config.to_dict()
    return {name: value for name, value in options.items() if option_applies(name, options) and not unset(name, value)}


def option_applies(name: str, options: dict[str, Any]) -> bool:
    """Whether option ``name`` takes part in the run ``options`` describe: not one of the other model's,
    nor one of another data source's (num_samples is the synthetic data's, label_column a CSV's)."""
    other_family = MLP_OPTIONS if options.get("model") == "gpt" else GPT_OPTIONS
    if name in other_family:
        return False
    if name in ("label_column", "ignore_columns"):
        return options.get("data") not in ("toy", "synthetic")
    return name not in ("num_samples", "num_features") or options.get("data") == "synthetic"


def unset(name: str, value: Any) -> bool:
    return value is None or value == [] or value == "" or (name == "val_fraction" and not value)


def with_absolute_paths(options: dict[str, Any]) -> dict[str, Any]:
    """``options`` with the --data and --val-data paths made absolute (relative ones are relative to the
    current directory): config.json records them so, and a run evaluates from anywhere."""
    resolved = dict(options)
    for name in ("data", "val_data"):
        value = resolved.get(name)
        if isinstance(value, str) and value and not (name == "data" and value in ("toy", "synthetic")):
            resolved[name] = os.path.abspath(value)
    return resolved


def run_identity(options: dict[str, Any]) -> dict[str, Any]:
    """What makes two runs the same run, from a config.json's ``config`` section or a TrainerState's
    ``training``, both normalised alike: the training options that apply and are set, data paths absolute
    (a config.json saved with relative ones is read from the current directory, where a job runs again)."""
    same = {name: value for name, value in options.items() if name in TrainConfig.TRAINING_FIELDS}
    return with_absolute_paths({k: v for k, v in same.items() if option_applies(k, same) and not unset(k, v)})


def check_output_dir(path: str) -> None:
    """Every file of a run goes inside its own folder: an empty name would put them in the current
    directory and the filesystem root, the root would mix them with the system's."""
    if not path.strip():
        raise ToyaccelError(f"--output-dir {path!r} is empty: name the folder the run's files go to, e.g. runs/mine")
    if Path(path).resolve() == Path(Path(path).resolve().anchor):
        raise ToyaccelError(
            f"--output-dir {path} is the filesystem root: name a folder of the run's own, e.g. /runs/mine"
        )


def flag(name: str) -> str:
    """A field's command-line spelling: ``eval_train`` is ``--eval-train``."""
    return "--" + name.replace("_", "-")


def field_names() -> list[str]:
    return [f.name for f in dataclasses.fields(TrainConfig)]


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Options from a YAML or JSON file: keys are TrainConfig fields (dashes or underscores)."""
    path = Path(path)
    require_regular_file(path)
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
    values = flatten_sections(path, values)
    unknown = sorted(set(values) - set(field_names()))
    if unknown:
        raise ToyaccelError(f"config file {path}: unknown option(s) {', '.join(unknown)}")
    return values


def section_of(name: str) -> str:
    return next((section for section, names in SECTIONS.items() if name in names), "run")


def flatten_sections(path: Path, values: dict[str, Any]) -> dict[str, Any]:
    """A config file may group options under data:, model:, optimizer: and run: (as --help does) or
    list them flat; either way each option is named once."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        key = str(key).replace("-", "_")
        # "model" is both a section and an option (--model gpt): a mapping is the section.
        group = value if key in (*SECTIONS, "run") and isinstance(value, dict) else {key: value}
        for name, v in group.items():
            name = str(name).replace("-", "_")
            if name in flat:
                raise ToyaccelError(f"config file {path}: option {name} is given twice")
            flat[name] = v
    return flat


def build_config(file_values: dict[str, Any] | None = None, **overrides: Any) -> TrainConfig:
    """Defaults < file values < overrides, validated once."""
    values = {**(file_values or {}), **overrides}
    try:
        return TrainConfig(**values)
    except TypeError as e:
        raise ToyaccelError(str(e)) from None
