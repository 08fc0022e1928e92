"""What a run reports: log lines, ``metrics.jsonl``, a progress bar and accelerate's trackers.

Only the main process writes; every method may be called on every process.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from toyaccel.engine.budget import Budget


class MetricsLogger:
    def __init__(self, accelerator, output_dir: str, budget: Budget, progress: bool, resume_step: int | None):
        self.accelerator = accelerator
        self.budget = budget
        self.path = Path(output_dir) / "metrics.jsonl"
        self.history: list[dict[str, Any]] = []
        self.bar = None
        self.show_progress = progress and accelerator.is_main_process and sys.stderr.isatty()
        self.file_started = False
        if accelerator.is_main_process:
            self.history = self._continue_history(resume_step)

    def _continue_history(self, resume_step: int | None) -> list[dict[str, Any]]:
        """Keep what was logged up to the checkpoint; drop what a crashed attempt logged after it (once the
        file is started: see start_file)."""
        if resume_step is None or not self.path.exists():
            return []
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue  # a line cut short by the crash
            if record.get("step", 0) <= resume_step:
                kept.append(record)
        return kept

    def start_file(self) -> None:
        """Write the file as this run starts it: empty, or what a resumed run keeps. Not at start-up: the
        training calls this after its first step, so that a run failing before leaves the file as it was."""
        if self.accelerator.is_main_process and not self.file_started:
            self.path.write_text("".join(json.dumps(r) + "\n" for r in self.history))
        self.file_started = True

    def start_epoch(self, epoch: int, done_steps: int) -> None:
        """A bar over this epoch's steps; over the whole run's with --max-steps (an epoch of a corpus may be
        longer than the run)."""
        if self.show_progress:
            try:
                from tqdm.auto import tqdm
            except ImportError:  # an optional extra (pip install 'toyaccel[progress]'); the log lines suffice
                self.show_progress = False
                return
            budget = self.budget
            if budget.max_steps:
                total, done, desc = budget.max_steps, epoch * budget.steps_per_epoch + done_steps, "steps"
            else:
                total, done, desc = budget.steps_per_epoch, done_steps, f"epoch {epoch + 1}/{budget.epochs}"
            self.bar = tqdm(total=total, initial=done, desc=desc, leave=False)

    def advance(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def log(self, record: dict[str, Any]) -> None:
        if not self.accelerator.is_main_process:
            return
        self.start_file()
        self.history.append(record)
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        line = format_record(record, self.budget)
        if self.bar is not None:
            self.bar.write(line)
        else:
            print(line, flush=True)
        self.accelerator.log({k: v for k, v in record.items() if isinstance(v, (int, float))}, step=record["step"])

    def end_epoch(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def say(accelerator, message: str) -> None:
    """Print ``message`` once per run. accelerator.print prints on each machine's first process, so a
    job on several machines (Slurm's one log, say) would show every line once per machine."""
    if accelerator.is_main_process:
        print(message, flush=True)


def format_record(record: dict[str, Any], budget: Budget) -> str:
    """``epoch 2/3 | step 4 | loss 0.4412 | lr 0.5 | 812 samples/s`` (and the evaluation's metrics); with
    --max-steps 100, ``step 4/100``."""
    parts = [f"epoch {record['epoch']}/{budget.epochs}", budget.step_words(record["step"])]
    for key, fmt in (
        ("loss", ".4f"),
        ("lr", ".4g"),
        ("train_loss", ".4f"),
        ("train_acc", ".3f"),
        ("val_loss", ".4f"),
        ("val_acc", ".3f"),
        ("train_ppl", ".3f"),
        ("val_ppl", ".3f"),
    ):
        if record.get(key) is not None:
            parts.append(f"{key} {record[key]:{fmt}}")
    if record.get("tokens_per_s"):
        parts.append(f"{record['tokens_per_s']:.0f} tokens/s")
        if record.get("mfu") is not None:
            parts.append(f"mfu {record['mfu']:.1%}")
    elif record.get("samples_per_s"):
        parts.append(f"{record['samples_per_s']:.0f} samples/s")
    return " | ".join(parts)

