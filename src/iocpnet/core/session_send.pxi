# core/session_send.pxi: a session's send path (Send, the send queue, gather sends).
# Included by _core.pyx (one extension module, one file per concern).
#
# What it owns.  What Send accepts (bytes-like data, the one TypeError otherwise), the
# send queue (a ring of ``bytes`` objects, the first _sq_offset bytes of the head already
# sent), the gather list pointed at it, the one send operation in flight (_send_op), its
# completion (_process_send: OnSend, the next send), and the two marks above the
# queue: backpressure (past a quarter of send_queue_limit the session stops receiving
# until the queue drains to a sixteenth) and OnSendQueue (send_queue_high / _low).
# When nothing is queued and nobody waits for OnSend, Send writes straight to the
# socket (one system call, as a reactor does) and queues only what it did not take.
# The WebSocket layer frames above _send_bytes, the TLS filter encrypts inside it.
#
# Locks.  Send runs on any thread: the queue, _send_busy, _sq_above, the byte counts
# and the submission are under the session's ``_lock`` (a spin lock: nothing under it
# runs Python code; a ``bytes`` object's release does not).  OnSend and OnSendQueue run
# on the session's strand, outside the lock; _sq_told is the strand's alone.


cdef bytes _copy_to_bytes(object data):
    """A bytes copy of any contiguous buffer (OnRecv's RecvView, a bytearray, a
    memoryview), made straight from the buffer: no call through the bytes type."""
    cdef Py_buffer buf
    if type(data) is RecvView:
        return (<RecvView>data)._to_bytes()      # its pointer, read directly
    try:
        PyObject_GetBuffer(data, &buf, PyBUF_SIMPLE)
    except BufferError:
        return bytes(data)          # not contiguous: let bytes() gather it
    try:
        return PyBytes_FromStringAndSize(<char *>buf.buf, buf.len)
    finally:
        PyBuffer_Release(&buf)


cdef object _not_bytes(str where, str arg, object data):
    """The one TypeError for data that is not bytes-like, whoever was given it (Send,
    Broadcast, SendPacket, make_packet): what was given, what is wanted."""
    msg = (f"{where}: {arg} must be a bytes-like object (bytes, bytearray, memoryview), "
           f"not {type(data).__name__}")
    if isinstance(data, str):
        msg += "; encode the text first, e.g. text.encode()"
    return TypeError(msg)


cdef bytes _bytes_arg(object data, str where, str arg):
    """`data` as bytes: bytes as they are (queued by reference), other buffers copied,
    anything else _not_bytes."""
    if type(data) is bytes:
        return <bytes>data
    if not PyObject_CheckBuffer(data):
        raise _not_bytes(where, arg, data)
    return _copy_to_bytes(data)


cdef extern from *:
    """
    #ifdef Py_GIL_DISABLED
    #  define IOCPNET_GIL_BUILD 0
    #else
    #  define IOCPNET_GIL_BUILD 1
    #endif
    """
    const bint _GIL_BUILD "IOCPNET_GIL_BUILD"


cdef enum:
    SEND_NOT_TRIED = -0x40000000    # _send_rest_locked's r: below every PORT_E* code


cdef inline object _send_data(Session s, object data):
    """What Send does (Group.Broadcast calls it directly when the class does not
    override Send): a WebSocket session's data becomes one binary message."""
    cdef const char *ptr
    cdef Py_ssize_t n
    if s._ws is not None or s._tls is not None:
        return _send_other(s, data)
    # The common reply first, inlined into Send: bytes, or OnRecv's view echoed.  With
    # a GIL the view needs no pin: nothing can release or repoint it while _send_ptr
    # reads its bytes (no Python code runs there).
    if type(data) is bytes:
        ptr = PyBytes_AS_STRING(data)
        n = PyBytes_GET_SIZE(data)
    elif _GIL_BUILD and type(data) is RecvView and \
            (<RecvView>data)._state != RV_RELEASED:
        ptr = (<RecvView>data)._ptr
        n = (<RecvView>data)._len
    else:
        return _send_other(s, data)
    return _send_ptr(s, ptr, n, data) != 0


