"""Logging for the daemon and CLI: every line names the host and, where known, the resource."""

from __future__ import annotations

import logging
import sys


class _Context(logging.Filter):
    def __init__(self, host: str) -> None:
        super().__init__()
        self.host = host

    def filter(self, record: logging.LogRecord) -> bool:
        host = getattr(record, "host", self.host)
        resource = getattr(record, "resource", None)
        record.where = f"{resource}@{host}" if resource else str(host)
        return True


def setup_logging(host: str, level: str = "INFO", prog: str = "marsd") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_Context(host))
    handler.setFormatter(logging.Formatter(
        f"%(asctime)s {prog} %(levelname)s %(where)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
