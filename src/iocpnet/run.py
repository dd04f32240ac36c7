"""The control plane that is not on the hot path: Run, RunHandle, signals, Reconnect.

What it owns.  How a service is *run*: ``Service.Run`` (``run_service`` here) installs
the SIGINT/SIGTERM handlers, starts the worker threads that loop ``Dispatch``, waits
for ``Stop()``, a signal or ``seconds``, then has the service shut down with one
deadline; ``RunHandle`` is what ``Service.Start()`` returns (the workers it started,
``Stop()``, a context manager); ``Reconnect`` is the policy a ClientService asks how
long to wait before connecting again.  All of it runs a few times per process (a
reconnect: once per lost connection), so it is plain Python: nothing here is on the
path of a completion.  What the shutdown itself does (stop accepting, stop each
session on its strand, wait, close the core) stays in the extension
(core/service.pxi: ``Service._shut_down``), since it reads the sessions' C state.

Signals.  Python runs a signal handler on the main thread only, so ``run_service``
installs its handlers only there, before the workers start (a signal while they start
is a graceful stop too), and keeps them until the shutdown has ended: the first signal
asks for a graceful stop, a second one stops at once (``Service._stop_at_once``).
The previous handlers are put back on the way out.

Locks.  ``RunHandle._lock`` guards ``_stopped`` and the list of errors its workers
raised; the service's stop request is a ``threading.Event`` (``Service._stop_event``),
set from a signal handler, ``Stop()`` or a failed worker, and waited on here.  A
``Reconnect`` is read-only once made.
"""
from __future__ import annotations

import logging
import operator
import signal
import threading
import time
from types import FrameType, TracebackType
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Tuple

if TYPE_CHECKING:
    from iocpnet._core import Service

__all__ = ["Reconnect", "RunHandle", "run_service"]

logger = logging.getLogger("iocpnet")


class Reconnect:
    """A ClientService's reconnect policy: when a session ends (or cannot connect), a new
    one is opened after ``initial`` seconds, the delay growing by ``factor`` up to
    ``max_delay`` while attempts keep failing; after ``max_attempts`` failures in a row
    (None: no limit) the service stops trying.  A connection that stayed up for
    ``reset_after`` seconds resets it; one that ends sooner counts as a failed attempt
    (a server that accepts and closes at once is backed off from like a refused one)."""

    def __init__(self, initial: float = 0.5, max_delay: float = 30.0, factor: float = 2.0,
                 max_attempts: Optional[int] = None, reset_after: float = 1.0) -> None:
        # Written so that NaN fails too (every comparison with it is false).
        if not (initial >= 0 and max_delay >= 0 and factor >= 1 and reset_after >= 0):
            raise ValueError("initial, max_delay and reset_after must be >= 0 and "
                             "factor >= 1")
        self.initial = float(initial)
        self.max_delay = float(max_delay)
        self.factor = float(factor)
        if max_attempts is not None:
            # An int (say, not the string a config file gives): the service compares
            # with it inside a completion, where a TypeError would end the retrying.
            max_attempts = operator.index(max_attempts)
            if max_attempts < 0:
                raise ValueError("max_attempts must be None or >= 0")
        self.max_attempts = max_attempts
        self.reset_after = float(reset_after)

    def delay(self, failures: int) -> float:
        """Seconds to wait after `failures` failed attempts in a row (0 after a drop)."""
        try:
            grown = self.initial * self.factor ** max(failures - 1, 0)
        except OverflowError:       # factor ** n past a float, some 1000 failures on
            grown = float("inf")
        return min(self.max_delay, grown)

    def __repr__(self) -> str:
        return (f"Reconnect(initial={self.initial}, max_delay={self.max_delay}, "
                f"factor={self.factor}, max_attempts={self.max_attempts}, "
                f"reset_after={self.reset_after})")


def _seconds(value: float, name: str) -> float:
    """A timeout as a float; NaN refused (no comparison with it is true: a deadline of
    NaN never comes, and Run(seconds=nan) ran forever)."""
    value = float(value)
    if value != value:
        raise ValueError(f"{name} must be a number of seconds, not NaN")
    return value


