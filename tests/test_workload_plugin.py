"""A workload of one's own: defined here, outside toyaccel, and trained through toyaccel.fit by name."""

from __future__ import annotations

import hashlib

import pytest
import torch
from conftest import read_json, read_jsonl

from toyaccel import ToyaccelError, fit, load_model
from toyaccel.engine.workload import Workload
from toyaccel.inference import evaluate_run, format_evaluation, generate_from_run, predict_file
from toyaccel.workloads import WORKLOADS, register_workload

TRUE_WEIGHTS = torch.tensor([[1.5, -2.0, 0.5]])
TRUE_BIAS = 0.25
ROWS, EPOCHS, LR, SEED = 256, 30, 0.4, 7


class Rows:
    """Inputs and targets as tensors: ``__getitems__`` returns a collated batch, as the engine asks."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor):
        self.x, self.y = x, y

    def __len__(self) -> int:
        return self.x.shape[0]

    def __getitems__(self, indices):
        indices = torch.as_tensor(indices, dtype=torch.long, device=self.x.device)
        return self.x.index_select(0, indices), self.y.index_select(0, indices)


class Regression:
    def __init__(self, train: Rows, val: Rows | None = None):
        self.train, self.val = train, val

    def fingerprint(self) -> str:
        return hashlib.sha256(self.train.x.numpy().tobytes() + self.train.y.numpy().tobytes()).hexdigest()[:16]


def regression_rows(seed: int) -> Rows:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(ROWS, 3, generator=g)
    return Rows(x, x @ TRUE_WEIGHTS.T + TRUE_BIAS)  # noise-free: least squares has the true weights


class LinearRegression(Workload):
    name = "linreg"
    MODEL_KEYS = ("in_features",)
    option_defaults = {"lr": LR}

    def load_data(self, config) -> Regression:
        return Regression(regression_rows(config.seed))

    def build_model(self, config, data) -> torch.nn.Module:
        return torch.nn.Linear(3, 1)

    def model_shape(self, config, data) -> dict:
        return {"in_features": 3}

    def model_from_shape(self, shape: dict) -> torch.nn.Module:
        return torch.nn.Linear(shape["in_features"], 1)

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.mse_loss(outputs, targets)


class ScoredRegression(LinearRegression):
    """The regression with its own part of toyaccel-evaluate: the mean squared error on the rows of a seed."""

    name = "scored"

    def evaluation_set(self, run, request):
        seed = int(request.data or run.saved["config"]["seed"])
        return regression_rows(seed), {"data": f"the rows of seed {seed}"}

    def evaluate_prepared(self, accelerator, model, dataset, config):
        with torch.no_grad():
            return {"loss": torch.nn.functional.mse_loss(model(dataset.x), dataset.y).item()}


@pytest.fixture
def linreg():
    workload = register_workload(LinearRegression())
    yield workload
    WORKLOADS.pop(workload.name)


@pytest.fixture
def scored():
    workload = register_workload(ScoredRegression())
    yield workload
    WORKLOADS.pop(workload.name)


def fit_here(name: str, output_dir) -> str:
    return fit(model=name, epochs=EPOCHS, batch_size=ROWS, seed=SEED, output_dir=str(output_dir), progress=False,
               plot=False).output_dir  # fmt: skip


def plain_pytorch_loop() -> torch.nn.Module:
    """The same training written out by hand: full-batch gradient descent from the same seeded init."""
    rows = regression_rows(SEED)
    torch.manual_seed(SEED)
    model = torch.nn.Linear(3, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    for _ in range(EPOCHS):
        loss = torch.nn.functional.mse_loss(model(rows.x), rows.y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model


def test_a_workload_defined_outside_toyaccel_trains_through_fit(linreg, tmp_path):
    result = fit(model="linreg", epochs=EPOCHS, batch_size=ROWS, seed=SEED, output_dir=str(tmp_path / "run"),
                 progress=False, plot=False)  # fmt: skip
    trained = load_model(result.output_dir)
    torch.testing.assert_close(trained.weight.detach(), TRUE_WEIGHTS, atol=1e-5, rtol=0)
    torch.testing.assert_close(trained.bias.detach(), torch.tensor([TRUE_BIAS]), atol=1e-5, rtol=0)
    # Each epoch is one full batch (in the epoch's shuffled order: float sums differ in the last bits only).
    reference = plain_pytorch_loop()
    torch.testing.assert_close(trained.weight.detach(), reference.weight.detach(), atol=1e-6, rtol=1e-6)
    assert result.global_step == EPOCHS and result.train_loss < 1e-9
    assert [r["train_loss"] for r in result.history if r["kind"] == "epoch"][-1] == result.train_loss


def test_a_workload_must_implement_the_interface():
    class Incomplete(Workload):
        name = "incomplete"

    with pytest.raises(TypeError, match="abstract"):
        Incomplete()


def test_a_workload_of_ones_own_is_evaluated_by_the_one_inference_shell(scored, tmp_path):
    run = fit_here("scored", tmp_path / "run")
    metrics = evaluate_run(run, data="11")
    expected = torch.nn.functional.mse_loss(load_model(run)(regression_rows(11).x), regression_rows(11).y).item()
    assert metrics == {"model": "scored", "data": "the rows of seed 11", "loss": expected} and expected < 1e-9
    assert format_evaluation(metrics) == f"evaluated on the rows of seed 11\nloss {expected:.6f}"
    assert evaluate_run(run)["data"] == f"the rows of seed {SEED}"  # no --data: the workload's own choice


def test_a_command_a_workload_does_not_give_is_refused_in_one_line(linreg, tmp_path):
    run = fit_here("linreg", tmp_path / "run")
    target = tmp_path / "predictions.csv"
    refusals = {
        "toyaccel-evaluate": (lambda: evaluate_run(run), "mlp or gpt"),
        "toyaccel-predict": (lambda: predict_file(run, "toy", target), "mlp"),
        "toyaccel-generate": (lambda: generate_from_run(run), "gpt"),
    }
    for command, (call, wanted) in refusals.items():
        with pytest.raises(ToyaccelError) as refused:
            call()
        assert str(refused.value) == f"{run} holds a linreg run; {command} needs a --model {wanted} run"
    assert not target.exists()


class MeteredRegression(LinearRegression):
    """The hooks as documented before MFU: throughput and result_metrics with their two and three arguments."""

    name = "metered"

    def throughput(self, samples_per_s, config):
        return {"rows_per_s": samples_per_s}

    def result_metrics(self, metrics, samples_per_s, config):
        return {"rows_per_s": samples_per_s}

    def flops_per_sample(self, config):
        return 2.0 * 3  # a multiply and an add per weight (forward only: a figure for the test, not a model's)


def test_a_workload_with_the_documented_hook_signatures_reports_its_figures(tmp_path):
    workload = register_workload(MeteredRegression())
    try:
        result = fit(model="metered", epochs=3, batch_size=32, output_dir=str(tmp_path / "run"), progress=False,
                     plot=False)  # fmt: skip
    finally:
        WORKLOADS.pop(workload.name)
    steps = [r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if r["kind"] == "step"]
    assert steps and all(r["rows_per_s"] == r["samples_per_s"] > 0 for r in steps)
    results = read_json(tmp_path / "run" / "results.json")
    assert results["rows_per_s"] == result.metrics["rows_per_s"] > 0
    # A CPU has no known peak: no MFU is claimed, whatever the FLOPs per sample.
    assert "mfu" not in results and all("mfu" not in r for r in steps)
