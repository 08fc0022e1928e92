"""How long a run trains and when it evaluates: ``--epochs`` passes over the data, or ``--max-steps`` optimizer
steps (a corpus is trained for a budget, not for epochs), with an evaluation every ``--eval-every-steps``.

The data is read in epochs either way, each reshuffled as the book's loop does, so ``--max-steps`` equal to
epochs x steps per epoch is the epoch run, bit for bit; a budget that is not a whole number of epochs ends
part-way through its last one.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Budget:
    """``epochs``: the epochs the run reads (the last one cut short where ``max_steps`` ends inside it);
    ``total_steps``: the optimizer steps it trains, which the learning-rate schedule spans."""

    epochs: int
    steps_per_epoch: int
    max_steps: int = 0  # 0: the budget is --epochs
    eval_every_steps: int = 0  # 0: evaluate at epoch ends (--eval-every), not every K steps

    @classmethod
    def of(cls, config, steps_per_epoch: int) -> Budget:
        max_steps = config.max_steps
        epochs = -(-max_steps // steps_per_epoch) if max_steps else config.epochs
        return cls(epochs, steps_per_epoch, max_steps, config.eval_every_steps)

    @property
    def total_steps(self) -> int:
        return self.max_steps or self.epochs * self.steps_per_epoch

    def last_step_in_epoch(self, epoch: int) -> int:
        """The optimizer steps of epoch ``epoch`` (0-based) that the run trains: a whole epoch, or fewer in the
        last one."""
        return min(self.steps_per_epoch, self.total_steps - epoch * self.steps_per_epoch)

    def next_evaluation(self, global_step: int) -> int:
        """The step after ``global_step`` at which the next every-K-steps evaluation falls, inside the run
        (the run's end is evaluated anyway); one past the end when there is none."""
        end = self.total_steps
        if not self.eval_every_steps:
            return end + 1
        due = (global_step // self.eval_every_steps + 1) * self.eval_every_steps
        return due if due < end else end + 1

    def step_words(self, step: int) -> str:
        """``step 40`` for an epoch run, ``step 40/100`` for a run of --max-steps 100."""
        return f"step {step}/{self.max_steps}" if self.max_steps else f"step {step}"
