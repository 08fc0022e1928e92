"""``fit``: the run's options, resolved to its workload (toyaccel.workloads) and trained by the engine."""

from __future__ import annotations

from typing import Any

from toyaccel.config import DESCRIBED_OPTIONS, TrainConfig, applicable_options, run_identity, with_absolute_paths
from toyaccel.engine.run import RunResult, train
from toyaccel.engine.run_dir import default_output_dir
from toyaccel.engine.trainer import Conventions
from toyaccel.saved import read_run_config
from toyaccel.workloads import get_workload


def fit(config: TrainConfig | None = None, **overrides: Any) -> RunResult:
    """Train as ``toyaccel-train`` does and return the results; raises ToyaccelError on bad input."""
    config = config or TrainConfig()
    if overrides:
        config = config.replace(**overrides)
    if config.output_dir is None:
        # Chosen before the process group forms: no process creates it before every process has chosen.
        config = config.replace(output_dir=default_output_dir(config.data, resuming=config.resume is not None))
    # A diverging GPT may want its gradients clipped; the book's MLP never clips.
    conventions = Conventions(
        said=DESCRIBED_OPTIONS,
        clipping=config.model == "gpt",
        identity=run_identity,
        read_run=read_run_config,
        recorded=with_absolute_paths,
    )
    return train(config, get_workload(config.model), applicable_options(config), conventions)
