#!/usr/bin/env bash
# Set up hematoscope on a fresh machine: a virtual environment in .venv with pinned packages.
#   bash scripts/setup.sh                        # base: predict, evaluate, serve and the demo on ONNX Runtime (no PyTorch)
#   bash scripts/setup.sh --extras train,explain # plus optional extras (README "Install" says what each is for)
#   bash scripts/setup.sh --dev                  # every extra, the test tools and Debian's Chromium for the browser test
# PyTorch comes only with the extras that need it (train, explain, research). TORCH_INDEX_URL=URL installs
# torch/torchvision from that package index instead, e.g. PyTorch's CPU-only one: PyPI's Linux wheels bring
# about 3.4 GB of CUDA libraries that a CPU-only machine never uses.
set -euo pipefail
cd "$(dirname "$0")/.."
dev=0
extras=""
while [ $# -gt 0 ]; do
  case "$1" in
    --dev) dev=1 ;;
    --extras) extras="${2:?--extras needs a comma-separated list, e.g. train,explain}"; shift ;;
    --extras=*) extras="${1#--extras=}" ;;
    *) echo "usage: bash scripts/setup.sh [--dev] [--extras train,classical,explain,research,distributed,all]" >&2
       exit 2 ;;
  esac
  shift
done
[ "$dev" = 1 ] && extras="dev${extras:+,$extras}"

PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
case ",$extras," in
  *,train,*|*,explain,*|*,research,*|*,all,*|*,dev,*)
    # torch/torchvision first and pinned: the resolver must not pick another (multi-GB) build.
    .venv/bin/pip install -q ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} torch==2.14.1 torchvision==0.29.1 ;;
esac
.venv/bin/pip install -q -e ".${extras:+[$extras]}"
if [ "$dev" = 1 ] && [ ! -x /usr/bin/chromium ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  # browser test: Debian's Chromium (Playwright drives it; no browser download)
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null) \
    || echo "warning: could not install chromium; the browser test will be skipped" >&2
fi
echo "hematoscope $(.venv/bin/hematoscope --version | cut -d' ' -f2) ready in .venv${extras:+ (extras: $extras)}"
