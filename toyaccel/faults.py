"""Fault injection for crash tests: make a process die abruptly, once, at a chosen point.

``TOYACCEL_FAULT=step:K`` kills the process right after optimizer step K (before any checkpoint of
that step); ``TOYACCEL_FAULT=checkpoint:K`` kills it while checkpoint K is half written.
``TOYACCEL_FAULT_RANK`` picks the process (default: every process). Under an elastic launcher the
fault fires only in the first attempt, so the restarted workers can finish.
"""

from __future__ import annotations

import os
import signal


def maybe_inject_fault(point: str, global_step: int, process_index: int) -> None:
    spec = os.environ.get("TOYACCEL_FAULT")
    if not spec or os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":
        return
    where, _, step = spec.partition(":")
    rank = os.environ.get("TOYACCEL_FAULT_RANK")
    if where == point and step == str(global_step) and rank in (None, str(process_index)):
        os.kill(os.getpid(), signal.SIGKILL)
