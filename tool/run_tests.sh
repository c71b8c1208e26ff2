#!/usr/bin/env bash
# The test command of the README: installs the pinned requirements, then runs the whole suite
# (soak tests excluded; run them with `python -m pytest -m soak`).
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q --disable-pip-version-check -r requirements.txt
python -m pytest -q -m "not soak" "$@"
