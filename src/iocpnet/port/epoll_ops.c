/*
 * epoll_ops.c -- the epoll backend's descriptors and submissions: the table of
 * descriptor records, each socket life (reset, register, adopt), and the submit calls
 * (accept, recv, connect, send, close, cancel, post, timer, listen).  The reactor that
 * performs what is parked here, and the model, are in epoll.c.
 *
 * Descriptors.  Every operation on a socket runs under its record's lock, and a close
 * first forgets the record under that lock (parked operations end with PORT_ECANCELED)
 * and only then calls close(2): nothing submitted before the close can run after it, on
 * a number that may belong to a new socket by then.
 *
 * Locks: a record's lock, then (making a record) fdt_mutex, then the completion queue's
 * or ready queue's lock (epoll.c); the timers' lock alone.  See epoll.c's invariants.
 */
#if defined(__linux__)
#include "epoll_int.h"

#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <unistd.h>

/* ---- descriptor table ----------------------------------------------------------------- */

int port__ep_fdtab_init(ep_port_t *p) {
    p->fdt = (ep_fdtab_t *)calloc(1, sizeof(ep_fdtab_t) + 64 * sizeof(ep_fd_t *));
    if (p->fdt == NULL)
        return PORT_ENOMEM;
    p->fdt->nchunks = 64;
    return 0;
}

void port__ep_fdtab_free(ep_port_t *p) {
    ep_fdtab_t *t, *next;
    uint32_t i;
    if (p->fdt == NULL)
        return;
    for (i = 0; i < p->fdt->nchunks; i++)
        free(p->fdt->chunks[i]);
    for (t = p->fdt; t != NULL; t = next) {
        next = t->retired;
        free(t);
    }
    p->fdt = NULL;
}

ep_fd_t *port__ep_fd_make(ep_port_t *p, int fd) {
    ep_fdtab_t *t;
    ep_fd_t *c, *f = NULL;
    uint32_t j, i = (uint32_t)fd >> FD_CHUNK_SHIFT;
    port_mutex_lock(&p->fdt_mutex);
    t = p->fdt;
    if (i >= t->nchunks) {
        uint32_t n = t->nchunks * 2;
        ep_fdtab_t *nt;
        if (n <= i)
            n = i + 1;
        nt = (ep_fdtab_t *)calloc(1, sizeof(*nt) + (size_t)n * sizeof(ep_fd_t *));
        if (nt == NULL)
            goto out;
        nt->nchunks = n;
        memcpy(nt->chunks, t->chunks, (size_t)t->nchunks * sizeof(ep_fd_t *));
        nt->retired = t;
        __atomic_store_n(&p->fdt, nt, __ATOMIC_RELEASE);
        t = nt;
    }
    c = t->chunks[i];
    if (c == NULL) {
        c = (ep_fd_t *)calloc(FD_CHUNK, sizeof(ep_fd_t));
        if (c == NULL)
            goto out;
        for (j = 0; j < FD_CHUNK; j++)
            c[j].fd = (int32_t)((i << FD_CHUNK_SHIFT) | j);
        __atomic_store_n(&t->chunks[i], c, __ATOMIC_RELEASE);
    }
    f = &c[(uint32_t)fd & (FD_CHUNK - 1)];
out:
    port_mutex_unlock(&p->fdt_mutex);
    return f;
}

/* ---- a socket's life ------------------------------------------------------------------ */

/* Forget the socket that used this number (f->lock held): every op still parked on it
 * ends with PORT_ECANCELED, and events still in flight for it become stale.  Returns
 * how many ops were cancelled (the caller wakes a waiter for them). */
