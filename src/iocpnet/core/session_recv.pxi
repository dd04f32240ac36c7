# core/session_recv.pxi: a session's receive path (RecvBuffer, OnRecv, packets).
# Included by _core.pyx (one extension module, one file per concern).
#
# What it owns.  The receive operation (_recv_op, one-shot or multishot, armed again
# after each completion unless backpressure paused it), the RecvBuffer (_rbuf[_rpos:
# _rlen]: the bytes a hook left unconsumed, freed as soon as it is empty so an idle
# connection pins no memory), and how received bytes reach the hooks: OnRecv gets a
# RecvView of the port's own buffer when nothing is pending (no copy), or of the
# RecvBuffer; PacketSession's OnRecvPacket is called once per whole packet; the TLS
# filter and the WebSocket layer plug in here (tls.pxi feed, websocket.pxi _ws_recv).
# A view the hook kept is settled after the call (recv_view.pxi): copied, or handed
# the buffer it points into.
#
# Locks.  Completions come on the session's strand, one at a time: the RecvBuffer and
# the kept view are the strand's alone.  Arming the receive (a submission on the
# socket) and the flags it shares with the send path (_recv_armed, _recv_paused, _ops)
# are under the session's ``_lock``.


cdef void _arm_recv(Session s) noexcept:
    cdef int rc
    port_spin_lock(&s._lock)
    rc = _arm_recv_locked(s)
    port_spin_unlock(&s._lock)
    if rc != 0:
        _close_now(s, f"cannot receive: {port_reason(rc)}", False)


cdef int _arm_recv_locked(Session s) noexcept:
    # Submissions and the close happen under _lock, so no operation can reach a
    # socket after it was closed (its number may already belong to a new one).
    cdef int rc = 0
    # Flushing, we keep reading and drop what comes (backpressure or not): a socket
    # closed with unread input sends a reset, and the peer's kernel then throws
    # away the end of what we flushed to it.
    if not s._recv_armed and (s._state == S_FLUSHING or
                                 (s._state == S_CONNECTED and not s._recv_paused)):
        _incref(<PyObject *>s)
        rc = port_recv(s.core.port, &s._recv_op, s._sock)
        if rc == 0:
            s._recv_armed = True
            s._ops += 1
        else:
            _decref(<PyObject *>s)
    return rc


cdef inline void _process_recv(Session s, port_cqe_t *cqe) noexcept:
    # Inlined into _complete, which calls it for every receive kept armed (the
    # common completion): the end of an arming is out of line (_recv_ended).
    cdef int64_t res = cqe.res
    if cqe.flags & PORT_CQE_BUFFER:
        # Once the service is stopping no new OnRecv starts (what a running hook
        # sends still goes out: the disconnect waits for it on our strand).
        if s._state == S_CONNECTED and not s._stop_requested and \
                _recv_counted(s, cqe.res):
            s._last_recv_ms = s.core._now_ms
            _enter_hook(s, H_RECV)
            _deliver(s, cqe)
            _leave_hook(s)
        else:
            port_recv_release(s.core.port, cqe)
    if not (cqe.flags & PORT_CQE_MORE):
        _recv_ended(s, res)


cdef void _recv_ended(Session s, int64_t res) noexcept:
    """The receive operation's final completion (`res`: its result): post the next
    one, or end the session as the result says."""
    cdef int rc
    if res == 0 or res == PORT_ECONNRESET:
        s._rx_ended = True        # nothing more to read: the close skips its drain
    rc = 0
    port_spin_lock(&s._lock)
    s._recv_armed = False
    s._ops -= 1
    if (res > 0 or res == PORT_ECANCELED) and \
            (s._state == S_CONNECTED or s._state == S_FLUSHING):
        # Post the next receive (the original's RegisterRecv after ProcessRecv),
        # unless paused for backpressure: then the send path posts it once the queue
        # drains.  (ECANCELED here: a multishot receive paused, maybe resumed since.)
        rc = _arm_recv_locked(s)
    port_spin_unlock(&s._lock)
    iocpnet_set_ending_session(<void *>s)      # a close now is done at once (_close_locked)
    if res == 0:
        if s._tls is not None and (<_Tls>s._tls).eof(s):
            pass                    # the handshake was cut: the filter closed us
        elif s._rlen > s._rpos:
            _begin_disconnect(s,
                f"peer closed the connection ({s._rlen - s._rpos} bytes of an "
                f"unfinished message left)", True)
        else:
            _begin_disconnect(s, "peer closed the connection", True)
    elif res < 0 and res != PORT_ECANCELED:
        _close_now(s, _io_reason(s, <int>res), False)
    elif rc != 0:
        _close_now(s, f"cannot receive: {port_reason(rc)}", False)
    iocpnet_set_ending_session(NULL)
    _maybe_finish(s)


