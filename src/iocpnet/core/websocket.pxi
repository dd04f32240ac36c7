# core/websocket.pxi: WebSocket (RFC 6455) over a Session: frames, messages, control
# frames, the close handshake and keepalive pings; the HTTP/1.1 upgrade that comes first
# (server and client) is websocket_http.pxi's.
# Included by _core.pyx (one extension module, one file per concern).
#
# What it owns.  A session speaks WebSocket when it has a _WebSocket (Session._ws): a
# WebSocketSession always does; a PacketSession or a plain Session does when it was
# accepted on a Listener(..., websocket=True) or connected by a ClientService given a
# ws:// URL.  The layer sits between the port and the hooks: the bytes received go to
# the C frame parser (port/ws_frame.h) instead of OnRecv, and what the session sends goes
# out inside frames.  Over WebSocket:
#
#   - a WebSocketSession sees OnMessage(data, binary) and sends with SendMessage (text
#     for str, binary for bytes-like) or Send (binary);
#   - a PacketSession's packets travel in binary messages (each message holds whole
#     packets); OnRecvPacket, SendPacket and Service.Broadcast are unchanged, so native
#     TCP clients and browsers share the same rooms;
#   - a plain Session's OnRecv gets each binary message whole (it must consume it all).
#
# The handshake comes first: OnConnected runs only once the upgrade has succeeded (a
# session whose upgrade fails gets OnDisconnected only; a client also gets
# OnConnectFailed).  On a server the upgrade request goes through the OnUpgrade hook
# (path, Origin, subprotocol), which may also answer a plain HTTP request (the chat
# example serves its web page that way).
#
# Threads and locks.  The parser, the message being assembled and the handshake state
# are touched only by the session's receive path, which runs on its strand (one
# completion at a time): no lock.  Frames are sent from any thread through the session's
# send queue (its own lock).  `phase` (handshake, open, closing) is an atomic, read
# anywhere; it moves from OPEN to CLOSING, and every frame after the handshake (data,
# ping, pong, close) is queued, under `send_gate`, a lock of the WebSocket's own: the
# check "still open?" and the queueing of the frame are one step, so no frame follows
# the close frame (RFC 6455 5.5.1: a Send racing Close() on another thread could pass
# the check, then queue behind the close frame), and exactly one close frame goes out
# whoever sends it (the peer's close answered, Close(), Disconnect, an error).  The
# gate is taken without the GIL when it must wait (the TLS filter under it releases
# the GIL); lock order: send_gate, then the TLS mutex, then the session's _lock.  A
# frame is built before the gate is taken, and a phase already past OPEN returns at
# once without it (OnDisconnected, which may run inside a failed send, may Send).
# The keepalive and handshake timers run on any worker and only read atomics, send a
# ping, or close.
#
# Not offered: permessage-deflate (RFC 7692) and other extensions; a client asking for
# them is answered without them, as the RFC allows.

import base64 as _base64

cdef extern from "port/ws_frame.h" nogil:
    ctypedef enum ws_event_type:
        WS_EV_MORE
        WS_EV_DATA
        WS_EV_PING
        WS_EV_PONG
        WS_EV_CLOSE
        WS_EV_ERROR
    ctypedef struct ws_event:
        ws_event_type type
        const unsigned char *data
        size_t len
        int first
        int last
        int text
        int frame_fin
        uint64_t frame_left
        unsigned code
        const char *reason
        uint64_t detail
    ctypedef struct ws_parser:
        pass
    ctypedef struct ws_utf8:
        pass
    void ws_parser_init(ws_parser *p, uint64_t max_message, int expect_mask)
    size_t ws_parse(ws_parser *p, unsigned char *buf, size_t n, ws_event *ev)
    size_t ws_frame_header(unsigned char *out, unsigned opcode, int fin, uint64_t length,
                           const unsigned char *mask)
    unsigned ws_mask(unsigned char *dst, const unsigned char *src, size_t n,
                     const unsigned char *mask, unsigned pos)
    int ws_close_code_valid(unsigned code)
    void ws_utf8_init(ws_utf8 *u)
    int ws_utf8_feed(ws_utf8 *u, const unsigned char *s, size_t n)
    int ws_utf8_complete(const ws_utf8 *u)
    enum:
        WS_OP_CONT
        WS_OP_TEXT
        WS_OP_BINARY
        WS_OP_CLOSE
        WS_OP_PING
        WS_OP_PONG

cdef extern from "Python.h":
    object PyUnicode_DecodeUTF8(const char *s, Py_ssize_t size, const char *errors)

