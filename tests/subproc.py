"""Run a program (an example, the CLI) as a child process and watch its output, for
test_examples.py and test_cli.py.  Every wait is bounded; a child still running when
the test ends is killed, so no test leaves a server behind."""
import importlib.util
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"


def load_example(name):
    """Import examples/<name>.py as a module (the examples are scripts, not a package)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


_RESTORE_SIGINT = ("import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
                   "os.execvp(sys.argv[1], sys.argv[1:])")


class Proc:
    """A child whose stdout and stderr lines (merged) are collected by a thread."""

    def __init__(self, argv, backend=None, **kw):
        env = dict(os.environ)
        if backend is not None:
            env["IOCPNET_BACKEND"] = backend
        env["PYTHONUNBUFFERED"] = "1"
        self.argv = [str(a) for a in argv]
        argv = self.argv
        if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
            # An ignored SIGINT is inherited across exec, and a Python started with it
            # ignored never raises KeyboardInterrupt: under pytest-xdist (its workers
            # ignore SIGINT) a child would not see the Ctrl-C a test sends it.  Start
            # the program through a shim that restores the default first, as a shell does.
            argv = [sys.executable, "-c", _RESTORE_SIGINT, *argv]
        self.p = subprocess.Popen(argv, stdin=subprocess.DEVNULL,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  env=env, text=True, **kw)
        self.lines = []
        self.cond = threading.Condition()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    @classmethod
    def python(cls, *args, backend=None, **kw):
        return cls([sys.executable, *args], backend=backend, **kw)

    def _read(self):
        for line in self.p.stdout:
            with self.cond:
                self.lines.append(line.rstrip("\n"))
                self.cond.notify_all()
        with self.cond:
            self.cond.notify_all()

    @property
    def output(self):
        with self.cond:
            return "\n".join(self.lines)

    def wait_for_line(self, pattern, timeout=60, count=1):
        """Wait until `count` lines match the regex; returns the match objects.  A child
        that exits ends the wait at once, so the bound only meets a child that hangs:
        it is generous (60 s) because a loaded machine once kept 3.13t children from
        printing their first line for over 15 s, four tests in a row."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                found = [m for m in (rx.search(line) for line in self.lines) if m]
                if len(found) >= count:
                    return found[:count]
                left = deadline - time.monotonic()
                if left <= 0 or (self.p.poll() is not None and not self.reader.is_alive()):
                    raise AssertionError(
                        f"{count} line(s) matching {pattern!r} not seen from "
                        f"{' '.join(self.argv)}; output:\n{self.output_locked()}")
                self.cond.wait(min(left, 0.1))

    def output_locked(self):
        return "\n".join(self.lines)

    def port(self, pattern=r":(\d+)\b", timeout=60):
        return int(self.wait_for_line(pattern, timeout)[0].group(1))

    def signal(self, sig=signal.SIGINT):
        self.p.send_signal(sig)

    def wait(self, timeout=30):
        """Wait for the exit; returns the exit code (the output is complete then)."""
        try:
            rc = self.p.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"{' '.join(self.argv)} did not exit within {timeout} s; "
                                 f"output:\n{self.output}") from None
        self.reader.join(10)
        return rc

    def kill(self):
        if self.p.poll() is None:
            self.p.kill()
            self.p.wait(10)
        self.reader.join(10)
        if self.p.stdout is not None:
            self.p.stdout.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.kill()
