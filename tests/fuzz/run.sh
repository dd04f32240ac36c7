#!/usr/bin/env bash
# tests/fuzz/run.sh -- fuzz PacketSession's C framing (src/iocpnet/port/packet.h) with
# libFuzzer, under AddressSanitizer + UndefinedBehaviorSanitizer, for a bounded time.
#
#   bash tests/fuzz/run.sh [SECONDS]        (default 25; or IOCPNET_FUZZ_SECONDS)
#
# 1. builds tests/fuzz/packet_fuzz.c with clang -fsanitize=fuzzer,address,undefined
#    (installs Debian's clang with apt-get when it is missing and we are root);
# 2. replays the seed corpus (tests/fuzz/corpus/packet/, in the repo, small);
# 3. fuzzes for SECONDS, new inputs going to a work corpus outside the repo's seeds
#    ($OUT/corpus, where OUT is tests/fuzz/build or IOCPNET_FUZZ_OUT; gitignored).
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
SEEDS=$HERE/corpus/packet
OUT=${IOCPNET_FUZZ_OUT:-$HERE/build}
SECS=${1:-${IOCPNET_FUZZ_SECONDS:-25}}
mkdir -p "$OUT/corpus"
LOG=$OUT/fuzz.log

SAN="-fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer"
export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1:abort_on_error=0}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-halt_on_error=1:print_stacktrace=1}

if ! command -v clang >/dev/null && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "fuzz: installing clang (log: $OUT/apt.log)"
    { DEBIAN_FRONTEND=noninteractive apt-get update -q &&
      DEBIAN_FRONTEND=noninteractive apt-get install -y -q clang; } >"$OUT/apt.log" 2>&1 ||
        echo "fuzz: apt-get failed (see $OUT/apt.log)"
fi

if ! command -v clang >/dev/null; then
    echo "fuzz: no clang: replaying the seed corpus with gcc + ASan/UBSan instead"
    # shellcheck disable=SC2086
    gcc -std=gnu99 -g -O1 -Wall -Wextra $SAN -DPACKET_FUZZ_REPLAY -I"$SRC" \
        "$HERE/packet_fuzz.c" -o "$OUT/packet_replay" || exit 1
    "$OUT/packet_replay" "$SEEDS"/* || exit 1
    echo "fuzz: SKIPPED libFuzzer run (no clang); seeds replayed"
    exit 0
fi

echo "fuzz: building packet_fuzz ($(clang --version | head -n 1))"
# shellcheck disable=SC2086
clang -g -O1 -Wall -Wextra -fsanitize=fuzzer $SAN -I"$SRC" "$HERE/packet_fuzz.c" \
    -o "$OUT/packet_fuzz" || exit 1

echo "fuzz: replaying $(ls "$SEEDS" | wc -l) seed(s)"
"$OUT/packet_fuzz" "$SEEDS"/* >"$OUT/replay.log" 2>&1 || {
    tail -n 40 "$OUT/replay.log"
    echo "fuzz: a seed fails"
    exit 1
}

echo "fuzz: fuzzing for $SECS s (log: ${LOG#$ROOT/})"
t0=$(date +%s)
# -max_len: room for several packets and a few near-limit ones; the limit itself is
# drawn from 4 to 65535 by the input, so "too large" paths are reached with small sizes.
"$OUT/packet_fuzz" -max_total_time="$SECS" -max_len=8192 -timeout=10 -rss_limit_mb=2048 \
    -use_value_profile=1 -print_final_stats=1 -artifact_prefix="$OUT/" \
    "$OUT/corpus" "$SEEDS" >"$LOG" 2>&1
rc=$?
grep -E '^#[0-9]+ +DONE|^Done [0-9]+ runs' "$LOG" | tail -n 2
grep -E '^stat::(number_of_executed_units|average_exec_per_sec|peak_rss_mb)' "$LOG"
if [ $rc != 0 ]; then
    grep -v '^#' "$LOG" | tail -n 60
    echo "fuzz: FAILED (exit $rc) after $(( $(date +%s) - t0 )) s; input saved as:" \
        "$(ls -t "$OUT"/crash-* "$OUT"/leak-* "$OUT"/timeout-* 2>/dev/null | head -n 1)"
    exit $rc
fi
echo "fuzz: packet_fuzz ran $(( $(date +%s) - t0 )) s, no failure; work corpus:" \
     "$(ls "$OUT/corpus" | wc -l) input(s)"
