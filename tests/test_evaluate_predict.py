"""A run on your own CSV, its metrics, log lines and plot, then evaluate and predict from the saved
files alone."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import CONFIGS, REPO, free_port, read_json, read_jsonl, subprocess_env, weights

from toyaccel import TrainConfig, fit, load_model
from toyaccel.cli import evaluate_main, predict_main
from toyaccel.inference import evaluate_run, format_evaluation

FEATURES = ["a", "b", "c"]
STEPS_PER_EPOCH = 60 // 8


def blobs(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Three classes around far-apart centres, offset and scaled so standardization has work to do."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 3, (n,), generator=g)
    centres = torch.tensor([[0.0, 0.0, 0.0], [3.0, -2.0, 1.0], [-3.0, 2.0, 2.0]])
    features = (centres[labels] + torch.randn(n, 3, generator=g)) * torch.tensor([1.0, 10.0, 0.1]) + 5.0
    return features, labels


def write_csv(path: Path, header: list[str], rows: list[list]) -> str:
    with path.open("w", newline="") as f:
        csv.writer(f).writerows([header, *rows])
    return str(path)


def labelled_rows(features: torch.Tensor, labels: torch.Tensor) -> list[list]:
    # The label column between the features: columns are found by name, not position.
    return [[a, y, b, c] for (a, b, c), y in zip(features.tolist(), labels.tolist())]


class Terminal(io.StringIO):
    """stderr as a terminal: where the progress bar is shown."""

    def isatty(self) -> bool:
        return True


@pytest.fixture(scope="module")
def csv_run(tmp_path_factory):
    """Train on CSV files written here, with standardization, a validation file and a log line every 3 steps."""
    folder = tmp_path_factory.mktemp("csv_run")
    train_x, train_y = blobs(60, seed=1)
    val_x, val_y = blobs(21, seed=2)  # odd: two processes get a padded last batch
    header = ["a", "y", "b", "c"]
    train = write_csv(folder / "train.csv", header, labelled_rows(train_x, train_y))
    val = write_csv(folder / "val.csv", header, labelled_rows(val_x, val_y))
    out = folder / "run"
    config = TrainConfig(
        data=train, val_data=val, label_column="y", standardize=True, epochs=3, batch_size=8, lr=0.1,
        log_every=3, output_dir=str(out),
    )  # fmt: skip
    stdout, terminal = io.StringIO(), Terminal()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(terminal):
        result = fit(config)
    return {
        "out": out, "val": val, "result": result, "stdout": stdout.getvalue(), "stderr": terminal.getvalue(),
        "folder": folder,
        "train_x": train_x, "val_x": val_x, "val_y": val_y,
    }  # fmt: skip


@pytest.fixture(scope="module")
def val_metrics(csv_run) -> dict:
    return evaluate_run(csv_run["out"], csv_run["val"])


@pytest.fixture(scope="module")
def toy_fit(tmp_path_factory) -> tuple[Path, str]:
    """The default run (progress bar on), with a stderr that is not a terminal."""
    out = tmp_path_factory.mktemp("toy") / "run"
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        fit(TrainConfig(output_dir=str(out), plot=False))
    return out, stderr.getvalue()


@pytest.fixture(scope="module")
def toy_run(toy_fit) -> Path:
    return toy_fit[0]


def standardized(run_dir: Path, features: torch.Tensor) -> torch.Tensor:
    data = read_json(run_dir / "config.json")["data"]
    return (features - torch.tensor(data["mean"])) / torch.tensor(data["std"])


def cli(main, capsys, *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main([*args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# --- the training side: metrics.jsonl, log lines, loss.png, config.json ----------------------------


def test_metrics_jsonl_has_one_record_per_logged_step_and_per_epoch(csv_run):
    records = read_jsonl(csv_run["out"] / "metrics.jsonl")
    expected = []
    for epoch in (1, 2, 3):
        first = (epoch - 1) * STEPS_PER_EPOCH
        expected += [("step", epoch, first + 3), ("step", epoch, first + 6), ("step", epoch, first + 7)]
        expected.append(("epoch", epoch, first + 7))
    assert [(r["kind"], r["epoch"], r["step"]) for r in records] == expected
    for r in records:
        if r["kind"] == "step":
            assert set(r) == {"kind", "epoch", "step", "loss", "lr", "samples_per_s"}
            assert r["lr"] == 0.1 and r["samples_per_s"] > 0 and 0 < r["loss"] < 10
        else:
            assert set(r) == {"kind", "epoch", "step", "train_loss", "train_acc", "val_loss", "val_acc"}
    # The last epoch's evaluation is the model that was saved.
    results = read_json(csv_run["out"] / "results.json")
    last = records[-1]
    assert (last["val_loss"], last["val_acc"]) == (results["val_loss"], results["val_accuracy"])
    assert (last["train_loss"], last["train_acc"]) == (results["train_loss"], results["train_accuracy"])
    assert results["final_loss"] == records[-2]["loss"]


def test_log_lines_have_the_fixed_format(csv_run):
    lines = [line for line in csv_run["stdout"].splitlines() if line.startswith("epoch ")]
    step_line = re.compile(r"epoch [123]/3 \| step \d+ \| loss \d+\.\d{4} \| lr 0\.1 \| \d+ samples/s")
    epoch_line = re.compile(
        r"epoch [123]/3 \| step \d+ \| train_loss \d+\.\d{4} \| train_acc [01]\.\d{3} "
        r"\| val_loss \d+\.\d{4} \| val_acc [01]\.\d{3}"
    )
    assert len(lines) == 12
    assert all(step_line.fullmatch(line) or epoch_line.fullmatch(line) for line in lines), lines
    assert lines[3].startswith("epoch 1/3 | step 7 | train_loss ")


def test_progress_bar_only_on_a_terminal(csv_run, toy_fit):
    bar = csv_run["stderr"]
    for epoch in (1, 2, 3):
        assert f"epoch {epoch}/3: 100%" in bar and "7/7" in bar
    assert "loss" not in bar  # the log lines went to stdout, above the bar
    _, not_a_terminal = toy_fit
    assert not_a_terminal == ""


def test_loss_png_is_a_png_that_image_readers_open(csv_run):
    path = csv_run["out"] / "loss.png"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from PIL import Image

    with Image.open(path) as image:
        image.verify()
    import matplotlib.image

    assert matplotlib.image.imread(str(path)).shape == (400, 1000, 4)  # figsize 10x4 at 100 dpi


def test_config_json_holds_the_resolved_config_and_training_statistics(csv_run):
    saved = read_json(csv_run["out"] / "config.json")
    assert saved["config"]["label_column"] == "y" and saved["config"]["lr"] == 0.1
    assert saved["model"] == {"num_inputs": 3, "num_outputs": 3, "hidden": [30, 20]}
    assert saved["data"]["feature_names"] == FEATURES
    train_x = csv_run["train_x"]
    assert torch.allclose(torch.tensor(saved["data"]["mean"]), train_x.mean(0), rtol=1e-6)
    assert torch.allclose(torch.tensor(saved["data"]["std"]), train_x.std(0, unbiased=False), rtol=1e-5)


# --- evaluate ------------------------------------------------------------------------------------


def test_evaluate_reproduces_results_json(csv_run, val_metrics):
    out, results = csv_run["out"], read_json(csv_run["out"] / "results.json")
    on_file = val_metrics
    assert on_file["count"] == 21
    assert (on_file["loss"], on_file["accuracy"]) == (results["val_loss"], results["val_accuracy"])
    # Without --data: the run's validation set, rebuilt from config.json.
    own = evaluate_run(out)
    assert {k: own[k] for k in ("loss", "accuracy", "confusion")} == {
        k: on_file[k] for k in ("loss", "accuracy", "confusion")
    }
    # The same numbers from the saved weights by hand.
    with torch.no_grad():
        logits = load_model(out)(standardized(out, csv_run["val_x"]))
    labels = csv_run["val_y"]
    confusion = torch.zeros(3, 3, dtype=torch.int64)
    for true, predicted in zip(labels.tolist(), logits.argmax(1).tolist()):
        confusion[true, predicted] += 1
    assert on_file["confusion"] == confusion.tolist()
    assert on_file["loss"] == pytest.approx(F.cross_entropy(logits, labels).item(), rel=1e-6)


def test_evaluate_on_toy_is_the_books_test_set(toy_run, capsys):
    results = read_json(toy_run / "results.json")
    code, out, err = cli(evaluate_main, capsys, str(toy_run), "--data", "toy")
    assert code == 0 and err == ""
    assert out.splitlines() == [
        "evaluated on the book's test set (2 rows)",
        f"loss {results['val_loss']:.6f} | accuracy 1.0000 (2/2)",
        "confusion matrix (rows: true class, columns: predicted class):",
        "          pred 0  pred 1",
        "true 0         1       0",
        "true 1         0       1",
    ]


@pytest.mark.slow
def test_evaluate_under_two_processes_gives_the_global_metrics(csv_run, val_metrics):
    """21 rows in batches of 4 over 2 processes: the padding accelerate adds must not be counted."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / "multi_cpu.yaml")]
    cmd += ["--main_process_port", str(free_port()), str(REPO / "scripts" / "evaluate.py")]
    cmd += [str(csv_run["out"]), "--data", csv_run["val"], "--batch-size", "4"]
    proc = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    expected = format_evaluation(val_metrics)
    assert proc.stdout.count(expected) == 1  # all 21 rows, printed by one process


