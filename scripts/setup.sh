#!/usr/bin/env bash
# Set up hematoscope on a fresh machine: a virtual environment in .venv with pinned packages.
#   bash scripts/setup.sh          # the package and its runtime dependencies
#   bash scripts/setup.sh --dev    # plus test tools, the distributed extra (Ray) and Debian's Chromium for the browser test
set -euo pipefail
cd "$(dirname "$0")/.."
dev=0
[ "${1:-}" = "--dev" ] && dev=1

PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
# torch/torchvision first and pinned: the resolver must not pick another (multi-GB) build.
.venv/bin/pip install -q torch==2.14.1 torchvision==0.29.1
if [ "$dev" = 1 ]; then
  .venv/bin/pip install -q -e '.[dev,distributed]'
  if [ ! -x /usr/bin/chromium ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    # browser test: Debian's Chromium (Playwright drives it; no browser download)
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null) \
      || echo "warning: could not install chromium; the browser test will be skipped" >&2
  fi
else
  .venv/bin/pip install -q -e .
fi
echo "hematoscope $(.venv/bin/hematoscope --version | cut -d' ' -f2) ready in .venv"
