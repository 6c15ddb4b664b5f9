"""The error types users see: a one-line message, an exit code, no traceback (cli.py maps them).

Any other exception is a bug in gradtune and keeps its traceback.
"""


class GradtuneError(Exception):
    """Bad input (config, data, checkpoint, model folder). The message names the file/line/key."""

    exit_code = 2


class InputError(GradtuneError, ValueError):
    """Bad user input raised by library code that callers may also catch as ValueError."""
