# core/service.pxi: Service (ServerService is its alias) and ClientService.
# Included by _core.pyx (one extension module, one file per concern).
#
# Shutdown (Stop, Run's signals).  Each session is told to stop on its own strand (a
# _StopOnStrand job posted there): a hook running when Stop arrives finishes first, and
# what it sends is flushed (bounded by flush_timeout) like any other queued data; no
# new OnRecv starts meanwhile (Session._stop_requested).  Stop waits until one deadline;
# sessions still open then are named in the warning with the hook they are in.  Run
# keeps its signal handler until the end: a second SIGINT/SIGTERM stops at once.


@cython.final
cdef class _StopOnStrand(IocpObject):
    """One session's graceful disconnect at shutdown, run on the session's strand: after
    the hook it may be in, never beside it."""
    cdef port_op_t op
    cdef Session session
    cdef str reason

    cdef void _dispatch(self, port_cqe_t *cqe) noexcept:
        cdef Session s = self.session
        self.session = None
        _begin_disconnect(s, self.reason, True)


cdef void _stop_session(Session s, str reason) noexcept:
    cdef _StopOnStrand job
    cdef int rc = -1
    port_atomic_store32(&s._stop_requested, 1)
    if s.core is not None and s.core.port != NULL:
        job = _StopOnStrand.__new__(_StopOnStrand)
        job.core = s.core
        job.session = s
        job.reason = reason
        port_op_init(&job.op, PORT_OP_POST, <void *>job, &s._strand)
        _incref(<PyObject *>job)
        rc = port_post(s.core.port, &job.op, 0)
        if rc != 0:
            _decref(<PyObject *>job)
    if rc != 0:
        _begin_disconnect(s, reason, True)     # the port is shut: nothing runs there


cdef str _describe_open(Session s, int64_t now):
    """How a session still open at the shutdown deadline holds it up."""
    cdef int32_t hook = port_atomic_load32(&s._hook)
    if hook != H_NONE:
        return (f"{s!r} in {_hook_name(s, hook)} for "
                f"{max(0, now - s._hook_since_ms) / 1000.0:.1f} s")
    if s._state == S_FLUSHING:
        return f"{s!r} flushing {s._sq_bytes} bytes"
    return repr(s)


@cython.final
cdef class _SessionList:
    """A service's live sessions: a circular doubly-linked list threaded through the
    sessions themselves (Session._snext/_sprev, NULL when not listed), each listed
    session holding one reference.  It replaces a Python set, whose table cost ~52 bytes
    per session at 10,000 (the links cost 16, inside the session).  Lock: the service's
    _lock guards every add, discard and walk (iteration is a snapshot taken under it);
    len() is an atomic read, fine without it.  The list's references are invisible to the
    cycle collector, as a listed session is live anyway: it leaves the list when it ends
    (Service._session_done)."""
    cdef PyObject *_head
    cdef volatile int64_t _n

    cdef void add(self, Session s) noexcept:
        cdef Session h
        if s._snext != NULL:
            return
        _incref(<PyObject *>s)
        if self._head == NULL:
            s._snext = s._sprev = <PyObject *>s
            self._head = <PyObject *>s
        else:                                   # at the tail: before the head
            h = <Session>self._head
            s._snext = self._head
            s._sprev = h._sprev
            (<Session>h._sprev)._snext = <PyObject *>s
            h._sprev = <PyObject *>s
        port_atomic_add64(&self._n, 1)

    cdef void discard(self, Session s) noexcept:
        if s._snext == NULL:
            return
        if s._snext == <PyObject *>s:
            self._head = NULL
        else:
            (<Session>s._sprev)._snext = s._snext
            (<Session>s._snext)._sprev = s._sprev
            if self._head == <PyObject *>s:
                self._head = s._snext
        s._snext = s._sprev = NULL
        port_atomic_add64(&self._n, -1)
        _decref(<PyObject *>s)

    cdef list snapshot(self):
        cdef list out = []
        cdef PyObject *p = self._head
        while p != NULL:
            out.append(<object>p)
            p = (<Session>p)._snext
            if p == self._head:
                break
        return out

    def __len__(self):
        return port_atomic_load64(&self._n)

    def __iter__(self):
        return iter(self.snapshot())

    def __dealloc__(self):
        while self._head != NULL:
            self.discard(<Session>self._head)


