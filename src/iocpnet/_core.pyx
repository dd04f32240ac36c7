# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
# cython: freethreading_compatible=True
"""The hot core of iocpnet: IocpCore.Dispatch, Listener, Session, Service, jobs and timers.

Ownership follows the C++ original: every operation in flight holds one strong reference
to its owner (the original's ``owner = shared_from_this()``), taken when it is submitted
and dropped when its final completion has been dispatched (``owner = nullptr``).  A
session therefore lives exactly as long as user code or one of its operations needs it,
and no completion ever reaches freed memory.

Threads: any number of threads may run ``IocpCore.Dispatch``.  One session's completions
reach it one at a time and in order (the port's strands); state shared with other
threads (the send queue, the session's state, the service's session set) has its own
lock, so correctness never depends on the GIL.  The per-session lock is a spin lock held
only around plain C work and ``bytes`` releases: nothing under it can run Python code,
which is what makes it safe next to the GIL.
"""
cimport cython
from cpython.ref cimport PyObject
from cpython.buffer cimport (PyBuffer_FillInfo, PyBuffer_Release, PyObject_GetBuffer,
                             PyBUF_SIMPLE)
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE, PyBytes_FromStringAndSize
from cpython.exc cimport PyErr_CheckSignals
from cpython.memoryview cimport PyMemoryView_FromObject
from libc.stdint cimport int32_t, int64_t, uint64_t
from libc.stdlib cimport malloc, free, realloc
from libc.string cimport memcpy, memmove

from iocpnet._port cimport *

import errno as _errno
import logging
import os
import threading
import time as _time
import traceback as _traceback

logger = logging.getLogger("iocpnet")

cdef extern from "Python.h":
    void _incref "Py_INCREF"(PyObject *o) nogil
    void _decref "Py_DECREF"(PyObject *o)


cdef inline object _steal(PyObject *o):
    """Take ownership of a new reference returned by C code."""
    cdef object r = <object>o
    _decref(o)
    return r

cdef extern from *:
    """
    #include "port/port_sync.h"
    /* The core whose batch this thread is dispatching (to tell a worker from others). */
    static PORT_THREAD_LOCAL void *iocpnet_tls_core = 0;
    static void *iocpnet_get_tls_core(void) { return iocpnet_tls_core; }
    static void iocpnet_set_tls_core(void *c) { iocpnet_tls_core = c; }

    /* OnRecv's memoryview is recycled (see IocpCore._take_view): a memoryview nobody
     * else refers to, with no derived view or export, is pointed at the next bytes.
     * These touch CPython's memoryview internals, stable from 3.9 to 3.13. */
    static int iocpnet_mv_unshared(PyObject *o) {
        PyMemoryViewObject *mv = (PyMemoryViewObject *)o;
        return Py_REFCNT(o) == 1 && mv->exports == 0 && mv->mbuf->exports == 1 &&
               !(mv->flags & _Py_MEMORYVIEW_RELEASED) &&
               !(mv->mbuf->flags & _Py_MANAGED_BUFFER_RELEASED);
    }
    static void iocpnet_mv_repoint(PyObject *o, char *buf, Py_ssize_t len) {
        PyMemoryViewObject *mv = (PyMemoryViewObject *)o;
        mv->view.buf = buf;
        mv->view.len = len;
        mv->view.shape[0] = len;
        mv->mbuf->master.buf = buf;
        mv->mbuf->master.len = len;
        mv->hash = -1;           /* a read-only view caches its hash */
    }
    static PyObject *iocpnet_mv_base(PyObject *o) {
        return ((PyMemoryViewObject *)o)->mbuf->master.obj;
    }
    /* Let a worker that holds reaped completions and waits for the GIL take it first
     * (see IocpCore.Dispatch).  Returns at once on free-threaded builds. */
    static void iocpnet_let_batch_in(volatile int32_t *waiting) {
    #ifndef Py_GIL_DISABLED
        int i;
        for (i = 0; i < 2000 && port_atomic_load32(waiting) > 0; i++)
            port_thread_yield();
    #else
        (void)waiting;
    #endif
    }
    /* bytes(mv) for a C-contiguous memoryview, without the buffer protocol's round
     * trip (Send's hot path: echoing OnRecv's view); NULL with no error otherwise. */
    static PyObject *iocpnet_mv_to_bytes(PyObject *o) {
        PyMemoryViewObject *mv = (PyMemoryViewObject *)o;
        if ((mv->flags & _Py_MEMORYVIEW_RELEASED) || (mv->mbuf->flags & _Py_MANAGED_BUFFER_RELEASED)
                || !(mv->flags & _Py_MEMORYVIEW_C))
            return NULL;
        return PyBytes_FromStringAndSize((const char *)mv->view.buf, mv->view.len);
    }
    """
    void *iocpnet_get_tls_core() nogil
    void iocpnet_set_tls_core(void *c) nogil
    bint iocpnet_mv_unshared(object mv)
    void iocpnet_mv_repoint(object mv, char *buf, Py_ssize_t length)
    PyObject *iocpnet_mv_base(object mv)
    PyObject *iocpnet_mv_to_bytes(object mv) except? NULL
    void iocpnet_let_batch_in(volatile int32_t *waiting) nogil

cdef extern from "port/packet.h" nogil:
    ctypedef enum packet_status:
        PACKET_OK
        PACKET_PARTIAL
        PACKET_TOO_SMALL
        PACKET_TOO_LARGE
    packet_status packet_scan(const unsigned char *p, size_t n, size_t max_size,
                              size_t *size, unsigned *id)
    size_t packet_header(unsigned char *out, unsigned id, size_t payload_len)

cdef enum:
    BATCH = 128           # completions taken per wait
    VIEW_POOL = 16        # recycled OnRecv memoryviews kept per core
    IOV_INLINE = 4        # gather entries kept inside the session
    IOV_MAX = 64          # most buffers in one gather send
    SQ_INLINE = 4         # send-queue slots kept inside the session

# Session states
cdef enum:
    S_NEW = 0             # made by the factory, no socket yet
    S_ACCEPTING = 1       # waiting in one of the Listener's posted accepts
    S_CONNECTING = 2
    S_CONNECTED = 3
    S_FLUSHING = 4        # closing once what Send queued has gone out
    S_CLOSING = 5         # close submitted; waiting for the operations to end
    S_DONE = 6            # OnDisconnected has run

cdef enum:
    PKT_HEADER = 4                # [size: u16 LE][id: u16 LE], size counts the header
    PKT_MAX = 0xFFFF

PACKET_HEADER_SIZE = PKT_HEADER
PACKET_SIZE_MAX = PKT_MAX
DEFAULT_SEND_QUEUE_LIMIT = 4 * 1024 * 1024
DEFAULT_RECV_BUFFER_LIMIT = 256 * 1024
DEFAULT_FLUSH_TIMEOUT = 5.0

# Debug counters (uvloop's habit): tests check that they balance.
cdef volatile int64_t _sessions_alive = 0
cdef volatile int64_t _sessions_connected = 0
cdef volatile int64_t _views_detached = 0
cdef volatile int64_t _cores_alive = 0


class BackendUnavailableError(RuntimeError):
    """The requested completion-port backend cannot run on this machine."""


cdef object port_error(int code, what=None):
    """One mapper from port codes to the right OSError subclass."""
    name = port_errname(code).decode("ascii")
    msg = port_strerror(code).decode("ascii")
    if what:
        msg = f"{what}: {msg}"
    num = getattr(_errno, name, None)
    if num is not None:
        return OSError(num, msg)
    return OSError(msg)


cdef inline str port_reason(int code):
    return port_strerror(code).decode("ascii")


def available_backends():
    """The completion-port backends that can run on this machine, best first."""
    cdef const char *const *names = port_backends()
    cdef char err[256]
    cdef int i = 0
    out = []
    while names[i] != NULL:
        if port_backend_probe(names[i], err, sizeof(err)) == 0:
            out.append(names[i].decode("ascii"))
        i += 1
    return out


def compiled_backends():
    """The backends this build contains (available or not), best first."""
    cdef const char *const *names = port_backends()
    cdef int i = 0
    out = []
    while names[i] != NULL:
        out.append(names[i].decode("ascii"))
        i += 1
    return out


def backend_unavailable_reason(str backend):
    """Why `backend` cannot run here, or None if it can."""
    cdef char err[256]
    err[0] = 0
    b = backend.encode("ascii")
    if port_backend_probe(b, err, sizeof(err)) == 0:
        return None
    return err.decode("utf-8", "replace") or "unavailable"


def debug_counters():
    """Live objects and operations, for leak checks: every value returns to 0."""
    return {
        "sessions_alive": _sessions_alive,
        "sessions_connected": _sessions_connected,
        "views_detached": _views_detached,
        "cores_alive": _cores_alive,
    }


_logged_backends = set()


# ---------------------------------------------------------------------------------------
# IocpObject and the dispatch loop

cdef class IocpObject:
    """An owner of port operations: the Listener, a Session, a job or a timer.

    The original's ``IocpObject::Dispatch(iocpEvent, numOfBytes)``: each completion is
    routed to the object that submitted the operation.
    """
    cdef IocpCore core

    cdef void _dispatch(self, port_cqe_t *cqe) noexcept:
        pass


