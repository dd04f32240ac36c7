# core/listener.pxi: the Listener: posted accepts, back-off, the session cap.
# Included by _core.pyx (one extension module, one file per concern).
#
# Two ways to accept.  Where the port keeps one accept armed for every connection
# (io_uring's multishot accept: port_accept_multishot), a slot is a session made ahead
# for the next connection: _ready lists the slots holding one, the accept completes
# with no strand (on any worker), takes a ready slot's session, holds its strand
# (port_strand_claim) while it starts it, and fills the slot again.  A connection that
# finds no slot ready (the factory failing) waits in _parked, accepted, until a slot is
# filled; the arming is cancelled meanwhile, so later ones wait in the backlog.
# Elsewhere (epoll, IOCP, older kernels) each slot posts an accept of its own with its
# session (the original's AcceptEx pattern), completed on that session's strand.
#
# Two back-offs keep an accept slot from being lost or spinning.  Out of descriptors or
# memory, a failed accept waits in _starved for _resume.  A session factory that raises
# (or returns a non-Session) leaves its slot in _unfed: one timer retries the factory
# (50 ms, doubling up to 1 s while it keeps failing) and refills every waiting slot
# once it works.  Both lists, their timers and the burst figures are under
# _backoff_lock; _burst is also read without it (atomic), on the path that posts.


cdef bytes _host_bytes(object host):
    """A host name for the C resolver, which stops at the first NUL: a name with one
    ("evil.example\\0.trusted.example") would silently become another name."""
    h = str(host)
    if "\0" in h:
        raise ValueError(f"host {h!r} contains a NUL character")
    return h.encode("idna")


cdef int _check_unused(Session s) except -1:
    """A factory must make a new session each call: one that returned a session in use
    (or ended) had several connections share it, their bytes crossing."""
    if s._state != S_NEW or s._service is not None:
        raise RuntimeError(f"the session factory returned {s!r}, which is in use or was "
                           f"used: a session serves one connection, so the factory must "
                           f"make a new one each call")
    return 0


