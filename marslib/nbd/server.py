"""asyncio NBD server on a unix socket: one export, many clients, requests answered concurrently.

The protocol itself lives in :mod:`marslib.nbd.protocol`; this module moves bytes between a
socket and that state machine and runs each request against an :class:`NbdBackend` as its own
task, replying as each one completes (so replies may be out of order).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
import stat
from collections.abc import Callable, Sequence
from typing import Protocol, cast, runtime_checkable

from marslib.errors import Refused
from marslib.nbd.protocol import (
    EIO,
    NEED_DATA,
    OPTION_NAMES,
    REP_ACK,
    REP_ERR_UNSUP,
    SIMPLE_REPLY,
    SIMPLE_REPLY_MAGIC,
    ConnectionClosed,
    DisconnectRequest,
    FlushRequest,
    NbdServerConnection,
    OptionHandled,
    ReadRequest,
    RequestError,
    TransmissionStarted,
    TrimRequest,
    WriteRequest,
    nbd_error_from_errno,
)

MAX_INFLIGHT_REQUESTS = 64  # stop reading a client's requests at this many in flight ...
MAX_INFLIGHT_BYTES = 64 << 20  # ... or at this many payload bytes in flight
WRITE_BUFFER_HIGH = 4 << 20  # stop reading while this many reply bytes wait for the client
SOCKET_MODE = 0o660
_SPLIT_WRITE = 256 << 10  # read replies larger than this are written as header + data


class NbdBackend(Protocol):
    """Storage behind the export. Methods may raise OSError with an errno for the client."""

    read_only: bool

    def size(self) -> int:
        """Current export size in bytes."""
        ...

    async def read(self, offset: int, length: int) -> bytes | bytearray | memoryview:
        """Exactly ``length`` bytes at ``offset``."""
        ...

    async def write(self, offset: int, data: bytes | bytearray, fua: bool) -> None:
        """Store ``data`` at ``offset``; returns once durable if ``fua``."""
        ...

    async def flush(self) -> None:
        """Return once every write that already returned is durable."""
        ...

    async def trim(self, offset: int, length: int) -> None:
        """The range is no longer needed (the backend may ignore this)."""
        ...


WriteDone = Callable[[OSError | None], None]
ReadDone = Callable[[Sequence["bytes | bytearray | memoryview | OSError"]], None]


@runtime_checkable
class NbdBatchBackend(Protocol):
    """A backend that takes the requests of one socket read as a batch, with callbacks
    instead of a task per request (the primary's logger). Callbacks run on the loop."""

    read_only: bool

    def size(self) -> int:
        """Current export size in bytes."""
        ...

    def submit_writes(self, writes: list[tuple[int, bytes | bytearray]], done: WriteDone) -> None:
        """Store the writes (offset, data); ``done(None)`` once all are durable, else
        ``done(OSError)``. An empty list is a flush: ``done`` once everything submitted
        before it is durable."""
        ...

    def submit_reads(self, reads: list[tuple[int, int]], done: ReadDone) -> None:
        """Read each (offset, length); ``done`` gets the data or an OSError per read."""
        ...

    def trim(self, offset: int, length: int) -> None:
        """The range is no longer needed (a hint; may raise OSError)."""
        ...


class NbdServer:
    """A listening NBD server; created by :func:`start_nbd_server`."""

    def __init__(
        self,
        socket_path: str,
        export_name: str,
        backend: NbdBackend | NbdBatchBackend,
        log: logging.LoggerAdapter,
    ) -> None:
        self.socket_path = socket_path
        self.export_name = export_name
        self.backend = backend
        self.log = log
        self.on_open_count_change: Callable[[int], None] | None = None
        self._open_count = 0
        self._clients: set[_NbdClient] = set()
        self._next_id = 0
        self._server: asyncio.AbstractServer | None = None
        self._socket_ino: int | None = None
        self._closed = False

    @property
    def open_count(self) -> int:
        """Clients in the transmission phase, including ones whose requests are finishing."""
        return self._open_count

    @property
    def client_count(self) -> int:
        """Connected clients, whatever their phase."""
        return len(self._clients)

    async def close(self, timeout: float = 5.0) -> None:
        """Stop listening, close every client, wait for their requests, remove the socket.

        Clients get ``timeout`` seconds to take their last replies before being cut off;
        requests already handed to the backend are always waited for.
        """
        if self._closed:
            return
        self._closed = True
        if self._server is not None:
            self._server.close()
        self._remove_socket()
        clients = list(self._clients)
        for client in clients:
            client.shutdown(abort=False)
        if clients:
            waiters = [client.done for client in clients]
            _, pending = await asyncio.wait(waiters, timeout=timeout)
            for client in clients:
                if not client.done.done():
                    client.shutdown(abort=True)
            if pending:
                await asyncio.wait(pending)
        if self._server is not None:
            await self._server.wait_closed()
        self.log.info("nbd export %r: server on %s closed", self.export_name, self.socket_path)

    # --- internals ------------------------------------------------------------------------
    def _new_client(self) -> _NbdClient:
        self._next_id += 1
        client = _NbdClient(self, self._next_id)
        self._clients.add(client)
        return client

    def _client_gone(self, client: _NbdClient) -> None:
        self._clients.discard(client)

    def _change_open_count(self, delta: int) -> None:
        self._open_count += delta
        callback = self.on_open_count_change
        if callback is not None:
            try:
                callback(self._open_count)
            except Exception:
                self.log.exception("nbd export %r: open-count callback failed", self.export_name)

    def _remove_socket(self) -> None:
        try:
            st = os.lstat(self.socket_path)
        except FileNotFoundError:
            return
        if stat.S_ISSOCK(st.st_mode) and st.st_ino == self._socket_ino:
            os.unlink(self.socket_path)


class _NbdClient(asyncio.BufferedProtocol):
    """One client connection: feeds the state machine, runs requests, writes replies."""

    def __init__(self, server: NbdServer, conn_id: int) -> None:
        self.server = server
        self.conn_id = conn_id
        self._batched = isinstance(server.backend, NbdBatchBackend)
        self.backend = cast(NbdBackend, server.backend)  # a task per request
        self.batch_backend = cast(NbdBatchBackend, server.backend)  # or batches
        self.log = server.log
        self.conn = NbdServerConnection(
            server.export_name, server.backend.size, read_only=server.backend.read_only
        )
        self._loop = asyncio.get_running_loop()
        self.done: asyncio.Future[None] = self._loop.create_future()
        self.transport: asyncio.Transport | None = None
        self.inflight = 0
        self.inflight_bytes = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._out: list[bytes] = []  # replies not yet handed to the transport
        self._throttled = False  # too much in flight: events are left in the state machine
        self._writing_paused = False
        self._reading_paused = False
        self._closing = False  # close the transport once nothing is in flight
        self._lost = False
        self._open = False
        self._prefix = f"nbd export {server.export_name!r} client {conn_id}"

    # --- asyncio.Protocol ---------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass
        self.transport.set_write_buffer_limits(high=WRITE_BUFFER_HIGH)
        self.log.debug("%s: connected", self._prefix)
        self._write(self.conn.data_to_send())

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.conn.get_buffer(sizehint)

    def buffer_updated(self, nbytes: int) -> None:
        self.conn.buffer_updated(nbytes)
        if not self._throttled:
            self._drain_batch() if self._batched else self._drain()

    def eof_received(self) -> bool:
        self.conn.receive_eof()
        if not self._throttled:
            self._drain_batch() if self._batched else self._drain()
        return True  # keep the transport to send the replies still in flight

    def pause_writing(self) -> None:
        self._writing_paused = True
        self._update_reading()

    def resume_writing(self) -> None:
        self._writing_paused = False
        self._update_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        if exc is not None and not self._closing:
            self.log.info("%s: connection lost: %s", self._prefix, exc)
        else:
            self.log.debug("%s: connection closed", self._prefix)
        self.conn.close("connection lost")
        if self.inflight == 0:
            self._finished()

    # --- control ------------------------------------------------------------------------
    def shutdown(self, abort: bool) -> None:
        """Close this client at server shutdown."""
        self._closing = True
        transport = self.transport
        if transport is None:
            return
        if abort:
            transport.abort()
        elif self.inflight == 0:
            self._close_transport()
        else:
            self._update_reading()

    def _finished(self) -> None:
        if self.done.done():
            return
        if self._open:
            self._open = False
            self.server._change_open_count(-1)
            self.log.info(
                "%s: closed export (open count now %d)", self._prefix, self.server.open_count
            )
        self.server._client_gone(self)
        self.done.set_result(None)

    def _update_reading(self) -> None:
        transport = self.transport
        if transport is None or self._lost:
            return
        want_paused = self._throttled or self._writing_paused or self._closing
        if want_paused != self._reading_paused:
            self._reading_paused = want_paused
            if want_paused:
                transport.pause_reading()
            else:
                transport.resume_reading()

    def _write(self, data: bytes) -> None:
        """Queue ``data``; everything queued in one loop iteration goes out in one send."""
        out = self._out
        out.append(data)
        if len(out) == 1:
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        out = self._out
        if not out:
            return
        data = out[0] if len(out) == 1 else b"".join(out)
        out.clear()
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.write(data)

    def _write_large(self, header: bytes, data: bytes | bytearray | memoryview) -> None:
        """Send a reply with a large payload now, without copying it into the queue."""
        self._out.append(header)
        self._flush()
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.write(data if type(data) is bytes else bytes(data))

    def _close_transport(self) -> None:
        self._flush()
        if self.transport is not None:
            self.transport.close()

    # --- events -------------------------------------------------------------------------
    def _drain(self) -> None:
        """Turn buffered bytes into requests until none is complete or too much is in flight."""
        next_event = self.conn.next_event
        tasks = self._tasks
        create_task = self._loop.create_task
        while True:
            event = next_event()
            if isinstance(event, WriteRequest):
                self.inflight += 1
                self.inflight_bytes += len(event.data)
                task = create_task(self._do_write(event))
            elif isinstance(event, ReadRequest):
                self.inflight += 1
                self.inflight_bytes += event.length
                task = create_task(self._do_read(event))
            elif event is NEED_DATA:
                return
            elif isinstance(event, FlushRequest):
                self.inflight += 1
                task = create_task(self._do_flush(event))
            elif isinstance(event, TrimRequest):
                self.inflight += 1
                task = create_task(self._do_trim(event))
            else:
                self._control_event(event)
                continue
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            if self.inflight >= MAX_INFLIGHT_REQUESTS or self.inflight_bytes >= MAX_INFLIGHT_BYTES:
                self._throttled = True
                self._update_reading()
                return

    def _drain_batch(self) -> None:
        """Turn buffered bytes into requests and hand them to a batch backend: the writes
        of one socket read as one batch (one group commit), the reads as another, flushes
        as a barrier behind the writes. No task per request."""
        next_event = self.conn.next_event
        writes: list[tuple[int, bytes | bytearray]] = []
        write_handles: list[int] = []
        reads: list[tuple[int, int]] = []
        read_handles: list[int] = []
        flush_handles: list[int] = []
        write_bytes = read_bytes = 0
        while True:
            event = next_event()
            kind = type(event)
            if kind is WriteRequest:
                data = event.data  # type: ignore[union-attr]
                writes.append((event.offset, data))  # type: ignore[union-attr]
                write_handles.append(event.handle)  # type: ignore[union-attr]
                write_bytes += len(data)
            elif kind is ReadRequest:
                length = event.length  # type: ignore[union-attr]
                reads.append((event.offset, length))  # type: ignore[union-attr]
                read_handles.append(event.handle)  # type: ignore[union-attr]
                read_bytes += length
            elif event is NEED_DATA:
                break
            elif kind is FlushRequest:
                flush_handles.append(event.handle)  # type: ignore[union-attr]
            elif kind is TrimRequest:
                assert isinstance(event, TrimRequest)
                if self._trim_now(event):
                    flush_handles.append(event.handle)  # FUA: reply once durable
            else:
                # control events (disconnect, errors) act on what is in flight: hand the
                # requests collected so far over first
                self._submit(writes, write_handles, write_bytes, reads, read_handles,
                             read_bytes, flush_handles)
                writes, write_handles, reads, read_handles, flush_handles = [], [], [], [], []
                write_bytes = read_bytes = 0
                self._control_event(event)
                continue
            if (self.inflight + len(write_handles) + len(read_handles) + len(flush_handles)
                    >= MAX_INFLIGHT_REQUESTS
                    or self.inflight_bytes + write_bytes + read_bytes >= MAX_INFLIGHT_BYTES):
                self._throttled = True
                self._update_reading()
                break
        self._submit(writes, write_handles, write_bytes, reads, read_handles, read_bytes,
                     flush_handles)

    def _trim_now(self, req: TrimRequest) -> bool:
        """Answer a trim at once; True if it carries FUA and needs a flush first."""
        try:
            if req.length:
                self.batch_backend.trim(req.offset, req.length)
        except Exception as exc:
            error = self._backend_error(f"trim of {req.length} bytes at {req.offset}", exc)
            self._write(SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, error, req.handle))
            return False
        if req.fua and req.length:
            return True
        self._write(SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, 0, req.handle))
        return False

    def _submit(self, writes: list[tuple[int, bytes | bytearray]], write_handles: list[int],
                write_bytes: int, reads: list[tuple[int, int]], read_handles: list[int],
                read_bytes: int, flush_handles: list[int]) -> None:
        backend = self.batch_backend
        if writes:
            self.inflight += len(write_handles)
            self.inflight_bytes += write_bytes
            backend.submit_writes(writes, self._replies_when_done(
                write_handles, write_bytes, writes))
        if flush_handles:
            self.inflight += len(flush_handles)
            backend.submit_writes([], self._replies_when_done(flush_handles, 0, None))
        if reads:
            self.inflight += len(read_handles)
            self.inflight_bytes += read_bytes
            backend.submit_reads(reads, self._read_replies(read_handles, read_bytes, reads))

    def _replies_when_done(self, handles: list[int], nbytes: int,
                           writes: list[tuple[int, bytes | bytearray]] | None) -> WriteDone:
        def done(error: OSError | None) -> None:
            code = 0
            if error is not None:
                what = (f"{len(handles)} writes from offset {writes[0][0]}" if writes
                        else "flush")
                code = self._backend_error(what, error)
            pack = SIMPLE_REPLY.pack
            self._write(b"".join([pack(SIMPLE_REPLY_MAGIC, code, h) for h in handles]))
            self._requests_done(len(handles), nbytes)
        return done

    def _read_replies(self, handles: list[int], nbytes: int,
                      reads: list[tuple[int, int]]) -> ReadDone:
        def done(results: Sequence[bytes | bytearray | memoryview | OSError]) -> None:
            pack = SIMPLE_REPLY.pack
            for handle, (offset, length), data in zip(handles, reads, results, strict=True):
                if isinstance(data, BaseException):
                    error = self._backend_error(f"read of {length} bytes at {offset}", data)
                    self._write(pack(SIMPLE_REPLY_MAGIC, error, handle))
                elif len(data) != length:
                    self.log.error("%s: backend returned %d bytes for a read of %d",
                                   self._prefix, len(data), length)
                    self._write(pack(SIMPLE_REPLY_MAGIC, EIO, handle))
                elif length <= _SPLIT_WRITE:
                    self._write(pack(SIMPLE_REPLY_MAGIC, 0, handle) + data)
                else:
                    self._write_large(pack(SIMPLE_REPLY_MAGIC, 0, handle), data)
            self._requests_done(len(handles), nbytes)
        return done

    def _control_event(self, event: object) -> None:
        conn = self.conn
        if isinstance(event, RequestError):
            self.log.warning("%s: request refused: %s", self._prefix, event.reason)
            self._write(conn.send_reply(event.handle, event.error))
        elif isinstance(event, OptionHandled):
            quiet = event.reply == REP_ACK or event.reply == REP_ERR_UNSUP
            level = logging.DEBUG if quiet else logging.INFO
            name = OPTION_NAMES.get(event.option, f"option {event.option}")
            self.log.log(level, "%s: %s: %s", self._prefix, name, event.message)
            self._write(conn.data_to_send())
        elif isinstance(event, TransmissionStarted):
            self._write(conn.data_to_send())
            self._open = True
            self.server._change_open_count(+1)
            self.log.info(
                "%s: opened export (%d bytes, flags 0x%x)",
                self._prefix,
                event.size,
                event.transmission_flags,
            )
        elif isinstance(event, DisconnectRequest):
            self.log.debug("%s: client sent NBD_CMD_DISC", self._prefix)
            self._close_when_idle()
        elif isinstance(event, ConnectionClosed):
            self._write(conn.data_to_send())
            if event.clean:
                self.log.debug("%s: %s", self._prefix, event.reason)
                self._close_when_idle()
            else:
                self.log.warning("%s: closing connection: %s", self._prefix, event.reason)
                self._closing = True
                self._close_transport()

    def _close_when_idle(self) -> None:
        self._closing = True
        if self.inflight == 0:
            self._close_transport()
        else:
            self._update_reading()

    def _request_done(self, nbytes: int) -> None:
        self._requests_done(1, nbytes)

    def _requests_done(self, count: int, nbytes: int) -> None:
        self.inflight -= count
        self.inflight_bytes -= nbytes
        if self._throttled and (
            self.inflight <= MAX_INFLIGHT_REQUESTS // 2
            and self.inflight_bytes <= MAX_INFLIGHT_BYTES // 2
        ):
            self._throttled = False
            self._drain_batch() if self._batched else self._drain()
            self._update_reading()
        if self.inflight == 0:
            if self._lost:
                self._finished()
            elif self._closing:
                self._close_transport()
            else:
                self._flush()  # nothing else will complete soon: do not wait for the batch

    def _backend_error(self, what: str, exc: Exception) -> int:
        if isinstance(exc, OSError):
            error = nbd_error_from_errno(exc.errno)
            self.log.warning("%s: %s failed: %s", self._prefix, what, exc)
            return error
        self.log.error("%s: %s failed", self._prefix, what, exc_info=exc)
        return EIO

    # --- requests -----------------------------------------------------------------------
    async def _do_read(self, req: ReadRequest) -> None:
        try:
            if req.length:
                data = await self.backend.read(req.offset, req.length)
                if len(data) != req.length:
                    raise RuntimeError(
                        f"backend returned {len(data)} bytes for a read of {req.length}"
                    )
            else:
                data = b""
        except Exception as exc:
            error = self._backend_error(f"read of {req.length} bytes at {req.offset}", exc)
            self._write(self.conn.send_reply(req.handle, error))
        else:
            header = self.conn.send_reply(req.handle)
            if len(data) <= _SPLIT_WRITE:
                self._write(header + data)
            else:
                self._write_large(header, data)
        finally:
            self._request_done(req.length)

    async def _do_write(self, req: WriteRequest) -> None:
        error = EIO  # also the answer if the task is cancelled
        try:
            if req.data:
                await self.backend.write(req.offset, req.data, req.fua)
            error = 0
        except Exception as exc:
            error = self._backend_error(f"write of {len(req.data)} bytes at {req.offset}", exc)
        finally:
            self._write(self.conn.send_reply(req.handle, error))
            self._request_done(len(req.data))

    async def _do_flush(self, req: FlushRequest) -> None:
        error = EIO
        try:
            await self.backend.flush()
            error = 0
        except Exception as exc:
            error = self._backend_error("flush", exc)
        finally:
            self._write(self.conn.send_reply(req.handle, error))
            self._request_done(0)

    async def _do_trim(self, req: TrimRequest) -> None:
        error = EIO
        try:
            if req.length:
                await self.backend.trim(req.offset, req.length)
                if req.fua:
                    await self.backend.flush()
            error = 0
        except Exception as exc:
            error = self._backend_error(f"trim of {req.length} bytes at {req.offset}", exc)
        finally:
            self._write(self.conn.send_reply(req.handle, error))
            self._request_done(0)


