# core/group.pxi: Group, a set of sessions (a room, a channel) with a strand of its own.
# Included by _core.pyx (one extension module, one file per concern).
#
# What it owns.  The members (a tuple, replaced whole on each change, so that a reader
# takes a snapshot by taking one reference), the group's strand (port_strand_t, as a
# session has: group.Post, CallLater, CallEvery and Spawn results run there, one at a
# time, in order, so room logic needs no lock of its own) and its pending timers and tasks
# (an `_Owned` record, strand.pxi).
#
# Broadcast order.  Every member hears the group's messages in one order, whichever
# worker or thread broadcast them: one thread at a time fans out a group's messages
# (`_fanning`), each to every member before the next, so two broadcasts never
# interleave and each member's Send queues in that order.  A Broadcast that finds a
# fan-out under way queues its message behind it (`_queued`, under `_fan_lock`, a lock
# held only around that list, never across a Send) and waits for its turn, which the
# fan-out before it hands over when done (FIFO, as an order lock's waiters): each
# caller fans out its own message, gets how many members took it, and one that
# broadcasts without pause does not keep another thread sending for it.  A fan-out
# never waits: a member's Send may run Python (a subclass's Send, a filter) that
# broadcasts to this group or another, and an order lock held across it deadlocked two
# groups whose members' Sends broadcast into each other (each thread holding its
# group's lock, waiting for the other's).  So a Broadcast made from inside a fan-out
# (this thread's, any group: a C thread-local, _fanouts()) only queues its message,
# which the fan-out of that group sends when it comes to it, and returns the number of
# members it is meant for (as a shared group's does).  A waiter holds no fan-out, and
# a fan-out never waits, so no cycle of waits can form.  A message broadcast from
# inside a fan-out of the same group comes after the one under way, for every member.
# The fan-out queues the same `bytes` object to every member by reference: one message
# built once, whatever the room's size (a member on TLS or WebSocket gets it through its
# own layers: Session._send, as Send does).  Why not the group's strand: posting each
# broadcast to the strand would cost a port round trip (latency) and an allocation per
# message, and the strand's order is no better; here an uncontended Broadcast allocates
# nothing and its caller sends at once.
#
# Membership.  `_lock` (a threading.Lock: held around tuple replacement only) guards
# `_members` and `_closed`.  A session keeps the list of its groups in its `_Owned`
# record (under that record's lock), so that its end removes it from each.  Lock order:
# a group's `_lock`, then the session's record lock; a session's end takes its groups'
# locks only after letting go of its own.  Add refuses a session that is not connected:
# a session that Add accepted is in the record before the session's end reads it, so it
# is always removed at its end (no member outlives its session).  Group <-> member
# references form a cycle on purpose; the session's end (or Close) breaks it.  `_names`
# (under `_lock` too) holds the name the application gave each member (Add's `name`),
# which presence lists.
#
# Sharing.  A group made with ``backplane=`` (a RedisBackplane, backplane.py) is shared
# with every server on the same Redis: ``Broadcast`` hands the message to the backplane,
# which publishes it and later delivers it here through ``_deliver`` (the same fan-out,
# under the same order lock) when it comes back on the group's channel, so every
# server's members hear one order.  Membership changes are told to the backplane after
# the group's locks are let go (it takes its own lock, never while holding ours).


cdef volatile int64_t _groups_alive = 0

@cython.final
cdef class _GroupMessage:
    """A Broadcast queued behind the group's fan-out under way (Group._fan_out)."""
    cdef bytes data
    cdef object exclude
    cdef bint droppable
    # Held until its caller's turn to fan out (released by the fan-out before it); NULL
    # for a message queued from inside a fan-out, which the group's fan-out sends.
    cdef PyThread_type_lock turn

    def __dealloc__(self):
        if self.turn != NULL:
            PyThread_free_lock(self.turn)


