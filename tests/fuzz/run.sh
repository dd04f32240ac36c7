#!/usr/bin/env bash
# tests/fuzz/run.sh -- fuzz the C parsers of untrusted bytes with libFuzzer, under
# AddressSanitizer + UndefinedBehaviorSanitizer, for a bounded time each:
#   packet_fuzz  PacketSession's framing (src/iocpnet/port/packet.h)
#   ws_fuzz      the WebSocket frame parser (src/iocpnet/port/ws_frame.h)
#
#   bash tests/fuzz/run.sh [SECONDS]        (default 25; or IOCPNET_FUZZ_SECONDS)
#
# For each target:
# 1. builds tests/fuzz/<target>.c with clang -fsanitize=fuzzer,address,undefined
#    (installs Debian's clang with apt-get when it is missing and we are root);
# 2. replays its seed corpus (tests/fuzz/corpus/<packet|ws>/, in the repo, small);
# 3. fuzzes for SECONDS, new inputs going to a work corpus outside the repo's seeds
#    ($OUT/corpus-<name>, where OUT is tests/fuzz/build or IOCPNET_FUZZ_OUT; gitignored).
#
# A crash, a sanitizer report or a failed check writes the input to $OUT/crash-* and
# exits non-zero.  Without clang (not root, no apt-get) the seeds are replayed with
# gcc + ASan/UBSan instead and the fuzzing is reported as skipped.
# To keep a new interesting input as a seed: copy it from $OUT/corpus to the seed dir
# (keep the seed corpus small).
set -u

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
HERE=$ROOT/tests/fuzz
SRC=$ROOT/src/iocpnet/port
OUT=${IOCPNET_FUZZ_OUT:-$HERE/build}
SECS=${1:-${IOCPNET_FUZZ_SECONDS:-25}}
mkdir -p "$OUT"

SAN="-fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer"
export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1:abort_on_error=0}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-halt_on_error=1:print_stacktrace=1}

if ! command -v clang >/dev/null && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "fuzz: installing clang (log: $OUT/apt.log)"
    { DEBIAN_FRONTEND=noninteractive apt-get update -q &&
      DEBIAN_FRONTEND=noninteractive apt-get install -y -q clang; } >"$OUT/apt.log" 2>&1 ||
        echo "fuzz: apt-get failed (see $OUT/apt.log)"
fi

# target name, seed directory, the -D that gives it a main() for replays, -max_len
TARGETS="packet_fuzz:packet:PACKET_FUZZ_REPLAY:8192 ws_fuzz:ws:WS_FUZZ_REPLAY:16384"

if ! command -v clang >/dev/null; then
    echo "fuzz: no clang: replaying the seed corpora with gcc + ASan/UBSan instead"
    for t in $TARGETS; do
        IFS=: read -r name seeds replay _ <<<"$t"
        # shellcheck disable=SC2086
        gcc -std=gnu99 -g -O1 -Wall -Wextra $SAN -D"$replay" -I"$SRC" \
            "$HERE/$name.c" -o "$OUT/${name}_replay" || exit 1
        "$OUT/${name}_replay" "$HERE/corpus/$seeds"/* || exit 1
    done
    echo "fuzz: SKIPPED libFuzzer run (no clang); seeds replayed"
    exit 0
fi

for t in $TARGETS; do
    IFS=: read -r name seeds _ maxlen <<<"$t"
    SEEDS=$HERE/corpus/$seeds
    LOG=$OUT/$name.log
    mkdir -p "$OUT/corpus-$seeds"
    echo "fuzz: building $name ($(clang --version | head -n 1))"
    # shellcheck disable=SC2086
    clang -g -O1 -Wall -Wextra -fsanitize=fuzzer $SAN -I"$SRC" "$HERE/$name.c" \
        -o "$OUT/$name" || exit 1

    echo "fuzz: replaying $(ls "$SEEDS" | wc -l) seed(s)"
    "$OUT/$name" "$SEEDS"/* >"$OUT/replay-$name.log" 2>&1 || {
        tail -n 40 "$OUT/replay-$name.log"
        echo "fuzz: a seed of $name fails"
        exit 1
    }

    echo "fuzz: fuzzing $name for $SECS s (log: ${LOG#$ROOT/})"
    t0=$(date +%s)
    # -max_len: room for several frames or packets and a few near-limit ones; the limits
    # themselves are drawn by the input, so the "too large" paths are reached small.
    "$OUT/$name" -max_total_time="$SECS" -max_len="$maxlen" -timeout=10 -rss_limit_mb=2048 \
        -use_value_profile=1 -print_final_stats=1 -artifact_prefix="$OUT/$name-" \
        "$OUT/corpus-$seeds" "$SEEDS" >"$LOG" 2>&1
    rc=$?
    grep -E '^#[0-9]+ +DONE|^Done [0-9]+ runs' "$LOG" | tail -n 2
    grep -E '^stat::(number_of_executed_units|average_exec_per_sec|peak_rss_mb)' "$LOG"
    if [ $rc != 0 ]; then
        grep -v '^#' "$LOG" | tail -n 60
        echo "fuzz: $name FAILED (exit $rc) after $(( $(date +%s) - t0 )) s; input saved as:" \
            "$(ls -t "$OUT/$name"-crash-* "$OUT/$name"-leak-* "$OUT/$name"-timeout-* 2>/dev/null | head -n 1)"
        exit $rc
    fi
    echo "fuzz: $name ran $(( $(date +%s) - t0 )) s, no failure; work corpus:" \
         "$(ls "$OUT/corpus-$seeds" | wc -l) input(s)"
done
