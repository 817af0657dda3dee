"""What can go wrong in the lab, with what the user needs to fix it."""

from __future__ import annotations

from marslib.errors import MarsError


class LabError(MarsError):
    """The lab could not do what was asked; the message says why and what to run."""


class LabUnsupported(LabError):
    """This lab runs without root (hosts are processes on 127.0.0.x): no netns, no shaping."""


class LabCommandError(LabError):
    """A command (in the root namespace or in a lab host) failed."""

    def __init__(self, cmd: list[str], returncode: int, stdout: str, stderr: str,
                 detail: str = "") -> None:
        text = f"command failed (rc {returncode}): {' '.join(cmd)}"
        if stdout.strip():
            text += f"\n--- stdout ---\n{stdout.rstrip()}"
        if stderr.strip():
            text += f"\n--- stderr ---\n{stderr.rstrip()}"
        if detail:
            text += f"\n{detail.rstrip()}"
        super().__init__(text)
        self.cmd = cmd
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr
