#!/usr/bin/env bash
# Every test, the way CI runs them (.ci/run is this script).  Needs only Python, pip and
# a C compiler; everything else is installed as needed (packages from Debian's archive
# with apt-get when root: mingw-w64 and Wine, valgrind, clang, openssl, the free-threaded
# interpreter's build dependencies).
#
#   bash scripts/test.sh [pytest args...]
#
#  1. the C contract test of the port layer: io_uring and epoll natively, with ASan +
#     UBSan and under valgrind; IOCP cross-compiled with mingw-w64, run under Wine
#  2. libFuzzer on the packet framing and the WebSocket frame parser (bounded runs)
#  3. the sdist, and a wheel built from it, from a copy of the tree (nothing is written
#     into the tree); the wheel installed into a fresh venv with the test extras
#  4. what we ship: the sdist's contents, auditwheel, a smoke test of the wheel
#  5. the whole pytest suite against the *installed* package, once per backend
#  6. types: mypy --strict on the examples and a typed tour of the API; stubtest
#  7. the whole suite against an ASan + UBSan build of the extension (io_uring backend;
#     epoll's C is covered under ASan by step 1); the build, in the background at low
#     priority from step 4 on (sequential mode)
#  8. the whole suite on free-threaded CPython 3.13t, both backends (8a: the interpreter,
#     built once, ~4 minutes; reused in a second after); sequential mode: the interpreter
#     and then the 3.13t wheel build in the background at low priority from step 3 on
#
# Two modes, one list of steps.  By default the steps run one after another and the
# script stops at the first failure; the pytest args go to step 5.  IOCPNET_PARALLEL=1
# runs the three "lanes" side by side (the suites mostly wait on sockets, not on the
# CPU): "wheel" (steps 4, 5, 6), "sanitize" (7) and "freethreaded" (8a, 8; it starts right
# after step 2, from its own directory so that its venv and hypothesis database are apart
# from step 5's).  Each lane writes its own log, printed whole when it ends; a failing
# lane does not stop the others; each suite gets the pytest args.  In both modes each suite
# (5, 7, 8) is spread over IOCPNET_TEST_WORKERS pytest-xdist processes (default 2; 0:
# pytest's own process), whole modules to a worker.  The tests that switch io_uring off
# for the whole machine (marked machine_state) run inside each suite: they wait for every
# other test on the machine to end, and keep new ones waiting (tests/machine_lock.py),
# whichever worker, lane or CI run those belong to.  Either way the table at the end gives
# each step's wall time, the CPU time of its processes and when it started; below it, a
# failed run says what failed, for a reviewer who reads only the end: the commit, each
# failed step, the build it tested and, from each suite's JUnit report (pytest
# --junitxml, $work/junit-N.xml; scripts/ci_failures.py reads it), pytest's counts, the
# backends of the failures and a line per failed test, a failed test's teardown error on
# the line below it (in parallel mode, a lane's failed step that has no report: the end
# of the lane's log).  A green run's output is as it was.
#
# Nothing may hang CI: every step that runs tests or servers has a wall-clock bound, and
# in parallel mode so has each lane.  A step or lane over its bound gets SIGTERM (the
# whole process group: pytest, its xdist workers, its servers), SIGKILL 30 s later, and a
# line "test.sh: step 5 exceeded 2400 s: killed" (or "lane sanitize ...") says so; the
# step fails.  The bounds are above the longest times measured on a loaded 2-core
# machine (bound_s below).  A dead xdist worker fails its suite (--max-worker-restart=0):
# xdist's loadfile scheduler hangs for ever when it replaces a crashed worker
# (pytest-xdist 3.8; its issue 784).
#
# Nothing may outlive a stopped run either.  SIGTERM (CI's kill at its own limit), SIGINT
# (Ctrl-C) or SIGHUP is handled at once (the shell waits for every step with `wait`, which
# a trapped signal ends: see bound): a line "test.sh: SIGTERM during step 5. ..." says what
# ran; the process group of every step and background build (pytest, its workers, the
# tests' servers, those whose parent is gone too) gets the signal, TERM 2 s later, KILL
# after 5 s; the table marks the step "(stopped: SIGTERM)", the scratch directory goes
# (its logs kept, as on any failure) and the exit status is 128 + the signal's number.
#
# Environment: PYTHON (default python3), IOCPNET_TEST_DIR (work directory, default
# .ci/out), IOCPNET_PARALLEL (1: the lanes side by side; 0 or unset: one after another),
# IOCPNET_TEST_WORKERS, IOCPNET_QUICK=1 (steps 3 and 5 only), IOCPNET_SKIP=<list> (any
# of contract, fuzz, dist, types, sanitize, freethreaded, machine_state),
# IOCPNET_BOUND_PERCENT (every bound scaled, default 100: for a slower machine).
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
py=${PYTHON:-python3}
work=${IOCPNET_TEST_DIR:-$root/.ci/out}
venv="$work/venv-$(basename "$py")"
parallel=
case ${IOCPNET_PARALLEL:-0} in 0 | "") ;; *) parallel=1 ;; esac
skip=" ${IOCPNET_SKIP:-} "
[ -n "${IOCPNET_QUICK:-}" ] && skip=" contract fuzz dist types sanitize freethreaded "
mkdir -p "$work"
rm -f "$work"/junit-*.xml     # each suite's report (pytest --junitxml): what failed, at the end
# Private scratch space outside the tree, so that two runs on one machine do not share it.
scratch=$(mktemp -d "${TMPDIR:-/tmp}/iocpnet-ci.XXXXXX")
# The process group of each step's command ("PGID WHAT" lines; bound and background write
# them): a step's servers may outlive its command, and a stop or a failure ends them all.
step_groups="$scratch/step-groups"

