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
# setup.py runs with this interpreter's own setuptools and Cython, not pip's isolated
# build environment: check them against pyproject's [build-system] requires (an older
# setuptools fails on the SPDX license string with a schema dump) and install what is
# missing, saying so.
need=$("$py" - "$root/pyproject.toml" <<'PYEOF'
import re, sys
from importlib.metadata import version, PackageNotFoundError
text = open(sys.argv[1]).read()
reqs = re.search(r'^requires\s*=\s*\[(.*?)\]', text, re.M | re.S).group(1)
for req in re.findall(r'"([^"]+)"', reqs):
    name, _, low = req.partition(">=")
    try:
        have = tuple(int(x) for x in re.findall(r"\d+", version(name))[:3])
    except PackageNotFoundError:
        have = ()
    if low and have < tuple(int(x) for x in low.split(".")):
        print(req)
PYEOF
)
need=$(echo $need)   # one line
if [ -n "$need" ]; then
    echo "devbuild: installing the build requirements this interpreter lacks: $need" >&2
    # shellcheck disable=SC2086
    "$py" -m pip install -q $need >&2 || {
        echo "devbuild: could not install $need for $py (pyproject's build-system requires)" >&2
        exit 1
    }
fi
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
