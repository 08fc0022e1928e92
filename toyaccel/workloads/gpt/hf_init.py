"""``--init-from DIR``: a GPT run that starts from a Hugging Face GPT-2 folder (fine-tuning).

The folder (``GPT2LMHeadModel.save_pretrained``'s config.json + model.safetensors) gives the run its model
shape, its weights (through hf_gpt2's chapter 5 mapping) and, where it holds one, its tokenizer
(tokenizer.json, or GPT-2's vocab.json + merges.txt). Options that contradict the folder are refused at
start-up, all in one line; only the dropout rate may be chosen freely (GPT-2 trains with dropout, a
fine-tuning run often without).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from toyaccel.errors import ToyaccelError
from toyaccel.options import flag
from toyaccel.workloads.gpt import TOKENIZER_SIZES
from toyaccel.workloads.gpt.hf_gpt2 import HF_CONFIG, book_config, load_hf_gpt2, read_hf_config, read_hf_weights
from toyaccel.workloads.gpt.tokenizers import BPETokenizer

# The book's name of each shape option and GPT-2's name of the same thing in config.json.
HF_NAMES = {"vocab_size": "vocab_size", "context_length": "n_positions", "emb_dim": "n_embd", "n_heads": "n_head",
            "n_layers": "n_layer", "qkv_bias": "c_attn's biases"}  # fmt: skip


def tokenizer_files(folder: str | Path) -> list[Path] | None:
    """The folder's tokenizer files, or None where it has none: tokenizer.json, else vocab.json + merges.txt."""
    folder = Path(folder)
    for names in (("tokenizer.json",), ("vocab.json", "merges.txt")):
        if all((folder / name).is_file() for name in names):
            return [folder / name for name in names]
    return None


def init_from_fills(config, tokenizer: str) -> dict[str, Any]:
    """The options an --init-from folder sets (the book's GPT_CONFIG from its config.json, and the
    tokenizer where it has one); ToyaccelError naming its config.json where options given contradict it.
    ``config`` holds the options as given (None where unset); ``tokenizer``, the one the run would use."""
    path = Path(config.init_from) / HF_CONFIG
    shape = book_config(read_hf_config(config.init_from))
    conflicts = [
        f"{flag(name)} {getattr(config, name)} against {HF_NAMES[name]} {shape[name]}"
        for name in HF_NAMES
        if getattr(config, name) is not None and getattr(config, name) != shape[name]
    ]
    if config.preset is not None:
        conflicts.append(f"--preset {config.preset} (the model's shape is the folder's)")
    own = tokenizer_files(config.init_from)
    if own and config.tokenizer not in (None, "bpe"):  # the folder's is a bpe: config.json records it so
        conflicts.append(f"--tokenizer {config.tokenizer} (the folder has its own: {own[0].name})")
    elif not own and TOKENIZER_SIZES.get(tokenizer, 0) > shape["vocab_size"]:
        size = TOKENIZER_SIZES[tokenizer]
        conflicts.append(f"--tokenizer {tokenizer} gives {size} tokens, beyond vocab_size {shape['vocab_size']}")
    if conflicts:
        raise ToyaccelError(f"{path}: options conflict with its model: {'; '.join(conflicts)}")
    return {**shape, **({"tokenizer": "bpe"} if own else {})}


def folder_tokenizer(folder: str | Path, vocab_size: int) -> BPETokenizer | None:
    """The folder's own tokenizer (None where it has none), checked to fit the model's vocabulary."""
    files = tokenizer_files(folder)
    if files is None:
        return None
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    try:
        if len(files) == 1:
            tokenizer = Tokenizer.from_file(str(files[0]))
        else:  # GPT-2's own files: byte-level BPE, no space added in front of the text
            tokenizer = Tokenizer(models.BPE.from_file(*map(str, files)))
            tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
            tokenizer.decoder = decoders.ByteLevel()
    except Exception as e:  # noqa: BLE001 - a damaged file: one line naming it
        first_line = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ToyaccelError(f"{files[0]}: cannot load the tokenizer: {first_line}") from None
    size = tokenizer.get_vocab_size()
    if size > vocab_size:
        raise ToyaccelError(f"{files[0]}: the tokenizer has {size} tokens, beyond the model's vocab_size {vocab_size}")
    return BPETokenizer(tokenizer)


def check_init_folder(config) -> BPETokenizer | None:
    """Everything that can be wrong with the folder, found before the run writes anything (tensor shapes
    from the safetensors header, without reading the weights); returns its tokenizer, if any."""
    hf = read_hf_config(config.init_from)
    tied = hf.get("tie_word_embeddings", True) is not False
    read_hf_weights(config.init_from, book_config(hf), tied, load=False)
    return folder_tokenizer(config.init_from, config.vocab_size)


def load_init_weights(model, folder: str | Path) -> None:
    """The folder's weights into the freshly built GPTModel (its padded vocabulary rows stay zero)."""
    model.load_state_dict(load_hf_gpt2(folder)[1], strict=True)
