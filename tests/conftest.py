"""Shared fixtures: every test runs once per backend this machine can run, against real
sockets on 127.0.0.1, and every test ends with the leak counters balanced."""
import contextlib
import shutil
import subprocess
import gc
import logging
import os
import re
import socket
import threading
import time

import pytest

import iocpnet

import machine_lock

# Under the guard: while a machine_state test (in any process) has io_uring switched
# off, this would leave io_uring out of the whole run, silently.
with machine_lock.shared():
    BACKENDS = iocpnet.available_backends()
# IOCPNET_TEST_BACKENDS=io_uring (comma-separated) runs the suite for those only: the
# sanitizer run uses it (the C contract test covers every backend under ASan anyway).
if os.environ.get("IOCPNET_TEST_BACKENDS"):
    _wanted = [b.strip() for b in os.environ["IOCPNET_TEST_BACKENDS"].split(",") if b.strip()]
    BACKENDS = [b for b in BACKENDS if b in _wanted]

# In CI the suite must test the installed wheel, not the source tree.
if os.environ.get("CI"):
    _src = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")
    assert not os.path.abspath(iocpnet.__file__).startswith(_src + os.sep), (
        f"CI must test the installed package, but iocpnet comes from {iocpnet.__file__}")


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "machine_state: changes the whole machine's state (io_uring switched off "
        "in the kernel); IOCPNET_PARALLEL=1 bash scripts/test.sh runs these alone, beside no "
        "other suite")


def pytest_report_header(config):
    return (f"iocpnet {iocpnet.__version__} from {os.path.dirname(iocpnet.__file__)}; "
            f"backends: {', '.join(BACKENDS)}")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item, nextitem):
    # Every test, setup to teardown (its module's fixtures too), holds the machine-wide
    # guard shared; a machine_state test takes it exclusive in its fixture instead.
    if item.get_closest_marker("machine_state"):
        return (yield)
    with machine_lock.shared():
        return (yield)


@pytest.fixture(params=BACKENDS)
def backend(request):
    """The completion-port backend under test (the suite runs once per backend)."""
    return request.param


def pytest_collection_finish(session):
    # What is alive once the suite is collected (modules, test functions, hypothesis
    # strategies) lives to the end: frozen, it is left out of the full collections
    # no_leaks makes around every test, which then scan only what tests made (3.11,
    # whole suite collected: 44 ms of CPU per gc.collect() -> under 0.1 ms; two per test).
    gc.collect()
    gc.freeze()


def _drop_records(caplog):
    """Let go of what the test's log records refer to.  A logged exception keeps its
    traceback, and through the frames' f_back the worker's frame and everything it
    refers to; a record's args may be a session.  pytest keeps the test's records until
    the test ends, in caplog's lists and, for the running phase (teardown: a worker's
    record may come late, while the server stops), in its report handler too, already
    formatted for the report: the records lose their traceback and args, then the
    lists are cleared.  A function, so that no loop variable keeps the last one."""
    for when in ("setup", "call", "teardown"):
        records = caplog.get_records(when)
        for record in records:
            try:
                record.msg = record.getMessage()
            except Exception:       # a bad format: already reported when it was logged
                pass
            record.args = None
            record.exc_info = None
        records.clear()


@pytest.fixture(autouse=True)
def no_leaks(caplog):
    """After each test: no session, core or kept receive view left alive.  A counter
    may end lower than it began: what a failed test before this one left (its traceback
    keeps its frames until pytest has reported it) goes during this one, and is that
    test's failure, not a second one here."""
    gc.collect()
    before = iocpnet.debug_counters()
    yield
    deadline = time.monotonic() + 5
    while True:
        _drop_records(caplog)       # again at each look: a thread no fixture joined may log
        gc.collect()
        after = iocpnet.debug_counters()
        grew = {k: (before[k], n) for k, n in after.items() if n > before[k]}
        if not grew or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    assert not grew, f"leaked (before, after): {grew}; before the test {before}, after {after}"


