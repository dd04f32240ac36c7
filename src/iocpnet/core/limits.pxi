# core/limits.pxi: flood protection.  Per session, token buckets on the messages and the
# bytes a peer sends; at accept, new connections per second and live sessions per remote
# address; and the one log line per burst of refused connections.
# Included by _core.pyx (one extension module, one file per concern).
#
# Per session.  Class attributes of the Session subclass, resolved once per class into
# its _Hooks (every one off by default):
#
#     recv_messages_per_second, recv_messages_burst
#     recv_bytes_per_second,    recv_bytes_burst
#
# Each limit is a token bucket: it holds at most `burst` tokens (default: one second's
# worth, at least 1) and refills at the rate; a message takes one token, a chunk of n
# bytes takes n.  A message is refused when the bucket holds less than it needs, so in
# any t seconds a peer gets at most burst + rate * t through.  A chunk larger than the
# whole byte burst (a 16 KiB receive against a 4 KiB burst) passes only from a full
# bucket and leaves it in debt, which the next chunks wait out.  A peer over a limit is
# disconnected at once with a reset, the reason logged at WARNING (per burst: a peer can
# be cut on connection after connection, see LogBurst below):
#
#     rate limit: 1250 messages/s over recv_messages_per_second 1000
#         (5000 messages in 4.000 s, burst 1000)
#
# (the observed rate is what the peer sent since its bucket was last full).
#
# What a "message" is:
# - a plain Session: one received chunk, i.e. one receive completion, which is one OnRecv
#   call.  TCP decides how a peer's writes are cut into chunks (a chunk is 1 byte to the
#   receive buffer's size), so for a byte stream the byte limit is the exact one and the
#   message limit bounds how often a peer can wake the hook;
# - a PacketSession (in packet mode): one packet, counted before OnRecvPacket sees it;
# - a framing layer of its own (WebSocketSession): what that layer counts, see below.
#
# Cost on the receive path: nothing but one flag test when the class sets no limit.
# With limits: no clock read (the batch's clock, IocpCore._now_ms, read once per batch,
# millisecond resolution; a batch that runs long only makes the bucket stricter for its
# duration, which the burst absorbs), no allocation per message (the per-session state
# is allocated on the first message, freed with the session), a few float operations.
# The state is touched only on the session's strand (its receive path), so it needs no
# lock.
#
# Framing layers (the internal API).  A layer that cuts the stream into messages of its
# own sets the class attribute `_counts_own_messages = True` on its Session class
# (PacketSession in packet mode does the same implicitly); the receive path then counts
# each chunk's bytes only.  The layer calls, on the session's strand, once per message
# and before a hook sees it:
#
#     if not _message_counted(session, nbytes): stop parsing (the session is closing)
#
# which counts the message in the figures (stats.pxi) and against
# recv_messages_per_second.  _recv_counted(session, nbytes) is the receive path's own
# call, once per chunk.
#
# At accept (Service options, checked in Service._admit under the service's _lock, before
# any hook runs, the same way as the max_sessions cap: the socket is closed with a reset
# and the accept slot posted again):
#
#     max_sessions_per_address     live sessions from one remote address
#     connect_rate_per_address     new connections per second from one address
#     connect_burst_per_address    (default: one second's worth, at least 1)
#     address_table_size           most addresses remembered for the rate (16384)
#
# Every connection from an address takes a token, refused or not, so a flooder stays
# refused for as long as it keeps flooding.  The address is the peer's host as text (an
# IPv4-mapped IPv6 address as IPv4); IPv6 peers are limited per address, not per prefix.
# Memory stays bounded under a flood from many addresses (127.0.0.0/8 locally, an IPv6
# /64 outside): the live table holds an entry per address with a live session (bounded
# by the sessions themselves); the rate table is an LRU capped at address_table_size, an
# address whose bucket has refilled is forgotten (it is then the same as a new one), and
# when the table is full the least recently seen address is forgotten even if it has
# not refilled (counted as an eviction): the cap lets such an address start over with a
# full burst rather than refuse addresses for want of room.
#
# Refusals (any reason, max_sessions included) are counted by reason in stats() and
# logged once per burst: the first refusal starts a 1 s timer; the line is written when
# a second passes without a refusal (or every minute during a long flood, or at Stop):
#
#     refused 4980 connections in 2.3 s (connect_rate_per_address: 4975,
#         max_sessions_per_address: 5); most from 127.0.0.2 (4978)

