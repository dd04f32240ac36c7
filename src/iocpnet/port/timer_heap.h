/*
 * timer_heap.h -- the timers of the backends that keep their own (epoll, IOCP): a binary
 * min-heap of armed timer operations, ordered by (deadline, arming order), so that
 * timers due at the same moment complete in the order they were armed.
 *
 * Each timer op embeds a port_tnode_t in its backend state; the heap holds pointers to
 * those nodes and finds the op again by the node's offset in port_op_t (given at init).
 * The array grows by doubling, to the peak of timers armed at once, and never shrinks.
 * Deadlines are in whatever unit the backend's clock counts (epoll: nanoseconds, IOCP:
 * microseconds); only their order matters here.
 *
 * A waiter clamps its sleep to `next`, the earliest deadline, which is published on each
 * change and read without the lock (sequentially consistent, so that epoll's sleepers,
 * which announce themselves and then look at it, and its wakers, which publish and then
 * look for sleepers, never both miss).
 *
 * Lock: one spin lock per heap guards the array and the nodes' positions; the due timers
 * are delivered under it, which is what orders them when several threads collect at once.
 * Strand locks (port__deliver) are taken under it; nothing else is.  Memory is allocated
 * outside it.
 */
#ifndef IOCPNET_TIMER_HEAP_H
#define IOCPNET_TIMER_HEAP_H

#include "port_int.h"

#include <stdlib.h>

#define PORT_TNODE_OUT UINT32_MAX   /* a node that is not in the heap */
#define PORT_NO_DEADLINE INT64_MAX

#if defined(_MSC_VER)
#  define PORT__TIMERS_LOAD(p) _InterlockedCompareExchange64((volatile __int64 *)(p), 0, 0)
#  define PORT__TIMERS_STORE(p, v) _InterlockedExchange64((volatile __int64 *)(p), (v))
#else
#  define PORT__TIMERS_LOAD(p) __atomic_load_n((p), __ATOMIC_SEQ_CST)
#  define PORT__TIMERS_STORE(p, v) __atomic_store_n((p), (v), __ATOMIC_SEQ_CST)
#endif

typedef struct port_tnode {
    int64_t deadline;
    uint64_t seq;                 /* arming order: breaks ties between equal deadlines */
    uint32_t idx;                 /* position in the heap, PORT_TNODE_OUT when not in it */
} port_tnode_t;

typedef struct port_timers {
    volatile int32_t lock;
    port_tnode_t **heap;
    uint32_t len, cap;
    uint64_t seq;
    size_t node_off;              /* offset of the node in its port_op_t */
    volatile int64_t next;        /* heap top's deadline, PORT_NO_DEADLINE when empty */
} port_timers_t;

static inline void port__timers_init(port_timers_t *t, size_t node_off) {
    memset(t, 0, sizeof(*t));
    t->node_off = node_off;
    t->next = PORT_NO_DEADLINE;
}

static inline void port__timers_destroy(port_timers_t *t) {
    free(t->heap);
    t->heap = NULL;
}

static inline port_op_t *port__timers_op(const port_timers_t *t, port_tnode_t *n) {
    return (port_op_t *)(void *)((char *)n - t->node_off);
}

/* The earliest deadline (PORT_NO_DEADLINE: none), without the lock. */
static inline int64_t port__timers_next(port_timers_t *t) { return PORT__TIMERS_LOAD(&t->next); }

static inline int port__tnode_before(const port_tnode_t *a, const port_tnode_t *b) {
    return a->deadline < b->deadline || (a->deadline == b->deadline && a->seq < b->seq);
}

static inline void port__timers_set(port_timers_t *t, uint32_t i, port_tnode_t *n) {
    t->heap[i] = n;
    n->idx = i;
}

static inline void port__timers_up(port_timers_t *t, uint32_t i) {
    port_tnode_t *n = t->heap[i];
    while (i > 0) {
        uint32_t parent = (i - 1) / 2;
        if (!port__tnode_before(n, t->heap[parent]))
            break;
        port__timers_set(t, i, t->heap[parent]);
        i = parent;
    }
    port__timers_set(t, i, n);
}

