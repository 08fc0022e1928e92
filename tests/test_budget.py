"""The training budget: --max-steps, --eval-every-steps and --eval-batches (issue 22: a corpus is trained for a
budget, not for epochs; chapter 5's eval_freq and eval_iter).

The run: 80 synthetic rows, 16 held out, batch 4: 16 optimizer steps an epoch. 21 steps end 5 steps into
the second epoch.
"""

from __future__ import annotations

import math
import signal
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import (
    accelerate_launch,
    as_cli,
    assert_weights_close,
    assert_weights_equal,
    check_ok,
    read_json,
    read_jsonl,
    run_python,
    weights,
)
from safetensors.torch import load_file

from toyaccel import TrainConfig, fit, load_model
from toyaccel.cli import train_main
from toyaccel.workloads import get_workload
from toyaccel.workloads.mlp.workload import evaluation_sets

RUN = {"data": "synthetic", "num_samples": 80, "val_fraction": 0.2, "batch_size": 4, "plot": False, "progress": False}
STEPS_PER_EPOCH = 16


def records(run: Path, kind: str | None = None) -> list[dict]:
    """metrics.jsonl without the timings, of one ``kind`` or all."""
    kept = [{k: v for k, v in r.items() if k != "samples_per_s"} for r in read_jsonl(run / "metrics.jsonl")]
    return [r for r in kept if kind is None or r["kind"] == kind]


def evaluated_steps(run: Path) -> list[int]:
    return [r["step"] for r in read_jsonl(run / "metrics.jsonl") if r.get("val_loss") is not None]


@pytest.fixture(scope="module")
def budget_run(tmp_path_factory) -> Path:
    """21 steps, cosine, evaluated every 5 steps over the first 3 batches of each set."""
    out = tmp_path_factory.mktemp("budget") / "run"
    fit(**RUN, max_steps=21, lr_schedule="cosine", eval_every_steps=5, eval_batches=3, output_dir=str(out))
    return out


def test_max_steps_of_whole_epochs_is_the_epoch_run_bit_for_bit(tmp_path):
    by_epochs = fit(**RUN, epochs=2, lr_schedule="cosine", output_dir=str(tmp_path / "epochs"))
    by_steps = fit(**RUN, max_steps=2 * STEPS_PER_EPOCH, lr_schedule="cosine", output_dir=str(tmp_path / "steps"))
    assert by_steps.global_step == by_epochs.global_step == 32 and by_steps.epochs == 2
    assert_weights_equal(weights(tmp_path / "steps"), weights(tmp_path / "epochs"))
    assert records(tmp_path / "steps") == records(tmp_path / "epochs")  # the same losses, rates and evaluations


def test_max_steps_stops_mid_epoch_at_exactly_n_with_the_schedule_spanning_n(budget_run, capsys):
    results = read_json(budget_run / "results.json")
    assert results["global_step"] == 21 and results["epochs"] == 2
    steps = records(budget_run, "step")
    assert steps[-1]["step"] == 21 and steps[-1]["epoch"] == 2
    # Cosine over 21 steps: the last step (0-based 20) is at progress 20/21 of the half cosine.
    assert steps[-1]["lr"] == pytest.approx(0.5 * 0.5 * (1 + math.cos(math.pi * 20 / 21)), abs=1e-15)
    assert [p.name for p in (budget_run / "checkpoints").iterdir() if p.name == "step_21"] == ["step_21"]


def test_a_mid_epoch_stop_trains_the_steps_of_the_epoch_run(tmp_path):
    """Constant rate: 21 steps are the epoch run's first 21, the data order of its second epoch included."""
    fit(**RUN, epochs=2, checkpoint_every=21, keep_last=0, output_dir=str(tmp_path / "epochs"))
    fit(**RUN, max_steps=21, output_dir=str(tmp_path / "steps"))
    at_step_21 = load_file(tmp_path / "epochs/checkpoints/step_21/model.safetensors")
    assert_weights_equal(weights(tmp_path / "steps"), at_step_21)


