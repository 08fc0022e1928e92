"""What a user must be able to trust. Processes that disagree stop; files keep the umask;
checkpoints may hold folders; the declared dependency ranges hold here. (Interrupts, timelines of
checkpoints and resuming on two machines are in test_resume.py, next to the runs they compare with.)"""

from __future__ import annotations

import configparser
import json
import os
import signal
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest
import torch
from conftest import REPO, accelerate_launch, assert_weights_equal, read_json, subprocess_env, weights
from packaging.requirements import Requirement

from toyaccel import fit
from toyaccel.cli import train_main
from toyaccel.engine.checkpoint import TrainerState, checkpoint_dirs, write_manifest
from toyaccel.engine.resume import verify_checkpoint
from toyaccel.engine.run_dir import existing_run_files
from toyaccel.errors import ToyaccelError


@pytest.mark.slow
def test_a_process_whose_random_stream_drifted_stops_every_process(tmp_path):
    """Rank 1 draws one extra random number before its first epoch (TOYACCEL_FAULT=rng-drift): its data
    order would differ from rank 0's. Every process stops before training, with one line naming the rank
    and what differs, and torchrun's failure report ends with that line."""
    out = tmp_path / "run"
    proc = accelerate_launch(
        "elastic_cpu.yaml", "--batch-size", "1", "--output-dir", str(out),  # torchrun: its failure report
        env={"TOYACCEL_FAULT": "rng-drift", "TOYACCEL_FAULT_RANK": "1"},
    )  # fmt: skip
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr[-3000:]
    assert errors[0].startswith("error: rank 1 disagrees with rank 0 on the epoch seed at the start of epoch 1 (")
    assert f"traceback : {errors[0]}" in proc.stderr.rpartition("Root Cause")[2]
    assert not (out / "model.safetensors").exists() and not checkpoint_dirs(out)


def test_every_file_of_a_run_follows_the_umask(tmp_path):
    umask = 0o027  # group may read, others nothing: safetensors alone used to write 0600
    previous = os.umask(umask)
    try:
        fit(output_dir=str(tmp_path / "run"), epochs=1, progress=False, plot=False)
    finally:
        os.umask(previous)
    files = [p for p in (tmp_path / "run").rglob("*") if p.is_file()]
    assert {p.name for p in files} >= {"model.safetensors", "rng_state.safetensors", "config.json"}
    modes = {p.relative_to(tmp_path).as_posix(): oct(p.stat().st_mode & 0o777) for p in files}
    assert modes == dict.fromkeys(modes, oct(0o666 & ~umask))


def test_a_checkpoint_holding_folders_is_hashed_and_verified_file_by_file(tmp_path):
    """FSDP's SHARDED_STATE_DICT saves the model and optimizer as folders of shards."""
    checkpoint = tmp_path / "step_4"
    shard = checkpoint / "pytorch_model_fsdp_0" / "__0_0.distcp"
    shard.parent.mkdir(parents=True)
    shard.write_bytes(b"\x00" * 64)
    torch.save({"step": 4}, checkpoint / "optimizer.bin")
    for rng_file in ("rng_state.safetensors", "random_states_0.pkl"):  # what every checkpoint must hold too
        (checkpoint / rng_file).write_bytes(b"\x00" * 8)
    write_manifest(checkpoint, TrainerState(global_step=4, global_batch=2))

    assert verify_checkpoint(checkpoint).global_step == 4
    shard.write_bytes(b"\x00" * 63 + b"\x01")
    with pytest.raises(ToyaccelError, match=f"^{shard}: damaged"):
        verify_checkpoint(checkpoint)
    shard.unlink()
    with pytest.raises(ToyaccelError, match=f"^{shard}: missing from checkpoint"):
        verify_checkpoint(checkpoint)


def test_the_declared_dependency_ranges_hold_here():
    """setup.cfg states the range the code is tested with, and declares what toyaccel imports directly."""
    setup = configparser.ConfigParser()
    setup.read(REPO / "setup.cfg")
    requirements = [Requirement(line) for line in setup["options"]["install_requires"].split("\n") if line.strip()]
    assert {r.name for r in requirements} >= {"torch", "accelerate", "safetensors", "numpy", "PyYAML"}
    for requirement in requirements:
        installed = version(requirement.name).split("+")[0]  # torch's local build tag (+cpu) is not a version
        assert requirement.specifier.contains(installed, prereleases=True), f"{requirement.name} {installed}"
    bounded = {r.name: str(r.specifier) for r in requirements if r.name in ("torch", "accelerate")}
    assert all(">=" in spec for spec in bounded.values()), bounded