cdef class Service:
    """The original's Service: an IocpCore, a Listener, a session factory and the number
    of accepts kept posted: ``Service(core, listener, factory, 100)`` as the original's
    main.cpp writes it, or ``accepts=100``.  That number is not a cap on sessions (each
    completed accept is posted again at once): ``max_sessions`` is the cap.
    ``listener`` may also be the address itself (a port or a ``(host, port)`` tuple,
    as the original passes a NetAddress): the service makes a ``Listener`` for it.
    ``max_session_count`` (the original's name, as a keyword or an attribute) is an
    alias of ``accepts`` for one release; the keyword warns (DeprecationWarning).

    ``Start()`` binds, listens and posts the accepts; worker threads then loop
    ``service.GetIocpCore().Dispatch()``.  ``Run()`` does all of it and returns
    after ``Stop()``, SIGINT or SIGTERM, with a graceful shutdown.
    """
    cdef readonly IocpCore core
    cdef readonly object listener
    cdef object _factory
    cdef readonly int accepts             # accepts kept posted (not a cap: max_sessions)
    cdef readonly object max_sessions
    cdef Py_ssize_t _cap
    cdef _SessionList _sessions       # the live sessions
    cdef object _lock
    # _lock's acquire and release, bound once: `with self._lock:` looks up and binds
    # __enter__ and __exit__ on every use, and every connection takes the lock three
    # times (_admit_connection, _session_connected, _session_done)
    cdef object _lock_acquire
    cdef object _lock_release
    cdef readonly object _stop_event    # set to make Run return (run.py waits on it)
    cdef readonly bint _started
    cdef readonly bint _stopping
    cdef object _close_cb
    cdef object _idle_timer
    cdef dict _idle_busy              # session -> when the idle sweep last saw it in a hook
    cdef str _shutdown_reason         # what Stop() tells the sessions
    cdef bint _force                  # Run's second signal: stop at once
    cdef Py_ssize_t _admitting        # accepted, admitted, not yet in _sessions
    cdef readonly uint64_t rejected
    cdef readonly uint64_t total_sessions
    cdef readonly uint64_t idle_disconnects
    cdef readonly uint64_t factory_failures   # the session factory raised (Listener)
    cdef _ServiceLimits _lim          # per-address accept limits (limits.pxi)
    cdef _ServiceStats _st            # figures (stats.pxi)
    cdef readonly uint64_t send_timeouts      # sessions ended by send_timeout (stall.pxi)
    cdef double _stall_timeout                # the shortest send_timeout watched, or 0
    cdef object _stall_watch                  # its core's _StallWatch, once watched
    cdef tuple _log_bursts                    # a LogBurst per LOG_* kind (limits.pxi)
    cdef object __weakref__

    def __init__(self, IocpCore core, listener, session_factory, accepts=None,
                 *, max_sessions=None, max_sessions_per_address=None,
                 connect_rate_per_address=None, connect_burst_per_address=None,
                 int address_table_size=16384, max_session_count=None):
        if core is None:
            raise TypeError("core must be an IocpCore")
        if not callable(session_factory):
            raise TypeError("session_factory must be a Session subclass or a callable "
                            "returning a Session")
        if max_session_count is not None:
            if accepts is not None:
                raise TypeError("give accepts= (max_session_count= is its old name), "
                                "not both")
            warnings.warn("Service(max_session_count=N) is now Service(accepts=N): the "
                          "accepts kept posted, not a cap on sessions (max_sessions= is "
                          "the cap); the old keyword goes in the next release",
                          DeprecationWarning, stacklevel=2)
            accepts = max_session_count
        accepts = 100 if accepts is None else int(accepts)
        if accepts <= 0:
            raise ValueError("accepts (the accepts kept posted) must be positive")
        if listener is not None and not isinstance(listener, Listener):
            # The original's ServerService takes a NetAddress: an address makes its
            # Listener (which checks it).  Anything else is refused here: Start casts.
            try:
                listener = Listener(listener)
            except TypeError:
                raise TypeError("listener must be a Listener, or the address to listen "
                                "on (a port or a (host, port) tuple), not "
                                f"{listener!r}") from None
        self.core = core
        self.listener = listener
        self._factory = session_factory
        self.accepts = accepts
        self.max_sessions = max_sessions
        self._cap = -1 if max_sessions is None else int(max_sessions)
        if max_sessions is not None and self._cap < 0:
            raise ValueError("max_sessions must be >= 0")
        self._lim = _ServiceLimits(max_sessions_per_address, connect_rate_per_address,
                                   connect_burst_per_address, address_table_size)
        self._st = _ServiceStats()
        self._log_bursts = tuple(LogBurst(core, what, 5) for what in _LOG_BURST_WHAT)
        self._sessions = _SessionList()
        self._lock = threading.Lock()
        self._lock_acquire = self._lock.acquire
        self._lock_release = self._lock.release
        self._stop_event = threading.Event()
        self._shutdown_reason = "server shutdown"

    def __repr__(self):
        if self._sessions is None:
            return f"<{type(self).__name__} (__init__ not called)>"
        return (f"<{type(self).__name__} {self.listener!r} sessions={len(self._sessions)} "
                f"backend={self.core.backend}>")

    def __reduce_ex__(self, protocol):
        _refuse_copy(self, "a service on a completion port (its listener, its "
                           "sessions)")

    def GetIocpCore(self):
        return self.core

    @property
    def max_session_count(self):
        """The original's name of ``accepts`` (an alias, for one release)."""
        return self.accepts

    @property
    def session_count(self):
        """Live sessions (connected, or closing and not yet disconnected)."""
        self._check_init()
        return len(self._sessions)

    @property
    def sessions(self):
        """A snapshot of the live sessions."""
        self._check_init()
        with self._lock:
            return list(self._sessions)

    def CreateSession(self):
        self._check_init()
        return self._new_session()

    cdef Session _new_session(self):
        s = self._factory()
        if not isinstance(s, Session):
            raise TypeError(f"the session factory returned {type(s).__name__}, "
                            f"not a Session")
        _check_unused(<Session>s)
        return <Session>s

    cdef bint _admit(self, port_sock_t sock, Session s) noexcept:
        """May one more session start?  (max_sessions, the per-address limits)"""
        return _admit_connection(self, sock, s)

    cdef bint _session_connected(self, Session s) noexcept:
        cdef bint stopping
        self._lock_acquire()
        try:
            self._sessions.add(s)
            if self._admitting > 0:
                self._admitting -= 1
            self.total_sessions += 1
            stopping = self._stopping
        finally:
            self._lock_release()
        if stopping:
            _close_now(s, self._shutdown_reason, False)
            return False
        self._watch_idle(s)
        _watch_stalls(self, s)
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
        """Disconnect sessions that received nothing for their idle_timeout.  Time spent
        in the session's own hooks is ours, not the peer's: what it sent meanwhile
        waits behind the hook on its strand (a hook blocking 1.5 s had a peer talking
        every 0.1 s cut "nothing received for 0.5 s").  A session seen in a hook is
        counted idle from the last sweep that saw it there (this sweep's own record:
        no field, no cost on the receive path)."""
        cdef Session s
        cdef int64_t now = port_monotonic_ms(), since
        cdef double idle
        busy = self._idle_busy
        seen = None
        for s in self.sessions:
            idle = s._hooks.idle_timeout
            if idle <= 0 or s._state != S_CONNECTED:
                continue
            since = s._last_recv_ms
            if port_atomic_load32(&s._hook) != H_NONE:
                since = now
            elif busy is not None:
                since = max(since, <int64_t>busy.get(s, since))
            if since > s._last_recv_ms:
                if seen is None:
                    seen = {}
                seen[s] = since
            if now - since >= <int64_t>(idle * 1000):
                if _begin_disconnect(s, f"idle timeout: nothing received for {idle:g} s",
                                       True):
                    self.idle_disconnects += 1
        self._idle_busy = seen

    cdef void _session_done(self, Session s) noexcept:
        cdef int kind = _session_disconnect_kind(self, s)     # not under the lock: why there
        self._lock_acquire()
        try:
            self._sessions.discard(s)
            _stats_session_done(self, s, kind)
        finally:
            self._lock_release()

    cdef int _check_init(self) except -1:
        """A subclass whose __init__ forgot super().__init__(...) has nothing set up:
        said here, not as a None met deep inside (Start's "no Listener", stats()'s
        "__exit__", a len() of None)."""
        if self._sessions is None:
            raise RuntimeError(f"{type(self).__name__}.__init__ was not called (a "
                               f"subclass's __init__ must call super().__init__(...))")
        return 0

    cdef int _check_startable(self) except -1:
        self._check_init()
        self.core._refuse_if_forsaken()
        if self._stopping:
            raise RuntimeError("this service was stopped, and a stopped service cannot "
                               "start again: make a new one")
        if self._started:
            raise RuntimeError("the service is already started")
        return 0

    def Start(self, int workers=0):
        """Make one session with the factory (its exception, if it raises, is Start's),
        then bind, listen and post the accepts, and return a ``RunHandle`` at once (its
        ``.port`` is the bound port, useful with ``Listener(0)``).  With ``workers=N``
        it also starts N worker threads looping ``Dispatch``; ``handle.Stop()`` (or
        leaving ``with service.Start(workers=2) as handle:``) shuts down as ``Run``
        does.  With ``workers=0`` your own threads call ``Dispatch``.  A stopped service
        cannot start again (RuntimeError)."""
        if workers < 0:
            raise ValueError("workers must be >= 0")
        self._check_startable()
        if self.listener is None:
            raise RuntimeError("this service has no Listener")
        # Before listening: a factory that cannot make a session fails Start here, with
        # its own exception, instead of leaving every accept slot empty.
        first = self._new_session()
        if workers == 1:
            # Its one worker dispatches the core until the handle closes it, as in
            # Run(workers=1): io_uring gives that worker a ring of its own.
            self.core._single_dispatcher()
        self._started = True
        self._close_cb = self._on_core_close
        self.core._add_close_callback(self._close_cb)
        try:
            (<Listener>self.listener)._start(self.core, self, self.accepts,
                                             first)
        except BaseException:
            self.core._remove_close_callback(self._close_cb)
            self._started = False
            raise
        return RunHandle(self, workers)       # run.py

    def _on_core_close(self):
        self._begin_stop(self._shutdown_reason)

    def _end_abandoned(self):
        """The core's port was shut with sessions of this service still open (see
        IocpCore._release_after_shutdown): nothing completes for them any more, so each
        ends here (socket reset, OnDisconnected with the shutdown's reason).  All are
        closed before any OnDisconnected runs: one that Sends or Broadcasts to another
        finds it closed, not open on the shut port (which ended it with the port's
        error in place of the shutdown's reason)."""
        cdef Session s
        sessions = self.sessions
        for s in sessions:
            _close_unfinished(s, self._shutdown_reason, True)
        for s in sessions:
            _maybe_finish(s)

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
        _limits_stopping(self)
        _stats_stopping(self)
        for burst in self._log_bursts:
            (<LogBurst>burst).flush()
        if self.listener is not None:
            try:
                self.listener.Close()
            except Exception:
                logger.exception("closing the listener failed")
        for s in sessions:
            _stop_session(<Session>s, reason)
        self._stop_event.set()

    def Stop(self, double timeout=5.0):
        """Graceful shutdown (any thread): stop accepting, let the hooks running finish
        (what they send is flushed, as is everything queued, up to ``flush_timeout``),
        start no new OnRecv, disconnect every session, and wait up to ``timeout``
        seconds for them to finish, whatever a hook does; the warning then names each
        session still open and the hook it is in.  From a worker thread it does not
        wait.  Under ``Run`` it also makes ``Run`` return."""
        if timeout != timeout:
            raise ValueError("timeout must be a number of seconds, not NaN")
        self._check_init()
        self._begin_stop(self._shutdown_reason)
        if iocpnet_get_tls_core() == <void *>self.core:
            return
        self._wait_stopped(_time.monotonic() + timeout, timeout)

    cdef bint _wait_stopped(self, double deadline, double timeout) except? False:
        """Wait for the sessions and accepts to end, until `deadline` (or at once after
        Run's second signal); False if some are left (they are named in a warning)."""
        cdef Session s
        while len(self._sessions) > 0 or (self.listener is not None and
                                          self.listener.accepts_posted > 0):
            # Run's signal handler runs only when the main thread runs Python code or
            # asks; this loop is C, and a signal may have woken another thread.
            PyErr_CheckSignals()
            if self._force:
                return False
            if _time.monotonic() >= deadline:
                now = port_monotonic_ms()
                left = self.sessions
                named = "; ".join(_describe_open(s, now) for s in left[:10])
                if len(left) > 10:
                    named += f"; and {len(left) - 10} more"
                logger.warning("%d session(s) still open after %.1f s of shutdown: %s",
                               len(left), timeout, named or "(accepts in flight)")
                return False
            if self.core._dispatchers > 0:
                _time.sleep(0.002)
            elif self.core.Dispatch(20) < 0:
                return False
        return True

    def _stop_at_once(self):
        """Run's second signal: stop waiting, reset what is still open."""
        self._force = True
        port_atomic_store32(&self.core._abandon, 1)

    def stats(self):
        """The service's figures as a dict (see the README's Metrics section)."""
        self._check_init()
        return _service_stats(self)

    def ServeMetrics(self, int port=0, str host="127.0.0.1", *, name=None,
                     request_timeout=None, max_connections=None):
        """Serve stats() over HTTP for Prometheus (needs ``iocpnet[metrics]``); returns
        the server (``.port``, ``.Close()``), closed by ``Stop()``.  After ``Stop()``:
        RuntimeError.  ``request_timeout`` and ``max_connections`` go to
        ``MetricsServer`` (None: its defaults, 10 s and 32)."""
        self._check_init()
        options = {}
        if request_timeout is not None:
            options["request_timeout"] = request_timeout
        if max_connections is not None:
            options["max_connections"] = max_connections
        return _serve_metrics(self, port, host, name, options)

    def Broadcast(self, data, sessions=None):
        """Send the same bytes to every live session (or to ``sessions``), queued by
        reference: the packet is built once.  Returns how many sessions took it."""
        self._check_init()
        data = _bytes_arg(data, "Broadcast", "data")
        targets = self.sessions if sessions is None else sessions
        n = 0
        for s in targets:
            if (<Session>s).Send(data):
                n += 1
        return n

    def Run(self, workers=None, *, seconds=None, double shutdown_timeout=5.0):
        """Start, run ``workers`` threads looping Dispatch, and return after ``Stop()``,
        SIGINT or SIGTERM (or after ``seconds``, if given), with a graceful shutdown:
        stop accepting, disconnect the sessions, drain the operations, join the workers,
        close the core, all within ``shutdown_timeout`` seconds whatever a hook does
        (Stop's warning names the sessions and hooks that held it up).  A second
        SIGINT/SIGTERM stops at once: what is still open is reset, and Run returns.

        ``workers=None`` picks ``default_workers()``: 1 with a GIL (more threads only
        take turns at the GIL and hand the port back and forth), one per core up to 8
        on free-threaded Python (hooks then run in parallel).  Hooks that block need
        more workers than that."""
        self._check_init()
        _run_service(self, workers, seconds=seconds, shutdown_timeout=shutdown_timeout)

    def _run_ended(self):
        """Run is returning (run.py): the core no longer stops this service on close."""
        self.core._remove_close_callback(self._close_cb)

    def _from_worker(self):
        """Is the calling thread one of this service's core's workers (in a batch)?"""
        return iocpnet_get_tls_core() == <void *>self.core

    def _shut_down(self, threads, double timeout):
        """Run's (and a RunHandle's) shutdown, with one deadline for everything: the
        sessions (Stop), the operations (Close), the worker threads (joined)."""
        cdef double deadline = _time.monotonic() + timeout
        core = self.core
        self._begin_stop(self._shutdown_reason)
        if iocpnet_get_tls_core() == <void *>core:
            core.Close(timeout)           # from a worker: nothing to wait for here
            return
        self._wait_stopped(deadline, timeout)
        if self._force:
            for s in self.sessions:
                _close_now(<Session>s, f"{self._shutdown_reason} (stopped at once)", True)
        core.Close(0.0 if self._force else max(0.0, deadline - _time.monotonic()))
        # Workers not in a hook leave Dispatch as soon as the port is shut: a moment for
        # them even past the deadline (or after a second signal).
        joined_by = max(deadline if not self._force else 0.0, _time.monotonic() + 0.2)
        me = threading.current_thread()
        for t in threads:
            while t is not me and t.is_alive() and _time.monotonic() < joined_by:
                t.join(0.05)
        stuck = [t.name for t in threads if t is not me and t.is_alive()]
        if stuck:
            logger.warning("returning with worker thread(s) %s still busy (in a hook); they "
                           "end, and the core closes, once it has returned and what it "
                           "left has completed", ", ".join(stuck))


