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
 * Yielding.  While other threads keep delivering to a strand, its holder could go on
 * taking from its queue for as long as that lasts, and the rest of the holder's batch
 * (other owners' completions) would wait.  port_strand_yield() lets the holder stop: the
 * completion it was handed goes back to the head of the queue, the strand is released
 * with its queue non-empty (the *yielded* state: held == 0, head != NULL), and the
 * strand's own wake-up operation is posted.  In that state
 * nothing takes the strand but the wake-up: every other completion joins the queue, so
 * nothing overtakes what waits there.  The wake-up, reaped by any thread, takes the
 * strand into that thread's batch; the caller continues with port_strand_next(), which
 * hands out the queue's head.  A strand has at most one wake-up in flight (only a holder
 * yields, and nobody holds a yielded strand until its wake-up arrives).
 *
 * The wake-up record is made at the strand's first yield, not embedded: most strands
 * (every idle session's) never yield, and an operation is ~100 bytes.  It is kept until
 * port_strand_discard, so a strand that yielded once does not allocate again.  Making it
 * can fail like making the queue node a yield needs: the yield then returns PORT_ENOMEM
 * with nothing changed and the holder goes on itself, as a strand that never yields.
 * Only a holder writes `wake`, under the strand's lock; port__deliver reads it under the
 * lock, and port_strand_wakeup() only for a completion whose batch holds the strand.
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

int port_strand_claim(port_strand_t *strand) {
    strand_state_t *s = STATE(strand);
    int rc = PORT_EBUSY;
    port_spin_lock(&s->lock);
    if (s->held == 0 && s->head == NULL) {
        /* The token is the strand itself, which no batch is: whatever is delivered to
         * it from now on queues for the claimer's port_strand_next. */
        s->held = 1;
        s->token = strand;
        rc = 0;
    }
    port_spin_unlock(&s->lock);
    return rc;
}

/* port__deliver's other cases, with the strand's lock held (out of line: the common
 * case keeps a small frame). */
static PORT_COLD int deliver_locked(void *token, port_cqe_t *out, int n, const port_cqe_t *c,
                                    port_strand_t *strand) {
    strand_state_t *s = STATE(strand);
    strand_node_t *node;
    if (c->op == strand->wake) {
        /* The wake-up of a yielded strand: it takes the strand for this batch, and
         * the caller's port_strand_next hands out the queue, oldest first. */
        s->held = 1;
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
    if (s->held == 0 && s->head == NULL) {
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

int port__deliver(port_t *p, void *token, port_cqe_t *out, int n, const port_cqe_t *c) {
    port_strand_t *strand = c->op->strand;
    strand_state_t *s;
    PORT_UNUSED(p);
    if (strand != NULL) {
        s = STATE(strand);
        port_spin_lock(&s->lock);
        /* Free (and nothing yielded waits), or held by this very batch with nothing
         * queued (a later completion must not overtake queued ones); not a wake-up. */
        if (!(s->head == NULL && (s->held == 0 || s->token == token)) || c->op == strand->wake)
            return deliver_locked(token, out, n, c, strand);
        s->held++;
        s->token = token;
        port_spin_unlock(&s->lock);
    }
    out[n] = *c;
    return n + 1;
}

/* port_strand_next once the batch's last hold ends with completions queued (under the
 * strand's lock, which it releases; out of line). */
static PORT_COLD int next_queued(strand_state_t *s, port_cqe_t *out) {
    strand_node_t *node = s->head;
    s->head = node->next;
    if (s->head == NULL)
        s->tail = NULL;
    s->held = 1;
    port_spin_unlock(&s->lock);
    *out = node->cqe;
    free(node);
    return 1;
}

int port_strand_next(port_t *p, port_strand_t *strand, port_cqe_t *out) {
    strand_state_t *s = STATE(strand);
    PORT_UNUSED(p);
    port_spin_lock(&s->lock);
    if (--s->held > 0) {
        /* More of this batch's completions for the strand are still ahead in the batch. */
        port_spin_unlock(&s->lock);
        return 0;
    }
    if (s->head != NULL)
        return next_queued(s, out);
    s->token = NULL;
    port_spin_unlock(&s->lock);
    return 0;
}

int port_strand_yield(port_t *p, port_strand_t *strand, const port_cqe_t *c) {
    strand_state_t *s = STATE(strand);
    strand_node_t *node;
    port_op_t *wake = NULL, *post;
    void *token;
    int rc;
    if (p == NULL || c == NULL || c->op == NULL || c->op->strand != strand)
        return PORT_EINVAL;
    node = (strand_node_t *)malloc(sizeof(*node));
    if (node == NULL)
        return PORT_ENOMEM;
    node->cqe = *c;
    port_spin_lock(&s->lock);
    if (s->held != 1) {
        /* Not just handed a completion by port_strand_next (held counts this batch's
         * completions still ahead): yielding now would let those run beside c. */
        port_spin_unlock(&s->lock);
        free(node);
        return PORT_EINVAL;
    }
    if (strand->wake == NULL) {
        /* The first yield: make the wake-up record, outside the lock (nothing is
         * allocated under a spin lock), then check again that we still hold the strand
         * as a completion from port_strand_next. */
        port_spin_unlock(&s->lock);
        wake = (port_op_t *)malloc(sizeof(*wake));
        if (wake == NULL) {
            free(node);
            return PORT_ENOMEM;
        }
        port_op_init(wake, PORT_OP_POST, strand->owner, strand);
        port_spin_lock(&s->lock);
        if (s->held != 1) {
            port_spin_unlock(&s->lock);
            free(wake);
            free(node);
            return PORT_EINVAL;
        }
        if (strand->wake == NULL) {
            strand->wake = wake;
            wake = NULL;
        }
    }
    node->next = s->head;
    s->head = node;
    if (s->tail == NULL)
        s->tail = node;
    token = s->token;
    s->held = 0;
    s->token = NULL;
    post = strand->wake;
    port_spin_unlock(&s->lock);
    free(wake);   /* NULL unless another yield made the record first (a misuse) */
    /* Posted after the release: the wake-up, reaped at once by another thread, must
     * find the strand free. */
    rc = port_post(p, post, 0);
    if (rc == 0)
        return 0;
    /* Not posted (the port is shutting down): nothing took the strand meanwhile (only
     * the wake-up takes a yielded strand) and nothing was taken from its queue, so c is
     * still at its head: take both back. */
    port_spin_lock(&s->lock);
    s->head = node->next;
    if (s->head == NULL)
        s->tail = NULL;
    s->held = 1;
    s->token = token;
    port_spin_unlock(&s->lock);
    free(node);
    return rc;
}

void port_strand_discard(port_t *p, port_strand_t *strand) {
    strand_state_t *s = STATE(strand);
    strand_node_t *node, *next;
    port_op_t *wake;
    port_spin_lock(&s->lock);
    node = s->head;
    s->head = s->tail = NULL;
    s->held = 0;
    s->token = NULL;
    wake = strand->wake;
    strand->wake = NULL;
    port_spin_unlock(&s->lock);
    free(wake);
    for (; node != NULL; node = next) {
        next = node->next;
        if (p != NULL)
            port_recv_release(p, &node->cqe);
        free(node);
    }
}
