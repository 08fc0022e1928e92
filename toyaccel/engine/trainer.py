"""The training loop: one for CPU, one GPU, and DDP over many processes or machines.

A ``Trainer`` holds a run's state in one place: the prepared model, optimizer and batches, where training
stands (``TrainerState``), the evaluator, the checkpointer and the log. Nothing in it knows how many
processes there are or which model it trains: the Accelerator places the model, optimizer and batches,
shards the data and averages the gradients; the workload (toyaccel.engine.workload) gives the rest.
"""

from __future__ import annotations

import contextlib
import math
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from accelerate.utils import DistributedType

from toyaccel.engine.batches import build_train_loader, draw_epoch_seed
from toyaccel.engine.budget import Budget
from toyaccel.engine.checkpoint import (
    Checkpointer,
    TrainerState,
    checkpoint_dirs,
    finish_checkpoint,
    wait_for_checkpoint,
)
from toyaccel.engine.distributed import check_processes_agree
from toyaccel.engine.faults import fault_hooks
from toyaccel.engine.interrupts import StopRequests
from toyaccel.engine.optim import build_optimizer, learning_rate, optimizer_to_step, own_random_stream
from toyaccel.engine.placement import choose_placement, utilization, world_bf16_peak
from toyaccel.engine.reporting import MetricsLogger, say
from toyaccel.engine.workload import Workload
from toyaccel.errors import Interrupted, ToyaccelError

FOLD_LOSSES = 1024


@dataclass
class TrainingJob:
    """What one run trains: its options (``config``: the engine reads the run and optimizer options), the
    workload, the data as the workload read it, and the options that take part in the run (config.json's
    and the start-up line's)."""

    config: Any
    workload: Workload
    data: Any
    options: dict[str, Any]
    conventions: Conventions = field(default_factory=lambda: Conventions())


@dataclass
class Conventions:
    """What the layer above the engine knows of the run's options and saved runs, and tells it."""

    said: frozenset[str] = frozenset()  # options the data's description already says (the start-up line)
    clipping: bool = False  # a diverging loss suggests --max-grad-norm too
    identity: Callable[[dict], Any] = dict  # what of the training options makes two runs the same run
    read_run: Callable[[str], Any] | None = None  # reads a folder's config.json as a run's (ToyaccelError if not)
    recorded: Callable[[dict], dict] = dict  # the options as config.json records them (data paths absolute)