# Step 5's pytest args, and the other suites' (7, 8); in parallel mode all get the
# script's args.
suite_args=()
if [ "${IOCPNET_TEST_WORKERS:-2}" != 0 ]; then
    suite_args=(-n "${IOCPNET_TEST_WORKERS:-2}" --dist loadfile --max-worker-restart=0)
fi
skipped() { case "$skip" in *" $1 "*) return 0 ;; esac; return 1; }
# pytest keeps only the last -m: a user's own would drop "not machine_state".
and_marker() {            # and_marker EXPR ARGS...: marked=(ARGS) with each -m E made
    local extra=$1 a value= found=    # -m "(E) and EXPR"; -m EXPR added if none was given
    shift
    marked=()
    for a in "$@"; do
        if [ -n "$value" ]; then
            marked+=("($a) and $extra")
            value=
            continue
        fi
        case $a in
            -m) value=1 found=1 ;;
            -m?*) a="-m(${a#-m}) and $extra" found=1 ;;
        esac
        marked+=("$a")
    done
    [ -n "$found" ] || marked+=(-m "$extra")
}
main_args=("${suite_args[@]}" "$@")
if skipped machine_state; then
    and_marker "not machine_state" "${suite_args[@]}"
    suite_args=("${marked[@]}")
    and_marker "not machine_state" "${main_args[@]}"
    main_args=("${marked[@]}")
fi
[ -z "$parallel" ] || suite_args=("${main_args[@]}")

