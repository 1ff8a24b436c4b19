#!/usr/bin/env bash
# Set up (idempotent) and run the main job locally. For now: the loss-library demo.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/launch/setup.sh"
cd "$root"
exec .venv/bin/python -m jaxcontrast.demo "$@"
