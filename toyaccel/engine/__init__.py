"""The engine: Accelerate-facing and model-agnostic; it trains any ``Workload`` and imports none.

Layers, lowest first: workload (the interface), launch, placement, run_dir, reporting, plots, faults,
interrupts; batches, checkpoint, optim, accelerator, distributed, evaluation; trainer; run. What is named
below is the engine's public surface (the benchmark drives only these); each is imported on first use,
so that importing the workload interface, as the option parser does, pulls in neither torch nor accelerate.
"""

import importlib

PUBLIC = {
    "toyaccel.engine.workload": ("Workload",),
    "toyaccel.engine.launch": ("MPI_AS_ROOT_ENV", "launched_world_size", "launched_rank"),
    "toyaccel.engine.accelerator": ("build_accelerator", "check_world", "on_accelerator", "release"),
    "toyaccel.engine.placement": ("DataPlacement", "apply_tf32", "choose_placement"),
    "toyaccel.engine.batches": ("EpochBatchSampler", "TensorBatches", "draw_epoch_seed", "eval_batches"),
    "toyaccel.engine.optim": ("DirectStepper", "build_optimizer", "learning_rate", "own_random_stream"),
    "toyaccel.engine.checkpoint": (
        "Checkpointer", "TrainerState", "checkpoint_dirs", "wait_for_checkpoint",
    ),
    "toyaccel.engine.resume": ("plan_resume", "verify_checkpoint"),
    "toyaccel.engine.reporting": ("MetricsLogger", "say"),
    "toyaccel.engine.trainer": ("Trainer", "TrainingJob"),
    "toyaccel.engine.run": ("RunResult", "train"),
}  # fmt: skip
WHERE = {name: module for module, names in PUBLIC.items() for name in names}
__all__ = sorted(WHERE)


def __getattr__(name):
    if name in WHERE:
        return getattr(importlib.import_module(WHERE[name]), name)
    raise AttributeError(f"module 'toyaccel.engine' has no attribute {name!r}")
