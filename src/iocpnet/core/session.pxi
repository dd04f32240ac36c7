# core/session.pxi: the Session object, its hooks, and how a connection starts.
# Included by _core.pyx (one extension module, one file per concern).
#
# What it owns.  The Session class itself: every field (so the whole state of a
# connection reads in one place), the default hooks, the public API a user calls
# (Send, Disconnect, Abort, the properties, the game layer's Post/CallLater/Spawn),
# the hooks resolved once per class (_Hooks: no attribute lookup per completion), the
# connection's start (accepted by a Listener, or connected by a ClientService), and
# _dispatch, which routes each completion to the file that owns it:
#   session_recv.pxi    the receive operation: RecvBuffer, OnRecv, packets
#   session_send.pxi    the send operation: Send, the send queue, gather sends
#   session_close.pxi   the close operation: Disconnect, flushing, OnDisconnected
# Those files hold plain functions of a Session (direct C calls, no vtable).
#
# Locks.  Completions reach a session one at a time, in order, on its strand
# (port_strand_t), so the hooks and everything only they touch (the RecvBuffer, the
# kept view, what OnSendQueue was last told) need no lock.  What other threads touch
# (Send, Disconnect and the service's sweeps run anywhere) is under ``_lock``, a spin
# lock held only around plain C work and ``bytes`` releases, never around Python code:
# the state, the operations in flight (_ops), the armed/paused/busy flags, the send
# queue, the reason, and every submission and the close (so no operation can reach a
# socket number after it was closed and reused).


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
    cdef Py_ssize_t post_queue_limit  # jobs Post()ed and not yet run (strand.pxi)
    cdef double flush_timeout
    cdef double idle_timeout
    cdef double tls_handshake_timeout
    cdef _RecvLimits lim          # flood protection (limits.pxi)
    cdef double send_timeout
    cdef Py_ssize_t owner         # id() of the class they were resolved for


# Where a class's _Hooks live: on the class itself (attribute _iocpnet_hooks), so that
# a class made at run time, and its hooks, are freed together (a cache beside the
# classes would keep each forever: a method calling super() holds its class).  Our
# own extension types take no attributes: theirs are here (they are never freed).
cdef dict _hooks_static = {}


cdef void _keep_on_class(type cls, str attr, object value, dict static) except *:
    """Store a class's resolved settings on the class, or in `static` for our own
    extension types."""
    try:
        setattr(cls, attr, value)
    except (TypeError, AttributeError):
        static[cls] = value


cdef object _overridden(type cls, str name, type base):
    f = getattr(cls, name, None)
    if f is None or f is getattr(base, name, None):
        return None
    return f


cdef object _class_int(type cls, str name, default, bint none_is_zero=False):
    """A class attribute that is a number; the default where only our own classes
    define the name (as a property).  Anything else is a TypeError naming it: a string
    from a config file or a bool was silently the default.  none_is_zero: None is 0,
    for the settings where 0 means "none" (``ping_interval = None``, as in websockets)."""
    v = getattr(cls, name, default)
    if type(v) is not bool and not isinstance(v, (int, float, str, bytes)) and \
            v is not None:
        # another library's number (numpy's int64, Fraction, Decimal): its value
        if hasattr(type(v), "__index__"):
            v = _operator.index(v)
        elif isinstance(v, _numbers.Real) or (isinstance(v, _numbers.Number) and
                                               not isinstance(v, _numbers.Complex)):
            v = float(v)
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        if isinstance(v, float):
            # Timeouts become milliseconds through C casts, undefined for NaN and inf
            # (idle_timeout = inf cut every session at once): inf is 1e12, "never".
            if v != v:
                raise ValueError(f"{cls.__name__}.{name} is NaN")
            if v > 1e12:
                return 1e12
            if v < -1e12:
                return -1e12
        return v
    if v is None and none_is_zero:
        return 0
    for k in cls.__mro__:
        if name in k.__dict__:
            if (k.__module__ or "").startswith("iocpnet."):
                return default
            break
    raise TypeError(f"{cls.__name__}.{name} must be a number"
                    f"{' (None or 0: none)' if none_is_zero else ''}, not {v!r}")


