"""Fault injection for crash tests: make a process die abruptly, once, at a chosen point.

``TOYACCEL_FAULT=step:K`` kills the process right after optimizer step K (before any checkpoint of
that step); ``TOYACCEL_FAULT=checkpoint:K`` kills it while checkpoint K is half written.
``TOYACCEL_FAULT=raise:K`` raises an error inside optimizer step K, as an overflow or running out of
memory would. ``TOYACCEL_FAULT=stall:K`` makes the process wait after optimizer step K until it is sent a stop
signal (so a test can interrupt a short run mid-epoch); ``TOYACCEL_FAULT=rng-drift`` makes it draw
one extra random number before its first epoch, as a rank whose random stream went astray would.
``TOYACCEL_FAULT_RANK`` picks the process (default: every process). Under an elastic launcher the
fault fires only in the first attempt, so the restarted workers can finish.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Callable

import torch


def _fault_here(point: str, global_step: int | None, process_index: int) -> bool:
    spec = os.environ.get("TOYACCEL_FAULT")
    if not spec or os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":
        return False
    where, _, step = spec.partition(":")
    rank = os.environ.get("TOYACCEL_FAULT_RANK")
    at_step = global_step is None or step == str(global_step)
    return where == point and at_step and rank in (None, str(process_index))


def faults_armed() -> bool:
    """Whether any fault is asked for: looked up once a run, not per step."""
    return bool(os.environ.get("TOYACCEL_FAULT"))


def fault_hooks(process_index: int, settle: Callable[[], None]) -> FaultHooks | None:
    """The hooks the training loop calls at its named points, or None (the loop then calls nothing) when
    no fault is asked for. ``settle`` waits for the checkpoint being published."""
    return FaultHooks(process_index, settle) if faults_armed() else None


class FaultHooks:
    """Where a crash test reaches into a run: each named point fires the fault TOYACCEL_FAULT names, once."""

    def __init__(self, process_index: int, settle: Callable[[], None]):
        self.process_index, self.settle = process_index, settle

    def before_epoch(self) -> None:
        """Before an epoch's seed is drawn: rng-drift."""
        if _fault_here("rng-drift", None, self.process_index):
            torch.rand(1)

    def before_step(self, global_step: int) -> None:
        """Before each micro-step of optimizer step ``global_step`` (1-based): raise:K."""
        if _fault_here("raise", global_step, self.process_index):
            raise RuntimeError(f"TOYACCEL_FAULT: an error inside optimizer step {global_step}")

    def after_step(self, global_step: int, signalled: Callable[[], int]) -> None:
        """After an optimizer step, before the processes agree on stopping: stall:K."""
        # The checkpoint being published lands before a fault fires: a crash test knows what is on disk.
        self.settle()
        if _fault_here("stall", global_step, self.process_index):
            sys.stderr.write(f"stalled after step {global_step}\n")
            sys.stderr.flush()
            deadline = time.monotonic() + 60
            while not signalled() and time.monotonic() < deadline:
                time.sleep(0.02)

    def after_log(self, global_step: int) -> None:
        """After a step's log line, before any checkpoint of it: step:K."""
        self.kill_at("step", global_step)

    def in_checkpoint(self, global_step: int) -> None:
        """With checkpoint K half written: checkpoint:K."""
        self.kill_at("checkpoint", global_step)

    def kill_at(self, point: str, global_step: int) -> None:
        maybe_inject_fault(point, global_step, self.process_index)


def maybe_inject_fault(point: str, global_step: int, process_index: int) -> None:
    """Kill this process where TOYACCEL_FAULT names ``point:global_step`` (also outside training: prepare)."""
    if _fault_here(point, global_step, process_index):
        os.kill(os.getpid(), signal.SIGKILL)
