#!/usr/bin/env bash
# Offline checks of deploy/ (schemas, RBAC vs agent/src/k8s.rs WATCHED,
# DaemonSet/ConfigMap/CNI consistency). Creates <repo>/.tools/venv with the
# pinned validator on first use (needs PyPI once), then runs without network.
# Last line of output: "N passed, M failed"; exit status 1 on any failure.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
venv="$root/.tools/venv"
req="$here/requirements.txt"
stamp="$venv/.deploy-tests-requirements"

python="${PYTHON:-python3}"
if ! command -v "$python" >/dev/null; then
    echo "deploy tests: $python not found (Debian: apt-get install python3 python3-venv)" >&2
    exit 1
fi
# (Re)install when the venv is missing or requirements.txt changed.
if [ ! -x "$venv/bin/python" ] || ! cmp -s "$req" "$stamp"; then
    echo "deploy tests: preparing $venv" >&2
    if [ ! -x "$venv/bin/python" ]; then
        "$python" -m venv "$venv" || {
            echo "deploy tests: '$python -m venv' failed (Debian: apt-get install python3-venv)" >&2
            exit 1
        }
    fi
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-input -r "$req"
    cp "$req" "$stamp"
fi
exec "$venv/bin/python" "$here/test_manifests.py" "$@"
