#!/usr/bin/env bash
# Build and install a free-threaded CPython 3.13 ("3.13t", --disable-gil).
#
# Usage: scripts/build_freethreaded_python.sh [PREFIX]
#   PREFIX defaults to $IOCPNET_FT_PREFIX, else /opt/iocpnet-py313t.
#
# The last line on stdout is the interpreter path, so CI can do
#   PY=$(scripts/build_freethreaded_python.sh | tail -n1)
# Everything else goes to stderr.
#
# Debian 12 ships no 3.13 at all, and we may only reach Debian's mirror and
# PyPI, so the source comes from Debian 13 ("trixie") as a *source* package:
# its upstream orig tarball is plain CPython and builds fine on bookworm.
#
# Optional environment:
#   IOCPNET_FT_PREFIX      default install prefix
#   IOCPNET_DEBIAN_MIRROR  Debian mirror URL for the trixie deb-src line
#                          (default: the one this machine's apt already uses)
#   IOCPNET_APT_IGNORE_VALID_UNTIL=1  accept an expired Release file (a snapshot
#                          archive as the mirror)
#   IOCPNET_FT_JOBS        make -j value (default: nproc)
set -euo pipefail

readonly SRC_PACKAGE=python3.13
readonly SRC_SUITE=trixie
readonly PY_NAME=python3.13t
readonly TAG="[build-ft-python]"

# Variables that would change what the checks below observe: PYTHON_GIL=1
# re-enables the GIL at run time (we'd rebuild for nothing), PYTHONPATH/HOME
# could make the new interpreter load another Python's stdlib.
unset PYTHON_GIL PYTHONPATH PYTHONHOME PYTHONSTARTUP PYTHONUSERBASE
export PYTHONNOUSERSITE=1
export DEBIAN_FRONTEND=noninteractive
export PIP_DISABLE_PIP_VERSION_CHECK=1

log() { printf '%s %s\n' "$TAG" "$*" >&2; }
die() { printf '%s ERROR: %s\n' "$TAG" "$*" >&2; exit 1; }