class Trainer:
    """A run's training: ``prepare()`` sets it up, ``train_epoch()`` trains one epoch, ``fit()``
    (toyaccel.engine.run) is the whole run. ``stops``: the stop signals this process has noted."""

    def __init__(self, accelerator, job: TrainingJob, stops: StopRequests | None = None):
        self.accelerator, self.job, self.config = accelerator, job, job.config
        self.stops = stops or StopRequests()
        # Fault injection for crash tests: None unless TOYACCEL_FAULT is set, and then nothing is called.
        self.hooks = fault_hooks(accelerator.process_index, wait_for_checkpoint)
        self.checkpointer = Checkpointer(accelerator, self.config.output_dir, self.config.keep_last, self.hooks)
        self.placement = None
        self.logger: MetricsLogger | None = None
        self.on_first_step: Callable[[], None] | None = None  # called once this run's first step is done
        self.peak_flops = world_bf16_peak(accelerator)  # what the MFU is taken against (None: claim none)
        self.sample_flops = job.workload.flops_per_sample(self.config)

    def utilization(self, samples_per_s: float) -> dict[str, float]:
        """The MFU, where both the workload's FLOPs per sample and the device's peak are known."""
        return utilization(samples_per_s, self.sample_flops, self.peak_flops)

    def place_data(self):
        """Where --data-placement keeps the training and validation tensors (toyaccel.engine.placement)."""
        config, data = self.config, self.job.data
        self.placement = choose_placement(
            [data.train, data.val], self.accelerator.device, config.num_workers, config.data_placement
        )
        return self.placement

    def prepare(self) -> None:
        """Place the data, build the training batches, the evaluator, the model (seeded) and its optimizer,
        and prepare them; ``state`` is step 0 of this run: what a checkpoint must match to be resumed."""
        accelerator, config, workload, data = self.accelerator, self.config, self.job.workload, self.job.data
        placement = self.placement or self.place_data()
        train_loader = build_train_loader(placement.place(data.train), config, accelerator, placement.pin_memory)
        # Taken before prepare(): with worker processes prepare() wraps the DataLoader, and on several
        # processes the wrapper's batch sampler is accelerate's shard of this one.
        self.sampler = train_loader.batch_sampler
        self.budget = Budget.of(config, self.sampler.steps_per_epoch)
        self.eval_seconds = 0.0  # spent in evaluations inside epochs: not training time
        self.state = TrainerState(
            global_batch=self.sampler.global_batch,
            world_size=accelerator.num_processes,
            training=config.training_dict(),
            model_shape=workload.model_shape(config, data),
            data_fingerprint=data.fingerprint(),
        )
        self.score = workload.evaluator(accelerator, config, data, placement)
        torch.manual_seed(config.seed)  # ...and again before building the model (fit seeds before the data)
        model = workload.build_model(config, data)
        optimizer = build_optimizer(config, model)
        self.model, self.optimizer, self.loader = accelerator.prepare(model, optimizer, train_loader)
        self.window = LossWindow()
        self.step = Step(self)

    def use_model(self, model: torch.nn.Module) -> None:
        """Train ``model`` (the prepared one wrapped, as torch.compile wraps it) from the next step on."""
        self.model = model
        self.step = Step(self)

    def open_log(self, resume_step: int | None = None) -> MetricsLogger:
        """metrics.jsonl and the log lines, continued after ``resume_step`` when resuming."""
        config = self.config
        self.logger = MetricsLogger(self.accelerator, config.output_dir, self.budget, config.progress, resume_step)
        self.log_every = config.log_every or max(1, self.sampler.steps_per_epoch // 10)
        return self.logger

    def start_epoch(self) -> None:
        state, hooks = self.state, self.hooks
        if state.epoch_seed is None:
            if hooks is not None:
                hooks.before_epoch()
            ahead = state.next_epoch_seed
            state.epoch_seed, state.next_epoch_seed = (ahead if ahead is not None else draw_epoch_seed()), None
        # The next epoch's seed is drawn now, so the sampler can shuffle its order while this epoch trains
        # (on a GPU the shuffle would otherwise leave the device idle: ~16 ns a sample on the host). Nothing
        # between here and the next epoch draws from the global RNG, so the seeds are the book's.
        if state.next_epoch_seed is None and state.epoch + 1 < self.budget.epochs:
            state.next_epoch_seed = draw_epoch_seed()
        check_processes_agree(self.accelerator, state)
        self.sampler.start_epoch(state.epoch_seed, state.samples_in_epoch, state.next_epoch_seed)

    def train_epoch(self) -> float | None:
        """Train on this epoch's batches (the rest of them when resuming; up to the end of the budget in its
        last epoch), evaluating every --eval-every-steps; return the last logged loss. On a stop signal,
        checkpoint after the step all processes agree on and raise Interrupted."""
        self.start_epoch()
        accelerator, state, config, logger, stops = self.accelerator, self.state, self.config, self.logger, self.stops
        hooks, step, log_every, budget = self.hooks, self.step.run, self.log_every, self.budget
        epoch_end = budget.last_step_in_epoch(state.epoch)
        # One compare a step finds both events inside an epoch: an evaluation due, and the budget ending part-way
        # through the epoch (where the batches go on). An epoch's natural end is left to the batches.
        cut_short = budget.total_steps if epoch_end < budget.steps_per_epoch else 0  # 0: never (steps count from 1)
        next_event = self.next_event(cut_short)
        logger.start_epoch(state.epoch, state.step_in_epoch)
        self.model.train()
        # The window's losses stay on the device, unsummed: appending costs nothing, where an in-place add
        # per step was a kernel launch (~2% of the book MLP's step) and summing them is one at log time.
        window = self.window
        window.restart()
        last_loss, first_step = None, self.on_first_step
        for inputs, targets in self.loader:
            if hooks is not None:
                hooks.before_step(state.global_step + 1)
            if not step(inputs, targets, state):
                continue
            state.finish_step()
            if first_step is not None:
                first_step()
                first_step = self.on_first_step = None
            logger.advance()
            if hooks is not None:
                hooks.after_step(state.global_step, lambda: stops.signum)
            stop_signal = stops.agreed(accelerator)
            # The last step of an epoch is checkpointed after the epoch's evaluation instead.
            checkpoint_due = config.checkpoint_every and state.global_step % config.checkpoint_every == 0
            # A log window must not straddle a checkpoint: a resumed run has lost the losses before it.
            window_ends = state.step_in_epoch % log_every == 0 or state.step_in_epoch == epoch_end
            event = state.global_step == next_event
            if window_ends or checkpoint_due or stop_signal or event:
                last_loss = self.log_window(self.step.lr)
            if hooks is not None:
                hooks.after_log(state.global_step)
            if event:
                if state.global_step == cut_short:
                    break
                # Before this step's checkpoint: a run resumed from it has this evaluation on record.
                self.evaluate_inside_epoch()
                next_event = self.next_event(cut_short)
            if stop_signal or (checkpoint_due and state.step_in_epoch < epoch_end):
                path = self.checkpointer.save(state)
                window.restart()
            if stop_signal:
                finish_checkpoint(accelerator)
                stopped = interrupted(accelerator, stop_signal, path, state, self.budget)
                # No process exits before the checkpoint is published and said: mpirun kills the others
                # ~0.25 s after the first one exits.
                accelerator.wait_for_everyone()
                raise stopped
        logger.end_epoch()
        return last_loss

    def next_event(self, cut_short: int) -> int:
        """The step after this one at which the epoch's loop must act: the next evaluation due, or
        ``cut_short``, the step at which the budget ends inside this epoch (0 if it does not)."""
        due = self.budget.next_evaluation(self.state.global_step)
        return min(due, cut_short) if cut_short else due

    def evaluate_inside_epoch(self) -> None:
        """An --eval-every-steps evaluation: a record of kind "eval" in metrics.jsonl and its log line. Its time
        is not training time: the log window after it starts when it ends."""
        started = time.perf_counter()
        self.evaluate("eval")
        self.eval_seconds += time.perf_counter() - started
        self.window.restart()

    def evaluate(self, kind: str) -> dict[str, dict[str, Any]]:
        """Score the model now, check its figures are finite and log them as a record of ``kind``."""
        state = self.state
        metrics = self.score(self.model)
        self.check_finite(metrics)
        # The epoch the step is in: after an epoch's end the state already counts it done.
        epoch = state.epoch + 1 if state.step_in_epoch else state.epoch
        record = {"kind": kind, "epoch": epoch, "step": state.global_step}
        self.logger.log({**record, **self.job.workload.epoch_fields(metrics)})
        return metrics

    def log_window(self, lr: float) -> float:
        """Log the mean loss over processes and over the steps since the last log line; return it."""
        accelerator, config, window = self.accelerator, self.config, self.window
        loss = accelerator.reduce(torch.stack(window.losses).sum(), "mean").item() / window.micro_steps
        if not math.isfinite(loss):  # read here, where it costs no extra wait on the device
            first = self.state.global_step - window.micro_steps // accelerator.gradient_accumulation_steps + 1
            raise self.diverged(loss, f"in steps {first}-{self.state.global_step}")
        samples_per_s = window.micro_steps * config.batch_size * accelerator.num_processes / window.seconds()
        self.logger.log({
            "kind": "step", "epoch": self.state.epoch + 1, "step": self.state.global_step, "loss": loss, "lr": lr,
            "samples_per_s": samples_per_s,
            **self.job.workload.throughput(samples_per_s, config),
            **self.utilization(samples_per_s),
        })  # fmt: skip
        window.restart()
        return loss


    def check_finite(self, metrics: dict[str, dict[str, Any]] | None) -> None:
        """Weights that an epoch's last steps made non-finite show in its evaluation, before its checkpoint."""
        state = self.state
        for split, figures in (metrics or {}).items():
            loss = figures.get("loss")
            if loss is not None and not math.isfinite(loss):
                raise self.diverged(loss, f"on the {split} data after epoch {state.epoch} (step {state.global_step})")

    def diverged(self, loss: float, where: str) -> ToyaccelError:
        """The one line of a run whose loss stopped being a number: raised before the step is logged or
        checkpointed, so the checkpoints on disk all hold finite weights."""
        config = self.config
        remedy = f"lower --lr (now {config.lr:g})"
        if self.job.conventions.clipping:
            remedy += " or clip gradients with --max-grad-norm (e.g. 1.0)" if not config.max_grad_norm else (
                f" or --max-grad-norm (now {config.max_grad_norm:g})")  # fmt: skip
        wait_for_checkpoint()
        kept = checkpoint_dirs(config.output_dir)
        saved = f"the newest checkpoint is {kept[0]}" if kept else "no checkpoint was written"
        return ToyaccelError(
            f"the training loss became {loss} {where}: training diverged; {remedy} ({saved})", every_process=True
        )


class LossWindow:
    """The training losses since the last log line, kept on the device (a long window holds one tensor
    per FOLD_LOSSES steps), and when the window started."""

    def __init__(self):
        self.losses: list[torch.Tensor] = []
        self.micro_steps, self.started = 0, time.perf_counter()

    def add(self, loss: torch.Tensor) -> None:
        self.losses.append(loss)
        self.micro_steps += 1
        if len(self.losses) == FOLD_LOSSES:
            self.losses = [torch.stack(self.losses).sum()]

    def seconds(self) -> float:
        return time.perf_counter() - self.started

    def restart(self) -> None:
        self.losses.clear()
        self.micro_steps, self.started = 0, time.perf_counter()


class Step:
    """One micro-step: forward, loss, backward; on the micro-step that completes an optimizer step also
    clipping, the scheduled learning rate and the optimizer step. ``run(inputs, targets, state)`` does it
    and returns whether it stepped; ``lr`` is the rate of the last step."""

    def __init__(self, trainer: Trainer):
        accelerator = trainer.accelerator
        stepper = optimizer_to_step(accelerator, trainer.optimizer)
        # accumulate() and accelerator.backward() cost ~20 us a step each (15% of the book MLP's step at
        # batch 256). With one micro-step per optimizer step and a directly stepped optimizer (no scaler,
        # no XLA) they only count micro-steps and divide the loss by 1, so the loop skips them: same bits.
        plain = stepper is not trainer.optimizer and accelerator.gradient_accumulation_steps == 1
        plain = plain and accelerator.distributed_type not in (DistributedType.DEEPSPEED, DistributedType.MEGATRON_LM)
        self.lr = None
        self.run = self.build(trainer, stepper, plain)

    def build(self, trainer: Trainer, stepper, plain: bool):
        """The step as a function of its own: what it needs bound once, as locals (per-step attribute
        look-ups cost ~1% of the book MLP's step)."""
        accelerator, config, workload, model = trainer.accelerator, trainer.config, trainer.job.workload, trainer.model
        micro_step = (lambda _model: contextlib.nullcontext()) if plain else accelerator.accumulate
        backward = stepper.backward if plain else accelerator.backward
        loss_of, add_loss = workload.loss, trainer.window.add
        own_rng = own_random_stream if workload.uses_dropout(config) else None
        seed, max_grad_norm, process_index = config.seed, config.max_grad_norm, accelerator.process_index
        total_steps = trainer.budget.total_steps
        micro_in_step = 0

        def run(inputs, targets, state: TrainerState) -> bool:
            nonlocal micro_in_step
            with micro_step(model):
                if own_rng is None:
                    loss = loss_of(model(inputs), targets)
                else:
                    with own_rng(seed, process_index, state.global_step, micro_in_step):
                        loss = loss_of(model(inputs), targets)
                micro_in_step += 1
                backward(loss)
                add_loss(loss.detach())
                if not accelerator.sync_gradients:
                    return False
                if max_grad_norm:
                    accelerator.clip_grad_norm_(model.parameters(), max_grad_norm)
                self.lr = lr = learning_rate(config, state.global_step, total_steps)
                for group in stepper.param_groups:
                    group["lr"] = lr
                stepper.step()
                stepper.zero_grad(set_to_none=True)
            micro_in_step = 0
            return True

        return run


def interrupted(accelerator, signum: int, path, state: TrainerState, budget: Budget):
    """The one line a stopped run prints (on the main process) and the exception that ends it."""
    name = signal.Signals(signum).name
    where = f"epoch {state.epoch + 1}/{budget.epochs}, {budget.step_words(state.global_step)}"
    message = (
        f"interrupted by {name}: saved checkpoint {path} ({where}); "
        "to continue, run the same command with --resume latest"
    )
    say(accelerator, message)
    return Interrupted(signum, message)
