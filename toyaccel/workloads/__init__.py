"""Workloads: what is trained. Each is a ``toyaccel.engine.workload.Workload`` (the typed interface the
engine consumes), registered by name in ``WORKLOADS``; ``register_workload`` adds one of your own, which
``toyaccel.fit(model=<its name>, ...)`` then trains.
"""

from __future__ import annotations

import importlib

from toyaccel.engine.workload import Workload
from toyaccel.errors import ToyaccelError

# name -> the workload, or where its class is ("module:Class"), imported on first use: the command line's
# --help and option errors need no torch.
WORKLOADS: dict[str, Workload | str] = {
    "mlp": "toyaccel.workloads.mlp.workload:MLPWorkload",
    "gpt": "toyaccel.workloads.gpt.workload:GPTWorkload",
}


def get_workload(name: str) -> Workload:
    if name not in WORKLOADS:
        raise ToyaccelError(f"unknown model {name!r}; choose one of {', '.join(WORKLOADS)}")
    entry = WORKLOADS[name]
    if isinstance(entry, str):
        module, _, cls = entry.partition(":")
        entry = WORKLOADS[name] = getattr(importlib.import_module(module), cls)()
    return entry


def register_workload(workload: Workload) -> Workload:
    """Make ``workload`` trainable by its ``name`` (replacing a registered one of that name)."""
    if not isinstance(workload, Workload):
        raise ToyaccelError(f"{workload!r} is not a toyaccel.engine.workload.Workload")
    if not workload.name:
        raise ToyaccelError(f"{type(workload).__name__} has no name: set its class attribute name")
    WORKLOADS[workload.name] = workload
    return workload


def workload_names() -> tuple[str, ...]:
    return tuple(WORKLOADS)


def workload_of_run(saved: dict) -> str:
    """The workload of a saved run's config.json (runs saved before there were two are MLP runs)."""
    return saved.get("config", {}).get("model") or "mlp"
