"""Each option is declared once, in TrainConfig: every table of which option belongs to what, the types,
the --help groups and the defaults per workload come from those declarations."""

from __future__ import annotations

import dataclasses

import pytest

from toyaccel.cli import train_parser
from toyaccel.config import (
    DESCRIBED_OPTIONS,
    GPT_OPTIONS,
    MLP_OPTIONS,
    OPTIONS,
    SECTIONS,
    TRAINING_FIELDS,
    WORKLOAD_DEFAULTS,
    TrainConfig,
    applicable_options,
)
from toyaccel.engine.workload import Workload
from toyaccel.errors import ToyaccelError
from toyaccel.options import SECTION_NAMES, flag, option, option_names, option_types, sections, workload_defaults
from toyaccel.workloads import WORKLOADS, register_workload

# The tables as they were written by hand before the options were declared once (toyaccel 0.1), with the
# options added since (init_from, max_steps, verify_data) where main's hand-written tables had them.
HAND_WRITTEN_MLP_OPTIONS = (
    "label_column", "ignore_columns", "num_features", "num_classes", "standardize", "hidden", "eval_train",
)  # fmt: skip
HAND_WRITTEN_GPT_OPTIONS = (
    "preset", "init_from", "tokenizer", "vocab_size", "stride", "verify_data", "context_length", "emb_dim",
    "n_heads", "n_layers", "drop_rate", "qkv_bias",
)  # fmt: skip
HAND_WRITTEN_SECTIONS = {
    "data": ("data", "val_data", "val_fraction", "label_column", "ignore_columns", "num_samples", "num_features",
             "num_classes", "standardize", "tokenizer", "vocab_size", "stride", "verify_data"),
    "model": ("model", "preset", "init_from", "hidden", "context_length", "emb_dim", "n_heads", "n_layers", "drop_rate",
              "qkv_bias"),
    "optimizer": ("optimizer", "lr", "weight_decay", "epochs", "batch_size", "grad_accum", "lr_schedule",
                  "warmup_steps", "max_grad_norm", "max_steps"),
}  # fmt: skip
HAND_WRITTEN_TRAINING_FIELDS = (
    "data", "val_data", "val_fraction", "label_column", "ignore_columns", "num_samples", "num_features",
    "num_classes", "standardize", "hidden", "epochs", "lr", "seed", "lr_schedule", "warmup_steps", "max_grad_norm",
    "model", "init_from", "tokenizer", "vocab_size", "stride", "context_length", "emb_dim", "n_heads", "n_layers",
    "drop_rate", "qkv_bias", "optimizer", "weight_decay", "max_steps",
)  # fmt: skip
# weight_decay's default is a rule of the optimizer (below), no longer a table entry.
HAND_WRITTEN_WORKLOAD_DEFAULTS = {
    "mlp": {"data": "toy", "num_samples": 1000, "val_fraction": 0.0, "optimizer": "sgd", "lr": 0.5,
            "label_column": "label", "ignore_columns": (), "num_features": 2, "standardize": False,
            "hidden": (30, 20), "eval_train": "sample"},
    "gpt": {"data": "synthetic", "num_samples": 50_000, "val_fraction": 0.1, "optimizer": "adamw", "lr": 0.0004,
            "vocab_size": 1024, "context_length": 128, "emb_dim": 128, "n_heads": 4, "n_layers": 4,
            "drop_rate": 0.1, "qkv_bias": False, "verify_data": False},
}  # fmt: skip
ALL_OPTIONS = (
    "model", "data", "val_data", "val_fraction", "label_column", "ignore_columns", "num_samples", "num_features",
    "num_classes", "standardize", "tokenizer", "vocab_size", "stride", "verify_data", "hidden", "preset",
    "init_from", "context_length", "emb_dim", "n_heads", "n_layers", "drop_rate", "qkv_bias", "optimizer",
    "weight_decay", "epochs", "batch_size", "lr", "seed", "grad_accum", "lr_schedule", "warmup_steps",
    "max_grad_norm", "mixed_precision", "compile", "tf32", "data_placement", "output_dir", "overwrite", "resume",
    "checkpoint_every", "eval_every", "max_steps", "eval_every_steps", "eval_batches", "eval_train", "keep_last",
    "log_every", "progress", "log_with", "plot", "num_workers",
)  # fmt: skip


def test_every_option_is_declared_with_its_section_workload_and_help():
    assert tuple(OPTIONS) == ALL_OPTIONS
    types = option_types(TrainConfig)
    for name, declaration in OPTIONS.items():
        assert declaration.metadata["section"] in SECTION_NAMES, name
        assert declaration.metadata["workload"] in ("all", "mlp", "gpt"), name
        assert declaration.metadata["help"].strip(), name
        assert types[name][0] in (int, float, bool, str, tuple), name
    # The internal record of defaulted options is no option: not on the command line, nor in config.json.
    assert "defaulted" not in OPTIONS and "defaulted" not in TrainConfig().to_dict()


def test_the_tables_derived_from_the_declarations_equal_the_hand_written_ones():
    assert MLP_OPTIONS == HAND_WRITTEN_MLP_OPTIONS
    assert set(GPT_OPTIONS) == set(HAND_WRITTEN_GPT_OPTIONS)
    assert {name: set(names) for name, names in SECTIONS.items() if name != "run"} == {
        name: set(names) for name, names in HAND_WRITTEN_SECTIONS.items()
    }
    assert set(SECTIONS["run"]) == set(ALL_OPTIONS) - {n for names in HAND_WRITTEN_SECTIONS.values() for n in names}
    assert set(TRAINING_FIELDS) == set(HAND_WRITTEN_TRAINING_FIELDS) == set(TrainConfig.TRAINING_FIELDS)
    assert WORKLOAD_DEFAULTS == HAND_WRITTEN_WORKLOAD_DEFAULTS
    assert DESCRIBED_OPTIONS == {"data", "val_data", "val_fraction", "num_classes", "num_samples", "num_features"}


