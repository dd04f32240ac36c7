#!/usr/bin/env python3
"""iocpnet benchmark harness: one command, `python benchmarks/run.py`.

Builds the C load generator and reference servers, starts every echo server,
and measures them side by side: ping-pong, pipelined, connect storm and idle
memory. See benchmarks/README.md for what the figures mean.

Design notes (the why):
- This machine's speed drifts 15-30 % from one second to the next, so servers
  are never measured one after the other in long runs. For each case all
  servers run at once (each on its own port, only one under load at a time)
  and are measured in short slices, in rotating order, over several rounds.
  Ratios to the C io_uring server are taken per round (the closest slices in
  time), then the median over rounds.
- The server is pinned to CPU 0 and the load generator to CPU 1, so each has
  a core. The load generator busy-polls and reports the share of its core
  it used (not its CPU time, always 100 % for a busy-poller); an uncapped
  cell where that share is above 90 % is marked as not comparing servers
  (‡), unless a headroom probe shows it needed less (PROBE_WITHHOLD).
- Equal-rate cells (loadgen -r) are judged differently (SCHED_MISS_MAX): the
  question there is whether the generator HELD the offered schedule, and its
  busy share cannot answer it (at a capped 1M messages/s nearly every pass
  finds an echo). The cell compares servers when at most 2 % of the offered
  starts came more than 100 µs late or were dropped while a sender waited,
  the server kept 97 % of the rate (below it with the generator over 90 %
  busy: ‡, either side), and it ran below 0.95 of its core. The pipelined
  equal-rate cells offer their rate in bursts (loadgen -b: on a fixed 1 ms
  clock each connection writes its share of the tick in one send), so that
  a server's CPU follows the messages, not the wall clock: evenly spaced,
  every server woke for nearly every message (every Python server at
  0.98-0.99 of a core at 1M/s, every server, C io_uring too, at 0.90-0.99
  at 500k-600k/s);
  a server that let over 2 % of the messages go out after their tick (its
  window still full) was not offered the schedule and is in no ratio.
- Noise: a difference is a win or a miss only when the paired rounds agree on
  its side (sign_verdict: one-sided binomial p <= 1/16); otherwise the report
  says it is within the noise (≈), whatever the median.
- One connection: this VM switches every few seconds between speed states
  1.3-2x apart that slow BOTH cores (the load generator's own CPU per round
  trip moves with the server's, in every server's slices: quiet run of
  b3c172d, e.g. 16 KiB x 1 at 13-15 µs for every server, 22-26 µs in six
  consecutive slices); per-slice steal is recorded to see whether the
  hypervisor accounts it. Pairing a slice with one
  of the other state is what made the rounds disagree. So one-connection
  cells run twice the rounds at half the slice length, a slice whose
  generator spent over 1.2x its least per round trip against the same server
  is left out as slow (mark_slow_machine; so is one whose speed probe,
  benchmarks/speedprobe.c on the server's core just before and after it, was
  over 1.2x the cell's least), the servers are compared on their
  fast-state slices unpaired (mann_whitney_verdict), and the report prints
  companions that do not move with the state (the server's CPU in units of
  the generator's, its context switches per round trip, steal).
"""
import argparse
import datetime
import fnmatch
import importlib
import json
import math
import os
import platform
import re
import resource
import shutil
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import sysconfig
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SERVERS_DIR = os.path.join(HERE, "servers")
BUILD = os.path.join(HERE, "build")
LOGS = os.path.join(BUILD, "logs")
RESULTS = os.path.join(HERE, "results")
DOCS_MD = os.path.join(ROOT, "docs", "benchmarks.md")
DOCS_PNG = os.path.join(ROOT, "docs", "benchmarks.png")
LOADGEN = os.path.join(BUILD, "loadgen")
BEGIN_MARK = "<!-- BEGIN benchmarks/run.py results: generated, edits inside are overwritten -->"
END_MARK = "<!-- END benchmarks/run.py results -->"
REF = "c-uring"  # every ratio is "this server / C io_uring, same case, same round"
SERVER_CPU, LOADGEN_CPU = "0", "1"

C_PROGRAMS = {
    "loadgen": "loadgen.c",
    "c_uring_echo": "servers/c_uring_echo.c",
    "c_epoll_echo": "servers/c_epoll_echo.c",
    "speedprobe": "speedprobe.c",
}
# C built as an extension module of the Python running this script (a Python hook on a C
# io_uring loop: servers/py_floor.c)
PY_EXTENSIONS = {"_py_floor": ("servers/py_floor.c",),
                 "_py_floor_ring": ("servers/py_floor.c", "-DPY_FLOOR_RING_SEND")}


# --------------------------------------------------------------------------
# servers and cases

class Server:
    def __init__(self, key, label, argv, needs=(), c_binary=None, default=True):
        self.key, self.label, self._argv = key, label, argv
        self.needs = tuple(needs)  # python modules that must import
        self.c_binary = c_binary
        self.default = default  # in the matrix unless --servers/--only names it
        self.unavailable = None  # reason, when it cannot run at all

    def argv(self, port, args):
        return self._argv(port, args)


def _py(script, *extra):
    return lambda port, args: [sys.executable, os.path.join(SERVERS_DIR, script), str(port), *extra]


def _iocpnet(backend):
    return lambda port, args: [sys.executable, os.path.join(SERVERS_DIR, "iocpnet_echo.py"),
                               str(port), "--backend", backend, "--workers", str(args.workers)]


def _c(name):
    return lambda port, args: [os.path.join(BUILD, name), str(port)]


SERVERS = [
    Server("iocpnet-uring", "iocpnet io_uring", _iocpnet("io_uring"), needs=["iocpnet"]),
    Server("iocpnet-epoll", "iocpnet epoll", _iocpnet("epoll"), needs=["iocpnet"]),
    Server("uvloop-protocol", "uvloop Protocol", _py("uvloop_protocol.py"), needs=["uvloop"]),
    Server("aiofastnet-uvloop", "aiofastnet on uvloop", _py("aiofastnet_uvloop.py"),
           needs=["uvloop", "aiofastnet"]),
    # aiofastnet's own benchmark reads through a BufferedProtocol: measured on request
    Server("aiofastnet-uvloop-buffered", "aiofastnet on uvloop, BufferedProtocol",
           _py("aiofastnet_uvloop_buffered.py"), needs=["uvloop", "aiofastnet"], default=False),
    Server("asyncio-protocol", "asyncio Protocol", _py("asyncio_protocol.py")),
    # the style most asyncio application code is written in, but far behind
    # the rest: measured only when asked for (--servers / --only)
    Server("asyncio-streams", "asyncio streams", _py("asyncio_streams.py"), default=False),
    Server("c-uring", "C io_uring", _c("c_uring_echo"), c_binary="c_uring_echo"),
    Server("c-epoll", "C epoll", _c("c_epoll_echo"), c_binary="c_epoll_echo"),
    # c-uring's loop calling a Python OnRecv per completion that replies at once, and
    # nothing else: the best a library with a Python hook per completion can reach
    Server("py-floor", "Python hook on C io_uring, no library", _py("py_floor_echo.py"),
           c_binary="_py_floor", default=False),
    # the same with its replies queued on the ring and sent after the batch, as c-uring
    # sends: what giving up "a reply before the next hook" would be worth
    Server("py-floor-ring", "Python hook on C io_uring, replies after the batch",
           _py("py_floor_echo.py", "--ring-send"), c_binary="_py_floor_ring", default=False),
]


def fmt_size(n):
    return f"{n // 1024} KiB" if n >= 1024 and n % 1024 == 0 else f"{n} B"


class Case:
    """rate: None, as fast as the server echoes; else the load generator offers
    exactly that many messages (storm: connections) per second (loadgen -r), the
    same to every server: an equal-rate cell, which compares what each server's
    CPU costs per message at that load where the uncapped cell cannot (on two
    cores a load generator is saturated by the fast servers: see LG_LIMIT).
    burst_us: with a rate, offer it in ticks that far apart (loadgen -b), each
    connection writing its share of a tick in one send, so that every server
    gets its messages in batches as in the uncapped pipelined case."""

    def __init__(self, name, mode, size=64, conns=1, depth=1, idle_count=0, rate=None,
                 burst_us=None):
        self.name, self.mode, self.size, self.conns = name, mode, size, conns
        self.depth, self.idle_count, self.rate = depth, idle_count, rate
        self.burst_us = burst_us

    @property
    def label(self):
        at = f" at {human(self.rate)}/s" if self.rate else ""
        if self.rate and self.burst_us:
            at += f" in {self.burst_us / 1000:g} ms bursts"
        if self.mode == "pingpong":
            return f"ping-pong {fmt_size(self.size)} × {self.conns}{at}"
        if self.mode == "pipeline":
            return f"pipelined {self.depth} deep, {fmt_size(self.size)} × {self.conns}{at}"
        if self.mode == "connect":
            return f"connect storm, {self.conns} in flight{at}"
        return f"{self.idle_count:,} idle connections"

    @property
    def unit(self):
        return "conn/s" if self.mode == "connect" else "rt/s"

    def to_json(self):
        return dict(name=self.name, label=self.label, mode=self.mode, size=self.size,
                    conns=self.conns, depth=self.depth, idle_count=self.idle_count,
                    rate=self.rate, burst_us=self.burst_us)


def full_matrix(idle_count):
    cases = []
    for size, tag in ((64, "64"), (1024, "1k"), (16384, "16k")):
        for conns in (1, 10, 100):
            cases.append(Case(f"pp-{tag}-c{conns}", "pingpong", size, conns))
    for size, tag in ((64, "64"), (1024, "1k")):
        for conns in (10, 100):
            cases.append(Case(f"pl16-{tag}-c{conns}", "pipeline", size, conns, depth=16))
    cases.append(Case("storm-c50", "connect", 64, 50))
    cases.extend(equal_rate_cases())
    cases.append(Case(f"idle-{idle_count}", "idle", 64, idle_count=idle_count))
    return cases


BURST_US = 1000  # the pipelined equal-rate cells' tick: 8-10 messages per connection


def equal_rate_cases():
    """The cells whose uncapped form is load-generator-limited against the C
    servers (or every server), offered at a rate every server keeps: about
    0.6-0.7 of the slowest server's saturated rate on this 2-core machine, so
    the load generator stays under LG_LIMIT (figures: docs/benchmarks.md,
    the uncapped cells' rates and busy shares)."""
    return [Case("pp-64-c100-at100k", "pingpong", 64, 100, rate=100_000),
            # pipelined: in 1 ms bursts (loadgen -b), so that every server gets
            # its messages in batches; evenly spaced, every server woke for
            # nearly every message and sat at 0.90-0.99 of its core (Case). In
            # bursts asyncio, the costliest, took ~0.5 µs per round trip at
            # 64 B and ~0.6-0.66 at 1 KiB (run of 20:36, machine loaded): at
            # 1M and 800k/s it stays under 0.7 of a core even in one of the
            # VM's slow states (1.4x), C io_uring at ~0.3 and ~0.4
            Case("pl16-64-c100-at1M", "pipeline", 64, 100, depth=16, rate=1_000_000,
                 burst_us=BURST_US),
            Case("pl16-1k-c100-at800k", "pipeline", 1024, 100, depth=16, rate=800_000,
                 burst_us=BURST_US),
            Case("storm-c50-at12k", "connect", 64, 50, rate=12_000)]


def quick_matrix(idle_count):
    return [
        Case("pp-64-c10", "pingpong", 64, 10),
        Case("pl16-1k-c10", "pipeline", 1024, 10, depth=16),
        Case("storm-c50", "connect", 64, 50),
        Case(f"idle-{idle_count}", "idle", 64, idle_count=idle_count),
    ]


# --------------------------------------------------------------------------
# small system helpers

def log(msg=""):
    print(msg, flush=True)


def warn(msg):
    print(f"WARNING: {msg}", file=sys.stderr, flush=True)


def proc_cpu_s(pid):
    """utime+stime of a whole process (all threads, live or exited)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def proc_rss_kb(pid):
    for name, key in (("smaps_rollup", "Rss:"), ("status", "VmRSS:")):
        try:
            with open(f"/proc/{pid}/{name}") as f:
                for line in f:
                    if line.startswith(key):
                        return int(line.split()[1])
        except OSError:
            continue
    return None


def proc_hwm_kb(pid):
    """Peak resident set of a process since it started (VmHWM)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def machine_busy_s():
    """CPU seconds all CPUs spent running processes since boot (user, nice,
    system), for spotting other load. irq/softirq time is left out: the
    kernel accounts loopback packet processing there, outside every process,
    and it grows with the benchmark's own traffic."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    # user nice system idle iowait irq softirq steal ...
    return (v[0] + v[1] + v[2]) / os.sysconf("SC_CLK_TCK")


def cpu_steal_s():
    """Steal time of each CPU since boot, {"0": s, "1": s}: time the
    hypervisor ran something else while this VM's CPU wanted to run (the
    eighth column of the cpuN lines of /proc/stat)."""
    out = {}
    try:
        with open("/proc/stat") as f:
            for line in f:
                if line.startswith("cpu") and line[3:4].isdigit():
                    v = line.split()
                    out[v[0][3:]] = int(v[8]) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        pass
    return out


def proc_ctx_switches(pid):
    """(voluntary, involuntary) context switches summed over a process's
    threads: a server that sleeps for each message and is woken for the next
    makes one voluntary switch per wake-up, whatever the machine's speed."""
    vol = invol = 0
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return None
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/status") as f:
                for line in f:
                    if line.startswith("voluntary_ctxt_switches:"):
                        vol += int(line.split()[1])
                    elif line.startswith("nonvoluntary_ctxt_switches:"):
                        invol += int(line.split()[1])
        except (OSError, ValueError):
            continue
    return vol, invol


def children_cpu_s():
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def tail(path, lines=15):
    try:
        with open(path, "rb") as f:
            data = f.read()[-8000:].decode("utf-8", "replace")
        return "\n".join(data.splitlines()[-lines:])
    except OSError:
        return ""