@cython.final
cdef class IocpCore:
    """The completion port: worker threads call ``Dispatch`` to wait for completions and
    route each one to its owner.

    ``IocpCore(backend=None)`` picks the best backend this machine can run (io_uring,
    else epoll; IOCP on Windows); ``backend="epoll"`` or the ``IOCPNET_BACKEND``
    environment variable forces one.
    """
    cdef port_t *port
    cdef readonly str backend
    cdef volatile int32_t _closing
    cdef volatile int32_t _closed
    cdef volatile int32_t _dispatchers
    cdef volatile int32_t _batches_waiting   # workers holding completions, waiting for the GIL
    cdef int64_t _now_ms
    cdef bint _recv_multishot
    cdef volatile int32_t _view_lock
    cdef int _view_count
    cdef PyObject *_views[VIEW_POOL]
    cdef object _lock
    cdef list _close_callbacks
    cdef set _timers
    cdef dict _flush_watch
    cdef object _housekeeping
    cdef object __weakref__

    def __cinit__(self, backend=None, *, int recv_buffer_size=0, int recv_buffer_count=0,
                  int queue_depth=0, bint recv_multishot=False):
        cdef port_options_t opts
        cdef char err[512]
        cdef int rc
        cdef const char *cname = NULL
        err[0] = 0
        self.port = NULL
        if backend is None:
            backend = os.environ.get("IOCPNET_BACKEND") or None
        if backend is not None:
            backend = str(backend).strip().lower().replace("-", "_")
            if backend == "iouring":
                backend = "io_uring"
            bname = backend.encode("ascii")
            cname = bname
        opts.recv_buffer_size = recv_buffer_size if recv_buffer_size > 0 else 0
        opts.recv_buffer_count = recv_buffer_count if recv_buffer_count > 0 else 0
        opts.queue_depth = queue_depth if queue_depth > 0 else 0
        opts.flags = PORT_OPT_RECV_MULTISHOT if recv_multishot else 0
        self._recv_multishot = recv_multishot
        rc = port_create(&self.port, cname, &opts, err, sizeof(err))
        reason = err.decode("utf-8", "replace")
        if rc != 0:
            self.port = NULL
            if rc == PORT_EUNAVAIL:
                if backend is None:
                    raise BackendUnavailableError(
                        f"no completion-port backend can run here: {reason}")
                raise BackendUnavailableError(
                    f"the {backend!r} backend cannot run here: {reason or 'unavailable'}"
                    f" (available: {', '.join(available_backends()) or 'none'})")
            raise port_error(rc, reason or "creating the completion port")
        self.backend = port_backend(self.port).decode("ascii")
        port_atomic_add64(&_cores_alive, 1)
        self._lock = threading.Lock()
        self._close_callbacks = []
        self._timers = set()
        self._flush_watch = {}
        self._housekeeping = None
        self._now_ms = port_monotonic_ms()
        # Say once which backend runs, and why it is not the first choice if it is not.
        fell_back = backend is None and reason and self.backend != compiled_backends()[0]
        key = (self.backend, reason if fell_back else None)
        if key not in _logged_backends:
            _logged_backends.add(key)
            if fell_back:
                logger.info("%s unavailable (%s); using the %s backend",
                            compiled_backends()[0], reason, self.backend)
            else:
                logger.info("using the %s backend", self.backend)

    def __dealloc__(self):
        cdef int i
        for i in range(self._view_count):
            _decref(self._views[i])
        self._view_count = 0
        if self.port != NULL:
            port_destroy(self.port)
            self.port = NULL
            port_atomic_add64(&_cores_alive, -1)

    def __repr__(self):
        state = "closed" if self._closed else ("closing" if self._closing else "open")
        return f"<IocpCore backend={self.backend} {state}>"

    @property
    def closed(self):
        return bool(self._closed)

    def Dispatch(self, int timeout_ms=-1, int max_batch=BATCH):
        """Wait up to ``timeout_ms`` (-1: forever) for completions, with the GIL released,
        then dispatch the whole batch to the owners under one GIL hold.

        Returns the number of completions handled: 0 on timeout, -1 at once after
        ``Close()``.  Operations submitted by hooks during the batch are handed to the
        kernel with this thread's next ``Dispatch`` (one system call per batch).

        A worker handles the batch it took in order, so a hook that blocks delays the
        rest of its batch whatever the number of workers; ``max_batch`` (1 to 128)
        bounds that, at some cost in throughput.
        """
        cdef port_cqe_t batch[BATCH]
        cdef int n, i, wait_ms = timeout_ms
        cdef port_t *port = self.port
        cdef void *prev
        cdef int64_t deadline = port_monotonic_ms() + timeout_ms if timeout_ms > 0 else 0
        if port == NULL or self._closed:
            return -1
        if max_batch < 1 or max_batch > BATCH:
            max_batch = BATCH
        port_atomic_add32(&self._dispatchers, 1)
        prev = iocpnet_get_tls_core()
        try:
            # With a GIL, a worker that reaped completions can wait for the GIL for a whole
            # switch interval (5 ms) per try: the worker dispatching drops it, finds more
            # queued work without sleeping and takes it back before the other one has even
            # woken up.  Its completions (other sessions' messages) would wait 10-30 ms
            # while this thread keeps serving its own.  So a worker that sees another one
            # waiting with a batch lets it in before waiting again.
            if port_atomic_load32(&self._batches_waiting) > 0:
                with nogil:
                    iocpnet_let_batch_in(&self._batches_waiting)
            while True:
                with nogil:
                    n = port_wait(port, batch, max_batch, wait_ms)
                    if n > 0:
                        port_atomic_add32(&self._batches_waiting, 1)
                if n > 0:
                    port_atomic_add32(&self._batches_waiting, -1)
                if n == PORT_EINTR:
                    PyErr_CheckSignals()     # Ctrl-C on the main thread ends up here
                    if timeout_ms > 0:
                        wait_ms = <int>(deadline - port_monotonic_ms())
                        if wait_ms <= 0:
                            n = 0
                            break
                    continue
                break
            if n < 0:
                if n == PORT_ECLOSED:
                    return -1
                raise port_error(n, "waiting for completions")
            self._now_ms = port_monotonic_ms()
            iocpnet_set_tls_core(<void *>self)
            for i in range(n):
                _complete(self, &batch[i])
            port_batch_end(port)
            return n
        finally:
            iocpnet_set_tls_core(prev)
            port_atomic_add32(&self._dispatchers, -1)
            if self._closing and not self._closed:
                self._maybe_shutdown()

    cdef object _take_view(self, char *ptr, Py_ssize_t n):
        """A read-only memoryview of ptr[0:n] for OnRecv: a recycled one if the pool has
        one (no allocation in the steady state), else a new one over a _RecvView."""
        cdef PyObject *o = NULL
        cdef _RecvView view
        port_spin_lock(&self._view_lock)
        if self._view_count > 0:
            self._view_count -= 1
            o = self._views[self._view_count]
        port_spin_unlock(&self._view_lock)
        if o != NULL:
            mv = <object>o
            _decref(o)                  # `mv` holds the pool's reference now
            iocpnet_mv_repoint(mv, ptr, n)
            return mv
        view = _RecvView.__new__(_RecvView)
        view.ptr = ptr
        view.length = n
        return PyMemoryView_FromObject(view)

    cdef bint _give_back_view(self, object mv) noexcept:
        """After the hook: keep `mv` for the next receive if nobody else holds it or
        anything derived from it.  False: the hook kept it (the caller detaches)."""
        if not iocpnet_mv_unshared(mv):
            return False
        port_spin_lock(&self._view_lock)
        if self._view_count < VIEW_POOL:
            _incref(<PyObject *>mv)
            self._views[self._view_count] = <PyObject *>mv
            self._view_count += 1
        port_spin_unlock(&self._view_lock)
        return True

    cdef void _maybe_shutdown(self) noexcept:
        cdef port_stats_t st
        port_get_stats(self.port, &st)
        if st.in_flight <= 0 and not self._closed:
            self._closed = 1
            port_shutdown(self.port)

    def Close(self, double timeout=5.0):
        """Stop: disconnect the services using this core, cancel timers, wait (up to
        ``timeout`` seconds) for every operation in flight to complete, then wake every
        thread in ``Dispatch`` (they return -1).  Idempotent, any thread.

        Called from a worker thread (inside a hook or job) it does not wait: the last
        completion ends the port.
        """
        cdef port_stats_t st
        cdef bint in_worker = iocpnet_get_tls_core() == <void *>self
        if self.port == NULL:
            return
        with self._lock:
            if self._closing:
                first = False
            else:
                self._closing = 1
                first = True
            callbacks = list(self._close_callbacks)
            timers = list(self._timers)
        if first:
            for cb in callbacks:
                try:
                    cb()
                except Exception:
                    logger.exception("a close callback raised")
            for t in timers:
                # The user's timers stop; the core's own (the flush deadline sweep) go
                # on, so that sessions still flushing are closed at their deadline.
                if not (<Timer>t)._internal:
                    (<Timer>t).Cancel()
        if in_worker:
            return
        deadline = _time.monotonic() + timeout
        while not self._closed:
            port_get_stats(self.port, &st)
            if st.in_flight <= 0:
                break
            if _time.monotonic() >= deadline:
                logger.warning("%d operation(s) still in flight after %.1f s; "
                               "closing the port anyway (their owners are abandoned)",
                               st.in_flight, timeout)
                break
            if self._dispatchers > 0:
                _time.sleep(0.002)       # the workers drain it
            else:
                self.Dispatch(20)        # nobody else is dispatching: drain it here
        with self._lock:
            if not self._closed:
                self._closed = 1
                port_shutdown(self.port)
            # Nothing can complete any more: drop what still refers to sessions.
            self._flush_watch.clear()
            self._housekeeping = None
            self._close_callbacks = []

    def stats(self):
        """Counters of the port: submitted, completed, in_flight, waits, receive buffers."""
        cdef port_stats_t st
        if self.port == NULL:
            return {}
        port_get_stats(self.port, &st)
        return {
            "submitted": st.submitted,
            "completed": st.completed,
            "in_flight": st.in_flight,
            "waits": st.waits,
            "recv_buffers": st.recv_buffers,
            "recv_buffers_out": st.recv_buffers_out,
        }

    # ---- jobs and timers (the PostQueuedCompletionStatus idiom) ----

    def Post(self, func, *args):
        """Run ``func(*args)`` on a worker thread (any thread may post).  Exceptions are
        logged; workers go on."""
        cdef _Job job = _Job.__new__(_Job)
        job.core = self
        job.func = func
        job.args = args
        port_op_init(&job.op, PORT_OP_POST, <void *>job, NULL)
        _incref(<PyObject *>job)
        rc = port_post(self.port, &job.op, 0)
        if rc != 0:
            _decref(<PyObject *>job)
            raise port_error(rc, "Post")

    def CallLater(self, double delay, func, *args):
        """Run ``func(*args)`` on a worker thread after ``delay`` seconds; returns a
        ``Timer`` whose ``Cancel()`` stops it."""
        return self._start_timer(delay, 0.0, func, args)

    def CallEvery(self, double interval, func, *args):
        """Run ``func(*args)`` on a worker thread every ``interval`` seconds (a game
        tick) until the returned ``Timer`` is cancelled or the core closes."""
        if interval <= 0:
            raise ValueError("interval must be positive")
        return self._start_timer(interval, interval, func, args)

    cdef Timer _start_timer(self, double delay, double interval, func, tuple args,
                            bint internal=False):
        cdef Timer t = Timer.__new__(Timer)
        if not callable(func):
            raise TypeError("func must be callable")
        if delay < 0:
            delay = 0
        t.core = self
        t.func = func
        t.args = args
        t.interval = interval
        t._internal = internal
        port_op_init(&t.op, PORT_OP_TIMER, <void *>t, NULL)
        with self._lock:
            if self._closed or (self._closing and not internal):
                raise RuntimeError("the IocpCore is closed")
            self._timers.add(t)
        t._arm(delay)
        return t

    # ---- bookkeeping used by sessions and services ----

    cdef void _watch_flush(self, Session s, int64_t deadline_ms) noexcept:
        """Close `s` if its send queue has not drained by the deadline."""
        try:
            with self._lock:
                self._flush_watch[s] = deadline_ms
                start = self._housekeeping is None and not self._closed
                if start:
                    self._housekeeping = True      # claimed; the timer is made below
            if start:
                t = self._start_timer(0.1, 0.1, self._sweep_flush, (), True)
                with self._lock:
                    self._housekeeping = t
        except Exception:
            logger.exception("watching a flushing session failed")
            s._close_now("flush watch failed", True)

    cdef void _unwatch_flush(self, Session s) noexcept:
        with self._lock:
            self._flush_watch.pop(s, None)

    def _sweep_flush(self):
        cdef int64_t now = port_monotonic_ms()
        cdef Session s
        overdue = []
        with self._lock:
            for s, deadline in list(self._flush_watch.items()):
                if s._state != S_FLUSHING:
                    del self._flush_watch[s]
                elif now >= deadline:
                    del self._flush_watch[s]
                    overdue.append(s)
            if not self._flush_watch and isinstance(self._housekeeping, Timer):
                self._housekeeping.Cancel()
                self._housekeeping = None
        for s in overdue:
            s._close_now(f"{s._get_reason()} (its queued data was not flushed in time)",
                         True)

    def _add_close_callback(self, cb):
        with self._lock:
            self._close_callbacks.append(cb)

    def _remove_close_callback(self, cb):
        with self._lock:
            try:
                self._close_callbacks.remove(cb)
            except ValueError:
                pass

    cdef void _timer_done(self, Timer t) noexcept:
        with self._lock:
            self._timers.discard(t)