cdef class Group(IocpObject):
    """A set of sessions with a strand of its own: a room, a channel, a match.

    ``Group(core_or_service, name=None)``.  ``Add(session)`` / ``Remove(session)`` from
    any thread; a member is removed when its session ends; a session may be in many
    groups.  ``Broadcast(data)`` queues one ``bytes`` object to every member, by
    reference, in one total order per group.  ``len(group)``, ``session in group``,
    iteration over a snapshot.

    ``Post``, ``CallLater``, ``CallEvery`` and ``Spawn`` run on the group's strand: never
    two at a time, in order, so room state touched only from there needs no lock.
    ``Close()`` cancels them and removes every member.  Subclass it to give a room its
    state and its ``OnTaskDone(task)`` hook.
    """
    cdef port_strand_t _strand
    cdef object _lock             # guards _members, _closed
    cdef PyThread_type_lock _fan_lock   # guards _fanning, _queued: never held across
                                        # a Send, nor anything that can run Python
    cdef bint _fanning            # a thread is fanning out this group's messages
    cdef list _queued             # _GroupMessage: the broadcasts behind that fan-out
    cdef tuple _members
    cdef dict _names              # member -> the name Add gave it (presence)
    cdef bint _closed
    cdef _Owned _x
    cdef Py_ssize_t _post_limit   # the class's post_queue_limit
    cdef readonly object name
    cdef readonly object backplane    # a RedisBackplane when shared, else None
    cdef object __weakref__

    def __cinit__(self, *args, **kwargs):
        port_strand_init(&self._strand, <void *>self)
        self._members = ()
        self._names = {}
        self._lock = threading.Lock()
        self._fan_lock = PyThread_allocate_lock()
        if self._fan_lock == NULL:
            raise MemoryError()
        self._queued = []
        self._x = _Owned.__new__(_Owned)
        self._post_limit = DEFAULT_POST_QUEUE_LIMIT
        port_atomic_add64(&_groups_alive, 1)

    def __init__(self, core, name=None, *, backplane=None):
        limit = _class_count(type(self), "post_queue_limit", DEFAULT_POST_QUEUE_LIMIT)
        if limit <= 0:
            raise ValueError(f"{type(self).__name__}: post_queue_limit must be positive")
        self._post_limit = limit
        if isinstance(core, Service):
            core = (<Service>core).core
        if not isinstance(core, IocpCore):
            raise TypeError("Group needs an IocpCore (or a Service)")
        self.core = <IocpCore>core
        self.name = name
        if backplane is not None:
            if not isinstance(name, str) or not name:
                raise ValueError("a shared group needs a name (a non-empty str): "
                                 "it names the group on every server")
            backplane._share(self, self.core)   # raises if it cannot (closed, name taken)
            self.backplane = backplane

    def __dealloc__(self):
        # Always (the port may be gone): it also frees the strand's wake-up record.
        port_strand_discard(self.core.port if self.core is not None else NULL,
                            &self._strand)
        if self._fan_lock != NULL:
            PyThread_free_lock(self._fan_lock)
        port_atomic_add64(&_groups_alive, -1)

    def __repr__(self):
        name = f" {self.name!r}" if self.name is not None else ""
        state = " closed" if self._closed else ""
        shared = " shared" if self.backplane is not None else ""
        return (f"<{type(self).__name__}{name} members={len(self._members)}"
                f"{shared}{state}>")

    cdef tuple _snapshot(self):
        with self._lock:
            return self._members

    def __len__(self):
        return len(self._snapshot())

    def __iter__(self):
        """Iterate over a snapshot: members may come and go meanwhile."""
        return iter(self._snapshot())

    def __contains__(self, session):
        for s in self._snapshot():
            if s is session:
                return True
        return False

    def __bool__(self):
        return True          # a group is a group, even empty (len() may be 0)

    @property
    def members(self):
        """A snapshot of the members, in the order they joined."""
        return list(self._snapshot())

    @property
    def names(self):
        """The names of the members here (this process), in the order they joined."""
        with self._lock:
            members = self._members
            names = self._names
            return [names.get(s, "") for s in members]

    def NameOf(self, Session session not None):
        """The name `session` was given when it joined (None if it is not a member)."""
        with self._lock:
            for s in self._members:
                if s is session:
                    return self._names.get(session, "")
        return None

    @property
    def closed(self):
        return self._closed

    cdef IocpCore _core(self):
        if self.core is None:
            raise RuntimeError(f"{type(self).__name__}.__init__ was not called")
        return self.core

    # ---- membership ----

    def Add(self, Session session not None, name=None):
        """Make `session` a member (any thread).  Returns True if it joined, False if it
        was already a member, is not connected (it joins nothing after it ends) or the
        group is closed (a Close on another thread is a race the caller cannot avoid,
        as a session's end is).
        ``name``: what presence lists it as (``names``, ``Who``); default: its
        address as ``host:port``."""
        cdef _Owned x
        self._core()
        if name is None:
            addr = session.address
            name = f"{addr[0]}:{addr[1]}" if addr else ""
        elif not isinstance(name, str):
            raise TypeError(f"name must be a str, not {type(name).__name__}")
        else:
            _check_member_name(name)
        if session.core is not self.core:
            raise ValueError(f"{session!r} runs on another IocpCore than {self!r}")
        x = _owned_of(session)
        fresh = [self]
        with self._lock:
            if self._closed:
                return False
            for s in self._members:
                if s is session:
                    return False
            with x.lock:
                if x.ended or session._state != S_CONNECTED:
                    return False
                if x.groups is None:
                    x.groups = fresh
                else:
                    x.groups.append(self)
            self._members = self._members + (session,)
            self._names[session] = name
        if self.backplane is not None:
            self.backplane._joined(self, session)
        return True

    def Rename(self, Session session not None, str name not None):
        """Change the name `session` is listed under (any thread).  Returns False if it
        is not a member."""
        _check_member_name(name)
        with self._lock:
            if session not in self._names:
                return False
            self._names[session] = name
        if self.backplane is not None:
            self.backplane._joined(self, session)
        return True

    def Remove(self, Session session not None):
        """Take `session` out (any thread).  Returns True if it was a member."""
        if not self._discard(session):
            return False
        _forget_group(session, self)
        return True

    cdef bint _discard(self, Session session) except -1:
        """Drop `session` from the members (it ended, or Remove)."""
        cdef Py_ssize_t i
        cdef bint found = False
        with self._lock:
            members = self._members
            for i in range(len(members)):
                if members[i] is session:
                    self._members = members[:i] + members[i + 1:]
                    self._names.pop(session, None)
                    found = True
                    break
        if found and self.backplane is not None:
            self.backplane._left(self, session)
        return found

    # ---- messages ----

    def Broadcast(self, data, exclude=None, *, bint droppable=False):
        """Queue ``data`` to every member (any thread), the same ``bytes`` object by
        reference, in one order per group: every member hears the group's messages in
        the same order.  ``exclude``: a session to skip (say, the sender).
        ``droppable=True`` (a state update the next one replaces) skips members whose
        send queue is above their ``send_queue_high`` mark, so a slow reader misses
        updates instead of reaching its ``send_queue_limit``.  Returns how many members
        took it (a member closing, or over its send-queue limit, does not; nor does one
        whose overridden Send raised: that is logged, and the others still hear it).
        A Broadcast made from inside a fan-out (a member's own Send that broadcasts,
        to this group or another) does not wait for it: its message is queued behind
        the one under way and the return value is the number of members it is meant
        for.

        A shared group (``backplane=``) publishes the message to Redis and delivers it
        to the members here when it comes back on the group's channel, so that every
        server's members hear one order, the sender's too; the return value is then the
        number of members here it is meant for.  While Redis is away it is delivered
        here at once."""
        cdef bytes b = data if type(data) is bytes else \
            _bytes_arg(data, "Group.Broadcast", "data")
        if self.backplane is not None:
            return self.backplane._publish(self, b, exclude, droppable)
        return self._fan_out(b, exclude, droppable)

    def _deliver(self, bytes data not None, exclude=None, bint droppable=False):
        """The fan-out itself, for the backplane: a shared group's message, back from
        Redis (or delivered here directly while Redis is away)."""
        return self._fan_out(data, exclude, droppable)

    cdef Py_ssize_t _fan_out(self, bytes b, object exclude, bint droppable) except -1:
        """Send `b` to every member, in the group's one order (see "Broadcast order"
        above): at once if no fan-out is under way, else in its turn."""
        cdef _GroupMessage m = None
        cdef Py_ssize_t n
        cdef bint queued = False
        cdef int depth = _fanouts()
        _take_lock(self._fan_lock)
        if self._fanning:
            # Made outside the lock: an allocation may run a collection, and so Python.
            PyThread_release_lock(self._fan_lock)
            m = _GroupMessage.__new__(_GroupMessage)
            m.data = b
            m.exclude = exclude
            m.droppable = droppable
            if depth == 0:
                m.turn = PyThread_allocate_lock()
                if m.turn == NULL:
                    raise MemoryError()
                PyThread_acquire_lock(m.turn, WAIT_LOCK)      # fresh: at once
            _take_lock(self._fan_lock)
            if self._fanning:
                try:
                    self._queued.append(m)  # may grow the list: no Python runs
                except BaseException:
                    PyThread_release_lock(self._fan_lock)
                    raise
                queued = True
            else:
                self._fanning = True
        else:
            self._fanning = True
        PyThread_release_lock(self._fan_lock)
        if queued:
            if m.turn == NULL:
                # From inside a fan-out: waiting could close a cycle of waits.
                return self._meant_for(exclude)
            # Until the fan-out before this one hands over (_fanning stays set).  Not
            # interruptible: a caller that left would leave the group without a fan-out.
            with nogil:
                PyThread_acquire_lock(m.turn, WAIT_LOCK)
        _set_fanouts(depth + 1)
        try:
            n = self._send_to_members(b, exclude, droppable)
        finally:
            try:
                self._hand_over()
            finally:
                _set_fanouts(depth)
        return n

    cdef int _hand_over(self) except -1:
        """(the fan-out, its own message sent) Send the messages queued from inside a
        fan-out, in order, up to the first one whose caller waits: that caller's turn.
        With nothing queued, the next Broadcast fans out at once."""
        cdef _GroupMessage m
        interrupted = None
        while True:
            _take_lock(self._fan_lock)
            if not self._queued:
                self._fanning = False
                PyThread_release_lock(self._fan_lock)
                break
            m = self._queued.pop(0)     # no Python runs: the reference is now m's
            PyThread_release_lock(self._fan_lock)
            if m.turn != NULL:
                PyThread_release_lock(m.turn)     # that caller fans out, and goes on
                break
            try:
                self._send_to_members(m.data, m.exclude, m.droppable)
            except Exception:
                logger.exception("a Broadcast to %r made from inside a fan-out failed",
                                 self)
            except BaseException as e:
                # (SystemExit, KeyboardInterrupt) raised once the fan-out is handed on.
                if interrupted is None:
                    interrupted = e
        if interrupted is not None:
            raise interrupted
        return 0

    def _queued_count(self):
        """(tests) The broadcasts waiting behind the fan-out under way."""
        cdef Py_ssize_t n
        _take_lock(self._fan_lock)
        n = len(self._queued)
        PyThread_release_lock(self._fan_lock)
        return n

    cdef Py_ssize_t _meant_for(self, object exclude) except -1:
        cdef Py_ssize_t n = 0
        for s in self._snapshot():
            if s is not exclude:
                n += 1
        return n

    cdef Py_ssize_t _send_to_members(self, bytes b, object exclude,
                                     bint droppable) except -1:
        """A member whose own Send raises is logged and skipped: the others still hear
        the message, and the error does not unwind into whoever broadcast (a hook of
        another session, which was disconnected for it; or the redis link delivering a
        shared group's message, which was dropped, or left the backplane draining for
        good).  What is not an Exception (an override's sys.exit(), a Ctrl-C landing
        in it) is not swallowed, but raised once every member has had the message:
        stopping at that member left the ones after it a stream the others did not
        hear."""
        cdef Session s
        cdef Py_ssize_t n = 0
        interrupted = None
        for s in self._snapshot():
            if s is exclude:
                continue
            if droppable and _send_queue_above_high(s):
                continue
            if s._hooks.send_overridden:
                try:
                    if s.Send(b):
                        n += 1
                except Exception:
                    logger.exception("Send of %r raised during %s (skipped)", s,
                                     "a shared group's delivery"
                                     if self.backplane is not None else
                                     f"a Broadcast to {self!r}")
                except BaseException as e:
                    if interrupted is None:
                        interrupted = e
            elif _send_data(s, b):
                n += 1
        if interrupted is not None:
            raise interrupted
        return n

    # ---- the group's strand ----

    def Post(self, func, *args):
        """Run ``func(*args)`` on the group's strand (any thread may post).  Returns False
        if the group is closed (or the core is).  At most ``post_queue_limit`` jobs wait
        at once (a class attribute, default 10000): past it Post raises ``queue.Full``.
        A room whose players each post their moves needs room for every player's burst:
        the bound is shared, and the one who posts when it is full gets the error."""
        self._core()
        return _post_to(self, JOB_CALL, func, args)

    def CallLater(self, double delay, func, *args):
        """Run ``func(*args)`` on the group's strand after ``delay`` seconds; returns a
        ``Timer``.  Cancelled by ``Close``."""
        self._core()
        return _owner_timer(self, delay, 0.0, func, args)

    def CallEvery(self, double interval, func, *args):
        """Run ``func(*args)`` on the group's strand every ``interval`` seconds (a room's
        tick) until the Timer is cancelled, the group closed or the core closed."""
        if interval <= 0:
            raise ValueError("interval must be positive")
        self._core()
        return _owner_timer(self, interval, interval, func, args)

    def Spawn(self, awaitable, callback=None):
        """Run ``awaitable`` on the core's asyncio loop thread; its outcome comes back on
        the group's strand (``callback(task)``, else the ``OnTaskDone(task)`` hook).
        Cancelled by ``Close``."""
        return _spawn(self._core(), self, awaitable, callback)

    def Who(self, callback=None):
        """Who is in the group, by name: a ``concurrent.futures.Future`` of the list.
        A shared group asks Redis (every server's members; this server's only while
        Redis is away); a local group answers with ``names``.  ``callback(names)``, if
        given, runs on the group's strand."""
        if self.backplane is not None:
            return self.backplane._group_who(self, callback)
        import concurrent.futures
        fut = concurrent.futures.Future()
        names = self.names
        fut.set_result(names)
        if callback is not None:
            self.Post(callback, names)
        return fut

    def Close(self):
        """End the group (idempotent, any thread): every member is removed, its pending
        timers and tasks are cancelled, and nothing more runs on its strand.  A shared
        group stops listening to its channel and takes its members out of presence."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            members = self._members
            self._members = ()
            self._names = {}
        for s in members:
            _forget_group(<Session>s, self)
        _end_owned(self._x)
        if self.backplane is not None:
            self.backplane._unshare(self)


cdef _check_member_name(str name):
    """Presence carries names to Redis as UTF-8.  A lone surrogate (a name read with
    errors="surrogateescape") failed there after the member had joined: Add raised half
    done, and every later registration of the group's names raised too, so after an
    outage the backplane never shared again."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"name {name!r} cannot be encoded as UTF-8 (a lone "
                         f"surrogate): member names are text") from None


