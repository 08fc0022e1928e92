"""Data sources, and bad input: one line naming what and where, exit code 2, no traceback, and the
output directory exactly as it was."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO, accelerate_launch

from toyaccel import TrainConfig, fit
from toyaccel.cli import parse_train_args, train_main
from toyaccel.engine.batches import eval_batches
from toyaccel.workloads.mlp.csv_reader import Columns, read_fast, read_slow, read_table
from toyaccel.workloads.mlp.data import ToyDataset, load_data


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def previous_run(tmp_path_factory) -> Path:
    """A finished run that no failed command may touch."""
    out = tmp_path_factory.mktemp("previous") / "run"
    fit(TrainConfig(output_dir=str(out), progress=False, plot=False, epochs=1))
    return out


@pytest.fixture(scope="module")
def csv_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("csv")


def write(folder: Path, name: str, text: str) -> str:
    path = folder / name
    path.write_bytes(text.encode())
    return str(path)


GOOD_ROWS = "x1,x2,label\n-1.2,3.1,0\n-0.9,2.9,0\n-0.5,2.6,0\n2.3,-1.1,1\n2.7,-1.5,1\n"

# name: (file contents or None for no file, extra options, the message after "error: {path}: ")
BAD_CSVS = {
    "missing file": (None, [], "no such file (--data takes toy, synthetic or the path of a CSV file)"),
    "empty file": ("", [], "file is empty (expected a header row and data rows)"),
    "blank lines only": ("\n \n", [], "file is empty (expected a header row and data rows)"),
    "header only": (
        "x1,x2,label\n", [], "header only, no data rows (a CSV file: a header line, then one row per sample)"
    ),
    "non-numeric cell": ("x1,x2,label\n1,2,0\n3,abc,1\n", [], "row 3, column 'x2': not a number: 'abc'"),
    "empty cell": ("x1,x2,label\n1,,0\n", [], "row 2, column 'x2': empty cell (every feature needs a number)"),
    "nan": ("x1,x2,label\n1,2,0\nNaN,2,1\n", [], "row 3, column 'x1': NaN is not a finite number"),
    "inf": ("x1,x2,label\n1,-inf,0\n", [], "row 2, column 'x2': -inf is not a finite number"),
    "beyond float32": ("x1,x2,label\n1,1e39,0\n", [], "row 2, column 'x2': 1e39 is too large for float32"),
    # With --num-classes, labels are class numbers 0..K-1; without, any values are class names.
    "negative label": (
        "x1,x2,label\n1,2,0\n1,2,-1\n",
        ["--num-classes", "2"],
        "row 3, column 'label': a label must be a class number 0, 1, 2, ..., got -1",
    ),
    "non-integer label": (
        "x1,x2,label\n1,2,0.5\n",
        ["--num-classes", "2"],
        "row 2, column 'label': a label must be a class number 0, 1, 2, ..., got 0.5",
    ),
    "missing label": ("x1,x2,label\n1,2,0\n1,2, \n", [], "row 3, column 'label': missing label"),
    # NaN as pandas and numpy write a missing value: not a class named 'nan'.
    "nan label": ("x1,x2,label\n1,2,cat\n1,2,dog\n1,3,nan\n", [], "row 4, column 'label': missing label ('nan')"),
    "NaN label": (
        "x1,x2,label\n1,2,0\n1,2,NaN\n", ["--num-classes", "2"], "row 3, column 'label': missing label ('NaN')"
    ),
    "one class only": (
        "x1,x2,label\n1,2,cat\n3,4,cat\n", [], "column 'label': only one class ('cat'); a classifier needs at least two"
    ),
    "text column": (
        "id,x1,label\nid001,1,a\nid002,2,b\n",
        [],
        "row 2, column 'id': not a number: 'id001' (if 'id' is not a feature, leave it out with --ignore-columns id)",
    ),
    "unknown ignored column": (
        GOOD_ROWS,
        ["--ignore-columns", "id"],
        "--ignore-columns names 'id', which is not in header ['x1', 'x2', 'label']",
    ),
    "label out of range": (
        "x1,x2,label\n1,2,0\n1,2,1\n1,2,2\n",
        ["--num-classes", "2"],
        "row 4, column 'label': label 2 is out of range for num_classes=2 (labels 0..1)",
    ),
    "label far beyond the rows": (
        "x1,x2,label\n1,2,0\n1,2,1\n1,2,1999\n",
        [],
        "column 'label' has 3 distinct values in 3 rows, too many to be classes (check --label-column)",
    ),
    "row too short": ("x1,x2,label\n1,2,0\n1,2\n", [], "row 3 has 2 columns, the header has 3"),
    "row too long": ("x1,x2,label\n1,2,0,7\n", [], "row 2 has 4 columns, the header has 3"),
    "missing label column": (
        "x1,x2,y\n1,2,0\n", [], "no label column 'label' in header ['x1', 'x2', 'y'] (set --label-column)"
    ),
    "wrong --label-column": (
        GOOD_ROWS,
        ["--label-column", "class"],
        "no label column 'class' in header ['x1', 'x2', 'label'] (set --label-column)",
    ),
    "duplicate column": ("x1,x1,label\n1,2,0\n", [], "column name 'x1' appears twice in the header"),
    "unnamed column": ("x1,,label\n1,2,0\n", [], "column 2 of the header has no name"),
    "no feature columns": ("label\n0\n1\n", [], "no feature columns besides 'label'"),
}


def run_train(capsys, *args: str) -> tuple[int, str]:
    """toyaccel-train in this process: its exit code and stderr (an unexpected exception fails the test)."""
    capsys.readouterr()
    code = train_main(["--no-progress", "--no-plot", *args])
    return code, capsys.readouterr().err


def assert_refused(code: int, err: str, message: str) -> None:
    assert code == 2
    assert err == f"error: {message}\n"  # one line, and no traceback


@pytest.mark.parametrize("case", list(BAD_CSVS))
def test_bad_csv_is_one_line_naming_file_row_and_column(case, csv_dir, previous_run, capsys):
    text, options, message = BAD_CSVS[case]
    path = str(csv_dir / "missing.csv") if text is None else write(csv_dir, f"{case.replace(' ', '_')}.csv", text)
    before = snapshot(previous_run)
    # --overwrite too: bad data must be found before anything of the previous run is removed.
    code, err = run_train(capsys, "--data", path, *options, "--output-dir", str(previous_run), "--overwrite")
    assert_refused(code, err, f"{path}: {message}")
    assert snapshot(previous_run) == before


def test_bad_validation_csv_names_the_validation_file(csv_dir, previous_run, capsys):
    train = write(csv_dir, "train.csv", GOOD_ROWS)
    val = write(csv_dir, "val.csv", "x1,x2,label\n1,2,0\n\n1,2,3\n")
    before = snapshot(previous_run)
    code, err = run_train(
        capsys, "--data", train, "--val-data", val, "--num-classes", "2", "--output-dir", str(previous_run)
    )
    # Row numbers are the file's: the blank line 3 counts.
    assert_refused(code, err, f"{val}: row 4, column 'label': label 3 is out of range for num_classes=2 (labels 0..1)")
    named = write(csv_dir, "named.csv", "x1,x2,label\n1,2,cat\n1,3,dog\n")
    unseen = write(csv_dir, "unseen.csv", "x1,x2,label\n1,2,dog\n\n1,2,mouse\n")
    code, err = run_train(capsys, "--data", named, "--val-data", unseen, "--output-dir", str(previous_run))
    message = "row 4, column 'label': label 'mouse' is not one of the training data's classes (cat, dog)"
    assert_refused(code, err, f"{unseen}: {message}")
    assert snapshot(previous_run) == before


def test_run_settings_that_cannot_work_leave_the_previous_run_alone(tmp_path, previous_run, capsys):
    before = snapshot(previous_run)
    not_a_folder = write(tmp_path, "file", "not a folder")
    cases = [
        (
            ["--batch-size", "3", "--grad-accum", "2", "--overwrite"],
            "the training set has 5 samples but one optimizer step needs 6 (1 process x batch size 3 x "
            "grad_accum 2): zero training batches; lower --batch-size or --grad-accum, or use fewer processes",
        ),
        (
            [],
            f"{previous_run} already holds a run (config.json, results.json, model.safetensors, metrics.jsonl, "
            "checkpoints); pass --overwrite to replace it, --resume latest to continue it, or choose another "
            "--output-dir",
        ),
        (["--epochz", "3"], "unrecognized arguments: --epochz 3; did you mean --epochs? (see toyaccel-train --help)"),
        (["--epcohs", "3"], "unrecognized arguments: --epcohs 3; did you mean --epochs? (see toyaccel-train --help)"),
        (["--zzz"], "unrecognized arguments: --zzz (see toyaccel-train --help)"),  # nothing close: no guess
        (["--epochs", "three"], "argument --epochs: invalid int value: 'three' (see toyaccel-train --help)"),
        (["--lr", "fast"], "argument --lr: invalid float value: 'fast' (see toyaccel-train --help)"),
        (["--epochs", "0"], "epochs must be at least 1, got 0"),
    ]
    for options, message in cases:
        code, err = run_train(capsys, "--output-dir", str(previous_run), *options)
        assert_refused(code, err, message)
    assert snapshot(previous_run) == before

    # As root, permissions do not stop writes; a path under a regular file can never be created.
    code, err = run_train(capsys, "--output-dir", f"{not_a_folder}/run")
    assert_refused(code, err, f"cannot write to output directory {not_a_folder}/run: Not a directory")
    code, err = run_train(capsys, "--output-dir", not_a_folder)
    assert_refused(code, err, f"output directory {not_a_folder} exists and is not a directory")
    assert Path(not_a_folder).read_text() == "not a folder"


def test_config_file_mistakes_are_one_line(tmp_path, capsys):
    unknown = write(tmp_path, "unknown.yaml", "epochs: 2\nlearning_rate: 0.1\n")
    code, err = run_train(capsys, "--config", unknown, "--output-dir", str(tmp_path / "run"))
    assert_refused(code, err, f"config file {unknown}: unknown option(s) learning_rate")
    wrong_type = write(tmp_path, "wrong.yaml", "epochs: three\n")
    code, err = run_train(capsys, "--config", wrong_type, "--output-dir", str(tmp_path / "run"))
    assert_refused(code, err, "epochs must be int, got 'three'")
    broken = write(tmp_path, "broken.json", "{epochs: 2")
    code, err = run_train(capsys, "--config", broken, "--output-dir", str(tmp_path / "run"))
    assert code == 2 and err.startswith(f"error: config file {broken} does not parse: ") and err.count("\n") == 1
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_bad_csv_stops_a_multi_process_launch_promptly_with_one_line(csv_dir, previous_run):
    path = write(csv_dir, "bad_ddp.csv", "x1,x2,label\n1,2,0\n1,2,\n")
    before = snapshot(previous_run)
    started = time.monotonic()
    proc = accelerate_launch(
        "multi_cpu.yaml", "--data", path, "--output-dir", str(previous_run), "--overwrite", timeout=240
    )
    assert proc.returncode != 0, proc.stderr
    assert time.monotonic() - started < 120, proc.stderr  # no process waits for one that has already given up
    message = f"error: {path}: row 3, column 'label': missing label\n"
    # Printed once, by rank 0; the rest of stderr is the launcher's own report of a failed worker.
    assert proc.stderr.count(message) == 1, proc.stderr
    # The script's own exit code, under the launcher's 1 (multi_cpu.yaml: mpirun, under accelerate's simple launcher).
    assert "returned non-zero exit status 2" in proc.stderr, proc.stderr
    # the launcher's traceback only (REPO, not a folder name: a clone may be called toyaccel)
    assert not re.search(rf'File "{re.escape(str(REPO))}/(toyaccel|scripts)/', proc.stderr), proc.stderr
    assert snapshot(previous_run) == before


# --- data sources that work ---------------------------------------------------------------------


def test_csv_reads_back_exactly_what_was_written(tmp_path):
    g = torch.Generator().manual_seed(0)
    features = torch.randn(9, 3, generator=g)
    labels = torch.tensor([0, 2, 1, 1, 0, 2, 2, 1, 0])
    # The label in the middle, a byte-order mark and a trailing blank line, as spreadsheets write them.
    rows = zip(features.tolist(), labels.tolist())
    lines = ["\ufeffa,kind,b,c"] + [f"{a!r},{y},{b!r},{c!r}" for (a, b, c), y in rows]
    path = write(tmp_path, "data.csv", "\n".join(lines) + "\n\n")
    data = load_data(TrainConfig(data=path, label_column="kind"))
    assert data.feature_names == ["a", "b", "c"] and data.num_classes == 3 and data.val is None
    assert torch.equal(data.train.features, features) and torch.equal(data.train.labels, labels)

    split = load_data(TrainConfig(data=path, label_column="kind", val_fraction=0.3, standardize=True))
    assert (len(split.train), len(split.val)) == (6, 3)
    held_out = torch.cat([split.train.labels, split.val.labels]).sort().values
    assert torch.equal(held_out, labels.sort().values)  # every row once, in one of the two sets
    # Standardized with the training rows' own statistics only.
    assert torch.allclose(split.train.features.mean(0), torch.zeros(3), atol=1e-6)
    assert torch.allclose(split.train.features.std(0, unbiased=False), torch.ones(3), atol=1e-5)


def test_synthetic_data_is_determined_by_the_seed_and_leaves_the_global_rng_alone():
    config = TrainConfig(data="synthetic", num_samples=50, num_features=3, num_classes=4, seed=7)
    rng = torch.get_rng_state()
    first, again = load_data(config), load_data(config)
    assert torch.equal(torch.get_rng_state(), rng)
    assert torch.equal(first.train.features, again.train.features)
    assert torch.equal(first.train.labels, again.train.labels)
    assert first.train.features.shape == (50, 3) and first.num_classes == 4
    assert set(first.train.labels.tolist()) == {0, 1, 2, 3}
    other = load_data(config.replace(seed=8))
    assert not torch.equal(first.train.features, other.train.features)


def test_config_precedence_is_defaults_then_file_then_command_line(tmp_path):
    path = write(tmp_path, "train.yaml", "epochs: 7\nlr: 0.1\nhidden: 8,4\nbatch-size: 3\n")
    config = parse_train_args(["--config", path, "--epochs", "2", "--hidden", "5"])
    assert config.epochs == 2 and config.hidden == (5,)  # command line over file
    assert config.lr == 0.1 and config.batch_size == 3  # file over defaults
    assert config.seed == 123 and config.data == "toy"  # defaults
    json_path = write(tmp_path, "train.json", '{"lr": 0.25, "standardize": true}')
    config = parse_train_args(["--config", json_path, "--no-standardize"])
    assert config.lr == 0.25 and config.standardize is False


def test_fast_reader_reads_exactly_what_the_row_by_row_scan_reads(tmp_path):
    """numpy's reader and the scan that words its errors must agree to the bit, labels and kept ids too."""
    g = torch.Generator().manual_seed(1)
    values = (torch.randn(40, 3, generator=g, dtype=torch.float64) * 10 ** torch.randint(-8, 30, (40, 3), generator=g))
    names = ["cat", "dog", "emu"]
    lines = ["\ufeffid,a,kind,b,c"]
    for i, (a, b, c) in enumerate(values.tolist()):
        # Doubles at full precision round to float32 once either way; quoted cells and spaces as spreadsheets write.
        lines.append(f'"id {i:03}",{a!r}, {names[i % 3]} ,"{b!r}",{c!r}')
    path = write(tmp_path, "data.csv", "\r\n".join(lines) + "\r\n\r\n")
    columns = Columns(["id", "a", "kind", "b", "c"], ["a", "b", "c"], "kind", ("id",))
    fast = read_fast(path, 1, columns)
    assert fast is not None  # the fast path itself read this file
    slow = read_slow(path, columns)
    assert torch.equal(fast.features, slow.features) and torch.equal(fast.features, values.float())
    assert torch.equal(fast.label_codes, slow.label_codes) and fast.label_cells == slow.label_cells == names
    assert fast.kept == slow.kept == {"id": [f"id {i:03}" for i in range(40)]}
    # A line of spaces stops numpy; the scan reads the file instead, with the same result.
    spaced = write(tmp_path, "spaced.csv", "\r\n".join(lines[:5] + ["   "] + lines[5:]) + "\r\n")
    with pytest.raises(ValueError):
        read_fast(spaced, 1, columns)
    table = read_table(spaced, "kind", ignore=("id",), keep=("id",))
    assert torch.equal(table.features, fast.features) and table.kept == fast.kept


