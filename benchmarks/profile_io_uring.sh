#!/usr/bin/env bash
# profile_io_uring.sh -- where a server's CPU goes per round trip, as counts that do not
# depend on how busy the machine is: system calls (sendto, recvfrom and epoll_wait named),
# io_uring submissions, completions and poll armings, reschedule IPIs, context switches,
# and task-clock, each divided by the round trips the load generator counted.  Optionally
# a perf profile too.
#
#   benchmarks/profile_io_uring.sh [-s SIZE] [-c CONNS] [-t SECS] [-d DEPTH] [-R RATE
#                                  [-b USEC]] [-r] SERVER...
#
# SERVER: iocpnet-uring, iocpnet-epoll, uvloop, c-uring, c-epoll.  The server runs on CPU 0,
# benchmarks/build/loadgen (busy-polling) on CPU 1: ping-pong, or with -d pipelined that
# deep, at RATE round trips a second with -R (in bursts every USEC with -b, as run.py's
# pl16 cells: -d 16 -c 100 -R 1000000 -b 1000); perf stat counts the
# server's threads for the loadgen's whole run.  -r also records `perf record -g` into
# benchmarks/build/profile-SERVER.data and prints its top symbols.  Needs perf, and
# benchmarks/build/ built by run.py.  The iocpnet servers import iocpnet as `python3`
# finds it (set PYTHONPATH for a development build).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
build=$root/benchmarks/build
size=64 conns=10 secs=3 record=0 depth=1 rate= burst=
while getopts "s:c:t:d:R:b:rh" o; do
    case $o in
        s) size=$OPTARG ;;
        c) conns=$OPTARG ;;
        t) secs=$OPTARG ;;
        d) depth=$OPTARG ;;
        R) rate=$OPTARG ;;
        b) burst=$OPTARG ;;
        r) record=1 ;;
        *) sed -n '2,18p' "$0"; exit 2 ;;
    esac
done
shift $((OPTIND - 1))
[ $# -gt 0 ] || { sed -n '2,18p' "$0"; exit 2; }
[ -z "$burst" ] || [ -n "$rate" ] || { echo "-b needs -R" >&2; exit 2; }
mode=(-m pingpong)
[ "$depth" -le 1 ] || mode=(-m pipeline -d "$depth")
[ -z "$rate" ] || mode+=(-r "$rate")
[ -z "$burst" ] || mode+=(-b "$burst")
[ -x "$build/loadgen" ] || { echo "build the load generator first (python3 benchmarks/run.py --quick)" >&2; exit 2; }
command -v perf >/dev/null || { echo "perf is not installed" >&2; exit 2; }

events=task-clock,context-switches,raw_syscalls:sys_enter,syscalls:sys_enter_io_uring_enter
events+=,io_uring:io_uring_submit_req,io_uring:io_uring_complete,io_uring:io_uring_poll_arm
events+=,irq_vectors:reschedule_entry,syscalls:sys_enter_sendto,syscalls:sys_enter_recvfrom
events+=,syscalls:sys_enter_epoll_wait
port=$((24000 + RANDOM % 1000))

for srv in "$@"; do
    case $srv in
        iocpnet-uring) cmd=(python3 "$root/benchmarks/servers/iocpnet_echo.py" "$port" --backend io_uring) ;;
        iocpnet-epoll) cmd=(python3 "$root/benchmarks/servers/iocpnet_echo.py" "$port" --backend epoll) ;;
        uvloop) cmd=(python3 "$root/benchmarks/servers/uvloop_protocol.py" "$port") ;;
        c-uring) cmd=("$build/c_uring_echo" "$port") ;;
        c-epoll) cmd=("$build/c_epoll_echo" "$port") ;;
        *) echo "unknown server $srv" >&2; exit 2 ;;
    esac
    taskset -c 0 "${cmd[@]}" >"$build/profile-$srv.log" 2>&1 &
    spid=$!
    for _ in $(seq 100); do
        (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break
        sleep 0.05
    done
    lg=(taskset -c 1 "$build/loadgen" -p "$port" "${mode[@]}" -c "$conns" -s "$size" -w 0 -t "$secs" -P "$spid")
    if [ $record = 1 ]; then
        perf record -q -F 10000 -g -o "$build/profile-$srv.data" -p "$spid" -- "${lg[@]}" \
            >"$build/profile-$srv.json" 2>/dev/null
        perf stat -x, -e "$events" -p "$spid" -- "${lg[@]}" >"$build/profile-$srv.json" \
            2>"$build/profile-$srv.stat" || true
    else
        perf stat -x, -e "$events" -p "$spid" -- "${lg[@]}" >"$build/profile-$srv.json" \
            2>"$build/profile-$srv.stat"
    fi
    kill -INT "$spid" 2>/dev/null || true
    sleep 0.5
    kill -KILL "$spid" 2>/dev/null || true
    wait "$spid" 2>/dev/null || true
    python3 - "$srv" "$build/profile-$srv.json" "$build/profile-$srv.stat" <<'EOF'
import json, sys
srv, jpath, spath = sys.argv[1:4]
j = json.load(open(jpath))
rt = j["roundtrips"]
ev = {}
for line in open(spath):
    f = line.strip().split(",")
    if len(f) > 2 and f[0].replace(".", "").isdigit():
        ev[f[2].split(":")[-1]] = float(f[0])
print(f"{srv}: {rt} round trips, {j['rt_per_s']:.0f}/s, load generator busy "
      f"{100 * j.get('loadgen_busy', 1):.0f} %; per round trip:")
print(f"  server CPU {1e6 * j['server_cpu_s'] / rt:.2f} us (task-clock "
      f"{1000 * ev.get('task-clock', 0) / rt:.2f} us)")
for k, name in (("sys_enter", "system calls"), ("sys_enter_io_uring_enter", "io_uring_enter"),
                ("io_uring_submit_req", "SQEs"), ("io_uring_complete", "CQEs"),
                ("io_uring_poll_arm", "poll armings"), ("sys_enter_sendto", "sendto"),
                ("sys_enter_recvfrom", "recvfrom"), ("sys_enter_epoll_wait", "epoll_wait"),
                ("reschedule_entry", "reschedule IPIs"),
                ("context-switches", "context switches")):
    print(f"  {name:18} {ev.get(k, 0) / rt:.3f}")
EOF
    if [ $record = 1 ]; then
        perf report -i "$build/profile-$srv.data" --no-children --sort dso,sym --stdio -g none \
            2>/dev/null | grep -E '^ +[0-9]' | head -25
    fi
done
