/*
 * bufpool.c -- the receive-buffer pool of the epoll and IOCP backends (see bufpool.h for
 * the model, the wait queue and the lock), and the heap blocks every backend's receive
 * buffers are made of.
 */
#include "bufpool.h"

#include <stdlib.h>

/* calloc: a fresh block from the top of the heap costs no memset (and no memory until
 * written), and memory checkers then see the kernel's writes into it as defined.  Plain
 * heap blocks, so that one the caller keeps (port_recv_detach) outlives the port. */
char *port__buf_alloc(size_t size) { return (char *)calloc(1, size); }
void port_buf_free(void *buf) { free(buf); }

int port__bufpool_init(port_bufpool_t *bp, port_t *p, const char *who, char *errbuf,
                       size_t errlen) {
    memset(bp, 0, sizeof(*bp));
    bp->port = p;
    bp->size = p->opts.recv_buffer_size;
    bp->max = p->opts.recv_buffer_count;
    port__bufwaitq_init(&bp->waiters, p);
    if ((uint64_t)bp->max * bp->size > (uint64_t)(SIZE_MAX / 2)) {
        port__set_err(errbuf, errlen, "%s: %u receive buffers of %u bytes do not fit in "
                      "the address space", who, bp->max, bp->size);
        return PORT_EINVAL;
    }
    /* Only the tables now: blocks are made on first use (see bufpool.h). */
    bp->free_ids = (uint32_t *)malloc((size_t)bp->max * sizeof(uint32_t));
    bp->addr = (char **)calloc(bp->max, sizeof(char *));
    if (bp->free_ids == NULL || bp->addr == NULL) {
        port__set_err(errbuf, errlen, "%s: out of memory for %u receive buffers of %u bytes",
                      who, bp->max, bp->size);
        return PORT_ENOMEM;
    }
    return 0;
}

void port__bufpool_destroy(port_bufpool_t *bp) {
    uint32_t i;
    if (bp->addr != NULL) {
        for (i = 0; i < bp->made; i++)
            port_buf_free(bp->addr[i]);   /* the pool's; kept ones were replaced */
        free(bp->addr);
    }
    free(bp->free_ids);
    bp->addr = NULL;
    bp->free_ids = NULL;
}

/* Buffers a waiter could still have: free ones and ids not made yet (under the lock). */
static int64_t pool_free(const port_bufpool_t *bp) {
    return (int64_t)bp->nfree + (bp->max - bp->made);
}

int port__bufpool_get(port_bufpool_t *bp, port_bufwait_t *w, const volatile int32_t *cancel,
                      uint32_t *id, char **buf) {
    int got = 1, woken;
    port_spin_lock(&bp->lock);
    woken = port__bufwaitq_resolve(&bp->waiters, w);
    if (bp->nfree > 0) {
        *id = bp->free_ids[--bp->nfree];
    } else if (bp->made < bp->max) {
        *id = bp->made++;
        port_atomic_add64(&bp->port->recv_buffers, 1);
    } else if (cancel != NULL && port_atomic_load32((volatile int32_t *)cancel)) {
        got = PORT_ECANCELED;
    } else {
        got = 0;
        if (!w->queued)
            port__bufwaitq_push(&bp->waiters, w, woken);   /* a loser stays the oldest */
    }
    port_spin_unlock(&bp->lock);
    if (got == 1 && bp->addr[*id] == NULL) {
        /* Made now: allocate outside the lock; the id is ours meanwhile. */
        char *b = port__buf_alloc(bp->size);
        if (b == NULL) {
            port_spin_lock(&bp->lock);
            bp->free_ids[bp->nfree++] = *id;
            port_spin_unlock(&bp->lock);
            return PORT_ENOMEM;
        }
        bp->addr[*id] = b;
    }
    if (got == 1)
        *buf = bp->addr[*id];
    return got;
}

port_bufwait_t *port__bufpool_put(port_bufpool_t *bp, uint32_t id, char *fresh) {
    port_bufwait_t *w = NULL;
    port_spin_lock(&bp->lock);
    /* An id never made, or one more release than buffers made, is a caller's bug that
     * would corrupt the stack: ignore it. */
    if (id < bp->made && bp->nfree < bp->made) {
        if (fresh != NULL)
            bp->addr[id] = fresh;    /* the caller kept the old memory */
        bp->free_ids[bp->nfree++] = id;
        w = port__bufwaitq_wake(&bp->waiters, pool_free(bp));
    } else if (fresh != NULL) {
        port_buf_free(fresh);
    }
    port_spin_unlock(&bp->lock);
    return w;
}

port_bufwait_t *port__bufpool_pass(port_bufpool_t *bp, port_bufwait_t *w) {
    port_bufwait_t *next = NULL;
    /* Peeked without the lock: a wake that comes after it also re-arms w, which then
     * reports again. */
    if (!port__bufwait_woken(w))
        return NULL;
    port_spin_lock(&bp->lock);
    if (port__bufwaitq_resolve(&bp->waiters, w))
        next = port__bufwaitq_wake(&bp->waiters, pool_free(bp));
    port_spin_unlock(&bp->lock);
    return next;
}

int port__bufpool_cancel(port_bufpool_t *bp, port_bufwait_t *w) {
    int found;
    port_spin_lock(&bp->lock);
    found = port__bufwaitq_remove(&bp->waiters, w);
    port_spin_unlock(&bp->lock);
    return found;
}
