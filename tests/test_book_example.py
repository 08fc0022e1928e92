"""The book's example, done right, on one process and on real multi-process DDP."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from conftest import (
    BOOK_LOSSES,
    REPO,
    accelerate_launch,
    assert_weights_close,
    assert_weights_equal,
    check_ok,
    read_json,
    run_python,
    step_losses,
    weights,
)
from safetensors.torch import load_file
from torch.utils.data import DataLoader

from toyaccel import NeuralNetwork, ToyaccelError, TrainConfig, fit
from toyaccel.engine.batches import EpochBatchSampler, draw_epoch_seed
from toyaccel.reference import NeuralNetwork as BookNeuralNetwork  # the book's listing: saved weights load into it
from toyaccel.workloads.mlp.data import (
    TOY_X_TEST,
    TOY_X_TRAIN,
    TOY_Y_TEST,
    TOY_Y_TRAIN,
    load_data,
)

X_TRAIN, Y_TRAIN = torch.tensor(TOY_X_TRAIN), torch.tensor(TOY_Y_TRAIN)
X_TEST, Y_TEST = torch.tensor(TOY_X_TEST), torch.tensor(TOY_Y_TEST)


def book_model_from(run_dir) -> BookNeuralNetwork:
    model = BookNeuralNetwork(2, 2)
    model.load_state_dict(load_file(str(run_dir / "model.safetensors")), strict=True)
    return model.eval()


def accuracy_and_loss(model, x, y) -> tuple[float, float]:
    with torch.no_grad():
        logits = model(x)
    return (logits.argmax(1) == y).float().mean().item(), F.cross_entropy(logits, y).item()


# --- units ---------------------------------------------------------------------------------------


def test_toy_data_is_the_books():
    data = load_data(TrainConfig())
    assert torch.equal(data.train.features, X_TRAIN) and torch.equal(data.train.labels, Y_TRAIN)
    assert torch.equal(data.val.features, X_TEST) and torch.equal(data.val.labels, Y_TEST)
    assert (data.num_features, data.num_classes) == (2, 2)
    features, labels = data.train.__getitems__(torch.tensor([4, 0]))
    assert torch.equal(features, X_TRAIN[[4, 0]]) and labels.tolist() == [1, 0]


def test_epoch_seed_gives_the_order_of_the_books_shuffled_dataloader():
    torch.manual_seed(7)
    book_order = [int(i) for batch in DataLoader(range(5), batch_size=1, shuffle=True) for i in batch]
    torch.manual_seed(7)
    sampler = EpochBatchSampler(5, batch_size=1, global_batch=1)
    sampler.start_epoch(draw_epoch_seed())
    assert [int(b) for b in sampler] == book_order


def test_orders_shuffled_an_epoch_ahead_are_the_books_dataloader_orders():
    """train_one_epoch draws each epoch's seed one epoch early, so the sampler can shuffle the next order
    in the background while an epoch trains: epoch after epoch, the orders stay the book's."""
    torch.manual_seed(7)
    loader = DataLoader(range(50), batch_size=1, shuffle=True)
    book_orders = [[int(i) for batch in loader for i in batch] for _ in range(3)]
    torch.manual_seed(7)
    sampler = EpochBatchSampler(50, batch_size=1, global_batch=1)
    seeds, orders = [draw_epoch_seed()], []
    for epoch in range(3):
        seeds.append(draw_epoch_seed())
        sampler.start_epoch(seeds[epoch], next_epoch_seed=seeds[epoch + 1])
        orders.append([int(b) for b in sampler])
    assert orders == book_orders


def test_data_loader_workers_fork_before_the_next_order_is_shuffled():
    """One process with --num-workers: the DataLoader calls iter() on the sampler before forking its
    workers (and again after). The next epoch's shuffle starts only with the first batch, so no thread
    is busy shuffling while the workers fork, and the epoch after trains on the order shuffled ahead."""
    sampler = EpochBatchSampler(64, batch_size=8, global_batch=8)
    loader = DataLoader(range(64), batch_sampler=sampler, num_workers=2, multiprocessing_context="fork")
    orders, shuffled_at_fork = [], []
    os.register_at_fork(before=lambda: shuffled_at_fork.append(sorted(sampler._shuffled)))
    for epoch_seed, next_epoch_seed in [(11, 12), (12, None)]:
        sampler.start_epoch(epoch_seed, next_epoch_seed=next_epoch_seed)
        orders.append([int(i) for batch in loader for i in batch])
    assert shuffled_at_fork == [[], [], [12], [12]] and not sampler._shuffled  # epoch 2 took the order shuffled ahead
    assert orders == [torch.randperm(64, generator=torch.Generator().manual_seed(s)).tolist() for s in (11, 12)]


