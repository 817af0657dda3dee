"""Prometheus metrics of marsd, computed from its status at scrape time.

Served over HTTP on a loopback port (default 127.0.0.1:9577) by the daemon's own event
loop; each scrape asks for a fresh status (from every resource's worker), so the figures
are those of the moment of the scrape."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from marslib import status as res_status
from marslib.status import PRIMARY, SECONDARY, DaemonStatus, LoggerStatus

log = logging.getLogger(__name__)

ROLES = (PRIMARY, SECONDARY)


class MarsCollector(Collector):
    """The metrics of one status snapshot (``status`` returns it)."""

    def __init__(self, status: Callable[[], DaemonStatus], host: str) -> None:
        self.status = status
        self.host = host

    def collect(self) -> Iterator[Metric]:
        st = self.status()
        res_labels = ["resource"]
        role = GaugeMetricFamily("mars_resource_role", "1 for the role this host has",
                                 labels=["resource", "role"])
        lagb = GaugeMetricFamily("mars_replica_lag_bytes",
                                 "log bytes a secondary has not applied yet", labels=res_labels)
        lags = GaugeMetricFamily("mars_replica_lag_seconds",
                                 "age of the newest applied write while behind, else 0",
                                 labels=res_labels)
        consistent = GaugeMetricFamily("mars_replica_consistent",
                                       "1 when the replica is a consistent prefix",
                                       labels=res_labels)
        fetched = CounterMetricFamily("mars_fetch_bytes", "log bytes fetched",
                                      labels=res_labels)
        replayed = CounterMetricFamily("mars_replay_bytes", "data bytes replayed",
                                       labels=res_labels)
        hedged = CounterMetricFamily("mars_fetch_hedged_requests", "fetch requests asked "
                                     "for again on another connection because theirs was "
                                     "slow", labels=res_labels)
        written = CounterMetricFamily("mars_primary_write_bytes", "bytes written by "
                                      "applications on the primary", labels=res_labels)
        writes = CounterMetricFamily("mars_primary_writes", "write requests on the primary",
                                     labels=res_labels)
        commits = CounterMetricFamily("mars_log_commits", "group commits (one fdatasync each)",
                                      labels=res_labels)
        pending = GaugeMetricFamily("mars_writeback_pending_bytes",
                                    "acknowledged data not yet on the device", labels=res_labels)
        sync_done = GaugeMetricFamily("mars_sync_done_bytes", "full sync progress",
                                      labels=res_labels)
        sync_size = GaugeMetricFamily("mars_sync_size_bytes", "full sync total",
                                      labels=res_labels)
        verify_done = GaugeMetricFamily("mars_verify_done_bytes", "online verify progress "
                                        "(a prefix of the device)", labels=res_labels)
        verify_size = GaugeMetricFamily("mars_verify_size_bytes", "online verify total",
                                        labels=res_labels)
        verify_diff = GaugeMetricFamily("mars_verify_differing_bytes", "bytes the running "
                                        "online verify found different so far",
                                        labels=res_labels)
        emergency = GaugeMetricFamily("mars_emergency", "1 while the primary bypasses the log",
                                      labels=res_labels)
        open_count = GaugeMetricFamily("mars_open_count", "NBD clients", labels=res_labels)
        logfiles = GaugeMetricFamily("mars_logfiles", "logfiles in /mars", labels=res_labels)
        log_bytes = GaugeMetricFamily("mars_logfile_bytes", "bytes of logfiles in /mars",
                                      labels=res_labels)
        now = time.time()
        for name, r in st.resources.items():
            for rl in ROLES:
                role.add_metric([name, rl], 1.0 if r.role == rl else 0.0)
            open_count.add_metric([name], float(r.open_count))
            logfiles.add_metric([name], float(r.logfile_count))
            log_bytes.add_metric([name], float(r.logfile_bytes))
            if r.role == PRIMARY:
                lg = r.logger or LoggerStatus()
                written.add_metric([name], float(lg.bytes_written))
                writes.add_metric([name], float(lg.writes))
                commits.add_metric([name], float(lg.commits))
                pending.add_metric([name], float(lg.pending_bytes))
                emergency.add_metric([name], 1.0 if lg.emergency else 0.0)
                continue
            lb = res_status.lag(r)
            if lb is not None:
                lagb.add_metric([name], float(lb))
                lags.add_metric([name], res_status.lag_seconds(r, now))
            consistent.add_metric([name], 1.0 if r.secondary and r.secondary.consistent
                                  else 0.0)
            fetched.add_metric([name], float(r.fetcher.fetch_bytes if r.fetcher else 0))
            replayed.add_metric([name], float(r.replayer.replay_bytes if r.replayer else 0))
            hedged.add_metric([name], float(r.fetcher.fetch_hedges if r.fetcher else 0))
            if r.syncer is not None:
                sync_done.add_metric([name], float(r.syncer.sync_done))
                sync_size.add_metric([name], float(r.syncer.sync_size))
            if r.verifier is not None:
                verify_done.add_metric([name], float(r.verifier.verify_done))
                verify_size.add_metric([name], float(r.verifier.verify_size))
                verify_diff.add_metric([name], float(r.verifier.verify_differing))
        yield from (role, lagb, lags, consistent, fetched, replayed, hedged, written, writes,
                    commits, pending, sync_done, sync_size, verify_done, verify_size,
                    verify_diff, emergency, open_count, logfiles, log_bytes)
        free = GaugeMetricFamily("mars_free_bytes", "free bytes in /mars")
        free.add_metric([], float(st.space_free))
        level = GaugeMetricFamily("mars_space_level", "0 ok, 1 warn, 2 drop, 3 no-fetch, "
                                  "4 emergency")
        level.add_metric([], float(st.space_level_number))
        peers = GaugeMetricFamily("mars_peer_connected", "metadata connection to a peer is up",
                                  labels=["peer"])
        for peer, info in st.peers.items():
            peers.add_metric([peer], 1.0 if info.connected else 0.0)
        yield from (free, level, peers)


async def serve_metrics(address: str, port: int,
                        status: Callable[[], Awaitable[DaemonStatus]],
                        host: str) -> asyncio.Server:
    """A minimal HTTP endpoint: GET /metrics in the Prometheus text format."""

    async def scrape() -> bytes:
        snapshot = await status()
        registry = CollectorRegistry()
        registry.register(MarsCollector(lambda: snapshot, host))
        return generate_latest(registry)

    async def client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(reader.readline(), 10)
            while (await asyncio.wait_for(reader.readline(), 10)) not in (b"\r\n", b"\n", b""):
                pass
            parts = request.split()
            if len(parts) >= 2 and parts[0] == b"GET" and parts[1].split(b"?")[0] in (
                    b"/metrics", b"/"):
                body = await scrape()
                head = (b"HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\n"
                        b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body))
            else:
                body = b"not found\n"
                head = b"HTTP/1.1 404 Not Found\r\nContent-Length: 10\r\nConnection: close\r\n\r\n"
            writer.write(head + body)
            await writer.drain()
        except (TimeoutError, ConnectionError, OSError):
            pass
        finally:
            writer.close()

    return await asyncio.start_server(client, address, port)
