/*
 * common.c -- the part of the port that is the same for every backend: choosing a
 * backend, forwarding calls to it (after the checks every backend needs), error names,
 * the port's counters.  Strands are in strand.c, the receive-buffer pool in bufpool.c,
 * socket addresses in addr.c.
 */
#include "port_int.h"

#include <stdarg.h>
#include <stdio.h>

#if !defined(PORT_HAVE_IO_URING) && !defined(PORT_HAVE_EPOLL) && !defined(PORT_HAVE_IOCP)
#  if defined(__linux__)
#    define PORT_HAVE_IO_URING 1
#    define PORT_HAVE_EPOLL 1
#  elif defined(_WIN32)
#    define PORT_HAVE_IOCP 1
#  else
#    error "iocpnet: no completion-port backend for this platform"
#  endif
#endif

static const port_vtable_t *const backends[] = {
#ifdef PORT_HAVE_IO_URING
    &port__io_uring_vtable,
#endif
#ifdef PORT_HAVE_EPOLL
    &port__epoll_vtable,
#endif
#ifdef PORT_HAVE_IOCP
    &port__iocp_vtable,
#endif
    NULL,
};

static const char *const backend_names[] = {
#ifdef PORT_HAVE_IO_URING
    "io_uring",
#endif
#ifdef PORT_HAVE_EPOLL
    "epoll",
#endif
#ifdef PORT_HAVE_IOCP
    "iocp",
#endif
    NULL,
};

const char *const *port_backends(void) { return backend_names; }

/* ---- errors --------------------------------------------------------------------------- */

const char *port_strerror(int err) {
    switch (err) {
    case PORT_OK: return "success";
#define PORT__ERR_MSG(code, name, msg) case code: return msg;
    PORT_ERRNO_MAP(PORT__ERR_MSG)
#undef PORT__ERR_MSG
    }
    return "unknown error";
}

const char *port_errname(int err) {
    switch (err) {
    case PORT_OK: return "OK";
#define PORT__ERR_NAME(code, name, msg) case code: return #name;
    PORT_ERRNO_MAP(PORT__ERR_NAME)
#undef PORT__ERR_NAME
    }
    return "EUNKNOWN";
}

void port__set_err(char *errbuf, size_t errlen, const char *fmt, ...) {
    va_list ap;
    if (errbuf == NULL || errlen == 0)
        return;
    va_start(ap, fmt);
    vsnprintf(errbuf, errlen, fmt, ap);
    va_end(ap);
}

/* ---- the port ------------------------------------------------------------------------- */

static const port_vtable_t *find_backend(const char *name) {
    int i;
    for (i = 0; backends[i] != NULL; i++)
        if (strcmp(backends[i]->name, name) == 0)
            return backends[i];
    return NULL;
}

void port__init_common(port_t *p, const port_vtable_t *vt, const port_options_t *opts) {
    memset(p, 0, sizeof(*p));
    p->vt = p->own = vt;
    p->opts.recv_buffer_size = 16 * 1024;
    p->opts.recv_buffer_count = 4096;
    p->opts.queue_depth = 4096;
    p->opts.recv_pool_window_ms = 5000;
    if (opts != NULL) {
        if (opts->recv_pool_window_ms)
            p->opts.recv_pool_window_ms = opts->recv_pool_window_ms;
        if (opts->recv_buffer_size)
            p->opts.recv_buffer_size = opts->recv_buffer_size;
        if (opts->recv_buffer_count)
            p->opts.recv_buffer_count = opts->recv_buffer_count;
        if (opts->queue_depth)
            p->opts.queue_depth = opts->queue_depth;
        p->opts.flags = opts->flags;
    }
}

int port_backend_probe(const char *backend, char *errbuf, size_t errlen) {
    const port_vtable_t *vt = find_backend(backend);
    if (vt == NULL) {
        port__set_err(errbuf, errlen, "backend '%s' is not part of this build", backend);
        return PORT_EUNAVAIL;
    }
    return vt->probe(errbuf, errlen);
}

