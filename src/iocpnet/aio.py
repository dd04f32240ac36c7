"""The asyncio loop behind ``Spawn``: one loop per IocpCore, in a thread of its own.

Why a thread.  A hook runs on a worker thread and must return quickly: a worker that
waits for a database holds back every session whose completions it has in its batch.
Real servers still need to call databases and web services, whose clients are written
for asyncio.  So the core owns one event loop, started on the first ``Spawn`` in a
daemon thread named ``iocpnet-aio`` (uvloop's loop when uvloop is importable, unless
``IOCPNET_AIO_LOOP=asyncio``), and every awaitable runs there.  Nothing waits for it:
when an awaitable ends, its outcome is handed to the owner's strand as a posted
completion (``Task._from_loop`` in core/strand.pxi), and the owner's callback runs
there like a hook.  A login that awaits a lookup therefore costs a worker nothing
while it waits.

What it owns.  ``Runner``: the loop, its thread and the asyncio tasks it runs.
``Handle``: one awaitable's life (``start`` -> asyncio task -> ``on_done`` exactly
once, with ``(cancelled, result, exception)``).  Everything about a handle's asyncio
task happens on the loop thread (start, cancel, completion), ordered by
``call_soon_threadsafe``; other threads only set ``Handle._cancelled`` and queue calls.
``Runner._lock`` guards ``_closing``, so that no start is queued behind the shutdown.

Stopping.  ``IocpCore.Close`` calls ``Runner.close``: new starts are refused (their
``on_done`` reports them cancelled), running tasks are cancelled and awaited (bounded),
then the loop stops and the thread is joined.  The owners' ends cancel their own tasks
earlier (a session's when it disconnects).
"""
from __future__ import annotations

import inspect
import logging
import os
import threading
from asyncio import CancelledError
from typing import Any, Awaitable, Callable, Optional, Set

__all__ = ["CancelledError", "Runner", "Handle", "isawaitable", "discard", "loop_kind"]

log = logging.getLogger("iocpnet")

isawaitable = inspect.isawaitable

OnDone = Callable[[bool, Any, Optional[BaseException]], None]


def loop_kind() -> str:
    """The loop a new Runner will use: "uvloop" when it is importable (and not turned
    off with IOCPNET_AIO_LOOP=asyncio), else "asyncio"."""
    want = os.environ.get("IOCPNET_AIO_LOOP", "").strip().lower()
    if want == "asyncio":
        return "asyncio"
    try:
        import uvloop  # noqa: F401
    except ImportError:
        if want == "uvloop":
            raise RuntimeError("IOCPNET_AIO_LOOP=uvloop, but uvloop is not installed")
        return "asyncio"
    return "uvloop"


def discard(awaitable: object) -> None:
    """An awaitable that will never run: close a coroutine, so that Python does not
    warn that it was never awaited."""
    close = getattr(awaitable, "close", None)
    if inspect.iscoroutine(awaitable) and close is not None:
        close()


async def _await(awaitable: Awaitable[Any]) -> Any:
    return await awaitable


class Handle:
    """One awaitable on the loop: started once, cancelled at most once, done once."""

    __slots__ = ("_runner", "_task", "_cancelled", "_awaitable", "_on_done")

    def __init__(self, runner: Runner) -> None:
        self._runner = runner
        self._task: Any = None
        self._cancelled = False
        self._awaitable: Any = None
        self._on_done: Optional[OnDone] = None

    def cancel(self) -> None:
        """Any thread: cancel the awaitable (before it starts, or while it runs)."""
        self._cancelled = True
        self._runner._call(self._cancel_in_loop)

    def _cancel_in_loop(self) -> None:
        if self._task is not None:
            self._task.cancel()

    def _done(self, cancelled: bool, result: Any, exc: Optional[BaseException]) -> None:
        cb, self._on_done = self._on_done, None
        if cb is None:
            return
        try:
            cb(cancelled, result, exc)
        except BaseException:
            log.exception("delivering a task's outcome failed")

    def _task_done(self, task: Any) -> None:
        self._runner._tasks.discard(task)
        self._task = None
        if task.cancelled():
            self._done(True, None, None)
            return
        exc = task.exception()
        if exc is not None:
            self._done(False, None, exc)
        else:
            self._done(False, task.result(), None)


