#!/usr/bin/env python3
"""Every benchmark of this tree in one bounded run, and docs/benchmarks.md rewritten from it.

    python3 benchmarks/all.py --prepare   # build and install what the run needs (any time)
    python3 benchmarks/all.py             # the figures: about 20 minutes, never past 27
    python3 benchmarks/all.py --quick     # smoke test of the whole chain: about 2 minutes

What this file owns: the list of parts (one benchmark script each, with the arguments
that make it quick but still valid, and a time budget), running them one after the
other, and the sections of docs/benchmarks.md that say what each part measured, when,
on which commit and machine, and with which exact command.  The scripts themselves own
their methods (each one's docstring) and their own JSON files.

- Part 1 is the echo matrix (benchmarks/run.py: ping-pong and pipelined cells, the
  connect storm, 10,000 idle connections, peak RSS; iocpnet on io_uring and epoll,
  uvloop, aiofastnet, asyncio, C io_uring, C epoll).  run.py rewrites its own section
  of the docs (between its markers) and the chart.
- Then TLS echo, WebSocket echo, group broadcast, rooms through Redis, kept OnRecv
  views and the cost of the figures, each in a section of its own (between markers
  this file writes; a part whose script is not in the tree is reported as skipped).

Every part runs in its own process group under a budget: past it the group is
stopped (SIGTERM, then SIGKILL) and the part is reported as TIMED OUT with what it
printed; the run as a whole stops starting parts when its total budget is spent.
iocpnet is built once from this tree (scripts/devbuild.sh into a cache directory,
rebuilt only when src/ changed) and put on PYTHONPATH for every part, so the figures
are those of this commit, whatever is pip-installed.

For each part the docs say how much CPU other processes used during it (the
machine's busy time from /proc/stat minus the part's own processes): above about
0.15 cores the section says the figures were disturbed (kernel threads count as
other processes: a part whose loopback traffic the kernel handles in ksoftirqd may show
a little).  Take the figures on a quiet machine: the run refuses to start when the
1-minute load average is above 0.7 (--force to override; --quick implies it), since a
busy machine makes them worthless.

--quick writes nothing git tracks: its docs go to benchmarks/build/all-quick/benchmarks.md
(a copy of docs/benchmarks.md, with the chart), its JSON next to it, and run.py's summary
to benchmarks/results/quick.json (ignored).
"""
import argparse
import datetime
import hashlib
import json
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
PY = sys.executable or "python3"
DOCS = os.path.join(ROOT, "docs", "benchmarks.md")
RESULTS = os.path.join(HERE, "results")
QUICK_DIR = os.path.join(HERE, "build", "all-quick")
BUILD_CACHE = "/tmp/iocpnet-bench-all"
TOTAL_BUDGET = 27 * 60
SUMMARY_BEGIN = "<!-- benchmarks/all.py summary: begin (generated, edits inside are overwritten) -->"
SUMMARY_END = "<!-- benchmarks/all.py summary: end -->"
ECHO_BEGIN = "<!-- BEGIN benchmarks/run.py results"
DISTURBED = 0.15  # cores used by other processes during a part, above which it says so
CPU_SPLIT = "server pinned to CPU 0, load generator on CPU 1 (`taskset`)"


class Part:
    """One benchmark: its commands (argv after the interpreter, paths relative
    to the repository), the quick variants, a budget in seconds for all its
    commands together, and where its section of the docs goes."""

    def __init__(self, name, title, script, runs, quick_runs, budget, quick_budget,
                 pinning=CPU_SPLIT, about="", markers=None, json_name=None, pin_driver=None,
                 table=None):
        self.name, self.title, self.script = name, title, script
        self.runs, self.quick_runs = runs, quick_runs
        self.budget, self.quick_budget = budget, quick_budget
        self.pinning, self.about = pinning, about
        self.markers = markers or (
            f"<!-- benchmarks/all.py {name}: begin (generated, edits inside are overwritten) -->",
            f"<!-- benchmarks/all.py {name}: end -->")
        self.json_name = json_name
        self.pin_driver = pin_driver  # run the script itself on this CPU (it is the driver)
        self.table = table            # JSON -> extra Markdown (medians, what limited each cell)


def _limit(server_cores, driver_cores, what="load generator", neither="round-trip latency"):
    if driver_cores is not None and driver_cores >= 0.9:
        return f"‡ {what}"
    if server_cores is not None and server_cores >= 0.9:
        return "server"
    return f"neither ({neither})"