int port_create(port_t **out, const char *backend, const port_options_t *opts,
                char *errbuf, size_t errlen) {
    int i, rc = PORT_EUNAVAIL;
    *out = NULL;
    if (backend != NULL && backend[0] != '\0') {
        const port_vtable_t *vt = find_backend(backend);
        if (vt == NULL) {
            port__set_err(errbuf, errlen, "backend '%s' is not part of this build", backend);
            return PORT_EUNAVAIL;
        }
        return vt->create(out, opts, errbuf, errlen);
    }
    /* The best available: a backend that is merely unavailable here (blocked by seccomp,
     * disabled by sysctl, too old) gives way to the next; a real failure (out of memory)
     * is reported, not papered over. */
    for (i = 0; backends[i] != NULL; i++) {
        rc = backends[i]->create(out, opts, errbuf, errlen);
        if (rc != PORT_EUNAVAIL)
            return rc;
    }
    return rc;
}

const char *port_backend(const port_t *p) { return p->vt->name; }

void port_shutdown(port_t *p) { p->vt->shutdown(p); }
void port_destroy(port_t *p) {
    if (p != NULL)
        p->vt->destroy(p);
}

/* ---- a port inherited through fork() ---------------------------------------------------
 * fork() gives the child the parent's io_uring rings (shared memory: the child would reap
 * the parent's completions and hand its receive buffers back twice), its epoll set (an
 * EPOLL_CTL_DEL in the child unregisters the parent's socket) and the sockets' open files
 * (a shutdown(2) or SO_LINGER in the child ends the parent's connection).  A forsaken port
 * touches none of them: its table does nothing, or closes the child's descriptor only.
 * The checks in the calls below (closed) keep every submission from reaching it; its
 * entries say PORT_ECLOSED all the same. */

static void forsaken_nothing(port_t *p) { PORT_UNUSED(p); }
/* Unmapping and closing the child's copies, and freeing its memory, is what each
 * backend's destroy does: nothing there reaches the shared kernel objects. */
static void forsaken_destroy(port_t *p) { p->own->destroy(p); }
static int forsaken_wait(port_t *p, port_cqe_t *out, int max, int timeout_ms) {
    PORT_UNUSED(p); PORT_UNUSED(out); PORT_UNUSED(max); PORT_UNUSED(timeout_ms);
    return PORT_ECLOSED;
}
static int forsaken_op(port_t *p, port_op_t *op, port_sock_t s) {
    PORT_UNUSED(p); PORT_UNUSED(op); PORT_UNUSED(s);
    return PORT_ECLOSED;
}
static int forsaken_connect(port_t *p, port_op_t *op, const port_addr_t *addr) {
    PORT_UNUSED(p); PORT_UNUSED(op); PORT_UNUSED(addr);
    return PORT_ECLOSED;
}
/* A buffer handed back stays where it is (the parent owns the ring); `fresh` is never
 * given (port_recv_detach refuses first). */
static void forsaken_recv_release(port_t *p, uint32_t buf_id, char *fresh) {
    PORT_UNUSED(p); PORT_UNUSED(buf_id); PORT_UNUSED(fresh);
}
static int forsaken_send(port_t *p, port_op_t *op, port_sock_t s, const port_buf_t *bufs,
                         int n) {
    PORT_UNUSED(bufs); PORT_UNUSED(n);
    return forsaken_op(p, op, s);
}
static int forsaken_close(port_t *p, port_op_t *op, port_sock_t s, int flags) {
    PORT_UNUSED(flags);
    return forsaken_op(p, op, s);
}
static int forsaken_cancel(port_t *p, port_op_t *target) {
    return forsaken_op(p, target, PORT_INVALID_SOCK);
}
static int forsaken_post(port_t *p, port_op_t *op, int64_t value) {
    PORT_UNUSED(value);
    return forsaken_op(p, op, PORT_INVALID_SOCK);
}
static int forsaken_timer(port_t *p, port_op_t *op, uint64_t ms) {
    PORT_UNUSED(ms);
    return forsaken_op(p, op, PORT_INVALID_SOCK);
}
static int forsaken_listen(port_t *p, const port_addr_t *addr, int backlog, int flags,
                           port_sock_t *out) {
    PORT_UNUSED(p); PORT_UNUSED(addr); PORT_UNUSED(backlog); PORT_UNUSED(flags);
    PORT_UNUSED(out);
    return PORT_ECLOSED;
}
/* The child's descriptor only: no linger (a reset would end the parent's connection),
 * no shutdown, no EPOLL_CTL_DEL. */