# ---- steps and their times ----
# Every shell that runs steps (this one and each lane) appends one line per step to
# $timings: start (s from the beginning), wall s, CPU s (user + sys of the step's
# processes, from the shell's own and its children's counters), name.
t0=$(date +%s)
hz=$(getconf CLK_TCK)
timings="$work/timings"
: >"$timings"
step_name=
declare -A bg_pid=()      # sequential mode: background build (key) -> pid
declare -A bg_reaped=()   # its CPU ticks, once this shell has reaped it
cpu_ticks() {              # sets ticks (not $(...): that would read a subshell's own)
    local f key
    # A background build's CPU reaches this shell's counters when bash reaps it, inside
    # whichever step runs then: it has its own line in the table instead.
    for key in "${!bg_pid[@]}"; do
        [ -z "${bg_reaped[$key]:-}" ] && ! [ -e "/proc/${bg_pid[$key]}" ] &&
            bg_reaped[$key]=$(cat "$work/bg-$key.ticks" 2>/dev/null || echo 0)
    done
    read -ra f <"/proc/$BASHPID/stat"      # (comm is "(bash)": no space in it)
    ticks=$((f[13] + f[14] + f[15] + f[16]))
    for key in "${!bg_reaped[@]}"; do ticks=$((ticks - bg_reaped[$key])); done
}
step_end() {
    [ -n "$step_name" ] || return 0
    cpu_ticks
    printf '%d %d %d %s%s\n' $((step_t - t0)) $(($(date +%s) - step_t)) \
        $(((ticks - step_cpu) / hz)) "$step_name" "${1:-}" >>"$timings"
    step_name=
}
step() {
    step_end
    step_name=$*
    step_t=$(date +%s)
    cpu_ticks
    step_cpu=$ticks
    printf '\n== %s\n' "$*" >&2
}
summary() {
    step_end "${1:-}"
    printf '\n== time per step (wall; CPU of its processes; start, from the beginning)\n' >&2
    sort -n "$timings" | while read -r start wall cpu name; do
        printf '  %4d s  %5d s cpu  at %4d s  %s\n' "$wall" "$cpu" "$start" "$name"
    done >&2
    printf '  %4d s  in all\n' $(($(date +%s) - t0)) >&2
    summarised=1
}

# ---- wall-clock bounds (s), so that only a hang reaches them: 1.2-4 x the longest
# measured (sequential on a quiet machine / parallel at load 7-17 on 2 cores, s10-s11),
# and every lane ended before CI's own limit (90 min) ----
declare -A bound_s=(
    [apt]=1800     # an apt-get run (root, a package missing)
    [1]=900        # contract: 62 / 164 s
    [2]=300        # libFuzzer: 44 / 48 s
    [3]=900        # each command of step 3 (sdist, wheel, venv): the step 66 / 105 s
    [4]=600        # check_dist: 12 / 171 s
    [5]=2400       # pytest: 462 / 979 s
    [6]=600        # types: 5 / 38 s
    [7]=4800       # sanitized build + pytest: 447 / 2044 s (1300 of them the build)
    [8a]=2400      # the interpreter's build: ~240 s quiet
    [8]=4800       # wheel + pytest on 3.13t: 765 / 3915 s (load 13-17)
    [lane]=5000    # a whole lane: they start 3-8 min in; CI's own limit is 90 min
)
# scaled_bound, bound, watchdog, kill_tree (tests/test_ci_bounds.py runs them alone)
source "$root/scripts/ci_bound.sh"

