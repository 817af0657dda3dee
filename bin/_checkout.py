"""The start shared by the bin/ scripts: run with this checkout's venv, import this checkout.

A script in bin/ started by any other python (the system's python3 through its shebang, the
first python3 on PATH of an ssh session) executes itself again with ``.venv/bin/python``
when the checkout has that venv (``make setup``), where marslib's dependencies are. Without
a venv it goes on with the python it was given (marslib and its dependencies installed
there). Either way this checkout's ``marslib`` is imported first.
"""

import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))
VENV = os.path.join(REPO, ".venv")
_AGAIN = "MARS_BIN_REEXEC"  # set for the one re-execution, so that it can never loop


def _running_in(venv: str) -> bool:
    return os.path.realpath(sys.prefix) == os.path.realpath(venv)


def enter(script: str) -> None:
    """Re-execute ``script`` (a bin/ file) with the checkout's venv if it has one and this
    python is another; then put the checkout first on ``sys.path``."""
    again = os.environ.pop(_AGAIN, None)  # not inherited by what the script starts
    python = os.path.join(VENV, "bin", "python")
    if not again and os.path.exists(python) and not _running_in(VENV):
        os.environ[_AGAIN] = "1"
        try:
            os.execv(python, [python, os.path.realpath(script), *sys.argv[1:]])
        except OSError as exc:  # a venv that lost its base python: say which and what to do
            sys.exit(f"{os.path.basename(script)}: cannot run {python} ({exc.strerror}); "
                     f"recreate the venv: rm -rf {VENV} && make -C {REPO} setup")
    if REPO not in sys.path:
        sys.path.insert(0, REPO)
