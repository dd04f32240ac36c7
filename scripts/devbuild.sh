#!/usr/bin/env bash
# Build the extension from the current work tree in a private copy, so that several
# people (or CI jobs) sharing one tree never race on build outputs, and print the
# directory to put on PYTHONPATH:
#
#   export PYTHONPATH=$(scripts/devbuild.sh /tmp/my-iocpnet)
#   python -m pytest tests/ -k packet
#
# Environment is passed to setup.py (IOCPNET_SANITIZE=1, IOCPNET_DEBUG=1).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
out=${1:-/tmp/iocpnet-dev}
py=${PYTHON:-python3}
mkdir -p "$out/tree"
# Copy only what the build reads; keep the previous build/ directory for speed.
cp "$root/setup.py" "$root/pyproject.toml" "$root/README.md" "$out/tree/"
rm -rf "$out/tree/src"
cp -a "$root/src" "$out/tree/src"
find "$out/tree/src" \( -name '*.so' -o -name '_core.c' -o -name '__pycache__' \) -prune \
    -exec rm -rf {} +
(cd "$out/tree" && "$py" setup.py -q build_ext --inplace >"$out/build.log" 2>&1) || {
    tail -n 40 "$out/build.log" >&2
    exit 1
}
echo "$out/tree/src"