# ---- lanes: in parallel mode, steps that run side by side, each with its own log ----
declare -A lanes=()       # pid -> lane name
declare -A dog_of=()     # lane name -> pid of the process that enforces its bound
lane() {                  # lane NAME FUNCTION: parallel mode: in the background; else now
    local name=$1
    shift
    step_end
    if [ -z "$parallel" ]; then
        "$@"
        step_end
        return
    fi
    local dog lane_pid
    (
        # A background job of a shell without job control may start with SIGINT and
        # SIGQUIT ignored (bash does so for this subshell, with its EXIT trap), and a
        # Python started so keeps ignoring them: the tests that send Ctrl-C to a child
        # need the default, as in a foreground step.
        trap - INT QUIT
        trap 'step_end " (FAILED)"' EXIT
        "$@"
        trap - EXIT
        step_end
    ) >"$work/lane-$name.log" 2>&1 &
    lane_pid=$!
    lanes[$lane_pid]=$name
    dog=$(scaled_bound lane)
    # The lane's bound: its log says why it ended, and wait_lanes prints the log.
    watchdog "$dog" "lane $name" "$lane_pid" "$work/lane-$name.log" &
    dog_of[$name]=$!
    echo "(lane $name started: $work/lane-$name.log, printed when it ends)" >&2
}
failed=()
wait_lanes() {            # print each lane's log as it ends; note the failures
    local pid rc name
    while [ ${#lanes[@]} -gt 0 ]; do
        rc=0
        wait -n -p pid "${!lanes[@]}" || rc=$?
        name=${lanes[$pid]}
        unset "lanes[$pid]"
        kill "${dog_of[$name]}" 2>/dev/null || true
        printf '\n######## lane %s: %s (%s)\n' "$name" \
            "$([ $rc = 0 ] && echo passed || echo "FAILED, exit status $rc")" \
            "$work/lane-$name.log" >&2
        cat "$work/lane-$name.log" >&2
        [ $rc = 0 ] || failed+=("$name")
    done
}
lane_end() {              # lane_end NAME: the end of a lane's log (all of it is above)
    printf '  the end of its log (all of it above, and in %s):\n' "$work/lane-$1.log"
    tail -n 15 "$work/lane-$1.log" | cut -c 1-240 | sed 's/^/    /'
}
# Sequential mode: a build that a later step needs runs in the background at the lowest
# priority while the steps before it run (their suites mostly wait on sockets); the step
# raises its priority and waits for it (wait_build).  Its own line in the table.
declare -A bg_what=()     # key -> what it builds (the key: the step that waits, bound_s's)
background() {            # background KEY WHAT COMMAND...: log in $work/bg-KEY.log
    local key=$1
    bg_what[$key]=$2
    shift 2
    rm -f "$work/bg-$key".{ticks,pgid}
    (
        trap - EXIT
        bg_pid=()
        bg_reaped=()
        renice -n 19 -p $BASHPID >/dev/null 2>&1 || true
        step_name="$key. (in the background) ${bg_what[$key]}"
        step_t=$(date +%s)
        cpu_ticks
        step_cpu=$ticks
        rc=0
        # timeout leads a process group of its own: wait_build renices all of it.
        timeout --signal=TERM --kill-after=30 "$(scaled_bound "$key")" "$@" &
        echo $! >"$work/bg-$key.pgid"
        echo "$! ${bg_what[$key]}" >>"$step_groups"
        wait $! || rc=$?
        step_end "$([ $rc = 0 ] || echo " (FAILED)")"
        cpu_ticks                  # what this adds to the counters of the shell that reaps it
        echo "$ticks" >"$work/bg-$key.ticks"
        exit $rc
    ) >"$work/bg-$key.log" 2>&1 &
    bg_pid[$key]=$!
}
no_build=()
wait_build() {            # wait_build KEY: its background build, if any, at priority 0, waited
    no_build=()           # for; then no_build=(--no-build); on its failure, its log's end
    [ -n "${bg_pid[$1]:-}" ] || return 0
    local pgid rc=0 start=$SECONDS
    pgid=$(cat "$work/bg-$1.pgid" 2>/dev/null) && renice -n 0 -g "$pgid" >/dev/null 2>&1 || true
    wait "${bg_pid[$1]}" || rc=$?
    if [ $rc != 0 ]; then
        tail -n 40 "$work/bg-$1.log" >&2
        echo "test.sh: ${bg_what[$1]} failed (log: $work/bg-$1.log)" >&2
        return 1
    fi
    no_build=(--no-build)
    # The step's line in the table says how long the build held it up (whether its nice
    # level costs the run anything), when it did.
    [ $((SECONDS - start)) = 0 ] || step_name+=" (waited $((SECONDS - start)) s for ${bg_what[$1]})"
}
summarised=
stopped_by=
running() {               # what runs now: the step, each lane's step, the background builds
    local name key state what=
    [ -z "$step_name" ] || what="step $step_name"
    for name in "${lanes[@]}"; do
        what="${what:+$what; }lane $name (at $(grep '^== [0-9]' "$work/lane-$name.log" |
            tail -n 1 | sed 's/^== /step /'); log: $work/lane-$name.log)"
    done
    for key in "${!bg_pid[@]}"; do
        state=$(ps -o stat= -p "${bg_pid[$key]}" || true)
        [ -z "$state" ] || [[ $state == Z* ]] ||
            what="${what:+$what; }step $key's background build (${bg_what[$key]})"
    done
    echo "${what:-no step (between two)}"
}
stop() {                  # stop SIGNAL: CI's kill at its time limit (TERM), a Ctrl-C (INT), a
    stopped_by=$1         # hangup.  At once: this shell waits for its steps with `wait`,
    trap '' TERM INT HUP  # which a trapped signal ends; cleanup (EXIT) ends what runs
    printf '\ntest.sh: SIG%s during %s: ending it\n' "$1" "$(running)" >&2
    exit $((128 + $(kill -l "$1")))
}
declare -A built=(        # the build each suite tests (step 5's: once step 3 made it)
    [7]="the ASan + UBSan build of the extension in $work/sanitize (io_uring only)"
    [8]="the 3.13t wheel of scripts/test_freethreaded.sh in $work/ft"
)
commit() {
    local head
    head=$(git -C "$root" rev-parse --short HEAD 2>/dev/null) || { echo "no git commit"; return; }
    if [ -n "$(git -C "$root" status --porcelain --untracked-files=no 2>/dev/null)" ]; then
        head+=" + uncommitted changes"
    fi
    echo "$head"
}
report() {                # the end of a failed run, what CI shows last: each failed step, the
    local start wall cpu name key reports found=   # build it tested, a line each what failed
    printf '\n== FAILED at %s\n' "$(commit)"
    while read -r start wall cpu name; do
        [[ $name == *" (FAILED)" ]] || continue
        found=1
        name=${name% (FAILED)}
        key=${name%%.*}
        echo "step $name"
        if [[ $name == *"(in the background)"* ]]; then
            echo "  its log: $work/bg-$key.log"
            continue
        fi
        [ -z "${built[$key]:-}" ] || echo "  build: ${built[$key]}"
        reports=$(find "$work/sanitize/logs" -type f -size +0 2>/dev/null | wc -l || true)
        if [ "$key" = 7 ] && [ "$reports" -gt 0 ]; then
            echo "  sanitizer reports: $reports (the start of each above; $work/sanitize/logs)"
        fi
        if [ -s "$work/junit-$key.xml" ]; then
            "$py" "$root/scripts/ci_failures.py" "$work/junit-$key.xml" ||
                echo "  (its report $work/junit-$key.xml could not be read)"
        elif [ -n "$parallel" ]; then
            case $key in
                4 | 5 | 6) lane_end wheel ;;
                7) lane_end sanitize ;;
                *) lane_end freethreaded ;;
            esac
        else
            echo "  (its output is above the table)"
        fi
    done < <(sort -n "$timings")
    [ -n "$found" ] || echo "(before any step: see the output above the table)"
}
cleanup() {               # on any exit, a failure too: all ends, the table shows, scratch goes
    local rc=$? how=
    set +e                # all of it, whatever fails
    trap '' TERM INT HUP  # (a second signal must not cut this short)
    # What this shell started and has not reaped (lanes and their watchdogs, background
    # builds) and every step's process group, with what outlived its command in it.
    end_all "${stopped_by:-TERM}" "$step_groups"
    # A failed step may have named its log in scratch (check_dist.sh's): kept.
    if [ $rc != 0 ] && [ -n "$(find "$scratch" -name '*.log' -print -quit)" ]; then
        rm -rf "$work/scratch-logs"
        mkdir -p "$work/scratch-logs"
        (cd "$scratch" && find . -name '*.log' -exec cp --parents -t "$work/scratch-logs" {} +)
        printf '\ntest.sh: %s is removed; its logs (named above) are kept in %s\n' \
            "$scratch" "$work/scratch-logs" >&2
    fi
    rm -rf "$scratch"
    if [ -n "$stopped_by" ]; then
        how=" (stopped: SIG$stopped_by)"
    elif [ $rc != 0 ]; then
        how=" (FAILED)"
    fi
    [ -n "$summarised" ] || summary "$how"
    [ $rc = 0 ] || [ -n "$stopped_by" ] || report >&2
}
trap cleanup EXIT
for sig in TERM INT HUP; do
    # shellcheck disable=SC2064
    trap "stop $sig" "$sig"
