#!/usr/bin/env bash
# tools/asan.sh: run the test suite against the C core built with AddressSanitizer.
#
#   bash tools/asan.sh              # whole suite
#   bash tools/asan.sh -k tags -x   # arguments go to pytest
#   VELA_SANITIZE=address,undefined bash tools/asan.sh tests/test_api.py
#                                   # with UndefinedBehaviorSanitizer too
#
# What it does, from the project root, with the python of your environment (the
# venv where you ran `pip install -e '.[test]'`; set PYTHON to choose another):
#   1. rebuilds vela._native in place (vela/_native*.so) with VELA_SANITIZE=address
#      (or the sanitizers you set in VELA_SANITIZE, address first), which setup.py
#      turns into -fsanitize=address -fno-omit-frame-pointer -O1 -g;
#   2. runs `python -m pytest -q "$@"` with
#        LD_PRELOAD=$(gcc -print-file-name=libasan.so)  (python itself is not built
#                                                       with ASan; the runtime must
#                                                       be loaded first)
#        ASAN_OPTIONS=detect_leaks=0                     (CPython leaks at exit by
#                                                       design: leak reports would
#                                                       be noise)
#      so any out-of-bounds access or use-after-free in the C core aborts the
#      process with a report that names the source line (UBSan: any undefined
#      behaviour, UBSAN_OPTIONS=halt_on_error=1). pytest would swallow the report
#      (it captures stderr), so the sanitizers write it to a file (log_path) and
#      the script prints every report after the run;
#   3. rebuilds vela._native normally (also when the tests fail or you press ^C),
#      so your environment is left as it was.
# The exit status is pytest's, and non-zero when any process wrote a report.
#
# The preload applies to every process the tests start (forked workers included,
# which is what we want). Needs gcc's libasan (Debian: libasan8, pulled in by gcc).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

if [ -z "${PYTHON:-}" ]; then
    PYTHON=$(command -v python || command -v python3 || true)
fi
[ -n "$PYTHON" ] || { echo "asan.sh: no python found (set PYTHON)" >&2; exit 2; }
"$PYTHON" -c 'import setuptools, pytest' 2>/dev/null || {
    echo "asan.sh: $PYTHON lacks setuptools or pytest: run pip install -e '.[test]' first" >&2
    exit 2
}

LIBASAN=$(gcc -print-file-name=libasan.so)
if [ ! -e "$LIBASAN" ]; then
    echo "asan.sh: gcc has no libasan.so (install libasan for your gcc)" >&2
    exit 2
fi

build() {  # build [VELA_SANITIZE value]
    # --force: sources did not change since the last build, only the flags did.
    local log
    log=$(mktemp)
    if ! VELA_SANITIZE="${1:-}" "$PYTHON" setup.py -q build_ext --inplace --force >"$log" 2>&1; then
        cat "$log" >&2
        rm -f "$log"
        return 1
    fi
    rm -f "$log"
}

rebuild_normal() {
    echo "==> rebuilding vela._native without sanitizer"
    build "" || echo "asan.sh: normal rebuild FAILED: run pip install -e . again" >&2
}

SANITIZE=${VELA_SANITIZE:-address}
case "$SANITIZE" in
    address|address,*) ;;
    *) echo "asan.sh: VELA_SANITIZE must start with address, not $SANITIZE" >&2; exit 2 ;;
esac
echo "==> building vela._native with -fsanitize=$SANITIZE"
trap rebuild_normal EXIT
build "$SANITIZE"

# pytest captures file descriptor 2, and a process that ASan aborts takes the
# captured text with it: reports go to files instead, shown below.
REPORTS=$(mktemp -d)
echo "==> python -m pytest -q $* (LD_PRELOAD=$LIBASAN, ASAN_OPTIONS=detect_leaks=0)"
rc=0
LD_PRELOAD="$LIBASAN" \
ASAN_OPTIONS="detect_leaks=0:log_path=$REPORTS/asan${ASAN_OPTIONS:+:$ASAN_OPTIONS}" \
UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1:log_path=$REPORTS/ubsan${UBSAN_OPTIONS:+:$UBSAN_OPTIONS}" \
    "$PYTHON" -m pytest -q "$@" || rc=$?

shopt -s nullglob
reports=("$REPORTS"/asan.* "$REPORTS"/ubsan.*)
if [ "${#reports[@]}" -gt 0 ]; then
    for f in "${reports[@]}"; do
        printf '\n==> sanitizer report %s (process %s)\n' "$(basename "${f%.*}")" "${f##*.}"
        cat "$f"
    done
    echo "asan.sh: ${#reports[@]} sanitizer report(s) above" >&2
    [ "$rc" -ne 0 ] || rc=1
fi
rm -rf "$REPORTS"
exit "$rc"
