/*
 * epoll.c -- the Linux fallback port: completions emulated on a readiness reactor.  This
 * file is the reactor (waiting, the queues, performing parked operations, set-up);
 * epoll_ops.c holds the descriptor table and the submit calls; epoll_int.h what they
 * share.
 *
 * How epoll fits the IOCP model
 * -----------------------------
 * epoll says when a socket *could* make progress; IOCP (and io_uring) say when an
 * operation *has* completed.  This file bridges the two the way Boost.Asio's reactor
 * does: an operation is tried at once where that is safe; if it would block it is
 * parked on its descriptor, and when readiness arrives a waiting thread performs it and
 * reports the result as a completion.  Every result reaches the caller through
 * port_wait, never inline, so the caller sees the same model on every backend.
 *
 *   - Descriptors.  Each socket gets a small state record (ep_fd_t) in a table indexed
 *     by fd number: its own lock, the operations parked on it (reads: accepts and the
 *     pending receive; writes: sends and a connect), and what we know of its readiness.
 *     It is registered once per socket life, edge-triggered, for everything
 *     (IN|OUT|RDHUP|ET), so no epoll_ctl is ever needed per operation.  An edge means
 *     "something changed": we remember `readable` until a read says EAGAIN (or comes back
 *     short, see below) and `write_blocked` from a write's EAGAIN until an EPOLLOUT edge.
 *     Each registration carries fd and a generation number; closing a socket bumps the
 *     generation, so an event collected for a socket that has since been closed, and
 *     whose number a new socket reuses, is recognised as stale and dropped.
 *
 *   - Receives.  A receive completes once, like a WSARecv (data, EOF or an error), and
 *     the caller posts the next one when it has dealt with it; with
 *     PORT_OPT_RECV_MULTISHOT it stays armed instead, as io_uring's multishot recv does,
 *     completing with PORT_CQE_MORE until a final completion, which saves the caller a
 *     submission (and its locks) per message.  An arming is bounded so that the port
 *     never reads far ahead of a caller that is not keeping up: its read that brings it
 *     to EP_ARM_BUFFERS buffers' worth of bytes or to EP_ARM_READS reads is final (data
 *     and all), and so is the read after one that had to be queued behind the thread
 *     holding the op's strand (that thread is still busy with earlier completions, say a
 *     hook that blocks: at most two buffers wait for it, where an unbounded arming would
 *     lend one per segment the peer sends).  The caller posts the next arming once it
 *     has dealt with the final one.  Either way all reads of a
 *     descriptor happen in the wait path under the descriptor's lock, and
 *     port__deliver() is called right there, so the order in which completions enter
 *     batches and strands is the order of the bytes.  Posting a receive never reads: if
 *     the descriptor is already known readable (an edge came while nobody was parked),
 *     the descriptor is put on the port's ready queue, as if a new edge had come, for a
 *     waiter to process.  (Reading at post time would create a completion that sits in
 *     a queue while another thread, woken by the next edge, reads and delivers newer
 *     bytes first.)
 *
 *   - Short reads.  A recv that fills less than the buffer means the socket's queue was
 *     empty at that moment, and anything arriving later raises a new edge, so we drop
 *     `readable` without paying for a second recv that would return EAGAIN: one recv per
 *     message.  A read that fills the buffer cannot tell: the first one on a socket
 *     turns TCP_INQ on, and from then on every read of that socket (recvmsg) also says
 *     how many bytes are still queued, so a message that exactly fills the buffer (16
 *     KiB echoed in 16 KiB buffers) does not cost a second recv that returns EAGAIN
 *     either.  The exception is a peer that has shut down or errored (RDHUP/HUP/ERR
 *     seen, which is sticky): its EOF raises no further edge, so we read on until recv
 *     returns 0 or an error.
 *
 *   - Sends and connects are tried at once by the submitting thread (a send is one
 *     sendmsg attempt, final whatever it moves), which is what makes a ping-pong cost one
 *     recv and one sendmsg.  Accepts and receives are performed in the wait path only.
 *
 *   - Completions found outside the wait path (sends done at once, errors found at
 *     submit time, posts, cancels, closes) go on the port's completion queue, an
 *     intrusive FIFO threaded through the operation records (no allocation).  Only final
 *     completions travel this way, so one op is never in it twice.
 *
 *   - Receive buffers come from the port's pool (bufpool.c): heap blocks made the first
 *     time they are needed, reused last-in first-out, so the memory touched follows the
 *     peak of data in flight, not the number of connections, and an idle connection
 *     holds none.  A descriptor with data but no free buffer waits on the pool's queue;
 *     each buffer given back wakes one waiting descriptor, oldest first, at once (not
 *     when the releasing thread's batch ends: a hook later in that batch may block), and
 *     a descriptor woken that no longer wants a buffer passes the wake on, so data is
 *     never dropped and nothing spins.
 *
 *   - Descriptors.  Every operation on a socket runs under its descriptor's lock, and
 *     a close first forgets the descriptor under that lock (parked operations end with
 *     PORT_ECANCELED) and only then calls close(2): nothing submitted before the close
 *     can run after it, on a number that may belong to a new socket by then
 *     (epoll_ops.c).
 *
 *   - Timers live in a min-heap (timer_heap.h) ordered by (deadline, arming order).
 *     Waiters clamp their epoll_wait timeout to the earliest deadline; a new earliest
 *     timer wakes a sleeper so it can shorten its sleep.
 *
 *   - Wakeups use an eventfd registered edge-triggered and never read (its 64-bit
 *     counter cannot overflow in practice).  A producer writes it only when some thread
 *     is asleep in epoll_wait (`sleepers`) and no wake is already on its way
 *     (`wake_pending`).  A thread that is dispatching a batch wakes nobody: its next
 *     port_wait looks at the queues before sleeping (port_batch_end pays the debt if it
 *     will not wait again soon).  port_shutdown switches the eventfd to level-triggered,
 *     so every present and future epoll_wait on the port returns at once.
 *
 *   - Fairness.  One visit to a descriptor reads at most READ_BUDGET buffers (an armed
 *     receive could otherwise read on while its peer keeps sending); a descriptor with
 *     more goes to the back of the ready queue.  A wait visits each ready descriptor at
 *     most once, and a thread whose last batch came only from the queues polls epoll on
 *     its next wait, so queued work cannot starve fresh events.
 *
 * Invariants
 *   - Lock order: a descriptor's lock, then (accepting only) the fd table's mutex and
 *     the new socket's lock, then the pool, ready-queue or completion-queue lock, then
 *     strand locks.  The timer lock is taken alone, then strand locks.  Nothing is ever
 *     taken in the other direction.  (A new socket's number cannot be a listener that
 *     someone is accepting on, so the two descriptor locks never meet the other way.)
 *   - No lock is held across a call that can block: every socket is non-blocking (and
 *     reads and writes pass MSG_DONTWAIT), epoll_ctl does not sleep, and eventfd writes
 *     happen after the locks are released.
 *   - An op is parked on at most one list, that of op->sock's descriptor; its `state`
 *     says whether it is parked (changed only under that descriptor's lock), queued, or
 *     neither.  port_cancel acts only on a parked op (or a pending timer); anything else
 *     is already completing and is left alone.
 *   - Each op has exactly one final completion; it is counted (port__completed) when a
 *     waiter takes it into a batch, as io_uring.c does when it reaps.
 *
 * Needs Linux 2.6.27 (epoll_create1, eventfd2, accept4); RDHUP since 2.6.17.
 */