static inline void port__timers_down(port_timers_t *t, uint32_t i) {
    port_tnode_t *n = t->heap[i];
    for (;;) {
        uint32_t c = 2 * i + 1;
        if (c >= t->len)
            break;
        if (c + 1 < t->len && port__tnode_before(t->heap[c + 1], t->heap[c]))
            c++;
        if (!port__tnode_before(t->heap[c], n))
            break;
        port__timers_set(t, i, t->heap[c]);
        i = c;
    }
    port__timers_set(t, i, n);
}

/* Take n out (under the lock; n is in the heap). */
static inline void port__timers_take(port_timers_t *t, port_tnode_t *n) {
    uint32_t i = n->idx;
    port_tnode_t *last = t->heap[--t->len];
    n->idx = PORT_TNODE_OUT;
    if (last != n) {
        port__timers_set(t, i, last);
        port__timers_down(t, i);
        port__timers_up(t, last->idx);
    }
}

/* Publish the earliest deadline and release the lock. */
static inline void port__timers_unlock(port_timers_t *t) {
    PORT__TIMERS_STORE(&t->next, t->len ? t->heap[0]->deadline : PORT_NO_DEADLINE);
    port_spin_unlock(&t->lock);
}

/* Arm n for `deadline`: 1 if it is now the earliest (a sleeper waiting for a later one
 * must look again), 0 if not, PORT_ENOMEM if the heap could not grow. */
static inline int port__timers_add(port_timers_t *t, port_tnode_t *n, int64_t deadline) {
    int earliest;
    n->deadline = deadline;
    n->idx = PORT_TNODE_OUT;
    port_spin_lock(&t->lock);
    while (t->len == t->cap) {
        /* Grow outside the lock. */
        uint32_t cap = t->cap ? t->cap * 2 : 64;
        port_tnode_t **nh;
        port_spin_unlock(&t->lock);
        nh = (port_tnode_t **)malloc((size_t)cap * sizeof(*nh));
        if (nh == NULL)
            return PORT_ENOMEM;
        port_spin_lock(&t->lock);
        if (t->cap < cap) {
            port_tnode_t **old = t->heap;
            if (t->len)
                memcpy(nh, t->heap, (size_t)t->len * sizeof(*nh));
            t->heap = nh;
            t->cap = cap;
            nh = old;
        }
        free(nh);
    }
    n->seq = t->seq++;
    t->heap[t->len] = n;
    port__timers_up(t, t->len++);
    earliest = n->idx == 0;
    if (earliest)
        port__timers_unlock(t);
    else
        port_spin_unlock(&t->lock);
    return earliest;
}

/* Take n out if it is still armed: 1 if it was (the caller completes it as cancelled),
 * 0 if it has fired or is firing. */
static inline int port__timers_cancel(port_timers_t *t, port_tnode_t *n) {
    int found = 0;
    port_spin_lock(&t->lock);
    if (n->idx != PORT_TNODE_OUT && n->idx < t->len && t->heap[n->idx] == n) {
        port__timers_take(t, n);
        found = 1;
    }
    port__timers_unlock(t);
    return found;
}

/* Deliver the timers due at `now` (res 0), earliest first, into out[n..max); returns
 * the new batch size. */
static inline int port__timers_run(port_timers_t *t, port_t *p, int64_t now, port_cqe_t *out,
                                   int n, int max) {
    int64_t d = port__timers_next(t);
    if (d == PORT_NO_DEADLINE || d > now || n >= max)
        return n;
    port_spin_lock(&t->lock);
    while (n < max && t->len > 0 && t->heap[0]->deadline <= now) {
        port_tnode_t *top = t->heap[0];
        port__timers_take(t, top);
        n = port__deliver_final(p, out, n, port__timers_op(t, top), 0);
    }
    port__timers_unlock(t);
    return n;
}

#endif /* IOCPNET_TIMER_HEAP_H */
