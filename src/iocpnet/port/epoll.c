/*
 * epoll.c -- the Linux fallback port: completions emulated on a readiness reactor.
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
 *     completing with PORT_CQE_MORE until a final completion.  Either way all reads of a
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
 *     message.  The exception is a peer that has shut down or errored (RDHUP/HUP/ERR
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
 *   - Receive buffers come from the port's pool: up to `recv_buffer_count` heap blocks of
 *     `recv_buffer_size` bytes, each made the first time it is needed; freed ones are
 *     reused last-in first-out, so the memory touched follows the peak of data in
 *     flight, not the number of connections, and an idle connection holds none.  One
 *     the caller keeps for good (port_recv_detach) is replaced by a new block.  A
 *     descriptor with data but no free buffer waits on the pool's FIFO; each buffer
 *     given back wakes one waiting descriptor, oldest first, at once (not when the
 *     releasing thread's batch ends: a hook later in that batch may block), and a
 *     descriptor woken that no longer wants a buffer passes the wake on, so data is
 *     never dropped and nothing spins.
 *
 *   - Descriptors.  Every operation on a socket runs under its descriptor's lock, and
 *     a close first forgets the descriptor under that lock (parked operations end with
 *     PORT_ECANCELED) and only then calls close(2): nothing submitted before the close
 *     can run after it, on a number that may belong to a new socket by then.
 *
 *   - Timers live in a min-heap ordered by (deadline, submission order).  Waiters clamp
 *     their epoll_wait timeout to the earliest deadline; a new earliest timer wakes a
 *     sleeper so it can shorten its sleep.
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
#ifndef _GNU_SOURCE
#  define _GNU_SOURCE 1   /* accept4 */
#endif
#include "port_int.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#ifndef IOV_MAX
#  define IOV_MAX 1024
#endif

#define EV_WAKE (~(uint64_t)0)   /* epoll data of the eventfd; no descriptor looks like it */
#define EV_BATCH 128             /* most events taken from one epoll_wait */
#define READ_BUDGET 4            /* most buffers read from one descriptor per visit */
#define FD_CHUNK_SHIFT 8
#define FD_CHUNK (1u << FD_CHUNK_SHIFT)
#define HEAP_NONE UINT32_MAX
#define NO_DEADLINE INT64_MAX

/* op state (ep_op_t.state) */
#define EP_IDLE 0    /* not parked or queued: running, or being delivered */
#define EP_PARKED 1  /* on its descriptor's read or write list */
#define EP_QUEUED 2  /* on the completion queue */

/* What an op keeps while in flight, inside port_op_t.priv. */
typedef struct ep_op {
    port_op_t *next;          /* descriptor list or completion queue */
    port_op_t *prev;          /* descriptor list: O(1) unlink when cancelled */
    int64_t res;              /* result of a queued completion */
    union {
        struct {
            const port_buf_t *bufs;   /* send: the caller keeps them valid until completion */
            int32_t nbufs;
        } send;
        struct {
            int64_t deadline;         /* CLOCK_MONOTONIC ns */
            uint64_t seq;             /* equal deadlines fire in submission order */
        } timer;
    } u;
    uint32_t heap_idx;        /* timer: position in the heap, HEAP_NONE when not in it */
    uint8_t state;            /* EP_* */
} ep_op_t;

PORT_STATIC_ASSERT(sizeof(ep_op_t) <= sizeof(((port_op_t *)0)->priv), ep_op_fits);
PORT_STATIC_ASSERT(sizeof(port_buf_t) == sizeof(struct iovec), iovec_size);
PORT_STATIC_ASSERT(offsetof(port_buf_t, base) == offsetof(struct iovec, iov_base), iovec_base);
PORT_STATIC_ASSERT(offsetof(port_buf_t, len) == offsetof(struct iovec, iov_len), iovec_len);

#define OP_PRIV(op) ((ep_op_t *)(void *)(op)->priv)
#define OP_STATE(op) __atomic_load_n(&OP_PRIV(op)->state, __ATOMIC_RELAXED)
#define OP_SET_STATE(op, s) __atomic_store_n(&OP_PRIV(op)->state, (uint8_t)(s), __ATOMIC_RELAXED)

