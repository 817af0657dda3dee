"""The writer process: numbered records onto the resource's filesystem, an ack ledger beside.

It appends :class:`~marslib.app.records.Record` s to ``mnt/data/chunk-NNNNNN`` (a new chunk
every 1 MiB), seq strictly increasing by one, continuing from the highest seq already on the
filesystem (after a migration it goes on with the sequence another host wrote). After every
``fsync_every`` records it fsyncs the chunk (and the directory when a chunk was created) and
then atomically rewrites the host-local ledger ``STATE/R/acked.json``: the highest seq that
is durable. The very first record of a run is fsynced and acknowledged at once, so that
``mars-app start`` can return as soon as the whole path (filesystem, loop, FUSE, NBD, marsd)
has carried one write through.

SIGTERM/SIGINT: finish the current record, fsync, acknowledge, exit 0. SIGHUP is ignored.
An I/O error ends the process with exit code 1 and no further acknowledgement.

Run by ``mars-app start`` as ``python -m marslib.app.writer``; never by hand.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
import time
from pathlib import Path
from types import FrameType
from typing import Any

from marslib.app.records import CHUNK_SIZE, Record, chunk_name, list_chunks, scan_chunk
from marslib.app.volume import AppError, AppPaths, fsync_dir, write_json_atomic
from marslib.errors import MarsError

log = logging.getLogger("marslib.app.writer")


class Writer:
    """Appends records to ``data_dir`` and acknowledges them in ``ledger``."""

    def __init__(self, data_dir: Path, ledger: Path, host: str, resource: str,
                 record_size: int = 4096, fsync_every: int = 10, rate: float = 200) -> None:
        if fsync_every < 1:
            raise AppError("--fsync-every must be at least 1")
        if rate < 0:
            raise AppError("--rate must not be negative (0: as fast as possible)")
        Record.make(1, host, record_size, 0)  # a record size too small fails here
        if record_size > CHUNK_SIZE:
            raise AppError(f"--record-size must be at most {CHUNK_SIZE}")
        self.data_dir = data_dir
        self.ledger = ledger
        self.host = host
        self.resource = resource
        self.record_size = record_size
        self.fsync_every = fsync_every
        self.rate = rate
        self.where = {"resource": resource}
        self.fd = -1
        self.chunk_index = 0
        self.chunk_size = 0
        self.seq = 0  # last seq written
        self.acked = 0  # last seq fsynced and put into the ledger
        self.start_seq = 0  # the first seq this run writes
        self.dir_dirty = False
        self.written = 0
        self.repaired: dict[str, Any] | None = None

    # ---------------------------------------------------------------- recovery
    def recover(self) -> int:
        """Find the highest seq on the filesystem, cut off a torn tail of the newest chunk,
        open the chunk to append to; the highest seq."""
        self.data_dir.mkdir(exist_ok=True)
        chunks = list_chunks(self.data_dir)
        last = 0
        for pos in range(len(chunks) - 1, -1, -1):
            index, path = chunks[pos]
            scan, _ = scan_chunk(path)
            if scan.error is not None:
                if pos == len(chunks) - 1 and scan.torn_tail():
                    cut = scan.size - scan.good_end
                    os.truncate(path, scan.good_end)
                    self.repaired = {"chunk": path.name, "offset": scan.good_end, "bytes": cut,
                                     "reason": scan.error.reason}
                    log.warning("cut a torn tail of %d bytes off %s at offset %d (%s): never "
                                "acknowledged", cut, path.name, scan.good_end,
                                scan.error.reason, extra=self.where)
                else:
                    raise AppError(f"{path.name} offset {scan.error.offset}: "
                                   f"{scan.error.reason}; the data set is damaged "
                                   "(see 'mars-app verify'), not writing to it")
            if scan.records:
                last = scan.last_seq
                break
        if chunks:
            self.chunk_index = chunks[-1][0]
        self._open_chunk(self.chunk_index)
        self.seq = self.acked = last
        self.start_seq = last + 1
        return last

    def _open_chunk(self, index: int) -> None:
        if self.fd >= 0:
            os.close(self.fd)
        path = self.data_dir / chunk_name(index)
        existed = path.exists()
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self.chunk_index = index
        self.chunk_size = os.fstat(self.fd).st_size
        if not existed:
            self.dir_dirty = True

    # ---------------------------------------------------------------- writing
    def write_one(self) -> None:
        if self.chunk_size + self.record_size > CHUNK_SIZE and self.chunk_size > 0:
            os.fsync(self.fd)  # the old chunk is whole on disk before the next one grows
            self._open_chunk(self.chunk_index + 1)
        data = Record.make(self.seq + 1, self.host, self.record_size).encode()
        view = memoryview(data)
        while view:
            n = os.write(self.fd, view)
            view = view[n:]
        self.chunk_size += len(data)
        self.seq += 1
        self.written += 1

    def sync_and_ack(self) -> None:
        """fsync what was written, then record it in the ledger."""
        os.fsync(self.fd)
        if self.dir_dirty:
            fsync_dir(self.data_dir)
            self.dir_dirty = False
        self.acked = self.seq
        write_json_atomic(self.ledger, {
            "seq": self.acked, "host": self.host, "time": time.time(),
            "resource": self.resource, "pid": os.getpid(), "start_seq": self.start_seq,
            "records": self.written, "chunk": chunk_name(self.chunk_index)})

    def run(self, stopping: list[bool], max_records: int | None = None) -> None:
        """Write until ``stopping[0]`` is set (by a signal) or ``max_records`` are written."""
        interval = 1.0 / self.rate if self.rate else 0.0
        due = time.monotonic()
        last_report = due
        while not stopping[0] and (max_records is None or self.written < max_records):
            if interval:
                now = time.monotonic()
                while due > now and not stopping[0]:  # slices: SIGTERM ends a slow rate soon
                    time.sleep(min(due - now, 0.1))
                    now = time.monotonic()
                if stopping[0]:
                    break
                due += interval
                if now - due > 1.0:  # fell behind by more than a second: do not burst
                    due = now
            self.write_one()
            if self.written == 1 or self.seq - self.acked >= self.fsync_every:
                self.sync_and_ack()
            if time.monotonic() - last_report >= 60:
                last_report = time.monotonic()
                log.info("at seq %d (acked %d, %s)", self.seq, self.acked,
                         chunk_name(self.chunk_index), extra=self.where)
        if self.fd >= 0:
            self.sync_and_ack()

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def main(argv: list[str] | None = None) -> int:
    from marslib.logsetup import setup_logging

    p = argparse.ArgumentParser(prog="mars-app-writer")
    p.add_argument("--resource", required=True)
    p.add_argument("--state-dir", required=True)
    p.add_argument("--host", default=os.environ.get("MARS_HOST") or socket.gethostname())
    p.add_argument("--rate", type=float, default=200)
    p.add_argument("--record-size", type=int, default=4096)
    p.add_argument("--fsync-every", type=int, default=10)
    args = p.parse_args(argv)
    setup_logging(args.host, prog="mars-app-writer")
    paths = AppPaths.from_env(args.resource, args.state_dir)
    where = {"resource": args.resource}
    stopping = [False]

    def on_term(signum: int, frame: FrameType | None) -> None:
        stopping[0] = True

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    w: Writer | None = None
    try:
        if not os.path.ismount(paths.mnt):
            raise AppError(f"{paths.mnt} is not mounted: not writing onto the host's own "
                           "filesystem")
        w = Writer(paths.data, paths.acked, args.host, args.resource, args.record_size,
                   args.fsync_every, args.rate)
        last = w.recover()
        log.info("writer pid %d: continuing after seq %d in %s (%.0f records/s of %d bytes, "
                 "fsync every %d)", os.getpid(), last, chunk_name(w.chunk_index), args.rate,
                 args.record_size, args.fsync_every, extra=where)
        w.run(stopping)
    except (MarsError, ValueError, OSError) as exc:
        log.error("writer stopped by an error after seq %s (acked %s): %s",
                  w.seq if w else "?", w.acked if w else "?", exc, extra=where)
        return 1
    finally:
        if w is not None:
            w.close()
        try:
            if int(paths.pidfile.read_text().strip() or 0) == os.getpid():
                paths.pidfile.unlink()
        except (OSError, ValueError):
            pass
    log.info("writer pid %d stopped: %d records written this run, acked seq %d", os.getpid(),
             w.written, w.acked, extra=where)
    return 0


if __name__ == "__main__":
    sys.exit(main())