done

# Debian packages first, then steps 1 and 2 (which may install more): apt must not run
# at the same time as the free-threaded interpreter's build (which then starts).
# redis-server: tests/test_spawn.py awaits a real one (Spawn with redis.asyncio), and
# tests/test_backplane.py and test_chat_redis.py share groups through one (with TLS too:
# Debian's package serves it).
if ! command -v redis-server >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        printf '\n== installing redis-server (for the Spawn and backplane tests)\n' >&2
        bound apt "apt-get" apt-get update -qq >&2
        DEBIAN_FRONTEND=noninteractive bound apt "apt-get" apt-get install -y -qq \
            --no-install-recommends redis-server >&2
    else
        echo "redis-server is missing and cannot be installed here (not root with apt)" >&2
    fi
fi
if ! skipped contract; then
    step "1. C contract test of the port layer (every backend)"
    bound 1 "step 1" bash "$root/tests/c/run_contract.sh"
fi
if ! skipped fuzz; then
    step "2. libFuzzer on the packet framing and the WebSocket frame parser"
    IOCPNET_FUZZ_OUT="$work/fuzz" bound 2 "step 2" bash "$root/tests/fuzz/run.sh" \
        "${IOCPNET_FUZZ_SECONDS:-20}"
fi
step_end

# The openssl command: the TLS tests make their certificates with it and talk to the
# server with its s_client.  Installed here, before the interpreter build's own apt use.
if ! command -v openssl >/dev/null && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    { DEBIAN_FRONTEND=noninteractive bound apt "apt-get" apt-get update -q &&
      DEBIAN_FRONTEND=noninteractive bound apt "apt-get" apt-get install -y -q openssl; } \
        >"$work/apt-openssl.log" 2>&1 ||
        echo "test.sh: installing openssl failed (see $work/apt-openssl.log)" >&2