cdef inline void _complete(IocpCore core, port_cqe_t *cqe) noexcept:
    """Route one completion to its owner, then whatever its strand queued meanwhile."""
    cdef port_cqe_t nxt
    cdef port_strand_t *strand = cqe.op.strand
    cdef PyObject *owner = <PyObject *>cqe.op.owner
    cdef PyObject *strand_owner = NULL
    cdef PyObject *o
    # Keep the owner (and the object holding the strand) alive until we are done with
    # them: the operation's own reference is dropped below, and the strand lives inside
    # its session.
    _incref(owner)
    if strand != NULL:
        strand_owner = <PyObject *>strand.owner
        _incref(strand_owner)
    (<IocpObject>owner)._dispatch(cqe)
    if not (cqe.flags & PORT_CQE_MORE):
        _decref(owner)            # the operation's reference
    if strand != NULL:
        while port_strand_next(core.port, strand, &nxt):
            o = <PyObject *>nxt.op.owner
            (<IocpObject>o)._dispatch(&nxt)
            if not (nxt.flags & PORT_CQE_MORE):
                _decref(o)
        _decref(strand_owner)
    _decref(owner)


# ---------------------------------------------------------------------------------------
# Jobs and timers

@cython.final
cdef class _Job(IocpObject):
    cdef port_op_t op
    cdef object func
    cdef tuple args

    cdef void _dispatch(self, port_cqe_t *cqe) noexcept:
        func = self.func
        args = self.args
        self.func = None
        self.args = None
        try:
            func(*args)
        except BaseException:
            logger.exception("job %s raised", repr(func))


@cython.final
cdef class Timer(IocpObject):
    """A pending call made by ``IocpCore.CallLater`` or ``CallEvery``."""
    cdef port_op_t op
    cdef object func
    cdef tuple args
    cdef double interval
    cdef volatile int32_t _cancelled
    cdef bint _done
    cdef bint _internal           # the core's own: not cancelled by Close
    cdef object __weakref__

    def __repr__(self):
        kind = f"every {self.interval:g}s" if self.interval else "once"
        state = "cancelled" if self._cancelled else ("done" if self._done else "pending")
        return f"<Timer {kind} {self.func!r} {state}>"

    @property
    def cancelled(self):
        return bool(self._cancelled)

    @property
    def active(self):
        return not self._done

    cdef void _arm(self, double delay) except *:
        cdef uint64_t ms = <uint64_t>(delay * 1000.0 + 0.5)
        _incref(<PyObject *>self)
        rc = port_timer(self.core.port, &self.op, ms)
        if rc != 0:
            _decref(<PyObject *>self)
            self._done = True
            self.core._timer_done(self)
            raise port_error(rc, "arming a timer")

    def Cancel(self):
        """Stop the timer (any thread).  A call already running finishes."""
        self._cancelled = 1
        if self.op.in_flight:
            port_cancel(self.core.port, &self.op)

    cdef void _dispatch(self, port_cqe_t *cqe) noexcept:
        if cqe.res == 0 and not self._cancelled:
            try:
                self.func(*self.args)
            except BaseException:
                logger.exception("timer callback %s raised", repr(self.func))
            if self.interval > 0 and not self._cancelled and \
                    (self._internal or not self.core._closing) and not self.core._closed:
                try:
                    self._arm(self.interval)
                    return
                except Exception:
                    logger.exception("re-arming a repeating timer failed")
        self._done = True
        self.core._timer_done(self)
        self.func = None
        self.args = None


# ---------------------------------------------------------------------------------------
# Receive views

@cython.final
cdef class _RecvView:
    """What OnRecv's memoryview points at: received bytes, read-only.

    Normally the view is gone when the hook returns and the memory goes straight back to
    the port.  If the hook kept a reference (stored the memoryview or a slice of it), the
    memory is handed over to this object instead and released only when the last export
    ends, so a kept view never reads reused or freed memory.
    """
    cdef char *ptr
    cdef Py_ssize_t length
    cdef volatile int32_t exports
    cdef volatile int32_t state  # 0 in use, 1 detached (owns memory), 2 freed
    cdef IocpCore core          # to give back a port buffer
    cdef port_cqe_t held        # that buffer
    cdef bint holds_port_buffer
    cdef char *owned            # or a receive buffer taken over from the session

    def __getbuffer__(self, Py_buffer *buffer, int flags):
        PyBuffer_FillInfo(buffer, self, self.ptr, self.length, 1, flags)
        port_atomic_add32(&self.exports, 1)

    def __releasebuffer__(self, Py_buffer *buffer):
        if port_atomic_add32(&self.exports, -1) == 0:
            self._free_if_detached()

    cdef void _detached(self) noexcept:
        """The worker has handed the memory over (held/owned are set): publish it, and
        free it at once if the last export ended meanwhile."""
        port_atomic_add64(&_views_detached, 1)
        port_atomic_xchg32(&self.state, 1)
        if port_atomic_load32(&self.exports) == 0:
            self._free_if_detached()

    cdef void _free_if_detached(self) noexcept:
        # The worker (after publishing) and the thread ending the last export may both
        # get here: the exchange lets exactly one of them free.
        if port_atomic_cas32(&self.state, 1, 2):
            self._free()

    cdef void _free(self) noexcept:
        if self.holds_port_buffer:
            self.holds_port_buffer = False
            if self.core is not None and self.core.port != NULL:
                port_recv_release(self.core.port, &self.held)
        if self.owned != NULL:
            free(self.owned)
            self.owned = NULL
        port_atomic_add64(&_views_detached, -1)

    def __dealloc__(self):
        if self.state == 1:
            self._free()


# ---------------------------------------------------------------------------------------
# Hooks, resolved once per class

@cython.final
cdef class _Hooks:
    cdef object on_connected
    cdef object on_recv
    cdef object on_send
    cdef object on_disconnected
    cdef object on_connect_failed
    cdef object on_recv_packet
    cdef bint packet_mode         # a PacketSession whose OnRecv is not overridden
    cdef Py_ssize_t max_packet_size
    cdef Py_ssize_t send_queue_limit
    cdef Py_ssize_t recv_buffer_limit
    cdef double flush_timeout
    cdef double idle_timeout


cdef dict _hooks_cache = {}


cdef object _overridden(type cls, str name, type base):
    f = getattr(cls, name, None)
    if f is None or f is getattr(base, name, None):
        return None
    return f


cdef object _class_int(type cls, str name, default):
    v = getattr(cls, name, default)
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return v
    return default


cdef _Hooks _hooks_for(type cls):
    cdef _Hooks h = _hooks_cache.get(cls)
    if h is not None:
        return h
    h = _Hooks.__new__(_Hooks)
    h.on_connected = _overridden(cls, "OnConnected", Session)
    h.on_recv = _overridden(cls, "OnRecv", Session)
    h.on_send = _overridden(cls, "OnSend", Session)
    h.on_disconnected = _overridden(cls, "OnDisconnected", Session)
    h.on_connect_failed = _overridden(cls, "OnConnectFailed", Session)
    h.on_recv_packet = getattr(cls, "OnRecvPacket", None)
    h.packet_mode = issubclass(cls, PacketSession) and h.on_recv is None
    h.max_packet_size = _class_int(cls, "max_packet_size", PKT_MAX)
    h.send_queue_limit = _class_int(cls, "send_queue_limit", DEFAULT_SEND_QUEUE_LIMIT)
    h.recv_buffer_limit = _class_int(cls, "recv_buffer_limit", DEFAULT_RECV_BUFFER_LIMIT)
    h.flush_timeout = _class_int(cls, "flush_timeout", DEFAULT_FLUSH_TIMEOUT)
    h.idle_timeout = _class_int(cls, "idle_timeout", 0)
    if h.send_queue_limit <= 0 or h.recv_buffer_limit <= 0:
        raise ValueError(f"{cls.__name__}: send_queue_limit and recv_buffer_limit must be "
                         f"positive")
    if not PKT_HEADER <= h.max_packet_size <= PKT_MAX:
        raise ValueError(f"{cls.__name__}: max_packet_size must be between "
                         f"{PKT_HEADER} and {PKT_MAX}")
    if h.idle_timeout < 0:
        raise ValueError(f"{cls.__name__}: idle_timeout must be >= 0 (0: none)")
    _hooks_cache[cls] = h
    return h


cdef bytes _copy_to_bytes(object data):
    """A bytes copy of any contiguous buffer (OnRecv's memoryview, a bytearray), made
    straight from the buffer: no call through the bytes type."""
    cdef Py_buffer buf
    cdef PyObject *fast
    if type(data) is memoryview:
        fast = iocpnet_mv_to_bytes(data)
        if fast != NULL:
            return <bytes>_steal(fast)
    try:
        PyObject_GetBuffer(data, &buf, PyBUF_SIMPLE)
    except BufferError:
        return bytes(data)          # not contiguous: let bytes() gather it
    try:
        return PyBytes_FromStringAndSize(<char *>buf.buf, buf.len)
    finally:
        PyBuffer_Release(&buf)


cdef str _describe_exc(BaseException e):
    return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__


# ---------------------------------------------------------------------------------------
# Session