#if defined(__linux__)
#include "epoll_int.h"

#include <errno.h>
#include <limits.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <unistd.h>

#ifndef TCP_INQ               /* Linux 4.18; older headers */
#  define TCP_INQ 36
#endif
#ifndef TCP_CM_INQ
#  define TCP_CM_INQ TCP_INQ
#endif

#define EV_WAKE (~(uint64_t)0)   /* epoll data of the eventfd; no descriptor looks like it */
#define EV_BATCH 128             /* most events taken from one epoll_wait */
#define READ_BUDGET 4            /* most buffers read from one descriptor per visit */

/* The port whose batch this thread is dispatching: it wakes nobody for that port. */
static PORT_THREAD_LOCAL ep_port_t *tls_batch;
/* A wake this thread skipped while dispatching; port_batch_end pays it. */
static PORT_THREAD_LOCAL ep_port_t *tls_owed;
/* This thread's last wait on the port returned queued work without polling epoll. */
static PORT_THREAD_LOCAL ep_port_t *tls_skipped;
/* This thread's last batch was filled by queued completions while descriptors waited in
 * the ready queue: they go first in its next one. */
static PORT_THREAD_LOCAL ep_port_t *tls_ready_first;

/* Milliseconds from now to `deadline`, rounded up so that a waiter never wakes a hair
 * early and spins; 0 if it has passed. */
static int ms_until(int64_t deadline, int64_t now) {
    int64_t left = deadline - now;
    if (left <= 0)
        return 0;
    left = (left + 999999) / 1000000;
    return left > INT_MAX ? INT_MAX : (int)left;
}

/* ---- wakeups -------------------------------------------------------------------------- */