@pytest.mark.parametrize("world_size", [2, 3])
def test_global_batches_do_not_depend_on_the_world_size(world_size):
    single = EpochBatchSampler(23, batch_size=2 * world_size, global_batch=2 * world_size)
    sharded = EpochBatchSampler(23, batch_size=2, global_batch=2 * world_size)
    for sampler in (single, sharded):
        sampler.start_epoch(99)
    per_process = list(sharded)
    # accelerate hands batch i to process i % world_size: one step = world_size consecutive batches.
    steps = [torch.cat(per_process[i : i + world_size]) for i in range(0, len(per_process), world_size)]
    assert [s.tolist() for s in steps] == [b.tolist() for b in single]
    assert len(steps) == 23 // (2 * world_size)  # the incomplete global batch is dropped
    used = torch.cat(steps)
    assert len(set(used.tolist())) == len(used)  # no sample repeated


def test_resumed_epoch_continues_the_same_order():
    full = EpochBatchSampler(20, batch_size=2, global_batch=4)
    full.start_epoch(5)
    resumed = EpochBatchSampler(20, batch_size=2, global_batch=4)
    resumed.start_epoch(5, start=8)
    assert [b.tolist() for b in resumed] == [b.tolist() for b in full][4:]


def test_model_has_the_books_keys_and_shapes():
    shapes = {k: tuple(v.shape) for k, v in NeuralNetwork(2, 2).state_dict().items()}
    assert shapes == {k: tuple(v.shape) for k, v in BookNeuralNetwork(2, 2).state_dict().items()}
    assert list(shapes) == [f"layers.{i}.{p}" for i in (0, 2, 4) for p in ("weight", "bias")]
    assert [m.out_features for m in NeuralNetwork(5, 3, (8,)).layers if hasattr(m, "out_features")] == [8, 3]


def test_config_defaults_are_the_books_and_bad_values_are_refused():
    c = TrainConfig()
    assert (c.data, c.epochs, c.batch_size, c.lr, c.seed, c.hidden) == ("toy", 3, 2, 0.5, 123, (30, 20))
    assert TrainConfig(hidden="64, 32").hidden == (64, 32)
    with pytest.raises(ToyaccelError, match="batch_size must be at least 1"):
        TrainConfig(batch_size=0)
    with pytest.raises(ToyaccelError, match="lr_schedule must be one of"):
        TrainConfig(lr_schedule="step")
    with pytest.raises(ToyaccelError, match="epochs must be int"):
        TrainConfig(epochs="3")


# --- one process -----------------------------------------------------------------------------------


@pytest.mark.slow
def test_default_run_reproduces_the_books_numbers(book_run):
    assert [round(loss, 2) for loss in step_losses(book_run)] == BOOK_LOSSES
    results = read_json(book_run / "results.json")
    assert results["train_accuracy"] == 1.0 and results["val_accuracy"] == 1.0
    assert (results["world_size"], results["global_step"], results["epochs"]) == (1, 6, 3)
    assert results["final_loss"] == step_losses(book_run)[-1]
    saved = read_json(book_run / "config.json")
    assert saved["model"] == {"num_inputs": 2, "num_outputs": 2, "hidden": [30, 20]}
    assert saved["config"]["lr"] == 0.5 and saved["config"]["batch_size"] == 2


@pytest.mark.slow
def test_saved_weights_load_into_the_books_own_class(book_run):
    model = book_model_from(book_run)
    assert accuracy_and_loss(model, X_TRAIN, Y_TRAIN)[0] == 1.0
    assert accuracy_and_loss(model, X_TEST, Y_TEST)[0] == 1.0


@pytest.mark.slow
def test_plain_python_and_fit_give_the_launched_runs_weights(book_run, tmp_path):
    """`python scripts/train.py` (no launcher) and toyaccel.fit are the same program."""
    check_ok(run_python("scripts/train.py", "--no-progress", "--output-dir", str(tmp_path / "plain")))
    assert_weights_equal(weights(tmp_path / "plain"), weights(book_run))
    result = fit(TrainConfig(output_dir=str(tmp_path / "fit"), progress=False, plot=False))
    assert_weights_equal(weights(tmp_path / "fit"), weights(book_run))
    assert result.to_json() == {**read_json(book_run / "results.json"), "output_dir": str(tmp_path / "fit"),
                                "samples_per_s": result.samples_per_s}  # fmt: skip


