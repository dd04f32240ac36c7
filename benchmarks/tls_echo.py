"""TLS echo: iocpnet (Listener(ssl=ctx)) against asyncio and uvloop with ssl, and
aiofastnet on uvloop for reference, compared per server CPU-second.

    python benchmarks/tls_echo.py                  # 4 cells x 5 rounds, about 2 minutes
    python benchmarks/tls_echo.py --rounds 3 --cells 64:1,16384:100 --servers iocpnet-uring,uvloop

Every server is an echo server on 127.0.0.1 with the same certificate (EC P-256, made
with the openssl command into a temporary directory) and the stdlib's default server
context: TLS 1.3, TLS_AES_256_GCM_SHA384.  The load generator, tls_loadgen.c (C,
OpenSSL, one thread), ping-pongs SIZE-byte messages on CONNS connections and checks
every echoed byte.  Server on CPU 0, load generator on CPU 1 (taskset).  All servers of
a cell run at once (one under load at a time) and are measured in short slices (0.3 s
warm-up + 1 s) in rotating order, ROUNDS times; figures are medians over the rounds.

Figures per cell and server: round trips/s; the server's CPU time (all threads, from
/proc) per round trip; round trips per server CPU-second relative to asyncio and to
uvloop (>1: ahead); the server's and the load generator's CPU in cores; latency p50/p99;
and what limited the cell: the load generator (its core >= 90 % busy: marked ‡, no
ratio, the cell compares no servers), the server (its core >= 90 % busy), or neither (a ping-pong waits for its echo: the round trip's
latency, both sides partly idle).

Take figures only on a quiet machine: it refuses to run when the 1-minute load average
is above 0.7, unless --force.  The results go to benchmarks/results/tls.json; with
--write-docs the table replaces the one between the markers of docs/benchmarks.md's
"TLS echo" section.
"""
import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time

from _common import cpu_seconds, free_port

HERE = os.path.dirname(os.path.abspath(__file__))
BUILD = os.path.join(HERE, "build")
LOADGEN = os.path.join(BUILD, "tls_loadgen")
SERVER = os.path.join(HERE, "servers", "tls_echo.py")
SERVERS = ("iocpnet-uring", "iocpnet-epoll", "asyncio", "uvloop", "aiofastnet")
DOCS_MD = os.path.join(os.path.dirname(HERE), "docs", "benchmarks.md")
BEGIN = "<!-- tls:begin (benchmarks/tls_echo.py --write-docs writes this section) -->"
END = "<!-- tls:end -->"


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def build_loadgen():
    src = os.path.join(HERE, "tls_loadgen.c")
    if os.path.exists(LOADGEN) and os.path.getmtime(LOADGEN) >= os.path.getmtime(src):
        return
    os.makedirs(BUILD, exist_ok=True)
    log("building benchmarks/build/tls_loadgen (needs OpenSSL's headers: libssl-dev)")
    subprocess.run(["gcc", "-O2", "-Wall", "-o", LOADGEN, src, "-lssl", "-lcrypto", "-lm"],
                   check=True)


def make_cert(d):
    cert, key = os.path.join(d, "cert.pem"), os.path.join(d, "key.pem")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", key, "-out", cert,
                    "-days", "2", "-subj", "/CN=localhost", "-addext",
                    "subjectAltName=DNS:localhost,IP:127.0.0.1"],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return cert, key


class Server:
    def __init__(self, impl, cert, key):
        self.impl = impl
        self.port = free_port()
        self.proc = subprocess.Popen(
            ["taskset", "-c", "0", sys.executable, SERVER, str(self.port), "--impl", impl,
             "--cert", cert, "--key", key],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            start_new_session=True)
        line = self.proc.stdout.readline()
        if "READY" not in line:
            raise RuntimeError(f"{impl} did not start: {line}{self.proc.stdout.read()}")
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), 1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def stop(self):
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, 9)
        self.proc.wait(10)


