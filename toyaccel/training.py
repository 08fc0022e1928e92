"""Training with Accelerate: one loop for CPU, one GPU, and DDP over many processes or machines.

``fit(config)`` is the whole program; the command line and ``accelerate.notebook_launcher`` both
call it. Nothing in it knows how many processes there are: the Accelerator places the model,
optimizer and loaders, shards the data and averages the gradients.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import gc
import hashlib
import math
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import DistributedType, broadcast_object_list, gather_object

from toyaccel.checkpoint import (
    ResumePlan,
    TrainerState,
    checkpoint_dirs,
    finish_checkpoint,
    load_checkpoint,
    plan_resume,
    save_checkpoint,
    set_aside_abandoned,
    wait_for_checkpoint,
)
from toyaccel.config import TrainConfig, applicable_options, with_absolute_paths
from toyaccel.data import EpochBatchSampler, build_train_loader, draw_epoch_seed
from toyaccel.device import DataPlacement, apply_tf32, choose_placement, gpu_description
from toyaccel.errors import Interrupted, ToyaccelError
from toyaccel.faults import faults_armed, maybe_drift_rng, maybe_inject_fault, maybe_raise, maybe_stall
from toyaccel.folder_lock import FolderHold
from toyaccel.interrupts import StopRequests
from toyaccel.launch import build_accelerator, check_world
from toyaccel.metrics import MetricsLogger, say
from toyaccel.orphans import stop_when_launcher_ends
from toyaccel.outputs import (
    claim_for_this_launch,
    default_output_dir,
    launch_id,
    prepare_output_dir,
    restart_of_owning_launch,
    save_weights,
    write_json,
)
from toyaccel.plots import plot_metrics
from toyaccel.workloads import get_workload


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


def fit(config: TrainConfig | None = None, **overrides: Any) -> RunResult:
    """Train as ``toyaccel-train`` does and return the results; raises ToyaccelError on bad input."""
    config = config or TrainConfig()
    if overrides:
        config = config.replace(**overrides)
    if config.output_dir is None:
        # Chosen before the process group forms: no process creates it before every process has chosen.
        config = config.replace(output_dir=default_output_dir(config.data, resuming=config.resume is not None))
    torch.manual_seed(config.seed)  # the book seeds before building the loaders...
    # Bad input fails here, on every process, before anything is written.
    data = get_workload(config.model).load_data(config)
    accelerator = build_accelerator(config)
    # From here on a stop signal is only noted, until the process is ready to exit: the training
    # loop turns it into a checkpoint, and a second one cannot cut that (or the teardown) short.
    with StopRequests() as stops, stop_when_launcher_ends(), FolderHold(config.output_dir) as hold:
        try:
            return train(accelerator, config, data, stops, hold)
        finally:
            # A failed run still publishes the checkpoint it started before anything reads the folder again;
            # the error that stopped it is the one to report.
            with contextlib.suppress(Exception):
                wait_for_checkpoint()
            release(accelerator)


def train(accelerator: Accelerator, config: TrainConfig, data, stops: StopRequests, hold: FolderHold) -> RunResult:
    workload = get_workload(config.model)
    check_world(accelerator)
    tf32 = apply_tf32(config.tf32, accelerator.device)
    placement = placement_for(accelerator, config, data)
    backend = accelerator.state.backend if accelerator.num_processes > 1 else None
    gpu = gpu_description(accelerator.device, tf32, placement, backend)
    say(accelerator, describe(config, accelerator, data, gpu))
    run = set_up_training(accelerator, config, data, placement)
    # Before anything in the folder is read or changed: a second run, resume or --overwrite into a
    # folder that a live run holds stops here.
    on_main_process(accelerator, hold.claim)
    hold.join()
    plan = on_main_process(
        accelerator, decide_resume, config, run.state, run.sampler.steps_per_epoch, functools.partial(say, accelerator)
    )
    on_main_process(accelerator, prepare_output_dir, config.output_dir, config.overwrite, plan.resuming)
    hold.started = True
    model, optimizer, train_loader, sampler, score = run.model, run.optimizer, run.train_loader, run.sampler, run.score
    state = start_or_resume(accelerator, config, plan, run.state)
    launch_ids = gather_object([launch_id()])
    if accelerator.is_main_process:
        report_abandoned(accelerator, set_aside_abandoned(config.output_dir, state.global_step), state.global_step)
    resume_step = state.global_step if plan.resuming else None
    logger = MetricsLogger(accelerator, config.output_dir, config.epochs, config.progress, resume_step)
    log_every = config.log_every or max(1, sampler.steps_per_epoch // 10)
    used = {"log_every": log_every, "tf32": tf32}
    files_written = False

    def write_run_files() -> None:
        """What makes the folder hold this run, written once its first optimizer step is done (or, resumed
        after the last one, before its outputs): a run that fails before (an overflow, out of memory, a
        kill) leaves nothing a later run into the folder trips on, and no cleanup that could fail itself."""
        nonlocal files_written
        if files_written:
            return
        files_written = True
        if accelerator.is_main_process:  # config.json first: it is what marks a folder as a toyaccel run's
            write_json(Path(config.output_dir) / "config.json", run_description(config, data, accelerator, used))
            if config.log_with:
                accelerator.init_trackers("toyaccel", config={k: str(v) for k, v in config.to_dict().items()})
            workload.save_extras(config.output_dir, data)
            claim_for_this_launch(config.output_dir, launch_ids)
            logger.start_file()

    final_loss, train_seconds, samples_trained = None, 0.0, 0
    metrics = None

    for _ in range(state.epoch, config.epochs):
        started, first_step = time.perf_counter(), state.global_step
        loss = train_one_epoch(
            accelerator, model, optimizer, train_loader, sampler, state, config, logger, log_every, stops,
            write_run_files,
        )  # fmt: skip
        final_loss = loss if loss is not None else final_loss
        train_seconds += time.perf_counter() - started
        samples_trained += (state.global_step - first_step) * state.global_batch
        state.finish_epoch()
        due = state.epoch % config.eval_every == 0 or state.epoch == config.epochs
        metrics = score(model) if due else None
        check_finite_losses(config, metrics, state)
        sample = workload.after_epoch(accelerator, model, config, data)
        logger.log({**epoch_record(state, metrics or {}, workload), **sample})
        save_checkpoint(accelerator, config.output_dir, state, config.keep_last)
    finish_checkpoint(accelerator)

    if metrics is None:  # resumed after the last epoch: nothing was evaluated in this invocation
        metrics = score(model)
    write_run_files()
    samples_per_s = samples_trained / train_seconds if train_seconds else 0.0
    result = RunResult(
        metrics=workload.result_metrics(metrics, samples_per_s, config),
        train_loss=metrics["train"]["loss"],
        val_loss=metrics["val"]["loss"] if "val" in metrics else None,
        final_loss=final_loss if final_loss is not None else last_logged_loss(logger.history),
        world_size=accelerator.num_processes,
        global_step=state.global_step,
        epochs=config.epochs,
        global_batch=state.global_batch,
        samples_per_s=samples_per_s,
        distributed_type=accelerator.distributed_type.value,
        output_dir=config.output_dir,
        history=logger.history,
    )
    save_outputs(accelerator, model, config, result)
    say(accelerator, f"saved the run in {config.output_dir}")
    return result


@dataclass
class TrainingSetUp:
    """What the training loop runs on, prepared by the Accelerator: ``train()`` and the benchmark's
    loops (scripts/benchmark.py) get theirs from ``set_up_training``, so they measure the same set-up."""

    model: torch.nn.Module
    optimizer: Any  # accelerate's AcceleratedOptimizer
    train_loader: Any  # TensorBatches, or a prepared DataLoader with worker processes
    sampler: EpochBatchSampler  # each epoch's order, and where a resumed epoch starts
    placement: DataPlacement  # where the training and evaluation tensors live
    score: Callable[[torch.nn.Module], dict[str, dict[str, Any]]]  # the workload's epoch-end evaluation
    state: TrainerState  # step 0 of this run: what a checkpoint must match to be resumed


def set_up_training(accelerator: Accelerator, config: TrainConfig, data, placement=None) -> TrainingSetUp:
    """Place the data, build the training loader, the evaluator, the model (seeded) and its optimizer,
    and prepare them. ``placement`` defaults to what --data-placement chooses for ``data``."""
    workload = get_workload(config.model)
    placement = placement or placement_for(accelerator, config, data)
    train_set = placement.place(data.train)
    train_loader = build_train_loader(train_set, config, accelerator.num_processes, placement.pin_memory)
    # Taken before prepare(): with worker processes prepare() wraps the DataLoader, and on several
    # processes the wrapper's batch sampler is accelerate's shard of this one.
    sampler = train_loader.batch_sampler
    state = fresh_state(accelerator, config, data, sampler.global_batch)
    score = workload.evaluator(accelerator, config, data, placement)
    torch.manual_seed(config.seed)  # ...and again before building the model (fit seeds before the data)
    model = workload.build_model(config, data)
    optimizer = build_optimizer(config, model)
    model, optimizer, train_loader = accelerator.prepare(model, optimizer, train_loader)
    return TrainingSetUp(model, optimizer, train_loader, sampler, placement, score, state)


def placement_for(accelerator: Accelerator, config: TrainConfig, data):
    """Where --data-placement keeps the training and validation tensors (toyaccel.device)."""
    return choose_placement([data.train, data.val], accelerator.device, config.num_workers, config.data_placement)


FOLD_LOSSES = 1024


def train_one_epoch(
    accelerator, model, optimizer, loader, sampler, state, config, logger, log_every, stops=None, after_first_step=None
) -> float | None:
    """Train on this epoch's batches (the rest of them when resuming); return the last logged loss.
    On a stop signal (``stops``), checkpoint after the step all processes agree on and raise Interrupted.
    ``after_first_step`` is called once this call's first optimizer step is done."""
    stops = stops or StopRequests()
    if state.epoch_seed is None:
        maybe_drift_rng(accelerator.process_index)
        ahead = state.next_epoch_seed
        state.epoch_seed, state.next_epoch_seed = (ahead if ahead is not None else draw_epoch_seed()), None
    # The next epoch's seed is drawn now, so the sampler can shuffle its order while this epoch trains
    # (on a GPU the shuffle would otherwise leave the device idle: ~16 ns a sample on the host). Nothing
    # between here and the next epoch draws from the global RNG, so the seeds are the book's.
    if state.next_epoch_seed is None and state.epoch + 1 < config.epochs:
        state.next_epoch_seed = draw_epoch_seed()
    check_processes_agree(accelerator, state)
    sampler.start_epoch(state.epoch_seed, state.samples_in_epoch, state.next_epoch_seed)
    steps_per_epoch = sampler.steps_per_epoch
    total_steps = config.epochs * steps_per_epoch
    stepper = optimizer_to_step(accelerator, optimizer)
    # accumulate() and accelerator.backward() cost ~20 us a step each (15% of the book MLP's step at
    # batch 256). With one micro-step per optimizer step and a directly stepped optimizer (no scaler,
    # no XLA) they only count micro-steps and divide the loss by 1, so the loop skips them: same bits.
    plain = stepper is not optimizer and accelerator.gradient_accumulation_steps == 1
    plain = plain and accelerator.distributed_type not in (DistributedType.DEEPSPEED, DistributedType.MEGATRON_LM)
    micro_step = (lambda _model: contextlib.nullcontext()) if plain else accelerator.accumulate
    backward = stepper.backward if plain else accelerator.backward
    workload = get_workload(config.model)
    own_rng = own_random_stream if workload.uses_dropout(config) else None
    # Looked up once: reading the environment every step costs ~1% of a small model's step.
    faults = faults_armed()
    logger.start_epoch(state.epoch, steps_per_epoch, state.step_in_epoch)
    model.train()
    # The window's losses stay on the device, unsummed: appending costs nothing, where an in-place add
    # per step was a kernel launch (~2% of the book MLP's step) and summing them is one at log time.
    window_losses: list[torch.Tensor] = []
    window_micro_steps, window_start = 0, time.perf_counter()
    last_loss, micro_in_step = None, 0
    for inputs, targets in loader:
        if faults:
            maybe_raise(state.global_step + 1, accelerator.process_index)
        with micro_step(model):
            if own_rng is None:
                loss = workload.loss(model(inputs), targets)
            else:
                with own_rng(config.seed, accelerator.process_index, state.global_step, micro_in_step):
                    loss = workload.loss(model(inputs), targets)
            micro_in_step += 1
            backward(loss)
            window_losses.append(loss.detach())
            window_micro_steps += 1
            if len(window_losses) == FOLD_LOSSES:  # a long window holds one tensor per FOLD_LOSSES steps
                window_losses = [torch.stack(window_losses).sum()]
            if not accelerator.sync_gradients:
                continue
            if config.max_grad_norm:
                accelerator.clip_grad_norm_(model.parameters(), config.max_grad_norm)
            lr = learning_rate(config, state.global_step, total_steps)
            for group in stepper.param_groups:
                group["lr"] = lr
            stepper.step()
            stepper.zero_grad(set_to_none=True)
        micro_in_step = 0
        state.finish_step()
        if after_first_step is not None:
            after_first_step()
            after_first_step = None
        logger.advance()
        if faults:
            # The checkpoint being published lands before a fault fires: a crash test knows what is on disk.
            wait_for_checkpoint()
            maybe_stall(state.global_step, accelerator.process_index, lambda: stops.signum)
        stop_signal = stops.agreed(accelerator)
        # The last step of an epoch is checkpointed after the epoch's evaluation instead.
        checkpoint_due = config.checkpoint_every and state.global_step % config.checkpoint_every == 0
        # A log window must not straddle a checkpoint: a resumed run has lost the losses before it.
        window_ends = state.step_in_epoch % log_every == 0 or state.step_in_epoch == steps_per_epoch
        if window_ends or checkpoint_due or stop_signal:
            # The mean over processes and over the steps since the last log line.
            last_loss = accelerator.reduce(torch.stack(window_losses).sum(), "mean").item() / window_micro_steps
            if not math.isfinite(last_loss):  # read here, where it costs no extra wait on the device
                first = state.global_step - window_micro_steps // accelerator.gradient_accumulation_steps + 1
                raise diverged(config, last_loss, f"in steps {first}-{state.global_step}")
            seconds = time.perf_counter() - window_start
            samples_per_s = window_micro_steps * config.batch_size * accelerator.num_processes / seconds
            logger.log({
                "kind": "step", "epoch": state.epoch + 1, "step": state.global_step, "loss": last_loss, "lr": lr,
                "samples_per_s": samples_per_s, **workload.throughput(samples_per_s, config),
            })  # fmt: skip
            window_losses.clear()
            window_micro_steps, window_start = 0, time.perf_counter()
        if faults:
            maybe_inject_fault("step", state.global_step, accelerator.process_index)
        if stop_signal or (checkpoint_due and state.step_in_epoch < steps_per_epoch):
            path = save_checkpoint(accelerator, config.output_dir, state, config.keep_last)
            window_start = time.perf_counter()
        if stop_signal:
            finish_checkpoint(accelerator)
            stopped = interrupted(accelerator, stop_signal, path, state, config.epochs)
            # No process exits before the checkpoint is published and said: mpirun kills the others
            # ~0.25 s after the first one exits.
            accelerator.wait_for_everyone()
            raise stopped
    logger.end_epoch()
    return last_loss




