/*
 * port.h -- iocpnet's completion port: one portable API, one file per backend.
 *
 * The model is Windows IOCP, as in the C++ "ServerCore" this project follows:
 *
 *   - The caller owns every operation record (port_op_t), usually embedded in the object
 *     that owns the operation (a Session embeds its recv, send and close operations; a
 *     Listener owns one accept operation per posted accept). `op->owner` is an opaque
 *     pointer for the caller; this layer never looks at it (it never touches Python).
 *   - A submission (port_accept, port_recv, port_send, ...) that returns 0 produces exactly
 *     one *final* completion later, whatever happens: success, error, cancellation. Errors
 *     found while submitting are reported through that completion too, so the caller has a
 *     single place to handle them. A submission that returns a negative error produced
 *     nothing (the port is closed, or the arguments are invalid).
 *   - A receive completes once, like a WSARecv: with data (res > 0), at the peer's
 *     close (res == 0), or with an error; the caller posts the next receive when it has
 *     dealt with this one.  So the port never reads ahead of the application by more
 *     than one buffer per connection, and a session applies backpressure to a peer that
 *     sends faster than it reads simply by not posting.  (Receives can be kept armed,
 *     PORT_OPT_RECV_MULTISHOT: completions then carry PORT_CQE_MORE while the receive
 *     stays armed, until a final one without it, which may carry data: io_uring and
 *     epoll end each arming after a bounded amount of data, or once one of its
 *     completions had to wait behind a busy strand, and the caller posts the next.
 *     io_uring ends the latter with a final PORT_ECANCELED nobody asked for: the
 *     caller posts the next receive after it as after any other final completion.)
 *     Data lives in a buffer owned by the port (io_uring's provided-buffer ring, or the
 *     epoll/IOCP backends' pool), so an idle connection pins no receive buffer; the
 *     caller hands each buffer back with port_recv_release() once it has consumed or
 *     copied it.
 *   - port_wait() returns a *batch* of completions. Several threads may wait on one port
 *     at once; any thread may submit at any time.
 *   - Completions of operations that share a strand (port_strand_t, one per session) are
 *     handed out one at a time and in the order they completed: if a completion arrives
 *     for a strand another thread is working through, it is queued on the strand and the
 *     thread holding the strand picks it up with port_strand_next(). This is what lets
 *     several worker threads dispatch while each session sees its events in order.
 *     A holder that has taken enough from the queue hands the strand on with
 *     port_strand_yield() (a posted wake-up, continued by whichever thread reaps it), so
 *     that a strand kept busy by other threads does not hold up the rest of its batch.
 *   - Every function returns 0 (or a count, or a socket) on success and a negative
 *     PORT_E* code on failure; completion results use the same codes.
 *
 * Descriptors.  No operation ever reaches a socket after it was closed: port_close and
 * port_sock_close are ordered after every operation submitted on the socket before them
 * (a backend that defers submissions hands those to the kernel first, or orders the
 * close behind them), so the number the OS may hand to a new socket as soon as the
 * close is done never receives an old operation's bytes, and an old receive never reads
 * a new connection's.  The caller's part: cancel what is in flight on the socket, then
 * close it, and submit nothing on it afterwards.
 *
 * Receive buffers.  Each PORT_CQE_BUFFER completion lends the caller one buffer of the
 * port's pool; exactly one of port_recv_release (give it back) or port_recv_detach (keep
 * its memory for good, the pool makes another) ends the loan.  When every buffer is out,
 * receives with data wait, and each buffer given back serves one of them, oldest first.
 *
 * Backends: io_uring (Linux, default), epoll (Linux fallback, completions emulated the
 * way a reactor does: try now, park until ready, complete), IOCP (Windows).
 */
#ifndef IOCPNET_PORT_H
#define IOCPNET_PORT_H

#include <stddef.h>
#include <stdint.h>

