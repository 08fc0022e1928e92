"""What a user must be able to trust. Processes that disagree stop; files keep the umask;
checkpoints may hold folders; the declared dependency ranges hold here. (Interrupts, timelines of
checkpoints and resuming on two machines are in test_resume.py, next to the runs they compare with.)"""

from __future__ import annotations

import configparser
import os
from importlib.metadata import version

import pytest
import torch
from conftest import REPO, accelerate_launch
from packaging.requirements import Requirement

from toyaccel import fit
from toyaccel.engine.checkpoint import TrainerState, checkpoint_dirs, write_manifest
from toyaccel.engine.resume import verify_checkpoint
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
