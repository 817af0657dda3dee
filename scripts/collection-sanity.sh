#!/usr/bin/env bash
# `ansible-test sanity` for the collection marslib.mars (ansible/ansible_collections/marslib/
# mars): every sanity test that runs without containers, on the venv's Python 3.11. Exits
# non-zero if any test fails (or ansible-test itself does).
#
#   scripts/collection-sanity.sh [ANSIBLE-TEST OPTIONS]   e.g. --test validate-modules, -v
#
# What it does, and why:
# - ansible-test runs each sanity test in a venv of its own (~/.ansible/test/venv/sanity.*),
#   with the requirements that the installed ansible-core pins for that test (pylint,
#   voluptuous, yamllint, antsibull-docs-parser, pycodestyle, ...). It installs them from the
#   package index the first time and reuses the venvs after that; the project's venv needs
#   only ansible-core. `--local` and `--venv` behave the same in this respect.
# - To put pip into those venvs, ansible-test downloads get-pip.py from
#   ci-files.testing.ansible.com, which this machine cannot reach. A stand-in is written
#   where ansible-test caches that script (unless one is there): it runs the pip that this
#   Python's own ensurepip carries, which then installs the pip version ansible-test asks for.
# - ansible-test works on a collection at .../ansible_collections/NAMESPACE/NAME and, inside
#   a git work tree, only on tracked files. The collection's files (tracked ones and new ones
#   that git does not ignore) are copied to a scratch directory, so new files are checked
#   before they are committed and ansible-test's tests/output stays out of the work tree.
# - --python 3.11: the compile and import tests run on the venv's Python only; the modules'
#   syntax for Python 3.9 (managed hosts) is checked by tests/test_ansible_modules.py.
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
VENV=${VENV:-$REPO/.venv}
COLLECTION=ansible/ansible_collections/marslib/mars
PYTHON_VERSION=3.11
ANSIBLE_TEST=$VENV/bin/ansible-test

if [ ! -x "$ANSIBLE_TEST" ]; then
    echo "collection-sanity: $ANSIBLE_TEST not found (make setup installs ansible-core)" >&2
    exit 2
fi

started=$(date +%s)

# the get-pip.py stand-in, named like the script ansible-test would download
pip_version=$("$VENV/bin/python" -c '
from ansible_test._internal.host_configs import NativePythonConfig
from ansible_test._internal.python_requirements import get_venv_packages
print(get_venv_packages(NativePythonConfig(version="'"$PYTHON_VERSION"'"))["pip"])') || {
    echo "collection-sanity: cannot tell which pip ansible-test bootstraps (its internals" \
        "changed?)" >&2
    exit 2
}
get_pip="$HOME/.ansible/test/cache/get_pip_${pip_version//./_}.py"
if [ ! -e "$get_pip" ]; then
    mkdir -p "$(dirname "$get_pip")"
    cat >"$get_pip.tmp" <<'EOF'
# Written by marslib's scripts/collection-sanity.sh in place of get-pip.py, which
# ansible-test downloads from a host that cannot be reached here. Like get-pip.py it puts
# pip into an empty venv: it runs the pip wheel that this Python's ensurepip carries to
# `pip install --upgrade --force-reinstall` what ansible-test asks for.
import argparse
import glob
import os
import sys

import ensurepip

parser = argparse.ArgumentParser(add_help=False)
parser.add_argument("--no-setuptools", action="store_true")
parser.add_argument("--no-wheel", action="store_true")
options, pip_args = parser.parse_known_args()
bundled = os.path.join(os.path.dirname(ensurepip.__file__), "_bundled")
wheels = sorted(glob.glob(os.path.join(bundled, "pip-*.whl")))
if not wheels:
    sys.exit(f"get-pip stand-in: no pip wheel in {bundled}")
sys.path.insert(0, wheels[-1])
from pip._internal.cli.main import main  # noqa: E402

pip_args = ["install", "--upgrade", "--force-reinstall", *pip_args]
if not options.no_setuptools:
    pip_args.append("setuptools")
if not options.no_wheel:
    pip_args.append("wheel")
sys.exit(main(pip_args))
EOF
    mv "$get_pip.tmp" "$get_pip"
    echo "collection-sanity: wrote the get-pip.py stand-in $get_pip"
fi

# the collection as git would commit it, in a scratch directory
scratch=$(mktemp -d "${TMPDIR:-/tmp}/marslib-sanity.XXXXXX")
trap 'rm -rf "$scratch"' EXIT
git -C "$REPO" ls-files -z --cached --others --exclude-standard -- "$COLLECTION" |
    while IFS= read -r -d '' path; do
        if [ -e "$REPO/$path" ] || [ -L "$REPO/$path" ]; then printf '%s\0' "$path"; fi
    done |
    tar -C "$REPO" --null -T - -cf - | tar -C "$scratch" -xf -

# The shellcheck and pslint tests check .sh and PowerShell files; without the program
# ansible-test only warns and skips, so a file it cannot check fails here instead
tools_missing=0
for check in "sh shellcheck" "ps1 pwsh" "psm1 pwsh" "psd1 pwsh"; do
    ext=${check% *} tool=${check#* }
    if [ -n "$(find "$scratch/$COLLECTION" -name "*.$ext" -print -quit)" ] &&
        ! command -v "$tool" >/dev/null; then
        echo "collection-sanity: the collection has .$ext files and $tool is not installed" >&2
        tools_missing=1
    fi
done
if ((tools_missing)); then exit 2; fi

status=0
(cd "$scratch/$COLLECTION" &&
    "$ANSIBLE_TEST" sanity --local --python "$PYTHON_VERSION" --color no "$@") || status=$?

echo "collection-sanity: $( ((status == 0)) && echo passed || echo "FAILED (exit $status)" )" \
    "in $(($(date +%s) - started)) s"
exit "$status"