# --- real DDP ----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_two_processes_are_one_ddp_world_equal_to_one_process_with_the_global_batch(book_run, ddp_run):
    tmp_path = ddp_run
    results = read_json(tmp_path / "results.json")
    # N silent single-process copies would report world_size 1 and train on batches of 1.
    assert results["world_size"] == 2 and results["distributed_type"] == "MULTI_CPU"
    assert_weights_close(weights(tmp_path), weights(book_run), atol=1e-6)
    assert step_losses(tmp_path) == pytest.approx(step_losses(book_run), abs=1e-6)
    model = book_model_from(tmp_path)
    train_acc, train_loss = accuracy_and_loss(model, X_TRAIN, Y_TRAIN)
    val_acc, val_loss = accuracy_and_loss(model, X_TEST, Y_TEST)
    assert (results["train_accuracy"], results["val_accuracy"]) == (train_acc, val_acc)
    assert results["train_loss"] == pytest.approx(train_loss, abs=1e-6)
    assert results["val_loss"] == pytest.approx(val_loss, abs=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("num_processes", [3, 5])
def test_more_processes_than_batches_give_global_metrics(num_processes, tmp_path):
    """The book's script divides by zero from 5 processes on; here 5 processes x batch 1 is one
    step of the whole training set, and 5 processes share 2 test samples without counting one twice."""
    check_ok(
        accelerate_launch(
            "multi_cpu.yaml", "--batch-size", "1", "--output-dir", str(tmp_path / "ddp"), num_processes=num_processes
        )
    )
    fit(TrainConfig(batch_size=num_processes, output_dir=str(tmp_path / "one"), progress=False, plot=False))
    results = read_json(tmp_path / "ddp" / "results.json")
    assert results["world_size"] == num_processes
    assert results["global_step"] == 3 * (5 // num_processes)
    assert_weights_close(weights(tmp_path / "ddp"), weights(tmp_path / "one"), atol=1e-6)
    model = book_model_from(tmp_path / "ddp")
    val_acc, val_loss = accuracy_and_loss(model, X_TEST, Y_TEST)
    # A padded duplicate of one test sample would shift the mean loss.
    assert results["val_loss"] == pytest.approx(val_loss, abs=1e-6) and results["val_accuracy"] == val_acc


@pytest.mark.slow
def test_a_world_too_big_for_the_data_stops_at_start_up_with_what_to_change(tmp_path):
    proc = accelerate_launch("multi_cpu.yaml", "--output-dir", str(tmp_path / "run"), num_processes=3)
    assert proc.returncode != 0
    expected = "error: the training set has 5 samples but one optimizer step needs 6 (3 processes x batch size 2"
    assert expected in proc.stderr
    assert "lower --batch-size" in proc.stderr
    # Our processes print one line and exit 2; what follows is the launcher's own failure report.
    assert proc.stderr.lstrip().startswith("error: the training set")
    assert f'File "{REPO / "toyaccel"}' not in proc.stderr  # no traceback through toyaccel, wherever it was cloned
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_a_log_line_is_the_mean_loss_of_its_steps_however_long_the_window(tmp_path):
    """Training logs the mean of the step losses since the last line; a window of 1500 steps (the loop
    folds its losses every 1024) gives the mean of what the same run logs step by step."""
    options = dict(data="synthetic", num_samples=3000, epochs=1, val_fraction=0, progress=False, plot=False)
    each = fit(output_dir=str(tmp_path / "each"), log_every=1, **options)
    window = fit(output_dir=str(tmp_path / "window"), log_every=1500, **options)
    steps = [r["loss"] for r in each.history if r["kind"] == "step"]
    logged = [r for r in window.history if r["kind"] == "step"]
    assert len(steps) == 1500 and [r["step"] for r in logged] == [1500]
    assert logged[0]["loss"] == pytest.approx(sum(steps) / len(steps), rel=1e-6)


@pytest.mark.slow
def test_data_loader_workers_train_the_same_weights_epoch_after_epoch(tmp_path):
    """--num-workers 2 feeds the same batches through a DataLoader whose worker processes are forked
    each epoch, while the sampler shuffles the next epoch's order in a thread: the same weights as the
    in-process batches, bit for bit, over several epochs."""
    options = dict(data="synthetic", num_samples=600, epochs=4, val_fraction=0, progress=False, plot=False)
    fit(output_dir=str(tmp_path / "in_process"), **options)
    fit(output_dir=str(tmp_path / "workers"), num_workers=2, **options)
    assert_weights_equal(weights(tmp_path / "workers"), weights(tmp_path / "in_process"))
