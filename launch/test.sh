#!/usr/bin/env bash
# Set up (idempotent) and run the whole test suite on CPU with 8 simulated devices
# (tests/conftest.py sets XLA_FLAGS). Extra arguments go to pytest.
set -uo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/launch/setup.sh" || exit 1
cd "$root"
# Two workers: XLA compiles on one core each, and most of the suite is compilation.
# --durations: the slowest tests in every log, to watch the 10-minute budget.
.venv/bin/python -m pytest -n 2 --durations=25 "$@"
rc=$?
# pytest exits 5 when it collected nothing: a suite that runs no test has not passed.
if [ "$rc" = 5 ]; then echo "[test] error: pytest collected no tests" >&2; fi
exit "$rc"
