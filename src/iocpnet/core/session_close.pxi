# core/session_close.pxi: how a session ends (Disconnect, Abort, OnDisconnected).
# Included by _core.pyx (one extension module, one file per concern).
#
# What it owns.  The states past CONNECTED: a graceful Disconnect flushes what Send
# queued (FLUSHING, bounded by flush_timeout, still reading and dropping input: unread
# input would turn our FIN into a reset that loses the end of the flush), then closes;
# _close_now closes at once (errors, limits, Abort, the flush deadline).  Closing
# cancels what is in flight and submits the close operation (_close_op, a record made
# by the first close: an idle session carries a pointer, not ~100 bytes); once the
# last operation has completed (_ops == 0) the session is DONE: its buffers are freed,
# its layers told (WebSocket, TLS, the game layer's timers and groups), then
# OnDisconnected runs exactly once, and only after it returned does the service forget
# the session (Stop and Run wait for that).
#
# Locks.  Disconnect and Abort run on any thread: the state, the reason and the close
# itself are under the session's ``_lock``, and states only move forward, so whoever
# sets CLOSING checks _ops again and exactly one caller finishes.  OnDisconnected runs
# outside the lock, on whichever thread ended the last operation.


cdef extern from *:
    """
    /* The session whose receive just ended, set by its own completion on this thread
     * (so this thread holds its strand): its close may be done at once (_close_locked). */
    static PORT_THREAD_LOCAL void *iocpnet_tls_ending = 0;
    static void *iocpnet_ending_session(void) { return iocpnet_tls_ending; }
    static void iocpnet_set_ending_session(void *s) { iocpnet_tls_ending = s; }
    """
    void *iocpnet_ending_session() noexcept nogil
    void iocpnet_set_ending_session(void *s) noexcept nogil


cdef void _process_close(Session s, port_cqe_t *cqe) noexcept:
    port_spin_lock(&s._lock)
    s._ops -= 1
    port_spin_unlock(&s._lock)
    _maybe_finish(s)


cdef str _io_reason(Session s, int res):
    """The reason of a receive or send that failed with `res`: during a TLS handshake,
    it failed the handshake (what a user greps the log for), whichever side saw it."""
    if s._tls is None:
        return port_reason(res)
    return (<_Tls>s._tls).reason(port_reason(res))


cdef bint _begin_disconnect(Session s, str reason, bint flush) noexcept:
    """Graceful: stop receiving, flush the send queue (bounded), then close."""
    cdef IocpCore core
    if s._ws is not None and s._state == S_CONNECTED:
        _ws_goodbye(s, reason)    # a close frame first (websocket.pxi)
    if s._tls is not None and flush:
        (<_Tls>s._tls).close_notify(s)      # queued before the flush below
    port_spin_lock(&s._lock)
    if s._state != S_CONNECTED and s._state != S_CONNECTING:
        port_spin_unlock(&s._lock)
        return False
    s._reason = reason
    if s._state == S_CONNECTING or not flush or \
            not (s._send_busy or s._sq_count > 0):
        _close_locked(s, False)
        port_spin_unlock(&s._lock)
        _maybe_finish(s)
        return True
    s._state = S_FLUSHING
    _arm_recv_locked(s)          # drain (and drop) the input while flushing
    port_spin_unlock(&s._lock)
    core = s.core
    core._watch_flush(s, port_monotonic_ms() + <int64_t>(s._hooks.flush_timeout * 1000))
    return True


cdef bint _close_now(Session s, str reason, bint reset) noexcept:
    """Close at once (errors, limits, Abort, the flush deadline): queued data is
    dropped.  The first reason is kept, except that a graceful close in progress
    reports what interrupted it."""
    if not _close_unfinished(s, reason, reset):
        return False
    _maybe_finish(s)
    return True


cdef inline bint _close_unfinished(Session s, str reason, bint reset) noexcept:
    """_close_now without the end: the session is CLOSING (Sends to it refused), and
    whoever calls _maybe_finish next runs OnDisconnected.  Service._end_abandoned
    closes every abandoned session first, so that none's OnDisconnected can reach
    another still open on a shut port."""
    port_spin_lock(&s._lock)
    if s._state < S_CONNECTING or s._state >= S_CLOSING:
        port_spin_unlock(&s._lock)
        return False
    if s._state != S_FLUSHING or reason is not None:
        s._reason = reason
    _close_locked(s, reset)
    port_spin_unlock(&s._lock)
    return True


