#!/usr/bin/env bash
# Every test, the way CI runs them (.ci/run is this script).  Needs only Python, pip and
# a C compiler; everything else is installed as needed (packages from Debian's archive
# with apt-get when root: mingw-w64 and Wine, valgrind, clang, openssl, the free-threaded
# interpreter's build dependencies).
#
#   bash scripts/test.sh [pytest args for the main suite...]
#
#  1. the C contract test of the port layer: io_uring and epoll natively, with ASan +
#     UBSan and under valgrind; IOCP cross-compiled with mingw-w64, run under Wine
#  2. libFuzzer on the packet framing and the WebSocket frame parser (bounded runs)
#  3. the sdist, and a wheel built from it, from a copy of the tree (nothing is written
#     into the tree); the wheel installed into a fresh venv with the test extras
#  4. what we ship: the sdist's contents, auditwheel, a smoke test of the wheel
#  5. the whole pytest suite against the *installed* package, once per backend
#  6. types: mypy --strict on the examples and a typed tour of the API; stubtest
#  7. the whole suite against an ASan + UBSan build of the extension (io_uring backend;
#     epoll's C is covered under ASan by step 1)
#  8. the whole suite on free-threaded CPython 3.13t, both backends (the interpreter is
#     built once, ~4 minutes, in the background while steps 3-7 run, at low priority)
#
# Environment: PYTHON (default python3), IOCPNET_TEST_DIR (work directory, default
# .ci/out), IOCPNET_QUICK=1 (steps 3 and 5 only), IOCPNET_SKIP=<list> (any of contract,
# fuzz, dist, types, sanitize, freethreaded), IOCPNET_PARALLEL=1 (the same steps with
# steps 4-6, 7 and 8 side by side and each suite over pytest-xdist workers: see
# scripts/test_parallel.sh; not yet the default).
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [ -n "${IOCPNET_PARALLEL:-}" ]; then
    exec bash "$root/scripts/test_parallel.sh" "$@"
fi
py=${PYTHON:-python3}
work=${IOCPNET_TEST_DIR:-$root/.ci/out}
venv="$work/venv-$(basename "$py")"
skip=" ${IOCPNET_SKIP:-} "
[ -n "${IOCPNET_QUICK:-}" ] && skip=" contract fuzz dist types sanitize freethreaded "
mkdir -p "$work"

timings=()
step_start=-1   # SECONDS is 0 when the first step starts
step() {
    [ "$step_start" = -1 ] || timings+=("$(printf '%4d s  %s' $((SECONDS - step_start)) "$step_name")")
    step_name=$*
    step_start=$SECONDS
    printf '\n== %s\n' "$*" >&2
}
skipped() { case "$skip" in *" $1 "*) return 0 ;; esac; return 1; }
summary() {
    [ "$step_start" = -1 ] || timings+=("$(printf '%4d s  %s' $((SECONDS - step_start)) "$step_name")")
    printf '\n== time per step\n' >&2
    printf '  %s\n' "${timings[@]}" >&2
    printf '  %4d s  in all\n' "$SECONDS" >&2
}
ft_pid=
cleanup() { [ -z "$ft_pid" ] || kill "$ft_pid" 2>/dev/null || true; }
trap cleanup EXIT

# Steps 1 and 2 come first: they may install Debian packages, and apt must not run
# at the same time as the interpreter build's own (which starts after them).
# redis-server: tests/test_spawn.py awaits a real one (Spawn with redis.asyncio), and
# tests/test_backplane.py and test_chat_redis.py share groups through one (with TLS too:
# Debian's package serves it).
if ! command -v redis-server >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        printf '\n== installing redis-server (for the Spawn and backplane tests)\n' >&2
        apt-get update -qq >&2
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
            redis-server >&2
    else
        echo "redis-server is missing and cannot be installed here (not root with apt)" >&2
    fi
fi
if ! skipped contract; then
    step "1. C contract test of the port layer (every backend)"
    bash "$root/tests/c/run_contract.sh"
fi
if ! skipped fuzz; then
    step "2. libFuzzer on the packet framing and the WebSocket frame parser"
    IOCPNET_FUZZ_OUT="$work/fuzz" bash "$root/tests/fuzz/run.sh" "${IOCPNET_FUZZ_SECONDS:-20}"
fi

# The openssl command: the TLS tests make their certificates with it and talk to the
# server with its s_client.  Installed here, before the interpreter build's own apt use.
if ! command -v openssl >/dev/null && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    { DEBIAN_FRONTEND=noninteractive apt-get update -q &&
      DEBIAN_FRONTEND=noninteractive apt-get install -y -q openssl; } >"$work/apt-openssl.log" 2>&1 ||
        echo "test.sh: installing openssl failed (see $work/apt-openssl.log)" >&2
