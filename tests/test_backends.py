"""Backend selection: the best available by default, forced by argument or environment,
and the real fallback to epoll when io_uring is disabled."""
import contextlib
import fcntl
import logging
import os
import subprocess
import sys
import textwrap
import threading
import time

import pytest

import iocpnet

import machine_lock
from conftest import connect, recv_exactly


class Echo(iocpnet.Session):
    def OnRecv(self, data):
        self.Send(data)


def echo_once(core):
    service = iocpnet.Service(core, iocpnet.Listener(("127.0.0.1", 0)), Echo, 4)
    service.Start()
    t = threading.Thread(target=lambda: [None for _ in iter(lambda: core.Dispatch() >= 0,
                                                            False)])
    t.start()
    try:
        with connect(("127.0.0.1", service.listener.port)) as c:
            c.sendall(b"fallback works")
            return recv_exactly(c, 14)
    finally:
        service.Stop()
        core.Close()
        t.join(10)


def test_available_backends_are_known_and_best_first():
    avail = iocpnet.available_backends()
    assert avail, "no backend can run here"
    compiled = iocpnet.compiled_backends()
    assert set(avail) <= {"io_uring", "epoll", "iocp"}
    assert avail == [b for b in compiled if b in avail]     # same order: best first
    if sys.platform.startswith("linux"):
        assert "epoll" in avail


def test_default_picks_the_first_available():
    core = iocpnet.IocpCore()
    try:
        assert core.backend == iocpnet.available_backends()[0]
    finally:
        core.Close()


def test_forced_backend(backend):
    core = iocpnet.IocpCore(backend=backend)
    try:
        assert core.backend == backend
        assert echo_once(core) == b"fallback works"
    finally:
        core.Close()


def test_environment_variable_forces_a_backend(backend, monkeypatch):
    monkeypatch.setenv("IOCPNET_BACKEND", backend)
    core = iocpnet.IocpCore()
    try:
        assert core.backend == backend
    finally:
        core.Close()


def test_unknown_backend_is_a_clear_error():
    with pytest.raises(iocpnet.BackendUnavailableError, match="kqueue"):
        iocpnet.IocpCore(backend="kqueue")


def test_backend_choice_is_logged(caplog):
    caplog.set_level(logging.INFO, logger="iocpnet")
    # A fresh process: the choice is logged once per process.
    out = subprocess.run(
        [sys.executable, "-c",
         "import logging, iocpnet; logging.basicConfig(level=logging.INFO); "
         "iocpnet.IocpCore().Close(); iocpnet.IocpCore().Close()"],
        capture_output=True, text=True, timeout=60)
    lines = [l for l in out.stderr.splitlines() if "backend" in l]
    assert len(lines) == 1, out.stderr
    assert f"using the {iocpnet.available_backends()[0]} backend" in lines[0]


@contextlib.contextmanager
def io_uring_disabled():
    """kernel.io_uring_disabled=2 for the duration, restored whatever happens; once every
    other test on this machine has ended, and none starts meanwhile (machine_lock)."""
    path = "/proc/sys/kernel/io_uring_disabled"
    if not sys.platform.startswith("linux"):
        pytest.skip("io_uring is Linux only")
    if not os.path.exists(path):
        pytest.skip("this kernel has no kernel.io_uring_disabled sysctl (before 6.6)")
    if os.geteuid() != 0:
        pytest.skip("setting kernel.io_uring_disabled needs root")
    if "io_uring" not in iocpnet.compiled_backends():
        pytest.skip("this build has no io_uring backend")
    with machine_lock.exclusive():
        old = open(path).read().strip()
        subprocess.run(["sysctl", "-q", "-w", "kernel.io_uring_disabled=2"], check=True)
        try:
            yield
        finally:
            subprocess.run(["sysctl", "-q", "-w", f"kernel.io_uring_disabled={old}"],
                           check=True)
            assert open(path).read().strip() == old


@pytest.mark.machine_state     # switches io_uring off machine-wide: run alone (scripts/test.sh step 9)
def test_fallback_to_epoll_when_io_uring_is_disabled(caplog):
    """The real thing: io_uring switched off in the kernel, as on RHEL 9 or under a
    container's seccomp profile; a new IocpCore must pick epoll, say why, and work."""
    caplog.set_level(logging.INFO, logger="iocpnet")
    with io_uring_disabled():
        assert iocpnet.available_backends() == ["epoll"]
        assert "operation not permitted" in iocpnet.backend_unavailable_reason("io_uring")
        core = iocpnet.IocpCore()
        assert core.backend == "epoll"
        assert echo_once(core) == b"fallback works"
        with pytest.raises(iocpnet.BackendUnavailableError,
                           match="io_uring.*cannot run here.*not permitted"):
            iocpnet.IocpCore(backend="io_uring")
    messages = [r.getMessage() for r in caplog.records]
    assert any("io_uring unavailable" in m and "using the epoll backend" in m
               for m in messages), messages


