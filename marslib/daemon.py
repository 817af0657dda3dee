"""marsd: the per-host daemon. It follows the metadata tree and runs each resource's bricks.

For every resource whose ``todo-HOST/attach`` switch is on it runs a primary (logger,
writeback, NBD export) where the designated primary is this host, else a secondary (sync,
fetch, replay); otherwise it stops it. Each resource runs in a worker process of its own
(:mod:`marslib.worker`), or with ``--workers off`` in marsd's own loop. marsd itself keeps
the metadata exchange, the network ports, the control socket (marsadm) and this loop.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import signal
import socket
import time
from pathlib import Path
from typing import Any

from marslib import __version__, control, eventloop, logretention, schema
from marslib.devnode.service import COMMANDS as DEVICE_COMMANDS
from marslib.devnode.service import DeviceNodes
from marslib.errors import MarsError, UsageError
from marslib.fetch import FetchService
from marslib.layout import MarsPaths, check_host_name, check_resource_name
from marslib.logfile import first_record_stamp
from marslib.logger import LoggerConfig
from marslib.logsetup import setup_logging
from marslib.malloc_tuning import tune_malloc
from marslib.meta import MetaStore
from marslib.metasync import MetaSync
from marslib.metrics import serve_metrics
from marslib.net.conn import CONGESTION_ENV, check_congestion_control, read_secret, serve
from marslib.schema import ON, ResourceKeys, SyncStatus
from marslib.secondary import NetConfig
from marslib.sizes import format_size, parse_size
from marslib.space import LEVEL_NAMES, SpaceLimits, free_bytes
from marslib.status import DaemonStatus, PeerStatus
from marslib.sync import SyncService
from marslib.worker.handle import PrimaryHandle, PrimaryLog, SecondaryHandle
from marslib.worker.local import LocalPrimary, LocalSecondary
from marslib.worker.supervisor import WorkerHandle, WorkerPrimary, WorkerSecondary

log = logging.getLogger("marslib.daemon")

RETRY_FAILED_AFTER = 10.0
DEFAULT_ROTATE_SIZE = 256 << 20  # cron: rotate a logfile at this size ...
DEFAULT_ROTATE_AGE = 3600.0  # ... or when its first record is this many seconds old


class Marsd:
    """The daemon of one host."""

    def __init__(self, paths: MarsPaths, host: str, config: LoggerConfig,
                 listen: str | None = None, port_base: int = 7777,
                 connections: int = 2, space: SpaceLimits | None = None,
                 metrics: tuple[str, int] | None = ("127.0.0.1", 9577),
                 workers: bool = True, log_level: str = "INFO") -> None:
        self.paths = paths
        self.host = host
        self.config = config
        self.listen = listen
        self.port_base = port_base
        self.connections = connections
        self.workers = workers  # each resource in a worker process; False: in this loop
        self.log_level = log_level  # of the workers
        self.meta = MetaStore(paths.root)
        self.primaries: dict[str, PrimaryHandle] = {}
        self.secondaries: dict[str, SecondaryHandle] = {}
        self.starting: set[str] = set()  # primaries recovering their log
        self.net: NetConfig | None = None
        self.metasync: MetaSync | None = None
        self.servers: list[asyncio.Server] = []
        self.space = space or SpaceLimits()
        self.metrics = metrics
        self.space_level = 0
        self.space_free = 0
        self.failures: dict[str, tuple[float, str]] = {}
        self._lock = asyncio.Lock()
        self._poke = asyncio.Event()
        self._stop = asyncio.Event()
        self._control: asyncio.AbstractServer | None = None
        # block device nodes /dev/mars/R (marslib/devnode, docs/block-device.md)
        self.devnodes = DeviceNodes(host, paths, self.meta, serving=lambda: self.primaries)

    # --------------------------------------------------------------- control
    async def run(self) -> None:
        if not (self.paths.root / schema.UUID).is_symlink():
            raise MarsError(f"{self.paths.root} holds no cluster: run 'marsadm create-cluster'")
        self.paths.run_dir.mkdir(parents=True, exist_ok=True)
        sock = self.paths.control_socket
        if sock.exists():
            try:
                s = socket.socket(socket.AF_UNIX)
                s.connect(str(sock))
                s.close()
                raise MarsError(f"another marsd is already running on {sock}")
            except ConnectionRefusedError:
                sock.unlink()
        self._control = await asyncio.start_unix_server(self._client, path=str(sock),
                                                        limit=control.MAX_REQUEST)
        os.chmod(sock, 0o600)
        await self._start_network()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        self.meta.set(schema.version(self.host), __version__)
        self._reset_open_counts()
        log.info("marsd %s started on %s (root %s), resources %s", __version__, self.host,
                 self.paths.root, "in worker processes" if self.workers else "in-process")
        try:
            while not self._stop.is_set():
                try:
                    await self._round()
                except OSError as exc:  # the tree's disk (full, failing): not the daemon
                    log.error("this round of marsd's work stopped: %s; the next one starts "
                              "in 2 s", exc)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(2.0):  # not wait_for: see eventwait.py
                        await self._wait_poke_or_stop()
        finally:
            self._control.close()
            for server in self.servers:
                server.close()
            if self.metasync is not None:
                self.metasync.close()
            async with self._lock:
                for name in list(self.primaries) + list(self.secondaries):
                    await self._stop_resource(name)
            try:
                sock.unlink()
            except FileNotFoundError:
                pass
            log.info("marsd stopped")

    async def _start_network(self) -> None:
        uuid = self.meta.get(schema.UUID) or ""
        # MarsError if missing, empty or short: marsd refuses to run, saying how to restore it
        secret = read_secret(self.paths.secret)
        base = self.port_base
        self.net = NetConfig(uuid, secret, base, base + 1, base + 2, self.connections,
                             self.connections)
        listen = self.listen or self.meta.get(schema.ip(self.host)) or "0.0.0.0"
        self.metasync = MetaSync(self.meta, self.host, uuid, secret, base)
        fetch = FetchService(self.paths, self._logger_of, lambda name: name in self.starting)
        sync = SyncService(self._logger_of, self.paths)  # paths: it scans its logs
        common = {"host": self.host, "uuid": uuid, "secret": secret}
        adapter = logging.LoggerAdapter(log, {"host": self.host})
        try:
            for port, handler, channel in ((base, self.metasync.handle, "meta"),
                                           (base + 1, fetch.handle, "fetch"),
                                           (base + 2, sync.handle, "sync")):
                self.servers.append(await serve(listen, port, handler, channel=channel,
                                                logger=adapter, **common))  # type: ignore[arg-type]
        except OSError as exc:
            raise MarsError(f"cannot listen on {listen} ports {base}-{base + 2}: "
                            f"{exc.strerror}") from None
        log.info("listening on %s ports %d (meta), %d (fetch), %d (sync)", listen, base,
                 base + 1, base + 2)
        if self.metrics is not None:
            try:
                self.servers.append(await serve_metrics(self.metrics[0], self.metrics[1],
                                                        self.status, self.host))
                log.info("Prometheus metrics on http://%s:%d/metrics", *self.metrics)
            except OSError as exc:
                log.warning("no metrics endpoint on %s:%d: %s", self.metrics[0],
                            self.metrics[1], exc.strerror)

    async def _round(self) -> None:
        """One round of the loop: peers, resources, space, liveness."""
        if self.metasync is not None:
            self.metasync.sync_peers()
        await self.reconcile()
        await self.check_space()
        self.meta.set(schema.alive(self.host), str(int(time.time())))

    async def check_space(self) -> None:
        """Apply the emergency levels (docs/replication.md) to this host's resources, then
        publish the level where the tree does not hold it yet. A full disk may refuse that
        key: the resources have the level already, and the next round tries again."""
        try:
            free = free_bytes(self.paths.root)
        except OSError:
            return
        level = self.space.level(free)
        self.space_free = free
        if level != self.space_level:
            log.warning("%s free in %s: space level %s (was %s)", format_size(free),
                        self.paths.root, LEVEL_NAMES[level], LEVEL_NAMES[self.space_level])
            self.space_level = level
        await self._apply_space_level(level, free)
        key = schema.space_level(self.host)
        if self.meta.get(key, "0") != str(level):  # no key: level 0, as before any
            try:
                self.meta.set(key, str(level))
            except OSError as exc:
                log.warning("space level %s not written to the tree: %s",
                            LEVEL_NAMES[level], exc.strerror or exc)

    async def _apply_space_level(self, level: int, free: int) -> None:
        async with self._lock:
            for name, res in list(self.primaries.items()):
                lg = res.logger
                if lg is None:
                    continue
                try:
                    if level >= 4 and not lg.emergency:
                        await lg.enter_emergency(f"only {format_size(free)} free in "
                                                 f"{self.paths.root}")
                    elif lg.emergency and free >= self.space.no_fetch:
                        await lg.leave_emergency()
                except MarsError as exc:  # its worker ended: reconcile restarts it
                    log.warning("space check: %s", exc, extra={"resource": name})
            for name, sec in list(self.secondaries.items()):
                try:
                    await sec.set_space_level(level)
                except (MarsError, TimeoutError) as exc:
                    log.warning("space check: %s", exc or "no answer",
                                extra={"resource": name})

    def _logger_of(self, name: str) -> PrimaryLog | None:
        res = self.primaries.get(name)
        return res.logger if res is not None else None

    async def _wait_poke_or_stop(self) -> None:
        waits = [asyncio.create_task(self._poke.wait()), asyncio.create_task(self._stop.wait())]
        if self.metasync is not None:
            waits.append(asyncio.create_task(self.metasync.changed.wait()))
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        for w in waits:
            w.cancel()
        self._poke.clear()
        if self.metasync is not None:
            self.metasync.changed.clear()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One control connection: one request, one reply, closed."""
        try:
            reply = await self._answer(reader)
            if reply is not None:
                writer.write(json.dumps(reply).encode() + b"\n")
                await writer.drain()
        except ConnectionError as exc:
            log.warning("control client went away: %s", exc)
        finally:
            writer.close()

    async def _answer(self, reader: asyncio.StreamReader) -> dict[str, Any] | None:
        """The reply to a control client's request line; None if it sent nothing."""
        try:
            line = await reader.readline()
        except ValueError:  # longer than the stream's limit (control.MAX_REQUEST)
            log.warning("control request refused: longer than %d bytes", control.MAX_REQUEST)
            return control.too_long_reply()
        if not line:
            return None  # connected and went away (a liveness probe)
        try:
            return await self._handle(control.parse_request(line))
        except (ValueError, UsageError) as exc:
            log.warning("control request refused: %s", exc)
            return control.usage_reply(str(exc))
        except MarsError as exc:
            return {"ok": False, "error": str(exc), "code": exc.exit_code}

    async def _handle(self, req: dict[str, Any]) -> dict[str, Any]:
        cmd = req.get("cmd")
        if cmd == "ping":
            return {"ok": True, "host": self.host, "version": __version__, "pid": os.getpid()}
        if cmd == "reconcile":
            if req.get("retry") is not None:
                await self._retry_now(str(req["retry"]))
            await self.reconcile()
            return {"ok": True, **(await self.status()).to_json()}
        if cmd == "status":
            return {"ok": True, **(await self.status()).to_json()}
        if cmd in DEVICE_COMMANDS:  # attach-device, detach-device (marslib/devnode)
            return await self.devnodes.handle(cmd, req)
        if cmd == "log-rotate":
            name = str(req.get("resource"))
            res = self.primaries.get(name)
            if res is None or res.logger is None:
                raise MarsError(f"resource {name} is not running as primary on {self.host}")
            return {"ok": True, "logfile": await res.logger.rotate()}
        if cmd == "log-delete":
            return {"ok": True, **await self.log_delete(check_resource_name(
                str(req.get("resource"))), bool(req.get("dry_run")))}
        if cmd == "cron":
            return {"ok": True, **await self.cron(
                _size_arg(req.get("rotate_size", DEFAULT_ROTATE_SIZE)),
                float(req.get("rotate_age", DEFAULT_ROTATE_AGE)), bool(req.get("dry_run")))}
        raise UsageError(f"unknown command {cmd!r}")

    # ------------------------------------------------------------- logfiles
    async def log_delete(self, name: str, dry_run: bool = False) -> dict[str, Any]:
        """Delete the logfiles of ``name`` every member has applied (marslib.logretention):
        ``deleted`` (names) and ``bytes_freed`` (what a dry run would free)."""
        doomed = logretention.deletable_logfiles(self.meta, self.paths, name)
        if dry_run:
            freed = sum(_size_of(p) for p in doomed)
        else:
            freed = await asyncio.to_thread(logretention.delete_logfiles, doomed, name)
        return {"deleted": [p.name for p in doomed], "bytes_freed": freed, "dry_run": dry_run}

    async def cron(self, rotate_size: int, rotate_age: float,
                   dry_run: bool = False) -> dict[str, Any]:
        """Housekeeping of every resource here: rotate a primary's logfile that is big or
        whose first record is older than ``rotate_age`` seconds, delete the logfiles every
        member has applied. ``actions``: resource -> ``rotated_to`` (or ``would_rotate``)
        with ``reason``, ``deleted``."""
        actions: dict[str, dict[str, Any]] = {}
        for name in self.paths.resources():
            done: dict[str, Any] = {}
            res = self.primaries.get(name)
            lg = res.logger if res is not None else None
            pos = lg.log_end if lg is not None else None
            if lg is not None and pos is not None:
                path = self.paths.logfile(name, pos.number, pos.host)
                stamp = await asyncio.to_thread(first_record_stamp, path)
                reason = logretention.rotation_due(
                    pos, stamp / 1e9 if stamp is not None else None, time.time(),
                    rotate_size, rotate_age)
                if reason is not None:
                    done["reason"] = reason
                    if dry_run:
                        done["would_rotate"] = pos.logfile
                    else:
                        done["rotated_to"] = await lg.rotate()
                        log.info("cron rotated: %s", reason, extra={"resource": name})
            deleted = await self.log_delete(name, dry_run)
            if deleted["deleted"]:
                done["deleted"] = deleted["deleted"]
            if done:
                actions[name] = done
        return {"actions": actions, "dry_run": dry_run}

    async def status(self) -> DaemonStatus:
        """Everything ``status`` answers, each running resource's figures asked now."""
        running: list[tuple[str, PrimaryHandle | SecondaryHandle]] = [
            *self.primaries.items(), *self.secondaries.items()]
        figures = await asyncio.gather(*(res.status() for _, res in running))
        resources = {name: st for (name, res), st in zip(running, figures, strict=True)
                     if res.exited is None}
        for name in self.primaries:  # the block device node (marslib/devnode)
            if name in resources:
                resources[name] = dataclasses.replace(resources[name],
                                                      device_node=self.devnodes.status(name))
        peers = {}
        if self.metasync is not None:
            for name, bundle in self.metasync.peers.items():
                peers[name] = PeerStatus(connected=bundle.connections > 0,
                                         error=bundle.last_error)
        return DaemonStatus(
            host=self.host,
            version=__version__,
            workers=self.workers,
            peers=peers,
            space_free=self.space_free,
            space_level=LEVEL_NAMES[self.space_level],
            space_level_number=self.space_level,
            resources=resources,
            failures={name: msg for name, (_, msg) in self.failures.items()},
            # seconds until marsd tries a failed start again by itself (reconcile may run
            # up to 2 s later)
            retry_in={name: round(max(0.0, at + RETRY_FAILED_AFTER - time.monotonic()), 1)
                      for name, (at, _) in self.failures.items()},
        )

    async def _retry_now(self, name: str) -> None:
        """An operator's ``up``: try a failed start of ``name`` again now instead of after
        RETRY_FAILED_AFTER, and restart a secondary that stopped on an error."""
        if self.failures.pop(name, None) is not None:
            log.info("marsadm up: retrying the failed start now", extra={"resource": name})
        async with self._lock:
            sec = self.secondaries.get(name)
            if sec is not None and sec.phase == "error":
                log.info("marsadm up: restarting the secondary stopped on: %s", sec.error,
                         extra={"resource": name})
                await self._stop_resource(name)

    def _reset_open_counts(self) -> None:
        """No NBD client is connected to a resource this marsd does not run: clear the
        ``open-count`` a killed marsd left in the tree."""
        for name in self.paths.resources():
            key = ResourceKeys(name).actual(self.host, "open-count")
            if name not in self.primaries and self.meta.get(key) not in (None, "0"):
                log.info("open count %s left by a stopped marsd reset to 0",
                         self.meta.get(key), extra={"resource": name})
                self.meta.set(key, "0")

    # ------------------------------------------------------------- reconcile
    def _wanted_role(self, name: str) -> str | None:
        """"primary", "secondary" or None (not attached here)."""
        m = self.meta
        r = ResourceKeys(name)
        if m.get(r.todo(self.host, "attach")) != ON or m.get(r.data(self.host)) is None:
            return None
        primary = m.get(r.primary)
        if primary == self.host:
            return "primary"
        return "secondary" if primary else None

    async def reconcile(self) -> None:
        async with self._lock:
            names = set(self.paths.resources()) | set(self.primaries) | set(self.secondaries)
            for name in sorted(names):
                self._forget_exited(name)
                want = self._wanted_role(name)
                running = "primary" if name in self.primaries else \
                    "secondary" if name in self.secondaries else None
                keys = ResourceKeys(name)
                size = int(self.meta.get(keys.size) or 0)
                if running is not None and running == want:
                    # publish the device size; serve a grown size; follow the switches
                    res = self.primaries.get(name) or self.secondaries[name]
                    try:
                        await res.refresh(size)
                    except RuntimeError as exc:
                        self.meta.set(keys.actual(self.host, "error"), str(exc))
                    except (MarsError, TimeoutError) as exc:
                        log.warning("refresh: %s", exc or "no answer", extra={"resource": name})
                    if self._forget_exited(name):
                        continue
                if running == "secondary" and want == "secondary":
                    sec = self.secondaries[name]
                    if sec.size and size > sec.size and sec.phase != "syncing":
                        # grown: sync the new tail from the primary, then replay on, in a
                        # new secondary of the new size
                        synced = int(self.meta.get(keys.synced_size(self.host)) or sec.size)
                        self.meta.set(keys.syncstatus(self.host),
                                      SyncStatus(min(synced, sec.size), size).encode())
                        running = None
                        await self._stop_resource(name)
                    # invalidated (syncstatus unfinished while it replays): the secondary
                    # resyncs in place when refresh shows it the tree (marslib.secondary)
                if running == "primary" and want != "primary" and \
                        not await self.devnodes.may_stop(name):
                    continue  # its block device node is in use: the primary stays
                if running is not None and running != want:
                    # a primary giving up its role (handover) ends its log for the others
                    await self._stop_resource(name, end_log=running == "primary"
                                              and want == "secondary")
                    running = None
                if want is not None and running is None:
                    failed = self.failures.get(name)
                    if failed and time.monotonic() - failed[0] < RETRY_FAILED_AFTER:
                        continue
                    await self._start_resource(name, want)
            await self.devnodes.follow()  # block device nodes of the primaries here

    def _new_primary(self, name: str) -> PrimaryHandle:
        if self.workers:
            return WorkerPrimary(name, self.host, self.paths, self.meta, self.config,
                                 log_level=self.log_level, on_exit=self._worker_exited)
        return LocalPrimary(name, self.host, self.paths, self.meta, self.config)

    def _new_secondary(self, name: str) -> SecondaryHandle:
        assert self.net is not None
        if self.workers:
            return WorkerSecondary(name, self.host, self.paths, self.meta, self.net,
                                   log_level=self.log_level, on_exit=self._worker_exited)
        return LocalSecondary(name, self.host, self.paths, self.meta, self.net)

    def _worker_exited(self, worker: WorkerHandle) -> None:
        """A worker ended without being stopped: a crash of its resource only. Record it
        as a failed start (retried after RETRY_FAILED_AFTER) and let reconcile forget it."""
        name = worker.name
        if self.primaries.get(name) is not worker and self.secondaries.get(name) is not worker:
            return  # it was starting: _start_resource records the failure
        msg = (f"resource {name} failed: its worker (pid {worker.worker_pid}) "
               f"{worker.exited}; marsd starts it again in {RETRY_FAILED_AFTER:.0f} s")
        log.error("%s", msg, extra={"resource": name})
        self.failures[name] = (time.monotonic(), msg)
        self._overwrite(ResourceKeys(name).actual(self.host, "error"), msg[:1000])
        if name in self.primaries:
            # its NBD export went with it
            self._overwrite(ResourceKeys(name).actual(self.host, "open-count"), "0")
        self.poke()

    def _overwrite(self, key: str, value: str) -> None:
        """Set a key a worker may have written last: reading it first moves this clock past
        the worker's stamp, so the new value wins everywhere."""
        self.meta.read(key)
        self.meta.set(key, value)

    def _forget_exited(self, name: str) -> bool:
        """Drop the handle of ``name`` if its worker ended; True if it did."""
        res = self.primaries.get(name) or self.secondaries.get(name)
        if res is None or res.exited is None:
            return False
        self.primaries.pop(name, None)
        self.secondaries.pop(name, None)
        return True

    async def _start_resource(self, name: str, role: str = "primary") -> None:
        if role == "primary":
            primary = self._new_primary(name)
            self.starting.add(name)
            try:
                started = await self._started(name, primary)
            finally:
                self.starting.discard(name)
            if started:
                self.primaries[name] = primary
        else:
            secondary = self._new_secondary(name)
            if await self._started(name, secondary):
                self.secondaries[name] = secondary

    async def _started(self, name: str, res: PrimaryHandle | SecondaryHandle) -> bool:
        """Start ``res``; on failure record why (retried after RETRY_FAILED_AFTER)."""
        try:
            await res.start()
        except (MarsError, OSError, RuntimeError) as exc:
            msg = f"cannot start resource {name}: {exc}"
            log.error(msg, extra={"resource": name})
            self.failures[name] = (time.monotonic(), msg)
            self._overwrite(ResourceKeys(name).actual(self.host, "error"), msg[:1000])
            return False
        self.failures.pop(name, None)
        return True

    async def _stop_resource(self, name: str, end_log: bool = False) -> None:
        primary = self.primaries.pop(name, None)
        secondary = self.secondaries.pop(name, None)
        if primary is not None:
            await self.devnodes.before_stop(name)  # its block device node goes first
            await primary.stop(end_marker=end_log)
        elif secondary is not None:
            await secondary.stop()

    def poke(self) -> None:
        self._poke.set()