@cython.final
cdef class Listener(IocpObject):
    """Accepts connections: binds, listens, and keeps the service's ``accepts`` accepts
    posted, each with a session made by the service's factory, re-posting each one as
    it completes (the original's AcceptEx pattern).

    ``address``: an int port (all interfaces) or a ``(host, port)`` tuple; port 0 picks
    a free port, readable as ``.port`` after ``Start()``.  ``ssl``: an
    ``ssl.SSLContext`` (server side): every connection speaks TLS, and the sessions'
    hooks see plaintext (OnConnected once the handshake is done).
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
    cdef readonly object ssl
    cdef list _unfed                  # slots waiting for the factory to work again
    cdef object _factory_timer
    cdef int _factory_backoff_ms
    cdef volatile int32_t _burst      # factory failures in a row
    cdef int64_t _burst_start_ms
    cdef int64_t _burst_logged_ms
    # A run of failures is logged in full (its traceback, its end) only if it is the
    # first of a burst of runs: a factory failing every other call is one burst of
    # one-failure runs, the later ones counted by _factory_log (limits.pxi).
    cdef bint _run_logged
    cdef LogBurst _factory_log
    cdef readonly bint websocket  # sessions accepted here speak WebSocket (websocket.pxi)
    # Classes refused with a traceback logged (once each); weak: a factory may make a
    # class per connection, and a refused class serves nothing after.
    cdef object _ws_refused
    # Multishot accept (see the top); all under _slot_lock, a spin lock (never held
    # over Python code).  _inflight counts the ready slots in this mode.
    cdef bint _multishot          # one accept armed for every connection (else per slot)
    cdef port_op_t *_mop          # its operation: _ops[_count]
    cdef volatile int32_t _slot_lock
    cdef int *_ready              # slots holding a session for the next connection
    cdef int _nready
    cdef port_sock_t *_parked     # connections accepted when no slot was ready, oldest first
    cdef int _nparked
    cdef int _parked_cap
    cdef bint _armed              # _mop in flight (or being armed)
    cdef bint _paused             # out of descriptors: armed again by _resume

    def __init__(self, address, *, int backlog=1024, bint reuse_port=False,
                 bint ipv6_only=False, ssl=None, bint websocket=False):
        # A bool is an int to Python: True listened on port 1.
        if isinstance(address, int) and not isinstance(address, bool):
            address = (None, address)
        elif isinstance(address, (tuple, list)) and len(address) == 2 and \
                not isinstance(address[1], bool):
            address = (address[0] or None, int(address[1]))
        else:
            raise TypeError("address must be a port number or a (host, port) tuple")
        if not 0 <= address[1] <= 65535:
            raise ValueError(f"port out of range: {address[1]}")
        self._address_arg = address
        self.backlog = backlog
        self._reuse_port = reuse_port
        self._ipv6_only = ipv6_only
        self.websocket = websocket
        self._sock = PORT_INVALID_SOCK
        self._starved = []
        self._backoff_ms = 0
        self._backoff_lock = threading.Lock()
        self.ssl = _tls_context(ssl)
        self._unfed = []
        self._ws_refused = _weakref.WeakSet()

    def __cinit__(self, *args, **kwargs):
        self._ops = NULL
        self._ready = NULL
        self._parked = NULL
        self._sock = PORT_INVALID_SOCK

    def __dealloc__(self):
        if self._sock != PORT_INVALID_SOCK and self.core is not None and self.core.port != NULL:
            port_sock_close(self.core.port, self._sock, 0)
        if self._ops != NULL:
            free(self._ops)
            self._ops = NULL
        free(self._ready)
        self._ready = NULL
        free(self._parked)       # closed by Close (a listener is closed before it goes)
        self._parked = NULL

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

    cdef int _start(self, IocpCore core, Service service, int count,
                    Session first) except -1:
        cdef port_addr_t addr
        cdef port_addr_t bound
        cdef char host[64]
        cdef int portnum = 0, rc, flags = 0, i
        cdef const char *chost = NULL
        if self._closing:
            raise RuntimeError("this Listener was closed (the service that used it "
                               "stopped): a Listener listens for one service; make a "
                               "new Listener for a new one")
        if self._ops != NULL:
            raise RuntimeError("the Listener is already started (in use by another "
                               "service)")
        if count <= 0:
            raise ValueError("accepts (the accepts kept posted) must be positive")
        hostarg = self._address_arg[0]
        if hostarg is not None:
            hb = _host_bytes(hostarg)
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
        self._factory_log = LogBurst(core, "session factory failures", 1)
        # One operation per slot, and the multishot accept's after them.
        self._ops = <port_op_t *>malloc((count + 1) * sizeof(port_op_t))
        self._ready = <int *>malloc(count * sizeof(int))
        if self._ops == NULL or self._ready == NULL:
            raise MemoryError()
        self._count = count
        self._pending = [None] * count
        for i in range(count + 1):
            port_op_init(&self._ops[i], PORT_OP_ACCEPT, <void *>self, NULL)
        self._mop = &self._ops[count]
        # Multishot until the port says it cannot (_arm): the slots are filled first,
        # with the arming held off (_armed) until they are.
        self._multishot = True
        self._armed = True
        self._post(0, first)
        for i in range(1, count):
            self._post(i, None)
        port_spin_lock(&self._slot_lock)
        self._armed = False
        port_spin_unlock(&self._slot_lock)
        self._rearm()
        return 0

    cdef void _post(self, int i, Session session) noexcept:
        """Fill accept slot i with `session`, or a new one from the factory."""
        if self._multishot:
            self._fill(i, session)
        else:
            self._post_one(i, session)

    cdef void _post_one(self, int i, Session session) noexcept:
        """(Re)post accept slot i with `session`, or a new one from the factory."""
        cdef int rc
        if self._closing:
            self._pending[i] = None
            return
        if session is None:
            self._pending[i] = None
            session = self._feed(i, None)   # claimed for this slot (S_ACCEPTING)
            if session is None:
                return
        session._state = S_ACCEPTING
        self._pending[i] = session
        # The accept completes on the new session's strand, so OnConnected runs before
        # any completion of the session's own operations.
        port_op_init(&self._ops[i], PORT_OP_ACCEPT, <void *>self, &session._strand)
        port_atomic_add32(&self._inflight, 1)
        _incref(<PyObject *>self)
        # Close sets _closing, then takes _slot_lock before it stops the accepts and
        # closes the socket: an accept is posted before that (and stopped) or not at all.
        # Checked without the lock only, a Close in between left it posted on a closed
        # descriptor, which the client sockets of the same process reuse at once: in
        # flight for ever (3.13t CI, test_races' stop during a connect storm, epoll).
        port_spin_lock(&self._slot_lock)
        if self._closing:
            rc = PORT_ECLOSED
        else:
            rc = port_accept(self.core.port, &self._ops[i], self._sock)
        port_spin_unlock(&self._slot_lock)
        if rc != 0:
            _decref(<PyObject *>self)
            port_atomic_add32(&self._inflight, -1)
            self._pending[i] = None
            session._state = S_NEW
            if rc != PORT_ECLOSED:
                logger.error("posting an accept failed: %s", port_reason(rc))

    # ---- multishot accept ----------------------------------------------------------

    cdef void _fill(self, int i, Session session) noexcept:
        """Slot i holds `session` (or a new one from the factory) for the next
        connection; a connection already waiting for one (_parked) takes it at once."""
        cdef port_sock_t fd
        cdef bint arm, oneshot, closing
        while True:
            if self._closing:
                self._pending[i] = None
                return
            if session is None:
                self._pending[i] = None
                session = self._feed(i, None)
                if session is None:
                    # No session for later connections: let them wait in the backlog
                    # (the arming ends; the slots filled again arm it again).
                    if self._nready == 0:
                        port_cancel(self.core.port, self._mop)
                    return
            session._state = S_ACCEPTING
            self._pending[i] = session
            fd = PORT_INVALID_SOCK
            arm = False
            port_spin_lock(&self._slot_lock)
            oneshot = not self._multishot
            closing = self._closing      # Close drops the ready slots after it set this
            if oneshot or closing:
                pass
            elif self._nparked > 0:
                fd = self._parked[0]
                self._nparked -= 1
                memmove(self._parked, self._parked + 1,
                        self._nparked * sizeof(port_sock_t))
            else:
                self._ready[self._nready] = i
                self._nready += 1
                port_atomic_add32(&self._inflight, 1)
                arm = not self._armed and not self._paused and not self._closing
                if arm:
                    self._armed = True
            port_spin_unlock(&self._slot_lock)
            if closing:
                self._pending[i] = None
                session._state = S_NEW
                return
            if oneshot:
                self._post_one(i, session)     # the port said no while this one filled
                return
            if fd == PORT_INVALID_SOCK:
                if arm:
                    self._arm()
                return
            session = self._serve(i, fd)

    cdef void _rearm(self) noexcept:
        """Arm the multishot accept if a slot is ready and nothing holds it off."""
        cdef bint arm
        port_spin_lock(&self._slot_lock)
        arm = self._multishot and not self._armed and not self._paused and \
            not self._closing and self._nready > 0
        if arm:
            self._armed = True
        port_spin_unlock(&self._slot_lock)
        if arm:
            self._arm()

    cdef void _arm(self) noexcept:
        """Submit the multishot accept (_armed already set by the caller); where the
        port cannot, every ready slot posts an accept of its own from now on."""
        cdef int rc, n, k
        cdef int *slots
        cdef bint closing
        port_op_init(self._mop, PORT_OP_ACCEPT, <void *>self, NULL)
        _incref(<PyObject *>self)
        rc = port_accept_multishot(self.core.port, self._mop, self._sock)
        if rc == 0:
            port_spin_lock(&self._slot_lock)
            closing = self._closing
            port_spin_unlock(&self._slot_lock)
            if closing:
                # Close came before it was in flight (port_stop_accepts did not see it).
                port_cancel(self.core.port, self._mop)
            return
        _decref(<PyObject *>self)
        if rc != PORT_EOPNOTSUPP:
            port_spin_lock(&self._slot_lock)
            self._armed = False
            port_spin_unlock(&self._slot_lock)
            if rc != PORT_ECLOSED:
                logger.error("posting an accept failed: %s", port_reason(rc))
            return
        slots = <int *>malloc(self._count * sizeof(int))
        while slots == NULL:             # once per listener, a few bytes a slot
            port_thread_yield()
            slots = <int *>malloc(self._count * sizeof(int))
        port_spin_lock(&self._slot_lock)
        self._multishot = False
        self._armed = False
        n = self._nready
        if n > 0:
            memcpy(slots, self._ready, n * sizeof(int))
        self._nready = 0
        port_atomic_add32(&self._inflight, -n)
        port_spin_unlock(&self._slot_lock)
        for k in range(n):
            self._post_one(slots[k], <Session>self._pending[slots[k]])
        free(slots)

    cdef int _take(self, port_sock_t fd) noexcept:
        """A ready slot for connection fd, or -1: fd waits in _parked for one."""
        cdef int i = -1
        cdef port_sock_t *grown
        port_spin_lock(&self._slot_lock)
        if self._nready > 0:
            self._nready -= 1
            i = self._ready[self._nready]
            port_atomic_add32(&self._inflight, -1)
            port_spin_unlock(&self._slot_lock)
            return i
        while self._nparked == self._parked_cap:
            port_spin_unlock(&self._slot_lock)
            grown = <port_sock_t *>malloc((self._parked_cap * 2 + 8) * sizeof(port_sock_t))
            if grown == NULL:
                port_thread_yield()      # a connection is never dropped: wait for memory
            port_spin_lock(&self._slot_lock)
            if grown != NULL and self._nparked == self._parked_cap:
                if self._nparked > 0:    # (the first time _parked is NULL: memcpy's UB)
                    memcpy(grown, self._parked, self._nparked * sizeof(port_sock_t))
                free(self._parked)
                self._parked = grown
                self._parked_cap = self._parked_cap * 2 + 8
            elif grown != NULL:
                free(grown)
        self._parked[self._nparked] = fd
        self._nparked += 1
        port_spin_unlock(&self._slot_lock)
        return -1

    cdef Session _serve(self, int i, port_sock_t fd):
        """Start connection fd with slot i's session, holding the session's strand
        meanwhile (the accept had none), as a completion on it would.  Returns the
        session when the service refused the connection over a limit (the slot keeps
        it), else None (the slot needs a new one)."""
        cdef Session session = <Session>self._pending[i]
        cdef Service service = self._service
        cdef Session keep = None
        cdef bint refused, claimed
        self._pending[i] = None
        _incref(<PyObject *>session)
        # A new session: nothing holds its strand, nothing is queued on it.
        claimed = port_strand_claim(&session._strand) == 0
        # No address came with it (and _mop may be armed again by now): ask the socket.
        session._take_peer(self.core.port, NULL, fd)
        if self._closing:
            port_sock_close(self.core.port, fd, 0)
            session._state = S_NEW
        else:
            bad_ws = self.websocket and _ws_accepting(session, self._ws_refused) < 0
            if bad_ws:
                with service._lock:
                    service._st.refused[REFUSED_SESSION_CLASS] += 1
            refused = bad_ws or not service._admit(fd, session)
            if refused:
                port_sock_close(self.core.port, fd, PORT_CLOSE_RESET)
                session._state = S_NEW
                if not bad_ws:
                    keep = session
            else:
                if self.ssl is not None:
                    session._tls = _Tls.create(self.ssl, True, None)
                session._attach_accepted(self.core, service)
                session._on_accepted(fd)
        if claimed:
            _strand_release(self.core, &session._strand, <PyObject *>session)
        else:
            _decref(<PyObject *>session)
        return keep

    cdef void _multishot_done(self, port_cqe_t *cqe) noexcept:
        cdef int64_t res = cqe.res
        cdef int i
        cdef bint closing
        if res >= 0:
            port_atomic_add64(&self._accepted, 1)
            self._backoff_ms = 0
            if self._closing:
                port_sock_close(self.core.port, <port_sock_t>res, 0)
            else:
                i = self._take(<port_sock_t>res)
                if i >= 0:
                    self._fill(i, self._serve(i, <port_sock_t>res))
                elif port_atomic_load32(&self._burst) > 0:
                    port_cancel(self.core.port, self._mop)   # still no session coming
        elif cqe.flags & PORT_CQE_MORE:
            port_atomic_add64(&self._accept_errors, 1)
            logger.warning("accept failed on %s: %s", self.address,
                           port_reason(<int>res))
        if cqe.flags & PORT_CQE_MORE:
            return
        # The arming ended.
        port_spin_lock(&self._slot_lock)
        self._armed = False
        closing = self._closing
        port_spin_unlock(&self._slot_lock)
        if closing:
            self._drop_ready()
            return
        if res >= 0 or res == PORT_ECANCELED:
            # One last connection, or our cancel (no slot was ready): armed again
            # once a slot is.
            self._rearm()
            return
        port_atomic_add64(&self._accept_errors, 1)
        if res == PORT_EMFILE or res == PORT_ENFILE or res == PORT_ENOBUFS or \
                res == PORT_ENOMEM:
            port_spin_lock(&self._slot_lock)
            self._paused = True
            port_spin_unlock(&self._slot_lock)
            self._back_off(<int>res, None)
            return
        logger.warning("accept failed on %s: %s", self.address, port_reason(<int>res))
        self._rearm()

    cdef void _drop_ready(self) noexcept:
        """Closing, the multishot accept ended: the ready slots' sessions go."""
        cdef int n, k
        cdef list gone = []
        port_spin_lock(&self._slot_lock)
        n = self._nready
        self._nready = 0
        port_spin_unlock(&self._slot_lock)
        for k in range(n):
            # Filled after Close began: _fill, under the lock, saw it open.
            gone.append(self._pending[self._ready[k]])
        for k in range(n):
            self._pending[self._ready[k]] = None
        port_atomic_add32(&self._inflight, -n)
        for s in gone:
            (<Session>s)._state = S_NEW

    cdef void _dispatch(self, port_cqe_t *cqe) noexcept:
        cdef int i = <int>(cqe.op - self._ops)
        if cqe.op == self._mop:
            self._multishot_done(cqe)
            return
        cdef Session session = <Session>self._pending[i]
        cdef int64_t res = cqe.res
        cdef Service service = self._service
        port_atomic_add32(&self._inflight, -1)
        self._pending[i] = None
        if res >= 0:
            port_atomic_add64(&self._accepted, 1)
            self._backoff_ms = 0
            # Before the slot is posted again: the address is in the accept's record.
            session._take_peer(self.core.port, cqe.op, <port_sock_t>res)
            if self._closing:
                port_sock_close(self.core.port, <port_sock_t>res, 0)
                session._state = S_NEW
                return
            # A session class with bad WebSocket settings is refused before _admit (a
            # refusal must not keep a place under the service's limits), and its slot
            # gets a new session; one over a limit is refused at once, its session kept.
            bad_ws = self.websocket and _ws_accepting(session, self._ws_refused) < 0
            if bad_ws:
                with service._lock:
                    service._st.refused[REFUSED_SESSION_CLASS] += 1
            if bad_ws or not service._admit(<port_sock_t>res, session):
                port_sock_close(self.core.port, <port_sock_t>res, PORT_CLOSE_RESET)
                session._state = S_NEW
                self._post(i, None if bad_ws else session)
                return
            self._post(i, None)       # keep accepting while this one starts
            if self.ssl is not None:
                session._tls = _Tls.create(self.ssl, True, None)
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
            self._back_off(<int>res, (i, session))
            return
        logger.warning("accept failed on %s: %s", self.address,
                       port_reason(<int>res))
        self._post(i, session)

    cdef void _back_off(self, int res, object starved) noexcept:
        """Out of descriptors or memory: retrying at once would spin a core on a
        listener that stays readable.  Back off (`starved`, a one-shot slot, waits for
        _resume; a multishot accept is armed again by it), then try again."""
        cdef bint start
        cdef int delay_ms = 0
        with self._backoff_lock:
            if starved is not None:
                self._starved.append(starved)
            start = self._backoff_timer is None
            if start:
                self._backoff_ms = min(max(self._backoff_ms * 2, 50), 1000)
                claim = object()
                self._backoff_timer = claim      # claimed; made below
            delay_ms = self._backoff_ms
        if start:
            # The timer first, the log line after: a slow log handler must not
            # lengthen the pause.
            try:
                t = self.core.CallLater(delay_ms / 1000.0, self._resume)
            except Exception:
                logger.exception("cannot schedule the accept back-off")
                t = None
            with self._backoff_lock:
                # Unless _resume ran first (this thread preempted past the delay):
                # then t is spent, and the field is None or a newer claim.
                if self._backoff_timer is claim:
                    self._backoff_timer = t
            logger.warning("accept failed on %s: %s; pausing accepts for %d ms",
                           self.address, port_reason(res), delay_ms)

    cdef Session _feed(self, int slot, list more):
        """A session from the factory for `slot`, or None: then `slot` and the slots in
        `more` (None: no others) wait in _unfed for the factory's back-off timer."""
        cdef int64_t now
        cdef bint first, remind, start, full = False
        cdef int delay_ms = 0, n
        try:
            s = self._service._new_session()
            if not (<Session>s)._claim_for_accept():
                _check_unused(<Session>s)         # raises: another slot took it
                raise RuntimeError(f"the session factory returned {s!r} to two accept "
                                   f"slots at once")
        except BaseException as e:
            now = port_monotonic_ms()
            with self._backoff_lock:
                self._unfed.append(slot)
                if more is not None:
                    self._unfed.extend(more)
                n = port_atomic_add32(&self._burst, 1)
                self._service.factory_failures += 1
                first = n == 1
                if first:
                    self._burst_start_ms = self._burst_logged_ms = now
                    # Decided here, under the lock, so that a failure of the same
                    # run on another worker reads it settled.
                    self._run_logged = full = self._factory_log.note(
                        _logging_ERROR, _describe_exc(e))
                elif not self._run_logged:
                    self._factory_log.note(_logging_ERROR, _describe_exc(e))
                remind = self._run_logged and not first and \
                    now - self._burst_logged_ms >= 60000
                if remind:
                    self._burst_logged_ms = now
                start = self._factory_timer is None and not self._closing
                if start:
                    self._factory_backoff_ms = min(max(self._factory_backoff_ms * 2, 50),
                                                   1000)
                    claim = object()
                    self._factory_timer = claim      # claimed; made below
                    delay_ms = self._factory_backoff_ms
            # The retry is timed from the failure: its timer is armed before the log
            # line below, whose traceback can take a loaded machine's thread half a
            # second to format (a slow handler longer), which would lengthen the wait.
            if start:
                try:
                    t = self.core.CallLater(delay_ms / 1000.0, self._retry_factory)
                except Exception:
                    if not self.core._closing:
                        logger.exception("cannot schedule the session factory's retry")
                    t = None
                with self._backoff_lock:
                    # Unless the retry ran first (this thread preempted past the
                    # delay): a spent timer kept here would stop every retry after.
                    if self._factory_timer is claim:
                        self._factory_timer = t
            # One line when a run of failures starts (with the traceback), one when
            # it ends (with the count), and a reminder a minute while it lasts: never a
            # traceback per slot.  A run that follows another within a second is
            # counted instead (_factory_log), or a factory failing every other call
            # would log a traceback per failure.
            if full:
                logger.error("the session factory failed; accept slots wait for it, "
                             "retried with a growing back-off (50 ms up to 1 s)",
                             exc_info=(type(e), e, e.__traceback__))
                _traceback.clear_frames(e.__traceback__)
            elif remind:
                logger.error("the session factory is still failing: %d failures in a "
                             "row over %.0f s (the last: %s)", n,
                             (now - self._burst_start_ms) / 1000.0, _describe_exc(e))
            return None
        if port_atomic_load32(&self._burst) > 0:
            self._factory_recovered()
        return <Session>s

    cdef void _factory_recovered(self) noexcept:
        """The factory worked after failing: log the burst, refill the waiting slots."""
        cdef int i, n
        now = port_monotonic_ms()
        with self._backoff_lock:
            n = port_atomic_xchg32(&self._burst, 0)
            if n == 0:
                return
            logged = self._run_logged
            self._factory_backoff_ms = 0
            unfed = self._unfed
            self._unfed = []
            timer = self._factory_timer
            if isinstance(timer, Timer):
                self._factory_timer = None
        if logged:
            logger.warning("the session factory works again after %d failures in %.1f s",
                           n, (now - self._burst_start_ms) / 1000.0)
        if isinstance(timer, Timer):
            timer.Cancel()
        for i in unfed:
            self._post(i, None)

    def _retry_factory(self):
        cdef int k
        with self._backoff_lock:
            unfed = self._unfed
            self._unfed = []
            self._factory_timer = None
        for k in range(len(unfed)):
            if self._closing:
                return
            s = self._feed(unfed[k], unfed[k + 1:])
            if s is None:
                return              # still failing: the rest wait for the next retry
            self._post(unfed[k], s)

    def _resume(self):
        with self._backoff_lock:
            starved = self._starved
            self._starved = []
            self._backoff_timer = None
        for i, session in starved:
            self._post(i, session)
        port_spin_lock(&self._slot_lock)
        self._paused = False
        port_spin_unlock(&self._slot_lock)
        self._rearm()

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
            factory_timer = self._factory_timer
            self._factory_timer = None
            self._unfed = []
        if isinstance(timer, Timer):
            timer.Cancel()
        if isinstance(factory_timer, Timer):
            factory_timer.Cancel()
        if self._factory_log is not None:
            self._factory_log.flush()
        armed = False
        port_spin_lock(&self._slot_lock)      # _closing is read under it
        armed = self._armed
        parked = self._nparked
        self._nparked = 0
        port_spin_unlock(&self._slot_lock)
        if self._ops != NULL:
            # The slots' operations and the multishot accept's.
            port_stop_accepts(self.core.port, self._ops, self._count + 1, self._sock)
        if not armed:
            self._drop_ready()      # else when its final completion comes
        for i in range(parked):
            port_sock_close(self.core.port, self._parked[i], PORT_CLOSE_RESET)
        if self._sock != PORT_INVALID_SOCK and self.core is not None:
            port_sock_close(self.core.port, self._sock, 0)
            self._sock = PORT_INVALID_SOCK

    @property
    def accepts_posted(self):
        """Accept slots ready: accepts posted and not completed yet, or with
        `multishot` the sessions made ahead for the next connections."""
        return port_atomic_load32(&self._inflight)

    @property
    def multishot(self):
        """One accept operation serves every connection (io_uring on Linux 5.19+),
        instead of one posted per slot."""
        return self._multishot and self._ops != NULL

    @property
    def accepted(self):
        """Connections accepted so far (including those refused over the cap)."""
        return port_atomic_load64(&self._accepted)

    @property
    def accept_errors(self):
        """Accepts that failed (out of descriptors, aborted connections...)."""
        return port_atomic_load64(&self._accept_errors)
