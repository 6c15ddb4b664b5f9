"""The one exception class for bad input from the user (a path, a column, a file's content).

Why a class of its own: the CLI maps ``InputError`` to a one-line message and exit code 2,
while any other exception is a bug in gradtune and keeps its traceback.
"""

from __future__ import annotations


class InputError(ValueError):
    """Bad user input; the message is one line that says what is wrong and where."""