/* Make sure some thread will look at the queues.  The fence pairs with the one a sleeper
 * makes between announcing itself and checking the queues (Dekker): either the sleeper
 * sees our work, or we see the sleeper and write the eventfd. */
static void wake_now(ep_port_t *p) {
    uint64_t one = 1;
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    if (__atomic_load_n(&p->sleepers, __ATOMIC_SEQ_CST) == 0)
        return;
    if (!port_atomic_cas32(&p->wake_pending, 0, 1))
        return;  /* a wake is on its way; its receiver clears the flag before looking */
    while (write(p->efd, &one, sizeof(one)) < 0 && errno == EINTR) {
    }
}

void port__ep_wake(ep_port_t *p) {
    if (tls_batch == p) {
        tls_owed = p;   /* our next port_wait looks at the queues anyway */
        return;
    }
    wake_now(p);
}

/* The clock, read once per look at the queues: *now is 0 until this wait reads it.  A
 * reading a few microseconds old is as good (timers have millisecond resolution), and
 * it saves a clock read per round trip or two. */
static int64_t clock_once(int64_t *now) {
    if (*now == 0)
        *now = port__now_ns();
    return *now;
}

/* Something a waiter should act on without waiting for epoll (a sleeper's re-check). */
static int work_pending(ep_port_t *p, int64_t *now) {
    int64_t d;
    if (__atomic_load_n(&p->cq_head, __ATOMIC_SEQ_CST) != NULL ||
        __atomic_load_n(&p->rq_head, __ATOMIC_SEQ_CST) != NULL)
        return 1;
    d = port__timers_next(&p->timers);
    return d != PORT_NO_DEADLINE && d <= clock_once(now);
}

/* ---- completion queue ----------------------------------------------------------------- */

void port__ep_cq_push(ep_port_t *p, port_op_t *op, int64_t res) {
    ep_op_t *e = OP_PRIV(op);
    e->res = res;
    e->next = NULL;
    port_spin_lock(&p->cq_lock);
    OP_SET_STATE(op, EP_QUEUED);
    if (p->cq_tail != NULL)
        OP_PRIV(p->cq_tail)->next = op;
    else
        __atomic_store_n(&p->cq_head, op, __ATOMIC_SEQ_CST);
    p->cq_tail = op;
    port_spin_unlock(&p->cq_lock);
}

/* Deliver queued completions under cq_lock: that lock defines their order. */
static int drain_cq(ep_port_t *p, port_cqe_t *out, int n, int max) {
    if (n >= max || __atomic_load_n(&p->cq_head, __ATOMIC_ACQUIRE) == NULL)
        return n;
    port_spin_lock(&p->cq_lock);
    while (n < max && p->cq_head != NULL) {
        port_op_t *op = p->cq_head;
        __atomic_store_n(&p->cq_head, OP_PRIV(op)->next, __ATOMIC_RELAXED);
        if (p->cq_head == NULL)
            p->cq_tail = NULL;
        OP_SET_STATE(op, EP_IDLE);
        n = port__deliver_final(&p->base, out, n, op, OP_PRIV(op)->res);
    }
    port_spin_unlock(&p->cq_lock);
    return n;
}

/* ---- ready queue ---------------------------------------------------------------------- */

int port__ep_rq_push(ep_port_t *p, ep_fd_t *f) {
    int pushed = 0;
    port_spin_lock(&p->rq_lock);
    if (!f->in_ready) {
        f->in_ready = 1;
        f->ready_next = NULL;
        if (p->rq_tail != NULL)
            p->rq_tail->ready_next = f;
        else
            __atomic_store_n(&p->rq_head, f, __ATOMIC_SEQ_CST);
        p->rq_tail = f;
        p->rq_len++;
        pushed = 1;
    }
    port_spin_unlock(&p->rq_lock);
    return pushed;
}

static ep_fd_t *rq_pop(ep_port_t *p) {
    ep_fd_t *f;
    if (__atomic_load_n(&p->rq_head, __ATOMIC_ACQUIRE) == NULL)
        return NULL;
    port_spin_lock(&p->rq_lock);
    f = p->rq_head;
    if (f != NULL) {
        __atomic_store_n(&p->rq_head, f->ready_next, __ATOMIC_RELAXED);
        if (p->rq_head == NULL)
            p->rq_tail = NULL;
        f->in_ready = 0;
        p->rq_len--;
    }
    port_spin_unlock(&p->rq_lock);
    return f;
}

/* ---- receive buffers (bufpool.c) ------------------------------------------------------ */

/* A descriptor woken for a buffer given back: visit it now, not when this thread's batch
 * ends (the waiter is another descriptor, and the rest of the batch may take long: a
 * hook that blocks). */
