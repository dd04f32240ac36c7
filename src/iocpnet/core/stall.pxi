# core/stall.pxi: send_timeout, the sweep that ends sessions whose send queue stalls.
# Included by _core.pyx (one extension module, one file per concern).
#
# A peer that sends but never reads fills our send queue to the backpressure mark; we
# stop reading it, its own send() blocks, and without a deadline the session would hold
# its slot, its queue and its socket buffers for good.  Backpressure bounds the memory;
# send_timeout bounds the time: a session whose send queue has made no progress for
# send_timeout seconds is ended with a reset and the reason
# "send stalled: N bytes queued, nothing sent for T s (the peer is not reading)".
#
# Progress is stamped on the session (_send_progress_ms, under its lock): when a send
# starts from an empty queue, and at each send completion that moved bytes.  A slow
# reader that keeps draining, however slowly, moves it; one that reads nothing does not.
# The kernel reports room in a socket only once a good part of its send buffer has
# drained, so the sweep also asks the kernel how many bytes it still holds for the
# socket (port_sock_unsent): if that number changed since the last look, the peer is
# reading and the session made progress.
#
# One sweep per core, not a timer per session: the core's _StallWatch keeps the services
# that have a session with a send_timeout (weakly: a service dropped by the user goes),
# and one repeating timer looks at their sessions every send_timeout / 4 (between 50 ms
# and 500 ms), so a stalled session is ended within send_timeout plus that period.  The
# sweep runs only while those services have sessions: the first sweep that finds none
# stops it (at most a period after the last one ended), and the next connect starts it.
# The period follows the sessions alive: a connect with a shorter send_timeout shortens
# it at once, and a sweep that finds the shortest ones gone lengthens it again (a burst
# of 0.2 s sessions had left a server with only 10 s ones sweeping every 50 ms, all its
# sessions each time, for as long as any stayed: 20 wake-ups a second instead of 2).
# Each service's _stall_timeout is the shortest send_timeout of its sessions as the last
# sweep saw them (0: none): a connect below it (or with none) asks the watch.
# The watch's lock guards its service set, its timer and `running`'s changes; each
# session is looked at under its own lock.


cdef inline double _sweep_period(double timeout) noexcept:
    return max(0.05, min(0.5, timeout / 4.0))


@cython.final
cdef class _StallWatch:
    cdef IocpCore core
    cdef object _lock
    cdef object _services         # weakref.WeakSet of Service
    cdef object _timer            # None, True (being made) or the sweep Timer
    cdef double _period
    cdef volatile int32_t running # the sweep is on (read without the lock on connect)

    cdef void add(self, Service service, double timeout) noexcept:
        """Watch `service`; start the sweep, or make it shorter for a shorter timeout."""
        cdef double period = _sweep_period(timeout)
        cdef Service other
        with self._lock:
            self._services.add(service)
            if self._timer is None:
                # Started again after it stopped (no session anywhere): as short as the
                # shortest timeout of every watched service, not only this one's.  A
                # stricter service's next connect sees `running` and asks nothing: a
                # looser service's connect restarting it made the stricter's stalls
                # wait its period (0.3 s send_timeout cut after 1.0 s, not 0.375).
                for other in self._services:
                    if other._stall_timeout > 0:
                        period = min(period, _sweep_period(other._stall_timeout))
            if self._timer is True or (self._timer is not None and period >= self._period):
                return
            old = self._timer
            self._timer = True            # claimed; made below, outside the lock
            self._period = period if old is None else min(period, self._period)
            period = self._period
            port_atomic_store32(&self.running, 1)
        if isinstance(old, Timer):
            (<Timer>old).Cancel()         # a shorter send_timeout wants a shorter period
        try:
            t = self.core.CallEvery(period, self._sweep)
        except Exception:
            if not self.core._closing:
                logger.exception("cannot start the send_timeout sweep")
            t = None
        with self._lock:
            self._timer = t
            if t is None:
                port_atomic_store32(&self.running, 0)

    cdef bint stop_if_idle(self) noexcept:
        """From the sweep: with no session left in any watched service, stop the sweep
        (an idle server keeps nothing but its accepts in flight) and say so; the next
        connect starts it again.  `running` is cleared before looking, and a connect adds
        its session before reading it, so one of the two always sees the other."""
        cdef Service service
        with self._lock:
            if not isinstance(self._timer, Timer):
                return False
            port_atomic_store32(&self.running, 0)
            for service in list(self._services):
                if service.sessions:
                    port_atomic_store32(&self.running, 1)
                    return False
            t = self._timer
            self._timer = None
            for service in self._services:
                service._stall_timeout = 0      # no session: the next connect asks
        (<Timer>t).Cancel()
        return True

    def _sweep(self):
        cdef Service service
        cdef Session s
        cdef int64_t now = port_monotonic_ms()
        cdef int64_t period_ms
        cdef double period, shortest = 0.0, t
        with self._lock:
            services = list(self._services)
            period = self._period
            timer = self._timer
        period_ms = <int64_t>(period * 1000)
        for service in services:
            for s in service.sessions:
                t = s._hooks.send_timeout
                if t > 0 and (shortest == 0 or t < shortest):
                    shortest = t
                if s._send_busy:            # a first look without the lock
                    _check_stall(service, s, now, period_ms)
        # Stopped here, a period after the last session ended, not when it ended: a
        # server that empties between connections (a capped connect storm: one
        # connection in flight at a time) restarted the sweep for each, a timer armed
        # and cancelled per connection (on io_uring two submissions and two completions).
        if not self.stop_if_idle() and shortest > 0 and _sweep_period(shortest) > period:
            self._lengthen(services, timer, period)

    cdef void _lengthen(self, list services, object timer, double period) noexcept:
        """The sessions that wanted `period` have gone: sweep as often as the shortest
        send_timeout alive asks.  Each service's mark is raised first and the sessions
        looked at again: a connect between the two sees either the raised mark (and
        asks the watch, which shortens the period) or its session here."""
        cdef Service service
        cdef double shortest
        for service in services:
            service._stall_timeout = _shortest_send_timeout([service])
        shortest = _shortest_send_timeout(services)
        if shortest == 0:
            return                          # the next sweep stops
        with self._lock:
            # Unless a connect shortened it meanwhile (a new timer), or it stopped.
            if self._timer is not timer or _sweep_period(shortest) <= period:
                return
            self._timer = True              # claimed; made below, outside the lock
            self._period = period = _sweep_period(shortest)
        (<Timer>timer).Cancel()
        try:
            t = self.core.CallEvery(period, self._sweep)
        except Exception:
            if not self.core._closing:
                logger.exception("cannot start the send_timeout sweep")
            t = None
        with self._lock:
            self._timer = t
            if t is None:
                port_atomic_store32(&self.running, 0)