import collections as _collections

cdef enum:
    REFUSED_NONE = 0
    REFUSED_MAX_SESSIONS = 1
    REFUSED_PER_ADDRESS = 2
    REFUSED_RATE = 3
    REFUSED_SHUTDOWN = 4
    REFUSED_SESSION_CLASS = 5     # its class's settings are wrong (websocket.pxi)
    N_REFUSED = 6

_REFUSED_NAMES = ("", "max_sessions", "max_sessions_per_address",
                  "connect_rate_per_address", "shutdown", "bad_session_class")
cdef enum:
    BURST_HOSTS = 16          # addresses named in one burst's log line (the rest counted)


cdef struct _Bucket:
    double rate              # tokens per second
    double burst             # capacity
    double tokens
    double taken             # taken since the bucket was last full (for the reason)
    int64_t last_ms          # last refill
    int64_t full_ms          # when it was last full


cdef struct _RecvLimits:     # per class, in its _Hooks
    double msg_rate
    double msg_burst
    double byte_rate
    double byte_burst
    bint on
    bint own_messages        # a framing layer counts the messages, not the receive path


cdef struct _RateState:      # per session, allocated on its first message
    _Bucket msgs
    _Bucket bytes


cdef inline void _bucket_init(_Bucket *b, double rate, double burst, int64_t now) noexcept nogil:
    b.rate = rate
    b.burst = burst
    b.tokens = burst
    b.taken = 0
    b.last_ms = now
    b.full_ms = now


cdef inline bint _bucket_take(_Bucket *b, double cost, int64_t now) noexcept nogil:
    """Take `cost` tokens; False when the bucket holds less than needed (over the rate).
    `now` may lag another worker's clock a little: time never runs backwards here."""
    cdef int64_t dt = now - b.last_ms
    if dt > 0:
        b.last_ms = now
        b.tokens += <double>dt * b.rate / 1000.0
        if b.tokens >= b.burst:
            b.tokens = b.burst
            b.full_ms = now
            b.taken = 0
    b.taken += cost
    if b.tokens < (cost if cost < b.burst else b.burst):
        return False
    b.tokens -= cost
    return True


cdef double _class_rate(type cls, str name) except -1:
    v = getattr(cls, name, None)
    if v is None:
        return 0.0
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0 or v != v:
        raise ValueError(f"{cls.__name__}: {name} must be a number >= 0 (0 or None: off), "
                         f"not {v!r}")
    return float(v)


cdef _RecvLimits _recv_limits_for(type cls, bint packet_mode) except *:
    """The class's per-session limits (at _hooks_for time, once per class)."""
    cdef _RecvLimits lim
    lim.msg_rate = _class_rate(cls, "recv_messages_per_second")
    lim.byte_rate = _class_rate(cls, "recv_bytes_per_second")
    lim.msg_burst = _class_rate(cls, "recv_messages_burst") or max(lim.msg_rate, 1.0)
    lim.byte_burst = _class_rate(cls, "recv_bytes_burst") or max(lim.byte_rate, 1.0)
    if lim.msg_burst < 1:
        raise ValueError(f"{cls.__name__}: recv_messages_burst must be at least 1")
    lim.on = lim.msg_rate > 0 or lim.byte_rate > 0
    lim.own_messages = packet_mode or bool(getattr(cls, "_counts_own_messages", False))
    return lim