def diverged(config: TrainConfig, loss: float, where: str) -> ToyaccelError:
    """The one line of a run whose loss stopped being a number: raised before the step is logged or
    checkpointed, so the checkpoints on disk all hold finite weights."""
    remedy = f"lower --lr (now {config.lr:g})"
    if config.model == "gpt":
        remedy += " or clip gradients with --max-grad-norm (e.g. 1.0)" if not config.max_grad_norm else (
            f" or --max-grad-norm (now {config.max_grad_norm:g})")  # fmt: skip
    wait_for_checkpoint()
    kept = checkpoint_dirs(config.output_dir)
    saved = f"the newest checkpoint is {kept[0]}" if kept else "no checkpoint was written"
    return ToyaccelError(
        f"the training loss became {loss} {where}: training diverged; {remedy} ({saved})", every_process=True
    )


def check_finite_losses(config: TrainConfig, metrics: dict[str, dict[str, Any]] | None, state: TrainerState) -> None:
    """Weights that an epoch's last steps made non-finite show in its evaluation, before its checkpoint."""
    for split, figures in (metrics or {}).items():
        loss = figures.get("loss")
        if loss is not None and not math.isfinite(loss):
            raise diverged(config, loss, f"on the {split} data after epoch {state.epoch} (step {state.global_step})")