cdef class Session(IocpObject):
    """One connection.  Subclass it and override the hooks:

    - ``OnConnected()``: once, after accept or connect.
    - ``OnRecv(data) -> int | None``: ``data`` is a read-only memoryview of the bytes
      received and not yet consumed; return how many you consumed (None: all).  The rest
      is shown again, with the next bytes, on the next call.
    - ``OnSend(num_bytes)``: after each completed send.
    - ``OnDisconnected(reason)``: exactly once, whatever ended the session.

    ``Send(data)`` and ``Disconnect(reason)`` may be called from any thread.  Limits are
    class attributes: ``send_queue_limit`` (bytes queued and not yet sent before the
    peer is judged not to be reading), ``recv_buffer_limit`` (bytes OnRecv may leave
    unconsumed), ``flush_timeout`` (seconds to flush queued data when closing).
    """
    cdef Service _service
    cdef _Hooks _hooks
    cdef port_sock_t _sock
    cdef port_op_t _recv_op       # also the connect operation, before the connection is up
    cdef port_op_t _send_op
    cdef port_op_t _close_op
    cdef port_strand_t _strand
    cdef volatile int32_t _lock
    cdef int _state
    cdef int _ops                 # operations in flight (under _lock)
    cdef bint _recv_armed
    cdef bint _recv_paused        # backpressure: not receiving while the peer lags
    cdef bint _send_busy
    cdef bint _close_started
    cdef bint _counted_connected
    cdef bint _was_connected
    cdef object _reason
    cdef object _address
    cdef int64_t _last_recv_ms
    # RecvBuffer: unconsumed bytes are _rbuf[_rpos:_rlen]
    cdef char *_rbuf
    cdef Py_ssize_t _rcap
    cdef Py_ssize_t _rpos
    cdef Py_ssize_t _rlen
    cdef Py_ssize_t _last_used
    # Send queue: a ring of bytes objects, the first _sq_offset bytes of the head sent
    cdef PyObject **_sq
    cdef PyObject *_sq_inline[SQ_INLINE]
    cdef Py_ssize_t _sq_cap
    cdef Py_ssize_t _sq_head
    cdef Py_ssize_t _sq_count
    cdef Py_ssize_t _sq_bytes
    cdef Py_ssize_t _sq_offset
    cdef port_buf_t *_iov
    cdef port_buf_t _iov_inline[IOV_INLINE]
    cdef int _iov_n
    cdef object __weakref__

    def __cinit__(self, *args, **kwargs):
        self._hooks = _hooks_for(type(self))
        self._sock = PORT_INVALID_SOCK
        self._state = S_NEW
        self._sq = self._sq_inline
        self._sq_cap = SQ_INLINE
        self._iov = self._iov_inline
        port_strand_init(&self._strand, <void *>self)
        port_op_init(&self._recv_op, PORT_OP_RECV, <void *>self, &self._strand)
        port_op_init(&self._send_op, PORT_OP_SEND, <void *>self, &self._strand)
        port_op_init(&self._close_op, PORT_OP_CLOSE, <void *>self, &self._strand)
        port_atomic_add64(&_sessions_alive, 1)

    def __dealloc__(self):
        cdef Py_ssize_t i
        if self._sock != PORT_INVALID_SOCK and self.core is not None and self.core.port != NULL:
            # Never connected (a pending accept's session) or abandoned: no operation is
            # in flight, or we would not be here.
            port_sock_close(self.core.port, self._sock, 0)
            self._sock = PORT_INVALID_SOCK
        if self.core is not None and self.core.port != NULL:
            port_strand_discard(self.core.port, &self._strand)
        self._release_buffers()
        if self._counted_connected:
            port_atomic_add64(&_sessions_connected, -1)
        port_atomic_add64(&_sessions_alive, -1)

    cdef void _release_buffers(self) noexcept:
        """Drop the send queue and free the receive buffer (no operation in flight)."""
        cdef PyObject *o
        while self._sq_count > 0:
            o = self._sq[self._sq_head]
            self._sq[self._sq_head] = NULL
            self._sq_head = (self._sq_head + 1) % self._sq_cap
            self._sq_count -= 1
            _decref(o)
        self._sq_bytes = 0
        self._sq_offset = 0
        self._sq_head = 0
        if self._sq != self._sq_inline:
            free(self._sq)
            self._sq = self._sq_inline
            self._sq_cap = SQ_INLINE
        if self._iov != self._iov_inline:
            free(self._iov)
            self._iov = self._iov_inline
        if self._rbuf != NULL:
            free(self._rbuf)
            self._rbuf = NULL
        self._rcap = self._rpos = self._rlen = 0

    # ---- hooks (the defaults do nothing) ----

    def OnConnected(self):
        """Called once when the connection is up."""

    def OnRecv(self, data):
        """Called with the received bytes not yet consumed; return the number consumed
        (None: all)."""
        return None

    def OnSend(self, num_bytes):
        """Called after each completed send with the bytes it sent."""

    def OnDisconnected(self, reason):
        """Called exactly once when the session ends."""

    def OnConnectFailed(self, reason):
        """Client sessions: the connection could not be made (OnDisconnected follows)."""

    # ---- public API ----

    def __repr__(self):
        names = {S_NEW: "new", S_ACCEPTING: "accepting", S_CONNECTING: "connecting",
                 S_CONNECTED: "connected", S_FLUSHING: "flushing", S_CLOSING: "closing",
                 S_DONE: "disconnected"}
        addr = ""
        if self._address is not None:
            addr = f" {self._address[0]}:{self._address[1]}"
        return f"<{type(self).__name__}{addr} {names.get(self._state, '?')}>"

    @property
    def address(self):
        """The peer's (host, port), or None before the connection."""
        return self._address

    @property
    def connected(self):
        """True from OnConnected until the session starts closing."""
        return self._state == S_CONNECTED

    @property
    def disconnect_reason(self):
        """Why the session ended (or is ending), else None."""
        return self._get_reason()

    cdef object _get_reason(self):
        # Under the lock: another thread may be replacing it (and releasing the old
        # string) at this moment; without the GIL that read could see freed memory.
        port_spin_lock(&self._lock)
        r = self._reason
        port_spin_unlock(&self._lock)
        return r

    @property
    def service(self):
        return self._service

    def GetService(self):
        return self._service

    @property
    def send_queue_limit(self):
        return self._hooks.send_queue_limit

    @property
    def recv_buffer_limit(self):
        return self._hooks.recv_buffer_limit

    @property
    def flush_timeout(self):
        return self._hooks.flush_timeout

    @property
    def send_queue_bytes(self):
        """Bytes queued by Send and not yet acknowledged by a send completion."""
        return self._sq_bytes

    def Send(self, data):
        """Queue ``data`` to be sent, in order, from any thread.

        ``bytes`` are queued by reference (a packet broadcast to many sessions is built
        once); other buffers are copied.  Returns False if the session is not connected
        (or is closing).  Past ``send_queue_limit`` unsent bytes the peer is judged not to
        be reading: the session is disconnected and False returned.
        """
        cdef bytes b
        cdef Py_ssize_t n, limit, queued
        cdef int rc
        b = data if type(data) is bytes else _copy_to_bytes(data)
        n = PyBytes_GET_SIZE(b)
        if n == 0:
            return self._state == S_CONNECTED
        limit = self._hooks.send_queue_limit
        port_spin_lock(&self._lock)
        if self._state != S_CONNECTED:
            port_spin_unlock(&self._lock)
            return False
        queued = self._sq_bytes + n
        if queued > limit:
            port_spin_unlock(&self._lock)
            self._close_now(
                f"send queue limit exceeded: {queued} bytes queued, send_queue_limit is "
                f"{limit} (the peer is not reading)", True)
            return False
        if self._sq_count == self._sq_cap and self._sq_grow() < 0:
            port_spin_unlock(&self._lock)
            raise MemoryError("growing the send queue")
        self._sq[(self._sq_head + self._sq_count) % self._sq_cap] = <PyObject *>b
        _incref(<PyObject *>b)
        self._sq_count += 1
        self._sq_bytes = queued
        if not self._send_busy:
            self._send_busy = True
            self._ops += 1
            self._build_iov()
            rc = self._submit_send_locked()
        else:
            rc = 0
        if queued >= (limit >> 2) and not self._recv_paused:
            # Backpressure: the peer reads slower than it makes us write (an echo, a
            # request flood).  Stop reading from it until the queue drains, so that its
            # own sends block in TCP instead of our queue reaching the limit.  A one-shot
            # receive is simply not posted again; a multishot one must be cancelled.
            self._recv_paused = True
            if self._recv_armed and self.core._recv_multishot:
                port_cancel(self.core.port, &self._recv_op)
        port_spin_unlock(&self._lock)
        if rc != 0:
            self._close_now(f"cannot send: {port_reason(rc)}", False)
            self._maybe_finish()
            return False
        return True

    def Disconnect(self, reason="disconnected"):
        """End the session (idempotent, any thread): no more OnRecv; what Send already
        queued is still sent (up to ``flush_timeout`` seconds), then the socket closes
        and OnDisconnected(reason) runs.  Returns True if this call started it."""
        return self._begin_disconnect(str(reason), True)

    def Abort(self, reason="aborted"):
        """End the session at once: queued data is dropped and the peer sees a reset."""
        return self._close_now(str(reason), True)

    # ---- internals: connection set-up ----

    cdef int _attach(self, IocpCore core, Service service) except -1:
        if self._state != S_NEW:
            raise RuntimeError(f"{self!r} was already used; a session serves one connection")
        self.core = core
        self._service = service
        return 0

    cdef void _attach_accepted(self, IocpCore core, Service service) noexcept:
        self.core = core
        self._service = service

    cdef void _on_accepted(self, port_sock_t sock) noexcept:
        """The Listener accepted a connection for us (we hold our strand)."""
        self._sock = sock
        port_set_nodelay(sock, 1)
        self._fill_address()
        self._connected()

    cdef void _fill_address(self) noexcept:
        """Remember the peer's (host, port): it is still known after the socket closes
        (OnDisconnected may want to log it)."""
        cdef port_addr_t addr
        cdef char host[64]
        cdef int portnum = 0
        if port_peername(self._sock, &addr) == 0 and \
                port_addr_format(&addr, host, sizeof(host), &portnum) == 0:
            self._address = (host.decode("ascii"), portnum)

    cdef void _connected(self) noexcept:
        cdef bint ok = True
        self._last_recv_ms = self.core._now_ms
        port_spin_lock(&self._lock)
        self._state = S_CONNECTED
        port_spin_unlock(&self._lock)
        self._counted_connected = True
        self._was_connected = True
        port_atomic_add64(&_sessions_connected, 1)
        if self._service is not None:
            ok = self._service._session_connected(self)
        if not ok:
            return
        if self._hooks.on_connected is not None:
            try:
                self._hooks.on_connected(self)
            except BaseException as e:
                self._hook_failed("OnConnected", e)
        self._arm_recv()

    cdef void _arm_recv(self) noexcept:
        cdef int rc
        port_spin_lock(&self._lock)
        rc = self._arm_recv_locked()
        port_spin_unlock(&self._lock)
        if rc != 0:
            self._close_now(f"cannot receive: {port_reason(rc)}", False)

    cdef int _arm_recv_locked(self) noexcept:
        # Submissions and the close happen under _lock, so no operation can reach a
        # socket after it was closed (its number may already belong to a new one).
        cdef int rc = 0
        if self._state == S_CONNECTED and not self._recv_armed and not self._recv_paused:
            _incref(<PyObject *>self)
            rc = port_recv(self.core.port, &self._recv_op, self._sock)
            if rc == 0:
                self._recv_armed = True
                self._ops += 1
            else:
                _decref(<PyObject *>self)
        return rc

    cdef int _start_connect(self, port_addr_t *addr) except -1:
        cdef int rc
        # Under the lock: the completion may be dispatched by another worker as soon
        # as the connect is submitted, and it must find the socket stored (its first
        # step takes this lock).
        port_spin_lock(&self._lock)
        self._state = S_CONNECTING
        port_op_init(&self._recv_op, PORT_OP_CONNECT, <void *>self, &self._strand)
        self._ops += 1
        _incref(<PyObject *>self)
        rc = port_connect(self.core.port, &self._recv_op, addr)
        self._sock = self._recv_op.sock
        if rc != 0:
            _decref(<PyObject *>self)
            self._ops -= 1
            self._state = S_NEW
        port_spin_unlock(&self._lock)
        if rc != 0:
            raise port_error(rc, "connect")
        return 0

    # ---- completions (one at a time, in order, on this session's strand) ----

    cdef void _dispatch(self, port_cqe_t *cqe) noexcept:
        cdef port_op_t *op = cqe.op
        if op == &self._recv_op:
            if op.type == PORT_OP_RECV:
                self._process_recv(cqe)
            else:
                self._process_connect(cqe)
        elif op == &self._send_op:
            self._process_send(cqe)
        elif op == &self._close_op:
            self._process_close(cqe)

    cdef void _process_connect(self, port_cqe_t *cqe) noexcept:
        cdef int64_t res = cqe.res
        cdef str reason
        port_spin_lock(&self._lock)
        self._ops -= 1
        port_spin_unlock(&self._lock)
        port_op_init(&self._recv_op, PORT_OP_RECV, <void *>self, &self._strand)
        if res == 0 and self._state == S_CONNECTING:
            port_set_nodelay(self._sock, 1)
            self._fill_address()
            self._connected()
            return
        if res == 0 or res == PORT_ECANCELED:
            reason = self._get_reason() or "connect cancelled"
        else:
            reason = f"connect failed: {port_reason(<int>res)}"
        if self._hooks.on_connect_failed is not None and res != PORT_ECANCELED:
            try:
                self._hooks.on_connect_failed(self, reason)
            except BaseException:
                logger.exception("OnConnectFailed of %s raised", repr(self))
        self._close_now(reason, False)
        self._maybe_finish()

    cdef void _process_recv(self, port_cqe_t *cqe) noexcept:
        cdef int64_t res = cqe.res
        cdef int rc
        if cqe.flags & PORT_CQE_BUFFER:
            if self._state == S_CONNECTED:
                self._last_recv_ms = self.core._now_ms
                self._deliver(cqe)
            else:
                port_recv_release(self.core.port, cqe)
        if cqe.flags & PORT_CQE_MORE:
            return
        rc = 0
        port_spin_lock(&self._lock)
        self._recv_armed = False
        self._ops -= 1
        if (res > 0 or res == PORT_ECANCELED) and self._state == S_CONNECTED:
            # Post the next receive (the original's RegisterRecv after ProcessRecv),
            # unless paused for backpressure: then the send path posts it once the queue
            # drains.  (ECANCELED here: a multishot receive paused, maybe resumed since.)
            rc = self._arm_recv_locked()
        port_spin_unlock(&self._lock)
        if res == 0:
            if self._rlen > self._rpos:
                self._begin_disconnect(
                    f"peer closed the connection ({self._rlen - self._rpos} bytes of an "
                    f"unfinished message left)", True)
            else:
                self._begin_disconnect("peer closed the connection", True)
        elif res < 0 and res != PORT_ECANCELED:
            self._close_now(port_reason(<int>res), False)
        elif rc != 0:
            self._close_now(f"cannot receive: {port_reason(rc)}", False)
        self._maybe_finish()

    cdef void _deliver(self, port_cqe_t *cqe) noexcept:
        """Show received bytes to the hook; keep what it did not consume."""
        cdef Py_ssize_t n = cqe.res
        cdef Py_ssize_t used, left
        cdef bint released = False
        if self._rlen == self._rpos:
            # Nothing pending: show the port's buffer itself (no copy).
            used = self._call_recv(cqe.buf, n, cqe)
            if used == -2:
                released = True          # a view kept it; it goes back later
                used = self._last_used
            if used >= 0 and used < n and self._state == S_CONNECTED:
                if self._rbuf_append(cqe.buf + used, n - used) < 0:
                    self._close_now("out of memory for the receive buffer", True)
        else:
            if self._rbuf_append(cqe.buf, n) < 0:
                self._close_now("out of memory for the receive buffer", True)
                port_recv_release(self.core.port, cqe)
                return
            port_recv_release(self.core.port, cqe)
            released = True
            used = self._call_recv(self._rbuf + self._rpos, self._rlen - self._rpos, NULL)
            if used == -2:
                used = self._last_used
            if used >= 0:
                self._rpos += used
        if not released:
            port_recv_release(self.core.port, cqe)
        left = self._rlen - self._rpos
        if left == 0:
            self._rpos = self._rlen = 0
            if self._rbuf != NULL:
                free(self._rbuf)     # an idle connection pins no buffer
                self._rbuf = NULL
                self._rcap = 0
        elif left >= self._hooks.recv_buffer_limit and self._state == S_CONNECTED:
            self._close_now(
                f"receive buffer full: {left} bytes received and not consumed by OnRecv "
                f"(recv_buffer_limit is {self._hooks.recv_buffer_limit})", True)

    cdef int _rbuf_append(self, const char *data, Py_ssize_t n) noexcept:
        cdef Py_ssize_t need, cap
        cdef char *nb
        if self._rpos > 0 and self._rlen + n > self._rcap:
            # Compact: move the unconsumed bytes to the front (the read cursor resets).
            memmove(self._rbuf, self._rbuf + self._rpos, self._rlen - self._rpos)
            self._rlen -= self._rpos
            self._rpos = 0
        need = self._rlen + n
        if need > self._rcap:
            cap = self._rcap if self._rcap > 0 else 4096
            while cap < need:
                cap *= 2
            nb = <char *>realloc(self._rbuf, cap)
            if nb == NULL:
                return -1
            self._rbuf = nb
            self._rcap = cap
        memcpy(self._rbuf + self._rlen, data, n)
        self._rlen += n
        return 0

    cdef Py_ssize_t _call_recv(self, char *ptr, Py_ssize_t n, port_cqe_t *cqe) noexcept:
        """Call OnRecv with a view of ptr[0:n]; returns the bytes consumed, -1 after an
        error (the session is closing), or -2 when the hook kept the view of a port
        buffer (the view now owns that buffer; _last_used holds the count).  When the
        hook kept a view of the session's own buffer, the view takes that memory and the
        unconsumed rest moves to a fresh buffer: the return value is then 0."""
        cdef _RecvView view
        cdef Py_ssize_t used = n
        cdef object mv
        if self._hooks.packet_mode:
            return self._parse_packets(<const unsigned char *>ptr, n)
        if self._hooks.on_recv is None:
            return n
        try:
            mv = self.core._take_view(ptr, n)
        except BaseException as e:
            self._hook_failed("OnRecv", e)
            return -1
        try:
            r = self._hooks.on_recv(self, mv)
            if r is not None:
                used = r
                if used < 0 or used > n:
                    raise ValueError(f"OnRecv returned {r}, but it was given {n} bytes")
        except BaseException as e:
            self._hook_failed("OnRecv", e)
            used = -1
        if self.core._give_back_view(mv):
            return used
        # The hook kept the data (stored the memoryview or a slice): hand the memory to
        # the view's exporter, which frees it when the last export ends (_RecvView).
        view = <_RecvView>iocpnet_mv_base(mv)
        mv = None
        view.core = self.core
        if cqe != NULL:
            view.held = cqe[0]
            view.holds_port_buffer = True
            self._last_used = used
            used = -2
        else:
            view.owned = self._rbuf
            self._rbuf = NULL
            self._rcap = self._rpos = self._rlen = 0
            if used >= 0:
                if used < n and self._rbuf_append(ptr + used, n - used) < 0:
                    self._close_now("out of memory for the receive buffer", True)
                    used = -1
                else:
                    used = 0
        view._detached()
        return used

    cdef Py_ssize_t _parse_packets(self, const unsigned char *ptr, Py_ssize_t n) noexcept:
        """PacketSession: call OnRecvPacket once per whole packet in ptr[0:n]; returns
        the bytes consumed (a partial packet waits for the rest), or -1 after a bad size
        or a failed hook (the session is closing)."""
        cdef Py_ssize_t pos = 0
        cdef size_t size = 0, limit = <size_t>self._hooks.max_packet_size
        cdef unsigned int pid = 0
        cdef packet_status st
        cdef object hook = self._hooks.on_recv_packet
        while True:
            st = packet_scan(ptr + pos, <size_t>(n - pos), limit, &size, &pid)
            if st == PACKET_PARTIAL:
                break
            if st != PACKET_OK:
                why = _bad_packet_reason(st, size, pid, limit)
                logger.warning("disconnecting %s: %s", repr(self), why)
                self._close_now(why, True)
                return -1
            payload = PyBytes_FromStringAndSize(<char *>ptr + pos + PKT_HEADER,
                                                <Py_ssize_t>size - PKT_HEADER)
            pos += size
            try:
                hook(self, pid, payload)
            except BaseException as e:
                self._hook_failed("OnRecvPacket", e)
                return -1
            if self._state != S_CONNECTED:
                break            # the hook disconnected us: leave the rest
        return pos

    cdef void _process_send(self, port_cqe_t *cqe) noexcept:
        cdef int64_t res = cqe.res
        cdef Py_ssize_t sent = 0, avail
        cdef PyObject *o
        cdef bint busy
        cdef int rc
        port_spin_lock(&self._lock)
        if res > 0:
            sent = <Py_ssize_t>res
            self._sq_bytes -= sent
            while res > 0 and self._sq_count > 0:
                o = self._sq[self._sq_head]
                avail = PyBytes_GET_SIZE(<object>o) - self._sq_offset
                if res >= avail:
                    res -= avail
                    self._sq[self._sq_head] = NULL
                    self._sq_head = (self._sq_head + 1) % self._sq_cap
                    self._sq_count -= 1
                    self._sq_offset = 0
                    _decref(o)           # a bytes object: its release runs no Python code
                else:
                    self._sq_offset += res
                    res = 0
        rc = 0
        if cqe.res >= 0 and self._sq_count > 0 and \
                (self._state == S_CONNECTED or self._state == S_FLUSHING):
            self._build_iov()
            rc = self._submit_send_locked()
        else:
            self._send_busy = False
            self._ops -= 1
            if self._sq_count == 0:
                self._sq_head = 0
                if self._sq != self._sq_inline:
                    free(self._sq)
                    self._sq = self._sq_inline
                    self._sq_cap = SQ_INLINE
                if self._iov != self._iov_inline:
                    free(self._iov)
                    self._iov = self._iov_inline
        busy = self._send_busy
        if self._recv_paused and self._sq_bytes <= (self._hooks.send_queue_limit >> 4):
            self._recv_paused = False
            if rc == 0:
                rc = self._arm_recv_locked()
        port_spin_unlock(&self._lock)
        if rc != 0:
            self._close_now(f"cannot send or receive: {port_reason(rc)}", False)
        if sent > 0 and self._hooks.on_send is not None:
            try:
                self._hooks.on_send(self, sent)
            except BaseException as e:
                self._hook_failed("OnSend", e)
        if cqe.res < 0:
            if cqe.res != PORT_ECANCELED:
                self._close_now(port_reason(<int>cqe.res), False)
        elif not busy and self._state == S_FLUSHING:
            self._close_if_flushed()
        self._maybe_finish()

    cdef int _sq_grow(self) noexcept:
        """Double the send-queue ring (under _lock)."""
        cdef Py_ssize_t cap = self._sq_cap * 2, i
        cdef PyObject **ring = <PyObject **>malloc(cap * sizeof(PyObject *))
        if ring == NULL:
            return -1
        for i in range(self._sq_count):
            ring[i] = self._sq[(self._sq_head + i) % self._sq_cap]
        if self._sq != self._sq_inline:
            free(self._sq)
        self._sq = ring
        self._sq_cap = cap
        self._sq_head = 0
        return 0

    cdef void _build_iov(self) noexcept:
        """Point the gather list at the queued bytes (under _lock, no send in flight)."""
        cdef Py_ssize_t k, cnt = self._sq_count
        cdef PyObject *o
        if cnt > IOV_MAX:
            cnt = IOV_MAX
        if cnt > IOV_INLINE and self._iov == self._iov_inline:
            self._iov = <port_buf_t *>malloc(IOV_MAX * sizeof(port_buf_t))
            if self._iov == NULL:
                self._iov = self._iov_inline
        if self._iov == self._iov_inline and cnt > IOV_INLINE:
            cnt = IOV_INLINE
        for k in range(cnt):
            o = self._sq[(self._sq_head + k) % self._sq_cap]
            self._iov[k].base = PyBytes_AS_STRING(<object>o)
            self._iov[k].len = PyBytes_GET_SIZE(<object>o)
        self._iov[0].base += self._sq_offset
        self._iov[0].len -= self._sq_offset
        self._iov_n = <int>cnt

    cdef int _submit_send_locked(self) noexcept:
        """Submit the gather list (under _lock, with _send_busy set and counted).  On
        failure the send is undone and the error returned for the caller to close."""
        cdef int rc
        _incref(<PyObject *>self)
        rc = port_send(self.core.port, &self._send_op, self._sock, self._iov, self._iov_n)
        if rc != 0:
            _decref(<PyObject *>self)
            self._send_busy = False
            self._ops -= 1
        return rc

    cdef void _process_close(self, port_cqe_t *cqe) noexcept:
        port_spin_lock(&self._lock)
        self._ops -= 1
        port_spin_unlock(&self._lock)
        self._maybe_finish()

    # ---- closing ----

    cdef bint _begin_disconnect(self, str reason, bint flush) noexcept:
        """Graceful: stop receiving, flush the send queue (bounded), then close."""
        cdef IocpCore core
        port_spin_lock(&self._lock)
        if self._state != S_CONNECTED and self._state != S_CONNECTING:
            port_spin_unlock(&self._lock)
            return False
        self._reason = reason
        if self._state == S_CONNECTING or not flush or \
                not (self._send_busy or self._sq_count > 0):
            self._close_locked(False)
            port_spin_unlock(&self._lock)
            self._maybe_finish()
            return True
        self._state = S_FLUSHING
        if self._recv_armed:
            port_cancel(self.core.port, &self._recv_op)
        port_spin_unlock(&self._lock)
        core = self.core
        core._watch_flush(self, port_monotonic_ms() + <int64_t>(self._hooks.flush_timeout * 1000))
        return True

    cdef bint _close_now(self, str reason, bint reset) noexcept:
        """Close at once (errors, limits, Abort, the flush deadline): queued data is
        dropped.  The first reason is kept, except that a graceful close in progress
        reports what interrupted it."""
        port_spin_lock(&self._lock)
        if self._state < S_CONNECTING or self._state >= S_CLOSING:
            port_spin_unlock(&self._lock)
            return False
        if self._state != S_FLUSHING or reason is not None:
            self._reason = reason
        self._close_locked(reset)
        port_spin_unlock(&self._lock)
        self._maybe_finish()
        return True

    cdef void _close_if_flushed(self) noexcept:
        """Graceful close: once the send queue has drained, close.  Checked again under
        the lock: a Send accepted just before Disconnect may have started another send
        since the caller looked (while OnSend ran, say), and it must go out first."""
        port_spin_lock(&self._lock)
        if self._state == S_FLUSHING and not self._send_busy and self._sq_count == 0:
            self._close_locked(False)
        port_spin_unlock(&self._lock)
        self._maybe_finish()

    cdef void _close_locked(self, bint reset) noexcept:
        """Cancel what is in flight and close the socket (under _lock)."""
        cdef int rc, flags = PORT_CLOSE_RESET if reset else 0
        cdef bint connecting = self._state == S_CONNECTING
        self._state = S_CLOSING
        if self._reason is None:
            self._reason = "disconnected"
        if self._recv_armed or connecting:
            port_cancel(self.core.port, &self._recv_op)
        if self._send_busy:
            port_cancel(self.core.port, &self._send_op)
        _incref(<PyObject *>self)
        rc = port_close(self.core.port, &self._close_op, self._sock, flags)
        if rc == 0:
            self._ops += 1
        else:
            # The port is shut down: no completion will come for anything.  Close the
            # socket here; _maybe_finish ends the session.
            _decref(<PyObject *>self)
            port_sock_close(self.core.port, self._sock, flags)
            self._ops = 0
        self._sock = PORT_INVALID_SOCK

    cdef void _maybe_finish(self) noexcept:
        cdef bint finish = False
        if self._state != S_CLOSING:
            return       # states only move forward; whoever sets CLOSING checks again
        port_spin_lock(&self._lock)
        if self._state == S_CLOSING and self._ops == 0:
            self._state = S_DONE
            finish = True
        port_spin_unlock(&self._lock)
        if finish:
            self._finish()

    cdef void _finish(self) noexcept:
        """Every operation has ended: release everything, then OnDisconnected."""
        self._release_buffers()
        self.core._unwatch_flush(self)
        if self._counted_connected:
            self._counted_connected = False
            port_atomic_add64(&_sessions_connected, -1)
        if self._service is not None:
            self._service._session_done(self)
        if self._hooks.on_disconnected is not None:
            try:
                self._hooks.on_disconnected(self, self._reason)
            except BaseException:
                logger.exception("OnDisconnected of %s raised", repr(self))

    cdef void _hook_failed(self, str hook, BaseException e) noexcept:
        # Log the repr, not the session: a handler keeping the record must not keep it alive.
        logger.error("%s of %s raised; disconnecting it", hook, repr(self),
                     exc_info=(type(e), e, e.__traceback__))
        # The traceback's frames hold the hook's locals (OnRecv's memoryview among
        # them) for as long as a handler keeps the record; let them go now.
        _traceback.clear_frames(e.__traceback__)
        # Our bug, not the peer's: close with a FIN, without waiting to flush.
        self._close_now(f"exception in {hook}: {_describe_exc(e)}", False)


