"""The lab as a Python object: bring it up, run things in its hosts, shape and cut links."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from marslib.lab import (
    claims,
    cleanup,
    devices,
    inventory,
    marsd,
    netns,
    partition,
    shaping,
    sshd,
)
from marslib.lab.addresses import MAX_HOSTS, Net, host_name
from marslib.lab.errors import LabCommandError, LabError, LabUnsupported
from marslib.lab.run import ns_prefix, run
from marslib.lab.state import (
    DEFAULT_LAB_DIR,
    LAB_MARK,
    MARKER,
    REPO,
    HostState,
    LabState,
    LinkProfile,
    default_lab_dir,
    host_dir,
    locked,
    venv_bin,
)

log = logging.getLogger("marslib.lab")

SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
Mode = Literal["netns", "local"]


@dataclass
class LabHost:
    """One lab host: a namespace with an IP, a state root, a run dir and data devices."""

    name: str
    index: int
    ip: str
    netns: str | None  # None for a local (non-root) lab: the host is just an address
    root: Path  # MARS_ROOT
    run_dir: Path  # MARS_RUN_DIR
    devices: list[str]  # loop devices (or the image files in a local lab)
    images: list[Path]  # backing files
    dir: Path  # hosts/labN in the lab directory
    lab_env: dict[str, str] = field(repr=False)  # what the lab sets (ssh sessions get it too)

    @property
    def env(self) -> dict[str, str]:
        """The complete environment of a command in this host."""
        return {**os.environ, **self.lab_env,
                "PATH": f"{self.lab_env['PATH']}:{os.environ.get('PATH', '')}".rstrip(":")}

    def __str__(self) -> str:
        return self.name


HostRef = str | LabHost


class Lab:
    """A running lab, described by ``state.json`` in its directory."""

    def __init__(self, state: LabState) -> None:
        self.state = state
        self.dir = Path(state.lab_dir)
        self.hosts = [self._host(h) for h in state.hosts]
        self._procs: dict[int, subprocess.Popen[bytes]] = {}

    # ---------------------------------------------------------------- life cycle
    @classmethod
    def load(cls, lab_dir: Path | str | None = None) -> Lab:
        """The lab in ``lab_dir`` (default ``$MARS_LAB_DIR`` or /var/tmp/mars-lab)."""
        path = Path(lab_dir).absolute() if lab_dir else default_lab_dir()
        return cls(LabState.load(path))

    @classmethod
    def up(cls, hosts: int = 2, far: bool = False, device_size: int | str = "256M",
           devices: int = 1, *, lab_dir: Path | str | None = None,
           net: int | Literal["auto"] | None = None, mode: Mode | None = None) -> Lab:
        """Bring up ``hosts`` lab hosts, after removing whatever an older lab left.

        ``net``: the lab network number (0: 10.77.0.0/24 ``marslab0``); default
        ``$MARS_LAB_NET``, else 0 for the default lab directory and a free one ("auto")
        for any other directory. ``mode``: "netns" (needs root) or "local" (hosts are
        processes on 127.0.N.x, devices are plain files, no ssh or shaping); default
        ``$MARS_LAB_MODE``, else netns when running as root.
        """
        if not 1 <= hosts <= MAX_HOSTS:
            raise LabError(f"--hosts {hosts}: use 1..{MAX_HOSTS}")
        if devices < 0:
            raise LabError(f"--devices {devices}: must not be negative")
        size = _parse_size(device_size)
        path = Path(lab_dir).absolute() if lab_dir else default_lab_dir()
        chosen = mode or os.environ.get("MARS_LAB_MODE") or _default_mode()
        if chosen not in ("netns", "local"):
            raise LabError(f"lab mode {chosen!r}: use netns or local")
        if chosen == "netns" and _default_mode() != "netns":
            raise LabUnsupported("a netns lab needs root, ip and nsenter; use mode local")
        local = chosen == "local"
        _down_dir(path)
        path.mkdir(parents=True)  # before the claim: a claim whose directory exists is live
        (path / LAB_MARK).write_text("made by mars-lab up; `mars-lab down` removes it all\n")
        try:
            index = _choose_net(path, net, local)
        except BaseException:
            shutil.rmtree(path, ignore_errors=True)
            raise
        net_obj = Net(index, local=local)
        state = LabState(lab_dir=str(path), net=index, mode=chosen, far=far, hosts=[])
        try:
            _build(state, net_obj, hosts, size, devices)
        except BaseException:
            log.error("lab: bringing up %s failed; cleaning up", path)
            cleanup.teardown(path, [net_obj])
            raise
        lab = cls(state)
        log.info("lab: up in %s: %s", path, ", ".join(f"{h.name}={h.ip}" for h in lab.hosts))
        return lab

    def down(self) -> list[str]:
        """Remove the whole lab (processes, mounts, loop devices, namespaces, directory).

        Returns what could not be removed (empty when all went).
        """
        for proc in self._procs.values():
            proc.poll()
        if self.dir.is_dir():
            with locked(self.dir):
                left = cleanup.teardown(self.dir, [self.net])
        else:
            left = cleanup.teardown(self.dir, [self.net])
        for proc in self._procs.values():
            proc.poll()
        return left

    # ---------------------------------------------------------------- naming
    @property
    def net(self) -> Net:
        return self.state.netobj

    @property
    def local(self) -> bool:
        return self.state.local

    @property
    def key(self) -> Path:
        """The lab's ssh private key (accepted as root by every host)."""
        return self.dir / "id_ed25519"

    @property
    def ssh_config(self) -> Path:
        return self.dir / "ssh_config"

    @property
    def inventory(self) -> Path:
        return self.dir / "inventory.ini"

    def host(self, host: HostRef) -> LabHost:
        name = host.name if isinstance(host, LabHost) else host
        for h in self.hosts:
            if h.name == name:
                return h
        raise LabError(f"no lab host {name!r}: the lab has {', '.join(self._names())}")

    def _names(self) -> list[str]:
        return [h.name for h in self.hosts]

    def _host(self, h: HostState) -> LabHost:
        hdir = host_dir(self.dir, h.name)
        root, run_dir = hdir / "mars", hdir / "run"
        env = {"MARS_ROOT": str(root), "MARS_RUN_DIR": str(run_dir), "MARS_HOST": h.name,
               "MARS_LAB_IP": h.ip, "PYTHONPATH": str(REPO), MARKER: str(self.dir),
               "PATH": f"{venv_bin()}:{SYSTEM_PATH}"}
        return LabHost(h.name, h.index, h.ip, h.netns, root, run_dir, list(h.devices),
                       [Path(p) for p in h.images], hdir, env)

    # ---------------------------------------------------------------- commands
    def exec(self, host: HostRef, *cmd: str, check: bool = True, timeout: float = 60,
             input: str | None = None) -> subprocess.CompletedProcess[str]:
        """Run ``cmd`` in ``host`` (its namespace and environment), capturing its output."""
        h = self.host(host)
        if not cmd:
            raise LabError("exec: no command given")
        return run([*ns_prefix(h.netns), *cmd], check=check, timeout=timeout, env=h.env,
                   input=input)

    def popen(self, host: HostRef, *cmd: str, **kw: Any) -> subprocess.Popen[Any]:
        """Start ``cmd`` in ``host`` in the background (``subprocess.Popen`` keywords)."""
        h = self.host(host)
        kw.setdefault("env", h.env)
        kw.setdefault("stdin", subprocess.DEVNULL)
        return subprocess.Popen([*ns_prefix(h.netns), *cmd], **kw)

    def ssh(self, host: HostRef, *cmd: str, check: bool = True,
            timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """Run ``cmd`` in ``host`` over real ssh with the lab key."""
        self.require_netns("ssh")
        out = run(sshd.ssh_argv(self.ssh_config, self.host(host).name, *cmd), check=check,
                  timeout=timeout)
        return out

    def marsadm(self, host: HostRef, *args: str, check: bool = True,
                timeout: float = 60) -> dict[str, Any]:
        """``marsadm ARGS --json`` in ``host``; the parsed reply with ``rc`` added."""
        h = self.host(host)
        marsadm_bin = venv_bin() / "marsadm"
        prog = ([str(marsadm_bin)] if marsadm_bin.exists()
                else [str(venv_bin() / "python"), str(REPO / "bin" / "marsadm")])
        cmd = [*prog, *args, "--json"]
        out = self.exec(h, *cmd, check=False, timeout=timeout)
        try:
            reply = json.loads(out.stdout) if out.stdout.strip() else {}
            if not isinstance(reply, dict):
                reply = {"reply": reply}
        except json.JSONDecodeError:
            reply = {"stdout": out.stdout}
        reply["rc"] = out.returncode
        if check and out.returncode != 0:
            raise LabCommandError([*cmd], out.returncode, out.stdout, out.stderr,
                                  f"--- marsd log of {h.name} (tail) ---\n{self.marsd_log_tail(h)}")
        return reply

    # ---------------------------------------------------------------- marsd
    def marsd_start(self, host: HostRef, *extra: str, timeout: float = 30) -> int:
        """Start marsd in ``host``; returns its pid once ``marsadm view`` sees it running."""
        h = self.host(host)
        if (pid := marsd.running_pid(h.dir)) is not None:
            raise LabError(f"marsd already runs on {h.name} (pid {pid}): marsd_stop it first")
        h.run_dir.mkdir(parents=True, exist_ok=True)
        proc = marsd.start(h.dir, h.netns, h.ip, h.env, extra)
        self._procs[proc.pid] = proc
        deadline = time.monotonic() + timeout
        sock = h.run_dir / "marsd.sock"
        while True:
            if proc.poll() is not None:
                raise LabError(f"marsd on {h.name} exited with {proc.returncode}:\n"
                               f"{self.marsd_log_tail(h)}")
            if sock.exists():
                reply = self.marsadm(h, "view", check=False, timeout=max(5.0, timeout))
                if reply.get("marsd") is True:
                    return proc.pid
            if time.monotonic() > deadline:
                raise LabError(f"marsd on {h.name} did not answer within {timeout} s:\n"
                               f"{self.marsd_log_tail(h)}")
            time.sleep(0.05)

    def marsd_stop(self, host: HostRef, timeout: float = 30) -> None:
        """SIGTERM marsd in ``host`` and wait (SIGKILL after ``timeout``)."""
        h = self.host(host)
        marsd.stop(h.dir, timeout)
        self._reap()

    def marsd_kill(self, host: HostRef) -> None:
        """SIGKILL marsd in ``host`` (a crash) and wait until it is gone."""
        marsd.kill(self.host(host).dir)
        self._reap()

    def marsd_restart(self, host: HostRef, *extra: str) -> int:
        self.marsd_stop(host)
        return self.marsd_start(host, *extra)

    def marsd_pid(self, host: HostRef) -> int | None:
        return marsd.running_pid(self.host(host).dir)

    def marsd_log(self, host: HostRef) -> str:
        try:
            return marsd.logfile(self.host(host).dir).read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def marsd_log_tail(self, host: HostRef, lines: int = 40) -> str:
        return marsd.tail(self.host(host).dir, lines)

    def _reap(self) -> None:
        for pid, proc in list(self._procs.items()):
            if proc.poll() is not None:
                del self._procs[pid]

    # ---------------------------------------------------------------- network faults
    def shape(self, host: HostRef, rate: str | None = None, delay: str | None = None,
              loss: str | None = None, storm: str | None = None) -> None:
        """Set ``host``'s link to exactly this profile (what is not given is off).

        ``rate`` "100mbit" (tbf, both directions), ``delay`` "25ms" one way (WAN proxy,
        MARS ports 7777-7779), ``loss`` "1%" (iptables, both directions), ``storm``
        "100x:2s/10s" (throughput / 100 for 2 s in every 10 s, MARS ports).
        """
        self.require_netns("shape")
        h = self.host(host)
        profile = LinkProfile(rate, delay, loss, storm, since=time.time())
        shaping.validate(profile)
        with locked(self.dir):
            state = LabState.load(self.dir)
            if profile.empty():
                state.shapes.pop(h.name, None)
            else:
                state.shapes[h.name] = profile
            shaping.apply(state)
            state.save()
            self.state = state

    def clear_shape(self, host: HostRef) -> None:
        self.shape(host)

    def partition(self, a: HostRef, b: HostRef) -> None:
        """Cut every packet between ``a`` and ``b`` (both directions) until ``heal``."""
        self._change_partitions(lambda st: partition.add(st, self.host(a).name,
                                                         self.host(b).name), a, b)

    def heal(self, a: HostRef, b: HostRef) -> None:
        self._change_partitions(lambda st: partition.remove(st, self.host(a).name,
                                                            self.host(b).name), a, b)

    def heal_all(self) -> None:
        self._change_partitions(_clear_partitions)

    def _change_partitions(self, change: Callable[[LabState], object], *hosts: HostRef) -> None:
        self.require_netns("partition")
        names = {self.host(h).name for h in hosts}
        if hosts and len(names) < 2:
            raise LabError("a partition needs two different hosts")
        with locked(self.dir):
            state = LabState.load(self.dir)
            change(state)
            partition.apply(state)
            state.save()
            self.state = state

    def require_netns(self, what: str) -> None:
        """Raise LabUnsupported (saying why) unless this is a netns lab."""
        if self.local:
            raise LabUnsupported(
                f"{what} needs a netns lab (run as root); this lab runs hosts as processes "
                f"on 127.0.{self.net.index}.x (mode local)")

    # ---------------------------------------------------------------- status
    def status(self) -> dict[str, Any]:
        state = LabState.load(self.dir)
        hosts = []
        for h in self.hosts:
            sshd_pid = _pidfile(h.dir / "sshd" / "sshd.pid")
            hosts.append({
                "name": h.name, "ip": h.ip, "netns": h.netns, "root": str(h.root),
                "run_dir": str(h.run_dir), "devices": h.devices,
                "images": [str(p) for p in h.images],
                "netns_exists": h.netns is None or (netns.NETNS_DIR / h.netns).exists(),
                "marsd_pid": marsd.running_pid(h.dir), "sshd_pid": sshd_pid,
                "shape": vars(state.shapes[h.name]) if h.name in state.shapes else None,
            })
        return {"lab_dir": str(self.dir), "mode": state.mode, "net": state.net,
                "bridge": None if self.local else self.net.bridge,
                "subnet": self.net.subnet, "far": state.far,
                "inventory": str(self.inventory),
                "ssh_config": None if self.local else str(self.ssh_config),
                "key": None if self.local else str(self.key),
                "hosts": hosts, "partitions": state.partitions}


# -------------------------------------------------------------------- helpers
def _default_mode() -> Mode:
    if os.geteuid() == 0 and shutil.which("ip") and shutil.which("nsenter"):
        return "netns"
    return "local"


def _parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    from marslib.errors import UsageError
    from marslib.sizes import parse_size
    try:
        return parse_size(size)
    except UsageError as exc:
        raise LabError(f"--device-size: {exc}") from None


def down_dir(path: Path) -> list[str]:
    """Remove the lab in ``path`` and anything it left (processes, loops, mounts, its nets),
    even without a readable state.json. Returns what could not be removed."""
    path = path.absolute()
    nets: list[Net] = []
    try:
        nets.append(LabState.load(path).netobj)
    except LabError:
        pass
    local = bool(nets) and nets[0].local
    nets += [Net(n, local=local) for n in claims.owned_by(path)
             if all(n != x.index for x in nets)]
    if not path.exists() and not nets:
        return []
    log.info("lab: removing the lab in %s", path)
    return cleanup.teardown(path, nets)


def _down_dir(path: Path) -> None:
    if path.is_dir() and not cleanup.is_lab_dir(path):
        if any(path.iterdir()):
            raise LabError(f"{path} exists and is not a lab directory: pick a new or empty "
                           "directory for MARS_LAB_DIR")
        path.rmdir()
    left = down_dir(path)
    if left:
        raise LabError(f"cannot clean up the old lab in {path}: {'; '.join(left)}")
    if path.exists():
        raise LabError(f"{path} still exists after cleanup: remove it or pick another "
                       "MARS_LAB_DIR")


def _choose_net(path: Path, net: int | Literal["auto"] | None, local: bool) -> int:
    if net is None:
        env = os.environ.get("MARS_LAB_NET")
        if env:
            if env != "auto" and not env.isdigit():
                raise LabError(f"MARS_LAB_NET={env!r}: use a number or auto")
            net = "auto" if env == "auto" else int(env)
        else:
            net = 0 if path == DEFAULT_LAB_DIR.absolute() else "auto"
    if net == "auto":
        in_use = set() if local else netns.nets_in_use()
        return claims.claim_free(path, in_use)
    index = Net(net).index  # range check
    owner = claims.owner(index)
    if owner is not None and owner != path:
        log.info("lab: net %d belongs to the lab in %s: taking it down", index, owner)
        _down_dir(owner)
    if not local:
        left = cleanup.teardown_net(Net(index))  # leftovers of a crashed lab
        if left:
            raise LabError(f"cannot clean up net {index}: {'; '.join(left)}")
    claims.claim(index, path)
    return index


def _build(state: LabState, net: Net, count: int, size: int, ndev: int) -> None:
    lab_dir = Path(state.lab_dir)
    if not net.local:
        netns.create_bridge(net)
    for i in range(1, count + 1):
        name = host_name(i)
        hdir = host_dir(lab_dir, name)
        for sub in ("mars", "run", "dev", "log"):
            (hdir / sub).mkdir(parents=True, exist_ok=True)
        ns = None if net.local else netns.create_host(net, i)
        images = devices.create_images(hdir / "dev", ndev, size)
        devs = ([devices.attach(p) for p in images] if not net.local and devices.can_attach()
                else [str(p) for p in images])
        state.hosts.append(HostState(name, i, net.ip(i), ns, devs, [str(p) for p in images]))
    state.save()
    lab = Lab(state)
    key = None
    if not net.local:
        if not sshd.available():
            raise LabError("sshd missing: apt-get install openssh-server (scripts/bootstrap.sh)")
        key = sshd.ensure_key(lab_dir)
        for h in lab.hosts:
            assert h.netns is not None
            sshd.start(h.dir / "sshd", h.netns, h.ip, lab_dir, h.lab_env)
        inventory.write_ssh_config(state, key)
        if state.far:
            now = time.time()
            for far_host in state.hosts[1:]:
                state.shapes[far_host.name] = LinkProfile(**shaping.FAR_PROFILE, since=now)
            shaping.apply(state)
    inventory.write_inventory(state, key, {
        h.name: inventory.host_vars(h.dir, h.root, h.run_dir, h.devices, h.images)
        for h in lab.hosts})
    state.save()


def _clear_partitions(state: LabState) -> None:
    state.partitions.clear()


def _pidfile(path: Path) -> int | None:
    from marslib.lab.run import pid_alive, read_pidfile
    pid = read_pidfile(path)
    return pid if pid is not None and pid_alive(pid) else None