fi

# Tools the main suite uses, installed before the interpreter build's own apt-get:
# headless Chromium for the chat example's browser page (tests/test_chat_web.py).
if ! command -v chromium >/dev/null && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "installing chromium (log: $work/apt-chromium.log)" >&2
    { DEBIAN_FRONTEND=noninteractive apt-get update -q &&
      DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium; } \
        >"$work/apt-chromium.log" 2>&1 || echo "apt-get chromium failed (see $work/apt-chromium.log)" >&2
fi

if ! skipped freethreaded; then
    # The interpreter build is CPU-bound and the test steps mostly wait on sockets:
    # at the lowest priority it takes the idle time without slowing the suites.
    nice -n 19 bash "$root/scripts/build_freethreaded_python.sh" \
        >"$work/ft-interpreter.log" 2>&1 &
    ft_pid=$!
fi

step "3. the sdist and a wheel built from it; a fresh venv with the wheel ($venv)"
rm -rf "$venv" "$work/dist" "$work/src"
"$py" -m venv "$venv"
vpy="$venv/bin/python"
"$vpy" -m pip install -q --disable-pip-version-check --upgrade pip build
# Build from a copy of the tree (a shared work tree never gets build outputs), and
# through the sdist: the wheel under test is built from what we ship.
mkdir -p "$work/src"
(cd "$root" && git ls-files -z --cached --others --exclude-standard |
    while IFS= read -r -d '' f; do [ -e "$f" ] && printf '%s\0' "$f"; done |
    xargs -0 cp --parents -t "$work/src")
"$vpy" -m build -q --outdir "$work/dist" "$work/src" >&2
wheel=$(ls "$work"/dist/iocpnet-*.whl)
"$vpy" -m pip install -q --disable-pip-version-check "${wheel}[test]"

if ! skipped dist; then
    step "4. what we ship: sdist contents, auditwheel, the wheel's smoke test"
    # (Its work directory must be outside the tree it copies.)
    CHECK_DIST_DIR="${TMPDIR:-/tmp}/iocpnet-ci-check-dist" PYTHON="$py" \
        bash "$root/scripts/check_dist.sh" --dist "$work/dist"
fi

step "5. pytest against the installed package"
# From the work directory: nothing from the source tree can be imported.
(cd "$work" && CI="${CI:-}" "$vpy" -m pytest "$root/tests" -p no:cacheprovider \
    --rootdir "$root" -q "$@")

if ! skipped types; then
    step "6. types: mypy --strict, stubtest"
    CHECK_TYPES_DIR="${TMPDIR:-/tmp}/iocpnet-ci-check-types" \
        bash "$root/scripts/check_types.sh" --venv "$vpy"
fi

if ! skipped sanitize; then
    step "7. the suite against an ASan + UBSan build (io_uring)"
    # The build requirements exactly as pyproject.toml states them: a venv's bundled
    # setuptools may predate the SPDX `license` string and refuse the file.
    build_reqs=$("$vpy" - "$root/pyproject.toml" <<'PYEOF'
import re, sys
text = open(sys.argv[1]).read()
block = re.search(r"^\[build-system\].*?^requires\s*=\s*\[(.*?)\]", text, re.M | re.S)
print("\n".join(re.findall(r'"([^"]+)"', block.group(1))))
PYEOF
)
    mapfile -t build_reqs <<<"$build_reqs"
    "$vpy" -m pip install -q --disable-pip-version-check --upgrade "${build_reqs[@]}"
    IOCPNET_TEST_BACKENDS=io_uring IOCPNET_RACES_SECONDS=${IOCPNET_RACES_SECONDS:-8} \
        PYTHON="$vpy" IOCPNET_SANITIZE_DIR="$work/sanitize" bash "$root/scripts/sanitize.sh"
fi

if ! skipped freethreaded; then
    step "8. the suite on free-threaded CPython 3.13t (both backends)"
    if ! wait "$ft_pid"; then
        ft_pid=
        tail -n 40 "$work/ft-interpreter.log" >&2
        echo "building the free-threaded interpreter failed (log: $work/ft-interpreter.log)" >&2
        exit 1
    fi
    ft_pid=
    IOCPNET_TEST_DIR="$work" bash "$root/scripts/test_freethreaded.sh"
fi

summary
printf '\nall tests passed\n' >&2
