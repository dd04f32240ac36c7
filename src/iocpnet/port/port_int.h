/*
 * port_int.h -- what the backends share: the port's common head, the backend table,
 * strands, and the few synchronisation primitives the layer needs.
 *
 * Atomics and locks live in port_sync.h (the Cython core uses them too).
 */
#ifndef IOCPNET_PORT_INT_H
#define IOCPNET_PORT_INT_H

#include "port.h"

#include <string.h>

#include "port_sync.h"

#define PORT_UNUSED(x) ((void)(x))
#define PORT_STATIC_ASSERT(cond, name) typedef char port__static_assert_##name[(cond) ? 1 : -1]

/* ---- the port's common head and the backend table ----------------------------------- */

typedef struct port_vtable {
    const char *name;
    int (*probe)(char *errbuf, size_t errlen);
    int (*create)(port_t **out, const port_options_t *opts, char *errbuf, size_t errlen);
    void (*shutdown)(port_t *p);
    void (*destroy)(port_t *p);
    int (*wait)(port_t *p, port_cqe_t *out, int max, int timeout_ms);
    void (*batch_end)(port_t *p);
    int (*accept)(port_t *p, port_op_t *op, port_sock_t listener);
    int (*connect)(port_t *p, port_op_t *op, const port_addr_t *addr);
    int (*recv)(port_t *p, port_op_t *op, port_sock_t sock);
    /* Give buffer buf_id back to the pool; with `fresh`, that memory takes its place (the
     * caller kept the old memory: port_recv_detach). */
    void (*recv_release)(port_t *p, uint32_t buf_id, char *fresh);
    int (*send)(port_t *p, port_op_t *op, port_sock_t sock, const port_buf_t *bufs, int n);
    int (*close)(port_t *p, port_op_t *op, port_sock_t sock, int flags);
    int (*cancel)(port_t *p, port_op_t *target);
    int (*post)(port_t *p, port_op_t *op, int64_t value);
    int (*timer)(port_t *p, port_op_t *op, uint64_t ms);
    int (*listen)(port_t *p, const port_addr_t *addr, int backlog, int flags, port_sock_t *out);
    int (*sock_close)(port_t *p, port_sock_t s, int flags);
    /* Optional (NULL: port_send_now sends nothing, port_flush_sends does nothing). */
    int64_t (*send_now)(port_t *p, port_sock_t sock, const port_buf_t *bufs, int n);
    void (*flush_sends)(port_t *p);
} port_vtable_t;

struct port {
    const port_vtable_t *vt;
    volatile int32_t closed;
    volatile int64_t submitted;
    volatile int64_t completed;
    volatile int64_t waits;
    volatile int64_t recv_buffers;
    volatile int64_t recv_buffers_out;
    volatile int64_t recv_buffers_detached;
    volatile int64_t recv_waiting;
    port_options_t opts;
};

void port__init_common(port_t *p, const port_vtable_t *vt, const port_options_t *opts);

/* Bookkeeping every backend does at the same two points. */
static inline void port__submitted(port_t *p, port_op_t *op) {
    op->in_flight = 1;
    port_atomic_add64(&p->submitted, 1);
}
static inline void port__completed(port_t *p, port_op_t *op) {
    op->in_flight = 0;
    port_atomic_add64(&p->completed, 1);
}

/* Put completion *c into the caller's batch out[n] (returns n + 1), or queue it on its
 * op's strand when another batch holds that strand (returns n).  `token` identifies the
 * batch being filled; call this in completion order, under whatever lock makes that
 * order (the CQ lock for io_uring, the descriptor's lock for epoll). */
int port__deliver(port_t *p, void *token, port_cqe_t *out, int n, const port_cqe_t *c);

/* Memory of receive buffers: plain heap blocks, so that one the caller keeps
 * (port_recv_detach) outlives the port and is freed with port_buf_free. */
char *port__buf_alloc(size_t size);

/* Errors */
void port__set_err(char *errbuf, size_t errlen, const char *fmt, ...);

/* POSIX socket helpers shared by the Linux backends (posix_sock.c). */
#ifndef _WIN32
int port__posix_listen_socket(const port_addr_t *addr, int backlog, int flags, int *out);
int port__posix_close(int fd, int flags);
/* One non-blocking sendmsg: bytes sent, 0 if the socket is full, or a PORT_E* error. */
int64_t port__posix_send_now(int fd, const port_buf_t *bufs, int nbufs);
#endif

/* Windows socket helpers shared with the IOCP backend (win_sock.c). */
#ifdef _WIN32
#  include <mswsock.h>
int port__win_init(void);                       /* WSAStartup and extension functions, once */
LPFN_ACCEPTEX port__win_acceptex(int family);
LPFN_CONNECTEX port__win_connectex(int family);
int port__win_status(LONG ntstatus);            /* a completed I/O's status -> PORT_E* */
SOCKET port__win_socket(int family);            /* overlapped, not inherited */
int port__win_nonblock(SOCKET s);
int port__win_listen_socket(const port_addr_t *addr, int backlog, int flags, SOCKET *out);
int port__win_close(SOCKET s, int flags);
#endif

/* Backends compiled into this build (common.c lists them). */
extern const port_vtable_t port__io_uring_vtable;
extern const port_vtable_t port__epoll_vtable;
extern const port_vtable_t port__iocp_vtable;

#endif /* IOCPNET_PORT_INT_H */