def websocket_table(data):
    rows = ["| cell | server | round trips/s | round trips per server CPU-s | server cores "
            "| load generator busy | limited by |", "|---|---|---:|---:|---:|---:|---|"]
    for row in data.get("table", []):
        for name, r in row.items():
            if not isinstance(r, dict):
                continue
            rows.append(f"| {row['size']} B × {row['conns']} | {name} | {r['rps']:,.0f} | "
                        f"{r['per_cpu_second']:,.0f} | {r['server_cpu']:.2f} | "
                        f"{r['loadgen_busy'] * 100:.0f} % | "
                        f"{_limit(r['server_cpu'], r['loadgen_busy'])} |")
    return ("Medians over the rounds. Limited by: ‡ the load generator when it was at least "
            "90 % busy (that cell does not compare servers), the server when it used at least "
            "0.90 of its core, else neither.\n\n" + "\n".join(rows))


def group_table(data):
    import statistics
    cells = data.get("cells", [])
    kinds = list(dict.fromkeys(c["server"] for c in cells))
    rows = ["| server | deliveries/s | deliveries per server CPU-s | server cores | driver cores "
            "| limited by | rounds |", "|---|---:|---:|---:|---:|---|---:|"]
    for k in kinds:
        mine = [c for c in cells if c["server"] == k]

        def med(f):
            return statistics.median(f(c) for c in mine)
        s, d = med(lambda c: c["server_cpu_share"]), med(lambda c: c["driver_cpu_share"])
        rows.append(f"| {k} | {med(lambda c: c['delivered_per_s']):,.0f} | "
                    f"{med(lambda c: c['delivered_per_cpu_s']):,.0f} | {s:.2f} | {d:.2f} | "
                    f"{_limit(s, d, 'driver', 'the in-flight window')} | {len(mine)} |")
    return ("Medians over the rounds (the script's own summary above is the best round). "
            "Limited by: ‡ the driver when it used at least 0.90 of its core (the cell does not "
            "compare servers), the server when it did, else neither (the in-flight window).\n\n"
            + "\n".join(rows))


