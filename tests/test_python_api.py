"""The Python API, and multi-process training launched from a notebook cell."""

from __future__ import annotations

import textwrap

import pytest
import torch
from conftest import BOOK_LOSSES, assert_weights_close, check_ok, free_port, read_json, read_jsonl, run_python, weights
from safetensors.torch import load_file

import toyaccel
from toyaccel import NeuralNetwork, ToyaccelError, TrainConfig, fit, load_model
from toyaccel.workloads.mlp.data import TOY_X_TEST, TOY_X_TRAIN


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    out = tmp_path_factory.mktemp("api") / "run"
    return fit(TrainConfig(output_dir=str(out), progress=False)), out


def test_fit_in_process_reproduces_the_book_and_returns_what_results_json_holds(fitted):
    result, out = fitted
    losses = [r["loss"] for r in result.history if r["kind"] == "step"]
    assert [round(x, 2) for x in losses] == BOOK_LOSSES
    assert result.train_accuracy == 1.0 and result.val_accuracy == 1.0
    assert result.to_json() == read_json(out / "results.json")
    assert result.history == read_jsonl(out / "metrics.jsonl")


def test_load_model_predicts_as_the_saved_weights_do(fitted):
    _, out = fitted
    model = load_model(out)
    assert isinstance(model, NeuralNetwork) and not model.training
    reference = NeuralNetwork(2, 2)
    reference.load_state_dict(load_file(str(out / "model.safetensors")))
    x = torch.tensor(TOY_X_TRAIN + TOY_X_TEST)
    with torch.no_grad():
        assert torch.equal(model(x), reference(x))
    assert model(x).argmax(1).tolist() == [0, 0, 0, 1, 1, 0, 1]


def test_fit_can_run_again_in_the_same_process_with_other_settings(tmp_path):
    first = fit(output_dir=str(tmp_path / "a"), grad_accum=2, batch_size=1, progress=False, plot=False)
    second = fit(output_dir=str(tmp_path / "b"), progress=False, plot=False)
    assert first.global_step == second.global_step == 6
    assert_weights_close(weights(tmp_path / "a"), weights(tmp_path / "b"), atol=1e-6)


def test_errors_are_the_documented_type_with_the_cli_message(tmp_path):
    with pytest.raises(ToyaccelError, match="batch_size must be at least 1"):
        TrainConfig(batch_size=0)
    with pytest.raises(ToyaccelError, match=r"nothere\.csv: no such file"):
        fit(data=str(tmp_path / "nothere.csv"), output_dir=str(tmp_path / "run"))
    with pytest.raises(ToyaccelError, match="no such file"):
        load_model(tmp_path)
    assert not (tmp_path / "run").exists()
    assert issubclass(toyaccel.ToyaccelError, Exception) and toyaccel.ToyaccelError.exit_code == 2


@pytest.mark.slow
def test_notebook_launcher_runs_real_ddp_equal_to_accelerate_launch(ddp_run, tmp_path):
    """The README's notebook cell, run as a notebook kernel would: forked processes, gloo, one world."""
    cell = textwrap.dedent(f"""
        from accelerate import notebook_launcher
        import toyaccel

        config = toyaccel.TrainConfig(batch_size=1, output_dir={str(tmp_path)!r}, progress=False)
        notebook_launcher(toyaccel.fit, (config,), num_processes=2, use_port={str(free_port())!r})
    """)  # the README's cell, on a free port: 29500, its default, may be taken by another launch here
    check_ok(run_python("-c", cell))
    results = read_json(tmp_path / "results.json")
    assert results["world_size"] == 2 and results["distributed_type"] == "MULTI_CPU"
    # Same processes, same data order, same arithmetic: equal to the `accelerate launch` run bitwise.
    a, b = weights(tmp_path), weights(ddp_run)
    assert all(torch.equal(a[k], b[k]) for k in a)