cdef inline bint _recv_counted(Session s, Py_ssize_t n) noexcept:
    """The receive path, once per chunk of `n` bytes, on the session's strand: counted in
    the figures and against the limits.  False: over a limit, the session is closing and
    the chunk must be dropped."""
    cdef _RecvLimits *lim = &s._hooks.lim
    _cnt_add(&s._cnt.bytes_in, n)
    if not lim.own_messages:
        _cnt_add(&s._cnt.msgs_in, 1)
    if not lim.on:
        return True
    return _rate_check(s, n, 0 if lim.own_messages else 1)


cdef inline bint _message_counted(Session s, Py_ssize_t n) noexcept:
    """A framing layer, once per message, before its hook sees it (see the top)."""
    _cnt_add(&s._cnt.msgs_in, 1)
    if not s._hooks.lim.on:
        return True
    return _rate_check(s, 0, 1)


cdef bint _rate_check(Session s, Py_ssize_t nbytes, int nmsgs) noexcept:
    cdef _RateState *st = s._rate
    cdef _RecvLimits *lim = &s._hooks.lim
    cdef int64_t now = s.core._now_ms
    if st == NULL:
        st = <_RateState *>malloc(sizeof(_RateState))
        if st == NULL:
            _close_now(s, "out of memory for the rate limiter", True)
            return False
        _bucket_init(&st.msgs, lim.msg_rate, lim.msg_burst, now)
        _bucket_init(&st.bytes, lim.byte_rate, lim.byte_burst, now)
        s._rate = st
    if nmsgs > 0 and lim.msg_rate > 0 and not _bucket_take(&st.msgs, nmsgs, now):
        _rate_exceeded(s, &st.msgs, "messages", "recv_messages_per_second", now)
        return False
    if nbytes > 0 and lim.byte_rate > 0 and not _bucket_take(&st.bytes, nbytes, now):
        _rate_exceeded(s, &st.bytes, "bytes", "recv_bytes_per_second", now)
        return False
    return True


cdef void _rate_exceeded(Session s, _Bucket *b, str unit, str attr, int64_t now) noexcept:
    cdef double secs = <double>(now - b.full_ms if now - b.full_ms > 0 else 1) / 1000.0
    reason = (f"rate limit: {b.taken / secs:.0f} {unit}/s over {attr} {b.rate:g} "
              f"({b.taken:.0f} {unit} in {secs:.3f} s, burst {b.burst:g})")
    if s._state == S_CONNECTED:
        # A peer can do this on connection after connection: bounded per burst.
        _log_in_burst(s, LOG_RATE, _logging_WARNING, f"disconnecting {repr(s)}: {reason}")
    _close_now(s, reason, True)


cdef void _rate_free(Session s) noexcept:
    if s._rate != NULL:
        free(s._rate)
        s._rate = NULL


# ---------------------------------------------------------------------------------------
# At accept: per remote address

cdef str _peer_host(Session s):
    """The accepted peer's host as text (from the address the accept reported, kept
    by Listener._dispatch: known even when the peer has already reset), or None when
    the OS gave no address we can show (not limited).  The (host, port) tuple is not
    made: a session that never asks for its address does not carry one."""
    cdef port_addr_t addr
    cdef char host[64]
    cdef int portnum = 0
    a = s._address
    if a is not None:
        return a[0]
    port_spin_lock(&s._lock)
    addr.len = s._peer_len
    memcpy(&addr.ss, s._peer, addr.len)
    port_spin_unlock(&s._lock)
    if addr.len > 0 and port_addr_format(&addr, host, sizeof(host), &portnum) == 0:
        return host.decode("ascii")
    return None


