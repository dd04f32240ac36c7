#!/usr/bin/env python3
"""Free-threading benchmark: does a second worker thread double an iocpnet server?

    python benchmarks/freethreading.py                 # about 2 minutes, prints a table
    python benchmarks/freethreading.py --write-docs    # also updates docs/benchmarks.md

Two echo servers, each run with 1 and with 2 worker threads:

- "Python work": OnRecv runs a fixed amount of pure-Python work per message (an integer
  loop over locals, about 100-200 µs depending on the interpreter), then echoes.  This
  is a game server whose hooks do real work: with a GIL the second worker only waits
  for the first, on free-threaded CPython (3.13t) it should nearly double throughput.
- "plain echo": OnRecv only echoes.  Comparing interpreters here shows what free
  threading costs when hooks are trivial.

on three interpreters: a GIL build (``--gil-python``, by default the one running this
script), the free-threaded 3.13t (``--ft-python``, by default built or reused by
scripts/build_freethreaded_python.sh), and that same 3.13t with ``PYTHON_GIL=1``
(same binary with the GIL forced back on: what the GIL alone costs, apart from the
version difference).

How it measures, and why:
- iocpnet is built for each interpreter from this tree, in benchmarks/build/ft-bench/
  (a venv per interpreter and scripts/devbuild.sh: never in place in the shared tree).
- The load generator is benchmarks/loadgen.c (one C thread, every echoed byte checked),
  in ping-pong mode with 16 connections of 64-byte messages: 16 messages in flight, so
  two workers always have work, and at these rates the load generator needs only a
  small part of a core.
- Two workers need both of this machine's cores, so servers may use CPUs 0-1 and the
  load generator is pinned to CPU 1, beside the second worker.  The table shows how
  much CPU the load generator took.
- This machine's speed drifts from second to second and other work may run on it, so
  all servers run at once (idle ones use no CPU), and each is measured in short slices
  (0.3 s warm-up + 1 s) in rotating order over several rounds.  A slice during which
  other processes took more than a quarter of a core is measured again (twice at most,
  the quietest kept).  A speed-up is the ratio of the 2-worker and 1-worker slices of
  the same round, median over rounds.
"""
import argparse
import datetime
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time

from run import free_port   # benchmarks/run.py, next to this script

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
BUILD = os.path.join(HERE, "build")
WORK_DIR = os.path.join(BUILD, "ft-bench")
LOADGEN = os.path.join(BUILD, "loadgen")
DOCS_MD = os.path.join(ROOT, "docs", "benchmarks.md")
BEGIN = "<!-- freethreading:begin (benchmarks/freethreading.py writes this section) -->"
END = "<!-- freethreading:end -->"
MSG_SIZE = 64
CONNS = 16
WORK_ITERS = 1500            # iterations of work() per message: ~100-200 µs of Python


# --------------------------------------------------------------------------------------
# the server (run in a subprocess: `freethreading.py --serve ...`)

def work(n):
    """Pure-Python work on locals only, so that on a free-threaded interpreter two calls
    run fully in parallel.  Its constants are small ints on purpose: on 3.13t a larger
    constant is an ordinary shared object whose reference count every iteration of
    every thread updates, and a mask of 0xFFFFF here made two threads barely faster
    than one (1.46x, measured) before iocpnet was even involved."""
    x = 0
    for i in range(n):
        x = (x * 31 + i) & 255
    return x


def scaling(args):
    """How well work() alone scales from 1 to 2 threads on this interpreter: the ceiling
    for the server's speed-up.  Prints one JSON line."""
    import threading

    def loop(k):
        for _ in range(k):
            work(args.work_iters)

    best = {}
    for _ in range(3):
        for nt in (1, 2):
            ts = [threading.Thread(target=loop, args=(400,)) for _ in range(nt)]
            t0 = time.perf_counter()
            for t in ts:
                t.start()
            for t in ts:
                t.join()
            rate = 400 * nt / (time.perf_counter() - t0)
            best[nt] = max(best.get(nt, 0), rate)
    print(json.dumps({"scaling": best[2] / best[1], "work_us": 1e6 / best[1]}))


