"""The control socket between marsadm and marsd: one JSON object per line each way.

Request: ``{"cmd": NAME, ...arguments}``. Reply: ``{"ok": true, ...}`` or
``{"ok": false, "error": MESSAGE, "code": EXIT_CODE}``.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

from marslib.errors import MarsError, Refused, TimedOut

MAX_LINE = 1 << 20


class DaemonNotRunning(Refused):
    pass


def request(sock_path: Path, cmd: str, timeout: float = 30.0, **args: Any) -> dict[str, Any]:
    """Send one request to marsd and return its reply; raise the error it reports."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        try:
            s.connect(str(sock_path))
        except (FileNotFoundError, ConnectionRefusedError):
            raise DaemonNotRunning(
                f"marsd is not running (no control socket at {sock_path}): start it with "
                "'systemctl start marsd' or 'marsd &'"
            ) from None
        s.sendall(json.dumps({"cmd": cmd, **args}).encode() + b"\n")
        buf = b""
        while not buf.endswith(b"\n"):
            try:
                chunk = s.recv(65536)
            except TimeoutError:
                raise TimedOut(f"marsd did not answer {cmd!r} within {timeout:g}s") from None
            if not chunk:
                raise MarsError(f"marsd closed the control connection during {cmd!r}")
            buf += chunk
            if len(buf) > MAX_LINE:
                raise MarsError("marsd sent an oversized reply")
    finally:
        s.close()
    reply: dict[str, Any] = json.loads(buf)
    if not reply.get("ok"):
        err = str(reply.get("error", "unknown error"))
        code = int(reply.get("code", 1))
        if code == 3:
            raise TimedOut(err)
        raise Refused(err) if code == 1 else MarsError(err)
    return reply
