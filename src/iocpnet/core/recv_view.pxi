# core/recv_view.pxi: RecvView, the object OnRecv gets.
# Included by _core.pyx (one extension module, one file per concern).
#
# What OnRecv is given, and why it is an object of our own
# --------------------------------------------------------
# OnRecv sees the received bytes where they already are: in a receive buffer of the port's
# pool, or in the session's RecvBuffer when earlier bytes were left unconsumed.  That
# memory is the session's again as soon as the hook returns.  The hook gets a RecvView: a
# small object that exports those bytes through the buffer protocol (read-only, format
# "B") and offers what code written for a memoryview uses (len, indexing, slicing to
# bytes, iteration, tobytes, hex, tolist, ==, nbytes, shape, obj, cast, release, `with`).
# It is created fresh for every call and never reused, so nothing a user holds can ever
# start showing another message; it reads no CPython internals, so it works the same on
# every version (3.9 to 3.14, free-threaded included).  (The earlier design recycled
# memoryviews and repointed them by writing CPython's private memoryview fields: a
# released view crashed the server, and `.obj` showed other sessions' bytes.)
#
# After the hook the worker settles the view (RecvView._settle_*):
#   - nobody else holds it (the usual case): it is simply dropped, the memory goes back;
#   - the hook kept it, and no buffer export is outstanding: a message of up to half a
#     receive buffer is copied, into the view object itself up to 16 bytes (the size of
#     most game input), else into a block of its own size, and the view repointed (no
#     one can have seen the old pointer: every access goes through the object); a
#     larger one keeps the port buffer itself, taken out of the pool for good
#     (port_recv_detach: the pool makes a replacement, so what a hook keeps never
#     drains the receive pool other sessions depend on);
#   - an export is outstanding (the hook kept `memoryview(data)`, a cast, a NumPy array
#     over it): the pointer is pinned, so the memory is handed over whole, a port buffer
#     detached as above or the session's RecvBuffer itself (the session starts a new one).
# A view the hook released (`with data:`, `data.release()`) needs nothing.  Memory kept is
# thus proportional to the bytes kept, within a factor of two, and freed with the view.
#
# Costs: the object is small (no Python-object fields, so it is not tracked by the
# garbage collector: 64 bytes with a GIL, 16 of them the inline copy).  Session.Send(view)
# reads the pointer directly.  A view nobody kept after its hook (its reference count is
# back to the worker's one) is not freed but kept as the thread's spare, and the next
# OnRecv on that thread is given it, pointed at the new bytes: nothing else can refer to
# it, so nobody can see it change (a view kept, exported or in a traceback has more
# references and is settled as above, never reused).  One spare per thread, in C
# thread-local storage (no lock, free-threaded included); dropped when Dispatch returns
# and when a Run worker's loop ends, so a thread that stops dispatching holds none.
#
# Threads: a hook may hand the view to other threads, which may read it while the worker
# settles it.  Every access to the pointer, the length, the state and the export count
# is made inside `cython.critical_section(self)`: the object's own lock on free-threaded
# builds, nothing at all where the GIL already serialises them.  Nothing inside the
# critical sections runs Python code (copies, malloc, PyBytes_FromStringAndSize,
# PyBuffer_FillInfo), so they are never suspended half-way.

cdef enum:
    RV_BORROWED = 0     # points into memory the session owns (during the hook)
    RV_OWNED = 1        # _store.p.u.mem: a malloc'd block (a copy, or a RecvBuffer handed over)
    RV_DETACHED = 2     # _store.p.u.mem: a receive buffer taken out of the port's pool
    RV_HELD = 3         # a port buffer still lent (no memory for its replacement)
    RV_INLINE = 4       # a copy of up to RV_INLINE_MAX bytes inside the object itself
    RV_RELEASED = 5
    RV_INLINE_MAX = 16

cdef extern from *:
    """
    /* What a RecvView owns: the memory to free (mem), or the core and the id of a port
     * buffer it holds (core, buf_id), or a short message's bytes in place (most kept
     * game messages are a few bytes: no second allocation for them). */
    typedef struct { union { char *mem; uintptr_t buf_id; } u; PyObject *core; } iocpnet_rv_ptrs;
    typedef union { char bytes[16]; iocpnet_rv_ptrs p; } iocpnet_rv_store;
    """
    ctypedef union iocpnet_rv_u:
        char *mem
        uintptr_t buf_id
    ctypedef struct iocpnet_rv_ptrs:
        iocpnet_rv_u u
        PyObject *core
    ctypedef union iocpnet_rv_store:
        char bytes[16]
        iocpnet_rv_ptrs p

cdef char _rv_empty[1]

