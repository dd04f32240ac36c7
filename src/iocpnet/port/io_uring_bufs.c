/*
 * io_uring_bufs.c -- the io_uring backend's receive buffers: a provided-buffer ring
 * (IORING_REGISTER_PBUF_RING) from which the kernel picks a buffer only when bytes
 * arrive, so an idle connection holds none, and the receives waiting for one.
 *
 * Each buffer is a heap block of its own (buf_addr[id]), so that one the caller keeps
 * (port_recv_detach) simply leaves the pool, which puts a fresh block under the same id.
 * The ring starts with INITIAL_BUFFERS and grows by one buffer for each receive that has
 * data waiting and finds it empty, up to recv_buffer_count: so it holds at most as many
 * buffers as receives had data at once (epoll's pool makes its buffers the same way),
 * not a size a burst of ENOBUFS reached.  Every buffer made is touched (the kernel takes
 * them in ring order, so all of them circulate): the count made is the memory, and what
 * one connection's receives cycle through, so the ring starts small (8: a 16 KiB
 * loopback echo step rotating through 64 buffers cost 0.1-0.5 us more than through 8,
 * which cost what one buffer does).  An
 * ENOBUFS of a receive that did not poll first grows nothing (see Waiters).  A made
 * buffer stays while the pool's window (port_recv_pool_trim) says it may be needed: a
 * ring sized to the last peak serves the next one without ENOBUFS round trips.
 *
 * Trim.  The kernel may take any buffer in the ring at any moment (and write into it
 * before we see its completion), so no buffer in the ring may be freed, nor its pages
 * dropped.  A trim asks the kernel to hand buffers back the way it hands out any:
 * receives of our own (UD_DRAIN, one byte each, len 1 so that each takes one buffer)
 * on a socket pair whose other end we wrote that many bytes into.  Each completes at
 * once with a buffer from the ring's head; that block is freed and its id kept for the
 * next growth (buf_free_ids), unless a new peak came meanwhile or a receive with data
 * waits for a buffer (then it goes back in the ring and serves it).  A trim receive that finds the ring empty takes nothing; its byte is left
 * for a later one.
 *
 * Waiters.  A receive that finds the ring empty completes with ENOBUFS.  One that did
 * not poll first picks its buffer before reading, so its ENOBUFS says nothing about
 * data (an idle connection gets it too): it is re-armed to poll first.  One that polled
 * first has data waiting: it waits on the queue of bufpool.h, and each buffer given back
 * re-arms one waiter, the oldest, to poll first again (re-arming them all would cost one
 * SQE and one ENOBUFS completion per waiter per release, and the newest would win;
 * waking an idle connection would strand the buffer).  So recv_waiting counts receives
 * with data waiting.  br_free counts the buffers in the ring that no
 * reaped completion has taken yet (a reap pass subtracts what its completions took once,
 * at its end, or before it reads br_free itself), and is what the queue compares its
 * woken waiters with.  A woken receive that completes without taking a buffer (cancelled, the peer
 * closed) passes the wake on; one that lost its buffer to another receive goes back to
 * the head of the queue.  br_free may run ahead of the ring for as long as a completion
 * that took a buffer is not reaped, which at worst re-arms a receive that then waits
 * again.
 *
 * Lock: br_lock guards the ring's tail, the id table's entries and the queue; it is
 * taken under cq_lock (reaping) and never with sq_lock (a re-armed receive is written
 * after br_lock is released).
 */
#if defined(__linux__)
#include "io_uring_int.h"

static inline void br_add(uring_port_t *p, unsigned bid) {
    /* Write the fields one by one: the ring's tail lives in the `resv` field of entry 0. */
    struct io_uring_buf *b = &p->br->bufs[p->br_tail & p->br_mask];
    b->addr = (uint64_t)(uintptr_t)LOAD_ACQ(&p->buf_addr[bid]);
    b->len = p->buf_size;
    b->bid = (uint16_t)bid;
    p->br_tail++;
}

static void br_publish(uring_port_t *p) { STORE_REL(&p->br->tail, p->br_tail); }