cdef object _class_count(type cls, str name, default):
    """_class_int for a count (bytes, jobs, headers): a whole float (1e6) is taken as
    the int it is; 1.5 is a TypeError naming the attribute (a C conversion said only
    "'float' object cannot be interpreted as an integer", at each session made)."""
    v = _class_int(cls, name, default)
    if isinstance(v, float):
        if not v.is_integer():
            raise TypeError(f"{cls.__name__}.{name} must be a whole number, not {v!r}")
        v = int(v)
    return v


# Every hook the library calls and uses the return value of, or runs for its effect.
_DEFERRABLE_HOOKS = ("OnConnected", "OnRecv", "OnSend", "OnDisconnected", "OnConnectFailed",
                     "OnRecvPacket", "OnSendQueue", "OnTaskDone", "OnMessage", "OnUpgrade",
                     "OnUnknownPacket")


cdef enum:
    # co_flags of a function whose call returns a coroutine or a generator:
    # CO_GENERATOR | CO_COROUTINE | CO_ASYNC_GENERATOR
    _CO_DEFERRED = 0x20 | 0x80 | 0x200


cdef bint _maybe_deferred(object f, str name):
    """False for a hook that certainly runs its body when called: a plain def without
    those flags and without attributes (inspect.markcoroutinefunction's mark and
    partialmethod's wrapper are attributes), or the library's own hook.  Only the
    others need inspect, which costs every process that loads it ~0.7 MiB resident
    (ast, dis, tokenize): a plain server never does."""
    if type(f) is _FunctionType:
        return (f.__code__.co_flags & _CO_DEFERRED) != 0 or bool(f.__dict__)
    for base in (Session, PacketSession, WebSocketSession):
        if f is getattr(base, name, None):
            return False
    return True


cdef _refuse_deferred_hooks(type cls):
    """A hook written as ``async def`` (an asyncio habit) or as a generator returns an
    object nobody runs: its body never ran (a welcome never sent, a login never checked)
    and the only trace was a RuntimeWarning at garbage collection."""
    for name in _DEFERRABLE_HOOKS:
        f = getattr(cls, name, None)
        if f is None or not _maybe_deferred(f, name):
            continue
        import inspect
        if inspect.iscoroutinefunction(f):
            kind = "an async def"
        elif inspect.isasyncgenfunction(f):
            kind = "an async generator"
        elif inspect.isgeneratorfunction(f):
            kind = "a generator"
        else:
            continue
        raise TypeError(f"{cls.__name__}.{name} is {kind}: hooks are called on a worker "
                        f"thread and must do their work before they return (nothing "
                        f"would run its body); write a plain def and hand what must be "
                        f"awaited to self.Spawn(awaitable, callback)")


cdef _refuse_equality(type cls):
    """A session is one connection: the library's tables (a group's names, presence in
    Redis, the flush and idle watches, a client's reconnect slots) key it by itself.
    ``__eq__`` comparing player ids made a reconnected player's new session collide
    with its old one there (the old one's end took the new one's name and presence);
    ``__eq__`` alone (``__hash__`` becomes None) made Group.Add raise half done."""
    if cls.__eq__ is not object.__eq__ or cls.__hash__ is not object.__hash__:
        what = "__eq__" if cls.__eq__ is not object.__eq__ else "__hash__"
        raise TypeError(f"{cls.__name__} defines {what}: sessions are compared by "
                        f"identity (the library keys its tables by session, and two "
                        f"sessions of one player must stay two); compare a field "
                        f"instead (a.player_id == b.player_id)")


