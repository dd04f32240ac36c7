# core/stats.pxi: the figures.  Service.stats(), the counters behind it, hook timing,
# the disconnect buckets, and ServeMetrics (the Prometheus side is iocpnet/metrics.py).
# Included by _core.pyx (one extension module, one file per concern).
#
# Where each figure is counted, and what guards it (no figure depends on the GIL):
#
# - bytes and messages in and out: four counters in each Session (_Counters).  Each has
#   one writer at a time: bytes_in and messages_in are written on the session's strand
#   (its receive path, limits.pxi's _recv_counted / _message_counted); bytes_out in the
#   send completion and in Send's direct send, messages_out in Send, all under the
#   session's _lock (with TLS, tls.pxi counts each Send under its mutex, not each
#   record).  So they are relaxed loads and stores (no locked instruction, no shared
#   cache line: the hot path pays a few ordinary increments), and a reader on another
#   thread reads them with relaxed loads.  A "message out" is one Send() that sent or
#   queued bytes (a Broadcast counts one per session that took it); a message in is
#   what limits.pxi says it is (a chunk, a packet, a framing layer's message).  Bytes
#   are what crossed the socket (with TLS: ciphertext, the handshake included), and so
#   are send-queue bytes.
# - When a session ends, Service._session_done folds its counters into the service's
#   totals (_ServiceStats) and counts its disconnect reason, under the service's _lock,
#   in the same critical section that removes it from the live set: stats(), which sums
#   the totals and the live sessions under that lock, never counts a session twice or
#   misses one.
# - Refusals by reason: limits.pxi, under the service's _lock.
# - Disconnects by reason: the reason string is put in one of a fixed set of buckets
#   (_DISCONNECT_KINDS) by its prefix, so no string a peer or user controls ever becomes
#   a key.  A layer that adds a reason of its own adds its prefix to _DISCONNECT_PREFIXES;
#   anything unknown counts as "closed" (the application's Disconnect or Abort).
# - Dispatch batches: per core (all services on one core share them), counted in
#   IocpCore.Dispatch once per batch with atomics: the batch's size (a power-of-two
#   histogram), the completions it handled (those its strands had queued included) and
#   the time the batch took to dispatch, i.e. the hooks and the core's
#   own work (two monotonic clock reads per batch, none per completion).
# - Hook time per hook: only for a Session class that sets `measure_hooks = True`.  Its
#   hooks are then wrapped once per class (_TimedHook): two clock reads and three
#   atomics per hook call, recorded in the session's service.  Off, it costs nothing.
# - Send-queue bytes (total and largest): read from each live session under its _lock
#   when stats() runs.  stats() is O(live sessions), under the service's _lock (which
#   accepts also take): call it every few seconds, not per message.

cdef extern from *:
    """
    #include "port/port_sync.h"
    /* A monotonic clock in nanoseconds (hook and batch times). */
    static int64_t iocpnet_clock_ns(void) {
    #ifdef _WIN32
        LARGE_INTEGER c, f;
        QueryPerformanceCounter(&c);
        QueryPerformanceFrequency(&f);
        return (int64_t)(c.QuadPart / f.QuadPart) * 1000000000 +
               (int64_t)(c.QuadPart % f.QuadPart) * 1000000000 / f.QuadPart;
    #else
        struct timespec ts;
        clock_gettime(CLOCK_MONOTONIC, &ts);
        return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
    #endif
    }
    /* Counters with one writer at a time: relaxed loads and stores, no locked op. */
    #if defined(_MSC_VER)
    static __inline void iocpnet_cnt_add(int64_t *p, int64_t v) {
        /* aligned 64-bit volatile accesses are single instructions on x64 and arm64 */
        *(volatile int64_t *)p = *(volatile int64_t *)p + v;
    }
    static __inline int64_t iocpnet_cnt_load(int64_t *p) { return *(volatile int64_t *)p; }
    static __inline void iocpnet_atomic_max64(int64_t *p, int64_t v) {
        int64_t cur = *(volatile int64_t *)p;
        while (v > cur) {
            int64_t prev = _InterlockedCompareExchange64((volatile __int64 *)p, v, cur);
            if (prev == cur)
                break;
            cur = prev;
        }
    }
    static __inline void iocpnet_atomic_add64(int64_t *p, int64_t v) {
        _InterlockedExchangeAdd64((volatile __int64 *)p, v);
    }
    #else
    #define iocpnet_cnt_add(p, v) \\
        __atomic_store_n((p), __atomic_load_n((p), __ATOMIC_RELAXED) + (v), __ATOMIC_RELAXED)
    #define iocpnet_cnt_load(p) __atomic_load_n((p), __ATOMIC_RELAXED)
    static inline void iocpnet_atomic_max64(int64_t *p, int64_t v) {
        int64_t cur = __atomic_load_n(p, __ATOMIC_RELAXED);
        while (v > cur &&
               !__atomic_compare_exchange_n(p, &cur, v, 1, __ATOMIC_RELAXED, __ATOMIC_RELAXED))
            ;
    }
    #define iocpnet_atomic_add64(p, v) ((void)__atomic_add_fetch((p), (v), __ATOMIC_RELAXED))
    #endif
    """
    int64_t iocpnet_clock_ns() nogil
    void _cnt_add "iocpnet_cnt_add"(int64_t *p, int64_t v) nogil
    int64_t _cnt_load "iocpnet_cnt_load"(int64_t *p) nogil
    void _atomic_max "iocpnet_atomic_max64"(int64_t *p, int64_t v) nogil
    void _atomic_add "iocpnet_atomic_add64"(int64_t *p, int64_t v) nogil


