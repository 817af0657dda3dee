"""mars-app: run the demo application on a MARS resource (start, stop, status, verify, grow).

Every command accepts ``--json`` and then prints one JSON object with ``ok`` and
``changed``. Exit codes: 0 ok, 1 refused or failed (the message says why), 2 usage error,
3 timeout. Host identity as marsadm: ``$MARS_RUN_DIR`` (default /run/mars), ``$MARS_HOST``
(default the host name); the application's state: ``--state-dir`` or ``$MARS_APP_DIR``
(default /var/lib/mars-app), per resource ``STATE/R/``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import marslib
from marslib.app import volume
from marslib.app.records import list_chunks, scan_chunk
from marslib.app.verify import VerifyFailed, verify_data
from marslib.app.volume import AppError, AppPaths
from marslib.errors import MarsError, TimedOut, UsageError
from marslib.layout import check_host_name, check_resource_name

log = logging.getLogger("marslib.app.cli")
WRITER_MODULE = "marslib.app.writer"
GROW_SLACK = 16 << 20  # xfs cannot add an allocation group smaller than 16 MiB
DEFAULTS = {"fs": "ext4", "rate": 200.0, "record_size": 4096, "fsync_every": 10}


class App:
    def __init__(self, args: argparse.Namespace, host: str) -> None:
        self.args = args
        self.host = host
        self.paths = AppPaths.from_env(args.resource, args.state_dir, args.run_dir)
        self.where = {"resource": args.resource}
        self.timeout = float(args.timeout)

    def info(self, msg: str, *a: Any) -> None:
        log.info(msg, *a, extra=self.where)

    # ---------------------------------------------------------------- the writer
    def writer_pid(self) -> int:
        """The pid of this resource's running writer, 0 if none."""
        pid = volume.read_pid(self.paths.pidfile)
        if pid and volume.process_alive(pid, *self._needles()):
            return pid
        return 0

    def _needles(self) -> tuple[str, ...]:
        return (WRITER_MODULE, f"--resource {self.paths.resource} ",
                f"--state-dir {self.paths.state_dir} ")

    def acked(self) -> dict[str, Any] | None:
        return volume.read_json(self.paths.acked)

    def acked_seq(self) -> int:
        """The last seq this host's writer fsynced, 0 when it never acknowledged any."""
        return int((self.acked() or {}).get("seq", 0))

    def settings(self) -> dict[str, Any]:
        return {**DEFAULTS, **(volume.read_json(self.paths.settings) or {})}

    def save_settings(self, settings: dict[str, Any]) -> None:
        volume.write_json_atomic(self.paths.settings, settings)

    def spawn_writer(self, settings: dict[str, Any]) -> dict[str, Any]:
        """Start the writer detached and wait for its first acknowledgement."""
        pkg_root = str(Path(marslib.__file__).resolve().parent.parent)
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            [pkg_root, *filter(None, [env.get("PYTHONPATH")])])
        cmd = [sys.executable, "-m", WRITER_MODULE, "--resource", self.paths.resource,
               "--state-dir", str(self.paths.state_dir), "--host", self.host,
               "--rate", str(settings["rate"]), "--record-size", str(settings["record_size"]),
               "--fsync-every", str(settings["fsync_every"])]
        with open(self.paths.writer_log, "ab") as logf:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=logf, stderr=logf,
                                    start_new_session=True, cwd="/", env=env)
        tmp = self.paths.pidfile.with_name("writer.pid.tmp")
        tmp.write_text(f"{proc.pid}\n")
        os.replace(tmp, self.paths.pidfile)
        deadline = time.monotonic() + self.timeout
        while True:
            ack = self.acked()
            if ack is not None and ack.get("pid") == proc.pid:
                return ack
            code = proc.poll()
            if code is not None:
                raise AppError(f"the writer exited with {code} before its first fsync: "
                               f"{volume.tail(self.paths.writer_log, 3)}")
            if time.monotonic() >= deadline:
                raise TimedOut(f"the writer (pid {proc.pid}) made no fsync within "
                               f"{self.timeout:.0f} s; see {self.paths.writer_log}")
            time.sleep(0.02)

    def stop_writer(self) -> dict[str, Any]:
        """SIGTERM the writer and wait; SIGKILL after the timeout."""
        pid = self.writer_pid()
        if not pid:
            return {"stopped_pid": None, "killed": False}
        os.kill(pid, signal.SIGTERM)
        killed = False
        if not volume.wait_gone(pid, self.timeout, *self._needles()):
            log.warning("writer pid %d ignored SIGTERM for %.0f s: killing it", pid,
                        self.timeout, extra=self.where)
            os.kill(pid, signal.SIGKILL)
            volume.wait_gone(pid, 10, *self._needles())
            killed = True
        self.paths.pidfile.unlink(missing_ok=True)
        return {"stopped_pid": pid, "killed": killed}

    # ---------------------------------------------------------------- commands
    def start(self) -> dict[str, Any]:
        a = self.args
        wanted = {"fs": a.fs, "rate": a.rate, "record_size": a.record_size,
                  "fsync_every": a.fsync_every}
        with volume.resource_lock(self.paths, self.timeout):
            pid = self.writer_pid()
            if pid:
                current = self.settings()
                out: dict[str, Any] = {"changed": False, "pid": pid,
                                       "acked_seq": self.acked_seq(),
                                       "settings": current}
                differ = {k: v for k, v in wanted.items() if current.get(k) != v}
                if differ:
                    out["note"] = (f"already running with {_inline(current)}; stop it "
                                   f"first to change {', '.join(sorted(differ))}")
                self.info("start: writer already running as pid %d", pid)
                return out
            vol = volume.attach(self.paths, a.fs, a.mkfs, readonly=False, timeout=self.timeout)
            try:
                self.save_settings({**wanted, "wanted": True})
                ack = self.spawn_writer(wanted)
            except (MarsError, OSError):
                self.stop_writer()
                self.save_settings({**wanted, "wanted": False})
                if vol["changed"]:
                    volume.detach(self.paths, self.timeout)
                raise
            pid = self.writer_pid()
            self.info("start: writer pid %d on %s continues at seq %d (first fsync done)",
                      pid, self.paths.mnt, ack["start_seq"])
            return {"changed": True, "pid": pid, "start_seq": ack["start_seq"],
                    "acked_seq": ack["seq"], "mkfs": vol["mkfs"], "fs": vol["fs"],
                    "loop": vol["loop"], "cleaned": vol["cleaned"], "settings": wanted,
                    **volume.fs_stats(self.paths)}

    def stop(self) -> dict[str, Any]:
        with volume.resource_lock(self.paths, self.timeout):
            w = self.stop_writer()
            done = volume.detach(self.paths, self.timeout)
            if self.paths.settings.exists():
                self.save_settings({**self.settings(), "wanted": False})
            ack = self.acked()
            changed = bool(w["stopped_pid"] or done)
            self.info("stop: %s; %s; acked seq %s",
                      f"writer pid {w['stopped_pid']} stopped" if w["stopped_pid"]
                      else "no writer running", "; ".join(done) or "nothing attached",
                      self.acked_seq())
            return {"changed": changed, **w, "detached": done,
                    "acked_seq": self.acked_seq(), "acked": ack}

    def status(self) -> dict[str, Any]:
        pid = self.writer_pid()
        att = volume.healthy(self.paths)
        out: dict[str, Any] = {"changed": False, "resource": self.paths.resource,
                               "host": self.host, "running": bool(pid), "pid": pid or None,
                               "acked": self.acked(), "mounted": att is not None,
                               "primary_here": self.paths.socket.exists(),
                               "settings": self.settings() if self.paths.settings.exists()
                               else None}
        out["acked_seq"] = self.acked_seq()
        if not pid and (out["settings"] or {}).get("wanted"):
            out["writer_died"] = volume.tail(self.paths.writer_log, 2)  # started, not stopped
        if att is not None:
            out.update(volume.fs_stats(self.paths), fs=att.fstype, loop=att.loop,
                       readonly=att.readonly, **self._records())
        self.info("status: %s, %s, acked seq %s", "running" if pid else "not running",
                  "mounted" if att else "not mounted", out["acked_seq"])
        return out

    def _records(self) -> dict[str, Any]:
        """Cheap counts from the first and the newest chunk (verify reads everything)."""
        chunks = list_chunks(self.paths.data)
        if not chunks:
            return {"records": 0, "chunks": 0, "first_seq": None, "last_seq": 0}
        first, _ = scan_chunk(chunks[0][1])
        last_seq = 0
        for _, path in reversed(chunks):
            scan, _ = scan_chunk(path)
            if scan.records:
                last_seq = scan.last_seq
                break
        first_seq = first.first_seq or None
        records = last_seq - first_seq + 1 if first_seq else 0
        return {"records": records, "chunks": len(chunks), "first_seq": first_seq,
                "last_seq": last_seq,
                "data_bytes": sum(p.stat().st_size for _, p in chunks)}

    def verify(self) -> dict[str, Any]:
        if volume.healthy(self.paths) is not None:
            return self._verify_here(attached_for_check=False)
        with volume.resource_lock(self.paths, self.timeout):
            vol = volume.attach(self.paths, readonly=True, timeout=self.timeout)
            try:
                return self._verify_here(attached_for_check=vol["changed"])
            finally:
                if vol["changed"]:
                    volume.detach(self.paths, self.timeout)

    def _verify_here(self, attached_for_check: bool) -> dict[str, Any]:
        a = self.args
        try:
            rep = verify_data(self.paths.data, a.min_seq, a.allow_torn_tail)
        except VerifyFailed as exc:
            self.info("verify: FAILED: %s", exc)
            raise VerifyError(str(exc), {**exc.report,
                                         "attached_for_check": attached_for_check}) from None
        self.info("verify: ok: %d records seq %s..%d in %d chunks by %s, %.2f s%s",
                  rep["records"], rep["first_seq"], rep["last_seq"], rep["chunks"],
                  rep["hosts"], rep["seconds"],
                  " (read-only attach for the check)" if attached_for_check else "")
        return {"changed": False, **rep, "min_seq": a.min_seq,
                "attached_for_check": attached_for_check}

    def grow(self) -> dict[str, Any]:
        """Re-attach to see a new export size and make the filesystem fill it. A filesystem
        that fills the export already (within GROW_SLACK) is left alone, writer and all."""
        with volume.resource_lock(self.paths, self.timeout):
            settings = self.settings()
            volume.check_export(self.paths)
            size = volume.export_size(self.paths)
            att = volume.healthy(self.paths)
            was_attached = att is not None
            if att is not None:
                old = volume.fs_stats(self.paths)["fs_size"]
                dev = volume.device_size(att.loop)
                span = volume.fs_capacity(self.paths, att)
                if dev >= size and span >= dev - GROW_SLACK:
                    self.info("grow: nothing to do, the %s filesystem spans %d of %d bytes",
                              att.fstype, span, dev)
                    return {"changed": False, "old_fs_size": old, "new_fs_size": old,
                            "export_size": size, "reattached": False,
                            "writer_restarted": False, "pid": self.writer_pid() or None}
            restart = was_attached and (bool(self.writer_pid()) or bool(settings.get("wanted")))
            stopped = self.stop_writer()
            volume.detach(self.paths, self.timeout)  # NBD tells clients nothing of a resize
            if att is None:  # not attached here: measure before, grow, leave it detached
                volume.attach(self.paths, settings["fs"], timeout=self.timeout)
                old = volume.fs_stats(self.paths)["fs_size"]
                volume.detach(self.paths, self.timeout)
            volume.attach(self.paths, settings["fs"], timeout=self.timeout, grow=True)
            new = volume.fs_stats(self.paths)["fs_size"]
            pid = 0
            if restart:
                self.spawn_writer(settings)
                pid = self.writer_pid()
            elif not was_attached:
                volume.detach(self.paths, self.timeout)
            self.info("grow: export %d bytes, filesystem %d -> %d bytes%s", size, old, new,
                      f", writer pid {pid} restarted" if pid else "")
            return {"changed": True, "old_fs_size": old, "new_fs_size": new,
                    "export_size": size, "reattached": True,
                    "writer_stopped": stopped["stopped_pid"], "writer_restarted": bool(pid),
                    "pid": pid or None}