fi

# Tools the main suite uses, installed before the interpreter build's own apt-get:
# headless Chromium for the chat example's browser page (tests/test_chat_web.py).
if ! command -v chromium >/dev/null && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "installing chromium (log: $work/apt-chromium.log)" >&2
    { DEBIAN_FRONTEND=noninteractive bound apt "apt-get" apt-get update -q &&
      DEBIAN_FRONTEND=noninteractive bound apt "apt-get" apt-get install -y -q chromium; } \
        >"$work/apt-chromium.log" 2>&1 || echo "apt-get chromium failed (see $work/apt-chromium.log)" >&2
fi

# Lane "freethreaded": the interpreter (built once; the script lowers its own priority
# when it compiles), then step 8, from its own directory.
ft_lane() {
    if [ -z "${bg_pid[8]:-}" ]; then
        step "8a. the free-threaded interpreter (scripts/build_freethreaded_python.sh)"
        bound 8a "step 8a" bash "$root/scripts/build_freethreaded_python.sh" >&2
    fi
    step "8. the suite on free-threaded CPython 3.13t (both backends)"
    wait_build 8 || return 1
    IOCPNET_TEST_DIR="$work/ft" bound 8 "step 8" bash "$root/scripts/test_freethreaded.sh" \
        "${no_build[@]}" --junitxml="$work/junit-8.xml" "${suite_args[@]}"
}
if ! skipped freethreaded; then
    if [ -n "$parallel" ]; then
        lane freethreaded ft_lane
    else
        # The interpreter (built once, reused in a second), then the 3.13t wheel: ~200 s
        # of one core that step 8 no longer waits for.  Beside step 3's own build (one
        # core), then under steps 4-7.
        background 8 "the free-threaded interpreter and the 3.13t wheel" \
            env IOCPNET_TEST_DIR="$work/ft" bash "$root/scripts/test_freethreaded.sh" --build-only
    fi
fi

step "3. the sdist and a wheel built from it; a fresh venv with the wheel ($venv)"
rm -rf "$venv" "$work/dist" "$work/src"
# (Each command bounded, so waited for: see bound.)
bound 3 "step 3" "$py" -m venv "$venv"
vpy="$venv/bin/python"
bound 3 "step 3" "$vpy" -m pip install -q --disable-pip-version-check --upgrade pip build
# Build from a copy of the tree (a shared work tree never gets build outputs), and
# through the sdist: the wheel under test is built from what we ship.
mkdir -p "$work/src"
(cd "$root" && git ls-files -z --cached --others --exclude-standard |
    while IFS= read -r -d '' f; do [ -e "$f" ] && printf '%s\0' "$f"; done |
    xargs -0 cp --parents -t "$work/src")