static void pool_wake(ep_port_t *p, port_bufwait_t *w) {
    if (w != NULL && port__ep_rq_push(p, FD_OF_BUFWAIT(w)))
        wake_now(p);
}

static void pool_put(ep_port_t *p, uint32_t id) {
    pool_wake(p, port__bufpool_put(&p->pool, id, NULL));
}

static void ep_recv_release(port_t *bp, uint32_t id, char *fresh) {
    ep_port_t *p = (ep_port_t *)bp;
    pool_wake(p, port__bufpool_put(&p->pool, id, fresh));
}

/* ---- performing parked operations (wait path, f->lock held) --------------------------- */

/* One read into buf.  *left: the bytes still queued after it (TCP_INQ's answer, EOF
 * counting as one), or -1 when unknown.  A read that fills the buffer turns TCP_INQ on
 * for the socket's later reads (one setsockopt per socket that ever does). */
static ssize_t read_some(ep_fd_t *f, char *buf, size_t len, int *left) {
    ssize_t got;
    *left = -1;
    if (f->inq == EP_INQ_ON) {
        struct iovec v;
        struct msghdr m;
        union {
            struct cmsghdr h;
            char b[CMSG_SPACE(sizeof(int))];
        } ctl;
        struct cmsghdr *c;
        v.iov_base = buf;
        v.iov_len = len;
        memset(&m, 0, sizeof(m));
        m.msg_iov = &v;
        m.msg_iovlen = 1;
        m.msg_control = ctl.b;
        m.msg_controllen = sizeof(ctl.b);
        got = port__sys_recvmsg(f->fd, &m, MSG_DONTWAIT);
        if (got >= 0) {
            for (c = CMSG_FIRSTHDR(&m); c != NULL; c = CMSG_NXTHDR(&m, c))
                if (c->cmsg_level == IPPROTO_TCP && c->cmsg_type == TCP_CM_INQ &&
                    c->cmsg_len >= CMSG_LEN(sizeof(int)))
                    memcpy(left, CMSG_DATA(c), sizeof(int));
        }
        return got;
    }
    got = port__sys_recv(f->fd, buf, len, MSG_DONTWAIT);
    if (got > 0 && (size_t)got == len && f->inq == EP_INQ_UNTRIED) {
        int one = 1, e = errno;
        f->inq = setsockopt(f->fd, IPPROTO_TCP, TCP_INQ, &one, sizeof(one)) == 0
                     ? EP_INQ_ON : EP_INQ_OFF;
        errno = e;
    }
    return got;
}

/* A read of `got` bytes by a receive kept armed: does the arming go on after it (1), or
 * is this its final completion (0)?  See "Receives" at the top. */
static int arm_goes_on(ep_op_t *e, size_t got) {
    if (e->u.recv.behind || e->u.recv.reads <= 1 || got >= e->u.recv.bytes)
        return 0;
    e->u.recv.reads--;
    e->u.recv.bytes -= (uint32_t)got;
    return 1;
}

/* After an accept, is another connection already waiting?  Asked before the next
 * parked accept tries: an accept4 on an empty backlog fails only after the kernel made
 * and freed a socket inode, a file and a dentry for it (~3 us, against ~0.3 for this
 * poll), and in a connect storm most wake-ups bring one connection.  A connection that
 * comes after the answer raises a new edge, as after an EAGAIN. */
static int backlog_empty(int fd) {
    struct pollfd pfd;
    pfd.fd = fd;
    pfd.events = POLLIN;
    pfd.revents = 0;
    return poll(&pfd, 1, 0) == 0;
}