class VerifyError(MarsError):
    def __init__(self, message: str, report: dict[str, Any]) -> None:
        super().__init__(message)
        self.report = report


# ------------------------------------------------------------------ parsing
def _common(suppress: bool) -> argparse.ArgumentParser:
    """Options every command takes, before or after the command (after wins)."""
    common = argparse.ArgumentParser(add_help=False)

    def default(value: Any) -> Any:
        return argparse.SUPPRESS if suppress else value

    common.add_argument("--json", action="store_true", default=default(False),
                        help="print one JSON object")
    common.add_argument("--timeout", type=float, default=default(60.0),
                        help="seconds to wait at most (writer start/stop, locks)")
    common.add_argument("--state-dir", default=default(None),
                        help="application state (default $MARS_APP_DIR or /var/lib/mars-app)")
    common.add_argument("--run-dir", default=default(None),
                        help="marsd sockets (default $MARS_RUN_DIR or /run/mars)")
    common.add_argument("--host", default=default(None),
                        help="this host's name (default $MARS_HOST or hostname)")
    return common


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a positive number")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mars-app", parents=[_common(False)],
        description="the demo application on a MARS resource: numbered, checksummed records "
                    "on a filesystem on the resource's NBD export, and their verification")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    per = _common(True)
    p = sub.add_parser("start", parents=[per], help="attach the filesystem, start the writer")
    p.add_argument("resource")
    p.add_argument("--fs", choices=volume.FILESYSTEMS, default="ext4",
                   help="filesystem for --mkfs (default ext4)")
    p.add_argument("--mkfs", action="store_true",
                   help="make a filesystem if the device carries none (never reformats)")
    p.add_argument("--rate", type=float, default=200.0,
                   help="records per second (default 200; 0: as fast as possible)")
    p.add_argument("--record-size", type=_positive_int, default=4096,
                   help="bytes per record, header included (default 4096)")
    p.add_argument("--fsync-every", type=_positive_int, default=10,
                   help="fsync and acknowledge every N records (default 10)")
    p = sub.add_parser("stop", parents=[per], help="stop the writer, detach the filesystem")
    p.add_argument("resource")
    p = sub.add_parser("status", parents=[per], help="writer, ledger and filesystem state")
    p.add_argument("resource")
    p = sub.add_parser("verify", parents=[per],
                       help="check every record; attaches read-only if not mounted here")
    p.add_argument("resource")
    p.add_argument("--min-seq", type=int, default=0,
                   help="fail unless the records reach this seq (an acknowledged seq)")
    p.add_argument("--allow-torn-tail", action="store_true",
                   help="accept a record cut short at the end of the newest chunk "
                        "(verifying while the writer runs)")
    p = sub.add_parser("grow", parents=[per],
                       help="after 'marsadm resize': re-attach and grow the filesystem")
    p.add_argument("resource")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else argv
    want_json = "--json" in argv
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        if want_json and exc.code not in (0, None):
            print(json.dumps({"ok": False, "changed": False,
                              "error": "usage error (see mars-app --help)", "code": 2}))
        return int(exc.code or 0)
    if not args.command:
        parser.print_help(sys.stderr)
        return 2
    code = 0
    host = "?"
    try:
        host = check_host_name(args.host or os.environ.get("MARS_HOST")
                               or socket.gethostname())
        check_resource_name(args.resource)
        from marslib.logsetup import setup_logging
        setup_logging(host, prog="mars-app")
        app = App(args, host)
        result = getattr(app, args.command)()
        out: dict[str, Any] = {"ok": True, "resource": args.resource, "host": host, **result}
    except UsageError as exc:
        code, out = 2, {"ok": False, "changed": False, "error": str(exc), "code": 2}
    except TimedOut as exc:
        code, out = 3, {"ok": False, "changed": False, "error": str(exc), "code": 3}
    except VerifyError as exc:
        code, out = 1, {"ok": False, "changed": False, "error": str(exc), "code": 1,
                        **exc.report}
    except MarsError as exc:
        code, out = 1, {"ok": False, "changed": False, "error": str(exc), "code": 1}
    except OSError as exc:
        where = f"{exc.filename}: " if exc.filename else ""
        code, out = 1, {"ok": False, "changed": False, "error": f"{where}{exc.strerror}",
                        "code": 1}
    if not out["ok"]:
        log.error("%s: %s", args.command, out["error"],
                  extra={"resource": getattr(args, "resource", None), "host": host})
    if args.json:
        print(json.dumps(out, indent=2, default=str))
    elif out["ok"]:
        print(render_human(out))
    else:
        print(f"mars-app {args.command}: {out['error']}", file=sys.stderr)
    return code