def test_evaluate_refuses_bad_input_in_one_line(csv_run, toy_run, tmp_path, capsys):
    out, folder = csv_run["out"], csv_run["folder"]
    no_c = write_csv(folder / "no_c.csv", ["a", "b", "y"], [[1, 2, 0]])
    label_3 = write_csv(folder / "label_3.csv", ["a", "b", "c", "y"], [[1, 2, 3, 0], [1, 2, 3, 3]])
    unlabelled = write_csv(folder / "unlabelled.csv", ["a", "b", "c"], [[1, 2, 3]])
    broken = tmp_path / "broken"
    shutil.copytree(toy_run, broken)
    (broken / "model.safetensors").write_bytes((toy_run / "model.safetensors").read_bytes()[:100])
    no_val = tmp_path / "no_val"
    shutil.copytree(toy_run, no_val)
    saved = read_json(no_val / "config.json")
    saved["config"].update(data="synthetic", num_samples=20)
    (no_val / "config.json").write_text(json.dumps(saved))
    nope = tmp_path / "nope"
    cases = [
        ([str(nope)], f"{nope}/config.json: no such file (is {nope} a toyaccel run directory?)"),
        (
            [str(out), "--data", no_c],
            f"{no_c}: missing feature column(s) ['c']; the model was trained on columns {FEATURES}",
        ),
        (
            [str(out), "--data", label_3],
            f"{label_3}: row 3, column 'y': label 3 is out of range for num_classes=3 (labels 0..2)",
        ),
        (
            [str(out), "--data", unlabelled],
            f"{unlabelled}: no label column 'y': evaluation needs labels (name their column with --label-column); "
            "for predictions on unlabelled rows use toyaccel-predict",
        ),
        ([str(out), "--data", "toy"], f"--data toy: the book's test set has 2 features, the model in {out} takes 3"),
        ([str(broken), "--data", "toy"], None),
        (
            [str(no_val)],
            f"{no_val} was trained without validation data; pass --data toy or --data FILE.csv to evaluate",
        ),
        ([str(out), "--batch-size", "0"], "batch_size must be at least 1, got 0"),
        ([str(out), "--bogus"], "unrecognized arguments: --bogus (see toyaccel-evaluate --help)"),
    ]
    for args, message in cases:
        code, stdout, err = cli(evaluate_main, capsys, *args)
        assert code == 2 and stdout == "", args
        if message is None:
            assert err.startswith(f"error: {broken}/model.safetensors: cannot load weights: ") and err.count("\n") == 1
        else:
            assert err == f"error: {message}\n"