PREFIX="${1:-${IOCPNET_FT_PREFIX:-/opt/iocpnet-py313t}}"
# configure rejects relative prefixes, and the printed path must be usable
# from any cwd.
case "$PREFIX" in
    /*) ;;
    *) PREFIX="$PWD/$PREFIX" ;;
esac
PREFIX="${PREFIX%/}"
PY="$PREFIX/bin/$PY_NAME"

# --- checks ---------------------------------------------------------------

# ssl is part of the check because without it pip cannot reach PyPI, which
# makes the interpreter useless to us even though it starts.
interpreter_ok() {
    [ -x "$PY" ] || return 1
    "$PY" -c 'import sys, ssl; sys.exit(1 if sys._is_gil_enabled() else 0)' \
        >/dev/null 2>&1
}

# Cython < 3.1 cannot build extensions for free-threaded CPython (it lacks
# Py_MOD_GIL_NOT_USED support), so an older Cython counts as missing.
tools_ok() {
    "$PY" - >/dev/null 2>&1 <<'EOF'
import Cython, pytest
major, minor = (int(x) for x in Cython.__version__.split(".")[:2])
assert (major, minor) >= (3, 1), Cython.__version__
EOF
}

# Fast path: CI calls this on every run, so reuse must cost well under a
# second and must not touch apt, the network or a lock.
if interpreter_ok && tools_ok; then
    log "reusing $PY"
    printf '%s\n' "$PY"
    exit 0
fi

# --- slow path setup ------------------------------------------------------

# The build is CPU-bound and CI runs it beside its test suites, which mostly wait on
# sockets: at the lowest priority it takes their idle time without slowing them.  (Only
# here: the check above must stay quick on a loaded machine.)
renice -n 19 -p $$ >/dev/null 2>&1 || true

SUDO=()
if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null 2>&1 \
        || die "not root and sudo is not available; apt-get needs root"
    SUDO=(sudo)
fi

WORK=""
LOG=""
cleanup() {
    local rc=$?
    if [ "$rc" -ne 0 ] && [ -n "$LOG" ] && [ -s "$LOG" ]; then
        # The work dir is deleted below, so the log must move out first or
        # the evidence of what broke is gone.
        local kept
        kept="$(mktemp "${TMPDIR:-/tmp}/iocpnet-ft-python-build.XXXXXX.log")"
        cp "$LOG" "$kept"
        {
            printf '%s build failed (exit %s); last lines of the log:\n' "$TAG" "$rc"
            tail -n 40 "$kept"
            printf '%s full log kept at %s\n' "$TAG" "$kept"
        } >&2
    fi
    if [ -n "$WORK" ] && [ -d "$WORK" ]; then
        rm -rf -- "$WORK"
    fi
    exit "$rc"
}
trap cleanup EXIT

# Two concurrent runs (e.g. a developer and CI on one machine) would both
# `make install` into the same prefix; serialise them per prefix.
if command -v flock >/dev/null 2>&1; then
    LOCKFILE="${TMPDIR:-/tmp}/iocpnet-ft-python.$(printf '%s' "$PREFIX" | tr -c 'A-Za-z0-9' '_').lock"
    exec 9>"$LOCKFILE"
    if ! flock -n 9; then
        log "another build for $PREFIX is running; waiting for it"
        flock 9
    fi
    # The other run may have finished the job while we waited.
    if interpreter_ok && tools_ok; then
        printf '%s\n' "$PY"
        exit 0
    fi
fi

WORK="$(mktemp -d "${TMPDIR:-/tmp}/iocpnet-ft-python.XXXXXX")"
LOG="$WORK/build.log"
: >"$LOG"

# Runs a command with its output in the log only; on failure the EXIT trap
# prints the log's tail, so the console stays readable but errors are kept.
run_logged() {
    printf '\n+ %s\n' "$*" >>"$LOG"
    "$@" >>"$LOG" 2>&1
}

SECONDS=0
stage() { log "[$(printf '%4ds' "$SECONDS")] $*"; }

# --- apt build dependencies -----------------------------------------------

# Each -dev package maps to a stdlib module that is silently left out when
# its headers are missing: ssl (pip needs it), zlib (pip, wheels), ctypes
# (libffi), bz2, lzma, sqlite3, _uuid. xz-utils unpacks the .orig.tar.xz;
# ca-certificates lets the OpenSSL-based ssl module verify PyPI.
BUILD_DEPS=(
    build-essential pkg-config xz-utils ca-certificates
    libssl-dev zlib1g-dev libffi-dev libbz2-dev liblzma-dev
    libsqlite3-dev uuid-dev
)

pkg_installed() {
    [ "$(dpkg-query -W -f='${db:Status-Status}' "$1" 2>/dev/null)" = installed ]
}

install_build_deps() {
    local missing=() p
    for p in "${BUILD_DEPS[@]}"; do
        pkg_installed "$p" || missing+=("$p")
    done
    if [ "${#missing[@]}" -eq 0 ]; then
        stage "build dependencies already installed"
        return 0
    fi
    stage "installing build dependencies: ${missing[*]}"
    # `apt-get update` is slow and changes system state, so only run it when
    # the lists lack a package or are stale enough that the install fails.
    local need_update=0
    for p in "${missing[@]}"; do
        if ! apt-cache show "$p" >/dev/null 2>&1; then
            need_update=1
            break
        fi
    done
    if [ "$need_update" -eq 1 ]; then
        stage "apt-get update (package lists lack some build dependencies)"
        run_logged "${SUDO[@]}" apt-get update \
            || die "apt-get update failed"
    fi
    if ! run_logged "${SUDO[@]}" apt-get install -y --no-install-recommends "${missing[@]}"; then
        if [ "$need_update" -eq 0 ]; then
            stage "install failed; retrying after apt-get update (stale lists?)"
            run_logged "${SUDO[@]}" apt-get update || die "apt-get update failed"
            run_logged "${SUDO[@]}" apt-get install -y --no-install-recommends "${missing[@]}" \
                || die "apt-get install ${missing[*]} failed"
        else
            die "apt-get install ${missing[*]} failed"
        fi
    fi
}

# --- fetch the source -----------------------------------------------------

# Use the mirror this machine's apt already uses (a proxy, a local mirror...): the
# script names no host of its own, so it works behind any mirror.
detect_debian_mirror() {
    local codename="" uri=""
    # shellcheck disable=SC1091
    codename="$(. /etc/os-release 2>/dev/null && printf '%s' "${VERSION_CODENAME:-}")"
    local f
    for f in /etc/apt/sources.list.d/*.sources; do
        [ -f "$f" ] || continue
        # deb822: one stanza per blank-line-separated paragraph. Take the
        # first URI of a stanza whose suites include the release codename
        # (that excludes the -security archive, which has no trixie main).
        uri="$(awk -v cn="$codename" '
            BEGIN { RS = ""; FS = "\n" }
            {
                u = ""; ok = 0
                for (i = 1; i <= NF; i++) {
                    line = $i
                    if (line ~ /^[ \t]*#/) continue
                    if (line ~ /^URIs:/) { sub(/^URIs:[ \t]*/, "", line); split(line, a, /[ \t]+/); u = a[1] }
                    if (line ~ /^Suites:/) {
                        sub(/^Suites:[ \t]*/, "", line); n = split(line, s, /[ \t]+/)
                        for (j = 1; j <= n; j++) if (s[j] == cn) ok = 1
                    }
                    if (line ~ /^Enabled:[ \t]*no/) { ok = 0; u = "" }
                }
                if (ok && u != "") { print u; exit }
            }' "$f")"
        [ -n "$uri" ] && { printf '%s\n' "$uri"; return 0; }
    done
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
        [ -f "$f" ] || continue
        # one-line format: deb [options] URI suite component...
        uri="$(awk -v cn="$codename" '
            $1 == "deb" || $1 == "deb-src" {
                i = 2
                if ($i ~ /^\[/) { while (i <= NF && $i !~ /\]$/) i++; i++ }
                if ($(i + 1) == cn) { print $i; exit }
            }' "$f")"
        [ -n "$uri" ] && { printf '%s\n' "$uri"; return 0; }
    done
    return 1
}