cdef inline void _take_lock(PyThread_type_lock lock) noexcept:
    """A PyThread lock for a few instructions: no signal handler runs in its wait (a
    KeyboardInterrupt cannot leave a fan-out marked as under way), and the wait lets go
    of the GIL (the holder may need it)."""
    if not PyThread_acquire_lock(lock, NOWAIT_LOCK):
        with nogil:
            PyThread_acquire_lock(lock, WAIT_LOCK)


cdef void _forget_group(Session session, Group g) noexcept:
    """Take `g` out of the session's list of groups."""
    cdef _Owned x = session._x
    cdef Py_ssize_t i
    if x is None:
        return
    with x.lock:
        groups = x.groups
        if groups is not None:
            for i in range(len(groups)):
                if groups[i] is g:
                    del groups[i]
                    break


cdef void _session_ended(Session s) noexcept:
    """The session ends (before OnDisconnected, on its strand): cancel its timers and
    tasks, leave its groups."""
    cdef _Owned x
    cdef Group g
    port_spin_lock(&s._lock)
    x = s._x
    port_spin_unlock(&s._lock)
    if x is None:
        return
    try:
        groups = _end_owned(x)
        if groups:
            for g in groups:
                g._discard(s)
    except BaseException:
        logger.exception("ending the timers, tasks and groups of %s failed", repr(s))
