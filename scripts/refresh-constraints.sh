#!/usr/bin/env bash
# Refresh constraints.txt: the exact versions the test suite is run with (README "Install").
# Run on purpose, then run the tests, then commit the new file.
set -euo pipefail
cd "$(dirname "$0")/.."
tmp=$(mktemp -d)
python3 -m venv "$tmp/venv"
. "$tmp/venv/bin/activate"
pip install -q torch==2.13.0
pip install -q -e '.[test]'
{
  echo "# Tested versions for the README's install and .ci/run (scripts/refresh-constraints.sh)."
  pip freeze --exclude-editable | grep -v '^medsearch' | sed 's/^torch==\([0-9.]*\)+cpu$/torch==\1/'
} > constraints.txt
rm -rf "$tmp"
echo "constraints.txt refreshed; run the tests before committing it" >&2
