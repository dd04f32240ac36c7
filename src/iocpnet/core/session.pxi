# core/session.pxi: hooks resolved once per class, and the Session.
# Included by _core.pyx (one extension module, one file per concern).


@cython.final
cdef class _Hooks:
    cdef object on_connected
    cdef object on_recv
    cdef object on_send
    cdef object on_disconnected
    cdef object on_connect_failed
    cdef object on_recv_packet
    cdef object on_send_queue     # game layer (strand.pxi): soft backpressure
    cdef object on_task_done      # game layer: Spawn's outcome
    cdef bint send_overridden     # Group.Broadcast calls a subclass's Send
    cdef Py_ssize_t send_queue_high
    cdef Py_ssize_t send_queue_low
    cdef bint packet_mode         # a PacketSession whose OnRecv is not overridden
    cdef Py_ssize_t max_packet_size
    cdef Py_ssize_t send_queue_limit
    cdef Py_ssize_t recv_buffer_limit
    cdef double flush_timeout
    cdef double idle_timeout
    cdef double tls_handshake_timeout
    cdef _RecvLimits lim          # flood protection (limits.pxi)
    cdef double send_timeout


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
    h.on_send_queue = _overridden(cls, "OnSendQueue", Session)
    h.on_task_done = _overridden(cls, "OnTaskDone", Session)
    h.send_overridden = _overridden(cls, "Send", Session) is not None
    h.packet_mode = issubclass(cls, PacketSession) and h.on_recv is None
    h.max_packet_size = _class_int(cls, "max_packet_size", PKT_MAX)
    h.send_queue_limit = _class_int(cls, "send_queue_limit", DEFAULT_SEND_QUEUE_LIMIT)
    h.recv_buffer_limit = _class_int(cls, "recv_buffer_limit", DEFAULT_RECV_BUFFER_LIMIT)
    h.flush_timeout = _class_int(cls, "flush_timeout", DEFAULT_FLUSH_TIMEOUT)
    h.idle_timeout = _class_int(cls, "idle_timeout", 0)
    h.tls_handshake_timeout = _class_int(cls, "tls_handshake_timeout",
                                         DEFAULT_TLS_HANDSHAKE_TIMEOUT)
    h.send_timeout = _class_int(cls, "send_timeout", DEFAULT_SEND_TIMEOUT)
    if h.send_queue_limit <= 0 or h.recv_buffer_limit <= 0:
        raise ValueError(f"{cls.__name__}: send_queue_limit and recv_buffer_limit must be "
                         f"positive")
    if not PKT_HEADER <= h.max_packet_size <= PKT_MAX:
        raise ValueError(f"{cls.__name__}: max_packet_size must be between "
                         f"{PKT_HEADER} and {PKT_MAX}")
    if h.idle_timeout < 0 or h.tls_handshake_timeout < 0 or h.send_timeout < 0:
        raise ValueError(f"{cls.__name__}: idle_timeout, tls_handshake_timeout and "
                         f"send_timeout must be >= 0 (0: none)")
    h.lim = _recv_limits_for(cls, h.packet_mode)
    _hooks_measure(cls, h)
    h.send_queue_high = _class_int(cls, "send_queue_high",
                                   min(DEFAULT_SEND_QUEUE_HIGH, h.send_queue_limit // 4))
    h.send_queue_low = _class_int(cls, "send_queue_low", h.send_queue_high // 4)
    if not 0 <= h.send_queue_low < h.send_queue_high <= h.send_queue_limit:
        raise ValueError(f"{cls.__name__}: need 0 <= send_queue_low < send_queue_high <= "
                         f"send_queue_limit")
    _hooks_cache[cls] = h
    return h


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


# The hook a session is in, for Stop's warning about sessions that hold it up.
cdef enum:
    H_NONE = 0
    H_CONNECTED = 1
    H_RECV = 2            # OnRecv, OnRecvPacket or OnMessage (whatever _deliver calls)
    H_SEND = 3


cdef inline void _enter_hook(Session s, int32_t hook) noexcept:
    s._hook_since_ms = s.core._now_ms
    port_atomic_store32(&s._hook, hook)


cdef inline void _leave_hook(Session s) noexcept:
    port_atomic_store32(&s._hook, H_NONE)


cdef str _hook_name(Session s, int32_t hook):
    if hook == H_CONNECTED:
        return "OnConnected"
    if hook == H_SEND:
        return "OnSend"
    if s._ws is not None:
        return "OnMessage"
    return "OnRecvPacket" if s._hooks.packet_mode else "OnRecv"


cdef str _describe_exc(BaseException e):
    return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__


# ---------------------------------------------------------------------------------------
# Session

cdef class Session(IocpObject):
    """One connection.  Subclass it and override the hooks:

    - ``OnConnected()``: once, after accept or connect.
    - ``OnRecv(data) -> int | None``: ``data`` is a read-only ``RecvView`` of the bytes
      received and not yet consumed (it exports them like a memoryview, and stays valid
      if kept); return how many you consumed (None: all).  The rest is shown again,
      with the next bytes, on the next call.
    - ``OnSend(num_bytes)``: after each completed send.
    - ``OnDisconnected(reason)``: exactly once, whatever ended the session.

    ``Send(data)`` and ``Disconnect(reason)`` may be called from any thread.  Limits are
    class attributes: ``send_queue_limit`` (bytes queued and not yet sent before the
    peer is judged not to be reading), ``recv_buffer_limit`` (bytes OnRecv may leave
    unconsumed), ``flush_timeout`` (seconds to flush queued data when closing),
    ``send_timeout`` (seconds a send queue may go without any progress before the peer
    is judged not to be reading; 0: never).
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
    cdef int64_t _send_progress_ms    # the send queue last moved (see core/stall.pxi)
    cdef uint64_t _send_mark          # the kernel's progress mark + 1 (0: not looked)
    cdef volatile int32_t _hook       # H_* of the hook running now (service.pxi's Stop)
    cdef int64_t _hook_since_ms
    cdef volatile int32_t _stop_requested  # the service is stopping: no new OnRecv
    # RecvBuffer: unconsumed bytes are _rbuf[_rpos:_rlen]
    cdef char *_rbuf
    cdef Py_ssize_t _rcap
    cdef Py_ssize_t _rpos
    cdef Py_ssize_t _rlen
    cdef RecvView _kept_view      # the view OnRecv kept, until the caller settles it
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
    cdef object _tls              # a _Tls stream filter (core/tls.pxi), or None
    cdef _RateState *_rate        # flood protection (limits.pxi); NULL until used
    cdef object _addr_key         # the host the per-address accept limits counted
    cdef _Counters _cnt           # bytes and messages in and out (stats.pxi)
    cdef object _ws               # a _WebSocket when it speaks WebSocket (websocket.pxi)
    # Game layer (strand.pxi, group.pxi): jobs, timers, tasks and groups; None until used.
    cdef _Owned _x
    cdef bint _sq_above           # OnSendQueue: the queue passed the high mark (under _lock)
    cdef bint _sq_told            # OnSendQueue: what the hook was last told (strand only)
    cdef object __weakref__

    def __cinit__(self, *args, **kwargs):
        # Counted first: __dealloc__ runs (and uncounts) even when a bad class
        # attribute makes _hooks_for raise below.
        port_atomic_add64(&_sessions_alive, 1)
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
        _rate_free(self)
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

    def OnSendQueue(self, high):
        """The send queue passed ``send_queue_high`` (True) or fell back to
        ``send_queue_low`` (False): asyncio's pause_writing / resume_writing.  Runs on
        the session's strand, shortly after the Send that crossed the mark."""

    def OnTaskDone(self, task):
        """A task from ``Spawn`` without a callback has finished (on the strand)."""

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
        return self._state == S_CONNECTED and (self._tls is None or
                                               (<_Tls>self._tls).state == T_OPEN) and \
            (self._ws is None or _ws_upgraded(self))

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

    # TLS (core/tls.pxi): None without TLS, and until the handshake is done.
    @property
    def tls_version(self):
        """The TLS version negotiated ("TLSv1.2", "TLSv1.3")."""
        return None if self._tls is None else (<_Tls>self._tls).version

    @property
    def tls_alpn(self):
        """The ALPN protocol agreed on, or None if none was."""
        return None if self._tls is None else (<_Tls>self._tls).alpn

    @property
    def tls_cipher(self):
        """(name, protocol, secret bits) of the cipher in use."""
        return None if self._tls is None else (<_Tls>self._tls).cipher

    @property
    def tls_peer_certificate(self):
        """The peer's certificate as ``ssl.SSLSocket.getpeercert()`` gives it (a dict,
        when the context verified it), or None."""
        return None if self._tls is None else (<_Tls>self._tls).peercert

    @property
    def tls_peer_certificate_der(self):
        """The peer's certificate in DER (bytes), verified or not, or None."""
        return None if self._tls is None else (<_Tls>self._tls).peercert_der

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
    def send_timeout(self):
        return self._hooks.send_timeout

    @property
    def send_queue_bytes(self):
        """Bytes queued by Send and not yet acknowledged by a send completion (with TLS:
        plaintext bytes whose records are not all sent)."""
        return self._sq_bytes if self._tls is None else (<_Tls>self._tls).plain_pending

    def Send(self, data):
        """Queue ``data`` to be sent, in order, from any thread.

        When nothing is queued the bytes go to the socket at once, straight from
        ``data`` (one system call, as a reactor writes); what the socket does not take
        is queued: ``bytes`` by reference (a packet broadcast to many sessions is built
        once), other buffers copied.  Returns False if the session is not connected (or
        is closing).  Past ``send_queue_limit`` unsent bytes the peer is judged not to
        be reading: the session is disconnected and False returned.
        """
        return self._send(data)

    cdef object _send(self, object data):
        """What Send does (Group.Broadcast calls it directly when the class does not
        override Send): a WebSocket session's data becomes one binary message."""
        if type(data) is not bytes and not PyObject_CheckBuffer(data):
            raise _not_bytes("Send", "data", data)
        if self._ws is not None:
            # One binary message (websocket.pxi), sent as below (through TLS if any).
            data = _ws_wrap(self, data if type(data) is bytes else _copy_to_bytes(data))
            if data is None:
                return False
        return self._send_bytes(data)

    cdef object _send_bytes(self, object data):
        """Send's body, below the WebSocket layer (which sends its own frames and the
        HTTP upgrade through here too)."""
        cdef bytes b = None
        cdef Py_buffer buf
        cdef const char *ptr
        cdef Py_ssize_t n, sent = 0
        cdef int64_t r
        cdef port_buf_t one
        cdef bint have_buf = False, pinned = False
        if self._tls is not None:
            return (<_Tls>self._tls).send(self, data)
        if type(data) is bytes:
            b = <bytes>data
            ptr = PyBytes_AS_STRING(b)
            n = PyBytes_GET_SIZE(b)
        elif type(data) is RecvView:
            # OnRecv's view (the echo): its pointer, read directly, pinned meanwhile.
            (<RecvView>data)._pin(&ptr, &n)
            pinned = True
        else:
            try:
                PyObject_GetBuffer(data, &buf, PyBUF_SIMPLE)
            except BufferError:
                b = _copy_to_bytes(data)      # not contiguous: gather it first
                ptr = PyBytes_AS_STRING(b)
                n = PyBytes_GET_SIZE(b)
            else:
                have_buf = True
                ptr = <const char *>buf.buf
                n = buf.len
        try:
            if n == 0:
                return self._state == S_CONNECTED
            port_spin_lock(&self._lock)
            if self._state != S_CONNECTED:
                port_spin_unlock(&self._lock)
                return False
            if not self._send_busy and self._sq_count == 0 and self._hooks.on_send is None:
                # Nothing ahead of these bytes: hand them to the socket now.  No
                # completion follows (nobody waits for OnSend), so a reply costs one
                # system call and leaves before any other hook runs.  Under the lock:
                # the socket cannot be closed meanwhile.
                one.base = ptr
                one.len = <size_t>n
                r = port_send_now(self.core.port, self._sock, &one, 1)
                if r < 0:
                    port_spin_unlock(&self._lock)
                    self._close_now(port_reason(<int>r), False)
                    self._maybe_finish()
                    return False
                sent = <Py_ssize_t>r
                _cnt_add(&self._cnt.bytes_out, sent)     # stats.pxi
                if sent == n:
                    _cnt_add(&self._cnt.msgs_out, 1)
                    port_spin_unlock(&self._lock)
                    return True
            if b is None:
                # A copy of what is left (a bytes allocation runs no Python code).
                b = PyBytes_FromStringAndSize(ptr + sent, n - sent)
                sent = 0
            return self._queue_locked(b, sent, True)
        finally:
            if have_buf:
                PyBuffer_Release(&buf)
            if pinned:
                (<RecvView>data)._unpin()

    cdef bint _queue_send(self, bytes b, bint check_limit,
                          Py_ssize_t *now=NULL) except? False:
        """Queue `b` and start a send if none is in flight.  With `now`, first hand it
        to the socket, as Send does, when nothing is queued and nobody waits for OnSend
        (*now: the bytes it took).  The TLS filter sends its records this way, with
        check_limit False (it counts plaintext itself)."""
        cdef Py_ssize_t n = PyBytes_GET_SIZE(b), sent = 0
        cdef int64_t r
        cdef port_buf_t one
        if n == 0:
            return self._state == S_CONNECTED
        port_spin_lock(&self._lock)
        if self._state != S_CONNECTED:
            port_spin_unlock(&self._lock)
            return False
        if now != NULL and not self._send_busy and self._sq_count == 0 and \
                self._hooks.on_send is None:
            one.base = PyBytes_AS_STRING(b)
            one.len = <size_t>n
            r = port_send_now(self.core.port, self._sock, &one, 1)
            if r < 0:
                port_spin_unlock(&self._lock)
                self._close_now(port_reason(<int>r), False)
                self._maybe_finish()
                return False
            sent = <Py_ssize_t>r
            now[0] = sent
            _cnt_add(&self._cnt.bytes_out, sent)         # stats.pxi
            if sent == n:
                port_spin_unlock(&self._lock)
                return True
        return self._queue_locked(b, sent, check_limit)

    cdef bint _queue_locked(self, bytes b, Py_ssize_t offset,
                            bint check_limit) except? False:
        """Queue b[offset:] (called under _lock, which it releases; the socket already
        took b[:offset], and nothing is queued then) and start a send if none is in
        flight."""
        cdef Py_ssize_t n = PyBytes_GET_SIZE(b) - offset
        cdef Py_ssize_t limit = self._hooks.send_queue_limit
        cdef Py_ssize_t queued = self._sq_bytes + n
        cdef int rc
        cdef bint tell = False
        if check_limit and queued > limit:
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
        if self._sq_count == 0:
            self._sq_offset = offset
        self._sq_count += 1
        self._sq_bytes = queued
        if check_limit:                  # a Send (a TLS session's are counted in tls.pxi)
            _cnt_add(&self._cnt.msgs_out, 1)
        if not self._send_busy:
            self._send_busy = True
            self._send_progress_ms = port_monotonic_ms()
            self._ops += 1
            self._build_iov()
            rc = self._submit_send_locked()
        else:
            rc = 0
        if queued >= self._hooks.send_queue_high and not self._sq_above and \
                self._hooks.on_send_queue is not None:
            self._sq_above = True
            tell = True
        if queued >= (limit >> 2) and not self._recv_paused:
            # Backpressure: the peer reads slower than it makes us write (an echo, a
            # request flood).  Stop reading from it until the queue drains, so that its
            # own sends block in TCP instead of our queue reaching the limit.  A one-shot
            # receive is simply not posted again; one kept armed must be cancelled.
            self._recv_paused = True
            if self._recv_armed and self.core._recv_multishot:
                port_cancel(self.core.port, &self._recv_op)
        port_spin_unlock(&self._lock)
        if rc != 0:
            self._close_now(f"cannot send: {port_reason(rc)}", False)
            self._maybe_finish()
            return False
        if tell:
            # Send may run on any thread: the hook runs on the strand (a job).
            _post_to(self, JOB_SEND_QUEUE, None, None)
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
        if self._tls is not None:
            self._was_connected = False
            (<_Tls>self._tls).start(self)     # OnConnected once the handshake is done
        else:
            self._call_connected()
        self._arm_recv()

    cdef void _call_connected(self) noexcept:
        """The byte stream is up (after the TLS handshake, with TLS): OnConnected (with
        WebSocket: the upgrade first, OnConnected once it is done)."""
        if self._ws is not None:
            _ws_connected(self)
        elif self._hooks.on_connected is not None:
            _enter_hook(self, H_CONNECTED)
            try:
                self._hooks.on_connected(self)
            except BaseException as e:
                self._hook_failed("OnConnected", e)
            _leave_hook(self)

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
        # Flushing, we keep reading and drop what comes (backpressure or not): a socket
        # closed with unread input sends a reset, and the peer's kernel then throws
        # away the end of what we flushed to it.
        if not self._recv_armed and (self._state == S_FLUSHING or
                                     (self._state == S_CONNECTED and not self._recv_paused)):
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
            # Once the service is stopping no new OnRecv starts (what a running hook
            # sends still goes out: the disconnect waits for it on our strand).
            if self._state == S_CONNECTED and not self._stop_requested and \
                    _recv_counted(self, cqe.res):
                self._last_recv_ms = self.core._now_ms
                _enter_hook(self, H_RECV)
                self._deliver(cqe)
                _leave_hook(self)
            else:
                port_recv_release(self.core.port, cqe)
        if cqe.flags & PORT_CQE_MORE:
            return
        rc = 0
        port_spin_lock(&self._lock)
        self._recv_armed = False
        self._ops -= 1
        if (res > 0 or res == PORT_ECANCELED) and \
                (self._state == S_CONNECTED or self._state == S_FLUSHING):
            # Post the next receive (the original's RegisterRecv after ProcessRecv),
            # unless paused for backpressure: then the send path posts it once the queue
            # drains.  (ECANCELED here: a multishot receive paused, maybe resumed since.)
            rc = self._arm_recv_locked()
        port_spin_unlock(&self._lock)
        if res == 0:
            if self._tls is not None and (<_Tls>self._tls).eof(self):
                pass                    # the handshake was cut: the filter closed us
            elif self._rlen > self._rpos:
                self._begin_disconnect(
                    f"peer closed the connection ({self._rlen - self._rpos} bytes of an "
                    f"unfinished message left)", True)
            else:
                self._begin_disconnect("peer closed the connection", True)
        elif res < 0 and res != PORT_ECANCELED:
            self._close_now(port_reason(<int>res) if self._tls is None else
                            (<_Tls>self._tls).reason(port_reason(<int>res)), False)
        elif rc != 0:
            self._close_now(f"cannot receive: {port_reason(rc)}", False)
        self._maybe_finish()

    cdef void _deliver(self, port_cqe_t *cqe) noexcept:
        """Show received bytes to the hook; keep what it did not consume."""
        cdef Py_ssize_t n = cqe.res
        cdef Py_ssize_t used
        cdef RecvView view
        if self._tls is not None:
            (<_Tls>self._tls).feed(self, cqe)    # plaintext into the RecvBuffer, then shown
            return
        if self._rlen == self._rpos:
            # Nothing pending: show the port's buffer itself (no copy).
            used = self._call_recv(cqe.buf, n)
            if used >= 0 and used < n and self._state == S_CONNECTED:
                if self._rbuf_append(cqe.buf + used, n - used) < 0:
                    self._close_now("out of memory for the receive buffer", True)
            view = self._kept_view
            if view is not None:
                # The hook kept its view: the buffer goes back unless the view takes it.
                self._kept_view = None
                if view._settle_port(self.core, cqe):
                    cqe = NULL
            if cqe != NULL:
                port_recv_release(self.core.port, cqe)
            self._recv_kept()
            return
        if self._rbuf_append(cqe.buf, n) < 0:
            self._close_now("out of memory for the receive buffer", True)
            port_recv_release(self.core.port, cqe)
            return
        port_recv_release(self.core.port, cqe)
        self._deliver_buffered()

    cdef void _deliver_buffered(self) noexcept:
        """Show the RecvBuffer (new bytes were just appended to it) to the hook."""
        cdef Py_ssize_t used, n = self._rlen - self._rpos
        cdef char *ptr = self._rbuf + self._rpos
        cdef RecvView view
        used = self._call_recv(ptr, n)
        view = self._kept_view
        if view is not None:
            self._kept_view = None
            if not view._settle_copy():
                # Its bytes are pinned (an export of the view is alive): the view takes
                # the RecvBuffer, the unconsumed rest moves to a new one.
                self._hand_rbuf_over(view, ptr, n, used)
                used = 0
        if used >= 0:
            self._rpos += used
        self._recv_kept()

    cdef void _hand_rbuf_over(self, RecvView view, char *ptr, Py_ssize_t n,
                              Py_ssize_t used) noexcept:
        cdef char *old = self._rbuf
        self._rbuf = NULL
        self._rcap = self._rpos = self._rlen = 0
        if used >= 0 and used < n and self._rbuf_append(ptr + used, n - used) < 0:
            self._close_now("out of memory for the receive buffer", True)
        view._adopt(old)

    cdef void _recv_kept(self) noexcept:
        """After the hook: free an empty RecvBuffer, or check what it left in it."""
        cdef Py_ssize_t left = self._rlen - self._rpos
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
        if self._rbuf_reserve(n) < 0:
            return -1
        memcpy(self._rbuf + self._rlen, data, n)
        self._rlen += n
        return 0

    cdef int _rbuf_reserve(self, Py_ssize_t n) noexcept:
        """Make room for n more bytes at _rbuf + _rlen."""
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
        return 0

    cdef Py_ssize_t _call_recv(self, char *ptr, Py_ssize_t n) noexcept:
        """Call OnRecv with a RecvView of ptr[0:n]; returns the bytes consumed, or -1 after
        an error (the session is closing).  If the hook kept the view (anyone holds it
        after the call), it is left in _kept_view: the caller settles it once it has
        taken what it needs from ptr (recv_view.pxi)."""
        cdef RecvView view
        cdef Py_ssize_t used = n
        if self._ws is not None:
            return _ws_recv(self, <unsigned char *>ptr, n)
        if self._hooks.packet_mode:
            return self._parse_packets(<const unsigned char *>ptr, n)
        if self._hooks.on_recv is None:
            return n
        try:
            view = RecvView.__new__(RecvView)
        except BaseException as e:
            self._hook_failed("OnRecv", e)
            return -1
        view._ptr = ptr
        view._len = n
        view._state = RV_BORROWED
        try:
            r = self._hooks.on_recv(self, view)
            if r is not None:
                used = r
                if used < 0 or used > n:
                    raise ValueError(f"OnRecv returned {r}, but it was given {n} bytes")
        except BaseException as e:
            self._hook_failed("OnRecv", e)
            used = -1
        if Py_REFCNT(view) > 1:
            self._kept_view = view
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
            if not _message_counted(self, size):
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
            self._send_progress_ms = self.core._now_ms
            self._sq_bytes -= sent
            _cnt_add(&self._cnt.bytes_out, sent)
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
        if self._sq_above and self._sq_bytes <= self._hooks.send_queue_low:
            self._sq_above = False
        if self._recv_paused and self._sq_bytes <= (self._hooks.send_queue_limit >> 4):
            self._recv_paused = False
            if rc == 0:
                rc = self._arm_recv_locked()
        port_spin_unlock(&self._lock)
        if rc != 0:
            self._close_now(f"cannot send or receive: {port_reason(rc)}", False)
        if sent > 0 and self._tls is not None:
            sent = (<_Tls>self._tls).acked(sent)      # OnSend counts plaintext
        if sent > 0 and self._hooks.on_send is not None:
            _enter_hook(self, H_SEND)
            try:
                self._hooks.on_send(self, sent)
            except BaseException as e:
                self._hook_failed("OnSend", e)
            _leave_hook(self)
        if self._sq_told != self._sq_above and self._state == S_CONNECTED:
            self._tell_send_queue()
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
        if self._ws is not None and self._state == S_CONNECTED:
            _ws_goodbye(self, reason)    # a close frame first (websocket.pxi)
        if self._tls is not None and flush:
            (<_Tls>self._tls).close_notify(self)      # queued before the flush below
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
        self._arm_recv_locked()          # drain (and drop) the input while flushing
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
        if not reset and not connecting:
            # Unread input would turn our FIN into a reset, and the peer would lose
            # the end of what we sent it (a reply flushed at shutdown, say).
            port_sock_drain(self._sock)
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
        if self._ws is not None:
            _ws_finish(self)
        self.core._unwatch_flush(self)
        if self._counted_connected:
            self._counted_connected = False
            port_atomic_add64(&_sessions_connected, -1)
        if self._tls is not None:
            (<_Tls>self._tls).finished(self)          # OnConnectFailed after a bad handshake
        if self._x is not None:
            _session_ended(self)     # its timers and tasks cancelled, its groups left
        if self._hooks.on_disconnected is not None:
            try:
                self._hooks.on_disconnected(self, self._reason)
            except BaseException:
                logger.exception("OnDisconnected of %s raised", repr(self))
        # Only now does the service forget the session: Stop() (and Run()) wait for
        # session_count to reach 0, and a server saving a player's state in
        # OnDisconnected must not see the process exit while it writes.
        if self._service is not None:
            self._service._session_done(self)

    # ---- game layer: the session's strand (strand.pxi), its groups (group.pxi) ----

    def Post(self, func, *args):
        """Run ``func(*args)`` on this session's strand: never at the same time as its
        hooks, after what the strand already has (any thread may post).  Returns False
        if the session has ended; a job still queued when it ends is dropped."""
        return _post_to(self, JOB_CALL, func, args)

    def CallLater(self, double delay, func, *args):
        """Run ``func(*args)`` on the session's strand after ``delay`` seconds; returns a
        ``Timer``.  Cancelled when the session ends."""
        return _owner_timer(self, delay, 0.0, func, args)

    def CallEvery(self, double interval, func, *args):
        """Run ``func(*args)`` on the session's strand every ``interval`` seconds until
        the Timer is cancelled or the session ends."""
        if interval <= 0:
            raise ValueError("interval must be positive")
        return _owner_timer(self, interval, interval, func, args)

    def Spawn(self, awaitable, callback=None):
        """Run ``awaitable`` (a coroutine) on the core's asyncio loop thread, without
        holding a worker; its outcome comes back on this session's strand:
        ``callback(task)``, else the ``OnTaskDone(task)`` hook; with neither, an
        exception is handled like a hook's.  Cancelled when the session ends (nothing
        is delivered then).  Returns the ``Task``."""
        return _spawn(self.core, self, awaitable, callback)

    @property
    def groups(self):
        """A snapshot of the groups this session is in."""
        cdef _Owned x = self._x
        if x is None:
            return []
        with x.lock:
            return list(x.groups) if x.groups is not None else []

    @property
    def send_queue_high(self):
        return self._hooks.send_queue_high

    cdef inline bint _send_queue_above_high(self) noexcept:
        """Is the queue above send_queue_high?  (What OnSendQueue(True) reports, but
        kept for every session: a droppable broadcast asks it.)"""
        return self._sq_bytes >= self._hooks.send_queue_high

    @property
    def send_queue_low(self):
        return self._hooks.send_queue_low

    cdef void _tell_send_queue(self) noexcept:
        """On the strand: tell OnSendQueue where the queue is, if that changed since it
        was last told (crossings in between fold into one call, never two alike in a
        row)."""
        cdef bint above
        if self._hooks.on_send_queue is None:
            return
        port_spin_lock(&self._lock)
        above = self._sq_above
        port_spin_unlock(&self._lock)
        if above == self._sq_told:
            return
        self._sq_told = above
        try:
            self._hooks.on_send_queue(self, above)
        except BaseException as e:
            self._hook_failed("OnSendQueue", e)

    cdef void _hook_failed(self, str hook, BaseException e) noexcept:
        # Log the repr, not the session: a handler keeping the record must not keep it alive.
        logger.error("%s of %s raised; disconnecting it", hook, repr(self),
                     exc_info=(type(e), e, e.__traceback__))
        # The traceback's frames hold the hook's locals (OnRecv's memoryview among
        # them) for as long as a handler keeps the record; let them go now.
        _traceback.clear_frames(e.__traceback__)
        # Our bug, not the peer's: close with a FIN, without waiting to flush.
        self._close_now(f"exception in {hook}: {_describe_exc(e)}", False)
