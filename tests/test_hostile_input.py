"""Issue 21, sections 6 and 7: input that never ends, values beyond any machine, and a tampered config.json:
one line naming what to change, exit code 2, no traceback, nothing written."""

from __future__ import annotations

import json
import os
import shutil
import socket
from pathlib import Path

import pytest
from conftest import read_json

from toyaccel import TrainConfig, fit
from toyaccel.cli import evaluate_main, generate_main, predict_main, train_main
from toyaccel.config import in_bytes, machine_memory

MEMORY = in_bytes(machine_memory())
CORES = os.cpu_count() or 1
GPT = ("--model", "gpt", "--context-length", "16", "--emb-dim", "16", "--n-heads", "2", "--n-layers", "1")


@pytest.fixture(scope="module")
def odd_files(tmp_path_factory) -> dict[str, str]:
    """A fifo (no writer: reading it would wait forever), a socket, a device that never ends, a folder, and a
    sparse file larger than any machine's memory (it takes no disk)."""
    folder = tmp_path_factory.mktemp("odd")
    os.mkfifo(folder / "fifo")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(folder / "socket"))
    with open(folder / "huge.txt", "wb") as f:
        f.truncate(4 * machine_memory())
    (folder / "empty_dir").mkdir()
    yield {"fifo": str(folder / "fifo"), "socket": str(folder / "socket"), "zero": "/dev/zero",
           "huge": str(folder / "huge.txt"), "dir": str(folder / "empty_dir")}  # fmt: skip
    sock.close()


def not_regular(path: str, kind: str) -> str:
    return f"{path}: {kind}, not a regular file (only regular files are read)"


