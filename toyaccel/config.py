"""The training configuration: every option declared once, in ``TrainConfig``, and validated in one place.

Precedence, lowest first: the declared defaults (the book's Appendix A run for --model mlp; per workload
where they differ) < a YAML/JSON file given with ``--config`` < options on the command line (or keyword
arguments in Python). toyaccel.options derives from the declarations every table of which option belongs
to what; the small checks it re-exports live in toyaccel.limits and toyaccel.options (which the workloads
import: they sit below this module), the workloads' own constants in their packages.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from toyaccel.default_rules import DEFAULT_RULES, Chosen
from toyaccel.engine.files import require_regular_file as require_regular_file
from toyaccel.errors import ToyaccelError
from toyaccel.limits import check_fits as check_fits
from toyaccel.limits import in_bytes as in_bytes
from toyaccel.limits import machine_memory as machine_memory
from toyaccel.limits import mlp_parameters as mlp_parameters
from toyaccel.options import (
    BY_RULE,
    belongs_to,
    declared,
    option,
    option_names,
    option_types,
    read_options_file,
    sections,
    unset,
    with_absolute_paths,
    workload_defaults,
)
from toyaccel.options import check_count as check_count
from toyaccel.options import check_seed as check_seed
from toyaccel.options import flag as flag
from toyaccel.options import parse_hidden as parse_hidden
from toyaccel.options import parse_names as parse_names
from toyaccel.validation import check_options
from toyaccel.workloads import get_workload, workload_names
from toyaccel.workloads.gpt import PRESETS, SYNTHETIC_CHARS, TOKENIZERS
from toyaccel.workloads.mlp import EVAL_TRAIN_SAMPLE

LR_SCHEDULES = ("constant", "cosine", "linear")
EVAL_TRAIN = ("sample", "full")
MIXED_PRECISION = ("no", "bf16", "fp16")
MODELS = ("mlp", "gpt")
OPTIMIZERS = ("sgd", "adamw")
DATA_PLACEMENTS = ("auto", "device", "host")
MLP, GPT = MODELS


@dataclass
class TrainConfig:
    """Everything one training run depends on. The defaults are the book's Appendix A run; the GPT's are
    chapter 5's optimizer (AdamW, lr 0.0004, weight decay 0.1) and a model small enough for a CPU.

    Each option is declared once with ``option(default, help, section=..., ...)`` (toyaccel.options):
    ``workload=`` the one model family it belongs to, ``by_workload=`` its default where a family's
    differs, ``identity=True`` where a resumed run must match it."""

    # --- workload -----------------------------------------------------------------------------
    model: str = option(
        MLP, "mlp (the book's Appendix A classifier) or gpt (chapter 4's GPTModel)", section="model", identity=True,
        choices=MODELS,
    )  # fmt: skip
    # --- data ---------------------------------------------------------------------------------
    data: str | None = option(
        None,
        "mlp: 'toy' (the book's 5+2 points, default), 'synthetic' (seeded Gaussian blobs) or a CSV path; "
        "gpt: 'synthetic' (seeded text of known entropy, default), a UTF-8 text file, a folder of .txt files, or a "
        "folder of token shards (toyaccel-prepare's, or nanoGPT's train.bin/val.bin) read through a memory map",
        section="data", by_workload={MLP: "toy", GPT: "synthetic"}, identity=True, described=True,
    )  # fmt: skip
    val_data: str | None = option(
        None, "validation data: CSV rows (mlp; default: the book's test set for 'toy') or text (gpt)",
        section="data", identity=True, described=True,
    )  # fmt: skip
    val_fraction: float = option(
        0.0, "mlp: hold out this fraction of the rows (seeded split; default 0); gpt: the last fraction of the text "
        "(default 0.1, the book's train_ratio 0.9)",
        section="data", by_workload={GPT: 0.1}, identity=True, described=True,
    )  # fmt: skip
    label_column: str | None = option(
        "label", "mlp: CSV column holding the class: numbers 0..K-1, or any values (names, other numbers) as class "
        "names (default: label)",
        section="data", workload=MLP, identity=True, data_source="file",
    )  # fmt: skip
    ignore_columns: tuple[str, ...] | None = option(
        (), "mlp: CSV columns that are not features, comma separated, e.g. id,name (predict copies them to its "
        "output)",
        section="data", workload=MLP, identity=True, data_source="file",
    )  # fmt: skip
    num_samples: int | None = option(
        None, "'synthetic': number of rows (mlp, default 1000) or characters (gpt, 50000)",
        section="data", by_workload={MLP: 1000, GPT: SYNTHETIC_CHARS}, identity=True, described=True,
        data_source="synthetic",
    )  # fmt: skip
    num_features: int | None = option(
        2, "mlp, 'synthetic': number of input features (default: 2)",
        section="data", workload=MLP, identity=True, described=True, data_source="synthetic",
    )  # fmt: skip
    num_classes: int | None = option(
        None, "mlp: number of classes (default: inferred from the labels; 2 for 'synthetic')",
        section="data", workload=MLP, identity=True, described=True,
    )  # fmt: skip
    standardize: bool | None = option(
        False, "mlp: standardize features with training-set mean/std (saved in config.json)",
        section="data", workload=MLP, identity=True,
    )  # fmt: skip
    tokenizer: str | None = option(
        BY_RULE, "gpt: bpe (byte-level BPE trained on the training text, default), bytes (default for synthetic) "
        "or gpt2 (tiktoken, needs its files)",
        section="data", workload=GPT, identity=True, choices=TOKENIZERS,
    )  # fmt: skip
    vocab_size: int | None = option(
        1024, "gpt: vocabulary size of the model (the BPE learns at most this many; default 1024)",
        section="data", workload=GPT, identity=True,
    )  # fmt: skip
    stride: int | None = option(
        BY_RULE, "gpt: tokens between the starts of two windows (default: the context length)",
        section="data", workload=GPT, identity=True,
    )  # fmt: skip
    verify_data: bool = option(
        False, "gpt, a shard folder: check every shard's SHA-256 against its manifest first (reads the whole corpus "
        "once)",
        section="data", workload=GPT,
    )  # fmt: skip
    # --- model --------------------------------------------------------------------------------
    hidden: tuple[int, ...] | None = option(
        (30, 20), "mlp: hidden layer sizes, comma separated (the book: 30,20)",
        section="model", workload=MLP, identity=True,
    )  # fmt: skip
    preset: str | None = option(
        None, "gpt: the book's GPT_CONFIG_124M shape (options given override it)",
        section="model", workload=GPT, choices=tuple(PRESETS),
    )  # fmt: skip
    init_from: str | None = option(
        None, "gpt: start from a Hugging Face GPT-2 folder (save_pretrained's config.json + model.safetensors): "
        "its shape, weights and tokenizer (fine-tuning)",
        section="model", workload=GPT, identity=True,
    )  # fmt: skip
    context_length: int | None = option(
        128, "gpt: tokens per window and size of the position table (default 128)",
        section="model", workload=GPT, identity=True,
    )  # fmt: skip
    emb_dim: int | None = option(128, "gpt: embedding size (default 128)", section="model", workload=GPT, identity=True)
    n_heads: int | None = option(4, "gpt: attention heads (default 4)", section="model", workload=GPT, identity=True)
    n_layers: int | None = option(
        4, "gpt: transformer blocks (default 4)", section="model", workload=GPT, identity=True
    )
    drop_rate: float | None = option(
        0.1, "gpt: dropout rate (default 0.1)", section="model", workload=GPT, identity=True
    )
    qkv_bias: bool | None = option(
        False, "gpt: bias in the query, key and value projections (default: no)",
        section="model", workload=GPT, identity=True,
    )  # fmt: skip
    # --- optimisation -------------------------------------------------------------------------
    optimizer: str = option(
        "sgd", "sgd (mlp default) or adamw (gpt default)",
        section="optimizer", by_workload={GPT: "adamw"}, identity=True, choices=OPTIMIZERS,
    )  # fmt: skip
    weight_decay: float = option(
        BY_RULE, "weight decay (default: 0 for sgd, 0.1 for adamw as the book's chapter 5)",
        section="optimizer", identity=True,
    )  # fmt: skip
    epochs: int = option(
        3, "number of passes over the training data (--max-steps overrides it)",
        section="optimizer", identity=True, overridden_by="max_steps",
    )  # fmt: skip
    batch_size: int = option(
        2, "samples per process per micro-step; global batch = processes x this x grad_accum", section="optimizer"
    )
    # No default of its own: a workload registered from outside toyaccel gives one (Workload.option_defaults).
    lr: float = option(
        None, "peak learning rate (default: 0.5 for the MLP's SGD, 0.0004 for the GPT's AdamW)",
        section="optimizer", by_workload={MLP: 0.5, GPT: 0.0004}, identity=True,
    )  # fmt: skip
    seed: int = option(
        123, "seed for model init and data order, applied as the book does", section="run", identity=True
    )
    grad_accum: int = option(
        1, "accumulate gradients over this many micro-steps per optimizer step", section="optimizer"
    )
    lr_schedule: str = option(
        "constant", "learning-rate schedule after warm-up", section="optimizer", identity=True, choices=LR_SCHEDULES
    )
    warmup_steps: int = option(
        0, "optimizer steps of linear warm-up from 0 to --lr", section="optimizer", identity=True
    )
    max_grad_norm: float = option(
        0.0, "clip the global gradient norm to this value (0 = off)", section="optimizer", identity=True
    )
    mixed_precision: str | None = option(
        None, "no | bf16 | fp16 (default: what the accelerate config says)", section="run", choices=MIXED_PRECISION
    )
    compile: bool = option(
        False, "torch.compile the model (same results within tolerance, slower start)", section="run"
    )
    tf32: bool = option(True, "TF32 matmuls on GPUs that have them (Ampere+); --no-tf32 for exact fp32", section="run")
    data_placement: str = option(
        "auto", "on a GPU: keep the data on it (device) or in pinned host memory (host); auto: on it when it "
        "fits in a quarter of its free memory", section="run", choices=DATA_PLACEMENTS,
    )  # fmt: skip
    # --- outputs ------------------------------------------------------------------------------
    output_dir: str | None = option(
        None,
        "where model, config, results, metrics and checkpoints go (default: a fresh folder per run: "
        "runs/toy, runs/toy-2, ...; named after --data)",
        section="run",
    )
    overwrite: bool = option(False, "replace the toyaccel files of a previous run in --output-dir", section="run")
    resume: str | None = option(
        None, "'latest' (newest complete checkpoint), 'auto' (latest if any, else start) or a checkpoint folder",
        section="run",
    )  # fmt: skip
    checkpoint_every: int = option(0, "also checkpoint every N optimizer steps (0 = only at epoch ends)", section="run")
    eval_every: int = option(1, "evaluate every N epochs (the last epoch always)", section="run")
    # A corpus is trained for a budget of steps, as LLM pretraining does, not for epochs.
    max_steps: int = option(
        0, "train for N optimizer steps, then stop (mid-epoch too; 0 = off): overrides --epochs, the data is read "
        "in as many epochs as N needs and the learning-rate schedule spans N steps",
        section="optimizer", identity=True, only_when_on=True,
    )  # fmt: skip
    eval_every_steps: int = option(
        0, "evaluate every K optimizer steps and at the end, as records of kind 'eval' (0 = off: evaluate at epoch "
        "ends, see --eval-every)",
        section="run", only_when_on=True,
    )  # fmt: skip
    eval_batches: int = option(
        0, "score only the first M batches (M x --batch-size samples, the same for any number of processes) of "
        "each set in the evaluations during training (0 = all)",
        section="run", only_when_on=True,
    )  # fmt: skip
    # The GPT scores every training window (its evaluation is cheap next to its training step).
    eval_train: str | None = option(
        "sample",
        f"mlp: training-set metrics: 'sample' (default) scores a fixed seeded sample of {EVAL_TRAIN_SAMPLE} rows "
        "(every row of a smaller set), 'full' every row (the GPT scores every window)",
        section="run", workload=MLP, choices=EVAL_TRAIN,
    )  # fmt: skip
    keep_last: int = option(3, "keep only the newest K checkpoints (0 = keep all)", section="run")
    log_every: int = option(0, "log every N optimizer steps (0 = about ten lines per epoch)", section="run")
    progress: bool = option(True, "show a progress bar when writing to a terminal", section="run")
    log_with: str | None = option(
        None, "also send metrics to this accelerate tracker (e.g. tensorboard)", section="run"
    )
    plot: bool = option(True, "write loss.png (needs matplotlib)", section="run")
    num_workers: int = option(0, "DataLoader worker processes (0 is fastest for in-memory tensors)", section="run")

    # The options that took their run's default (not given): replace(model=...) gives them the new
    # model's defaults, not the old ones. Internal: in no config.json or --help.
    defaulted: frozenset[str] = field(init=False, repr=False, compare=False, default=frozenset())

    def __post_init__(self) -> None:
        self.resolve_defaults()
        self.validate()

    def resolve_defaults(self) -> None:
        """Give each option of this run's workload that was not given (None) its default: the declared one,
        then DEFAULT_RULES in order (a rule's value wins over a declaration, a later rule's over an earlier)."""
        if self.model not in workload_names():
            return  # validate() names the bad model
        fills = workload_defaults(TrainConfig, self.model)
        if self.model not in MODELS:  # registered from outside toyaccel: it brings its own defaults
            fills.update(get_workload(self.model).option_defaults)

        chosen = Chosen(self, fills)
        for rule in DEFAULT_RULES:
            fills.update(rule(chosen))
        filled = {
            name for name, value in fills.items()
            if value is not None and getattr(self, name) is None and belongs_to(OPTIONS[name], self.model)
        }  # fmt: skip
        for name in filled:
            setattr(self, name, fills[name])
        self.defaulted = frozenset(filled)

    def validate(self) -> None:
        """Check every option once; raise ToyaccelError naming the first bad one."""
        check_options(self)

    def to_dict(self) -> dict[str, Any]:
        """The options (``defaulted`` is not one), tuples as lists: what config.json records."""
        d = {f.name: getattr(self, f.name) for f in declared(TrainConfig)}
        for name, (kind, _) in option_types(TrainConfig).items():
            if kind is tuple and d[name] is not None:
                d[name] = list(d[name])
        return d

    def training_dict(self) -> dict[str, Any]:
        """The training fields that take part in this run (a CSV run has no num_samples): what a checkpoint
        records and must match."""
        d = self.to_dict()
        return {name: d[name] for name in TRAINING_FIELDS if option_applies(name, d)}

    def replace(self, **changes: Any) -> TrainConfig:
        """A copy with ``changes``; the options that took a default take the new run's (its model's)."""
        unset_again = {name: None for name in self.defaulted if name not in changes}
        return dataclasses.replace(self, **unset_again, **changes)


# Every table of which option belongs to what, derived from the declarations above.
OPTIONS = {f.name: f for f in declared(TrainConfig)}
SECTIONS = sections(TrainConfig)
MLP_OPTIONS = option_names(TrainConfig, workload=MLP)
GPT_OPTIONS = option_names(TrainConfig, workload=GPT)
# A resumed run must match the checkpoint in these. (batch_size and grad_accum enter through the global
# batch, so a resume may change how the global batch is split over processes.)
TRAINING_FIELDS = TrainConfig.TRAINING_FIELDS = option_names(TrainConfig, identity=True)
# What the start-up line's description of the data already says.
DESCRIBED_OPTIONS = frozenset(option_names(TrainConfig, described=True))
WORKLOAD_DEFAULTS = {
    model: {name: value for name, value in workload_defaults(TrainConfig, model).items() if value is not None}
    for model in MODELS
}


def field_names() -> tuple[str, ...]:
    return tuple(OPTIONS)


def section_of(name: str) -> str:
    return OPTIONS[name].metadata["section"]


def applicable_options(config: TrainConfig) -> dict[str, Any]:
    """The options that take part in this run: unset ones and those of another data source left out.
    What the start-up line prints and config.json keeps."""
    options = config.to_dict()
    return {name: value for name, value in options.items() if option_applies(name, options) and not unset(name, value)}


def option_applies(name: str, options: dict[str, Any]) -> bool:
    """Whether option ``name`` takes part in the run ``options`` describe: not one of another model's,
    nor one of another data source's (num_samples is the synthetic data's, label_column a file's)."""
    declaration = OPTIONS[name]
    if not belongs_to(declaration, options.get("model") or MLP):  # runs saved before the GPT are MLP runs
        return False
    if declaration.metadata["only_when_on"] and not options.get(name):
        return False
    if options.get(declaration.metadata["overridden_by"] or ""):
        return False
    source = declaration.metadata["data_source"]
    if source == "file":
        return options.get("data") not in ("toy", "synthetic")
    return source != "synthetic" or options.get("data") == "synthetic"


def run_identity(options: dict[str, Any]) -> dict[str, Any]:
    """What makes two runs the same run, from a config.json's ``config`` section or a TrainerState's
    ``training``, both normalised alike: the training options that apply and are set, data paths absolute
    (a config.json saved with relative ones is read from the current directory, where a job runs again)."""
    same = {name: value for name, value in options.items() if name in TRAINING_FIELDS}
    return with_absolute_paths({k: v for k, v in same.items() if option_applies(k, same) and not unset(k, v)})


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Options from a YAML or JSON file: keys are TrainConfig's options (dashes or underscores), flat or
    under the sections data:, model:, optimizer: and run:."""
    return read_options_file(path, field_names())


def build_config(file_values: dict[str, Any] | None = None, **overrides: Any) -> TrainConfig:
    """Defaults < file values < overrides, validated once."""
    values = {**(file_values or {}), **overrides}
    try:
        return TrainConfig(**values)
    except TypeError as e:
        raise ToyaccelError(str(e)) from None