@cython.final
cdef class _ServiceLimits:
    """A service's accept limits and its refusal log (all under the service's _lock)."""
    cdef Py_ssize_t max_live            # per address; -1: off
    cdef double rate                    # per address; 0: off
    cdef double burst
    cdef Py_ssize_t table_size
    cdef bint per_address               # any per-address limit set
    cdef dict live                      # host -> live sessions from it
    cdef object recent                  # host -> [tokens, last_ms], least recent first
    cdef uint64_t evictions
    # The refusal burst being logged:
    cdef bint tick_pending
    cdef int64_t burst_start_ms
    cdef int64_t burst_last_ms
    cdef uint64_t burst_count
    cdef uint64_t burst_reasons[N_REFUSED]
    cdef dict burst_hosts               # at most _BURST_HOSTS hosts named -> count

    def __init__(self, max_sessions_per_address, connect_rate_per_address,
                 connect_burst_per_address, address_table_size):
        self.max_live = -1
        if max_sessions_per_address is not None:
            self.max_live = int(max_sessions_per_address)
            if self.max_live < 0:
                raise ValueError("max_sessions_per_address must be >= 0")
        self.rate = 0.0
        if connect_rate_per_address is not None:
            self.rate = float(connect_rate_per_address)
            if not self.rate >= 0:
                raise ValueError("connect_rate_per_address must be >= 0")
        if connect_burst_per_address is None:
            self.burst = max(self.rate, 1.0)
        else:
            self.burst = float(connect_burst_per_address)
            if not self.burst >= 1:
                raise ValueError("connect_burst_per_address must be >= 1")
        self.table_size = int(address_table_size)
        if self.table_size < 1:
            raise ValueError("address_table_size must be >= 1")
        self.per_address = self.max_live >= 0 or self.rate > 0
        self.live = {}
        self.recent = _collections.OrderedDict()
        self.burst_hosts = {}

    cdef int check(self, str host, int64_t now) except -1:
        """May `host` open one more session?  Takes a connection token either way;
        the caller reserves the live place with add() once every check has passed."""
        cdef double tokens
        cdef object entry
        if self.rate > 0:
            self._expire(now)
            entry = self.recent.get(host)
            if entry is None:
                tokens = self.burst
                if len(self.recent) >= self.table_size:
                    self._make_room(now)
                entry = [tokens, now]
                self.recent[host] = entry
            else:
                tokens = entry[0]
                if now > entry[1]:
                    tokens = min(self.burst, tokens + (now - entry[1]) * self.rate / 1000.0)
                    entry[1] = now
                self.recent.move_to_end(host)
            if tokens < 1.0:
                entry[0] = tokens
                return REFUSED_RATE
            entry[0] = tokens - 1.0
        if self.max_live >= 0 and self.live.get(host, 0) >= self.max_live:
            return REFUSED_PER_ADDRESS
        return REFUSED_NONE

    cdef void _make_room(self, int64_t now) except *:
        """The rate table is full: forget the least recently seen address (an eviction
        unless its bucket had refilled, when forgetting it changes nothing)."""
        while len(self.recent) >= self.table_size:
            host, entry = self.recent.popitem(last=False)
            if not self._refilled(entry, now):
                self.evictions += 1

    cdef inline bint _refilled(self, list entry, int64_t now) except -1:
        return (now - <int64_t>entry[1]) * self.rate / 1000.0 >= self.burst - <double>entry[0]

    cdef void _expire(self, int64_t now) except *:
        """Forget up to two refilled addresses at the least recent end (amortised
        expiry: an address that stopped connecting is gone once its bucket is full)."""
        cdef int k
        for k in range(2):
            if not self.recent:
                return
            host = next(iter(self.recent))
            if not self._refilled(self.recent[host], now):
                return
            del self.recent[host]

    cdef void add(self, str host) except *:
        self.live[host] = self.live.get(host, 0) + 1

    cdef void remove(self, str host) except *:
        n = self.live.get(host, 0) - 1
        if n > 0:
            self.live[host] = n
        else:
            self.live.pop(host, None)

    cdef bint note_refusal(self, int why, str host, int64_t now) except -1:
        """Count a refusal in the burst being logged; True: start the burst's timer."""
        cdef bint start = not self.tick_pending
        if self.burst_count == 0:
            self.burst_start_ms = now
        self.burst_last_ms = now
        self.burst_count += 1
        self.burst_reasons[why] += 1
        if host is not None:
            if host in self.burst_hosts or len(self.burst_hosts) < BURST_HOSTS:
                self.burst_hosts[host] = self.burst_hosts.get(host, 0) + 1
        self.tick_pending = True
        return start

    cdef str summary(self, int64_t now):
        """The burst's log line (None if nothing was refused), and a fresh count."""
        cdef int i
        if self.burst_count == 0:
            return None
        parts = [f"{_REFUSED_NAMES[i]}: {self.burst_reasons[i]}"
                 for i in range(1, N_REFUSED) if self.burst_reasons[i]]
        line = (f"refused {self.burst_count} connection"
                f"{'' if self.burst_count == 1 else 's'} in "
                f"{max(self.burst_last_ms - self.burst_start_ms, 0) / 1000.0:.1f} s "
                f"({', '.join(parts)})")
        if self.burst_hosts:
            host, n = max(self.burst_hosts.items(), key=lambda kv: kv[1])
            line += f"; most from {host} ({n})"
        self.burst_count = 0
        for i in range(N_REFUSED):
            self.burst_reasons[i] = 0
        self.burst_hosts = {}
        return line


