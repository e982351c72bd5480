#!/usr/bin/env bash
# One entry point for a fresh machine: creates .venv with the pinned set-up, then runs what was asked.
#   ./dev.sh demo [args]   the main job: trains a small model with 32/8/4-bit AdamW, prints a table
#   ./dev.sh test [args]   the test suite (what CI runs)
set -euo pipefail
cd "$(dirname "$0")"
venv=.venv
stamp="$venv/.installed-$(sha1sum requirements/pinned.txt pyproject.toml | sha1sum | cut -c1-12)"
if [ ! -f "$stamp" ]; then
  python3 -m venv "$venv"
  "$venv/bin/python" -m pip install -q --upgrade pip
  "$venv/bin/python" -m pip install -q -r requirements/pinned.txt
  "$venv/bin/python" -m pip install -q --no-deps -e .
  touch "$stamp"
fi
py="$venv/bin/python"
what="${1:-}"; shift || true
case "$what" in
  demo) exec "$py" -m lowbit_compile.demo "$@" ;;
  test)
    set +e
    "$py" -m pytest -q "$@"
    rc=$?
    # pytest exits 5 when it collected nothing: that is a failure here, never a silent pass.
    [ $rc -eq 5 ] && echo "no test ran" >&2
    exit $rc ;;
  *) echo "usage: ./dev.sh demo|test [args]" >&2; exit 2 ;;
esac