def run_service(service: Service, workers: Optional[int] = None, *,
                seconds: Optional[float] = None, shutdown_timeout: float = 5.0) -> None:
    """``Service.Run``: see its docstring."""
    from iocpnet._core import default_workers
    if workers is None:
        workers = default_workers()
    workers = int(workers)
    if workers <= 0:
        raise ValueError("workers must be positive")
    shutdown_timeout = _seconds(shutdown_timeout, "shutdown_timeout")
    until = None if seconds is None else time.monotonic() + _seconds(seconds, "seconds")
    svc: Any = service                    # its private side (core/service.pxi)
    core = svc.core
    stop_event = svc._stop_event
    errors: List[BaseException] = []
    threads: List[threading.Thread] = []

    def worker() -> None:
        try:
            core._work()
        except BaseException as e:
            errors.append(e)
            logger.exception("worker thread failed")
            stop_event.set()

    # The handlers first: a signal while the workers start is a graceful stop too.
    old_handlers: Dict[int, Any] = {}
    if threading.current_thread() is threading.main_thread():
        def on_signal(signum: int, frame: Optional[FrameType]) -> None:
            name = signal.Signals(signum).name
            if stop_event.is_set():
                logger.warning("%s received again; stopping at once", name)
                svc._stop_at_once()
            else:
                logger.info("%s received; shutting down (within %g s; a second "
                            "one stops at once)", name, shutdown_timeout)
                stop_event.set()
        for sig in (signal.SIGINT, getattr(signal, "SIGTERM", None)):
            if sig is not None:
                old_handlers[sig] = signal.signal(sig, on_signal)
    try:
        if svc._stopping or not svc._started:
            if workers == 1:
                # One thread dispatches this core until Run closes it: io_uring can then
                # run completion work inside that thread's waits (cheaper per message).
                # Only a core that has submitted nothing yet; otherwise nothing changes.
                core._single_dispatcher()
            svc.Start()
        for i in range(workers):
            t = threading.Thread(target=worker, name=f"iocpnet-worker-{i}", daemon=True)
            t.start()
            threads.append(t)
        while not stop_event.wait(
                0.25 if until is None else max(0.0, min(0.25, until - time.monotonic()))):
            if until is not None and time.monotonic() >= until:
                break
        # The signal handler stays installed until the end, for a second signal.
        svc._shut_down(threads, shutdown_timeout)
    finally:
        for sig, h in old_handlers.items():
            signal.signal(sig, h)
        svc._run_ended()
    if errors:
        raise errors[0]


class RunHandle:
    """A started service, returned at once by ``Service.Start()``: ``.port`` (the bound
    port, for ``Listener(0)``), ``.address``, ``.Stop()``; a context manager that stops
    on exit.  When it started worker threads (``Start(workers=N)``) they are its own:
    ``Stop()`` shuts down as ``Run`` does (stop the service, close the core, join the
    workers) and raises what a worker raised, if anything.  Without workers ``Stop()``
    stops the service only."""

    def __init__(self, service: Service, workers: int) -> None:
        self.service = service
        self.core = service.core
        self.workers = int(workers)
        self._threads: List[threading.Thread] = []
        self._errors: List[BaseException] = []
        self._stopped = False
        self._lock = threading.Lock()
        for i in range(self.workers):
            t = threading.Thread(target=self._worker, name=f"iocpnet-worker-{i}",
                                 daemon=True)
            t.start()
            self._threads.append(t)

    def _worker(self) -> None:
        core = self.core
        try:
            while core.Dispatch() >= 0:
                pass
        except BaseException as e:
            with self._lock:
                self._errors.append(e)
            logger.exception("worker thread failed")

    def __repr__(self) -> str:
        state = "stopped" if self._stopped else "running"
        return f"<RunHandle {self.service!r} workers={self.workers} {state}>"

    @property
    def port(self) -> Optional[int]:
        """The listening port (None for a ClientService)."""
        listener = self.service.listener
        return listener.port if listener is not None else None

    @property
    def address(self) -> Tuple[Optional[str], int]:
        """The listening (host, port), or a ClientService's server address."""
        listener = self.service.listener
        if listener is not None:
            return listener.address
        address: Tuple[Optional[str], int] = getattr(self.service, "address")
        return address

    @property
    def running(self) -> bool:
        return not self._stopped

    def Stop(self, timeout: float = 5.0) -> None:
        """Graceful shutdown (idempotent, any thread): the service stops (sessions are
        disconnected, queued data flushed); with worker threads of its own, the core is
        closed and they are joined (a KeyboardInterrupt meanwhile stops at once, then
        is raised).  From a hook (a worker thread) it starts the
        shutdown and returns; a later call from another thread still waits for all of
        it (every call outside the workers returns only once the shutdown is done)."""
        timeout = _seconds(timeout, "timeout")
        with self._lock:
            self._stopped = True
        if not self._threads:
            self.service.Stop(timeout)
            return
        # Each call runs the whole shutdown: every step of it is idempotent, and one
        # made by a worker (which cannot wait for itself) must not let a later caller
        # return while the sessions, the core and the workers are still ending.
        svc: Any = self.service
        try:
            svc._shut_down(self._threads, timeout)
        except KeyboardInterrupt:
            # Ctrl-C while the shutdown waits (often a second one: the first is what
            # unwinds through `with`): stop at once, as Run's second signal does, so
            # that the core is not left open under running workers; then let it go on.
            svc._stop_at_once()
            svc._shut_down(self._threads, 0.0)
            raise
        if svc._from_worker():
            return
        with self._lock:
            errors, self._errors = self._errors, []
        if errors:
            raise errors[0]

    def __enter__(self) -> RunHandle:
        return self

    def __exit__(self, exc_type: Optional[type], exc: Optional[BaseException],
                 tb: Optional[TracebackType]) -> None:
        self.Stop()

