#!/usr/bin/env bash
# run_contract.sh -- build tests/c/contract.c against every backend and run it:
#
#   io_uring, epoll   gcc; gcc with ASan+UBSan; gcc with TSan; valgrind memcheck
#                     (both also with receives kept armed: multishot)
#   iocp              x86_64-w64-mingw32-gcc, run under Wine (headless, throw-away prefix)
#
# Usage: tests/c/run_contract.sh [--only io_uring|epoll|iocp]... [--no-sanitizers]
#                                [--no-valgrind] [--no-wine] [--no-install]
#
# Installs what it lacks with apt-get (gcc-mingw-w64-x86-64, wine64, wine, valgrind) when
# run as root.  A backend this machine cannot run (no io_uring in this kernel or sandbox,
# no epoll.c in this checkout yet, no Wine) is reported as skipped with the reason, not
# as failed.  Build outputs and logs go to tests/c/build/ (gitignored).  Exit status: 0
# when nothing failed.
#
# valgrind and io_uring: valgrind 3.19 (Debian 12) knows the io_uring syscalls but does
# not treat io_uring_enter as a blocking call, so a thread waiting in it keeps valgrind's
# big lock and every other thread of the process stops until the wait times out.  The
# contract's multi-threaded cases cannot make progress that way, so under valgrind the
# io_uring backend runs the single-threaded cases only (VALGRIND_URING_SKIP below);
# epoll runs them all.
set -u

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
SRC=$ROOT/src/iocpnet/port
TESTS=$ROOT/tests/c
OUT=$TESTS/build
LOGS=$OUT/logs

ONLY=()
SANITIZERS=1
VALGRIND=1
WINE=1
INSTALL=1
while [ $# -gt 0 ]; do
    case "$1" in
        --only) ONLY+=("${2:?--only needs io_uring, epoll or iocp}"); shift 2 ;;
        --only=*) ONLY+=("${1#--only=}"); shift ;;
        --no-sanitizers) SANITIZERS=0; shift ;;
        --no-valgrind) VALGRIND=0; shift ;;
        --no-wine) WINE=0; shift ;;
        --no-install) INSTALL=0; shift ;;
        -h|--help) sed -n '2,22p' "$0"; exit 0 ;;
        *) echo "run_contract.sh: unknown option $1" >&2; exit 2 ;;
    esac
done

want() {
    [ ${#ONLY[@]} -eq 0 ] && return 0
    local b
    for b in "${ONLY[@]}"; do [ "$b" = "$1" ] && return 0; done
    return 1
}
for b in "${ONLY[@]+"${ONLY[@]}"}"; do
    case "$b" in io_uring|epoll|iocp) ;; *) echo "run_contract.sh: unknown backend $b" >&2; exit 2 ;; esac
done

START=$(date +%s)
mkdir -p "$OUT" "$LOGS"

# ---- tools ------------------------------------------------------------------------------
need=()
if want io_uring || want epoll; then
    command -v gcc >/dev/null || need+=(gcc libc6-dev)
    [ $VALGRIND = 1 ] && ! command -v valgrind >/dev/null && need+=(valgrind)
fi
if want iocp && [ $WINE = 1 ]; then
    command -v x86_64-w64-mingw32-gcc >/dev/null || need+=(gcc-mingw-w64-x86-64)
    # wine64 alone puts no `wine` launcher on PATH; the `wine` package does.
    command -v wine >/dev/null || need+=(wine64 wine)
