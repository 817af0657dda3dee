"""Exceptions that carry what the user needs to fix the problem."""

from __future__ import annotations


class MarsError(Exception):
    """Base class of every marslib error; the message is meant for the operator."""


class UsageError(MarsError):
    """The command line or a request was malformed (marsadm exit code 2)."""


class Refused(MarsError):
    """A precondition is not met; the message says what to do (marsadm exit code 1)."""


class TimedOut(MarsError):
    """A wait ran out of time (marsadm exit code 3)."""


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
