#!/bin/sh
# build-wheel.sh [--ref GITREF] DEST_DIR
#   Build a marslib wheel into DEST_DIR and print its path. Without --ref: the working
#   tree. With --ref: that commit or tag from git history (e.g. v0.1.0, the previous
#   release), exported with `git archive`, so upgrades can be tested from a real old
#   release. A shallow clone that lacks the ref fetches it from origin first.
set -eu
here=$(cd "$(dirname "$0")/.." && pwd)
ref=""
if [ "${1:-}" = "--ref" ]; then ref=$2; shift 2; fi
dest=${1:?usage: build-wheel.sh [--ref GITREF] DEST_DIR}
mkdir -p "$dest"
dest=$(cd "$dest" && pwd)
pip="$here/.venv/bin/pip"
[ -x "$pip" ] || pip="python3 -m pip"
src="$here"
tmp=""
if [ -n "$ref" ]; then
    if ! git -C "$here" rev-parse -q --verify "$ref^{commit}" >/dev/null; then
        echo "build-wheel: $ref is not in this clone; fetching it from origin" >&2
        git -C "$here" fetch -q --depth 1 origin "refs/tags/$ref:refs/tags/$ref" 2>/dev/null ||
            git -C "$here" fetch -q --depth 1 origin "$ref" || {
                echo "build-wheel: cannot find $ref in git history or at origin" >&2; exit 1; }
    fi
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' EXIT
    git -C "$here" archive "$ref" | tar -x -C "$tmp"
    src="$tmp"
fi
# fixed timestamps: the same sources give the same wheel, so deploying it twice is no change
SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-315532800} $pip wheel -q --no-deps --wheel-dir "$dest" "$src" >&2
wheel=$(cd "$dest" && ls -t marslib-*.whl | head -1)
echo "$dest/$wheel"