cdef inline void _deliver(Session s, port_cqe_t *cqe) noexcept:
    """Show received bytes to the hook; keep what it did not consume."""
    cdef Py_ssize_t used
    if s._tls is None and s._rlen == s._rpos:
        # Nothing pending: show the port's buffer itself (no copy).
        used = _call_recv(s, cqe.buf, cqe.res)
        if used == cqe.res and s._kept_view is None and s._rbuf == NULL:
            # All consumed, the view not kept, no RecvBuffer (so _rlen == _rpos == 0):
            # the usual case, inlined into _complete; the rest is out of line.
            port_recv_release(s.core.port, cqe)
        else:
            _settle_chunk(s, cqe, used)
    else:
        _deliver_pending(s, cqe)


cdef void _settle_chunk(Session s, port_cqe_t *cqe, Py_ssize_t used) noexcept:
    """_deliver after OnRecv saw the port's buffer itself and consumed `used` bytes
    (-1: it failed): keep the rest, settle a kept view, give the buffer back."""
    cdef Py_ssize_t n = cqe.res
    cdef RecvView view
    if used >= 0 and used < n and s._state == S_CONNECTED:
        if _rbuf_append(s, cqe.buf + used, n - used) < 0:
            _close_now(s, "out of memory for the receive buffer", True)
    view = s._kept_view
    if view is not None:
        # The hook kept its view: the buffer goes back unless the view takes it.
        s._kept_view = None
        if view._settle_port(s.core, cqe):
            cqe = NULL
    if cqe != NULL:
        port_recv_release(s.core.port, cqe)
    _recv_kept(s)


cdef void _deliver_pending(Session s, port_cqe_t *cqe) noexcept:
    """_deliver with TLS, or with bytes left in the RecvBuffer: the new ones join them."""
    if s._tls is not None:
        (<_Tls>s._tls).feed(s, cqe)    # plaintext into the RecvBuffer, then shown
        return
    if _rbuf_append(s, cqe.buf, cqe.res) < 0:
        _close_now(s, "out of memory for the receive buffer", True)
        port_recv_release(s.core.port, cqe)
        return
    port_recv_release(s.core.port, cqe)
    _deliver_buffered(s)


cdef void _deliver_buffered(Session s) noexcept:
    """Show the RecvBuffer (new bytes were just appended to it) to the hook."""
    cdef Py_ssize_t used, n = s._rlen - s._rpos
    cdef char *ptr = s._rbuf + s._rpos
    cdef RecvView view
    used = _call_recv(s, ptr, n)
    view = s._kept_view
    if view is not None:
        s._kept_view = None
        if not view._settle_copy():
            # Its bytes are pinned (an export of the view is alive): the view takes
            # the RecvBuffer, the unconsumed rest moves to a new one.
            _hand_rbuf_over(s, view, ptr, n, used)
            used = 0
    if used >= 0:
        s._rpos += used
    _recv_kept(s)


cdef void _hand_rbuf_over(Session s, RecvView view, char *ptr, Py_ssize_t n,
                          Py_ssize_t used) noexcept:
    cdef char *old = s._rbuf
    s._rbuf = NULL
    s._rcap = s._rpos = s._rlen = 0
    if used >= 0 and used < n and _rbuf_append(s, ptr + used, n - used) < 0:
        _close_now(s, "out of memory for the receive buffer", True)
    view._adopt(old)


cdef void _recv_kept(Session s) noexcept:
    """After the hook: free an empty RecvBuffer, or check what it left in it."""
    cdef Py_ssize_t left = s._rlen - s._rpos
    if left == 0:
        s._rpos = s._rlen = 0
        if s._rbuf != NULL:
            free(s._rbuf)     # an idle connection pins no buffer
            s._rbuf = NULL
            s._rcap = 0
    elif left >= s._hooks.recv_buffer_limit and s._state == S_CONNECTED:
        _close_now(s,
            f"receive buffer full: {left} bytes received and not consumed by OnRecv "
            f"(recv_buffer_limit is {s._hooks.recv_buffer_limit})", True)


cdef int _rbuf_append(Session s, const char *data, Py_ssize_t n) noexcept:
    if _rbuf_reserve(s, n) < 0:
        return -1
    memcpy(s._rbuf + s._rlen, data, n)
    s._rlen += n
    return 0


cdef int _rbuf_reserve(Session s, Py_ssize_t n) noexcept:
    """Make room for n more bytes at _rbuf + _rlen."""
    cdef Py_ssize_t need, cap
    cdef char *nb
    if s._rpos > 0 and s._rlen + n > s._rcap:
        # Compact: move the unconsumed bytes to the front (the read cursor resets).
        memmove(s._rbuf, s._rbuf + s._rpos, s._rlen - s._rpos)
        s._rlen -= s._rpos
        s._rpos = 0
    need = s._rlen + n
    if need > s._rcap:
        cap = s._rcap if s._rcap > 0 else 4096
        while cap < need:
            cap *= 2
        nb = <char *>realloc(s._rbuf, cap)
        if nb == NULL:
            return -1
        s._rbuf = nb
        s._rcap = cap
    return 0


