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
from cpython.ref cimport PyObject, Py_REFCNT
from cpython.buffer cimport (PyBuffer_FillInfo, PyBuffer_Release, PyObject_CheckBuffer,
                             PyObject_GetBuffer, PyBUF_SIMPLE)
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE, PyBytes_FromStringAndSize
from cpython.exc cimport PyErr_CheckSignals
from cpython.pythread cimport (PyThread_type_lock, PyThread_allocate_lock, PyThread_free_lock,
                               PyThread_acquire_lock, PyThread_release_lock, WAIT_LOCK,
                               NOWAIT_LOCK)
from libc.stdint cimport int16_t, int32_t, int64_t, uint8_t, uint32_t, uint64_t, uintptr_t
from libc.stdlib cimport malloc, free, realloc
from libc.string cimport memcpy, memmove

from iocpnet._port cimport *

import errno as _errno
import numbers as _numbers
import operator as _operator
import logging
import os
import queue as _queue
import threading
import warnings
import time as _time
import sys as _sys
import traceback as _traceback
from types import (AsyncGeneratorType as _AsyncGeneratorType, CoroutineType as _CoroutineType,
                   FunctionType as _FunctionType, GeneratorType as _GeneratorType)
import weakref as _weakref

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
    /* Batches this thread took in a row without giving up the GIL (IocpCore._dispatch). */
    static PORT_THREAD_LOCAL int iocpnet_tls_held = 0;
    static int iocpnet_held_batches(void) { return iocpnet_tls_held; }
    static void iocpnet_held_batch(int held) { iocpnet_tls_held = held ? iocpnet_tls_held + 1 : 0; }
    /* Group fan-outs under way on this thread, any group (group.pxi, "Broadcast order"). */
    static PORT_THREAD_LOCAL int iocpnet_tls_fanouts = 0;
    static int iocpnet_fanouts(void) { return iocpnet_tls_fanouts; }
    static void iocpnet_set_fanouts(int n) { iocpnet_tls_fanouts = n; }

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
    """
    void *iocpnet_get_tls_core() nogil
    int _held_batches "iocpnet_held_batches"() nogil
    void _held_batch "iocpnet_held_batch"(int held) nogil
    int _fanouts "iocpnet_fanouts"() nogil
    void _set_fanouts "iocpnet_set_fanouts"(int n) nogil
    void iocpnet_set_tls_core(void *c) nogil
    void iocpnet_let_batch_in(volatile int32_t *waiting) nogil

cdef extern from *:
    """
    /* f(a, b) through f's own vectorcall entry, as Cython calls: without the generic
     * PyObject_Vectorcall's result check (~35 instructions).  A new reference, or
     * NULL with the exception set. */
    static inline PyObject *iocpnet_call2(PyObject *f, PyObject *a, PyObject *b) {
        PyObject *args[2];
        vectorcallfunc vc = PyVectorcall_Function(f);
        args[0] = a;
        args[1] = b;
        return vc != NULL ? vc(f, args, 2, NULL) : PyObject_Vectorcall(f, args, 2, NULL);
    }
    /* f(a, b, c), the same way. */
    static inline PyObject *iocpnet_call3(PyObject *f, PyObject *a, PyObject *b, PyObject *c) {
        PyObject *args[3];
        vectorcallfunc vc = PyVectorcall_Function(f);
        args[0] = a;
        args[1] = b;
        args[2] = c;
        return vc != NULL ? vc(f, args, 3, NULL) : PyObject_Vectorcall(f, args, 3, NULL);
    }
    """
    PyObject *_call2 "iocpnet_call2"(PyObject *f, PyObject *a, PyObject *b)
    PyObject *_call3 "iocpnet_call3"(PyObject *f, PyObject *a, PyObject *b, PyObject *c)
    PyObject *_long_from_u "PyLong_FromUnsignedLong"(unsigned long v)

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
    HELD_BATCHES_MAX = 8  # batches in a row taken without giving up the GIL
    IOV_INLINE = 2        # gather entries kept inside the session
    IOV_MAX = 64          # most buffers in one gather send
    SQ_INLINE = 2         # send-queue slots kept inside the session
    PEER_MAX = 28         # a peer address kept packed in the session: sockaddr_in6's size

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
DEFAULT_POST_QUEUE_LIMIT = 10000      # jobs Post()ed on one owner's strand, not yet run
DEFAULT_CORE_POST_QUEUE_LIMIT = 100000  # jobs IocpCore.Post()ed, not yet run
DEFAULT_RECV_BUFFER_LIMIT = 256 * 1024
DEFAULT_FLUSH_TIMEOUT = 5.0
DEFAULT_SEND_TIMEOUT = 10.0
DEFAULT_SEND_QUEUE_HIGH = 64 * 1024     # OnSendQueue(True) (asyncio's high-water mark)

# Debug counters (uvloop's habit): tests check that they balance.
cdef volatile int64_t _sessions_alive = 0
cdef volatile int64_t _sessions_connected = 0
cdef volatile int64_t _views_detached = 0
cdef volatile int64_t _cores_alive = 0


class BackendUnavailableError(RuntimeError):
    """The requested completion-port backend cannot run on this machine."""


cdef object port_error(int code, what=None):
    """One mapper from port codes to the right OSError subclass.  A closed port is not
    an OS error but the state the caller put the core in: RuntimeError, as every other
    call that starts work on a closed core raises (CallLater, Spawn, ...)."""
    name = port_errname(code).decode("ascii")
    msg = port_strerror(code).decode("ascii")
    if code == PORT_ECLOSED:
        msg = "the IocpCore is closed"
    if what:
        msg = f"{what}: {msg}"
    if code == PORT_ECLOSED:
        return RuntimeError(msg)
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
        "groups_alive": _groups_alive,
        "strand_jobs": _strand_jobs,
        "strand_timers": _strand_timers,
        "tasks": _tasks,
    }


def default_workers():
    """The worker threads ``Run()`` starts when not told: 1 with a GIL, where more
    threads only take turns at the GIL and hand the port back and forth (measured slower
    per message); on free-threaded Python one per core, at most 8, since hooks then run
    in parallel."""
    gil = getattr(_sys, "_is_gil_enabled", None)
    if gil is None or gil():
        return 1
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return max(1, min(8, cores))


_logged_backends = set()


include "core/limits.pxi"
include "core/stats.pxi"
include "core/port.pxi"
include "core/timers.pxi"
include "core/recv_view.pxi"
include "core/session.pxi"
include "core/session_recv.pxi"
include "core/session_send.pxi"
include "core/session_close.pxi"
include "core/tls.pxi"
include "core/strand.pxi"
include "core/group.pxi"
include "core/packets.pxi"
include "core/websocket.pxi"
include "core/websocket_http.pxi"
include "core/listener.pxi"
include "core/service.pxi"
include "core/stall.pxi"

# The control plane (Run, RunHandle, signals, Reconnect) is plain Python: run.py.  It
# imports nothing of this module at its top, so it can be imported here.
from iocpnet.run import Reconnect, RunHandle, run_service as _run_service
