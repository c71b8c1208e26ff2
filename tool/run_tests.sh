#!/bin/sh
# The test command of the README: installs the pinned requirements, then runs the whole suite
# (soak tests excluded; run them with `python -m pytest -m soak`). Extra arguments go to pytest.
set -eu
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
$PYTHON -m pip install -q --disable-pip-version-check -r requirements.txt
$PYTHON -m pytest -q -m "not soak" "$@"
