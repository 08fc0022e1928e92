"""One writer per run folder: a run holds its folder for as long as any of its processes can write.

The hold is an flock on ``<output dir>/.lock``, which the kernel drops when its holder ends however it
ends (a SIGKILL included), so a crashed run never leaves a folder locked, and the workers of an elastic
restart find the dead attempt's hold gone with its processes. flock works across machines on NFS
(Linux emulates it with NFS's byte-range locks), so every machine of a multi-machine run takes part.

The main process takes the lock exclusively first (only one launch can win it), writes its host and
pid into the file (the name a refused run quotes), and turns it into a shared hold; every other
process then holds it shared too. A second run's main process cannot take it exclusively while any of
them lives, and stops before touching anything in the folder.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
from pathlib import Path

from toyaccel.errors import ToyaccelError

LOCK_FILE = ".lock"

try:
    import fcntl
except ImportError:  # Windows: no flock; a run there holds nothing (as before)
    fcntl = None


class FolderHold:
    """This process's hold on a run folder; ``release()`` (or leaving the ``with``) lets it go."""

    def __init__(self, output_dir: str | os.PathLike):
        self.folder = Path(output_dir)
        self.path = self.folder / LOCK_FILE
        self._fd: int | None = None
        self._main = False
        self._created_folder = False

    def __enter__(self) -> FolderHold:
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def claim(self) -> None:
        """On the main process, before anything in the folder is read or changed: take the folder, or
        raise ToyaccelError naming the process that holds it."""
        if fcntl is None:
            return
        self._main = True
        if not self.folder.exists():
            try:
                self.folder.mkdir(parents=True)
                self._created_folder = True
            except FileExistsError:
                pass
            except OSError:  # prepare_output_dir says why the folder cannot be written
                return
        elif not self.folder.is_dir():
            return  # prepare_output_dir refuses it
        # A holder that ends unlinks the file; a claim that locked the unlinked one tries the new one.
        for _ in range(10):
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
            except FileNotFoundError:  # the folder we made was removed by a run ending: make it again
                with contextlib.suppress(OSError):
                    self.folder.mkdir(parents=True)
                continue
            except OSError:  # an unwritable folder: prepare_output_dir says so
                return
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _holder_of(fd)
                os.close(fd)
                raise ToyaccelError(
                    f"{self.folder} is in use by another run ({holder}); wait for it to end, or choose "
                    "another --output-dir"
                ) from None
            except OSError as e:
                os.close(fd)
                if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                    return  # a filesystem without locks: run unguarded rather than not at all
                raise
            if not _same_file(fd, self.path):
                os.close(fd)
                continue
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"host {_hostname()} pid {os.getpid()}\n".encode(), 0)
            # Shared from now on, so the run's other processes can hold it beside this one; a
            # downgrade cannot be refused (nobody else holds it), and it is atomic on Linux.
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            self._fd = fd
            return

    def join(self) -> None:
        """On every other process, once the main process has claimed the folder: hold it too, so the
        folder stays held until the last process of the run has ended."""
        if fcntl is None or self._main:
            return
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CLOEXEC)
        except OSError:  # a folder this machine does not share: its main process's hold is the guard
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return
        self._fd = fd

    def release(self) -> None:
        """Let the folder go. The main process removes the lock file (under its hold, so no claim can
        be between open and lock on it), and the folder itself where it made it and nothing else came of it."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        if self._main:
            with contextlib.suppress(OSError):
                if _same_file(fd, self.path):
                    self.path.unlink()
            if self._created_folder:
                with contextlib.suppress(OSError):
                    self.folder.rmdir()  # only when empty
        os.close(fd)


def _same_file(fd: int, path: Path) -> bool:
    try:
        here, there = os.fstat(fd), os.stat(path)
    except OSError:
        return False
    return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)


def _holder_of(fd: int) -> str:
    text = os.pread(fd, 200, 0).decode(errors="replace").strip()
    # Only our own "host H pid P" line is quoted: the file is in a folder anyone may have written to.
    words = text.split()
    if len(words) == 4 and words[0] == "host" and words[2] == "pid" and words[3].isdigit():
        return f"{words[0]} {words[1]}, {words[2]} {words[3]}"
    return "host and pid not yet written"


def _hostname() -> str:
    return os.environ.get("TOYACCEL_HOSTNAME_FOR_TESTS") or socket.gethostname()
