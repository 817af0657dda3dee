#!/bin/sh
# collection-lint.sh: ansible-lint (production profile, ansible/ansible_collections/marslib/
# mars/.ansible-lint) and antsibull-changelog lint over the collection marslib.mars of this
# checkout. Exits non-zero on any finding. `make test` runs it.
set -eu
here=$(cd "$(dirname "$0")/.." && pwd)
bin="$here/.venv/bin"
cd "$here/ansible/ansible_collections/marslib/mars"
# the roles and playbooks name each other by FQCN: lint resolves them from this tree
export ANSIBLE_COLLECTIONS_PATH="$here/ansible"
export ANSIBLE_CONFIG="$here/ansible/ansible.cfg"
"$bin/ansible-lint" --profile production --nocolor --format=pep8 --offline
"$bin/antsibull-changelog" lint
echo "collection-lint: ansible-lint (production) and antsibull-changelog lint passed"
