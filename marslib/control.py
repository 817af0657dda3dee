"""The control socket between marsadm and marsd: one JSON object per line each way.

Request: ``{"cmd": NAME, ...arguments}``, one line of at most ``MAX_REQUEST`` bytes.
Reply: ``{"ok": true, ...}`` or ``{"ok": false, "error": MESSAGE, "code": EXIT_CODE}``;
a malformed request gets code 2 ("bad control request: ...") and marsd closes that
connection.

``status`` (and ``reconcile``) answer with :meth:`marslib.status.DaemonStatus.to_json`
besides ``ok``; :func:`daemon_status` reads it back typed.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

from marslib.errors import MarsError, Refused, TimedOut, UsageError, error_for_code
from marslib.status import DaemonStatus

MAX_LINE = 1 << 20  # a reply
MAX_REQUEST = 1 << 16  # a request line, without its newline (asyncio's stream limit)


class DaemonNotRunning(Refused):
    pass


def parse_request(line: bytes) -> dict[str, Any]:
    """One request line as marsd reads it; UsageError says what is wrong with it."""
    try:
        req = json.loads(line)
    except RecursionError:
        raise UsageError("JSON nested too deeply") from None
    except ValueError as exc:  # not JSON, or not UTF-8
        raise UsageError(f"not JSON ({exc})") from None
    if not isinstance(req, dict):
        raise UsageError("not a JSON object")
    if not isinstance(req.get("cmd"), str):
        raise UsageError('no "cmd" name')
    return req


def usage_reply(reason: str) -> dict[str, Any]:
    """marsd's reply to a malformed request (marsadm exit code 2)."""
    return {"ok": False, "error": f"bad control request: {reason}", "code": 2}


def too_long_reply() -> dict[str, Any]:
    return usage_reply(f"a request is one line of at most {MAX_REQUEST // 1024} KiB; "
                       "this one is longer")


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
        try:
            s.sendall(json.dumps({"cmd": cmd, **args}).encode() + b"\n")
        except (BrokenPipeError, ConnectionResetError):
            pass  # marsd refused the request before reading all of it: its reply says why
        buf = b""
        while not buf.endswith(b"\n"):
            try:
                chunk = s.recv(65536)
            except TimeoutError:
                raise TimedOut(f"marsd did not answer {cmd!r} within {timeout:g}s") from None
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                raise MarsError(f"marsd closed the control connection during {cmd!r}")
            buf += chunk
            if len(buf) > MAX_LINE:
                raise MarsError("marsd sent an oversized reply")
    finally:
        s.close()
    try:
        reply: dict[str, Any] = json.loads(buf)
    except ValueError:
        raise MarsError(f"marsd sent a reply to {cmd!r} that is not JSON: {buf[:200]!r}") \
            from None
    if not reply.get("ok"):
        err = str(reply.get("error", "unknown error"))
        raise error_for_code(int(reply.get("code", 1)), err)
    return reply


def daemon_status(sock_path: Path, timeout: float = 30.0) -> DaemonStatus:
    """marsd's ``status``: every resource it runs, its peers and its free space."""
    return DaemonStatus.from_json(request(sock_path, "status", timeout))
