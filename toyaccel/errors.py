"""The one error type toyaccel raises for anything a user can fix."""


class ToyaccelError(Exception):
    """Bad input or an impossible setup, with a one-line message saying what to change.

    The command line prints the message to stderr and exits with code 2; from Python it is
    raised as-is, so a notebook can catch exactly this and nothing else.
    """

    exit_code = 2
