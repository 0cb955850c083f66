#!/usr/bin/env bash
# The test suite: sets up (or reuses) the venv, then runs pytest. Extra arguments go to pytest,
# e.g. `bash scripts/test.sh -m slow` for the slow tests, `-k tiling` for a subset.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$REPO_ROOT"
exec python -m pytest "$@"