def parts(quick):
    r = os.path.join("benchmarks", "results") if not quick else os.path.relpath(QUICK_DIR, ROOT)
    docs = os.path.relpath(DOCS if not quick else os.path.join(QUICK_DIR, "benchmarks.md"), ROOT)
    return [
        Part("echo", "Echo matrix", "benchmarks/run.py",
             # --budget: 13.7 min planned (9.8 + 2.8 for the four equal-rate
             # cells + 1.1 for the one-connection cells' extra warm-ups, the
             # speed probes after every slice and the witness probes around
             # the one-connection ones), then
             # re-measured slices and the headroom probes (uncapped cells
             # only; about 1 min when ~20 cells need one) share the rest
             [["benchmarks/run.py", "--rounds", "4", "--budget", "15.5", "--write-docs",
               "--docs", docs, "--out", "latest"]],
             [["benchmarks/run.py", "--quick", "--budget", "1.5", "--write-docs",
               "--docs", docs, "--out", "quick"]],
             budget=17 * 60, quick_budget=150,
             pinning="server pinned to CPU 0, busy-polling load generator on CPU 1 (`taskset`)"),
        Part("tls", "TLS echo", "benchmarks/tls_echo.py",
             [["benchmarks/tls_echo.py", "--rounds", "3", "--force",
               "--json", f"{r}/tls.json"]],
             [["benchmarks/tls_echo.py", "--rounds", "1", "--cells", "64:1,16384:100",
               "--seconds", "0.5", "--warmup", "0.2", "--force", "--json", f"{r}/tls.json"]],
             budget=150, quick_budget=60,
             markers=("<!-- tls:begin (benchmarks/tls_echo.py --write-docs writes this section) -->",
                      "<!-- tls:end -->")),
        Part("websocket", "WebSocket echo", "benchmarks/websocket/run.py",
             [["benchmarks/websocket/run.py", "--seconds", "1", "--warmup", "0.3",
               "--rounds", "3", "--out", f"{r}/websocket.json"]],
             [["benchmarks/websocket/run.py", "--seconds", "0.5", "--warmup", "0.3",
               "--rounds", "1", "--out", f"{r}/websocket.json"]],
             budget=120, quick_budget=60, json_name="websocket.json", table=websocket_table,
             about="iocpnet's WebSocket server (`python -m iocpnet echo --websocket`, one "
                   "worker) against picows and websockets on uvloop; ping-pong, the C load "
                   "generator `benchmarks/websocket/ws_loadgen.c` checks every echo. Method: "
                   "the script's docstring."),
        Part("group", "Group broadcast", "benchmarks/group_broadcast.py",
             [["benchmarks/group_broadcast.py", "--seconds", "2", "--rounds", "3",
               "--json", f"{r}/group_broadcast.json"]],
             [["benchmarks/group_broadcast.py", "--seconds", "0.5", "--rounds", "1",
               "--members", "200", "--json", f"{r}/group_broadcast.json"]],
             budget=75, quick_budget=45, json_name="group_broadcast.json", table=group_table,
             pin_driver="1",
             pinning="server pinned to CPU 0, the driver (the script itself) to CPU 1 (`taskset`)",
             about="64-byte messages from one publisher fanned out to 1,000 members of one "
                   "room: iocpnet's `Group.Broadcast` against a `transport.write` loop on "
                   "asyncio and uvloop. Method: the script's docstring."),
        Part("redis", "Rooms through Redis", "benchmarks/redis_fanout.py",
             [["benchmarks/redis_fanout.py", "--seconds", "2", "--rounds", "3"]],
             [["benchmarks/redis_fanout.py", "--seconds", "0.5", "--rounds", "1",
               "--members", "100"]],
             budget=90, quick_budget=60, pin_driver="1",
             pinning="servers and redis-server pinned to CPU 0, the driver (the script "
                     "itself) to CPU 1 (`taskset`)",
             about="One room shared by two server processes through Redis against the same "
                   "members in one process: deliveries/s and the latency Redis adds. Method: "
                   "the script's docstring."),
        Part("kept_views", "Kept OnRecv views", "benchmarks/kept_views.py",
             [["benchmarks/kept_views.py", "memory", "--count", "50000", "--backend", "io_uring"],
              ["benchmarks/kept_views.py", "memory", "--count", "50000", "--backend", "epoll"],
              ["benchmarks/kept_views.py", "latency", "--seconds", "3"]],
             [["benchmarks/kept_views.py", "memory", "--count", "5000", "--backend", "io_uring"],
              ["benchmarks/kept_views.py", "latency", "--seconds", "1"]],
             budget=90, quick_budget=60,
             pinning="server and clients unpinned (memory and latency, not throughput)",
             about="What a message kept from `OnRecv` costs in memory, and whether a session "
                   "that keeps every message stalls the others. Method: the script's docstring."),
        Part("stats_cost", "What the figures cost", "benchmarks/stats_cost.py",
             [["benchmarks/stats_cost.py", "--variants", "stats,hooks,limits", "--rounds", "5"],
              ["benchmarks/stats_cost.py", "--variants", "stats,hooks,limits", "--rounds", "5",
               "--mode", "pipeline", "-c", "100", "-d", "16"]],
             [["benchmarks/stats_cost.py", "--variants", "stats,hooks,limits", "--rounds", "1",
               "--slice", "0.3", "--warmup", "0.1"]],
             budget=75, quick_budget=30,
             about="The echo server with the always-on counters (`stats`), with "
                   "`measure_hooks = True` (`hooks`) and with the flood limits set but never "
                   "reached (`limits`): round trips/s and server CPU per round trip, and the "
                   "difference to `stats` in nanoseconds per round trip (no pre-figures "
                   "baseline build: the difference shown is what the options add)."),
    ]


# --------------------------------------------------------------------------

def log(msg):
    print(msg, flush=True)


def git(*a):
    r = subprocess.run(["git", "-C", ROOT, *a], capture_output=True, text=True)
    return r.stdout.strip() if r.returncode == 0 else ""


def machine():
    cpu = "?"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "?")
    except OSError:
        pass
    return {"cpu_model": cpu, "cpus": os.cpu_count(), "kernel": platform.release(),
            "python": platform.python_version()}


def src_digest():
    """What the build depends on: the tracked tree of src/ at HEAD plus any
    uncommitted change in it (so a dirty tree is rebuilt, a clean one reused)."""
    h = hashlib.sha1()
    for f in ("setup.py", "pyproject.toml"):
        with open(os.path.join(ROOT, f), "rb") as fh:
            h.update(fh.read())
    for d, _, fs in sorted(os.walk(os.path.join(ROOT, "src"))):
        for f in sorted(fs):
            if f.endswith((".so", ".pyd", ".pyc", ".html")) or f == "_core.c":
                continue
            p = os.path.join(d, f)
            h.update(os.path.relpath(p, ROOT).encode())
            with open(p, "rb") as fh:
                h.update(fh.read())
    return h.hexdigest()


