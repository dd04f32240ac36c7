"""Free-threaded CPython (3.13t): importing iocpnet leaves the GIL off, and hooks of
different sessions really run at the same time on different workers.

On a free-threaded interpreter CPython turns the GIL back on, with only a warning, as
soon as it imports an extension module that does not declare that it can run without
it.  Nothing would fail: the workers would just take turns again.  So the declaration
(Cython's ``freethreading_compatible`` directive in ``_core.pyx``) is checked here, in
this process and in a clean one where nothing (``PYTHON_GIL``, ``-X gil``) can force
the answer.
"""
import os
import pkgutil
import subprocess
import sys
import sysconfig
import threading

import pytest

import iocpnet

from conftest import connect, recv_exactly, wait_for

FREE_THREADED = bool(sysconfig.get_config_var("Py_GIL_DISABLED"))

needs_free_threading = pytest.mark.skipif(
    not FREE_THREADED,
    reason="needs a free-threaded CPython (3.13t); this interpreter always has a GIL")

# Every module of the package, so that a new one that re-enables the GIL is caught.
MODULES = ["iocpnet"] + sorted(f"iocpnet.{m.name}"
                               for m in pkgutil.iter_modules(iocpnet.__path__))


@needs_free_threading
def test_gil_stays_off_after_import_in_this_process():
    assert "iocpnet._core" in MODULES
    for name in MODULES:
        __import__(name)
    assert sys._is_gil_enabled() is False, (
        "importing iocpnet turned the GIL back on: an extension module of the package "
        "does not declare free-threading support")


@needs_free_threading
def test_gil_stays_off_after_import_in_a_clean_interpreter(tmp_path):
    """A fresh interpreter with PYTHON_GIL unset and no ``-X gil``: only the modules'
    own declarations decide.  CPython's warning about re-enabling the GIL is made an
    error, so that the failure names the module that did it."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHON_GIL", "PYTHONWARNINGS", "PYTHONDEVMODE")}
    # Import the same iocpnet as this process (installed wheel or a dev build).
    pkg_parent = os.path.dirname(os.path.dirname(os.path.abspath(iocpnet.__file__)))
    env["PYTHONPATH"] = os.pathsep.join([pkg_parent] + [
        p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    code = (
        "import sys, importlib\n"
        "assert not sys._is_gil_enabled(), 'GIL on before importing anything'\n"
        f"for name in {MODULES!r}:\n"
        "    importlib.import_module(name)\n"
        "    if sys._is_gil_enabled():\n"
        "        print('GIL enabled by', name)\n"
        "        break\n"
        "print('gil_enabled=%s' % sys._is_gil_enabled())\n"
        "import iocpnet; print('from', iocpnet._core.__file__)\n"
    )
    r = subprocess.run([sys.executable, "-W", "error::RuntimeWarning",
                        "-c", code], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, f"stdout:\n{r.stdout}\nstderr:\n{r.stderr}"
    assert "gil_enabled=False" in r.stdout, r.stdout + r.stderr
    assert os.path.dirname(os.path.abspath(iocpnet._core.__file__)) in r.stdout


def test_gil_build_reports_the_gil_on():
    """On a build with a GIL the same check must say so (it is not a constant)."""
    if FREE_THREADED:
        pytest.skip("free-threaded interpreter; see the tests above")
    assert getattr(sys, "_is_gil_enabled", lambda: True)() is True


def test_two_sessions_hooks_run_at_the_same_time(server):
    """Different sessions' hooks run at once on different workers: the first session's
    OnRecv waits, inside the hook, for the second session's OnRecv to start.  If the
    core ran hooks one at a time (one lock around dispatch, one strand for everything),
    the barrier would time out.  The second message is sent only once the first hook is
    running, so its completion cannot be in the batch the first worker took: another
    worker must pick it up.  This holds on every interpreter (waiting on a barrier lets
    the GIL go); on 3.13t the hooks also run Python code in parallel, and the GIL is
    still off once they have run."""
    barrier = threading.Barrier(2, timeout=10)
    first_in = threading.Event()
    results, connected = [], []

    class Meet(iocpnet.Session):
        def OnConnected(self):
            connected.append(self)

        def OnRecv(self, data):
            if bytes(data) == b"a":
                first_in.set()
            try:
                barrier.wait()
                results.append(threading.get_ident())
            except threading.BrokenBarrierError:
                results.append(None)
            self.Send(bytes(data))

    srv = server(Meet, workers=4)
    with connect(srv.address) as a, connect(srv.address) as b:
        # Both sessions accepted first: b's accept completing in the same batch as a's
        # data, behind the hook that waits for b, would hold b back for good.
        wait_for(lambda: len(connected) == 2, message="both sessions connected")
        connected.clear()
        a.sendall(b"a")
        assert first_in.wait(10), "the first OnRecv never ran"
        b.sendall(b"b")
        assert recv_exactly(a, 1) == b"a"
        assert recv_exactly(b, 1) == b"b"
    assert None not in results, "the two sessions' hooks never ran at the same time"
    assert len(set(results)) == 2, "both hooks ran on the same thread"
    if FREE_THREADED:
        assert sys._is_gil_enabled() is False, "the GIL came back while the server ran"
