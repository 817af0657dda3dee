"""The HELLO + HMAC challenge-response exchange that opens every connection (sans-I/O).

Both sides send HELLO (host, cluster uuid, software version, protocol range, channel,
a fresh nonce). Then the client proves it knows the cluster secret with an HMAC-SHA256
over both nonces and the names; the server checks it before proving the same in turn.
A peer without the secret, from another cluster, or with no common protocol version gets
an ERROR frame and nothing else.

The rule for the secret itself is here too (:func:`secret_problem`): one word of at least
``SECRET_MIN_LEN`` bytes. Neither side runs a handshake with an empty secret, the key an
HMAC any stranger can compute.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from typing import Any

from marslib import __version__
from marslib.errors import MarsError
from marslib.formats.frame import PROTO_MIN, PROTO_VERSION, Frame, FrameType

CHANNELS = ("meta", "fetch", "sync")
SECRET_MIN_LEN = 16


def secret_problem(secret: bytes) -> str | None:
    """What is wrong with ``secret`` as a cluster secret, or None if it will do."""
    if not secret:
        return "the secret is empty"
    if any(c in secret for c in b" \t\r\n\v\f"):
        return "the secret is more than one word"
    if len(secret) < SECRET_MIN_LEN:
        return f"the secret has {len(secret)} bytes, fewer than {SECRET_MIN_LEN}"
    return None


def restore_hint(path: object = "ROOT/secret") -> str:
    """How an operator gets a good secret back into ``path`` (the state root's secret)."""
    return (f"restore it: copy it from another member's {path} (one line, mode 0600); if "
            f"no member has it any more, write a new one ('openssl rand -hex 32 > {path}; "
            f"chmod 600 {path}') on every member and restart their marsd")


def check_secret(secret: bytes, source: object, path: object = "ROOT/secret") -> bytes:
    """``secret`` if it follows the rule, else MarsError naming ``source`` (the file, or
    the channel, that has it) and how to restore ``path``."""
    problem = secret_problem(secret)
    if problem is not None:
        raise MarsError(f"{source}: refusing this cluster secret: {problem} (one word of at "
                        f"least {SECRET_MIN_LEN} bytes is needed); {restore_hint(path)}")
    return secret


class HandshakeError(Exception):
    """The handshake failed; ``reply`` (if any) should be sent before closing."""

    def __init__(self, reason: str, reply: Frame | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.reply = reply


@dataclass(frozen=True)
class PeerInfo:
    host: str
    software: str
    proto: int  # the protocol version both speak
    channel: str
    extra: dict[str, Any]  # the peer's whole HELLO header (keys we may not know)


def _mac(secret: bytes, role: str, client_nonce: str, server_nonce: str, uuid: str,
         client_host: str, server_host: str, channel: str) -> str:
    msg = "\n".join(("marslib-auth-v1", role, client_nonce, server_nonce, uuid, client_host,
                     server_host, channel)).encode()
    return hmac.new(secret, msg, hashlib.sha256).hexdigest()


class Handshake:
    """One side of the opening exchange. Feed it frames; send what it returns."""

    def __init__(self, role: str, host: str, uuid: str, secret: bytes, channel: str,
                 proto_min: int = PROTO_MIN, proto_max: int = PROTO_VERSION,
                 software: str = __version__) -> None:
        if role not in ("client", "server") or channel not in CHANNELS:
            raise ValueError(f"bad handshake role {role!r} or channel {channel!r}")
        problem = secret_problem(secret)
        if problem is not None:
            raise MarsError(f"{channel} {role} on {host}: refusing to authenticate with this "
                            f"cluster secret: {problem}"
                            + (" (any peer could compute its HMAC)" if not secret else ""))
        self.role = role
        self.host = host
        self.uuid = uuid
        self.secret = secret
        self.channel = channel
        self.proto_min = proto_min
        self.proto_max = proto_max
        self.software = software
        self.nonce = secrets.token_hex(16)
        self.peer: PeerInfo | None = None
        self.done = False
        self._peer_hello: dict[str, Any] | None = None
        self._sent_auth = False

    def _hello(self) -> Frame:
        return Frame(FrameType.HELLO, {
            "host": self.host, "uuid": self.uuid, "software": self.software,
            "proto_min": self.proto_min, "proto_max": self.proto_max,
            "channel": self.channel, "nonce": self.nonce,
        })

    def _fail(self, reason: str) -> HandshakeError:
        return HandshakeError(reason, Frame(FrameType.ERROR, {"error": reason}))

    def start(self) -> list[Frame]:
        return [self._hello()] if self.role == "client" else []

    def _names(self) -> tuple[str, str, str, str]:
        peer = self._peer_hello or {}
        if self.role == "client":
            return self.nonce, str(peer.get("nonce", "")), self.host, str(peer.get("host", ""))
        return str(peer.get("nonce", "")), self.nonce, str(peer.get("host", "")), self.host

    def _auth_for(self, role: str) -> str:
        cn, sn, ch, sh = self._names()
        return _mac(self.secret, role, cn, sn, self.uuid, ch, sh, self.channel)

    def receive(self, frame: Frame) -> list[Frame]:
        """Process a frame from the peer; return the frames to send."""
        if self.done:
            raise HandshakeError("handshake already complete")
        if frame.type == FrameType.ERROR:
            raise HandshakeError(f"peer refused: {frame.get('error', 'no reason given')}")
        if self._peer_hello is None:
            if frame.type != FrameType.HELLO:
                raise self._fail(f"expected HELLO, got frame type {frame.type}")
            return self._on_hello(frame)
        if frame.type != FrameType.AUTH:
            raise self._fail(f"expected AUTH, got frame type {frame.type}")
        peer_role = "server" if self.role == "client" else "client"
        if not hmac.compare_digest(str(frame.get("mac", "")), self._auth_for(peer_role)):
            raise self._fail("authentication failed: the peer does not know the cluster secret")
        self.done = True
        out = []
        if self.role == "server":
            out.append(Frame(FrameType.AUTH, {"mac": self._auth_for("server")}))
        return out

    def _on_hello(self, frame: Frame) -> list[Frame]:
        h = frame.header
        if not isinstance(h.get("nonce"), str) or len(h["nonce"]) < 16:
            raise self._fail("HELLO without a valid nonce")
        if h.get("uuid") != self.uuid:
            raise self._fail(f"wrong cluster: {h.get('uuid')!r} is not {self.uuid!r}")
        if h.get("channel", self.channel) != self.channel:
            raise self._fail(f"wrong port: {h.get('channel')!r} connection on the "
                             f"{self.channel} port")
        try:
            pmin, pmax = int(h.get("proto_min", 1)), int(h.get("proto_max", 1))
        except (TypeError, ValueError):
            raise self._fail("HELLO with a malformed protocol range") from None
        proto = min(pmax, self.proto_max)
        if proto < max(pmin, self.proto_min):
            raise self._fail(
                f"no common protocol version: we speak {self.proto_min}-{self.proto_max}, "
                f"{h.get('host')} speaks {pmin}-{pmax}: upgrade the older host"
            )
        self._peer_hello = dict(h)
        self.peer = PeerInfo(str(h.get("host", "?")), str(h.get("software", "?")), proto,
                             self.channel, dict(h))
        if self.role == "server":
            return [self._hello()]
        return [Frame(FrameType.AUTH, {"mac": self._auth_for("client")})]
