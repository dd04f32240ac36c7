# core/websocket_http.pxi: the HTTP/1.1 upgrade that opens a WebSocket (RFC 6455 section
# 4), on both sides, and the ws:// URLs a ClientService is given.
# Included by _core.pyx (one extension module, one file per concern).
#
# What it owns.  Reading an HTTP head (bounded by max_header_size and max_headers before
# anything is buffered: _find_head_end, _parse_http_head), the objects a user sees of it
# (WebSocketRequest, HttpResponse, parse_http_request), and the handshake as the
# session's receive path drives it (_ws_handshake): a server hands the request to the
# OnUpgrade hook, then answers 101 with Sec-WebSocket-Accept, or refuses with a status
# (_ws_refuse) and closes; a client checks the server's 101 against the key it sent.
# Once the upgrade succeeded, _ws_opened makes the session OPEN and runs OnConnected;
# frames and messages from then on are websocket.pxi's.  The handshake deadline
# (handshake_timeout) and the hooks into Listener(websocket=True) and ws:// URLs are here.
#
# Locks.  The handshake runs on the session's receive path, on its strand, one
# completion at a time: the head being read and the handshake state take no lock.  The
# phase it moves to OPEN is an atomic (SendMessage and Close read it from any thread);
# what it sends goes through the session's send queue (its own lock).  The deadline
# timer runs on any worker and only reads the phase and closes.


_WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


_WS_TOKEN = frozenset(b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyz"
                      b"ABCDEFGHIJKLMNOPQRSTUVWXYZ")


_HTTP_REASONS = {101: "Switching Protocols", 200: "OK", 400: "Bad Request",
                 403: "Forbidden", 404: "Not Found", 405: "Method Not Allowed",
                 408: "Request Timeout", 426: "Upgrade Required",
                 431: "Request Header Fields Too Large", 500: "Internal Server Error",
                 503: "Service Unavailable"}


def websocket_accept_key(key):
    """The Sec-WebSocket-Accept value for a Sec-WebSocket-Key (RFC 6455 4.2.2)."""
    # imported here: hashlib loads OpenSSL's libcrypto (~3.7 MiB resident), which a
    # server without WebSocket (or TLS) never needs
    import hashlib
    if isinstance(key, str):
        key = key.encode("ascii")
    return _base64.b64encode(hashlib.sha1(bytes(key) + _WS_GUID).digest()).decode("ascii")


class HttpResponse:
    """An HTTP answer instead of the WebSocket upgrade.  ``OnUpgrade`` returns one to
    refuse a request (403, 404...) or to answer a plain HTTP request (200 and a page);
    the connection closes once it is sent."""

    def __init__(self, int status, body=b"", str content_type="text/plain; charset=utf-8",
                 headers=None):
        if not 200 <= status <= 599:
            raise ValueError(f"HTTP status {status} out of range 200..599")
        if isinstance(body, str):
            body = body.encode("utf-8")
        headers = {str(k): str(v) for k, v in dict(headers or {}).items()}
        # A line break in a value (say, a redirect to a URL decoded from the request)
        # would end the header there and start one of the peer's choosing.
        for k, v in [("Content-Type", content_type), *headers.items()]:
            if not k or not all(ord(c) in _WS_TOKEN for c in k):
                raise ValueError(f"HTTP header name {k!r} is not a token")
            for c in v:
                if (c < " " and c != "\t") or c == "\x7f":
                    raise ValueError(f"control character in HTTP header {k}: {v!r}")
        self.status = status
        self.body = bytes(body)
        self.content_type = content_type
        self.headers = headers

    def __repr__(self):
        return f"HttpResponse({self.status}, {len(self.body)} bytes)"

    def _encode(self):
        lines = [f"HTTP/1.1 {self.status} {_HTTP_REASONS.get(self.status, 'Status')}",
                 f"Content-Type: {self.content_type}",
                 f"Content-Length: {len(self.body)}",
                 "Connection: close"]
        for k, v in self.headers.items():
            lines.append(f"{k}: {v}")
        head = "\r\n".join(lines) + "\r\n\r\n"
        for ch in head:
            if ch == "\0":
                raise ValueError("NUL in an HTTP header")
        return head.encode("latin-1") + self.body