# The original names the accepting service ServerService; it is Service itself (an
# alias: same class, same repr), kept so that code written after the original reads.
ServerService = Service


cdef class ClientService(Service):
    """Connects ``count`` client sessions to ``address`` (dummy clients, server to
    server links), IPv4 or IPv6.  Each session gets the usual hooks; a connection that
    cannot be made gets ``OnConnectFailed(reason)`` then ``OnDisconnected(reason)``.
    With ``reconnect`` (True, or a ``Reconnect`` policy) every session that ends is
    replaced by a new connection after the policy's delay, until ``Stop()``.
    ``ssl``: an ``ssl.SSLContext`` (client side): the sessions speak TLS, sending
    ``server_hostname`` (default: the address's host) for SNI and certificate checks;
    a failed handshake is a failed connection (OnConnectFailed).
    """
    cdef object _address
    cdef port_addr_t _addr
    cdef readonly int count
    cdef readonly object reconnect
    cdef int _failures
    cdef set _retry_timers
    cdef readonly uint64_t connect_failures
    cdef readonly object ssl
    cdef readonly object server_hostname
    cdef tuple _ws_target         # (Host header, path) for a ws:// URL (websocket.pxi)
    cdef bint _factory_takes_index    # factory(index): bot i of count
    cdef dict _indexes                # session -> its index (kept across reconnects)
    cdef int _next_index
    cdef dict _up_since               # session -> ms it connected (the policy's reset)

    def __init__(self, IocpCore core, address, session_factory, int count=1, *,
                 reconnect=None, ssl=None, server_hostname=None):
        cdef int rc
        if isinstance(address, str):
            address, self._ws_target, ssl = _ws_parse_url(address, ssl)
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
            reconnect = Reconnect()           # run.py
        elif reconnect is False:
            reconnect = None
        if reconnect is not None and not hasattr(reconnect, "delay"):
            raise TypeError("reconnect must be True or a Reconnect policy")
        self.reconnect = reconnect
        self._retry_timers = set()
        self.ssl = _tls_context(ssl)
        if server_hostname is None and self.ssl is not None:
            server_hostname = self._address[0]
        self.server_hostname = server_hostname or None
        self._indexes = {}
        self._up_since = {}
        self._factory_takes_index = _takes_an_argument(session_factory)
        host = _host_bytes(self._address[0])
        rc = port_resolve(host, self._address[1], 0, &self._addr)
        if rc != 0:
            raise port_error(rc, f"resolving {self._address[0]!r}")

    @property
    def address(self):
        return self._address

    def Start(self, int workers=0):
        """Open the connections; returns a ``RunHandle`` (``workers=N`` starts worker
        threads, as ``Service.Start`` does)."""
        if workers < 0:
            raise ValueError("workers must be >= 0")
        self._check_startable()
        if workers == 1:
            self.core._single_dispatcher()     # as Service.Start(workers=1)
        self._started = True
        self._close_cb = self._on_core_close
        self.core._add_close_callback(self._close_cb)
        for _ in range(self.count):
            self.Connect()
        return RunHandle(self, workers)       # run.py

    def Connect(self, session=None):
        """Open one more connection, with `session` or a new one from the factory;
        returns the session (connecting).  A factory that takes one argument is given
        the session's index: 0 to count-1 for the first ones, the next numbers after;
        a reconnect keeps the index of the session it replaces."""
        self._check_init()
        return self._connect(session, -1)

    cdef Session _connect(self, object session, int index):
        cdef Session s
        if self._stopping:
            raise RuntimeError(f"{type(self).__name__} is stopped: it makes no more "
                               f"connections (make a new one)")
        if session is None:
            if index < 0:
                with self._lock:
                    index = self._next_index
                    self._next_index += 1
            if self._factory_takes_index:
                made = self._factory(index)
                if not isinstance(made, Session):
                    raise TypeError(f"the session factory returned {type(made).__name__}, "
                                    f"not a Session")
                s = <Session>made
            else:
                s = self._new_session()
        else:
            s = session
            index = -1
        s._attach(self.core, self)
        try:
            if self.ssl is not None:
                s._tls = _Tls.create(self.ssl, False, self.server_hostname)
            if self._ws_target is not None or s._ws is not None:
                target = self._ws_target or _ws_default_target(self._address)
                _ws_enable(s, True, target[0], target[1])
            with self._lock:
                self._sessions.add(s)
                self.total_sessions += 1
                if index >= 0:
                    self._indexes[s] = index
            s._start_connect(&self._addr)
        except BaseException:
            with self._lock:
                self._sessions.discard(s)
                self._indexes.pop(s, None)
            s._detach()
            raise
        return s

    cdef bint _session_connected(self, Session s) noexcept:
        # Already in the set since the connect started.
        if self._stopping:
            _close_now(s, self._shutdown_reason, False)
            return False
        if self.reconnect is not None:
            with self._lock:
                self._up_since[s] = port_monotonic_ms()
        if s._tls is None:
            self._session_ready()
        self._watch_idle(s)
        _watch_stalls(self, s)
        return True

    cdef void _session_ready(self) noexcept:
        """A connection came up (with TLS: its handshake is done): the policy resets,
        unless it asks for the connection to stay up reset_after seconds first (then
        _session_done decides)."""
        if _reset_after(self.reconnect) > 0:
            return
        with self._lock:
            self._failures = 0

    cdef void _session_done(self, Session s) noexcept:
        Service._session_done(self, s)
        cdef double reset_after
        with self._lock:
            index = self._indexes.pop(s, -1)
            up_since = self._up_since.pop(s, None)
        if not s._was_connected:
            with self._lock:
                self.connect_failures += 1
                self._failures += 1
        elif up_since is not None:
            reset_after = _reset_after(self.reconnect)
            if reset_after > 0:
                # A server that accepts and closes at once must be backed off from
                # (and max_attempts end it), not reconnected to every `initial` s.
                with self._lock:
                    if port_monotonic_ms() - <int64_t>up_since >= \
                            <int64_t>(reset_after * 1000):
                        self._failures = 0
                    else:
                        self._failures += 1
        if self.reconnect is not None and not self._stopping:
            self._schedule_retry(index)

    cdef void _schedule_retry(self, int index=-1) noexcept:
        try:
            limit = self.reconnect.max_attempts
            spent = limit is not None and self._failures >= limit
        except Exception:
            logger.exception("the reconnect policy's max_attempts cannot be read")
            return
        if spent:
            logger.warning("giving up on %s:%d after %d failed connection attempts "
                           "(refused, or closed before the policy's reset_after)",
                           self._address[0], self._address[1], self._failures)
            return
        try:
            delay = float(self.reconnect.delay(self._failures))
            holder = []
            t = self.core.CallLater(delay, self._retry, holder, index)
            with self._lock:
                # A short delay may have run _retry on another worker already (3.13t,
                # or this thread preempted here): then it left a mark and t is spent.
                if not holder:
                    holder.append(t)
                    self._retry_timers.add(t)
        except Exception:
            if not self.core._closing:
                logger.exception("cannot schedule a reconnect")

    def _retry(self, holder, int index=-1):
        with self._lock:
            if holder:
                self._retry_timers.discard(holder[0])
            else:
                holder.append(None)     # ran before _schedule_retry registered it
        if self._stopping:
            return
        try:
            self._connect(None, index)
        except Exception as e:
            logger.warning("reconnecting to %s:%d failed: %s", self._address[0],
                           self._address[1], e)
            with self._lock:
                self.connect_failures += 1
                self._failures += 1
            self._schedule_retry(index)

    cdef void _begin_stop(self, str reason) noexcept:
        Service._begin_stop(self, reason)
        with self._lock:
            timers = list(self._retry_timers)
            self._retry_timers.clear()
        for t in timers:
            t.Cancel()

    def _on_core_close(self):
        self._begin_stop(self._shutdown_reason)


cdef double _reset_after(object policy):
    """How long a connection must stay up to reset the policy (0: as soon as it is up,
    for a policy that does not say: the backplane's own counts failures itself)."""
    try:
        # At most 1e12 s (inf: never reset), so that the C cast to ms stays defined.
        return min(1e12, max(0.0, float(getattr(policy, "reset_after", 0.0))))
    except Exception:
        return 0.0


cdef bint _takes_an_argument(object factory):
    """Does the session factory take one required positional argument (the index)?"""
    import inspect
    try:
        sig = inspect.signature(factory)
    except (TypeError, ValueError):
        return False
    for p in sig.parameters.values():
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty:
            return True
    return False