#ifdef _WIN32
#  ifndef WIN32_LEAN_AND_MEAN
#    define WIN32_LEAN_AND_MEAN
#  endif
#  include <winsock2.h>
#  include <ws2tcpip.h>
#  include <windows.h>
typedef SOCKET port_sock_t;
#  define PORT_INVALID_SOCK INVALID_SOCKET
#else
#  include <sys/socket.h>
#  include <netinet/in.h>
typedef int port_sock_t;
#  define PORT_INVALID_SOCK (-1)
#endif

#ifdef __cplusplus
extern "C" {
#endif

/* ------------------------------------------------------------------------------------ */
/* Errors: one map, shared by every backend.  The name is the POSIX errno name where one
 * exists, so the Python layer can turn a code into the right OSError subclass.          */

#define PORT_ERRNO_MAP(XX)                                                          \
    XX(-1, ECLOSED, "completion port is closed")                                    \
    XX(-2, ECANCELED, "operation canceled")                                         \
    XX(-3, ECONNRESET, "connection reset by peer")                                  \
    XX(-4, ECONNREFUSED, "connection refused")                                      \
    XX(-5, ECONNABORTED, "connection aborted")                                      \
    XX(-6, ETIMEDOUT, "connection timed out")                                       \
    XX(-7, EPIPE, "broken pipe")                                                    \
    XX(-8, ENOTCONN, "socket is not connected")                                     \
    XX(-9, ENETUNREACH, "network is unreachable")                                   \
    XX(-10, EHOSTUNREACH, "no route to host")                                       \
    XX(-11, ENETDOWN, "network is down")                                            \
    XX(-12, EADDRINUSE, "address already in use")                                   \
    XX(-13, EADDRNOTAVAIL, "cannot assign requested address")                       \
    XX(-14, EAFNOSUPPORT, "address family not supported")                           \
    XX(-15, EMFILE, "too many open files")                                          \
    XX(-16, ENFILE, "too many open files in system")                                \
    XX(-17, ENOBUFS, "no buffer space available")                                   \
    XX(-18, ENOMEM, "out of memory")                                                \
    XX(-19, EINVAL, "invalid argument")                                             \
    XX(-20, EBADF, "bad socket")                                                    \
    XX(-21, EAGAIN, "resource temporarily unavailable")                             \
    XX(-22, EACCES, "permission denied")                                            \
    XX(-23, EPERM, "operation not permitted")                                       \
    XX(-24, ENOSYS, "function not implemented")                                     \
    XX(-25, EBUSY, "resource busy")                                                 \
    XX(-26, EIO, "input/output error")                                              \
    XX(-27, ENONAME, "name or service not known")                                   \
    XX(-28, EUNAVAIL, "backend not available on this system")                       \
    XX(-29, EINTR, "interrupted")                                                   \
    XX(-30, EMSGSIZE, "message too long")                                           \
    XX(-31, EOPNOTSUPP, "operation not supported")                                  \
    XX(-32, EUNKNOWN, "unknown error")                                              \
    XX(-33, EFAULT, "bad address")                                                  \
    XX(-34, EISCONN, "socket is already connected")                                 \
    XX(-35, EALREADY, "operation already in progress")                              \
    XX(-36, EINPROGRESS, "operation now in progress")                               \
    XX(-37, EDESTADDRREQ, "destination address required")                           \
    XX(-38, EPROTONOSUPPORT, "protocol not supported")                              \
    XX(-39, EPROTOTYPE, "protocol wrong type for socket")                           \
    XX(-40, ENOPROTOOPT, "protocol not available")

enum port_err {
    PORT_OK = 0,
#define PORT__ERR_ENUM(code, name, msg) PORT_##name = code,
    PORT_ERRNO_MAP(PORT__ERR_ENUM)
#undef PORT__ERR_ENUM
};

/* Message and errno-style name ("ECONNRESET") for a code; never NULL. */
const char *port_strerror(int err);
const char *port_errname(int err);
/* The portable code for an OS error number (errno on POSIX, WSA/Win32 codes on Windows). */
int port_err_from_os(int oserr);

/* ------------------------------------------------------------------------------------ */
/* Types                                                                                  */

typedef struct port port_t;
typedef struct port_op port_op_t;
typedef struct port_strand port_strand_t;

typedef enum port_op_type {
    PORT_OP_NONE = 0,
    PORT_OP_ACCEPT,
    PORT_OP_CONNECT,
    PORT_OP_RECV,
    PORT_OP_SEND,
    PORT_OP_CLOSE,
    PORT_OP_POST,
    PORT_OP_TIMER
} port_op_type;

/* One buffer of a gather send. */
typedef struct port_buf {
    const char *base;
    size_t len;
} port_buf_t;

/* A socket address of any family, as resolved or as reported by the OS. */
typedef struct port_addr {
    struct sockaddr_storage ss;
    int len;
} port_addr_t;

/* Room for what a backend keeps per operation while it is in flight (a msghdr for
 * io_uring's sendmsg, list links for epoll, AcceptEx's address buffer on Windows).  Each
 * backend checks at compile time that its state fits. */
#ifdef _WIN32
#  define PORT_OP_PRIV_WORDS 16
#else
#  define PORT_OP_PRIV_WORDS 9
#endif

struct port_op {
#ifdef _WIN32
    OVERLAPPED ov;          /* first member: the kernel hands back &op->ov */
#endif
    void *owner;            /* the caller's object; opaque to the port */
    port_strand_t *strand;  /* completions serialised through this strand, or NULL */
    port_sock_t sock;       /* the socket the operation runs on (connect: created here) */
    uint8_t type;           /* port_op_type */
    uint8_t in_flight;      /* 1 from a successful submission until its final completion */
    uint16_t user_flags;    /* free for the caller */
    volatile int32_t cancel_requested;  /* set by port_cancel; read by backends that re-arm */
    uint64_t priv[PORT_OP_PRIV_WORDS];   /* backend state; do not touch */
};

/* Completion flags. */
#define PORT_CQE_MORE   0x1u  /* the operation is still armed: more completions follow */
#define PORT_CQE_BUFFER 0x2u  /* buf/res hold received data: give it back with port_recv_release */

/* One completion, as returned by port_wait() and port_strand_next(). */
typedef struct port_cqe {
    port_op_t *op;
    int64_t res;            /* >= 0: bytes / new socket / posted value; < 0: PORT_E* */
    uint32_t flags;         /* PORT_CQE_* */
    uint32_t buf_id;        /* backend's id of the receive buffer (with PORT_CQE_BUFFER) */
    char *buf;              /* received bytes (with PORT_CQE_BUFFER), res of them */
} port_cqe_t;

/* Strand: serialises the completions of one owner across threads (see the top).  Embed
 * one per session; initialise before the first operation that uses it, and discard it
 * (port_strand_discard) when its owner ends.  Only `owner` is the caller's; the rest is
 * the port's (its layout is in strand.c, which checks at compile time that it fits
 * here).  The wake-up record is made at the strand's first yield and kept until the
 * discard: an idle session carries a pointer, not an operation (~100 bytes each). */
#define PORT_STRAND_PRIV_WORDS 4
struct port_strand {
    void *owner;                  /* the caller's object the strand belongs to; opaque */
    uint64_t priv[PORT_STRAND_PRIV_WORDS];   /* the port's; do not touch */
    port_op_t *wake;              /* the port's: the wake-up port_strand_yield posts, or
                                     NULL before the first yield */
};

typedef struct port_options {
    uint32_t recv_buffer_size;    /* bytes per receive buffer (default 16 KiB) */
    uint32_t recv_buffer_count;   /* most receive buffers the port may use (default 4096) */
    uint32_t queue_depth;         /* io_uring submission queue entries (default 4096) */
    uint32_t flags;               /* PORT_OPT_* */
    uint32_t recv_pool_window_ms; /* how long the pool keeps what a spike made (default
                                     5000; see port_recv_pool_trim) */
} port_options_t;

/* Keep receives armed instead of posting one per completion.  io_uring: multishot recv,
 * each arming ending after 4 buffers' worth of data (kernel 6.16+; one-shot receives on
 * older kernels) or when a completion of it waits behind a busy strand (a final
 * PORT_ECANCELED), so read-ahead stays bounded.  epoll: emulated, with the same bounds
 * (and at most 64 reads). */
#define PORT_OPT_RECV_MULTISHOT 0x1u

typedef struct port_stats {
    uint64_t submitted;           /* operations accepted by a submit call */
    uint64_t completed;           /* final completions reaped from the OS */
    int64_t in_flight;            /* submitted - completed */
    uint64_t waits;               /* port_wait calls that entered the kernel */
    uint64_t recv_buffers;        /* receive buffers the pool holds now (made, minus those
                                     given back by port_recv_pool_trim) */
    uint64_t recv_buffers_out;    /* receive buffers delivered and not yet released */
    uint64_t recv_buffers_detached; /* buffers the caller kept (port_recv_detach) so far */
    uint64_t recv_waiting;        /* receives with data waiting for a buffer now */
    uint64_t recv_buffers_trimmed;  /* buffers the pool gave back so far */
    uint64_t recv_buffers_peak;   /* most buffers lent at once in the last one or two
                                     windows: what the pool keeps, plus a margin */
} port_stats_t;

/* ------------------------------------------------------------------------------------ */
/* The port                                                                              */

/* Create a port.  backend: "io_uring", "epoll", "iocp" or NULL for the best available.
 * On failure returns a PORT_E* code and writes a human-readable reason into errbuf
 * (e.g. why io_uring cannot run here).  opts may be NULL for the defaults. */
int port_create(port_t **out, const char *backend, const port_options_t *opts,
                char *errbuf, size_t errlen);
/* 0 if `backend` can run on this machine, else a PORT_E* code and the reason. */
int port_backend_probe(const char *backend, char *errbuf, size_t errlen);
/* The backends this build contains, best first, NULL-terminated. */
const char *const *port_backends(void);
const char *port_backend(const port_t *p);

/* Wake every thread in port_wait; from then on port_wait returns PORT_ECLOSED and
 * submissions fail with PORT_ECLOSED.  Idempotent, any thread. */
void port_shutdown(port_t *p);
/* Free the port.  No thread may be inside any port call.  Operations still in flight are
 * abandoned (their completions never come); drain them first. */
void port_destroy(port_t *p);
/* In a child made by fork(): let go of a port inherited from the parent, without
 * touching anything the child shares with it (io_uring's rings and provided buffers,
 * the epoll set, the sockets' open files).  From then on port_wait and every submission
 * say PORT_ECLOSED, a receive buffer given back is forgotten, port_flush_sends does
 * nothing and port_sock_close only closes the child's descriptor; port_destroy frees the
 * child's copy of the memory.  Call it with no other thread in the port (after fork
 * there is none). */
void port_forsake(port_t *p);

/* Wait up to timeout_ms (-1: forever, 0: poll) for completions and return how many were
 * stored in out[0..max-1]: 0 on timeout, PORT_ECLOSED after port_shutdown, PORT_EINTR
 * when a signal interrupted the wait (the caller runs its signal handlers, then waits
 * again: this is how Ctrl-C reaches a thread blocked here).
 * Submissions made by this thread between two port_wait calls are flushed by the next
 * one, together with the wait (one system call per batch); port_batch_end() ends that
 * deferral early (the thread will not wait again soon). */
int port_wait(port_t *p, port_cqe_t *out, int max, int timeout_ms);
void port_batch_end(port_t *p);
/* The caller promises that from now on one thread only (the next to call port_wait
 * with timeout_ms -1; polls and timed waits from other threads may come before it)
 * dispatches this port, until it is shut down: io_uring then runs completion work in
 * that thread's waits, which costs less CPU per completion (io_uring.c, "One
 * dispatcher").  Other threads may still submit, close and poll (at a slower pace).
 * Only a port that has submitted nothing yet: 0, or PORT_EUNAVAIL (another backend, a
 * kernel before 6.1, a port already in use), when nothing changed. */
int port_single_dispatcher(port_t *p);
/* Hand this thread's deferred submissions to the kernel now if they include a send, so
 * that a reply written by one hook does not wait behind the next hooks of the batch.
 * Only this thread's own port_send can have been deferred: a caller that made none
 * since its last call may skip it (the core does, per completion). */
void port_flush_sends(port_t *p);
/* Would port_wait return a batch at once?  1 when completions, or completion work the
 * kernel keeps for this thread, are already waiting (a port_wait with timeout 0 then
 * takes them); 0 when not, or when the backend cannot tell cheaply.  No system call and
 * no lock: the core asks it before each wait, and then polls without handing the GIL
 * over and back (io_uring with one dispatcher only; 0 everywhere else). */
int port_work_waiting(port_t *p);
/* After dispatching a completion whose op has a strand: fetch the strand's next queued
 * completion into *out and return 1, or release the strand and return 0. */
int port_strand_next(port_t *p, port_strand_t *s, port_cqe_t *out);
/* Hand a busy strand on instead of dispatching *c, a completion port_strand_next just
 * handed out: c goes back to the head of the strand's queue, the strand is released, and
 * the strand's wake-up is posted as an ordinary completion.  Whichever thread reaps the
 * wake-up (port_strand_wakeup() is true for it; it has no operation of the caller's
 * behind it) holds the strand, and continues it with port_strand_next(), which hands
 * out c first: order is kept and only one thread is ever inside the strand.  So a
 * thread whose strand other threads keep busy goes back to the rest of its batch, and
 * the strand goes on on any thread (not only this one, which may be about to stop).
 * The wake-up is in flight like any post: drain it before port_destroy, and the strand
 * must outlive it.  Returns 0, or PORT_ECLOSED / PORT_ENOMEM / PORT_EINVAL (the strand
 * not held by a completion from port_strand_next) with nothing changed: the caller
 * still holds the strand and dispatches c itself. */
int port_strand_yield(port_t *p, port_strand_t *s, const port_cqe_t *c);
/* 1 when c is a strand's wake-up (see port_strand_yield), not a completion of the
 * caller's: call port_strand_next(c->op->strand) and dispatch what it hands out. */
static inline int port_strand_wakeup(const port_cqe_t *c) {
    /* Read by the strand's holder only (this completion's batch holds the strand), and
     * written only by a holder, under the strand's lock: no race. */
    return c->op->strand != NULL && c->op == c->op->strand->wake;
}
void port_strand_init(port_strand_t *s, void *owner);
/* Hold s as port_wait holds the strand of a completion it hands out, for an owner made
 * while another owner's completion is dispatched (the session of a multishot accept's
 * connection): completions of the operations it submits meanwhile wait on s until the
 * caller ends the hold with port_strand_next (as after a completion of s), which hands
 * them out in order.  Only a strand nobody holds and nothing waits on: 0, else
 * PORT_EBUSY with nothing changed. */
int port_strand_claim(port_strand_t *s);
/* The owner is being destroyed (no wake-up of its strand in flight): free completions
 * still queued on the strand, which will never be dispatched (receive buffers they hold
 * go back to the port; p may be NULL once the port is gone), and the strand's wake-up
 * record.  Call it for every strand initialised, or the record of one that yielded leaks. */
void port_strand_discard(port_t *p, port_strand_t *s);

void port_get_stats(port_t *p, port_stats_t *out);
/* Bytes per receive buffer (recv_buffer_size, or its default). */
uint32_t port_recv_buffer_size(const port_t *p);

/* ------------------------------------------------------------------------------------ */
/* Operations.  Each op record may be in flight once at a time.                          */

void port_op_init(port_op_t *op, port_op_type type, void *owner, port_strand_t *strand);

/* Accept one connection on a listening socket: res = the new socket (non-blocking,
 * close-on-exec, TCP_NODELAY, associated with this port).  The set-up costs no system
 * call of its own where the OS lets the socket inherit it from the listener (Linux),
 * and the peer's address comes with the accept (port_accept_peer). */
int port_accept(port_t *p, port_op_t *op, port_sock_t listener);
/* Keep accepting on a listening socket with one operation: each connection completes
 * op with res = its socket (set up as port_accept's) and PORT_CQE_MORE while op stays
 * armed, until a final completion without it: an error (out of descriptors: the caller
 * backs off before it arms op again), PORT_ECANCELED after port_cancel or
 * port_stop_accepts, or one last socket (res >= 0) that ended the arming (the caller
 * arms op again).  Completions of op may be handed to several threads at once: op has
 * no strand (port_op_init with NULL).  The peer's address does not come with it
 * (port_accept_peer says PORT_EOPNOTSUPP): ask port_peername.  Where the backend cannot
 * (epoll, IOCP, io_uring before 5.19): PORT_EOPNOTSUPP, nothing submitted; post
 * port_accept operations instead. */
int port_accept_multishot(port_t *p, port_op_t *op, port_sock_t listener);
/* After op's accept completed with a socket, and before op is submitted again: the
 * peer's address as the accept itself reported it (no system call, and known even when
 * the peer has already reset the connection, when port_peername says ENOTCONN).  0, or
 * PORT_EOPNOTSUPP where the backend does not keep it (IOCP; an address too long to
 * keep): then ask port_peername. */
int port_accept_peer(port_t *p, const port_op_t *op, port_addr_t *out);
/* Create a socket for addr's family, associate it, and connect: op->sock is set before
 * this returns (so the caller can close it); res = 0 once connected.  addr is copied. */
int port_connect(port_t *p, port_op_t *op, const port_addr_t *addr);
/* Post a receive (see the top).  A completion with res > 0 carries PORT_CQE_BUFFER;
 * res == 0 is the peer's orderly close; a peer's reset is PORT_ECONNRESET on every
 * backend (never 0). */
int port_recv(port_t *p, port_op_t *op, port_sock_t sock);
/* Give back the buffer of a receive completion.  Once per PORT_CQE_BUFFER (or detach). */
void port_recv_release(port_t *p, const port_cqe_t *cqe);
/* Keep the buffer of a receive completion instead of giving it back: from now on
 * cqe->buf (room for recv_buffer_size bytes) is the caller's, to free with
 * port_buf_free() from any thread, also after the port is destroyed; the pool puts a new
 * buffer in its place, so memory the caller keeps never drains the pool.  Returns 0, or
 * PORT_ENOMEM with nothing changed (the buffer is still lent: release it) or
 * PORT_EINVAL (no buffer in this completion). */
int port_recv_detach(port_t *p, const port_cqe_t *cqe);
void port_buf_free(void *buf);
/* The receive pool after a spike.  The pool grows with the buffers lent at once (a
 * spike of data in flight) and keeps them for recv_pool_window_ms after the last time
 * it needed them, so a steady load never loses a buffer; past that it gives back what
 * it holds above that need plus a margin (PORT_POOL_KEEP), down to a floor.  Call
 * port_recv_pool_trim from any thread once port_recv_pool_grew says 1, then again after
 * the milliseconds it returns, until it returns 0 (the pool is at its floor: it says
 * grew again when it next grows).  epoll / IOCP free pool blocks at once; io_uring
 * takes buffers back out of its provided-buffer ring through receives of its own (the
 * kernel may pick any buffer in the ring at any moment, so none is freed there). */
int64_t port_recv_pool_trim(port_t *p);
/* 0, or (once after the pool grew above its floor) the ms before the first trim. */
int64_t port_recv_pool_grew(port_t *p);
/* Send the buffers in order in one system call: res = bytes sent, which may be fewer than
 * asked (the caller continues from there).  bufs must stay valid until the completion. */
int port_send(port_t *p, port_op_t *op, port_sock_t sock, const port_buf_t *bufs, int nbufs);
/* Send what the socket takes now, outside any operation: returns the bytes sent (0 when
 * the socket is full, or when the backend cannot send outside an operation: IOCP), or a
 * negative PORT_E* error.  Nothing completes later.  This is how a reply leaves at once,
 * as a reactor writes it (one system call, no completion to dispatch); the caller queues
 * the rest and sends it with port_send.  The caller must have no port_send in flight on
 * sock (the bytes would overtake it) and keep sock open during the call. */
int64_t port_send_now(port_t *p, port_sock_t sock, const port_buf_t *bufs, int nbufs);
/* Close a socket (PORT_CLOSE_RESET: abortive, the peer sees a reset).  Cancel the
 * socket's pending operations with port_cancel first; they complete with
 * PORT_ECANCELED (or with their own result if they finished first).  The close is
 * ordered after every operation submitted on the socket before it (see "Descriptors"
 * at the top); it may be done only when the completion comes.  res = 0. */
#define PORT_CLOSE_RESET 0x1
int port_close(port_t *p, port_op_t *op, port_sock_t sock, int flags);
/* Ask for `target` to end early: it completes with PORT_ECANCELED, or with its own result
 * if it finished first.  Harmless if it is not in flight. */
int port_cancel(port_t *p, port_op_t *target);
/* A listener closing: port_cancel on each accept of ops[0..n) in flight on listener
 * `s`, at once where the backend can.  Afterwards s may accept nothing more: close it
 * (port_sock_close).  io_uring finds a cancel's target in a hash table of at most 256
 * buckets, so a cancel per accept costs n^2/256 lookups (100,000 accepts: 4.5 s); it
 * shuts the listener down instead, which ends every accept in one pass (0.6 s). */
int port_stop_accepts(port_t *p, port_op_t *ops, int n, port_sock_t s);
/* Queue a completion from any thread (PostQueuedCompletionStatus): res = value >= 0. */
int port_post(port_t *p, port_op_t *op, int64_t value);
/* Complete after ms milliseconds (res = 0), or with PORT_ECANCELED if cancelled. */
int port_timer(port_t *p, port_op_t *op, uint64_t ms);

/* ------------------------------------------------------------------------------------ */
/* Sockets: synchronous helpers                                                          */

/* Resolve host (numeric or a name; NULL or "" = any address when passive) and port. */
int port_resolve(const char *host, int portnum, int passive, port_addr_t *out);
#define PORT_LISTEN_REUSEPORT 0x1   /* several processes share the port */
#define PORT_LISTEN_V6ONLY    0x2   /* an IPv6 listener that does not take IPv4 */
/* Create, bind and listen; the socket is associated with the port. */
int port_listen(port_t *p, const port_addr_t *addr, int backlog, int flags,
                port_sock_t *out);
int port_sockname(port_sock_t s, port_addr_t *out);
int port_peername(port_sock_t s, port_addr_t *out);
/* host as text (an IPv4-mapped IPv6 address is shown as IPv4), and the port. */
int port_addr_format(const port_addr_t *addr, char *host, size_t hostlen, int *portnum);
int port_set_nodelay(port_sock_t s, int on);
/* A mark that changes whenever the peer acknowledges data sent on s, for telling a slow
 * reader from one that reads nothing (the kernel reports room in a send buffer only once
 * a good part of it has drained): Linux the bytes not yet acknowledged (SIOCOUTQ),
 * Windows 10 1703+ the bytes sent and acknowledged (SIO_TCP_INFO).  PORT_EOPNOTSUPP
 * where the system cannot tell. */
int port_sock_send_progress(port_sock_t s, uint64_t *mark);
/* Read and drop what s has received and nobody read (up to 256 KiB), without waiting:
 * before a graceful close, since a socket closed with unread input sends a reset, and
 * the peer's kernel then drops what it had not read yet of our last replies.  Returns
 * the bytes dropped or a negative PORT_E* code.  (A receive still in flight on s, being
 * cancelled, may take part of it: dropped too.) */
int64_t port_sock_drain(port_sock_t s);
/* Close a socket that has no operation in flight, or only cancelled ones (a listener,
 * one refused over a limit), without a completion: done when this returns, and ordered
 * after what was submitted on it before, as port_close is. */
int port_sock_close(port_t *p, port_sock_t s, int flags);

#ifdef __cplusplus
}
#endif
#endif /* IOCPNET_PORT_H */