# --- predict -------------------------------------------------------------------------------------


def test_predict_writes_the_class_and_probabilities_of_every_row(csv_run, tmp_path, capsys):
    out = csv_run["out"]
    features, _ = blobs(11, seed=3)
    # Columns in another order, an id column that is not a number, and no label: all fine for predict.
    rows = [[f"row{i}", c, b, a] for i, (a, b, c) in enumerate(features.tolist())]
    data = write_csv(tmp_path / "new.csv", ["id", "c", "b", "a"], rows)
    target = tmp_path / "preds" / "predictions.csv"
    code, stdout, err = cli(predict_main, capsys, str(out), "--data", data, "--output", str(target))
    assert (code, stdout, err) == (0, f"wrote 11 predictions to {target}\n", "")

    with target.open(newline="") as f:
        header, *written = list(csv.reader(f))
    assert header == ["predicted", "prob_0", "prob_1", "prob_2"]
    predicted = torch.tensor([int(r[0]) for r in written])
    probabilities = torch.tensor([[float(p) for p in r[1:]] for r in written], dtype=torch.float64)
    assert probabilities.shape == (11, 3)
    assert torch.allclose(probabilities.sum(1), torch.ones(11, dtype=torch.float64), atol=1e-7)
    assert torch.equal(predicted, probabilities.argmax(1))
    with torch.no_grad():
        logits = load_model(out)(standardized(out, features))
    assert torch.equal(predicted, logits.argmax(1))
    assert torch.allclose(probabilities, torch.softmax(logits.double(), 1), atol=1e-8, rtol=0)

    # An existing file is kept unless --overwrite says otherwise.
    before = target.read_bytes()
    code, stdout, err = cli(predict_main, capsys, str(out), "--data", data, "--output", str(target))
    assert (code, err) == (2, f"error: {target} already exists; pass --overwrite to replace it\n")
    assert target.read_bytes() == before
    code, _, _ = cli(predict_main, capsys, str(out), "--data", data, "--output", str(target), "--overwrite")
    assert code == 0 and target.read_bytes() == before


