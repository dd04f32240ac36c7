# core/strand.pxi: game logic on an owner's strand: jobs (Post), timers (CallLater,
# CallEvery) and awaitables (Spawn) that belong to a Session or a Group.
# Included by _core.pyx (one extension module, one file per concern).
#
# What it owns.  A session already has a strand (port_strand_t): the port hands out its
# completions one at a time, in order, whichever worker reaps them.  Anything that must
# never run beside the session's hooks is therefore made a port operation *on that
# strand*: a job is a posted completion, a timer a timer operation, the result of an
# awaitable a posted completion made by the asyncio loop's thread when the awaitable ends.
# The strand does the serialising; no lock is held while user code runs.  A Group (a room)
# has a strand of its own and the same three things (group.pxi).
#
# Ends.  When the owner ends (a session's OnDisconnected, a group's Close) nothing of it
# runs any more: a job or task result that reaches the strand afterwards is dropped, and
# the timers and tasks it still has are cancelled.  To cancel them the owner keeps them in
# an `_Owned` record (a set of pending timers and tasks), made on first use, so a session
# that uses none of this carries one empty pointer and nothing else: its hot path has no
# extra allocation, lock or branch beyond one `is None` test at its end.
#
# Locks.  `_Owned.lock` (a threading.Lock, so that a thread waiting for it never spins
# while attached to the interpreter) guards `ended`, `children` and `groups`; it is held
# only around set and list operations, never while user code runs.  A session installs
# its `_Owned` under its spin lock, and reads it there at its end, after its state became
# S_DONE: a registration either lands in the record before the end empties it, or sees
# `ended` (or S_DONE) and is refused.  Each piece is released exactly once: a job when it
# is dispatched (its owner may have ended: then it is only dropped), a timer in
# Timer._finished, a task in Task._finalize; the debug counters strand_jobs,
# strand_timers and tasks count what is pending and return to 0.


cdef volatile int64_t _strand_jobs = 0
cdef volatile int64_t _strand_timers = 0
cdef volatile int64_t _tasks = 0

cdef object _aio_module = None


@cython.final
cdef class _Owned:
    """What one owner (a Session or a Group) has pending on its strand."""
    cdef object lock
    cdef bint ended
    cdef set children          # pending Timers and Tasks: cancelled at the owner's end
    cdef list groups           # a session's groups, left at its end (None: none yet)
    cdef volatile int64_t jobs # Post()ed and not yet dispatched (atomic; the bound)

    def __cinit__(self):
        self.lock = threading.Lock()
        self.children = set()


cdef inline bint _owner_ended(IocpObject owner) noexcept:
    """True once nothing more of `owner` may run (None: the core, never ended)."""
    if owner is None:
        return False
    if isinstance(owner, Session):
        return (<Session>owner)._state == S_DONE
    return (<Group>owner)._closed


cdef inline port_strand_t *_owner_strand(IocpObject owner) noexcept:
    if owner is None:
        return NULL
    if isinstance(owner, Session):
        return &(<Session>owner)._strand
    return &(<Group>owner)._strand


cdef _Owned _owned_of(IocpObject owner):
    """The owner's record, made on first use (a session's under its spin lock)."""
    cdef Session s
    cdef _Owned x
    if not isinstance(owner, Session):
        return (<Group>owner)._x
    s = <Session>owner
    x = s._x
    if x is not None:
        return x
    fresh = _Owned.__new__(_Owned)       # made outside the spin lock
    port_spin_lock(&s._lock)
    if s._x is None:
        s._x = fresh
    x = s._x
    port_spin_unlock(&s._lock)
    return x


cdef bint _owner_accepts(IocpObject owner) noexcept:
    """May `owner` take new work?  (under its record's lock)"""
    cdef int st
    if isinstance(owner, Session):
        st = (<Session>owner)._state
        return S_CONNECTING <= st < S_DONE
    return not (<Group>owner)._closed


cdef bint _own(IocpObject owner, object child) except -1:
    """Register a pending timer or task with its owner; False if the owner has ended
    (the child must not start)."""
    cdef _Owned x = _owned_of(owner)
    with x.lock:
        if x.ended or not _owner_accepts(owner):
            return False
        x.children.add(child)
    return True


cdef void _disown(IocpObject owner, object child) noexcept:
    cdef _Owned x
    if isinstance(owner, Session):
        x = (<Session>owner)._x
    else:
        x = (<Group>owner)._x
    if x is None:
        return
    try:
        with x.lock:
            x.children.discard(child)
    except BaseException:
        logger.exception("forgetting a finished timer or task failed")