def build_iocpnet(cache):
    """scripts/devbuild.sh into `cache`, skipped when src/ did not change since;
    returns the PYTHONPATH entry."""
    stamp = os.path.join(cache, "digest")
    digest = src_digest()
    path = os.path.join(cache, "tree", "src")
    try:
        with open(stamp) as f:
            if f.read().strip() == digest and os.path.isdir(path):
                log(f"iocpnet: build of this tree reused from {path}")
                return path
    except OSError:
        pass
    log(f"iocpnet: building this tree into {cache} (scripts/devbuild.sh)...")
    t0 = time.monotonic()
    r = subprocess.run(["bash", os.path.join(ROOT, "scripts", "devbuild.sh"), cache],
                       capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit("iocpnet build failed:\n" + r.stderr[-3000:])
    with open(stamp, "w") as f:
        f.write(digest + "\n")
    log(f"iocpnet: built in {time.monotonic() - t0:.0f} s")
    return r.stdout.strip().splitlines()[-1]


def prepare(pythonpath):
    """Everything a part would otherwise fetch or build inside its budget."""
    env = dict(os.environ, PYTHONPATH=pythonpath)
    # the C programs and the Python peers run.py installs when missing
    r = subprocess.run([PY, os.path.join(HERE, "run.py"), "--only", "pp-64-c1,c-uring",
                        "--rounds", "1", "--slice", "0.1", "--warmup", "0.05", "--no-write"],
                       env=env, capture_output=True, text=True, cwd=ROOT)
    log("run.py: C programs built, peers importable" if r.returncode == 0 else
        "run.py preparation failed:\n" + r.stderr[-2000:])
    missing = []
    for mod in ("uvloop", "aiofastnet", "picows", "websockets", "matplotlib"):
        c = subprocess.run([PY, "-c", f"import {mod}"], capture_output=True)
        if c.returncode != 0:
            missing.append(mod)
    if missing:
        log("installing " + ", ".join(missing) + " with pip")
        subprocess.run([PY, "-m", "pip", "install", "-q", *missing])
    for tool in ("taskset", "gcc", "cc", "openssl", "redis-server"):
        if not shutil.which(tool):
            log(f"WARNING: {tool} not found: the parts that need it will fail")
    imp = subprocess.run([PY, "-c", "import iocpnet, sys; print(iocpnet.__file__)"], env=env,
                         capture_output=True, text=True)
    log("iocpnet imports from " + (imp.stdout.strip() or "NOWHERE: " + imp.stderr[-500:]))


def cpu_busy_s():
    """The whole machine's busy CPU seconds so far (/proc/stat)."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    idle = v[3] + (v[4] if len(v) > 4 else 0)
    return (sum(v[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def children_cpu_s():
    """CPU of every descendant waited for so far (the benchmark's own processes)."""
    t = os.times()
    return t.children_user + t.children_system


def self_cpu_s():
    t = os.times()
    return t.user + t.system


class Runner:
    """Runs one command in its own process group, streams its output with a
    prefix, keeps its stdout, and stops the group when the deadline passes."""

    def __init__(self):
        self.proc = None

    def run(self, argv, env, deadline, prefix):
        self.proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, errors="replace",
                                     start_new_session=True)
        out, err = [], []

        def pump(stream, keep, dest):
            for line in stream:
                keep.append(line)
                print(f"{prefix}{line}", end="", file=dest, flush=True)
        ts = [threading.Thread(target=pump, args=(self.proc.stdout, out, sys.stdout), daemon=True),
              threading.Thread(target=pump, args=(self.proc.stderr, err, sys.stdout), daemon=True)]
        for t in ts:
            t.start()
        timed_out = False
        try:
            self.proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            timed_out = True
            self.stop()
        for t in ts:
            t.join(5)
        rc = self.proc.returncode
        self.proc = None
        return rc, "".join(out), "".join(err), timed_out

    def stop(self):
        p = self.proc
        if p is None or p.poll() is not None:
            return
        for sig, wait in ((signal.SIGTERM, 8), (signal.SIGKILL, 5)):
            try:
                os.killpg(p.pid, sig)
            except ProcessLookupError:
                return
            try:
                p.wait(wait)
                return
            except subprocess.TimeoutExpired:
                continue


def md_output(text):
    """A script's stdout in Markdown: verbatim when it prints Markdown tables (its
    report), else in a code block."""
    text = text.strip("\n")
    if any(ln.lstrip().startswith("|") for ln in text.splitlines()):
        return text
    return "```text\n" + text + "\n```"


def replace_between(text, begin, end, body, heading=None):
    block = f"{begin}\n{body.rstrip()}\n{end}"
    if begin in text and end in text:
        a = text.index(begin)
        b = text.index(end) + len(end)
        return text[:a] + block + text[b:]
    return text.rstrip("\n") + "\n\n" + (f"{heading}\n\n" if heading else "") + block + "\n"


def write_section(docs, part, body):
    text = open(docs).read() if os.path.exists(docs) else "# Benchmarks\n"
    heading = None
    if part.markers[0] not in text:
        heading = f"## {part.title}" + (f"\n\n{part.about}" if part.about else "")
    text = replace_between(text, part.markers[0], part.markers[1], body, heading)
    with open(docs, "w") as f:
        f.write(text if text.endswith("\n") else text + "\n")


def write_summary(docs, body):
    text = open(docs).read() if os.path.exists(docs) else "# Benchmarks\n"
    if SUMMARY_BEGIN not in text:
        # just before the echo matrix's section, or at the end
        block = f"{SUMMARY_BEGIN}\n{SUMMARY_END}\n\n"
        i = text.find(ECHO_BEGIN)
        text = text[:i] + block + text[i:] if i >= 0 else text.rstrip("\n") + "\n\n" + block
    text = replace_between(text, SUMMARY_BEGIN, SUMMARY_END, body)
    with open(docs, "w") as f:
        f.write(text if text.endswith("\n") else text + "\n")


def cmdline(argv, pin=None):
    return " ".join(([f"taskset -c {pin}"] if pin else []) + ["python3"]
                    + [shlex.quote(a) for a in argv])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="smoke test: every part with tiny settings; writes under benchmarks/build/")
    p.add_argument("--prepare", action="store_true",
                   help="build iocpnet and the C programs, install missing peers, then exit")
    p.add_argument("--only", help="comma-separated part names: " + ", ".join(
        x.name for x in parts(False)))
    p.add_argument("--force", action="store_true", help="run even when the machine is busy")
    p.add_argument("--pythonpath", help="use this iocpnet build instead of building this tree")
    p.add_argument("--total-budget", type=float, default=TOTAL_BUDGET / 60, metavar="MINUTES",
                   help="no part starts once this is spent (default 24)")
    args = p.parse_args(argv)
    if not sys.platform.startswith("linux"):
        sys.exit("these benchmarks need Linux")
    plist = parts(args.quick)
    if args.only:
        want = [x.strip() for x in args.only.split(",") if x.strip()]
        unknown = set(want) - {x.name for x in plist}
        if unknown:
            p.error("unknown part(s): " + ", ".join(sorted(unknown)))
        plist = [x for x in plist if x.name in want]

    pythonpath = args.pythonpath or build_iocpnet(BUILD_CACHE)
    t_start = time.monotonic()  # the budget counts from here: --prepare builds beforehand
    if args.prepare:
        prepare(pythonpath)
        return 0
    load = os.getloadavg()[0]
    if load > 0.7 and not (args.force or args.quick):
        sys.exit(f"the machine is busy (1-minute load {load:.2f} > 0.7): the figures would "
                 "compare nothing. Wait, or pass --force.")
    docs = DOCS if not args.quick else os.path.join(QUICK_DIR, "benchmarks.md")
    results_dir = RESULTS if not args.quick else QUICK_DIR
    os.makedirs(results_dir, exist_ok=True)
    if args.quick:  # the smoke test writes a copy of the docs, never the real ones
        shutil.copyfile(DOCS, docs)
        png = os.path.join(os.path.dirname(DOCS), "benchmarks.png")
        if os.path.exists(png):
            shutil.copyfile(png, os.path.join(QUICK_DIR, "benchmarks.png"))
    env = dict(os.environ, PYTHONPATH=pythonpath, PYTHONUNBUFFERED="1")
    mach = machine()
    commit = git("rev-parse", "--short", "HEAD") or "?"
    dirty = bool(git("status", "--porcelain", "--untracked-files=no", "src", "benchmarks"))
    started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    top = "python3 benchmarks/all.py" + (" " + " ".join(shlex.quote(a) for a in sys.argv[1:])
                                         if argv is None and sys.argv[1:] else "")
    budget_total = args.total_budget * 60
    planned = sum(x.quick_budget if args.quick else x.budget for x in plist)
    log(f"benchmarks/all.py · {started} · commit {commit}{' (dirty)' if dirty else ''} · "
        f"{mach['cpu_model']} ({mach['cpus']} CPUs) · 1-minute load {load:.2f}")
    log(f"iocpnet from {pythonpath}")
    log(f"{len(plist)} parts, budgets add up to {planned / 60:.1f} min; the run stops starting "
        f"parts after {budget_total / 60:.1f} min")
    runner = Runner()

    def _bail(signum, frame):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, _bail)
    signal.signal(signal.SIGINT, _bail)
    summary = {"started_utc": started, "commit": commit, "dirty": dirty, "machine": mach,
               "command": top, "quick": args.quick, "pythonpath": pythonpath,
               "loadavg_at_start": load, "parts": []}
    try:
        for i, part in enumerate(plist, 1):
            el = time.monotonic() - t_start
            rec = {"name": part.name, "title": part.title, "commands": [], "status": "ok"}
            summary["parts"].append(rec)
            head = f"[{el / 60:5.1f}/{budget_total / 60:.0f} min] part {i}/{len(plist)} {part.name}"
            if not os.path.exists(os.path.join(ROOT, part.script)):
                rec["status"] = "skipped: script not in this tree"
                log(f"{head}: {part.script} is not in this tree: skipped")
                continue
            budget = part.quick_budget if args.quick else part.budget
            left = budget_total - el
            if left < 30:
                rec["status"] = "skipped: total budget spent"
                log(f"{head}: total budget spent: skipped")
                continue
            budget = min(budget, left)
            log(f"{head}: {part.title}, budget {budget:.0f} s")
            t0, busy0, kids0 = time.monotonic(), cpu_busy_s(), children_cpu_s() + self_cpu_s()
            load0 = os.getloadavg()[0]
            deadline = t0 + budget
            outs = []
            for cmd in (part.quick_runs if args.quick else part.runs):
                argv_ = ([PY] + cmd) if not part.pin_driver else (
                    ["taskset", "-c", part.pin_driver, PY] + cmd)
                c0 = time.monotonic()
                log(f"  $ {cmdline(cmd, part.pin_driver)}")
                rc, out, err, timed_out = runner.run(argv_, env, deadline, f"  {part.name}| ")
                crec = {"command": cmdline(cmd, part.pin_driver), "rc": rc,
                        "seconds": round(time.monotonic() - c0, 1), "timed_out": timed_out,
                        "stdout": out, "stderr_tail": "".join(err.splitlines(True)[-30:])}
                rec["commands"].append(crec)
                outs.append(crec)
                if timed_out:
                    rec["status"] = f"TIMED OUT after {budget:.0f} s"
                    log(f"  {part.name}: TIMED OUT (budget {budget:.0f} s): stopped")
                    break
                if rc != 0:
                    rec["status"] = f"FAILED (exit code {rc})"
                    log(f"  {part.name}: FAILED with exit code {rc}")
            wall = time.monotonic() - t0
            other = max(0.0, (cpu_busy_s() - busy0)
                        - (children_cpu_s() + self_cpu_s() - kids0)) / wall
            rec.update(seconds=round(wall, 1), budget=budget, other_load_cores=round(other, 3),
                       loadavg_at_start=load0)
            log(f"  {part.name}: {rec['status']} in {wall:.0f} s; other processes used "
                f"{other:.2f} cores meanwhile")
            body = section_body(part, rec, outs, mach, commit, dirty, started, results_dir)
            if part.name != "echo":
                write_section(docs, part, body)
            rec["markdown"] = body
    except KeyboardInterrupt:
        runner.stop()
        log("interrupted: the running part was stopped; sections written so far are kept")
        summary["interrupted"] = True
    summary["seconds"] = round(time.monotonic() - t_start, 1)
    out = os.path.join(results_dir, "all.json")
    if args.only:
        # a rerun of some parts: the other parts' records from the last run stay
        try:
            with open(out) as f:
                prev = {r["name"]: r for r in json.load(f).get("parts", [])}
        except (OSError, ValueError):
            prev = {}
        ran = {r["name"]: r for r in summary["parts"]}
        kept = [n for n in prev if n not in ran]
        summary["parts"] = [ran.get(x.name) or dict(prev[x.name], kept_from_previous_run=True)
                            for x in parts(args.quick) if x.name in ran or x.name in prev]
        summary["kept_from_previous_run"] = kept
    write_summary(docs, summary_md(summary))
    with open(out, "w") as f:
        json.dump(summary, f, indent=1)
        f.write("\n")
    log(f"done in {summary['seconds'] / 60:.1f} min; wrote {os.path.relpath(docs, ROOT)} and "
        f"{os.path.relpath(out, ROOT)}")
    bad = [r for r in summary["parts"] if r["status"] != "ok"
           and not r["status"].startswith("skipped: script")]
    for r in bad:
        log(f"  {r['name']}: {r['status']}")
    return 1 if bad or summary.get("interrupted") else 0