def test_the_last_checkpoint_is_in_place_when_training_returns(tmp_path):
    """Checkpoints are hashed, synced and renamed into place in a background thread while training goes
    on: when fit returns, the last one is published and whole, and --keep-last pruned the others."""
    out = tmp_path / "run"
    result = fit(output_dir=str(out), epochs=3, keep_last=1, progress=False, plot=False)
    assert [p.name for p in (out / "checkpoints").iterdir()] == [f"step_{result.global_step}"]
    assert verify_checkpoint(out / "checkpoints" / f"step_{result.global_step}").global_step == result.global_step


# ---------------------------------------------------------------------------------------------
# Issue 21: every file of a run inside its folder, --overwrite removes only toyaccel's, a run that fails
# before its first step leaves nothing behind, --resume auto after a crash before the first checkpoint

QUICK = ("--no-progress", "--no-plot")


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def refused(capsys, *args: str) -> str:
    capsys.readouterr()
    assert train_main([*QUICK, *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err.strip()


def test_an_empty_or_root_output_dir_is_refused_and_nothing_is_written(tmp_path, monkeypatch, capsys):
    """--output-dir '' used to write config.json, model.safetensors and results.json into / and the
    checkpoints, metrics.jsonl and .launch into the current directory."""
    monkeypatch.chdir(tmp_path)
    in_root = [Path("/", name) for name in ("config.json", "model.safetensors", "results.json")]
    root_before = [p.stat().st_mtime_ns if p.exists() else None for p in in_root]  # another run may have left some
    for empty in ("", "  "):
        message = f"error: --output-dir {empty!r} is empty: name the folder the run's files go to, e.g. runs/mine"
        assert refused(capsys, "--output-dir", empty) == message
    for root in ("/", f"{tmp_path}/" + "/".join([".."] * len(tmp_path.parts))):
        assert refused(capsys, "--output-dir", root) == (
            f"error: --output-dir {root} is the filesystem root: name a folder of the run's own, e.g. /runs/mine"
        )
    with pytest.raises(ToyaccelError, match="is empty"):
        fit(output_dir="", epochs=1, progress=False, plot=False)
    assert list(tmp_path.iterdir()) == []
    assert [p.stat().st_mtime_ns if p.exists() else None for p in in_root] == root_before


def test_overwrite_removes_only_what_toyaccel_wrote(tmp_path, capsys):
    """A folder with files of toyaccel's names that is no toyaccel run (another tool's config.json and logs)
    is refused, with --overwrite or without, naming what is there; a toyaccel run is replaced."""
    other_tool = tmp_path / "app"
    (other_tool / "logs").mkdir(parents=True)
    (other_tool / "config.json").write_text('{"name": "my app"}\n')
    (other_tool / "logs" / "app.log").write_text("started\n")
    no_config = tmp_path / "notes"
    (no_config / "logs").mkdir(parents=True)
    (no_config / "logs" / "notes.txt").write_text("mine\n")
    before = {folder: snapshot(folder) for folder in (other_tool, no_config)}
    for folder, why, found in (
        (other_tool, "its config.json is not a toyaccel run's", "config.json, logs"),
        (no_config, "no config.json", "logs"),
    ):
        for flags in (("--overwrite",), ()):
            assert refused(capsys, "--output-dir", str(folder), *flags) == (
                f"error: {folder} holds {found} but is not a toyaccel run ({why}): toyaccel neither writes over "
                "nor removes them (--overwrite included); choose another --output-dir"
            )
    assert {folder: snapshot(folder) for folder in before} == before

    run = tmp_path / "run"
    fit(output_dir=str(run), epochs=1, progress=False, plot=False)
    (run / "notes.txt").write_text("not toyaccel's: kept\n")
    capsys.readouterr()
    assert train_main([*QUICK, "--output-dir", str(run), "--overwrite", "--lr", "0.1"]) == 0
    assert read_json(run / "config.json")["config"]["lr"] == 0.1 and (run / "notes.txt").exists()


def test_a_run_that_fails_before_its_first_step_leaves_nothing_a_later_run_trips_on(tmp_path, monkeypatch):
    """An error inside the first optimizer step (as an overflowing --lr or running out of memory): the
    folder holds none of the run's files, so the same command runs again without --overwrite. The run's
    files are written once the first step is done; an error later leaves a run that --resume continues."""
    out = tmp_path / "run"
    monkeypatch.setenv("TOYACCEL_FAULT", "raise:1")
    with pytest.raises(RuntimeError, match="an error inside optimizer step 1"):
        fit(output_dir=str(out), epochs=1, progress=False, plot=False)
    assert existing_run_files(out) == [] and not (out / ".launch").exists()
    monkeypatch.setenv("TOYACCEL_FAULT", "raise:2")
    with pytest.raises(RuntimeError, match="an error inside optimizer step 2"):
        fit(output_dir=str(out), epochs=1, progress=False, plot=False)
    assert existing_run_files(out) == ["config.json", "metrics.jsonl"]
    assert json.loads((out / "metrics.jsonl").read_text().splitlines()[0])["step"] == 1
    monkeypatch.delenv("TOYACCEL_FAULT")
    assert fit(output_dir=str(out), epochs=1, progress=False, plot=False, resume="auto").global_step == 2


def train_in(cwd: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """scripts/train.py run from ``cwd``, so that relative paths are relative to it."""
    cmd = [sys.executable, str(REPO / "scripts" / "train.py"), *QUICK, *args]
    return subprocess.run(cmd, cwd=cwd, env=subprocess_env(env), capture_output=True, text=True, timeout=240)


@pytest.mark.slow
def test_resume_auto_after_a_kill_before_the_first_checkpoint_starts_afresh(tmp_path):
    """The Slurm job script's --resume auto, for a job preempted before its first checkpoint: the folder holds
    config.json and metrics.jsonl of the same run, so it starts over there, and ends with the weights of an
    uninterrupted run. A CSV run: config.json leaves out the options it does not save (val_fraction 0,
    num_samples) and records the data's path absolute, where the command gave it relative."""
    rows = [f"{i % 7 * 0.5},{i % 3 - 1},{i % 2}" for i in range(24)]
    (tmp_path / "rows.csv").write_text("a,b,label\n" + "\n".join(rows) + "\n")
    args = ("--data", "rows.csv", "--epochs", "2", "--batch-size", "4")
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    proc = train_in(tmp_path, *args, "--output-dir", str(reference))
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = train_in(tmp_path, *args, "--output-dir", str(killed), env={"TOYACCEL_FAULT": "step:1"})
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert not checkpoint_dirs(killed) and (killed / "config.json").exists()
    assert read_json(killed / "config.json")["config"]["data"] == str(tmp_path / "rows.csv")

    # A folder holding another run (another --lr) with no checkpoint is still refused.
    before = snapshot(killed)
    proc = train_in(tmp_path, *args, "--output-dir", str(killed), "--resume", "auto", "--lr", "0.1")
    assert proc.returncode == 2 and proc.stderr.startswith(f"error: {killed} already holds a run"), proc.stderr
    assert snapshot(killed) == before

    proc = train_in(tmp_path, *args, "--output-dir", str(killed), "--resume", "auto")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_weights_equal(weights(killed), weights(reference))
    logged = [[(r["kind"], r["step"], r.get("loss")) for r in map(json.loads, (run / "metrics.jsonl").open())]
              for run in (killed, reference)]  # fmt: skip
    assert logged[0] == logged[1]  # the killed attempt's line of step 1 once, not twice


def test_a_run_records_what_it_used_and_evaluates_from_anywhere(tmp_path, monkeypatch, capsys):
    """config.json records the data's path absolute (the command gave it relative), log_every and tf32 as
    used (not 0 for "auto", not TF32 on a CPU); the checkpoint's state no num_samples for a CSV run. From
    another directory, evaluate rebuilds the validation rows; on a config.json edited to name a file that is
    not data it names the file and quotes none of it."""
    from toyaccel.cli import evaluate_main
    from toyaccel.inference import evaluate_run

    rows = [f"{i % 7 * 0.5},{i % 3 - 1},{i % 2}" for i in range(40)]
    (tmp_path / "rows.csv").write_text("a,b,label\n" + "\n".join(rows) + "\n")
    monkeypatch.chdir(tmp_path)
    fit(data="rows.csv", val_fraction=0.25, epochs=1, batch_size=5, output_dir="run", progress=False, plot=False)
    run = tmp_path / "run"
    saved = read_json(run / "config.json")
    assert saved["config"]["data"] == str(tmp_path / "rows.csv")
    assert (saved["config"]["log_every"], saved["config"]["tf32"]) == (1, False)  # 6 steps an epoch: 6 // 10 -> 1
    training = read_json(checkpoint_dirs(run)[0] / "trainer_state.json")["training"]
    assert training["data"] == "rows.csv" and "num_samples" not in training and "num_features" not in training

    monkeypatch.chdir(tmp_path.parent)
    assert evaluate_run(run)["loss"] == read_json(run / "results.json")["val_loss"]
    saved["config"]["data"] = "/etc/passwd"
    (run / "config.json").write_text(json.dumps(saved))
    capsys.readouterr()
    assert evaluate_main([str(run)]) == 2
    assert capsys.readouterr().err == (
        f"error: {run / 'config.json'}: the run's data (/etc/passwd) no longer reads as the rows it was trained on "
        "(changed, replaced, or config.json edited); pass --data FILE.csv to evaluate on a file\n"
    )