static int fd_reset(ep_port_t *p, ep_fd_t *f) {
    int k = 0;
    port_op_t *lists[2], *op, *next;
    int i;
    lists[0] = f->rhead;
    lists[1] = f->whead;
    for (i = 0; i < 2; i++) {
        for (op = lists[i]; op != NULL; op = next) {
            next = OP_PRIV(op)->next;
            OP_SET_STATE(op, EP_IDLE);
            port__ep_cq_push(p, op, PORT_ECANCELED);
            k++;
        }
    }
    f->rhead = f->rtail = f->whead = f->wtail = NULL;
    f->gen++;
    f->registered = 0;
    f->readable = 0;
    f->write_blocked = 0;
    f->hup = 0;
    f->inq = EP_INQ_UNTRIED;
    return k;
}

/* Put this socket life in the epoll set (f->lock held).  ET for everything, once: from
 * then on no operation needs an epoll_ctl.  The kernel reports the socket's current
 * readiness at once, so an edge that came before registration is not lost. */
static int fd_register(ep_port_t *p, ep_fd_t *f) {
    struct epoll_event ev;
    if (f->registered)
        return 0;
    ev.events = EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET;
    ev.data.u64 = ((uint64_t)f->gen << 32) | (uint32_t)f->fd;
    if (epoll_ctl(p->epfd, EPOLL_CTL_ADD, f->fd, &ev) < 0) {
        /* EEXIST: the same open socket is still in the set from a life we were not told
         * had ended (the number was closed behind our back while a duplicate kept it
         * open).  Point it at this generation. */
        if (errno != EEXIST || epoll_ctl(p->epfd, EPOLL_CTL_MOD, f->fd, &ev) < 0)
            return port_err_from_os(errno);
    }
    f->registered = 1;
    return 0;
}

/* A socket the caller made itself and hands us for the first time: accept4 must not
 * block under our lock, so make it non-blocking, then register it. */
static int fd_register_foreign(ep_port_t *p, ep_fd_t *f) {
    int fl;
    if (f->registered)
        return 0;
    fl = fcntl(f->fd, F_GETFL);
    if (fl < 0)
        return port_err_from_os(errno);
    if (!(fl & O_NONBLOCK) && fcntl(f->fd, F_SETFL, fl | O_NONBLOCK) < 0)
        return port_err_from_os(errno);
    return fd_register(p, f);
}

int port__ep_fd_adopt(ep_port_t *p, int fd, int *cancelled) {
    int rc;
    ep_fd_t *f = fd_get(p, fd);
    if (f == NULL)
        return PORT_ENOMEM;
    port_spin_lock(&f->lock);
    *cancelled += fd_reset(p, f);
    rc = fd_register(p, f);
    port_spin_unlock(&f->lock);
    return rc;
}

/* ---- operations ----------------------------------------------------------------------- */

/* Accepts and receives are performed in the wait path only (see the top); arming one
 * parks it and, if the socket is already known readable, queues the socket as ready. */
static int arm_read(ep_port_t *p, port_op_t *op, port_sock_t sock) {
    int rc, ready;
    ep_fd_t *f;
    op->sock = sock;
    if (op->type == PORT_OP_RECV) {
        /* A fresh arming's allowance (used only while receives stay armed). */
        OP_PRIV(op)->u.recv.bytes = p->arm_bytes;
        OP_PRIV(op)->u.recv.reads = EP_ARM_READS;
        OP_PRIV(op)->u.recv.behind = 0;
    }
    port__submitted(&p->base, op);
    f = fd_get(p, sock);
    if (f == NULL)
        return complete_later(p, op, sock < 0 ? PORT_EBADF : PORT_ENOMEM);
    port_spin_lock(&f->lock);
    rc = fd_register_foreign(p, f);
    if (rc != 0) {
        port_spin_unlock(&f->lock);
        return complete_later(p, op, rc);
    }
    list_append(&f->rhead, &f->rtail, op);
    ready = f->readable;
    port_spin_unlock(&f->lock);
    if (ready && port__ep_rq_push(p, f))
        port__ep_wake(p);
    return 0;
}

int port__ep_accept(port_t *bp, port_op_t *op, port_sock_t listener) {
    return arm_read((ep_port_t *)bp, op, listener);
}

int port__ep_recv(port_t *bp, port_op_t *op, port_sock_t sock) {
    return arm_read((ep_port_t *)bp, op, sock);
}

