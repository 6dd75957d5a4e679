#!/usr/bin/env bash
# Runs the whole test suite from a fresh clone: .venv, Chromium for the browser test, pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "test: installing Debian's chromium for the browser test ..." >&2
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
    || echo "test: could not install chromium; the browser test will be skipped" >&2
fi
# With no arguments, the tests marked slow are left out: real end-to-end searches on every
# architecture, every benchmark's smoke run and the driver kills, each minutes on 2 cores.
# Run them with `./scripts/test.sh -m slow`, everything with `./scripts/test.sh -m "slow or not slow"`.
if [ "$#" -eq 0 ]; then
  set -- -m "not slow" --durations=25
fi
exec .venv/bin/python -m pytest "$@"
