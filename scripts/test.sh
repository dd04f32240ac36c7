#!/usr/bin/env bash
# Run every test the way CI does: build the wheel, install it into a fresh virtual
# environment with the test extras, and run the suite against the *installed* package
# (never the source tree), once per backend this machine can run; then the C contract
# test of the port layer.  Needs only Python, pip and a C compiler; everything else is
# installed here.
#
#   bash scripts/test.sh [pytest args...]
#
# Environment: PYTHON (interpreter to test, default python3), IOCPNET_TEST_DIR (work
# directory, default .ci/out), IOCPNET_SKIP_CONTRACT=1 (pytest only).
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
py=${PYTHON:-python3}
work=${IOCPNET_TEST_DIR:-$root/.ci/out}
venv="$work/venv-$(basename "$py")"

step() { printf '\n== %s\n' "$*" >&2; }

step "building the wheel and installing it into a fresh venv ($venv)"
rm -rf "$venv" "$work/dist"
mkdir -p "$work"
"$py" -m venv "$venv"
vpy="$venv/bin/python"
"$vpy" -m pip install -q --disable-pip-version-check --upgrade pip build
# Build from a copy of the tree (a shared work tree never gets build outputs), and
# through the sdist: the wheel under test is built from what we ship.
rm -rf "$work/src"
mkdir -p "$work/src"
(cd "$root" && git ls-files -z --cached --others --exclude-standard |
    while IFS= read -r -d '' f; do [ -e "$f" ] && printf '%s\0' "$f"; done |
    xargs -0 cp --parents -t "$work/src")
"$vpy" -m build -q --outdir "$work/dist" "$work/src" >&2
wheel=$(ls "$work"/dist/iocpnet-*.whl)
"$vpy" -m pip install -q --disable-pip-version-check "${wheel}[test]"

step "pytest against the installed package"
# Run from the work directory so that nothing from the source tree can be imported.
cd "$work"
CI="${CI:-}" "$vpy" -m pytest "$root/tests" -p no:cacheprovider --rootdir "$root" -q "$@"

if [ -z "${IOCPNET_SKIP_CONTRACT:-}" ] && [ -x "$root/tests/c/run_contract.sh" ]; then
    step "C contract test of the port layer (every backend)"
    bash "$root/tests/c/run_contract.sh"
fi