def epoch_record(state: TrainerState, metrics: dict[str, dict[str, Any]], workload) -> dict[str, Any]:
    return {"kind": "epoch", "epoch": state.epoch, "step": state.global_step, **workload.epoch_fields(metrics)}


def last_logged_loss(history: list[dict[str, Any]]) -> float | None:
    losses = [r["loss"] for r in history if r.get("kind") == "step"]
    return losses[-1] if losses else None


def learning_rate(config: TrainConfig, step: int, total_steps: int) -> float:
    """The rate for optimizer step ``step`` (0-based). A function of the global step alone, so it is
    the same on any number of processes (accelerate's prepared schedulers step once per process)."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, total_steps - config.warmup_steps)
    if config.lr_schedule == "cosine":
        return config.lr * 0.5 * (1.0 + math.cos(math.pi * progress))
    if config.lr_schedule == "linear":
        return config.lr * (1.0 - progress)
    return config.lr


def build_optimizer(config: TrainConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    """The book's optimizers: SGD (Appendix A) or AdamW with weight decay on every parameter (chapter 5)."""
    if config.optimizer == "adamw":
        # fused: one kernel for all parameters (the book's bonus "fused AdamW"), same math; on CPU too,
        # where it saves ~8% of a small GPT's step. Not with fp16's gradient scaler.
        fused = config.mixed_precision != "fp16"
        decay = config.weight_decay
        return torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=decay, fused=fused or None)
    if config.weight_decay:
        return torch.optim.SGD(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.SGD(model.parameters(), lr=config.lr)


@contextlib.contextmanager
def own_random_stream(seed: int, process_index: int, global_step: int, micro_step: int):
    """Dropout masks from a stream of this process's own, leaving the shared RNG as it was.

    Every process holds the same global RNG state on purpose: it draws each epoch's data order. Dropout
    drawing from it would give every process the same masks, and would shift the data order by an
    amount that depends on the batch each process holds (so on the world size). Instead each forward
    pass is seeded from (seed, process, step, micro-step): reproducible, exact on resume (no state to
    save), different on every process.
    """
    cpu_state = torch.get_rng_state()
    cuda_states = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    key = hashlib.blake2b(f"{seed}/{process_index}/{global_step}/{micro_step}".encode(), digest_size=8).digest()
    torch.manual_seed(int.from_bytes(key, "little") >> 1)
    try:
        yield
    finally:
        torch.set_rng_state(cpu_state)
        if cuda_states is not None:
            torch.cuda.set_rng_state_all(cuda_states)


def optimizer_to_step(accelerator: Accelerator, optimizer):
    """What the loop calls ``step``/``zero_grad`` (and, with one micro-step per step, ``backward``) on.

    AcceleratedOptimizer costs ~50 us a step in package look-ups (shared/notes/perf-findings.md),
    a third of a small model's step. Its other jobs are the fp16 gradient scaler, XLA, and skipping
    steps while accumulating; we step only when ``sync_gradients`` is set, so outside XLA stepping
    the wrapped optimizer directly, through the scaler under fp16, is exactly equivalent.
    """
    if accelerator.distributed_type == DistributedType.XLA:
        return optimizer
    return DirectStepper(optimizer.optimizer, accelerator.scaler)


class DirectStepper:
    """The optimizer, stepped as AcceleratedOptimizer steps it when gradients are in sync: through
    the GradScaler under fp16 (its one host synchronisation per step, the inf check, is the only one
    on that path), plainly otherwise."""

    def __init__(self, optimizer: torch.optim.Optimizer, scaler=None):
        self.optimizer, self.scaler = optimizer, scaler

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.optimizer.param_groups

    def backward(self, loss: torch.Tensor) -> None:
        """accelerator.backward with nothing to accumulate: scale the loss under fp16."""
        (loss if self.scaler is None else self.scaler.scale(loss)).backward()

    def step(self) -> None:
        if self.scaler is None:
            self.optimizer.step()
        else:
            self.scaler.step(self.optimizer)
            self.scaler.update()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)