def test_labels_that_are_not_class_numbers_are_class_names(tmp_path):
    rows = [("x1", "x2", "species")] + [(i, -i, ("virginica", "setosa", "versicolor")[i % 3]) for i in range(9)]
    names = write(tmp_path, "names.csv", "".join(",".join(map(str, r)) + "\n" for r in rows))
    data = load_data(TrainConfig(data=names, label_column="species"))
    assert data.classes == ["setosa", "versicolor", "virginica"] and data.num_classes == 3
    assert data.train.labels.tolist() == [2, 0, 1] * 3
    # Numbers that are not 0..K-1 are names too, sorted by value: no empty class 0 in the model.
    numbers = write(tmp_path, "numbers.csv", "x,label\n1,10\n2,2\n3,1\n4,2\n5,10\n6,1\n7,1\n")
    data = load_data(TrainConfig(data=numbers))
    assert data.classes == ["1", "2", "10"] and data.train.labels.tolist() == [2, 1, 0, 1, 2, 0, 0]
    # Class numbers 0..K-1 keep their meaning.
    data = load_data(TrainConfig(data=write(tmp_path, "index.csv", "x,label\n1,1\n2,0\n3,2\n4,1\n")))
    assert data.classes == ["0", "1", "2"] and data.train.labels.tolist() == [1, 0, 2, 1]