static int run_reads(ep_port_t *p, ep_fd_t *f, port_cqe_t *out, int n, int max, int *more) {
    int budget = READ_BUDGET;
    while (f->readable && f->rhead != NULL) {
        port_op_t *op = f->rhead;
        if (n >= max) {
            *more = 1;
            break;
        }
        if (op->type == PORT_OP_ACCEPT) {
            /* The peer's address comes with it (port_accept_peer): no getpeername. */
            port__peer_t *pa = &OP_PRIV(op)->u.acc;
            socklen_t alen = sizeof(pa->sa);
            int e, cancelled = 0,
                fd = accept4(f->fd, (struct sockaddr *)&pa->sa, &alen,
                             SOCK_NONBLOCK | SOCK_CLOEXEC);
            pa->len = fd >= 0 ? (uint32_t)alen : 0;
            if (fd >= 0) {
                /* Registered before the completion is seen, as port.h promises. */
                int rc = port__ep_fd_adopt(p, fd, &cancelled);
                if (cancelled)
                    port__ep_wake(p);
                list_unlink(&f->rhead, &f->rtail, op);
                if (rc != 0) {
                    close(fd);
                    n = port__deliver_final(&p->base, out, n, op, rc);
                } else {
                    n = port__deliver_final(&p->base, out, n, op, fd);
                }
                if (f->rhead != NULL && backlog_empty(f->fd)) {
                    f->readable = 0;
                    break;
                }
                continue;
            }
            e = errno;
            if (e == EAGAIN || e == EWOULDBLOCK) {
                f->readable = 0;
                break;
            }
            if (e == EINTR)
                continue;
            list_unlink(&f->rhead, &f->rtail, op);
            n = port__deliver_final(&p->base, out, n, op, port_err_from_os(e));
            /* Out of descriptors or memory: the connection stays in the backlog and the
             * listener stays readable, but retrying now would only fail again.  Stop;
             * the caller backs off and re-arms (which looks again), or a new connection
             * raises a new edge. */
            if (e == EMFILE || e == ENFILE || e == ENOBUFS || e == ENOMEM)
                break;
            continue;
        } else {
            uint32_t id;
            ssize_t got;
            int e, left;
            char *buf;
            if (budget == 0) {
                *more = 1;   /* fairness: come back on a later visit */
                break;
            }
            got = port__bufpool_get(&p->pool, &f->bufwait, NULL, &id, &buf);
            if (got == 0)
                break;       /* waits for a buffer given back */
            if (got < 0) {
                list_unlink(&f->rhead, &f->rtail, op);
                n = port__deliver_final(&p->base, out, n, op, PORT_ENOMEM);
                continue;
            }
            got = read_some(f, buf, p->pool.size, &left);
            e = errno;   /* pool_put below may write the eventfd */
            if (got > 0) {
                port_cqe_t c;
                c.op = op;
                c.res = got;
                c.flags = PORT_CQE_BUFFER;
                c.buf_id = id;
                c.buf = buf;
                budget--;
                /* Drained (a short read, or TCP_INQ says nothing is left): later data
                 * raises a new edge. */
                if (!f->hup && (left == 0 || (left < 0 && (size_t)got < p->pool.size)))
                    f->readable = 0;
                port_atomic_add64(&p->base.recv_buffers_out, 1);
                if (p->recv_armed && arm_goes_on(OP_PRIV(op), (size_t)got)) {
                    int before = n;
                    c.flags |= PORT_CQE_MORE;
                    n = port__deliver(&p->base, out, out, n, &c);
                    if (n == before)
                        OP_PRIV(op)->u.recv.behind = 1;   /* queued on its strand */
                    continue;
                }
                list_unlink(&f->rhead, &f->rtail, op);
                port__completed(&p->base, op);
                n = port__deliver(&p->base, out, out, n, &c);
                continue;
            }
            pool_put(p, id);
            if (got == 0) {
                list_unlink(&f->rhead, &f->rtail, op);
                n = port__deliver_final(&p->base, out, n, op, 0);
                continue;
            }
            if (e == EAGAIN || e == EWOULDBLOCK) {
                f->readable = 0;
                break;
            }
            if (e == EINTR)
                continue;
            list_unlink(&f->rhead, &f->rtail, op);
            n = port__deliver_final(&p->base, out, n, op, port_err_from_os(e));
        }
    }
    return n;
}

static int run_writes(ep_port_t *p, ep_fd_t *f, port_cqe_t *out, int n, int max, int *more) {
    while (!f->write_blocked && f->whead != NULL) {
        port_op_t *op = f->whead;
        int64_t res;
        if (n >= max) {
            *more = 1;
            break;
        }
        if (op->type == PORT_OP_CONNECT) {
            /* Writability (or an error/hangup) after EINPROGRESS: the handshake is over,
             * and SO_ERROR says how it went. */
            int err = 0;
            socklen_t len = sizeof(err);
            if (getsockopt(f->fd, SOL_SOCKET, SO_ERROR, &err, &len) < 0)
                err = errno;
            res = err ? port_err_from_os(err) : 0;
        } else {
            long r = port__posix_sendmsg(f->fd, OP_PRIV(op)->u.send.bufs,
                                         OP_PRIV(op)->u.send.nbufs);
            if (r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
                f->write_blocked = 1;
                break;
            }
            res = r >= 0 ? (int64_t)r : port_err_from_os(errno);
        }
        list_unlink(&f->whead, &f->wtail, op);
        n = port__deliver_final(&p->base, out, n, op, res);
    }
    return n;
}

/* Visit a descriptor (f->lock held).  *more: ready work is left (budget or room ran out)
 * and f must be visited again. */
