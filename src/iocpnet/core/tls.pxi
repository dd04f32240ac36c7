# core/tls.pxi: TLS, a stream filter between the port and whatever sits above the session.
# Included by _core.pyx (one extension module, one file per concern).
#
# What it owns.  A session made by a Listener or ClientService with ``ssl=`` gets a _Tls
# (``Session._tls``); without TLS that field is None and the session pays one pointer
# test on each path below, nothing else.  The filter drives the standard library's
# ``ssl.SSLObject`` over two ``ssl.MemoryBIO``s, the way asyncio's SSL transport does:
# ciphertext from the port is written into the incoming BIO, plaintext is read out of
# the SSLObject straight into the session's RecvBuffer, and the framing above (OnRecv,
# PacketSession, WebSocketSession) is shown that buffer as if it had come from the
# socket.  Plaintext given to Send is written into the SSLObject and the records it
# makes are queued as ordinary send buffers, so order, gather sends, backpressure and
# the flush on Disconnect are the session's own.
#
# The interface is five calls from the session, each one line there:
#   start(s)          connection up: wrap, arm the handshake deadline, send ClientHello
#   feed(s, cqe)      ciphertext received (instead of _deliver's own path)
#   send(s, data)     Session.Send
#   close_notify(s)   a graceful close begins (_begin_disconnect): queue close_notify
#   acked(n)          n ciphertext bytes sent: how many plaintext bytes that completes
# plus eof/reason (a cut handshake names itself) and finished (at _finish).  Framing
# layers never see it: they read the RecvBuffer and call Send as without TLS.  The
# filter calls back _queue_send, _rbuf_reserve, _deliver_buffered, _call_connected,
# _begin_disconnect and _close_now.
#
# Locks.  An SSLObject must never be used by two threads at once, and Send may run on
# any thread while the session's strand reads: every call into the SSLObject or its
# BIOs, and the queueing of the records it produced, happens under ``mutex`` (so records
# reach the send queue in the order their sequence numbers were given).  The ssl module
# releases the GIL inside OpenSSL, so the mutex is taken without holding the GIL while
# waiting.  Nothing that can run user code runs under it (a hook, a log record, the
# export of a buffer given to Send: done before or after), with one exception left
# open: once a forced IocpCore.Close has shut the port, a send that fails finishes the
# session inline (_close_now cannot submit a close), OnDisconnected included.  Every
# entry point checks the session's state before taking it (OnDisconnected calling Send
# or Disconnect on its own session returns at once instead of waiting on itself).  The plaintext
# accounting for OnSend (``marks``) is filled under the mutex and drained on the
# strand's send completions: it has its own spin lock.  send_queue_limit, backpressure
# and send_queue_bytes count the records queued, as the session holds them.


cdef enum:
    T_HANDSHAKE = 0
    T_OPEN = 1
    T_CLOSED = 2          # close_notify queued, or the handshake failed: no more data

DEFAULT_TLS_HANDSHAKE_TIMEOUT = 10.0

cdef object _ssl_mod = None
cdef object _SSLWantReadError = None
cdef object _SSLCertVerificationError = None
cdef object _ssl_tail = None             # " (_ssl.c:1006)" at the end of messages


cdef object _tls_context(object context):
    """Check an ``ssl=`` argument; import what the filter needs the first time."""
    global _ssl_mod, _SSLWantReadError, _SSLCertVerificationError, _ssl_tail
    if context is None:
        return None
    if _ssl_mod is None:
        import ssl, re
        _SSLWantReadError = ssl.SSLWantReadError
        _SSLCertVerificationError = ssl.SSLCertVerificationError
        _ssl_tail = re.compile(r"\s*\(_ssl\.c:\d+\)$")
        _ssl_mod = ssl
    if not isinstance(context, _ssl_mod.SSLContext):
        raise TypeError(f"ssl must be an ssl.SSLContext, not {type(context).__name__}")
    return context