class WebSocketRequest:
    """The HTTP request of a WebSocket upgrade (or any HTTP request the server got), as
    ``OnUpgrade`` sees it.  ``headers`` maps lower-case names to values (a repeated
    header's values joined with ", ")."""

    def __init__(self, method, path, headers):
        self.method = method
        self.path = path
        self.headers = headers

    @property
    def host(self):
        return self.headers.get("host")

    @property
    def origin(self):
        return self.headers.get("origin")

    @property
    def subprotocols(self):
        """The subprotocols the client offers, in its order of preference."""
        v = self.headers.get("sec-websocket-protocol", "")
        return [p.strip() for p in v.split(",") if p.strip()]

    @property
    def is_websocket(self):
        """Whether this is a WebSocket upgrade request at all (Upgrade: websocket and
        Connection: upgrade); a plain HTTP request is not."""
        up = self.headers.get("upgrade", "").lower()
        conn = [t.strip() for t in self.headers.get("connection", "").lower().split(",")]
        return "websocket" in [t.strip() for t in up.split(",")] and "upgrade" in conn

    def __repr__(self):
        return f"<WebSocketRequest {self.method} {self.path}>"


class _HttpError(Exception):
    def __init__(self, status, reason):
        Exception.__init__(self, reason)
        self.status = status
        self.reason = reason


cdef Py_ssize_t _find_head_end(const unsigned char *p, Py_ssize_t n,
                               Py_ssize_t start=0) noexcept:
    """The length of the HTTP head (through its blank line) in p[0:n], or -1; the
    first `start` bytes are known not to end it."""
    cdef Py_ssize_t i
    for i in range(max(3, start), n):
        if p[i] == 10 and p[i - 1] == 13 and p[i - 2] == 10 and p[i - 3] == 13:
            return i + 1
    return -1


@cython.wraparound(True)


def _parse_http_head(bytes head, bint request, int max_headers):
    """Parse an HTTP/1.1 request or response head (ending with the blank line).
    Returns (start-line fields, headers dict); raises _HttpError(400 or 431, reason)."""
    text = head.decode("latin-1")
    lines = text.split("\r\n")
    if len(lines) < 3 or lines[-1] != "" or lines[-2] != "":
        raise _HttpError(400, "malformed HTTP head")
    lines = lines[:-2]
    start = lines[0]
    parts = start.split(" ", 2)
    if request:
        if len(parts) != 3 or not parts[0] or not parts[1]:
            raise _HttpError(400, f"malformed request line {start[:80]!r}")
        if parts[2] != "HTTP/1.1":
            raise _HttpError(400, f"not an HTTP/1.1 request: {parts[2][:20]!r}")
        if not all(ord(c) in _WS_TOKEN for c in parts[0]):
            raise _HttpError(400, "malformed method")
        for c in parts[1]:
            if ord(c) <= 32 or ord(c) >= 127:
                raise _HttpError(400, "malformed request target")
    else:
        if len(parts) < 2 or parts[0] != "HTTP/1.1" or len(parts[1]) != 3 or \
                not parts[1].isdigit():
            raise _HttpError(400, f"malformed status line {start[:80]!r}")
    if len(lines) - 1 > max_headers:
        raise _HttpError(431, f"more than {max_headers} header fields")
    headers = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep or not name or not all(ord(c) in _WS_TOKEN for c in name):
            raise _HttpError(400, f"malformed header line {line[:80]!r}")
        value = value.strip(" \t")
        for c in value:
            if (ord(c) < 32 and c != "\t") or c == "\x7f":
                raise _HttpError(400, f"control character in header {name[:40]!r}")
        key = name.lower()
        if key in headers:
            headers[key] = headers[key] + ", " + value
        else:
            headers[key] = value
    return parts, headers