def serve(args):
    import iocpnet

    iters, size = args.work_iters, MSG_SIZE

    class PlainEcho(iocpnet.Session):
        def OnRecv(self, data):
            self.Send(data)

    class WorkEcho(iocpnet.Session):
        pending = 0

        def OnRecv(self, data):
            # The work is per message, whatever the way TCP cut the stream.
            count, self.pending = divmod(self.pending + len(data), size)
            for _ in range(count):
                work(iters)
            self.Send(data)

    cls = WorkEcho if iters > 0 else PlainEcho
    best = min(_timed(work, iters) for _ in range(30)) if iters else 0.0
    core = iocpnet.IocpCore(args.backend)
    service = iocpnet.Service(core, iocpnet.Listener(("127.0.0.1", args.serve)), cls, 64)
    info = {"ready": True, "python": platform.python_version(),
            "gil": getattr(sys, "_is_gil_enabled", lambda: True)(),
            "work_us": round(best * 1e6, 1), "backend": core.backend}
    print(json.dumps(info), flush=True)
    service.Run(workers=args.workers)      # until SIGTERM


def _timed(f, *a):
    t = time.perf_counter()
    f(*a)
    return time.perf_counter() - t


# --------------------------------------------------------------------------------------
# harness helpers

def log(msg):
    print(msg, file=sys.stderr, flush=True)


def _die_with_parent():
    try:
        import ctypes
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)   # PR_SET_PDEATHSIG
    except Exception:
        pass


def pin(cpus, argv):
    return ["taskset", "-c", cpus] + argv if shutil.which("taskset") else argv


def run(argv, **kw):
    return subprocess.run(argv, capture_output=True, text=True, **kw)


def build_loadgen():
    src = os.path.join(HERE, "loadgen.c")
    if os.path.exists(LOADGEN) and os.path.getmtime(LOADGEN) >= os.path.getmtime(src):
        return
    os.makedirs(BUILD, exist_ok=True)
    r = run(["gcc", "-O2", "-Wall", "-o", LOADGEN, src])
    if r.returncode != 0:
        sys.exit(f"building the load generator failed:\n{r.stderr}")


def ft_python():
    r = run(["bash", os.path.join(ROOT, "scripts", "build_freethreaded_python.sh")])
    if r.returncode != 0:
        sys.exit(f"scripts/build_freethreaded_python.sh failed:\n{r.stderr[-3000:]}")
    return r.stdout.strip().splitlines()[-1]


def build_iocpnet(python, tag):
    """A venv for `python` with the build tools, and iocpnet built from this tree into
    benchmarks/build/ft-bench/<tag>; returns (venv python, PYTHONPATH)."""
    venv = os.path.join(WORK_DIR, f"venv-{tag}")
    vpy = os.path.join(venv, "bin", "python")
    if not os.path.exists(vpy):
        log(f"making a venv for {python} ({tag})")
        r = run([python, "-m", "venv", venv])
        if r.returncode != 0:
            sys.exit(f"venv for {python} failed:\n{r.stderr}")
    # setuptools 77 reads pyproject.toml's SPDX license string; a venv made before
    # that (an older run's) has an older one and fails the build.
    if run([vpy, "-c", "import setuptools, Cython; "
            "assert int(setuptools.__version__.split('.')[0]) >= 77"]).returncode != 0:
        # --prefer-binary: the newest release of a tool may have no wheel for 3.13t yet.
        r = run([vpy, "-m", "pip", "install", "-q", "--disable-pip-version-check",
                 "--prefer-binary", "setuptools>=77", "cython>=3.1"])
        if r.returncode != 0:
            sys.exit(f"pip install setuptools cython for {tag} failed:\n{r.stderr[-2000:]}")
    log(f"building iocpnet for {tag} (scripts/devbuild.sh)")
    r = run(["bash", os.path.join(ROOT, "scripts", "devbuild.sh"),
             os.path.join(WORK_DIR, f"iocpnet-{tag}")], env=dict(os.environ, PYTHON=vpy))
    if r.returncode != 0:
        sys.exit(f"building iocpnet for {tag} failed:\n{r.stderr[-3000:]}")
    return vpy, r.stdout.strip().splitlines()[-1]