def _prepare_socket_path(path: str) -> None:
    """Remove a stale socket file at ``path``; refuse if a server answers or it is no socket."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise Refused(f"{path} exists and is not a socket; remove it or choose another path")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError as exc:
        if exc.errno not in (errno.ECONNREFUSED, errno.ENOENT):
            raise Refused(f"cannot probe existing socket {path}: {exc.strerror}") from None
    else:
        raise Refused(f"another server is listening on {path}; stop it before starting this export")
    finally:
        probe.close()
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


async def start_nbd_server(
    socket_path: str,
    export_name: str,
    backend: NbdBackend | NbdBatchBackend,
    *,
    log: logging.LoggerAdapter | None = None,
) -> NbdServer:
    """Serve ``backend`` as export ``export_name`` on the unix socket ``socket_path`` (0660)."""
    if log is None:
        log = logging.LoggerAdapter(logging.getLogger("marslib.nbd"), {"export": export_name})
    _prepare_socket_path(socket_path)
    server = NbdServer(socket_path, export_name, backend, log)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(socket_path)
        server._socket_ino = os.lstat(socket_path).st_ino
        os.chmod(socket_path, SOCKET_MODE)  # before listen(): nobody connects with wider mode
        loop = asyncio.get_running_loop()
        server._server = await loop.create_unix_server(server._new_client, sock=sock, backlog=128)
    except BaseException:
        sock.close()
        server._remove_socket()
        raise
    log.info(
        "nbd export %r: serving %d bytes%s on %s",
        export_name,
        backend.size(),
        " read-only" if backend.read_only else "",
        socket_path,
    )
    return server