def wait_for_file(path, text, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if os.path.exists(path) and open(path).read() == text:
            return
        time.sleep(0.01)
    raise AssertionError(f"{path} never said {text!r}")


@pytest.mark.machine_state     # switches io_uring off machine-wide (behind machine_lock)
def test_io_uring_tests_of_other_processes_are_not_cut(tmp_path):
    """A test in another pytest process (another xdist worker, CI run or person) that
    opens io_uring rings while the fallback test runs: the fallback test waits for it to
    end (and the sysctl is never set under it)."""
    flag = tmp_path / "flag"
    probe = tmp_path / "test_probe.py"
    probe.write_text(textwrap.dedent(f"""
        import os, time, iocpnet

        def test_probe():
            iocpnet.IocpCore("io_uring").Close()
            open({str(flag)!r}, "w").write("in")
            deadline = time.monotonic() + 60
            while open({str(flag)!r}).read() != "go" and time.monotonic() < deadline:
                time.sleep(0.01)
            time.sleep(1)    # the fallback test has had 1 s to switch io_uring off
            iocpnet.IocpCore("io_uring").Close()
            open({str(flag)!r}, "w").write("done")
    """))
    tests = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [tests] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    # The suite's conftest as a plugin (its guard), from a directory of its own.
    child = subprocess.Popen(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "conftest",
         "--rootdir", str(tmp_path), str(probe)],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for_file(flag, "in")
        flag.write_text("go")
        with io_uring_disabled():
            said = flag.read_text()
            out = child.communicate(timeout=120)[0]      # (io_uring still off)
    finally:
        if child.poll() is None:
            child.kill()
            out = child.communicate()[0]
    assert said == "done", "the fallback test switched io_uring off under another test"
    assert child.returncode == 0, out


def hold(lock, how, flag, seconds):
    """A process that holds `lock` (shared or exclusive), says so in `flag`, lets go
    after `seconds`; its output: the monotonic times it got and released it."""
    code = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r})
        import machine_lock
        with machine_lock.{how}({lock!r}):
            print(time.monotonic(), flush=True)
            open({flag!r}, "w").write("held")
            time.sleep({seconds})
            print(time.monotonic(), flush=True)
    """)
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)


def times(proc):
    out = proc.communicate(timeout=60)[0]
    assert proc.returncode == 0, out
    got, released = map(float, out.split())
    return got, released


def test_machine_lock_exclusive_waits_for_shared_holders(tmp_path):
    lock = str(tmp_path / "lock")
    holder = hold(lock, "shared", str(tmp_path / "flag"), 0.5)
    wait_for_file(str(tmp_path / "flag"), "held")
    with machine_lock.shared(lock):              # shared holders do not wait for each other
        pass
    with machine_lock.exclusive(lock):
        got = time.monotonic()
    _, released = times(holder)
    assert got >= released


def test_machine_lock_a_waiting_exclusive_holds_off_new_shared_holders(tmp_path):
    """The turnstile: once a machine_state test waits, tests that start after it wait
    for it, so that back-to-back tests in two processes cannot starve it."""
    lock = str(tmp_path / "lock")
    first = hold(lock, "shared", str(tmp_path / "first"), 1.0)
    wait_for_file(str(tmp_path / "first"), "held")
    waiter = hold(lock, "exclusive", str(tmp_path / "waiter"), 0.2)
    # The exclusive side is waiting once it holds the turnstile.
    deadline = time.monotonic() + 60
    gate = os.open(lock + ".turnstile", os.O_RDONLY)
    try:
        while True:
            try:
                fcntl.flock(gate, fcntl.LOCK_SH | fcntl.LOCK_NB)
                fcntl.flock(gate, fcntl.LOCK_UN)
            except BlockingIOError:
                break
            assert time.monotonic() < deadline, "the exclusive side never waited"
            time.sleep(0.005)
    finally:
        os.close(gate)
    with machine_lock.shared(lock):          # started after the waiter: served after it
        late = time.monotonic()
    first_got, first_released = times(first)
    waiter_got, waiter_released = times(waiter)
    assert first_released <= waiter_got <= waiter_released <= late


def test_machine_lock_wait_is_bounded_with_a_clear_message(tmp_path):
    lock = str(tmp_path / "lock")
    holder = hold(lock, "shared", str(tmp_path / "flag"), 2.0)
    try:
        wait_for_file(str(tmp_path / "flag"), "held")
        with pytest.raises(TimeoutError, match="still held by another test.*fuser -v"):
            with machine_lock.exclusive(lock, wait_s=0.2):
                pass
        # Given up: the turnstile is free again, shared holders pass.
        with machine_lock.shared(lock, wait_s=0.2):
            pass
    finally:
        times(holder)
