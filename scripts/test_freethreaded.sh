#!/usr/bin/env bash
# Run the whole suite on free-threaded CPython 3.13t ("--disable-gil"), the way
# scripts/test.sh runs it on the normal interpreter: build the wheel, install it with the
# test extras into a fresh venv, run pytest against the *installed* package, once per
# backend this machine can run (the suite parametrises itself over them).
#
#   bash scripts/test_freethreaded.sh [--build-only | --no-build] [pytest args...]
#
# --build-only stops once the wheel is installed; --no-build runs the suite in the venv
# that it left (scripts/test.sh builds in the background while other steps run).
# The interpreter comes from scripts/build_freethreaded_python.sh: built once (about 4
# minutes on 2 cores) under /opt/iocpnet-py313t, reused in well under a second after.
# Before the suite, the script checks that importing iocpnet leaves the GIL off; a
# module that re-enables it would make every test pass while the workers take turns.
#
# Environment: IOCPNET_FT_PREFIX (interpreter prefix, see build_freethreaded_python.sh),
# IOCPNET_TEST_DIR (work directory, default .ci/out; the venv, the copy of the tree and
# the wheel go to venv-ft-*/, src-ft/ and dist-ft/, so that scripts/test.sh's own are
# left alone).
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
work=${IOCPNET_TEST_DIR:-$root/.ci/out}

step() { printf '\n== %s\n' "$*" >&2; }

build=1
tests=1
case "${1:-}" in
    --build-only) tests=0; shift ;;
    --no-build) build=0; shift ;;
esac

# PYTHON_GIL=1 in the environment would turn the GIL back on and hide exactly what
# this run is for; the suite itself also checks the GIL state in a clean subprocess.
unset PYTHON_GIL
# The newest release of a test tool may have no wheel for 3.13t yet (hypothesis builds
# a Rust extension from its sdist); an older release with a wheel is just as good here.
export PIP_PREFER_BINARY=1 PIP_DISABLE_PIP_VERSION_CHECK=1

step "free-threaded interpreter (scripts/build_freethreaded_python.sh)"
py=$(bash "$root/scripts/build_freethreaded_python.sh" | tail -n1)
[ -x "$py" ] || { echo "no free-threaded interpreter: got '$py'" >&2; exit 1; }

venv="$work/venv-ft-$(basename "$py")"
vpy="$venv/bin/python"
dist="$work/dist-ft"
if [ $build = 1 ]; then
    step "building the wheel and installing it into a fresh venv ($venv)"
    rm -rf "$venv" "$dist"
    mkdir -p "$work"
    "$py" -m venv "$venv"
    "$vpy" -m pip install -q --upgrade pip build
    # As scripts/test.sh does: build from a copy of the tree (a shared work tree never
    # gets build outputs), through the sdist: the wheel under test is built from what we
    # ship.
    src="$work/src-ft"
    rm -rf "$src"
    mkdir -p "$src"
    (cd "$root" && git ls-files -z --cached --others --exclude-standard |
        while IFS= read -r -d '' f; do [ -e "$f" ] && printf '%s\0' "$f"; done |
        xargs -0 cp --parents -t "$src")
    "$vpy" -m build -q --outdir "$dist" "$src" >&2
    wheel=$(ls "$dist"/iocpnet-*.whl)
    "$vpy" -m pip install -q "${wheel}[test]"
elif ! [ -x "$vpy" ]; then
    echo "test_freethreaded.sh --no-build: no venv at $venv (run --build-only first)" >&2
    exit 1
fi
[ $tests = 1 ] || exit 0

step "the GIL stays off once iocpnet is imported"
cd "$work"
"$vpy" - <<'EOF'
import sys
import iocpnet
print(f"Python {sys.version.split()[0]}t, iocpnet from {iocpnet.__file__}: "
      f"sys._is_gil_enabled() = {sys._is_gil_enabled()}; "
      f"backends: {', '.join(iocpnet.available_backends())}")
sys.exit(1 if sys._is_gil_enabled() else 0)
EOF

step "pytest on $("$vpy" -c 'import sys; print(sys.version.split()[0] + "t")') against the installed package"
# Run from the work directory so that nothing from the source tree can be imported.
CI="${CI:-}" "$vpy" -m pytest "$root/tests" -p no:cacheprovider --rootdir "$root" -q "$@"