# ---------------------------------------------------------------------------------------------
# Setting up, resuming, finishing


def on_main_process(accelerator: Accelerator, fn, *args):
    """Run ``fn`` on the main process only and return its result on every process; its error is
    raised on every process, so none waits forever."""
    message, result = None, None
    if accelerator.is_main_process:
        try:
            result = fn(*args)
        except ToyaccelError as e:
            message = str(e)
    message, result = broadcast_object_list([message, result])
    if message:
        raise ToyaccelError(message, every_process=True)
    return result


def fresh_state(accelerator, config: TrainConfig, data, global_batch: int) -> TrainerState:
    """This run's state at step 0: what a checkpoint must match to be resumed."""
    return TrainerState(
        global_batch=global_batch,
        world_size=accelerator.num_processes,
        training=config.training_dict(),
        model_shape=get_workload(config.model).model_shape(config, data),
        data_fingerprint=data.fingerprint(),
    )


def decide_resume(config: TrainConfig, fresh: TrainerState, steps_per_epoch: int, say) -> ResumePlan:
    """On the main process only (see on_main_process): every process then follows the same plan."""
    restarted = config.resume is None and restart_of_owning_launch(config.output_dir)
    return plan_resume(config.output_dir, config.resume, fresh, restarted, say, steps_per_epoch)