fi
if [ ${#need[@]} -gt 0 ]; then
    if [ $INSTALL = 1 ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        echo "run_contract.sh: installing ${need[*]} (log: $LOGS/apt.log)"
        t0=$(date +%s)
        if ! { DEBIAN_FRONTEND=noninteractive apt-get update -q &&
               DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${need[@]}"; } \
               >"$LOGS/apt.log" 2>&1; then
            echo "run_contract.sh: apt-get failed; see $LOGS/apt.log (steps needing it are skipped)"
        fi
        echo "run_contract.sh: install took $(( $(date +%s) - t0 )) s"
    else
        echo "run_contract.sh: missing ${need[*]} and not installing (not root, no apt-get, or --no-install)"
    fi
fi

# ---- results ----------------------------------------------------------------------------
RESULTS=()
N_PASS=0
N_FAIL=0
N_SKIP=0

record() {   # record STATUS BACKEND VARIANT TEXT
    RESULTS+=("$(printf '  %-5s %-9s %-11s %s' "$1" "$2" "$3" "$4")")
    case "$1" in
        PASS) N_PASS=$((N_PASS + 1)) ;;
        FAIL) N_FAIL=$((N_FAIL + 1)) ;;
        *) N_SKIP=$((N_SKIP + 1)) ;;
    esac
}

# run BACKEND VARIANT LOG command...: runs the contract, shows its output, records it.
run() {
    local backend=$1 variant=$2 log=$3 rc summary
    shift 3
    echo
    echo "== $backend / $variant: $*"
    "$@" >"$log" 2>&1
    rc=$?
    grep -v '^    \[' "$log" | grep -v '^==[0-9]*== *$' | sed 's/^/   /' | tail -n 60
    summary=$(grep -a "^contract\[$backend\]:" "$log" | tail -n 1)
    [ -n "${NOTE:-}" ] && summary="$summary $NOTE"
    if [ $rc = 77 ]; then
        record SKIP "$backend" "$variant" "${summary:-skipped (exit 77)}"
    elif [ $rc = 0 ]; then
        record PASS "$backend" "$variant" "$summary"
    else
        [ -z "$summary" ] && summary="exit status $rc, no summary (see $log)"
        record FAIL "$backend" "$variant" "$summary (exit $rc)"
    fi
    return 0
}

CFLAGS_COMMON="-std=gnu99 -g -Wall -Wextra -Wvla -pthread -I$SRC"

# The port's sources, as setup.py lists them: what every backend links, the platform's
# socket helpers, and each backend's own files.
PORT_COMMON="common.c strand.c bufpool.c addr.c"
sources() {   # sources BACKEND: sets BSRC to the port files of BACKEND's contract binary
    local f files
    case $1 in
        io_uring) files="$PORT_COMMON posix_sock.c io_uring.c io_uring_bufs.c io_uring_setup.c" ;;
        epoll) files="$PORT_COMMON posix_sock.c epoll.c epoll_ops.c" ;;
        iocp) files="$PORT_COMMON win_sock.c iocp.c" ;;
    esac
    BSRC=()
    for f in $files; do BSRC+=("$SRC/$f"); done
}

# ---- Linux backends ---------------------------------------------------------------------
LINUX_BACKENDS=()
want io_uring && LINUX_BACKENDS+=(io_uring)
if want epoll; then
    if [ -f "$SRC/epoll.c" ]; then
        LINUX_BACKENDS+=(epoll)
    else
        record SKIP epoll all "no src/iocpnet/port/epoll.c in this checkout yet"
    fi
fi

# Threaded cases skipped for io_uring under valgrind (see the top).
VALGRIND_URING_SKIP=echo_1B_to_4MiB,gather_send_order,post_from_thread,batch_two_waiters,strands,strand_yield_threads,shutdown_wakes_waiters,recv_bounded_readahead,single_dispatcher