fetch_source() {
    local mirror="${IOCPNET_DEBIAN_MIRROR:-}"
    [ -n "$mirror" ] || mirror="$(detect_debian_mirror)" \
        || die "no Debian mirror found in /etc/apt/sources.list(.d) for this release; set IOCPNET_DEBIAN_MIRROR"
    mirror="${mirror%/}"
    stage "fetching $SRC_PACKAGE source from $mirror ($SRC_SUITE, deb-src)"

    # A private sources list, lists dir and cache: the system's apt config
    # and package lists must stay exactly as they were, and we must not
    # make bookworm's apt see trixie binaries.
    local aptdir="$WORK/apt"
    mkdir -p "$aptdir/lists/partial" "$aptdir/cache/archives/partial" \
        "$aptdir/sources.list.d" "$WORK/download"
    printf 'deb-src [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] %s %s main\n' \
        "$mirror" "$SRC_SUITE" >"$aptdir/sources.list"
    # apt downloads as the unprivileged _apt user; without this it falls back
    # to root with a warning.
    chmod 0755 "$WORK" "$aptdir" "$aptdir/lists" "$aptdir/cache"
    if id _apt >/dev/null 2>&1; then
        chown _apt "$aptdir/lists/partial" "$aptdir/cache/archives/partial" "$WORK/download" \
            2>/dev/null || true
    fi
    local aptopts=(
        -o "Dir::Etc::SourceList=$aptdir/sources.list"
        -o "Dir::Etc::SourceParts=$aptdir/sources.list.d"
        -o "Dir::State::Lists=$aptdir/lists"
        -o "Dir::Cache=$aptdir/cache"
        -o "APT::Get::List-Cleanup=false"
    )
    # A snapshot archive serves Release files whose Valid-Until has passed: say so with
    # IOCPNET_APT_IGNORE_VALID_UNTIL=1 (the files stay signature-checked).
    if [ -n "${IOCPNET_APT_IGNORE_VALID_UNTIL:-}" ]; then
        aptopts+=(-o "Acquire::Check-Valid-Until=false")
    fi
    run_logged apt-get "${aptopts[@]}" update \
        || die "apt-get update of the private $SRC_SUITE deb-src list failed (mirror $mirror)"
    (cd "$WORK/download" && run_logged apt-get "${aptopts[@]}" source --download-only "$SRC_PACKAGE") \
        || die "apt-get source $SRC_PACKAGE failed (is $SRC_PACKAGE still in $SRC_SUITE?)"

    local orig
    # The detached signature (.orig.tar.*.asc) matches the same glob.
    orig="$(find "$WORK/download" -maxdepth 1 -name "${SRC_PACKAGE}_*.orig.tar.*" ! -name '*.asc' | head -n1)"
    [ -n "$orig" ] || die "no ${SRC_PACKAGE}_*.orig.tar.* among the downloaded files"
    stage "unpacking $(basename "$orig")"
    # Only the pristine upstream tarball: Debian's patches target Debian's
    # own multiarch layout and are not needed for a private prefix install.
    mkdir -p "$WORK/src"
    run_logged tar -xf "$orig" -C "$WORK/src" --strip-components=1 \
        || die "could not unpack $orig"
    [ -x "$WORK/src/configure" ] || die "unpacked source has no configure script"
}

