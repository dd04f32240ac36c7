# core/timers.pxi: jobs (IocpCore.Post) and timers (CallLater, CallEvery).
# Included by _core.pyx (one extension module, one file per concern).


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
    """A pending call made by ``IocpCore.CallLater`` or ``CallEvery``.

    A repeating timer keeps a fixed rate: each deadline is the previous one plus the
    interval, wherever the callback ended.  Deadlines that passed while the callback ran
    (or while every worker was busy) are skipped, never run back to back to catch up,
    and counted in ``skipped``."""
    cdef port_op_t op
    cdef object func
    cdef tuple args
    cdef double interval
    cdef double _deadline_ms      # a repeating timer's current deadline (monotonic ms)
    cdef readonly uint64_t skipped
    cdef volatile int32_t _cancelled
    cdef bint _done
    cdef bint _internal           # the core's own: not cancelled by Close
    cdef IocpObject _owner        # a Session or Group whose strand it runs on, or None
    cdef object __weakref__

    def __repr__(self):
        kind = f"every {self.interval:g}s" if self.interval else "once"
        state = "cancelled" if self._cancelled else ("done" if self._done else "pending")
        if self.interval:
            state += f", {self.skipped} skipped"
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
            self._finished()
            raise port_error(rc, "arming a timer")

    cdef double _next_delay(self) noexcept:
        """Fixed rate: the next deadline is the previous one plus the interval; those
        already past are skipped (and counted), not run in a burst."""
        cdef double period = self.interval * 1000.0
        cdef double now = <double>port_monotonic_ms()
        cdef double nxt = self._deadline_ms + period
        cdef double missed
        if nxt < now:
            missed = <double>(<int64_t>((now - nxt) / period)) + 1.0
            self.skipped += <uint64_t>missed
            nxt += missed * period
        self._deadline_ms = nxt
        return (nxt - now) / 1000.0

    def Cancel(self):
        """Stop the timer (any thread).  A call already running finishes."""
        self._cancelled = 1
        if self.op.in_flight:
            port_cancel(self.core.port, &self.op)

    cdef void _dispatch(self, port_cqe_t *cqe) noexcept:
        # An owner's timer runs on its strand, and not once the owner has ended.
        if cqe.res == 0 and not self._cancelled and not _owner_ended(self._owner):
            try:
                self.func(*self.args)
            except BaseException as e:
                _callback_failed(self._owner, "timer callback", self.func, e)
            if self.interval > 0 and not self._cancelled and \
                    not _owner_ended(self._owner) and \
                    (self._internal or not self.core._closing) and not self.core._closed:
                try:
                    self._arm(self._next_delay())
                    return
                except Exception:
                    logger.exception("re-arming a repeating timer failed")
        self._finished()

    cdef void _finished(self) noexcept:
        """The timer will not fire again: forget it (core, owner) and what it calls."""
        self._done = True
        self.core._timer_done(self)
        if self._owner is not None:
            _disown(self._owner, self)
            port_atomic_add64(&_strand_timers, -1)
            self._owner = None
        self.func = None
        self.args = None