def start_or_resume(accelerator, config: TrainConfig, plan: ResumePlan, fresh: TrainerState) -> TrainerState:
    if plan.checkpoint is None:
        return fresh
    path = Path(plan.checkpoint)
    state = load_checkpoint(accelerator, path, plan.trainer_state(), expected=fresh)
    where = f"epoch {state.epoch + 1}/{config.epochs}" if state.epoch < config.epochs else "the end of training"
    say(accelerator, f"resumed from {path} at {where}, step {state.global_step}")
    return state


def report_abandoned(accelerator, aside: Path | None, start_step: int) -> None:
    if aside is not None:
        say(
            accelerator,
            f"moved the checkpoints after step {start_step}, from the run this one replaces, to {aside} "
            "(never resumed from; delete them when you no longer need them)",
        )


def check_processes_agree(accelerator, state: TrainerState) -> None:
    """Stop every process, in one line, if they do not all stand at the same point of the same run:
    a process that resumed elsewhere, read other data, or whose random stream drifted (the data
    order is drawn from it) would otherwise train silently wrong, or hang in a collective."""
    if accelerator.num_processes == 1:
        return
    mine = {"global step": state.global_step, "epoch seed": state.epoch_seed}
    mine["data fingerprint"] = state.data_fingerprint
    everyone = gather_object([mine])
    for rank, theirs in enumerate(everyone):
        for name, value in theirs.items():
            if value != everyone[0][name]:
                raise ToyaccelError(
                    f"rank {rank} disagrees with rank 0 on the {name} at the start of epoch {state.epoch + 1} "
                    f"({value} against {everyone[0][name]}): the processes are not running the same training; "
                    "check that every machine sees the same --output-dir and data",
                    every_process=True,
                )