int port__ep_connect(port_t *bp, port_op_t *op, const port_addr_t *addr) {
    ep_port_t *p = (ep_port_t *)bp;
    ep_fd_t *f;
    int r, e, rc, cancelled;
    int fd = socket(addr->ss.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, IPPROTO_TCP);
    op->sock = fd;
    port__submitted(bp, op);
    if (fd < 0)
        return complete_later(p, op, port_err_from_os(errno));
    if ((size_t)addr->len > sizeof(addr->ss))
        return complete_later(p, op, PORT_EAFNOSUPPORT);
    /* connect() reads the address now; nothing of the caller's is used later. */
    r = connect(fd, (const struct sockaddr *)&addr->ss, (socklen_t)addr->len);
    e = errno;
    f = fd_get(p, fd);
    if (f == NULL)
        return complete_later(p, op, PORT_ENOMEM);
    port_spin_lock(&f->lock);
    cancelled = fd_reset(p, f);   /* a fresh life for this number */
    if (r < 0 && e != EINPROGRESS && e != EINTR) {
        rc = port_err_from_os(e);
    } else {
        /* Registered after connect(): a socket not yet connecting reports itself hung
         * up and writable, which would look like a finished handshake. */
        rc = fd_register(p, f);
        if (rc == 0 && r < 0) {
            /* In progress: the EPOLLOUT (or ERR/HUP) edge finishes it in the wait path. */
            f->write_blocked = 1;
            list_append(&f->whead, &f->wtail, op);
            port_spin_unlock(&f->lock);
            if (cancelled)
                port__ep_wake(p);
            return 0;
        }
    }
    port_spin_unlock(&f->lock);
    return complete_later(p, op, rc);
}

int port__ep_send(port_t *bp, port_op_t *op, port_sock_t sock, const port_buf_t *bufs,
                  int nbufs) {
    ep_port_t *p = (ep_port_t *)bp;
    ep_fd_t *f;
    int rc;
    op->sock = sock;
    OP_PRIV(op)->u.send.bufs = bufs;
    OP_PRIV(op)->u.send.nbufs = nbufs;
    port__submitted(bp, op);
    f = fd_get(p, sock);
    if (f == NULL)
        return complete_later(p, op, sock < 0 ? PORT_EBADF : PORT_ENOMEM);
    port_spin_lock(&f->lock);
    /* Try at once unless earlier sends are parked (they go first) or the socket is known
     * full.  A send's completion is final, so an immediate result cannot be overtaken. */
    if (f->whead == NULL && !f->write_blocked) {
        long r = port__posix_sendmsg(f->fd, bufs, nbufs);
        if (r >= 0 || (errno != EAGAIN && errno != EWOULDBLOCK)) {
            int64_t res = r >= 0 ? (int64_t)r : port_err_from_os(errno);
            port_spin_unlock(&f->lock);
            return complete_later(p, op, res);
        }
        f->write_blocked = 1;
    }
    rc = fd_register_foreign(p, f);
    if (rc != 0) {
        port_spin_unlock(&f->lock);
        return complete_later(p, op, rc);
    }
    list_append(&f->whead, &f->wtail, op);
    port_spin_unlock(&f->lock);
    return 0;
}

/* port_send_now: the same attempt port__ep_send makes first, without an operation.  Nothing
 * is parked on the socket's write side (the caller has no send in flight) unless a
 * connect is; a socket known to be full is not tried. */
int64_t port__ep_send_now(port_t *bp, port_sock_t sock, const port_buf_t *bufs, int nbufs) {
    ep_port_t *p = (ep_port_t *)bp;
    ep_fd_t *f = fd_find(p, sock);
    int64_t res = 0;
    if (f == NULL)
        return port__posix_send_now_inline(sock, bufs, nbufs);
    port_spin_lock(&f->lock);
    if (f->whead == NULL && !f->write_blocked)
        res = port__posix_send_now_inline(f->fd, bufs, nbufs);
    port_spin_unlock(&f->lock);
    return res;
}

