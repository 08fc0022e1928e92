"""The defaults that depend on other options (``BY_RULE`` in a declaration of toyaccel.config): each a small
named function of ``chosen``, applied in the order of ``DEFAULT_RULES`` after the declared defaults."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from toyaccel.workloads.gpt import PRESETS, TOKENIZER_SIZES

if TYPE_CHECKING:
    from toyaccel.config import TrainConfig


class Chosen:
    """An option's value as the default rules see it: given, or its default so far. ``given``: the options
    as given (None where not)."""

    def __init__(self, given: TrainConfig, fills: dict[str, Any]):
        self.given, self.fills = given, fills

    def __call__(self, name: str) -> Any:
        return getattr(self.given, name) or self.fills.get(name)


# The defaults that depend on other options, each a function of ``chosen`` (an option's value: given, or
# its default so far), applied in this order after the declared defaults. Only options of the run's
# workload are filled: the GPT's rules do nothing for the MLP.
def no_split_beside_val_data(chosen: Chosen) -> dict[str, Any]:
    """Given a validation set, no fraction of the training data is held out."""
    return {"val_fraction": 0.0} if chosen("val_data") else {}


def weight_decay_by_optimizer(chosen: Chosen) -> dict[str, Any]:
    """AdamW decays the weights by 0.1 as the book's chapter 5 does; SGD (Appendix A) not at all."""
    return {"weight_decay": 0.1 if chosen("optimizer") == "adamw" else 0.0}


def tokenizer_by_data(chosen: Chosen) -> dict[str, Any]:
    """The synthetic text's entropy is known per character, so it is read byte by byte."""
    return {"tokenizer": "bytes" if chosen("data") == "synthetic" else "bpe"}


def vocab_size_by_tokenizer(chosen: Chosen) -> dict[str, Any]:
    """A fixed tokenizer's own vocabulary; the BPE learns up to the declared default."""
    size = TOKENIZER_SIZES.get(chosen("tokenizer"))
    return {} if size is None else {"vocab_size": size}


def shard_folder_decides(chosen: Chosen) -> dict[str, Any]:
    """A folder of token shards decides its tokenizer, vocabulary and split (after the defaults by data and
    tokenizer, which it overrides; before the preset's shape)."""
    data = chosen("data")
    if not (isinstance(data, str) and os.path.isdir(data)):
        return {}
    # Imported here: the command line's --help and option errors need no torch start-up.
    from toyaccel.workloads.gpt.shards import shard_defaults

    return shard_defaults(data)


def preset_shape(chosen: Chosen) -> dict[str, Any]:
    """--preset fills the model options not given (after the tokenizer's vocabulary: it names its own)."""
    return PRESETS.get(chosen("preset"), {})


def shape_of_init_folder(chosen: Chosen) -> dict[str, Any]:
    """--init-from's folder fixes the model's shape (and its tokenizer, where it has one): after the preset's
    and the tokenizer's, and checked against the options given."""
    if chosen.given.model != "gpt" or not isinstance(chosen("init_from"), str):  # validate() names another type
        return {}
    # Imported here: the command line's --help and option errors need no torch start-up.
    from toyaccel.workloads.gpt.hf_init import init_from_fills

    return init_from_fills(chosen.given, chosen("tokenizer"))


def stride_is_context_length(chosen: Chosen) -> dict[str, Any]:
    """Windows side by side, as the book's create_dataloader_v1 makes them."""
    return {"stride": chosen("context_length")}


DEFAULT_RULES = (
    no_split_beside_val_data, weight_decay_by_optimizer, tokenizer_by_data, vocab_size_by_tokenizer,
    shard_folder_decides, preset_shape, shape_of_init_folder, stride_is_context_length,
)  # fmt: skip