unsigned port__uring_br_grow(uring_port_t *p, unsigned count) {
    unsigned made = 0, room = p->buf_max - p->buf_made + p->buf_nfree_ids;
    if (count > room)
        count = room;
    while (made < count) {
        /* An id given back by a trim first, else a new one. */
        unsigned bid = p->buf_nfree_ids > 0 ? p->buf_free_ids[p->buf_nfree_ids - 1]
                                            : p->buf_made;
        char *b = port__buf_alloc(p->buf_size);
        if (b == NULL)
            break;      /* out of memory: the pool stays smaller (receives wait) */
        if (p->buf_nfree_ids > 0)
            p->buf_nfree_ids--;
        else
            p->buf_made++;
        STORE_REL(&p->buf_addr[bid], b);
        br_add(p, bid);
        made++;
    }
    if (made) {
        br_publish(p);
        port_atomic_add32(&p->br_free, (int32_t)made);
        port__pool_made(&p->base, made);
    }
    return made;
}

/* recv_buffers_out, without an atomic add per buffer lent and given back: every buffer
 * made is in the ring (br_free) or lent out.  br_free drops by the buffers a reap pass's
 * completions took and rises when one comes back (a kept block's replacement included),
 * so the difference is the buffers lent out, exactly once no pass is under way; read
 * under br_lock, which every change to either count but the reap's decrement holds. */
uint64_t port__uring_buffers_out(port_t *bp) {
    uring_port_t *p = (uring_port_t *)bp;
    int64_t made, free_now;
    port_spin_lock(&p->br_lock);
    made = port_atomic_load64(&p->base.recv_buffers);
    free_now = port_atomic_load32(&p->br_free);
    port_spin_unlock(&p->br_lock);
    return made > free_now ? (uint64_t)(made - free_now) : 0;
}

/* The oldest waiter, if a buffer is free for it (under br_lock); the caller re-arms it. */
static inline port_op_t *waiter_wake(uring_port_t *p) {
    port_bufwait_t *w = port__bufwaitq_wake(&p->waiters, port_atomic_load32(&p->br_free));
    return w != NULL ? OP_OF_BUFWAIT(w) : NULL;
}

/* Re-arm a waiter woken for a buffer (after br_lock is released): a one-shot receive
 * that polls first, so that it takes a buffer only with data there. */
static void waiter_rearm(uring_port_t *p, port_op_t *w, int mode, int reaping) {
    if (w != NULL) {
        port__uring_resubmit_recv(p, w, mode);
        port__uring_waiter_submit(p, reaping);
    }
}

void port__uring_recv_release(port_t *bp, uint32_t bid, char *fresh) {
    uring_port_t *p = (uring_port_t *)bp;
    port_op_t *w;
    port_spin_lock(&p->br_lock);
    if (fresh != NULL)
        STORE_REL(&p->buf_addr[bid], fresh);   /* the caller kept the old block */
    br_add(p, bid);
    br_publish(p);
    port_atomic_add32(&p->br_free, 1);
    w = waiter_wake(p);
    port_spin_unlock(&p->br_lock);
    waiter_rearm(p, w, RECV_POLL_ALWAYS, 0);
}

/* The buffers the owner held back during its batch (rel_bid) go back to the ring
 * together: one lock, one publication and one count for the batch, instead of each. */
void port__uring_release_flush(uring_port_t *p) {
    port_op_t *w;
    int i, n = p->rel_n;
    if (n == 0)
        return;
    p->rel_n = 0;
    port_spin_lock(&p->br_lock);
    for (i = 0; i < n; i++)
        br_add(p, p->rel_bid[i]);
    br_publish(p);
    port_atomic_add32(&p->br_free, n);
    w = waiter_wake(p);
    port_spin_unlock(&p->br_lock);
    while (w != NULL) {
        /* Receives waiting for a buffer: as many as came back may go. */
        waiter_rearm(p, w, RECV_POLL_ALWAYS, 0);
        port_spin_lock(&p->br_lock);
        w = waiter_wake(p);
        port_spin_unlock(&p->br_lock);
    }
}

