/*
 * bufpool.h -- receive buffers: the pool of the epoll and IOCP backends, and the queue of
 * receives waiting for a buffer, which io_uring's provided-buffer ring shares.
 *
 * A receive takes a buffer only when bytes are there (port.h, "Receive buffers"), so
 * the memory touched follows the peak of data being dispatched, not the number of
 * connections.  Each buffer is a heap block of its own (port__buf_alloc), known by an
 * id: one the caller keeps for good (port_recv_detach) leaves the pool, which puts a
 * new block under the same id, so what the application keeps never drains the pool.
 *
 * The pool (epoll, IOCP): up to `max` ids, each made the first time it is needed, and a
 * stack of free ids reused last-in first-out so that the pages touched stay few.  After
 * a spike, port_recv_pool_trim frees the blocks at the stack's bottom (the coldest)
 * beyond what the window's peak needs; their ids stay on the stack and are made again
 * if the stack ever drains that far.
 *
 * The wait queue (all three backends).  When every buffer is out, the receives with
 * data wait in arrival order, and each buffer given back wakes one of them, the oldest:
 * waking them all would cost each a wasted attempt per release, and the newest would
 * often win.  `woken` counts the waiters woken for a buffer whose outcome is not known
 * yet, and a waiter is woken only while more buffers are free than that, so one release
 * wakes one waiter.  A woken waiter's outcome is reported exactly once: it took a buffer
 * (port__bufpool_get), or it ended without one and passes the wake on (pass); one that
 * lost its buffer to another receive goes back to the head of the queue, still the
 * oldest.  The waiter is an epoll descriptor or an IOCP / io_uring receive operation:
 * each embeds a port_bufwait_t and finds itself again with PORT_CONTAINER_OF.
 *
 * Lock: the pool's spin lock (io_uring: its buffer-ring lock) guards the queue, the free
 * stack and the id table's entries; it is taken after a descriptor's lock and before
 * strand locks, and nothing that can block runs under it (blocks are allocated outside).
 */
#ifndef IOCPNET_BUFPOOL_H
#define IOCPNET_BUFPOOL_H

#include "port_int.h"

/* Embedded in whatever waits for a buffer. */
typedef struct port_bufwait port_bufwait_t;
struct port_bufwait {
    port_bufwait_t *next;         /* the queue, under its lock */
    volatile int32_t woken;       /* woken for a buffer, outcome not reported yet (set
                                     under the lock, peeked at without it) */
    uint8_t queued;               /* on the queue */
};

typedef struct port_bufwaitq {
    port_bufwait_t *head, *tail;
    uint32_t woken;               /* waiters woken and not resolved */
    volatile int64_t *waiting;    /* the port's recv_waiting counter */
} port_bufwaitq_t;

/* ---- the wait queue (callers hold its lock) ------------------------------------------- */

static inline void port__bufwaitq_init(port_bufwaitq_t *q, port_t *p) {
    q->head = q->tail = NULL;
    q->woken = 0;
    q->waiting = &p->recv_waiting;
}

/* Queue w at the back, or at the front for a woken waiter that lost its buffer. */
static inline void port__bufwaitq_push(port_bufwaitq_t *q, port_bufwait_t *w, int front) {
    w->queued = 1;
    port_atomic_add64(q->waiting, 1);
    if (front) {
        w->next = q->head;
        q->head = w;
        if (q->tail == NULL)
            q->tail = w;
    } else {
        w->next = NULL;
        if (q->tail != NULL)
            q->tail->next = w;
        else
            q->head = w;
        q->tail = w;
    }
}

/* The oldest waiter, woken, if `free` buffers are more than those already promised to
 * woken waiters; the caller re-arms it.  NULL otherwise. */
static inline port_bufwait_t *port__bufwaitq_wake(port_bufwaitq_t *q, int64_t free) {
    port_bufwait_t *w = q->head;
    if (w == NULL || free <= (int64_t)q->woken)
        return NULL;
    q->head = w->next;
    if (q->head == NULL)
        q->tail = NULL;
    w->queued = 0;
    port_atomic_add64(q->waiting, -1);
    port_atomic_store32(&w->woken, 1);
    q->woken++;
    return w;
}

