# The C port layer, declared once for the Cython core (see port/port.h for the contract).
from libc.stdint cimport int32_t, int64_t, uint8_t, uint16_t, uint32_t, uint64_t


cdef extern from "port/port.h" nogil:
    ctypedef int port_sock_t    # SOCKET (an unsigned pointer-sized int) on Windows
    port_sock_t PORT_INVALID_SOCK

    enum:
        PORT_OK
        PORT_ECLOSED
        PORT_ECANCELED
        PORT_ECONNRESET
        PORT_EMFILE
        PORT_ENFILE
        PORT_ENOBUFS
        PORT_ENOMEM
        PORT_EINVAL
        PORT_EUNAVAIL
        PORT_EINTR
        PORT_ECONNABORTED
        PORT_EOPNOTSUPP

    const char *port_strerror(int err)
    const char *port_errname(int err)

    ctypedef struct port_t:
        pass

    ctypedef enum port_op_type:
        PORT_OP_NONE
        PORT_OP_ACCEPT
        PORT_OP_CONNECT
        PORT_OP_RECV
        PORT_OP_SEND
        PORT_OP_CLOSE
        PORT_OP_POST
        PORT_OP_TIMER

    ctypedef struct port_strand_t:
        void *owner

    ctypedef struct port_op_t:
        void *owner
        port_strand_t *strand
        port_sock_t sock
        uint8_t type
        uint8_t in_flight
        uint16_t user_flags

    ctypedef struct port_buf_t:
        const char *base
        size_t len

    struct sockaddr_storage:
        pass

    ctypedef struct port_addr_t:
        sockaddr_storage ss
        int len

    enum:
        PORT_CQE_MORE
        PORT_CQE_BUFFER

    ctypedef struct port_cqe_t:
        port_op_t *op
        int64_t res
        uint32_t flags
        uint32_t buf_id
        char *buf

    ctypedef struct port_options_t:
        uint32_t recv_buffer_size
        uint32_t recv_buffer_count
        uint32_t queue_depth
        uint32_t flags
        uint32_t recv_pool_window_ms
    enum:
        PORT_OPT_RECV_MULTISHOT

    ctypedef struct port_stats_t:
        uint64_t submitted
        uint64_t completed
        int64_t in_flight
        uint64_t waits
        uint64_t recv_buffers
        uint64_t recv_buffers_out
        uint64_t recv_buffers_detached
        uint64_t recv_waiting
        uint64_t recv_buffers_trimmed
        uint64_t recv_buffers_peak

    int port_create(port_t **out, const char *backend, const port_options_t *opts,
                    char *errbuf, size_t errlen)
    int port_backend_probe(const char *backend, char *errbuf, size_t errlen)
    const char *const *port_backends()
    const char *port_backend(const port_t *p)
    void port_shutdown(port_t *p)
    void port_destroy(port_t *p)
    void port_forsake(port_t *p)
    int port_wait(port_t *p, port_cqe_t *out, int max, int timeout_ms)
    void port_batch_end(port_t *p)
    int port_single_dispatcher(port_t *p)
    int port_strand_next(port_t *p, port_strand_t *s, port_cqe_t *out)
    int port_strand_yield(port_t *p, port_strand_t *s, const port_cqe_t *c)
    bint port_strand_wakeup(const port_cqe_t *c)
    void port_strand_init(port_strand_t *s, void *owner)
    int port_strand_claim(port_strand_t *s)
    void port_strand_discard(port_t *p, port_strand_t *s)
    void port_get_stats(port_t *p, port_stats_t *out)
    uint32_t port_recv_buffer_size(const port_t *p)

    void port_op_init(port_op_t *op, port_op_type type, void *owner, port_strand_t *strand)
    int port_accept(port_t *p, port_op_t *op, port_sock_t listener)
    int port_accept_multishot(port_t *p, port_op_t *op, port_sock_t listener)
    int port_connect(port_t *p, port_op_t *op, const port_addr_t *addr)
    int port_recv(port_t *p, port_op_t *op, port_sock_t sock)
    void port_recv_release(port_t *p, const port_cqe_t *cqe)
    int port_recv_detach(port_t *p, const port_cqe_t *cqe)
    void port_buf_free(void *buf)
    int64_t port_recv_pool_trim(port_t *p)
    int64_t port_recv_pool_grew(port_t *p)
    int port_send(port_t *p, port_op_t *op, port_sock_t sock, const port_buf_t *bufs, int nbufs)
    int64_t port_send_now(port_t *p, port_sock_t sock, const port_buf_t *bufs, int nbufs)
    void port_flush_sends(port_t *p)
    int port_work_waiting(port_t *p)
    enum:
        PORT_CLOSE_RESET
    int port_close(port_t *p, port_op_t *op, port_sock_t sock, int flags)
    int port_cancel(port_t *p, port_op_t *target)
    int port_stop_accepts(port_t *p, port_op_t *ops, int n, port_sock_t s)
    int port_post(port_t *p, port_op_t *op, int64_t value)
    int port_timer(port_t *p, port_op_t *op, uint64_t ms)

    int port_resolve(const char *host, int portnum, int passive, port_addr_t *out)
    enum:
        PORT_LISTEN_REUSEPORT
        PORT_LISTEN_V6ONLY
    int port_listen(port_t *p, const port_addr_t *addr, int backlog, int flags, port_sock_t *out)
    int port_sockname(port_sock_t s, port_addr_t *out)
    int port_peername(port_sock_t s, port_addr_t *out)
    int port_accept_peer(port_t *p, const port_op_t *op, port_addr_t *out)
    int port_addr_format(const port_addr_t *addr, char *host, size_t hostlen, int *portnum)
    int port_set_nodelay(port_sock_t s, int on)
    int port_sock_send_progress(port_sock_t s, uint64_t *mark)
    int64_t port_sock_drain(port_sock_t s)
    int port_sock_close(port_t *p, port_sock_t s, int flags)


cdef extern from "port/port_sync.h" nogil:
    int32_t port_atomic_load32(volatile int32_t *p)
    void port_atomic_store32(volatile int32_t *p, int32_t v)
    int32_t port_atomic_add32(volatile int32_t *p, int32_t v)
    int32_t port_atomic_xchg32(volatile int32_t *p, int32_t v)
    bint port_atomic_cas32(volatile int32_t *p, int32_t expect, int32_t v)
    int64_t port_atomic_add64(volatile int64_t *p, int64_t v)
    int64_t port_atomic_load64(volatile int64_t *p)
    void port_spin_lock(volatile int32_t *l)
    void port_thread_yield()
    void port_spin_unlock(volatile int32_t *l)
    int64_t port_monotonic_ms()