def section_body(part, rec, outs, mach, commit, dirty, started, results_dir):
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    L = [f"Run {date} · commit {commit}{' + uncommitted changes' if dirty else ''} · "
         f"{mach['cpu_model']}, {mach['cpus']} cores, Linux {mach['kernel']}, "
         f"Python {mach['python']} · {part.pinning} · {rec['seconds']:.0f} s "
         f"(budget {rec['budget']:.0f} s) · other processes: {rec['other_load_cores']:.2f} cores "
         f"· 1-minute load at start {rec['loadavg_at_start']:.2f} (the previous part included)"]
    if rec["status"] != "ok":
        L += ["", f"**{rec['status']}**: the figures below are partial or missing."]
    if rec["other_load_cores"] > DISTURBED:
        L += ["", f"**Disturbed**: other processes used {rec['other_load_cores']:.2f} cores "
              "during this part; do not compare these figures."]
    for c in outs:
        L += ["", f"`{c['command']}`" + (f" (exit code {c['rc']})" if c["rc"] else "")
              + (" — stopped at the budget" if c["timed_out"] else "")]
        if c["stdout"].strip():
            L += ["", md_output(c["stdout"])]
        if (c["rc"] or c["timed_out"]) and c["stderr_tail"].strip():
            L += ["", "```text", *c["stderr_tail"].rstrip().splitlines()[-12:], "```"]
    if part.table and part.json_name and rec["status"] == "ok":
        path = os.path.join(results_dir, part.json_name)
        try:
            with open(path) as f:
                L += ["", part.table(json.load(f))]
        except (OSError, ValueError, KeyError, TypeError) as e:
            L += ["", f"(no table from {part.json_name}: {e})"]
    return "\n".join(L)


