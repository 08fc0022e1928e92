"""A saved run read back: its config.json checked for its workload's model section, and its model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from toyaccel.config import TrainConfig, build_config
from toyaccel.engine.run_dir import read_config_json
from toyaccel.errors import ToyaccelError
from toyaccel.workloads import get_workload, workload_of_run


def read_run_config(run_dir: str | Path) -> dict[str, Any]:
    """A saved run's config.json, checked as options are: it is input like any other (and may have been
    edited). Every problem is one line naming the file and the key."""
    saved = read_config_json(run_dir)
    path = Path(run_dir) / "config.json"
    try:
        # The --init-from folder a run started from is not read again: the run's files are all it needs.
        options = {k: v for k, v in saved.get("config", {}).items() if k != "init_from"}
        build_config(None, **{k: v for k, v in options.items() if k in TrainConfig.TRAINING_FIELDS})
    except ToyaccelError as e:
        raise ToyaccelError(f"{path}: config: {e}") from None
    try:
        workload = get_workload(workload_of_run(saved))
        workload.check_run_description(saved)
        check_shape_as_options(workload.saved_shape_options(saved))
    except ToyaccelError as e:
        raise ToyaccelError(f"{path}: {e}") from None
    return saved


def check_shape_as_options(options: dict[str, Any] | None) -> None:
    if options is None:
        return
    try:
        build_config(None, **options)
    except ToyaccelError as e:
        raise ToyaccelError(f"model: {e}") from None


def saved_config(saved: dict[str, Any], **overrides: Any) -> TrainConfig:
    """The training options a run's config.json ``saved`` holds, as a TrainConfig, ``overrides`` applied."""
    options = {k: v for k, v in saved.get("config", {}).items() if k in TrainConfig.TRAINING_FIELDS}
    return build_config(None, **{**options, **overrides})


def load_model(run_dir: str | Path) -> torch.nn.Module:
    """Rebuild a trained model (the MLP or the GPT) from ``model.safetensors`` and ``config.json``
    (no pickle involved)."""
    return model_from_run(run_dir, read_run_config(run_dir))


def model_from_run(run_dir: str | Path, saved: dict[str, Any]) -> torch.nn.Module:
    """The model of a run whose config.json ``saved`` (read_run_config) is, with its saved weights."""
    try:
        model = get_workload(workload_of_run(saved)).model_from_shape(saved["model"])
    except (KeyError, TypeError, ValueError, AssertionError) as e:
        raise ToyaccelError(f"{Path(run_dir) / 'config.json'}: bad model section ({type(e).__name__}: {e})") from None
    path = Path(run_dir) / "model.safetensors"
    try:
        model.load_state_dict(load_file(str(path)), strict=True)
    except FileNotFoundError:
        raise ToyaccelError(f"{path}: no such file") from None
    except Exception as e:  # noqa: BLE001 - truncated file, wrong keys or shapes: one line naming the file
        raise ToyaccelError(f"{path}: cannot load weights: {str(e).splitlines()[0]}") from None
    return model.eval()


