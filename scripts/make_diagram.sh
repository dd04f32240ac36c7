#!/usr/bin/env bash
# Render docs/completion_flow.dot into docs/completion_flow.png (checked in, so the docs
# show it without a build).  Needs graphviz's `dot` (Debian: apt-get install -y graphviz;
# installed here if missing and apt-get is available).
#
#   bash scripts/make_diagram.sh
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
src="$root/docs/completion_flow.dot"
out="$root/docs/completion_flow.png"

if ! command -v dot >/dev/null; then
    if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
        apt-get update -qq && apt-get install -y -qq graphviz >/dev/null
    else
        echo "make_diagram: graphviz's dot is missing (apt-get install graphviz)" >&2
        exit 1
    fi
fi
# Render to a temporary file first: a failed run never leaves a broken PNG behind.
tmp=$(mktemp "${TMPDIR:-/tmp}/completion_flow.XXXXXX.png")
trap 'rm -f "$tmp"' EXIT
dot -Tpng -Gdpi=110 "$src" -o "$tmp"
mv "$tmp" "$out"
trap - EXIT
echo "wrote $out ($(dot -V 2>&1))"
