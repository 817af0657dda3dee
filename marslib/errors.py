"""Exceptions that carry what the user needs to fix the problem."""

from __future__ import annotations


class MarsError(Exception):
    """Base class of every marslib error; the message is meant for the operator.

    ``exit_code`` is marsadm's exit status for it, and the ``code`` of marsd's error reply
    on the control socket (:func:`error_for_code` turns a code back into an error).
    """

    exit_code = 1


class UsageError(MarsError):
    """The command line or a request was malformed (marsadm exit code 2)."""

    exit_code = 2


class Refused(MarsError):
    """A precondition is not met; the message says what to do (marsadm exit code 1)."""


class TimedOut(MarsError):
    """A wait ran out of time (marsadm exit code 3)."""

    exit_code = 3


class DeviceError(MarsError):
    """A data device could not be opened, read or written."""


class LogCorrupt(MarsError):
    """A logfile holds a record that fails its checks where it must not."""

    def __init__(self, path: str, offset: int, reason: str) -> None:
        super().__init__(f"{path}: corrupt log record at offset {offset}: {reason}")
        self.path = path
        self.offset = offset
        self.reason = reason


class FormatTooNew(MarsError):
    """A record or frame uses a major version this software does not know."""


def error_for_code(code: int, message: str) -> MarsError:
    """The error a reply's ``code`` stands for (the inverse of ``exit_code``)."""
    for cls in (UsageError, TimedOut):
        if code == cls.exit_code:
            return cls(message)
    return Refused(message) if code == Refused.exit_code else MarsError(message)