def machine_info():
    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    def version_of(cmd):
        try:
            return subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout.splitlines()[0]
        except Exception:
            return None
    commit = version_of(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"])
    # results from a work tree with uncommitted library changes must say so
    dirty = version_of(["git", "-C", ROOT, "status", "--porcelain", "--", "src", "setup.py",
                        "pyproject.toml"])
    return {
        "git_dirty": bool(dirty),
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "kernel": platform.release(),
        "cpu_model": cpu,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "python_executable": sys.executable,
        "gcc": version_of(["gcc", "--version"]),
        "git_commit": commit,
    }


def _die_with_parent():
    # Runs in the child between fork and exec: if this script dies without a
    # chance to clean up (SIGKILL), the kernel kills the child too.
    try:
        import ctypes
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:
        pass


# --------------------------------------------------------------------------
# build and dependencies

def _source_mtime(path):
    """The newest of a C file and the local files it #includes ("x.c": py_floor.c builds
    on c_uring_echo.c), so that a change to either rebuilds."""
    newest = os.path.getmtime(path)
    with open(path) as f:
        for inc in re.findall(r'^#include "([^"]+)"', f.read(), re.M):
            dep = os.path.join(os.path.dirname(path), inc)
            if os.path.exists(dep):
                newest = max(newest, _source_mtime(dep))
    return newest


def build_c():
    """gcc -O2 each C program into benchmarks/build/ when its source is newer."""
    os.makedirs(BUILD, exist_ok=True)
    builds = [(name, os.path.join(HERE, src), os.path.join(BUILD, name), [])
              for name, src in C_PROGRAMS.items()]
    ext = sysconfig.get_config_var("EXT_SUFFIX")
    builds += [(name, os.path.join(HERE, src), os.path.join(BUILD, name + ext),
                ["-shared", "-fPIC", *defines, "-I" + sysconfig.get_paths()["include"]])
               for name, (src, *defines) in PY_EXTENSIONS.items()]
    failed = {}
    for name, src_path, out, flags in builds:
        if os.path.exists(out) and os.path.getmtime(out) >= _source_mtime(src_path):
            continue
        log(f"building {os.path.relpath(out, ROOT)}")
        r = subprocess.run(["gcc", "-O2", "-Wall", *flags, "-o", out, src_path],
                           capture_output=True, text=True)
        if r.returncode != 0:
            failed[name] = r.stderr.strip()[-2000:]
            print(r.stderr, file=sys.stderr)
    return failed


def pip_install(what, timeout=900):
    log(f"installing {what} with pip ...")
    # own process group: on Ctrl-C or a timeout the whole build (pip starts
    # a build backend, which starts compilers) goes, not just pip itself
    p = subprocess.Popen([sys.executable, "-m", "pip", "install", "-q", what],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         start_new_session=True, preexec_fn=_die_with_parent)
    try:
        out, _ = p.communicate(timeout=timeout)
    except BaseException:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        p.wait()
        raise
    if p.returncode != 0:
        return out.strip()[-1500:] or f"pip exited {p.returncode}"
    importlib.invalidate_caches()
    return None


def snapshot_tree(dest):
    """Copy the files git would consider part of the tree (tracked, plus new
    files that are not ignored) to dest; fall back to a filtered copy."""
    try:
        files = subprocess.run(["git", "-C", ROOT, "ls-files", "-z", "--cached", "--others",
                                "--exclude-standard"], capture_output=True, check=True,
                               timeout=60).stdout.decode().split("\0")
    except (OSError, subprocess.SubprocessError):
        shutil.copytree(ROOT, dest, symlinks=True, ignore=shutil.ignore_patterns(
            ".git", "build", "dist", "*.egg-info", "__pycache__", ".venv*", "*.so"))
        return
    for rel in files:
        if not rel or rel.startswith("benchmarks/"):
            continue
        src = os.path.join(ROOT, rel)
        if not os.path.isfile(src):  # deleted in the work tree
            continue
        os.makedirs(os.path.dirname(os.path.join(dest, rel)), exist_ok=True)
        shutil.copy2(src, os.path.join(dest, rel))


def try_import(name):
    try:
        mod = importlib.import_module(name)
        return mod, None
    except Exception as e:  # a broken build raises more than ImportError
        sys.modules.pop(name, None)
        return None, f"{type(e).__name__}: {e}"


def ensure_module(name):
    """Import a peer's library (uvloop, aiofastnet); pip-install it once if missing."""
    mod, err = try_import(name)
    if mod:
        return mod, None
    perr = pip_install(name)
    if perr:
        return None, f"{name} missing and pip install failed: {perr}"
    return try_import(name)


def ensure_iocpnet(force_reinstall):
    """Import iocpnet; if that fails and the source tree is here, pip-install it once."""
    src = os.path.join(ROOT, "src", "iocpnet")
    mod, err = (None, "reinstall requested") if force_reinstall else try_import("iocpnet")
    if mod:
        _warn_if_stale(mod, src)
        return mod, None
    if not os.path.isdir(src):
        return None, f"import iocpnet failed ({err}) and there is no src/iocpnet to build"
    if not any(os.path.exists(os.path.join(ROOT, f)) for f in ("pyproject.toml", "setup.py")):
        return None, (f"import iocpnet failed ({err}) and the repo has no pyproject.toml or "
                      "setup.py yet, so it cannot be built")
    log(f"import iocpnet failed ({err}); building it: pip install -q {ROOT} (from a copy)")
    # Build from a snapshot in a temporary directory: an in-place build would
    # write build/, *.egg-info and generated C into a tree that others are
    # editing and building at the same time.
    import tempfile
    with tempfile.TemporaryDirectory(prefix="iocpnet-bench-") as tmp:
        snap = os.path.join(tmp, "iocpnet")
        snapshot_tree(snap)
        try:
            perr = pip_install(snap)
        except subprocess.TimeoutExpired:
            return None, "pip install of iocpnet timed out"
    if perr:
        last = [ln for ln in perr.splitlines() if ln.strip()][-1:] or ["?"]
        return None, f"pip install of the repo failed: {last[0].strip()}\n{perr}"
    mod, err2 = try_import("iocpnet")
    if not mod:
        return None, f"still not importable after pip install: {err2}"
    return mod, None


def _warn_if_stale(mod, src):
    # A pip-installed copy is not rebuilt by this script; say so when the
    # sources are newer, or the numbers would silently be for an old build.
    path = getattr(mod, "__file__", None) or ""
    if not path or not os.path.isdir(src) or os.path.abspath(path).startswith(os.path.abspath(src)):
        return
    # the built extension's time, not __init__.py's (a copy keeps the sources' times)
    built = [os.path.join(os.path.dirname(path), f) for f in os.listdir(os.path.dirname(path))
             if f.startswith("_core") and f.endswith((".so", ".pyd"))]
    installed = max([os.path.getmtime(f) for f in built] or [os.path.getmtime(path)])
    newest = max((os.path.getmtime(os.path.join(d, f)) for d, _, fs in os.walk(src) for f in fs
                  if not f.endswith((".so", ".pyd", ".pyc", ".c", ".html"))
                  or f.endswith((".c",)) and "port" in d),
                 default=0)
    if newest > installed:
        warn(f"the installed iocpnet ({path}) is older than src/iocpnet; "
             "pass --reinstall-iocpnet to benchmark the current sources")


# --------------------------------------------------------------------------
# running processes

class Running:
    """A started server: Popen, port and log file."""

    def __init__(self, server, port, proc, logpath):
        self.server, self.port, self.proc, self.logpath = server, port, proc, logpath
        self.failed = None  # reason once it failed in the current case

    @property
    def pid(self):
        return self.proc.pid


_live = []  # every Running not yet stopped: killed on exit whatever happens


def free_port(start):
    """First port >= start that can be bound. Starting below the ephemeral
    range keeps the load generator's own outgoing ports from colliding."""
    port = start
    while port < 65535:
        s = socket.socket()
        try:
            s.bind(("127.0.0.1", port))
            return port
        except OSError:
            port += 1
        finally:
            s.close()
    raise RuntimeError("no free port")


def pin(cpu, argv):
    return (["taskset", "-c", cpu] + argv) if shutil.which("taskset") else argv


def start_server(server, port, args, tag):
    os.makedirs(LOGS, exist_ok=True)
    logpath = os.path.join(LOGS, f"{tag}-{server.key}.log")
    with open(logpath, "wb") as logf:
        # taskset execs the server, so proc.pid is the server itself
        proc = subprocess.Popen(pin(SERVER_CPU, server.argv(port, args)), cwd=SERVERS_DIR,
                                stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
                                start_new_session=True, preexec_fn=_die_with_parent)
    r = Running(server, port, proc, logpath)
    _live.append(r)
    return r


def wait_ready(r, timeout=10.0):
    """Accepting is not enough: wait until a probe message comes back."""
    deadline = time.monotonic() + timeout
    probe = b"ready?"
    while time.monotonic() < deadline:
        if r.proc.poll() is not None:
            return f"exited with code {r.proc.returncode} during start-up"
        try:
            with socket.create_connection(("127.0.0.1", r.port), timeout=1.0) as s:
                s.sendall(probe)
                got = b""
                while len(got) < len(probe):
                    chunk = s.recv(64)
                    if not chunk:
                        break
                    got += chunk
                if got == probe:
                    return None
        except OSError:
            pass
        time.sleep(0.05)
    return f"not echoing on port {r.port} after {timeout:.0f} s"


def stop_servers(rs, grace=3.0):
    """SIGTERM each process group, SIGKILL what is left after `grace` seconds.
    All at once, so a server with a slow graceful shutdown costs its grace
    period once per case, not once per server. Returns {Running: note}."""
    notes = {}
    for r in rs:
        if r.proc.poll() is None:
            try:
                os.killpg(r.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + grace
    for r in rs:
        try:
            r.proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            notes[r] = f"did not exit within {grace:.0f} s of SIGTERM; killed"
    for r in rs:
        try:  # also whatever it left behind in its group
            os.killpg(r.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            r.proc.wait(5)
        except subprocess.TimeoutExpired:
            notes[r] = "could not be killed"
        if r in _live:
            _live.remove(r)
    return notes


def stop_server(r, grace=3.0):
    return stop_servers([r], grace).get(r)


def stop_all():
    stop_servers(list(_live), grace=1.0)


def run_loadgen(argv, timeout):
    """Run the load generator on its CPU; returns (json or None, error or None)."""
    try:
        p = subprocess.run(pin(LOADGEN_CPU, [LOADGEN] + argv), capture_output=True, text=True,
                           timeout=timeout, start_new_session=True,
                           preexec_fn=_die_with_parent)
    except subprocess.TimeoutExpired:
        return None, f"load generator timed out after {timeout:.0f} s"
    err = p.stderr.strip()
    if p.returncode != 0:
        kind = {3: "DATA MISMATCH", 2: "connection error"}.get(p.returncode, f"exit {p.returncode}")
        return None, f"{kind}: {err[-800:]}"
    try:
        return json.loads(p.stdout), None
    except ValueError:
        return None, f"unparsable load generator output: {p.stdout[-300:]!r} {err[-300:]}"


# --------------------------------------------------------------------------
# measuring

# One-connection ping-pong cells run C1_ROUNDS times the rounds with slices
# 1/C1_ROUNDS as long (same time in all): the machine's speed drifts over
# seconds (see aggregate), so paired slices measured closer together, and
# more pairs, are what lets a sign test over the rounds resolve a difference.
C1_ROUNDS = 2


def is_c1(case):
    return case.mode == "pingpong" and case.conns == 1 and not case.rate


def case_rounds(case, args):
    return args.rounds * C1_ROUNDS if is_c1(case) else args.rounds


def case_slice(case, args):
    return max(0.25, args.slice / C1_ROUNDS) if is_c1(case) else args.slice


def slice_argv(case, r, args, withhold=0.0):
    argv = ["-p", str(r.port), "-m", case.mode, "-c", str(case.conns), "-s", str(case.size),
            "-w", str(args.warmup), "-t", str(case_slice(case, args)), "-P", str(r.pid)]
    if withhold:
        argv += ["-H", str(withhold)]
    if case.mode == "pipeline":
        argv += ["-d", str(case.depth)]
    if case.rate:
        argv += ["-r", str(case.rate)]
        if case.burst_us:
            argv += ["-b", str(case.burst_us)]
    if args.engine and case.mode in ("pingpong", "pipeline"):
        argv += ["-e", args.engine]
    return argv


SPEEDPROBE_MS = 30  # each core's speed probe around a slice
_last_speeds = [0.0, {}]  # (monotonic time, core_speeds()) of the last probe


WITNESS_MS = 20  # speedprobe mem and wake around one-connection slices (see core_speeds)


def _speedprobe(kind, ms, cpus):
    """benchmarks/speedprobe.c KIND on each of cpus at once (None: not pinned,
    the probe pins its own threads): {cpu: unit_us_median}, what answered."""
    exe = os.path.join(BUILD, "speedprobe")
    if not os.path.exists(exe):
        return {}
    procs = {}
    for cpu in cpus:
        argv = [exe, str(ms), kind]
        procs[cpu] = subprocess.Popen(pin(cpu, argv) if cpu else argv, stdout=subprocess.PIPE,
                                      stderr=subprocess.DEVNULL, text=True,
                                      preexec_fn=_die_with_parent)
    out = {}
    for cpu, p in procs.items():
        try:
            o, _ = p.communicate(timeout=10)
            out[cpu] = json.loads(o)["unit_us_median"]
        except (subprocess.TimeoutExpired, ValueError, KeyError):
            p.kill()
            p.wait()
    return out


def core_speeds(witnesses=False):
    """µs of CPU time one unit of register-only work took on each CPU, both
    probed at once (benchmarks/speedprobe.c): a server-independent index of
    the machine's speed state at that moment, {"0": µs, "1": µs}, or {}.
    witnesses: also the two other server-independent probes, to find out
    which of them moves with the one-connection slow state that the
    register-only unit does not see (speedprobe.c): "mem0"/"mem1", a
    pointer chase on each CPU (µs per 1024 dependent loads), and "wake",
    a byte passed between threads sleeping on CPU 0 and CPU 1 (µs per round
    trip). Recorded and reported (witness_summary), in no filter yet."""
    out = _speedprobe("alu", SPEEDPROBE_MS, (SERVER_CPU, LOADGEN_CPU))
    if witnesses and out:
        out.update({f"mem{cpu}": v for cpu, v in
                    _speedprobe("mem", WITNESS_MS, (SERVER_CPU, LOADGEN_CPU)).items()})
        out.update({"wake": v for v in _speedprobe("wake", WITNESS_MS, (None,)).values()})
    return out


def run_slice(case, r, others, args, withhold=0.0):
    """One measured slice against one server, with bookkeeping of what else
    used the CPUs meanwhile (other servers, other processes on the box).
    withhold > 0: a headroom probe (the load generator runs on 1 - withhold
    of its core; see PROBE_WITHHOLD)."""
    # the cores' speed state around every traffic slice (used to leave out
    # slices at one connection; shown for every case: speed_states_md)
    # the previous slice's "after" probe is this one's "before" when it was
    # just taken (consecutive slices): one probe per slice, not two
    witnesses = is_c1(case)
    speed0 = (_last_speeds[1] if time.monotonic() - _last_speeds[0] < 0.5
              and (not witnesses or "wake" in _last_speeds[1]) else None) \
        or core_speeds(witnesses)
    wall0, busy0, kids0 = time.monotonic(), machine_busy_s(), children_cpu_s()
    steal0, ctx0 = cpu_steal_s(), proc_ctx_switches(r.pid)
    srv0 = proc_cpu_s(r.pid)
    oth0 = {o.server.key: proc_cpu_s(o.pid) for o in others}
    res, err = run_loadgen(slice_argv(case, r, args, withhold),
                           timeout=args.warmup + case_slice(case, args) + 30)
    wall = time.monotonic() - wall0
    steal1, ctx1 = cpu_steal_s(), proc_ctx_switches(r.pid)
    busy, kids = machine_busy_s() - busy0, children_cpu_s() - kids0
    srv1 = proc_cpu_s(r.pid)
    per = {}
    for o in others:
        c1 = proc_cpu_s(o.pid)
        if c1 is not None and oth0.get(o.server.key) is not None:
            per[o.server.key] = c1 - oth0[o.server.key]
    # after every figure of the slice was read: the probes are in none of them
    speed1 = core_speeds(witnesses)
    _last_speeds[:] = [time.monotonic(), speed1]
    bystanders = sum(per.values())
    if res is not None:
        srv = (srv1 - srv0) if (srv1 is not None and srv0 is not None) else 0.0
        # what neither the server, the load generator nor the idle servers used
        res["other_load_cores"] = max(0.0, busy - srv - kids - bystanders) / wall
        res["bystander_cpu_s"] = bystanders
        res["bystanders"] = {k: round(v / wall, 4) for k, v in per.items() if v > 0}
        # steal on the server's and the load generator's CPU over the slice
        # (warm-up included: the slice as a whole), and the server's context
        # switches (warm-up included too: per round trip they are a rate)
        res["steal_s"] = {cpu: round(steal1.get(cpu, 0) - steal0.get(cpu, 0), 4)
                          for cpu in (SERVER_CPU, LOADGEN_CPU) if cpu in steal0}
        res["wall_s"] = wall
        if speed0 and speed1:
            res["core_speed"] = {"before": speed0, "after": speed1}
        if ctx0 and ctx1:
            res["server_ctx_switches"] = [ctx1[0] - ctx0[0], ctx1[1] - ctx0[1]]
        res["disturbed"] = disturbance(res)
    return res, err


DISTURBED = 0.25  # cores of "other load" above which a slice is considered disturbed
# Run delay (time a thread was runnable while another task held its core)
# as a share of the window, above which a slice is considered disturbed: the
# load generator is alone on its core, so any delay there is someone else;
# the server's threads may delay each other a little (iocpnet's workers).
LG_DELAY_MAX, SERVER_DELAY_MAX = 0.02, 0.05
LG_LIMIT = 0.90  # load generator busy above this: the cell does not compare servers
SERVER_LIMIT = 0.90  # server cores at or above this: the server was the limit
RATE_HOLD = 0.97  # an equal-rate cell: a server below this share of the rate fell behind
# Headroom probe. The busy share of a busy-poller overstates what it needs
# when a server's echoes trickle in: it handles each the moment it arrives,
# one kernel entry apiece, where with less CPU it would take them in bigger
# batches at the same rate (loadgen.c, handicap_pause). So a cell whose load
# generator was busy above LG_LIMIT while its server ran at SERVER_LIMIT or
# more gets PROBE_SLICES extra slices in which the load generator withholds
# PROBE_WITHHOLD of its core from itself in every other 100 ms phase and
# counts the echoes of both kinds of phase apart (the rates are compared
# within one slice: the machine's drift between slices does not enter). If
# the rate holds (median over the probe slices of withheld-phase rate /
# free-phase rate at least PROBE_HOLD), it needed at most 1 - the share
# really withheld: the server was the limit and the cell compares servers.
# Otherwise, or when the probes could not run, the cell
# stays "load generator". Probe slices are in no other figure.
PROBE_WITHHOLD, PROBE_HOLD, PROBE_SLICES = 0.2, 0.97, 2
# Equal-rate (capped) cells are judged on whether the load generator HELD
# its schedule, not on its busy share: at a capped 1M messages/s nearly every
# pass of the busy-poller finds an echo to handle, so it is ~100 % busy
# against the fastest servers even when it has time to spare. loadgen -r
# reports, per slice, the starts that waited for their token and came more
# than 100 µs after it (or after the sender was ready) and the tokens the
# full bucket dropped while a sender waited (it was over 1 ms behind): as a
# share of the offered starts, that is its schedule miss. A capped cell
# compares servers when (a) the schedule miss is at most SCHED_MISS_MAX (else
# ‡ load generator), (b) the server kept RATE_HOLD of the offered rate (else
# "server (below the offered rate)"; ‡ if the generator was busy above
# LG_LIMIT: it may have been slow to take the echoes), (c) offered in
# bursts (loadgen -b), at most SCHED_MISS_MAX of the messages went out after
# their tick because the window was still full (else "server (behind the
# bursts)": it was offered smaller batches at its echoes' times, not its
# peers' schedule; ‡ with the generator above LG_LIMIT), and (d) the server ran below
# CAPPED_SATURATED of its core (else "server (saturated at the offered
# rate)": its queue, not the schedule, set its batches, and its CPU per
# round trip is a lower bound of what the rate costs it). Then its server
# CPU per round trip compares servers whatever the generator's busy share.
# A burst's messages count late, all of them, when the pass that hands
# out its tick comes more than 100 µs after the tick fell due.
# Uncapped cells keep LG_LIMIT and the headroom probe.
SCHED_MISS_MAX, CAPPED_SATURATED = 0.02, 0.95
# A difference is resolved only when the rounds agree on its side: a sign
# test over the per-round paired ratios (one-sided binomial p at most
# SIGN_ALPHA = 1/16: every round of 4 or 5, 7 of 8, 8 of 9 or 10...). Else it
# is within the noise, whatever the median says.
SIGN_ALPHA = 1 / 16
# A one-connection slice whose load generator spent more than SLOW_MACHINE
# times its least CPU per round trip against the same server ran in one of
# this VM's slow states (both cores slower together for seconds, by 1.3-2x:
# see one_connection_md): it is in no median and no pair of that cell, and
# the servers are compared on the slices of the fast state only.
SLOW_MACHINE = 1.2


def sign_verdict(rounds, threshold=1.0):
    """'ahead' (the rounds are above threshold beyond chance), 'behind', or
    'noise'; with the counts. Ties count for neither side."""
    above = sum(1 for x in rounds if x > threshold)
    below = sum(1 for x in rounds if x < threshold)
    n = above + below

    def tail(k):  # P(X >= k), X ~ Binomial(n, 1/2)
        return sum(math.comb(n, i) for i in range(k, n + 1)) / 2 ** n if n else 1.0
    if above > below and tail(above) <= SIGN_ALPHA:
        v = "ahead"
    elif below > above and tail(below) <= SIGN_ALPHA:
        v = "behind"
    else:
        v = "noise"
    return {"verdict": v, "above": above, "below": below, "rounds": len(rounds)}


def loadgen_us_per_rt(s, count_key="roundtrips"):
    """The load generator's own working time per round trip in a slice: at
    one connection it does the same work whatever the server (within ~5 %),
    so it tracks the machine's speed: a speed index for that slice."""
    n = s.get(count_key) or 0
    busy = s.get("loadgen_busy")
    return busy * s["window_s"] / n * 1e6 if n and busy else None


def capped_verdict(case, slices, rate_median, cores, lg_busy=0.0):
    """The CAPPED rule (see SCHED_MISS_MAX) for an equal-rate cell: returns
    (limited_by, excluded or None, schedule summary or None). None as
    limited_by when the slices carry no schedule figures (a run saved before
    loadgen reported them): the caller then applies the busy rule."""
    sch = [s["sched"] for s in slices if s.get("sched") and s["sched"].get("offered")]
    if not sch or len(sch) < len(slices):
        return None, None, None
    miss = statistics.median((x.get("late", 0) + x.get("lost_late", 0)) / x["offered"]
                             for x in sch)
    summary = {"miss": miss, "lag_us": statistics.median(x.get("lag_us_mean", 0) for x in sch),
               "lost_full": statistics.median(x.get("lost_full", 0) / x["offered"] for x in sch)}
    if any("burst_us" in x for x in sch):
        summary["deferred"] = statistics.median(x.get("deferred", 0) / x["offered"] for x in sch)
    if miss > SCHED_MISS_MAX:
        return ("load generator",
                f"load generator behind its schedule ({miss:.1%} of the starts late)", summary)
    if rate_median < RATE_HOLD * case.rate:
        # the echoes set the pace (every window full); but a generator that
        # was busy above LG_LIMIT may have been slow to take them: then
        # either side may have held the rate down, and the cell is ‡
        if lg_busy > LG_LIMIT:
            return ("load generator",
                    f"kept {rate_median / case.rate:.0%} of the offered rate with the load "
                    f"generator {lg_busy:.0%} busy (either side)", summary)
        return ("server (below the offered rate)",
                f"kept {rate_median / case.rate:.0%} of the offered rate", summary)
    if summary.get("deferred", 0) > SCHED_MISS_MAX:
        # bursts: a window still full at its tick, sent when the echoes let
        # it: this server was over a tick behind, so it was offered another
        # schedule (smaller batches, at the echoes' times) than its peers
        why = f"{summary['deferred']:.1%} of the messages sent after their burst"
        if lg_busy > LG_LIMIT:
            return ("load generator", f"{why}, with the load generator {lg_busy:.0%} busy "
                    "(either side)", summary)
        return "server (behind the bursts)", why, summary
    if cores >= CAPPED_SATURATED:
        return ("server (saturated at the offered rate)",
                f"server saturated at the offered rate ({cores:.2f} cores)", summary)
    return "the offered rate", None, summary


def disturbance(res):
    """Why a slice does not measure what it should (another process had a
    core), or None."""
    w = res["window_s"]
    why = []
    if res.get("loadgen_run_delay_s", 0) / w > LG_DELAY_MAX:
        why.append(f"load generator waited {res['loadgen_run_delay_s'] / w:.0%} of the window "
                   "for its core")
    if res.get("server_run_delay_s", 0) / w > SERVER_DELAY_MAX:
        why.append(f"server waited {res['server_run_delay_s'] / w:.0%} of the window for its core")
    if res["other_load_cores"] > DISTURBED:
        why.append(f"other processes used {res['other_load_cores']:.2f} cores")
    return "; ".join(why) or None


class RetryBudget:
    """Extra seconds allowed for re-measuring disturbed slices, so that a busy
    machine cannot stretch a run without limit."""

    def __init__(self, seconds):
        self.left = seconds
        self.retried = 0


def measure(case, r, others, args, progress, rnd):
    """run_slice, re-run once when other processes disturbed it and the retry
    budget allows; the less disturbed of the two is kept (and says so)."""
    res, err = run_slice(case, r, others, args)
    budget = args.retry_budget
    cost = args.warmup + case_slice(case, args) + SLICE_OVERHEAD
    if err or not res["disturbed"] or budget.left < cost:
        return res, err
    progress.line(f"{case.name} round {rnd + 1}/{case_rounds(case, args)} {r.server.label}: disturbed "
                  f"({res['disturbed']}); measuring again")
    budget.left -= cost
    budget.retried += 1
    time.sleep(0.3)
    res2, err2 = run_slice(case, r, others, args)
    if err2:
        return res2, err2

    def badness(x):
        w = x["window_s"]
        return (x.get("loadgen_run_delay_s", 0) / w + x.get("server_run_delay_s", 0) / w
                + x["other_load_cores"])
    best = res2 if badness(res2) < badness(res) else res
    best["retried"] = True
    return best, None


def server_died(r):
    if r.proc.poll() is None:
        return None
    return f"server exited with code {r.proc.returncode}; log tail:\n{tail(r.logpath)}"


class Progress:
    def __init__(self, planned_s):
        self.t0 = time.monotonic()
        self.planned = planned_s

    def line(self, msg):
        el = time.monotonic() - self.t0
        log(f"[{el / 60:4.1f}/{self.planned / 60:.1f} min] {msg}")


def start_case_servers(case, servers, args, port_base):
    running, port = [], port_base
    for s in servers:
        port = free_port(port)
        running.append(start_server(s, port, args, case.name))
        port += 1
    for r in running:
        err = wait_ready(r)
        if err:
            r.failed = f"did not start: {err}\n{tail(r.logpath)}"
            stop_server(r)
    return running


def run_traffic_case(case, servers, args, progress, record):
    running = start_case_servers(case, servers, args, args.port_base)
    try:
        for rnd in range(case_rounds(case, args)):
            k = rnd % len(running)
            order = running[k:] + running[:k]  # rotate: no server always goes first
            for r in order:
                if r.failed:
                    continue
                others = [o for o in running if o is not r and not o.failed]
                res, err = measure(case, r, others, args, progress, rnd)
                for o in others:  # a bystander that crashed is reported now, not later
                    d = server_died(o)
                    if d:
                        o.failed = d
                        progress.line(f"{case.name}: {o.server.label} died while idle")
                died = server_died(r)
                if died or err:
                    r.failed = died or err
                    if died is None and err:
                        r.failed += f"\nserver log tail:\n{tail(r.logpath)}"
                    progress.line(f"{case.name} round {rnd + 1}/{case_rounds(case, args)} "
                                  f"{r.server.label}: FAILED: {r.failed.splitlines()[0]}")
                    stop_server(r)
                    continue
                res["round"] = rnd
                record[r.server.key]["slices"].append(res)
                rate = res["conn_per_s"] if case.mode == "connect" else res["rt_per_s"]
                count = res["connections"] if case.mode == "connect" else res["roundtrips"]
                cpu = res.get("server_cpu_s", 0) / res["window_s"]
                per = res.get("server_cpu_s", 0) / count * 1e6 if count else 0.0
                flag = "  DISTURBED" if res["disturbed"] else ""
                sch = res.get("sched")
                if sch and sch.get("offered"):
                    flag = (f"  schedule miss "
                            f"{(sch['late'] + sch['lost_late']) / sch['offered']:.1%}" + flag)
                progress.line(f"{case.name} round {rnd + 1}/{case_rounds(case, args)} {r.server.label:20} "
                              f"{human(rate):>7} {case.unit}  server {cpu:4.2f} cores "
                              f"{per:6.2f} µs each  loadgen busy {res['loadgen_busy']:4.0%}"
                              f"{flag}")
        run_probes(case, running, args, progress, record)
    finally:
        for r in running:  # the peak resident set over the whole case
            if not r.failed and r.proc.poll() is None:
                record[r.server.key]["peak_rss_kb"] = proc_hwm_kb(r.pid)
        notes = stop_servers(running)
        for r in running:
            if notes.get(r):
                record[r.server.key]["stop_note"] = notes[r]
            if r.failed:
                record[r.server.key]["status"] = "failed"
                record[r.server.key]["error"] = r.failed


def probe_candidates(case, running, record):
    """Servers of this case whose load generator was busy above LG_LIMIT
    while the server ran at SERVER_LIMIT or more (medians over the undisturbed
    slices): the cells a headroom probe may show to compare servers."""
    out = []
    for r in running:
        sl = [s for s in record[r.server.key]["slices"] if not s.get("disturbed")]
        if r.failed or not sl:
            continue
        busy = statistics.median(s["loadgen_busy"] for s in sl)
        cores = statistics.median(s.get("server_cpu_s", 0) / s["window_s"] for s in sl)
        if busy > LG_LIMIT and cores >= SERVER_LIMIT:
            out.append(r)
    return out


def run_probes(case, running, args, progress, record):
    """PROBE_SLICES headroom-probe slices per candidate, interleaved, while
    --budget allows (a probe that does not fit is skipped: the cell then
    stays "load generator")."""
    # an equal-rate cell is judged by its schedule (CAPPED rule), not busy
    cands = [] if case.rate else probe_candidates(case, running, record)
    cost = args.warmup + case_slice(case, args) + SLICE_OVERHEAD
    for i in range(PROBE_SLICES):
        for r in cands:
            if r.failed or r.proc.poll() is not None:
                continue
            if time.monotonic() + cost > progress.t0 + args.budget * 60:
                progress.line(f"{case.name} {r.server.label}: no time left for a headroom probe")
                return
            others = [o for o in running if o is not r and not o.failed]
            res, err = run_slice(case, r, others, args, withhold=PROBE_WITHHOLD)
            if err or res is None:
                progress.line(f"{case.name} probe {r.server.label}: {err}")
                continue
            rate_key, _ = keys_for(case)
            record[r.server.key].setdefault("probes", []).append(res)
            flag = "  DISTURBED" if res["disturbed"] else ""
            progress.line(f"{case.name} probe {i + 1}/{PROBE_SLICES} {r.server.label:20} "
                          f"{human(res.get('probe_withheld_rate', 0)):>7} {case.unit} with "
                          f"{res.get('probe_withheld_share', 0):.0%} of the load generator's core "
                          f"withheld, {human(res.get('probe_free_rate', 0)):>7} without: "
                          f"{res.get('probe_rate_ratio', 0):.1%}{flag}")


def run_idle_case(case, servers, args, progress, record):
    """One server at a time: start, warm-up connection, baseline RSS, hold N
    idle connections (the load generator samples RSS while holding), close."""
    for s in servers:
        rec = record[s.key]
        r = start_server(s, free_port(args.port_base), args, case.name)
        try:
            err = wait_ready(r)
            if err:
                rec["status"], rec["error"] = "failed", f"did not start: {err}\n{tail(r.logpath)}"
                progress.line(f"{case.name} {s.label}: FAILED to start")
                continue
            # the "one warm-up connection" that the baseline includes
            warm, err = run_loadgen(["-p", str(r.port), "-m", "pingpong", "-c", "1", "-w", "0.1",
                                     "-t", "0.2"], timeout=30)
            time.sleep(0.3)  # let the server finish closing it
            res = None
            if not err:
                res, err = run_loadgen(["-p", str(r.port), "-m", "idle", "-n", str(case.idle_count),
                                        "-i", str(args.idle_hold), "-C", "64", "-T", "60",
                                        "-P", str(r.pid)],
                                       timeout=args.idle_hold + 90)
            died = server_died(r)
            if died or err:
                rec["status"] = "failed"
                rec["error"] = died or f"{err}\nserver log tail:\n{tail(r.logpath)}"
                progress.line(f"{case.name} {s.label}: FAILED: {rec['error'].splitlines()[0]}")
                continue
            time.sleep(0.5)
            res["server_rss_after_close_kb"] = proc_rss_kb(r.pid)
            before, held = res["server_rss_before_kb"], res["server_rss_held_kb"]
            res["bytes_per_conn"] = (held - before) * 1024 / case.idle_count
            rec["slices"].append(res)
            progress.line(f"{case.name} {s.label:17} baseline {before / 1024:6.1f} MiB  "
                          f"held {held / 1024:6.1f} MiB  {res['bytes_per_conn']:7.0f} B/conn  "
                          f"set-up {res['setup_s']:.2f} s")
        finally:
            note = stop_server(r)
            if note:
                rec["stop_note"] = note


# --------------------------------------------------------------------------
# aggregation

def human(v):
    if v is None:
        return "–"
    for div, suf in ((1e6, "M"), (1e3, "k")):
        if abs(v) >= div:
            return f"{v / div:.3g}{suf}" if v / div < 100 else f"{v / div:.0f}{suf}"
    return f"{v:.3g}"


def keys_for(case):
    return (("conn_per_s", "connections") if case.mode == "connect"
            else ("rt_per_s", "roundtrips"))


def aggregate(case, record):
    """Per server: medians over the undisturbed slices, CPU per round trip over
    them, what limited the cell, and ratios to every other server taken round
    by round (the slices closest in time), median over rounds.

    A cell is DISTURBED when fewer than half of its slices were undisturbed
    (then its medians are over all slices, and it says so); a cell whose load
    generator was busy above LG_LIMIT measured the load generator.  Neither
    kind of cell is used in any ratio: a ratio is only taken between two cells
    that each measured their server."""
    rate_key, count_key = keys_for(case)
    if is_c1(case):
        mark_slow_machine(record)
        for rec in record.values():
            rec["c1"] = True
    for key, rec in record.items():
        sl = rec["slices"]
        if case.mode == "idle" or not sl:
            continue
        clean = [s for s in sl if not s.get("disturbed")]
        disturbed = len(clean) * 2 < len(sl)
        use = sl if disturbed else clean
        # one connection: the slices of the machine's fast state (mark_slow_machine)
        fast = [s for s in use if not s.get("slow_machine")]
        slow_left_out = len(use) - len(fast) if fast else 0
        use = fast or use
        cpu_total = sum(s.get("server_cpu_s", 0) for s in use)
        count = sum(s[count_key] for s in use)
        busy = [s.get("loadgen_busy", s["loadgen_cpu_s"] / s["window_s"]) for s in use]
        lg_busy = statistics.median(busy)
        cores = statistics.median(s.get("server_cpu_s", 0) / s["window_s"] for s in use)
        prev = rec.get("agg") or {}  # a saved summary keeps no latency per slice
        rate_median = statistics.median(s[rate_key] for s in use)
        probe = None
        probes = [s for s in rec.get("probes", []) if not s.get("disturbed")]
        if probes and not disturbed:
            ratio = statistics.median(s.get("probe_rate_ratio", 0) for s in probes)
            # the share really withheld in the withheld phases (a pass longer
            # than the pause period delays the next pause: it can fall short)
            probe = {"withheld": statistics.median(s.get("probe_withheld_share", 0)
                                                   for s in probes),
                     "slices": len(probes), "rate_ratio": ratio,
                     "busy_of_rest": statistics.median(s["loadgen_busy"] for s in probes),
                     "held": False}
            # held: the rate stayed, the server was saturated, and what it
            # ran on (1 - withheld) is within the same LG_LIMIT rule
            probe["held"] = (ratio >= PROBE_HOLD and cores >= SERVER_LIMIT
                             and 1 - probe["withheld"] <= LG_LIMIT)
        # the load generator was the limit: busy above LG_LIMIT, and no
        # headroom probe showed it could keep the rate on less of its core
        lg_limit = lg_busy > LG_LIMIT and not (probe and probe["held"])
        # an equal-rate cell compares servers only where each kept the rate
        slow = bool(case.rate) and rate_median < RATE_HOLD * case.rate
        capped_why = None
        capped = (capped_verdict(case, use, rate_median, cores, lg_busy) if case.rate
                  else (None, None, None))
        sched = capped[2]  # shown for a DISTURBED cell too
        if disturbed:
            capped = (None, None, sched)
            limited_by = "DISTURBED"
        elif capped[0]:  # equal-rate cell with schedule figures: the CAPPED rule
            limited_by, capped_why, sched = capped
            lg_limit = limited_by == "load generator"
        elif lg_limit:
            limited_by = "load generator"
        elif slow:
            limited_by = "server (below the offered rate)"
        elif case.rate:
            limited_by = "the offered rate"
        elif cores >= SERVER_LIMIT:
            limited_by = "server"
        else:  # a ping-pong waits for its echo: both sides partly idle
            limited_by = "round-trip latency"
        lg_us = [x for x in (loadgen_us_per_rt(s, count_key) for s in use) if x]
        ctx = [s["server_ctx_switches"][0] / s[count_key] * s["window_s"] / s.get("wall_s", 1)
               for s in use if s.get("server_ctx_switches") and s[count_key] and s.get("wall_s")]
        steal = [sum(s["steal_s"].values()) / (2 * s["wall_s"]) for s in use
                 if s.get("steal_s") and s.get("wall_s")]
        rec["agg"] = {
            "rate_median": rate_median,
            "rate_min": min(s[rate_key] for s in use),
            "rate_max": max(s[rate_key] for s in use),
            "per_cpu_s": count / cpu_total if cpu_total > 0 else None,
            "server_us": cpu_total / count * 1e6 if count else None,
            "server_cores": cores,
            "loadgen_busy": lg_busy,
            "loadgen_busy_max": max(busy),
            "loadgen_cores": statistics.median(s["loadgen_cpu_s"] / s["window_s"] for s in use),
            # the measure that says whether the load generator was the limit:
            # see loadgen.c; above LG_LIMIT this cell does not compare servers
            "does_not_compare_servers": lg_limit,
            # the headroom probe, when one ran (None otherwise): see PROBE_WITHHOLD
            "loadgen_probe": probe,
            "disturbed": disturbed,
            "limited_by": limited_by,
            # why this cell is in no ratio (None: it is)
            "excluded": ("DISTURBED" if disturbed else
                         capped_why if capped[0] else
                         f"load generator {lg_busy:.0%} busy" if lg_limit else
                         f"kept {rate_median / case.rate:.0%} of the offered rate" if slow
                         else None),
            # equal-rate cells: the load generator's schedule (CAPPED rule)
            "schedule": sched,
            # companions that do not depend on the machine's speed: the load
            # generator's own µs per round trip (a speed index), the server's
            # CPU per round trip in units of it, voluntary context switches
            # per round trip (wake-ups), and the share of the CPUs stolen
            "loadgen_us": statistics.median(lg_us) if lg_us else None,
            "server_per_loadgen": (statistics.median(
                s.get("server_cpu_s", 0) / s[count_key] * 1e6 / loadgen_us_per_rt(s, count_key)
                for s in use if loadgen_us_per_rt(s, count_key) and s[count_key])
                if lg_us else None),
            "ctx_per_rt": statistics.median(ctx) if ctx else None,
            "core_us": (statistics.median(x for x in map(core_index, use) if x)
                        if any(map(core_index, use)) else None),
            "steal_share": max(steal) if steal else None,
            "other_load_cores": statistics.median(s["other_load_cores"] for s in use),
            "disturbed_slices": len(sl) - len(clean),
            "slow_machine_slices": slow_left_out,
            "mb_per_s": (statistics.median(s["mb_per_s"] for s in use)
                         if all("mb_per_s" in s for s in use) else prev.get("mb_per_s", 0)),
            "lat_us": ({p: statistics.median(s["lat_us"][p] for s in use)
                        for p in ("p50", "p99", "p999")}
                       if all("lat_us" in s for s in use) else prev.get("lat_us")),
            "rss_kb": max(s.get("server_rss_kb", 0) for s in sl) or prev.get("rss_kb", 0),
            "engine": sl[0].get("engine"),
            "slices": len(sl),
            "slices_used": len(use),
        }
    for key, rec in record.items():
        if "agg" not in rec:
            continue
        vs = {}
        for peer, prec in record.items():
            if peer != key and "agg" in prec:
                vs[peer] = pair_ratio(rec, prec, rate_key, count_key)
        rec["agg"]["vs"] = vs
        if key == REF:
            ok = rec["agg"]["excluded"] is None
            rec["agg"]["ratio"] = rec["agg"]["cpu_ratio"] = 1.0 if ok else None
        else:
            r = vs.get(REF, {})
            rec["agg"]["ratio"] = r.get("throughput")
            rec["agg"]["cpu_ratio"] = r.get("cpu")


def core_index(s, cpu=None):
    """A slice's speed-probe figure (benchmarks/speedprobe.c) for the
    server's CPU: the lesser of the probes just before and just after it
    (both must say slow for the slice to be slow), or None."""
    cs = s.get("core_speed") or {}
    cpu = cpu or SERVER_CPU
    xs = [cs.get(k, {}).get(cpu) for k in ("before", "after")]
    return min(xs) if all(xs) else None


def mark_slow_machine(record):
    """One-connection cells: mark the slices that ran in a slow state of the
    machine, s["slow_machine"] = how much slower. Two signs, either suffices:
    the load generator's own CPU per round trip above SLOW_MACHINE x its least
    against the same server (per server, so that a server which really makes
    the generator work more in every round is not taken for a slow machine),
    or the speed probe of the server's core, before and after the slice, above
    SLOW_MACHINE x the cell's least (server-independent). If the machine was
    slow throughout, nothing is marked."""
    cores = [x for rec in record.values() for s in rec["slices"]
             for x in [core_index(s)] if x and not s.get("disturbed")]
    least_core = min(cores) if cores else None
    for rec in record.values():
        sl = [s for s in rec["slices"] if "window_s" in s and not s.get("disturbed")]
        speeds = [x for x in (loadgen_us_per_rt(s) for s in sl) if x]
        fast = min(speeds) if len(speeds) >= 2 else None
        for s in sl:
            x, c = loadgen_us_per_rt(s), core_index(s)
            slow = [r for r in ((x / fast) if x and fast else 0,
                                (c / least_core) if c and least_core else 0)
                    if r > SLOW_MACHINE]
            if slow:
                s["slow_machine"] = round(max(slow), 3)
            else:
                s.pop("slow_machine", None)


def mann_whitney_verdict(a, b):
    """Unpaired comparison of two samples (CPU per round trip of two servers
    in the machine's fast state): 'ahead' when a's values are below b's beyond
    chance (exact one-sided Mann-Whitney p <= SIGN_ALPHA), 'behind' the other
    way, else 'noise'. Ties count half."""
    m, n = len(a), len(b)
    if not m or not n:
        return {"verdict": "noise", "u": 0, "pairs": 0, "p": 1.0}
    u = sum(1.0 if x < y else 0.5 if x == y else 0.0 for x in a for y in b)
    # number of orderings of m+n values with U <= k, by the usual recursion
    from functools import lru_cache

    @lru_cache(maxsize=None)
    def ways(i, j, k):  # arrangements of i a's and j b's with U exactly k
        if k < 0:
            return 0
        if i == 0 or j == 0:
            return 1 if k == 0 else 0
        return ways(i - 1, j, k - j) + ways(i, j - 1, k)
    total = math.comb(m + n, m)

    def p_at_least(k):  # P(U >= k) under no difference (k rounded down to ints)
        kk = math.ceil(k)
        return sum(ways(m, n, t) for t in range(kk, m * n + 1)) / total
    pa, pb = p_at_least(u), p_at_least(m * n - u)
    v = "ahead" if pa <= SIGN_ALPHA and u > m * n / 2 else \
        "behind" if pb <= SIGN_ALPHA and u < m * n / 2 else "noise"
    return {"verdict": v, "u": u, "pairs": m * n, "p": round(min(pa, pb), 4), "n": [m, n]}


def pair_ratio(rec, peer, rate_key, count_key):
    """This server against a peer in one case: throughput (this / peer) and
    round trips per server CPU-second (peer's CPU per round trip / this one),
    each the median over the rounds in which both slices were undisturbed.
    None, with the reason, when either cell is excluded from ratios."""
    a, b = rec["agg"], peer["agg"]
    if a["excluded"] or b["excluded"]:
        return {"throughput": None, "cpu": None,
                "excluded": ("this: " + a["excluded"]) if a["excluded"]
                else ("peer: " + b["excluded"])}
    by_round = {s["round"]: s for s in peer["slices"]
                if not s.get("disturbed") and not s.get("slow_machine")}
    rr, cr, nr = [], [], []
    for s in rec["slices"]:
        q = by_round.get(s["round"])
        if not q or s.get("disturbed") or s.get("slow_machine") or not q[rate_key]:
            continue
        rr.append(s[rate_key] / q[rate_key])
        if s.get("server_cpu_s") and q.get("server_cpu_s") and s[count_key] and q[count_key]:
            cr.append((s[count_key] / s["server_cpu_s"]) / (q[count_key] / q["server_cpu_s"]))
            ls, lq = loadgen_us_per_rt(s, count_key), loadgen_us_per_rt(q, count_key)
            if ls and lq:  # the same ratio, each side in units of its slice's speed index
                nr.append(cr[-1] * ls / lq)
    # one connection: both servers' slices of the machine's fast state,
    # compared unpaired (the state, not the time between two slices, is what
    # moves their cost: see one_connection_md)
    def fast(r):
        return [x for x in r["slices"]
                if not x.get("disturbed") and not x.get("slow_machine") and x.get(count_key)
                and x.get("server_cpu_s") and "window_s" in x]
    mw = None
    out = {"fast_state_verdict": None}
    if rec.get("c1"):
        fa, fb = fast(rec), fast(peer)
        mw = mann_whitney_verdict([x["server_cpu_s"] / x[count_key] for x in fa],
                                  [x["server_cpu_s"] / x[count_key] for x in fb])
        out["fast_state_verdict"] = mw
        if fa and fb:
            # the ratios shown at one connection: of the fast-state medians
            # (unpaired, as the verdict; the paired rounds are kept beside)
            out["fast_cpu"] = (statistics.median(x["server_cpu_s"] / x[count_key] for x in fb)
                               / statistics.median(x["server_cpu_s"] / x[count_key] for x in fa))
            out["fast_throughput"] = (statistics.median(x[rate_key] for x in fa)
                                      / statistics.median(x[rate_key] for x in fb))
    if not rr and "fast_cpu" not in out:
        return dict(out, throughput=None, cpu=None, excluded="no round with both undisturbed")
    paired = {"paired_throughput": statistics.median(rr) if rr else None,
              "paired_cpu": statistics.median(cr) if cr else None}
    return dict(out, **paired,
                throughput=out.get("fast_throughput", paired["paired_throughput"]),
                cpu=out.get("fast_cpu", paired["paired_cpu"]),
                excluded=None, rounds=len(rr),
                # every round's CPU ratio: whether the rounds agree on a side of 1.00
                cpu_rounds=[round(x, 4) for x in cr],
                throughput_verdict=sign_verdict(rr), cpu_verdict=sign_verdict(cr),
                # the drift-corrected companion (see loadgen_us_per_rt)
                norm_cpu=statistics.median(nr) if nr else None,
                norm_verdict=sign_verdict(nr) if nr else None)


def geomean(xs):
    xs = [x for x in xs if x]
    return math.exp(sum(math.log(x) for x in xs) / len(xs)) if xs else None


# --------------------------------------------------------------------------
# reporting

def cell_status(rec):
    if rec["status"] == "unavailable":
        return "n/a"
    if rec["status"] == "failed":
        return "FAILED"
    if "agg" not in rec and not rec.get("slices"):
        return "–"
    return None


LIMIT_MARK = "‡"
# the peers issue 14 compares iocpnet with, in the order of the ratio tables
PEERS = (REF, "c-epoll", "uvloop-protocol", "aiofastnet-uvloop", "asyncio-protocol")


def markdown(meta, config, cases, results, servers, warnings):
    L = []
    m = meta
    versions = " · ".join(f"{name} {m[name]}" for name in ("uvloop", "aiofastnet") if m.get(name))
    L.append(f"Run {m['date_utc']} · Linux {m['kernel']} · {m['cpu_model']} ({m['cpus']} CPUs) · "
             f"Python {m['python']} · {m['gcc'] or 'gcc ?'} · {versions} · "
             f"iocpnet {m.get('iocpnet') or 'n/a'} · commit {m['git_commit'] or '?'}"
             + (" + uncommitted changes in src/" if m.get("git_dirty") else "")
             + (f" (iocpnet imported from {m['iocpnet_file']})"
                if m.get("iocpnet_file") and not m["iocpnet_file"].startswith(ROOT) else "")
             + (f" · {m['elapsed_s'] / 60:.1f} min" if m.get("elapsed_s") else "")
             + (f" · 1-minute load at start {m['loadavg_at_start']:.2f}"
                if m.get("loadavg_at_start") is not None else "")
             + (f", at end {m['loadavg_at_end']:.2f}"
                if m.get("loadavg_at_end") is not None else ""))
    if m.get("command"):
        L.append("")
        L.append(f"Command: `{m['command']}`")
    for x in m.get("remeasured") or ():
        L.append("")
        L.append(f"**Re-measured** {x['date_utc']} at commit {x.get('git_commit') or '?'}"
                 + (" + uncommitted changes in src/" if x.get("git_dirty") else "")
                 + f" ({x['rounds']} round(s) × {x['slice']} s; 1-minute load at start "
                 f"{x.get('loadavg_at_start', 0):.2f}): {', '.join(x['cases'])}, by "
                 f"`{x['command']}`; those cases' tables are from that run, the rest from the "
                 "run above (a case is always measured whole: its ratios never mix runs).")
    if m.get("note"):
        L.append("")
        L.append(f"**{m['note']}**")
    if m.get("waited_for_quiet"):
        L.append("")
        L.append(f"Waited for a quiet machine: {m['waited_for_quiet']}.")
    L.append("")
    L.append(f"Settings: {config['rounds']} round(s) × {config['slice']} s slices (+{config['warmup']} s "
             f"warm-up each), all servers of a case started together and measured in rotating "
             f"order; server pinned to CPU {SERVER_CPU}, load generator to CPU {LOADGEN_CPU} "
             f"(`taskset`; engine: {config.get('engine') or 'uring'} busy-poll for ping-pong and "
             f"pipelined, epoll busy-poll for the storm, sleeping epoll for the capped storm); "
             f"iocpnet workers={config['workers']}."
             + (" **Quick smoke run: not representative.**" if config["quick"] else "")
             + (f" Filter: {config['only']}." if config.get("only") else ""))
    L.append("")
    L.append(f"**Limited by**, per cell: *load generator* ({LIMIT_MARK}) when it was busy more than "
             f"{LG_LIMIT * 100:.0f} % of its core (the cell measured it, not the server) and no "
             f"headroom probe showed otherwise (when the server was at {SERVER_LIMIT:.2f} of its "
             f"core or more, {PROBE_SLICES} more slices ran with {PROBE_WITHHOLD:.0%} of the load "
             f"generator's core withheld from it in every other 100 ms; if the rate in those "
             f"phases was {PROBE_HOLD:.0%} or more of the rate in the others, it "
             f"needed at most {1 - PROBE_WITHHOLD:.0%} of its core: a busy-poller handles each echo "
             "the moment it comes, so a server that sends its echoes one by one keeps it busier "
             "than it needs to be; the probe slices are in no other figure); *server* "
             f"when the server used at least {SERVER_LIMIT:.2f} of its core; *round-trip latency* "
             "when neither (a ping-pong waits for its echo, both sides partly idle); **DISTURBED** "
             "when more than half of its slices had another process on the server's or the load "
             "generator's core even after re-measuring (at one connection also a slice run in "
             "one of the machine's slow periods: see the one-connection table). Those are the "
             "rules of the uncapped cells; an **equal-rate** cell (`at N/s`) is judged by "
             "whether the load generator held its schedule instead of by its busy share (see "
             "its table). Figures are medians over the undisturbed "
             f"slices. A {LIMIT_MARK} or DISTURBED cell is in **no ratio** (nor in a geomean or a "
             "target): its raw figures are shown, marked. **Within the noise**: a difference is "
             "called a win or a miss only when the rounds agree on its side (a sign test over "
             "the paired rounds, one-sided p ≤ 1/16: every one of 4 or 5 rounds, 7 of 8); "
             "otherwise it is marked ≈ and the targets say *within the noise*. One-connection "
             f"ping-pong cells run {C1_ROUNDS}× the rounds with slices 1/{C1_ROUNDS} as long.")
    cols = list(servers)
    traffic = [c for c in cases if c.mode != "idle" and c.name in results]
    # equal-rate cells: their throughput is the offered rate, so they are in
    # no throughput ratio; their own table compares CPU (equal_rate_md)
    uncapped = [c for c in traffic if not c.rate]

    def agg(c, key):
        return ((results[c.name].get(key) or {}).get("agg")) or {}

    def label_of(key):
        return next((s.label for s in SERVERS if s.key == key), key)

    # ---- iocpnet against each peer --------------------------------------
    have = {s.key for s in cols}
    for me in ("iocpnet-uring", "iocpnet-epoll"):
        peers = [p for p in PEERS + ("iocpnet-epoll",) if p in have and p != me
                 and not (me == "iocpnet-epoll" and p == "iocpnet-epoll")]
        if me not in have or not peers or not uncapped:
            continue
        L.append("")
        L.append(f"### {label_of(me)} against each peer")
        L.append("")
        L.append("Each cell: **throughput ratio** (its round trips/s ÷ the peer's) / **CPU ratio** "
                 "(the peer's server CPU per round trip ÷ its own, i.e. round trips per server "
                 "CPU-second relative to the peer); above 1.00 it is ahead. Ratios are taken "
                 "round by round between slices measured seconds apart, then the median. A cell "
                 "without a ratio says which side was limited by the load generator "
                 f"({LIMIT_MARK}) or disturbed. **≈** before a ratio: the rounds disagree on "
                 "which side of 1.00 it is (a sign test over the rounds does not resolve it), "
                 "so that difference is **within the noise**, whatever its median.")
        L.append("")
        L.append("| case | " + " | ".join(f"vs {label_of(p)}" for p in peers) + " |")
        L.append("|---|" + "---|" * len(peers))
        geo = {p: ([], []) for p in peers}
        for c in uncapped:
            row = [c.label]
            mine = results[c.name].get(me) or {}
            for p in peers:
                st = cell_status(mine) or cell_status(results[c.name].get(p) or {"status": "n/a"})
                if st:
                    row.append(st)
                    continue
                v = agg(c, me).get("vs", {}).get(p)
                if not v:
                    row.append("–")
                elif v["excluded"]:
                    who, _, why = v["excluded"].partition(": ")
                    whose = "own cell: " if who == "this" else f"{label_of(p)}: "
                    if who not in ("this", "peer"):
                        whose, why = "", v["excluded"]
                    row.append(f"{LIMIT_MARK} {whose}{why}" if "load generator" in why
                               else f"{whose}{why}")
                else:
                    t, u = v["throughput"], v["cpu"]
                    geo[p][0].append(t)
                    if u:
                        geo[p][1].append(u)
                    tn = "≈" if (v.get("throughput_verdict") or {}).get("verdict") == "noise" else ""
                    un = "≈" if cpu_target_verdict(v) == "noise" else ""
                    row.append(f"{tn}{t:.2f} / {un}{u:.2f}" if u else f"{tn}{t:.2f} / –")
            L.append("| " + " | ".join(row) + " |")
        row = ["geomean over the cells with a ratio"]
        for p in peers:
            t, u = geo[p]
            if not t:
                row.append("–")
                continue
            gu = geomean(u)
            row.append(f"**{geomean(t):.2f} / {gu:.2f}** ({len(t)} of {len(uncapped)})" if gu
                       else f"**{geomean(t):.2f}** / – ({len(t)} of {len(uncapped)})")
        L.append("| " + " | ".join(row) + " |")

    # ---- every cell, raw ------------------------------------------------
    if traffic:
        L.append("")
        L.append("### Every cell")
        L.append("")
        L.append("Round trips/s (storm: connections/s) and the server's CPU per round trip (storm: "
                 "per connection; all its threads, user + system, loopback TCP processing of its "
                 "sends included: the kernel charges it to the task that sends); load generator "
                 "busy = the share of its core it spent working (it busy-polls, so its CPU time is "
                 "always 100 % and says nothing; 1 − time in polls that found nothing ÷ window "
                 "does); latency from the write of a message to the arrival of its whole echo "
                 "(storm: from `connect()`; at 100 connections mostly queueing); peak RSS "
                 "(VmHWM) of the server over the case, start-up included (fresh servers every case).")
    for c in traffic:
        L.append("")
        L.append(f"#### {c.label}")
        L.append("")
        unit = "connections/s" if c.mode == "connect" else "round trips/s"
        per = "µs per connection" if c.mode == "connect" else "server µs per round trip"
        L.append(f"| server | {unit} | {per} | server cores | load generator busy | limited by "
                 "| latency p50 / p99 / p99.9 µs | peak RSS MiB |")
        L.append("|---|---|---|---|---|---|---|---|")
        for s in cols:
            rec = results[c.name][s.key]
            st = cell_status(rec)
            if st:
                L.append(f"| {s.label} | {st} | | | | | | |")
                continue
            a = rec["agg"]
            lim = a.get("limited_by", "?")
            if lim == "load generator":
                lim = f"{LIMIT_MARK} load generator"
            elif lim == "DISTURBED":
                lim = f"**DISTURBED** ({a['disturbed_slices']} of {a['slices']} slices)"
            elif a.get("disturbed_slices"):
                lim += f" ({a['disturbed_slices']} of {a['slices']} slices disturbed, left out)"
            if a.get("slow_machine_slices") and not a.get("disturbed"):
                lim += (f" ({a['slow_machine_slices']} of {a['slices']} slices in a slow state "
                        "of the machine, left out)")
            kb = rec.get("peak_rss_kb")
            us = f"{a['server_us']:.2f}" if a.get("server_us") else "–"
            lat = (" / ".join(f"{a['lat_us'][p]:.0f}" for p in ("p50", "p99", "p999"))
                   if a.get("lat_us") else "–")
            busy = f"{a['loadgen_busy'] * 100:.0f} %"
            sch = a.get("schedule")
            if sch:
                busy += f"; schedule miss {sch['miss']:.1%}"
                if "deferred" in sch:
                    busy += f", after their burst {sch['deferred']:.1%}"
            pr = a.get("loadgen_probe")
            if pr:
                busy += (f"; {pr['withheld']:.0%} withheld: {pr['rate_ratio']:.0%} of the rate, "
                         + (f"needed ≤ {1 - pr['withheld']:.0%}" if pr["held"] else "did not hold"))
            L.append(f"| {s.label} | {human(a['rate_median'])} | {us} | {a['server_cores']:.2f} "
                     f"| {busy} | {lim} | {lat} | "
                     + (f"{kb / 1024:.1f}" if kb else "–") + " |")

    one_connection_md(L, [c for c in uncapped if is_c1(c)], cols, results)
    speed_states_md(L, traffic, cols, results)
    saturated_cpu_md(L, uncapped, cols, results)
    equal_rate_md(L, [c for c in traffic if c.rate], cols, results)

    idle = [c for c in cases if c.mode == "idle" and c.name in results]
    for c in idle:
        L.append("")
        L.append(f"### {c.idle_count:,} idle connections: server memory")
        L.append("")
        L.append("Per connection = (RSS holding them − RSS after start and one warm-up "
                 "connection) / count. One server at a time.")
        L.append("")
        L.append("| server | RSS baseline | RSS holding | per connection | RSS after close | set-up time |")
        L.append("|---|---|---|---|---|---|")
        for s in cols:
            rec = results[c.name][s.key]
            st = cell_status(rec)
            if st or not rec["slices"]:
                L.append(f"| {s.label} | {st or '–'} | | | | |")
                continue
            x = rec["slices"][0]
            after = x.get("server_rss_after_close_kb")
            after_s = f"{after / 1024:.1f} MiB" if after is not None else "–"
            L.append(f"| {s.label} | {x['server_rss_before_kb'] / 1024:.1f} MiB | "
                     f"{x['server_rss_held_kb'] / 1024:.1f} MiB | "
                     f"{x['bytes_per_conn'] / 1024:.2f} KiB | {after_s} | "
                     f"{x['setup_s']:.2f} s |")
    targets_md(L, cases, results, servers)
    notes = []
    limited = {}
    for c in traffic:
        for s in cols:
            if agg(c, s.key).get("does_not_compare_servers"):
                limited.setdefault(s.label, []).append(c.label)
    for who, where in limited.items():
        notes.append(f"{LIMIT_MARK} the load generator was the limit against {who} in: "
                     + ", ".join(where) + ".")
    for s in cols:
        for c in cases:
            rec = results.get(c.name, {}).get(s.key)
            if rec and rec["status"] == "failed":
                first = rec["error"].strip().splitlines()[0] if rec["error"].strip() else "?"
                notes.append(f"{s.label}, {c.label}: FAILED: {first}")
            if rec and rec.get("stop_note"):
                notes.append(f"{s.label}, {c.label}: {rec['stop_note']}")
        if s.unavailable:
            notes.append(f"{s.label}: not run: {s.unavailable.strip().splitlines()[0]}")
    notes += warnings
    if notes:
        L.append("")
        L.append("### Notes")
        L.append("")
        for n in dict.fromkeys(notes):
            L.append(f"- {n}")
    return "\n".join(L) + "\n"


def one_connection_md(L, cells, cols, results):
    """The one-connection cells' companions and verdicts. Why their rounds
    disagreed (run of b3c172d, a quiet machine): this VM switches, every few
    seconds, between speed states 1.3-2x apart that slow BOTH cores at once
    (the load generator's own CPU per round trip moves with the server's, in
    every server's slices; whether steal shows it is now recorded; host placement of the
    two vCPUs or frequency: not visible from inside). A slice paired with one
    in the other state gives a ratio off by that factor. So the servers are
    compared on the slices of the fast state only (mark_slow_machine), unpaired
    (mann_whitney_verdict), and the companions that do not move with the
    state are printed beside."""
    if not cells:
        return
    L.append("")
    L.append("### One connection: companions and which differences are resolved")
    L.append("")
    L.append("Per server: server µs per round trip / the load generator's own µs per round trip "
             "(a speed index of the machine during that slice: it does the same work per round "
             "trip whatever the server, within about 5 %) / server CPU per round trip in units "
             "of that index (drift-corrected; biased by the generator's small server-dependent "
             "part) / the server's voluntary context switches per round trip (its wake-ups: "
             "independent of the machine's speed) / the speed probe of the server's core around "
             "its slices (µs of CPU time for a fixed unit of register-only work, "
             "`benchmarks/speedprobe.c`: server-independent) / the largest share of the two CPUs "
             "stolen by the hypervisor in any slice / slices in the machine's slow state, left "
             "out. This "
             "VM switches every few seconds between speed states 1.3-2x apart that slow both "
             "cores at once (the load generator's own CPU per round trip moves with the "
             "server's): a slice whose speed index was above "
             f"{SLOW_MACHINE}x the least against the same server, or whose speed probe before "
             f"and after it was above {SLOW_MACHINE}x the cell's least, ran in a slow state and "
             "is in no median and no comparison.")
    L.append("")
    L.append("| case | " + " | ".join(s.label for s in cols) + " |")
    L.append("|---|" + "---|" * len(cols))
    for c in cells:
        row = []
        for s in cols:
            rec = results[c.name][s.key]
            a = rec.get("agg") if not cell_status(rec) else None
            if not a or not a.get("server_us"):
                row.append(cell_status(rec) or "–")
                continue
            parts = [f"{a['server_us']:.2f}"]
            parts.append(f"{a['loadgen_us']:.2f}" if a.get("loadgen_us") else "–")
            parts.append(f"{a['server_per_loadgen']:.3f}" if a.get("server_per_loadgen") else "–")
            parts.append(f"{a['ctx_per_rt']:.2f} cs" if a.get("ctx_per_rt") is not None else "–")
            parts.append(f"probe {a['core_us']:.1f}" if a.get("core_us") else "–")
            parts.append(f"steal {a['steal_share']:.1%}" if a.get("steal_share") is not None
                         else "–")
            parts.append(f"{a.get('slow_machine_slices', 0)} of {a['slices']} slow")
            row.append(" / ".join(parts))
        L.append(f"| {c.label} | " + " | ".join(row) + " |")
    pairs = [(x, y) for x, y in (("iocpnet-uring", "iocpnet-epoll"),
                                 ("iocpnet-uring", "uvloop-protocol"),
                                 ("iocpnet-epoll", "uvloop-protocol"),
                                 ("iocpnet-uring", REF))
             if any(s.key == x for s in cols) and any(s.key == y for s in cols)]
    if not pairs:
        return
    L.append("")
    L.append("Per pair: **the verdict**, from the two servers' slices of the fast state (their "
             "server CPU per round trip compared unpaired, exact one-sided Mann-Whitney test, "
             "p ≤ 1/16; else within the noise); the CPU ratio of their fast-state medians (the "
             "second's CPU per round trip ÷ the first's; > 1.00: the first costs less; this is "
             "the ratio the peer tables show at one connection); the paired ratio, median of the "
             "rounds in which both slices were fast, with how many say ahead / behind; the "
             "drift-corrected paired ratio (each side in units of its slice's speed index).")
    L.append("")
    L.append("| case | " + " | ".join(f"{label_of_key(x)} vs {label_of_key(y)}"
                                      for x, y in pairs) + " |")
    L.append("|---|" + "---|" * len(pairs))
    for c in cells:
        row = []
        for x, y in pairs:
            a = (results[c.name].get(x) or {}).get("agg") or {}
            v = (a.get("vs") or {}).get(y)
            if not v or v.get("excluded") or v.get("cpu") is None:
                row.append(f"– ({v['excluded']})" if v and v.get("excluded") else "–")
                continue
            fs = v.get("fast_state_verdict")
            head = ""
            if fs:
                head = (f"**{VERDICT_WORDS[fs['verdict']]}** (fast-state slices "
                        f"{fs['n'][0]} and {fs['n'][1]}, p {fs['p']:.3f}); ") if fs.get("n") \
                    else f"**{VERDICT_WORDS[fs['verdict']]}**; "
            pc = v.get("paired_cpu")
            row.append(head + f"ratio of the fast-state medians {v['cpu']:.2f}; paired "
                       + (f"{pc:.2f} ({verdict_text(v.get('cpu_verdict'))})" if pc else
                          "– (no round with both fast)")
                       + (f"; corrected {v['norm_cpu']:.2f} ({verdict_text(v['norm_verdict'])})"
                          if v.get("norm_cpu") else ""))
        L.append(f"| {c.label} | " + " | ".join(row) + " |")


WITNESSES = (("mem0", "pointer chase on the server's CPU, µs per 1024 loads"),
             ("mem1", "pointer chase on the load generator's CPU"),
             ("wake", "wake-up across the two CPUs, µs per round trip"))


def witness_summary(slices):
    """One-connection slices: each witness probe (core_speeds(witnesses=True),
    the lesser of before and after the slice) in the slices marked slow
    (slow_machine) against the others, undisturbed ones only: {key: {"fast":
    median, "slow": median, "n_fast": n, "n_slow": n}}. A witness of the slow
    state is one whose slow median stands clear of its fast one, by about the
    generator's own 1.3-2x; one that stays flat (as the register-only unit
    did) does not see it."""
    out = {}
    for key, _ in WITNESSES:
        groups = {"fast": [], "slow": []}
        for s in slices:
            cs = s.get("core_speed") or {}
            xs = [cs.get(k, {}).get(key) for k in ("before", "after")]
            if not s.get("disturbed") and all(xs):
                groups["slow" if s.get("slow_machine") else "fast"].append(min(xs))
        if groups["fast"] or groups["slow"]:
            out[key] = {g: statistics.median(v) if v else None for g, v in groups.items()}
            out[key].update(n_fast=len(groups["fast"]), n_slow=len(groups["slow"]))
    return out


def witnesses_md(L, traffic, results):
    """The witness probes against the slow slices, per one-connection case."""
    rows = []
    for c in (c for c in traffic if is_c1(c)):
        w = witness_summary([s for rec in results[c.name].values()
                             for s in rec.get("slices") or []])
        if not w:
            continue
        n = next(iter(w.values()))
        cells = []
        for key, _ in WITNESSES:
            x = w.get(key)
            cells.append(" / ".join("–" if not x or x[g] is None else f"{x[g]:.1f}"
                                    for g in ("fast", "slow")))
        rows.append(f"| {c.label} | {n['n_fast']} / {n['n_slow']} | " + " | ".join(cells) + " |")
    if not rows:
        return
    L.append("")
    L.append("Two more server-independent probes ran around the one-connection slices "
             "(`speedprobe.c mem` and `wake`), to find one that moves with the slow state the "
             "register-only unit does not see; median over the fast and the slow slices (as "
             "marked above); recorded, in no filter yet: "
             + "; ".join(f"{k}: {what}" for k, what in WITNESSES) + ".")
    L.append("")
    L.append("| case | slices fast / slow | " + " | ".join(k + " fast / slow" for k, _ in WITNESSES)
             + " |")
    L.append("|---|---|" + "---|" * len(WITNESSES))
    L.extend(rows)


def speed_states_md(L, traffic, cols, results):
    """How often the cores were in a slow state around the slices, per case:
    the speed probe (benchmarks/speedprobe.c) of the server's core before and
    after each slice, against the least of the whole run. The evidence that
    the machine, not a server, moved a cell's figures between rounds."""
    per_case = {}
    for c in traffic:
        xs = [(s, core_index(s)) for key in results[c.name]
              for s in (results[c.name][key].get("slices") or []) if core_index(s)]
        if xs:
            per_case[c.name] = xs
    if not per_case:
        return
    least = min(x for xs in per_case.values() for _, x in xs)
    L.append("")
    L.append("### Machine speed around the slices")
    L.append("")
    L.append("The speed probe of the server's core (µs of CPU time for a fixed unit of "
             "register-only work, `benchmarks/speedprobe.c`, 30 ms on both cores just before and "
             "just after each slice; the lesser of the two) against the least of this run "
             f"({least:.1f} µs): slices whose probes both said over {SLOW_MACHINE}x ran while "
             "the cores were slow. Only the one-connection cells leave such slices out; "
             "elsewhere a cell with many of them has rounds that disagree (≈).")
    L.append("")
    L.append("| case | probe least / median / most µs | slices in a slow state |")
    L.append("|---|---|---|")
    for c in traffic:
        xs = per_case.get(c.name)
        if not xs:
            continue
        v = sorted(x for _, x in xs)
        slow = sum(1 for x in v if x > SLOW_MACHINE * least)
        L.append(f"| {c.label} | {v[0]:.1f} / {statistics.median(v):.1f} / {v[-1]:.1f} | "
                 f"{slow} of {len(v)} |")
    witnesses_md(L, traffic, results)


def label_of_key(key):
    return next((s.label for s in SERVERS if s.key == key), key)


VERDICT_WORDS = {"ahead": "costs less", "behind": "costs more", "noise": "within the noise"}


def verdict_text(vd):
    if not vd:
        return "?"
    return f"{vd['above']}↑ {vd['below']}↓ of {vd['rounds']}: {VERDICT_WORDS[vd['verdict']]}"


SATURATED = 0.95  # server cores at or above this: its CPU per round trip is its cost


def saturated_cpu_md(L, traffic, cols, results):
    """A separate table, in no ratio and no target: the server's CPU per round
    trip in every undisturbed cell where the server ran at SATURATED of its
    core or more, ‡ cells included. A saturated server is never waiting for
    the load generator, so its CPU per round trip is its cost per message at
    the batches it got; but those batches depend on the peer (a load
    generator that was itself near its limit sends its messages in a
    different rhythm), which is why the ‡ rule keeps these cells out of the
    ratios."""
    rows = []
    for c in traffic:
        row, any_ = [], False
        for s in cols:
            rec = results[c.name][s.key]
            a = rec.get("agg") if not cell_status(rec) else None
            if not a or a.get("disturbed") or not a.get("server_us") \
                    or a["server_cores"] < SATURATED:
                row.append("–")
                continue
            any_ = True
            mark = f" {LIMIT_MARK}" if a.get("does_not_compare_servers") else ""
            row.append(f"{a['server_us']:.2f}{mark}")
        if any_:
            rows.append(f"| {c.label} | " + " | ".join(row) + " |")
    if not rows:
        return
    L.append("")
    L.append("### Server CPU per round trip where the server was saturated (separate: in no ratio, "
             "no geomean, no target)")
    L.append("")
    L.append(f"µs of server CPU per round trip (storm: per connection) in every undisturbed cell "
             f"where the server ran at {SATURATED:.2f} of its core or more, including cells "
             f"marked {LIMIT_MARK} (the load generator was near its limit too). A saturated server "
             "never waited for the load generator, so this is its cost per message at the batches "
             "it got; **but the batches depend on the peer**: a load generator near its limit "
             "sends in a different rhythm than an idle one, and a server that gets bigger batches "
             "pays less per message. So these figures are indicative only, are not the ratios "
             f"above, and a {LIMIT_MARK} figure here still does not compare servers by the "
             "project's rule. – : the server was below "
             f"{SATURATED:.2f} of its core, disturbed, or not run.")
    L.append("")
    L.append("| case | " + " | ".join(s.label for s in cols) + " |")
    L.append("|---|" + "---|" * len(cols))
    L.extend(rows)


def equal_rate_md(L, capped, cols, results):
    """The equal-rate cells: every server offered the same messages (storm:
    connections) per second, far enough under the load generator's limit that
    it paces them all alike; what differs is the server CPU each message costs
    at that load, compared round by round as in the peer tables."""
    if not capped:
        return
    L.append("")
    L.append("### At an equal offered rate: server CPU per round trip")
    L.append("")
    L.append("The load generator offers the same rate to every server (`loadgen -r`, a token "
             "bucket with at most 1 ms of tokens saved; the pipelined cells **in bursts**, "
             "`loadgen -b`: on a fixed clock, every 1 ms from the start whatever the server, "
             "each connection is handed its share of the tick's messages and writes what its "
             "window allows in one send, so every server is offered the same bursts at the same "
             "times and gets its messages in batches, the point of pipelining; spaced evenly, "
             "every server woke for nearly every message and its CPU followed the wall clock, "
             "every Python server at 0.98-0.99 of a core at 1M/s, every server, C io_uring too, "
             "at 0.90-0.99 at 500k-600k/s), "
             "chosen under the slowest server's "
             "limit and well under the load generator's, so each cell compares what the same "
             "load costs each server: µs of server CPU per round trip (storm: per connection), "
             "then round trips per server CPU-second relative to C io_uring and to uvloop, "
             "round by round as above (> 1.00: it costs less). Below saturation a server pays "
             "for its idle wake-ups too, so these are costs at this load, not at the limit. "
             "Here the load generator's busy share is not the test (at a capped million "
             "messages per second nearly every pass of a busy-poller finds an echo, so it is "
             "near 100 % with time to spare): a cell compares servers when the generator "
             f"**held its schedule** (at most {SCHED_MISS_MAX:.0%} of the offered starts more "
             "than 100 µs late or dropped while a sender waited; a burst handed out more than "
             "100 µs after its tick is late, every message of it; else "
             f"{LIMIT_MARK}), the server kept {RATE_HOLD:.0%} of the offered rate (below it "
             f"with the generator over {LG_LIMIT:.0%} busy: {LIMIT_MARK}, either side), "
             f"in bursts at most {SCHED_MISS_MAX:.0%} of the messages went out after their tick "
             "because the server had not echoed enough of the earlier ones to open the window "
             "(else *server (behind the bursts)*: it got smaller batches at its own echoes' "
             f"times, not its peers' schedule; {LIMIT_MARK} with the generator over "
             f"{LG_LIMIT:.0%} busy), and the "
             f"server ran below {CAPPED_SATURATED:.2f} of its core (a saturated server's "
             "batches are set by its own queue; its figure is a lower bound and in no ratio). "
             "≈: the rounds do not resolve the side of 1.00 (within the noise).")
    L.append("")
    L.append("| case | " + " | ".join(s.label for s in cols) + " |")
    L.append("|---|" + "---|" * len(cols))
    for c in capped:
        row = []
        for s in cols:
            rec = results[c.name][s.key]
            st = cell_status(rec)
            a = rec.get("agg") if not st else None
            if not a or not a.get("server_us"):
                row.append(st or "–")
                continue
            if a.get("excluded"):
                mark = LIMIT_MARK + " " if a.get("does_not_compare_servers") else ""
                row.append(f"{a['server_us']:.2f} ({mark}{a['excluded']})")
                continue
            rel = []
            for peer, name in ((REF, "C io_uring"), ("uvloop-protocol", "uvloop")):
                v = (a.get("vs") or {}).get(peer) or {}
                if s.key != peer and v.get("cpu"):
                    noise = (v.get("cpu_verdict") or {}).get("verdict") == "noise"
                    rel.append(f"{'≈' if noise else ''}{v['cpu']:.2f} vs {name}")
            row.append(f"**{a['server_us']:.2f}**" + (f" ({', '.join(rel)})" if rel else ""))
        L.append(f"| {c.label} | " + " | ".join(row) + " |")


def cpu_target_verdict(v):
    """A 'costs no more than' target on one pair: 'ahead' (resolved: costs
    less), 'behind' (resolved: costs more), or 'noise'. One connection: the
    fast-state comparison (mann_whitney_verdict); else the paired rounds'
    sign test. A median of exactly 1.00 whose rounds do not resolve is noise."""
    if v.get("fast_state_verdict"):
        return v["fast_state_verdict"]["verdict"]
    vd = v.get("cpu_verdict")
    if vd is None:  # a run saved before the sign test: every round must agree
        rounds = v.get("cpu_rounds") or []
        vd = sign_verdict(rounds)
    return vd["verdict"]


def targets_md(L, cases, results, servers):
    """Issue 14's targets, checked against this run (only what it measured,
    and only from cells that compare servers: see aggregate)."""
    keys = {s.key for s in servers}
    if not {"iocpnet-uring", "iocpnet-epoll"} & keys:
        return
    rows = []

    def a(c, key):
        return (results[c.name].get(key) or {}).get("agg") or {}

    def vs(c, key, peer):
        return a(c, key).get("vs", {}).get(peer) or {}

    traffic = [c for c in cases if c.mode != "idle" and c.name in results and not c.rate]
    capped = [c for c in cases if c.rate and c.name in results]
    pp = [c for c in traffic if c.mode == "pingpong"]
    # 1. CPU per round trip: io_uring <= epoll <= uvloop, every traffic cell
    #    (paired round by round: the CPU ratio is >= 1 where the first costs no more)
    if {"iocpnet-uring", "iocpnet-epoll", "uvloop-protocol"} <= keys and traffic:
        pairs = (("iocpnet-uring", "iocpnet-epoll"), ("iocpnet-uring", "uvloop-protocol"),
                 ("iocpnet-epoll", "uvloop-protocol"))
        met, bad, unresolved, skipped = [], [], [], []
        for c in traffic:
            vds = [vs(c, x, y) for x, y in pairs]
            if any(v.get("cpu") is None for v in vds):
                skipped.append(c.label)
                continue
            verdicts = [cpu_target_verdict(v) for v in vds]
            u, e, w = (a(c, k).get("server_us") for k in ("iocpnet-uring", "iocpnet-epoll",
                                                          "uvloop-protocol"))
            what = f"{c.label}: {u:.2f} / {e:.2f} / {w:.2f}"
            if "behind" in verdicts:
                bad.append(what)
            elif "noise" in verdicts:
                unresolved.append(what)
            else:
                met.append(c.label)
        n = len(traffic) - len(skipped)
        rows.append(("server CPU per round trip: io_uring ≤ epoll ≤ uvloop, every cell",
                     f"{len(met)} of {n} comparable cells met"
                     + (" (io_uring / epoll / uvloop µs where the rounds say not: "
                        + "; ".join(bad) + ")" if bad else "")
                     + (" (within the noise, the rounds do not resolve the order: "
                        + "; ".join(unresolved) + ")" if unresolved else "")
                     + (f"; not comparable (‡ or DISTURBED): {', '.join(skipped)}"
                        if skipped else ""),
                     (False if bad else "within the noise" if unresolved else True)
                     if n else None))
    # 2. geomean throughput of the ping-pong cells, to C io_uring
    for key, want in (("iocpnet-uring", 0.92), ("iocpnet-epoll", 0.90)):
        if key in keys and pp:
            rs = [a(c, key).get("ratio") for c in pp]
            got = [r for r in rs if r is not None]
            g = geomean(got)
            what = f"{key}: ping-pong geomean throughput ≥ {want:.2f} of C io_uring"
            if g:
                rows.append((what, f"{g:.3f} over {len(got)} of {len(pp)} cells"
                             + ("" if len(got) == len(pp) else
                                " (the others: ‡ load generator limit or DISTURBED, no ratio)"),
                             g >= want))
            else:
                rows.append((what, "no cell with a ratio (‡ load generator limit or DISTURBED)",
                             None))
    # 3. peak RSS at 16 KiB x 100 <= uvloop
    c16 = next((c for c in traffic if c.mode == "pingpong" and c.size == 16384 and c.conns == 100),
               None)
    if c16 and "uvloop-protocol" in keys:
        v = results[c16.name]["uvloop-protocol"].get("peak_rss_kb")
        for key in ("iocpnet-uring", "iocpnet-epoll"):
            x = results[c16.name].get(key, {}).get("peak_rss_kb")
            if key in keys and x and v:
                rows.append((f"{key}: peak RSS at 16 KiB × 100 ≤ uvloop's",
                             f"{x / 1024:.1f} vs {v / 1024:.1f} MiB", x <= v))
    # 4. idle memory
    for c in (c for c in cases if c.mode == "idle" and c.name in results):
        for key in ("iocpnet-uring", "iocpnet-epoll"):
            rec = results[c.name].get(key)
            if key in keys and rec and rec.get("slices"):
                b = rec["slices"][0]["bytes_per_conn"]
                rows.append((f"{key}: {c.idle_count:,} idle connections ≤ 1 KiB each",
                             f"{b / 1024:.2f} KiB", b <= 1024))
    # 5. connect storm >= uvloop
    for c in (c for c in traffic if c.mode == "connect"):
        for key in ("iocpnet-uring", "iocpnet-epoll"):
            if key not in keys or "uvloop-protocol" not in keys:
                continue
            r = vs(c, key, "uvloop-protocol")
            what = f"{key}: connect storm ≥ uvloop's"
            if r.get("throughput") is not None:
                rows.append((what, f"{r['throughput']:.2f} of uvloop", r["throughput"] >= 1.0))
            elif r:
                rows.append((what, f"no ratio ({r.get('excluded')})", None))
    # 6. pipelined: round trips per server CPU-second >= 0.95 of C io_uring
    for key in ("iocpnet-uring", "iocpnet-epoll"):
        allpl = [c for c in traffic if c.mode == "pipeline"]
        pl = [(c, a(c, key).get("cpu_ratio")) for c in allpl]
        pl = [(c, r) for c, r in pl if r is not None]
        if key not in keys or not allpl:
            continue
        what = (f"{key}: pipelined, round trips per server CPU-second ≥ 0.95 of C io_uring, "
                "every cell")
        if pl:
            worst = min(r for _, r in pl)
            rows.append((what, ", ".join(f"{r:.2f}" for _, r in pl)
                         + f" ({len(pl)} of {len(allpl)} cells with a ratio)", worst >= 0.95))
        else:
            raw = "; ".join(f"{c.label}: {a(c, key).get('server_us') or 0:.2f} vs "
                            f"{a(c, REF).get('server_us') or 0:.2f} µs" for c in allpl)
            rows.append((what, "no cell with a ratio (‡ load generator limit or DISTURBED); "
                         f"raw CPU per round trip, {key} vs C io_uring: {raw}", None))
    # 7. the same two targets where only an equal-rate cell compares the servers
    for c in capped:
        if c.mode not in ("pipeline", "connect"):
            continue
        peer, want = ((REF, 0.95) if c.mode == "pipeline" else ("uvloop-protocol", 1.0))
        for key in ("iocpnet-uring", "iocpnet-epoll"):
            if key not in keys or peer not in keys:
                continue
            r = vs(c, key, peer)
            what = (f"{key}: {c.label}, round trips per server CPU-second ≥ {want:.2f} of "
                    f"{'C io_uring' if peer == REF else 'uvloop'}" if c.mode == "pipeline" else
                    f"{key}: {c.label}, server CPU per connection ≤ uvloop's (the storm "
                    "target where the uncapped storm is ‡)")
            if r.get("cpu") is not None:
                # met or missed only when the rounds agree on the side of `want`
                vd = sign_verdict(r.get("cpu_rounds") or [r["cpu"]], want)
                rows.append((what, f"{r['cpu']:.2f} ({a(c, key).get('server_us') or 0:.2f} vs "
                             f"{a(c, peer).get('server_us') or 0:.2f} µs; rounds "
                             f"{vd['above']}↑ {vd['below']}↓ of {vd['rounds']})",
                             "within the noise" if vd["verdict"] == "noise"
                             else vd["verdict"] == "ahead"))
            elif r:
                rows.append((what, f"no ratio ({r.get('excluded')})", None))
    if not rows:
        return
    L.append("")
    L.append("### Issue 14 targets, checked against this run")
    L.append("")
    L.append("| target | this run | met? |")
    L.append("|---|---|---|")
    for what, got, ok in rows:
        verdict = (ok if isinstance(ok, str) else "not measured" if ok is None
                   else "yes" if ok else "**no**")
        L.append(f"| {what} | {got} | {verdict} |")



# fixed colours, so a server looks the same in every panel and every run;
# iocpnet in blues, the C references in greys
COLORS = {"iocpnet-uring": "#1f77b4", "iocpnet-epoll": "#6baed6", "asyncio-protocol": "#2ca02c",
          "asyncio-streams": "#98df8a", "uvloop-protocol": "#9467bd",
          "aiofastnet-uvloop": "#e377c2", "aiofastnet-uvloop-buffered": "#f7b6d2", "c-uring": "#555555", "c-epoll": "#aaaaaa"}


def tick_label(label):
    """'ping-pong 64 B × 1' -> 'ping-pong\n64 B × 1': lines short enough for a bar group."""
    lines = []
    for part in label.split(", "):
        head, _, rest = part.partition(" ")
        lines += [head, rest] if len(part) > 12 and rest else [part]
    return "\n".join(lines)


def chart(cases, results, servers, path):
    try:
        import matplotlib
    except ImportError:
        if pip_install("matplotlib"):
            return "matplotlib missing and could not be installed"
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as e:
        return f"matplotlib unusable: {e}"
    traffic = [c for c in cases if c.mode != "idle" and c.name in results and not c.rate]
    idle = [c for c in cases if c.mode == "idle" and c.name in results]
    # only servers that produced numbers get a bar slot and a legend entry
    servers = [s for s in servers
               if any(results[c.name][s.key].get("agg") or results[c.name][s.key]["slices"]
                      for c in traffic + idle)]
    if not servers:
        return "no server produced results"
    def vs(peer, what):
        return lambda s, a: (1.0 if s.key == peer and not a.get("excluded")
                             else (a.get("vs", {}).get(peer) or {}).get(what))
    gone = "no bar: this cell or the reference's was limited by the load generator or DISTURBED"
    panels = [(f"Throughput, ratio to C io_uring (same case, same round; {gone})",
               vs(REF, "throughput")),
              ("Round trips per server CPU-second (= 1 / CPU per round trip), ratio to "
               "C io_uring", vs(REF, "cpu")),
              (f"Throughput, ratio to uvloop Protocol ({gone})", vs("uvloop-protocol", "throughput")),
              ("Round trips per server CPU-second, ratio to uvloop Protocol",
               vs("uvloop-protocol", "cpu"))]
    if not any(s.key == "uvloop-protocol" for s in servers):
        panels = panels[:2]
    nrows = (len(panels) + 1 if traffic else 0) + (1 if idle else 0)
    if nrows == 0:
        return "nothing to draw"
    fig, axes = plt.subplots(nrows, 1, figsize=(14, 4.4 * nrows), squeeze=False)
    axes = [a[0] for a in axes]
    width = 0.8 / max(1, len(servers))
    ai = 0
    if traffic:
        for title, get in panels:
            ax = axes[ai]
            ai += 1
            for i, s in enumerate(servers):
                xs, ys = [], []
                for j, c in enumerate(traffic):
                    a = results[c.name][s.key].get("agg", {})
                    v = get(s, a) if a else None
                    if v is not None:
                        xs.append(j + (i - (len(servers) - 1) / 2) * width)
                        ys.append(v)
                ax.bar(xs, ys, width, label=s.label, color=COLORS.get(s.key))
            ax.axhline(1.0, color="black", linewidth=0.8)
            ax.set_xticks(range(len(traffic)))
            ax.set_xticklabels([tick_label(c.label) for c in traffic], fontsize=7)
            ax.set_title(title, fontsize=10)
            ax.grid(axis="y", alpha=0.3)
        axes[0].legend(fontsize=7, ncol=4)
        ax = axes[ai]
        ai += 1
        for i, s in enumerate(servers):
            xs, ys = [], []
            for j, c in enumerate(traffic):
                kb = results[c.name][s.key].get("peak_rss_kb")
                if kb:
                    xs.append(j + (i - (len(servers) - 1) / 2) * width)
                    ys.append(kb / 1024)
            ax.bar(xs, ys, width, label=s.label, color=COLORS.get(s.key))
        ax.set_xticks(range(len(traffic)))
        ax.set_xticklabels([tick_label(c.label) for c in traffic], fontsize=7)
        ax.set_ylabel("MiB")
        ax.set_title("Peak server memory (VmHWM) over each case", fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    for c in idle:
        ax = axes[ai]
        labels, ys, cs = [], [], []
        for s in servers:
            rec = results[c.name][s.key]
            if rec["slices"]:
                labels.append(s.label)
                ys.append(rec["slices"][0]["bytes_per_conn"] / 1024)
                cs.append(COLORS.get(s.key))
        ax.bar(labels, ys, color=cs)
        ax.set_ylabel("KiB")
        ax.set_title(f"Server memory per idle connection ({c.idle_count:,} held)", fontsize=10)
        ax.grid(axis="y", alpha=0.3)
        ax.tick_params(axis="x", labelsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return None


def publish_docs(md, cases, results, servers):
    """docs/benchmarks.md (between the markers) and the chart next to it."""
    cerr = chart(cases, results, servers, DOCS_PNG)
    body = md
    if cerr:
        warn(f"no chart: {cerr}")
    else:
        body = f"![ratios to C io_uring and to uvloop]({os.path.basename(DOCS_PNG)})\n\n" + md
    write_docs(body)
    log(f"wrote {os.path.relpath(DOCS_MD, ROOT)}" + ("" if cerr else
                                                     f" and {os.path.relpath(DOCS_PNG, ROOT)}"))


def load_saved(path):
    """A saved run (summary or full JSON) back into cases, results, servers."""
    with open(path) as f:
        raw = json.load(f)
    keep = ("name", "mode", "size", "conns", "depth", "idle_count", "rate", "burst_us")
    cases = [Case(**{k: c[k] for k in keep if k in c}) for c in raw["cases"]]
    results = {c["name"]: c["servers"] for c in raw["cases"]}
    for c in cases:  # a run saved before the current aggregates existed
        recs = results[c.name]
        # (no "vs": before the ratios; no "loadgen_us": before the capped
        # rule, the sign test and the one-connection companions)
        if c.mode != "idle" and any("agg" in r and ("vs" not in r["agg"]
                                                    or "loadgen_us" not in r["agg"])
                                    for r in recs.values()):
            aggregate(c, recs)
    servers = [s for s in SERVERS if s.key in raw["servers"]]
    for s in servers:
        s.unavailable = raw["servers"][s.key].get("unavailable")
    return raw, cases, results, servers


def render(path):
    """Rewrite the docs and the chart from a saved run, measuring nothing."""
    raw, cases, results, servers = load_saved(path)
    md = markdown(raw["meta"], raw["config"], cases, results, servers, raw["warnings"])
    publish_docs(md, cases, results, servers)
    return 0


def summarize(raw):
    """The part of a run worth keeping in git: aggregates, the few figures of
    each slice that the ratios come from, the idle records; not the full
    per-slice dumps (those stay in benchmarks/build/)."""
    out = {k: raw[k] for k in ("meta", "config", "servers", "warnings")}
    out["cases"] = []
    slim = ("round", "rt_per_s", "conn_per_s", "roundtrips", "connections", "window_s",
            "probe_rate_ratio", "probe_withheld_share", "probe_free_rate", "probe_withheld_rate",
            "server_cpu_s", "loadgen_busy", "loadgen_cpu_s", "other_load_cores", "disturbed",
            "sched", "steal_s", "wall_s", "server_ctx_switches", "core_speed", "slow_machine")
    for c in raw["cases"]:
        cc = {k: v for k, v in c.items() if k != "servers"}
        cc["servers"] = {}
        for key, rec in c["servers"].items():
            r = {k: v for k, v in rec.items() if k not in ("slices", "error", "probes")}
            if rec.get("error"):
                r["error"] = "\n".join(rec["error"].strip().splitlines()[:3])
            if c["mode"] == "idle":
                r["slices"] = rec["slices"]
            else:
                r["slices"] = [{k: s[k] for k in slim if k in s} for s in rec["slices"]]
                if rec.get("probes"):
                    r["probes"] = [{k: s[k] for k in slim if k in s}
                                   for s in rec["probes"]]
            cc["servers"][key] = r
        out["cases"].append(cc)
    return out


def write_docs(md_block):
    os.makedirs(os.path.dirname(DOCS_MD), exist_ok=True)
    block = f"{BEGIN_MARK}\n{md_block}{END_MARK}\n"
    text = open(DOCS_MD).read() if os.path.exists(DOCS_MD) else "# Benchmarks\n\n"
    if BEGIN_MARK in text and END_MARK in text:
        a = text.index(BEGIN_MARK)
        b = text.index(END_MARK) + len(END_MARK)
        # keep everything outside the markers: other sections belong to others
        text = text[:a] + block.rstrip("\n") + text[b:]
    else:
        text = text.rstrip("\n") + "\n\n" + block
    if not text.endswith("\n"):
        text += "\n"
    with open(DOCS_MD, "w") as f:
        f.write(text)


# --------------------------------------------------------------------------
# planning

# measured on the 2-core machine: a full 7-server run took 11.4 min
SLICE_OVERHEAD = 0.05   # load generator start, connect, exit, bookkeeping
CASE_STARTUP = 2.0      # starting, probing and stopping all servers of a case
IDLE_OVERHEAD = 1.5     # warm-up connection and settle times per server


def plan_seconds(cases, servers, args):
    total = 0.0
    n = len(servers)
    for c in cases:
        if c.mode == "idle":
            setup = c.idle_count / 8000  # slowest (asyncio streams) sets up ~8k conn/s
            total += n * (IDLE_OVERHEAD + setup + args.idle_hold)
        else:
            # the speed probe after each slice (the next one's before)
            probes = SPEEDPROBE_MS / 1000 + 0.02
            if is_c1(c):  # and the witnesses (mem: its 8 MiB chain built first)
                probes += 2 * WITNESS_MS / 1000 + 0.05
            total += CASE_STARTUP + case_rounds(c, args) * n * (
                args.warmup + case_slice(c, args) + SLICE_OVERHEAD + probes)
    return total


def wait_quiet(spec):
    """Wait until the 1-minute load average drops below the threshold, or
    the time limit passes. Returns a sentence for the report."""
    load_s, _, minutes_s = spec.partition(":")
    limit, minutes = float(load_s), float(minutes_s or 30)
    t0 = time.monotonic()
    last = 0.0
    while True:
        load = os.getloadavg()[0]
        waited = time.monotonic() - t0
        if load < limit:
            return f"started at load {load:.2f} after waiting {waited / 60:.1f} min"
        if waited >= minutes * 60:
            warn(f"load still {load:.2f} after {minutes:g} min: measuring anyway")
            return f"load still {load:.2f} after waiting {minutes:g} min: measured anyway"
        if waited - last >= 60 or last == 0.0:
            log(f"waiting for a quiet machine: 1-minute load {load:.2f} (want < {limit:g}; "
                f"{waited / 60:.0f}/{minutes:g} min)")
            last = waited or 1e-9
        time.sleep(5)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Run the iocpnet benchmark matrix.")
    p.add_argument("--render", metavar="JSON",
                   help="measure nothing: rewrite docs/benchmarks.md and the chart from a "
                        "saved run (e.g. benchmarks/results/latest.json)")
    p.add_argument("--report", metavar="JSON",
                   help="measure nothing: print the Markdown report of a saved run")
    p.add_argument("--quick", action="store_true",
                   help="smoke test: one case per mode, one round, short slices")
    p.add_argument("--only", help="comma-separated globs, each matched against case names and "
                   "server keys: e.g. 'pp-*-c10,pl16-*,iocpnet-*,c-uring' runs those cases on "
                   "those servers (a kind not named is not filtered)")
    p.add_argument("--servers", help="comma-separated server keys or globs (see --list)")
    p.add_argument("--cases", help="comma-separated case names or globs, e.g. 'pp-*,storm*,idle*'")
    p.add_argument("--engine", choices=("uring", "epoll-busy", "epoll"),
                   help="load generator engine for ping-pong and pipelined cases (default uring)")
    p.add_argument("--out", metavar="NAME",
                   help="save the summary as benchmarks/results/NAME.json (default: latest for "
                        "a full run, quick or partial otherwise)")
    p.add_argument("--rounds", type=int, help="interleaved rounds per case (default 5, quick 1)")
    p.add_argument("--slice", type=float, help="measured seconds per slice (default 1.0, quick 0.5)")
    p.add_argument("--warmup", type=float, help="warm-up seconds before each slice (default 0.3)")
    p.add_argument("--idle-count", type=int, help="idle connections (default 10000, quick 2000)")
    p.add_argument("--idle-hold", type=float, help="seconds to hold them (default 2, quick 1)")
    p.add_argument("--note", help="a sentence for the report's header, e.g. which commit the "
                   "iocpnet on PYTHONPATH was built from")
    p.add_argument("--wait-quiet", metavar="LOAD[:MINUTES]",
                   help="before measuring, wait until the 1-minute load average is below LOAD "
                        "(at most MINUTES, default 30; then run anyway and say so), e.g. 0.7")
    p.add_argument("--no-retry", action="store_true",
                   help="keep slices disturbed by other processes instead of re-measuring them")
    p.add_argument("--workers", type=int, default=1, help="iocpnet worker threads (default 1)")
    p.add_argument("--port-base", type=int, default=21000,
                   help="first port tried for servers (kept below the ephemeral range)")
    p.add_argument("--reinstall-iocpnet", action="store_true",
                   help="pip install the repo first even if iocpnet already imports")
    p.add_argument("--write-docs", action="store_true",
                   help="also write docs/ and results/latest.json for a quick or filtered run")
    p.add_argument("--docs", metavar="FILE",
                   help="the Markdown file whose results section is rewritten (default "
                        "docs/benchmarks.md; the chart goes next to it, same name, .png)")
    p.add_argument("--budget", type=float, default=14.5, metavar="MINUTES",
                   help="re-measuring disturbed slices stops when the run would pass this "
                        "(default 14.5)")
    p.add_argument("--no-write", action="store_true", help="print only, write no result files")
    p.add_argument("--merge", metavar="JSON",
                   help="re-measure some cases of a saved run: the cases measured now replace "
                        "the same cases in JSON (a summary such as benchmarks/results/latest.json, "
                        "which is rewritten), and the report printed (with --write-docs also "
                        "the docs) is of the merged run, its header saying which cases were "
                        "re-measured when. The servers must be the saved run's.")
    p.add_argument("--list", action="store_true", help="list servers and cases, then exit")
    a = p.parse_args(argv)
    q = a.quick
    a.rounds = a.rounds or (1 if q else 5)
    a.slice = a.slice or (0.5 if q else 1.0)
    a.warmup = a.warmup if a.warmup is not None else (0.2 if q else 0.3)
    a.idle_count = a.idle_count or (2000 if q else 10000)
    a.idle_hold = a.idle_hold if a.idle_hold is not None else (1.0 if q else 2.0)
    if a.rounds < 1 or a.slice <= 0 or a.idle_count < 1:
        p.error("rounds, slice and idle count must be positive")
    return a


def select(items, spec, key, what):
    if not spec:
        return list(items)
    pats = [x.strip() for x in spec.split(",") if x.strip()]
    out = [it for it in items if any(fnmatch.fnmatch(key(it), pat) for pat in pats)]
    if not out:
        sys.exit(f"no {what} matches {spec!r}; see --list")
    return out


def select_only(spec, cases, servers):
    """--only: every glob must match a case name or a server key; the cases
    (servers) named filter the cases (servers); a kind not named is kept."""
    pats = [x.strip() for x in spec.split(",") if x.strip()]
    case_pats = [p for p in pats if any(fnmatch.fnmatch(c.name, p) for c in cases)]
    server_pats = [p for p in pats if any(fnmatch.fnmatch(s.key, p) for s in servers)]
    unknown = [p for p in pats if p not in case_pats and p not in server_pats]
    if unknown:
        sys.exit(f"--only: {', '.join(unknown)} matches no case and no server; see --list")
    if case_pats:
        cases = [c for c in cases if any(fnmatch.fnmatch(c.name, p) for p in case_pats)]
    if server_pats:
        servers = [s for s in servers if any(fnmatch.fnmatch(s.key, p) for p in server_pats)]
    return cases, servers, bool(server_pats)


def main(argv=None):
    args = parse_args(argv)
    if args.docs:
        global DOCS_MD, DOCS_PNG
        DOCS_MD = os.path.abspath(args.docs)
        DOCS_PNG = os.path.splitext(DOCS_MD)[0] + ".png"
    if args.render:
        return render(args.render)
    if args.report:
        raw, cases, results, servers = load_saved(args.report)
        log(markdown(raw["meta"], raw["config"], cases, results, servers, raw["warnings"]))
        return 0
    cases_all = quick_matrix(args.idle_count) if args.quick else full_matrix(args.idle_count)
    if args.list:
        log("servers: " + ", ".join(s.key + ("" if s.default else " (only on request)")
                                      for s in SERVERS))
        log("cases:   " + ", ".join(c.name for c in cases_all))
        return 0
    if not sys.platform.startswith("linux"):
        sys.exit("these benchmarks need Linux (io_uring, epoll, /proc)")
    cases = select(cases_all, args.cases, lambda c: c.name, "case")
    servers = select(SERVERS, args.servers, lambda s: s.key, "server")
    named = bool(args.servers)
    if args.only:
        cases, servers, named_here = select_only(args.only, cases, servers)
        named = named or named_here
    if not named:  # servers measured only on request stay out of the default matrix
        servers = [s for s in servers if s.default]
    full_run = not (args.quick or args.cases or args.servers or args.only)

    # Children inherit this: 10,000 idle connections need 10,000+ descriptors
    # in the server and in the load generator alike.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if hard < max([c.idle_count for c in cases] + [0]) + 100:
        warn(f"RLIMIT_NOFILE hard limit {hard} is too low for {args.idle_count} idle connections")

    # SIGTERM/SIGHUP become exceptions so that the finally below runs
    def _bail(signum, frame):
        raise SystemExit(f"stopped by signal {signum}")
    signal.signal(signal.SIGTERM, _bail)
    signal.signal(signal.SIGHUP, _bail)
    # Ctrl-C must clean up even when started from a shell that ignores SIGINT
    # for background jobs (Python keeps an inherited SIG_IGN otherwise)
    signal.signal(signal.SIGINT, signal.default_int_handler)

    meta = machine_info()
    failed_builds = build_c()
    if "loadgen" in failed_builds:
        sys.exit("cannot build the load generator:\n" + failed_builds["loadgen"])
    for s in servers:
        if s.c_binary and s.c_binary in failed_builds:
            s.unavailable = "build failed: " + failed_builds[s.c_binary]
    if not shutil.which("taskset"):
        warn("taskset not found: processes are not pinned to CPUs")
    needs = {n for s in servers for n in s.needs}
    for name in sorted(needs - {"iocpnet"}):
        mod, err = ensure_module(name)
        meta[name] = getattr(mod, "__version__", None) if mod else None
        for s in servers:
            if name in s.needs and err and not s.unavailable:
                s.unavailable = err
                log(f"{s.label}: unavailable, skipped: {err.splitlines()[0]}")
    if "iocpnet" in needs:
        mod, err = ensure_iocpnet(args.reinstall_iocpnet)
        meta["iocpnet"] = (getattr(mod, "__version__", None) or "installed") if mod else None
        meta["iocpnet_file"] = getattr(mod, "__file__", None) if mod else None
        for s in servers:
            if "iocpnet" in s.needs and err:
                s.unavailable = err
                log(f"{s.label}: unavailable, skipped: {err.splitlines()[0]}")
    runnable = [s for s in servers if not s.unavailable]
    if not runnable:
        sys.exit("no server can run")
    if args.merge:
        # checked before measuring: a merged case must have every server of the
        # saved run, or its tables would mix runs
        try:
            with open(args.merge) as f:
                merge_base = json.load(f)  # read now: the run may write files of its own
            saved_servers = set(merge_base["servers"])
        except (OSError, ValueError, KeyError) as e:
            sys.exit(f"--merge {args.merge}: not a saved run ({e})")
        if saved_servers != {s.key for s in servers}:
            sys.exit(f"--merge: the saved run has servers {sorted(saved_servers)}, this run "
                     f"{sorted(s.key for s in servers)}: select the same (--only cases only)")
        if args.no_write:
            sys.exit("--merge rewrites the saved run: it cannot go with --no-write")

    meta["command"] = " ".join(["python3", os.path.relpath(os.path.abspath(__file__), ROOT)]
                               + [shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv)])
    if args.note:
        meta["note"] = args.note
    if args.wait_quiet:
        meta["waited_for_quiet"] = wait_quiet(args.wait_quiet)
    meta["loadavg_at_start"] = os.getloadavg()[0]
    planned = plan_seconds(cases, runnable, args)
    log(f"iocpnet benchmarks · {meta['date_utc']} · Linux {meta['kernel']} · {meta['cpu_model']} · "
        f"Python {meta['python']}")
    log(f"servers: {', '.join(s.label for s in runnable)}")
    log(f"cases:   {', '.join(c.name for c in cases)}")
    log(f"plan: {args.rounds} round(s) × {args.slice} s slices (+{args.warmup} s warm-up); "
        f"estimated total {planned / 60:.1f} min")
    if full_run and planned > 15 * 60:
        warn("planned time exceeds 15 minutes; lower --rounds or --slice")
    # re-measuring disturbed slices may add up to 20 % (never past --budget)
    extra = 0.0 if args.no_retry else max(0.0, min(0.2 * planned, args.budget * 60 - planned))
    if planned > args.budget * 60:
        warn(f"planned time {planned / 60:.1f} min exceeds --budget {args.budget} min")
    args.retry_budget = RetryBudget(extra)
    if extra:
        log(f"up to {extra / 60:.1f} min more if slices disturbed by other processes are re-measured")

    results = {}
    warnings = []
    progress = Progress(planned)
    t_start = time.monotonic()
    try:
        for c in cases:
            record = {s.key: {"status": "unavailable" if s.unavailable else "ok",
                              "error": s.unavailable, "slices": []} for s in servers}
            results[c.name] = record
            progress.line(f"--- {c.name}: {c.label}")
            if c.mode == "idle":
                run_idle_case(c, runnable, args, progress, record)
            else:
                run_traffic_case(c, runnable, args, progress, record)
                aggregate(c, record)
    except KeyboardInterrupt:
        log("\ninterrupted: servers stopped, nothing written")
        return 130
    finally:
        stop_all()
    elapsed = time.monotonic() - t_start

    # disturbances worth telling the reader about
    noisy = []
    idle_burn = {}
    for c in cases:
        sl = [x for s in runnable for x in results[c.name][s.key]["slices"] if "window_s" in x]
        bad = sum(1 for x in sl if x.get("disturbed"))
        if bad:
            noisy.append(f"{c.name} {bad}/{len(sl)}")
        for x in sl:
            for key, cores in x.get("bystanders", {}).items():
                idle_burn[key] = max(idle_burn.get(key, 0.0), cores)
    if noisy:
        warnings.append("slices disturbed by other processes (a core taken from the server or "
                        "the load generator, or more than "
                        f"{DISTURBED} cores of other load; after {args.retry_budget.retried} "
                        "re-measurements): " + ", ".join(noisy) + ". Those figures are noisy; "
                        "re-run on a quiet machine if they matter.")
    for key, cores in idle_burn.items():
        if cores > 0.05:
            label = next(s.label for s in SERVERS if s.key == key)
            warnings.append(f"{label} used up to {cores:.2f} cores while idle, during other "
                            "servers' slices (busy-polling?): it slows its neighbours")
    meta["elapsed_s"] = round(elapsed, 1)
    meta["loadavg_at_end"] = os.getloadavg()[0]
    config = {k: getattr(args, k) for k in ("rounds", "slice", "warmup", "idle_count", "idle_hold",
                                            "workers", "quick", "engine", "only")}
    config.update(cases_filter=args.cases, servers_filter=args.servers, full_run=full_run)
    md = markdown(meta, config, cases, results, servers, warnings)
    log("")
    log(md)
    log(f"finished in {elapsed / 60:.1f} min (planned {planned / 60:.1f})")

    raw = {"meta": meta, "config": config,
           "cases": [dict(c.to_json(), servers=results[c.name]) for c in cases],
           "servers": {s.key: {"label": s.label, "unavailable": s.unavailable} for s in servers},
           "warnings": warnings}
    if args.no_write:
        return 0
    publish = full_run or args.write_docs
    name = summary_name(args, publish)
    # everything, every slice: kept out of git (benchmarks/build/ is ignored)
    os.makedirs(os.path.join(BUILD, "results"), exist_ok=True)
    full_json = os.path.join(BUILD, "results", f"{name}.full.json")
    with open(full_json, "w") as f:
        json.dump(raw, f, indent=1)
        f.write("\n")
    # the summary: what the report and the chart are made of, small enough for git
    os.makedirs(RESULTS, exist_ok=True)
    out_json = os.path.join(RESULTS, f"{name}.json")
    with open(out_json, "w") as f:
        json.dump(summarize(raw), f, indent=None, separators=(",", ":"))
        f.write("\n")
    log(f"results: {os.path.relpath(out_json, ROOT)} ({os.path.getsize(out_json) // 1024} KiB; "
        f"every slice in {os.path.relpath(full_json, ROOT)})")
    if args.merge:
        merged = merge_runs(merge_base, summarize(raw))
        with open(args.merge, "w") as f:
            json.dump(merged, f, indent=None, separators=(",", ":"))
            f.write("\n")
        log(f"merged the re-measured cases into {args.merge}")
        raw2, cases2, results2, servers2 = load_saved(args.merge)
        md2 = markdown(raw2["meta"], raw2["config"], cases2, results2, servers2,
                       raw2["warnings"])
        log("")
        log(md2)
        if args.write_docs:
            publish_docs(md2, cases2, results2, servers2)
        return 0
    if publish:
        publish_docs(md, cases, results, servers)
    else:
        log("quick/filtered run: docs/ left alone (use --write-docs)")
    return 0


def summary_name(args, publish):
    """NAME of benchmarks/results/NAME.json for this run's own summary. With
    --merge it is never the file merged into (a partial run's summary written
    over latest.json before the merge would lose every other case)."""
    name = args.out or ("latest" if publish else ("quick" if args.quick else "partial"))
    if args.merge and (not args.out or os.path.abspath(os.path.join(RESULTS, f"{name}.json"))
                       == os.path.abspath(args.merge)):
        name = "partial"
    return name


def merge_runs(saved, new):
    """The saved run (a summary) with the cases of `new` in place of the same
    cases (new cases appended), and a note of the re-measurement in its meta."""
    out = dict(saved)
    fresh = {c["name"]: c for c in new["cases"]}
    out["cases"] = [fresh.pop(c["name"], c) for c in saved["cases"]] + list(fresh.values())
    m = new["meta"]
    meta = dict(saved["meta"])
    meta["remeasured"] = list(meta.get("remeasured") or []) + [{
        "date_utc": m["date_utc"], "git_commit": m.get("git_commit"),
        "git_dirty": m.get("git_dirty"), "command": m.get("command"),
        "loadavg_at_start": m.get("loadavg_at_start"), "elapsed_s": m.get("elapsed_s"),
        "rounds": new["config"]["rounds"], "slice": new["config"]["slice"],
        "cases": [c["name"] for c in new["cases"]]}]
    out["meta"] = meta
    out["warnings"] = list(saved.get("warnings") or []) + [
        f"re-measured cases ({m['date_utc']}): {w}" for w in new.get("warnings") or []]
    return out


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("\ninterrupted: servers stopped, nothing written", file=sys.stderr)
        sys.exit(130)
    finally:
        stop_all()