cdef list _end_owned(_Owned x):
    """The owner ends: cancel what it still has pending; returns its groups (a session
    leaves them).  Called once, on the owner's strand for a session."""
    if x is None:
        return None
    with x.lock:
        x.ended = True
        children = list(x.children)
        x.children.clear()
        groups = x.groups
        x.groups = None
    for c in children:
        try:
            c.Cancel()
        except BaseException:
            logger.exception("cancelling %r failed", c)
    return groups


cdef str _callable_name(object func):
    name = getattr(func, "__qualname__", None) or getattr(func, "__name__", None)
    return name if isinstance(name, str) else repr(func)


cdef void _check_ran(object func, object r) except *:
    """After a job, timer callback or task callback returned `r` (not None): an async
    def or a generator function posted as one returned an object nothing runs, so its
    body never ran, in silence.  Raised as a failure of that call (caf144f refuses such
    hooks; these are handed callables at run time: looking at each when posted would
    cost a Post ~60 %, looking at what it returned costs a None check)."""
    t = type(r)
    if t is _CoroutineType:
        kind = "a coroutine"
        import inspect    # here only: see _maybe_deferred
        if inspect.getcoroutinestate(r) == inspect.CORO_CREATED:
            r.close()         # reported here: no "never awaited" warning at collection
    elif t is _AsyncGeneratorType:
        kind = "an async generator"
    elif t is _GeneratorType:
        kind = "a generator"
    else:
        return
    raise TypeError(f"{_callable_name(func)} returned {kind} that nothing runs, so its "
                    f"body never ran: jobs and callbacks are called on a worker, not "
                    f"awaited; hand what must be awaited to Spawn(awaitable, callback)")


cdef void _callback_failed(IocpObject owner, str what, object func, BaseException e) noexcept:
    """A job, timer or task callback of `owner` raised.  A session's is a hook's failure:
    logged with the session, which is disconnected.  A group's or the core's is logged;
    the group and the workers go on."""
    label = f"{what} {_callable_name(func)}" if func is not None else what
    try:
        if isinstance(owner, Session):
            _hook_failed(<Session>owner, label, e)
            return
        if owner is None:
            logger.error("%s raised", label, exc_info=(type(e), e, e.__traceback__))
        else:
            logger.error("%s of %s raised", label, repr(owner),
                         exc_info=(type(e), e, e.__traceback__))
        _traceback.clear_frames(e.__traceback__)
    except BaseException:
        pass


# ---------------------------------------------------------------------------------------
# Jobs on an owner's strand

cdef enum:
    JOB_CALL = 0
    JOB_SEND_QUEUE = 1          # tell the session's OnSendQueue hook where its queue is


@cython.final
cdef class _StrandJob(IocpObject):
    cdef port_op_t op
    cdef IocpObject owner
    cdef object func
    cdef tuple args
    cdef int kind
    cdef _Owned counted        # a Post()ed job: counted in its owner's record

    cdef void _dispatch(self, port_cqe_t *cqe) noexcept:
        cdef IocpObject owner = self.owner
        func = self.func
        args = self.args
        self.owner = None
        self.func = None
        self.args = None
        if self.counted is not None:
            port_atomic_add64(&self.counted.jobs, -1)
            self.counted = None
        port_atomic_add64(&_strand_jobs, -1)
        if _owner_ended(owner):
            return              # the owner ended after the job was posted: dropped
        if self.kind == JOB_CALL and self.core._drops_job(func):
            return
        _enter_job(owner)
        if self.kind == JOB_SEND_QUEUE:
            _tell_send_queue(<Session>owner)
        else:
            try:
                r = func(*args)
                if r is not None:
                    _check_ran(func, r)
            except BaseException as e:
                _callback_failed(owner, "job", func, e)
        _leave_job(owner)


cdef inline void _enter_job(IocpObject owner) noexcept:
    """A job, timer or task callback of a session starts on its strand: its time is the
    session's own, as a hook's (the idle sweep does not count it as the peer's silence:
    what the peer sends waits behind it; Stop's warning names it)."""
    if isinstance(owner, Session):
        _enter_hook(<Session>owner, H_JOB)


cdef inline void _leave_job(IocpObject owner) noexcept:
    if isinstance(owner, Session):
        _leave_hook(<Session>owner)


