"""Evaluate, predict and generate with a saved run, reading only ``model.safetensors``, ``config.json`` and what
the workload saved beside them (a tokenizer): no pickle.

This is the one shell around the workloads' own evaluate, predict and generate (``Workload.evaluation_set``,
``evaluate_prepared``, ``predict``, ``generate``; toyaccel/workloads/<name>/inference.py): it loads the run,
refuses a command its workload does not give, runs ``evaluate_run`` under ``accelerate launch`` like training
(every process scores its share and all report the figures of the whole set), keeps ``predict_file`` and
``generate_from_run`` to one process, and writes and formats what they give.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

from toyaccel.config import build_config
from toyaccel.engine.launch import launched_world_size
from toyaccel.engine.run_dir import write_atomic
from toyaccel.engine.workload import EvaluateRequest, GenerateRequest, SavedRun, Workload
from toyaccel.errors import ToyaccelError
from toyaccel.saved import model_from_run, read_run_config, saved_config
from toyaccel.workloads import get_workload, workload_names, workload_of_run
from toyaccel.workloads.gpt.inference import SAMPLE_TOKENS, START_CONTEXT


def offering(method: str) -> Callable[[Workload], bool]:
    return lambda workload: workload.offers(method)


def read_run(run_dir: str | Path, command: str, fits: Callable[[Workload], bool]) -> tuple[Workload, dict[str, Any]]:
    """The workload and checked config.json of a saved run, refused (naming the workloads that would do) where
    ``command`` cannot take a run of that workload."""
    saved = read_run_config(run_dir)
    name = workload_of_run(saved)
    workload = get_workload(name)
    if not fits(workload):
        wanted = " or ".join(other for other in workload_names() if fits(get_workload(other)))
        raise ToyaccelError(f"{run_dir} holds a {name} run; {command} needs a --model {wanted} run")
    return workload, saved


def load_run(run_dir: str | Path, workload: Workload, saved: dict[str, Any]) -> SavedRun:
    """The run's model with its saved weights, and what its workload saved beside them."""
    model = model_from_run(run_dir, saved)
    extras = workload.load_extras(str(run_dir), saved)
    return SavedRun(str(run_dir), model, saved, extras, functools.partial(saved_config, saved))


def load_gpt_run(run_dir: str | Path):
    """The model, tokenizer and config.json of a saved ``--model gpt`` run (what toyaccel-export converts)."""
    workload, saved = read_run(run_dir, "toyaccel-export", lambda w: w.name == "gpt")
    run = load_run(run_dir, workload, saved)
    return run.model, run.extras, run.saved


def refuse_a_launch(command: str) -> None:
    """A command that writes one file or prints one text runs in one process."""
    if launched_world_size() > 1:
        raise ToyaccelError(
            f"{command.removeprefix('toyaccel-')} runs in one process: start it with python or {command}, "
            "not a multi-process launch"
        )


# ---------------------------------------------------------------------------------------------
# Evaluate


def evaluate_run(
    run_dir: str | Path,
    data: str | None = None,
    label_column: str | None = None,
    batch_size: int | None = None,
    ignore_columns: tuple[str, ...] = (),
) -> dict[str, Any]:
    """The loss and the workload's figures (an MLP's accuracy and confusion matrix, a GPT's perplexity) of a
    saved model on ``data`` (None: the run's own validation set); the same on every process of a launch."""
    from toyaccel.engine.accelerator import on_accelerator  # accelerate is slow to import

    workload, saved = read_run(run_dir, "toyaccel-evaluate", offering("evaluation_set"))
    batch_size = workload.eval_batch_size if batch_size is None else batch_size
    config = build_config(None, model=workload.name, batch_size=batch_size, output_dir=str(run_dir))
    # Bad input fails here, on every process, before any process waits for another.
    run = load_run(run_dir, workload, saved)
    request = EvaluateRequest(data, batch_size, label_column, tuple(ignore_columns))
    dataset, described = workload.evaluation_set(run, request)
    metrics = on_accelerator(config, workload.evaluate_prepared, run.model, dataset, config)
    return {"model": workload.name, **described, **metrics}


def format_evaluation(metrics: dict[str, Any]) -> str:
    """What toyaccel-evaluate prints for ``evaluate_run``'s figures: the workload's own lines."""
    return get_workload(metrics["model"]).format_evaluation(metrics)


# ---------------------------------------------------------------------------------------------
# Predict and generate: one process


def predict_file(
    run_dir: str | Path,
    data: str,
    output: str | Path,
    overwrite: bool = False,
    ignore_columns: tuple[str, ...] | None = None,
) -> int:
    """Write the workload's predictions for every data row of ``data`` to ``output`` (an MLP's: the ignored
    columns (ids), ``predicted`` and one ``prob_<class>`` per class); return the row count."""
    refuse_a_launch("toyaccel-predict")
    output = Path(output)
    if output.exists() and not overwrite:
        raise ToyaccelError(f"{output} already exists; pass --overwrite to replace it")
    if output.is_dir():
        raise ToyaccelError(f"{output} is a directory; --output takes a file name")
    workload, saved = read_run(run_dir, "toyaccel-predict", offering("predict"))
    text, rows = workload.predict(load_run(run_dir, workload, saved), data, ignore_columns)
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(output, lambda p: Path(p).write_text(text))
    except OSError as e:
        raise ToyaccelError(f"cannot write {output}: {e.strerror or e}") from None
    return rows


def generate_from_run(
    run_dir: str | Path, prompt: str = START_CONTEXT, max_new_tokens: int = SAMPLE_TOKENS, temperature: float = 0.0,
    top_k: int | None = None, seed: int = 123, context_length: int | None = None,
) -> str:  # fmt: skip
    """The prompt and its continuation, as the book's generate (greedy when temperature is 0)."""
    refuse_a_launch("toyaccel-generate")
    workload, saved = read_run(run_dir, "toyaccel-generate", offering("generate"))
    request = GenerateRequest(prompt, max_new_tokens, temperature, top_k, seed, context_length)
    return workload.generate(load_run(run_dir, workload, saved), request)