/* Per-descriptor state.  Records live in chunks that are never moved or freed before the
 * port is, so a pointer to one stays valid whatever happens to the socket. */
typedef struct ep_fd ep_fd_t;
struct ep_fd {
    /* under `lock` */
    volatile int32_t lock;
    uint32_t gen;             /* bumped at each close: events of an older socket are stale */
    int32_t fd;               /* fixed: the record's index */
    uint8_t registered;       /* this socket life is in the epoll set */
    uint8_t readable;         /* read edge seen, no EAGAIN (or short read) since */
    uint8_t write_blocked;    /* a write said EAGAIN, no EPOLLOUT edge since */
    uint8_t hup;              /* RDHUP/HUP/ERR seen (sticky): read on until 0 or error */
    port_op_t *rhead, *rtail; /* parked accepts / receives, FIFO */
    port_op_t *whead, *wtail; /* parked connect / sends, FIFO */
    /* under the port's rq_lock */
    uint8_t in_ready;
    ep_fd_t *ready_next;
    /* under the port's pool_lock */
    uint8_t buf_wait;         /* on the pool's wait list */
    uint8_t buf_woken;        /* woken by a released buffer: must use it or pass it on
                                 (atomic: peeked at without the lock) */
    ep_fd_t *wait_next;
};

/* The fd table: chunk pointers, grown by replacing the array.  Replaced arrays are kept
 * until the port is destroyed, because a lock-free reader may still be looking at one. */
typedef struct ep_fdtab {
    struct ep_fdtab *retired;
    uint32_t nchunks;
    ep_fd_t *chunks[];
} ep_fdtab_t;

typedef struct ep_port {
    port_t base;
    int epfd;
    int efd;                          /* eventfd: wakes sleepers */

    /* completion queue (final completions found outside the wait path) */
    volatile int32_t cq_lock;
    port_op_t *cq_head, *cq_tail;

    /* descriptors a waiter should visit */
    volatile int32_t rq_lock;
    ep_fd_t *rq_head, *rq_tail;
    uint32_t rq_len;

    /* timers */
    volatile int32_t tm_lock;
    port_op_t **heap;
    uint32_t heap_len, heap_cap;
    uint64_t tm_seq;
    volatile int64_t next_deadline;   /* heap top's deadline, NO_DEADLINE when empty */

    /* descriptors */
    port_mutex_t fdt_mutex;
    ep_fdtab_t *fdt;                  /* atomic pointer; written under fdt_mutex */

    /* receive buffer pool */
    volatile int32_t pool_lock;
    char **buf_addr;                  /* buffer id -> its memory (NULL: not made yet) */
    uint32_t buf_size, buf_max, buf_made;
    uint32_t *free_ids;               /* LIFO stack of free buffer ids */
    uint32_t nfree;
    ep_fd_t *wait_head, *wait_tail;   /* descriptors waiting for a buffer, FIFO */

    int recv_armed;                   /* receives stay armed (PORT_OPT_RECV_MULTISHOT) */

    /* wakeups */
    volatile int32_t sleepers;        /* threads in (or entering) a blocking epoll_wait */
    volatile int32_t wake_pending;    /* an eventfd write not yet seen by a waiter */
} ep_port_t;

/* The port whose batch this thread is dispatching: it wakes nobody for that port. */
static PORT_THREAD_LOCAL ep_port_t *tls_batch;
/* A wake this thread skipped while dispatching; port_batch_end pays it. */
static PORT_THREAD_LOCAL ep_port_t *tls_owed;
/* This thread's last wait on the port returned queued work without polling epoll. */
static PORT_THREAD_LOCAL ep_port_t *tls_skipped;
/* This thread's last batch was filled by queued completions while descriptors waited in
 * the ready queue: they go first in its next one. */
static PORT_THREAD_LOCAL ep_port_t *tls_ready_first;

static int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

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

static void wake(ep_port_t *p) {
    if (tls_batch == p) {
        tls_owed = p;   /* our next port_wait looks at the queues anyway */
        return;
    }
    wake_now(p);
}