cdef bint _post_to(IocpObject owner, int kind, object func, tuple args) except -1:
    """Post a job on `owner`'s strand; False if it has ended (or the core is closed)."""
    cdef _StrandJob job
    cdef IocpCore core = owner.core
    cdef int rc
    cdef _Owned x
    cdef Py_ssize_t limit
    if kind == JOB_CALL and not callable(func):
        raise TypeError("func must be callable")
    if core is None:
        raise RuntimeError(f"{owner!r} has no IocpCore yet (not connected)")
    if _owner_ended(owner) or core._closed:
        return False
    job = _StrandJob.__new__(_StrandJob)
    if kind == JOB_CALL:
        # Bounded: threads posting faster than the strand runs jobs grew its queue (and
        # what waits behind it: the owner's receives, its end at Stop) without limit.
        x = _owned_of(owner)
        limit = (<Session>owner)._hooks.post_queue_limit if isinstance(owner, Session) \
            else (<Group>owner)._post_limit
        if port_atomic_add64(&x.jobs, 1) > limit:
            port_atomic_add64(&x.jobs, -1)
            raise _queue.Full(f"{owner!r} has {limit} jobs waiting on its strand "
                              f"(post_queue_limit): posted faster than they run")
        job.counted = x
    job.core = core
    job.owner = owner
    job.func = func
    job.args = args
    job.kind = kind
    port_op_init(&job.op, PORT_OP_POST, <void *>job, _owner_strand(owner))
    port_atomic_add64(&_strand_jobs, 1)
    _incref(<PyObject *>job)
    rc = port_post(core.port, &job.op, 0)
    if rc != 0:
        _decref(<PyObject *>job)
        job.owner = None
        job.func = None
        job.args = None
        if job.counted is not None:
            port_atomic_add64(&job.counted.jobs, -1)
            job.counted = None
        port_atomic_add64(&_strand_jobs, -1)
        return False
    return True


cdef Timer _owner_timer(IocpObject owner, double delay, double interval, object func,
                        tuple args):
    cdef IocpCore core = owner.core
    if core is None:
        raise RuntimeError(f"{owner!r} has no IocpCore yet (not connected)")
    return core._start_timer(delay, interval, func, args, False, owner)


# ---------------------------------------------------------------------------------------
# Awaitables (Spawn): run on the core's asyncio loop thread (iocpnet.aio), their outcome
# handed back on the owner's strand.

cdef enum:
    T_PENDING = 0
    T_DONE = 1
    T_FAILED = 2
    T_CANCELLED = 3


cdef object _aio():
    global _aio_module
    if _aio_module is None:
        import iocpnet.aio as m
        _aio_module = m
    return _aio_module


