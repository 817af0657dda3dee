#!/bin/sh
# install-collection.sh DEST
#   Build the collection marslib.mars of this checkout (ansible-galaxy collection build)
#   and install the tarball into DEST (DEST/ansible_collections/marslib/mars), as a user
#   would: `ANSIBLE_COLLECTIONS_PATH=DEST ansible-playbook marslib.mars.site` then uses
#   the installed copy. Prints the tarball's path. The test suite and `make molecule` run
#   against a collection installed this way.
set -eu
here=$(cd "$(dirname "$0")/.." && pwd)
dest=${1:?usage: install-collection.sh DEST}
bin="$here/.venv/bin"
[ -x "$bin/ansible-galaxy" ] || bin=$(dirname "$(command -v ansible-galaxy)")
build=$(mktemp -d)
trap 'rm -rf "$build"' EXIT
"$bin/ansible-galaxy" collection build --force --output-path "$build" \
    "$here/ansible/ansible_collections/marslib/mars" >&2
tarball=$(ls "$build"/marslib-mars-*.tar.gz)
mkdir -p "$dest"
"$bin/ansible-galaxy" collection install --force --offline -p "$dest" "$tarball" >&2
mkdir -p "$dest/dist"
cp "$tarball" "$dest/dist/"
echo "$dest/dist/$(basename "$tarball")"
