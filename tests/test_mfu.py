"""Model FLOPs per token, against the parameters a GPTModel actually has."""

from __future__ import annotations

import torch

from toyaccel.engine.placement import dense_bf16_peak
from toyaccel.workloads.gpt.model import GPTModel, flops_per_token

GPT2_124M = {"vocab_size": 50257, "context_length": 1024, "emb_dim": 768, "n_heads": 12, "n_layers": 12,
             "drop_rate": 0.0, "qkv_bias": False}  # fmt: skip


def test_flops_per_token_is_six_per_multiplied_weight_plus_attention():
    for cfg in (GPT2_124M, {**GPT2_124M, "qkv_bias": True, "n_layers": 2, "emb_dim": 64, "n_heads": 4}):
        with torch.device("meta"):
            model = GPTModel(cfg)
        looked_up = model.tok_emb.weight.numel() + model.pos_emb.weight.numel()
        multiplied = sum(p.numel() for p in model.parameters()) - looked_up
        attention = 12 * cfg["n_layers"] * cfg["context_length"] * cfg["emb_dim"]
        assert flops_per_token(cfg) == 6 * multiplied + attention
    assert round(flops_per_token(GPT2_124M) / 1e9, 2) == 0.86  # the figure llm.c and nanoGPT use


def test_no_peak_is_claimed_for_a_cpu():
    assert dense_bf16_peak(torch.device("cpu")) is None
