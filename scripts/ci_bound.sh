# The wall-clock bounds of scripts/test.sh (sourced by it; tests/test_ci_bounds.py runs
# them alone).  Needs the caller's associative array bound_s: KEY -> seconds.
# shellcheck shell=bash

scaled_bound() { echo $((bound_s[$1] * ${IOCPNET_BOUND_PERCENT:-100} / 100 + 1)); }
bound() {                 # bound KEY WHAT COMMAND...: COMMAND with bound_s[KEY]
    local secs what=$2 rc=0 pid start=$SECONDS own_int=
    secs=$(scaled_bound "$1")
    shift 2
    # timeout makes a process group of its own and signals all of it.  Run in the
    # background and waited for, so that a signal this shell traps is handled at once:
    # bash runs a trap only once the foreground command has ended, but it ends a wait.
    timeout --signal=TERM --kill-after=30 "$secs" "$@" &
    pid=$!
    # The group, for test.sh's stop (end_all): a step's servers may outlive its command.
    [ -z "${step_groups:-}" ] || echo "$pid $what" >>"$step_groups"
    # A Ctrl-C reaches only this shell's group: passed on, unless a trap of the shell's
    # own does it (test.sh's stop).  (A subshell that reset its traps shows none.)
    if [ -z "$(trap -p INT)" ]; then
        own_int=1
        trap 'kill -INT $pid 2>/dev/null' INT
    fi
    while :; do
        rc=0
        wait $pid || rc=$?
        kill -0 $pid 2>/dev/null || break       # (else: wait interrupted by the trap)
    done
    [ -z "$own_int" ] || trap - INT
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
# What end_all ends: "PID PGID" for each live process below ROOT or in a process group
# that GROUPS_FILE lists ("PGID WHAT" lines); PGID is that group's, else -.
ours() {                  # ours ROOT GROUPS_FILE
    local self=$BASHPID sid groups    # (self: the command substitution this runs in)
    sid=$(($(ps -o sid= -p $$)))
    groups=$(cut -d ' ' -f 1 "$2" 2>/dev/null || true)
    # A listed group counts only in this shell's session: not one emptied since, whose
    # number a stranger's group took.
    ps -e -o pid=,ppid=,pgid=,sid=,stat= | awk -v root="$1" -v sid="$sid" -v self="$self" \
        -v groups="$groups" '
        BEGIN { n = split(groups, g); for (i = 1; i <= n; i++) listed[g[i]] = 1 }
        $5 ~ /^Z/ || $1 == self { next }
        { kids[$2] = kids[$2] " " $1; group[$1] = ($3 in listed) && $4 == sid ? $3 : "-" }
        group[$1] != "-" { out[$1] = 1 }
        END {
            n = split(kids[root], q)
            for (i = 1; i <= n; i++) {
                out[q[i]] = 1
                m = split(kids[q[i]], more)
                for (j = 1; j <= m; j++) q[++n] = more[j]
            }
            for (pid in out) print pid, group[pid]
        }'
}
# All that this shell started, and all of each group GROUPS_FILE lists: the groups (a
# step's: pytest, its workers, its servers) get SIGNAL, the rest (this shell's subshells,
# watchdogs) TERM; then all TERM (a Ctrl-C's INT spares what ignores it, as a background
# job of sh does) after up to 2 s, all KILL after up to 5.
end_all() {               # end_all SIGNAL GROUPS_FILE
    local sig=$1 file=$2 me=$BASHPID left pid group phase until start=$SECONDS
    local -A signalled
    local phases=("$sig")
    [ "$sig" = TERM ] || phases+=(TERM)
    left=$(ours "$me" "$file")
    for phase in "${phases[@]}" KILL; do
        [ -n "$left" ] || return 0
        signalled=()
        while read -r pid group; do
            if [ "$group" = - ]; then
                kill -"$([ "$phase" = KILL ] && echo KILL || echo TERM)" "$pid" 2>/dev/null || true
            elif [ -z "${signalled[$group]:-}" ]; then
                signalled[$group]=1
                kill -"$phase" -- -"$group" 2>/dev/null || true
            fi
        done <<<"$left"
        [ "$phase" != KILL ] || return 0
        until=$((start + 2))
        [ "$phase" != TERM ] || until=$((start + 5))
        while [ -n "$left" ] && [ $SECONDS -lt $until ]; do
            sleep 0.1
            left=$(ours "$me" "$file")
        done
    done
}
