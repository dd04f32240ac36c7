# core/port.pxi: IocpObject, IocpCore (the completion port and Dispatch) and _complete.
# Included by _core.pyx (one extension module, one file per concern).


cdef extern from *:
    """
    /* IocpCore._now_ms from a reading of iocpnet_clock_ns (stats.pxi), so that a batch
     * reads the clock once at its start: on POSIX both are CLOCK_MONOTONIC, and this is
     * exactly port_monotonic_ms(); Windows' tick count is another clock. */
    #ifdef _WIN32
    #  define iocpnet_ms_of_clock(ns) port_monotonic_ms()
    #else
    #  define iocpnet_ms_of_clock(ns) ((ns) / 1000000)
    #endif
    """
    int64_t _ms_of_clock "iocpnet_ms_of_clock"(int64_t ns) nogil


cdef object _refuse_copy(object obj, str what):
    """copy.copy, copy.deepcopy and pickle all end in __reduce_ex__: a copy of an object
    that stands for native state made a second one sharing it (copy.copy(service) did:
    two services, one listener, one session set), or failed with Cython's own words."""
    raise TypeError(f"{type(obj).__name__} cannot be copied or pickled: it stands for "
                    f"{what}, which a copy would share; make a new one instead")


cdef class IocpObject:
    """An owner of port operations: the Listener, a Session, a Group, a job or a timer.

    The original's ``IocpObject::Dispatch(iocpEvent, numOfBytes)``: each completion is
    routed to the object that submitted the operation.
    """
    cdef IocpCore core

    cdef void _dispatch(self, port_cqe_t *cqe) noexcept:
        pass

    def __reduce_ex__(self, protocol):
        _refuse_copy(self, "live native state (a socket, a strand, operations in "
                           "flight on a completion port)")


# The cores of this process (weakly): a child made by fork lets go of every one of them
# (IocpCore._forsake), since it shares their kernel objects with its parent.
_cores_to_forsake = _weakref.WeakSet()


