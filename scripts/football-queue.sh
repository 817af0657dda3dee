#!/bin/sh
# football-queue.sh --queue FILE --inventory INV [--lock-wait SECONDS] [--ansible-playbook CMD]
#   Take the next migration ("RESOURCE FROM TO") from the head of FILE and run
#   ansible/football.yml for it. A lock (flock on FILE.lock) makes sure two runs never
#   overlap: a second run exits at once with status 75 while one is busy. On success the
#   line moves to FILE.done; on failure it stays at the head and the next run resumes it
#   (every football step is idempotent). Empty lines and # comments are skipped.
set -eu
here=$(cd "$(dirname "$0")/.." && pwd)
queue="" inventory="" wait=0 ansible_playbook="$here/.venv/bin/ansible-playbook"
while [ $# -gt 0 ]; do
    case "$1" in
        --queue) queue=$2; shift 2 ;;
        --inventory) inventory=$2; shift 2 ;;
        --lock-wait) wait=$2; shift 2 ;;
        --ansible-playbook) ansible_playbook=$2; shift 2 ;;
        *) echo "usage: football-queue.sh --queue FILE --inventory INV [--lock-wait S]" \
                "[--ansible-playbook CMD]" >&2; exit 2 ;;
    esac
done
[ -n "$queue" ] && [ -n "$inventory" ] || { echo "football-queue: --queue and --inventory are required" >&2; exit 2; }
[ -f "$queue" ] || { echo "football-queue: no queue file $queue" >&2; exit 2; }

exec 9>"$queue.lock"
if ! flock -w "$wait" 9; then
    echo "football-queue: $(date -Is) another migration is running (lock $queue.lock); nothing done"
    exit 75
fi

next=$(grep -v -e '^[[:space:]]*$' -e '^[[:space:]]*#' "$queue" | head -n 1 || true)
if [ -z "$next" ]; then echo "football-queue: $(date -Is) queue empty"; exit 0; fi
set -- $next
if [ $# -ne 3 ]; then
    echo "football-queue: bad queue line '$next' (want: RESOURCE FROM TO); move it away" >&2
    exit 1
fi
resource=$1 from=$2 to=$3
logdir=$(dirname "$queue")/log
mkdir -p "$logdir"
log="$logdir/$(date +%Y%m%dT%H%M%S)-$resource-$from-$to.log"
echo "football-queue: $(date -Is) moving $resource from $from to $to (log $log)"
command -v "$ansible_playbook" >/dev/null || ansible_playbook=ansible-playbook
if ANSIBLE_CONFIG="$here/ansible/ansible.cfg" "$ansible_playbook" -i "$inventory" \
        "$here/ansible/football.yml" -e "resource=$resource" -e "from=$from" -e "to=$to" \
        >"$log" 2>&1; then
    # drop the first matching line only, keep the rest in order
    tmp=$(mktemp "$queue.XXXXXX")
    awk -v line="$next" 'done || $0 != line { print; next } { done = 1 }' "$queue" >"$tmp"
    mv "$tmp" "$queue"
    echo "$(date -Is) $next" >>"$queue.done"
    echo "football-queue: $(date -Is) done: $next"
else
    rc=$?
    echo "football-queue: $(date -Is) FAILED ($rc): $next stays queued; see $log" >&2
    exit "$rc"
fi