cdef extern from *:
    """
    #include "port/port_sync.h"
    static int64_t iocpnet_ws_xchg64(volatile int64_t *p, int64_t v) {
    #if defined(_MSC_VER)
        return InterlockedExchange64((volatile LONG64 *)p, v);
    #else
        return __atomic_exchange_n(p, v, __ATOMIC_ACQ_REL);
    #endif
    }
    """
    int64_t _ws_xchg64 "iocpnet_ws_xchg64"(volatile int64_t *p, int64_t v) nogil

cdef enum:
    WS_HANDSHAKE = 0      # waiting for the upgrade request (server) or response (client)
    WS_OPEN = 1
    WS_CLOSING = 2        # a close frame was sent or received: no more messages
    WS_MODE_MESSAGES = 0  # WebSocketSession: OnMessage
    WS_MODE_PACKETS = 1   # PacketSession: packets in binary messages
    WS_MODE_RECV = 2      # Session with OnRecv: each binary message whole

DEFAULT_MAX_MESSAGE_SIZE = 1024 * 1024

# Masking keys for our client's frames: splitmix64 over a counter seeded from the OS's
# random source (one atomic add per frame, no system call).
cdef volatile int64_t _ws_mask_counter = <int64_t>int.from_bytes(os.urandom(8), "little",
                                                                 signed=True)

cdef inline uint64_t _ws_mask_key() noexcept nogil:
    cdef uint64_t z = <uint64_t>port_atomic_add64(&_ws_mask_counter,
                                                  <int64_t>0x9E3779B97F4A7C15)
    z = (z ^ (z >> 30)) * <uint64_t>0xBF58476D1CE4E5B9
    z = (z ^ (z >> 27)) * <uint64_t>0x94D049BB133111EB
    return z ^ (z >> 31)


cdef bytes _ws_frame(unsigned opcode, const unsigned char *data, Py_ssize_t n, bint client):
    """One whole frame as bytes (a server's unmasked, a client's masked)."""
    cdef unsigned char hdr[14]
    cdef uint64_t key
    cdef size_t h
    cdef bytes out
    cdef unsigned char *p
    if client:
        key = _ws_mask_key()
        h = ws_frame_header(hdr, opcode, 1, <uint64_t>n, <unsigned char *>&key)
    else:
        h = ws_frame_header(hdr, opcode, 1, <uint64_t>n, NULL)
    out = PyBytes_FromStringAndSize(NULL, <Py_ssize_t>h + n)
    p = <unsigned char *>PyBytes_AS_STRING(out)
    memcpy(p, hdr, h)
    if n > 0:
        if client:
            ws_mask(p + h, data, <size_t>n, <unsigned char *>&key, 0)
        else:
            memcpy(p + h, data, <size_t>n)
    return out


cdef bytes _ws_close_payload(unsigned code, str reason):
    """A close frame's payload: the code, then the reason cut to fit 125 bytes (on a
    character boundary)."""
    if code == 1005:
        return b""
    r = reason.encode("utf-8")
    if len(r) > 123:
        r = r[:123].decode("utf-8", "ignore").encode("utf-8")
    return bytes(((code >> 8) & 0xFF, code & 0xFF)) + r


# ---------------------------------------------------------------------------------------
# Per-class settings and hooks

@cython.final
cdef class _WsHooks:
    cdef int mode
    cdef object on_message
    cdef object on_upgrade
    cdef object on_recv
    cdef uint64_t max_message_size
    cdef double ping_interval
    cdef double ping_timeout
    cdef double close_timeout
    cdef double handshake_timeout
    cdef int max_header_size
    cdef int max_headers
    cdef tuple subprotocols
    cdef object origins
    cdef object origin
    cdef Py_ssize_t owner        # id() of the class they were resolved for


# On the class (_iocpnet_ws_hooks), as Session's _Hooks (session.pxi): freed with it.
cdef dict _ws_hooks_static = {}


