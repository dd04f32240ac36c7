# The wall-clock bounds of scripts/test.sh (sourced by it; tests/test_ci_bounds.py runs
# them alone).  Needs the caller's associative array bound_s: KEY -> seconds.
# shellcheck shell=bash

scaled_bound() { echo $((bound_s[$1] * ${IOCPNET_BOUND_PERCENT:-100} / 100 + 1)); }
bound() {                 # bound KEY WHAT COMMAND...: COMMAND with bound_s[KEY]
    local secs what=$2 rc=0 pid start=$SECONDS
    secs=$(scaled_bound "$1")
    shift 2
    # timeout makes a process group of its own and signals all of it.  Run in the
    # background and waited for, so that a Ctrl-C (which reaches only this shell's
    # group) is passed on by the trap: wait returns at once for a trapped signal, a
    # foreground command would be waited for first.
    timeout --signal=TERM --kill-after=30 "$secs" "$@" &
    pid=$!
    trap 'kill -INT $pid 2>/dev/null' INT
    while :; do
        rc=0
        wait $pid || rc=$?
        kill -0 $pid 2>/dev/null || break       # (else: wait interrupted by the trap)
    done
    trap - INT
    if [ $rc != 0 ] && [ $((SECONDS - start)) -ge "$secs" ]; then
        printf '\ntest.sh: %s exceeded %d s: killed\n' "$what" "$secs" >&2
    fi
    return $rc
}
watchdog() {              # watchdog SECONDS WHAT PID LOG &: PID and all it started
    local what=$2 pid=$3 log=$4 sleeper # killed after SECONDS; a TERM ends the watch
    trap 'kill $sleeper 2>/dev/null; exit 0' TERM
    # Each sleep in the background and waited for: a trapped signal ends a wait at once,
    # a foreground sleep only when it has run out.
    sleep "$1" &
    sleeper=$!
    wait $sleeper
    printf '\ntest.sh: %s exceeded %d s: killed\n' "$what" "$1" | tee -a "$log" >&2
    kill_tree "$pid" TERM
    sleep 30 &
    sleeper=$!
    wait $sleeper
    kill_tree "$pid" KILL
}
kill_tree() {             # kill_tree PID [SIGNAL]: it and all it started (pytest, servers...)
    local child
    for child in $(ps -o pid= --ppid "$1" 2>/dev/null); do kill_tree "$child" "${2:-TERM}"; done
    kill -"${2:-TERM}" "$1" 2>/dev/null || true
}
