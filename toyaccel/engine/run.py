"""A whole training run: the Accelerator, the start-up line, the resume decision, the run folder's files,
the epochs (a ``Trainer``: toyaccel.engine.trainer) and the results.

``train(config, workload, options)`` is what ``toyaccel.fit`` runs once it has resolved the workload; the
command line and ``accelerate.notebook_launcher`` both call fit.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import gather_object

from toyaccel.engine.accelerator import build_accelerator, check_world, release
from toyaccel.engine.checkpoint import (
    finish_checkpoint,
    load_checkpoint,
    set_aside_abandoned,
    wait_for_checkpoint,
)
from toyaccel.engine.distributed import on_main_process
from toyaccel.engine.folder_lock import FolderHold
from toyaccel.engine.interrupts import StopRequests
from toyaccel.engine.orphans import stop_when_launcher_ends
from toyaccel.engine.placement import apply_tf32, gpu_description
from toyaccel.engine.plots import plot_metrics
from toyaccel.engine.reporting import say
from toyaccel.engine.resume import ResumePlan, plan_resume
from toyaccel.engine.run_dir import (
    claim_for_this_launch,
    launch_id,
    prepare_output_dir,
    save_weights,
    write_json,
)
from toyaccel.engine.trainer import Conventions, Trainer, TrainingJob
from toyaccel.engine.workload import Workload


@dataclass
class RunResult:
    """What ``fit`` returns; everything but ``history`` is also in ``results.json``. ``metrics`` holds
    the workload's own figures (accuracies, perplexities, tokens/s), readable as attributes too."""

    metrics: dict[str, Any]
    train_loss: float
    val_loss: float | None
    final_loss: float | None  # the last logged training loss (mean over processes)
    world_size: int
    global_step: int
    epochs: int
    global_batch: int
    samples_per_s: float  # training throughput of this invocation, evaluation excluded
    distributed_type: str
    output_dir: str
    history: list[dict[str, Any]] = field(default_factory=list, repr=False)  # metrics.jsonl records

    def __getattr__(self, name: str) -> Any:
        metrics = self.__dict__.get("metrics", {})
        if name in metrics:
            return metrics[name]
        raise AttributeError(f"RunResult has no attribute {name!r}")

    def to_json(self) -> dict[str, Any]:
        fields = {k: v for k, v in dataclasses.asdict(self).items() if k not in ("history", "metrics")}
        return {**self.metrics, **fields}


def train(config, workload: Workload, options: dict[str, Any], conventions: Conventions | None = None) -> RunResult:
    """Read the data, build the Accelerator and run the training (see TrainingJob for the arguments);
    raises ToyaccelError on bad input, on every process, before anything is written."""
    torch.manual_seed(config.seed)  # the book seeds before building the loaders...
    data = workload.load_data(config)
    accelerator = build_accelerator(config)
    # From here on a stop signal is only noted, until the process is ready to exit: the training
    # loop turns it into a checkpoint, and a second one cannot cut that (or the teardown) short.
    job = TrainingJob(config, workload, data, options, conventions or Conventions())
    with StopRequests() as stops, stop_when_launcher_ends(), FolderHold(config.output_dir) as hold:
        try:
            return run(Trainer(accelerator, job, stops), hold)
        finally:
            # A failed run still publishes the checkpoint it started before anything reads the folder again;
            # the error that stopped it is the one to report.
            with contextlib.suppress(Exception):
                wait_for_checkpoint()
            release(accelerator)


