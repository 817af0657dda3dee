"""mars-lab: bring the test lab up and down, run things in its hosts, shape and cut links."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from marslib.lab import marsd as marsd_ctl
from marslib.lab.errors import LabError
from marslib.lab.lab import Lab, down_dir
from marslib.lab.run import ns_prefix
from marslib.lab.sshd import ssh_argv
from marslib.lab.state import default_lab_dir


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mars-lab", description=__doc__)
    p.add_argument("--lab-dir", type=Path,
                   help="lab directory (default $MARS_LAB_DIR or /var/tmp/mars-lab)")
    p.add_argument("-v", "--verbose", action="store_true", help="log every command run")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    up = sub.add_parser("up", help="bring up a lab (removes an older one first)")
    up.add_argument("--hosts", type=int, default=2, help="number of hosts (default 2)")
    up.add_argument("--secondaries-far", action="store_true",
                    help="lab2.. are in a far data centre: their links get 100mbit and "
                    "25 ms one-way delay")
    up.add_argument("--device-size", default="256M", help="size of each data device")
    up.add_argument("--devices", type=int, default=1, help="data devices per host")
    up.add_argument("--net", type=_net_arg, help="lab net number or 'auto' (default: 0 for "
                    "the default lab directory, else auto)")
    up.add_argument("--local", action="store_true",
                    help="no namespaces: hosts are processes on 127.0.N.x (as without root)")

    sub.add_parser("down", help="remove the lab and everything it started")
    st = sub.add_parser("status", help="hosts, addresses, daemons, shaping, partitions")
    st.add_argument("--json", action="store_true")

    ex = sub.add_parser("exec", help="run a command in a host: exec HOST -- CMD...")
    ex.add_argument("host")
    ex.add_argument("cmd", nargs=argparse.REMAINDER)
    ssh = sub.add_parser("ssh", help="ssh into a host with the lab key")
    ssh.add_argument("host")
    ssh.add_argument("cmd", nargs=argparse.REMAINDER)

    sh = sub.add_parser("shape", help="set a host's link profile (what is not given is off)")
    sh.add_argument("host")
    sh.add_argument("--rate", help="e.g. 10mbit, 1gbit (tbf, both directions)")
    sh.add_argument("--delay", help="one-way delay, e.g. 25ms (TCP on ports 7777-7779)")
    sh.add_argument("--loss", help="packet loss, e.g. 1%% (both directions)")
    sh.add_argument("--storm", help="FACTORx:DURATION/PERIOD, e.g. 100x:2s/10s")
    sh.add_argument("--clear", action="store_true", help="remove all shaping of the host")

    pa = sub.add_parser("partition", help="cut all traffic between two hosts")
    pa.add_argument("a")
    pa.add_argument("b")
    he = sub.add_parser("heal", help="undo a partition: heal A B, or heal --all")
    he.add_argument("a", nargs="?")
    he.add_argument("b", nargs="?")
    he.add_argument("--all", action="store_true")

    md = sub.add_parser("marsd", help="marsd start|stop|kill|restart HOST [-- EXTRA_ARGS]")
    md.add_argument("action", choices=["start", "stop", "kill", "restart"])
    md.add_argument("host")
    md.add_argument("extra", nargs=argparse.REMAINDER)

    sub.add_parser("inventory", help="print the path of the Ansible inventory")
    return p


def _net_arg(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: a number or auto") from None


def _strip_dashes(args: list[str]) -> list[str]:
    return args[1:] if args[:1] == ["--"] else args


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="mars-lab: %(message)s", stream=sys.stderr)
    lab_dir = (args.lab_dir or default_lab_dir()).absolute()
    try:
        return _dispatch(args, lab_dir)
    except LabError as exc:
        print(f"mars-lab: {exc}", file=sys.stderr)
        return 1


def _dispatch(args: argparse.Namespace, lab_dir: Path) -> int:
    if args.command == "up":
        lab = Lab.up(args.hosts, args.secondaries_far, args.device_size, args.devices,
                     lab_dir=lab_dir, net=args.net, mode="local" if args.local else None)
        _print_status(lab.status())
        return 0
    if args.command == "down":
        left = down_dir(lab_dir)
        if left:
            print("mars-lab: left behind: " + "; ".join(left), file=sys.stderr)
            return 1
        print(f"lab in {lab_dir} is down")
        return 0
    lab = Lab.load(lab_dir)
    if args.command == "status":
        status = lab.status()
        if args.json:
            print(json.dumps(status, indent=2))
        else:
            _print_status(status)
        return 0
    if args.command == "exec":
        cmd = _strip_dashes(args.cmd)
        if not cmd:
            raise LabError("exec HOST -- CMD...: no command given")
        h = lab.host(args.host)
        argv = [*ns_prefix(h.netns), *cmd]
        os.execvpe(argv[0], argv, h.env)
    if args.command == "ssh":
        lab.host(args.host)
        lab.require_netns("ssh")
        argv = ssh_argv(lab.ssh_config, args.host, *_strip_dashes(args.cmd))
        os.execvp(argv[0], argv)
    if args.command == "shape":
        given = [args.rate, args.delay, args.loss, args.storm]
        if args.clear == any(given):
            raise LabError("shape HOST: give --rate/--delay/--loss/--storm, or --clear")
        if args.clear:
            lab.clear_shape(args.host)
        else:
            lab.shape(args.host, args.rate, args.delay, args.loss, args.storm)
        return 0
    if args.command == "partition":
        lab.partition(args.a, args.b)
        return 0
    if args.command == "heal":
        if args.all:
            lab.heal_all()
        elif args.a and args.b:
            lab.heal(args.a, args.b)
        else:
            raise LabError("heal A B, or heal --all")
        return 0
    if args.command == "marsd":
        return _marsd(lab, args.action, args.host, _strip_dashes(args.extra))
    if args.command == "inventory":
        print(lab.inventory)
        return 0
    raise LabError(f"unknown command {args.command}")


def _marsd(lab: Lab, action: str, host: str, extra: list[str]) -> int:
    if action in ("stop", "restart"):
        lab.marsd_stop(host)
    if action == "kill":
        lab.marsd_kill(host)
    if action in ("start", "restart"):
        pid = lab.marsd_start(host, *extra)
        print(f"marsd on {host}: pid {pid}, log {marsd_ctl.logfile(lab.host(host).dir)}")
    return 0


def _print_status(s: dict[str, Any]) -> None:
    print(f"lab {s['lab_dir']}  mode {s['mode']}  net {s['net']} ({s['subnet']}"
          + (f", bridge {s['bridge']}" if s["bridge"] else "") + ")")
    for h in s["hosts"]:
        shape = h["shape"]
        shaped = " ".join(f"{k}={v}" for k, v in (shape or {}).items() if v and k != "since")
        print(f"  {h['name']:6} {h['ip']:14} netns={h['netns'] or '-'} "
              f"marsd={h['marsd_pid'] or '-'} sshd={h['sshd_pid'] or '-'} "
              f"devices={','.join(h['devices'])}" + (f"  [{shaped}]" if shaped else ""))
    if s["partitions"]:
        print("  partitions: " + ", ".join("-".join(p) for p in s["partitions"]))
    print(f"  inventory {s['inventory']}")
    if s["ssh_config"]:
        print(f"  ssh -F {s['ssh_config']} lab1")