def test_evaluations_every_k_steps_and_at_the_end_leave_the_weights_alone(budget_run, tmp_path):
    assert evaluated_steps(budget_run) == [5, 10, 15, 20, 21]
    assert [r["kind"] for r in records(budget_run) if r["kind"] != "step"] == ["eval"] * 3 + ["epoch"] + ["eval"] * 2
    epoch_end = records(budget_run, "epoch")[0]
    assert epoch_end["step"] == 16 and "val_loss" not in epoch_end  # evaluated by steps, not also by epoch
    fit(**RUN, max_steps=21, lr_schedule="cosine", output_dir=str(tmp_path / "quiet"))
    assert_weights_equal(weights(budget_run), weights(tmp_path / "quiet"))
    assert read_json(budget_run / "results.json")["val_loss"] == records(budget_run, "eval")[-1]["val_loss"]


def test_the_log_lines_say_step_k_of_n_and_max_steps_overrides_epochs(tmp_path, capsys):
    fit(**RUN, epochs=7, max_steps=6, log_every=3, output_dir=str(tmp_path / "run"))
    lines = capsys.readouterr().out.splitlines()
    assert " max_steps=6 " in lines[0] and "epochs=" not in lines[0]  # the start-up line: --epochs has no say
    assert "epochs" not in read_json(tmp_path / "run/config.json")["config"]
    assert [line.split(" | ")[:2] for line in lines if "| loss" in line] == [["epoch 1/1", "step 3/6"],
                                                                          ["epoch 1/1", "step 6/6"]]  # fmt: skip


def test_eval_batches_scores_the_first_m_batches_of_rows(budget_run):
    """The last evaluation's figures, by hand: the mean loss over the first 3 x 4 rows of each set."""
    config = TrainConfig(**{k: v for k, v in RUN.items() if k not in ("plot", "progress")})
    model = load_model(budget_run)
    last = records(budget_run, "eval")[-1]
    for name, dataset in evaluation_sets(config, get_workload("mlp").load_data(config)).items():
        with torch.no_grad():
            loss = F.cross_entropy(model(dataset.features[:12]), dataset.labels[:12]).item()
        assert last[f"{name}_loss"] == pytest.approx(loss, rel=1e-6)
        assert len(dataset) > 12  # so that the limit was a limit


GPT = {"model": "gpt", "data": "synthetic", "num_samples": 4000, "context_length": 16, "emb_dim": 16, "n_heads": 2,
       "n_layers": 1, "drop_rate": 0.0, "batch_size": 3}  # fmt: skip


def test_eval_batches_scores_the_first_m_batches_of_windows(tmp_path):
    """224 training windows, not a multiple of the batch: the last batch read is whole all the same."""
    fit(**GPT, max_steps=5, eval_every_steps=5, eval_batches=3, plot=False, progress=False, output_dir=str(tmp_path))
    data = get_workload("gpt").load_data(TrainConfig(**GPT))
    model = load_model(tmp_path).eval()
    last = records(tmp_path, "eval")[-1]
    for name, windows in (("train", data.train), ("val", data.val)):
        inputs, targets = windows.__getitems__(list(range(9)))
        with torch.no_grad():
            loss = F.cross_entropy(model(inputs).flatten(0, 1), targets.flatten()).item()
        assert last[f"{name}_loss"] == pytest.approx(loss, rel=1e-6)
        assert len(windows) > 9


def test_a_resume_with_another_max_steps_is_refused(budget_run, tmp_path, capsys):
    run = tmp_path / "run"
    options = {**RUN, "max_steps": 21, "lr_schedule": "cosine", "checkpoint_every": 8}
    assert train_main([*as_cli({**options, "max_steps": 10}), "--output-dir", str(run)]) == 0
    capsys.readouterr()
    assert train_main([*as_cli({**options, "max_steps": 30}), "--output-dir", str(run), "--resume", "latest"]) == 2
    assert "max_steps: checkpoint 10, now 30" in capsys.readouterr().err