cdef void _log_handshake_failure(Session s, int level, str reason) noexcept:
    """A failed handshake's line.  A peer can fail handshakes as fast as it can connect
    (anything but TLS, or connect and reset): its service logs a burst's first lines and
    counts the rest (LogBurst, limits.pxi); the stats count every one."""
    _log_in_burst(s, LOG_TLS, level, f"{repr(s)}: {reason}")


cdef str _tls_describe(BaseException e):
    if _ssl_mod is not None and isinstance(e, _ssl_mod.SSLError):
        return _ssl_tail.sub("", str(e)) or type(e).__name__
    return _describe_exc(e)


ctypedef struct _TlsMark:
    Py_ssize_t cipher     # bytes of records queued by one call
    Py_ssize_t plain      # plaintext bytes they carry (0: handshake, alerts)


ctypedef struct _TlsStep:
    Py_ssize_t got        # plaintext bytes appended to the RecvBuffer
    bint opened           # the handshake completed in this step
    bint eof              # the peer's close_notify arrived


@cython.final
cdef class _Span:
    """Lends C memory (a port buffer, the RecvBuffer's free space) to MemoryBIO.write and
    SSLObject.read for the duration of one call; both release it before returning."""
    cdef char *ptr
    cdef Py_ssize_t length

    def __getbuffer__(self, Py_buffer *buffer, int flags):
        if self.ptr == NULL:
            raise BufferError("no memory lent")
        PyBuffer_FillInfo(buffer, self, self.ptr, self.length, 0, flags)

    def __releasebuffer__(self, Py_buffer *buffer):
        pass


def _tls_deadline(ref, double timeout):
    """The handshake deadline (a timer; holds the session weakly)."""
    s = ref()
    if s is not None and (<Session>s)._tls is not None:
        (<_Tls>(<Session>s)._tls).expire(<Session>s, timeout)