/* Mark w woken without queueing it (a buffer is free for it right now). */
static inline void port__bufwaitq_claim(port_bufwaitq_t *q, port_bufwait_t *w) {
    port_atomic_store32(&w->woken, 1);
    q->woken++;
}

/* Report a woken waiter's outcome; returns whether w was woken. */
static inline int port__bufwaitq_resolve(port_bufwaitq_t *q, port_bufwait_t *w) {
    if (!port_atomic_load32(&w->woken))
        return 0;
    port_atomic_store32(&w->woken, 0);
    q->woken--;
    return 1;
}

/* Take w off the queue (its receive was cancelled); returns whether it was on it. */
static inline int port__bufwaitq_remove(port_bufwaitq_t *q, port_bufwait_t *w) {
    port_bufwait_t **pp, *prev = NULL;
    if (!w->queued)
        return 0;
    for (pp = &q->head; *pp != NULL; prev = *pp, pp = &(*pp)->next) {
        if (*pp == w) {
            *pp = w->next;
            if (q->tail == w)
                q->tail = prev;
            w->queued = 0;
            port_atomic_add64(q->waiting, -1);
            return 1;
        }
    }
    return 0;
}

/* Whether w was woken and has not reported its outcome (read without the lock by the
 * thread that owns w's receive). */
static inline int port__bufwait_woken(port_bufwait_t *w) {
    return port_atomic_load32(&w->woken) != 0;
}

/* ---- the pool (epoll, IOCP) ------------------------------------------------------------ */

typedef struct port_bufpool {
    volatile int32_t lock;
    port_t *port;                 /* its counters */
    char **addr;                  /* id -> its memory (NULL: not made yet) */
    uint32_t size, max, made;
    uint32_t *free_ids;           /* LIFO stack of free ids */
    uint32_t nfree;
    port_bufwaitq_t waiters;
} port_bufpool_t;

/* 0, or PORT_ENOMEM / PORT_EINVAL with the reason in errbuf ("<who>: ..."). */
int port__bufpool_init(port_bufpool_t *bp, port_t *p, const char *who, char *errbuf,
                       size_t errlen);
/* Free the pool's blocks (not those the caller kept) and tables. */
void port__bufpool_destroy(port_bufpool_t *bp);
/* A buffer for w's receive: 1 (*id, *buf set); 0 when every buffer is out, with w
 * queued; PORT_ECANCELED when every buffer is out and *cancel (if given) is set, w left
 * out of the queue (checked under the lock that port__bufpool_cancel takes, so a
 * cancelled receive is never stranded there); PORT_ENOMEM when memory for a new block
 * cannot be had.  Reports the outcome of a wake w received. */
int port__bufpool_get(port_bufpool_t *bp, port_bufwait_t *w, const volatile int32_t *cancel,
                      uint32_t *id, char **buf);
/* Give buffer id back (with `fresh`: that memory takes its place, the caller kept the
 * old).  Returns the waiter it wakes, for the caller to re-arm at once, or NULL. */
port_bufwait_t *port__bufpool_put(port_bufpool_t *bp, uint32_t id, char *fresh);
/* w ended without taking a buffer: if it was woken, the wake goes to the next waiter
 * (returned, for the caller to re-arm), or a free buffer could sit unused while others
 * wait.  NULL when there is nobody to wake. */
port_bufwait_t *port__bufpool_pass(port_bufpool_t *bp, port_bufwait_t *w);
/* Give back free buffers, the coldest first, until the pool holds `keep` (or none is
 * free); returns how many went. */
int64_t port__bufpool_trim(port_bufpool_t *bp, int64_t keep);
/* Take w off the queue (its receive is being cancelled): 1 if it was on it. */
int port__bufpool_cancel(port_bufpool_t *bp, port_bufwait_t *w);

#endif /* IOCPNET_BUFPOOL_H */
