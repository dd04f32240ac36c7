/*
 * bufpool.c -- the receive-buffer pool of the epoll and IOCP backends (see bufpool.h for
 * the model, the wait queue and the lock), and the heap blocks every backend's receive
 * buffers are made of.
 */
#include "bufpool.h"

#include <stdlib.h>
#ifndef _WIN32
#  include <sys/mman.h>
#  include <unistd.h>
#endif

/* calloc: a fresh block from the top of the heap costs no memset (and no memory until
 * written), and memory checkers then see the kernel's writes into it as defined.  Plain
 * heap blocks, so that one the caller keeps (port_recv_detach) outlives the port. */
char *port__buf_alloc(size_t size) { return (char *)calloc(1, size); }
void port_buf_free(void *buf) { free(buf); }

/* free() keeps a 16 KiB block in the allocator's heap (glibc gives back only the top of
 * a heap), so the block's whole pages are given back first: until free() they are ours,
 * and after MADV_DONTNEED they read as zeros (the allocator's own fields lie outside
 * them, before the block and at its end).  What stays resident is the partial pages at
 * the block's ends: at most 8 KiB of a 16 KiB block, 4 KiB when it is page-aligned. */
void port__buf_retire(char *buf, size_t size) {
#ifndef _WIN32
    static size_t page;
    uintptr_t lo, hi;
    if (page == 0) {
        long ps = sysconf(_SC_PAGESIZE);
        page = ps > 0 ? (size_t)ps : 4096;
    }
    lo = ((uintptr_t)buf + page - 1) & ~(uintptr_t)(page - 1);
    hi = ((uintptr_t)buf + size) & ~(uintptr_t)(page - 1);
    if (hi > lo)
        (void)madvise((void *)lo, hi - lo, MADV_DONTNEED);
#else
    PORT_UNUSED(size);      /* (Windows: VirtualAlloc'd blocks would be needed) */
#endif
    free(buf);
}

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
    int64_t lent;
    port_spin_lock(&bp->lock);
    woken = port__bufwaitq_resolve(&bp->waiters, w);
    if (bp->nfree > 0) {
        *id = bp->free_ids[--bp->nfree];
    } else if (bp->made < bp->max) {
        *id = bp->made++;
    } else if (cancel != NULL && port_atomic_load32((volatile int32_t *)cancel)) {
        got = PORT_ECANCELED;
    } else {
        got = 0;
        if (!w->queued)
            port__bufwaitq_push(&bp->waiters, w, woken);   /* a loser stays the oldest */
    }
    lent = (int64_t)bp->made - bp->nfree;
    port_spin_unlock(&bp->lock);
    if (got != 1)
        return got;
    /* The window's peak: ids off the stack, what decides when the pool grows (a buffer
     * taken for a read that then finds nothing counts as much as one delivered). */
    port__pool_note_out(bp->port, lent);
    if (bp->addr[*id] == NULL) {
        /* Made now: allocate outside the lock; the id is ours meanwhile. */
        char *b = port__buf_alloc(bp->size);
        if (b == NULL) {
            port_spin_lock(&bp->lock);
            bp->free_ids[bp->nfree++] = *id;
            port_spin_unlock(&bp->lock);
            return PORT_ENOMEM;
        }
        bp->addr[*id] = b;
        port__pool_made(bp->port, 1);     /* a new id, or one trimmed (below) */
    }
    *buf = bp->addr[*id];
    return 1;
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

int64_t port__bufpool_trim(port_bufpool_t *bp, int64_t keep) {
    /* The coldest free buffers go: the bottom of the LIFO stack, reused last.  Their ids
     * stay on the stack with no memory, and are made again if the stack drains that far
     * (port__bufpool_get).  The blocks are freed outside the lock, a few at a time. */
    enum { CHUNK = 64 };
    char *gone[CHUNK];
    int64_t given = 0, excess;
    uint32_t i = 0;
    int n, k;
    for (;;) {
        n = 0;
        port_spin_lock(&bp->lock);
        excess = port_atomic_load64(&bp->port->recv_buffers) - keep;
        for (; i < bp->nfree && n < excess && n < CHUNK; i++) {
            uint32_t id = bp->free_ids[i];
            if (bp->addr[id] != NULL) {
                gone[n++] = bp->addr[id];
                bp->addr[id] = NULL;
            }
        }
        if (n > 0) {
            port_atomic_add64(&bp->port->recv_buffers, -n);
            port_atomic_add64(&bp->port->recv_buffers_trimmed, n);
        }
        port_spin_unlock(&bp->lock);
        for (k = 0; k < n; k++)
            port__buf_retire(gone[k], bp->size);
        given += n;
        if (n < CHUNK)
            return given;     /* down to keep, or no free buffer left to give */
    }
}

int port__bufpool_cancel(port_bufpool_t *bp, port_bufwait_t *w) {
    int found;
    port_spin_lock(&bp->lock);
    found = port__bufwaitq_remove(&bp->waiters, w);
    port_spin_unlock(&bp->lock);
    return found;
}
