"""Creating, joining and leaving the cluster."""

from __future__ import annotations

import os
import secrets
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from marslib import __version__
from marslib.admin.context import Admin, Result
from marslib.durable import mkdir_durably, write_file_durably
from marslib.errors import Refused
from marslib.meta import MetaValue
from marslib.net.handshake import restore_hint, secret_problem
from marslib.schema import UUID, ResourceKeys, ip, ip_dir, ip_host, version


@dataclass(frozen=True)
class ClusterFacts:
    """What a new member copies from an existing one."""

    secret: bytes
    uuid: str
    uuid_stamp: int
    ips: tuple[tuple[str, str, int], ...]  # (HOST, address, stamp) of each ips/ip-HOST


@dataclass(frozen=True)
class SshPeer:
    address: str
    user: str = "root"
    port: int = 22
    key_file: str | None = None
    remote_root: str = "/mars"
    accept_new_host_key: bool = False


def new_uuid(given: str | None) -> str:
    return str(uuid.UUID(given)) if given else str(uuid.uuid4())


def new_secret() -> bytes:
    return secrets.token_hex(32).encode()


def _write_secret(admin: Admin, secret: bytes) -> None:
    """The secret file, mode 0600, durable before the uuid that makes this host a member."""
    mkdir_durably(admin.paths.root)
    write_file_durably(admin.paths.secret, secret + b"\n", 0o600)


def create_cluster(admin: Admin, address: str, cluster: str, secret: bytes) -> Result:
    if admin.meta.get(UUID) is not None:
        raise Refused(f"{admin.paths.root} already belongs to cluster {admin.meta.get(UUID)}; "
                      "use 'marsadm leave-cluster' first or another --root")
    if admin.dry_run:
        admin.say(f"would create cluster in {admin.paths.root} with host {admin.host}")
        return {"changed": True, "dry_run": True}
    _write_secret(admin, secret)  # replaces one left by a cluster that was left
    admin.meta.set(ip(admin.host), address, durable=True)
    admin.meta.set(version(admin.host), __version__)
    admin.meta.set(UUID, cluster, durable=True)
    admin.say(f"created cluster {cluster} in {admin.paths.root}; this host is {admin.host}")
    return {"changed": True, "uuid": cluster, "host": admin.host}


def _read_cluster(read_file: Callable[[str], bytes], readlink: Callable[[str], str],
                  lstat_ns: Callable[[str], int], listdir: Callable[[str], list[str]],
                  root: str) -> ClusterFacts:
    """secret, uuid, uuid stamp and ips/ of a member's state root, through any transport."""
    secret = read_file(f"{root}/secret").strip()
    uuid_value = readlink(os.path.join(root, UUID))
    ips = []
    for entry in listdir(os.path.join(root, ip_dir())):
        host = ip_host(os.path.join(ip_dir(), entry))
        if host is not None:
            path = os.path.join(root, ip(host))
            ips.append((host, readlink(path), lstat_ns(path)))
    return ClusterFacts(secret, uuid_value, lstat_ns(os.path.join(root, UUID)), tuple(ips))


def cluster_over_ssh(peer: SshPeer, timeout: float) -> ClusterFacts:
    import paramiko  # only this path needs it

    client = paramiko.SSHClient()
    client.load_system_host_keys()
    if peer.accept_new_host_key:
        client.set_missing_host_key_policy(paramiko.AutoAddPolicy())
    try:
        client.connect(peer.address, port=peer.port, username=peer.user,
                       key_filename=peer.key_file, timeout=timeout,
                       allow_agent=peer.key_file is None, look_for_keys=peer.key_file is None)
    except (paramiko.SSHException, OSError) as exc:
        raise Refused(f"cannot ssh to {peer.user}@{peer.address}:{peer.port}: {exc}") from None
    try:
        sftp = client.open_sftp()

        def read_file(path: str) -> bytes:
            with sftp.open(path) as f:
                return bytes(f.read())

        def lstat_ns(path: str) -> int:
            return int(sftp.lstat(path).st_mtime or 0) * 10**9

        return _read_cluster(read_file, sftp.readlink, lstat_ns, sftp.listdir,
                             peer.remote_root.rstrip("/"))
    except OSError as exc:
        raise Refused(f"{peer.address}:{peer.remote_root} holds no cluster ({exc}); check "
                      "--remote-root") from None
    finally:
        client.close()


def cluster_from_dir(root: str) -> ClusterFacts:
    root = root.rstrip("/")
    try:
        return _read_cluster(lambda p: Path(p).read_bytes(), os.readlink,
                             lambda p: os.lstat(p).st_mtime_ns, os.listdir, root)
    except OSError as exc:
        raise Refused(f"{root} holds no cluster ({exc})") from None


def given_cluster(secret: bytes, cluster: str, peer_name: str, peer_address: str
                  ) -> ClusterFacts:
    """Facts handed in (Ansible distributes them): the peer's own entry, with its real
    stamp, replaces this one on first contact."""
    return ClusterFacts(secret, cluster, 0, ((peer_name, peer_address, 0),))


def join_cluster(admin: Admin, address: str, peer: str,
                 fetch: Callable[[], ClusterFacts], where: str, checked: bool) -> Result:
    """Become a member: copy the secret, the uuid and the addresses of the cluster.
    ``fetch`` reads them (ssh, a local root, or given); ``checked``: the secret was
    checked already."""
    if admin.meta.get(UUID) is not None:
        raise Refused(f"{admin.paths.root} already belongs to cluster {admin.meta.get(UUID)}")
    if admin.dry_run:
        admin.say(f"would join the cluster of {peer} as {admin.host} ({address})")
        return {"changed": True, "dry_run": True}
    facts = fetch()
    if not facts.uuid:
        raise Refused(f"{where}/uuid is empty")
    if not checked and secret_problem(facts.secret) is not None:
        raise Refused(f"{where}/secret: {secret_problem(facts.secret)}: that member's cluster "
                      f"secret is damaged; restore it there first ({restore_hint()})")
    _write_secret(admin, facts.secret)
    for host, value, stamp in facts.ips:
        if value:
            admin.meta.merge(MetaValue(ip(host), value, stamp), durable=True)
    admin.meta.set(ip(admin.host), address, durable=True)
    admin.meta.set(version(admin.host), __version__)
    admin.meta.merge(MetaValue(UUID, facts.uuid, facts.uuid_stamp), durable=True)
    admin.say(f"joined cluster {facts.uuid} through {peer}; this host is {admin.host} "
              f"({address}); start marsd to exchange metadata")
    return {"changed": True, "uuid": facts.uuid, "host": admin.host}


def leave_cluster(admin: Admin) -> Result:
    admin.require_cluster()
    mine = [r for r in admin.paths.resources()
            if admin.meta.get(ResourceKeys(r).data(admin.host)) is not None]
    if mine:
        raise Refused(f"this host still holds resources {', '.join(mine)}: run "
                      "leave-resource for each first")
    if admin.meta.get(ip(admin.host)) is None:
        admin.say(f"{admin.host} is not a member of the cluster (any more): nothing changes")
        return {"changed": False}
    if admin.dry_run:
        admin.say(f"would remove {admin.host} from the cluster")
        return {"changed": True, "dry_run": True}
    admin.meta.delete(ip(admin.host))
    admin.say(f"{admin.host} left the cluster; stop marsd, then remove {admin.paths.root}")
    return {"changed": True}