static int forsaken_sock_close(port_t *p, port_sock_t s, int flags) {
    PORT_UNUSED(p); PORT_UNUSED(flags);
#ifdef _WIN32
    return port__win_close(s, 0);     /* (no fork there: for completeness) */
#else
    return port__posix_close(s, 0);
#endif
}

static const port_vtable_t forsaken_vtable = {
    "forsaken",
    NULL,
    NULL,
    forsaken_nothing,       /* shutdown: closed already */
    forsaken_destroy,
    forsaken_wait,
    forsaken_nothing,       /* batch_end */
    forsaken_op,            /* accept */
    forsaken_connect,
    forsaken_op,            /* recv */
    forsaken_recv_release,
    forsaken_send,
    forsaken_close,
    forsaken_cancel,
    forsaken_post,
    forsaken_timer,
    forsaken_listen,
    forsaken_sock_close,
    NULL,                   /* send_now: port_send_now says PORT_ECLOSED first */
    NULL,                   /* flush_sends: nothing */
    NULL,
    NULL,
    NULL,
    NULL,
    NULL,
    NULL,                   /* pool_trim: the parent's pool, not the child's to trim */
};

void port_forsake(port_t *p) {
    port_atomic_store32(&p->closed, 1);
    p->vt = &forsaken_vtable;
}

int port_wait(port_t *p, port_cqe_t *out, int max, int timeout_ms) {
    return p->vt->wait(p, out, max, timeout_ms);
}
void port_batch_end(port_t *p) { p->vt->batch_end(p); }
int port_single_dispatcher(port_t *p) {
#ifdef PORT_HAVE_IO_URING
    if (p->vt == &port__io_uring_vtable)
        return port__uring_single_dispatcher(p);
#endif
    PORT_UNUSED(p);
    return PORT_EUNAVAIL;
}

void port_get_stats(port_t *p, port_stats_t *out) {
    out->submitted = (uint64_t)port_atomic_load64(&p->submitted);
    out->completed = (uint64_t)port_atomic_load64(&p->completed);
    out->in_flight = (int64_t)(out->submitted - out->completed);
    out->waits = (uint64_t)port_atomic_load64(&p->waits);
    out->recv_buffers = (uint64_t)port_atomic_load64(&p->recv_buffers);
    out->recv_buffers_out = p->vt->buffers_out != NULL
                                ? p->vt->buffers_out(p)
                                : (uint64_t)port_atomic_load64(&p->recv_buffers_out);
    out->recv_buffers_detached = (uint64_t)port_atomic_load64(&p->recv_buffers_detached);
    out->recv_waiting = (uint64_t)port_atomic_load64(&p->recv_waiting);
    out->recv_buffers_trimmed = (uint64_t)port_atomic_load64(&p->recv_buffers_trimmed);
    {
        int64_t a = port_atomic_load64(&p->pool_peak);
        int64_t b = port_atomic_load64(&p->pool_peak_prev);
        out->recv_buffers_peak = (uint64_t)(a > b ? a : b);
    }
}

int64_t port_recv_pool_grew(port_t *p) {
    /* Once per batch (IocpCore.Dispatch): one load, in the usual case. */
    if (!port_atomic_load32(&p->pool_grew) || p->vt->pool_trim == NULL ||
        !port_atomic_cas32(&p->pool_grew, 1, 0))
        return 0;
    /* The trimmer starts: its first window ends after one window. */
    p->pool_window_end = port_monotonic_ms() + p->opts.recv_pool_window_ms;
    port_atomic_store32(&p->pool_trimming, 1);
    return p->opts.recv_pool_window_ms;
}

/* The window: pool_peak is the most buffers lent at once since the window began (the
 * backends note it where they lend: epoll at each buffer delivered, io_uring at each
 * reap pass's end), pool_peak_prev the window before's.  Each window's end moves the
 * peak back and starts a new one at what is lent now, so what the pool keeps covers
 * every peak of the last one to two windows: a steady load, which reaches its peak in
 * every window, never loses a buffer, and a spike's buffers go between one and two
 * windows after it.  The trimmer runs once per window, more often only while io_uring's
 * buffers come back. */
