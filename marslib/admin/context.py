"""What every admin step gets: this host, its paths and tree, marsd, and an output sink."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from marslib import control
from marslib.errors import Refused, TimedOut
from marslib.layout import MarsPaths, check_resource_name
from marslib.meta import MetaStore
from marslib.schema import UUID, ResourceKeys
from marslib.status import DaemonStatus, ResourceStatus

Result = dict[str, Any]  # what a step returns: "changed" and its figures; JSON for --json

# A wait checks its condition again after a tenth of the time it has waited so far,
# within these bounds: a short wait (a resync of a few blocks) ends a few milliseconds
# after its condition, a longer one at most 50 ms after it.
POLL_MIN = 0.005
POLL_MAX = 0.05
STATUS_EVERY = 0.5  # seconds between looks at marsd's status only for a progress line


@dataclass
class Admin:
    """One marsadm invocation's view of this host."""

    paths: MarsPaths
    host: str
    meta: MetaStore
    timeout: float = 60.0
    dry_run: bool = False
    lines: list[str] = field(default_factory=list)
    progress: Callable[[str], None] = lambda line: None

    def say(self, text: str) -> None:
        """A line for the operator (printed unless --json)."""
        self.lines.append(text)

    def keys(self, resource: str) -> ResourceKeys:
        return ResourceKeys(resource)

    # ------------------------------------------------------------------ marsd
    def daemon(self, cmd: str, **kw: Any) -> dict[str, Any]:
        """Ask marsd; DaemonNotRunning (a Refused) when it is not running."""
        return control.request(self.paths.control_socket, cmd, timeout=self.timeout, **kw)

    def daemon_status(self) -> DaemonStatus | None:
        """marsd's status, typed; None when marsd is not running."""
        try:
            return DaemonStatus.from_json(self.daemon("status"))
        except control.DaemonNotRunning:
            return None

    def require_daemon(self, why: str) -> DaemonStatus:
        """marsd's status; refused (before anything changes) when marsd is not running."""
        st = self.daemon_status()
        if st is None:
            raise control.DaemonNotRunning(
                f"marsd is not running here ({self.paths.control_socket} is missing), and "
                f"{why}: start marsd first (systemctl start marsd); nothing was changed")
        return st

    def live(self, resource: str) -> ResourceStatus | None:
        """marsd's status of one resource (None when it does not run it)."""
        return DaemonStatus.from_json(self.daemon("status")).resources.get(resource)

    def poke(self) -> bool:
        """Tell marsd to act on the tree now; False when it is not running."""
        try:
            self.daemon("reconcile")
            return True
        except control.DaemonNotRunning:
            self.say("note: marsd is not running here; it acts on this when it starts")
            return False

    # ---------------------------------------------------------- preconditions
    def require_cluster(self) -> None:
        if self.meta.get(UUID) is None:
            raise Refused(f"{self.paths.root} holds no cluster: run 'marsadm create-cluster' "
                          "first")

    def resource_names(self) -> list[str]:
        """Resources that exist here (their ``size`` is written last)."""
        return [n for n in self.paths.resources()
                if self.meta.get(ResourceKeys(n).size) is not None]

    def require_resource(self, resource: str) -> ResourceKeys:
        check_resource_name(resource)
        self.require_cluster()
        k = ResourceKeys(resource)
        if not self.paths.resource_dir(resource).is_dir() or self.meta.get(k.size) is None:
            known = ", ".join(self.paths.resources()) or "none"
            raise Refused(f"resource {resource!r} does not exist (resources here: {known})")
        return k

    def require_member(self, resource: str, hint: str) -> ResourceKeys:
        k = self.require_resource(resource)
        if self.meta.get(k.data(self.host)) is None:
            raise Refused(f"{self.host} is not a member of {resource}: {hint}")
        return k

    # ------------------------------------------------------------------ waits
    def wait_for(self, what: str, check: Callable[[], str | None | bool]) -> None:
        """Poll ``check`` until it returns True; a string is an error to report."""
        started = time.monotonic()
        deadline = started + self.timeout
        while True:
            outcome = check()
            if outcome is True:
                return
            if isinstance(outcome, str):
                raise Refused(outcome)
            if time.monotonic() >= deadline:
                raise TimedOut(f"timed out after {self.timeout:g}s waiting for {what}")
            time.sleep(poll_interval(time.monotonic() - started))


def status_due() -> Callable[[], bool]:
    """For a wait's progress line: True at the first call, then at most once every
    STATUS_EVERY seconds (the condition itself is checked at every poll)."""
    last = [float("-inf")]

    def due() -> bool:
        now = time.monotonic()
        if now - last[0] < STATUS_EVERY:
            return False
        last[0] = now
        return True
    return due


def poll_interval(waited: float) -> float:
    """Seconds until a wait that has lasted ``waited`` seconds checks again."""
    return min(POLL_MAX, max(POLL_MIN, waited / 10))


def daemon_failure(st: DaemonStatus, name: str) -> str | None:
    """marsd's last failure to start ``name``, and when it tries again by itself."""
    msg = st.failures.get(name)
    retry_in = st.retry_in.get(name)  # None from an older marsd
    if not msg or retry_in is None:
        return msg
    at = time.strftime("%H:%M:%S", time.localtime(time.time() + retry_in))
    return (f"{msg}; marsd retries by itself at about {at} (in {retry_in:.0f} s); "
            f"'marsadm up {name}' retries at once")