# --- build and install ----------------------------------------------------

build_and_install() {
    local jobs="${IOCPNET_FT_JOBS:-$(nproc 2>/dev/null || echo 2)}"
    cd "$WORK/src"
    # --with-ensurepip=no: pip is bootstrapped after install, as its own
    # step, so a pip problem is reported as such and not as a build failure.
    # No --enable-optimizations: PGO multiplies the build time several-fold
    # and this interpreter is for building and testing, not benchmarking.
    stage "configure --disable-gil --prefix=$PREFIX"
    run_logged ./configure --disable-gil --prefix="$PREFIX" --with-ensurepip=no \
        || die "configure failed"
    stage "make -j$jobs (a few minutes)"
    run_logged make -j"$jobs" || die "make failed"

    # Check the freshly built interpreter *before* installing: a missing
    # -dev package only produces a warning from make, and installing an
    # interpreter without e.g. ssl would then pass for a good one until
    # pip fails later.
    stage "checking optional stdlib modules in the build tree"
    run_logged ./python -c '
import sys
assert not sys._is_gil_enabled(), "GIL is enabled in a --disable-gil build?"
missing = []
for name in ("ssl", "zlib", "ctypes", "bz2", "lzma", "sqlite3", "_uuid"):
    try:
        __import__(name)
    except ImportError as e:
        missing.append("%s (%s)" % (name, e))
if missing:
    sys.exit("missing modules: " + ", ".join(missing))
' || die "the built interpreter lacks required modules (see log)"

    stage "make install into $PREFIX"
    if [ ! -d "$PREFIX" ]; then
        mkdir -p "$PREFIX" 2>/dev/null || "${SUDO[@]}" mkdir -p "$PREFIX" \
            || die "cannot create $PREFIX"
    fi
    [ -w "$PREFIX" ] || die "$PREFIX is not writable by $(id -un)"
    run_logged make install || die "make install failed"
    cd /
    interpreter_ok || die "$PY does not run free-threaded with ssl after install"
}

install_python_tools() {
    if "$PY" -m pip --version >/dev/null 2>&1; then
        stage "pip already present"
    else
        stage "bootstrapping pip (ensurepip)"
        run_logged "$PY" -m ensurepip || die "ensurepip failed"
    fi
    if tools_ok; then
        stage "Cython>=3.1 and pytest already importable"
        return 0
    fi
    stage "pip install 'cython>=3.1' pytest"
    # No --upgrade: keep whatever satisfies the requirement rather than
    # churning an existing environment.
    run_logged "$PY" -m pip install --root-user-action=ignore --no-warn-script-location \
        'cython>=3.1' pytest \
        || die "pip install cython pytest failed (is PyPI reachable?)"
    tools_ok || die "Cython>=3.1 / pytest still not importable after pip install"
}

# --- main -----------------------------------------------------------------

if interpreter_ok; then
    stage "reusing existing free-threaded interpreter $PY"
else
    if [ -e "$PY" ]; then
        log "$PY exists but is not a working free-threaded build; rebuilding"
    fi
    install_build_deps
    fetch_source
    build_and_install
fi
install_python_tools

stage "final check"
"$PY" -c "import sys, ssl; assert not sys._is_gil_enabled()" \
    || die "final check failed: $PY is not a free-threaded interpreter with ssl"
stage "done: $("$PY" -c 'import sys; print(sys.version.split()[0], sys.abiflags)')"
printf '%s\n' "$PY"
