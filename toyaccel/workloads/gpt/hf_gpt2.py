"""Hugging Face GPT-2 folders in and out: the book's chapter 5 mapping (§5.5, ``load_weights_into_gpt``).

A folder written by ``transformers.GPT2LMHeadModel.save_pretrained`` holds config.json and
model.safetensors. Its weights are Conv1D weights, stored [in, out]: the book's ``nn.Linear`` weight is
the transpose. ``c_attn`` holds query, key and value side by side along its last dimension, with biases
(the book's ``qkv_bias=True``). With tied embeddings (GPT-2's default) the file has no ``lm_head.weight``:
the output head is ``wte``. Nothing here needs transformers: reading and writing are safetensors and JSON.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from toyaccel.engine.files import read_json_object
from toyaccel.errors import ToyaccelError

# The book's LayerNorm has eps 1e-5 and its GELU is the tanh approximation: a GPT-2 folder that says
# otherwise would give other logits in GPTModel.
TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh")
LAYER_NORM_EPS = 1e-5
HF_WEIGHTS = "model.safetensors"
HF_CONFIG = "config.json"


def read_hf_config(folder: str | Path) -> dict[str, Any]:
    """config.json of a GPT-2 folder, checked to be one GPTModel can hold; one line naming the file otherwise."""
    path = Path(folder) / HF_CONFIG
    config = read_json_object(
        path, "no such file (--init-from takes a folder written by save_pretrained)",
        lambda e: f"not a JSON config ({type(e).__name__})", "not a JSON object",
    )  # fmt: skip
    if config.get("model_type") != "gpt2":
        raise ToyaccelError(f"{path}: model_type is {config.get('model_type')!r}, not 'gpt2'")
    problems = []
    for key in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head"):
        value = config.get(key)
        if not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
            problems.append(f"{key} must be a positive integer, got {value!r}")
    if not problems and config["n_embd"] % config["n_head"]:
        problems.append(f"n_embd ({config['n_embd']}) is not divisible by n_head ({config['n_head']})")
    if config.get("n_inner") not in (None, 4 * config.get("n_embd", 0)):
        problems.append(f"n_inner {config.get('n_inner')} is not 4 x n_embd, as the book's feed-forward is")
    if config.get("activation_function", "gelu_new") not in TANH_GELUS:
        problems.append(f"activation_function {config.get('activation_function')!r} is not the tanh GELU")
    eps = config.get("layer_norm_epsilon", LAYER_NORM_EPS)
    if not (isinstance(eps, (int, float)) and math.isclose(eps, LAYER_NORM_EPS)):
        problems.append(f"layer_norm_epsilon {eps!r} is not the book's 1e-5")
    if config.get("scale_attn_by_inverse_layer_idx") or config.get("scale_attn_weights") is False:
        problems.append("attention scaling other than 1/sqrt(head_dim)")
    if problems:
        raise ToyaccelError(f"{path}: not a GPT-2 the book's GPTModel can hold: {'; '.join(problems)}")
    return config


def book_config(hf: dict[str, Any]) -> dict[str, Any]:
    """The book's GPT_CONFIG dict for a GPT-2 config.json (its one dropout rate: resid_pdrop)."""
    drop = hf.get("resid_pdrop", 0.1)
    return {
        "vocab_size": hf["vocab_size"], "context_length": hf["n_positions"], "emb_dim": hf["n_embd"],
        "n_heads": hf["n_head"], "n_layers": hf["n_layer"], "drop_rate": float(drop), "qkv_bias": True,
    }  # fmt: skip