class Runner:
    """An asyncio (or uvloop) event loop running in a daemon thread of its own."""

    def __init__(self, name: str = "iocpnet-aio", shutdown_timeout: float = 5.0) -> None:
        import asyncio
        self._asyncio = asyncio
        self.kind = loop_kind()
        self.shutdown_timeout = shutdown_timeout
        self._lock = threading.Lock()
        self._closing = False
        self._stopped = False        # the shutdown asked the loop to stop (loop thread)
        self._tasks: Set[Any] = set()
        self._loop: Any = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()
        self._ready.wait()
        log.debug("asyncio loop thread started (%s)", self.kind)

    def __repr__(self) -> str:
        state = "closing" if self._closing else "running"
        return f"<iocpnet.aio.Runner {self.kind} {state} tasks={len(self._tasks)}>"

    def _run(self) -> None:
        asyncio = self._asyncio
        if self.kind == "uvloop":
            import uvloop
            loop = uvloop.new_event_loop()
        else:
            loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        self._loop = loop
        self._ready.set()
        try:
            while True:
                try:
                    loop.run_forever()
                    break
                except (KeyboardInterrupt, SystemExit) as e:
                    # asyncio lets these two out of run_forever (they stop asyncio.run);
                    # here they would end the thread and every later Spawn with it.  The
                    # task that raised already holds the exception: its owner gets it
                    # as the outcome once the loop runs again.
                    if self._stopped:
                        break
                    log.error("%s escaped a task on the asyncio loop thread; the loop "
                              "goes on", type(e).__name__)
        finally:
            try:
                loop.run_until_complete(loop.shutdown_asyncgens())
            finally:
                asyncio.set_event_loop(None)
                loop.close()

    def _call(self, func: Callable[..., Any], *args: Any) -> bool:
        """Queue func(*args) on the loop thread; False once the loop is gone."""
        try:
            self._loop.call_soon_threadsafe(func, *args)
            return True
        except RuntimeError:          # the loop is closed
            return False

    def handle(self) -> Handle:
        return Handle(self)

    def start(self, handle: Handle, awaitable: Awaitable[Any], on_done: OnDone) -> None:
        """Run `awaitable` on the loop (any thread); `on_done(cancelled, result, exc)`
        is called exactly once, on the loop thread (or on this one when the runner is
        closing and the awaitable never starts)."""
        handle._awaitable = awaitable
        handle._on_done = on_done
        with self._lock:
            if not self._closing and self._call(self._start, handle):
                return
        handle._awaitable = None
        discard(awaitable)
        handle._done(True, None, None)

    def _start(self, handle: Handle) -> None:
        awaitable, handle._awaitable = handle._awaitable, None
        if handle._cancelled or self._closing:
            discard(awaitable)
            handle._done(True, None, None)
            return
        coro = awaitable if inspect.iscoroutine(awaitable) else _await(awaitable)
        task = self._loop.create_task(coro)
        handle._task = task
        self._tasks.add(task)
        task.add_done_callback(handle._task_done)

    def close(self, timeout: Optional[float] = None) -> None:
        """Cancel every task, wait for them (bounded), stop the loop, join the thread.
        Idempotent, any thread (from the loop thread itself it does not wait)."""
        with self._lock:
            if self._closing:
                return
            self._closing = True
        timeout = self.shutdown_timeout if timeout is None else timeout
        if not self._call(self._shutdown, timeout):
            return
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout + 1.0)
            if self._thread.is_alive():
                log.warning("the asyncio loop thread did not stop in %.1f s", timeout + 1.0)

    def _shutdown(self, timeout: float) -> None:
        asyncio = self._asyncio
        tasks = list(self._tasks)
        for t in tasks:
            t.cancel()

        async def drain() -> None:
            if tasks:
                done, pending = await asyncio.wait(tasks, timeout=timeout)
                if pending:
                    log.warning("%d task(s) did not end within %.1f s of their "
                                "cancellation", len(pending), timeout)
            self._stopped = True
            self._loop.stop()

        self._loop.create_task(drain())