cdef inline Py_ssize_t _call_recv(Session s, char *ptr, Py_ssize_t n) noexcept:
    """Call OnRecv with a RecvView of ptr[0:n]; returns the bytes consumed, or -1 after
    an error (the session is closing).  If the hook kept the view (anyone holds it
    after the call), it is left in _kept_view: the caller settles it once it has
    taken what it needs from ptr (recv_view.pxi).  Inline: inside _process_recv (the
    usual receive) its frame and the call were ~23 instructions a completion."""
    cdef PyObject *view
    cdef Py_ssize_t used = n
    cdef PyObject *hook
    cdef PyObject *r
    if s._ws is not None:
        return _ws_recv(s, <unsigned char *>ptr, n)
    if s._hooks.packet_mode:
        return _parse_packets(s, <const unsigned char *>ptr, n)
    if s._hooks.on_recv is None:
        return n
    # No try block on the common path (each saves and restores the thread's handled
    # exception), the hook called through its own vectorcall entry, not Cython's
    # generic call, and the view held by a plain pointer (one reference, the spare's,
    # handed from the slot and back): only a new view, a hook that raised and one that
    # returned a count or kept the view take the slow paths.
    view = _spare_view()
    if view == NULL:
        view = _new_view(s)
        if view == NULL:
            return -1
    _view_lend(<RecvView>view, ptr, n)
    hook = <PyObject *>s._hooks.on_recv
    _incref(hook)           # the session's class may be changed by the hook itself
    r = _call2(hook, <PyObject *>s, view)
    _decref(hook)
    if r != <PyObject *>None:
        used = _recv_result(s, r, n)
    if r != NULL:
        _decref(r)
    if Py_REFCNT(<object>view) > 1:
        s._kept_view = <RecvView>view
        _decref(view)
    else:
        _view_after_hook(view)      # nobody else holds it: reused by the next call
    return used


cdef PyObject *_new_view(Session s) noexcept:
    """A view for OnRecv where this thread has no spare (out of line: its try block
    saves and restores the thread's handled exception): a new reference, or NULL once
    the failure is logged and the session closing."""
    try:
        v = RecvView.__new__(RecvView)
    except BaseException as e:
        _hook_failed(s, "OnRecv", e)
        return NULL
    _incref(<PyObject *>v)
    return <PyObject *>v


cdef int _raise_set() except -1:
    """Propagate the exception a C call left set (as `raise` would)."""
    return -1


cdef void _hook_raised(Session s, str hook) noexcept:
    """A hook called through _call2/_call3 raised (it returned NULL): logged, and the
    session closing, as a try block around the call would."""
    try:
        _raise_set()
    except BaseException as e:
        _hook_failed(s, hook, e)


cdef Py_ssize_t _recv_result(Session s, PyObject *r, Py_ssize_t n) noexcept:
    """OnRecv raised (r is NULL, the exception set) or returned a count: the bytes it
    consumed, or -1 once the failure is logged and the session closing."""
    cdef Py_ssize_t used
    cdef object res
    if r == NULL:
        _hook_raised(s, "OnRecv")
        return -1
    try:
        res = <object>r
        if res is True or res is False:
            # an int to Python: True would consume one byte and strand the rest
            raise TypeError(f"OnRecv returned {res}: return the number of bytes "
                            "consumed (an int), or None for all of them")
        used = res
        if used < 0 or used > n:
            raise ValueError(f"OnRecv returned {res}, but it was given {n} bytes")
        return used
    except BaseException as e:
        _hook_failed(s, "OnRecv", e)
        return -1


cdef Py_ssize_t _parse_packets(Session s, const unsigned char *ptr, Py_ssize_t n) noexcept:
    """PacketSession: call OnRecvPacket once per whole packet in ptr[0:n]; returns
    the bytes consumed (a partial packet waits for the rest), or -1 after a bad size
    or a failed hook (the session is closing)."""
    cdef Py_ssize_t pos = 0
    cdef size_t size = 0, limit = <size_t>s._hooks.max_packet_size
    cdef unsigned int pid = 0
    cdef packet_status st
    cdef object hook = s._hooks.on_recv_packet
    cdef PyObject *ident
    cdef PyObject *r
    while True:
        st = packet_scan(ptr + pos, <size_t>(n - pos), limit, &size, &pid)
        if st == PACKET_PARTIAL:
            break
        if st != PACKET_OK:
            why = _bad_packet_reason(st, size, pid, limit)
            # A peer can send garbage on connection after connection: bounded per burst.
            _log_in_burst(s, LOG_PACKETS, _logging_WARNING, f"disconnecting {repr(s)}: {why}")
            _close_now(s, why, True)
            return -1
        if not _message_counted(s, size):
            return -1
        payload = PyBytes_FromStringAndSize(<char *>ptr + pos + PKT_HEADER,
                                            <Py_ssize_t>size - PKT_HEADER)
        pos += size
        # Called as _call_recv calls OnRecv: no try block per packet (_hook_raised is
        # the slow path), the hook's own vectorcall entry.
        ident = _long_from_u(pid)       # ids up to 256 are CPython's cached ints
        r = NULL
        if ident != NULL:
            r = _call3(<PyObject *>hook, <PyObject *>s, ident, <PyObject *>payload)
            _decref(ident)
        if r == NULL:
            _hook_raised(s, "OnRecvPacket")
            return -1
        _decref(r)
        if s._state != S_CONNECTED:
            break            # the hook disconnected us: leave the rest
    return pos