cdef _WsHooks _ws_hooks_for(type cls):
    cdef _WsHooks h
    o = getattr(cls, "_iocpnet_ws_hooks", None)
    if type(o) is _WsHooks and (<_WsHooks>o).owner == <Py_ssize_t><PyObject *>cls:
        return <_WsHooks>o
    o = _ws_hooks_static.get(cls)
    if o is not None:
        return <_WsHooks>o
    h = _WsHooks.__new__(_WsHooks)
    h.owner = <Py_ssize_t><PyObject *>cls
    if issubclass(cls, WebSocketSession):
        h.mode = WS_MODE_MESSAGES
        h.on_message = getattr(cls, "OnMessage")
    elif issubclass(cls, PacketSession) and _overridden(cls, "OnRecv", Session) is None:
        h.mode = WS_MODE_PACKETS
    else:
        h.mode = WS_MODE_RECV
        h.on_recv = _overridden(cls, "OnRecv", Session)
        if h.on_recv is None and getattr(cls, "OnMessage", None) is not None:
            # Once per class (the hooks are kept on it): its messages were dropped in
            # silence, the OnMessage written for them never called.
            logger.warning("%s defines OnMessage but is not a WebSocketSession: over "
                           "WebSocket its messages go to OnRecv, which it does not "
                           "define, and are dropped (derive from WebSocketSession)",
                           cls.__name__)
    h.on_upgrade = getattr(cls, "OnUpgrade", None) or _default_on_upgrade
    size = _class_count(cls, "max_message_size", DEFAULT_MAX_MESSAGE_SIZE)
    if size <= 0:
        raise ValueError(f"{cls.__name__}: max_message_size must be positive")
    h.max_message_size = size
    h.ping_interval = _class_int(cls, "ping_interval", 20.0, True)
    h.ping_timeout = _class_int(cls, "ping_timeout", 20.0, True)
    h.close_timeout = _class_int(cls, "close_timeout", 5.0)
    h.handshake_timeout = _class_int(cls, "handshake_timeout", 10.0)
    h.max_header_size = _class_count(cls, "max_header_size", 8192)
    h.max_headers = _class_count(cls, "max_headers", 64)
    if h.ping_interval < 0 or h.ping_timeout < 0 or h.close_timeout <= 0 or \
            h.handshake_timeout <= 0 or h.max_header_size < 64 or h.max_headers < 1:
        raise ValueError(f"{cls.__name__}: bad WebSocket settings (ping_interval and "
                         f"ping_timeout >= 0, close_timeout and handshake_timeout > 0, "
                         f"max_header_size >= 64, max_headers >= 1)")
    subs = getattr(cls, "subprotocols", ())
    if isinstance(subs, str):
        subs = (subs,)
    h.subprotocols = tuple(str(s) for s in subs or ())
    for sub in h.subprotocols:
        # RFC 6455 4.1: each is a token; a client writes them into its request, so a
        # CR LF here would add headers of its own
        if not sub or not _TOKEN_CHARS.issuperset(sub):
            raise ValueError(f"{cls.__name__}: subprotocol {sub!r} is not an HTTP token")
    origins = getattr(cls, "origins", None)
    if isinstance(origins, str):
        origins = (origins,)
    h.origins = None if origins is None else frozenset(str(o) for o in origins)
    origin = getattr(cls, "origin", None)
    h.origin = origin if isinstance(origin, str) else None
    if h.origin is not None and any(c < " " or c >= "\x7f" for c in h.origin):
        # A control character would end the header line; past ASCII the request could
        # not be encoded (an origin names its host in its ASCII, IDNA, form).
        raise ValueError(f"{cls.__name__}: origin {h.origin!r} is not printable ASCII "
                         f"(a control character, or a host name not in its IDNA form)")
    _keep_on_class(cls, "_iocpnet_ws_hooks", h, _ws_hooks_static)
    return h


# ---------------------------------------------------------------------------------------
# The per-session state

# RFC 7230 3.2.6 tchar
_TOKEN_CHARS = frozenset("!#$%&'*+-.^_`|~0123456789"
                         "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")


@cython.final
cdef class _WebSocket:
    cdef _WsHooks hooks
    cdef ws_parser parser
    cdef bint client
    cdef volatile int32_t phase          # WS_HANDSHAKE, WS_OPEN, WS_CLOSING
    cdef PyThread_type_lock send_gate    # leaving WS_OPEN, and every frame sent then
    cdef volatile int64_t ping_sent_ms   # 0: no ping outstanding
    # The message being assembled from several chunks (freed once delivered): straight
    # into its bytes object when its size is known (one frame) and mostly here already,
    # else in a growing buffer.
    cdef bytes mobj
    cdef unsigned char *mbuf
    cdef size_t mlen
    cdef size_t mcap
    # Client: where to connect and what we asked.
    cdef str host_header
    cdef str path
    cdef str key
    cdef Py_ssize_t hs_scanned           # head bytes already searched for its end
    # The result of the handshake, and of the close handshake.
    cdef readonly object request
    cdef readonly str subprotocol
    cdef int close_code                   # the peer's close frame (1006: none came)
    cdef str close_reason
    cdef int sent_code                    # ours
    cdef str sent_reason
    # The timers: set and cleared under a critical section on this object (Close() runs
    # on any thread; without the GIL two threads must not swap the same reference).
    cdef object hs_timer
    cdef object ka_timer
    cdef object close_timer
    cdef bint finished

    def __dealloc__(self):
        if self.mbuf != NULL:
            free(self.mbuf)
            self.mbuf = NULL
        if self.send_gate != NULL:
            PyThread_free_lock(self.send_gate)

    cdef int append(self, const unsigned char *d, size_t n) noexcept:
        cdef size_t cap
        cdef unsigned char *nb
        if self.mlen + n > self.mcap:
            cap = self.mcap if self.mcap else 4096
            while cap < self.mlen + n:
                cap *= 2
            nb = <unsigned char *>realloc(self.mbuf, cap)
            if nb == NULL:
                return -1
            self.mbuf = nb
            self.mcap = cap
        memcpy(self.mbuf + self.mlen, d, n)
        self.mlen += n
        return 0

    cdef void drop_message(self) noexcept:
        if self.mbuf != NULL:
            free(self.mbuf)
        self.mbuf = NULL
        self.mlen = self.mcap = 0
        self.mobj = None