# ---------------------------------------------------------------------------------------
# Packets: [size: u16 LE][id: u16 LE][payload], size counting the 4-byte header

cdef str _bad_packet_reason(packet_status st, size_t size, unsigned pid, size_t limit):
    if st == PACKET_TOO_SMALL:
        return (f"bad packet: size {size} is smaller than the {PKT_HEADER}-byte header "
                f"(packet id {pid})")
    return f"bad packet: size {size} exceeds max_packet_size {limit} (packet id {pid})"


def scan_packets(data, int max_packet_size=PKT_MAX):
    """Run PacketSession's framing over ``data`` (bytes-like) without a connection.

    Returns ``(packets, consumed, error)``: the whole packets found as
    ``(packet_id, payload)`` tuples, how many bytes they used (the rest is an
    unfinished packet), and None or the reason a session would be disconnected for.
    Used by tests and tools; the session's own loop uses the same C framing."""
    cdef const unsigned char[:] view = memoryview(data).cast("B")
    cdef Py_ssize_t n = view.shape[0], pos = 0
    cdef size_t size = 0
    cdef unsigned pid = 0
    cdef packet_status st
    cdef const unsigned char *base
    cdef unsigned char empty = 0
    if not PKT_HEADER <= max_packet_size <= PKT_MAX:
        raise ValueError(f"max_packet_size must be between {PKT_HEADER} and {PKT_MAX}")
    base = &view[0] if n > 0 else &empty
    packets = []
    while True:
        st = packet_scan(base + pos, <size_t>(n - pos), <size_t>max_packet_size, &size, &pid)
        if st == PACKET_PARTIAL:
            return packets, pos, None
        if st != PACKET_OK:
            return packets, pos, _bad_packet_reason(st, size, pid, <size_t>max_packet_size)
        packets.append((pid, PyBytes_FromStringAndSize(<const char *>base + pos + PKT_HEADER,
                                                       <Py_ssize_t>size - PKT_HEADER)))
        pos += <Py_ssize_t>size