cdef object _send_other(Session s, object data):
    """_send_data past its common case: any buffer, WebSocket, TLS, a released view."""
    # PyObject_CheckBuffer is a call into libpython: after the two types above.
    if type(data) is not bytes and type(data) is not RecvView and \
            not PyObject_CheckBuffer(data):
        raise _not_bytes("Send", "data", data)
    if s._ws is not None:
        # One binary message (websocket.pxi), sent as below (through TLS if any).
        return _ws_send_binary(s, data if type(data) is bytes else _copy_to_bytes(data))
    return _send_bytes(s, data)


cdef object _send_bytes(Session s, object data):
    """Send's body, below the WebSocket layer (which sends its own frames and the
    HTTP upgrade through here too)."""
    cdef Py_buffer buf
    cdef const char *ptr
    cdef Py_ssize_t n
    cdef bytes b
    if s._tls is not None:
        return (<_Tls>s._tls).send(s, data)
    if type(data) is bytes:
        return _send_ptr(s, PyBytes_AS_STRING(data), PyBytes_GET_SIZE(data), data) != 0
    if type(data) is RecvView:
        # OnRecv's view: its pointer, read directly, pinned meanwhile (another thread
        # may hold it on a free-threaded build).
        (<RecvView>data)._pin(&ptr, &n)
        try:
            return _send_ptr(s, ptr, n, data) != 0
        finally:
            (<RecvView>data)._unpin()
    try:
        PyObject_GetBuffer(data, &buf, PyBUF_SIMPLE)
    except BufferError:
        b = _copy_to_bytes(data)      # not contiguous: gather it first
        return _send_ptr(s, PyBytes_AS_STRING(b), PyBytes_GET_SIZE(b), b) != 0
    try:
        return _send_ptr(s, <const char *>buf.buf, buf.len, data) != 0
    finally:
        PyBuffer_Release(&buf)


cdef inline int _send_ptr(Session s, const char *ptr, Py_ssize_t n,
                          object data) except -1:
    """Send ptr[:n], data's bytes (held by the caller until this returns): 1 sent or
    queued, 0 refused (not connected, or the session ended here).  ptr is read only
    under _lock, where no Python code runs."""
    cdef int64_t r
    cdef port_buf_t one
    if n == 0:
        return s._state == S_CONNECTED
    port_spin_lock(&s._lock)
    if s._state == S_CONNECTED and not s._send_busy and s._sq_count == 0 and \
            s._hooks.on_send is None:
        # Nothing ahead of these bytes: hand them to the socket now.  No completion
        # follows (nobody waits for OnSend), so a reply costs one system call and
        # leaves before any other hook runs.  Under the lock: the socket cannot be
        # closed meanwhile.
        one.base = ptr
        one.len = <size_t>n
        r = port_send_now(s.core.port, s._sock, &one, 1)
        if r == n:
            _cnt_add(&s._cnt.bytes_out, n)        # stats.pxi
            _cnt_add(&s._cnt.msgs_out, 1)
            port_spin_unlock(&s._lock)
            return 1
        return _send_rest_locked(s, ptr, n, data, r)
    return _send_rest_locked(s, ptr, n, data, SEND_NOT_TRIED)


cdef int _send_rest_locked(Session s, const char *ptr, Py_ssize_t n, object data,
                           int64_t r) except -1:
    """_send_ptr past a whole send (under _lock, which it releases): r is what the
    socket said (bytes taken, or a PORT_E* error), or SEND_NOT_TRIED.  What is left is
    queued: bytes by reference, anything else copied."""
    cdef Py_ssize_t sent = 0
    cdef bytes b
    if r == SEND_NOT_TRIED:
        if s._state != S_CONNECTED:
            port_spin_unlock(&s._lock)
            return 0
    elif r < 0:
        port_spin_unlock(&s._lock)
        _close_now(s, _io_reason(s, <int>r), False)
        _maybe_finish(s)
        return 0
    else:
        sent = <Py_ssize_t>r
        _cnt_add(&s._cnt.bytes_out, sent)
    if type(data) is bytes:
        b = <bytes>data
    else:
        # A copy of what is left (a bytes allocation runs no Python code, but it can
        # fail: the lock goes first).
        try:
            b = PyBytes_FromStringAndSize(ptr + sent, n - sent)
        except BaseException:
            port_spin_unlock(&s._lock)
            _send_lost(s, n, sent)
            raise
        sent = 0
    return _queue_locked(s, b, sent, True)