class Server:
    """A Service on 127.0.0.1 with worker threads, stopped and checked on exit."""

    def __init__(self, session_cls, backend, workers=2, accepts=16, ssl=None, core_kw=None,
                 **service_kw):
        self.core = iocpnet.IocpCore(backend, **(core_kw or {}))
        self.listener = iocpnet.Listener(("127.0.0.1", 0), ssl=ssl)
        self.service = iocpnet.Service(self.core, self.listener, session_cls, accepts,
                                       **service_kw)
        self.workers = workers
        self.threads = []
        self.worker_errors = []

    @property
    def port(self):
        return self.listener.port

    @property
    def address(self):
        return ("127.0.0.1", self.listener.port)

    def _worker(self):
        try:
            while self.core.Dispatch() >= 0:
                pass
        except BaseException as e:  # surfaced by stop()
            self.worker_errors.append(e)

    def start(self):
        if self.workers == 1:
            # What Run(workers=1) does: the one worker owns an io_uring ring of its own.
            self.core._single_dispatcher()
        self.service.Start()
        for i in range(self.workers):
            t = threading.Thread(target=self._worker, name=f"test-worker-{i}", daemon=True)
            t.start()
            self.threads.append(t)
        return self

    def stop(self, timeout=10):
        self.service.Stop(timeout)
        self.core.Close(timeout)
        for t in self.threads:
            t.join(timeout)
        alive = [t.name for t in self.threads if t.is_alive()]
        assert not alive, f"worker threads did not end: {alive}"
        assert not self.worker_errors, f"a worker failed: {self.worker_errors!r}"
        stats = self.core.stats()
        assert stats["in_flight"] == 0, f"operations left in flight: {stats}"
        assert stats["recv_buffers_out"] == 0, f"receive buffers not given back: {stats}"


@pytest.fixture
def server(backend):
    """server(SessionClass, workers=2, accepts=16, ssl=None, **service_kw) -> a started
    Server (``ssl``: the Listener's server-side ssl.SSLContext)."""
    made = []

    def make(session_cls, **kw):
        s = Server(session_cls, backend, **kw).start()
        made.append(s)
        return s

    yield make
    for s in made:
        s.stop()
    made.clear()


