/*
 * epoll_int.h -- what the two files of the epoll backend share: epoll.c (the reactor:
 * waiting, the queues, performing parked operations, set-up) and epoll_ops.c (the
 * descriptor table and each descriptor's life, and submitting, cancelling and closing
 * operations).  The model, the lock order and the invariants are in epoll.c's essay.
 *
 * Locks: each descriptor record's spin lock guards the fields marked "under lock"
 * below; the port's cq_lock, rq_lock, the pool's lock and the timers' lock guard their
 * own queues; fdt_mutex guards growing the descriptor table.
 */
#ifndef IOCPNET_EPOLL_INT_H
#define IOCPNET_EPOLL_INT_H

#ifndef _GNU_SOURCE
#  define _GNU_SOURCE 1   /* accept4 */
#endif
#include "port_int.h"
#include "bufpool.h"
#include "timer_heap.h"

#define FD_CHUNK_SHIFT 8
#define FD_CHUNK (1u << FD_CHUNK_SHIFT)

/* ep_fd_t.inq: a read that fills its buffer cannot tell whether more is queued, so the
 * first one on a socket turns TCP_INQ on; from then on each read says how much is left
 * (epoll.c, "Short reads"). */
#define EP_INQ_UNTRIED 0
#define EP_INQ_ON 1
#define EP_INQ_OFF 2  /* refused (not TCP): full reads read on until EAGAIN */

/* A receive kept armed ends (its completion is final, data and all) after this many
 * buffers' worth of bytes, after this many reads, or at the read after one that had to
 * wait behind its strand's holder (epoll.c, "Receives"). */
#define EP_ARM_BUFFERS 4u
#define EP_ARM_READS 64u

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
        port_tnode_t timer;           /* timer: its place in the heap (deadline in ns) */
        port__peer_t acc;             /* accept: the peer's address, from accept4 */
        struct {                      /* receive kept armed: what this arming may still do
                                         (epoll.c, "Receives") */
            uint32_t bytes;           /* bytes it may still read */
            uint16_t reads;           /* reads it may still make */
            uint8_t behind;           /* a read of it was queued behind its strand's holder */
        } recv;
    } u;
    uint8_t state;            /* EP_* */
} ep_op_t;

PORT_STATIC_ASSERT(sizeof(ep_op_t) <= sizeof(((port_op_t *)0)->priv), ep_op_fits);

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
    /* under `lock` (placed here, in in_ready's padding, to keep the record small) */
    uint8_t inq;              /* EP_INQ_*: does recv tell how much is left (TCP_INQ)? */
    ep_fd_t *ready_next;
    /* under the pool's lock: waiting for a receive buffer (bufpool.h) */
    port_bufwait_t bufwait;
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

    port_timers_t timers;

    /* descriptors */
    port_mutex_t fdt_mutex;
    ep_fdtab_t *fdt;                  /* atomic pointer; written under fdt_mutex */

    port_bufpool_t pool;              /* receive buffers; waiters are descriptors */

    int recv_armed;                   /* receives stay armed (PORT_OPT_RECV_MULTISHOT) */
    uint32_t arm_bytes;               /* ... each arming reading at most this much */

    /* wakeups */
    volatile int32_t sleepers;        /* threads in (or entering) a blocking epoll_wait */
    volatile int32_t wake_pending;    /* an eventfd write not yet seen by a waiter */
} ep_port_t;

/* The descriptor waiting for a buffer that w belongs to. */
#define FD_OF_BUFWAIT(w) PORT_CONTAINER_OF(w, ep_fd_t, bufwait)

/* ---- descriptor table (epoll_ops.c) ---------------------------------------------------- */

/* The record for fd if it was ever made (lock-free; NULL otherwise). */
static inline ep_fd_t *fd_find(ep_port_t *p, int fd) {
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

/* Make the record for fd >= 0 (its chunk, and a larger table if need be): NULL when
 * out of memory. */
ep_fd_t *port__ep_fd_make(ep_port_t *p, int fd);

/* The record for fd, made on first use (NULL: out of memory, or fd < 0). */
static inline ep_fd_t *fd_get(ep_port_t *p, int fd) {
    ep_fd_t *f = fd_find(p, fd);
    return f != NULL || fd < 0 ? f : port__ep_fd_make(p, fd);
}
int port__ep_fdtab_init(ep_port_t *p);
void port__ep_fdtab_free(ep_port_t *p);
/* A socket this port just created (accept, connect, listen): start a fresh life for its
 * number and register it; *cancelled counts the ops of the old life it cancelled. */
int port__ep_fd_adopt(ep_port_t *p, int fd, int *cancelled);

/* A descriptor's parked operations (f->lock held). */
static inline void list_append(port_op_t **head, port_op_t **tail, port_op_t *op) {
    OP_PRIV(op)->next = NULL;
    OP_PRIV(op)->prev = *tail;
    if (*tail != NULL)
        OP_PRIV(*tail)->next = op;
    else
        *head = op;
    *tail = op;
    OP_SET_STATE(op, EP_PARKED);
}

static inline void list_unlink(port_op_t **head, port_op_t **tail, port_op_t *op) {
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

/* ---- the reactor (epoll.c) ------------------------------------------------------------ */

/* Make sure some thread will look at the queues (deferred while this thread dispatches
 * a batch of p: its next port_wait looks anyway). */
void port__ep_wake(ep_port_t *p);
/* Queue op's final completion (res) for a waiter; the caller wakes one. */
void port__ep_cq_push(ep_port_t *p, port_op_t *op, int64_t res);
/* Queue f for a waiter to visit: 1 if queued now, 0 if it already was. */
int port__ep_rq_push(ep_port_t *p, ep_fd_t *f);

/* A result known at once (an error found at submit time, a send done at once, a post):
 * queued for a waiter, which is woken.  Returns 0, for the submit call to return. */
static inline int complete_later(ep_port_t *p, port_op_t *op, int64_t res) {
    port__ep_cq_push(p, op, res);
    port__ep_wake(p);
    return 0;
}

/* ---- submissions (epoll_ops.c), for the backend table in epoll.c ---------------------- */

int port__ep_accept(port_t *bp, port_op_t *op, port_sock_t listener);
int port__ep_connect(port_t *bp, port_op_t *op, const port_addr_t *addr);
int port__ep_recv(port_t *bp, port_op_t *op, port_sock_t sock);
int port__ep_send(port_t *bp, port_op_t *op, port_sock_t sock, const port_buf_t *bufs,
                  int nbufs);
int64_t port__ep_send_now(port_t *bp, port_sock_t sock, const port_buf_t *bufs, int nbufs);
int port__ep_close(port_t *bp, port_op_t *op, port_sock_t sock, int flags);
int port__ep_sock_close(port_t *bp, port_sock_t s, int flags);
int port__ep_cancel(port_t *bp, port_op_t *t);
int port__ep_post(port_t *bp, port_op_t *op, int64_t value);
int port__ep_timer(port_t *bp, port_op_t *op, uint64_t ms);
int port__ep_listen(port_t *bp, const port_addr_t *addr, int backlog, int flags,
                    port_sock_t *out);

#endif /* IOCPNET_EPOLL_INT_H */
