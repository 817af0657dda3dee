"""Rolling upgrades: this release against a copy of itself patched to be the next
release (protocol 2 with an extra JSON key in every frame, log format 1.3 with an extra
header field in every record), as primary and as secondary; a too-new major is refused."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import (
    NBD_CLIENT,
    REPO,
    SYSTEM_PYTHON,
    BlockDev,
    MarsHost,
    loopback_ips,
    needs_libnbd,
    wait_in_sync,
    wait_until,
)

from marslib.formats.frame import Frame, FrameType
from marslib.logfile import LogScanner
from marslib.net.handshake import Handshake, HandshakeError

SIZE = 64 << 20
NEXT_VERSION = "0.2.0-next"
EXTRA_FIELD = b"NXT1\x07\x00\x00\x00"
SECRET = b"a-cluster-secret-of-16+-bytes"


def patch(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, f"test double: {old!r} not found in {path}"
    path.write_text(text.replace(old, new))


def make_next_release(dest: Path) -> Path:
    """A copy of marslib that behaves like the next release."""
    pkg = dest / "marslib"
    shutil.copytree(REPO / "marslib", pkg, ignore=shutil.ignore_patterns("__pycache__"))
    patch(pkg / "__init__.py", '__version__ = "', f'__version__ = "{NEXT_VERSION}"  # was "')
    patch(pkg / "formats" / "frame.py", "PROTO_VERSION = 1 ", "PROTO_VERSION = 2 ")
    patch(pkg / "formats" / "frame.py",
          'header = json.dumps(frame.header, separators=(",", ":")).encode()',
          'header = json.dumps({**frame.header, "next_release_key": {"x": 1}}, '
          'separators=(",", ":")).encode()')
    patch(pkg / "formats" / "logrecord.py", "FORMAT_MINOR = 2", "FORMAT_MINOR = 3")
    patch(pkg / "formats" / "logrecord.py", '    extra = b""  # fields of a later minor',
          f'    extra = {EXTRA_FIELD!r}  # fields of a later minor')
    patch(pkg / "formats" / "logrecord.py", "    data = record.data\n",
          f"    if not record.extension:\n"
          f"        import dataclasses\n"
          f"        record = dataclasses.replace(record, extension={EXTRA_FIELD!r})\n"
          f"    data = record.data\n")
    return dest


@pytest.fixture
def mixed(tmp_path: Path) -> Iterator[tuple[MarsHost, MarsHost, BlockDev, BlockDev]]:
    nxt = make_next_release(tmp_path / "next")
    ip_a, ip_b = loopback_ips(2)
    old = MarsHost(tmp_path / "old", "old", ip_a)
    new = MarsHost(tmp_path / "new", "new", ip_b, code=nxt)
    dev_old, dev_new = BlockDev(tmp_path / "old.img", SIZE), BlockDev(tmp_path / "new.img", SIZE)
    yield old, new, dev_old, dev_new
    old.stop()
    new.stop()
    dev_old.close()
    dev_new.close()


def write(host: MarsHost, seed: int) -> int:
    w = subprocess.Popen([SYSTEM_PYTHON, str(NBD_CLIENT), host.nbd_uri("r0"), "writer",
                          str(seed), "8", "512", "65536", "1.5"], stdout=subprocess.PIPE,
                         text=True)
    return w.communicate(timeout=60)[0].count("\nA ")


@needs_libnbd
def test_old_and_new_release_replicate_both_ways(mixed) -> None:  # type: ignore[no-untyped-def]
    old, new, dev_old, dev_new = mixed
    old.serve(dev_old.path)
    new.join(old, dev_new.path)
    link = old.root / "version-new"
    wait_until(lambda: link.is_symlink() and str(link.readlink()) == NEXT_VERSION,
               "the double announces its version")
    # the old release as primary, the new one as secondary
    assert write(old, 51) > 20
    wait_in_sync(old, new)
    # hand over: the new release as primary writes format 1.3 records
    new.marsadm("primary", "r0")
    assert write(new, 52) > 20
    wait_in_sync(new, old)
    old.marsadm("pause-replay", "r0")
    assert dev_old.read() == dev_new.read()
    newer = [rec for path in sorted((old.root / "resource-r0").glob("log-*-new"))
             for _, _, rec in LogScanner(path) if rec.data_len]
    assert newer, "the old release fetched no records of the new one"
    # a marker may carry padding after the new field
    assert all(r.format_version == 0x0103 and r.extension[:len(EXTRA_FIELD)] == EXTRA_FIELD
               for r in newer)
    assert any(r.is_commit for r in newer), "the new release's commit marks were not read"


def test_a_too_new_protocol_is_refused_with_a_clear_message() -> None:
    server = Handshake("server", "old", "u", SECRET, "meta")
    future = Frame(FrameType.HELLO, {"host": "future", "uuid": "u", "nonce": "n" * 32,
                                     "proto_min": 2, "proto_max": 3, "channel": "meta"})
    with pytest.raises(HandshakeError) as exc:
        server.receive(future)
    assert "no common protocol version" in exc.value.reason and "upgrade" in exc.value.reason
    assert exc.value.reply is not None and exc.value.reply.type == FrameType.ERROR


def test_unknown_json_keys_and_a_newer_version_field_are_accepted() -> None:
    server = Handshake("server", "old", "u", SECRET, "meta")
    client = Handshake("client", "new", "u", SECRET, "meta", proto_max=2)
    hello = client.start()[0]
    hello.header["a_key_from_the_future"] = [1, 2]
    replies = server.receive(hello)
    auth = client.receive(replies[0])
    server_auth = server.receive(auth[0])
    client.receive(server_auth[0])
    assert server.done and client.done and server.peer is not None
    assert server.peer.proto == 1 and client.peer is not None and client.peer.proto == 1


def make_previous_release(dest: Path) -> Path:
    """A copy of marslib whose primary does not know the one-read sync (SYNC_DIFF_REQ)."""
    pkg = dest / "marslib"
    shutil.copytree(REPO / "marslib", pkg, ignore=shutil.ignore_patterns("__pycache__"))
    patch(pkg / "sync.py", "        if frame.type == FrameType.SYNC_DIFF_REQ:",
          "        if False:  # the previous release had no one-read sync")
    return dest


@needs_libnbd
def test_sync_from_a_primary_without_one_read_sync_falls_back(tmp_path: Path) -> None:
    prev = make_previous_release(tmp_path / "prev")
    ip_a, ip_b = loopback_ips(2)
    old = MarsHost(tmp_path / "old", "old", ip_a, code=prev)
    new = MarsHost(tmp_path / "new", "new", ip_b)
    dev_old, dev_new = BlockDev(tmp_path / "old.img", SIZE), BlockDev(tmp_path / "new.img", SIZE)
    try:
        old.serve(dev_old.path)
        assert write(old, 71) > 20
        new.join(old, dev_new.path)
        assert "checksums + reads" in new.logtail(200)
        wait_in_sync(old, new)
        new.marsadm("pause-replay", "r0")
        assert dev_old.read() == dev_new.read()
    finally:
        old.stop()
        new.stop()
        dev_old.close()
        dev_new.close()