cdef void _send_lost(Session s, Py_ssize_t n, Py_ssize_t sent) noexcept:
    """A Send of n bytes could not queue what the socket did not take (no memory; the
    caller gets the error).  Nothing of it went: the stream is whole and the session
    goes on.  Part of it went: the peer would take what follows for the rest of that
    message, so the session ends (at once: queued data is of no use now)."""
    if sent == 0:
        return
    why = (f"out of memory queueing a Send of {n} bytes after {sent} of them were sent "
           f"(the stream is broken)")
    if _close_now(s, why, True):
        logger.warning("disconnecting %s: %s", repr(s), why)


cdef bint _queue_send(Session s, bytes b, bint check_limit,
                      Py_ssize_t *now=NULL) except? False:
    """Queue `b` and start a send if none is in flight.  With `now`, first hand it
    to the socket, as Send does, when nothing is queued and nobody waits for OnSend
    (*now: the bytes it took).  The TLS filter sends its records this way, with
    check_limit False (it checks the limit itself, under its mutex)."""
    cdef Py_ssize_t n = PyBytes_GET_SIZE(b), sent = 0
    cdef int64_t r
    cdef port_buf_t one
    if n == 0:
        return s._state == S_CONNECTED
    port_spin_lock(&s._lock)
    if s._state != S_CONNECTED:
        port_spin_unlock(&s._lock)
        return False
    if now != NULL and not s._send_busy and s._sq_count == 0 and \
            s._hooks.on_send is None:
        one.base = PyBytes_AS_STRING(b)
        one.len = <size_t>n
        r = port_send_now(s.core.port, s._sock, &one, 1)
        if r < 0:
            port_spin_unlock(&s._lock)
            _close_now(s, _io_reason(s, <int>r), False)
            _maybe_finish(s)
            return False
        sent = <Py_ssize_t>r
        now[0] = sent
        _cnt_add(&s._cnt.bytes_out, sent)         # stats.pxi
        if sent == n:
            port_spin_unlock(&s._lock)
            return True
    return _queue_locked(s, b, sent, check_limit)


cdef void _cut_over_limit(Session s, Py_ssize_t queued, Py_ssize_t size,
                          Py_ssize_t left) noexcept:
    """End a session whose send queue went past send_queue_limit, logged: per burst (a
    peer that connects and never reads can make us do this on connection after
    connection)."""
    why = _over_limit_reason(queued, s._hooks.send_queue_limit, size, left)
    if _close_now(s, why, True):
        _log_in_burst(s, LOG_SEND_LIMIT, _logging_WARNING, f"disconnecting {repr(s)}: {why}")


cdef str _over_limit_reason(Py_ssize_t queued, Py_ssize_t limit, Py_ssize_t size,
                            Py_ssize_t left):
    """Why the send queue limit cut a session.  A Send whose own bytes still to queue
    (`left` of its `size`) exceed the whole limit is the sender's doing: the peer,
    however fast it reads, is not to blame."""
    why = f"send queue limit exceeded: {queued} bytes queued, send_queue_limit is {limit}"
    if left > limit:
        return (f"{why} (one Send of {size} bytes, larger than the limit: send it in "
                f"pieces, or raise send_queue_limit)")
    return f"{why} (the peer is not reading)"


