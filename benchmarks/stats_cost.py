"""What the figures and the flood protection cost per message in the echo path.

A benchmark, not a test: run it only on a quiet machine (1-min load under ~0.7).

The same one-worker echo server runs in up to four variants, each in its own process
pinned to CPU 0, with the load generator (loadgen.c) pinned to CPU 1; each variant is
measured in short slices, in rotating order, for several rounds:

  base    iocpnet from --baseline (a build of a commit before the figures existed)
  stats   this tree: the counters that are always on (per session, per batch)
  hooks   this tree, the session class with measure_hooks = True
  limits  this tree, recv_messages_per_second and recv_bytes_per_second set (never hit)

For each it prints round trips per second, the server's CPU time per round trip (the
load generator reads it from /proc), and the difference to `base` in nanoseconds per
round trip (one round trip = one OnRecv and one Send), medians over the rounds.

    python benchmarks/stats_cost.py --baseline /tmp/iocp-main/tree/src
    python benchmarks/stats_cost.py --baseline ... --mode pipeline -c 100 -d 16

On a machine that is never quiet, `--instructions 2000,12000` counts instead the
instructions the server's worker thread executes (valgrind's callgrind, epoll backend),
for each variant, once with 2000 and once with 12000 ping-pong round trips of 64 bytes;
the difference divided by 10000 is the instructions per round trip, which other load on
the machine does not change.  (It does not see what a locked instruction or a cache miss
costs in time; the timed mode does.)

(`scripts/devbuild.sh DIR` builds a tree's extension and prints the path to give.)
"""
import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys

from _common import free_port, wait_echo

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
LOADGEN = os.path.join(HERE, "build", "loadgen")


def serve(variant, port):
    import iocpnet

    class Echo(iocpnet.Session):
        def OnRecv(self, data):
            self.Send(data)

    if variant == "hooks":
        Echo.measure_hooks = True
    elif variant == "limits":
        Echo.recv_messages_per_second = 1e9
        Echo.recv_bytes_per_second = 1e12
    core = iocpnet.IocpCore(backend=os.environ.get("IOCPNET_BACKEND") or None)
    service = iocpnet.Service(core, iocpnet.Listener(("127.0.0.1", port)), Echo, 100)
    print("READY", flush=True)
    service.Run(workers=1)


def count_instructions(variant, env, rounds):
    """Callgrind's instruction count of the server's threads other than the main one
    (the worker: Dispatch and the hooks) for `rounds` ping-pong round trips."""
    import glob
    import re
    import tempfile
    out = tempfile.mkdtemp(prefix="stats-cost-cg-")
    port = free_port()
    env = dict(env, IOCPNET_BACKEND=os.environ.get("IOCPNET_BACKEND", "epoll"))
    proc = subprocess.Popen(
        ["valgrind", "--tool=callgrind", "--separate-threads=yes",
         f"--callgrind-out-file={out}/cg.out", sys.executable, os.path.abspath(__file__),
         "--serve", variant, "--port", str(port)],
        env=env, stdout=subprocess.DEVNULL, stderr=open(f"{out}/valgrind.log", "w"),
        start_new_session=True)
    try:
        wait_echo(port, timeout=300)
        with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            msg = b"x" * 64
            for _ in range(rounds):
                s.sendall(msg)
                got = b""
                while len(got) < 64:
                    chunk = s.recv(64 - len(got))
                    if not chunk:
                        raise RuntimeError(f"the server closed the connection (see "
                                           f"{out}/valgrind.log)")
                    got += chunk
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(300)
    total = 0
    for path in glob.glob(f"{out}/cg.out*"):
        if re.search(r"-0*1$", path):
            continue                      # thread 1: the main thread, waiting in Run
        with open(path) as f:
            for line in f:
                if line.startswith("summary:") or line.startswith("totals:"):
                    total += int(line.split()[1])
                    break
    return total