@cython.final
cdef class _Tls:
    cdef object context
    cdef bint server_side
    cdef object server_hostname
    cdef object sslobj
    cdef object incoming
    cdef object outgoing
    # Bound methods, looked up once per connection.
    cdef object _handshake
    cdef object _read
    cdef object _write
    cdef object _in_write
    cdef object _out_read
    cdef _Span span
    cdef PyThread_type_lock mutex
    cdef int state
    cdef bint fed                 # any ciphertext received (a silent peer is no attack)
    # Record boundaries of the ciphertext fed (see _track): the bytes of an unfinished
    # record sit in the BIO, and reading them would only raise SSLWantReadError.
    cdef unsigned char hdr[5]
    cdef int hdr_have
    cdef Py_ssize_t rec_left
    cdef Py_ssize_t rec_fed
    cdef object timer
    # Plaintext accounting, under acct_lock: a ring of marks in queue order.
    cdef volatile int32_t acct_lock
    cdef _TlsMark *marks
    cdef Py_ssize_t mark_head
    cdef Py_ssize_t mark_count
    cdef Py_ssize_t mark_cap
    cdef Py_ssize_t carry         # ciphertext sent beyond the last whole mark
    # Known once the handshake is done; never changed after.
    cdef object version
    cdef object alpn
    cdef object cipher
    cdef object peercert
    cdef object peercert_der

    def __dealloc__(self):
        if self.mutex != NULL:
            PyThread_free_lock(self.mutex)
        free(self.marks)

    @staticmethod
    cdef _Tls create(object context, bint server_side, object server_hostname):
        cdef _Tls t = _Tls.__new__(_Tls)
        t.context = context
        t.server_side = server_side
        t.server_hostname = server_hostname
        t.state = T_HANDSHAKE
        return t

    # ---- the mutex (see the essay at the top) ----

    cdef inline void _lock(self) noexcept:
        if not PyThread_acquire_lock(self.mutex, NOWAIT_LOCK):
            with nogil:
                PyThread_acquire_lock(self.mutex, WAIT_LOCK)

    cdef inline void _unlock(self) noexcept:
        PyThread_release_lock(self.mutex)

    # ---- from the session ----

    cdef void start(self, Session s) noexcept:
        """The TCP connection is up (on the strand, state connected, before the first
        receive is posted)."""
        cdef _TlsStep st
        cdef double timeout = s._hooks.tls_handshake_timeout
        err = None
        try:
            self.mutex = PyThread_allocate_lock()
            if self.mutex == NULL:
                raise MemoryError()
            self.span = _Span.__new__(_Span)
            self.incoming = _ssl_mod.MemoryBIO()
            self.outgoing = _ssl_mod.MemoryBIO()
            self.sslobj = self.context.wrap_bio(
                self.incoming, self.outgoing, server_side=self.server_side,
                server_hostname=self.server_hostname)
            self._handshake = self.sslobj.do_handshake
            self._read = self.sslobj.read
            self._write = self.sslobj.write
            self._in_write = self.incoming.write
            self._out_read = self.outgoing.read
            if timeout > 0:
                self.timer = s.core._start_timer(timeout, 0.0, _tls_deadline,
                                                 (_weakref.ref(s), timeout))
        except BaseException as e:
            err = e
        if err is not None:
            self.state = T_CLOSED
            _close_now(s, f"TLS handshake failed: {_tls_describe(err)}", True)
            return
        if not self.server_side:
            self._step(s, NULL)       # the ClientHello

    cdef void feed(self, Session s, port_cqe_t *cqe) noexcept:
        """Ciphertext received (on the strand): decrypt what is whole, show it."""
        self.fed = True
        self._step(s, cqe)

    cdef bint eof(self, Session s) noexcept:
        """The peer closed TCP.  True if that cut the handshake (we closed the session
        with that reason); False: the session's usual reason applies."""
        if self.state != T_HANDSHAKE:
            return False
        self._fail(s, "peer closed the connection during the handshake" if self.fed
               else "peer closed the connection before the handshake", not self.fed)
        return True

    cdef str reason(self, str why):
        """A receive error's reason: during the handshake, it failed the handshake."""
        return f"TLS handshake failed: {why}" if self.state == T_HANDSHAKE else why

    cdef object send(self, Session s, object data):
        """Session.Send: encrypt `data` into records and queue them.  send_queue_limit
        counts the records (what the session holds for the peer, record overhead
        included: 1-byte Sends make 23-byte records), so the limit is checked as they
        are queued; past it the session is cut and its stream is of no more use."""
        cdef Py_ssize_t n, over = 0
        cdef bint ok = False, written = False, broken = False
        mv = None
        if type(data) is bytes:
            n = PyBytes_GET_SIZE(data)
        else:
            # The caller's buffer is exported once, here, and the SSLObject is given
            # that export: asked for it under the mutex, a class's __buffer__ (user
            # code) ran there, and one that Sends on this session waited on itself.
            mv = memoryview(data)
            if not mv.c_contiguous:
                mv.release()
                mv = memoryview(_copy_to_bytes(data))    # not contiguous: gather it
            elif mv.itemsize != 1 or mv.ndim != 1:
                mv = mv.cast("B")
            data = mv
            n = mv.nbytes
        try:
            if s._state != S_CONNECTED or self.state != T_OPEN:
                return False
            if n == 0:
                return True
            err = None
            self._lock()
            try:
                if self.state == T_OPEN:
                    # Room to queue the records first: once the SSLObject has taken the
                    # data, records it made and we could not queue would be lost to the
                    # stream (the peer fails the next record's MAC).  No room: nothing
                    # was encrypted, the stream is whole, the caller gets MemoryError.
                    self._reserve(s)
                    if self._write(data) != n:   # a MemoryBIO never pushes back
                        raise RuntimeError("TLS: SSLObject.write took part of the data")
                    written = True
                    ok = self._flush(s, n, &over)
                    if ok:
                        _cnt_add(&s._cnt.msgs_out, 1)        # stats.pxi: one Send
            except BaseException as e:
                err = e
                if written and isinstance(e, MemoryError):
                    # Its records (or part of them) are made and not queued (a large
                    # Send's ciphertext could not be read out of the BIO): the stream
                    # is broken, nothing more may follow on it.
                    self.state = T_CLOSED
                    broken = True
            finally:
                self._unlock()
        finally:
            if mv is not None:
                mv.release()
        if err is not None:
            if isinstance(err, _ssl_mod.SSLError):
                _close_now(s, f"TLS error: {_tls_describe(err)}", False)
                return False
            if broken:
                why = (f"out of memory queueing the TLS records of a Send of {n} bytes "
                       f"(the stream is broken)")
                if _close_now(s, why, True):
                    logger.warning("disconnecting %s: %s", repr(s), why)
            raise err
        if over > 0:
            _cut_over_limit(s, over, n, n)
        return ok

    cdef void close_notify(self, Session s) noexcept:
        """A graceful close begins: no more data; queue close_notify (then the session
        flushes and closes).  A handshake in progress is simply abandoned."""
        if s._state != S_CONNECTED or self.mutex == NULL:
            return
        err = None
        self._lock()
        try:
            if self.state == T_OPEN:
                self.state = T_CLOSED
                try:
                    self.sslobj.unwrap()
                except _SSLWantReadError:
                    pass              # sent; the peer's own close_notify is not awaited
                self._flush(s, 0)
            self.state = T_CLOSED
        except BaseException as e:
            err = e
        finally:
            self._unlock()
        if err is not None:           # logged outside the mutex (handlers are user code)
            logger.debug("sending close_notify to %s failed: %s", repr(s),
                         _tls_describe(err))

    cdef Py_ssize_t acked(self, Py_ssize_t sent) noexcept:
        """`sent` ciphertext bytes went out (in queue order): the plaintext bytes of the
        records completed by them."""
        cdef Py_ssize_t plain = 0
        port_spin_lock(&self.acct_lock)
        self.carry += sent
        while self.mark_count > 0 and self.marks[self.mark_head].cipher <= self.carry:
            self.carry -= self.marks[self.mark_head].cipher
            plain += self.marks[self.mark_head].plain
            self.mark_head = (self.mark_head + 1) % self.mark_cap
            self.mark_count -= 1
        port_spin_unlock(&self.acct_lock)
        return plain

    cdef void finished(self, Session s) noexcept:
        """_finish: the session has ended.  A client whose handshake failed hears of it
        as a failed connection, right before OnDisconnected, on the session's strand."""
        timer = self.timer
        self.timer = None
        if timer is not None:
            (<Timer>timer).Cancel()
        if self.state == T_HANDSHAKE and str(s._reason).startswith("TLS handshake failed"):
            # A reset or a failed send cut the handshake (_io_reason named it): logged
            # here, outside the mutex a failed send-now holds, as _fail logs the others.
            self.state = T_CLOSED
            _log_handshake_failure(s, _logging_WARNING if self.fed else _logging_INFO,
                                   s._reason)
        if not self.server_side and self.version is None and \
                s._hooks.on_connect_failed is not None and \
                str(s._reason).startswith("TLS handshake failed"):
            try:
                s._hooks.on_connect_failed(s, s._reason)
            except BaseException:
                logger.exception("OnConnectFailed of %s raised", repr(s))

    cdef void expire(self, Session s, double timeout) noexcept:
        """The deadline fired (a worker, not the strand): fail a handshake still going."""
        if s._state == S_CONNECTED and self.state == T_HANDSHAKE:
            self._fail(s, f"not completed within {timeout:g} s", True)

    # ---- internals ----

    cdef void _fail(self, Session s, str why, bint quiet) noexcept:
        cdef bint first
        if self.mutex == NULL:
            return
        self._lock()
        first = self.state == T_HANDSHAKE
        self.state = T_CLOSED
        self._unlock()
        if not first:
            return
        reason = f"TLS handshake failed: {why}"
        _log_handshake_failure(s, _logging_INFO if quiet else _logging_WARNING, reason)
        _close_now(s, reason, True)

    cdef void _step(self, Session s, port_cqe_t *cqe) noexcept:
        """Feed `cqe`'s ciphertext (if any), advance the handshake or decrypt, queue what
        the SSLObject wrote; then, outside the mutex, run what that means for the
        session (OnConnected, OnRecv, a close)."""
        cdef _TlsStep st
        cdef bint handshaking
        st.got = 0
        st.opened = False
        st.eof = False
        err = None
        self._lock()
        handshaking = self.state == T_HANDSHAKE
        try:
            if cqe != NULL:
                self.span.ptr = cqe.buf
                self.span.length = <Py_ssize_t>cqe.res
                self._track(<const unsigned char *>cqe.buf, <Py_ssize_t>cqe.res)
                try:
                    self._in_write(self.span)
                finally:
                    self.span.ptr = NULL
                    port_recv_release(s.core.port, cqe)
            self._advance(s, &st)
        except BaseException as e:
            err = e
            if self.state != T_CLOSED:
                self.state = T_CLOSED
                try:
                    self._flush(s, 0)       # the alert that tells the peer why
                except BaseException:
                    pass
        finally:
            self._unlock()
        if err is not None:
            if handshaking and not st.opened:
                reason = f"TLS handshake failed: {_tls_describe(err)}"
                _log_handshake_failure(s, _logging_WARNING, reason)
            else:
                reason = f"TLS error: {_tls_describe(err)}"
                # Per burst: a peer can send a bad record on connection after connection.
                _log_in_burst(s, LOG_TLS_ERROR, _logging_WARNING, f"{repr(s)}: {reason}")
            _begin_disconnect(s, reason, True)
        if st.opened:
            timer = self.timer
            self.timer = None
            if timer is not None:
                (<Timer>timer).Cancel()
            s._was_connected = True
            if isinstance(s._service, ClientService):
                (<ClientService>s._service)._session_ready()
            if s._state == S_CONNECTED:
                s._call_connected()
        if st.got > 0 and s._state == S_CONNECTED:
            _deliver_buffered(s)
        elif s._rlen == s._rpos:
            _recv_kept(s)          # frees a buffer reserved for nothing
        if st.eof:
            _begin_disconnect(s, "peer closed the connection", True)

    cdef int _advance(self, Session s, _TlsStep *st) except -1:
        """Under the mutex: the handshake, then whatever plaintext is whole."""
        cdef Py_ssize_t room, n
        cdef bint filled = False
        if self.state == T_HANDSHAKE:
            try:
                self._handshake()
            except _SSLWantReadError:
                self._flush(s, 0)
                return 0
            self.state = T_OPEN
            st.opened = True
            self.version = self.sslobj.version()
            self.alpn = self.sslobj.selected_alpn_protocol()
            self.cipher = self.sslobj.cipher()
            self.peercert = self.sslobj.getpeercert()
            self.peercert_der = self.sslobj.getpeercert(True)
        if self.state != T_OPEN:
            return 0
        while True:
            # Whole records decrypt to fewer bytes than they take in the BIO, so this
            # much room is enough.  An unfinished record is not worth a call: it would
            # raise SSLWantReadError (an exception costs more than decrypting 64 B).
            room = self.incoming.pending - self.rec_fed
            if room <= 0:
                # Decrypted bytes left in the SSLObject: only after a read that filled
                # all the room it had (the first, after the handshake, for one).
                room = self.sslobj.pending() if filled or st.opened else 0
                if room == 0:
                    break
            if _rbuf_reserve(s, room) < 0:
                raise MemoryError("TLS: no memory for the receive buffer")
            self.span.ptr = s._rbuf + s._rlen
            self.span.length = room
            try:
                # (A record with no data in it, a KeyUpdate or a session ticket, does not
                # end the read: the ssl module's objects retry past it, AUTO_RETRY.)
                n = self._read(room, self.span)
            except _SSLWantReadError:
                break
            finally:
                self.span.ptr = NULL
            if n == 0:
                st.eof = True          # close_notify
                break
            s._rlen += n
            st.got += n
            filled = n == room
        self._flush(s, 0)              # tickets, key updates
        return 0

    cdef void _track(self, const unsigned char *p, Py_ssize_t n) noexcept:
        """Follow the record layer's framing ([type][version: 2][length: 2][body]) over
        the ciphertext fed, to know how many bytes of it end in an unfinished record.
        The SSLObject reads the BIO record by record (no read-ahead), so whatever
        precedes those bytes is whole records.  Garbage only misleads this hint until
        the SSLObject fails the connection on it."""
        cdef Py_ssize_t take
        while n > 0:
            if self.hdr_have < 5:
                self.hdr[self.hdr_have] = p[0]
                self.hdr_have += 1
                self.rec_fed += 1
                p += 1
                n -= 1
                if self.hdr_have == 5:
                    self.rec_left = (<Py_ssize_t>self.hdr[3] << 8) | self.hdr[4]
                    if self.rec_left == 0 or self.rec_left > 16384 + 2048:
                        # (A length no record may have: let the SSLObject see it at
                        # once, and fail the connection, rather than wait for it.)
                        self.hdr_have = 0
                        self.rec_fed = 0
                        self.rec_left = 0
                continue
            take = n if n < self.rec_left else self.rec_left
            self.rec_left -= take
            self.rec_fed += take
            p += take
            n -= take
            if self.rec_left == 0:
                self.hdr_have = 0
                self.rec_fed = 0

    cdef bint _flush(self, Session s, Py_ssize_t plain, Py_ssize_t *over=NULL) except? False:
        """Under the mutex: queue what the SSLObject wrote, `plain` bytes of it data.
        With `over` (a Send's records; the handshake's, alerts and close_notify are not
        held to the limit): if they would take the queue past send_queue_limit, queue
        nothing, set *over to that total, stop the stream (T_CLOSED) and return False:
        the caller cuts the session once the mutex is released.  (Only this filter
        queues on a TLS session, under this mutex: the queue can only have shrunk by
        the time they are queued.)"""
        cdef bytes data
        cdef Py_ssize_t now = 0, queued
        cdef bint ok
        if self.outgoing.pending == 0:
            return True
        data = self._out_read()
        if over != NULL:
            port_spin_lock(&s._lock)
            queued = s._sq_bytes + PyBytes_GET_SIZE(data)
            port_spin_unlock(&s._lock)
            if queued > s._hooks.send_queue_limit:
                over[0] = queued
                self.state = T_CLOSED
                return False
        self._mark(PyBytes_GET_SIZE(data), plain)
        ok = _queue_send(s, data, False, &now)
        if now > 0:
            self.acked(now)       # gone already: no completion will count it
        return ok

    cdef int _reserve(self, Session s) except -1:
        """Under the mutex, before a Send's data goes into the SSLObject: room for the
        one mark and the one queue entry its flush takes (only this filter queues on a
        TLS session, under this mutex, and sends only free entries meanwhile)."""
        cdef int rc = 0
        port_spin_lock(&self.acct_lock)
        if self.mark_count == self.mark_cap:
            rc = self._mark_grow()
        port_spin_unlock(&self.acct_lock)
        if rc < 0:
            raise MemoryError("TLS: growing the send accounting")
        port_spin_lock(&s._lock)
        if s._sq_count == s._sq_cap:
            rc = _sq_grow(s)
        port_spin_unlock(&s._lock)
        if rc < 0:
            raise MemoryError("growing the send queue")
        return 0

    cdef int _mark_grow(self) noexcept:
        """Double the ring of marks (under acct_lock); -1: no memory."""
        cdef _TlsMark *ring
        cdef Py_ssize_t cap = self.mark_cap * 2 if self.mark_cap else 8, i
        ring = <_TlsMark *>malloc(cap * sizeof(_TlsMark))
        if ring == NULL:
            return -1
        for i in range(self.mark_count):
            ring[i] = self.marks[(self.mark_head + i) % self.mark_cap]
        free(self.marks)
        self.marks = ring
        self.mark_cap = cap
        self.mark_head = 0
        return 0

    cdef int _mark(self, Py_ssize_t cipher, Py_ssize_t plain) except -1:
        cdef Py_ssize_t i
        port_spin_lock(&self.acct_lock)
        if self.mark_count == self.mark_cap and self._mark_grow() < 0:
            port_spin_unlock(&self.acct_lock)
            raise MemoryError("TLS: growing the send accounting")
        i = (self.mark_head + self.mark_count) % self.mark_cap
        self.marks[i].cipher = cipher
        self.marks[i].plain = plain
        self.mark_count += 1
        port_spin_unlock(&self.acct_lock)
        return 0
