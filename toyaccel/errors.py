"""The one error type toyaccel raises for anything a user can fix, and the exception of a run stopped by a signal."""


class ToyaccelError(Exception):
    """Bad input or an impossible setup, with a one-line message saying what to change.

    The command line prints the message to stderr and exits with code 2; from Python it is
    raised as-is, so a notebook can catch exactly this and nothing else.
    """

    exit_code = 2

    def __init__(self, message: str, every_process: bool = False):
        super().__init__(message)
        # True when every process of a launch raises this very error (one decided on the main
        # process, or found from all processes' numbers): only the main process needs to say it.
        self.every_process = every_process


class Interrupted(KeyboardInterrupt):
    """Training stopped on a signal (Ctrl-C, or a scheduler's SIGTERM or SIGUSR1) after saving a
    checkpoint. A KeyboardInterrupt, so code that catches Ctrl-C around ``fit`` (a notebook) still
    does; the command line exits with 128 + the signal number, the shell's convention."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum
        self.exit_code = 128 + signum