def test_without_output_dir_each_run_gets_a_fresh_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    quick = {"epochs": 1, "progress": False, "plot": False}
    first, second = fit(**quick), fit(**quick)
    assert (first.output_dir, second.output_dir) == ("runs/toy", "runs/toy-2")
    out = capsys.readouterr().out
    assert "| output runs/toy-2 |" in out and out.rstrip().endswith("saved the run in runs/toy-2")
    assert (tmp_path / "runs/toy-2/model.safetensors").exists()
    # --resume without --output-dir continues the newest of them.
    resumed = fit(**quick, resume="latest")
    assert resumed.output_dir == "runs/toy-2" and not (tmp_path / "runs/toy-3").exists()


def test_help_says_each_default_once(capsys):
    with pytest.raises(SystemExit):
        parse_train_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: None)" not in text and "--eval-train {sample,full}" in text
    for option in re.split(r" --(?=[a-z])", text)[1:]:
        assert option.count("(default") <= 1, option


@pytest.mark.parametrize("rows, processes, batch_size", [(5, 3, 1), (2, 5, 256), (513, 2, 256)])
def test_evaluation_shares_cover_every_row_once_in_equal_numbers_of_batches(rows, processes, batch_size):
    """Each row is scored by one process; every process runs as many forwards (FSDP needs all of them)."""
    ds = ToyDataset(torch.arange(rows, dtype=torch.float32).view(-1, 1), torch.arange(rows))
    shares = [list(eval_batches(ds, batch_size, torch.device("cpu"), p, processes)) for p in range(processes)]
    assert len({len(batches) for batches in shares}) == 1
    seen = torch.cat([labels for batches in shares for _, labels in batches])
    assert seen.tolist() == list(range(rows))
