#!/usr/bin/env bash
# tools/sanitize.sh: the CI check of the C core (about 5 minutes on 2 cores).
#
#   bash tools/sanitize.sh
#
#   1. builds vela._native with -Wall -Wextra -Werror (VELA_WERROR=1) into a
#      scratch directory: any warning fails the step;
#   2. runs the crash, API and native data port tests (the last with bridges
#      whose data port thread runs the sanitized core) against the core built
#      with AddressSanitizer and UndefinedBehaviorSanitizer (tools/asan.sh with
#      VELA_SANITIZE=address,undefined: libasan preloaded, every report printed,
#      the normal build restored afterwards).
# The exit status is non-zero when either step fails. Set PYTHON as for asan.sh.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

if [ -z "${PYTHON:-}" ]; then
    PYTHON=$(command -v python || command -v python3 || true)
fi
[ -n "$PYTHON" ] || { echo "sanitize.sh: no python found (set PYTHON)" >&2; exit 2; }

start=$SECONDS
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
echo "==> -Werror build of vela._native"
if ! VELA_WERROR=1 "$PYTHON" setup.py -q build_ext --force --build-temp "$scratch/tmp" \
        --build-lib "$scratch/lib" >"$scratch/log" 2>&1; then
    cat "$scratch/log" >&2
    echo "sanitize.sh: the core does not build warning-free" >&2
    exit 1
fi
echo "    clean ($((SECONDS - start)) s)"

echo "==> crash, API and data port tests under AddressSanitizer + UndefinedBehaviorSanitizer"
PYTHON="$PYTHON" VELA_SANITIZE=address,undefined bash tools/asan.sh tests/test_crash.py tests/test_api.py tests/test_local_objects.py \
    tests/test_dataserver.py
echo "==> sanitize.sh: clean in $((SECONDS - start)) s"