def run(trainer: Trainer, hold: FolderHold) -> RunResult:
    """The run: set up, resume or start, train the epochs (evaluating and checkpointing after each), save."""
    accelerator, config, job = trainer.accelerator, trainer.config, trainer.job
    check_world(accelerator)
    tf32 = apply_tf32(config.tf32, accelerator.device)
    placement = trainer.place_data()
    backend = accelerator.state.backend if accelerator.num_processes > 1 else None
    say(accelerator, describe(trainer, gpu_description(accelerator.device, tf32, placement, backend)))
    trainer.prepare()
    # Before anything in the folder is read or changed: a second run, resume or --overwrite into a
    # folder that a live run holds stops here.
    on_main_process(accelerator, hold.claim)
    hold.join()
    steps, tell = trainer.sampler.steps_per_epoch, functools.partial(say, accelerator)
    conventions = job.conventions
    plan = on_main_process(accelerator, plan_resume, config, trainer.state, steps, tell, conventions.identity)
    on_main_process(
        accelerator, prepare_output_dir, config.output_dir, config.overwrite, plan.resuming, conventions.read_run
    )
    hold.started = True
    state = trainer.state = start_or_resume(trainer, plan)
    launch_ids = gather_object([launch_id()])
    if accelerator.is_main_process:
        report_abandoned(accelerator, set_aside_abandoned(config.output_dir, state.global_step), state.global_step)
    logger = trainer.open_log(state.global_step if plan.resuming else None)
    run_files = trainer.on_first_step = RunFiles(trainer, {"log_every": trainer.log_every, "tf32": tf32}, launch_ids)
    metrics, final_loss, samples_per_s = train_epochs(trainer)
    run_files()
    result = RunResult(
        metrics={**job.workload.result_metrics(metrics, samples_per_s, config), **trainer.utilization(samples_per_s)},
        train_loss=metrics["train"]["loss"],
        val_loss=metrics["val"]["loss"] if "val" in metrics else None,
        final_loss=final_loss if final_loss is not None else last_logged_loss(logger.history),
        world_size=accelerator.num_processes,
        global_step=state.global_step,
        epochs=trainer.budget.epochs,
        global_batch=state.global_batch,
        samples_per_s=samples_per_s,
        distributed_type=accelerator.distributed_type.value,
        output_dir=config.output_dir,
        history=logger.history,
    )
    save_outputs(trainer, result)
    say(accelerator, f"saved the run in {config.output_dir}")
    return result


def train_epochs(trainer: Trainer) -> tuple[dict[str, dict[str, Any]], float | None, float]:
    """The epochs left (see toyaccel.engine.budget), each evaluated when due and checkpointed: the last
    metrics, the last logged loss and the training throughput (samples/s, evaluation excluded).

    An epoch's end is a record of kind "epoch", with the evaluation's figures where --eval-every makes it
    due. With --eval-every-steps the evaluations are records of kind "eval" instead, every K steps and at
    the end; a --max-steps budget that ends inside an epoch ends with an "eval" record too."""
    config, state, workload, budget = trainer.config, trainer.state, trainer.job.workload, trainer.budget
    final_loss, train_seconds, samples_trained, metrics = None, 0.0, 0, None
    while state.global_step < budget.total_steps:
        started, first_step, eval_seconds = time.perf_counter(), state.global_step, trainer.eval_seconds
        loss = trainer.train_epoch()
        final_loss = loss if loss is not None else final_loss
        train_seconds += time.perf_counter() - started - (trainer.eval_seconds - eval_seconds)
        samples_trained += (state.global_step - first_step) * state.global_batch
        end, metrics = state.global_step == budget.total_steps, None
        if state.step_in_epoch == budget.steps_per_epoch:
            state.finish_epoch()
            due = end or state.epoch % config.eval_every == 0
            by_epoch = due and not budget.eval_every_steps
            metrics = trainer.score(trainer.model) if by_epoch else None
            trainer.check_finite(metrics)
            sample = workload.after_epoch(trainer.accelerator, trainer.model, config, trainer.job.data)
            trainer.logger.log({**epoch_record(state, metrics or {}, workload), **sample})
        if end and metrics is None:
            metrics = trainer.evaluate("eval")
        trainer.checkpointer.save(state)
    finish_checkpoint(trainer.accelerator)
    if metrics is None:  # resumed after the last epoch: nothing was evaluated in this invocation
        metrics = trainer.score(trainer.model)
    return metrics, final_loss, samples_trained / train_seconds if train_seconds else 0.0


class RunFiles:
    """What makes the folder hold this run, written once its first optimizer step is done (or, resumed
    after the last one, before its outputs): a run that fails before (an overflow, out of memory, a kill)
    leaves nothing a later run into the folder trips on, and no cleanup that could fail itself. ``used``:
    the options resolved at run time (--log-every 0 is "auto", TF32 is off on a CPU)."""

    def __init__(self, trainer: Trainer, used: dict[str, Any], launch_ids: list[str]):
        self.trainer, self.used, self.launch_ids, self.written = trainer, used, launch_ids, False

    def __call__(self) -> None:
        if self.written:
            return
        self.written = True
        trainer = self.trainer
        accelerator, config, job = trainer.accelerator, trainer.config, trainer.job
        if accelerator.is_main_process:  # config.json first: it is what marks a folder as a toyaccel run's
            write_json(Path(config.output_dir) / "config.json", run_description(trainer, self.used))
            if config.log_with:
                accelerator.init_trackers("toyaccel", config={k: str(v) for k, v in config.to_dict().items()})
            job.workload.save_extras(config.output_dir, job.data)
            claim_for_this_launch(config.output_dir, self.launch_ids)
            trainer.logger.start_file()