int64_t port_recv_pool_trim(port_t *p) {
    int64_t now = port_monotonic_ms(), keep, held, out;
    int more = 0;
    uint64_t lent;
    port_stats_t st;
    if (p->vt->pool_trim == NULL || port_atomic_load32(&p->closed))
        return 0;
    if (p->pool_window_end == 0) {
        p->pool_window_end = now + p->opts.recv_pool_window_ms;
    } else if (now >= p->pool_window_end) {
        port_get_stats(p, &st);
        lent = st.recv_buffers_out;
        out = (int64_t)lent;
        __atomic_store_n(&p->pool_peak_prev, port_atomic_load64(&p->pool_peak),
                         __ATOMIC_RELEASE);
        __atomic_store_n(&p->pool_peak, out, __ATOMIC_RELEASE);
        port__pool_note_out(p, out);
        p->pool_window_end = now + p->opts.recv_pool_window_ms;
    }
    keep = port__pool_keep_now(p);
    held = port_atomic_load64(&p->recv_buffers);
    if (held > keep)
        p->vt->pool_trim(p, keep, &more);
    if (more)
        return 100;      /* on their way back (io_uring): look again soon */
    if (port_atomic_load64(&p->recv_buffers) > PORT_POOL_FLOOR)
        return p->pool_window_end > now ? p->pool_window_end - now : 1;
    /* At the floor: stop until the pool grows again (a growth in between says so). */
    p->pool_window_end = 0;
    port_atomic_store32(&p->pool_trimming, 0);
    if (port_atomic_load64(&p->recv_buffers) > PORT_POOL_FLOOR)
        port_atomic_store32(&p->pool_grew, 1);
    return 0;
}

uint32_t port_recv_buffer_size(const port_t *p) { return p->opts.recv_buffer_size; }

void port_op_init(port_op_t *op, port_op_type type, void *owner, port_strand_t *strand) {
    memset(op, 0, sizeof(*op));
    op->type = (uint8_t)type;
    op->owner = owner;
    op->strand = strand;
    op->sock = PORT_INVALID_SOCK;
}

/* A record may carry one operation at a time, and only of its own kind: both mistakes
 * would corrupt the backend's state for the operation already in flight. */
static int check_op(port_t *p, port_op_t *op, port_op_type type) {
    if (op == NULL || op->in_flight || op->type != type)
        return PORT_EINVAL;
    if (port_atomic_load32(&p->closed))
        return PORT_ECLOSED;
    op->cancel_requested = 0;
    return 0;
}