def parse_http_request(data, int max_header_size=8192, int max_headers=64):
    """Parse the HTTP upgrade request at the start of ``data`` the way a WebSocket
    server does.  Returns ``(request, used)``: a ``WebSocketRequest`` (None if the head
    is not complete yet) and the bytes it used.  Raises ``ValueError("<status>
    <reason>")`` for what a server answers with 400 or 431.  Used by tests and tools."""
    cdef const unsigned char[:] view = memoryview(data).cast("B")
    cdef Py_ssize_t n = view.shape[0], end
    cdef unsigned char empty = 0
    if n == 0:
        return None, 0
    end = _find_head_end(&view[0], min(n, max_header_size))
    if end < 0:
        if n >= max_header_size:
            raise ValueError(f"431 request head larger than {max_header_size} bytes")
        return None, 0
    try:
        parts, headers = _parse_http_head(bytes(view[:end]), True, max_headers)
    except _HttpError as e:
        raise ValueError(f"{e.status} {e.reason}") from None
    return WebSocketRequest(parts[0], parts[1], headers), end


def _default_on_upgrade(session, request):
    """The default upgrade policy: any path; the Origin must be in the class's
    ``origins`` when that is set (403 otherwise); the first subprotocol the client offers
    that is in the class's ``subprotocols`` is chosen (none if no match)."""
    cdef _WsHooks h = _ws_hooks_for(type(session))
    if h.origins is not None and request.origin not in h.origins:
        return HttpResponse(403, f"origin {request.origin!r} is not allowed\n")
    for p in request.subprotocols:
        if p in h.subprotocols:
            return p
    return None


def _ws_handshake_deadline(Session s):
    cdef _WebSocket ws = <_WebSocket>s._ws
    if port_atomic_load32(&ws.phase) == WS_HANDSHAKE and s._state == S_CONNECTED:
        reason = (f"WebSocket handshake timed out after {ws.hooks.handshake_timeout:g} s")
        # Per burst: a peer can open connection after connection and send nothing.
        _log_in_burst(s, LOG_WS_HANDSHAKE, _logging_INFO,
                      f"disconnecting {repr(s)}: {reason}")
        if ws.client:
            _ws_connect_failed(s, reason)
        _close_now(s, reason, False)


cdef Py_ssize_t _ws_handshake(Session s, _WebSocket ws, unsigned char *ptr,
                              Py_ssize_t n) noexcept:
    """Look for the whole HTTP head in ptr[0:n] and act on it.  Returns its length once
    the handshake succeeded, 0 while it is incomplete, -1 after a failure (the session
    is closing)."""
    cdef Py_ssize_t end, limit = ws.hooks.max_header_size
    cdef Py_ssize_t upto = n if n < limit else limit
    # Search only what is new (a head sent byte by byte costs linear time, not
    # quadratic): the bytes stay in the receive buffer until the head is whole.
    end = _find_head_end(ptr, upto, ws.hs_scanned)
    ws.hs_scanned = upto
    if end < 0:
        if n >= limit:
            if ws.client:
                # A client answers no one: it gives up on the connection (an HTTP
                # response sent to the server would be nonsense on the wire).
                _ws_client_failed(s, f"WebSocket handshake failed: response head larger "
                                     f"than max_header_size ({limit} bytes)")
            else:
                _ws_refuse(s, ws, 431, f"HTTP head larger than max_header_size "
                                       f"({limit} bytes)")
            return -1
        return 0
    try:
        head = PyBytes_FromStringAndSize(<const char *>ptr, end)
        if ws.client:
            ok = _ws_client_response(s, ws, head)
        else:
            ok = _ws_server_request(s, ws, head)
    except BaseException as e:
        _hook_failed(s, "the WebSocket handshake", e)
        return -1
    if not ok:
        return -1
    _ws_opened(s, ws)
    return end if s._state == S_CONNECTED else -1


cdef void _ws_opened(Session s, _WebSocket ws) noexcept:
    """The handshake succeeded: OnConnected, and the keepalive."""
    with cython.critical_section(ws):
        t = ws.hs_timer
        ws.hs_timer = None
    if t is not None:
        (<Timer>t).Cancel()
    port_atomic_xchg32(&ws.phase, WS_OPEN)
    if ws.hooks.ping_interval > 0:
        try:
            t = s.core.CallEvery(ws.hooks.ping_interval, _ws_keepalive, s)
            with cython.critical_section(ws):
                ws.ka_timer = t
        except BaseException:
            logger.exception("cannot start the WebSocket keepalive of %s", repr(s))
    if s._hooks.on_connected is not None:
        try:
            s._hooks.on_connected(s)
        except BaseException as e:
            _hook_failed(s, "OnConnected", e)