def test_predict_on_the_books_test_set(toy_run, tmp_path, capsys):
    target = tmp_path / "toy.csv"
    code, _, _ = cli(predict_main, capsys, str(toy_run), "--data", "toy", "--output", str(target))
    assert code == 0
    rows = list(csv.reader(target.open()))
    assert [r[0] for r in rows] == ["predicted", "0", "1"]  # the book: tensor([0, 1])


def test_predict_refuses_bad_input_without_writing(csv_run, toy_run, tmp_path, capsys):
    out = csv_run["out"]
    bad = write_csv(tmp_path / "bad.csv", ["a", "b", "c"], [[1, 2, 3], [1, "x", 3]])
    target = tmp_path / "p.csv"
    code, _, err = cli(predict_main, capsys, str(out), "--data", bad, "--output", str(target))
    assert (code, err) == (2, f"error: {bad}: row 3, column 'b': not a number: 'x'\n")
    code, _, err = cli(predict_main, capsys, str(out), "--data", bad)
    assert (code, err) == (2, "error: the following arguments are required: --output (see toyaccel-predict --help)\n")
    a_file = write_csv(tmp_path / "f.csv", ["a"], [[1]])
    code, _, err = cli(predict_main, capsys, str(toy_run), "--data", "toy", "--output", f"{a_file}/p.csv")
    assert code == 2 and err.startswith(f"error: cannot write {a_file}/p.csv: ") and err.count("\n") == 1
    assert not target.exists()


# --- class names, id columns, evaluation cadence ----------------------------------------------------

SPECIES = ["setosa", "versicolor", "virginica"]


def named_rows(features: torch.Tensor, labels: torch.Tensor, first_id: int) -> list[list]:
    rows = zip(features.tolist(), labels.tolist())
    return [[f"id{first_id + i:03}", a, SPECIES[y], b, c] for i, ((a, b, c), y) in enumerate(rows)]


@pytest.fixture(scope="module")
def named_run(tmp_path_factory):
    """Rows as they come: a text id column, classes by name."""
    folder = tmp_path_factory.mktemp("named_run")
    header = ["id", "a", "species", "b", "c"]
    train = write_csv(folder / "train.csv", header, named_rows(*blobs(60, seed=1), 0))
    val = write_csv(folder / "val.csv", header, named_rows(*blobs(21, seed=2), 100))
    out = folder / "run"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        fit(data=train, val_data=val, label_column="species", ignore_columns="id", standardize=True, epochs=2,
            batch_size=8, lr=0.1, progress=False, plot=False, output_dir=str(out))  # fmt: skip
    return {"out": out, "train": train, "val": val, "folder": folder, "stdout": stdout.getvalue()}


def test_start_up_line_and_config_json_say_the_data_as_read(named_run):
    first = named_run["stdout"].splitlines()[0]
    assert first.startswith("toyaccel: 1 process(es), ")
    assert (f"| data {named_run['train']}: 60 rows, 3 features (a, b, c), 3 classes: setosa, versicolor, virginica; "
            f"train 60, val 21 ({named_run['val']}) | output {named_run['out']} | ") in first  # fmt: skip
    assert "num_samples" not in first and "label_column=species" in first and "ignore_columns=['id']" in first
    saved = read_json(named_run["out"] / "config.json")
    assert saved["data"]["classes"] == SPECIES and saved["data"]["ignore_columns"] == ["id"]
    assert saved["data"]["feature_names"] == FEATURES and saved["model"]["num_outputs"] == 3
    assert "num_samples" not in saved["config"] and saved["config"]["ignore_columns"] == ["id"]


