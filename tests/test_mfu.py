"""MFU: model FLOPs per token (against the parameters a GPTModel actually has) x tokens/s over the GPU's peak."""

from __future__ import annotations

import json

import pytest
import torch

from toyaccel import fit
from toyaccel.config import build_config
from toyaccel.engine.budget import Budget
from toyaccel.engine.placement import dense_bf16_peak, peak_of_gpu, utilization
from toyaccel.engine.reporting import format_record
from toyaccel.workloads import get_workload
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


@pytest.mark.parametrize(
    "name, tflops",
    [("NVIDIA A100-SXM4-80GB", 312), ("NVIDIA H100 80GB HBM3", 989), ("NVIDIA H200", 989), ("Tesla T4", None)],
)
def test_the_peak_is_the_known_gpus_dense_bf16_figure(name, tflops):
    assert peak_of_gpu(name) == (tflops * 1e12 if tflops else None)


def test_mfu_is_model_flops_per_second_over_the_peak_beside_tokens_per_s():
    config = build_config(model="gpt", preset="gpt2-124m", data="synthetic", tokenizer="bpe")
    gpt = get_workload("gpt")
    # 400 windows of 1024 tokens a second: the workload's tokens/s, the engine's MFU from its FLOPs per window.
    figures = {**gpt.throughput(400.0, config), **utilization(400.0, gpt.flops_per_sample(config), 989e12)}
    assert figures == {"tokens_per_s": 409600.0, "mfu": 409600.0 * flops_per_token(GPT2_124M) / 989e12}
    assert round(figures["mfu"], 3) == 0.354  # 0.86 GFLOP x 409.6k tokens/s of 989 TFLOP/s
    line = format_record({"epoch": 1, "step": 5, **figures}, Budget(epochs=1, steps_per_epoch=5))
    assert line == "epoch 1/1 | step 5 | 409600 tokens/s | mfu 35.4%"
    # Where the device is not a known GPU (a CPU), nothing is claimed: the figures are today's.
    assert utilization(400.0, gpt.flops_per_sample(config), None) == {}
    assert "mfu" not in gpt.result_metrics({"train": {"perplexity": 2.0}}, 400.0, config)


@pytest.mark.slow
def test_a_cpu_run_carries_no_mfu(tmp_path):
    result = fit(model="gpt", context_length=16, emb_dim=16, n_heads=2, n_layers=1, num_samples=600, epochs=1,
                 log_every=1, output_dir=str(tmp_path / "run"), progress=False, plot=False)  # fmt: skip
    records = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert result.tokens_per_s > 0 and "mfu" not in result.metrics
    assert "mfu" not in json.loads((tmp_path / "run/results.json").read_text())
    assert records and all("mfu" not in r for r in records)