cdef struct _Counters:       # per session, see the top
    int64_t bytes_in
    int64_t msgs_in
    int64_t bytes_out
    int64_t msgs_out


cdef enum:
    BATCH_BUCKETS = 8        # batch sizes 1, 2-3, 4-7, ..., 64-127, 128


cdef struct _BatchStats:     # per core, atomics (any worker)
    int64_t batches
    int64_t completions
    int64_t size_max
    int64_t ns
    int64_t ns_max
    int64_t sizes[BATCH_BUCKETS]


cdef inline void _batch_done(IocpCore core, int n, int handled, int64_t t0) noexcept nogil:
    """IocpCore.Dispatch, after each batch of n > 0 completions begun at t0, which
    handled `handled` completions: its own and those its strands had queued (reaped by
    other workers meanwhile, and in no batch of theirs)."""
    cdef int64_t dt = iocpnet_clock_ns() - t0
    cdef int k = 0
    while k < BATCH_BUCKETS - 1 and (n >> (k + 1)) > 0:
        k += 1
    _atomic_add(&core._batches.batches, 1)
    _atomic_add(&core._batches.completions, handled)
    _atomic_add(&core._batches.sizes[k], 1)
    _atomic_add(&core._batches.ns, dt)
    _atomic_max(&core._batches.size_max, n)
    _atomic_max(&core._batches.ns_max, dt)


# ---------------------------------------------------------------------------------------
# Hook time (measure_hooks = True)

cdef enum:
    N_HOOKS = 6

_HOOK_NAMES = ("OnConnected", "OnRecv", "OnRecvPacket", "OnSend", "OnDisconnected",
               "OnConnectFailed")


@cython.final
cdef class _TimedHook:
    """A hook that records how long each call took in its session's service."""
    cdef object func
    cdef int index

    def __call__(self, session, *args):
        cdef int64_t t0 = iocpnet_clock_ns()
        try:
            return self.func(session, *args)
        finally:
            _hook_timed(session, self.index, iocpnet_clock_ns() - t0)


cdef void _hook_timed(object session, int i, int64_t ns) noexcept:
    cdef Service svc
    if not isinstance(session, Session):
        return
    svc = (<Session>session)._service
    if svc is None:
        return
    _atomic_add(&svc._st.hook_count[i], 1)
    _atomic_add(&svc._st.hook_ns[i], ns)
    _atomic_max(&svc._st.hook_max[i], ns)


cdef object _timed(object f, int i):
    cdef _TimedHook t
    if f is None:
        return None
    t = _TimedHook.__new__(_TimedHook)
    t.func = f
    t.index = i
    return t