def test_evaluate_and_predict_speak_class_names_and_keep_ids(named_run, tmp_path, capsys):
    out, folder = named_run["out"], named_run["folder"]
    metrics = evaluate_run(out, named_run["val"])
    results = read_json(out / "results.json")
    assert (metrics["loss"], metrics["accuracy"]) == (results["val_loss"], results["val_accuracy"])
    table = format_evaluation(metrics).splitlines()[3:]
    assert table[0].split() == ["pred", "setosa", "pred", "versicolor", "pred", "virginica"]
    assert [line.split()[:2] for line in table[1:]] == [["true", name] for name in SPECIES]

    features, _ = blobs(7, seed=3)
    rows = [[f"new{i}", "note", c, b, a] for i, (a, b, c) in enumerate(features.tolist())]
    data = write_csv(tmp_path / "new.csv", ["id", "note", "c", "b", "a"], rows)
    target = tmp_path / "predictions.csv"
    code, _, err = cli(predict_main, capsys, str(out), "--data", data, "--output", str(target))
    assert (code, err) == (0, "")
    header, *written = list(csv.reader(target.open(newline="")))
    # The training run's ignored columns come first, as they were; the note is not one of them.
    assert header == ["id", "predicted", *(f"prob_{n}" for n in SPECIES)]
    assert [r[0] for r in written] == [f"new{i}" for i in range(7)]
    with torch.no_grad():
        logits = load_model(out)(standardized(out, features))
    assert [r[1] for r in written] == [SPECIES[k] for k in logits.argmax(1).tolist()]
    code, _, _ = cli(predict_main, capsys, str(out), "--data", data, "--output", str(target), "--overwrite",
                     "--ignore-columns", "note,id")  # fmt: skip
    assert code == 0 and next(csv.reader(target.open()))[:3] == ["note", "id", "predicted"]

    unseen = write_csv(folder / "unseen.csv", ["a", "b", "c", "species"], [[1, 2, 3, "setosa"], [1, 2, 3, "mouse"]])
    no_b = write_csv(folder / "no_b.csv", ["id", "a", "c"], [["x", 1, 2]])
    cases = [
        (evaluate_main, [str(out), "--data", unseen],
         f"{unseen}: row 3, column 'species': label 'mouse' is not one of the training data's classes "
         "(setosa, versicolor, virginica)"),
        (predict_main, [str(out), "--data", no_b, "--output", str(tmp_path / "p.csv")],
         f"{no_b}: missing feature column(s) ['b']; the model was trained on columns {FEATURES}"),
        (predict_main, [str(out), "--data", data, "--output", str(tmp_path / "p.csv"), "--ignore-columns", "a"],
         f"{data}: --ignore-columns names ['a'], which the model takes as features"),
    ]  # fmt: skip
    for main, args, message in cases:
        code, stdout, err = cli(main, capsys, *args)
        assert (code, stdout, err) == (2, "", f"error: {message}\n")
    assert not (tmp_path / "p.csv").exists()


@pytest.mark.slow
def test_eval_every_and_the_training_sample(tmp_path):
    """Epoch-end training metrics score a fixed sample of 8192 rows (--eval-train full: every row); evaluation
    never changes what is trained."""
    from toyaccel.config import EVAL_TRAIN_SAMPLE
    from toyaccel.workloads.mlp.data import load_data, training_sample

    options = {"data": "synthetic", "num_samples": 10000, "num_features": 4, "val_fraction": 0.1, "epochs": 2,
               "batch_size": 900, "lr": 0.1, "eval_every": 2, "progress": False, "plot": False}  # fmt: skip
    with contextlib.redirect_stdout(io.StringIO()):
        sample = fit(**options, output_dir=str(tmp_path / "sample"))
        full = fit(**options, eval_train="full", output_dir=str(tmp_path / "full"))
    epochs = [r for r in read_jsonl(tmp_path / "sample" / "metrics.jsonl") if r["kind"] == "epoch"]
    assert [sorted(r) for r in epochs] == [["epoch", "kind", "step"],
                                           ["epoch", "kind", "step", "train_acc", "train_loss", "val_acc", "val_loss"]]
    assert weights(tmp_path / "sample").keys() and all(
        torch.equal(weights(tmp_path / "sample")[k], v) for k, v in weights(tmp_path / "full").items()
    )
    train = load_data(TrainConfig(**{k: options[k] for k in ("data", "num_samples", "num_features", "val_fraction")}))
    rows = training_sample(train.train, EVAL_TRAIN_SAMPLE, seed=123)
    assert len(train.train) == 9000 and len(rows) == EVAL_TRAIN_SAMPLE
    model = load_model(tmp_path / "sample")
    for result, ds in ((sample, rows), (full, train.train)):
        with torch.no_grad():
            logits = model(ds.features)
        assert result.train_accuracy == (logits.argmax(1) == ds.labels).double().mean().item()
        assert result.train_loss == pytest.approx(F.cross_entropy(logits, ds.labels).item(), rel=1e-6)