def epoch_record(state, metrics: dict[str, dict[str, Any]], workload: Workload) -> dict[str, Any]:
    return {"kind": "epoch", "epoch": state.epoch, "step": state.global_step, **workload.epoch_fields(metrics)}


def last_logged_loss(history: list[dict[str, Any]]) -> float | None:
    losses = [r["loss"] for r in history if r.get("kind") == "step"]
    return losses[-1] if losses else None


def start_or_resume(trainer: Trainer, plan: ResumePlan):
    if plan.checkpoint is None:
        return trainer.state
    accelerator, budget = trainer.accelerator, trainer.budget
    path = Path(plan.checkpoint)
    state = load_checkpoint(accelerator, path, plan.trainer_state(), expected=trainer.state)
    unfinished = state.global_step < budget.total_steps
    where = f"epoch {state.epoch + 1}/{budget.epochs}" if unfinished else "the end of training"
    say(accelerator, f"resumed from {path} at {where}, step {state.global_step}")
    return state


def report_abandoned(accelerator, aside: Path | None, start_step: int) -> None:
    if aside is not None:
        say(
            accelerator,
            f"moved the checkpoints after step {start_step}, from the run this one replaces, to {aside} "
            "(never resumed from; delete them when you no longer need them)",
        )


def describe(trainer: Trainer, device_details: str = "") -> str:
    """One line, printed once, that says what this run is: where it runs (on a GPU: TF32, where the data
    lives), the data as read, where its files go and the options that apply."""
    accelerator, config, job = trainer.accelerator, trainer.config, trainer.job
    said = {"output_dir", *job.conventions.said}
    if accelerator.device.type != "cuda":  # GPU settings: device_details says what they did on a GPU
        said |= {"tf32", "data_placement"}
    shown = {**job.options, **({} if config.log_every else {"log_every": "auto"})}  # 0 reads as "never"
    options = " ".join(f"{k}={v}" for k, v in shown.items() if k not in said)
    return (
        f"toyaccel: {accelerator.num_processes} process(es), {accelerator.distributed_type.value}, "
        f"device {accelerator.device}, mixed precision {accelerator.mixed_precision}{device_details} "
        f"| {job.workload.describe_data(job.data)} | output {config.output_dir} | {options}"
    )


def run_description(trainer: Trainer, used: dict[str, Any]) -> dict[str, Any]:
    """config.json: enough to rebuild the model (its input scaling and class names, or its tokenizer)
    without toyaccel's pickles; ``config`` holds the options that apply to this run, data paths absolute (a
    run evaluates from any directory), and where an option was resolved at run time the value ``used``."""
    accelerator, job = trainer.accelerator, trainer.job
    return {
        "config": {**job.conventions.recorded(job.options), **used},
        **job.workload.run_description(job.config, job.data),
        "world_size": accelerator.num_processes,
        "distributed_type": accelerator.distributed_type.value,
        "mixed_precision": accelerator.mixed_precision,
    }


def save_outputs(trainer: Trainer, result: RunResult) -> None:
    accelerator, config = trainer.accelerator, trainer.config
    # Every process takes part: under FSDP the full state dict is gathered from all shards.
    state_dict = accelerator.get_state_dict(trainer.model)
    # get_state_dict keeps torch.compile's wrapper, whose keys carry "_orig_mod."; the saved file
    # must have the plain model's keys whatever --compile was.
    state_dict = {k.replace("_orig_mod.", ""): v for k, v in state_dict.items()}
    if accelerator.is_main_process:
        out = Path(config.output_dir)
        save_weights(state_dict, out / "model.safetensors")
        write_json(out / "results.json", result.to_json())
        if config.plot and not plot_metrics(result.history, out / "loss.png"):
            say(accelerator, "matplotlib is not installed: skipped loss.png (pip install 'toyaccel[plots]')")
    accelerator.wait_for_everyone()
