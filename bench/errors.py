"""Errors meant for the user, not for a traceback."""


class BenchError(Exception):
    """A user-facing error: a one-line message saying what was expected.

    The CLI prints it as ``error: <msg>`` and exits with status 2, without a traceback.
    """
