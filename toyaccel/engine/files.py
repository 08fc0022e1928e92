"""Which paths are read at all: the one check every reader of a file makes (light: the option parser uses it),
and the one reader of a JSON file that must hold an object (a run's config.json, a GPT-2 folder's)."""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

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


def read_json_object(
    path: Path, missing: str, unreadable: Callable[[Exception], str], not_object: str
) -> dict[str, Any]:
    """The JSON object in ``path``; each problem one line naming the file, in the caller's words: ``missing``
    where there is no such file, ``unreadable(error)`` where it does not read as JSON, ``not_object``
    where it holds another JSON value."""
    try:
        value = json.loads(path.read_text())
    except FileNotFoundError:
        raise ToyaccelError(f"{path}: {missing}") from None
    except (OSError, ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        raise ToyaccelError(f"{path}: {unreadable(e)}") from None
    if not isinstance(value, dict):
        raise ToyaccelError(f"{path}: {not_object}")
    return value