def summary_md(s):
    L = [f"**Last run** {s['started_utc']}, commit {s['commit']}"
         + (" + uncommitted changes" if s["dirty"] else "")
         + f", {s['machine']['cpu_model']} ({s['machine']['cpus']} cores), Linux "
         f"{s['machine']['kernel']}, Python {s['machine']['python']}; 1-minute load at start "
         f"{s['loadavg_at_start']:.2f}; {s['seconds'] / 60:.1f} min in all. Command: "
         f"`{s['command']}` ("
         + ("iocpnet built from this commit by `scripts/devbuild.sh` and put on `PYTHONPATH`"
            if s["pythonpath"].startswith(BUILD_CACHE) else f"iocpnet from `{s['pythonpath']}`")
         + ")." + (" **Quick smoke run: not representative.**" if s["quick"] else ""),
         "", "| part | status | time | other processes (cores) |", "|---|---|---|---|"]
    if s.get("kept_from_previous_run"):
        L[0] += (" Rows marked * are from the previous run (this one was `--only` "
                 f"{', '.join(r['name'] for r in s['parts'] if not r.get('kept_from_previous_run'))}).")
    for r in s["parts"]:
        t = f"{r['seconds']:.0f} s of {r['budget']:.0f} s" if "seconds" in r else "–"
        if r.get("kept_from_previous_run"):
            t += " *"
        o = f"{r['other_load_cores']:.2f}" if "other_load_cores" in r else "–"
        L.append(f"| {r['title']} | {r['status']} | {t} | {o} |")
    return "\n".join(L)


if __name__ == "__main__":
    sys.exit(main())
