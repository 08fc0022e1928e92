"""Which paths are read at all: the one check every reader of a file makes (light: the option parser uses it)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from toyaccel.errors import ToyaccelError


def require_regular_file(path: str | Path) -> None:
    """Only regular files are read: a fifo may never end (or never start), a device such as /dev/zero
    never ends. A missing path is left to the caller, which words it for its option."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return
    if stat.S_ISREG(mode):
        return
    kind = next((words for test, words in ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a fifo"),
                 (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a device"), (stat.S_ISBLK, "a device")) if test(mode)),
                "not a file")  # fmt: skip
    raise ToyaccelError(f"{path}: {kind}, not a regular file (only regular files are read)")