def proc_cpu_s(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def machine_busy_s():
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return (v[0] + v[1] + v[2]) / os.sysconf("SC_CLK_TCK")


class Server:
    def __init__(self, interp, workload, workers, port):
        self.interp, self.workload, self.workers, self.port = interp, workload, workers, port
        self.proc = None
        self.info = None
        self.failed = None

    @property
    def key(self):
        return (self.interp["tag"], self.workload, self.workers)

    def start(self, backend):
        iters = WORK_ITERS if self.workload == "work" else 0
        env = dict(os.environ, PYTHONPATH=self.interp["path"])
        env.pop("PYTHON_GIL", None)
        env.update(self.interp.get("env", {}))
        argv = [self.interp["python"], os.path.abspath(__file__), "--serve", str(self.port),
                "--workers", str(self.workers), "--work-iters", str(iters),
                "--backend", backend]
        os.makedirs(os.path.join(WORK_DIR, "logs"), exist_ok=True)
        self.logpath = os.path.join(WORK_DIR, "logs", "-".join(map(str, self.key)) + ".log")
        # A file, not a pipe: nobody reads a pipe once the server is up, and a full one
        # would block the server the first time it logs.
        with open(self.logpath, "w") as logf:
            self.proc = subprocess.Popen(pin("0,1", argv), env=env, cwd=HERE,
                                         stdin=subprocess.DEVNULL, stdout=logf,
                                         stderr=subprocess.STDOUT, start_new_session=True,
                                         preexec_fn=_die_with_parent)

    def wait_ready(self, timeout=60):
        deadline = time.monotonic() + timeout
        while self.info is None:
            with open(self.logpath) as f:
                first = f.readline()
            if first.endswith("\n"):
                try:
                    self.info = json.loads(first)
                    break
                except ValueError:
                    pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                with open(self.logpath) as f:
                    self.failed = f"did not start: {f.read()[-1500:]}"
                return
            time.sleep(0.05)
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=2) as s:
                    s.sendall(b"x" * MSG_SIZE)
                    got = b""
                    while len(got) < MSG_SIZE:
                        chunk = s.recv(MSG_SIZE)
                        if not chunk:
                            break
                        got += chunk
                    if len(got) == MSG_SIZE:
                        return
            except OSError:
                time.sleep(0.05)
        self.failed = "not echoing"

    def stop(self):
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(5)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()


DISTURBED = 0.25     # cores used by other processes above which a slice is re-measured


def measure(server, args):
    """One slice; measured again (up to twice) when other processes took more than
    DISTURBED cores meanwhile, keeping the quietest."""
    best = None
    for _ in range(3):
        res, err = measure_once(server, args)
        if err:
            return None, err
        if best is None or res["other_cores"] < best["other_cores"]:
            best = res
        if best["other_cores"] <= DISTURBED:
            break
    return best, None


def measure_once(server, args):
    argv = [LOADGEN, "-p", str(server.port), "-m", "pingpong", "-c", str(CONNS),
            "-s", str(MSG_SIZE), "-w", str(args.warmup), "-t", str(args.slice),
            "-P", str(server.proc.pid),
            # the sleeping engine: with 2 workers the server needs the load
            # generator's core too whenever the generator has nothing to do
            "-e", "epoll"]
    wall0, busy0 = time.monotonic(), machine_busy_s()
    r = run(pin("1", argv), timeout=args.warmup + args.slice + 30)
    wall, busy = time.monotonic() - wall0, machine_busy_s() - busy0
    if r.returncode != 0:
        return None, f"loadgen exit {r.returncode}: {r.stderr.strip()[-500:]}"
    res = json.loads(r.stdout)
    # CPU used by anything else than this server and the load generator, whole slice.
    res["other_cores"] = max(0.0, busy - res["server_cpu_s"] * wall / res["window_s"]
                             - res["loadgen_cpu_s"] * wall / res["window_s"]) / wall
    return res, None


# --------------------------------------------------------------------------------------
# report

WORKLOADS = {"work": "Python work in OnRecv", "plain": "plain echo"}