def connect(address, timeout=10):
    s = socket.create_connection(address, timeout=timeout)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def recv_exactly(sock, n):
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(min(n - len(buf), 1 << 20))
        if not chunk:
            raise ConnectionError(f"closed after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


def recv_until_eof(sock):
    buf = bytearray()
    while True:
        chunk = sock.recv(1 << 16)
        if not chunk:
            return bytes(buf)
        buf += chunk


def wait_for(predicate, timeout=10, message="condition"):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {message}")
        time.sleep(0.005)


def logged_per_burst(caplog, what, line, timeout=10):
    """A flood a service logs per burst (a LogBurst: its first lines in full, then
    "... and K more <what> in the last T s (the last: ...)"): wait for the count line,
    then return (the lines logged in full that contain `line`, the count lines, the
    events they stand for: one per line in full plus each count's K)."""
    counted = re.compile(rf"\.\.\. and (\d+) more {re.escape(what)} in the last [\d.]+ s "
                         rf"\(the last: .*{line}")
    wait_for(lambda: any(counted.match(r.getMessage()) for r in caplog.records),
             timeout, f"the count of the burst of {what}")
    messages = [r.getMessage() for r in caplog.records]
    counts = [m for m in map(counted.match, messages) if m]
    full = [m for m in messages if re.search(line, m) and not counted.match(m)]
    return full, counts, len(full) + sum(int(m.group(1)) for m in counts)



def assert_logged_per_burst(full, counts, total, n):
    """What logged_per_burst returned for a flood of n events: every event is accounted
    for, and the lines are far fewer than the events.  A burst logs 5 in full and one
    count; a loaded machine may split a flood into a few bursts (a quiet second ends
    one), which is right, so the bound is n // 2 lines, not one burst's 6: a line per
    event still fails it."""
    assert total == n, (total, n, full, [c.string for c in counts])
    assert len(full) + len(counts) <= n // 2, \
        (f"{len(full)} lines in full and {len(counts)} counts for {n} events", full)

class Recorder:
    """Thread-safe record of hook calls, shared by a test's session class."""

    def __init__(self):
        self.lock = threading.Lock()
        self.events = []
        self.disconnected = []
        self.disconnect_event = threading.Event()

    def add(self, *event):
        with self.lock:
            self.events.append(event)

    def on_disconnected(self, session, reason):
        # Keep the reason, not the session: holding it would look like a leak.
        with self.lock:
            self.disconnected.append((type(session).__name__, reason))
        self.disconnect_event.set()

    def wait_disconnects(self, n, timeout=10):
        wait_for(lambda: len(self.disconnected) >= n, timeout,
                 f"{n} OnDisconnected calls (got {len(self.disconnected)})")


@pytest.fixture
def recorder():
    return Recorder()


@pytest.fixture
def caplog_iocpnet(caplog):
    caplog.set_level(logging.INFO, logger="iocpnet")
    return caplog


# ---- a real redis-server (tests of Spawn and the game example) ----

# A redis-server must not outlive the pytest that started it (a killed or crashed run
# left them behind, holding ports and memory): setpriv (util-linux) gives it SIGKILL as
# its parent-death signal.  The kernel sends it when the *thread* that started it ends:
# every test starts its servers from pytest's main thread, which lives as long as pytest.
_SETPRIV = shutil.which("setpriv")


def _redis_argv(exe, *args):
    return [*([_SETPRIV, "--pdeathsig", "KILL"] if _SETPRIV else []), exe, *args]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def redis_port(tmp_path_factory):
    """A redis-server of our own on 127.0.0.1 (for Spawn and the game example); its port."""
    exe = shutil.which("redis-server")
    if exe is None:
        if os.environ.get("CI"):
            pytest.fail("redis-server is not installed (scripts/test.sh installs it)")
        pytest.skip("redis-server is not installed (scripts/test.sh installs it)")
    for _ in range(5):
        port = _free_port()
        proc = subprocess.Popen(
            _redis_argv(exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                        "--appendonly", "no", "--dir", str(tmp_path_factory.mktemp("redis"))),
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1) as c:
                    c.sendall(b"PING\r\n")
                    if c.recv(16).startswith(b"+PONG"):
                        break
            except OSError:
                time.sleep(0.05)
        if proc.poll() is None:
            break
    else:
        pytest.fail("redis-server would not start")
    yield port
    proc.terminate()
    proc.wait(10)


class RedisServer:
    """A redis-server of a test's own, on a free port of 127.0.0.1, that the test may
    stop (SIGKILL: a crash, nothing saved) and start again on the same port.  Extra
    arguments go to redis-server (``--requirepass``, TLS...)."""

    def __init__(self, workdir, *args, port=None, tls=None):
        self.exe = shutil.which("redis-server")
        if self.exe is None:
            if os.environ.get("CI"):
                pytest.fail("redis-server is not installed (scripts/test.sh installs it)")
            pytest.skip("redis-server is not installed (scripts/test.sh installs it)")
        self.workdir = str(workdir)
        self.args = [str(a) for a in args]
        self.tls = tls                    # (cert, key) files: serve TLS on self.port
        self.port = port or _free_port()
        self.proc = None

    def start(self, timeout=10):
        assert self.proc is None
        listen = (["--port", "0", "--tls-port", str(self.port), "--tls-cert-file",
                   self.tls[0], "--tls-key-file", self.tls[1], "--tls-auth-clients", "no"]
                  if self.tls else ["--port", str(self.port)])
        self.proc = subprocess.Popen(
            _redis_argv(self.exe, *listen, "--bind", "127.0.0.1", "--save", "",
                        "--appendonly", "no", "--dir", self.workdir, *self.args),
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"redis-server exited with {self.proc.returncode}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return self
            except OSError:
                if time.monotonic() > deadline:
                    raise AssertionError("redis-server would not start")
                time.sleep(0.05)

    def stop(self):
        """Kill it (SIGKILL): the clients see their connections reset."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(10)
            self.proc = None

    def url(self, password=None, user=None, db=0):
        auth = ""
        if password is not None:
            auth = f"{user or ''}:{password}@"
        return f"{'rediss' if self.tls else 'redis'}://{auth}127.0.0.1:{self.port}/{db}"

    def command(self, *args, password=None):
        """One command through a plain socket (tests' own view of the server)."""
        from iocpnet.resp import Parser, encode_command
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as c:
            p = Parser()
            out = []
            if password is not None:
                c.sendall(encode_command("AUTH", password))
            c.sendall(encode_command(*args))
            want = 2 if password is not None else 1
            while len(out) < want:
                data = c.recv(1 << 16)
                if not data:
                    raise ConnectionError("redis closed the connection")
                p.feed(data)
                out += p.replies()
            return out[-1]


@pytest.fixture
def redis_server(tmp_path):
    """redis_server(*args, tls=None) -> a started RedisServer, killed at the end."""
    made = []

    def make(*args, tls=None):
        d = tmp_path / f"redis{len(made)}"
        d.mkdir()
        r = RedisServer(d, *args, tls=tls).start()
        made.append(r)
        return r

    yield make
    for r in made:
        r.stop()