def _forsake_inherited_cores():
    for core in list(_cores_to_forsake):
        (<IocpCore>core)._forsake()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forsake_inherited_cores)


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
    cdef volatile int32_t _abandon     # Close stops waiting at once (Run's second signal)
    cdef volatile int32_t _dispatchers
    cdef volatile int32_t _batches_waiting   # workers holding completions, waiting for the GIL
    cdef volatile int32_t _in_batch    # batches being dispatched (hooks running)
    # Close's deadline passed with a hook still running: the port stays open so that the
    # workers drain what that hook's session and the rest left (see _maybe_shutdown).
    cdef volatile int32_t _draining
    cdef volatile int32_t _drain_lock  # a spin lock guarding _drain_until
    cdef int64_t _drain_until          # ms: the drain gives up if nothing ran since
    cdef volatile int32_t _dropped_told   # the drain's first dropped job was warned about
    cdef volatile int32_t _closers     # Close calls waiting for the port to be quiet
    cdef int64_t _now_ms
    cdef _BatchStats _batches         # stats.pxi
    cdef bint _recv_multishot
    cdef Py_ssize_t _recv_buffer_size    # bytes per receive buffer of the port
    cdef object _lock
    cdef list _close_callbacks
    cdef set _timers
    cdef dict _flush_watch
    cdef object _housekeeping
    cdef object _stall_watch      # the send_timeout sweep (core/stall.pxi), made on demand
    cdef object _aio              # the asyncio loop thread of Spawn (iocpnet.aio), or None
    cdef volatile int64_t _jobs   # Post()ed and not yet run (atomic; timers.pxi)
    cdef Py_ssize_t _post_limit
    cdef bint _forsaken           # inherited by a forked child: closed, the port let go
    cdef object __weakref__

    def __cinit__(self, backend=None, *, int recv_buffer_size=0, int recv_buffer_count=0,
                  int queue_depth=0, recv_multishot=None, double recv_pool_window=5.0):
        cdef port_options_t opts
        cdef char err[512]
        cdef int rc
        cdef const char *cname = NULL
        err[0] = 0
        self.port = NULL
        self._post_limit = DEFAULT_CORE_POST_QUEUE_LIMIT
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
        # What a spike made is kept this long after the last time it was needed.
        if not (0.001 <= recv_pool_window <= 86400.0):
            raise ValueError(f"recv_pool_window must be 0.001 to 86400 seconds, "
                             f"not {recv_pool_window!r}")
        opts.recv_pool_window_ms = <uint32_t>(recv_pool_window * 1000.0 + 0.5)
        if recv_multishot is None:
            # Receives stay armed by default on Linux: one submission per arming instead
            # of one per message.  Both backends bound an arming's read-ahead (io_uring:
            # 64 KiB on 6.16+, one-shot on older kernels; epoll: 4 buffers' worth, 64
            # reads, or one read queued behind a busy strand).  IOCP's are one-shot.
            recv_multishot = _sys.platform.startswith("linux")
        opts.flags = PORT_OPT_RECV_MULTISHOT if recv_multishot else 0
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
        # A session that pauses for backpressure cancels a receive kept armed, rather
        # than just not posting the next one.
        self._recv_multishot = (opts.flags & PORT_OPT_RECV_MULTISHOT) != 0
        self._recv_buffer_size = port_recv_buffer_size(self.port)
        port_atomic_add64(&_cores_alive, 1)
        _cores_to_forsake.add(self)
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

    cdef void _forsake(self) noexcept:
        """In a child made by fork: this core is the parent's.  Its port lets go of the
        kernel objects it shares with the parent (port_forsake), and the core is closed:
        Dispatch returns -1 (a worker that forked leaves its batch and its loop), Close
        returns at once, nothing is submitted.  The child makes an IocpCore of its own."""
        if self.port == NULL or self._forsaken:
            return
        port_forsake(self.port)
        self._forsaken = True
        self._closing = 1
        self._closed = 1

    def __reduce_ex__(self, protocol):
        _refuse_copy(self, "a completion port (a kernel object and its workers' state)")

    def _refuse_if_forsaken(self):
        """RuntimeError, saying why, if this core was inherited through fork()
        (_forsake): Start and Run in the child fail instead of serving nothing."""
        if self._forsaken:
            raise RuntimeError(
                "this IocpCore was made before a fork() and this process is the child: "
                "the core is its parent's (the kernel's io_uring ring or epoll set is "
                "shared with it) and is closed here; make the IocpCore, its Listener and "
                "Service after the fork (daemonize first, then start)")

    def __dealloc__(self):
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
        ``Close()``.  A reply a hook sends leaves before the next hook of the batch runs
        (at once when the socket takes it); whatever else the hooks submitted reaches the
        kernel before ``Dispatch`` returns, so a loop polling ``Dispatch(0)`` once per
        frame reads a message and sends its reply in the same frame.

        A worker handles the batch it took in order, so a hook that blocks delays the
        rest of its batch whatever the number of workers; ``max_batch`` (1 to 128)
        bounds that, at some cost in throughput.
        """
        if self.port == NULL or self._closed:
            return -1
        if max_batch < 1 or max_batch > BATCH:
            max_batch = BATCH
        return self._dispatch(timeout_ms, max_batch, True)

    def _single_dispatcher(self):
        """``Run`` with one worker: that worker will be the only thread dispatching this
        core until it closes, which lets io_uring run completion work in its waits
        (``port_single_dispatcher``; cheaper per completion).  True if the port took it
        (io_uring, kernel 6.1+, nothing submitted yet)."""
        if self.port == NULL or self._closed:
            return False
        return port_single_dispatcher(self.port) == 0

    def _work(self):
        """A worker thread's loop (``Run``): ``Dispatch()`` until the core closes, with
        the submissions of one batch going to the kernel together with the next wait
        (one system call per batch), which ``Dispatch`` cannot do since its caller may
        not wait again soon."""
        if self.port == NULL:
            return
        self._refuse_if_forsaken()     # a service started before a fork, Run in the child
        try:
            while self._dispatch(-1, BATCH, False) >= 0:
                pass
        finally:
            _drop_spare_view()      # recv_view.pxi: the worker's spare OnRecv view

    cdef int _dispatch(self, int timeout_ms, int max_batch, bint end_batch) except -2:
        cdef port_cqe_t batch[BATCH]
        cdef int n = 0, i, handled = 0, wait_ms = timeout_ms
        cdef int64_t t0, trim_ms
        cdef port_t *port = self.port
        cdef void *prev
        cdef int64_t deadline = port_monotonic_ms() + timeout_ms if timeout_ms > 0 else 0
        if port == NULL or self._closed:
            if not end_batch and port != NULL:
                port_batch_end(port)
            return -1
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
            if port_atomic_load32(&self._draining):
                if port_atomic_add32(&self._in_batch, 0) > 0:
                    # A hook still runs past Close's deadline: the worker running it
                    # drains what is left once it returns; the others leave now.
                    if not end_batch:
                        port_batch_end(port)
                    return -1
                if not 0 <= wait_ms <= 100:
                    wait_ms = 100    # the drain's deadline is checked between waits
            elif prev == <void *>self and not 0 <= wait_ms <= 100:
                # Called from a hook of this core (a nested loop): waits in slices, to
                # leave once Close hands the rest to a drain.  Close's wake-ups are
                # completions like any other: an idle worker may reap them all.
                wait_ms = 100
            while True:
                n = 0
                if _held_batches() < HELD_BATCHES_MAX and port_work_waiting(port):
                    # Completions wait already (a busy server's next batch, on io_uring
                    # with one dispatcher): a poll takes them without handing the GIL
                    # over and back, about 400 instructions a batch.  The GIL is still
                    # given up for the wait after HELD_BATCHES_MAX such batches in a
                    # row, so other threads' turns never hang on hooks' bytecode alone.
                    n = port_wait(port, batch, max_batch, 0)
                    if n > 0:
                        _held_batch(1)
                if n == 0:      # (a signal or the close the poll saw is handled below)
                    _held_batch(0)
                    with nogil:
                        n = port_wait(port, batch, max_batch, wait_ms)
                        if n > 0:
                            port_atomic_add32(&self._batches_waiting, 1)
                    if n > 0:
                        port_atomic_add32(&self._batches_waiting, -1)
                if n > 0:
                    port_atomic_add32(&self._in_batch, 1)
                if n == PORT_EINTR:
                    # Ctrl-C on the main thread ends up here, and so do the program's
                    # own signal handlers: one that calls Close or Stop runs on a
                    # thread in Dispatch, which must not wait for the workers to drain
                    # (this one would wait for itself): marked as a worker, as in a hook.
                    iocpnet_set_tls_core(<void *>self)
                    try:
                        PyErr_CheckSignals()
                    finally:
                        iocpnet_set_tls_core(prev)
                    if self._closing and not self._closed:
                        self._maybe_shutdown()    # a Close with nothing left in flight
                    if timeout_ms > 0:
                        wait_ms = <int>(deadline - port_monotonic_ms())
                        if wait_ms <= 0:
                            n = 0
                            break
                    continue
                if n == 0 and wait_ms != timeout_ms and prev == <void *>self:
                    # A slice of a nested wait (above) ended.
                    if port_atomic_load32(&self._draining):
                        n = PORT_ECLOSED
                        break
                    if timeout_ms > 0:
                        wait_ms = <int>(deadline - port_monotonic_ms())
                        if wait_ms <= 0:
                            break
                        wait_ms = min(wait_ms, 100)
                    continue
                break
            if n <= 0 and not end_batch:
                port_batch_end(port)      # the worker is leaving, or not dispatching
            if n < 0:
                if n == PORT_ECLOSED:
                    return -1
                raise port_error(n, "waiting for completions")
            t0 = iocpnet_clock_ns()
            self._now_ms = _ms_of_clock(t0)
            iocpnet_set_tls_core(<void *>self)
            for i in range(n):
                if self._forsaken:
                    break       # a hook forked, and this is the child: the rest is the parent's
                handled += _complete(self, &batch[i])
                # A reply queued on the port (not sent at once) goes to the kernel
                # before the next hook, which may block, runs.
                if _take_sent():
                    port_flush_sends(port)
            if end_batch:
                port_batch_end(port)
            if n > 0:
                _batch_done(self, n, handled, t0)
                # The receive pool grew above its floor: its trimmer starts.
                trim_ms = port_recv_pool_grew(port)
                if trim_ms > 0:
                    self._arm_pool_trim(trim_ms)
            return n
        finally:
            iocpnet_set_tls_core(prev)
            if end_batch:
                _drop_spare_view()  # Dispatch's caller may not dispatch again
            if n > 0:
                port_atomic_add32(&self._in_batch, -1)
                if port_atomic_load32(&self._draining):
                    self._drain_progress()
            port_atomic_add32(&self._dispatchers, -1)
            if self._closing and not self._closed:
                self._maybe_shutdown()

    cdef bint _batch_held(self) noexcept:
        """A worker holds completions it reaped: waiting for the GIL, or dispatching
        them (its hooks may yet run, and submit more)."""
        return port_atomic_load32(&self._batches_waiting) > 0 or \
            port_atomic_add32(&self._in_batch, 0) > 0

    cdef void _drain_progress(self) noexcept:
        """A batch ended while draining: the drain goes on for DRAIN_IDLE_MS more."""
        port_spin_lock(&self._drain_lock)
        self._drain_until = port_monotonic_ms() + DRAIN_IDLE_MS
        port_spin_unlock(&self._drain_lock)

    cdef void _maybe_shutdown(self) noexcept:
        """Shut the port once nothing is in flight and no batch is being dispatched
        (Close called from a worker, or a drain after Close's deadline; see Close).  A
        drain also ends when no hook runs and nothing was dispatched for DRAIN_IDLE_MS:
        what is left then never completes, and is abandoned as Close would have."""
        cdef port_stats_t st
        cdef int64_t until
        if not port_atomic_load32(&self._draining) and port_atomic_load32(&self._closers):
            return      # a Close waiting in another thread shuts it (see Close)
        port_get_stats(self.port, &st)
        if self._closed or self._batch_held():
            return      # a batch still being dispatched may submit more: its end decides
        if st.in_flight > 0:
            if not port_atomic_load32(&self._draining):
                return
            port_spin_lock(&self._drain_lock)
            until = self._drain_until
            port_spin_unlock(&self._drain_lock)
            if port_monotonic_ms() < until:
                return
        if port_atomic_xchg32(&self._closed, 1) == 0:
            port_shutdown(self.port)
            if st.in_flight > 0:
                logger.warning("%d operation(s) still in flight %.1f s after the last hook "
                               "returned; closing the port anyway (their owners are "
                               "abandoned)", st.in_flight, DRAIN_IDLE_MS / 1000.0)
            self._release_after_shutdown()

    cdef bint _drops_job(self, object func) noexcept:
        """Past Close's deadline (draining) a posted job is dropped, not run: one that
        posts itself again made every batch progress, so the drain, and the core, never
        ended.  The first one dropped is warned about."""
        if not port_atomic_load32(&self._draining):
            return False
        if func is not _drain_wakeup and port_atomic_xchg32(&self._dropped_told, 1) == 0:
            logger.warning("a job posted to the core or a group after Close's deadline is "
                           "dropped, not run (%r; so are any after it)", func)
        return True

    cdef void _release_after_shutdown(self) noexcept:
        # Nothing can complete any more: drop what still refers to sessions.
        with self._lock:
            callbacks = self._close_callbacks
            self._flush_watch.clear()
            self._housekeeping = None
            self._stall_watch = None
            self._close_callbacks = []
        # Sessions still open here were abandoned (Close's deadline passed, or a drain
        # ended, with nobody dispatching them): end them now, on this thread, with no
        # lock held.  Left open, their sockets stayed open and the first call that
        # touched one (a Send from any thread, under a TLS or WebSocket send lock) ran
        # its OnDisconnected inside it.
        for cb in callbacks:
            end = getattr(getattr(cb, "__self__", None), "_end_abandoned", None)
            if end is not None:
                try:
                    end()
                except BaseException:
                    logger.exception("ending the sessions of %r failed", cb.__self__)

    def __enter__(self):
        """``with IocpCore() as core:`` closes the core at the end of the block.  A core
        already closed (or closing) refuses the block: everything in it would fail
        later, one call at a time, on the shut port."""
        if self.port == NULL or self._closing or self._closed:
            raise RuntimeError("the IocpCore is closed: a with block needs an open core "
                               "(make a new IocpCore)")
        return self

    def __exit__(self, *exc_info):
        """``Close()`` with its default timeout; an exception of the block goes on."""
        self.Close()

    def Close(self, double timeout=5.0):
        """Stop: disconnect the services using this core, cancel timers and the tasks of
        ``Spawn`` (waited for within ``timeout``), wait (up to the same
        ``timeout`` seconds) for every operation in flight to complete and be
        dispatched (the sessions' ``OnDisconnected`` included), then wake every thread
        in ``Dispatch`` (they return -1) and wait, within the same ``timeout``, for
        them to leave it.  Idempotent, any thread.

        If a hook still runs at the deadline (or after Run's second signal), Close
        returns then, the workers not in a hook leave ``Dispatch`` (-1), and the core
        closes by itself once the last such hook has returned: its worker goes on
        dispatching what is left (that session's end, the accepts cancelled
        meanwhile), so that everything is released, and shuts the port when nothing
        is in flight, or when nothing was dispatched for 5 s (the rest is then
        abandoned, and warned about).  ``closed`` says when it is shut.  Jobs posted
        (core or group ``Post``) that run after the deadline are dropped, with a
        warning: one that posts itself again would keep the core open for good.

        Called from a worker thread (inside a hook or job, or a signal handler that ran
        while its thread waited in ``Dispatch``) it does not wait: the last completion
        ends the port.
        """
        cdef port_stats_t st
        cdef bint drain = False
        cdef uint64_t quiet_at = 0       # completions counted when last seen quiet, + 1
        cdef bint in_worker = iocpnet_get_tls_core() == <void *>self
        if timeout != timeout:      # a deadline of NaN never comes
            raise ValueError("timeout must be a number of seconds, not NaN")
        if self.port == NULL or self._forsaken:
            return
        with self._lock:
            if self._closing:
                first = False
            else:
                self._closing = 1
                first = True
            callbacks = list(self._close_callbacks)
            timers = list(self._timers)
            runner = self._aio
        deadline = _time.monotonic() + timeout
        if first:
            for cb in callbacks:
                try:
                    cb()
                except Exception:
                    logger.exception("a close callback raised")
            if runner is not None:
                # Its tasks cancelled and waited for within this Close's timeout, not
                # the runner's own 5 s (a task ignoring its cancellation held Run's
                # shutdown_timeout of 0.5 s to 5 s).
                try:
                    runner.close(max(0.0, deadline - _time.monotonic()))
                except Exception:
                    logger.exception("closing the asyncio loop thread failed")
            for t in timers:
                # The user's timers stop; the core's own (the flush deadline sweep) go
                # on, so that sessions still flushing are closed at their deadline.
                if not (<Timer>t)._internal:
                    (<Timer>t).Cancel()
        if in_worker:
            return
        # While a Close waits here, it is the one to shut the port: a worker ending its
        # batch (_maybe_shutdown) could not see another that had just reaped.
        port_atomic_add32(&self._closers, 1)
        try:
            while not self._closed:
                port_get_stats(self.port, &st)
                # Reaped is not dispatched: a batch still running may yet call
                # OnDisconnected, or submit more.  And a worker that has just reaped
                # shows it only once its wait returns (completed counts it before): so
                # quiet twice, a poll apart, with nothing completed in between; with no
                # other thread dispatching, this one does, and it knows.
                if st.in_flight <= 0 and not self._batch_held():
                    if quiet_at == st.completed + 1 or self._dispatchers == 0:
                        break
                    quiet_at = st.completed + 1
                else:
                    quiet_at = 0
                PyErr_CheckSignals()      # Run's second signal, if this is the main thread
                if _time.monotonic() >= deadline or port_atomic_load32(&self._abandon):
                    if self._batch_held() or (st.in_flight > 0 and self._dispatchers > 0):
                        # A hook still runs (its session's end may be queued behind it,
                        # with nothing in flight), or a worker may yet reap the rest:
                        # the workers drain what is left once it returns
                        # (_maybe_shutdown).
                        drain = True
                    elif st.in_flight > 0:
                        logger.warning("%d operation(s) still in flight after %.1f s; "
                                       "closing the port anyway (their owners are "
                                       "abandoned)", st.in_flight, timeout)
                    break
                if self._dispatchers > 0:
                    _time.sleep(0.002)       # the workers drain it
                else:
                    self.Dispatch(20)        # nobody else is dispatching: drain it here
        finally:
            port_atomic_add32(&self._closers, -1)
        if drain and not self._closed:
            logger.warning("%d operation(s) in flight and a hook still running after "
                           "%.1f s; returning, and the core closes once the hooks have "
                           "returned and the rest has completed",
                           st.in_flight, timeout)
            self._drain_progress()
            port_atomic_store32(&self._draining, 1)
            # Wake the workers waiting for completions: while a hook runs they leave,
            # and the one left drains with waits of 100 ms at most, to check its
            # deadline.
            try:
                for _ in range(max(1, self._dispatchers)):
                    self.Post(_drain_wakeup)
            except Exception:
                pass
            if port_atomic_add32(&self._in_batch, 0) == 0:
                self._maybe_shutdown()
            return
        if port_atomic_xchg32(&self._closed, 1) == 0:
            port_shutdown(self.port)
        self._release_after_shutdown()
        # Threads in Dispatch leave it now; one still dispatching its last batch (an
        # OnDisconnected) finishes it first.
        while self._dispatchers > 0 and _time.monotonic() < deadline:
            _time.sleep(0.002)

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
            "recv_buffers_detached": st.recv_buffers_detached,
            "recv_waiting": st.recv_waiting,
            "recv_buffers_trimmed": st.recv_buffers_trimmed,
            "recv_buffers_peak": st.recv_buffers_peak,
            "recv_buffer_bytes": st.recv_buffers * self._recv_buffer_size,
        }

    # ---- jobs and timers (the PostQueuedCompletionStatus idiom) ----

    def Post(self, func, *args):
        """Run ``func(*args)`` on a worker thread (any thread may post).  Exceptions are
        logged; workers go on.  At most ``post_queue_limit`` jobs wait at once: past it
        Post raises ``queue.Full``.  On a closed core: RuntimeError (as CallLater)."""
        cdef _Job job
        if not callable(func):      # here, not later in a worker's log (as Group.Post)
            raise TypeError("func must be callable")
        job = _Job.__new__(_Job)
        # Bounded: threads posting faster than the workers run jobs grew the port's
        # queue without limit, and every completion waited behind it.
        if port_atomic_add64(&self._jobs, 1) > self._post_limit:
            port_atomic_add64(&self._jobs, -1)
            raise _queue.Full(f"{self._post_limit} jobs are waiting for the core's "
                              f"workers (post_queue_limit): posted faster than they run")
        job.core = self
        job.func = func
        job.args = args
        port_op_init(&job.op, PORT_OP_POST, <void *>job, NULL)
        _incref(<PyObject *>job)
        rc = port_post(self.port, &job.op, 0)
        if rc != 0:
            _decref(<PyObject *>job)
            port_atomic_add64(&self._jobs, -1)
            raise port_error(rc, "Post")

    @property
    def post_queue_limit(self):
        """Jobs ``Post`` may have waiting at once (default 100000; settable)."""
        return self._post_limit

    @post_queue_limit.setter
    def post_queue_limit(self, Py_ssize_t n):
        if n <= 0:
            raise ValueError("post_queue_limit must be positive")
        self._post_limit = n

    def CallLater(self, double delay, func, *args):
        """Run ``func(*args)`` on a worker thread after ``delay`` seconds; returns a
        ``Timer`` whose ``Cancel()`` stops it."""
        return self._start_timer(delay, 0.0, func, args)

    def CallEvery(self, double interval, func, *args):
        """Run ``func(*args)`` on a worker thread every ``interval`` seconds (a game
        tick) until the returned ``Timer`` is cancelled or the core closes.  A fixed
        rate: ticks whose deadline passed while the callback ran are skipped and counted
        in ``Timer.skipped``."""
        if interval <= 0:
            raise ValueError("interval must be positive")
        return self._start_timer(interval, interval, func, args)

    cdef Timer _start_timer(self, double delay, double interval, func, tuple args,
                            bint internal=False, IocpObject owner=None):
        cdef Timer t = Timer.__new__(Timer)
        if not callable(func):
            raise TypeError("func must be callable")
        # Written so that NaN fails too.  The delay becomes milliseconds through a C
        # cast, undefined for NaN and for what does not fit (inf ran at once; as an
        # interval, in a busy loop); 1e12 s (~31,700 years) is "never" enough.
        if not (delay <= 1e12 and interval <= 1e12):
            raise ValueError(f"a timer's delay and interval must be numbers of seconds "
                             f"up to 1e12, not {interval if interval else delay!r}")
        if delay < 0:
            delay = 0
        t.core = self
        t.func = func
        t.args = args
        t.interval = interval
        t._deadline_ms = <double>port_monotonic_ms() + delay * 1000.0
        t._internal = internal
        # An owner's (Session, Group) timer completes on the owner's strand.
        port_op_init(&t.op, PORT_OP_TIMER, <void *>t, _owner_strand(owner))
        with self._lock:
            refused = self._closed or (self._closing and not internal)
            if not refused:
                self._timers.add(t)
        if refused:
            if owner is None:
                raise RuntimeError("the IocpCore is closed")
            # A session or group ends with its core: its timer comes back cancelled, as
            # after its own end (an OnDisconnected that Close runs may ask for one).
            t._cancelled = 1
            t._finished()
            return t
        if owner is not None:
            # Registered before it is armed, so that the owner's end cancels it.
            if not _own(owner, t):
                t._cancelled = 1
                t._finished()
                return t
            t._owner = owner
            port_atomic_add64(&_strand_timers, 1)
        t._arm(delay)
        return t

    def Spawn(self, awaitable, callback=None):
        """Run ``awaitable`` (a coroutine) on this core's asyncio loop thread (started on
        first use, uvloop when it is installed; stopped by ``Close``).  Its outcome
        comes back on a worker: ``callback(task)``; without one an exception is
        logged.  Returns the ``Task``."""
        return _spawn(self, None, awaitable, callback)

    def _aio_kind(self):
        """The loop Spawn runs on: "uvloop" or "asyncio" (None before the first Spawn)."""
        r = self._aio
        return None if r is None else r.kind

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
            _close_now(s, "flush watch failed", True)

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
            _close_now(s, f"{s._get_reason()} (its queued data was not flushed in time)",
                         True)

    def _pool_trim(self):
        """The receive pool's trimmer (port_recv_pool_trim): a timer while the pool
        holds more than its floor, once per recv_pool_window (more often while
        io_uring's buffers come back).  A user's kind of timer: Close cancels it."""
        cdef int64_t ms
        if self.port == NULL or self._closed or self._closing:
            return
        ms = port_recv_pool_trim(self.port)
        if ms > 0:
            self._arm_pool_trim(ms)

    cdef void _arm_pool_trim(self, int64_t ms) noexcept:
        try:
            self._start_timer(ms / 1000.0, 0.0, self._pool_trim, ())
        except BaseException:
            pass        # closing: the pool goes with the port

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


def _drain_wakeup():
    """Posted by Close when it leaves the rest to a drain (see Close)."""


cdef enum:
    # After Close's deadline with a hook running: how long the workers go on draining
    # once no hook runs and nothing is dispatched any more.
    DRAIN_IDLE_MS = 5000

cdef enum:
    # Completions a worker takes from one strand's queue in a row before it hands the
    # strand on (port_strand_yield) and goes back to the rest of its batch.
    STRAND_TURN = 16


cdef inline int _complete(IocpCore core, port_cqe_t *cqe) noexcept:
    """Route one completion to its owner, then whatever its strand queued meanwhile, up
    to STRAND_TURN of it: then the strand is handed on (its wake-up is posted, and
    whichever worker reaps it goes on from there, here or on another worker), so that
    jobs other threads keep posting to one session do not hold back the rest of this
    batch (other sessions' receives) for as long as the posting lasts.  Returns the
    number of operations' completions dispatched (a wake-up is none)."""
    cdef int handled = 0
    cdef port_op_t *op = cqe.op
    cdef port_strand_t *strand = op.strand
    cdef PyObject *owner = NULL
    cdef PyObject *strand_owner = NULL
    cdef port_cqe_t nxt
    if op.type == PORT_OP_RECV and (cqe.flags & PORT_CQE_MORE):
        # The usual completion of a busy server: bytes for a session whose receive
        # stays armed.  Only a Session receives, on its own strand.  The operation
        # stays in flight, and its reference keeps the session alive while this thread
        # holds the strand (the final completion, which drops it, is ordered after this
        # one on that strand): no reference of our own, no virtual call.
        _process_recv(<Session>op.owner, cqe)
        if not port_strand_next(core.port, strand, &nxt):
            return 1
        # More was queued on the strand meanwhile (the final completion may be among
        # it): from here on the session needs a reference of ours, as below.
        strand_owner = <PyObject *>strand.owner
        _incref(strand_owner)
        return 1 + _strand_turn(core, strand, strand_owner, &nxt)
    if port_strand_wakeup(cqe):
        # A strand handed on (below) goes on here; the reference to the object holding
        # it, which the wake-up kept, is now ours.
        strand_owner = <PyObject *>strand.owner
    else:
        owner = <PyObject *>op.owner
        # Keep the owner (and the object holding the strand) alive until we are done
        # with them: the operation's own reference is dropped below, and the strand
        # lives inside its session.
        _incref(owner)
        if strand != NULL:
            strand_owner = <PyObject *>strand.owner
            _incref(strand_owner)
        (<IocpObject>owner)._dispatch(cqe)
        handled = 1
        if not (cqe.flags & PORT_CQE_MORE):
            _decref(owner)            # the operation's reference
    if strand != NULL:
        handled += _strand_release(core, strand, strand_owner)
    if owner != NULL:
        _decref(owner)
    return handled


cdef inline int _strand_release(IocpCore core, port_strand_t *strand,
                                PyObject *strand_owner) noexcept:
    """End this thread's hold on `strand`: dispatch what it queued meanwhile, up to
    STRAND_TURN of it, then hand it on.  Drops the reference to `strand_owner` (the
    object holding the strand) the caller took, or gives it to the wake-up.  Returns
    the completions dispatched."""
    cdef port_cqe_t nxt
    if port_strand_next(core.port, strand, &nxt):
        return _strand_turn(core, strand, strand_owner, &nxt)
    if strand_owner != NULL:
        _decref(strand_owner)
    return 0


cdef int _strand_turn(IocpCore core, port_strand_t *strand, PyObject *strand_owner,
                      port_cqe_t *nxt) noexcept:
    """_strand_release once the strand has queued something: `nxt` is the first of it,
    which port_strand_next has just handed out (out of line: rarely needed)."""
    cdef int turn = 0, handled = 0
    cdef PyObject *o
    while True:
        turn += 1
        if turn > STRAND_TURN and port_strand_yield(core.port, strand, nxt) == 0:
            # The wake-up keeps the strand's object alive until a worker reaps it
            # (it is in flight: Close waits for it).  If it could not be posted (the
            # port is closing) we still hold the strand and go on here.
            strand_owner = NULL
            break
        o = <PyObject *>nxt.op.owner
        (<IocpObject>o)._dispatch(nxt)
        handled += 1
        if not (nxt.flags & PORT_CQE_MORE):
            _decref(o)
        if not port_strand_next(core.port, strand, nxt):
            break
    if strand_owner != NULL:
        _decref(strand_owner)
    return handled
