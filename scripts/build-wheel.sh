#!/bin/sh
# build-wheel.sh [--ref GITREF | --previous] DEST_DIR
#   Build a marslib wheel into DEST_DIR and print its path. Without options: the working
#   tree. With --ref: that commit or tag from git history, exported with `git archive`.
#   With --previous: the previous release named in scripts/previous-release (a version
#   and a commit id: tags do not travel with a clone, commits do), so that upgrades are
#   tested from a real old release in every clone. A clone that lacks the commit (a
#   shallow one) fetches it from origin; if that fails too, this fails and says so.
set -eu
here=$(cd "$(dirname "$0")/.." && pwd)
ref=""
want_version=""
case "${1:-}" in
    --ref) ref=${2:?usage: build-wheel.sh --ref GITREF DEST_DIR}; shift 2 ;;
    --previous)
        record="$here/scripts/previous-release"
        set -- "${2:-}" $(grep -v '^[[:space:]]*#' "$record" | grep -v '^[[:space:]]*$' | tail -1)
        want_version=${2:-}; ref=${3:-}
        set -- "$1"
        [ -n "$want_version" ] && [ -n "$ref" ] || {
            echo "build-wheel: no 'VERSION COMMIT' line in $record" >&2; exit 1; }
        ;;
esac
dest=${1:?usage: build-wheel.sh [--ref GITREF | --previous] DEST_DIR}
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
            git -C "$here" fetch -q --depth 1 origin "$ref" 2>/dev/null || true
        git -C "$here" rev-parse -q --verify "$ref^{commit}" >/dev/null || {
            what="$ref"
            [ -n "$want_version" ] && what="the previous release $want_version (commit $ref)"
            echo "build-wheel: $what is not in this clone and origin did not give it;" \
                 "a shallow clone needs \`git fetch --unshallow\`" >&2
            exit 1; }
    fi
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' EXIT
    git -C "$here" archive "$ref" | tar -x -C "$tmp"
    src="$tmp"
fi
# fixed timestamps: the same sources give the same wheel, so deploying it twice is no change
SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-315532800} $pip wheel -q --no-deps --wheel-dir "$dest" "$src" >&2
if [ -n "$want_version" ]; then
    wheel="marslib-$want_version-py3-none-any.whl"
    [ -f "$dest/$wheel" ] || {
        echo "build-wheel: commit $ref did not build $wheel (scripts/previous-release is wrong?)" >&2
        exit 1; }
else
    wheel=$(cd "$dest" && ls -t marslib-*.whl | head -1)
fi
echo "$dest/$wheel"
