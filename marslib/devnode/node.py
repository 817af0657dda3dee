"""Attach, inspect and detach one resource's node ``/dev/mars/R``.

All of it blocks (commands, waits): marsd calls it in a thread. A healthy node is left
alone; a stale one (dead nbdfuse, an export that restarted under it, a loop device over a
stale file) is rebuilt, unless something has it mounted or open, which the caller is told.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

from marslib.devnode import fuse, kernel, system
from marslib.devnode.common import (
    FUSE,
    KERNEL,
    NodeInfo,
    NodePaths,
    State,
    default_run_dir,
    link_target,
    remove_link,
    set_link,
)
from marslib.errors import MarsError, Refused

log = logging.getLogger("marslib.devnode")


def choose_backend(sys_module_nbd: Path = kernel.SYS_MODULE_NBD) -> str:
    """KERNEL where the kernel has ``nbd``, else FUSE."""
    return KERNEL if kernel.available(sys_module_nbd) else FUSE


def _paths(resource: str, run_dir: Path | None) -> NodePaths:
    return NodePaths(resource, Path(run_dir) if run_dir is not None else default_run_dir())


def node_state(resource: str, run_dir: Path | None = None) -> NodeInfo | None:
    """The node of ``resource`` as it is now, None if there is none (nor any leftover)."""
    paths = _paths(resource, run_dir)
    state = State.load(paths.state)
    target = link_target(paths.node)
    if state is None:
        leftovers = fuse.devices(paths)
        if target is None and not leftovers and not system.mounts_at(paths.fuse_dir):
            return None
        device = target or (leftovers[0] if leftovers else "")
        return NodeInfo(resource, str(paths.node), device, FUSE, "", healthy=False,
                        problem="left over from an earlier run (no record of it)")
    why: str | None
    if target != state.device:
        why = f"{paths.node} does not point to {state.device}"
    elif state.backend == KERNEL:
        why = kernel.problem(state)
    else:
        why = fuse.problem(paths, state, Path(state.socket))
    return NodeInfo(resource, str(paths.node), state.device, state.backend, state.socket,
                    state.client_pid, state.connections, healthy=why is None, problem=why)


def _devices(paths: NodePaths, state: State | None) -> list[str]:
    devs = fuse.devices(paths)
    target = link_target(paths.node)
    for dev in (state.device if state else None, target):
        if dev and dev not in devs and (dev.startswith("/dev/nbd") or
                                        system.loop_backing(dev) is not None):
            devs.append(dev)
    return devs


def in_use(resource: str, run_dir: Path | None = None) -> str | None:
    """What keeps the node of ``resource`` busy (a mount point, a holder, a process), or
    None if nothing does."""
    paths = _paths(resource, run_dir)
    state = State.load(paths.state)
    devs = _devices(paths, state)
    if not devs:
        return None
    numbers = {system.devno(d): d for d in devs}
    for m in system.mounts():
        if m.devno in numbers or m.source in devs or m.source == str(paths.node):
            return f"mounted at {m.target}"
    for dev in devs:
        held = system.holders(dev)
        if held:
            return f"{dev} is held by {', '.join(held)}"
    own = state.client_pid if state is not None and state.backend == KERNEL else -1
    for dev in devs:
        users = [(pid, comm) for pid, comm in
                 system.openers((dev, str(paths.node)), system.devno(dev)) if pid != own]
        if users:
            return f"{dev} is open by " + ", ".join(f"pid {p} ({c})" for p, c in users)
    return None


def _teardown(paths: NodePaths, timeout: float) -> list[str]:
    state = State.load(paths.state)
    done: list[str] = []
    if state is not None and state.backend == KERNEL:
        done += kernel.teardown(state, log_path=paths.client_log)
    done += fuse.teardown(paths, timeout)
    if remove_link(paths.node, None):
        done.append(f"removed {paths.node}")
    paths.state.unlink(missing_ok=True)
    return done


def attach(resource: str, nbd_socket: Path, run_dir: Path | None = None,
           backend: str | None = None, timeout: float = 30) -> NodeInfo:
    """Give ``resource`` the node ``/dev/mars/R`` on its export ``nbd_socket``.

    Idempotent: a healthy node is returned as it is. A stale one is rebuilt if nothing
    uses it; if something does, Refused names it (unmount it; the next attach rebuilds).
    """
    paths = _paths(resource, run_dir)
    where = {"resource": resource}
    cur = node_state(resource, paths.run_dir)
    if cur is not None and cur.healthy and cur.socket == str(nbd_socket):
        return cur
    if cur is not None:
        user = in_use(resource, paths.run_dir)
        if user is not None:
            raise Refused(f"the node {cur.node} of {resource} is stale ({cur.problem}) and "
                          f"in use ({user}): its I/O fails; unmount or close it, and it is "
                          "rebuilt")
        done = _teardown(paths, timeout)
        log.warning("rebuilding the node %s (%s): %s", cur.node, cur.problem,
                    "; ".join(done) or "nothing to clean up", extra=where)
    chosen = backend or choose_backend()
    paths.run_dir.mkdir(parents=True, exist_ok=True)
    try:
        if chosen == KERNEL:
            state = kernel.build(paths, Path(nbd_socket), timeout)
        else:
            state = fuse.build(paths, Path(nbd_socket), timeout)
        state.save(paths.state)
        set_link(paths.node, state.device)
    except (MarsError, OSError):
        with contextlib.suppress(MarsError, OSError):  # keep the first error
            _teardown(paths, timeout)
        raise
    log.info("attached %s -> %s (%s, client pid %d)", paths.node, state.device, chosen,
             state.client_pid, extra=where)
    info = node_state(resource, paths.run_dir)
    assert info is not None
    return info


def detach(resource: str, run_dir: Path | None = None, timeout: float = 30) -> list[str]:
    """Take the node of ``resource`` away; what was done (empty: there was none).

    Refused while it is mounted, held or open, naming what uses it.
    """
    paths = _paths(resource, run_dir)
    user = in_use(resource, paths.run_dir)
    if user is not None:
        raise Refused(f"the node {paths.node} of {resource} is in use ({user}): unmount or "
                      "close it first")
    done = _teardown(paths, timeout)
    if done:
        log.info("detached %s: %s", paths.node, "; ".join(done),
                 extra={"resource": resource})
    return done