int port_accept(port_t *p, port_op_t *op, port_sock_t listener) {
    int rc = check_op(p, op, PORT_OP_ACCEPT);
    return rc ? rc : p->vt->accept(p, op, listener);
}
int port_accept_multishot(port_t *p, port_op_t *op, port_sock_t listener) {
    int rc = check_op(p, op, PORT_OP_ACCEPT);
    if (rc == 0 && (p->vt->accept_multishot == NULL || op->strand != NULL))
        rc = op->strand != NULL ? PORT_EINVAL : PORT_EOPNOTSUPP;
    return rc ? rc : p->vt->accept_multishot(p, op, listener);
}
int port_accept_peer(port_t *p, const port_op_t *op, port_addr_t *out) {
    if (op == NULL || op->type != PORT_OP_ACCEPT || op->in_flight ||
        p->vt->accept_peer == NULL)
        return PORT_EOPNOTSUPP;
    return p->vt->accept_peer(op, out);
}
int port_connect(port_t *p, port_op_t *op, const port_addr_t *addr) {
    int rc = check_op(p, op, PORT_OP_CONNECT);
    if (rc == 0 && (addr == NULL || addr->len <= 0))
        rc = PORT_EINVAL;
    return rc ? rc : p->vt->connect(p, op, addr);
}
int port_recv(port_t *p, port_op_t *op, port_sock_t sock) {
    int rc = check_op(p, op, PORT_OP_RECV);
    return rc ? rc : p->vt->recv(p, op, sock);
}
void port_recv_release(port_t *p, const port_cqe_t *cqe) {
    if (cqe->flags & PORT_CQE_BUFFER) {
        if (p->vt->buffers_out == NULL)
            port_atomic_add64(&p->recv_buffers_out, -1);
        p->vt->recv_release(p, cqe->buf_id, NULL);
    }
}
int port_recv_detach(port_t *p, const port_cqe_t *cqe) {
    char *fresh;
    if (!(cqe->flags & PORT_CQE_BUFFER))
        return PORT_EINVAL;
    if (p->vt == &forsaken_vtable)
        return PORT_ECLOSED;   /* no replacement into the parent's pool: the caller copies */
    fresh = port__buf_alloc(p->opts.recv_buffer_size);
    if (fresh == NULL)
        return PORT_ENOMEM;
    if (p->vt->buffers_out == NULL)
        port_atomic_add64(&p->recv_buffers_out, -1);
    port_atomic_add64(&p->recv_buffers_detached, 1);
    p->vt->recv_release(p, cqe->buf_id, fresh);
    return 0;
}
int port_send(port_t *p, port_op_t *op, port_sock_t sock, const port_buf_t *bufs, int nbufs) {
    int rc = check_op(p, op, PORT_OP_SEND);
    if (rc == 0 && (bufs == NULL || nbufs <= 0))
        rc = PORT_EINVAL;
    return rc ? rc : p->vt->send(p, op, sock, bufs, nbufs);
}
int64_t port_send_now(port_t *p, port_sock_t sock, const port_buf_t *bufs, int nbufs) {
    if (bufs == NULL || nbufs <= 0)
        return PORT_EINVAL;
    if (port_atomic_load32(&p->closed))
        return PORT_ECLOSED;
    return p->vt->send_now != NULL ? p->vt->send_now(p, sock, bufs, nbufs) : 0;
}
int port_work_waiting(port_t *p) {
    return p->vt->work_waiting != NULL && p->vt->work_waiting(p);
}

void port_flush_sends(port_t *p) {
    if (p->vt->flush_sends != NULL)
        p->vt->flush_sends(p);
}
int port_close(port_t *p, port_op_t *op, port_sock_t sock, int flags) {
    int rc = check_op(p, op, PORT_OP_CLOSE);
    return rc ? rc : p->vt->close(p, op, sock, flags);
}
int port_cancel(port_t *p, port_op_t *target) {
    if (target == NULL || !target->in_flight)
        return 0;
    if (port_atomic_load32(&p->closed))
        return PORT_ECLOSED;
    port_atomic_store32(&target->cancel_requested, 1);
    return p->vt->cancel(p, target);
}
int port_stop_accepts(port_t *p, port_op_t *ops, int n, port_sock_t s) {
    int i, live = 0;
    if (port_atomic_load32(&p->closed))
        return PORT_ECLOSED;
    /* Every flag first: a backend that re-arms an accept by itself reads it. */
    for (i = 0; i < n; i++) {
        if (ops[i].in_flight && ops[i].type == PORT_OP_ACCEPT) {
            port_atomic_store32(&ops[i].cancel_requested, 1);
            live++;
        }
    }
    if (live > 0 && p->vt->stop_listener != NULL)
        return p->vt->stop_listener(p, s);
    for (i = 0; i < n; i++)
        if (ops[i].in_flight && ops[i].type == PORT_OP_ACCEPT)
            p->vt->cancel(p, &ops[i]);
    return 0;
}
int port_post(port_t *p, port_op_t *op, int64_t value) {
    int rc = check_op(p, op, PORT_OP_POST);
    if (rc == 0 && value < 0)
        rc = PORT_EINVAL;
    return rc ? rc : p->vt->post(p, op, value);
}
int port_timer(port_t *p, port_op_t *op, uint64_t ms) {
    int rc = check_op(p, op, PORT_OP_TIMER);
    return rc ? rc : p->vt->timer(p, op, ms);
}

int port_listen(port_t *p, const port_addr_t *addr, int backlog, int flags, port_sock_t *out) {
    if (port_atomic_load32(&p->closed))
        return PORT_ECLOSED;
    return p->vt->listen(p, addr, backlog, flags, out);
}
int port_sock_close(port_t *p, port_sock_t s, int flags) { return p->vt->sock_close(p, s, flags); }