/* Cancel what is parked on sock and forget its state before its number can be reused. */
static int forget_sock(ep_port_t *p, port_sock_t sock) {
    int k = 0;
    ep_fd_t *f = fd_find(p, sock);
    if (f != NULL) {
        port_spin_lock(&f->lock);
        k = fd_reset(p, f);
        port_spin_unlock(&f->lock);
    }
    return k;
}

int port__ep_close(port_t *bp, port_op_t *op, port_sock_t sock, int flags) {
    ep_port_t *p = (ep_port_t *)bp;
    int rc;
    /* Forget first: once close() returns, accept may hand the number to a new socket.
     * The epoll registration goes away with the socket itself. */
    forget_sock(p, sock);
    rc = port__posix_close(sock, flags);
    op->sock = sock;
    port__submitted(bp, op);
    return complete_later(p, op, rc);
}

int port__ep_sock_close(port_t *bp, port_sock_t s, int flags) {
    ep_port_t *p = (ep_port_t *)bp;
    if (forget_sock(p, s))
        port__ep_wake(p);
    return port__posix_close(s, flags);
}

int port__ep_cancel(port_t *bp, port_op_t *t) {
    ep_port_t *p = (ep_port_t *)bp;
    int found = 0;
    switch (t->type) {
    case PORT_OP_ACCEPT:
    case PORT_OP_RECV:
    case PORT_OP_CONNECT:
    case PORT_OP_SEND: {
        ep_fd_t *f = fd_find(p, t->sock);
        if (f == NULL)
            return 0;
        port_spin_lock(&f->lock);
        if (OP_STATE(t) == EP_PARKED) {
            if (t->type == PORT_OP_ACCEPT || t->type == PORT_OP_RECV)
                list_unlink(&f->rhead, &f->rtail, t);
            else
                list_unlink(&f->whead, &f->wtail, t);
            port__ep_cq_push(p, t, PORT_ECANCELED);
            found = 1;
        }
        port_spin_unlock(&f->lock);
        break;
    }
    case PORT_OP_TIMER:
        found = port__timers_cancel(&p->timers, &OP_PRIV(t)->u.timer);
        if (found)
            port__ep_cq_push(p, t, PORT_ECANCELED);
        break;
    default:
        break;   /* posts and closes are already complete */
    }
    if (found)
        port__ep_wake(p);
    return 0;
}

int port__ep_post(port_t *bp, port_op_t *op, int64_t value) {
    port__submitted(bp, op);
    return complete_later((ep_port_t *)bp, op, value);
}

int port__ep_timer(port_t *bp, port_op_t *op, uint64_t ms) {
    ep_port_t *p = (ep_port_t *)bp;
    int rc;
    /* Clamp so that now + ms cannot overflow: a few centuries is "never". */
    uint64_t capped = ms > (uint64_t)1 << 42 ? (uint64_t)1 << 42 : ms;
    port__submitted(bp, op);
    OP_SET_STATE(op, EP_IDLE);
    rc = port__timers_add(&p->timers, &OP_PRIV(op)->u.timer,
                          port__now_ns() + (int64_t)capped * 1000000);
    if (rc < 0)
        return complete_later(p, op, rc);
    if (rc == 1)
        port__ep_wake(p);   /* a sleeper may be waiting for a later deadline */
    return 0;
}

int port__ep_listen(port_t *bp, const port_addr_t *addr, int backlog, int flags,
                    port_sock_t *out) {
    ep_port_t *p = (ep_port_t *)bp;
    int fd, rc, cancelled = 0;
    rc = port__posix_listen_socket(addr, backlog, flags, &fd);
    if (rc != 0)
        return rc;
    rc = port__ep_fd_adopt(p, fd, &cancelled);
    if (cancelled)
        port__ep_wake(p);
    if (rc != 0) {
        close(fd);
        return rc;
    }
    *out = fd;
    return 0;
}
#endif /* __linux__ */
