#!/usr/bin/env bash
# Run the whole pytest suite against the extension built with AddressSanitizer +
# UndefinedBehaviorSanitizer, and fail on any report.
#
#   bash scripts/sanitize.sh [--no-build] [pytest args...]
#
# --no-build reuses the previous sanitized build (to rerun a few tests quickly).
#
# Environment: IOCPNET_SANITIZE_DIR (private build and logs, default
# /tmp/iocpnet-sanitize), PYTHON (default python3; needs Cython and setuptools to build,
# and the test extras: pytest, pytest-timeout, hypothesis), CC (default gcc).
#
# How:
# - scripts/devbuild.sh builds a private copy of the tree with IOCPNET_SANITIZE=1
#   (setup.py adds -fsanitize=address,undefined); the suite imports it via PYTHONPATH.
# - Python itself is not instrumented, so the ASan runtime must be loaded first:
#   LD_PRELOAD the libasan/libubsan of the compiler that built the extension.  Child
#   processes (the servers of test_resources.py) inherit it and run sanitized too.
# - PYTHONMALLOC=malloc: Python objects come from malloc, so ASan sees them too (a
#   bytes object of a send queue freed too early is a use-after-free report, not a
#   silent read of pymalloc's pool).
# - Every report fails the run: halt_on_error=1 for both (the process aborts at the
#   first report, which fails its test or the whole pytest run), and each report is
#   also written to $OUT/logs/{asan,ubsan}.PID, which are checked at the end (a report
#   from a child process whose exit nobody checks still fails the run).  UBSan ignores
#   its log_path beside ASan: scripts/sanitize_site/sitecustomize.py sets it (why: there).
# - Leaks: detect_leaks=0 for the Python run.  CPython does not free everything at
#   exit, and with PYTHONMALLOC=malloc every such object is a "leak": thousands of
#   reports that are not ours, and a suppression matching Python's frames would also
#   hide ours (every allocation of the extension has Python frames below it).  Leaks
#   are covered instead by: the debug counters checked after every test (no_leaks),
#   the churn test (RSS, counters and gc after thousands of sessions), and the C port
#   layer under LeakSanitizer and valgrind memcheck in tests/c/run_contract.sh (not
#   repeated here).
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
out=${IOCPNET_SANITIZE_DIR:-/tmp/iocpnet-sanitize}
py=${PYTHON:-python3}
cc=${CC:-gcc}
logs=$out/logs

step() { printf '\n== %s\n' "$*" >&2; }

missing=$("$py" - <<'PYEOF'
import importlib.util
need = ["Cython", "setuptools", "pytest", "pytest_timeout", "hypothesis"]
print(" ".join(m for m in need if importlib.util.find_spec(m) is None))
PYEOF
)
if [ -n "$missing" ]; then
    echo "sanitize.sh: $py lacks: $missing (pip install 'Cython>=3.1' 'setuptools>=77' pytest pytest-timeout hypothesis)" >&2
    exit 2
fi

build=1
if [ "${1:-}" = --no-build ]; then
    build=0
    shift
fi
if [ $build = 1 ] || ! ls "$out"/tree/src/iocpnet/_core*.so >/dev/null 2>&1; then
    step "building the extension with ASan + UBSan ($out)"
    mkdir -p "$out"
    srcdir=$(IOCPNET_SANITIZE=1 CC=$cc "$root/scripts/devbuild.sh" "$out")
else
    srcdir=$out/tree/src
fi
so=$(ls "$srcdir"/iocpnet/_core*.so)
# The runtimes the extension was linked against, by the compiler that built it.
asan=$("$cc" -print-file-name=libasan.so)
ubsan=$("$cc" -print-file-name=libubsan.so)
for lib in "$asan" "$ubsan"; do
    [ -e "$lib" ] || { echo "sanitize.sh: $cc has no $(basename "$lib")" >&2; exit 2; }
done
grep -q libasan <<<"$(ldd "$so")" || { echo "sanitize.sh: $so is not built with ASan" >&2; exit 2; }
echo "extension: $so" >&2
echo "runtimes:  $asan $ubsan" >&2

rm -rf "$logs"
mkdir -p "$logs"
export LD_PRELOAD="$(readlink -f "$asan"):$(readlink -f "$ubsan")${LD_PRELOAD:+:$LD_PRELOAD}"
# allocator_may_return_null: a malloc too large fails as it does without ASan (NULL, then
# MemoryError), for the tests of running out of memory (test_resources).
export ASAN_OPTIONS="allocator_may_return_null=1:detect_leaks=0:halt_on_error=1:abort_on_error=1:strict_init_order=1:detect_stack_use_after_return=0:log_path=$logs/asan"
export UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1:log_path=$logs/ubsan"
export PYTHONMALLOC=malloc
export IOCPNET_UBSAN_LOG=$logs/ubsan IOCPNET_UBSAN_LIB=$(readlink -f "$ubsan")
export PYTHONPATH="$srcdir:$root/scripts/sanitize_site${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONFAULTHANDLER=1

step "pytest under ASan + UBSan (reports: $logs)"
cd "$out"              # nothing from the source tree on sys.path but the tests
status=0
# Not as CI: under CI=true the suite insists on an installed wheel with its metadata,
# and this run deliberately tests the private sanitized build instead.
# tests/test_resp.py is left out: the RESP codec is pure Python, sans-I/O, so none of the
# extension's code runs there (nothing for the sanitizers to see), and its property tests
# were 69 s of the suite's 744 s under ASan (ci7, s11); steps 5 and 8 run it.
env -u CI "$py" -m pytest "$root/tests" -p no:cacheprovider --rootdir "$root" -q \
    --ignore="$root/tests/test_resp.py" "$@" || status=$?

reports=$(find "$logs" -type f -size +0 | sort)
if [ -n "$reports" ]; then
    step "sanitizer reports"
    for f in $reports; do
        echo "--- $f" >&2
        head -n 80 "$f" >&2
    done
    echo "sanitize: FAILED: $(echo "$reports" | wc -l) report file(s)" >&2
    exit 1
fi
if [ $status != 0 ]; then
    echo "sanitize: FAILED: pytest exit status $status (no sanitizer report)" >&2
    exit $status
fi
echo "sanitize: ok: the suite passed under ASan + UBSan with no report" >&2