cdef void _hooks_measure(type cls, _Hooks h) except *:
    """_hooks_for: wrap the class's hooks if it sets measure_hooks (once per class)."""
    if not getattr(cls, "measure_hooks", False):
        return
    h.on_connected = _timed(h.on_connected, 0)
    h.on_recv = _timed(h.on_recv, 1)
    h.on_recv_packet = _timed(h.on_recv_packet, 2)
    h.on_send = _timed(h.on_send, 3)
    h.on_disconnected = _timed(h.on_disconnected, 4)
    h.on_connect_failed = _timed(h.on_connect_failed, 5)


# ---------------------------------------------------------------------------------------
# Disconnects by reason

cdef enum:
    DK_CLOSED = 0            # the application's Disconnect / Abort, or a reason unknown here
    DK_PEER_CLOSED = 1
    DK_RESET = 2
    DK_TIMEOUT = 3
    DK_LIMIT = 4
    DK_PROTOCOL = 5
    DK_HOOK_ERROR = 6
    DK_ERROR = 7
    DK_SHUTDOWN = 8
    DK_CONNECT_FAILED = 9
    N_DISCONNECT_KINDS = 10

_DISCONNECT_KINDS = ("closed", "peer_closed", "reset", "timeout", "limit", "protocol",
                    "hook_error", "error", "shutdown", "connect_failed")

# The core's own reasons, by prefix (a layer adding a reason adds its prefix here).
_DISCONNECT_PREFIXES = (
    ("peer closed the connection", DK_PEER_CLOSED),
    ("idle timeout", DK_TIMEOUT),
    ("send timeout", DK_TIMEOUT),
    ("send stalled", DK_TIMEOUT),             # send_timeout (stall.pxi)
    ("send queue limit exceeded", DK_LIMIT),
    ("receive buffer full", DK_LIMIT),
    ("rate limit", DK_LIMIT),
    ("bad packet", DK_PROTOCOL),
    ("unknown packet id", DK_PROTOCOL),
    ("exception in ", DK_HOOK_ERROR),
    ("cannot ", DK_ERROR),
    ("out of memory", DK_ERROR),
    ("flush watch failed", DK_ERROR),
    ("connect failed", DK_CONNECT_FAILED),
    ("TLS handshake failed: not completed within", DK_TIMEOUT),
    ("TLS handshake failed", DK_PROTOCOL),
    ("TLS error", DK_PROTOCOL),
    ("server shutdown", DK_SHUTDOWN),
    ("client shutdown", DK_SHUTDOWN),
    ("WebSocket closed by the peer", DK_PEER_CLOSED),
    ("WebSocket closed", DK_CLOSED),
    ("WebSocket handshake timed out", DK_TIMEOUT),
    ("WebSocket keepalive", DK_TIMEOUT),
    ("WebSocket error 1009", DK_LIMIT),          # message too big: max_message_size
    ("WebSocket error", DK_PROTOCOL),
    ("WebSocket handshake", DK_PROTOCOL),        # failed / refused
    ("WebSocket upgrade refused", DK_PROTOCOL),
)
# Checked first, anywhere in the reason: a deadline that cut a graceful close.
_DISCONNECT_TIMEOUTS = ("(its queued data was not flushed in time)",
                        "the peer did not answer within")


# The port's error texts (a session closed by a socket error has one as reason) and
# their buckets, found by the text's hash in a C table, then compared.  Not a dict: on
# free-threaded Python a dict read on another thread than the one that made its keys
# takes the dict's lock whenever the probe meets a key (the lock-free read must take a
# reference to it, and a key only its maker holds refuses one), so every session end
# whose reason's hash probed such a slot (PYTHONHASHSEED decides) queued both workers
# on that lock: 10-17 us a lookup instead of 0.3, 41 sched_yield each, and under a CPU
# hog sessions that took seconds to end (test_200_concurrent_clients hung on 3.13t).
# Reading a tuple item and a C array takes no lock.
cdef int _n_port_errors = 0
cdef Py_hash_t _port_error_hash[64]
cdef int _port_error_kind[64]
cdef tuple _PORT_ERROR_TEXTS