cdef double _shortest_send_timeout(list services) except? -1.0:
    """The shortest send_timeout among the services' sessions (0: none has one).  Read
    from the sessions' class settings: no lock."""
    cdef Service service
    cdef Session s
    cdef double shortest = 0.0, t
    for service in services:
        for s in service.sessions:
            t = s._hooks.send_timeout
            if t > 0 and (shortest == 0 or t < shortest):
                shortest = t
    return shortest


cdef void _check_stall(Service service, Session s, int64_t now,
                       int64_t period_ms) noexcept:
    cdef double timeout = s._hooks.send_timeout
    cdef uint64_t mark
    cdef Py_ssize_t queued
    cdef bint stalled = False
    if timeout <= 0:
        return
    port_spin_lock(&s._lock)
    if s._state == S_CONNECTED and s._send_busy and \
            now - s._send_progress_ms >= period_ms:
        # No send completed for a sweep or more: has the peer taken anything from
        # the kernel meanwhile?  (Under the lock: the socket cannot be closed under us.)
        if port_sock_send_progress(s._sock, &mark) == 0:
            if s._send_mark != 0 and s._send_mark != mark + 1:
                s._send_progress_ms = now
            s._send_mark = mark + 1
        stalled = now - s._send_progress_ms >= <int64_t>(timeout * 1000)
    queued = s._sq_bytes
    port_spin_unlock(&s._lock)
    if not stalled:
        return
    why = (f"send stalled: {queued} bytes queued, nothing sent for {timeout:g} s "
           f"(the peer is not reading)")
    if _close_now(s, why, True):
        with service._lock:
            service.send_timeouts += 1
        # Per burst: a peer can open connection after connection and never read.
        _log_in_burst(s, LOG_STALL, _logging_WARNING, f"disconnecting {repr(s)}: {why}")


cdef void _watch_stalls(Service service, Session s) noexcept:
    """On each connect: a session with a send_timeout puts its service in its core's
    sweep, and starts the sweep if it was stopped."""
    cdef double timeout = s._hooks.send_timeout
    cdef IocpCore core = service.core
    cdef _StallWatch watch = <_StallWatch>service._stall_watch
    if timeout <= 0:
        return
    if watch is not None and 0 < service._stall_timeout <= timeout and \
            port_atomic_load32(&watch.running):
        return                            # the common case: nothing to do
    if watch is None:
        # Under the core's lock: two first connects may race here, and an object field
        # written by two threads at once could lose a reference without the GIL.
        with core._lock:
            watch = <_StallWatch>core._stall_watch
            if watch is None:
                watch = _StallWatch.__new__(_StallWatch)
                watch.core = core
                watch._lock = threading.Lock()
                watch._services = _weakref.WeakSet()
                core._stall_watch = watch
            if service._stall_watch is None:
                service._stall_watch = watch
    if service._stall_timeout <= 0 or timeout < service._stall_timeout:
        service._stall_timeout = timeout
    watch.add(service, timeout)

