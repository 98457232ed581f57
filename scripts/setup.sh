#!/usr/bin/env bash
# Set up a fresh machine: espeak-ng (test corpora), a virtualenv at .venv with the pinned
# requirements, and this package installed in editable mode. Safe to rerun: reuses .venv.
set -euo pipefail
cd "$(dirname "$0")/.."

# espeak-ng makes the test corpora; chromium + chromium-driver run the page test of python -m vall_e.serve
# (tests/test_serve_browser.py drives the system chromedriver; nothing is downloaded by Selenium)
APT_PACKAGES=""
command -v espeak-ng >/dev/null 2>&1 || APT_PACKAGES="$APT_PACKAGES espeak-ng"
{ command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; } || APT_PACKAGES="$APT_PACKAGES chromium"
[ -x /usr/bin/chromedriver ] || APT_PACKAGES="$APT_PACKAGES chromium-driver"
if [ -n "$APT_PACKAGES" ]; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $APT_PACKAGES >/dev/null
  else
    sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $APT_PACKAGES >/dev/null
  fi
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip wheel setuptools
# torch first: torchaudio pins its version, and the rest resolve against it.
.venv/bin/python -m pip install -q -r requirements.txt
# resemblyzer (the offline speaker backend of python -m vall_e.evaluate) declares a dependency on
# webrtcvad, whose only release (2017) is a source package that needs a C compiler and imports
# pkg_resources, which setuptools >= 81 no longer ships. requirements.txt has webrtcvad-wheels
# instead (the same `webrtcvad` module, prebuilt, no pkg_resources) and resemblyzer's other
# dependencies (librosa, scipy, numpy, torch), so resemblyzer itself goes in without its declared ones.
.venv/bin/python -m pip install -q --no-deps resemblyzer==0.1.4
.venv/bin/python -m pip install -q --no-deps -e .
echo "environment ready: $(.venv/bin/python -c 'import torch, vall_e; print("torch", torch.__version__, "| vall_e", vall_e.__version__)')"