cdef extern from *:
    """
    /* This thread's spare RecvView (an owned reference, or NULL): see the top. */
    static PORT_THREAD_LOCAL PyObject *iocpnet_tls_view = 0;
    static PyObject *iocpnet_view_take(void) {
        PyObject *v = iocpnet_tls_view;
        iocpnet_tls_view = 0;
        return v;
    }
    static int iocpnet_view_slot_free(void) { return iocpnet_tls_view == 0; }
    static void iocpnet_view_put(PyObject *v) { iocpnet_tls_view = v; }
    """
    PyObject *_view_take "iocpnet_view_take"() nogil
    bint _view_slot_free "iocpnet_view_slot_free"() nogil
    void _view_put "iocpnet_view_put"(PyObject *v) nogil


_RV_NO_COPY = ("cannot pickle or copy a RecvView (a view of received bytes, like a "
               "memoryview): copy its bytes with bytes(view)")


@cython.final
cdef class RecvView:
    """The bytes OnRecv is given: read-only, valid for as long as you hold it.

    It exports them through the buffer protocol (``memoryview(data)``, ``bytes(data)``,
    ``struct.unpack_from``, ``socket.send``...) and behaves like a read-only memoryview
    of format ``"B"``: ``len``, ``data[i]`` (an int), ``data[a:b]`` (a ``bytes`` copy),
    iteration, ``tobytes()``, ``hex()``, ``tolist()``, ``==`` with any bytes-like object,
    ``nbytes``, ``readonly``, ``format``, ``itemsize``, ``ndim``, ``shape``, ``strides``,
    ``obj`` (the view itself), ``cast()``, ``release()`` and ``with data: ...``.  It is
    not a ``memoryview`` subclass: ``isinstance(data, memoryview)`` is False (use
    ``memoryview(data)`` where a real one is needed).

    A view kept after OnRecv returns stays valid and byte-exact; a small message is then
    copied into memory of its own size, so keeping many costs little.
    """
    cdef char *_ptr
    cdef Py_ssize_t _len
    cdef iocpnet_rv_store _store  # p.u.mem (OWNED, DETACHED), p.core + p.u.buf_id (HELD),
                                  # bytes (INLINE)
    cdef int32_t _exports       # buffer exports outstanding
    cdef int32_t _state

    def __cinit__(self):
        self._ptr = _rv_empty
        self._state = RV_RELEASED

    def __init__(self):
        raise TypeError("RecvView objects are made by the core for OnRecv")

    def __dealloc__(self):
        self._free_memory()

    # ---- the worker's side ----

    cdef inline void _free_memory(self) noexcept:
        """Free what the view owns (no export outstanding, or the view is dying)."""
        cdef port_cqe_t held
        cdef int32_t state = self._state
        self._state = RV_RELEASED
        self._ptr = _rv_empty
        self._len = 0
        if state == RV_OWNED:
            free(self._store.p.u.mem)
        elif state == RV_DETACHED:
            port_buf_free(self._store.p.u.mem)
        elif state == RV_HELD:
            held.flags = PORT_CQE_BUFFER
            held.buf_id = <uint32_t>self._store.p.u.buf_id
            if (<IocpCore>self._store.p.core).port != NULL:
                port_recv_release((<IocpCore>self._store.p.core).port, &held)
            _decref(self._store.p.core)
        elif state != RV_INLINE:
            return
        self._store.p.u.mem = NULL
        self._store.p.core = NULL
        port_atomic_add64(&_views_detached, -1)

    cdef inline bint _copy_out(self) noexcept:
        """Repoint the view at a copy of its bytes: inside the object for a short
        message, else in a block of their size (inside the critical section, no export
        outstanding).  False: out of memory."""
        cdef char *mem
        if self._len <= RV_INLINE_MAX:
            memcpy(self._store.bytes, self._ptr, self._len)
            self._ptr = self._store.bytes
            self._state = RV_INLINE
        else:
            mem = <char *>malloc(self._len)
            if mem == NULL:
                return False
            memcpy(mem, self._ptr, self._len)
            self._ptr = self._store.p.u.mem = mem
            self._state = RV_OWNED
        port_atomic_add64(&_views_detached, 1)
        return True

    cdef bint _settle_port(self, IocpCore core, port_cqe_t *cqe) noexcept:
        """The hook kept this view of a port buffer (cqe's): make the view independent of
        it.  True if the view took the buffer (the caller must not give it back)."""
        cdef bint took = False
        with cython.critical_section(self):
            if self._state == RV_BORROWED:
                if self._exports == 0 and self._len * 2 <= core._recv_buffer_size and \
                        self._copy_out():
                    pass
                elif port_recv_detach(core.port, cqe) == 0:
                    self._store.p.u.mem = self._ptr    # the same memory, ours for good
                    self._state = RV_DETACHED
                    port_atomic_add64(&_views_detached, 1)
                    took = True
                elif self._exports == 0 and self._copy_out():
                    pass
                else:
                    # No memory even for a replacement buffer, and the pointer is
                    # pinned: keep the port's buffer, given back when the view goes.
                    _incref(<PyObject *>core)
                    self._store.p.core = <PyObject *>core
                    self._store.p.u.buf_id = cqe.buf_id
                    self._state = RV_HELD
                    port_atomic_add64(&_views_detached, 1)
                    took = True
        return took

    cdef bint _settle_copy(self) noexcept:
        """The hook kept this view of the session's RecvBuffer: copy it out if no export
        pins the pointer.  False: pinned (or out of memory), hand the buffer over."""
        cdef bint done = True
        with cython.critical_section(self):
            if self._state == RV_BORROWED and not (self._exports == 0 and self._copy_out()):
                done = False
        return done

    cdef void _adopt(self, char *mem) noexcept:
        """Take over `mem` (a malloc'd block that holds the view's bytes): the session
        handed its RecvBuffer over.  Freed at once if the view was released meanwhile."""
        with cython.critical_section(self):
            if self._state == RV_BORROWED:
                self._store.p.u.mem = mem
                self._state = RV_OWNED
                port_atomic_add64(&_views_detached, 1)
                mem = NULL
        free(mem)

    cdef int _pin(self, const char **ptr, Py_ssize_t *n) except -1:
        """The pointer and length, held valid until _unpin (an export without the
        buffer protocol's round trip: Session.Send's fast path)."""
        with cython.critical_section(self):
            self._check()
            ptr[0] = self._ptr
            n[0] = self._len
            self._exports += 1
        return 0

    cdef void _unpin(self) noexcept:
        with cython.critical_section(self):
            self._exports -= 1

    cdef bytes _to_bytes(self):
        """bytes(view), straight from the pointer (Session.Send's fast path)."""
        with cython.critical_section(self):
            if self._state == RV_RELEASED:
                b = None
            else:
                b = PyBytes_FromStringAndSize(self._ptr, self._len)
        if b is None:
            raise ValueError("operation forbidden on released RecvView object")
        return <bytes>b

    cdef inline int _check(self) except -1:
        if self._state == RV_RELEASED:
            raise ValueError("operation forbidden on released RecvView object")
        return 0

    # ---- the buffer protocol ----

    def __getbuffer__(self, Py_buffer *buffer, int flags):
        with cython.critical_section(self):
            self._check()
            PyBuffer_FillInfo(buffer, self, self._ptr, self._len, 1, flags)
            self._exports += 1

    def __releasebuffer__(self, Py_buffer *buffer):
        with cython.critical_section(self):
            self._exports -= 1

    # ---- what a read-only memoryview offers ----

    def release(self):
        """Let go of the bytes now (as ``memoryview.release``); later use raises
        ValueError.  Raises BufferError while ``memoryview(view)`` or another export
        of it is alive."""
        with cython.critical_section(self):
            if self._exports > 0:
                n = self._exports
            else:
                n = 0
                self._free_memory()
        if n:
            raise BufferError(f"RecvView has {n} exported buffer{'s' if n > 1 else ''}")

    def __enter__(self):
        with cython.critical_section(self):
            self._check()
        return self

    def __exit__(self, *exc_info):
        self.release()
        return False

    def __len__(self):
        with cython.critical_section(self):
            self._check()
            n = self._len
        return n

    def __bytes__(self):
        return self._to_bytes()

    def tobytes(self, order=None):
        """The bytes, copied."""
        return self._to_bytes()

    def tolist(self):
        """The bytes as a list of ints."""
        return list(self._to_bytes())

    def hex(self, *args):
        """The bytes as hexadecimal text (the arguments of ``bytes.hex``)."""
        return self._to_bytes().hex(*args)

    # Not data of its own, as a memoryview is not: pickling or copying one is refused
    # with what to do instead (copy.copy returning bytes would hand back another type
    # than it was given, and a silent copy is what a view exists to avoid).
    def __reduce_ex__(self, protocol):
        raise TypeError(_RV_NO_COPY)

    def __reduce__(self):
        raise TypeError(_RV_NO_COPY)

    def __copy__(self):
        raise TypeError(_RV_NO_COPY)

    def __deepcopy__(self, memo):
        raise TypeError(_RV_NO_COPY)

    def toreadonly(self):
        """The view itself: it is read-only already."""
        with cython.critical_section(self):
            self._check()
        return self

    def cast(self, *args):
        """A memoryview of these bytes cast to another format or shape (see
        ``memoryview.cast``); it keeps the bytes alive."""
        return memoryview(self).cast(*args)

    def __getitem__(self, index):
        cdef Py_ssize_t i, n, start, stop, step
        if isinstance(index, slice):
            # The length changes only when the view is released (checked again below).
            n = len(self)
            start, stop, step = (<slice>index).indices(n)
            if step != 1:
                return self._to_bytes()[index]
            with cython.critical_section(self):
                self._check()
                b = PyBytes_FromStringAndSize(self._ptr + start,
                                              stop - start if stop > start else 0)
            return b
        try:
            i = index
        except (TypeError, OverflowError):
            if isinstance(index, tuple):
                raise TypeError("RecvView: invalid slice key") from None
            raise TypeError(f"RecvView indices must be integers or slices, "
                            f"not {type(index).__name__}") from None
        with cython.critical_section(self):
            self._check()
            n = self._len
            if i < 0:
                i += n
            if 0 <= i < n:
                v = <unsigned char>self._ptr[i]
            else:
                v = None
        if v is None:
            raise IndexError("index out of bounds on dimension 1")
        return v

    def __setitem__(self, index, value):
        raise TypeError("cannot modify read-only memory")

    def __iter__(self):
        return iter(self._to_bytes())

    def __eq__(self, other):
        if other is self:
            return True              # as a memoryview, released or not
        if type(other) is RecvView:
            try:
                return self._to_bytes() == (<RecvView>other)._to_bytes()
            except ValueError:
                return False
        if not PyObject_CheckBuffer(other):
            return NotImplemented
        try:
            mine = self._to_bytes()
        except ValueError:
            return False
        return memoryview(other) == mine

    def __ne__(self, other):
        r = self.__eq__(other)
        return r if r is NotImplemented else not r

    def __hash__(self):
        return hash(self._to_bytes())

    def __repr__(self):
        with cython.critical_section(self):
            released = self._state == RV_RELEASED
            n = self._len
        if released:
            return "<released iocpnet.RecvView>"
        return f"<iocpnet.RecvView {n} byte{'' if n == 1 else 's'}>"

    def __sizeof__(self):
        with cython.critical_section(self):
            owned = self._len if self._state == RV_OWNED or self._state == RV_DETACHED else 0
        return object.__sizeof__(self) + owned

    @property
    def obj(self):
        """The object exporting the bytes: the view itself."""
        with cython.critical_section(self):
            self._check()
        return self

    @property
    def nbytes(self):
        return len(self)

    @property
    def readonly(self):
        with cython.critical_section(self):
            self._check()
        return True

    @property
    def format(self):
        with cython.critical_section(self):
            self._check()
        return "B"

    @property
    def itemsize(self):
        with cython.critical_section(self):
            self._check()
        return 1

    @property
    def ndim(self):
        with cython.critical_section(self):
            self._check()
        return 1

    @property
    def shape(self):
        return (len(self),)

    @property
    def strides(self):
        with cython.critical_section(self):
            self._check()
        return (1,)

    @property
    def suboffsets(self):
        with cython.critical_section(self):
            self._check()
        return ()

    @property
    def c_contiguous(self):
        with cython.critical_section(self):
            self._check()
        return True

    @property
    def f_contiguous(self):
        return self.c_contiguous

    @property
    def contiguous(self):
        return self.c_contiguous

    @property
    def released(self):
        with cython.critical_section(self):
            released = self._state == RV_RELEASED
        return released