static int run_fd(ep_port_t *p, ep_fd_t *f, port_cqe_t *out, int n, int max, int *more) {
    *more = 0;
    n = run_reads(p, f, out, n, max, more);
    n = run_writes(p, f, out, n, max, more);
    return n;
}

static void after_visit(ep_port_t *p, ep_fd_t *f, int more) {
    if (more)
        port__ep_rq_push(p, f);   /* the end of port_wait wakes a sleeper if it cannot take it */
    else
        pool_wake(p, port__bufpool_pass(&p->pool, &f->bufwait));
}

static int on_event(ep_port_t *p, uint64_t data, uint32_t ev, port_cqe_t *out, int n, int max) {
    int more = 0;
    ep_fd_t *f = fd_find(p, (int)(uint32_t)data);
    if (f == NULL)
        return n;
    port_spin_lock(&f->lock);
    if (f->gen != (uint32_t)(data >> 32) || !f->registered) {
        port_spin_unlock(&f->lock);   /* for a socket since closed */
        return n;
    }
    if (ev & (EPOLLRDHUP | EPOLLHUP | EPOLLERR))
        f->hup = 1;
    if (ev & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR))
        f->readable = 1;
    if (ev & (EPOLLOUT | EPOLLHUP | EPOLLERR))
        f->write_blocked = 0;
    if (n < max)
        n = run_fd(p, f, out, n, max, &more);
    else
        more = f->rhead != NULL || f->whead != NULL;
    port_spin_unlock(&f->lock);
    after_visit(p, f, more);
    return n;
}

/* Visit the descriptors queued as ready, each at most once per call. */
static int run_ready(ep_port_t *p, port_cqe_t *out, int n, int max) {
    uint32_t todo;
    if (__atomic_load_n(&p->rq_head, __ATOMIC_ACQUIRE) == NULL)
        return n;
    port_spin_lock(&p->rq_lock);
    todo = p->rq_len;
    port_spin_unlock(&p->rq_lock);
    while (todo-- > 0 && n < max) {
        int more = 0;
        ep_fd_t *f = rq_pop(p);
        if (f == NULL)
            break;
        port_spin_lock(&f->lock);
        n = run_fd(p, f, out, n, max, &more);
        port_spin_unlock(&f->lock);
        after_visit(p, f, more);
    }
    return n;
}

/* ---- timers --------------------------------------------------------------------------- */

/* Deliver expired timers, earliest first, under the timers' lock (which orders them). */
static int run_timers(ep_port_t *p, port_cqe_t *out, int n, int max, int64_t *now) {
    int64_t d = port__timers_next(&p->timers);
    if (d == PORT_NO_DEADLINE || n >= max)
        return n;
    return port__timers_run(&p->timers, &p->base, clock_once(now), out, n, max);
}

/* ---- waiting -------------------------------------------------------------------------- */

/* with_ready is 0 right after processing events: a descriptor they left with more to
 * read was queued for a later visit, not a second one in the same batch.
 *
 * The completion queue and the ready queue take turns going first whenever the one that
 * went first filled the batch: either can stay non-empty for as long as the load lasts
 * (sends completed at once, posts; descriptors re-queued for fairness), and the other
 * must not wait for that to end.  Their order is free: one operation's completions all
 * come from one of them, and an operation cancelled from one leaves the other. */
static int collect(ep_port_t *p, port_cqe_t *out, int n, int max, int with_ready,
                   int64_t *now) {
    n = run_timers(p, out, n, max, now);
    if (with_ready && tls_ready_first == p) {
        tls_ready_first = NULL;
        n = run_ready(p, out, n, max);
        return drain_cq(p, out, n, max);
    }
    n = drain_cq(p, out, n, max);
    if (!with_ready)
        return n;
    if (n >= max && __atomic_load_n(&p->rq_head, __ATOMIC_ACQUIRE) != NULL)
        tls_ready_first = p;
    return run_ready(p, out, n, max);
}