def make_packet(int packet_id, payload=b""):
    """Build one packet as bytes: build it once, send it to many (Broadcast)."""
    cdef Py_ssize_t n
    cdef bytes out
    cdef unsigned char *p
    cdef const unsigned char[:] view
    if not 0 <= packet_id <= 0xFFFF:
        raise ValueError(f"packet id {packet_id} out of range 0..65535")
    if isinstance(payload, str):
        raise TypeError("payload must be bytes-like, not str (encode it first)")
    view = memoryview(payload).cast("B") if not isinstance(payload, bytes) else payload
    n = view.shape[0]
    if n + PKT_HEADER > PKT_MAX:
        raise ValueError(f"payload of {n} bytes is too large for a packet "
                         f"(at most {PKT_MAX - PKT_HEADER})")
    out = PyBytes_FromStringAndSize(NULL, n + PKT_HEADER)
    p = <unsigned char *>PyBytes_AS_STRING(out)
    packet_header(p, packet_id, n)
    if n:
        memcpy(p + PKT_HEADER, &view[0], n)
    return out


cdef class PacketSession(Session):
    """A Session that speaks packets: ``[size: u16][id: u16][payload]``, little-endian,
    ``size`` counting the 4-byte header.

    Override ``OnRecvPacket(packet_id, payload)`` (called once per whole packet, in
    order; ``payload`` is bytes), or set the class attribute ``handler`` to a
    ``PacketHandler`` that routes ids to functions.  ``max_packet_size`` (class
    attribute, at most 65535) bounds what a peer may announce: a size below 4 or above
    it disconnects the session with the reason logged.
    """

    @property
    def max_packet_size(self):
        return self._hooks.max_packet_size

    def SendPacket(self, int packet_id, payload=b""):
        """Send one packet (from any thread); returns as Send does."""
        return self.Send(make_packet(packet_id, payload))

    def OnRecvPacket(self, packet_id, payload):
        """Called once per packet.  The default routes it through the class's
        ``handler`` (a PacketHandler); without one, the packet is unknown."""
        handler = getattr(type(self), "handler", None)
        if handler is not None:
            return handler.dispatch(self, packet_id, payload)
        self.OnUnknownPacket(packet_id, payload)

    def OnUnknownPacket(self, packet_id, payload):
        """A packet nobody handles: logged, and the session is disconnected."""
        logger.warning("disconnecting %s: unknown packet id %d (%d-byte payload)",
                       repr(self), packet_id, len(payload))
        self.Disconnect(f"unknown packet id {packet_id}")


# ---------------------------------------------------------------------------------------
# Listener