@cython.final
cdef class Task(IocpObject):
    """An awaitable started by ``Spawn``, running on the core's asyncio loop thread.

    Its outcome comes back on the owner's strand (the session's or group's; any worker
    for ``IocpCore.Spawn``): ``callback(task)`` if one was given, else the owner's
    ``OnTaskDone(task)`` hook if it defines one.  With neither, an exception is logged
    like a hook's (a session is disconnected).  When the owner ends first, the awaitable
    is cancelled and nothing is delivered.
    """
    cdef port_op_t op
    cdef IocpObject _owner
    cdef object _callback
    cdef object _handle
    cdef object _result
    cdef object _exception
    cdef str _what
    cdef int _state
    cdef bint _finalized
    cdef object __weakref__

    def __repr__(self):
        names = {T_PENDING: "pending", T_DONE: "done", T_FAILED: "failed",
                 T_CANCELLED: "cancelled"}
        return f"<Task {self._what} {names.get(self._state, '?')}>"

    @property
    def owner(self):
        """The Session or Group it belongs to (None for ``IocpCore.Spawn``), until its
        outcome has been delivered."""
        return self._owner

    def done(self):
        """True once the awaitable has finished (or was cancelled)."""
        return self._state != T_PENDING

    def cancelled(self):
        return self._state == T_CANCELLED

    def result(self):
        """The awaitable's result; raises its exception, or ``asyncio.CancelledError``
        if it was cancelled, or RuntimeError if it has not finished."""
        if self._state == T_PENDING:
            raise RuntimeError("the task has not finished")
        if self._state == T_CANCELLED:
            raise _aio().CancelledError()
        if self._state == T_FAILED:
            raise self._exception
        return self._result

    def exception(self):
        """The exception the awaitable raised, or None."""
        if self._state == T_PENDING:
            raise RuntimeError("the task has not finished")
        if self._state == T_CANCELLED:
            raise _aio().CancelledError()
        return self._exception

    def Cancel(self):
        """Cancel the awaitable (any thread).  Its callback still runs, with a
        cancelled task, unless the owner has ended."""
        h = self._handle
        if h is not None and self._state == T_PENDING:
            h.cancel()

    def _from_loop(self, bint cancelled, result, exc):
        """The loop thread: the awaitable ended.  Hand the outcome to the owner's strand."""
        cdef int rc
        if cancelled:
            self._state = T_CANCELLED
        elif exc is not None:
            self._exception = exc
            self._state = T_FAILED
        else:
            self._result = result
            self._state = T_DONE
        if _owner_ended(self._owner):
            self._finalize()
            return
        _incref(<PyObject *>self)
        rc = port_post(self.core.port, &self.op, 0)
        if rc != 0:
            _decref(<PyObject *>self)      # the port is gone: nobody to deliver to
            self._finalize()

    cdef void _dispatch(self, port_cqe_t *cqe) noexcept:
        cdef IocpObject owner = self._owner
        cdef bint as_hook = False
        cb = None
        if _owner_ended(owner):
            self._finalize()
            return
        if self._callback is not None:
            cb = self._callback
        elif isinstance(owner, Session):
            cb = (<Session>owner)._hooks.on_task_done      # unbound: called with owner
            as_hook = True
        elif owner is not None:
            cb = getattr(owner, "OnTaskDone", None)
        _enter_job(owner)
        try:
            if cb is not None:
                try:
                    if as_hook:
                        cb(owner, self)
                    else:
                        r = cb(self)
                        if r is not None:
                            _check_ran(cb, r)
                except BaseException as e:
                    _callback_failed(owner, "OnTaskDone" if as_hook else "task callback",
                                     None if as_hook else cb, e)
            elif self._state == T_FAILED:
                _callback_failed(owner, f"task {self._what}", None, self._exception)
        finally:
            _leave_job(owner)
            self._finalize()

    cdef void _finalize(self) noexcept:
        if self._finalized:
            return
        self._finalized = True
        if self._owner is not None:
            _disown(self._owner, self)
            self._owner = None
        self._callback = None
        port_atomic_add64(&_tasks, -1)


cdef str _describe_awaitable(object aw):
    code = getattr(aw, "cr_code", None)
    if code is not None:
        return getattr(code, "co_qualname", None) or code.co_name
    return type(aw).__name__


cdef Task _spawn(IocpCore core, IocpObject owner, object awaitable, object callback):
    cdef Task t
    aio = _aio()
    if not aio.isawaitable(awaitable):
        raise TypeError(f"Spawn needs an awaitable (a coroutine), not "
                        f"{type(awaitable).__name__}")
    if callback is not None and not callable(callback):
        raise TypeError("callback must be callable")
    runner = None
    try:
        if core is None:
            raise RuntimeError(f"{owner!r} has no IocpCore yet (not connected)")
        runner = _runner_of(core)
    except RuntimeError:
        if owner is None or core is None:
            aio.discard(awaitable)
            raise
        # A session or group ends with its core: its task comes back cancelled, as after
        # its own end (below).
    except BaseException:
        aio.discard(awaitable)
        raise
    t = Task.__new__(Task)
    t.core = core
    t._owner = owner
    t._callback = callback
    t._what = _describe_awaitable(awaitable)
    port_op_init(&t.op, PORT_OP_POST, <void *>t, _owner_strand(owner))
    port_atomic_add64(&_tasks, 1)
    if runner is not None:
        t._handle = runner.handle()
    if runner is None or (owner is not None and not _own(owner, t)):
        # The owner has ended (or its core is closed): the awaitable never starts.
        t._owner = None
        t._state = T_CANCELLED
        t._finalize()
        aio.discard(awaitable)
        return t
    runner.start(t._handle, awaitable, t._from_loop)
    return t


cdef object _runner_of(IocpCore core):
    """The core's asyncio loop thread, started on first use and stopped by Close."""
    with core._lock:
        if core._closing:
            raise RuntimeError("the IocpCore is closed")
        r = core._aio
        if r is None:
            r = _aio().Runner()
            # Read by Close under this lock with _closing set: closed whenever Close
            # comes, within its timeout.
            core._aio = r
    return r