if [ ${#LINUX_BACKENDS[@]} -gt 0 ]; then
    if [ "$(uname -s)" != Linux ]; then
        for b in "${LINUX_BACKENDS[@]}"; do record SKIP "$b" all "not Linux"; done
    elif ! command -v gcc >/dev/null; then
        for b in "${LINUX_BACKENDS[@]}"; do record FAIL "$b" gcc "no gcc"; done
    else
        # One binary per backend, holding only that backend: a backend that does not
        # build fails alone.
        for b in "${LINUX_BACKENDS[@]}"; do
            case $b in
                io_uring) DEFS="-DPORT_HAVE_IO_URING=1" ;;
                epoll) DEFS="-DPORT_HAVE_EPOLL=1" ;;
            esac
            sources "$b"
            echo
            echo "== building contract-$b (gcc)"
            # shellcheck disable=SC2086
            if gcc $CFLAGS_COMMON -O2 $DEFS "${BSRC[@]}" \
                    "$TESTS/contract.c" -o "$OUT/contract-$b" 2>"$LOGS/build-$b-gcc.log"; then
                sed 's/^/   /' "$LOGS/build-$b-gcc.log"
                run "$b" gcc "$LOGS/$b-gcc.log" "$OUT/contract-$b" "$b"
                # The same, with receives kept armed (PORT_OPT_RECV_MULTISHOT, the core's
                # default on Linux).
                run "$b" multishot "$LOGS/$b-multishot.log" env CONTRACT_RECV_MULTISHOT=1 \
                    "$OUT/contract-$b" "$b"
            else
                sed 's/^/   /' "$LOGS/build-$b-gcc.log"
                record FAIL "$b" gcc "build failed (see ${LOGS#$ROOT/}/build-$b-gcc.log)"
                continue
            fi

            if [ $SANITIZERS = 1 ]; then
                echo
                echo "== building contract-$b-asan (gcc, ASan + UBSan)"
                # shellcheck disable=SC2086
                if gcc $CFLAGS_COMMON -O1 -fsanitize=address,undefined -fno-omit-frame-pointer \
                        -fno-sanitize-recover=undefined $DEFS "${BSRC[@]}" \
                        "$TESTS/contract.c" -o "$OUT/contract-$b-asan" \
                        2>"$LOGS/build-$b-asan.log"; then
                    run "$b" asan+ubsan "$LOGS/$b-asan.log" \
                        env UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 ASAN_OPTIONS=detect_leaks=1 \
                        "$OUT/contract-$b-asan" "$b"
                else
                    sed 's/^/   /' "$LOGS/build-$b-asan.log"
                    record FAIL "$b" asan+ubsan "build failed"
                fi
                echo
                echo "== building contract-$b-tsan (gcc, ThreadSanitizer)"
                # shellcheck disable=SC2086
                if gcc $CFLAGS_COMMON -O1 -fsanitize=thread -Wno-tsan $DEFS "${BSRC[@]}" \
                        "$TESTS/contract.c" -o "$OUT/contract-$b-tsan" \
                        2>"$LOGS/build-$b-tsan.log"; then
                    run "$b" tsan "$LOGS/$b-tsan.log" env TSAN_OPTIONS=halt_on_error=1 \
                        "$OUT/contract-$b-tsan" "$b"
                else
                    sed 's/^/   /' "$LOGS/build-$b-tsan.log"
                    record FAIL "$b" tsan "build failed"
                fi
            fi

            if [ $VALGRIND = 1 ]; then
                if ! command -v valgrind >/dev/null; then
                    record SKIP "$b" valgrind "valgrind not installed"
                else
                    skip="" vnote=""
                    if [ "$b" = io_uring ]; then
                        skip=$VALGRIND_URING_SKIP
                        vnote="(threaded cases skipped: valgrind stalls on io_uring_enter)"
                    fi
                    # CONTRACT_NO_BAD_POINTERS: os_errors' send from a bad pointer is
                    # what valgrind reports (the syscall's argument), on purpose there.
                    NOTE=$vnote run "$b" valgrind "$LOGS/$b-valgrind.log" env CONTRACT_SKIP="$skip" CONTRACT_WATCHDOG=300 \
                        CONTRACT_NO_BAD_POINTERS=1 \
                        valgrind -q --error-exitcode=1 --leak-check=full \
                        --errors-for-leak-kinds=definite,possible "$OUT/contract-$b" "$b"
                fi
            fi
        done
    fi
fi

# ---- Windows backend under Wine ---------------------------------------------------------
WINEPREFIX_DIR=""
cleanup() {
    if [ -n "$WINEPREFIX_DIR" ]; then
        WINEPREFIX=$WINEPREFIX_DIR wineserver -k >/dev/null 2>&1 || true
        rm -rf "$WINEPREFIX_DIR"
    fi
}
trap cleanup EXIT

if want iocp; then
    if [ $WINE = 0 ]; then
        record SKIP iocp mingw+wine "--no-wine"
    elif ! command -v x86_64-w64-mingw32-gcc >/dev/null; then
        record SKIP iocp mingw+wine "x86_64-w64-mingw32-gcc not installed"
    else
        echo
        echo "== building contract.exe (x86_64-w64-mingw32-gcc)"
        sources iocp
        if x86_64-w64-mingw32-gcc -std=gnu99 -g -O2 -Wall -Wextra -Wvla -Wdeclaration-after-statement \
                -I"$SRC" "${BSRC[@]}" "$TESTS/contract.c" \
                -lws2_32 -lmswsock -o "$OUT/contract.exe" 2>"$LOGS/build-mingw.log"; then
            sed 's/^/   /' "$LOGS/build-mingw.log"
            if ! command -v wine >/dev/null; then
                record SKIP iocp mingw+wine "built, but no wine to run it"
            else
                WINEPREFIX_DIR=$(mktemp -d "${TMPDIR:-/tmp}/iocpnet-wine.XXXXXX")
                export WINEPREFIX=$WINEPREFIX_DIR WINEDEBUG=-all WINEDLLOVERRIDES="mscoree,mshtml=" DISPLAY=
                # A 64-bit prefix only (no wine32 needed); creating it takes a few seconds.
                export WINEARCH=win64
                run iocp mingw+wine "$LOGS/iocp-wine.log" wine "$OUT/contract.exe" iocp
            fi
        else
            sed 's/^/   /' "$LOGS/build-mingw.log"
            record FAIL iocp mingw+wine "build failed"
        fi
    fi
fi

# ---- summary ----------------------------------------------------------------------------
echo
echo "== contract summary ($(( $(date +%s) - START )) s; logs in ${LOGS#$ROOT/})"
for r in "${RESULTS[@]}"; do echo "$r"; done
echo "contract: $N_PASS passed, $N_FAIL failed, $N_SKIP skipped"
[ $N_FAIL = 0 ]
