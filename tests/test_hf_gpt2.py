"""Hugging Face GPT-2 folders in and out of the book's GPTModel, checked against transformers itself.

The tiny GPT-2s are built with transformers inside each test (random weights, no download); the tests skip
where transformers is not installed (it is a test extra, never needed to train).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from toyaccel.engine.run_dir import write_atomic
from toyaccel.errors import ToyaccelError
from toyaccel.workloads.gpt.hf_gpt2 import load_hf_gpt2, save_hf_gpt2
from toyaccel.workloads.gpt.model import GPTModel

transformers = pytest.importorskip("transformers")


def tiny_gpt2(folder: Path, tie: bool = True, seed: int = 0, **overrides) -> torch.nn.Module:
    torch.manual_seed(seed)
    shape = {"vocab_size": 101, "n_positions": 16, "n_embd": 8, "n_layer": 2, "n_head": 2, **overrides}
    config = transformers.GPT2Config(**shape, tie_word_embeddings=tie, bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(config).eval()
    if not tie:  # an untied head must really be read from lm_head.weight, not from wte
        with torch.no_grad():
            model.lm_head.weight.normal_()
    model.save_pretrained(folder)
    return model


@pytest.mark.parametrize("tie", [True, False], ids=["tied-head", "untied-head"])
def test_a_gpt2_folder_loads_into_gptmodel_with_transformers_logits(tmp_path, tie):
    reference = tiny_gpt2(tmp_path, tie=tie)
    cfg, state_dict = load_hf_gpt2(tmp_path)
    assert cfg == {"vocab_size": 101, "context_length": 16, "emb_dim": 8, "n_heads": 2, "n_layers": 2,
                   "drop_rate": 0.1, "qkv_bias": True}  # fmt: skip
    model = GPTModel(cfg, pad_vocab_to=64)
    model.load_state_dict(state_dict, strict=True)
    ids = torch.randint(0, 101, (3, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.allclose(model.eval()(ids), reference(ids).logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize("qkv_bias", [False, True])
def test_an_exported_gptmodel_loads_in_transformers_with_the_same_logits_and_greedy_tokens(tmp_path, qkv_bias):
    torch.manual_seed(3)
    cfg = {"vocab_size": 101, "context_length": 16, "emb_dim": 8, "n_heads": 2, "n_layers": 2, "drop_rate": 0.0,
           "qkv_bias": qkv_bias}  # fmt: skip
    model = GPTModel(cfg, pad_vocab_to=64).eval()  # padded inside, the book's shapes in its state_dict
    save_hf_gpt2(model.state_dict(), cfg, tmp_path, write_atomic)
    loaded = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    assert loaded.lm_head.weight.shape == (101, 8)  # the padded rows cut back
    ids = torch.randint(0, 101, (2, 16), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert torch.allclose(model(ids), loaded(ids).logits, atol=1e-4, rtol=0)
        prompt = ids[:1, :4]
        ours = prompt
        for _ in range(8):  # the book's generate_text_simple: argmax of the last position
            ours = torch.cat([ours, model(ours[:, -16:])[:, -1].argmax(-1, keepdim=True)], dim=1)
        theirs = loaded.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert ours.tolist() == theirs.tolist()


def test_round_trip_in_and_out_keeps_every_weight(tmp_path):
    tiny_gpt2(tmp_path / "in", tie=False)
    cfg, state_dict = load_hf_gpt2(tmp_path / "in")
    save_hf_gpt2(state_dict, cfg, tmp_path / "out", write_atomic)
    original = load_file(str(tmp_path / "in/model.safetensors"))
    exported = load_file(str(tmp_path / "out/model.safetensors"))
    for key, tensor in original.items():
        assert torch.equal(exported[key], tensor), key


def tamper_config(folder: Path, **changes) -> None:
    path = folder / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda d: tamper_config(d, model_type="llama"), "config.json: model_type is 'llama', not 'gpt2'"),
        (lambda d: tamper_config(d, n_embd=9), "n_embd (9) is not divisible by n_head (2)"),
        (lambda d: tamper_config(d, activation_function="relu"), "activation_function 'relu' is not the tanh GELU"),
        (lambda d: tamper_config(d, n_embd=16, n_head=2),
         "transformer.wte.weight has shape [101, 8], its config.json says [101, 16]"),
        (lambda d: (d / "config.json").write_text("[1, 2]"), "config.json: not a JSON object"),
        (lambda d: (d / "config.json").unlink(), "config.json: no such file"),
        (lambda d: (d / "model.safetensors").write_bytes(b"not safetensors"),
         "model.safetensors: cannot read as safetensors"),
        (lambda d: save_file({k: v for k, v in load_file(str(d / "model.safetensors")).items()
                              if "h.1.mlp.c_fc.bias" not in k}, str(d / "model.safetensors")),
         "model.safetensors: missing tensor transformer.h.1.mlp.c_fc.bias"),
    ],
    ids=["not-gpt2", "heads", "activation", "shape", "list", "no-config", "not-safetensors", "missing-tensor"],
)  # fmt: skip
def test_a_folder_that_is_not_a_gpt2_checkpoint_is_one_line_naming_the_file(tmp_path, damage, message):
    tiny_gpt2(tmp_path)
    damage(tmp_path)
    with pytest.raises(ToyaccelError) as e:
        load_hf_gpt2(tmp_path)
    assert message in str(e.value) and str(tmp_path) in str(e.value)
    assert "\n" not in str(e.value)
