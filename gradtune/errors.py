"""The one error type users see: a one-line message, exit code 2, no traceback (cli.py maps it)."""


class GradtuneError(Exception):
    """Bad input (config, data, checkpoint, model folder). The message names the file/line/key."""

    exit_code = 2
