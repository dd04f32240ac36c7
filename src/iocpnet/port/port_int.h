/*
 * port_int.h -- what the backends share: the port's common head, the backend table,
 * delivery into a batch, and the helpers every backend calls.  Private to the port
 * layer (the Cython core includes port.h and port_sync.h only).
 *
 * The layout, as libuv's src/ and src/unix/:
 *   port.h          the public API (one for every backend)
 *   port_int.h      this file
 *   port_sync.h     atomics and locks (shared with the Cython core)
 *   common.c        backend choice, the public calls and their checks, error names
 *   strand.c        strands (the strand's state is private to it)
 *   bufpool.c/.h    receive buffers: the epoll/IOCP pool, the wait queue all three share
 *   timer_heap.h    the timer heap of the backends that keep their own (epoll, IOCP)
 *   addr.c          name resolution and address text (POSIX and Windows)
 *   posix_sock.c    POSIX sockets: errno map, listen, close, sendmsg (io_uring, epoll)
 *   win_sock.c      Winsock: error maps, start-up, AcceptEx/ConnectEx, listen, close
 *   io_uring.c      the io_uring backend's hot path; io_uring_setup.c making the ring and
 *                   probing the kernel; io_uring_bufs.c its provided receive buffers;
 *                   io_uring_int.h what the three share
 *   epoll.c         the epoll backend's reactor; epoll_ops.c its descriptor table and
 *                   submissions; epoll_int.h what the two share
 *   iocp.c          the IOCP backend (with win_sock.c, bufpool.c, timer_heap.h)
 * Each backend file holds only its backend's model; what two backends need is here or
 * in a file of its own.
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
/* The record of type `type` whose member `member` is at ptr. */
#define PORT_CONTAINER_OF(ptr, type, member) \
    ((type *)(void *)((char *)(ptr) - offsetof(type, member)))

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
    /* Optional (NULL: port_accept_peer says PORT_EOPNOTSUPP). */
    int (*accept_peer)(const port_op_t *op, port_addr_t *out);
    /* Optional (NULL: port_stop_accepts cancels each op): end every accept on
     * listener s at once, each op's cancel flag already set. */
    int (*stop_listener)(port_t *p, port_sock_t s);
    /* Optional (NULL: port_work_waiting says 0). */
    int (*work_waiting)(port_t *p);
    /* Optional (NULL: recv_buffers_out is counted, an atomic add per buffer lent and
     * per buffer given back): the buffers lent out, worked out from what the backend
     * counts anyway. */
    uint64_t (*buffers_out)(port_t *p);
    /* Optional (NULL: port_accept_multishot says PORT_EOPNOTSUPP, or when it returns
     * that: nothing submitted). */
    int (*accept_multishot)(port_t *p, port_op_t *op, port_sock_t listener);
    /* Optional (NULL: the pool never shrinks): give back free receive buffers until the
     * pool holds `keep` (port_recv_pool_trim).  Returns how many it gave back now;
     * *more set when some could not go yet (io_uring: on their way back). */
    int64_t (*pool_trim)(port_t *p, int64_t keep, int *more);
} port_vtable_t;

#ifndef _WIN32
/* Where a POSIX accept op has the kernel write the peer's address (io_uring's
 * IORING_OP_ACCEPT, epoll's accept4), inside the op's private state: a TCP peer's
 * address is at most a sockaddr_in6.  len is what the kernel reported (it may exceed
 * sizeof(sa) for a longer address, which it then cut: not kept). */
typedef struct port__peer {
    struct sockaddr_in6 sa;
    uint32_t len;
} port__peer_t;

static inline int port__peer_get(const port__peer_t *pa, port_addr_t *out) {
    if (pa->len == 0 || pa->len > sizeof(pa->sa))
        return PORT_EOPNOTSUPP;
    memcpy(&out->ss, &pa->sa, pa->len);
    out->len = (int)pa->len;
    return 0;
}
#endif

struct port {
    const port_vtable_t *vt;
    const port_vtable_t *own;   /* the backend's table, kept when port_forsake swaps vt */
    volatile int32_t closed;
    volatile int64_t submitted;
    volatile int64_t completed;
    volatile int64_t waits;
    volatile int64_t recv_buffers;
    volatile int64_t recv_buffers_out;
    volatile int64_t recv_buffers_detached;
    volatile int64_t recv_waiting;
    /* The receive pool's window (port_recv_pool_trim). */
    volatile int64_t recv_buffers_trimmed;
    volatile int64_t pool_peak;        /* most buffers lent at once in this window */
    volatile int64_t pool_peak_prev;   /* ... in the window before it */
    int64_t pool_window_end;           /* ms; the trimmer's (one caller at a time) */
    volatile int32_t pool_grew;        /* grew above its floor, nobody trimming */
    volatile int32_t pool_trimming;    /* a trimmer runs (port_recv_pool_grew said 1) */
    port_options_t opts;
};

