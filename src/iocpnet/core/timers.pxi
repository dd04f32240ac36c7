# core/timers.pxi: jobs (IocpCore.Post) and timers (CallLater, CallEvery).
# Included by _core.pyx (one extension module, one file per concern).
#
# Threads: a job is touched by the thread that posts it, then by the one worker that runs
# it.  A Timer is also read by any thread (repr, skipped, active, Cancel) while a worker
# fires it and finally drops its callable: its object fields (func, args) and the state
# a reader shows are read and written inside cython.critical_section(self), so that
# without a GIL a reader never takes a reference to a callable the worker is freeing
# (with a GIL the sections cost nothing).  The callable runs outside the section.


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
        port_atomic_add64(&self.core._jobs, -1)
        if self.core._drops_job(func):
            return
        try:
            r = func(*args)
            if r is not None:
                _check_ran(func, r)       # strand.pxi: an async def's body never ran
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
    cdef uint64_t _skipped
    cdef volatile int32_t _cancelled
    cdef bint _done
    cdef bint _internal           # the core's own: not cancelled by Close
    cdef IocpObject _owner        # a Session or Group whose strand it runs on, or None
    cdef object __weakref__

    def __repr__(self):
        cdef uint64_t skipped
        cdef bint done
        with cython.critical_section(self):
            func = self.func
            skipped = self._skipped
            done = self._done
        kind = f"every {self.interval:g}s" if self.interval else "once"
        state = "cancelled" if self.cancelled else ("done" if done else "pending")
        if self.interval:
            state += f", {skipped} skipped"
        return f"<Timer {kind} {func!r} {state}>"

    @property
    def skipped(self):
        """Ticks of a repeating timer skipped because their deadline had passed."""
        cdef uint64_t skipped
        with cython.critical_section(self):
            skipped = self._skipped
        return skipped

    @property
    def cancelled(self):
        return bool(port_atomic_load32(&self._cancelled))

    @property
    def active(self):
        cdef bint done
        with cython.critical_section(self):
            done = self._done
        return not done

    cdef void _arm(self, double delay) except *:
        cdef uint64_t ms = <uint64_t>(delay * 1000.0 + 0.5) if delay > 0 else 0
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
            missed = (now - nxt) / period
            if missed < 1e18:
                missed = <double>(<int64_t>missed) + 1.0
                nxt += missed * period
            else:
                # A period too small to count in (1e-300 s: the cast was undefined and
                # the timer stopped): the next tick is now.
                missed = 1e18
                nxt = now
            with cython.critical_section(self):
                self._skipped += <uint64_t>missed
            if nxt < now:           # rounding, with a tiny period
                nxt = now
        self._deadline_ms = nxt
        return (nxt - now) / 1000.0

    def Cancel(self):
        """Stop the timer (any thread).  A call already running finishes."""
        port_atomic_xchg32(&self._cancelled, 1)
        if self.op.in_flight:
            port_cancel(self.core.port, &self.op)

    cdef void _dispatch(self, port_cqe_t *cqe) noexcept:
        # An owner's timer runs on its strand, and not once the owner has ended.
        if cqe.res == 0 and not port_atomic_load32(&self._cancelled) and \
                not _owner_ended(self._owner):
            with cython.critical_section(self):
                func = self.func
                args = self.args
            _enter_job(self._owner)       # strand.pxi: the session's own time
            try:
                r = func(*args)
                if r is not None:
                    _check_ran(func, r)
            except BaseException as e:
                _callback_failed(self._owner, "timer callback", func, e)
            _leave_job(self._owner)
            func = args = r = None
            if self.interval > 0 and not port_atomic_load32(&self._cancelled) and \
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
        with cython.critical_section(self):
            self._done = True
            func = self.func
            args = self.args
            self.func = None
            self.args = None
        self.core._timer_done(self)
        if self._owner is not None:
            _disown(self._owner, self)
            port_atomic_add64(&_strand_timers, -1)
            self._owner = None
        func = args = None          # released outside the section (a __del__ may run)
