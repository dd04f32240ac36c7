# core/recv_view.pxi: the object OnRecv's view exports its bytes from.
# Included by _core.pyx (one extension module, one file per concern).


@cython.final
cdef class _RecvView:
    """What OnRecv's memoryview points at: received bytes, read-only.

    Normally the view is gone when the hook returns and the memory goes straight back to
    the port.  If the hook kept a reference (stored the memoryview or a slice of it), the
    memory is handed over to this object instead and released only when the last export
    ends, so a kept view never reads reused or freed memory.
    """
    cdef char *ptr
    cdef Py_ssize_t length
    cdef volatile int32_t exports
    cdef volatile int32_t state  # 0 in use, 1 detached (owns memory), 2 freed
    cdef IocpCore core          # to give back a port buffer
    cdef port_cqe_t held        # that buffer
    cdef bint holds_port_buffer
    cdef char *owned            # or a receive buffer taken over from the session

    def __getbuffer__(self, Py_buffer *buffer, int flags):
        PyBuffer_FillInfo(buffer, self, self.ptr, self.length, 1, flags)
        port_atomic_add32(&self.exports, 1)

    def __releasebuffer__(self, Py_buffer *buffer):
        if port_atomic_add32(&self.exports, -1) == 0:
            self._free_if_detached()

    cdef void _detached(self) noexcept:
        """The worker has handed the memory over (held/owned are set): publish it, and
        free it at once if the last export ended meanwhile."""
        port_atomic_add64(&_views_detached, 1)
        port_atomic_xchg32(&self.state, 1)
        if port_atomic_load32(&self.exports) == 0:
            self._free_if_detached()

    cdef void _free_if_detached(self) noexcept:
        # The worker (after publishing) and the thread ending the last export may both
        # get here: the exchange lets exactly one of them free.
        if port_atomic_cas32(&self.state, 1, 2):
            self._free()

    cdef void _free(self) noexcept:
        if self.holds_port_buffer:
            self.holds_port_buffer = False
            if self.core is not None and self.core.port != NULL:
                port_recv_release(self.core.port, &self.held)
        if self.owned != NULL:
            free(self.owned)
            self.owned = NULL
        port_atomic_add64(&_views_detached, -1)

    def __dealloc__(self):
        if self.state == 1:
            self._free()