cdef void _close_if_flushed(Session s) noexcept:
    """Graceful close: once the send queue has drained, close.  Checked again under
    the lock: a Send accepted just before Disconnect may have started another send
    since the caller looked (while OnSend ran, say), and it must go out first."""
    port_spin_lock(&s._lock)
    if s._state == S_FLUSHING and not s._send_busy and s._sq_count == 0:
        _close_locked(s, False)
    port_spin_unlock(&s._lock)
    _maybe_finish(s)


cdef void _close_locked(Session s, bint reset) noexcept:
    """Cancel what is in flight and close the socket (under _lock)."""
    cdef int rc, flags = PORT_CLOSE_RESET if reset else 0
    cdef bint connecting = s._state == S_CONNECTING
    s._state = S_CLOSING
    if s._reason is None:
        s._reason = "disconnected"
    if connecting:
        port_cancel(s.core.port, _connect_op(s))
    elif s._recv_armed:
        port_cancel(s.core.port, &s._recv_op)
    if s._send_busy:
        port_cancel(s.core.port, &s._send_op)
    if not reset and not connecting and not s._rx_ended:
        # Unread input would turn our FIN into a reset, and the peer would lose
        # the end of what we sent it (a reply flushed at shutdown, say).  Once the
        # peer's FIN (or reset) was received nothing can be left: no system call.
        port_sock_drain(s._sock)
    if s._ops == 0 and iocpnet_ending_session() == <void *>s:
        # Nothing of ours in flight on the socket (the peer's FIN or reset ended the
        # receive; no send), and this is the session's own completion, on its strand,
        # where OnDisconnected may run: close here, one system call and nothing to
        # dispatch, as epoll and C servers do.  port_close cost io_uring a submission,
        # a completion and, with one connection at a time, a wait and a batch more.
        port_sock_close(s.core.port, s._sock, flags)
        s._sock = PORT_INVALID_SOCK
        return
    _incref(<PyObject *>s)
    rc = port_close(s.core.port, _close_record(s), s._sock, flags)
    if rc == 0:
        s._ops += 1
    else:
        # The port is shut down: no completion will come for anything.  Close the
        # socket here; _maybe_finish ends the session.
        _decref(<PyObject *>s)
        port_sock_close(s.core.port, s._sock, flags)
        s._ops = 0
    s._sock = PORT_INVALID_SOCK


cdef port_op_t *_close_record(Session s) noexcept:
    """The session's close record, made the first time (under _lock).  Memory is waited
    for, as the port does for a completion it must queue: a session that could not
    close would never end (nor would Stop)."""
    cdef port_op_t *op = s._close_op
    if op == NULL:
        op = <port_op_t *>malloc(sizeof(port_op_t))
        while op == NULL:
            port_thread_yield()
            op = <port_op_t *>malloc(sizeof(port_op_t))
        port_op_init(op, PORT_OP_CLOSE, <void *>s, &s._strand)
        s._close_op = op
    return op


cdef void _maybe_finish(Session s) noexcept:
    cdef bint finish = False
    if s._state != S_CLOSING:
        return       # states only move forward; whoever sets CLOSING checks again
    port_spin_lock(&s._lock)
    if s._state == S_CLOSING and s._ops == 0:
        s._state = S_DONE
        finish = True
    port_spin_unlock(&s._lock)
    if finish:
        _finish(s)


cdef void _finish(Session s) noexcept:
    """Every operation has ended: release everything, then OnDisconnected."""
    s._release_buffers()
    if s._ws is not None:
        _ws_finish(s)
    # Only a session that flushed was ever watched, and in a connect storm none does: no
    # lock for the others.  Unlocked, the emptiness can be stale only for a watch being
    # added now by a Disconnect that lost the race to this end; the sweep drops that
    # entry anyway (its state is not FLUSHING), as it would if the lock were taken.
    if len(s.core._flush_watch) != 0:
        s.core._unwatch_flush(s)
    if s._counted_connected:
        s._counted_connected = False
        port_atomic_add64(&_sessions_connected, -1)
    if s._tls is not None:
        (<_Tls>s._tls).finished(s)          # OnConnectFailed after a bad handshake
    if s._x is not None:
        _session_ended(s)     # its timers and tasks cancelled, its groups left
    if s._hooks.on_disconnected is not None:
        _enter_hook(s, H_DISCONNECTED)
        try:
            s._hooks.on_disconnected(s, s._reason)
        except BaseException:
            logger.exception("OnDisconnected of %s raised", repr(s))
        _leave_hook(s)
    # Only now does the service forget the session: Stop() (and Run()) wait for
    # session_count to reach 0, and a server saving a player's state in
    # OnDisconnected must not see the process exit while it writes.
    if s._service is not None:
        s._service._session_done(s)