def instructions(args, variants):
    n1, n2 = (int(x) for x in args.instructions.split(","))
    print(f"instructions per ping-pong round trip (64 B, epoll, one worker): "
          f"(I({n2}) - I({n1})) / {n2 - n1}, worker thread(s), callgrind\n")
    print(f"{'variant':8} {'instr/rt':>9} {'vs base':>9}")
    per = {}
    for v in variants:
        env = dict(os.environ)
        if v == "base":
            env["PYTHONPATH"] = args.baseline
        a = count_instructions(v, env, n1)
        b = count_instructions(v, env, n2)
        per[v] = (b - a) / (n2 - n1)
        delta = f"{per[v] - per['base']:+9.0f}" if "base" in per else ""
        print(f"{v:8} {per[v]:9.0f} {delta}", flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--serve", help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    p.add_argument("--baseline", help="PYTHONPATH of the iocpnet to compare with")
    p.add_argument("--variants", default="base,stats,hooks,limits")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--slice", type=float, default=1.0)
    p.add_argument("--warmup", type=float, default=0.3)
    p.add_argument("--mode", default="pingpong", choices=("pingpong", "pipeline"))
    p.add_argument("-c", "--conns", type=int, default=1)
    p.add_argument("-d", "--depth", type=int, default=16)
    p.add_argument("-s", "--size", type=int, default=64)
    p.add_argument("--instructions", metavar="N1,N2",
                   help="count instructions under callgrind instead of timing")
    args = p.parse_args()
    if args.serve:
        serve(args.serve, args.port)
        return
    variants = args.variants.split(",")
    if "base" in variants and not args.baseline:
        sys.exit("--baseline PATH is needed for the base variant (or leave it out)")
    if args.instructions:
        instructions(args, variants)
        return
    src = os.path.join(HERE, "loadgen.c")
    if not os.path.exists(LOADGEN) or os.path.getmtime(LOADGEN) < os.path.getmtime(src):
        os.makedirs(os.path.dirname(LOADGEN), exist_ok=True)
        subprocess.run(["gcc", "-O2", "-Wall", "-o", LOADGEN, src], check=True)
    with open("/proc/loadavg") as f:
        print(f"load before: {f.read().split()[0]}  (quiet: under ~0.7)")
    procs = {}
    try:
        for v in variants:
            env = dict(os.environ)
            if v == "base":
                env["PYTHONPATH"] = args.baseline
            port = free_port()
            procs[v] = (subprocess.Popen(
                ["taskset", "-c", "0", sys.executable, os.path.abspath(__file__),
                 "--serve", v, "--port", str(port)], env=env, stdout=subprocess.DEVNULL,
                start_new_session=True), port)
        for v, (proc, port) in procs.items():
            wait_echo(port)
        results = {v: [] for v in variants}
        for r in range(args.rounds):
            order = variants[r % len(variants):] + variants[:r % len(variants)]
            for v in order:
                proc, port = procs[v]
                argv = ["taskset", "-c", "1", LOADGEN, "-p", str(port), "-m", args.mode,
                        "-c", str(args.conns), "-s", str(args.size), "-w", str(args.warmup),
                        "-t", str(args.slice), "-P", str(proc.pid)]
                if args.mode == "pipeline":
                    argv += ["-d", str(args.depth)]
                out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
                res = json.loads(out)
                rts = res["roundtrips"]
                results[v].append((res["rt_per_s"], res["server_cpu_s"] * 1e9 / max(rts, 1)))
        with open("/proc/loadavg") as f:
            print(f"load after: {f.read().split()[0]}")
        print(f"\n{args.mode} -c {args.conns} -s {args.size}"
              + (f" -d {args.depth}" if args.mode == "pipeline" else "")
              + f", {args.rounds} rounds of {args.slice} s, server on CPU 0, loadgen on CPU 1\n")
        # without a baseline build, the differences are to the first variant named
        ref = "base" if "base" in results else variants[0]
        print(f"{'variant':8} {'round trips/s':>14} {'server ns/rt':>13} {'vs ' + ref:>12}")
        base = statistics.median(c for _, c in results[ref])
        for v in variants:
            rate = statistics.median(x for x, _ in results[v])
            cost = statistics.median(c for _, c in results[v])
            delta = f"{cost - base:+12.0f}"
            print(f"{v:8} {rate:14.0f} {cost:13.0f} {delta}")
    finally:
        for proc, _ in procs.values():
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for proc, _ in procs.values():
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)


if __name__ == "__main__":
    main()
