"""Errors meant for the user, not for a traceback."""


class BenchError(Exception):
    """A user-facing error: a one-line message saying what was expected.

    The CLI prints it as ``error: <msg>`` and exits with ``exit_code`` (2: bad input or
    state; ``bench check`` uses 1 for a regression), without a traceback.
    """

    def __init__(self, message: str, exit_code: int = 2):
        super().__init__(message)
        self.exit_code = exit_code