/* Something a waiter should act on without waiting for epoll (a sleeper's re-check). */
static int work_pending(ep_port_t *p) {
    int64_t d;
    if (__atomic_load_n(&p->cq_head, __ATOMIC_SEQ_CST) != NULL ||
        __atomic_load_n(&p->rq_head, __ATOMIC_SEQ_CST) != NULL)
        return 1;
    d = __atomic_load_n(&p->next_deadline, __ATOMIC_SEQ_CST);
    return d != NO_DEADLINE && d <= now_ns();
}

/* ---- completion queue ----------------------------------------------------------------- */

static void cq_push(ep_port_t *p, port_op_t *op, int64_t res) {
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

/* An error found at submit time, or any other result known at once. */
static int complete_later(ep_port_t *p, port_op_t *op, int64_t res) {
    cq_push(p, op, res);
    wake(p);
    return 0;
}

static int deliver_final(ep_port_t *p, port_op_t *op, int64_t res, port_cqe_t *out, int n) {
    port_cqe_t c;
    c.op = op;
    c.res = res;
    c.flags = 0;
    c.buf_id = 0;
    c.buf = NULL;
    port__completed(&p->base, op);
    return port__deliver(&p->base, out, out, n, &c);
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
        n = deliver_final(p, op, OP_PRIV(op)->res, out, n);
    }
    port_spin_unlock(&p->cq_lock);
    return n;
}

/* ---- ready queue ---------------------------------------------------------------------- */

/* Returns 1 if f was queued now (0: already queued). */
static int rq_push(ep_port_t *p, ep_fd_t *f) {
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

/* ---- descriptor table ----------------------------------------------------------------- */

static ep_fd_t *fd_find(ep_port_t *p, int fd) {
    ep_fdtab_t *t;
    ep_fd_t *c;
    uint32_t i;
    if (fd < 0)
        return NULL;
    t = __atomic_load_n(&p->fdt, __ATOMIC_ACQUIRE);
    i = (uint32_t)fd >> FD_CHUNK_SHIFT;
    if (i >= t->nchunks)
        return NULL;
    c = __atomic_load_n(&t->chunks[i], __ATOMIC_ACQUIRE);
    return c != NULL ? &c[(uint32_t)fd & (FD_CHUNK - 1)] : NULL;
}

/* The record for fd, made on first use (NULL: out of memory, or fd < 0). */
static ep_fd_t *fd_get(ep_port_t *p, int fd) {
    ep_fdtab_t *t;
    ep_fd_t *c;
    uint32_t i, j;
    ep_fd_t *f = fd_find(p, fd);
    if (f != NULL || fd < 0)
        return f;
    i = (uint32_t)fd >> FD_CHUNK_SHIFT;
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

static void list_append(port_op_t **head, port_op_t **tail, port_op_t *op) {
    OP_PRIV(op)->next = NULL;
    OP_PRIV(op)->prev = *tail;
    if (*tail != NULL)
        OP_PRIV(*tail)->next = op;
    else
        *head = op;
    *tail = op;
    OP_SET_STATE(op, EP_PARKED);
}

static void list_unlink(port_op_t **head, port_op_t **tail, port_op_t *op) {
    port_op_t *next = OP_PRIV(op)->next, *prev = OP_PRIV(op)->prev;
    if (prev != NULL)
        OP_PRIV(prev)->next = next;
    else
        *head = next;
    if (next != NULL)
        OP_PRIV(next)->prev = prev;
    else
        *tail = prev;
    OP_SET_STATE(op, EP_IDLE);
}

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
            cq_push(p, op, PORT_ECANCELED);
            k++;
        }
    }
    f->rhead = f->rtail = f->whead = f->wtail = NULL;
    f->gen++;
    f->registered = 0;
    f->readable = 0;
    f->write_blocked = 0;
    f->hup = 0;
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

/* A socket this port just created (accept, connect, listen): start a fresh life for its
 * number and register it. */
