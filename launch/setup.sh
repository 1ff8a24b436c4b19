#!/usr/bin/env bash
# Idempotent set-up: a .venv at the repository root with the package (editable) and its train
# and test extras at the versions of launch/constraints.txt, plus the embedded Fashion-MNIST
# from Debian. Re-running is a no-op unless setup.cfg, pyproject.toml or the constraints changed
# (a stamp in .venv records their hash). Source it or run it.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
py="${PYTHON:-python3}"
stamp=.venv/.jaxcontrast-installed
want="$(cat setup.cfg pyproject.toml launch/constraints.txt | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "[setup] installing jaxcontrast into .venv (first run takes about 2 minutes)" >&2
  [ -x .venv/bin/python ] || "$py" -m venv .venv
  # -qq: pip's errors only (no progress, no notices), unless JAXCONTRAST_VERBOSE is set.
  quiet=-qq
  case "${JAXCONTRAST_VERBOSE:-}" in ""|0|false) ;; *) quiet="" ;; esac
  .venv/bin/python -m pip install $quiet --disable-pip-version-check --upgrade pip
  .venv/bin/python -m pip install $quiet --disable-pip-version-check -c launch/constraints.txt \
      -e ".[train,test]"
  echo "$want" > "$stamp"
fi
# The offline default dataset: original Fashion-MNIST idx files from Debian.
if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "[setup] installing dataset-fashion-mnist" >&2
    (apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 ||
      (apt-get update -qq >/dev/null && apt-get install -y -qq dataset-fashion-mnist >/dev/null)) ||
      echo "[setup] warning: could not install dataset-fashion-mnist" >&2
  else
    echo "[setup] warning: Fashion-MNIST missing; run: sudo apt-get install dataset-fashion-mnist" >&2
  fi
fi