cdef bint _queue_locked(Session s, bytes b, Py_ssize_t offset,
                        bint check_limit) except? False:
    """Queue b[offset:] (called under _lock, which it releases; the socket already
    took b[:offset], and nothing is queued then) and start a send if none is in
    flight."""
    cdef Py_ssize_t n = PyBytes_GET_SIZE(b) - offset
    cdef Py_ssize_t limit = s._hooks.send_queue_limit
    cdef Py_ssize_t queued = s._sq_bytes + n
    cdef int rc
    cdef bint tell = False
    if check_limit and queued > limit:
        port_spin_unlock(&s._lock)
        _cut_over_limit(s, queued, PyBytes_GET_SIZE(b), n)
        return False
    if s._sq_count == s._sq_cap and _sq_grow(s) < 0:
        port_spin_unlock(&s._lock)
        raise MemoryError("growing the send queue")
    s._sq[(s._sq_head + s._sq_count) % s._sq_cap] = <PyObject *>b
    _incref(<PyObject *>b)
    if s._sq_count == 0:
        s._sq_offset = offset
    s._sq_count += 1
    s._sq_bytes = queued
    if check_limit:                  # a Send (a TLS session's are counted in tls.pxi)
        _cnt_add(&s._cnt.msgs_out, 1)
    if not s._send_busy:
        s._send_busy = True
        s._send_progress_ms = port_monotonic_ms()
        s._ops += 1
        _build_iov(s)
        rc = _submit_send_locked(s)
    else:
        rc = 0
    if queued >= s._hooks.send_queue_high and not s._sq_above and \
            s._hooks.on_send_queue is not None:
        s._sq_above = True
        tell = True
    if queued >= (limit >> 2) and not s._recv_paused:
        # Backpressure: the peer reads slower than it makes us write (an echo, a
        # request flood).  Stop reading from it until the queue drains, so that its
        # own sends block in TCP instead of our queue reaching the limit.  A one-shot
        # receive is simply not posted again; one kept armed must be cancelled.
        s._recv_paused = True
        if s._recv_armed and s.core._recv_multishot:
            port_cancel(s.core.port, &s._recv_op)
    port_spin_unlock(&s._lock)
    if rc != 0:
        _close_now(s, f"cannot send: {port_reason(rc)}", False)
        _maybe_finish(s)
        return False
    if tell:
        # Send may run on any thread: the hook runs on the strand (a job).
        _post_to(s, JOB_SEND_QUEUE, None, None)
    return True


cdef void _process_send(Session s, port_cqe_t *cqe) noexcept:
    cdef int64_t res = cqe.res
    cdef Py_ssize_t sent = 0, avail
    cdef PyObject *o
    cdef bint busy
    cdef int rc
    port_spin_lock(&s._lock)
    if res > 0:
        sent = <Py_ssize_t>res
        s._send_progress_ms = s.core._now_ms
        s._sq_bytes -= sent
        _cnt_add(&s._cnt.bytes_out, sent)
        while res > 0 and s._sq_count > 0:
            o = s._sq[s._sq_head]
            avail = PyBytes_GET_SIZE(<object>o) - s._sq_offset
            if res >= avail:
                res -= avail
                s._sq[s._sq_head] = NULL
                s._sq_head = (s._sq_head + 1) % s._sq_cap
                s._sq_count -= 1
                s._sq_offset = 0
                _decref(o)           # a bytes object: its release runs no Python code
            else:
                s._sq_offset += res
                res = 0
    rc = 0
    if cqe.res >= 0 and s._sq_count > 0 and \
            (s._state == S_CONNECTED or s._state == S_FLUSHING):
        _build_iov(s)
        rc = _submit_send_locked(s)
    else:
        s._send_busy = False
        s._ops -= 1
        if s._sq_count == 0:
            s._sq_head = 0
            if s._sq != s._sq_inline:
                free(s._sq)
                s._sq = s._sq_inline
                s._sq_cap = SQ_INLINE
            if s._iov != s._iov_inline:
                free(s._iov)
                s._iov = s._iov_inline
    busy = s._send_busy
    if s._sq_above and s._sq_bytes <= s._hooks.send_queue_low:
        s._sq_above = False
    if s._recv_paused and s._sq_bytes <= (s._hooks.send_queue_limit >> 4):
        s._recv_paused = False
        if rc == 0:
            rc = _arm_recv_locked(s)
    port_spin_unlock(&s._lock)
    if rc != 0:
        _close_now(s, f"cannot send or receive: {port_reason(rc)}", False)
    if sent > 0 and s._tls is not None:
        sent = (<_Tls>s._tls).acked(sent)      # OnSend counts plaintext
    if sent > 0 and s._hooks.on_send is not None:
        _enter_hook(s, H_SEND)
        try:
            s._hooks.on_send(s, sent)
        except BaseException as e:
            _hook_failed(s, "OnSend", e)
        _leave_hook(s)
    if s._sq_told != s._sq_above and s._state == S_CONNECTED:
        _tell_send_queue(s)
    if cqe.res < 0:
        if cqe.res != PORT_ECANCELED:
            _close_now(s, _io_reason(s, <int>cqe.res), False)
    elif not busy and s._state == S_FLUSHING:
        _close_if_flushed(s)
    _maybe_finish(s)