cdef inline PyObject *_spare_view() noexcept:
    """This thread's spare view for OnRecv (see _view_after_hook), its reference now the
    caller's, or NULL: the caller makes one then (which may fail: only that path needs a
    try block).  Taken out of the slot for the hook's time: a Dispatch nested in the
    hook cannot lend it again.  A PyObject *: no reference counting on the way."""
    return _view_take()


cdef inline void _view_lend(RecvView view, char *ptr, Py_ssize_t n) noexcept:
    """Point `view` at ptr[0:n] for the length of a hook."""
    view._ptr = ptr
    view._len = n
    view._state = RV_BORROWED


cdef inline void _view_after_hook(PyObject *view) noexcept:
    """The hook returned and nobody else holds `view` (the caller's reference is its
    only one, and it passes here): it becomes this thread's spare if the thread has
    none, else it goes."""
    (<RecvView>view)._state = RV_RELEASED
    (<RecvView>view)._ptr = _rv_empty
    (<RecvView>view)._len = 0
    (<RecvView>view)._exports = 0
    if _view_slot_free():
        _view_put(view)
    else:
        _decref(view)


cdef inline void _drop_spare_view() noexcept:
    """Dispatch returns (or a worker's loop ends): free this thread's spare view."""
    cdef PyObject *spare = _view_take()
    if spare != NULL:
        _decref(spare)