cdef bint _admit_connection(Service svc, port_sock_t sock, Session s) noexcept:
    """Service._admit: may this accepted connection start a session?  A yes reserves its
    place (the live-session cap, the per-address count) until _session_connected:
    accepts complete on several workers at once, and two of them must not both take the
    last place.  A no is counted by reason and logged once per burst."""
    cdef _ServiceLimits lim = svc._lim
    cdef int why = REFUSED_NONE
    cdef str host = None
    cdef int64_t now = svc.core._now_ms
    cdef bint start_tick = False
    try:
        if lim.per_address:
            host = _peer_host(s)
        svc._lock_acquire()        # `with svc._lock:`, without binding two methods
        try:
            if svc._stopping:
                why = REFUSED_SHUTDOWN
            elif host is not None:
                why = lim.check(host, now)
            if why == REFUSED_NONE and svc._cap >= 0 and \
                    len(svc._sessions) + svc._admitting >= svc._cap:
                svc.rejected += 1
                why = REFUSED_MAX_SESSIONS
            if why == REFUSED_NONE:
                svc._admitting += 1
                if host is not None:
                    lim.add(host)
                    s._addr_key = host
                return True
            svc._st.refused[why] += 1
            if why != REFUSED_SHUTDOWN:
                start_tick = lim.note_refusal(why, host, port_monotonic_ms())
        finally:
            svc._lock_release()
        if start_tick:
            _start_refusal_tick(svc)
        return False
    except BaseException:
        logger.exception("admitting a connection failed; refusing it")
        with svc._lock:
            lim.tick_pending = False
    return False


cdef void _address_released(Service svc, Session s) noexcept:
    """A session counted by the per-address limit ended (under the service's _lock)."""
    try:
        svc._lim.remove(s._addr_key)
    except BaseException:
        logger.exception("releasing a per-address count failed")
    s._addr_key = None


def _refusal_tick(Service svc):
    """The refusal burst's timer: log its line once quiet (or every minute)."""
    cdef _ServiceLimits lim = svc._lim
    cdef int64_t now = port_monotonic_ms()
    line = None
    with svc._lock:
        quiet = now - lim.burst_last_ms >= 1000
        if quiet or now - lim.burst_start_ms >= 60000 or svc._stopping:
            line = lim.summary(now)
        again = not quiet and not svc._stopping
        lim.tick_pending = again
    if line is not None:
        logger.warning("%s", line)
    if again:
        _start_refusal_tick(svc)


cdef void _start_refusal_tick(Service svc) noexcept:
    cdef _ServiceLimits lim = svc._lim
    try:
        svc.core.CallLater(1.0, _refusal_tick, svc)
        return
    except Exception:
        pass
    # The core is closing (no timer can start): the line is written now.
    try:
        with svc._lock:
            lim.tick_pending = False
            line = lim.summary(port_monotonic_ms())
        if line is not None:
            logger.warning("%s", line)
    except BaseException:
        logger.exception("logging the refused connections failed")


