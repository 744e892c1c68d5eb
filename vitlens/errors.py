"""The one error type for what a user can cause, and its exit codes.

The CLI turns a :class:`VitlensError` into a single red line on stderr and ``exit_code``; anything else is a bug
and keeps its traceback (shown with ``--debug``).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


class VitlensError(Exception):
    """Something the user can fix: a bad path, an unsupported checkpoint, too few images.

    The message is one line, says what is wrong and, where it can, what to do about it.
    """

    exit_code = 1


class ParameterError(VitlensError, ValueError):
    """A library argument the caller gave is out of range or of the wrong kind.

    The message speaks the parameter's name (``num_images must be at least 1, not 0``); the CLI rewrites that name
    into its flag (``--num-images``) in one place and exits with 2, as for any bad command line.
    """

    exit_code = 2

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


@contextmanager
def spec_named(param: str) -> Iterator[None]:
    """Within the block, an error about a data spec names the argument the spec came from (``test_data``,
    ``images``) instead of ``open_dataset``'s own ``spec``, so that the CLI names the flag the user typed."""
    try:
        yield
    except ParameterError as e:
        if e.param != "spec":
            raise
        raise ParameterError(param, str(e).replace("spec", param, 1)) from None


class NotApplicable(VitlensError):
    """An analysis that does not apply to this model or data (few-shot on unlabelled images): the report skips it."""


class UsageError(VitlensError):
    """The command line itself is wrong (bad option value, conflicting options): exit code 2."""

    exit_code = 2


class Interrupted(VitlensError):
    """The user pressed Ctrl-C: exit code 130 as a shell would give."""

    exit_code = 130
