#!/usr/bin/env bash
# Rebuild the native module into the active environment (editable install).
# Serialized with a lock so several people (or agents) sharing a checkout never build at once.
set -euo pipefail
cd "$(dirname "$0")/.."
exec flock /tmp/kcengine-build.lock python -m pip install --no-build-isolation --no-deps -q -e . "$@"