cdef tuple _port_error_kinds():
    global _n_port_errors
    cdef int code, i
    texts = []
    for code in range(-1, -64, -1):
        name = port_errname(code).decode("ascii")
        text = port_strerror(code).decode("ascii")
        if text in texts:               # a text several codes share ("unknown error")
            i = texts.index(text)
        else:
            i = len(texts)
            texts.append(text)
            _port_error_hash[i] = hash(text)
            _port_error_kind[i] = DK_ERROR
        if name in ("ECONNRESET", "EPIPE", "ECONNABORTED"):
            _port_error_kind[i] = DK_RESET
        elif name == "ETIMEDOUT":
            _port_error_kind[i] = DK_TIMEOUT
    _n_port_errors = len(texts)
    return tuple(texts)

_PORT_ERROR_TEXTS = _port_error_kinds()


cdef int _port_error_kind_of(object reason) except -2:
    """The bucket of a port error text, or -1 (no lock taken: see above).  Any str:
    typed `str`, a subclass (a __str__ may hand Disconnect one) was a TypeError, and
    its session counted "closed" whatever its text said."""
    cdef Py_hash_t h = hash(reason)           # cached in the str
    cdef int i
    for i in range(_n_port_errors):
        if _port_error_hash[i] == h and reason == _PORT_ERROR_TEXTS[i]:
            return _port_error_kind[i]
    return -1


cdef int _disconnect_kind(object reason, bint was_connected, str shutdown_reason):
    if not was_connected:
        return DK_CONNECT_FAILED
    if not isinstance(reason, str):
        return DK_CLOSED
    for part in _DISCONNECT_TIMEOUTS:
        if part in reason:
            return DK_TIMEOUT
    if reason == shutdown_reason:
        return DK_SHUTDOWN
    k = _port_error_kind_of(reason)
    if k >= 0:
        return k
    for prefix, kind in _DISCONNECT_PREFIXES:
        if reason.startswith(prefix):
            return kind
    return DK_CLOSED


def _disconnect_bucket(reason, was_connected=True, shutdown_reason="server shutdown"):
    """The stats() bucket a disconnect reason counts in (for tests and tools)."""
    return _DISCONNECT_KINDS[_disconnect_kind(reason, was_connected, shutdown_reason)]


# ---------------------------------------------------------------------------------------
# The service's figures

@cython.final
cdef class _ServiceStats:
    # Under the service's _lock: what ended sessions did, refusals, disconnects.
    cdef int64_t bytes_in
    cdef int64_t msgs_in
    cdef int64_t bytes_out
    cdef int64_t msgs_out
    cdef uint64_t refused[N_REFUSED]
    cdef uint64_t disconnects[N_DISCONNECT_KINDS]
    # Atomics (any worker): hook time, measure_hooks classes only.
    cdef int64_t hook_count[N_HOOKS]
    cdef int64_t hook_ns[N_HOOKS]
    cdef int64_t hook_max[N_HOOKS]
    cdef list metrics_servers         # under the service's _lock


cdef int _session_disconnect_kind(Service svc, Session s) noexcept:
    """The bucket `s`'s end counts in.  Service._session_done asks before it takes the
    service's _lock (and the lookup itself takes none: see _port_error_kind_of): under
    load, 3.13t, a worker that waited for a lock here while holding the service's lock
    held every other ending session behind it (one batch of session ends took 4-9 s)."""
    try:
        return _disconnect_kind(s._get_reason(), s._was_connected, svc._shutdown_reason)
    except BaseException:
        return DK_CLOSED


cdef void _stats_session_done(Service svc, Session s, int kind) noexcept:
    """Service._session_done, under the service's _lock, as `s` leaves the live set."""
    cdef _ServiceStats st = svc._st
    st.bytes_in += _cnt_load(&s._cnt.bytes_in)
    st.msgs_in += _cnt_load(&s._cnt.msgs_in)
    st.bytes_out += _cnt_load(&s._cnt.bytes_out)
    st.msgs_out += _cnt_load(&s._cnt.msgs_out)
    st.disconnects[kind] += 1
    if s._addr_key is not None:
        _address_released(svc, s)


