/*
 * strand.c -- strands: the completions of one owner, one at a time and in order.
 *
 * Several threads may reap completions from one port, but the completions of one owner
 * (a session) must be handled one at a time and in order.  Ordering is decided where
 * completions are reaped: the backend calls port__deliver() in completion order while it
 * holds the lock that defines that order.  A completion whose strand is free, or already
 * held by the batch being filled, goes into that batch; otherwise it waits in the
 * strand's queue for the thread holding the strand, which takes it with
 * port_strand_next() when it has finished the earlier ones.  Queued completions are
 * always later than the ones in the holder's batch (the holder reaped them before anyone
 * else could reap these), so the order is kept.  A backend may fill one batch in several
 * steps (epoll reads sockets one at a time, and other threads deliver in between), so
 * once the queue holds something, later completions join the queue even when they come
 * from the holder's own batch: they must not overtake what is queued.  With a single
 * worker thread the queue is never used and nothing is allocated.
 *
 * The strand's state lives in the opaque `priv` words of the caller's port_strand_t
 * (port.h), so the caller embeds a strand without allocating one and never sees its
 * lock.  Lock: the strand's spin lock guards everything below; it is taken last, after
 * whatever lock the backend holds while delivering, and nothing is taken under it.
 */
#include "port_int.h"

#include <stdlib.h>

typedef struct strand_node strand_node_t;
struct strand_node {
    strand_node_t *next;
    port_cqe_t cqe;
};

typedef struct strand_state {
    volatile int32_t lock;
    int32_t held;                 /* completions handed out and not yet finished */
    void *token;                  /* the batch that holds the strand */
    strand_node_t *head, *tail;   /* completions waiting for the holder, oldest first */
} strand_state_t;

PORT_STATIC_ASSERT(sizeof(strand_state_t) <= sizeof(((port_strand_t *)0)->priv), strand_fits);

#define STATE(s) ((strand_state_t *)(void *)(s)->priv)


int port__strand_idle(const port_strand_t *strand) {
    strand_state_t *s = STATE(strand);
    int idle;
    port_spin_lock(&s->lock);
    idle = s->held == 0 && s->head == NULL;
    port_spin_unlock(&s->lock);
    return idle;
}

void port_strand_init(port_strand_t *s, void *owner) {
    memset(s, 0, sizeof(*s));
    s->owner = owner;
}

int port__deliver(port_t *p, void *token, port_cqe_t *out, int n, const port_cqe_t *c) {
    port_strand_t *strand = c->op->strand;
    strand_state_t *s;
    strand_node_t *node;
    PORT_UNUSED(p);
    if (strand == NULL) {
        out[n] = *c;
        return n + 1;
    }
    s = STATE(strand);
    port_spin_lock(&s->lock);
    if (s->held == 0 || (s->token == token && s->head == NULL)) {
        s->held++;
        s->token = token;
        port_spin_unlock(&s->lock);
        out[n] = *c;
        return n + 1;
    }
    port_spin_unlock(&s->lock);
    /* Another batch holds the strand: queue it for that batch's thread.  Allocate outside
     * the lock; the strand cannot be released meanwhile without us re-checking. */
    for (;;) {
        node = (strand_node_t *)malloc(sizeof(*node));
        if (node != NULL)
            break;
        port_thread_yield();  /* a completion must never be dropped: wait for memory */
    }
    node->next = NULL;
    node->cqe = *c;
    port_spin_lock(&s->lock);
    if (s->held == 0) {
        /* Released while we allocated: take it for this batch after all. */
        s->held = 1;
        s->token = token;
        port_spin_unlock(&s->lock);
        free(node);
        out[n] = *c;
        return n + 1;
    }
    if (s->tail)
        s->tail->next = node;
    else
        s->head = node;
    s->tail = node;
    port_spin_unlock(&s->lock);
    return n;
}

int port_strand_next(port_t *p, port_strand_t *strand, port_cqe_t *out) {
    strand_state_t *s = STATE(strand);
    strand_node_t *node = NULL;
    PORT_UNUSED(p);
    port_spin_lock(&s->lock);
    if (--s->held > 0) {
        /* More of this batch's completions for the strand are still ahead in the batch. */
        port_spin_unlock(&s->lock);
        return 0;
    }
    node = s->head;
    if (node != NULL) {
        s->head = node->next;
        if (s->head == NULL)
            s->tail = NULL;
        s->held = 1;
    } else {
        s->token = NULL;
    }
    port_spin_unlock(&s->lock);
    if (node == NULL)
        return 0;
    *out = node->cqe;
    free(node);
    return 1;
}

void port_strand_discard(port_t *p, port_strand_t *strand) {
    strand_state_t *s = STATE(strand);
    strand_node_t *node, *next;
    port_spin_lock(&s->lock);
    node = s->head;
    s->head = s->tail = NULL;
    s->held = 0;
    s->token = NULL;
    port_spin_unlock(&s->lock);
    for (; node != NULL; node = next) {
        next = node->next;
        if (p != NULL)
            port_recv_release(p, &node->cqe);
        free(node);
    }
}