/* It took the buffer it was woken for, or it ended without one and passes the wake on. */
void port__uring_recv_woken_done(uring_port_t *p, port_op_t *op) {
    port_op_t *w;
    port_spin_lock(&p->br_lock);
    port__bufwaitq_resolve(&p->waiters, &OP_PRIV(op)->u.rv.bufwait);
    w = waiter_wake(p);
    port_spin_unlock(&p->br_lock);
    waiter_rearm(p, w, RECV_POLL_ALWAYS, 1);
}

void port__uring_drain_done(uring_port_t *p, uint32_t flags) {
    char *gone = NULL;
    port_op_t *w = NULL;
    unsigned bid;
    port_atomic_add32(&p->drain_pending, -1);
    if (!(flags & IORING_CQE_F_BUFFER))
        return;         /* the ring was empty (ENOBUFS): nothing taken */
    bid = flags >> IORING_CQE_BUFFER_SHIFT;
    port_spin_lock(&p->br_lock);
    port_atomic_add32(&p->br_free, -1);
    if (p->waiters.head == NULL &&
        port_atomic_load64(&p->base.recv_buffers) > port__pool_keep_now(&p->base)) {
        gone = p->buf_addr[bid];
        STORE_REL(&p->buf_addr[bid], NULL);
        p->buf_free_ids[p->buf_nfree_ids++] = (uint16_t)bid;
        port_atomic_add64(&p->base.recv_buffers, -1);
        port_atomic_add64(&p->base.recv_buffers_trimmed, 1);
    } else {
        /* A new peak since the trim asked, or a receive with data waits (the trim's
         * receives may have taken the ring's last buffers): the pool needs it. */
        br_add(p, bid);
        br_publish(p);
        port_atomic_add32(&p->br_free, 1);
        w = waiter_wake(p);
    }
    port_spin_unlock(&p->br_lock);
    if (gone != NULL)
        port__buf_retire(gone, p->buf_size);
    waiter_rearm(p, w, RECV_POLL_ALWAYS, 1);
}

void port__uring_recv_out_of_buffers(uring_port_t *p, port_op_t *op) {
    port_bufwait_t *bw = &OP_PRIV(op)->u.rv.bufwait;
    int now = 0, woken;
    port_spin_lock(&p->br_lock);
    woken = port__bufwaitq_resolve(&p->waiters, bw);
    if (!__atomic_load_n(&OP_PRIV(op)->u.rv.polled, __ATOMIC_RELAXED)) {
        /* A receive that does not poll first picks its buffer before it reads: this
         * ENOBUFS says nothing about data, so it neither grows the ring nor waits.
         * Re-arm it to poll first: it asks for a buffer, or comes back here, only once
         * data is there, so the queue holds receives with data waiting, a wake never
         * goes to a connection with nothing to read, and the ring grows only for
         * bytes that are there. */
        now = 1;
    } else if ((woken || p->waiters.head == NULL) && port__uring_br_grow(p, 1) > 0) {
        /* Data is waiting and the kernel found every buffer out: one more buffer, for
         * this receive.  So the ring grows to the most receives that had data at once
         * (each buffer is held until its hook returns), and no further: never a
         * doubling per ENOBUFS (a batch of them doubled it again and again, to
         * recv_buffer_count, and since the kernel takes buffers in ring order every
         * one of them was touched).  Taking a buffer given back since instead would
         * keep the ring below the demand: a third of the receives then cost an ENOBUFS
         * and a re-arm each. */
        port__bufwaitq_claim(&p->waiters, bw);
        now = 1;
    } else if ((woken || p->waiters.head == NULL) &&
               port_atomic_load32(&p->br_free) > (int32_t)p->waiters.woken) {
        /* At the limit, a buffer came back since the kernel looked, and nobody older
         * waits for it. */
        port__bufwaitq_claim(&p->waiters, bw);
        now = 1;
    } else {
        /* Wait; one woken that lost its buffer to another receive stays the oldest. */
        port__bufwaitq_push(&p->waiters, bw, woken);
    }
    port_spin_unlock(&p->br_lock);
    waiter_rearm(p, now ? op : NULL, RECV_POLL_ALWAYS, 1);
}
#endif /* __linux__ */