static int ep_wait(port_t *bp, port_cqe_t *out, int max, int timeout_ms) {
    ep_port_t *p = (ep_port_t *)bp;
    struct epoll_event evs[EV_BATCH];
    int n = 0, polled = 0, err = 0;
    int64_t deadline = timeout_ms > 0 ? port__now_ns() + (int64_t)timeout_ms * 1000000 : 0;

    tls_batch = NULL;
    if (tls_owed == p)
        tls_owed = NULL;   /* this thread is about to look at the queues itself */
    if (port_atomic_load32(&p->base.closed))
        return PORT_ECLOSED;
    if (out == NULL || max <= 0)
        return PORT_EINVAL;
    for (;;) {
        int tmo, k, i, room, sleeping = 0;
        int64_t now = 0;   /* read at most once before epoll_wait, once after */

        if (port_atomic_load32(&p->base.closed))
            break;
        n = collect(p, out, n, max, 1, &now);
        /* Queued work is ready: return it without a system call, unless this thread's
         * previous batch already skipped epoll.  Then poll too, even when the queues
         * alone filled the batch: under load they can fill every batch (descriptors
         * re-queued for fairness, sends completed at once), and a receive parked until
         * its socket's next edge would wait for as long as that lasts. */
        if (n > 0 && (polled || tls_skipped != p))
            break;
        if (n > 0 || timeout_ms == 0) {
            tmo = 0;
        } else {
            int64_t d;
            /* Announce the sleep, then look once more (see wake_now). */
            __atomic_add_fetch(&p->sleepers, 1, __ATOMIC_SEQ_CST);
            sleeping = 1;
            if (work_pending(p, &now)) {
                __atomic_sub_fetch(&p->sleepers, 1, __ATOMIC_SEQ_CST);
                continue;
            }
            tmo = -1;
            if (timeout_ms > 0) {
                tmo = ms_until(deadline, clock_once(&now));
                if (tmo == 0) {
                    __atomic_sub_fetch(&p->sleepers, 1, __ATOMIC_SEQ_CST);
                    break;
                }
            }
            d = port__timers_next(&p->timers);
            if (d != PORT_NO_DEADLINE) {
                int t = ms_until(d, clock_once(&now));
                if (tmo < 0 || t < tmo)
                    tmo = t;
            }
        }
        room = max - n;
        if (room > EV_BATCH || room < 1)
            room = EV_BATCH;   /* events past the batch's room wait in the ready queue */
        k = epoll_wait(p->epfd, evs, room, tmo);
        if (sleeping)
            __atomic_sub_fetch(&p->sleepers, 1, __ATOMIC_SEQ_CST);
        port_atomic_add64(&p->base.waits, 1);
        polled = 1;
        if (k < 0) {
            /* EINTR goes back to the caller, which runs its signal handlers (Ctrl-C). */
            err = errno == EINTR ? PORT_EINTR : port_err_from_os(errno);
            break;
        }
        for (i = 0; i < k; i++) {
            if (evs[i].data.u64 == EV_WAKE) {
                /* Clear before looking at the queues, so a producer that saw the flag
                 * set has its work seen by us. */
                port_atomic_xchg32(&p->wake_pending, 0);
                continue;
            }
            n = on_event(p, evs[i].data.u64, evs[i].events, out, n, max);
        }
        if (n > 0 || timeout_ms == 0) {
            now = 0;   /* epoll_wait may have slept */
            n = collect(p, out, n, max, 0, &now);
            break;
        }
    }
    tls_skipped = (n > 0 && !polled) ? p : NULL;
    /* Work we had no room for goes to a sleeping thread rather than waiting for us. */
    if (n > 0 && (__atomic_load_n(&p->cq_head, __ATOMIC_ACQUIRE) != NULL ||
                  __atomic_load_n(&p->rq_head, __ATOMIC_ACQUIRE) != NULL))
        wake_now(p);
    if (n > 0)
        tls_batch = p;
    return port__wait_result(&p->base, n, err);
}

static void ep_batch_end(port_t *bp) {
    ep_port_t *p = (ep_port_t *)bp;
    if (tls_batch == p)
        tls_batch = NULL;
    if (tls_owed == p) {
        tls_owed = NULL;
        wake_now(p);   /* this thread will not wait soon: someone else must look */
    }
}

/* ---- setup ---------------------------------------------------------------------------- */

static void ep_free(ep_port_t *p) {
    port__ep_fdtab_free(p);
    port_mutex_destroy(&p->fdt_mutex);
    port__timers_destroy(&p->timers);
    port__bufpool_destroy(&p->pool);
    if (p->efd >= 0)
        close(p->efd);
    if (p->epfd >= 0)
        close(p->epfd);
    free(p);
}

static int os_error(int e, const char *what, char *errbuf, size_t errlen) {
    if (e == ENOSYS) {
        port__set_err(errbuf, errlen, "epoll: %s is not implemented by this kernel", what);
        return PORT_EUNAVAIL;
    }
    port__set_err(errbuf, errlen, "epoll: %s failed: %s", what, strerror(e));
    return e == ENOMEM ? PORT_ENOMEM : port_err_from_os(e);
}

static int ep_probe(char *errbuf, size_t errlen) {
    int e, epfd, efd;
    epfd = epoll_create1(EPOLL_CLOEXEC);
    if (epfd < 0)
        return os_error(errno, "epoll_create1", errbuf, errlen);
    efd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    e = errno;
    close(epfd);
    if (efd < 0)
        return os_error(e, "eventfd", errbuf, errlen);
    close(efd);
    return 0;
}

