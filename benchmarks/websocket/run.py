"""WebSocket echo benchmark: iocpnet against picows and websockets (both on uvloop).

    python benchmarks/websocket/run.py [--seconds 5] [--rounds 3] [--out FILE]

Cells: 64 B and 16 KiB messages, 1 and 100 connections, ping-pong (one message in
flight per connection).  The server runs on core 0 (taskset), the C load generator
(ws_loadgen.c, built here with cc) on core 1; servers are interleaved round by round so
that drift in the machine's load hits them alike.  For each run: round trips per second,
the server's CPU time over the measured window (/proc/PID/stat, all threads), round
trips per server CPU-second, and how busy the load generator was (near 1.0: it, not the
server, was the limit).  Each server is single-threaded (iocpnet: one worker).  Take
figures only on a quiet machine (1-minute load under ~0.7).
"""
import argparse
import json
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
sys.path.insert(0, str(HERE.parent))   # benchmarks/_common.py
from _common import cpu_seconds, free_port, wait_port  # noqa: E402

SERVERS = {
    "iocpnet": lambda port: [sys.executable, "-m", "iocpnet", "echo", "--websocket",
                             "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
    "picows": lambda port: [sys.executable, str(HERE / "picows_echo.py"), str(port)],
    "websockets": lambda port: [sys.executable, str(HERE / "websockets_echo.py"), str(port)],
}
CELLS = [(64, 1), (64, 100), (16384, 1), (16384, 100)]


def build_loadgen(out):
    exe = Path(out) / "ws_loadgen"
    subprocess.run(["cc", "-O2", "-Wall", "-o", str(exe), str(HERE / "ws_loadgen.c")],
                   check=True)
    return exe


def one_run(loadgen, name, size, conns, seconds, warmup):
    port = free_port()
    env = dict(os.environ, PYTHONPATH=os.environ.get("PYTHONPATH", ""))
    server = subprocess.Popen(["taskset", "-c", "0", *SERVERS[name](port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    try:
        wait_port(port)
        lg = subprocess.Popen(["taskset", "-c", "1", str(loadgen), "-p", str(port),
                               "-c", str(conns), "-s", str(size), "-t", str(seconds),
                               "-w", str(warmup)], stdout=subprocess.PIPE, text=True)
        line = lg.stdout.readline()
        if line.strip() != "start":
            raise RuntimeError(f"{name}: load generator failed ({lg.wait()})")
        c0 = cpu_seconds(server.pid)
        result = json.loads(lg.stdout.readline())
        c1 = cpu_seconds(server.pid)
        if lg.wait() != 0:
            raise RuntimeError(f"{name}: load generator exit {lg.returncode}")
    finally:
        server.terminate()
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
    rps = result["round_trips"] / result["seconds"]
    cpu = c1 - c0
    return {"server": name, "size": size, "conns": conns, "rps": rps,
            "server_cpu": cpu / result["seconds"],
            "per_cpu_second": result["round_trips"] / cpu if cpu > 0 else None,
            "loadgen_busy": result["busy"]}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--warmup", type=float, default=1.0)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--servers", default=",".join(SERVERS))
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "websocket.json"))
    p.add_argument("--build-dir", default="/tmp/iocpnet-ws-bench")
    args = p.parse_args()
    os.makedirs(args.build_dir, exist_ok=True)
    loadgen = build_loadgen(args.build_dir)
    names = args.servers.split(",")
    with open("/proc/loadavg") as f:
        load = f.read().split()[0]
    print(f"1-minute load before: {load}", file=sys.stderr)
    runs = []
    for r in range(args.rounds):
        for size, conns in CELLS:
            order = names[r % len(names):] + names[:r % len(names)]
            for name in order:
                res = one_run(loadgen, name, size, conns, args.seconds, args.warmup)
                res["round"] = r
                runs.append(res)
                print(f"round {r} {name:10s} {size:6d} B x {conns:3d}: "
                      f"{res['rps']:9.0f} rt/s  server cpu {res['server_cpu']:.2f}  "
                      f"{res['per_cpu_second'] or 0:9.0f} rt/cpu-s  "
                      f"loadgen busy {res['loadgen_busy']:.2f}", file=sys.stderr, flush=True)
    with open("/proc/loadavg") as f:
        load_after = f.read().split()[0]
    table = []
    for size, conns in CELLS:
        row = {"size": size, "conns": conns}
        for name in names:
            rs = [x for x in runs if x["server"] == name and x["size"] == size and
                  x["conns"] == conns]
            row[name] = {}
            for k in ("rps", "server_cpu", "per_cpu_second", "loadgen_busy"):
                vals = [x[k] for x in rs if x[k] is not None]
                row[name][k] = statistics.median(vals) if vals else float("nan")
        table.append(row)
    out = {"load_before": load, "load_after": load_after, "seconds": args.seconds,
           "rounds": args.rounds, "runs": runs, "table": table}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(f"| cell | " + " | ".join(f"{n} rt/s (rt per server CPU-s, lg busy)"
                                     for n in names) + " |")
    print("| --- |" + " --- |" * len(names))
    for row in table:
        cells = [f"{row[n]['rps']:,.0f} ({row[n]['per_cpu_second']:,.0f}, "
                 f"{row[n]['loadgen_busy']:.2f})" for n in names]
        print(f"| {row['size']} B x {row['conns']} | " + " | ".join(cells) + " |")
    print(f"1-minute load: {load} before, {load_after} after", file=sys.stderr)


if __name__ == "__main__":
    main()