def slice_once(server, conns, size, warm, seconds):
    lg = subprocess.Popen(["taskset", "-c", "1", LOADGEN, "-p", str(server.port),
                           "-c", str(conns), "-s", str(size), "-w", str(warm),
                           "-d", str(seconds)],
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        line = lg.stdout.readline()
        if line.strip() != "START":
            raise RuntimeError(f"load generator against {server.impl}: {line!r}")
        c0 = cpu_seconds(server.proc.pid)
        line = lg.stdout.readline()
        c1 = cpu_seconds(server.proc.pid)
        if not line.startswith("END "):
            raise RuntimeError(f"load generator against {server.impl}: {line!r}")
        r = json.loads(line[4:])
    finally:
        lg.stdin.close()
        lg.wait(30)
    if lg.returncode != 0:
        raise RuntimeError(f"load generator against {server.impl} exited {lg.returncode}")
    if server.proc.poll() is not None:
        raise RuntimeError(f"{server.impl} died")
    r["server_cpu_seconds"] = c1 - c0
    return r


LG_LIMIT = 0.90  # load generator at least this busy: the cell does not compare servers


def limit_of(server_cores, loadgen_cores):
    # The load generator first: a saturated generator paces every server alike, so the
    # server's busy share (and its CPU per round trip, at a different batching) compares
    # nothing even when the server is saturated too.
    if loadgen_cores >= LG_LIMIT:
        return "‡ load generator"
    if server_cores >= 0.9:
        return "server CPU"
    return "round-trip latency"


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--cells", default="64:1,64:100,16384:1,16384:100",
                   help="SIZE:CONNS,... (message size in bytes, connections)")
    p.add_argument("--servers", default=",".join(SERVERS))
    p.add_argument("--warmup", type=float, default=0.3)
    p.add_argument("--seconds", type=float, default=1.0)
    p.add_argument("--force", action="store_true", help="run even on a busy machine")
    p.add_argument("--json", default=os.path.join(HERE, "results", "tls.json"))
    p.add_argument("--write-docs", action="store_true",
                   help="put the table into docs/benchmarks.md (between its markers)")
    args = p.parse_args()
    load1 = os.getloadavg()[0]
    if load1 > 0.7 and not args.force:
        log(f"the machine is busy (1-minute load {load1:.2f} > 0.7): figures would "
            f"compare nothing; wait, or --force")
        return 2
    servers = [s for s in args.servers.split(",") if s]
    cells = [tuple(int(x) for x in c.split(":")) for c in args.cells.split(",") if c]
    build_loadgen()
    commit = subprocess.run(["git", "-C", HERE, "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True).stdout.strip() or "?"
    results = {"load_before": os.getloadavg(), "python": sys.version.split()[0],
               "date": time.strftime("%Y-%m-%d"), "commit": commit, "rounds": args.rounds,
               "cells": []}
    with tempfile.TemporaryDirectory() as d:
        cert, key = make_cert(d)
        for size, conns in cells:
            running = []
            try:
                for impl in servers:
                    try:
                        running.append(Server(impl, cert, key))
                    except Exception as e:      # aiofastnet missing, say
                        log(f"{impl}: not run ({e})")
                slices = {s.impl: [] for s in running}
                for rnd in range(args.rounds):
                    k = rnd % len(running)
                    for s in running[k:] + running[:k]:
                        slices[s.impl].append(slice_once(s, conns, size, args.warmup,
                                                         args.seconds))
            finally:
                for s in running:
                    s.stop()
            cell = {"size": size, "conns": conns, "servers": {}}
            for impl, sl in slices.items():
                med = lambda f: statistics.median(f(x) for x in sl)  # noqa: E731
                cell["servers"][impl] = {
                    "round_trips_per_s": med(lambda x: x["round_trips"] / x["seconds"]),
                    "server_us_per_rt": med(lambda x: x["server_cpu_seconds"] * 1e6 /
                                            max(x["round_trips"], 1)),
                    "server_cores": med(lambda x: x["server_cpu_seconds"] / x["seconds"]),
                    "loadgen_cores": med(lambda x: x["cpu_seconds"] / x["seconds"]),
                    "p50_us": med(lambda x: x["p50_us"]),
                    "p99_us": med(lambda x: x["p99_us"]),
                    "slices": sl,
                }
            results["cells"].append(cell)
            log(f"cell {size} B x {conns}: done")
    results["load_after"] = os.getloadavg()
    os.makedirs(os.path.dirname(args.json), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(results, f, indent=1)
    table = render(results)
    print(table)
    if args.write_docs:
        write_docs(table)
    return 0


def write_docs(table):
    with open(DOCS_MD) as f:
        text = f.read()
    if BEGIN not in text:
        raise SystemExit(f"{DOCS_MD} has no {BEGIN!r} marker")
    head, rest = text.split(BEGIN, 1)
    tail = rest.split(END, 1)[1]
    with open(DOCS_MD, "w") as f:
        f.write(f"{head}{BEGIN}\n{table}\n{END}{tail}")
    log(f"wrote {os.path.relpath(DOCS_MD)}")


def render(results):
    out = [f"Measured {results.get('date', '?')}, iocpnet {results.get('commit', '?')}, "
           f"Python {results['python']}, TLS 1.3 (TLS_AES_256_GCM_SHA384); 1-minute load "
           f"{results['load_before'][0]:.2f} before, {results['load_after'][0]:.2f} after; "
           f"{results.get('rounds', '?')} rounds of 0.3 s + 1 s slices.",
           "",
           "| cell | server | round trips/s | server µs/rt | vs asyncio | vs uvloop | "
           "server cores | loadgen cores | p50 / p99 µs | limit |",
           "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for cell in results["cells"]:
        srv = cell["servers"]
        for impl, r in srv.items():
            def rel(ref):
                if ref not in srv:
                    return "-"
                if max(r["loadgen_cores"], srv[ref]["loadgen_cores"]) >= LG_LIMIT:
                    return "‡"
                return f"{srv[ref]['server_us_per_rt'] / r['server_us_per_rt']:.2f}x"
            out.append(
                f"| {cell['size']} B x {cell['conns']} | {impl} | "
                f"{r['round_trips_per_s']:,.0f} | {r['server_us_per_rt']:.1f} | "
                f"{rel('asyncio')} | {rel('uvloop')} | {r['server_cores']:.2f} | "
                f"{r['loadgen_cores']:.2f} | {r['p50_us']:.0f} / {r['p99_us']:.0f} | "
                f"{limit_of(r['server_cores'], r['loadgen_cores'])} |")
    out.append("")
    out.append("vs asyncio / vs uvloop: round trips per server CPU-second relative to "
               "theirs (>1: ahead); ‡: this server's or the other's load generator was at "
               "least 90 % busy, so the pair compares nothing.")
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())
