"""What a power loss may not take: the state root's files and links, and the cluster secret.

The fsyncs are observed by wrapping ``os.fsync``/``os.fdatasync``/``os.replace``/``os.rename``
and naming each synced descriptor through ``/proc/self/fd``; a write is durable when its
data was synced before the rename and the directory after it. A secret that is empty or
too short is refused by marsd, by marsadm, by every channel and by both handshake sides.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import socket
import stat
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import BIN, MarsHost, loopback_ips

from marslib import cli
from marslib.durable import mkdir_durably, replace_symlink, write_file_durably
from marslib.errors import MarsError
from marslib.formats.frame import Frame, FrameParser, FrameType, encode_frame
from marslib.meta import MetaStore, MetaValue
from marslib.metasync import MetaSync
from marslib.net.conn import PeerBundle, connect, read_secret, serve
from marslib.net.handshake import Handshake, HandshakeError, PeerInfo, _mac

UUID = "3c1bdf25-7a0e-4c55-9a3b-2f4b1f6c0d11"
GOOD = b"0123456789abcdef" * 2


# ------------------------------------------------------------------ fsync recorder
@dataclass
class SyncLog:
    """Every fsync (by path) and rename, in order."""

    events: list[tuple[str, str, str]] = field(default_factory=list)

    def synced(self, path: Path) -> list[int]:
        return [i for i, e in enumerate(self.events) if e[0] == "fsync" and e[1] == str(path)]

    def renamed_to(self, path: Path) -> list[int]:
        return [i for i, e in enumerate(self.events) if e[0] == "rename" and e[2] == str(path)]

    def rename_source(self, i: int) -> Path:
        return Path(self.events[i][1])

    def fsyncs(self) -> list[str]:
        return [e[1] for e in self.events if e[0] == "fsync"]

    def assert_durable_replace(self, path: Path) -> int:
        """``path`` was renamed into place from a temporary that was synced before, and its
        directory was synced after; returns the index of that directory fsync."""
        renames = self.renamed_to(path)
        assert renames, f"{path} was not renamed into place: {self.events}"
        last = renames[-1]
        dir_syncs = [i for i in self.synced(path.parent) if i > last]
        assert dir_syncs, f"{path.parent} not fsynced after the rename: {self.events}"
        return dir_syncs[0]

    def assert_durable_file(self, path: Path) -> int:
        last = self.renamed_to(path)[-1] if self.renamed_to(path) else -1
        assert last >= 0, f"{path} was not renamed into place: {self.events}"
        tmp = self.rename_source(last)
        assert tmp.parent == path.parent and tmp.name.startswith(".")
        assert any(i < last for i in self.synced(tmp)), \
            f"{tmp} (the data of {path}) was not fsynced before its rename: {self.events}"
        return self.assert_durable_replace(path)


@pytest.fixture
def synclog(monkeypatch: pytest.MonkeyPatch) -> Iterator[SyncLog]:
    log = SyncLog()
    real_fsync, real_fdatasync = os.fsync, os.fdatasync
    real_replace, real_rename = os.replace, os.rename

    def fd_path(fd: int) -> str:
        return os.readlink(f"/proc/self/fd/{fd}")

    def fsync(fd: int) -> None:
        log.events.append(("fsync", fd_path(fd), ""))
        real_fsync(fd)

    def fdatasync(fd: int) -> None:
        log.events.append(("fsync", fd_path(fd), ""))
        real_fdatasync(fd)

    def replace(src: str | Path, dst: str | Path, **kw: object) -> None:
        real_replace(src, dst, **kw)  # type: ignore[arg-type]
        log.events.append(("rename", os.path.abspath(src), os.path.abspath(dst)))

    def rename(src: str | Path, dst: str | Path, **kw: object) -> None:
        real_rename(src, dst, **kw)  # type: ignore[arg-type]
        log.events.append(("rename", os.path.abspath(src), os.path.abspath(dst)))

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "fdatasync", fdatasync)
    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(os, "rename", rename)
    yield log


# ------------------------------------------------------------------ the helper
def test_a_file_is_synced_before_its_rename_and_its_directory_after(
        tmp_path: Path, synclog: SyncLog) -> None:
    target = tmp_path / "secret"
    target.write_bytes(b"old and longer than the new one\n")
    write_file_durably(target, b"new\n", 0o600)
    synclog.assert_durable_file(target)
    assert target.read_bytes() == b"new\n"
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["secret"], "a temporary file was left"


def test_a_durable_link_syncs_its_directory_and_a_cheap_one_syncs_nothing(
        tmp_path: Path, synclog: SyncLog) -> None:
    link = tmp_path / "uuid"
    replace_symlink(link, "value-1", mtime_ns=1234567890123)
    synclog.assert_durable_replace(link)
    assert os.readlink(link) == "value-1" and os.lstat(link).st_mtime_ns == 1234567890123
    before = len(synclog.fsyncs())
    replace_symlink(link, "value-2", durable=False)
    assert os.readlink(link) == "value-2"
    assert len(synclog.fsyncs()) == before, "a non-durable link write paid for an fsync"


def test_new_directories_are_synced_into_their_parents(tmp_path: Path,
                                                       synclog: SyncLog) -> None:
    mkdir_durably(tmp_path / "mars" / "resource-r0")
    assert (tmp_path / "mars" / "resource-r0").is_dir()
    assert synclog.synced(tmp_path) and synclog.synced(tmp_path / "mars")
    n = len(synclog.events)
    mkdir_durably(tmp_path / "mars" / "resource-r0")
    assert len(synclog.events) == n, "an existing directory was synced again"


def test_a_durable_metadata_key_survives_and_a_position_key_stays_cheap(
        tmp_path: Path, synclog: SyncLog) -> None:
    root = tmp_path / "mars"
    meta = MetaStore(root)
    # a cheap write creates the resource directory first: the durable one must still
    # make that directory's entry in the root durable
    meta.set("resource-r0/replay-alpha", "1,0,0,alpha")
    assert synclog.fsyncs() == [], "a non-durable metadata write paid for an fsync"
    meta.set("resource-r0/todo-alpha/attach", "1", durable=True)
    link = root / "resource-r0" / "todo-alpha" / "attach"
    at = synclog.assert_durable_replace(link)
    assert any(i > at for i in synclog.synced(root / "resource-r0"))
    assert any(i > at for i in synclog.synced(root)), \
        "the root was not synced: the resource directory itself may vanish"
    n = len(synclog.fsyncs())
    assert meta.merge(MetaValue("uuid", UUID, 1), durable=True)
    synclog.assert_durable_replace(root / "uuid")
    assert len(synclog.fsyncs()) > n


# ------------------------------------------------------------------ create/join-cluster
def _marsadm(tmp: Path, host: str, *args: str) -> int:
    return cli.main([*args, "--root", str(tmp / host / "mars"), "--run-dir",
                     str(tmp / host / "run"), "--host", host, "--json"])


def test_create_cluster_makes_the_secret_durable_before_the_uuid(
        tmp_path: Path, synclog: SyncLog, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "alpha" / "mars"
    assert _marsadm(tmp_path, "alpha", "create-cluster", "--ip", "127.0.0.1") == 0
    capsys.readouterr()
    secret_synced = synclog.assert_durable_file(root / "secret")
    assert synclog.synced(tmp_path / "alpha"), "the new root's entry was not synced"
    synclog.assert_durable_replace(root / "ips" / "ip-alpha")
    uuid_renamed = synclog.renamed_to(root / "uuid")[-1]
    assert secret_synced < uuid_renamed, "the uuid (membership) may survive a lost secret"
    synclog.assert_durable_replace(root / "uuid")
    secret = (root / "secret").read_bytes()
    assert len(secret.strip()) >= 16 and secret.endswith(b"\n")
    assert stat.S_IMODE((root / "secret").stat().st_mode) == 0o600
    assert not [p for p in root.iterdir() if p.name.startswith(".")], "temporaries left"

    # a second host joining from alpha's root gets the same guarantees
    broot = tmp_path / "beta" / "mars"
    synclog.events.clear()
    assert _marsadm(tmp_path, "beta", "join-cluster", "alpha", "--ip", "127.0.0.2",
                    "--from-root", str(root)) == 0
    capsys.readouterr()
    at = synclog.assert_durable_file(broot / "secret")
    assert at < synclog.renamed_to(broot / "uuid")[-1]
    synclog.assert_durable_replace(broot / "uuid")
    assert (broot / "secret").read_bytes() == secret
    assert stat.S_IMODE((broot / "secret").stat().st_mode) == 0o600


def test_join_cluster_refuses_a_member_whose_secret_is_damaged(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "alpha" / "mars"
    assert _marsadm(tmp_path, "alpha", "create-cluster") == 0
    (root / "secret").write_bytes(b"")
    capsys.readouterr()
    assert _marsadm(tmp_path, "beta", "join-cluster", "alpha", "--ip", "127.0.0.2",
                    "--from-root", str(root)) == 1
    out = capsys.readouterr().out
    assert "secret is empty" in out and "copy it from another member" in out
    assert not (tmp_path / "beta" / "mars" / "uuid").is_symlink()


# ------------------------------------------------------------------ marsd
def _marsd_outcome(host: MarsHost, timeout: float = 30) -> tuple[int | None, str]:
    """Start marsd; (exit code, log) once it exits, (None, log) once its metadata port
    (opened only after the secret was read) takes connections instead."""
    with open(host.log_path, "ab") as logf:
        proc = subprocess.Popen([str(BIN / "marsd"), "--listen", host.ip, "--metrics", "off"],
                                env=host.env, stdin=subprocess.DEVNULL, stdout=logf,
                                stderr=logf, start_new_session=True)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            code = proc.poll()
            if code is not None:
                return code, host.log_path.read_text()
            try:
                socket.create_connection((host.ip, 7777), timeout=1).close()
                return None, host.log_path.read_text()  # it serves
            except OSError:
                pass
            time.sleep(0.02)
        raise AssertionError(f"marsd neither served nor exited: {host.logtail()}")
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(timeout=30)


@pytest.mark.parametrize("content", [b"", b"\n", b"12345\n", b"0123456789abcde fg\n"],
                         ids=["empty", "newline", "5-bytes", "two-words"])
def test_marsd_refuses_to_start_with_an_empty_or_short_secret(
        tmp_path: Path, content: bytes) -> None:
    host = MarsHost(tmp_path, ip=loopback_ips(1)[0])
    host.marsadm("create-cluster", "--ip", host.ip)
    secret = host.root / "secret"
    secret.write_bytes(content)  # what a power loss right after create-cluster left
    code, log = _marsd_outcome(host)
    assert code == 1, f"marsd ran with a secret of {content!r}:\n{log}"
    assert str(secret) in log and "refusing this cluster secret" in log
    assert "copy it from another member" in log and "openssl rand -hex 32" in log
    with pytest.raises(OSError):
        socket.create_connection((host.ip, 7777), timeout=5).close()


def test_marsd_says_how_to_restore_a_missing_secret_and_runs_once_restored(
        tmp_path: Path) -> None:
    host = MarsHost(tmp_path, ip=loopback_ips(1)[0])
    host.marsadm("create-cluster", "--ip", host.ip)
    good = (host.root / "secret").read_bytes()
    (host.root / "secret").unlink()
    code, log = _marsd_outcome(host)
    assert code == 1 and "is missing" in log and "copy it from another member" in log
    (host.root / "secret").write_bytes(good)
    code, log = _marsd_outcome(host)
    assert code is None, f"marsd did not start with its secret restored:\n{log}"


def test_read_secret_applies_the_rule(tmp_path: Path) -> None:
    path = tmp_path / "secret"
    path.write_bytes(GOOD + b"\n")
    assert read_secret(path) == GOOD
    for bad in (b"", b"  \n", b"short\n", GOOD[:15]):
        path.write_bytes(bad)
        with pytest.raises(MarsError, match="copy it from another member"):
            read_secret(path)


# ------------------------------------------------------------------ handshake and channels
@pytest.mark.parametrize("role", ["client", "server"])
def test_neither_handshake_side_runs_with_an_empty_or_short_secret(role: str) -> None:
    with pytest.raises(MarsError, match="the secret is empty"):
        Handshake(role, "alpha", UUID, b"", "meta")
    with pytest.raises(MarsError, match="fewer than 16"):
        Handshake(role, "alpha", UUID, b"short", "meta")


def test_no_channel_runs_with_an_empty_or_short_secret(tmp_path: Path) -> None:
    ip = loopback_ips(1)[0]

    async def handler(frame: Frame, peer: PeerInfo) -> Frame:
        return Frame(FrameType.PONG, {"peer": peer.host})

    async def scenario() -> None:
        for bad in (b"", b"12345"):
            for channel, port in (("meta", 7777), ("fetch", 7778), ("sync", 7779)):
                with pytest.raises(MarsError, match="refusing this cluster secret"):
                    server = await serve(ip, port, handler, host="alpha", uuid=UUID,
                                         secret=bad, channel=channel)
                    server.close()
                with pytest.raises(MarsError, match="refusing this cluster secret"):
                    PeerBundle("beta", lambda: None, host="alpha", uuid=UUID,
                               secret=bad, channel=channel)
            with pytest.raises(MarsError, match="refusing this cluster secret"):
                MetaSync(MetaStore(tmp_path / "mars"), "alpha", UUID, bad, 7777)
        # a client with an empty or short secret does not even dial
        for bad in (b"", b"12345"):
            with pytest.raises(MarsError, match="refusing to authenticate"):
                await connect(ip, 7777, host="alpha", uuid=UUID, secret=bad, channel="meta")

    asyncio.run(scenario())


async def _forge(ip: str, port: int, key: bytes) -> list[Frame]:
    """A peer that knows the cluster uuid and only ``key``: every frame it gets back."""
    reader, writer = await asyncio.open_connection(ip, port)
    parser = FrameParser()
    got: list[Frame] = []
    nonce = secrets.token_hex(16)
    writer.write(encode_frame(Frame(FrameType.HELLO, {
        "host": "mallory", "uuid": UUID, "proto_min": 1, "proto_max": 1, "channel": "meta",
        "nonce": nonce})))
    await writer.drain()
    try:
        while True:
            data = await asyncio.wait_for(reader.read(65536), 10)
            if not data:
                break
            for f in parser.feed(data):
                got.append(f)
                if f.type == FrameType.HELLO:
                    mac = _mac(key, "client", nonce, str(f.get("nonce")), UUID, "mallory",
                               str(f.get("host")), "meta")
                    writer.write(encode_frame(Frame(FrameType.AUTH, {"mac": mac})))
                    await writer.drain()
                elif f.type == FrameType.AUTH:
                    writer.write(encode_frame(Frame(FrameType.PING, {"rid": 1})))
                    await writer.drain()
                elif f.type == FrameType.PONG:
                    writer.close()
                    return got
    except ConnectionError:
        pass
    writer.close()
    return got


def test_a_peer_that_knows_only_the_empty_secret_gets_nothing() -> None:
    ip = loopback_ips(1)[0]

    async def handler(frame: Frame, peer: PeerInfo) -> Frame:
        return Frame(FrameType.PONG, {"secret": "data"})

    async def scenario() -> None:
        # a server whose secret file was emptied does not listen at all...
        with pytest.raises(MarsError):
            server = await serve(ip, 7777, handler, host="alpha", uuid=UUID, secret=b"",
                                 channel="meta")
            try:
                got = await _forge(ip, 7777, b"")
                raise AssertionError(f"an empty-secret peer was served: {got}")
            finally:
                server.close()
        with pytest.raises(ConnectionRefusedError):
            await _forge(ip, 7777, b"")
        # ...and one with the real secret answers the forger with a refusal and nothing else
        server = await serve(ip, 7777, handler, host="alpha", uuid=UUID, secret=GOOD,
                             channel="meta")
        try:
            got = await _forge(ip, 7777, b"")
        finally:
            server.close()
        assert [f.type for f in got] == [FrameType.HELLO, FrameType.ERROR]
        assert "authentication failed" in str(got[-1].get("error"))

    asyncio.run(scenario())


def test_the_sans_io_server_refuses_a_client_mac_made_with_the_empty_secret() -> None:
    server = Handshake("server", "alpha", UUID, GOOD, "meta")
    nonce = secrets.token_hex(16)
    replies = server.receive(Frame(FrameType.HELLO, {"host": "mallory", "uuid": UUID,
                                                     "nonce": nonce, "channel": "meta"}))
    mac = _mac(b"", "client", nonce, str(replies[0].get("nonce")), UUID, "mallory", "alpha",
               "meta")
    with pytest.raises(HandshakeError) as exc:
        server.receive(Frame(FrameType.AUTH, {"mac": mac}))
    assert exc.value.reply is not None and exc.value.reply.type == FrameType.ERROR
    assert not server.done