def _expected_shapes(cfg: dict[str, Any], tied: bool) -> dict[str, tuple[int, ...]]:
    emb, vocab = cfg["emb_dim"], cfg["vocab_size"]
    shapes = {"transformer.wte.weight": (vocab, emb), "transformer.wpe.weight": (cfg["context_length"], emb)}
    for i in range(cfg["n_layers"]):
        block = f"transformer.h.{i}."
        shapes.update({
            block + "ln_1.weight": (emb,), block + "ln_1.bias": (emb,),
            block + "attn.c_attn.weight": (emb, 3 * emb), block + "attn.c_attn.bias": (3 * emb,),
            block + "attn.c_proj.weight": (emb, emb), block + "attn.c_proj.bias": (emb,),
            block + "ln_2.weight": (emb,), block + "ln_2.bias": (emb,),
            block + "mlp.c_fc.weight": (emb, 4 * emb), block + "mlp.c_fc.bias": (4 * emb,),
            block + "mlp.c_proj.weight": (4 * emb, emb), block + "mlp.c_proj.bias": (emb,),
        })  # fmt: skip
    shapes["transformer.ln_f.weight"] = shapes["transformer.ln_f.bias"] = (emb,)
    if not tied:
        shapes["lm_head.weight"] = (vocab, emb)
    return shapes


def read_hf_weights(folder: str | Path, cfg: dict[str, Any], tied: bool, load: bool = True) -> dict[str, torch.Tensor]:
    """The GPT-2 tensors of ``folder``'s model.safetensors, every one present with the shape its config
    says; one line naming the file and the first problem otherwise. ``load=False`` checks the names and
    shapes from the file's header alone and returns nothing (a check before a run writes anything)."""
    path = Path(folder) / HF_WEIGHTS
    expected = _expected_shapes(cfg, tied)
    tensors = {}
    try:
        with safe_open(str(path), framework="pt") as f:
            # Some writers drop the "transformer." prefix (GPT2Model rather than GPT2LMHeadModel).
            names = {name.removeprefix("transformer."): name for name in f.keys()}  # noqa: SIM118
            for key, shape in expected.items():
                stored = names.get(key.removeprefix("transformer."))
                if stored is None:
                    raise ToyaccelError(f"{path}: missing tensor {key}")
                found = tuple(f.get_slice(stored).get_shape())
                if found != shape:
                    raise ToyaccelError(f"{path}: {key} has shape {list(found)}, its config.json says {list(shape)}")
                if load:
                    tensors[key] = f.get_tensor(stored).float()
    except FileNotFoundError:
        raise ToyaccelError(f"{path}: no such file (a GPT-2 folder holds config.json and model.safetensors)") from None
    except ToyaccelError:
        raise
    except Exception as e:  # noqa: BLE001 - a truncated or foreign file: one line naming it
        raise ToyaccelError(f"{path}: cannot read as safetensors ({str(e).splitlines()[0] if str(e) else e})") from None
    return tensors


# A block's tensors that both models hold alike, in block i (trf_blocks.i. / transformer.h.i.): the book's
# key, GPT-2's, and whether GPT-2 (its Conv1D layers: in x out) holds the book's nn.Linear weight transposed.
SAME_IN_BOTH = (
    ("att.out_proj.weight", "attn.c_proj.weight", True), ("att.out_proj.bias", "attn.c_proj.bias", False),
    ("ff.layers.0.weight", "mlp.c_fc.weight", True), ("ff.layers.0.bias", "mlp.c_fc.bias", False),
    ("ff.layers.2.weight", "mlp.c_proj.weight", True), ("ff.layers.2.bias", "mlp.c_proj.bias", False),
    ("norm1.scale", "ln_1.weight", False), ("norm1.shift", "ln_1.bias", False),
    ("norm2.scale", "ln_2.weight", False), ("norm2.shift", "ln_2.bias", False),
)  # fmt: skip


def hf_to_book(hf: dict[str, torch.Tensor], cfg: dict[str, Any]) -> dict[str, torch.Tensor]:
    """GPT-2's tensors under the book's GPTModel keys (chapter 5's load_weights_into_gpt)."""
    emb = cfg["emb_dim"]
    book = {"tok_emb.weight": hf["transformer.wte.weight"], "pos_emb.weight": hf["transformer.wpe.weight"]}
    for i in range(cfg["n_layers"]):
        h, b = f"transformer.h.{i}.", f"trf_blocks.{i}."
        qkv_w, qkv_b = hf[h + "attn.c_attn.weight"], hf[h + "attn.c_attn.bias"]
        for k, name in enumerate(("W_query", "W_key", "W_value")):
            book[b + f"att.{name}.weight"] = qkv_w[:, k * emb : (k + 1) * emb].T
            book[b + f"att.{name}.bias"] = qkv_b[k * emb : (k + 1) * emb]
        for book_key, hf_key, transposed in SAME_IN_BOTH:
            book[b + book_key] = hf[h + hf_key].T if transposed else hf[h + hf_key]
    book["final_norm.scale"], book["final_norm.shift"] = hf["transformer.ln_f.weight"], hf["transformer.ln_f.bias"]
    book["out_head.weight"] = hf.get("lm_head.weight", hf["transformer.wte.weight"])
    return {k: v.contiguous() for k, v in book.items()}