# ------------------------------------------------------------------ output for people
SIZE_KEYS = frozenset({"fs_size", "fs_free", "data_bytes", "bytes", "export_size",
                       "old_fs_size", "new_fs_size"})
TIME_KEYS = frozenset({"time"})  # the ledger's wall clock, seconds since the epoch
HIDDEN = frozenset({"ok"})  # an answer printed on stdout is ok; failures go to stderr


def render_human(out: dict[str, Any]) -> str:
    """A command's reply as aligned ``key: value`` lines, for people (``--json`` is for
    programs). Plain values first, then lists (one item a line) and nested objects (the
    ledger, settings, records per host), indented under their key; empty values are left
    out; sizes in binary units, times as local time."""
    return "\n".join(_lines(out, ""))


def _lines(obj: dict[str, Any], indent: str) -> list[str]:
    items = [(k, v) for k, v in obj.items() if k not in HIDDEN and v not in (None, "", [], {})]
    plain = [(k, v) for k, v in items if not isinstance(v, (dict, list, tuple))]
    width = max((len(k) for k, _ in plain), default=0) + 1
    lines = [f"{indent}{k + ':':<{width}} {_value(k, v)}" for k, v in plain]
    for key, value in items:
        if isinstance(value, dict):
            lines += [f"{indent}{key}:", *_lines(value, indent + "  ")]
        elif isinstance(value, (list, tuple)):
            lines += [f"{indent}{key}:", *(f"{indent}  - {_item(key, v)}" for v in value)]
    return lines


def _item(key: str, value: Any) -> str:
    return _inline(value) if isinstance(value, dict) else _value(key, value)


def _value(key: str, value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if key in SIZE_KEYS and isinstance(value, int):
        return _size(value)
    if key in TIME_KEYS and isinstance(value, (int, float)):
        return time.strftime("%Y-%m-%d %H:%M:%S %z", time.localtime(value))
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _inline(obj: dict[str, Any]) -> str:
    """A small object on one line: ``fs=ext4 rate=200 record_size=4096``."""
    return " ".join(f"{k}={_value(k, v)}" for k, v in obj.items())


def _size(n: int) -> str:
    if abs(n) < 1024:
        return f"{n} B"
    x = float(n)
    for unit in ("KiB", "MiB", "GiB"):
        x /= 1024
        if abs(x) < 1024:
            return f"{x:.1f} {unit}"
    return f"{x / 1024:.1f} TiB"


if __name__ == "__main__":
    raise SystemExit(main())