/* The pool keeps the window's peak of buffers lent plus this margin (a quarter more,
 * at least PORT_POOL_FLOOR), and never fewer than PORT_POOL_FLOOR. */
#define PORT_POOL_FLOOR 8
static inline int64_t port__pool_keep(int64_t peak) {
    int64_t margin = peak / 4 > PORT_POOL_FLOOR ? peak / 4 : PORT_POOL_FLOOR;
    return peak + margin;
}

/* What the pool keeps now: the last one or two windows' peak plus the margin. */
static inline int64_t port__pool_keep_now(port_t *p) {
    int64_t a = port_atomic_load64(&p->pool_peak), b = port_atomic_load64(&p->pool_peak_prev);
    return port__pool_keep(a > b ? a : b);
}

/* `out` buffers are lent now: the window's peak (a compare on the hot path; the
 * exchange only while the peak climbs). */
static inline void port__pool_note_out(port_t *p, int64_t out) {
#if defined(_MSC_VER)
    int64_t peak = port_atomic_load64(&p->pool_peak);
    while (out > peak) {
        int64_t seen = _InterlockedCompareExchange64((volatile __int64 *)&p->pool_peak,
                                                     out, peak);
        if (seen == peak)
            break;
        peak = seen;
    }
#else
    int64_t peak = __atomic_load_n(&p->pool_peak, __ATOMIC_RELAXED);
    while (out > peak && !__atomic_compare_exchange_n(&p->pool_peak, &peak, out, 1,
                                                      __ATOMIC_RELAXED, __ATOMIC_RELAXED))
        ;
#endif
}

/* The pool made n blocks, each because every one it held was lent (or, io_uring, taken
 * by a completion not reaped yet): that many were needed at once, a peak the reap
 * pass's count would miss.  Once it holds more than its floor, someone must trim it. */
static inline void port__pool_made(port_t *p, int64_t n) {
    int64_t held = port_atomic_add64(&p->recv_buffers, n);
    port__pool_note_out(p, held);
    if (held > PORT_POOL_FLOOR && !port_atomic_load32(&p->pool_trimming) &&
        !port_atomic_load32(&p->pool_grew))
        port_atomic_store32(&p->pool_grew, 1);
}

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
/* 1 when nobody holds the strand and nothing waits on it (the contract test's check). */
int port__strand_idle(const port_strand_t *s);

/* Count op's final completion and put it (result res, no buffer) into the batch. */
static inline int port__deliver_final(port_t *p, port_cqe_t *out, int n, port_op_t *op,
                                      int64_t res) {
    port_cqe_t c;
    c.op = op;
    c.res = res;
    c.flags = 0;
    c.buf_id = 0;
    c.buf = NULL;
    port__completed(p, op);
    return port__deliver(p, out, out, n, &c);
}

/* What port_wait returns after its loop: the batch, else PORT_ECLOSED once the port is
 * shut down, else the error that ended the wait (0: timed out). */
static inline int port__wait_result(port_t *p, int n, int err) {
    if (n > 0)
        return n;
    if (port_atomic_load32(&p->closed))
        return PORT_ECLOSED;
    return err;
}

/* Memory of receive buffers (bufpool.c): plain heap blocks, so that one the caller keeps
 * (port_recv_detach) outlives the port and is freed with port_buf_free. */
char *port__buf_alloc(size_t size);
/* Free a pool block and give its memory back to the system (free() alone leaves it in
 * the allocator's heap). */
void port__buf_retire(char *buf, size_t size);

/* Errors */
void port__set_err(char *errbuf, size_t errlen, const char *fmt, ...);

/* POSIX socket helpers shared by the Linux backends (posix_sock.c). */
#ifndef _WIN32
#  include <errno.h>
#  include <sys/socket.h>
#  include <sys/syscall.h>
#  include <sys/types.h>
#  include <time.h>
#  include <unistd.h>
int port__posix_listen_socket(const port_addr_t *addr, int backlog, int flags, int *out);
int port__posix_close(int fd, int flags);
/* The per-message socket calls, as the system calls themselves.  glibc's send, recv,
 * sendmsg and recvmsg are thread-cancellation points: in a process with threads (every
 * Python one) each call switches asynchronous cancellation on and off around the system
 * call (callgrind, epoll echo: 88 user-space instructions per message in those wrappers,
 * 28 through syscall(2), of about 1,700).  Nothing here is ever cancelled (pthread_cancel
 * would skip the interpreter's cleanup anyway), so Linux calls the kernel directly.  Same
 * results as the libc calls: the count, or -1 with errno set.  Sanitizer builds keep the
 * libc calls, which ASan checks the buffers of and TSan orders threads by. */