cdef int _sq_grow(Session s) noexcept:
    """Double the send-queue ring (under _lock)."""
    cdef Py_ssize_t cap = s._sq_cap * 2, i
    cdef PyObject **ring = <PyObject **>malloc(cap * sizeof(PyObject *))
    if ring == NULL:
        return -1
    for i in range(s._sq_count):
        ring[i] = s._sq[(s._sq_head + i) % s._sq_cap]
    if s._sq != s._sq_inline:
        free(s._sq)
    s._sq = ring
    s._sq_cap = cap
    s._sq_head = 0
    return 0


cdef void _build_iov(Session s) noexcept:
    """Point the gather list at the queued bytes (under _lock, no send in flight)."""
    cdef Py_ssize_t k, cnt = s._sq_count
    cdef PyObject *o
    if cnt > IOV_MAX:
        cnt = IOV_MAX
    if cnt > IOV_INLINE and s._iov == s._iov_inline:
        s._iov = <port_buf_t *>malloc(IOV_MAX * sizeof(port_buf_t))
        if s._iov == NULL:
            s._iov = s._iov_inline
    if s._iov == s._iov_inline and cnt > IOV_INLINE:
        cnt = IOV_INLINE
    for k in range(cnt):
        o = s._sq[(s._sq_head + k) % s._sq_cap]
        s._iov[k].base = PyBytes_AS_STRING(<object>o)
        s._iov[k].len = PyBytes_GET_SIZE(<object>o)
    s._iov[0].base += s._sq_offset
    s._iov[0].len -= s._sq_offset
    s._iov_n = <int>cnt


cdef extern from *:
    """
    #include "port/port_sync.h"
    /* This thread submitted a port_send since its dispatch loop last asked: only then
     * may the backend hold a send for port_flush_sends (one test per completion, not
     * a call through the port). */
    static PORT_THREAD_LOCAL int iocpnet_tls_sent = 0;
    static inline void iocpnet_mark_sent(void) { iocpnet_tls_sent = 1; }
    static inline int iocpnet_take_sent(void) {
        if (!iocpnet_tls_sent)
            return 0;
        iocpnet_tls_sent = 0;
        return 1;
    }
    """
    void _mark_sent "iocpnet_mark_sent"() nogil
    bint _take_sent "iocpnet_take_sent"() nogil


cdef int _submit_send_locked(Session s) noexcept:
    """Submit the gather list (under _lock, with _send_busy set and counted).  On
    failure the send is undone and the error returned for the caller to close."""
    cdef int rc
    _incref(<PyObject *>s)
    rc = port_send(s.core.port, &s._send_op, s._sock, s._iov, s._iov_n)
    if rc != 0:
        _decref(<PyObject *>s)
        s._send_busy = False
        s._ops -= 1
    else:
        _mark_sent()
    return rc


cdef inline bint _send_queue_above_high(Session s) noexcept:
    """Is the queue above send_queue_high?  (What OnSendQueue(True) reports, but
    kept for every session: a droppable broadcast asks it.)"""
    return s._sq_bytes >= s._hooks.send_queue_high


cdef void _tell_send_queue(Session s) noexcept:
    """On the strand: tell OnSendQueue where the queue is, if that changed since it
    was last told (crossings in between fold into one call, never two alike in a
    row)."""
    cdef bint above
    if s._hooks.on_send_queue is None:
        return
    port_spin_lock(&s._lock)
    above = s._sq_above
    port_spin_unlock(&s._lock)
    if above == s._sq_told:
        return
    s._sq_told = above
    try:
        s._hooks.on_send_queue(s, above)
    except BaseException as e:
        _hook_failed(s, "OnSendQueue", e)
