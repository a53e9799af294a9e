"""User-facing errors.

Anything a user can fix (a bad flag, a missing file, an unsupported model) is raised as
:class:`UsageError`; the CLI prints its message on one line and exits with code 2, never a traceback.
"""


class SecateursError(Exception):
    """Base class of every error secateurs raises on purpose."""


class UsageError(SecateursError):
    """Bad input the user can fix; the message says what to change."""


class NumericalError(SecateursError):
    """NaN or inf appeared in weights or activations; the message names the block."""


def first_line(exc: BaseException) -> str:
    """An exception's first line, at most 300 characters: what a one-line error quotes of a library's
    (transformers raises many types with long messages)."""
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:300]