cdef void _limits_stopping(Service svc) noexcept:
    """Stop(): the burst being counted is logged now."""
    cdef _ServiceLimits lim = svc._lim
    try:
        with svc._lock:
            line = lim.summary(port_monotonic_ms())
        if line is not None:
            logger.warning("%s", line)
    except BaseException:
        logger.exception("logging the refused connections failed")


# ---- one line per burst of a repeated failure ----
#
# A failure a peer can repeat at will (a failed TLS handshake: connect, send anything but
# TLS, again) or a session factory failing every other call wrote a line (a traceback)
# each time: thousands a second, the log flooded and the lines that matter buried.  A
# LogBurst lets the first few of a burst through in full and counts the rest, written
# once the burst has been quiet for a second (and once a minute while it lasts) as
#
#     ... and 412 more TLS handshake failures in the last 2.3 s (the last: <...>)
#
# at the highest level among them.  A burst that follows a quiet second logs in full
# again.  Failures only: nothing here runs on a path that works.

cdef int _logging_INFO = logging.INFO
cdef int _logging_WARNING = logging.WARNING
cdef int _logging_ERROR = logging.ERROR

cdef enum:
    _LOG_BURST_QUIET_MS = 1000       # a burst ends after this long without an event
    _LOG_BURST_REMIND_MS = 60000     # the count while it lasts


@cython.final
cdef class LogBurst:
    """A log line that a peer can make a server repeat at will, bounded per burst.

    ``LogBurst(core, what, lines=5, logger=None)``, then ``log(level, msg)`` from any
    thread: the first ``lines`` of a burst are logged in full; the rest are counted,
    and the count is written once the burst has been quiet for a second (and once a
    minute while it lasts) as ``... and K more <what> in the last T s (the last:
    <msg>)``, at the highest level among them; ``flush()`` writes it at once.
    ``what`` is plural ("malformed packets").  ``logger``: a ``logging.Logger`` (default: iocpnet's).  The library's
    own such lines (failed TLS handshakes, bad packets, rate limit cuts...) go through
    one per service and kind."""
    cdef object core             # IocpCore: its timer writes the count
    cdef str what                # "TLS handshake failures"
    cdef int lines               # logged in full per burst
    cdef object _logger
    cdef object lock
    cdef int logged              # lines logged in full in this burst
    cdef int64_t more            # counted since the last count line
    cdef int level               # the highest level among them
    cdef str last                # the last of them
    cdef int64_t from_ms         # the first of them
    cdef int64_t last_ms         # the burst's last event, counted or not
    cdef bint tick_pending

    def __init__(self, core, str what, int lines=5, logger=None):
        if not isinstance(core, IocpCore):
            raise TypeError("LogBurst needs an IocpCore")
        if lines < 0:
            raise ValueError("lines must be >= 0")
        self.core = core
        self.what = what
        self.lines = lines
        self._logger = _logger_of(logger)
        self.lock = threading.Lock()

    def __reduce_ex__(self, protocol):
        _refuse_copy(self, "one burst's count, written by its core's timer")

    def log(self, int level, str msg):
        """Log `msg` at `level`: in full while this burst lets it through (returns
        True), else counted in the burst's line (False)."""
        if self.note(level, msg):
            self._logger.log(level, "%s", msg)
            return True
        return False

    cdef bint note(self, int level, str text) except -1:
        """An event: True if it is one of the burst's first lines, to be logged in full
        by the caller; else it is counted (`text`, what that line would have said)."""
        cdef int64_t now = port_monotonic_ms()
        cdef bint full, start
        with self.lock:
            self.last_ms = now
            full = self.logged < self.lines
            if full:
                self.logged += 1
            else:
                if self.more == 0:
                    self.from_ms = now
                    self.level = level
                self.more += 1
                self.level = max(self.level, level)
                self.last = text
            start = not self.tick_pending
            self.tick_pending = True
        if start:
            self._start_tick()
        return full

    cpdef bint flush(self) noexcept:
        """Write the count of what this burst holds now, from any thread; True if a
        count line was written (nothing is held: nothing written, so a second flush is
        a no-op).  For an application that shuts down its own way or wants the figure
        now (the library's own: the service stops, the listener closes), since the
        core's timer may never run again.  The burst itself goes on: lines keep being
        counted until it has been quiet for a second."""
        try:
            with self.lock:
                level, line = self._count_line(port_monotonic_ms())
            if line is not None:
                self._logger.log(level, "%s", line)
                return True
        except BaseException:
            logger.exception("logging the count of %s failed", self.what)
        return False

    cdef tuple _count_line(self, int64_t now):
        """(under lock) The count line (None if nothing was counted), and a fresh count."""
        if self.more == 0:
            return 0, None
        line = (f"... and {self.more} more {self.what} in the last "
                f"{max(now - self.from_ms, 0) / 1000.0:.1f} s (the last: {self.last})")
        self.more = 0
        self.last = None
        return self.level, line

    def _tick(self):
        """The burst's timer: the count once it is quiet (then the next burst logs in
        full again), or once a minute while it lasts."""
        cdef int64_t now = port_monotonic_ms()
        with self.lock:
            quiet = now - self.last_ms >= _LOG_BURST_QUIET_MS
            level, line = 0, None
            if quiet or now - self.from_ms >= _LOG_BURST_REMIND_MS:
                level, line = self._count_line(now)
            if quiet:
                self.logged = 0
            self.tick_pending = not quiet
        if line is not None:
            self._logger.log(level, "%s", line)
        if not quiet:
            self._start_tick()

    cdef void _start_tick(self) noexcept:
        try:
            # Internal: a count can still be written while the core closes.
            (<IocpCore>self.core)._start_timer(_LOG_BURST_QUIET_MS / 1000.0, 0.0,
                                               self._tick, (), True)
            return
        except BaseException:
            pass
        # The core is closed (no timer can start): the count is written now.
        with self.lock:
            self.tick_pending = False
            self.logged = 0
        self.flush()