cdef void _ws_refuse(Session s, _WebSocket ws, int status, str reason,
                     object response=None) noexcept:
    """Server: answer the request with an HTTP error (or the hook's response) and close
    once it is sent."""
    cdef str why
    try:
        if response is None:
            extra = {"Sec-WebSocket-Version": "13"} if status == 426 else None
            if status == 426:
                extra["Upgrade"] = "websocket"
            response = HttpResponse(status, reason + "\n", headers=extra)
        _send_bytes(s, (<object>response)._encode())
    except BaseException:
        logger.exception("answering the HTTP request of %s failed", repr(s))
    if response is not None and response.status < 400:
        why = f"HTTP request answered with {response.status}"
        logger.debug("%s: %s", repr(s), why)
    else:
        why = f"WebSocket upgrade refused: {status} {reason}"
        # A peer can send garbage on connection after connection: bounded per burst.
        _log_in_burst(s, LOG_WS, _logging_WARNING, f"disconnecting {repr(s)}: {why}")
    _begin_disconnect(s, why, True)


cdef bint _ws_server_request(Session s, _WebSocket ws, bytes head) except? -1:
    try:
        parts, headers = _parse_http_head(head, True, ws.hooks.max_headers)
    except _HttpError as e:
        _ws_refuse(s, ws, e.status, e.reason)
        return False
    request = WebSocketRequest(parts[0], parts[1], headers)
    ws.request = request
    if request.method != "GET":
        _ws_refuse(s, ws, 405, f"method {request.method} not allowed (GET only)")
        return False
    try:
        decision = ws.hooks.on_upgrade(s, request)
    except BaseException as e:
        logger.error("OnUpgrade of %s raised", repr(s),
                     exc_info=(type(e), e, e.__traceback__))
        _ws_refuse(s, ws, 500, f"OnUpgrade raised {type(e).__name__}")
        return False
    if isinstance(decision, HttpResponse):
        _ws_refuse(s, ws, decision.status, decision.body.decode("utf-8", "replace").strip(),
                   decision)
        return False
    if decision is not None and not isinstance(decision, str):
        _ws_refuse(s, ws, 500, "OnUpgrade returned neither None, a str nor an HttpResponse")
        return False
    if not request.is_websocket:
        _ws_refuse(s, ws, 426, "this is a WebSocket endpoint: send Upgrade: websocket "
                               "and Connection: Upgrade")
        return False
    if headers.get("sec-websocket-version") != "13":
        _ws_refuse(s, ws, 426, "unsupported Sec-WebSocket-Version (13 only)")
        return False
    key = headers.get("sec-websocket-key", "")
    try:
        raw = _base64.b64decode(key.encode("ascii"), validate=True)
    except Exception:
        raw = b""
    if len(raw) != 16:
        _ws_refuse(s, ws, 400, "missing or malformed Sec-WebSocket-Key")
        return False
    if decision is not None and decision not in request.subprotocols:
        _ws_refuse(s, ws, 500, f"OnUpgrade chose subprotocol {decision!r}, which the "
                               f"client did not offer")
        return False
    ws.subprotocol = decision
    lines = ["HTTP/1.1 101 Switching Protocols", "Upgrade: websocket",
             "Connection: Upgrade", f"Sec-WebSocket-Accept: {websocket_accept_key(key)}"]
    if decision is not None:
        lines.append(f"Sec-WebSocket-Protocol: {decision}")
    _send_bytes(s, ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
    return True


cdef bint _ws_client_response(Session s, _WebSocket ws, bytes head) except? -1:
    cdef str why = None
    try:
        parts, headers = _parse_http_head(head, False, ws.hooks.max_headers)
    except _HttpError as e:
        parts = headers = None
        why = f"WebSocket handshake failed: {e.reason}"
    if why is None:
        if parts[1] != "101":
            why = (f"WebSocket handshake refused: HTTP {parts[1]}"
                   + (f" {parts[2]}" if len(parts) > 2 else ""))
        elif headers.get("upgrade", "").lower() != "websocket" or "upgrade" not in \
                [t.strip() for t in headers.get("connection", "").lower().split(",")]:
            why = "WebSocket handshake failed: no Upgrade: websocket in the response"
        elif headers.get("sec-websocket-accept") != websocket_accept_key(ws.key):
            why = "WebSocket handshake failed: wrong Sec-WebSocket-Accept"
        elif headers.get("sec-websocket-extensions"):
            why = "WebSocket handshake failed: the server chose an extension we did not offer"
        else:
            sub = headers.get("sec-websocket-protocol")
            if sub is not None and sub not in ws.hooks.subprotocols:
                why = f"WebSocket handshake failed: subprotocol {sub!r} was not offered"
            ws.subprotocol = sub
    if why is not None:
        _ws_client_failed(s, why)
        return False
    return True


cdef void _ws_client_failed(Session s, str why) noexcept:
    """Our client's handshake failed: logged per burst (a server can refuse every
    attempt of a client that connects many sessions, or reconnects), OnConnectFailed,
    closed."""
    _log_in_burst(s, LOG_WS_HANDSHAKE, _logging_WARNING, f"disconnecting {repr(s)}: {why}")
    _ws_connect_failed(s, why)
    _close_now(s, why, False)


cdef int _ws_accepting(Session s, object told) noexcept:
    """A session accepted on a websocket Listener: make it a WebSocket server session.
    -1 (logged) if its class's settings are wrong: the connection is then refused.
    Each refusal is one line that says why; the traceback comes with the first of each
    class only (`told`: the listener's), or a client retrying filled the log."""
    try:
        _ws_enable(s, False)
    except BaseException as e:
        first = type(s) not in told
        told.add(type(s))
        logger.error("cannot make %s a WebSocket session (%s); refusing the connection",
                     repr(s), _describe_exc(e),
                     exc_info=(type(e), e, e.__traceback__) if first else None)
        return -1
    return 0


def _ws_parse_url(str url, ssl_context=None):
    """ws[s]://host[:port][/path][?query] -> ((host, port), (Host header, path), the
    SSLContext to use: None for ws://, the one given or a default one for wss://)."""
    from urllib.parse import quote, urlsplit
    u = urlsplit(url)
    if u.scheme not in ("ws", "wss"):
        raise ValueError(f"not a ws:// or wss:// URL: {url!r}")
    if not u.hostname:
        raise ValueError(f"no host in {url!r}")
    if u.username or u.password:
        raise ValueError("user:password in a WebSocket URL is not supported")
    if u.scheme == "ws" and ssl_context is not None:
        raise ValueError("ssl= with a ws:// URL: use a wss:// URL for TLS")
    if u.scheme == "wss" and ssl_context is None:
        import ssl as _ssl_module
        ssl_context = _ssl_module.create_default_context()
    port = u.port or (443 if u.scheme == "wss" else 80)
    # Into the request line: a space split it, a character past Latin-1 failed the
    # handshake.  Percent-encoded as UTF-8 (as a browser does); %XX already there stays.
    path = quote(u.path, safe="/%:@!$&'()*+,;=") or "/"
    if u.query:
        path += "?" + quote(u.query, safe="/?%:@!$&'()*+,;=")
    host = u.hostname
    try:
        # The Host header names what was resolved: a name that is not ASCII, in its
        # IDNA form (as written it could not even be encoded into the request).
        ascii_host = host.encode("idna").decode("ascii")
    except UnicodeError as e:
        raise ValueError(f"bad host {host!r} in {url!r}: {e}") from None
    host_header = f"[{ascii_host}]" if ":" in ascii_host else ascii_host
    if u.port is not None:
        host_header += f":{port}"
    return (host, port), (host_header, path), ssl_context


def _ws_default_target(address):
    host, port = address
    return (f"[{host}]:{port}" if ":" in host else f"{host}:{port}", "/")