cdef dict _service_stats(Service svc):
    cdef _ServiceStats st = svc._st
    cdef Session s
    cdef int64_t b_in, m_in, b_out, m_out
    cdef Py_ssize_t q, q_sum = 0, q_max = 0
    cdef int i
    cdef _BatchStats *bt = &svc.core._batches
    with svc._lock:
        b_in, m_in, b_out, m_out = st.bytes_in, st.msgs_in, st.bytes_out, st.msgs_out
        for s in svc._sessions:
            b_in += _cnt_load(&s._cnt.bytes_in)
            m_in += _cnt_load(&s._cnt.msgs_in)
            b_out += _cnt_load(&s._cnt.bytes_out)
            m_out += _cnt_load(&s._cnt.msgs_out)
            port_spin_lock(&s._lock)
            q = s._sq_bytes
            port_spin_unlock(&s._lock)
            q_sum += q
            if q > q_max:
                q_max = q
        live = len(svc._sessions)
        total = svc.total_sessions
        refused = {_REFUSED_NAMES[i]: st.refused[i] for i in range(1, N_REFUSED)}
        disconnects = {_DISCONNECT_KINDS[i]: st.disconnects[i]
                       for i in range(N_DISCONNECT_KINDS)}
        table = {"live": len(svc._lim.live), "recent": len(svc._lim.recent),
                 "evictions": svc._lim.evictions}
    hooks = {}
    for i in range(N_HOOKS):
        n = _cnt_load(&st.hook_count[i])
        if n:
            hooks[_HOOK_NAMES[i]] = {
                "count": n,
                "seconds": _cnt_load(&st.hook_ns[i]) / 1e9,
                "seconds_max": _cnt_load(&st.hook_max[i]) / 1e9,
            }
    sizes = {}
    for i in range(BATCH_BUCKETS):
        sizes[(2 << i) - 1 if i < BATCH_BUCKETS - 1 else BATCH] = \
            _cnt_load(&bt.sizes[i])
    listener = svc.listener
    out = {
        "backend": svc.core.backend,
        "sessions": {"live": live, "total": total},
        "accepts": listener.accepted if isinstance(listener, Listener) else 0,
        "accept_errors": listener.accept_errors if isinstance(listener, Listener) else 0,
        "factory_failures": svc.factory_failures,
        "idle_disconnects": svc.idle_disconnects,
        "send_timeouts": svc.send_timeouts,
        "refused": refused,
        "disconnects": disconnects,
        "bytes_in": b_in,
        "bytes_out": b_out,
        "messages_in": m_in,
        "messages_out": m_out,
        "send_queue_bytes": q_sum,
        "send_queue_bytes_max": q_max,
        "hooks": hooks,
        "dispatch": {
            "batches": _cnt_load(&bt.batches),
            "completions": _cnt_load(&bt.completions),
            "batch_max": _cnt_load(&bt.size_max),
            "batch_sizes": sizes,
            "seconds": _cnt_load(&bt.ns) / 1e9,
            "seconds_max": _cnt_load(&bt.ns_max) / 1e9,
        },
        "address_table": table,
    }
    if isinstance(svc, ClientService):
        out["connect_failures"] = (<ClientService>svc).connect_failures
    return out


cdef object _serve_metrics(Service svc, int port, str host, object name, dict options):
    try:
        from iocpnet.metrics import MetricsServer
    except ImportError as e:
        raise ImportError(f"ServeMetrics needs prometheus_client: pip install "
                          f"'iocpnet[metrics]' ({e})") from e
    if svc._stopping:
        raise RuntimeError("the service is stopped: Stop() closes its metrics servers, "
                           "so it serves none any more")
    server = MetricsServer(svc, port, host, name=name, **options)
    with svc._lock:
        stopping = svc._stopping        # a Stop() that ran meanwhile missed this one
        if not stopping:
            if svc._st.metrics_servers is None:
                svc._st.metrics_servers = []
            svc._st.metrics_servers.append(server)
    if stopping:
        server.Close()
        raise RuntimeError("the service is stopped: Stop() closes its metrics servers, "
                           "so it serves none any more")
    return server


cdef void _stats_stopping(Service svc) noexcept:
    """Stop(): the metrics servers close."""
    with svc._lock:
        servers = svc._st.metrics_servers or []
        svc._st.metrics_servers = None
    for server in servers:
        try:
            server.Close()
        except BaseException:
            logger.exception("closing the metrics server failed")
