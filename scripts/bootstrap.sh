#!/usr/bin/env bash
# Install what marslib's demo and tests need: Debian tools (as root) and a venv with the package.
# Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(libnbd-bin python3-libnbd nbdkit fio qemu-utils fuse3 e2fsprogs xfsprogs
              util-linux iproute2 python3 python3-venv iptables openssh-server rsync cron sudo)
TOOLS=(nbdcopy nbdfuse nbdkit fio qemu-img fusermount3 mkfs.ext4 mkfs.xfs losetup
       ip tc iptables sshd ssh ssh-keygen rsync crontab flock sudo)

missing=()
for t in "${TOOLS[@]}"; do command -v "$t" >/dev/null 2>&1 || missing+=("$t"); done
[ -f /usr/lib/python3/dist-packages/nbd.py ] || missing+=(python3-libnbd)
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "bootstrap: installing Debian packages (missing: ${missing[*]})"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq "${APT_PACKAGES[@]}" >/dev/null
  else
    echo "bootstrap: missing ${missing[*]}; as root run: apt-get install ${APT_PACKAGES[*]}" >&2
    echo "bootstrap: tests that need them will be skipped" >&2
  fi
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "bootstrap: creating .venv"
  "$PY" -m venv .venv
fi
if ! .venv/bin/python -c 'import marslib, pytest, hypothesis' 2>/dev/null \
   || [ pyproject.toml -nt .venv/.installed ]; then
  echo "bootstrap: installing marslib and its test tools into .venv"
  .venv/bin/pip install -q --upgrade pip >/dev/null 2>&1 || true
  if ! .venv/bin/pip install -q -e '.[test]' >.venv/pip.log 2>&1; then
    cat .venv/pip.log >&2
    exit 1
  fi
  touch .venv/.installed
fi

# Byte-compile the checkout: with PYTHONDONTWRITEBYTECODE set (CI images often do) every
# marsadm and marsd would compile marslib again, about 0.1 s of CPU per command, more
# under load. compileall writes only what is stale.
.venv/bin/python -m compileall -q -j 0 marslib >/dev/null