cdef _WebSocket _ws_new(Session s, bint client):
    cdef _WebSocket ws = _WebSocket.__new__(_WebSocket)
    ws.hooks = _ws_hooks_for(type(s))
    ws.send_gate = PyThread_allocate_lock()
    if ws.send_gate == NULL:
        raise MemoryError("allocating a WebSocket's send lock")
    ws.client = client
    ws.close_code = 1006
    ws_parser_init(&ws.parser, ws.hooks.max_message_size, 0 if client else 1)
    return ws


cdef int _ws_enable(Session s, bint client, str host_header=None, str path=None) except -1:
    """Make s speak WebSocket (before it connects): a server waits for the upgrade
    request; a client sends one for `path` with Host: `host_header`."""
    cdef _WebSocket ws
    if s._ws is None:
        s._ws = _ws_new(s, client)
    ws = <_WebSocket>s._ws
    if ws.client != client:
        ws.client = client
        ws_parser_init(&ws.parser, ws.hooks.max_message_size, 0 if client else 1)
    if client:
        ws.host_header = host_header
        ws.path = path or "/"
    return 0


# ---------------------------------------------------------------------------------------
# Called by the Session (core/session.pxi) where a WebSocket session differs

cdef void _ws_connected(Session s) noexcept:
    """The TCP connection is up: a client sends its upgrade request; both start the
    handshake deadline.  OnConnected waits for the handshake to succeed."""
    cdef _WebSocket ws = <_WebSocket>s._ws
    try:
        t = s.core.CallLater(ws.hooks.handshake_timeout, _ws_handshake_deadline, s)
        with cython.critical_section(ws):
            ws.hs_timer = t
        if ws.client:
            ws.key = _base64.b64encode(os.urandom(16)).decode("ascii")
            lines = [f"GET {ws.path} HTTP/1.1", f"Host: {ws.host_header}",
                     "Upgrade: websocket", "Connection: Upgrade",
                     f"Sec-WebSocket-Key: {ws.key}", "Sec-WebSocket-Version: 13"]
            if ws.hooks.origin is not None:
                lines.append(f"Origin: {ws.hooks.origin}")
            if ws.hooks.subprotocols:
                lines.append("Sec-WebSocket-Protocol: " + ", ".join(ws.hooks.subprotocols))
            _send_bytes(s, ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
    except BaseException as e:
        _hook_failed(s, "the WebSocket handshake", e)


cdef void _ws_connect_failed(Session s, str reason) noexcept:
    if s._hooks.on_connect_failed is not None:
        try:
            s._hooks.on_connect_failed(s, reason)
        except BaseException:
            logger.exception("OnConnectFailed of %s raised", repr(s))


cdef void _ws_finish(Session s) noexcept:
    """The session has ended: stop the timers, free the message being assembled."""
    cdef _WebSocket ws = <_WebSocket>s._ws
    port_atomic_xchg32(&ws.phase, WS_CLOSING)
    with cython.critical_section(ws):
        timers = (ws.hs_timer, ws.ka_timer, ws.close_timer)
        ws.hs_timer = ws.ka_timer = ws.close_timer = None
        ws.finished = True
    for t in timers:
        if t is not None:
            (<Timer>t).Cancel()
    ws.drop_message()


cdef bint _ws_upgraded(Session s) noexcept:
    """Session.connected: not before the upgrade (OnConnected has not run yet)."""
    return port_atomic_load32(&(<_WebSocket>s._ws).phase) != WS_HANDSHAKE


cdef inline void _ws_gate_enter(_WebSocket ws) noexcept:
    if not PyThread_acquire_lock(ws.send_gate, NOWAIT_LOCK):
        with nogil:
            PyThread_acquire_lock(ws.send_gate, WAIT_LOCK)


cdef object _ws_send_frame(Session s, unsigned opcode, const unsigned char *data,
                           Py_ssize_t n):
    """Send one data, ping or pong frame (any thread) while the WebSocket is open, as
    _send_bytes answers; False once the close has begun (or before the handshake).
    The check and the queueing are one step under send_gate (see the essay)."""
    cdef _WebSocket ws = <_WebSocket>s._ws
    if port_atomic_load32(&ws.phase) != WS_OPEN:
        return False
    frame = _ws_frame(opcode, data, n, ws.client)
    _ws_gate_enter(ws)
    try:
        if port_atomic_load32(&ws.phase) != WS_OPEN:
            return False
        return _send_bytes(s, frame)
    finally:
        PyThread_release_lock(ws.send_gate)


cdef object _ws_send_binary(Session s, bytes b):
    """Session.Send over WebSocket: the bytes as one binary message."""
    return _ws_send_frame(s, WS_OP_BINARY, <const unsigned char *>PyBytes_AS_STRING(b),
                          PyBytes_GET_SIZE(b))


cdef bint _ws_send_close(Session s, unsigned code, str reason) noexcept:
    """Send our one close frame (from any thread); False if the close had already
    begun or the handshake never completed."""
    cdef _WebSocket ws = <_WebSocket>s._ws
    cdef bytes payload, frame
    if port_atomic_load32(&ws.phase) != WS_OPEN:
        return False
    try:
        payload = _ws_close_payload(code, reason)
        frame = _ws_frame(WS_OP_CLOSE, <const unsigned char *>PyBytes_AS_STRING(payload),
                          PyBytes_GET_SIZE(payload), ws.client)
    except BaseException:
        logger.exception("making a WebSocket close frame for %s failed", repr(s))
        frame = None
    _ws_gate_enter(ws)
    if port_atomic_load32(&ws.phase) != WS_OPEN:
        PyThread_release_lock(ws.send_gate)
        return False
    ws.sent_code = code
    ws.sent_reason = reason
    port_atomic_xchg32(&ws.phase, WS_CLOSING)
    err = None
    try:
        if frame is not None:
            _send_bytes(s, frame)
    except BaseException as e:
        err = e
    PyThread_release_lock(ws.send_gate)
    if err is not None:           # logged outside the gate (handlers are user code)
        logger.error("sending a WebSocket close frame to %s failed", repr(s),
                     exc_info=(type(err), err, err.__traceback__))
    return True


cdef void _ws_goodbye(Session s, str reason) noexcept:
    """Disconnect on an open WebSocket: say goodbye with a close frame first (1001
    when the service shuts down, else 1000 with the reason)."""
    cdef unsigned code = 1000
    if reason == "server shutdown" or reason == "client shutdown":
        code = 1001
    _ws_send_close(s, code, reason)


cdef Py_ssize_t _ws_recv(Session s, unsigned char *ptr, Py_ssize_t n) noexcept:
    """Received bytes on a WebSocket session: the handshake, then frames.  Returns the
    bytes consumed (the handshake leaves an unfinished head in the receive buffer), or
    -1 when the session is closing."""
    cdef _WebSocket ws = <_WebSocket>s._ws
    cdef Py_ssize_t used = 0, pos = 0
    cdef size_t k
    cdef ws_event ev
    if port_atomic_load32(&ws.phase) == WS_HANDSHAKE:
        used = _ws_handshake(s, ws, ptr, n)
        if used <= 0 or s._state != S_CONNECTED:
            return used
        pos = used
    while pos < n:
        k = ws_parse(&ws.parser, ptr + pos, <size_t>(n - pos), &ev)
        pos += <Py_ssize_t>k
        if ev.type == WS_EV_MORE:
            break
        if _ws_event(s, ws, &ev) < 0 or s._state != S_CONNECTED:
            return -1
    return n


cdef int _ws_event(Session s, _WebSocket ws, ws_event *ev) noexcept:
    """One event of the parser; -1 when the session is closing."""
    cdef str why
    if ev.type == WS_EV_DATA:
        if port_atomic_load32(&ws.phase) != WS_OPEN:
            return 0                # after a close frame: data is discarded (RFC 7.1.3)
        if ev.first and ev.last:
            return _ws_deliver(s, ws, ev.data, <Py_ssize_t>ev.len, ev.text)
        if ev.first and ev.frame_fin and ev.len * 2 >= ev.len + ev.frame_left:
            # One frame, more than half of it here: its final bytes object now (memory
            # at most twice what arrived), filled as the rest comes, handed over whole.
            try:
                ws.mobj = PyBytes_FromStringAndSize(NULL,
                                                    <Py_ssize_t>(ev.len + ev.frame_left))
            except MemoryError:
                _close_now(s, "out of memory for a WebSocket message", True)
                return -1
            memcpy(PyBytes_AS_STRING(ws.mobj), ev.data, ev.len)
            ws.mlen = ev.len
            return 0
        if ws.mobj is not None:
            memcpy(PyBytes_AS_STRING(ws.mobj) + ws.mlen, ev.data, ev.len)
            ws.mlen += ev.len
            if ev.last:
                data = ws.mobj
                ws.mobj = None
                ws.mlen = 0
                return _ws_deliver_bytes(s, ws, data, ev.text)
            return 0
        if ws.append(ev.data, ev.len) < 0:
            _close_now(s, "out of memory for a WebSocket message", True)
            return -1
        if ev.last:
            r = _ws_deliver(s, ws, ws.mbuf, <Py_ssize_t>ws.mlen, ev.text)
            ws.drop_message()
            return r
        return 0
    if ev.type == WS_EV_PING:
        # A ping makes us send: it counts as a message against the flood limits.
        if ws.hooks.mode != WS_MODE_RECV and not _message_counted(s, <Py_ssize_t>ev.len):
            return -1
        try:
            _ws_send_frame(s, WS_OP_PONG, ev.data, <Py_ssize_t>ev.len)
        except BaseException as e:
            _hook_failed(s, "the WebSocket pong", e)
            return -1
        return 0
    if ev.type == WS_EV_PONG:
        _ws_xchg64(&ws.ping_sent_ms, 0)
        return 0
    if ev.type == WS_EV_CLOSE:
        ws.close_code = ev.code
        ws.close_reason = PyUnicode_DecodeUTF8(<const char *>ev.data, <Py_ssize_t>ev.len,
                                               "replace")
        if _ws_send_close(s, ev.code, ""):
            why = f"WebSocket closed by the peer ({ev.code}" + \
                (f" {ws.close_reason})" if ws.close_reason else ")")
        else:
            why = f"WebSocket closed ({ws.sent_code}" + \
                (f" {ws.sent_reason})" if ws.sent_reason else ")")
        _begin_disconnect(s, why, True)
        return -1
    # WS_EV_ERROR
    why = _ws_error_reason(ws, ev)
    _log_ws_error(s, why)
    _ws_send_close(s, ev.code, why.split(": ", 1)[1])
    _begin_disconnect(s, why, True)
    return -1


cdef void _log_ws_error(Session s, str why) noexcept:
    """A peer broke the protocol after the upgrade: it can do so on connection after
    connection, so the line is bounded per burst (limits.pxi)."""
    _log_in_burst(s, LOG_WS_FRAMES, _logging_WARNING, f"disconnecting {repr(s)}: {why}")


cdef str _ws_error_reason(_WebSocket ws, ws_event *ev):
    what = ev.reason.decode("ascii")
    if ev.code == 1009:
        return (f"WebSocket error {ev.code}: message too big: {ev.detail} bytes, "
                f"max_message_size is {ws.hooks.max_message_size}")
    if what == "reserved opcode":
        return f"WebSocket error {ev.code}: reserved opcode {ev.detail:#x}"
    if what == "invalid close code":
        return f"WebSocket error {ev.code}: invalid close code {ev.detail}"
    return f"WebSocket error {ev.code}: {what}"


cdef int _ws_deliver_bytes(Session s, _WebSocket ws, bytes b, bint text) noexcept:
    """A whole message already in a bytes object (no copy for OnMessage's binary)."""
    if ws.hooks.mode == WS_MODE_MESSAGES and not text:
        if not _message_counted(s, PyBytes_GET_SIZE(b)):
            return -1
        try:
            ws.hooks.on_message(s, b, True)
        except BaseException as e:
            _hook_failed(s, "OnMessage", e)
            return -1
        return 0
    return _ws_deliver(s, ws, <const unsigned char *>PyBytes_AS_STRING(b),
                       PyBytes_GET_SIZE(b), text)


cdef int _ws_deliver(Session s, _WebSocket ws, const unsigned char *d, Py_ssize_t n,
                     bint text) noexcept:
    """A whole message: to OnMessage, or as packets, or to OnRecv."""
    cdef int mode = ws.hooks.mode
    cdef Py_ssize_t used
    if mode == WS_MODE_MESSAGES:
        # One message for the figures and recv_messages_per_second (limits.pxi); a
        # PacketSession counts its packets instead, a plain Session its receives.
        if not _message_counted(s, n):
            return -1
        try:
            if text:
                data = PyUnicode_DecodeUTF8(<const char *>d, n, NULL)
            else:
                data = PyBytes_FromStringAndSize(<const char *>d, n)
            ws.hooks.on_message(s, data, not text)
        except BaseException as e:
            _hook_failed(s, "OnMessage", e)
            return -1
        return 0
    if text:
        why = ("WebSocket error 1003: text message refused (this endpoint takes binary "
               "messages)")
        _log_ws_error(s, why)
        _ws_send_close(s, 1003, "binary messages only")
        _begin_disconnect(s, why, True)
        return -1
    if mode == WS_MODE_PACKETS:
        used = _parse_packets(s, d, n)
        if used < 0:
            return -1
        if used != n and s._state == S_CONNECTED:
            why = (f"WebSocket error 1008: a binary message must hold whole packets "
                   f"({n - used} bytes of an unfinished packet at its end)")
            _log_ws_error(s, why)
            _ws_send_close(s, 1008, "a message must hold whole packets")
            _begin_disconnect(s, why, True)
            return -1
        return 0
    if ws.hooks.on_recv is None:
        return 0
    try:
        r = ws.hooks.on_recv(s, PyBytes_FromStringAndSize(<const char *>d, n))
        if r is not None and r != n:
            raise ValueError(f"OnRecv returned {r}: over WebSocket each message must be "
                             f"consumed whole ({n} bytes)")
    except BaseException as e:
        _hook_failed(s, "OnRecv", e)
        return -1
    return 0


# ---- keepalive ----

def _ws_keepalive(Session s):
    """Every ping_interval: ping a peer that sent nothing for that long; end one whose
    ping went unanswered (and that sent nothing else) for ping_timeout."""
    cdef _WebSocket ws = <_WebSocket>s._ws
    cdef int64_t now = port_monotonic_ms(), sent
    cdef uint64_t token
    if port_atomic_load32(&ws.phase) != WS_OPEN or s._state != S_CONNECTED:
        return
    sent = port_atomic_load64(&ws.ping_sent_ms)
    if sent != 0:
        if s._last_recv_ms >= sent:
            _ws_xchg64(&ws.ping_sent_ms, 0)     # it said something: alive
        elif ws.hooks.ping_timeout > 0 and now - sent >= <int64_t>(ws.hooks.ping_timeout * 1000):
            why = (f"WebSocket keepalive: no answer to a ping for "
                   f"{ws.hooks.ping_timeout:g} s")
            # Per burst: a peer can hold many connections that go silent at once.
            _log_in_burst(s, LOG_WS_KEEPALIVE, _logging_INFO,
                          f"disconnecting {repr(s)}: {why}")
            _ws_send_close(s, 1011, "keepalive ping timeout")
            _begin_disconnect(s, why, True)
            return
        else:
            return
    if now - s._last_recv_ms >= <int64_t>(ws.hooks.ping_interval * 1000) - 50:
        token = _ws_mask_key()
        _ws_xchg64(&ws.ping_sent_ms, now)
        _ws_send_frame(s, WS_OP_PING, <const unsigned char *>&token, 8)


# ---------------------------------------------------------------------------------------
# The session class

cdef class WebSocketSession(Session):
    """A WebSocket (RFC 6455) endpoint: a server session once its upgrade succeeded, or
    a client session of a ``ClientService`` given a ``ws://`` URL.

    Hooks: ``OnConnected()`` (after the handshake), ``OnMessage(data, binary)`` (``data``
    is ``str`` for a text message, ``bytes`` for a binary one), ``OnDisconnected(reason)``
    and, on a server, ``OnUpgrade(request)`` (see its doc).  ``SendMessage(data)`` sends
    text for a ``str`` and binary for a bytes-like object, from any thread; ``Send`` sends
    binary.  ``Close(code, reason)`` starts the close handshake.

    Settings (class attributes): ``max_message_size`` (bytes, default 1 MiB, checked on
    each frame header before anything is buffered: 1009 beyond it), ``ping_interval`` and
    ``ping_timeout`` (seconds, default 20 and 20; 0 turns the keepalive off),
    ``close_timeout`` (5 s for the peer to answer our close), ``handshake_timeout``
    (10 s), ``max_header_size`` (8192 bytes) and ``max_headers`` (64) for the HTTP head,
    ``subprotocols`` (offered by a client, accepted by the default ``OnUpgrade``),
    ``origins`` (server: the Origin values accepted; None: any) and ``origin`` (client:
    the Origin header sent).  Every Session setting applies too.
    """

    # limits.pxi: this layer counts its own messages (one per WebSocket message).
    _counts_own_messages = True

    def __cinit__(self, *args, **kwargs):
        self._ws = _ws_new(self, False)

    def OnMessage(self, data, binary):
        """Called once per whole message, in order."""

    def OnUpgrade(self, request):
        """Server: decide the upgrade ``request`` (a ``WebSocketRequest``: ``path``,
        ``headers``, ``origin``, ``subprotocols``).  Return None to accept it, a str to
        accept it with that subprotocol (one the client offered), or an ``HttpResponse``
        to answer it instead (403 to refuse, 200 with a page for a plain HTTP GET).  The
        default accepts any path, checks ``origins`` and picks from ``subprotocols``."""
        return _default_on_upgrade(self, request)

    def SendMessage(self, data):
        """Send one message (any thread): text for a ``str``, binary for bytes-like.
        Returns False if the WebSocket is not open (before the handshake, after a close),
        as Send does for a closed session."""
        cdef bytes b
        cdef unsigned op = WS_OP_BINARY
        if isinstance(data, str):
            b = (<str>data).encode("utf-8")
            op = WS_OP_TEXT
        else:
            b = data if type(data) is bytes else _copy_to_bytes(data)
        return _ws_send_frame(self, op, <const unsigned char *>PyBytes_AS_STRING(b),
                              PyBytes_GET_SIZE(b))

    def Close(self, int code=1000, reason=""):
        """Start the close handshake (any thread): send a close frame with ``code`` and
        ``reason`` (at most 123 bytes of UTF-8), deliver no more messages, and end the
        session when the peer answers (or after ``close_timeout``).  Returns False if a
        close was already under way.  Before the handshake it just disconnects."""
        cdef _WebSocket ws = <_WebSocket>self._ws
        reason = str(reason)
        if not ws_close_code_valid(code):
            raise ValueError(f"close code {code} may not be sent (1000-1003, 1007-1014, "
                             f"3000-4999)")
        if len(reason.encode("utf-8")) > 123:
            raise ValueError("a close reason holds at most 123 bytes of UTF-8")
        if port_atomic_load32(&ws.phase) == WS_HANDSHAKE:
            return self.Disconnect(f"closed before the WebSocket handshake ({code})")
        if not _ws_send_close(self, code, reason):
            return False
        try:
            t = self.core.CallLater(ws.hooks.close_timeout, _ws_close_deadline, self)
        except Exception:
            self.Disconnect(f"WebSocket closed ({code})")
            return True
        with cython.critical_section(ws):
            late = ws.finished           # the session ended meanwhile (another thread)
            if not late:
                ws.close_timer = t
        if late:
            t.Cancel()
        return True

    @property
    def subprotocol(self):
        """The subprotocol agreed in the handshake, or None."""
        return (<_WebSocket>self._ws).subprotocol

    @property
    def request(self):
        """Server: the upgrade request (a ``WebSocketRequest``) once it has arrived."""
        return (<_WebSocket>self._ws).request

    @property
    def close_code(self):
        """The code of the close frame received (1005: it had none; 1006: none came)."""
        return (<_WebSocket>self._ws).close_code

    @property
    def close_reason(self):
        """The reason of the close frame received, or None."""
        return (<_WebSocket>self._ws).close_reason

    @property
    def max_message_size(self):
        return (<_WebSocket>self._ws).hooks.max_message_size


def _ws_close_deadline(Session s):
    cdef _WebSocket ws = <_WebSocket>s._ws
    if s._state == S_CONNECTED:
        _begin_disconnect(s, f"WebSocket closed ({ws.sent_code}); the peer did not answer "
                            f"within {ws.hooks.close_timeout:g} s", True)


# ---------------------------------------------------------------------------------------
# The frame parser without a connection (tests and tools)


def parse_websocket_frames(data, bint server=True, max_message_size=DEFAULT_MAX_MESSAGE_SIZE):
    """Run the WebSocket frame parser over ``data`` (bytes-like) without a connection,
    as a server (``server=True``: frames must be masked) or a client would.

    Returns ``(events, error)``: the events in order, each ``("text", str)``,
    ``("binary", bytes)``, ``("ping", bytes)``, ``("pong", bytes)`` or
    ``("close", code, reason)``, and None or ``(close_code, reason)`` for the protocol
    error a session would close with.  Bytes after an unfinished frame are simply
    waiting for more.  Used by tests and tools; sessions run the same C parser."""
    cdef ws_parser p
    cdef ws_event ev
    cdef bytearray buf = bytearray(data)
    cdef Py_ssize_t n = len(buf), pos = 0
    cdef size_t k
    cdef unsigned char *base
    cdef unsigned char empty = 0
    cdef bytearray msg = bytearray()
    if max_message_size is None or max_message_size < 0:
        raise ValueError("max_message_size must be >= 0 (0: no limit)")
    ws_parser_init(&p, <uint64_t>max_message_size, 1 if server else 0)
    base = <unsigned char *>(<char *>buf) if n > 0 else &empty
    events = []
    while True:
        k = ws_parse(&p, base + pos, <size_t>(n - pos), &ev)
        pos += <Py_ssize_t>k
        if ev.type == WS_EV_MORE:
            return events, None
        payload = PyBytes_FromStringAndSize(<const char *>ev.data, <Py_ssize_t>ev.len) \
            if ev.len else b""
        if ev.type == WS_EV_DATA:
            if ev.first:
                msg = bytearray()
            msg += payload
            if ev.last:
                events.append(("text", bytes(msg).decode("utf-8")) if ev.text
                              else ("binary", bytes(msg)))
        elif ev.type == WS_EV_PING:
            events.append(("ping", payload))
        elif ev.type == WS_EV_PONG:
            events.append(("pong", payload))
        elif ev.type == WS_EV_CLOSE:
            events.append(("close", ev.code, payload.decode("utf-8")))
        else:
            return events, (ev.code, ev.reason.decode("ascii"))