def test_types_come_from_the_annotations():
    types = option_types(TrainConfig)
    assert types["epochs"] == (int, False) and types["lr"] == (float, False)
    assert types["num_samples"] == (int, True) and types["hidden"] == (tuple, True)
    assert types["compile"] == (bool, False) and types["data"] == (str, True)


def test_help_groups_are_the_declared_sections():
    parser = train_parser()
    groups = {group.title: group for group in parser._action_groups}
    for section in SECTION_NAMES:
        shown = [a.option_strings[0] for a in groups[f"{section} options"]._group_actions]
        assert shown == [flag(name) for name in SECTIONS[section]]


def test_an_option_declared_on_a_dataclass_is_in_every_derived_table():
    @dataclasses.dataclass
    class Declared:
        width: int | None = option(8, "w", section="model", workload="mlp", identity=True)
        steps: int = option(1, "s", section="run")
        rate: float = option(0.1, "r", section="optimizer", by_workload={"gpt": 0.2}, identity=True)

    assert sections(Declared) == {"data": (), "model": ("width",), "optimizer": ("rate",), "run": ("steps",)}
    assert option_names(Declared, identity=True) == ("width", "rate")
    assert option_names(Declared, workload="mlp") == ("width",)
    assert workload_defaults(Declared, "mlp") == {"width": 8, "rate": 0.1}
    assert workload_defaults(Declared, "gpt") == {"rate": 0.2}
    assert option_types(Declared) == {"width": (int, True), "steps": (int, False), "rate": (float, False)}
    # Defaults that depend on the workload are resolved, not fixed in the dataclass.
    assert Declared().width is None and Declared().steps == 1


@pytest.mark.parametrize(
    "given, expected",
    [
        ({}, {"tokenizer": "bytes", "vocab_size": 256, "stride": 128, "weight_decay": 0.1, "val_fraction": 0.1}),
        ({"data": "book.txt"}, {"tokenizer": "bpe", "vocab_size": 1024}),
        ({"data": "book.txt", "tokenizer": "gpt2"}, {"vocab_size": 50257}),
        ({"context_length": 64}, {"stride": 64}),
        ({"optimizer": "sgd"}, {"weight_decay": 0.0}),
        ({"val_data": "val.txt", "data": "book.txt"}, {"val_fraction": 0.0}),
        ({"preset": "gpt2-124m"}, {"vocab_size": 50257, "context_length": 1024, "stride": 1024, "emb_dim": 768}),
        ({"preset": "gpt2-124m", "emb_dim": 48}, {"emb_dim": 48, "n_heads": 12}),
    ],
)
def test_the_gpt_defaults_that_depend_on_other_options(given, expected):
    config = TrainConfig(model="gpt", **given)
    assert {name: getattr(config, name) for name in expected} == expected


def test_the_mlp_keeps_the_book_defaults_and_takes_the_rules_that_apply_to_it():
    config = TrainConfig()
    assert (config.optimizer, config.lr, config.weight_decay, config.hidden, config.data) == (
        "sgd",
        0.5,
        0.0,
        (30, 20),
        "toy",
    )
    assert TrainConfig(optimizer="adamw").weight_decay == 0.1
    assert all(getattr(config, name) is None for name in GPT_OPTIONS)
    assert "tokenizer" not in applicable_options(config) and applicable_options(config)["hidden"] == [30, 20]


def test_replace_gives_the_new_workload_its_defaults_and_keeps_what_was_given():
    mlp = TrainConfig(epochs=5, lr=0.25)
    gpt = mlp.replace(model="gpt")  # hidden and eval_train were the MLP's defaults: not given, so not kept
    assert (gpt.epochs, gpt.lr, gpt.optimizer, gpt.weight_decay, gpt.emb_dim) == (5, 0.25, "adamw", 0.1, 128)
    assert "lr" not in mlp.defaulted and "optimizer" in mlp.defaulted


def test_an_option_of_the_other_model_is_refused_in_one_line():
    with pytest.raises(ToyaccelError, match=r"^--n-heads is an option of --model gpt, not of --model mlp$"):
        TrainConfig(n_heads=2)


class Stub(Workload):
    """A workload registered from outside toyaccel: only its option defaults matter here."""

    name = "stub"
    option_defaults = {"lr": 0.3, "data": "mine"}
    load_data = build_model = model_shape = model_from_shape = loss = staticmethod(lambda *args: None)


@pytest.fixture
def stub():
    yield register_workload(Stub())
    WORKLOADS.pop("stub")


def test_a_workload_from_outside_gets_the_shared_defaults_its_own_and_no_model_familys(stub):
    config = TrainConfig(model="stub")
    shared = (config.lr, config.data, config.optimizer, config.weight_decay, config.val_fraction, config.epochs)
    assert shared == (0.3, "mine", "sgd", 0.0, 0.0, 3)
    assert all(getattr(config, name) is None for name in (*MLP_OPTIONS, *GPT_OPTIONS))
    with pytest.raises(ToyaccelError, match=r"^--hidden is an option of --model mlp, not of --model stub$"):
        TrainConfig(model="stub", hidden="4")