cdef object _logger_of(object given):
    if given is None:
        return logger
    if not isinstance(given, logging.Logger):
        raise TypeError("logger must be a logging.Logger")
    return given


# The kinds of line a peer can make a service repeat at will, one LogBurst each
# (Service._log_bursts, in this order).
cdef enum:
    LOG_TLS = 0          # failed TLS handshakes (tls.pxi)
    LOG_WS = 1           # refused WebSocket upgrades (websocket_http.pxi)
    LOG_PACKETS = 2      # bad packet sizes, unknown packet ids (session_recv.pxi, packets.pxi)
    LOG_WS_FRAMES = 3    # bad frames after the upgrade (websocket.pxi)
    LOG_RATE = 4         # sessions cut over their receive rate (_rate_exceeded)
    LOG_SEND_LIMIT = 5   # sessions cut over send_queue_limit (session_send.pxi, tls.pxi)
    LOG_STALL = 6        # sessions cut by send_timeout (stall.pxi)
    LOG_WS_HANDSHAKE = 7 # WebSocket handshake timeouts, our client's failed handshakes
    LOG_TLS_ERROR = 8    # TLS errors after the handshake: bad records (tls.pxi)
    LOG_WS_KEEPALIVE = 9 # WebSocket peers silent past ping_timeout (websocket.pxi)
_LOG_BURST_WHAT = ("TLS handshake failures", "refused WebSocket upgrades", "bad packets",
                   "WebSocket protocol errors", "rate limit disconnects",
                   "send queue limit disconnects", "send stalled disconnects",
                   "failed WebSocket handshakes", "TLS errors",
                   "WebSocket keepalive timeouts")


cdef void _log_in_burst(Session s, int kind, int level, str text) noexcept:
    """Log a line a peer can make `s`'s service repeat at will: in full while the
    service's burst of that kind lets it through (always without a service), else
    counted in the burst's line."""
    cdef LogBurst burst = None
    try:
        if s._service is not None:
            burst = <LogBurst>s._service._log_bursts[kind]
        if burst is None or burst.note(level, text):
            logger.log(level, "%s", text)
    except BaseException:
        logger.exception("logging %r failed", text)