@cython.final
cdef class Listener(IocpObject):
    """Accepts connections: binds, listens, and keeps ``max_session_count`` accepts
    posted, each with a session made by the service's factory, re-posting each one as
    it completes (the original's AcceptEx pattern).

    ``address``: an int port (all interfaces) or a ``(host, port)`` tuple; port 0 picks
    a free port, readable as ``.port`` after ``Start()``.
    """
    cdef object _address_arg
    cdef readonly int backlog
    cdef bint _reuse_port
    cdef bint _ipv6_only
    cdef port_sock_t _sock
    cdef int _port
    cdef str _host
    cdef port_op_t *_ops
    cdef list _pending
    cdef int _count
    # Accept completions of different slots run on several workers at once (each on
    # its own session's strand): the counters are atomic, the back-off state locked.
    cdef volatile int32_t _inflight
    cdef volatile int64_t _accepted
    cdef volatile int64_t _accept_errors
    cdef Service _service
    cdef bint _closing
    cdef object _backoff_lock
    cdef list _starved
    cdef object _backoff_timer
    cdef int _backoff_ms

    def __init__(self, address, *, int backlog=1024, bint reuse_port=False,
                 bint ipv6_only=False):
        if isinstance(address, int):
            address = (None, address)
        elif isinstance(address, (tuple, list)) and len(address) == 2:
            address = (address[0] or None, int(address[1]))
        else:
            raise TypeError("address must be a port number or a (host, port) tuple")
        if not 0 <= address[1] <= 65535:
            raise ValueError(f"port out of range: {address[1]}")
        self._address_arg = address
        self.backlog = backlog
        self._reuse_port = reuse_port
        self._ipv6_only = ipv6_only
        self._sock = PORT_INVALID_SOCK
        self._starved = []
        self._backoff_ms = 0
        self._backoff_lock = threading.Lock()

    def __cinit__(self, *args, **kwargs):
        self._ops = NULL
        self._sock = PORT_INVALID_SOCK

    def __dealloc__(self):
        if self._sock != PORT_INVALID_SOCK and self.core is not None and self.core.port != NULL:
            port_sock_close(self.core.port, self._sock, 0)
        if self._ops != NULL:
            free(self._ops)
            self._ops = NULL

    def __repr__(self):
        return f"<Listener {self.address}>"

    @property
    def port(self):
        """The bound port (after Start)."""
        return self._port if self._sock != PORT_INVALID_SOCK or self._port else \
            self._address_arg[1]

    @property
    def address(self):
        if self._host is not None:
            return (self._host, self._port)
        return self._address_arg

    cdef int _start(self, IocpCore core, Service service, int count) except -1:
        cdef port_addr_t addr
        cdef port_addr_t bound
        cdef char host[64]
        cdef int portnum = 0, rc, flags = 0, i
        cdef const char *chost = NULL
        if self._ops != NULL:
            raise RuntimeError("the Listener is already started")
        if count <= 0:
            raise ValueError("max_session_count must be positive")
        hostarg = self._address_arg[0]
        if hostarg is not None:
            hb = str(hostarg).encode("idna")
            chost = hb
        rc = port_resolve(chost, self._address_arg[1], 1, &addr)
        if rc != 0:
            raise port_error(rc, f"resolving {hostarg!r}")
        if self._reuse_port:
            flags |= PORT_LISTEN_REUSEPORT
        if self._ipv6_only:
            flags |= PORT_LISTEN_V6ONLY
        rc = port_listen(core.port, &addr, self.backlog, flags, &self._sock)
        if rc != 0:
            self._sock = PORT_INVALID_SOCK
            raise port_error(rc, f"listening on {self._address_arg}")
        if port_sockname(self._sock, &bound) == 0 and \
                port_addr_format(&bound, host, sizeof(host), &portnum) == 0:
            self._host = host.decode("ascii")
            self._port = portnum
        self.core = core
        self._service = service
        self._ops = <port_op_t *>malloc(count * sizeof(port_op_t))
        if self._ops == NULL:
            raise MemoryError()
        self._count = count
        self._pending = [None] * count
        for i in range(count):
            port_op_init(&self._ops[i], PORT_OP_ACCEPT, <void *>self, NULL)
        for i in range(count):
            self._post(i, None)
        return 0

    cdef void _post(self, int i, Session session) noexcept:
        """(Re)post accept slot i with `session`, or a new one from the factory."""
        cdef int rc
        if self._closing:
            self._pending[i] = None
            return
        if session is None:
            try:
                session = self._service._new_session()
            except BaseException:
                logger.exception("the session factory raised; accept slot %d "
                                 "stays empty", i)
                self._pending[i] = None
                return
        session._state = S_ACCEPTING
        self._pending[i] = session
        # The accept completes on the new session's strand, so OnConnected runs before
        # any completion of the session's own operations.
        port_op_init(&self._ops[i], PORT_OP_ACCEPT, <void *>self, &session._strand)
        port_atomic_add32(&self._inflight, 1)
        _incref(<PyObject *>self)
        rc = port_accept(self.core.port, &self._ops[i], self._sock)
        if rc != 0:
            _decref(<PyObject *>self)
            port_atomic_add32(&self._inflight, -1)
            self._pending[i] = None
            session._state = S_NEW
            if rc != PORT_ECLOSED:
                logger.error("posting an accept failed: %s", port_reason(rc))

    cdef void _dispatch(self, port_cqe_t *cqe) noexcept:
        cdef int i = <int>(cqe.op - self._ops)
        cdef Session session = <Session>self._pending[i]
        cdef int64_t res = cqe.res
        cdef Service service = self._service
        port_atomic_add32(&self._inflight, -1)
        self._pending[i] = None
        if res >= 0:
            port_atomic_add64(&self._accepted, 1)
            self._backoff_ms = 0
            if self._closing:
                port_sock_close(self.core.port, <port_sock_t>res, 0)
                session._state = S_NEW
                return
            if not service._admit():
                # Over the live-session cap: refuse this one at once, keep accepting.
                port_sock_close(self.core.port, <port_sock_t>res, PORT_CLOSE_RESET)
                session._state = S_NEW
                self._post(i, session)
                return
            self._post(i, None)       # keep accepting while this one starts
            session._attach_accepted(self.core, service)
            session._on_accepted(<port_sock_t>res)
            return
        session._state = S_NEW
        if self._closing:
            return
        if res == PORT_ECANCELED:
            # Not ours (we only cancel when closing): keep the slot, post it again.
            self._post(i, session)
            return
        port_atomic_add64(&self._accept_errors, 1)
        if res == PORT_EMFILE or res == PORT_ENFILE or res == PORT_ENOBUFS or \
                res == PORT_ENOMEM:
            # Out of descriptors or memory: retrying at once would spin a core on a
            # listener that stays readable.  Back off, then try again.
            with self._backoff_lock:
                self._starved.append((i, session))
                start = self._backoff_timer is None
                if start:
                    self._backoff_ms = min(max(self._backoff_ms * 2, 50), 1000)
                    self._backoff_timer = True       # claimed; made below
                delay_ms = self._backoff_ms
            if start:
                logger.warning("accept failed on %s: %s; pausing accepts for %d ms",
                               self.address, port_reason(<int>res), delay_ms)
                try:
                    t = self.core.CallLater(delay_ms / 1000.0, self._resume)
                except Exception:
                    logger.exception("cannot schedule the accept back-off")
                    t = None
                with self._backoff_lock:
                    self._backoff_timer = t
            return
        logger.warning("accept failed on %s: %s", self.address,
                       port_reason(<int>res))
        self._post(i, session)

    def _resume(self):
        with self._backoff_lock:
            starved = self._starved
            self._starved = []
            self._backoff_timer = None
        for i, session in starved:
            self._post(i, session)

    def Close(self):
        """Stop accepting: cancel the posted accepts and close the listening socket."""
        cdef int i
        if self._closing:
            return
        self._closing = True
        with self._backoff_lock:
            timer = self._backoff_timer
            self._backoff_timer = None
            self._starved = []
        if isinstance(timer, Timer):
            timer.Cancel()
        if self._ops != NULL:
            for i in range(self._count):
                if self._ops[i].in_flight:
                    port_cancel(self.core.port, &self._ops[i])
        if self._sock != PORT_INVALID_SOCK and self.core is not None:
            port_sock_close(self.core.port, self._sock, 0)
            self._sock = PORT_INVALID_SOCK

    @property
    def accepts_posted(self):
        """Accepts posted and not completed yet."""
        return port_atomic_load32(&self._inflight)

    @property
    def accepted(self):
        """Connections accepted so far (including those refused over the cap)."""
        return port_atomic_load64(&self._accepted)

    @property
    def accept_errors(self):
        """Accepts that failed (out of descriptors, aborted connections...)."""
        return port_atomic_load64(&self._accept_errors)


# ---------------------------------------------------------------------------------------
# Services