def interrupted(accelerator, signum: int, path: Path, state: TrainerState, epochs: int) -> Interrupted:
    """The one line a stopped run prints (on the main process) and the exception that ends it."""
    name = signal.Signals(signum).name
    message = (
        f"interrupted by {name}: saved checkpoint {path} (epoch {state.epoch + 1}/{epochs}, step {state.global_step}); "
        "to continue, run the same command with --resume latest"
    )
    say(accelerator, message)
    return Interrupted(signum, message)


def describe(config: TrainConfig, accelerator: Accelerator, data, device_details: str = "") -> str:
    """One line, printed once, that says what this run is: where it runs (on a GPU: TF32, where the data
    lives), the data as read, where its files go and the options that apply."""
    said = {"data", "val_data", "val_fraction", "output_dir", "num_classes", "num_samples", "num_features"}
    if accelerator.device.type != "cuda":  # GPU settings: device_details says what they did on a GPU
        said |= {"tf32", "data_placement"}
    shown = {**applicable_options(config), **({} if config.log_every else {"log_every": "auto"})}  # 0 reads as "never"
    options = " ".join(f"{k}={v}" for k, v in shown.items() if k not in said)
    return (
        f"toyaccel: {accelerator.num_processes} process(es), {accelerator.distributed_type.value}, "
        f"device {accelerator.device}, mixed precision {accelerator.mixed_precision}{device_details} "
        f"| {get_workload(config.model).describe_data(data)} | output {config.output_dir} | {options}"
    )