def _size_arg(value: object) -> int:
    """A size from a control request: bytes, or a text like ``256M``."""
    return value if isinstance(value, int) else parse_size(str(value))


def _size_of(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="marsd", description="marslib replication daemon")
    parser.add_argument("--root", help="state root (default $MARS_ROOT or /mars)")
    parser.add_argument("--run-dir", help="sockets (default $MARS_RUN_DIR or /run/mars)")
    parser.add_argument("--host", help="this host's name (default $MARS_HOST or hostname)")
    parser.add_argument("--log-level", default=os.environ.get("MARS_LOG_LEVEL", "INFO"))
    parser.add_argument("--max-logfile-size", default="256M", help="rotate logfiles at this size")
    parser.add_argument("--memory-limit", default="128M",
                        help="acknowledged data held in memory until written back")
    parser.add_argument("--compress", type=int, default=None, metavar="LEVEL",
                        help="zstd-compress log records at LEVEL where that shrinks them")
    parser.add_argument("--writeback-order", choices=["sorted", "arrival"], default="sorted")
    parser.add_argument("--writeback-threads", type=int, default=4,
                        help="device writes in flight during a writeback round (1-16)")
    parser.add_argument("--commit-depth", type=int, default=4,
                        help="group commits in flight at once on the log (1-16; 1 where "
                        "the log filesystem has no O_DIRECT)")
    parser.add_argument("--event-loop", choices=eventloop.CHOICES, default=None,
                        help="uvloop (default where installed) or asyncio")
    parser.add_argument("--listen", help="address for the network ports (default: this "
                        "host's address in the cluster, else all)")
    parser.add_argument("--port-base", type=int, default=7777,
                        help="metadata port; fetch and sync use the next two (7778, 7779)")
    parser.add_argument("--space-limits", default="",
                        help="free-space levels, e.g. warn=8G,drop=4G,no-fetch=2G,"
                        "emergency=1G (these are the defaults)")
    parser.add_argument("--metrics", default="127.0.0.1:9577",
                        help="ADDRESS:PORT for Prometheus metrics, or 'off'")
    parser.add_argument("--connections", type=int, default=2,
                        help="connections bundled per peer for fetch and sync (1-8)")
    parser.add_argument("--tcp-congestion", metavar="NAME",
                        default=os.environ.get(CONGESTION_ENV, ""),
                        help="TCP congestion control of marsd's connections, e.g. cubic "
                             "(default $MARS_TCP_CONGESTION, else the host's default)")
    parser.add_argument("--workers", choices=["on", "off"], default="on",
                        help="run each resource in a worker process of its own (on, the "
                        "default: resources use several cores, a crash stays in its "
                        "resource) or in marsd's own event loop (off: for debugging)")
    args = parser.parse_args(argv)
    host = check_host_name(args.host or os.environ.get("MARS_HOST") or socket.gethostname())
    setup_logging(host, args.log_level)
    tune_malloc()
    config = LoggerConfig(
        max_logfile_size=parse_size(args.max_logfile_size),
        memory_limit=parse_size(args.memory_limit),
        compress_level=args.compress,
        writeback_order=args.writeback_order,
        writeback_threads=max(1, min(args.writeback_threads, 16)),
        commit_depth=max(1, min(args.commit_depth, 16)),
    )
    daemon = Marsd(MarsPaths.from_env(args.root, args.run_dir), host, config,
                   listen=args.listen, port_base=args.port_base,
                   connections=max(1, min(args.connections, 8)),
                   space=SpaceLimits.parse(args.space_limits),
                   metrics=None if args.metrics == "off" else
                   (args.metrics.rpartition(":")[0] or "127.0.0.1",
                    int(args.metrics.rpartition(":")[2])),
                   workers=args.workers == "on", log_level=args.log_level)
    try:
        if args.tcp_congestion:
            check_congestion_control(args.tcp_congestion)
            os.environ[CONGESTION_ENV] = args.tcp_congestion  # the workers' connections too
        if args.event_loop:
            os.environ["MARS_EVENT_LOOP"] = args.event_loop  # the workers' loop too
        eventloop.run(daemon.run(), args.event_loop)
    except MarsError as exc:
        log.error("%s", exc)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
