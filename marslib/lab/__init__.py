"""The marslib test lab: several lab hosts on one machine, with real links between them.

Each lab host is a network namespace on a Linux bridge with its own sshd, state root,
loop devices and marsd (see docs/lab.md). ``Lab.up()`` builds one, ``Lab.load()`` finds
the running one, ``bin/mars-lab`` drives it from a shell.
"""

from marslib.lab.errors import LabCommandError, LabError, LabUnsupported
from marslib.lab.lab import Lab, LabHost, down_dir

__all__ = ["Lab", "LabHost", "LabError", "LabUnsupported", "LabCommandError", "down_dir"]