#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
#  define PORT_LIBC_SOCKET_CALLS 1
#elif defined(__has_feature)
#  if __has_feature(address_sanitizer) || __has_feature(thread_sanitizer)
#    define PORT_LIBC_SOCKET_CALLS 1
#  endif
#endif
#if defined(__linux__) && !defined(PORT_LIBC_SOCKET_CALLS) && defined(SYS_sendto) && \
    defined(SYS_recvfrom) && defined(SYS_sendmsg) && defined(SYS_recvmsg)
#  define port__sys_send(fd, buf, len, flags) \
    ((ssize_t)syscall(SYS_sendto, (fd), (buf), (len), (flags), NULL, 0))
#  define port__sys_recv(fd, buf, len, flags) \
    ((ssize_t)syscall(SYS_recvfrom, (fd), (buf), (len), (flags), NULL, NULL))
#  define port__sys_sendmsg(fd, m, flags) ((ssize_t)syscall(SYS_sendmsg, (fd), (m), (flags)))
#  define port__sys_recvmsg(fd, m, flags) ((ssize_t)syscall(SYS_recvmsg, (fd), (m), (flags)))
#else
#  define port__sys_send send
#  define port__sys_recv recv
#  define port__sys_sendmsg sendmsg
#  define port__sys_recvmsg recvmsg
#endif
/* send(2) of one buffer as the instruction itself on x86-64 (as liburing's nolibc
 * build does): no call through syscall(2), and the error comes back as -errno, without
 * errno.  Elsewhere, and in sanitizer builds, port__sys_send. */
#if defined(__linux__) && defined(__x86_64__) && !defined(PORT_LIBC_SOCKET_CALLS) && \
    defined(SYS_sendto) && (defined(__GNUC__) || defined(__clang__))
#  define PORT_RAW_SEND 1
static inline long port__raw_send(int fd, const void *buf, size_t len, int flags) {
    long ret;
    register long r10 __asm__("r10") = (long)flags;
    register long r8 __asm__("r8") = 0;
    register long r9 __asm__("r9") = 0;
    __asm__ volatile("syscall"
                     : "=a"(ret)
                     : "0"((long)SYS_sendto), "D"((long)fd), "S"(buf), "d"(len), "r"(r10),
                       "r"(r8), "r"(r9)
                     : "rcx", "r11", "memory");
    return ret;
}
#endif
/* One non-blocking sendmsg of up to IOV_MAX buffers, retried on EINTR: sendmsg's own
 * result, errno set on failure. */
long port__posix_sendmsg(int fd, const port_buf_t *bufs, int nbufs);
/* port__posix_port_send_now's body, inlined into epoll's send_now too: with
 * PORT_RAW_SEND one buffer (a reply) goes from the port's entry straight to the
 * kernel, no call layers between. */
static inline int64_t port__posix_send_now_inline(int fd, const port_buf_t *bufs, int nbufs) {
    long r;
#ifdef PORT_RAW_SEND
    if (nbufs == 1) {
        do
            r = port__raw_send(fd, bufs[0].base, bufs[0].len, MSG_NOSIGNAL | MSG_DONTWAIT);
        while (r == -EINTR);
        if (r >= 0)
            return (int64_t)r;
        if (r == -EAGAIN || r == -EWOULDBLOCK || r == -ENOBUFS)
            return 0;
        return port_err_from_os((int)-r);
    }
#endif
    r = port__posix_sendmsg(fd, bufs, nbufs);
    if (r >= 0)
        return (int64_t)r;
    if (errno == EAGAIN || errno == EWOULDBLOCK || errno == ENOBUFS)
        return 0;
    return port_err_from_os(errno);
}
/* port_send_now on a plain descriptor (io_uring's send_now): bytes sent, 0 if the
 * socket is full, or a PORT_E* error. */
int64_t port__posix_port_send_now(port_t *p, port_sock_t sock, const port_buf_t *bufs,
                                  int nbufs);
/* CLOCK_MONOTONIC in nanoseconds (deadlines of waits and timers). */
static inline int64_t port__now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}
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
/* port_single_dispatcher on an io_uring port (io_uring_setup.c). */
int port__uring_single_dispatcher(port_t *p);

#endif /* IOCPNET_PORT_INT_H */
