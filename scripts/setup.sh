#!/usr/bin/env bash
# Set up magnet-engine on a fresh machine: a virtual environment in .venv with the CPU
# torch wheel, the package (C++ extension built when a compiler is present), the encodec
# package and the test tools. Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip setuptools wheel

# torch first and pinned: an unpinned requirement would pull a multi-GB CUDA build.
python -m pip install -q "torch==2.13.0"
python -m pip install -q pybind11 numpy
python -m pip install -q --no-build-isolation -e ".[test]"
# encodec's own requirements name torchaudio, which this torch cannot use and we never
# import: install it last and without dependencies (its other needs, einops and numpy, are
# in by now). Installed any earlier, every later pip run's resolver would report the
# missing torchaudio as an ERROR line; --no-deps skips that check for this one.
python -m pip install -q --no-deps "encodec==0.1.1"

# Headless Chromium for the browser test of the demo page (Debian packages).
if [ "${MAGNET_SKIP_BROWSER:-0}" != "1" ] && ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null) \
      || echo "setup: could not install chromium; the browser test will be skipped"
  fi
fi
python -c "import magnet_engine, torch; from magnet_engine.kernels.backend import cpp_module; \
print('magnet-engine ready: torch', torch.__version__, '| C++ kernels', 'built' if cpp_module() else 'NOT built (torch fallback)')"