cdef class Service:
    """The original's Service: an IocpCore, a Listener, a session factory and the number
    of accepts kept posted (``max_session_count``, which is not a cap on sessions: use
    ``max_sessions`` for that).

    ``Start()`` binds, listens and posts the accepts; worker threads then loop
    ``service.GetIocpCore().Dispatch()``.  ``Run(workers=5)`` does all of it and returns
    after ``Stop()``, SIGINT or SIGTERM, with a graceful shutdown.
    """
    cdef readonly IocpCore core
    cdef readonly object listener
    cdef object _factory
    cdef readonly int max_session_count
    cdef readonly object max_sessions
    cdef Py_ssize_t _cap
    cdef set _sessions
    cdef object _lock
    cdef object _stop_event
    cdef bint _started
    cdef bint _stopping
    cdef object _close_cb
    cdef object _idle_timer
    cdef str _shutdown_reason         # what Stop() tells the sessions
    cdef Py_ssize_t _admitting        # accepted, admitted, not yet in _sessions
    cdef readonly uint64_t rejected
    cdef readonly uint64_t total_sessions
    cdef readonly uint64_t idle_disconnects
    cdef object __weakref__

    def __init__(self, IocpCore core, listener, session_factory, int max_session_count=100,
                 *, max_sessions=None):
        if core is None:
            raise TypeError("core must be an IocpCore")
        if not callable(session_factory):
            raise TypeError("session_factory must be a Session subclass or a callable "
                            "returning a Session")
        if max_session_count <= 0:
            raise ValueError("max_session_count must be positive")
        self.core = core
        self.listener = listener
        self._factory = session_factory
        self.max_session_count = max_session_count
        self.max_sessions = max_sessions
        self._cap = -1 if max_sessions is None else int(max_sessions)
        if max_sessions is not None and self._cap < 0:
            raise ValueError("max_sessions must be >= 0")
        self._sessions = set()
        self._lock = threading.Lock()
        self._stop_event = threading.Event()
        self._shutdown_reason = "server shutdown"

    def __repr__(self):
        return (f"<{type(self).__name__} {self.listener!r} sessions={len(self._sessions)} "
                f"backend={self.core.backend}>")

    def GetIocpCore(self):
        return self.core

    @property
    def session_count(self):
        """Live sessions (connected, or closing and not yet disconnected)."""
        return len(self._sessions)

    @property
    def sessions(self):
        """A snapshot of the live sessions."""
        with self._lock:
            return list(self._sessions)

    def CreateSession(self):
        return self._new_session()

    cdef Session _new_session(self):
        s = self._factory()
        if not isinstance(s, Session):
            raise TypeError(f"the session factory returned {type(s).__name__}, "
                            f"not a Session")
        return <Session>s

    cdef bint _admit(self) noexcept:
        """May one more session start?  (the live-session cap)  A yes reserves its place
        until _session_connected: accepts complete on several workers at once, and two
        of them must not both take the last place."""
        with self._lock:
            if self._stopping:
                return False
            if self._cap >= 0 and len(self._sessions) + self._admitting >= self._cap:
                self.rejected += 1
                return False
            self._admitting += 1
            return True

    cdef bint _session_connected(self, Session s) noexcept:
        with self._lock:
            self._sessions.add(s)
            if self._admitting > 0:
                self._admitting -= 1
            self.total_sessions += 1
            stopping = self._stopping
        if stopping:
            s._close_now(self._shutdown_reason, False)
            return False
        self._watch_idle(s)
        return True

    cdef void _watch_idle(self, Session s) noexcept:
        """Start the idle sweep the first time a session with an idle_timeout connects."""
        cdef double idle = s._hooks.idle_timeout
        if idle <= 0 or self._idle_timer is not None:
            return
        with self._lock:
            if self._idle_timer is not None or self._stopping:
                return
            self._idle_timer = True       # claimed; made below, outside the lock
        try:
            t = self.core.CallEvery(max(0.05, min(1.0, idle / 4.0)), self._sweep_idle)
        except Exception:
            logger.exception("cannot start the idle-timeout sweep")
            t = None
        with self._lock:
            self._idle_timer = t

    def _sweep_idle(self):
        """Disconnect sessions that received nothing for their idle_timeout."""
        cdef Session s
        cdef int64_t now = port_monotonic_ms()
        cdef double idle
        for s in self.sessions:
            idle = s._hooks.idle_timeout
            if idle > 0 and s._state == S_CONNECTED and \
                    now - s._last_recv_ms >= <int64_t>(idle * 1000):
                if s._begin_disconnect(f"idle timeout: nothing received for {idle:g} s",
                                       True):
                    self.idle_disconnects += 1

    cdef void _session_done(self, Session s) noexcept:
        with self._lock:
            self._sessions.discard(s)

    def Start(self):
        """Bind, listen and post the accepts."""
        if self._started:
            raise RuntimeError("the service is already started")
        if self.listener is None:
            raise RuntimeError("this service has no Listener")
        self._started = True
        self._close_cb = self._on_core_close
        self.core._add_close_callback(self._close_cb)
        (<Listener>self.listener)._start(self.core, self, self.max_session_count)

    def _on_core_close(self):
        self._begin_stop(self._shutdown_reason)

    cdef void _begin_stop(self, str reason) noexcept:
        with self._lock:
            if self._stopping:
                return
            self._stopping = True
            sessions = list(self._sessions)
            idle_timer = self._idle_timer
            self._idle_timer = None
        if isinstance(idle_timer, Timer):
            idle_timer.Cancel()
        if self.listener is not None:
            try:
                self.listener.Close()
            except Exception:
                logger.exception("closing the listener failed")
        for s in sessions:
            (<Session>s)._begin_disconnect(reason, True)
        self._stop_event.set()

    def Stop(self, double timeout=5.0):
        """Graceful shutdown (any thread): stop accepting, disconnect every session
        (their queued data is flushed), and wait up to ``timeout`` seconds for them to
        finish.  From a worker thread it does not wait.  Under ``Run`` it also makes
        ``Run`` return."""
        self._begin_stop(self._shutdown_reason)
        if iocpnet_get_tls_core() == <void *>self.core:
            return
        deadline = _time.monotonic() + timeout
        while len(self._sessions) > 0 or (self.listener is not None and
                                          self.listener.accepts_posted > 0):
            if _time.monotonic() >= deadline:
                logger.warning("%d session(s) still open after %.1f s of shutdown",
                               len(self._sessions), timeout)
                break
            if self.core._dispatchers > 0:
                _time.sleep(0.002)
            else:
                if self.core.Dispatch(20) < 0:
                    break

    def Broadcast(self, data, sessions=None):
        """Send the same bytes to every live session (or to ``sessions``), queued by
        reference: the packet is built once.  Returns how many sessions took it."""
        if type(data) is not bytes:
            data = bytes(data)
        targets = self.sessions if sessions is None else sessions
        n = 0
        for s in targets:
            if (<Session>s).Send(data):
                n += 1
        return n

    def Run(self, int workers=5, *, double shutdown_timeout=5.0):
        """Start, run ``workers`` threads looping Dispatch, and return after ``Stop()``,
        SIGINT or SIGTERM, with a graceful shutdown: stop accepting, disconnect the
        sessions, drain the operations, join the workers, close the core."""
        import signal
        if workers <= 0:
            raise ValueError("workers must be positive")
        if not self._started:
            self.Start()
        core = self.core
        errors = []

        def worker():
            try:
                while core.Dispatch() >= 0:
                    pass
            except BaseException as e:
                errors.append(e)
                logger.exception("worker thread failed")
                self._stop_event.set()

        threads = [threading.Thread(target=worker, name=f"iocpnet-worker-{i}", daemon=True)
                   for i in range(workers)]
        for t in threads:
            t.start()
        old_handlers = {}
        if threading.current_thread() is threading.main_thread():
            def on_signal(signum, frame):
                logger.info("%s received; shutting down",
                            signal.Signals(signum).name)
                self._stop_event.set()
            for sig in (signal.SIGINT, getattr(signal, "SIGTERM", None)):
                if sig is not None:
                    old_handlers[sig] = signal.signal(sig, on_signal)
        try:
            while not self._stop_event.wait(0.25):
                pass
        finally:
            for sig, h in old_handlers.items():
                signal.signal(sig, h)
            self.Stop(shutdown_timeout)
            core.Close(shutdown_timeout)
            for t in threads:
                t.join(shutdown_timeout)
            self.core._remove_close_callback(self._close_cb)
        if errors:
            raise errors[0]


cdef class ServerService(Service):
    """A Service that accepts connections (the same as ``Service``)."""


class Reconnect:
    """A ClientService's reconnect policy: when a session ends (or cannot connect), a new
    one is opened after ``initial`` seconds, the delay growing by ``factor`` up to
    ``max_delay`` while attempts keep failing; after ``max_attempts`` failures in a row
    (None: no limit) the service stops trying.  A connection that came up resets it."""

    def __init__(self, initial=0.5, max_delay=30.0, factor=2.0, max_attempts=None):
        if initial < 0 or max_delay < 0 or factor < 1:
            raise ValueError("initial and max_delay must be >= 0 and factor >= 1")
        self.initial = float(initial)
        self.max_delay = float(max_delay)
        self.factor = float(factor)
        self.max_attempts = max_attempts

    def delay(self, failures):
        """Seconds to wait after `failures` failed attempts in a row (0 after a drop)."""
        return min(self.max_delay, self.initial * self.factor ** max(failures - 1, 0))

    def __repr__(self):
        return (f"Reconnect(initial={self.initial}, max_delay={self.max_delay}, "
                f"factor={self.factor}, max_attempts={self.max_attempts})")


cdef class ClientService(Service):
    """Connects ``count`` client sessions to ``address`` (dummy clients, server to
    server links), IPv4 or IPv6.  Each session gets the usual hooks; a connection that
    cannot be made gets ``OnConnectFailed(reason)`` then ``OnDisconnected(reason)``.
    With ``reconnect`` (True, or a ``Reconnect`` policy) every session that ends is
    replaced by a new connection after the policy's delay, until ``Stop()``.
    """
    cdef object _address
    cdef port_addr_t _addr
    cdef readonly int count
    cdef readonly object reconnect
    cdef int _failures
    cdef set _retry_timers
    cdef readonly uint64_t connect_failures

    def __init__(self, IocpCore core, address, session_factory, int count=1, *,
                 reconnect=None):
        cdef int rc
        if isinstance(address, int):
            address = ("127.0.0.1", address)
        if not (isinstance(address, (tuple, list)) and len(address) == 2):
            raise TypeError("address must be a (host, port) tuple")
        if count < 0:
            raise ValueError("count must be >= 0")
        super().__init__(core, None, session_factory, max(count, 1))
        self._shutdown_reason = "client shutdown"
        self._address = (str(address[0]), int(address[1]))
        self.count = count
        if reconnect is True:
            reconnect = Reconnect()
        elif reconnect is False:
            reconnect = None
        if reconnect is not None and not hasattr(reconnect, "delay"):
            raise TypeError("reconnect must be True or a Reconnect policy")
        self.reconnect = reconnect
        self._retry_timers = set()
        host = self._address[0].encode("idna")
        rc = port_resolve(host, self._address[1], 0, &self._addr)
        if rc != 0:
            raise port_error(rc, f"resolving {self._address[0]!r}")

    @property
    def address(self):
        return self._address

    def Start(self):
        """Open the connections."""
        if self._started:
            raise RuntimeError("the service is already started")
        self._started = True
        self._close_cb = self._on_core_close
        self.core._add_close_callback(self._close_cb)
        for _ in range(self.count):
            self.Connect()

    def Connect(self, session=None):
        """Open one more connection, with `session` or a new one from the factory;
        returns the session (connecting)."""
        cdef Session s
        if self._stopping:
            raise RuntimeError("the service is stopping")
        s = self._new_session() if session is None else session
        s._attach(self.core, self)
        with self._lock:
            self._sessions.add(s)
            self.total_sessions += 1
        try:
            s._start_connect(&self._addr)
        except BaseException:
            with self._lock:
                self._sessions.discard(s)
            raise
        return s

    cdef bint _session_connected(self, Session s) noexcept:
        # Already in the set since the connect started.
        if self._stopping:
            s._close_now(self._shutdown_reason, False)
            return False
        with self._lock:
            self._failures = 0
        self._watch_idle(s)
        return True

    cdef void _session_done(self, Session s) noexcept:
        Service._session_done(self, s)
        if not s._was_connected:
            with self._lock:
                self.connect_failures += 1
                self._failures += 1
        if self.reconnect is not None and not self._stopping:
            self._schedule_retry()

    cdef void _schedule_retry(self) noexcept:
        limit = self.reconnect.max_attempts
        if limit is not None and self._failures >= limit:
            logger.warning("giving up on %s:%d after %d failed connection attempts",
                           self._address[0], self._address[1], self._failures)
            return
        try:
            delay = float(self.reconnect.delay(self._failures))
            holder = []
            t = self.core.CallLater(delay, self._retry, holder)
            holder.append(t)
            with self._lock:
                self._retry_timers.add(t)
        except Exception:
            if not self.core._closing:
                logger.exception("cannot schedule a reconnect")

    def _retry(self, holder):
        with self._lock:
            self._retry_timers.discard(holder[0])
        if self._stopping:
            return
        try:
            self.Connect()
        except Exception as e:
            logger.warning("reconnecting to %s:%d failed: %s", self._address[0],
                           self._address[1], e)
            with self._lock:
                self.connect_failures += 1
                self._failures += 1
            self._schedule_retry()

    cdef void _begin_stop(self, str reason) noexcept:
        Service._begin_stop(self, reason)
        with self._lock:
            timers = list(self._retry_timers)
            self._retry_timers.clear()
        for t in timers:
            t.Cancel()

    def _on_core_close(self):
        self._begin_stop(self._shutdown_reason)