static int fd_adopt(ep_port_t *p, int fd, int *cancelled) {
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

/* ---- receive buffer pool -------------------------------------------------------------- */

static ep_fd_t *pool_wait_pop(ep_port_t *p) {
    ep_fd_t *w = p->wait_head;
    if (w != NULL) {
        p->wait_head = w->wait_next;
        if (p->wait_head == NULL)
            p->wait_tail = NULL;
        w->buf_wait = 0;
        port_atomic_add64(&p->base.recv_waiting, -1);
        __atomic_store_n(&w->buf_woken, 1, __ATOMIC_RELAXED);
    }
    return w;
}

/* A buffer for f's receive (1, *id and *buf set), 0 with f queued to be woken by the
 * next release, or -1 when memory for a new buffer cannot be had. */
static int pool_get(ep_port_t *p, ep_fd_t *f, uint32_t *id, char **buf) {
    int got = 1;
    port_spin_lock(&p->pool_lock);
    __atomic_store_n(&f->buf_woken, 0, __ATOMIC_RELAXED);
    if (p->nfree > 0) {
        *id = p->free_ids[--p->nfree];
    } else if (p->buf_made < p->buf_max) {
        *id = p->buf_made++;
        port_atomic_add64(&p->base.recv_buffers, 1);
    } else {
        got = 0;
        if (!f->buf_wait) {
            f->buf_wait = 1;
            port_atomic_add64(&p->base.recv_waiting, 1);
            f->wait_next = NULL;
            if (p->wait_tail != NULL)
                p->wait_tail->wait_next = f;
            else
                p->wait_head = f;
            p->wait_tail = f;
        }
    }
    port_spin_unlock(&p->pool_lock);
    if (got && p->buf_addr[*id] == NULL) {
        /* Made now (or its memory was kept by the caller and the replacement failed):
         * allocate outside the lock; the id is ours meanwhile. */
        char *b = port__buf_alloc(p->buf_size);
        if (b == NULL) {
            port_spin_lock(&p->pool_lock);
            p->free_ids[p->nfree++] = *id;
            port_spin_unlock(&p->pool_lock);
            return -1;
        }
        p->buf_addr[*id] = b;
    }
    if (got)
        *buf = p->buf_addr[*id];
    return got;
}

static void pool_put(ep_port_t *p, uint32_t id, char *fresh) {
    ep_fd_t *w = NULL;
    port_spin_lock(&p->pool_lock);
    /* An id never made, or one more release than buffers made, is a caller's bug that
     * would corrupt the stack: ignore it. */
    if (id < p->buf_made && p->nfree < p->buf_made) {
        if (fresh != NULL)
            p->buf_addr[id] = fresh;    /* the caller kept the old memory */
        p->free_ids[p->nfree++] = id;
        w = pool_wait_pop(p);
    } else if (fresh != NULL) {
        port_buf_free(fresh);
    }
    port_spin_unlock(&p->pool_lock);
    /* Now, not when this thread's batch ends: the waiter is another descriptor, and
     * the rest of the batch may take long (a hook that blocks). */
    if (w != NULL && rq_push(p, w))
        wake_now(p);
}

/* f was woken for a buffer but its visit did not take one (its receive was cancelled,
 * or its socket closed): hand the wake to the next waiting descriptor, or a free buffer
 * could sit unused while others wait. */
static void pool_pass(ep_port_t *p, ep_fd_t *f) {
    ep_fd_t *w = NULL;
    if (!__atomic_load_n(&f->buf_woken, __ATOMIC_ACQUIRE))
        return;
    port_spin_lock(&p->pool_lock);
    if (__atomic_load_n(&f->buf_woken, __ATOMIC_RELAXED)) {
        __atomic_store_n(&f->buf_woken, 0, __ATOMIC_RELAXED);
        if (p->nfree > 0 || p->buf_made < p->buf_max)
            w = pool_wait_pop(p);
    }
    port_spin_unlock(&p->pool_lock);
    /* Now, not when this thread's batch ends: the waiter is another descriptor, and
     * the rest of the batch may take long (a hook that blocks). */
    if (w != NULL && rq_push(p, w))
        wake_now(p);
}

static void ep_recv_release(port_t *bp, uint32_t id, char *fresh) {
    pool_put((ep_port_t *)bp, id, fresh);
}

/* ---- performing parked operations (wait path, f->lock held) --------------------------- */

static ssize_t send_bufs(int fd, const port_buf_t *bufs, int nbufs) {
    struct msghdr m;
    ssize_t r;
    memset(&m, 0, sizeof(m));
    m.msg_iov = (struct iovec *)(void *)bufs;
    /* Past IOV_MAX the kernel refuses the whole call; sending the first IOV_MAX buffers
     * is a partial send, which the contract allows and the caller continues from. */
    m.msg_iovlen = (size_t)(nbufs > IOV_MAX ? IOV_MAX : nbufs);
    do
        r = sendmsg(fd, &m, MSG_NOSIGNAL | MSG_DONTWAIT);
    while (r < 0 && errno == EINTR);
    return r;
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
            int e, cancelled = 0, fd = accept4(f->fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
            if (fd >= 0) {
                /* Registered before the completion is seen, as port.h promises. */
                int rc = fd_adopt(p, fd, &cancelled);
                if (cancelled)
                    wake(p);
                list_unlink(&f->rhead, &f->rtail, op);
                if (rc != 0) {
                    close(fd);
                    n = deliver_final(p, op, rc, out, n);
                } else {
                    n = deliver_final(p, op, fd, out, n);
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
            n = deliver_final(p, op, port_err_from_os(e), out, n);
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
            int e;
            char *buf;
            if (budget == 0) {
                *more = 1;   /* fairness: come back on a later visit */
                break;
            }
            got = pool_get(p, f, &id, &buf);
            if (got == 0)
                break;       /* parked until a buffer is released */
            if (got < 0) {
                list_unlink(&f->rhead, &f->rtail, op);
                n = deliver_final(p, op, PORT_ENOMEM, out, n);
                continue;
            }
            got = recv(f->fd, buf, p->buf_size, MSG_DONTWAIT);
            e = errno;   /* pool_put below may write the eventfd */
            if (got > 0) {
                port_cqe_t c;
                c.op = op;
                c.res = got;
                c.flags = PORT_CQE_BUFFER;
                c.buf_id = id;
                c.buf = buf;
                budget--;
                if ((size_t)got < p->buf_size && !f->hup)
                    f->readable = 0;   /* drained; later data raises a new edge */
                port_atomic_add64(&p->base.recv_buffers_out, 1);
                if (p->recv_armed) {
                    c.flags |= PORT_CQE_MORE;
                } else {
                    list_unlink(&f->rhead, &f->rtail, op);
                    port__completed(&p->base, op);
                }
                n = port__deliver(&p->base, out, out, n, &c);
                continue;
            }
            pool_put(p, id, NULL);
            if (got == 0) {
                list_unlink(&f->rhead, &f->rtail, op);
                n = deliver_final(p, op, 0, out, n);
                continue;
            }
            if (e == EAGAIN || e == EWOULDBLOCK) {
                f->readable = 0;
                break;
            }
            if (e == EINTR)
                continue;
            list_unlink(&f->rhead, &f->rtail, op);
            n = deliver_final(p, op, port_err_from_os(e), out, n);
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
            ssize_t r = send_bufs(f->fd, OP_PRIV(op)->u.send.bufs, OP_PRIV(op)->u.send.nbufs);
            if (r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
                f->write_blocked = 1;
                break;
            }
            res = r >= 0 ? (int64_t)r : port_err_from_os(errno);
        }
        list_unlink(&f->whead, &f->wtail, op);
        n = deliver_final(p, op, res, out, n);
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
        rq_push(p, f);   /* the end of port_wait wakes a sleeper if it cannot take it */
    else
        pool_pass(p, f);
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

static int tm_before(port_op_t *a, port_op_t *b) {
    ep_op_t *x = OP_PRIV(a), *y = OP_PRIV(b);
    return x->u.timer.deadline < y->u.timer.deadline ||
           (x->u.timer.deadline == y->u.timer.deadline && x->u.timer.seq < y->u.timer.seq);
}

static void heap_set(ep_port_t *p, uint32_t i, port_op_t *op) {
    p->heap[i] = op;
    OP_PRIV(op)->heap_idx = i;
}

static void heap_up(ep_port_t *p, uint32_t i) {
    port_op_t *op = p->heap[i];
    while (i > 0) {
        uint32_t parent = (i - 1) / 2;
        if (!tm_before(op, p->heap[parent]))
            break;
        heap_set(p, i, p->heap[parent]);
        i = parent;
    }
    heap_set(p, i, op);
}

static void heap_down(ep_port_t *p, uint32_t i) {
    port_op_t *op = p->heap[i];
    for (;;) {
        uint32_t c = 2 * i + 1;
        if (c >= p->heap_len)
            break;
        if (c + 1 < p->heap_len && tm_before(p->heap[c + 1], p->heap[c]))
            c++;
        if (!tm_before(p->heap[c], op))
            break;
        heap_set(p, i, p->heap[c]);
        i = c;
    }
    heap_set(p, i, op);
}

static void heap_remove(ep_port_t *p, port_op_t *op) {
    uint32_t i = OP_PRIV(op)->heap_idx;
    port_op_t *last = p->heap[--p->heap_len];
    OP_PRIV(op)->heap_idx = HEAP_NONE;
    if (last != op) {
        heap_set(p, i, last);
        heap_down(p, i);
        heap_up(p, OP_PRIV(last)->heap_idx);
    }
}

static void tm_publish(ep_port_t *p) {
    int64_t d = p->heap_len ? OP_PRIV(p->heap[0])->u.timer.deadline : NO_DEADLINE;
    __atomic_store_n(&p->next_deadline, d, __ATOMIC_SEQ_CST);
}

/* Deliver expired timers, earliest first, under tm_lock (which orders them). */
static int run_timers(ep_port_t *p, port_cqe_t *out, int n, int max) {
    int64_t now, d = __atomic_load_n(&p->next_deadline, __ATOMIC_ACQUIRE);
    if (d == NO_DEADLINE || n >= max)
        return n;
    now = now_ns();
    if (d > now)
        return n;
    port_spin_lock(&p->tm_lock);
    while (n < max && p->heap_len > 0 && OP_PRIV(p->heap[0])->u.timer.deadline <= now) {
        port_op_t *op = p->heap[0];
        heap_remove(p, op);
        n = deliver_final(p, op, 0, out, n);
    }
    tm_publish(p);
    port_spin_unlock(&p->tm_lock);
    return n;
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
static int collect(ep_port_t *p, port_cqe_t *out, int n, int max, int with_ready) {
    n = run_timers(p, out, n, max);
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
    int64_t deadline = timeout_ms > 0 ? now_ns() + (int64_t)timeout_ms * 1000000 : 0;

    tls_batch = NULL;
    if (tls_owed == p)
        tls_owed = NULL;   /* this thread is about to look at the queues itself */
    if (port_atomic_load32(&p->base.closed))
        return PORT_ECLOSED;
    if (out == NULL || max <= 0)
        return PORT_EINVAL;
    for (;;) {
        int tmo, k, i, room, sleeping = 0;

        if (port_atomic_load32(&p->base.closed))
            break;
        n = collect(p, out, n, max, 1);
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
            int64_t now, d;
            /* Announce the sleep, then look once more (see wake_now). */
            __atomic_add_fetch(&p->sleepers, 1, __ATOMIC_SEQ_CST);
            sleeping = 1;
            if (work_pending(p)) {
                __atomic_sub_fetch(&p->sleepers, 1, __ATOMIC_SEQ_CST);
                continue;
            }
            now = now_ns();
            tmo = -1;
            if (timeout_ms > 0) {
                tmo = ms_until(deadline, now);
                if (tmo == 0) {
                    __atomic_sub_fetch(&p->sleepers, 1, __ATOMIC_SEQ_CST);
                    break;
                }
            }
            d = __atomic_load_n(&p->next_deadline, __ATOMIC_SEQ_CST);
            if (d != NO_DEADLINE) {
                int t = ms_until(d, now);
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
            n = collect(p, out, n, max, 0);
            break;
        }
    }
    tls_skipped = (n > 0 && !polled) ? p : NULL;
    /* Work we had no room for goes to a sleeping thread rather than waiting for us. */
    if (n > 0 && (__atomic_load_n(&p->cq_head, __ATOMIC_ACQUIRE) != NULL ||
                  __atomic_load_n(&p->rq_head, __ATOMIC_ACQUIRE) != NULL))
        wake_now(p);
    if (n > 0) {
        tls_batch = p;
        return n;
    }
    if (port_atomic_load32(&p->base.closed))
        return PORT_ECLOSED;
    return err;
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

/* ---- operations ----------------------------------------------------------------------- */

/* Accepts and receives are performed in the wait path only (see the top); arming one
 * parks it and, if the socket is already known readable, queues the socket as ready. */
static int arm_read(ep_port_t *p, port_op_t *op, port_sock_t sock) {
    int rc, ready;
    ep_fd_t *f;
    op->sock = sock;
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
    if (ready && rq_push(p, f))
        wake(p);
    return 0;
}

static int ep_accept(port_t *bp, port_op_t *op, port_sock_t listener) {
    return arm_read((ep_port_t *)bp, op, listener);
}

static int ep_recv(port_t *bp, port_op_t *op, port_sock_t sock) {
    return arm_read((ep_port_t *)bp, op, sock);
}

static int ep_connect(port_t *bp, port_op_t *op, const port_addr_t *addr) {
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
                wake(p);
            return 0;
        }
    }
    port_spin_unlock(&f->lock);
    return complete_later(p, op, rc);
}

static int ep_send(port_t *bp, port_op_t *op, port_sock_t sock, const port_buf_t *bufs,
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
        ssize_t r = send_bufs(f->fd, bufs, nbufs);
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

/* port_send_now: the same attempt ep_send makes first, without an operation.  Nothing
 * is parked on the socket's write side (the caller has no send in flight) unless a
 * connect is; a socket known to be full is not tried. */
static int64_t ep_send_now(port_t *bp, port_sock_t sock, const port_buf_t *bufs, int nbufs) {
    ep_port_t *p = (ep_port_t *)bp;
    ep_fd_t *f = fd_find(p, sock);
    int64_t res = 0;
    if (f == NULL)
        return port__posix_send_now(sock, bufs, nbufs);
    port_spin_lock(&f->lock);
    if (f->whead == NULL && !f->write_blocked)
        res = port__posix_send_now(f->fd, bufs, nbufs);
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

static int ep_close(port_t *bp, port_op_t *op, port_sock_t sock, int flags) {
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

static int ep_sock_close(port_t *bp, port_sock_t s, int flags) {
    ep_port_t *p = (ep_port_t *)bp;
    if (forget_sock(p, s))
        wake(p);
    return port__posix_close(s, flags);
}

static int ep_cancel(port_t *bp, port_op_t *t) {
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
            cq_push(p, t, PORT_ECANCELED);
            found = 1;
        }
        port_spin_unlock(&f->lock);
        break;
    }
    case PORT_OP_TIMER:
        port_spin_lock(&p->tm_lock);
        if (OP_PRIV(t)->heap_idx != HEAP_NONE && OP_PRIV(t)->heap_idx < p->heap_len &&
            p->heap[OP_PRIV(t)->heap_idx] == t) {
            heap_remove(p, t);
            tm_publish(p);
            found = 1;
        }
        port_spin_unlock(&p->tm_lock);
        if (found)
            cq_push(p, t, PORT_ECANCELED);
        break;
    default:
        break;   /* posts and closes are already complete */
    }
    if (found)
        wake(p);
    return 0;
}

static int ep_post(port_t *bp, port_op_t *op, int64_t value) {
    port__submitted(bp, op);
    return complete_later((ep_port_t *)bp, op, value);
}

static int ep_timer(port_t *bp, port_op_t *op, uint64_t ms) {
    ep_port_t *p = (ep_port_t *)bp;
    int earliest;
    /* Clamp so that now + ms cannot overflow: a few centuries is "never". */
    uint64_t capped = ms > (uint64_t)1 << 42 ? (uint64_t)1 << 42 : ms;
    OP_PRIV(op)->heap_idx = HEAP_NONE;
    OP_PRIV(op)->u.timer.deadline = now_ns() + (int64_t)capped * 1000000;
    port__submitted(bp, op);
    port_spin_lock(&p->tm_lock);
    while (p->heap_len == p->heap_cap) {
        /* Grow outside the lock; the array only grows, to the peak of pending timers. */
        uint32_t cap = p->heap_cap ? p->heap_cap * 2 : 64;
        port_op_t **nh;
        port_spin_unlock(&p->tm_lock);
        nh = (port_op_t **)malloc((size_t)cap * sizeof(*nh));
        if (nh == NULL)
            return complete_later(p, op, PORT_ENOMEM);
        port_spin_lock(&p->tm_lock);
        if (p->heap_cap < cap) {
            port_op_t **old = p->heap;
            if (p->heap_len)
                memcpy(nh, p->heap, (size_t)p->heap_len * sizeof(*nh));
            p->heap = nh;
            p->heap_cap = cap;
            nh = old;
        }
        free(nh);
    }
    OP_PRIV(op)->u.timer.seq = p->tm_seq++;
    OP_SET_STATE(op, EP_IDLE);
    p->heap[p->heap_len] = op;
    heap_up(p, p->heap_len++);
    earliest = OP_PRIV(op)->heap_idx == 0;
    if (earliest)
        tm_publish(p);
    port_spin_unlock(&p->tm_lock);
    if (earliest)
        wake(p);   /* a sleeper may be waiting for a later deadline */
    return 0;
}

static int ep_listen(port_t *bp, const port_addr_t *addr, int backlog, int flags,
                     port_sock_t *out) {
    ep_port_t *p = (ep_port_t *)bp;
    int fd, rc, cancelled = 0;
    rc = port__posix_listen_socket(addr, backlog, flags, &fd);
    if (rc != 0)
        return rc;
    rc = fd_adopt(p, fd, &cancelled);
    if (cancelled)
        wake(p);
    if (rc != 0) {
        close(fd);
        return rc;
    }
    *out = fd;
    return 0;
}

/* ---- setup ---------------------------------------------------------------------------- */

static void ep_free(ep_port_t *p) {
    ep_fdtab_t *t, *next;
    uint32_t i;
    if (p->fdt != NULL) {
        for (i = 0; i < p->fdt->nchunks; i++)
            free(p->fdt->chunks[i]);
        for (t = p->fdt; t != NULL; t = next) {
            next = t->retired;
            free(t);
        }
    }
    port_mutex_destroy(&p->fdt_mutex);
    free(p->heap);
    free(p->free_ids);
    if (p->buf_addr != NULL) {
        for (i = 0; i < p->buf_made; i++)
            port_buf_free(p->buf_addr[i]);   /* the pool's; kept ones were replaced */
        free(p->buf_addr);
    }
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
    p->next_deadline = NO_DEADLINE;
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

    p->fdt = (ep_fdtab_t *)calloc(1, sizeof(ep_fdtab_t) + 64 * sizeof(ep_fd_t *));
    if (p->fdt == NULL)
        goto nomem;
    p->fdt->nchunks = 64;

    p->recv_armed = (p->base.opts.flags & PORT_OPT_RECV_MULTISHOT) != 0;
    p->buf_size = p->base.opts.recv_buffer_size;
    p->buf_max = p->base.opts.recv_buffer_count;
    if ((uint64_t)p->buf_max * p->buf_size > (uint64_t)(SIZE_MAX / 2)) {
        port__set_err(errbuf, errlen, "epoll: %u receive buffers of %u bytes do not fit "
                      "in the address space", p->buf_max, p->buf_size);
        rc = PORT_EINVAL;
        goto fail;
    }
    p->free_ids = (uint32_t *)malloc((size_t)p->buf_max * sizeof(uint32_t));
    if (p->free_ids == NULL)
        goto nomem;
    /* Buffers are made on first use, so the memory follows the peak of data in flight,
     * and LIFO reuse keeps the touched pages few. */
    p->buf_addr = (char **)calloc(p->buf_max, sizeof(char *));
    if (p->buf_addr == NULL)
        goto nomem;
    *out = &p->base;
    return 0;

nomem:
    port__set_err(errbuf, errlen, "epoll: out of memory");
    rc = PORT_ENOMEM;
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
    ep_free(p);
}

const port_vtable_t port__epoll_vtable = {
    "epoll",
    ep_probe,
    ep_create,
    ep_shutdown,
    ep_destroy,
    ep_wait,
    ep_batch_end,
    ep_accept,
    ep_connect,
    ep_recv,
    ep_recv_release,
    ep_send,
    ep_close,
    ep_cancel,
    ep_post,
    ep_timer,
    ep_listen,
    ep_sock_close,
    ep_send_now,
    NULL,
};
#endif /* __linux__ */