def book_to_hf(book: dict[str, torch.Tensor], cfg: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The book's GPTModel tensors under GPT-2's keys: zero q/k/v biases where the book's model has none,
    and the head as its own ``lm_head.weight`` (the book's head is not tied to the embedding)."""
    emb = cfg["emb_dim"]
    hf = {"transformer.wte.weight": book["tok_emb.weight"], "transformer.wpe.weight": book["pos_emb.weight"]}
    for i in range(cfg["n_layers"]):
        h, b = f"transformer.h.{i}.", f"trf_blocks.{i}."
        names = ("W_query", "W_key", "W_value")
        hf[h + "attn.c_attn.weight"] = torch.cat([book[b + f"att.{n}.weight"].T for n in names], dim=1)
        biases = [book.get(b + f"att.{n}.bias") for n in names]
        zeros = book[b + "att.out_proj.bias"].new_zeros(emb)
        hf[h + "attn.c_attn.bias"] = torch.cat([zeros if x is None else x for x in biases])
        for book_key, hf_key, transposed in SAME_IN_BOTH:
            hf[h + hf_key] = book[b + book_key].T if transposed else book[b + book_key]
    hf["transformer.ln_f.weight"], hf["transformer.ln_f.bias"] = book["final_norm.scale"], book["final_norm.shift"]
    hf["lm_head.weight"] = book["out_head.weight"]
    return {k: v.detach().float().contiguous().clone() for k, v in hf.items()}


def hf_config_for(cfg: dict[str, Any], eos_token_id: int | None = None) -> dict[str, Any]:
    """A GPT-2 config.json for the book's GPT_CONFIG: untied head, the book's one dropout rate everywhere."""
    return {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
        "vocab_size": cfg["vocab_size"], "n_positions": cfg["context_length"], "n_embd": cfg["emb_dim"],
        "n_layer": cfg["n_layers"], "n_head": cfg["n_heads"], "n_inner": None,
        "activation_function": "gelu_new", "layer_norm_epsilon": LAYER_NORM_EPS,
        "resid_pdrop": cfg["drop_rate"], "embd_pdrop": cfg["drop_rate"], "attn_pdrop": cfg["drop_rate"],
        "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False,
        "tie_word_embeddings": False, "use_cache": True, "initializer_range": 0.02,
        "bos_token_id": eos_token_id, "eos_token_id": eos_token_id,
    }  # fmt: skip


def load_hf_gpt2(folder: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(the book's GPT_CONFIG, a state_dict for GPTModel) from a GPT-2 folder; ToyaccelError naming the file."""
    hf_config = read_hf_config(folder)
    cfg = book_config(hf_config)
    tied = hf_config.get("tie_word_embeddings", True) is not False
    return cfg, hf_to_book(read_hf_weights(folder, cfg, tied), cfg)


def save_hf_gpt2(state_dict: dict[str, torch.Tensor], cfg: dict[str, Any], folder: Path, write_atomic) -> None:
    """Write config.json and model.safetensors that ``GPT2LMHeadModel.from_pretrained(folder)`` loads.
    ``write_atomic(path, writer)`` publishes each file whole (the run folder's atomic write)."""
    tensors = book_to_hf(state_dict, cfg)
    config = hf_config_for(cfg)
    folder.mkdir(parents=True, exist_ok=True)
    write_atomic(folder / HF_WEIGHTS, lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))
    write_atomic(folder / HF_CONFIG, lambda p: Path(p).write_text(json.dumps(config, indent=2) + "\n"))