bound 3 "step 3" "$vpy" -m build -q --outdir "$work/dist" "$work/src" >&2
wheel=$(ls "$work"/dist/iocpnet-*.whl)
built[5]="the wheel $(basename "$wheel"), installed in $venv"
bound 3 "step 3" "$vpy" -m pip install -q --disable-pip-version-check "${wheel}[test]"
if ! skipped sanitize; then
    # Step 7's build requirements exactly as pyproject.toml states them (a venv's bundled
    # setuptools may predate the SPDX `license` string and refuse the file); here, before
    # the lanes share the venv.
    build_reqs=$("$vpy" - "$root/pyproject.toml" <<'PYEOF'
import re, sys
text = open(sys.argv[1]).read()
block = re.search(r"^\[build-system\].*?^requires\s*=\s*\[(.*?)\]", text, re.M | re.S)
print("\n".join(re.findall(r'"([^"]+)"', block.group(1))))
PYEOF
)
    mapfile -t build_reqs <<<"$build_reqs"
    bound 3 "step 3" "$vpy" -m pip install -q --disable-pip-version-check --upgrade \
        "${build_reqs[@]}"
fi
step_end

# Sequential mode: step 7's build (ASan + UBSan) in the background from here on, at the
# lowest priority, while steps 4-6 run (their suites mostly wait on sockets: step 5 used
# 157 s of CPU in 357 s); step 7 raises its priority and waits for it.  The build took
# ~330 s of step 7's 554 at load 8-10 (ci8, s12).
if [ -z "$parallel" ] && ! skipped sanitize; then
    background 7 "the ASan + UBSan build" \
        env IOCPNET_SANITIZE=1 PYTHON="$vpy" bash "$root/scripts/devbuild.sh" "$work/sanitize"
fi

# Lane "wheel": steps 4, 5 and 6 on the wheel of step 3.
wheel_lane() {
    if ! skipped dist; then
        step "4. what we ship: sdist contents, auditwheel, the wheel's smoke test"
        # (Its work directory must be outside the tree it copies.)
        CHECK_DIST_DIR="$scratch/check-dist" PYTHON="$py" \
            bound 4 "step 4" bash "$root/scripts/check_dist.sh" --dist "$work/dist"
    fi
    step "5. pytest against the installed package"
    # From the work directory: nothing from the source tree can be imported.  (env -C,
    # not a subshell: this shell must wait for the step itself, see bound.)
    CI="${CI:-}" bound 5 "step 5" env -C "$work" "$vpy" -m pytest "$root/tests" \
        -p no:cacheprovider --rootdir "$root" -q --junitxml="$work/junit-5.xml" "${main_args[@]}"
    if ! skipped types; then
        step "6. types: mypy --strict, stubtest"
        CHECK_TYPES_DIR="$scratch/check-types" bound 6 "step 6" \
            bash "$root/scripts/check_types.sh" --venv "$vpy"
    fi
}
lane wheel wheel_lane

# Lane "sanitize": step 7, with its own build of the extension.
sanitize_lane() {
    step "7. the suite against an ASan + UBSan build (io_uring)"
    wait_build 7 || return 1
    IOCPNET_TEST_BACKENDS=io_uring IOCPNET_RACES_SECONDS=${IOCPNET_RACES_SECONDS:-8} \
        PYTHON="$vpy" IOCPNET_SANITIZE_DIR="$work/sanitize" \
        bound 7 "step 7" bash "$root/scripts/sanitize.sh" "${no_build[@]}" \
        --junitxml="$work/junit-7.xml" "${suite_args[@]}"
}
if ! skipped sanitize; then
    lane sanitize sanitize_lane
fi

if [ -z "$parallel" ] && ! skipped freethreaded; then
    lane freethreaded ft_lane
fi
wait_lanes

summary
[ ${#failed[@]} -eq 0 ] || exit 1     # (cleanup reports what failed)
printf '\nall tests passed\n' >&2
