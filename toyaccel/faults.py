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
    """Whether any fault is asked for: the training loop checks this once per epoch, not per step."""
    return bool(os.environ.get("TOYACCEL_FAULT"))


def maybe_inject_fault(point: str, global_step: int, process_index: int) -> None:
    if _fault_here(point, global_step, process_index):
        os.kill(os.getpid(), signal.SIGKILL)


def maybe_raise(global_step: int, process_index: int) -> None:
    if _fault_here("raise", global_step, process_index):
        raise RuntimeError(f"TOYACCEL_FAULT: an error inside optimizer step {global_step}")


def maybe_stall(global_step: int, process_index: int, signalled: Callable[[], int]) -> None:
    if _fault_here("stall", global_step, process_index):
        sys.stderr.write(f"stalled after step {global_step}\n")
        sys.stderr.flush()
        deadline = time.monotonic() + 60
        while not signalled() and time.monotonic() < deadline:
            time.sleep(0.02)


def maybe_drift_rng(process_index: int) -> None:
    if _fault_here("rng-drift", None, process_index):
        torch.rand(1)