cdef _Hooks _hooks_for(type cls):
    cdef _Hooks h
    o = getattr(cls, "_iocpnet_hooks", None)
    # (A subclass inherits the attribute: only the class's own will do.)
    if type(o) is _Hooks and (<_Hooks>o).owner == <Py_ssize_t><PyObject *>cls:
        return <_Hooks>o
    o = _hooks_static.get(cls)
    if o is not None:
        return <_Hooks>o
    _refuse_deferred_hooks(cls)
    _refuse_equality(cls)
    h = _Hooks.__new__(_Hooks)
    h.owner = <Py_ssize_t><PyObject *>cls
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
    h.max_packet_size = _class_count(cls, "max_packet_size", PKT_MAX)
    h.send_queue_limit = _class_count(cls, "send_queue_limit", DEFAULT_SEND_QUEUE_LIMIT)
    h.recv_buffer_limit = _class_count(cls, "recv_buffer_limit", DEFAULT_RECV_BUFFER_LIMIT)
    h.flush_timeout = _class_int(cls, "flush_timeout", DEFAULT_FLUSH_TIMEOUT)
    h.idle_timeout = _class_int(cls, "idle_timeout", 0, True)
    h.tls_handshake_timeout = _class_int(cls, "tls_handshake_timeout",
                                         DEFAULT_TLS_HANDSHAKE_TIMEOUT, True)
    h.send_timeout = _class_int(cls, "send_timeout", DEFAULT_SEND_TIMEOUT, True)
    h.post_queue_limit = _class_count(cls, "post_queue_limit", DEFAULT_POST_QUEUE_LIMIT)
    if h.send_queue_limit <= 0 or h.recv_buffer_limit <= 0 or h.post_queue_limit <= 0:
        raise ValueError(f"{cls.__name__}: send_queue_limit, recv_buffer_limit and "
                         f"post_queue_limit must be positive")
    if not PKT_HEADER <= h.max_packet_size <= PKT_MAX:
        raise ValueError(f"{cls.__name__}: max_packet_size must be between "
                         f"{PKT_HEADER} and {PKT_MAX}")
    if h.idle_timeout < 0 or h.tls_handshake_timeout < 0 or h.send_timeout < 0:
        raise ValueError(f"{cls.__name__}: idle_timeout, tls_handshake_timeout and "
                         f"send_timeout must be >= 0 (0: none)")
    if h.flush_timeout < 0:
        raise ValueError(f"{cls.__name__}: flush_timeout must be >= 0 (0: queued data "
                         f"is dropped at once)")
    h.lim = _recv_limits_for(cls, h.packet_mode)
    _hooks_measure(cls, h)
    h.send_queue_high = _class_count(cls, "send_queue_high",
                                     min(DEFAULT_SEND_QUEUE_HIGH, h.send_queue_limit // 4))
    h.send_queue_low = _class_count(cls, "send_queue_low", h.send_queue_high // 4)
    if not 0 <= h.send_queue_low < h.send_queue_high <= h.send_queue_limit:
        raise ValueError(f"{cls.__name__}: need 0 <= send_queue_low < send_queue_high <= "
                         f"send_queue_limit")
    _keep_on_class(cls, "_iocpnet_hooks", h, _hooks_static)
    return h


# The hook a session is in, for Stop's warning about sessions that hold it up.
cdef enum:
    H_NONE = 0
    H_CONNECTED = 1
    H_RECV = 2            # OnRecv, OnRecvPacket or OnMessage (whatever _deliver calls)
    H_SEND = 3
    H_DISCONNECTED = 4    # the service waits for it (_session_done comes after)
    H_JOB = 5             # a job, timer or task callback on its strand (strand.pxi)


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
    if hook == H_DISCONNECTED:
        return "OnDisconnected"
    if hook == H_JOB:
        return "a job, timer or task callback"
    if s._ws is not None:
        return "OnMessage"
    return "OnRecvPacket" if s._hooks.packet_mode else "OnRecv"


cdef inline port_op_t *_connect_op(Session s) noexcept:
    """The connect operation.  It borrows the receive operation's record: a session
    receives only once it is connected, so the two are never in flight together, and
    every session stays one port_op_t smaller."""
    return &s._recv_op


cdef str _reason_text(object reason, str default):
    """Disconnect's or Abort's reason as OnDisconnected and the log show it: None or an
    empty text is the call's default (not "None", not ""), anything else its str (an
    exception's type when its message is empty, an object's type when its str raises:
    the careless call still ends the session instead of raising in the hook)."""
    if type(reason) is not str:
        if reason is None:
            return default
        try:
            text = str(reason)
        except Exception:
            return type(reason).__name__
        if not text and isinstance(reason, BaseException):
            return type(reason).__name__
        reason = text
    return reason if reason else default


cdef str _describe_exc(BaseException e):
    return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__


cdef void _hook_failed(Session s, str hook, BaseException e) noexcept:
    # Log the repr, not the session: a handler keeping the record must not keep it alive.
    logger.error("%s of %s raised; disconnecting it", hook, repr(s),
                 exc_info=(type(e), e, e.__traceback__))
    # The traceback's frames hold the hook's locals (OnRecv's memoryview among
    # them) for as long as a handler keeps the record; let them go now.
    _traceback.clear_frames(e.__traceback__)
    # Our bug, not the peer's: close with a FIN, without waiting to flush.
    _close_now(s, f"exception in {hook}: {_describe_exc(e)}", False)


cdef object _format_address(const port_addr_t *addr):
    """(host, port) of a socket address, or None for a family we cannot show."""
    cdef char host[64]
    cdef int portnum = 0
    if port_addr_format(addr, host, sizeof(host), &portnum) != 0:
        return None
    return (host.decode("ascii"), portnum)


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
    # Field order keeps the small fields together (no padding between them): an idle
    # connection is mostly this object, and 10,000 of them should fit in 10 MiB.
    cdef Service _service
    cdef _Hooks _hooks
    cdef port_op_t _recv_op       # before the connection: the connect (_connect_op)
    cdef port_op_t _send_op
    cdef port_op_t *_close_op     # made by the first close (session_close.pxi): NULL idle
    cdef port_strand_t _strand
    cdef object _reason
    cdef object _address          # (host, port), made from _peer on first use (address)
    cdef int64_t _last_recv_ms
    cdef int64_t _send_progress_ms    # the send queue last moved (see core/stall.pxi)
    cdef uint64_t _send_mark          # the kernel's progress mark + 1 (0: not looked)
    cdef int64_t _hook_since_ms
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
    cdef object _tls              # a _Tls stream filter (core/tls.pxi), or None
    cdef _RateState *_rate        # flood protection (limits.pxi); NULL until used
    cdef object _addr_key         # the host the per-address accept limits counted
    cdef _Counters _cnt           # bytes and messages in and out (stats.pxi)
    cdef object _ws               # a _WebSocket when it speaks WebSocket (websocket.pxi)
    # Game layer (strand.pxi, group.pxi): jobs, timers, tasks and groups; None until used.
    cdef _Owned _x
    # The service's list of live sessions (service.pxi, _SessionList): under its _lock
    cdef PyObject *_snext
    cdef PyObject *_sprev
    cdef port_sock_t _sock
    cdef volatile int32_t _lock
    cdef int _state
    cdef volatile int32_t _hook       # H_* of the hook running now (service.pxi's Stop)
    cdef volatile int32_t _stop_requested  # the service is stopping: no new OnRecv
    cdef int _iov_n
    # Operations in flight (under _lock): a receive, a send, a connect or the close, so
    # 16 bits, next to the flags: an int here pushed them across an 8-byte boundary
    # (+8 bytes a session)
    cdef int16_t _ops
    # Flags, one byte each (C bytes are separate memory locations: two threads may write
    # neighbours under different locks)
    cdef uint8_t _recv_armed
    cdef uint8_t _recv_paused     # backpressure: not receiving while the peer lags
    cdef uint8_t _send_busy
    cdef uint8_t _counted_connected
    cdef uint8_t _was_connected
    cdef uint8_t _sq_above        # OnSendQueue: the queue passed the high mark (under _lock)
    cdef uint8_t _sq_told         # OnSendQueue: what the hook was last told (strand only)
    cdef uint8_t _rx_ended        # the peer's FIN or reset came: the close drains nothing
    # The peer's socket address as the OS gave it (_peer_len bytes; 0: unknown), kept
    # packed: the (host, port) tuple costs ~150 bytes and most servers never ask.
    cdef uint8_t _peer_len
    cdef unsigned char _peer[PEER_MAX]
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

    def __dealloc__(self):
        cdef Py_ssize_t i
        if self._sock != PORT_INVALID_SOCK and self.core is not None and self.core.port != NULL:
            # Never connected (a pending accept's session) or abandoned: no operation is
            # in flight, or we would not be here.
            port_sock_close(self.core.port, self._sock, 0)
            self._sock = PORT_INVALID_SOCK
        # Always (the port may be gone): it also frees the strand's wake-up record.
        port_strand_discard(self.core.port if self.core is not None else NULL,
                            &self._strand)
        self._release_buffers()
        free(self._close_op)          # not in flight: it would hold a reference to us
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
        a = self._peer_address()
        if a is not None:
            addr = f" {a[0]}:{a[1]}"
        return f"<{type(self).__name__}{addr} {names.get(self._state, '?')}>"

    @property
    def address(self):
        """The peer's (host, port), or None before the connection."""
        return self._peer_address()

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
        """Bytes queued and not yet sent: what ``send_queue_limit`` and
        ``send_queue_high`` are compared with (with TLS: the records, overhead
        included)."""
        return self._sq_bytes

    # Positional only: one argument, no keywords to parse (METH_O: ~20 instructions
    # fewer per Send than a keyword-capable wrapper).  Kept a Cython function object:
    # CPython's specialized call of a plain C method wants the exact class, never a
    # user's subclass (measured: ~55 instructions more).
    def Send(self, data, /):
        """Queue ``data`` to be sent, in order, from any thread.

        When nothing is queued the bytes go to the socket at once, straight from
        ``data`` (one system call, as a reactor writes); what the socket does not take
        is queued: ``bytes`` by reference (a packet broadcast to many sessions is built
        once), other buffers copied.  Returns False if the session is not connected (or
        is closing).  Past ``send_queue_limit`` unsent bytes the peer is judged not to
        be reading: the session is disconnected and False returned.
        """
        return _send_data(self, data)

    def Disconnect(self, reason="disconnected"):
        """End the session (idempotent, any thread): no more OnRecv; what Send already
        queued is still sent (up to ``flush_timeout`` seconds), then the socket closes
        and OnDisconnected(reason) runs.  Returns True if this call started it.
        ``reason``: any object, shown as its str (None or "": "disconnected")."""
        return _begin_disconnect(self, _reason_text(reason, "disconnected"), True)

    def Abort(self, reason="aborted"):
        """End the session at once: queued data is dropped and the peer sees a reset."""
        return _close_now(self, _reason_text(reason, "aborted"), True)

    # ---- internals: connection set-up ----

    cdef int _attach(self, IocpCore core, Service service) except -1:
        cdef bint free
        # The core of a connect that could not start, replaced here: held until the lock
        # is released, since its last reference may go with it (a finalizer of the core
        # runs Python code, which may use this session and so take its lock).
        cdef object old_core = None
        # Check and claim in one step, under the lock: two threads connecting the same
        # new session could both see S_NEW and start two connects on its one record.
        port_spin_lock(&self._lock)
        free = self._state == S_NEW and self._service is None
        if free:
            old_core = self.core
            self._service = service
            self.core = core
        port_spin_unlock(&self._lock)
        if not free:
            raise RuntimeError(f"{self!r} was already used; a session serves one connection")
        return 0

    cdef bint _claim_for_accept(self) noexcept:
        """An accept slot takes this new session (atomic: a factory handing the same
        object to two slots at once gives it to one of them)."""
        cdef bint free
        port_spin_lock(&self._lock)
        free = self._state == S_NEW and self._service is None
        if free:
            self._state = S_ACCEPTING
        port_spin_unlock(&self._lock)
        return free

    cdef void _detach(self) noexcept:
        """Its connect could not start: the session may be connected again."""
        cdef object service = self._service    # released after the lock, as in _attach
        port_spin_lock(&self._lock)
        self._service = None
        port_spin_unlock(&self._lock)

    cdef void _attach_accepted(self, IocpCore core, Service service) noexcept:
        self.core = core
        self._service = service

    cdef void _on_accepted(self, port_sock_t sock) noexcept:
        """The Listener accepted a connection for us (we hold our strand).  The port
        set it up (TCP_NODELAY) and the Listener took its address (_take_peer)."""
        self._sock = sock
        self._connected()

    cdef void _take_peer(self, port_t *port, const port_op_t *op,
                         port_sock_t sock) noexcept:
        """The Listener's accept `op` completed with `sock` for us: keep the peer's
        address as the accept reported it (no system call, and known even if the peer
        has already reset), or ask the socket where the backend does not keep it (or
        op is NULL: a multishot accept reports none).  A session refused over a limit
        is posted again: its old address goes."""
        cdef port_addr_t addr
        if port_accept_peer(port, op, &addr) != 0 and port_peername(sock, &addr) != 0:
            addr.len = 0
        if self._address is not None:
            self._address = None
        self._keep_address(&addr)

    cdef void _fill_address(self) noexcept:
        """Remember the peer's address: it is still known after the socket closes
        (OnDisconnected may want to log it)."""
        cdef port_addr_t addr
        if port_peername(self._sock, &addr) != 0:
            return
        self._keep_address(&addr)

    cdef void _keep_address(self, const port_addr_t *addr) noexcept:
        """Kept packed (address makes the tuple on first use); len 0: unknown."""
        if addr.len > PEER_MAX:        # not an IP family we pack: make the tuple now
            self._address = _format_address(addr)
            return
        port_spin_lock(&self._lock)
        if addr.len > 0:
            memcpy(self._peer, &addr.ss, addr.len)
            self._peer_len = <uint8_t>addr.len
        else:
            self._peer_len = 0
        port_spin_unlock(&self._lock)

    cdef object _peer_address(self):
        """The peer's (host, port), made once from the packed address (any thread)."""
        cdef port_addr_t addr
        cdef object a = self._address
        if a is not None:
            return a
        port_spin_lock(&self._lock)
        addr.len = self._peer_len
        memcpy(&addr.ss, self._peer, addr.len)
        port_spin_unlock(&self._lock)
        if addr.len == 0:
            return None
        a = _format_address(&addr)
        port_spin_lock(&self._lock)     # two threads may race here: keep the first
        if self._address is None:
            self._address = a           # replaces None: nothing is released
        else:
            a = self._address
        port_spin_unlock(&self._lock)
        return a

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
        _arm_recv(self)

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
                _hook_failed(self, "OnConnected", e)
            _leave_hook(self)

    cdef int _start_connect(self, port_addr_t *addr) except -1:
        cdef int rc
        # Under the lock: the completion may be dispatched by another worker as soon
        # as the connect is submitted, and it must find the socket stored (its first
        # step takes this lock).
        port_spin_lock(&self._lock)
        self._state = S_CONNECTING
        port_op_init(_connect_op(self), PORT_OP_CONNECT, <void *>self, &self._strand)
        self._ops += 1
        _incref(<PyObject *>self)
        rc = port_connect(self.core.port, _connect_op(self), addr)
        self._sock = _connect_op(self).sock
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
            if op.type == PORT_OP_CONNECT:      # _connect_op: the same record
                self._process_connect(cqe)
            else:
                _process_recv(self, cqe)
        elif op == &self._send_op:
            _process_send(self, cqe)
        elif op == self._close_op:
            _process_close(self, cqe)

    cdef void _process_connect(self, port_cqe_t *cqe) noexcept:
        cdef int64_t res = cqe.res
        cdef str reason
        port_spin_lock(&self._lock)
        self._ops -= 1
        port_spin_unlock(&self._lock)
        # The record goes back to being the receive operation.
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
        _close_now(self, reason, False)
        _maybe_finish(self)

    # ---- game layer: the session's strand (strand.pxi), its groups (group.pxi) ----

    def Post(self, func, *args):
        """Run ``func(*args)`` on this session's strand: never at the same time as its
        hooks, after what the strand already has (any thread may post).  Returns False
        if the session has ended; a job still queued when it ends is dropped.  At most
        ``post_queue_limit`` (class attribute, 10000) jobs wait at once: past it Post
        raises ``queue.Full`` (posting faster than the strand runs them grew its queue,
        and delayed its own receives and its end, without limit)."""
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

    @property
    def send_queue_low(self):
        return self._hooks.send_queue_low
