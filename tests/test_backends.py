"""Backend selection: the best available by default, forced by argument or environment,
and the real fallback to epoll when io_uring is disabled."""
import contextlib
import logging
import os
import subprocess
import sys
import threading

import pytest

import iocpnet

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
    """kernel.io_uring_disabled=2 for the duration, restored whatever happens."""
    path = "/proc/sys/kernel/io_uring_disabled"
    if not sys.platform.startswith("linux"):
        pytest.skip("io_uring is Linux only")
    if not os.path.exists(path):
        pytest.skip("this kernel has no kernel.io_uring_disabled sysctl (before 6.6)")
    if os.geteuid() != 0:
        pytest.skip("setting kernel.io_uring_disabled needs root")
    if "io_uring" not in iocpnet.compiled_backends():
        pytest.skip("this build has no io_uring backend")
    old = open(path).read().strip()
    subprocess.run(["sysctl", "-q", "-w", "kernel.io_uring_disabled=2"], check=True)
    try:
        yield
    finally:
        subprocess.run(["sysctl", "-q", "-w", f"kernel.io_uring_disabled={old}"], check=True)
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
