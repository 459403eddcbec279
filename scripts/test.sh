#!/usr/bin/env bash
# Run the test suite with the project's venv. pytest exit code 5 ("no tests collected") is an error.
set -uo pipefail
cd "$(dirname "$0")/.."
.venv/bin/python -m pytest -q -p no:cacheprovider "$@" tests
status=$?
if [ "$status" -eq 5 ]; then
    echo "pytest collected no tests: treating as failure" >&2
    exit 1
fi
exit "$status"
