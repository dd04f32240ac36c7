#!/usr/bin/env bash
# Type checks of the public API, against the installed package (its py.typed and the
# extension's stub, _core.pyi, as a wheel ships them):
#
#   1. mypy --strict on examples/ and tests/typecheck/ (a typed tour of the API whose
#      `# type: ignore[...]` lines are mistakes the types must catch);
#   2. mypy's stubtest: _core.pyi against the compiled extension (every public name,
#      signature and @final; allowlist in tests/typecheck/stubtest_allowlist.txt).
#
#   bash scripts/check_types.sh [--src]
#
#   --src    quick: check against src/ directly (no build, no stubtest).
#   --venv PYTHON
#            use that interpreter, whose environment already has the package installed
#            (scripts/test.sh passes its own: no second build); mypy is added to it.
#
# By default the work tree is built and installed into a venv with mypy (reused between
# runs).  Never writes into the tree.  Environment: PYTHON (default python3),
# CHECK_TYPES_DIR (default ${TMPDIR:-/tmp}/iocpnet-check-types).
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
py=${PYTHON:-python3}
work=${CHECK_TYPES_DIR:-${TMPDIR:-/tmp}/iocpnet-check-types}
mode=installed
vpy=
case "${1:-}" in
    --src) mode=src ;;
    --venv) mode=given; vpy=${2:?--venv needs a python} ;;
esac

step() { printf '\n== %s\n' "$*"; }
case "$work" in "$root"|"$root"/*) echo "CHECK_TYPES_DIR must be outside the tree" >&2; exit 1 ;; esac
mkdir -p "$work"

targets=()
[ -d "$root/examples" ] && targets+=("$root/examples")
targets+=("$root/tests/typecheck")

if [ -z "$vpy" ]; then
    venv="$work/venv"
    [ -x "$venv/bin/python" ] || "$py" -m venv "$venv"
    vpy="$venv/bin/python"
fi
step "mypy for $vpy"
"$vpy" -m pip install -q --disable-pip-version-check --upgrade pip "mypy>=1.11"
"$vpy" -m mypy --version

if [ "$mode" = installed ]; then
    step "installing the work tree into $vpy's environment"
    rm -rf "$work/src"
    mkdir -p "$work/src"
    (cd "$root" && git ls-files -z --cached --others --exclude-standard |
        while IFS= read -r -d '' f; do [ -e "$f" ] && printf '%s\0' "$f"; done |
        xargs -0 cp --parents -t "$work/src")
    "$vpy" -m pip install -q --disable-pip-version-check --force-reinstall --no-deps \
        "$work/src" >"$work/install.log" 2>&1 || { tail -n 40 "$work/install.log" >&2; exit 1; }
    unset MYPYPATH
elif [ "$mode" = given ]; then
    unset MYPYPATH
else
    export MYPYPATH="$root/src"
fi

# Run from the work directory: only the installed package (or MYPYPATH) is visible.
cd "$work"
step "mypy --strict ${targets[*]#"$root/"} (against the $mode package)"
"$vpy" -m mypy --strict --cache-dir "$work/mypy-cache" "${targets[@]}"

if [ "$mode" != src ]; then
    where=$("$vpy" -c 'import iocpnet, os; print(os.path.dirname(iocpnet.__file__))')
    # Installed means site-packages (test.sh's venv may itself live under the tree).
    case "$where" in
        */site-packages/*) ;;
        "$root"/*) echo "iocpnet was imported from the tree ($where)" >&2; exit 1 ;;
    esac
    step "stubtest iocpnet._core (stub $where/_core.pyi against the compiled module)"
    flags=(--allowlist "$root/tests/typecheck/stubtest_allowlist.txt")
    if "$vpy" -c 'import sys; sys.exit(sys.version_info >= (3, 12))'; then
        flags+=(--allowlist "$root/tests/typecheck/stubtest_allowlist_pre312.txt")
    fi
    # PEP 800 disjoint bases: every cdef class is one; the stub does not mark them (the
    # decorator is too new for the type checkers our users run).
    if grep -q -- --ignore-disjoint-bases <<<"$("$vpy" -m mypy.stubtest --help)"; then
        flags+=(--ignore-disjoint-bases)
    fi
    "$vpy" -m mypy.stubtest "${flags[@]}" iocpnet._core
fi

printf '\ncheck_types: OK\n'