# name: (options, the message after "error: "); {fifo}, {zero}, ... name the odd files; {memory}, {cores} this machine
BAD_INPUTS = {
    "gpt text from a fifo": (["--model", "gpt", "--data", "{fifo}"], not_regular("{fifo}", "a fifo")),
    "gpt text from /dev/zero": (["--model", "gpt", "--data", "{zero}"], not_regular("{zero}", "a device")),
    "gpt text from a socket": (["--model", "gpt", "--data", "{socket}"], not_regular("{socket}", "a socket")),
    "gpt validation text from a fifo": (
        [*GPT, "--num-samples", "1200", "--val-data", "{fifo}"],
        not_regular("{fifo}", "a fifo"),
    ),
    "csv from a fifo": (["--data", "{fifo}"], not_regular("{fifo}", "a fifo")),
    "csv from /dev/zero": (["--data", "{zero}"], not_regular("{zero}", "a device")),
    "csv that is a folder": (["--data", "{dir}"], not_regular("{dir}", "a folder")),
    "validation csv from a fifo": (["--val-data", "{fifo}"], not_regular("{fifo}", "a fifo")),
    "config file from a fifo": (["--config", "{fifo}"], not_regular("{fifo}", "a fifo")),
    "config file from /dev/zero": (["--config", "{zero}"], not_regular("{zero}", "a device")),
    "text larger than memory": (
        ["--model", "gpt", "--data", "{huge}"],
        "{huge}: too large to read: the text of {huge} would need more than this machine's {memory} of memory",
    ),
    "seed beyond manual_seed": (
        ["--seed", "99999999999999999999999"],
        "seed must be in 0..18446744073709551614, got 99999999999999999999999",
    ),
    "negative seed": (["--seed", "-1"], "seed must be in 0..18446744073709551614, got -1"),
    "lr beyond float32": (["--lr", "1e300"], "lr must be at most 3.403e+38 (float32's largest number), got 1e+300"),
    "lr infinite": (["--lr", "inf"], "lr must be a positive number, got inf"),
    "workers far beyond the cores": (
        ["--num-workers", "100000"],
        "num_workers must be at most {most} (4 x the {cores} cores of this machine), got 100000",
    ),
    "hidden layer beyond memory": (
        ["--hidden", "100000000000"],
        "the model and data need at least 4 TB, this machine has {memory} of memory",
    ),
    "num-samples as a float": (
        ["--data", "synthetic", "--num-samples", "1e14"],
        "argument --num-samples: invalid int value: '1e14' (see toyaccel-train --help)",
    ),
    "synthetic rows beyond memory": (
        ["--data", "synthetic", "--num-samples", "100000000000000"],
        "the model and data need at least 2.4 PB, this machine has {memory} of memory",
    ),
    "vocabulary beyond memory": (
        ["--model", "gpt", "--vocab-size", "1000000000000"],
        "the model and data need at least 4.1 PB, this machine has {memory} of memory",
    ),
    "gpt width beyond memory": (
        [*GPT[:4], "--emb-dim", "10000000", "--n-heads", "1"],
        "the model and data need at least 76.8 PB, this machine has {memory} of memory",
    ),
    "gpt text beyond memory": (
        ["--model", "gpt", "--num-samples", "10000000000000"],
        "the model and data need at least 560 TB, this machine has {memory} of memory",
    ),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_line_and_writes_nothing(case, odd_files, tmp_path, capsys):
    options, message = BAD_INPUTS[case]
    names = {**odd_files, "memory": MEMORY, "cores": CORES, "most": 4 * CORES}
    out = tmp_path / "run"
    capsys.readouterr()
    code = train_main(["--no-progress", "--no-plot", *(o.format(**names) for o in options), "--output-dir", str(out)])
    assert (code, capsys.readouterr().err) == (2, f"error: {message.format(**names)}\n")
    assert not out.exists()


def test_the_largest_seed_and_learning_rate_train(tmp_path):
    """The bounds refuse only what cannot work: both ends of the seed range run, and so does lr 1e38."""
    for seed in (0, 2**64 - 2):
        fit(TrainConfig(seed=seed, epochs=1, output_dir=str(tmp_path / f"seed{seed}"), progress=False, plot=False))
    TrainConfig(lr=3.4e38)


# --- a saved run's config.json is input ---------------------------------------------------------------


@pytest.fixture(scope="module")
def mlp_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("mlp") / "run"
    fit(TrainConfig(output_dir=str(out), epochs=1, standardize=True, progress=False, plot=False))
    return out


@pytest.fixture(scope="module")
def gpt_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("gpt") / "run"
    assert train_main([*GPT, "--num-samples", "1200", "--epochs", "1", "--no-progress", "--no-plot",
                       "--output-dir", str(out)]) == 0  # fmt: skip
    return out


def tampered(run: Path, folder: Path, edit) -> Path:
    copy = folder / "tampered"
    shutil.copytree(run, copy)
    saved = read_json(copy / "config.json")
    edited = edit(saved)  # a list stands for the whole file; anything else edit returns (a pop's value) does not
    (copy / "config.json").write_text(json.dumps(edited if isinstance(edited, list) else saved))
    return copy


def setting(section: str, **values):
    """An edit of config.json: ``values`` written into its ``section``."""
    return lambda saved: saved[section].update(values)


# name: (edit of config.json, the message after "error: <run>/config.json: ")
MLP_TAMPERING = {
    "negative hidden size": (setting("model", hidden=[-5]), "model: hidden sizes must be positive integers, got [-5]"),
    "hidden size beyond memory": (
        setting("model", hidden=[10**11]),
        "model: its weights need at least 4 TB, this machine has {memory} of memory",
    ),
    "inputs as text": (setting("model", num_inputs="2"), "model: num_inputs must be int, got '2'"),
    "one output": (setting("model", num_outputs=1), "model: num_outputs must be at least 2, got 1"),
    "short classes": (setting("data", classes=["a"]), "data: classes has 1 names, the model has 2"),
    "classes twice": (
        setting("data", classes=["a", "a"]),
        "data: classes must be a list of distinct names, got ['a', 'a']",
    ),
    "short mean": (setting("data", mean=[1.0]), "data: mean must be a list of 2 finite numbers, got [1.0]"),
    "string std": (setting("data", std="big"), "data: std must be a list of 2 finite numbers, got 'big'"),
    "zero std": (setting("data", std=[1.0, 0.0]), "data: std must be positive, got [1.0, 0.0]"),
    "mean without std": (setting("data", std=None), "data: mean and std go together: one of them is missing"),
    "top-level list": (lambda s: [1, 2], "not a toyaccel run config (a JSON object with config and model sections)"),
    "config section a list": (lambda s: s.update(config=[]), "config must be a mapping, got list"),
    "no model section": (lambda s: s.pop("model"), "not a toyaccel run config (no model section)"),
    "seed beyond manual_seed": (
        setting("config", seed=10**23),
        "config: seed must be in 0..18446744073709551614, got 100000000000000000000000",
    ),
    "lr overflowing": (
        setting("config", lr=1e300),
        "config: lr must be at most 3.403e+38 (float32's largest number), got 1e+300",
    ),
}


@pytest.mark.parametrize("case", list(MLP_TAMPERING))
def test_tampered_mlp_config_json_is_one_line_for_evaluate_and_predict(case, mlp_run, tmp_path, capsys):
    edit, message = MLP_TAMPERING[case]
    run = tampered(mlp_run, tmp_path, edit)
    expected = f"error: {run}/config.json: {message.format(memory=MEMORY)}\n"
    target = tmp_path / "predictions.csv"
    for main, args in ((evaluate_main, ["--data", "toy"]), (predict_main, ["--data", "toy", "--output", str(target)])):
        capsys.readouterr()
        assert (main([str(run), *args]), capsys.readouterr().err) == (2, expected), main.__name__
    assert not target.exists()


GPT_TAMPERING = {
    "no heads": (setting("model", n_heads=0), "model: n_heads must be at least 1, got 0"),
    "heads that do not divide": (setting("model", n_heads=3), "model: emb_dim (16) must be divisible by n_heads (3)"),
    "vocabulary beyond memory": (
        setting("model", vocab_size=10**12),
        "model: the model and data need at least 256 TB, this machine has {memory} of memory",
    ),
    "vocabulary as a float": (setting("model", vocab_size=1e12), "model: vocab_size must be int, got 1000000000000.0"),
    "dropout as text": (setting("model", drop_rate="0.1"), "model: drop_rate must be float, got '0.1'"),
    "missing context length": (lambda s: s["model"].pop("context_length"), "model: context_length is missing"),
    "unknown tokenizer": (
        setting("tokenizer", type="words"),
        "tokenizer: type must be one of bpe, bytes, gpt2, got 'words'",
    ),
    "top-level list": (lambda s: [], "not a toyaccel run config (a JSON object with config and model sections)"),
}


@pytest.mark.parametrize("case", list(GPT_TAMPERING))
def test_tampered_gpt_config_json_is_one_line_for_generate_and_evaluate(case, gpt_run, tmp_path, capsys):
    edit, message = GPT_TAMPERING[case]
    run = tampered(gpt_run, tmp_path, edit)
    expected = f"error: {run}/config.json: {message.format(memory=MEMORY)}\n"
    for main in (generate_main, evaluate_main):
        capsys.readouterr()
        assert (main([str(run)]), capsys.readouterr().err) == (2, expected), main.__name__


@pytest.mark.parametrize(
    "args, message",
    [
        (["--max-new-tokens", "100000000000"], "--max-new-tokens must be in 0..1000000, got 100000000000"),
        (
            ["--max-new-tokens", "1e11"],
            "argument --max-new-tokens: invalid int value: '1e11' (see toyaccel-generate --help)",
        ),
        (["--seed", "1e23"], "argument --seed: invalid int value: '1e23' (see toyaccel-generate --help)"),
        (["--seed", str(10**23)], f"--seed must be in 0..18446744073709551614, got {10**23}"),
    ],
)
def test_generate_bounds_are_one_line(gpt_run, capsys, args, message):
    capsys.readouterr()
    assert (generate_main([str(gpt_run), *args]), capsys.readouterr().err) == (2, f"error: {message}\n")


def test_a_fifo_as_config_json_or_evaluation_data_is_refused(gpt_run, mlp_run, odd_files, tmp_path, capsys):
    run = tmp_path / "fifo_run"
    shutil.copytree(mlp_run, run)
    (run / "config.json").unlink()
    os.mkfifo(run / "config.json")
    cases = [
        (evaluate_main, [str(run)], not_regular(f"{run}/config.json", "a fifo")),
        (evaluate_main, [str(gpt_run), "--data", odd_files["fifo"]], not_regular(odd_files["fifo"], "a fifo")),
        (evaluate_main, [str(mlp_run), "--data", odd_files["zero"]], not_regular(odd_files["zero"], "a device")),
        (predict_main, [str(mlp_run), "--data", odd_files["fifo"], "--output", str(tmp_path / "p.csv")],
         not_regular(odd_files["fifo"], "a fifo")),
    ]  # fmt: skip
    for main, args, message in cases:
        capsys.readouterr()
        assert (main(args), capsys.readouterr().err) == (2, f"error: {message}\n"), args
