"""Runs saved by toyaccel 0.1 (tests/fixtures/runs_v0_1, written by commit 1d94f2f) still evaluate,
predict, generate and resume with today's code: a user's old run folders keep working."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import REPO, assert_weights_equal, read_json, weights

from toyaccel.cli import generate_main, predict_main, train_main
from toyaccel.inference import evaluate_run

FIXTURES = REPO / "tests" / "fixtures" / "runs_v0_1"
EXPECTED = json.loads((FIXTURES / "expected.json").read_text())["runs"]
MLP_RUNS = [name for name, run in EXPECTED.items() if "predict" in run]
GPT_RUNS = [name for name, run in EXPECTED.items() if "generate" in run]


@pytest.fixture(autouse=True)
def as_the_runs_were_written(monkeypatch):
    """From the repository root (config.json names the data relative to it, as a user's run names its own),
    on one thread as the fixtures were written: more threads sum a matmul in another order."""
    monkeypatch.chdir(REPO)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_the_fixtures_are_the_four_runs_described_in_their_readme():
    assert sorted(EXPECTED) == ["book_mlp", "gpt_bpe", "gpt_synthetic", "mlp_csv"]
    for name, run in EXPECTED.items():
        assert [p.name for p in (FIXTURES / name / "checkpoints").iterdir()] == [run["checkpoint"]]
        assert read_json(FIXTURES / name / "results.json")["global_step"] > int(run["checkpoint"].split("_")[1])


@pytest.mark.parametrize("name", list(EXPECTED))
def test_evaluate_reproduces_the_saved_validation_figures(name):
    results = read_json(FIXTURES / name / "results.json")
    metrics = evaluate_run(FIXTURES / name)
    assert metrics["loss"] == pytest.approx(results["val_loss"], rel=1e-6)
    if name in GPT_RUNS:
        assert metrics["perplexity"] == pytest.approx(results["val_perplexity"], rel=1e-6)
    else:
        assert metrics["accuracy"] == results["val_accuracy"]


@pytest.mark.parametrize("name", MLP_RUNS)
def test_predict_writes_the_rows_it_wrote_then(name, tmp_path, capsys):
    expected = EXPECTED[name]["predict"]
    target = tmp_path / "predictions.csv"
    assert predict_main([str(FIXTURES / name), "--data", expected["data"], "--output", str(target)]) == 0
    assert target.read_text() == expected["rows"]
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("name", GPT_RUNS)
def test_generate_gives_the_text_it_gave_then(name, capsys):
    run = EXPECTED[name]
    for case in run["generate"]:
        capsys.readouterr()
        assert generate_main([str(FIXTURES / name), "--prompt", run["prompt"], *case["args"]]) == 0
        assert capsys.readouterr().out == case["text"]


def test_a_command_the_runs_workload_does_not_give_is_one_line(tmp_path, capsys):
    """toyaccel-predict on a GPT run and toyaccel-generate on an MLP run: refused, naming the workload that does."""
    capsys.readouterr()
    target = tmp_path / "predictions.csv"
    gpt, mlp = FIXTURES / GPT_RUNS[0], FIXTURES / MLP_RUNS[0]
    assert predict_main([str(gpt), "--data", "toy", "--output", str(target)]) == 2
    assert capsys.readouterr().err == f"error: {gpt} holds a gpt run; toyaccel-predict needs a --model mlp run\n"
    assert generate_main([str(mlp)]) == 2
    assert capsys.readouterr().err == f"error: {mlp} holds a mlp run; toyaccel-generate needs a --model gpt run\n"
    assert not target.exists()


@pytest.mark.parametrize("name", list(EXPECTED))
def test_resume_latest_from_the_mid_run_checkpoint_ends_with_the_saved_weights(name, tmp_path, capsys):
    run_dir = tmp_path / name
    shutil.copytree(FIXTURES / name, run_dir)
    for finished in ("model.safetensors", "results.json"):  # so that the resumed run must write them again
        (run_dir / finished).unlink()
    args = [*EXPECTED[name]["train_args"], "--output-dir", str(run_dir), "--resume", "latest"]
    assert train_main(args) == 0, capsys.readouterr().err
    assert f"resumed from {Path(run_dir) / 'checkpoints' / EXPECTED[name]['checkpoint']}" in capsys.readouterr().out
    assert_weights_equal(weights(run_dir), weights(FIXTURES / name))
    saved = read_json(FIXTURES / name / "results.json")
    assert read_json(run_dir / "results.json")["global_step"] == saved["global_step"]