static int ep_create(port_t **out, const port_options_t *opts, char *errbuf, size_t errlen) {
    struct epoll_event ev;
    ep_port_t *p;
    int rc;

    *out = NULL;
    p = (ep_port_t *)calloc(1, sizeof(*p));
    if (p == NULL) {
        port__set_err(errbuf, errlen, "epoll: out of memory");
        return PORT_ENOMEM;
    }
    port__init_common(&p->base, &port__epoll_vtable, opts);
    p->epfd = p->efd = -1;
    port__timers_init(&p->timers, offsetof(port_op_t, priv) + offsetof(ep_op_t, u.timer));
    port_mutex_init(&p->fdt_mutex);

    p->epfd = epoll_create1(EPOLL_CLOEXEC);
    if (p->epfd < 0) {
        rc = os_error(errno, "epoll_create1", errbuf, errlen);
        goto fail;
    }
    p->efd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (p->efd < 0) {
        rc = os_error(errno, "eventfd", errbuf, errlen);
        goto fail;
    }
    memset(&ev, 0, sizeof(ev));
    ev.events = EPOLLIN | EPOLLET;
    ev.data.u64 = EV_WAKE;
    if (epoll_ctl(p->epfd, EPOLL_CTL_ADD, p->efd, &ev) < 0) {
        rc = os_error(errno, "epoll_ctl(eventfd)", errbuf, errlen);
        goto fail;
    }

    if (port__ep_fdtab_init(p) != 0) {
        port__set_err(errbuf, errlen, "epoll: out of memory");
        rc = PORT_ENOMEM;
        goto fail;
    }
    p->recv_armed = (p->base.opts.flags & PORT_OPT_RECV_MULTISHOT) != 0;
    p->arm_bytes = p->base.opts.recv_buffer_size > UINT32_MAX / EP_ARM_BUFFERS
                       ? UINT32_MAX : p->base.opts.recv_buffer_size * EP_ARM_BUFFERS;
    rc = port__bufpool_init(&p->pool, &p->base, "epoll", errbuf, errlen);
    if (rc != 0)
        goto fail;
    *out = &p->base;
    return 0;

fail:
    ep_free(p);
    return rc;
}

static void ep_shutdown(port_t *bp) {
    ep_port_t *p = (ep_port_t *)bp;
    struct epoll_event ev;
    uint64_t one = 1;
    if (port_atomic_xchg32(&p->base.closed, 1))
        return;
    /* Level-triggered from now on, with the counter never read back: every epoll_wait,
     * present or future, in however many threads, returns at once. */
    memset(&ev, 0, sizeof(ev));
    ev.events = EPOLLIN;
    ev.data.u64 = EV_WAKE;
    (void)epoll_ctl(p->epfd, EPOLL_CTL_MOD, p->efd, &ev);
    while (write(p->efd, &one, sizeof(one)) < 0 && errno == EINTR) {
    }
}

static void ep_destroy(port_t *bp) {
    ep_port_t *p = (ep_port_t *)bp;
    port_atomic_store32(&p->base.closed, 1);
    if (tls_batch == p)
        tls_batch = NULL;
    if (tls_owed == p)
        tls_owed = NULL;
    if (tls_skipped == p)
        tls_skipped = NULL;
    if (tls_ready_first == p)
        tls_ready_first = NULL;
    ep_free(p);
}

static int ep_accept_peer(const port_op_t *op, port_addr_t *out) {
    return port__peer_get(&OP_PRIV(op)->u.acc, out);
}

static int64_t ep_pool_trim(port_t *bp, int64_t keep, int *more) {
    PORT_UNUSED(more);
    return port__bufpool_trim(&((ep_port_t *)bp)->pool, keep);
}

const port_vtable_t port__epoll_vtable = {
    "epoll",
    ep_probe,
    ep_create,
    ep_shutdown,
    ep_destroy,
    ep_wait,
    ep_batch_end,
    port__ep_accept,
    port__ep_connect,
    port__ep_recv,
    ep_recv_release,
    port__ep_send,
    port__ep_close,
    port__ep_cancel,
    port__ep_post,
    port__ep_timer,
    port__ep_listen,
    port__ep_sock_close,
    port__ep_send_now,
    NULL,
    ep_accept_peer,
    NULL,   /* stop_listener: a cancel finds a parked accept at once */
    NULL,   /* work_waiting: no cheap look without a system call */
    NULL,   /* buffers_out: counted */
    NULL,   /* accept_multishot: each parked accept completes once (the Listener posts
             * one per slot) */
    ep_pool_trim,
};
#endif /* __linux__ */