@pytest.mark.parametrize("flag, value", [("--max-steps", "-1"), ("--eval-every-steps", "-2"), ("--eval-batches", "-3")])
def test_negative_budgets_are_refused_in_one_line(flag, value, tmp_path, capsys):
    assert train_main([flag, value, "--output-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: {flag[2:].replace('-', '_')} must be 0 or more, got {value}"
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_killed_and_resumed_ends_bit_identical_with_the_same_evaluations(budget_run, tmp_path):
    """Killed after step 14 (checkpoints every 4 steps: step 12 is the newest), then --resume latest."""
    run = tmp_path / "run"
    options = {**RUN, "max_steps": 21, "lr_schedule": "cosine", "eval_every_steps": 5, "eval_batches": 3,
               "checkpoint_every": 4}  # fmt: skip
    args = [*as_cli(options), "--output-dir", str(run)]
    proc = run_python("scripts/train.py", *args, env={"TOYACCEL_FAULT": "step:14"})
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert evaluated_steps(run) == [5, 10]
    assert train_main([*args, "--resume", "latest"]) == 0
    assert_weights_equal(weights(run), weights(budget_run))
    assert records(run, "eval") == records(budget_run, "eval")
    assert [r["step"] for r in records(run, "step")] == [r["step"] for r in records(budget_run, "step")]


@pytest.mark.slow
def test_two_processes_train_and_evaluate_as_one(tmp_path):
    """The same global batch (2 x 2, and 1 x 2 x grad_accum 2) and the same --batch-size, so the same rows
    evaluated: the weights and every evaluation's figures agree."""
    options = {**RUN, "batch_size": 2, "max_steps": 21, "lr_schedule": "cosine", "eval_every_steps": 5,
               "eval_batches": 3}  # fmt: skip
    fit(**options, grad_accum=2, output_dir=str(tmp_path / "one"))
    check_ok(accelerate_launch("multi_cpu.yaml", *as_cli(options), "--output-dir", str(tmp_path / "two")))
    assert read_json(tmp_path / "two/results.json")["world_size"] == 2
    assert_weights_close(weights(tmp_path / "two"), weights(tmp_path / "one"))
    one, two = records(tmp_path / "one", "eval"), records(tmp_path / "two", "eval")
    assert [r["step"] for r in two] == [r["step"] for r in one] == [5, 10, 15, 20, 21]
    for a, b in zip(one, two, strict=True):
        for key in ("train_loss", "val_loss", "train_acc", "val_acc"):
            assert b[key] == pytest.approx(a[key], abs=1e-6)


@pytest.mark.slow
def test_two_processes_evaluate_the_gpts_first_windows_as_one(tmp_path):
    options = {**GPT, "max_steps": 12, "eval_every_steps": 5, "eval_batches": 3, "plot": False}
    fit(**options, grad_accum=2, output_dir=str(tmp_path / "one"))
    check_ok(accelerate_launch("multi_cpu.yaml", *as_cli(options), "--output-dir", str(tmp_path / "two")))
    assert_weights_close(weights(tmp_path / "two"), weights(tmp_path / "one"))
    one, two = records(tmp_path / "one", "eval"), records(tmp_path / "two", "eval")
    assert [r["step"] for r in two] == [r["step"] for r in one] == [5, 10, 12]
    for a, b in zip(one, two, strict=True):
        for key in ("train_loss", "val_loss"):
            assert b[key] == pytest.approx(a[key], abs=1e-6)


def test_a_run_evaluated_every_k_steps_plots_its_figures_by_step_without_a_warning(tmp_path):
    """Its epoch records carry no figures: the accuracy panel plots the every-K-steps evaluations, and an
    empty legend (matplotlib's "No artists with labels" warning on every such run) is not drawn."""
    pytest.importorskip("matplotlib")
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="No artists with labels")
        fit(max_steps=6, eval_every_steps=2, output_dir=str(tmp_path / "run"), progress=False)
    assert (tmp_path / "run" / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