def run_description(config: TrainConfig, data, accelerator: Accelerator, used: dict[str, Any]) -> dict[str, Any]:
    """config.json: enough to rebuild the model (its input scaling and class names, or its tokenizer)
    without toyaccel's pickles; ``config`` holds the options that apply to this run, data paths absolute (a
    run evaluates from any directory), and where an option was resolved at run time (--log-every 0 is
    "auto", TF32 is off on a CPU) the value ``used``."""
    workload = get_workload(config.model)
    return {
        "config": {**with_absolute_paths(applicable_options(config)), **used},
        **workload.run_description(config, data),
        "world_size": accelerator.num_processes,
        "distributed_type": accelerator.distributed_type.value,
        "mixed_precision": accelerator.mixed_precision,
    }


def save_outputs(accelerator: Accelerator, model, config: TrainConfig, result: RunResult) -> None:
    # Every process takes part: under FSDP the full state dict is gathered from all shards.
    state_dict = accelerator.get_state_dict(model)
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


def on_accelerator(config: TrainConfig, job, *args):
    """``job(accelerator, *args)`` on this launch's Accelerator, refused as training refuses a launch that
    would not run as asked (check_world), and released afterwards whatever happens. What the job
    prepares is gone when it returns, before release() ends the process group."""
    accelerator = build_accelerator(config)
    try:
        check_world(accelerator)
        return job(accelerator, *args)
    finally:
        release(accelerator)


def release(accelerator: Accelerator) -> None:
    """Drop everything prepared before the process group goes: gloo runs that exit with the DDP model
    alive abort one rank now and then (SIGABRT after all work is done). Resetting accelerate's
    shared state lets a notebook call ``fit`` again with other settings."""
    accelerator.free_memory()
    gc.collect()
    accelerator.end_training()
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