def report(interps, servers, results, args, meta):
    lines = []
    add = lines.append
    add(f"Measured {meta['date']} on {meta['cpu']} ({meta['cpus']} CPUs), Linux "
        f"{meta['kernel']}, iocpnet {meta['commit']}{' (uncommitted changes)' if meta['dirty'] else ''}, "
        f"{args.backend} backend; {args.rounds} rounds of {args.warmup:g} s + {args.slice:g} s "
        f"slices; ping-pong, {CONNS} connections, {MSG_SIZE}-byte messages.")
    add("")
    add("| interpreter | hooks | 1 worker (round-trips/s) | 2 workers (round-trips/s) | "
        "**speed-up** | work() alone, 2 threads / 1 | server CPU, 1 / 2 workers (cores) | "
        "server CPU per round-trip, 1 / 2 workers | load generator CPU |")
    add("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    notes = []
    for workload in ("work", "plain"):
        for it in interps:
            k1, k2 = (it["tag"], workload, 1), (it["tag"], workload, 2)
            s1, s2 = servers.get(k1), servers.get(k2)
            r1, r2 = results.get(k1, []), results.get(k2, [])
            label = it["label"]
            hooks = WORKLOADS[workload]
            if workload == "work" and s1 is not None and s1.info:
                hooks += f" ({s1.info['work_us']:.0f} µs per message)"
            if not r1 or not r2:
                why = (s1 and s1.failed) or (s2 and s2.failed) or "no result"
                add(f"| {label} | {hooks} | FAILED | FAILED | – | – | – | – | – |")
                notes.append(f"{label}, {hooks}: {why}")
                continue
            rt1 = statistics.median(r["rt_per_s"] for r in r1)
            rt2 = statistics.median(r["rt_per_s"] for r in r2)
            ratios = [b["rt_per_s"] / a["rt_per_s"] for a, b in zip(r1, r2)]
            up = statistics.median(ratios)
            cpu = [statistics.median(r["server_cpu_s"] / r["window_s"] for r in rs)
                   for rs in (r1, r2)]
            per = [statistics.median(r["server_cpu_s"] / r["roundtrips"] * 1e6 for r in rs)
                   for rs in (r1, r2)]
            lg = max(r["loadgen_cpu_s"] / r["window_s"] for r in r1 + r2)
            ceiling = (f"{it['scaling']:.2f}×" if workload == "work" and it.get("scaling")
                       else "–")
            add(f"| {label} | {hooks} | {rt1:,.0f} | {rt2:,.0f} | **{up:.2f}×** "
                f"({min(ratios):.2f}–{max(ratios):.2f}) | {ceiling} | "
                f"{cpu[0]:.2f} / {cpu[1]:.2f} | "
                f"{per[0]:.1f} / {per[1]:.1f} µs | ≤ {lg:.2f} |")
            other = max(r["other_cores"] for r in r1 + r2)
            if other > DISTURBED:
                notes.append(f"{label}, {hooks}: other processes used up to {other:.2f} "
                             f"cores during some slices")
    add("")
    add("Speed-up: the 2-worker slice divided by the 1-worker slice of the same round, "
        "median (and range) over rounds.  \"work() alone\": the same work run by 1 and "
        "then 2 plain threads, no server, on that interpreter: the ceiling for the "
        "speed-up on this machine.  GIL state as each server reported it after "
        "importing iocpnet: " + ", ".join(
            f"{it['label']}: {'on' if it.get('gil') else 'off'}" for it in interps) + ".")
    if notes:
        add("")
        add("Notes: " + "; ".join(notes) + ".")
    return "\n".join(lines)


def write_docs(body):
    with open(DOCS_MD) as f:
        text = f.read()
    block = f"{BEGIN}\n{body}\n{END}"
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        text = head + block + rest.split(END, 1)[1]
    else:
        text = text.rstrip("\n") + (
            "\n\n## Worker threads and free-threaded Python\n\n"
            "Does a second worker thread double a server whose hooks run Python code?  "
            "`python benchmarks/freethreading.py --write-docs` rewrites the section "
            "between the markers below (method: the script's docstring).\n\n"
            f"{block}\n")
    with open(DOCS_MD, "w") as f:
        f.write(text)


def meta_info():
    cpu = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f
                       if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    commit = run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"]).stdout.strip()
    dirty = run(["git", "-C", ROOT, "status", "--porcelain", "--", "src", "setup.py",
                 "pyproject.toml"]).stdout.strip()
    return {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"),
            "cpu": cpu, "cpus": os.cpu_count(), "kernel": platform.release(),
            "commit": commit or "?", "dirty": bool(dirty)}


# --------------------------------------------------------------------------------------

def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    p.add_argument("--scaling", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--workers", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--work-iters", type=int, default=WORK_ITERS, help=argparse.SUPPRESS)
    p.add_argument("--backend", default="io_uring", choices=("io_uring", "epoll"))
    p.add_argument("--gil-python", default=None,
                   help="interpreter with a GIL (default: the one running this script; "
                        "a 3.13 makes the comparison with 3.13t version for version)")
    p.add_argument("--ft-python", default=None,
                   help="free-threaded interpreter (default: from "
                        "scripts/build_freethreaded_python.sh)")
    p.add_argument("--no-forced-gil", action="store_true",
                   help="skip the 3.13t run with PYTHON_GIL=1")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--slice", type=float, default=1.0)
    p.add_argument("--warmup", type=float, default=0.3)
    p.add_argument("--write-docs", action="store_true",
                   help="rewrite this benchmark's section of docs/benchmarks.md")
    args = p.parse_args()
    if args.serve is not None:
        return serve(args)
    if args.scaling:
        return scaling(args)

    gil_py = args.gil_python or sys.executable
    if run([gil_py, "-c", "import sys; sys.exit(0 if getattr(sys, '_is_gil_enabled', "
                          "lambda: True)() else 1)"]).returncode != 0:
        sys.exit(f"{gil_py} runs without a GIL; pass a GIL build with --gil-python")
    ft_py = args.ft_python or ft_python()
    build_loadgen()
    os.makedirs(WORK_DIR, exist_ok=True)
    gil_v = run([gil_py, "-c", "import platform; print(platform.python_version())"]).stdout.strip()
    ft_v = run([ft_py, "-c", "import platform; print(platform.python_version())"]).stdout.strip()
    interps = []
    vpy, path = build_iocpnet(gil_py, "gil")
    interps.append({"tag": "gil", "label": f"{gil_v} (GIL build)", "python": vpy, "path": path})
    vpy, path = build_iocpnet(ft_py, "ft")
    if not args.no_forced_gil:
        interps.append({"tag": "ft-gil1", "label": f"{ft_v}t, PYTHON_GIL=1", "python": vpy,
                        "path": path, "env": {"PYTHON_GIL": "1"}})
    interps.append({"tag": "ft", "label": f"{ft_v}t (free-threaded)", "python": vpy,
                    "path": path})

    for it in interps:
        env = dict(os.environ, PYTHONPATH=it["path"])
        env.pop("PYTHON_GIL", None)
        env.update(it.get("env", {}))
        r = run(pin("0,1", [it["python"], os.path.abspath(__file__), "--scaling"]), env=env)
        it["scaling"] = json.loads(r.stdout)["scaling"] if r.returncode == 0 else None

    servers = {}
    port = 23000
    try:
        for it in interps:
            for workload in ("work", "plain"):
                for workers in (1, 2):
                    port = free_port(port + 1)
                    s = Server(it, workload, workers, port)
                    s.start(args.backend)
                    servers[s.key] = s
        for s in servers.values():
            s.wait_ready()
            if s.info:
                next(it for it in interps if it["tag"] == s.key[0])["gil"] = s.info["gil"]
            if s.failed:
                log(f"{s.key}: {s.failed}")
        ft = next(it for it in interps if it["tag"] == "ft")
        if ft.get("gil"):
            log("WARNING: the free-threaded interpreter runs iocpnet with the GIL on")
        order = [s for s in servers.values() if not s.failed]
        results = {k: [] for k in servers}
        t0 = time.monotonic()
        for rnd in range(args.rounds):
            # Rotate, so that no server is always measured right after the same other.
            k = rnd % max(1, len(order))
            for s in order[k:] + order[:k]:
                res, err = measure(s, args)
                if err:
                    s.failed = err
                    log(f"{s.key}: {err}")
                    continue
                results[s.key].append(res)
            log(f"[{time.monotonic() - t0:5.0f} s] round {rnd + 1}/{args.rounds} done")
        # Keep complete rounds only, so that ratios pair slices of the same round.
        for it in interps:
            for workload in ("work", "plain"):
                a, b = results[(it["tag"], workload, 1)], results[(it["tag"], workload, 2)]
                n = min(len(a), len(b))
                del a[n:], b[n:]
    finally:
        for s in servers.values():
            s.stop()
    md = report(interps, servers, results, args, meta_info())
    print(md)
    if args.write_docs:
        write_docs(md)
        log(f"wrote {os.path.relpath(DOCS_MD, ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
