#!/usr/bin/env bash
# Every test: unit, integration (real gateway and replicas), the SSD model, the dashboard
# in headless Chromium. Installs the browser from Debian's packages when it is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
export PATH="$PWD/$VENV/bin:$PATH"

if ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing Debian's chromium for the dashboard tests"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
  else
    echo "chromium is missing and cannot be installed here: the dashboard tests will be skipped"
  fi
fi

python -m pytest "$@"
