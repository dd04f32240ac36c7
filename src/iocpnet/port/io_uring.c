/*
 * io_uring.c -- the Linux completion port: the hot path (submitting, reaping, waiting, the
 * operations).  Making the ring and probing the kernel: io_uring_setup.c; the provided
 * receive buffers: io_uring_bufs.c; what they share: io_uring_int.h.
 *
 * How io_uring fits the IOCP model
 * --------------------------------
 * io_uring is a true completion port: we describe an operation in a submission queue
 * entry (SQE) whose user_data is the address of our port_op_t, the kernel performs it,
 * and a completion queue entry (CQE) carrying the same user_data and the result appears
 * in a ring we share with the kernel.  That is IOCP's OVERLAPPED round trip, with two
 * differences this file has to bridge:
 *
 *   - Submission is a ring too, and it is single-producer.  Any thread may submit here,
 *     so SQE slots are claimed under sq_lock.  To keep to one system call per batch, a
 *     thread that is dispatching a batch (between port_wait returning and its next
 *     port_wait or port_batch_end) only writes SQEs; its next port_wait hands them to
 *     the kernel in the same io_uring_enter that waits.
 *   - A request belongs to the thread whose io_uring_enter submitted it: the kernel
 *     runs its completion work in that thread (waking it from a blocking system call
 *     to do so, which it may see as EINTR), and when the thread exits, its
 *     requests that still wait for readiness complete with -ECANCELED.  So a thread
 *     that is not a worker (a user thread calling Send, the thread that started a
 *     server) should own nothing.  While a worker is waiting in the kernel, such a
 *     thread only writes its SQE and rings a doorbell (an eventfd under a multishot
 *     poll that the port keeps armed); the woken leader's next enter submits it.  With
 *     no worker waiting it submits itself, so that the operation starts at once, as
 *     on IOCP.  Either way, a -ECANCELED nobody asked for (the submitter exited) is not
 *     reported: the operation is submitted again by the thread that reaped it.
 *   - Several threads may wait, but the kernel wakes *every* thread sleeping in
 *     io_uring_enter for each completion (measured: 4 sleepers, 100 posts, 400
 *     wake-ups).  So only one thread, the leader, sleeps in the kernel, and keeps its
 *     place while it dispatches; one standby thread watches that it comes back, and
 *     takes its place when a hook holds it (see "waiting with several workers"); the
 *     others wait on a condition variable.  Completions already in the ring are taken
 *     by any thread without waiting for its turn.
 *
 * Completion work.  Without COOP_TASKRUN the kernel interrupts a submitter that is
 * running (an IPI, a VM exit on a virtual machine) for every completion it must finish:
 * measured, about one IPI per three round trips at 10 connections, the largest cost
 * io_uring had over epoll.  The ring is made with COOP_TASKRUN | TASKRUN_FLAG (5.19+)
 * where the kernel has them: the work then waits for the submitter's next entry into the
 * kernel (any system call, a timer tick at the latest), a sleeping submitter is still
 * woken, and IORING_SQ_TASKRUN tells a poll (timeout 0) that it must enter to get it.
 *
 * Sends.  A reply is best written by the hook that makes it, at once, as a reactor
 * does: port_send_now is one sendmsg, with no request and no completion, and the core
 * uses it whenever nothing is queued ahead.  port_send (the rest of a partial write, or
 * a caller that wants a completion) is an SQE; a dispatching thread's send goes to the
 * kernel when the core calls port_flush_sends after the completion that made it, so a
 * reply never waits behind the next hooks of the batch, and port_batch_end submits the
 * rest of what a batch wrote (a caller polling once per frame replies in that frame).
 *
 * Receives use a provided-buffer ring (IORING_REGISTER_PBUF_RING): a connection holds
 * no buffer while idle, the kernel picks one only when bytes arrive.  The ring starts
 * with few buffers and grows by one for each receive with data waiting that finds it
 * empty (io_uring_bufs.c), so the memory touched follows the peak of data in flight,
 * not the number of connections.  A receive is a
 * single-shot recv, posted again by the caller once it has handled the data, so the
 * kernel never reads more than one buffer ahead of the application per connection.
 * When the previous read on an op did not fill its buffer, the next one asks the
 * kernel to poll first (the socket is then most likely empty, and a recv attempt would
 * only fail with EAGAIN).  Multishot recv (PORT_OPT_RECV_MULTISHOT, which the core asks
 * for) saves that submission and its poll arming per message: each arming is bounded
 * to MSHOT_BUFFERS buffers' worth of bytes (sqe->optlen, 6.16+), after which its last
 * completion is final and the caller posts the next receive once it has dealt with the
 * data, so read-ahead stays bounded as with one-shot receives.  That next arming polls
 * first unless the final completion said more bytes were queued
 * (IORING_CQE_F_SOCK_NONEMPTY): a read tried at once would find the socket empty (16 KiB
 * ping-pong, an arming ending every 4 messages: 1.25 socket reads per message).  A
 * kernel that cannot bound it (or lacks multishot) rejects the SQE with EINVAL:
 * receives are then one-shot for good.
 *
 * When every buffer is out, the receives that found the ring empty wait on a FIFO and
 * each buffer given back re-arms one of them, the oldest (io_uring_bufs.c).  A
 * buffer the caller keeps for good (port_recv_detach) leaves the pool, which puts a new
 * heap block under its id: what the application keeps never drains the ring.
 *
 * Descriptors.  A dispatching thread's SQEs reach the kernel with its next wait, and
 * another thread's when the leader answers the doorbell, so a close(2) made at once
 * could come first: the number, free again, goes to the next socket anyone opens, and a
 * SEND or RECV still in the ring then runs on that socket (a client received another
 * player's goodbye; an old receive ate a new connection's first bytes).  So a close is
 * an SQE too, IORING_OP_CLOSE, queued behind everything already in the ring.  The
 * kernel takes SQEs in ring order and resolves an SQE's descriptor when it issues it,
 * inside the io_uring_enter that submits it (the backend uses no links, IOSQE_ASYNC or
 * drains, the cases that would defer that), so every earlier operation holds its own
 * reference to the socket before the number is released; they end with their cancels,
 * queued by the caller ahead of the close.  The alternatives: flushing the ring before
 * close(2) costs a system call per close and needs every thread to be able to submit
 * (a SINGLE_ISSUER ring forbids it); a CLOSE linked after the operations would wait
 * for them to finish (for a send to a peer that does not read: forever); registered
 * descriptors remove the question but move the descriptor table into the ring, a larger
 * change left for when a profile asks for direct descriptors.  port_sock_close, which
 * is synchronous (listeners, refused connections, and a session's close when nothing of
 * it is in flight: the peer's FIN or reset ended its receive), calls close(2) at once
 * when no SQE still in the ring names the descriptor (what the kernel took holds its own
 * reference), and otherwise hands the ring to the kernel first.
 *
 * One dispatcher.  Completion work run inside the waiting io_uring_enter, in one batch
 * (DEFER_TASKRUN), costs less than COOP_TASKRUN's, which runs at the exit of each
 * reply's sendmsg in small pieces and posts under the completion lock: measured on this
 * backend, 6-8 % less server CPU per round trip at 10 connections, which put it below
 * epoll.  But such a ring has one issuer (SINGLE_ISSUER): only its owner may submit or
 * wait, and it cannot be handed over.  So a port is remade that way only when its user
 * says that one thread will dispatch it for the rest of its life (port_single_dispatcher:
 * Run with one worker, which closes the core when it ends) and before it submitted
 * anything.  The owner is the first thread to wait without a timeout (a dispatch loop:
 * a poll from elsewhere may come first); it enables the ring (R_DISABLED until then, so
 * that Start() on another thread does not become the issuer).  Every
 * other thread only writes SQEs and rings the doorbell (the owner's next enter submits
 * them: a sleeping owner is woken by the doorbell's poll); its port_wait takes what is
 * in the completion ring and otherwise waits on the room's condition variable in slices,
 * never in the kernel (the owner, the only thread entering, takes no leader's place).
 * Its port_sock_close cannot hand the ring to the kernel itself,
 * and must not wait for the owner (the owner may be waiting for the GIL this thread
 * holds): it closes at once when no SQE still in the ring names the descriptor (what the
 * kernel took holds its own reference), else it queues an IORING_OP_CLOSE behind them.
 * After shutdown the owner no longer enters, so SQEs still in the ring never run and a
 * close is immediate (once the owner is out of any enter: `entering`).
 *
 * Operations that complete without the kernel doing I/O (post, and an op that failed
 * before it reached the kernel) are a NOP SQE whose user_data is tagged: the result was
 * stored in the op beforehand.  That keeps one path for every completion and wakes a
 * sleeping waiter like any other completion.
 *
 * Invariants
 *   - user_data is a port_op_t pointer (8-byte aligned), possibly tagged in its low bits,
 *     or one of the two reserved values below; nothing else.
 *   - Lock order: cq_lock, then sq_lock or br_lock; strand locks are taken last.
 *   - Each op has exactly one final completion; it is counted (port__completed) when it
 *     is reaped, before it is handed to the caller.
 *   - A socket is closed by an IORING_OP_CLOSE behind every SQE written before it.
 *
 * Required kernel: 5.19 (provided-buffer rings), EXT_ARG waits (5.11) and NODROP.
 * Anything less, and io_uring_setup failing with EPERM/ENOSYS/EINVAL (seccomp, the
 * kernel.io_uring_disabled sysctl, gVisor), is reported as PORT_EUNAVAIL so that
 * port_create falls back to epoll.
 */
#if defined(__linux__)
#include "io_uring_int.h"

#include <errno.h>
#include <poll.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <linux/futex.h>
#include <sys/socket.h>

/* The port whose batch this thread is dispatching: its submissions are deferred. */
static PORT_THREAD_LOCAL uring_port_t *tls_batch;
/* This thread deferred a send during its batch: port_flush_sends hands it over. */
static PORT_THREAD_LOCAL int tls_send_deferred;
/* This thread re-armed a receive waiting for a buffer while reaping: submit before the
 * batch is dispatched (see port__uring_waiter_submit). */
static PORT_THREAD_LOCAL uring_port_t *tls_waiter_rearmed;
/* The one dispatcher's owner, in a batch of this port: the receive buffers it gives
 * back wait in the port until the batch ends (uring_recv_release). */
static PORT_THREAD_LOCAL uring_port_t *tls_release_held;
/* This thread's id (0: not asked yet), for the one-dispatcher owner check. */
static PORT_THREAD_LOCAL int32_t tls_tid;

static int32_t my_tid(void) {
    if (tls_tid == 0)
        tls_tid = (int32_t)syscall(SYS_gettid);
    return tls_tid;
}

/* May this thread enter the ring?  Any thread, unless the port has one dispatcher. */
static int may_enter(uring_port_t *p) {
    return port_atomic_load32(&p->single) == 0 || port_atomic_load32(&p->owner) == my_tid();
}

/* io_uring_enter; with one dispatcher only its owner calls it, and never after shutdown
 * (a close then relies on nothing more being submitted: see the top). */
static int ring_enter(uring_port_t *p, unsigned to_submit, unsigned min_complete,
                      unsigned flags, void *arg, size_t argsz) {
    int rc;
    if (port_atomic_load32(&p->single) == 0)
        return sys_enter(p->ring_fd, to_submit, min_complete, flags, arg, argsz);
    __atomic_add_fetch(&p->entering, 1, __ATOMIC_SEQ_CST);
    if (__atomic_load_n(&p->base.closed, __ATOMIC_SEQ_CST)) {
        rc = -1;
        errno = EBADFD;
    } else {
        rc = sys_enter(p->ring_fd, to_submit, min_complete, flags, arg, argsz);
    }
    __atomic_add_fetch(&p->entering, -1, __ATOMIC_SEQ_CST);
    return rc;
}

/* ThreadSanitizer cannot see that the kernel orders an SQE's writes (the op record,
 * its stored result) before the CQE that a reaper reads: say so, on one address. */
#if defined(__SANITIZE_THREAD__)
void __tsan_acquire(void *addr);
void __tsan_release(void *addr);
#  define TSAN_RELEASE(a) __tsan_release(a)
#  define TSAN_ACQUIRE(a) __tsan_acquire(a)
#else
#  define TSAN_RELEASE(a) ((void)0)
#  define TSAN_ACQUIRE(a) ((void)0)
#endif

/* ---- submission ----------------------------------------------------------------------- */

static unsigned sq_pending(uring_port_t *p) {
    return LOAD_ACQ(p->sq_ktail) - LOAD_ACQ(p->sq_khead);
}

/* COOP_TASKRUN: completion work waits for this thread to enter the kernel. */
static int taskrun_pending(uring_port_t *p) {
    return (p->setup_flags & IORING_SETUP_TASKRUN_FLAG) &&
           (LOAD_ACQ(p->sq_kflags) & IORING_SQ_TASKRUN);
}

/* Hand every written SQE to the kernel now. */
static void ring_doorbell(uring_port_t *p);

void port__uring_submit_now(uring_port_t *p) {
    int tries = 0;
    if (!may_enter(p)) {
        if (sq_pending(p))
            ring_doorbell(p);     /* the owner submits (one dispatcher, see the top) */
        return;
    }
    for (;;) {
        unsigned n = sq_pending(p);
        if (n == 0)
            return;
        if (ring_enter(p, n, 0, 0, NULL, 0) >= 0)
            return;
        /* EBUSY/EAGAIN: the kernel is short of room for completions; it frees up as
         * waiters reap, so retry briefly rather than lose the submission. */
        if ((errno != EINTR && errno != EAGAIN && errno != EBUSY) || ++tries > 1000)
            return;
        port_thread_yield();
    }
}

/* Hand every written SQE to the kernel, however long it takes (a close waits for it);
 * 0 only when the ring itself fails. */
static int submit_all(uring_port_t *p) {
    while (sq_pending(p) > 0) {
        if (ring_enter(p, sq_pending(p), 0, 0, NULL, 0) < 0 && errno != EINTR &&
            errno != EAGAIN && errno != EBUSY)
            /* One dispatcher, shut down: nothing is entered any more, so what the ring
             * holds never runs (see the top); otherwise the ring failed. */
            return errno == EBADFD && port_atomic_load32(&p->single) &&
                   port_atomic_load32(&p->base.closed);
        if (sq_pending(p) > 0)
            port_thread_yield();
    }
    return 1;
}

/* Claim an SQE; the caller holds sq_lock and fills it, then calls sqe_commit. */
static struct io_uring_sqe *sqe_get(uring_port_t *p) {
    struct io_uring_sqe *sqe;
    while (p->sq_tail - LOAD_ACQ(p->sq_khead) >= p->sq_entries) {
        /* Full (a batch that sent to thousands of sessions): push them out now. */
        port__uring_submit_now(p);
        if (p->sq_tail - LOAD_ACQ(p->sq_khead) >= p->sq_entries)
            port_thread_yield();
    }
    sqe = &p->sqes[p->sq_tail & p->sq_mask];
    memset(sqe, 0, sizeof(*sqe));
    return sqe;
}

static void sqe_commit(uring_port_t *p) {
    TSAN_RELEASE(&p->ring_fd);
    p->sq_tail++;
    STORE_REL(p->sq_ktail, p->sq_tail);
}


/* Ask the kernel to cancel `op` (its CQE comes with op's own; the cancel's is dropped). */
static void queue_cancel(uring_port_t *p, const port_op_t *op) {
    struct io_uring_sqe *sqe;
    port_spin_lock(&p->sq_lock);
    sqe = sqe_get(p);
    sqe->opcode = IORING_OP_ASYNC_CANCEL;
    sqe->addr = (uint64_t)(uintptr_t)op;
    sqe->user_data = UD_IGNORE;
    sqe_commit(p);
    port_spin_unlock(&p->sq_lock);
}

/* Wake the leader so that it submits what other threads wrote (see the top). */
static void ring_doorbell(uring_port_t *p) {
    if (port_atomic_xchg32(&p->bell_rung, 1) == 0) {
        uint64_t one = 1;
        ssize_t w;
        do
            w = write(p->bell_fd, &one, sizeof(one));
        while (w < 0 && errno == EINTR);
    }
}

/* After an SQE was committed: a dispatching thread's goes with its next wait; any
 * other thread's is submitted by the leader, woken by the doorbell, or at once if no
 * worker is waiting (see the top). */
/* Does the leader wait in the kernel, to answer the doorbell?  Only while it is inside
 * io_uring_enter: its enter submits what was written before it looked (the fence pairs
 * with its seq_cst update of lead_in before it reads the ring's tail). */
static int bell_answered(uring_port_t *p) {
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    return __atomic_load_n(&p->lead_in, __ATOMIC_SEQ_CST) > 0;
}

static void after_submit(uring_port_t *p) {
    if (tls_batch == p)
        return;
    if (bell_answered(p))
        ring_doorbell(p);
    else
        port__uring_submit_now(p);
}

/* A receive re-armed for a buffer given back belongs to another session, and the rest of
 * this thread's batch may take long (a hook that blocks holds every later completion of
 * its batch): so its SQE goes to the kernel now, not with this thread's next wait.
 * While reaping, uring_wait does it before handing out the batch.  Rare: only when the
 * pool is dry. */
void port__uring_waiter_submit(uring_port_t *p, int reaping) {
    if (reaping)
        tls_waiter_rearmed = p;
    else if (bell_answered(p))
        ring_doorbell(p);
    else
        port__uring_submit_now(p);
}

/* poll_first: 0, RECV_POLL_MAYBE or RECV_POLL_ALWAYS (io_uring_int.h). */
static void prep_recv(uring_port_t *p, struct io_uring_sqe *sqe, port_op_t *op, int poll_first) {
    int polled = 0;
    sqe->opcode = IORING_OP_RECV;
    sqe->fd = op->sock;
    sqe->flags = IOSQE_BUFFER_SELECT;
    sqe->buf_group = BGID;
    sqe->len = 0;   /* the buffer's own size */
    if (poll_first == RECV_POLL_ALWAYS) {
        sqe->ioprio = IORING_RECVSEND_POLL_FIRST;
        polled = 1;
    } else if (LOAD_ACQ(&p->multishot) != 0) {
        sqe->ioprio = IORING_RECV_MULTISHOT;
        /* The arming before this one left the socket empty: poll before the first
         * read, which would otherwise only say EAGAIN (see the top). */
        if (poll_first)
            sqe->ioprio |= IORING_RECVSEND_POLL_FIRST;
        /* sqe->optlen (6.16+; the file_index field of older headers): the arming ends,
         * with a final completion carrying data, after this many bytes. */
        sqe->file_index = LOAD_ACQ(&p->mshot_limit);
    } else if (poll_first) {
        sqe->ioprio = IORING_RECVSEND_POLL_FIRST;
        polled = 1;
    }
    __atomic_store_n(&OP_PRIV(op)->u.rv.polled, (uint32_t)polled, __ATOMIC_RELAXED);
    sqe->user_data = (uint64_t)(uintptr_t)op;
}

/* The peer's address comes with the accept (port_accept_peer): a getpeername per
 * connection saved, and the address known even for a peer already gone.
 * An accept polls first (6.10+): it is posted again as soon as the previous one
 * completed, mostly onto an empty backlog, and an accept tried at once there fails
 * only after the kernel made and freed a socket inode, a file and a dentry for it
 * (~3 us; in a connect storm one per connection).  A kernel without the flag rejects
 * it with EINVAL: accepts then try at once for good (see the completion). */
static void prep_accept(uring_port_t *p, struct io_uring_sqe *sqe, port_op_t *op) {
    port__peer_t *pa = &OP_PRIV(op)->u.acc.peer;
    memset(&pa->sa, 0, sizeof(pa->sa));   /* defined for memcheck, which cannot see the
                                           * kernel write it */
    sqe->opcode = IORING_OP_ACCEPT;
    sqe->fd = op->sock;
    if (OP_PRIV(op)->u.acc.multishot) {
        /* One address field for every connection of the arming, each overwriting the
         * last before we read it: none asked for (port_accept_peer says so). */
        pa->len = 0;
        sqe->ioprio = IORING_ACCEPT_MULTISHOT;
    } else {
        pa->len = sizeof(pa->sa);
        sqe->addr = (uint64_t)(uintptr_t)&pa->sa;
        sqe->addr2 = (uint64_t)(uintptr_t)&pa->len;
    }
    sqe->accept_flags = SOCK_NONBLOCK | SOCK_CLOEXEC;
    OP_PRIV(op)->u.acc.poll_first = LOAD_ACQ(&p->accept_pf) != 0;
    if (OP_PRIV(op)->u.acc.poll_first)
        sqe->ioprio |= IORING_ACCEPT_POLL_FIRST;
    sqe->user_data = (uint64_t)(uintptr_t)op;
}

static int uring_accept_peer(const port_op_t *op, port_addr_t *out) {
    return port__peer_get(&OP_PRIV(op)->u.acc.peer, out);
}

static void prep_send(struct io_uring_sqe *sqe, port_op_t *op) {
    struct msghdr *m = &OP_PRIV(op)->u.msg;
    sqe->fd = op->sock;
    sqe->msg_flags = MSG_NOSIGNAL;
    sqe->user_data = (uint64_t)(uintptr_t)op;
    if (m->msg_iovlen == 1) {
        /* One buffer: plain send, cheaper for the kernel than sendmsg. */
        size_t len = m->msg_iov[0].iov_len;
        sqe->opcode = IORING_OP_SEND;
        sqe->addr = (uint64_t)(uintptr_t)m->msg_iov[0].iov_base;
        sqe->len = (uint32_t)(len > 0x7fffffffu ? 0x7fffffffu : len);
    } else {
        sqe->opcode = IORING_OP_SENDMSG;
        sqe->addr = (uint64_t)(uintptr_t)m;
        sqe->len = 1;
    }
}

static void prep_timer(struct io_uring_sqe *sqe, port_op_t *op) {
    sqe->opcode = IORING_OP_TIMEOUT;
    sqe->addr = (uint64_t)(uintptr_t)&OP_PRIV(op)->u.ts;
    sqe->len = 1;
    sqe->off = 0;   /* a pure timer: not satisfied by other completions */
    sqe->user_data = (uint64_t)(uintptr_t)op;
}

/* A NOP that completes op with res (see the top). */
static void prep_imm(struct io_uring_sqe *sqe, port_op_t *op, int64_t res) {
    OP_PRIV(op)->imm_res = res;
    sqe->opcode = IORING_OP_NOP;
    sqe->user_data = (uint64_t)(uintptr_t)op | UD_TAG_IMM;
}

/* Arm (or re-arm, after ENOBUFS or a single-shot completion) a receive.  The cancel
 * flag is read under sq_lock: port_cancel sets it before queueing its ASYNC_CANCEL under
 * the same lock, so either we see the flag, or our SQE is ahead of the cancel in the
 * ring and the kernel finds the receive to cancel. */
void port__uring_resubmit_recv(uring_port_t *p, port_op_t *op, int poll_first) {
    struct io_uring_sqe *sqe;
    port_spin_lock(&p->sq_lock);
    sqe = sqe_get(p);
    if (LOAD_ACQ(&op->cancel_requested)) {
        prep_imm(sqe, op, PORT_ECANCELED);
    } else {
        prep_recv(p, sqe, op, poll_first);
    }
    sqe_commit(p);
    port_spin_unlock(&p->sq_lock);
}

/* Complete op with res without doing I/O (see the top). */
static void submit_imm(uring_port_t *p, port_op_t *op, int64_t res) {
    struct io_uring_sqe *sqe;
    port_spin_lock(&p->sq_lock);
    sqe = sqe_get(p);
    prep_imm(sqe, op, res);
    sqe_commit(p);
    port_spin_unlock(&p->sq_lock);
}

/* (Re-)arm the doorbell's multishot poll; called by the thread reaping its end. */
void port__uring_arm_doorbell(uring_port_t *p) {
    struct io_uring_sqe *sqe;
    port_spin_lock(&p->sq_lock);
    sqe = sqe_get(p);
    sqe->opcode = IORING_OP_POLL_ADD;
    sqe->fd = p->bell_fd;
    sqe->poll32_events = POLLIN;
    sqe->len = IORING_POLL_ADD_MULTI;
    sqe->user_data = UD_DOORBELL;
    sqe_commit(p);
    port_spin_unlock(&p->sq_lock);
}

static void post_wake(uring_port_t *p) {
    struct io_uring_sqe *sqe;
    port_spin_lock(&p->sq_lock);
    sqe = sqe_get(p);
    sqe->opcode = IORING_OP_NOP;
    sqe->user_data = UD_WAKE;
    sqe_commit(p);
    port_spin_unlock(&p->sq_lock);
    port__uring_submit_now(p);
}


/* ---- completions ---------------------------------------------------------------------- */

/* An operation ended with -ECANCELED that nobody asked for: the thread that submitted
 * it exited while it waited (see the top).  Submit it again from this thread; returns 1
 * if so.  A connect is not repeated (the handshake goes on in the kernel, and a second
 * connect would say EALREADY): a poll for its end takes its place, and SO_ERROR then
 * says how it went, as on epoll (a ClientService started by a launcher thread that
 * ended failed with 'connect cancelled'). */
static int resubmit_orphan(uring_port_t *p, port_op_t *op) {
    struct io_uring_sqe *sqe;
    switch (op->type) {
    case PORT_OP_RECV:
        port__uring_resubmit_recv(p, op, (int)OP_PRIV(op)->u.rv.short_read);
        return 1;
    case PORT_OP_ACCEPT:
    case PORT_OP_SEND:
    case PORT_OP_TIMER:
    case PORT_OP_CONNECT:
        break;
    default:
        return 0;
    }
    port_spin_lock(&p->sq_lock);
    sqe = sqe_get(p);
    if (LOAD_ACQ(&op->cancel_requested)) {
        /* A real cancel came meanwhile: honour it. */
        prep_imm(sqe, op, PORT_ECANCELED);
    } else if (op->type == PORT_OP_ACCEPT) {
        prep_accept(p, sqe, op);
    } else if (op->type == PORT_OP_SEND) {
        prep_send(sqe, op);
    } else if (op->type == PORT_OP_CONNECT) {
        OP_PRIV(op)->u.con.polled = 1;
        sqe->opcode = IORING_OP_POLL_ADD;
        sqe->fd = op->sock;
        sqe->poll32_events = POLLOUT;
        sqe->user_data = (uint64_t)(uintptr_t)op;
    } else {
        prep_timer(sqe, op);
    }
    sqe_commit(p);
    port_spin_unlock(&p->sq_lock);
    return 1;
}

/* The buffers this reap pass's completions took, subtracted from br_free once per pass
 * rather than with a locked subtract per completion (br_free may run ahead of the ring
 * anyway: io_uring_bufs.c); applied before anything in the pass reads br_free. */
static void br_taken_flush(uring_port_t *p, int32_t *taken) {
    if (*taken != 0) {
        int32_t in_ring = port_atomic_add32(&p->br_free, -*taken);
        *taken = 0;
        /* The pool's window (port_recv_pool_trim): the buffers lent now. */
        port__pool_note_out(&p->base, port_atomic_load64(&p->base.recv_buffers) - in_ring);
    }
}

/* Turn one CQE into at most one port completion; returns the new batch size. */
static int handle_cqe(uring_port_t *p, port_cqe_t *out, int n, uint64_t ud, int32_t res,
                      uint32_t flags, int32_t *taken) {
    port_cqe_t c;
    int before;
    port_op_t *op = (port_op_t *)(uintptr_t)(ud & ~(uint64_t)UD_TAG_MASK);

    c.op = op;
    c.flags = 0;
    c.buf_id = 0;
    c.buf = NULL;

    if (ud & UD_TAG_IMM) {
        c.res = OP_PRIV(op)->imm_res;
        if (op->type == PORT_OP_RECV && port__bufwait_woken(&OP_PRIV(op)->u.rv.bufwait)) {
            br_taken_flush(p, taken);
            port__uring_recv_woken_done(p, op);   /* cancelled before it took its buffer */
        }
        goto final;
    }

    if (res == -ECANCELED && !LOAD_ACQ(&op->cancel_requested) &&
        !(op->type == PORT_OP_RECV && OP_PRIV(op)->u.rv.paused) && resubmit_orphan(p, op))
        return n;      /* its submitter exited; it runs again, now owned by this thread */

    switch (op->type) {
    case PORT_OP_RECV:
        if (flags & IORING_CQE_F_BUFFER) {
            c.buf_id = flags >> IORING_CQE_BUFFER_SHIFT;
            c.buf = LOAD_ACQ(&p->buf_addr[c.buf_id]);
            c.flags |= PORT_CQE_BUFFER;
            (*taken)++;     /* br_free, at the pass's end (recv_buffers_out: its stats) */
        }
        if (res == -ENOBUFS && !LOAD_ACQ(&op->cancel_requested)) {
            br_taken_flush(p, taken);
            port__uring_recv_out_of_buffers(p, op);
            return n;
        }
        if (port__bufwait_woken(&OP_PRIV(op)->u.rv.bufwait)) {
            br_taken_flush(p, taken);
            port__uring_recv_woken_done(p, op);
        }
        if (res > 0) {
            c.res = res;
            /* Did this read leave the socket empty?  The kernel says so with
             * multishot receives (6.0+); a one-shot read that did not fill its
             * buffer most likely did. */
            OP_PRIV(op)->u.rv.short_read =
                p->multishot != 0 ? !(flags & IORING_CQE_F_SOCK_NONEMPTY)
                                  : (uint32_t)res < p->buf_size;
            if (p->multishot == 0 || !(flags & IORING_CQE_F_MORE)) {
                /* A one-shot receive, or an arming that ended with data (its bound
                 * reached): final.  The caller posts the next receive once it has
                 * dealt with this data, which is what bounds the read-ahead. */
                goto final;
            }
            if (p->multishot < 0)
                port_atomic_store32(&p->multishot, 1);
            c.flags |= PORT_CQE_MORE;
            before = n;
            n = port__deliver(&p->base, out, out, n, &c);
            if (n == before && !OP_PRIV(op)->u.rv.paused) {
                /* Queued behind the thread holding the session's strand (a hook that
                 * blocks): end the arming now, or a peer sending small segments is
                 * lent one buffer per segment until the 64 KiB bound.  Its final
                 * completion (ECANCELED, delivered in order) makes the caller post
                 * the next receive once the hook has had the data, as a bound does. */
                OP_PRIV(op)->u.rv.paused = 1;
                queue_cancel(p, op);
            }
            return n;
        }
        if (res == -EINVAL && p->multishot < 0) {
            /* A kernel without multishot recv rejects the flag, one without the bound
             * (before 6.16) the bound: fall back for good to single-shot receives. */
            port_atomic_store32(&p->multishot, 0);
            port__uring_resubmit_recv(p, op, 0);
            return n;
        }
        c.res = res == 0 ? 0 : (res == -ENOBUFS ? PORT_ECANCELED : port_err_from_os(-res));
        goto final;
    case PORT_OP_ACCEPT:
        if (res == -EINVAL && OP_PRIV(op)->u.acc.poll_first
                && LOAD_ACQ(&p->accept_pf) <= 0 && !LOAD_ACQ(&op->cancel_requested)) {
            /* Before 6.10 the flag is unknown (EINVAL; so is an accept on a socket that
             * does not listen, which then fails the same way once more, without it).
             * Every accept sent before the first answer carries the flag: each one that
             * comes back so is sent again, not only the first. */
            port_atomic_store32(&p->accept_pf, 0);
            resubmit_orphan(p, op);
            return n;
        }
        if (res >= 0 && LOAD_ACQ(&p->accept_pf) < 0)
            port_atomic_store32(&p->accept_pf, 1);
        if (flags & IORING_CQE_F_MORE) {
            /* A multishot arming's connection; it stays armed. */
            c.res = res >= 0 ? res : port_err_from_os(-res);
            c.flags |= PORT_CQE_MORE;
            return port__deliver(&p->base, out, out, n, &c);
        }
        /* An accept of a listener stopped by port_stop_accepts fails (EINVAL). */
        c.res = res >= 0 ? res : LOAD_ACQ(&op->cancel_requested) ? PORT_ECANCELED
                                                                   : port_err_from_os(-res);
        goto final;
    case PORT_OP_TIMER:
        c.res = (res == -ETIME || res >= 0) ? 0 : port_err_from_os(-res);
        goto final;
    case PORT_OP_CONNECT:
        if (OP_PRIV(op)->u.con.polled && res >= 0) {
            /* The poll that took an orphaned connect's place: the handshake is over. */
            int err = 0;
            socklen_t len = sizeof(err);
            if (getsockopt(op->sock, SOL_SOCKET, SO_ERROR, &err, &len) < 0)
                err = errno;
            c.res = err ? port_err_from_os(err) : 0;
        } else {
            c.res = res >= 0 ? res : port_err_from_os(-res);
        }
        goto final;
    default:
        c.res = res >= 0 ? res : port_err_from_os(-res);
        goto final;
    }

final:
    if (op->type == PORT_OP_RECV)
        OP_PRIV(op)->u.rv.paused = 0;   /* a stale cancel then looks like an orphan's */
    port__completed(&p->base, op);
    return port__deliver(&p->base, out, out, n, &c);
}

static int reap(uring_port_t *p, port_cqe_t *out, int max) {
    unsigned head, tail;
    int n = 0;
    int32_t taken = 0;
    if (LOAD_ACQ(p->cq_ktail) == LOAD_ACQ(p->cq_khead))
        return 0;
    port_spin_lock(&p->cq_lock);
    head = *p->cq_khead;
    tail = LOAD_ACQ(p->cq_ktail);
    TSAN_ACQUIRE(&p->ring_fd);
    while (head != tail && n < max) {
        struct io_uring_cqe *cqe = &p->cqes[head & p->cq_mask];
        uint64_t ud = cqe->user_data;
        int32_t res = cqe->res;
        uint32_t flags = cqe->flags;
        head++;
        if (ud == UD_IGNORE || ud == UD_WAKE)
            continue;   /* a cancel's own result; a wake-up, done by arriving */
        if (ud == UD_DOORBELL) {
            uint64_t count;
            /* Answered: the caller's next enter submits what was written before the
             * bell rang (the exchange orders it before our read of the ring's tail). */
            port_atomic_xchg32(&p->bell_rung, 0);
            while (read(p->bell_fd, &count, sizeof(count)) < 0 && errno == EINTR)
                ;
            if (!(flags & IORING_CQE_F_MORE))
                port__uring_arm_doorbell(p);     /* ended (its submitter exited, say): re-arm */
            continue;
        }
        if (ud == UD_DRAIN) {
            port__uring_drain_done(p, flags);
            continue;
        }
        n = handle_cqe(p, out, n, ud, res, flags, &taken);
    }
    br_taken_flush(p, &taken);
    STORE_REL(p->cq_khead, head);
    port_spin_unlock(&p->cq_lock);
    return n;
}

static int is_main_thread(void) { return (pid_t)syscall(SYS_gettid) == getpid(); }

/* One dispatcher: a non-owner waiting in follower_wait looks at the ring now. */
static void wake_follower(uring_port_t *p) {
    pthread_mutex_lock(&p->room);
    pthread_cond_signal(&p->room_cv);
    pthread_mutex_unlock(&p->room);
}

/* One dispatcher: the first thread to wait without a timeout (a dispatch loop) owns the
 * ring and enables it.  A poll or a timed wait is not one: a frame loop's Dispatch(0),
 * or Stop's drain, that came before the worker's first wait took the ring, and once it
 * stopped polling nobody entered the kernel again (the worker waited as a follower).
 * 0, or an error code if the kernel would not enable it. */
static int claim_ring(uring_port_t *p) {
    if (port_atomic_load32(&p->single) == 1 && port_atomic_cas32(&p->owner, 0, my_tid())) {
        if (sys_register(p->ring_fd, IORING_REGISTER_ENABLE_RINGS, NULL, 0) < 0)
            return port_err_from_os(errno);
        port_atomic_store32(&p->single, 2);
    }
    return 0;
}

/* One dispatcher, on a thread that is not the owner: it may not enter the ring, so it
 * takes what the owner's enters put in the completion ring, and otherwise waits in
 * slices (10 ms; the main thread returns PORT_EINTR every 100 ms for its signals).  Its
 * own submissions went to the owner through the doorbell. */
static int follower_wait(uring_port_t *p, port_cqe_t *out, int max, int timeout_ms,
                         int64_t deadline) {
    int n, main_thread = is_main_thread();
    int64_t slices_end = port__now_ns() + 100 * 1000000LL;
    tls_send_deferred = 0;
    tls_waiter_rearmed = NULL;
    for (;;) {
        struct timespec ts;
        int64_t until;
        n = reap(p, out, max);
        if (sq_pending(p))
            ring_doorbell(p);
        if (n > 0)
            return n;
        if (port_atomic_load32(&p->base.closed))
            return PORT_ECLOSED;
        if (timeout_ms == 0)
            return 0;
        until = port__now_ns();
        if (deadline != 0 && until >= deadline)
            return 0;
        if (main_thread && until >= slices_end)
            return PORT_EINTR;
        until += 10 * 1000000LL;
        if (deadline != 0 && deadline < until)
            until = deadline;
        ts.tv_sec = until / 1000000000;
        ts.tv_nsec = until % 1000000000;
        pthread_mutex_lock(&p->room);
        if (!port_atomic_load32(&p->base.closed)) {
            port_atomic_add32(&p->followers, 1);
            (void)pthread_cond_timedwait(&p->room_cv, &p->room, &ts);
            port_atomic_add32(&p->followers, -1);
        }
        pthread_mutex_unlock(&p->room);
    }
}

/* ---- waiting with several workers: a kept leader and a standby -------------------------
 *
 * Handing the leader's place over at every batch costs a condition signal, a wake-up and
 * a sleep per batch: at one connection with two workers, 4.6 futex calls and 4.3 context
 * switches per round trip, where epoll's workers make none and one.  (And a receive's
 * completion work runs in the thread that submitted it, which the kernel wakes wherever
 * it sleeps: with places changing hands, often the other thread.)  So the leader keeps
 * its place while it dispatches (`lead`): its next wait enters at once, as one worker's
 * does.  What a hook that blocks must not stall is watched by one standby thread, which
 * never sleeps in the kernel's completion wait (it would be woken for every completion,
 * and a waiter the kernel does not wake ends the kernel's walk of its wait queue: a
 * leader queued behind it is not woken at all).  It looks every STANDBY_SLICE_NS: if the
 * leader has not entered io_uring_enter since its previous look and is not in it now
 * (`lead_epoch`, `lead_in`) while completions wait in the ring, the leader is stuck in a
 * hook, and the standby takes its place and those completions: a hook that blocks delays
 * another session's completions by about two slices, and a leader that stopped
 * dispatching (its thread left) is replaced as quickly.  A look that finds the leader sleeping in
 * the kernel since the previous one (an idle port) puts the standby to sleep until the
 * leader leaves the kernel (`sb_deep`: the leader's wake-up, one futex call after an
 * idle spell; while busy the leader only reads the flag).  Further threads wait on the
 * room's condition variable until a place is free.  Either place is only an efficiency:
 * two threads that both think they lead (a takeover racing a return) both wait for one
 * completion, and the one that finds `lead` is not its own takes the standby's place
 * at its next wait. */
#define STANDBY_SLICE_NS (1000 * 1000LL)

static long sys_futex(volatile int32_t *addr, int op, int32_t val, const struct timespec *ts) {
    return syscall(SYS_futex, addr, op, val, ts, NULL, 0);
}

/* The leader left the kernel (or its place): a standby asleep since the idle spell looks. */
static void wake_standby(uring_port_t *p) {
    if (__atomic_load_n(&p->sb_deep, __ATOMIC_SEQ_CST) != 0 &&
        __atomic_exchange_n(&p->sb_deep, 0, __ATOMIC_SEQ_CST) != 0)
        (void)sys_futex(&p->sb_deep, FUTEX_WAKE_PRIVATE, 1, NULL);
}

/* A place (leader or standby) became free: a thread waiting for one takes it. */
static void place_freed(uring_port_t *p) {
    if (__atomic_load_n(&p->followers, __ATOMIC_SEQ_CST) > 0)
        wake_follower(p);
}

/* Wait for a free place: 0 when one is, 1 at the deadline, PORT_EINTR (the main thread,
 * every 100 ms: Python runs signal handlers only there), PORT_ECLOSED. */
static int wait_for_place(uring_port_t *p, int64_t deadline) {
    int rc = 0, main_thread = is_main_thread();
    pthread_mutex_lock(&p->room);
    for (;;) {
        struct timespec ts;
        int64_t until = deadline;
        if (port_atomic_load32(&p->base.closed)) {
            rc = PORT_ECLOSED;
            break;
        }
        /* Counted before the look: a thread freeing a place reads the count after it
         * (seq_cst on both sides), so it either sees us or we see the place. */
        __atomic_add_fetch(&p->followers, 1, __ATOMIC_SEQ_CST);
        if (__atomic_load_n(&p->lead, __ATOMIC_SEQ_CST) == 0 ||
            __atomic_load_n(&p->standby, __ATOMIC_SEQ_CST) == 0) {
            __atomic_add_fetch(&p->followers, -1, __ATOMIC_SEQ_CST);
            break;
        }
        if (main_thread) {
            int64_t slice = port__now_ns() + 100 * 1000000LL;
            if (until == 0 || slice < until)
                until = slice;
        }
        if (until == 0) {
            pthread_cond_wait(&p->room_cv, &p->room);
        } else {
            ts.tv_sec = until / 1000000000;
            ts.tv_nsec = until % 1000000000;
            (void)pthread_cond_timedwait(&p->room_cv, &p->room, &ts);
        }
        __atomic_add_fetch(&p->followers, -1, __ATOMIC_SEQ_CST);
        if (until != 0 && port__now_ns() >= until) {
            rc = (deadline != 0 && port__now_ns() >= deadline) ? 1 : PORT_EINTR;
            break;
        }
    }
    pthread_mutex_unlock(&p->room);
    return rc;
}

/* Submissions this thread wrote and will not hand over with a wait of its own. */
static void submit_or_ring(uring_port_t *p) {
    if (sq_pending(p) == 0)
        return;
    if (bell_answered(p))
        ring_doorbell(p);
    else
        port__uring_submit_now(p);
}

/* Reap, else flush the submission ring and wait in the kernel, in one call; until a
 * batch, the deadline, a signal or shutdown.  me: the kept leader (its place may be
 * taken meanwhile: *lost), or 0 for one dispatcher's owner. */
static int enter_wait(uring_port_t *p, port_cqe_t *out, int max, int timeout_ms,
                      int64_t deadline, int32_t me, int *err, int *lost) {
    int n = 0, rc;
    for (;;) {
        struct io_uring_getevents_arg arg;
        struct __kernel_timespec ts;
        unsigned flags = IORING_ENTER_GETEVENTS;
        void *argp = NULL;
        size_t argsz = 0;

        if (port_atomic_load32(&p->base.closed))
            break;
        n = reap(p, out, max);
        if (n > 0)
            break;
        if (timeout_ms > 0) {
            int64_t left = deadline - port__now_ns();
            if (left <= 0)
                break;
            ts.tv_sec = left / 1000000000;
            ts.tv_nsec = left % 1000000000;
            memset(&arg, 0, sizeof(arg));
            arg.sigmask_sz = _NSIG / 8;
            arg.ts = (uint64_t)(uintptr_t)&ts;
            flags |= IORING_ENTER_EXT_ARG;
            argp = &arg;
            argsz = sizeof(arg);
        }
        if (me != 0) {
            __atomic_add_fetch(&p->lead_in, 1, __ATOMIC_SEQ_CST);
            if (__atomic_load_n(&p->lead, __ATOMIC_SEQ_CST) != me) {
                /* The standby took the place while this thread dispatched. */
                __atomic_add_fetch(&p->lead_in, -1, __ATOMIC_SEQ_CST);
                *lost = 1;
                break;
            }
            __atomic_add_fetch(&p->lead_epoch, 1, __ATOMIC_SEQ_CST);
        }
        rc = ring_enter(p, sq_pending(p), 1, flags, argp, argsz);
        if (me != 0) {
            __atomic_add_fetch(&p->lead_in, -1, __ATOMIC_SEQ_CST);
            wake_standby(p);
        }
        port_atomic_add64(&p->base.waits, 1);
        if (rc < 0 && errno == EINTR) {
            *err = PORT_EINTR;
            break;
        }
        if (rc < 0 && errno != ETIME && errno != EAGAIN && errno != EBUSY) {
            *err = port_err_from_os(errno);
            break;
        }
    }
    /* Completions came before this thread entered: what it deferred is still in the
     * ring, and goes before the batch is dispatched, as it always has. */
    if (sq_pending(p))
        port__uring_submit_now(p);
    return n;
}

/* The kept leader's wait. */
static int kept_lead_wait(uring_port_t *p, port_cqe_t *out, int max, int timeout_ms,
                          int64_t deadline, int32_t me, int *lost) {
    int err = 0;
    int n = enter_wait(p, out, max, timeout_ms, deadline, me, &err, lost);
    if (n > 0)
        return n;
    if (!*lost) {
        /* Leaving without a batch (deadline, signal, shutdown): the place is free. */
        __atomic_compare_exchange_n(&p->lead, &me, 0, 0, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
        wake_standby(p);
        place_freed(p);
    }
    if (port_atomic_load32(&p->base.closed))
        return PORT_ECLOSED;
    return err;
}

/* The standby's watch (see above): a batch, 0 at the deadline (with *took_lead set:
 * this thread has the leader's place now, and waits as the leader), or an error. */
static int kept_standby_wait(uring_port_t *p, port_cqe_t *out, int max, int64_t deadline,
                             int32_t me, int *took_lead) {
    uint32_t seen = 0;
    int ret, deep = 0, armed = 0;    /* armed: the last sleep was a whole slice */
    for (;;) {
        struct timespec ts;
        int64_t left = STANDBY_SLICE_NS;
        int32_t lead, in;
        uint32_t epoch;
        long rc;

        if (port_atomic_load32(&p->base.closed)) {
            ret = PORT_ECLOSED;
            break;
        }
        lead = __atomic_load_n(&p->lead, __ATOMIC_SEQ_CST);
        epoch = __atomic_load_n(&p->lead_epoch, __ATOMIC_SEQ_CST);
        in = __atomic_load_n(&p->lead_in, __ATOMIC_SEQ_CST);
        if (lead == 0 || (armed && epoch == seen && in == 0 &&
                          LOAD_ACQ(p->cq_ktail) != LOAD_ACQ(p->cq_khead))) {
            /* No leader, or one out of the kernel for a whole slice with completions
             * waiting: take its place (a place changing hands for nothing costs, as
             * the receives it re-arms wake it for their completion work). */
            if (__atomic_compare_exchange_n(&p->lead, &lead, me, 0, __ATOMIC_SEQ_CST,
                                            __ATOMIC_SEQ_CST)) {
                int n = reap(p, out, max);
                if (n > 0 && sq_pending(p))
                    port__uring_submit_now(p);   /* what reaping wrote */
                *took_lead = n == 0;
                ret = n;
                break;
            }
            continue;
        }
        submit_or_ring(p);
        if (armed && epoch == seen && in > 0) {
            /* The leader slept in the kernel for the whole slice: sleep until it leaves
             * (it reads sb_deep after clearing lead_in; we read lead_in after setting
             * sb_deep). */
            __atomic_store_n(&p->sb_deep, 1, __ATOMIC_SEQ_CST);
            if (__atomic_load_n(&p->lead_in, __ATOMIC_SEQ_CST) > 0 &&
                __atomic_load_n(&p->lead_epoch, __ATOMIC_SEQ_CST) == epoch &&
                !port_atomic_load32(&p->base.closed)) {
                deep = 1;
                left = 1000 * 1000000LL;     /* a look now and then all the same */
            } else {
                __atomic_store_n(&p->sb_deep, 0, __ATOMIC_SEQ_CST);
            }
        }
        seen = epoch;
        if (deadline != 0) {
            int64_t until = deadline - port__now_ns();
            if (until <= 0) {
                ret = 0;
                break;
            }
            if (until < left)
                left = until;
        }
        ts.tv_sec = left / 1000000000;
        ts.tv_nsec = left % 1000000000;
        rc = sys_futex(&p->sb_deep, FUTEX_WAIT_PRIVATE, deep, &ts);
        if (rc < 0 && errno == EINTR) {
            ret = PORT_EINTR;
            break;
        }
        if (deep) {
            /* The leader left the kernel (or a second passed): a whole slice from now
             * before the next verdict. */
            __atomic_store_n(&p->sb_deep, 0, __ATOMIC_SEQ_CST);
            deep = 0;
            armed = 0;
        } else {
            armed = 1;
        }
    }
    if (deep)
        __atomic_store_n(&p->sb_deep, 0, __ATOMIC_SEQ_CST);
    __atomic_compare_exchange_n(&p->standby, &me, 0, 0, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
    place_freed(p);
    return ret;
}

/* Several workers: leader, standby or waiting for a place. */
static int kept_wait(uring_port_t *p, port_cqe_t *out, int max, int timeout_ms,
                     int64_t deadline) {
    int32_t me = my_tid();
    int n, rc;
    for (;;) {
        int32_t seat;
        int lost = 0;
        if (port_atomic_load32(&p->base.closed))
            return PORT_ECLOSED;
        seat = __atomic_load_n(&p->lead, __ATOMIC_SEQ_CST);
        if (seat == me || (seat == 0 && __atomic_compare_exchange_n(
                                            &p->lead, &seat, me, 0, __ATOMIC_SEQ_CST,
                                            __ATOMIC_SEQ_CST))) {
            n = kept_lead_wait(p, out, max, timeout_ms, deadline, me, &lost);
            if (lost && n == 0)
                continue;
            break;
        }
        seat = 0;
        if (__atomic_compare_exchange_n(&p->standby, &seat, me, 0, __ATOMIC_SEQ_CST,
                                        __ATOMIC_SEQ_CST)) {
            int took_lead = 0;
            n = kept_standby_wait(p, out, max, deadline, me, &took_lead);
            if (took_lead)
                continue;
            break;
        }
        /* Both places taken: what this thread deferred must not wait for them. */
        submit_or_ring(p);
        rc = wait_for_place(p, deadline);
        if (rc != 0)
            return rc == 1 ? 0 : rc;
    }
    if (tls_waiter_rearmed == p) {
        tls_waiter_rearmed = NULL;
        port__uring_submit_now(p);
    }
    if (n > 0)
        tls_batch = p;
    return n;
}

static int uring_wait(port_t *bp, port_cqe_t *out, int max, int timeout_ms) {
    uring_port_t *p = (uring_port_t *)bp;
    int n = 0, err = 0, rc, owner = 0, lost = 0;
    int64_t deadline = timeout_ms > 0 ? port__now_ns() + (int64_t)timeout_ms * 1000000 : 0;

    tls_batch = NULL;
    if (tls_release_held == p) {
        tls_release_held = NULL;
        port__uring_release_flush(p);     /* before the kernel may take buffers again */
    }
    if (port_atomic_load32(&p->base.closed))
        return PORT_ECLOSED;
    if (port_atomic_load32(&p->single)) {
        if (timeout_ms < 0 && (rc = claim_ring(p)) != 0)
            return rc;
        if (!may_enter(p))
            return follower_wait(p, out, max, timeout_ms, deadline);
        owner = 1;
    }
    /* Completions already in the ring: take them at once.  Nothing flushed this
     * thread's deferred submissions then, so do it here. */
    n = reap(p, out, max);
    if (n > 0 || timeout_ms == 0) {
        tls_waiter_rearmed = NULL;
        if (n == 0 && (sq_pending(p) || taskrun_pending(p))) {
            /* A poll: submit, and run the completion work waiting for us, in one call. */
            (void)ring_enter(p, sq_pending(p), 0, IORING_ENTER_GETEVENTS, NULL, 0);
        } else if (sq_pending(p)) {
            port__uring_submit_now(p);
        }
        tls_send_deferred = 0;
        if (n == 0)
            n = reap(p, out, max);
        if (n > 0) {
            tls_batch = p;
            if (owner)
                tls_release_held = p;
        }
        return n;
    }
    /* Several workers: the leader's place, kept (see "waiting with several workers").
     * One dispatcher's owner is the only thread that enters: it needs no place (the
     * other threads never take one, and ring the doorbell). */
    tls_send_deferred = 0;
    if (!owner)
        return kept_wait(p, out, max, timeout_ms, deadline);
    n = enter_wait(p, out, max, timeout_ms, deadline, 0, &err, &lost);
    if (port_atomic_load32(&p->followers) > 0)
        wake_follower(p);   /* one may take what this batch left in the ring */
    if (tls_waiter_rearmed == p) {
        tls_waiter_rearmed = NULL;
        port__uring_submit_now(p);
    }
    if (n > 0) {
        tls_batch = p;
        tls_release_held = p;     /* the owner: no other thread gets here */
        return n;
    }
    if (port_atomic_load32(&p->base.closed))
        return PORT_ECLOSED;
    return err;
}

static void uring_batch_end(port_t *bp) {
    uring_port_t *p = (uring_port_t *)bp;
    tls_batch = NULL;
    tls_send_deferred = 0;
    if (tls_release_held == p) {
        tls_release_held = NULL;
        port__uring_release_flush(p);
    }
    /* This thread will not wait again soon (a game loop polling once per frame): what
     * its batch submitted must not wait for the next frame. */
    if (sq_pending(p))
        port__uring_submit_now(p);
}

static void uring_flush_sends(port_t *bp) {
    uring_port_t *p = (uring_port_t *)bp;
    if (tls_send_deferred && tls_batch == p) {
        tls_send_deferred = 0;
        if (tls_release_held == p)
            port__uring_release_flush(p);   /* what it submits may want buffers */
        if (sq_pending(p))
            port__uring_submit_now(p);
    }
}

/* One dispatcher's owner only: the kernel queues the completion work of its ring for
 * its next enter (DEFER_TASKRUN) and says so in the SQ ring's flags (TASKRUN_FLAG).
 * Any other thread waits as before. */
static int uring_work_waiting(port_t *bp) {
    uring_port_t *p = (uring_port_t *)bp;
    if (!port_atomic_load32(&p->single) || port_atomic_load32(&p->owner) != my_tid())
        return 0;
    return LOAD_ACQ(p->cq_ktail) != LOAD_ACQ(p->cq_khead) || taskrun_pending(p);
}

/* A receive buffer given back.  The one dispatcher's owner, in its batch, holds it
 * back for the batch's end (the kernel takes buffers only in the owner's waits, with
 * DEFER_TASKRUN), so a batch gives its buffers back under one lock instead of one each.
 * A kept block's replacement (fresh) goes at once. */
static void uring_recv_release(port_t *bp, uint32_t bid, char *fresh) {
    uring_port_t *p = (uring_port_t *)bp;
    if (fresh == NULL && tls_release_held == p) {
        p->rel_bid[p->rel_n++] = (uint16_t)bid;
        if (p->rel_n == URING_RELEASE_MAX)
            port__uring_release_flush(p);
        return;
    }
    port__uring_recv_release(bp, bid, fresh);
}

/* ---- operations ----------------------------------------------------------------------- */

static int submit_accept(port_t *bp, port_op_t *op, port_sock_t listener, int multishot) {
    uring_port_t *p = (uring_port_t *)bp;
    struct io_uring_sqe *sqe;
    op->sock = listener;
    OP_PRIV(op)->u.acc.multishot = (uint32_t)multishot;
    port__submitted(bp, op);
    port_spin_lock(&p->sq_lock);
    sqe = sqe_get(p);
    prep_accept(p, sqe, op);
    sqe_commit(p);
    port_spin_unlock(&p->sq_lock);
    after_submit(p);
    return 0;
}

static int uring_accept(port_t *bp, port_op_t *op, port_sock_t listener) {
    return submit_accept(bp, op, listener, 0);
}

/* One arming accepts every connection until it ends (an error, a cancel, or the kernel
 * unable to post a completion): an accept posted again per connection armed a poll on
 * the listener and tore it down each time (a connect storm: two poll arms per
 * connection, one with this). */
static int uring_accept_multishot(port_t *bp, port_op_t *op, port_sock_t listener) {
    if (!((uring_port_t *)bp)->accept_ms)
        return PORT_EOPNOTSUPP;
    return submit_accept(bp, op, listener, 1);
}

static int uring_connect(port_t *bp, port_op_t *op, const port_addr_t *addr) {
    uring_port_t *p = (uring_port_t *)bp;
    struct io_uring_sqe *sqe;
    int fd = socket(addr->ss.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, IPPROTO_TCP);
    port__submitted(bp, op);
    op->sock = fd;
    if (fd < 0) {
        submit_imm(p, op, port_err_from_os(errno));
        after_submit(p);
        return 0;
    }
    if ((size_t)addr->len > sizeof(OP_PRIV(op)->u.con.sa)) {
        submit_imm(p, op, PORT_EAFNOSUPPORT);
        after_submit(p);
        return 0;
    }
    memcpy(&OP_PRIV(op)->u.con.sa, &addr->ss, (size_t)addr->len);
    OP_PRIV(op)->u.con.polled = 0;
    port_spin_lock(&p->sq_lock);
    sqe = sqe_get(p);
    sqe->opcode = IORING_OP_CONNECT;
    sqe->fd = fd;
    sqe->addr = (uint64_t)(uintptr_t)&OP_PRIV(op)->u.con.sa;
    sqe->off = (uint64_t)addr->len;
    sqe->user_data = (uint64_t)(uintptr_t)op;
    sqe_commit(p);
    port_spin_unlock(&p->sq_lock);
    after_submit(p);
    return 0;
}

static int uring_recv(port_t *bp, port_op_t *op, port_sock_t sock) {
    uring_port_t *p = (uring_port_t *)bp;
    op->sock = sock;
    port__submitted(bp, op);
    port__uring_resubmit_recv(p, op, (int)OP_PRIV(op)->u.rv.short_read);
    after_submit(p);
    return 0;
}

static int uring_send(port_t *bp, port_op_t *op, port_sock_t sock, const port_buf_t *bufs,
                      int nbufs) {
    uring_port_t *p = (uring_port_t *)bp;
    struct io_uring_sqe *sqe;
    op->sock = sock;
    port__submitted(bp, op);
    {
        /* Kept in the op: a resubmission (resubmit_orphan) needs it again. */
        struct msghdr *m = &OP_PRIV(op)->u.msg;
        memset(m, 0, sizeof(*m));
        m->msg_iov = (struct iovec *)(void *)bufs;
        m->msg_iovlen = (size_t)nbufs;
    }
    port_spin_lock(&p->sq_lock);
    sqe = sqe_get(p);
    prep_send(sqe, op);
    sqe_commit(p);
    port_spin_unlock(&p->sq_lock);
    if (tls_batch == p)
        tls_send_deferred = 1;
    after_submit(p);
    return 0;
}

/* Queue an IORING_OP_CLOSE behind everything already in the submission ring (see
 * "Descriptors" at the top).  The abortive close's linger setting changes nothing about
 * the number, so it is made at once. */
static void prep_close_locked(uring_port_t *p, port_sock_t sock, int flags, port_op_t *op) {
    struct io_uring_sqe *sqe;
    if (flags & PORT_CLOSE_RESET) {
        struct linger lg;
        lg.l_onoff = 1;
        lg.l_linger = 0;
        (void)setsockopt(sock, SOL_SOCKET, SO_LINGER, &lg, sizeof(lg));
    }
    sqe = sqe_get(p);
    sqe->opcode = IORING_OP_CLOSE;
    sqe->fd = sock;
    sqe->user_data = (uint64_t)(uintptr_t)op;
    sqe_commit(p);
}

static int uring_close(port_t *bp, port_op_t *op, port_sock_t sock, int flags) {
    uring_port_t *p = (uring_port_t *)bp;
    op->sock = sock;
    port__submitted(bp, op);
    if (sock < 0) {
        submit_imm(p, op, PORT_EBADF);
    } else {
        port_spin_lock(&p->sq_lock);
        prep_close_locked(p, sock, flags, op);
        port_spin_unlock(&p->sq_lock);
    }
    after_submit(p);
    return 0;
}

static int uring_cancel(port_t *bp, port_op_t *target) {
    uring_port_t *p = (uring_port_t *)bp;
    int parked;

    /* A receive parked for buffers is not in the kernel: finish it here. */
    if (target->type == PORT_OP_RECV) {
        port_spin_lock(&p->br_lock);
        parked = port__bufwaitq_remove(&p->waiters, &OP_PRIV(target)->u.rv.bufwait);
        port_spin_unlock(&p->br_lock);
        if (parked) {
            submit_imm(p, target, PORT_ECANCELED);
            after_submit(p);
            return 0;
        }
    }
    queue_cancel(p, target);
    after_submit(p);
    return 0;
}

/* A listener's accepts, all at once: shutdown(2) of a listening socket wakes every
 * accept waiting on it, each of which then fails (EINVAL: it no longer listens) and
 * completes as cancelled (its flag is set).  A cancel per accept costs a walk of a
 * kernel hash bucket each (at most 256 buckets: quadratic), and one cancel keyed on the
 * socket (IORING_ASYNC_CANCEL_FD | _ALL) walks every bucket per request it finds: worse
 * (10,000 accepts: 0.94 s against 0.03 s a cancel each; shutdown: see port.h). */
static int uring_stop_listener(port_t *bp, port_sock_t s) {
    PORT_UNUSED(bp);
    return shutdown(s, SHUT_RDWR) == 0 ? 0 : port_err_from_os(errno);
}

static int uring_post(port_t *bp, port_op_t *op, int64_t value) {
    uring_port_t *p = (uring_port_t *)bp;
    port__submitted(bp, op);
    submit_imm(p, op, value);
    after_submit(p);
    return 0;
}

static int uring_timer(port_t *bp, port_op_t *op, uint64_t ms) {
    uring_port_t *p = (uring_port_t *)bp;
    struct io_uring_sqe *sqe;
    struct __kernel_timespec *ts = &OP_PRIV(op)->u.ts;
    ts->tv_sec = (long long)(ms / 1000);
    ts->tv_nsec = (long long)(ms % 1000) * 1000000;
    port__submitted(bp, op);
    port_spin_lock(&p->sq_lock);
    sqe = sqe_get(p);
    prep_timer(sqe, op);
    sqe_commit(p);
    port_spin_unlock(&p->sq_lock);
    after_submit(p);
    return 0;
}

static int uring_listen(port_t *bp, const port_addr_t *addr, int backlog, int flags,
                        port_sock_t *out) {
    PORT_UNUSED(bp);
    return port__posix_listen_socket(addr, backlog, flags, out);
}

/* Does an SQE still in the submission ring (written, not yet taken by the kernel) name
 * s?  Under sq_lock.  What the kernel took holds its own reference to the socket. */
static int ring_names_locked(uring_port_t *p, port_sock_t s) {
    unsigned i, tail = p->sq_tail;
    for (i = LOAD_ACQ(p->sq_khead); i != tail; i++)
        if (p->sqes[i & p->sq_mask].fd == s)
            return 1;
    return 0;
}

/* Close s at once if no SQE still in the ring names it (return 1; res: close(2)'s);
 * else, with `behind`, queue an IORING_OP_CLOSE behind those SQEs (return 1, res 0), or
 * leave it to the caller (return 0).  The look is under sq_lock, so no SQE on s comes
 * after it (a receive or accept the port re-arms reads its cancel flag, set before this
 * call, under the same lock). */
static int close_unless_named(uring_port_t *p, port_sock_t s, int flags, int behind,
                              int *res) {
    int named;
    port_spin_lock(&p->sq_lock);
    named = ring_names_locked(p, s);
    if (named && behind)
        prep_close_locked(p, s, flags, NULL);   /* UD_IGNORE: nobody waits for it */
    port_spin_unlock(&p->sq_lock);
    if (!named) {
        *res = port__posix_close(s, flags);
        return 1;
    }
    if (behind) {
        ring_doorbell(p);
        *res = 0;
        return 1;
    }
    return 0;
}

/* The ring is shut: the cancels queued for s never run, so a receive the kernel still
 * holds keeps the socket open past close(2), and the peer would hear nothing until the
 * process exits.  End the connection itself, whoever holds the socket: a reset is a
 * connect to AF_UNSPEC (TCP's disconnect), a graceful close shutdown(2). */
static void end_connection_of_shut_ring(port_sock_t s, int flags) {
    if (flags & PORT_CLOSE_RESET) {
        struct sockaddr sa;
        memset(&sa, 0, sizeof(sa));
        sa.sa_family = AF_UNSPEC;
        if (connect(s, &sa, sizeof(sa)) == 0)
            return;
    }
    (void)shutdown(s, SHUT_RDWR);   /* ENOTCONN for a listener or a dead socket: fine */
}

static int uring_sock_close(port_t *bp, port_sock_t s, int flags) {
    uring_port_t *p = (uring_port_t *)bp;
    int res;
    if (__atomic_load_n(&p->base.closed, __ATOMIC_SEQ_CST))
        end_connection_of_shut_ring(s, flags);
    if (port_atomic_load32(&p->single)) {
        if (__atomic_load_n(&p->base.closed, __ATOMIC_SEQ_CST)) {
            /* Nothing is entered any more: what the ring still holds never runs. */
            while (__atomic_load_n(&p->entering, __ATOMIC_SEQ_CST) != 0)
                port_thread_yield();
            return port__posix_close(s, flags);
        }
        if (!may_enter(p)) {
            close_unless_named(p, s, flags, 1, &res);
            return res;
        }
    }
    /* Done when this returns, with close(2)'s own result.  Mostly nothing in the ring
     * names s (a session closes so only with nothing in flight): close at once, no
     * system call to submit first.  Else hand what the ring holds to the kernel first.
     * Nothing on s can be written after that: the caller submits nothing more on it,
     * and a receive or accept that this port re-arms by itself reads its cancel flag. */
    if (close_unless_named(p, s, flags, 0, &res))
        return res;
    if (!submit_all(p))
        return PORT_EBUSY;   /* the ring cannot be submitted: better a leak than a cross */
    return port__posix_close(s, flags);
}


static void uring_shutdown(port_t *bp) {
    uring_port_t *p = (uring_port_t *)bp;
    if (port_atomic_xchg32(&p->base.closed, 1))
        return;
    post_wake(p);      /* the leader, in the kernel */
    wake_standby(p);   /* a standby asleep until the leader leaves the kernel */
    pthread_mutex_lock(&p->room);
    pthread_cond_broadcast(&p->room_cv);   /* the followers */
    pthread_mutex_unlock(&p->room);
}

static void uring_destroy(port_t *bp) {
    uring_port_t *p = (uring_port_t *)bp;
    port_atomic_store32(&p->base.closed, 1);
    if (tls_batch == p)
        tls_batch = NULL;
    if (tls_release_held == p)
        tls_release_held = NULL;
    port__uring_free(p);
}

/* The pool after a spike (io_uring_bufs.c, "Trim"): receives of our own take up to
 * DRAIN_MAX buffers from the ring per call; what they take is given back as their
 * completions are reaped, so this says *more until they all are. */
#define DRAIN_MAX 256
static int64_t uring_pool_trim(port_t *bp, int64_t keep, int *more) {
    static const char tokens[DRAIN_MAX];
    uring_port_t *p = (uring_port_t *)bp;
    int64_t k = port_atomic_load64(&p->base.recv_buffers) - keep;
    int32_t in_ring = port_atomic_load32(&p->br_free);
    ssize_t w, i;
    if (port_atomic_load32(&p->drain_pending) > 0) {
        *more = 1;      /* the last ones are not all back yet */
        return 0;
    }
    if (k > in_ring)
        k = in_ring;    /* the rest is lent: trimmed at a later tick, once back */
    if (k > DRAIN_MAX)
        k = DRAIN_MAX;
    if (k <= 0)
        return 0;
    if (p->drain_fd[0] < 0 &&
        socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0, p->drain_fd) < 0) {
        p->drain_fd[0] = p->drain_fd[1] = -1;
        return 0;       /* no descriptor to spare: the pool stays as it is */
    }
    do
        w = write(p->drain_fd[1], tokens, (size_t)k);
    while (w < 0 && errno == EINTR);
    if (w <= 0)
        return 0;
    port_atomic_add32(&p->drain_pending, (int32_t)w);
    port_spin_lock(&p->sq_lock);
    for (i = 0; i < w; i++) {
        struct io_uring_sqe *sqe = sqe_get(p);
        sqe->opcode = IORING_OP_RECV;
        sqe->fd = p->drain_fd[0];
        sqe->len = 1;
        sqe->flags = IOSQE_BUFFER_SELECT;
        sqe->buf_group = BGID;
        sqe->user_data = UD_DRAIN;
        sqe_commit(p);
    }
    port_spin_unlock(&p->sq_lock);
    after_submit(p);
    *more = 1;
    return 0;
}

const port_vtable_t port__io_uring_vtable = {
    "io_uring",
    port__uring_probe,
    port__uring_create,
    uring_shutdown,
    uring_destroy,
    uring_wait,
    uring_batch_end,
    uring_accept,
    uring_connect,
    uring_recv,
    uring_recv_release,
    uring_send,
    uring_close,
    uring_cancel,
    uring_post,
    uring_timer,
    uring_listen,
    uring_sock_close,
    port__posix_port_send_now,  /* a socket is a plain descriptor: send(2) at once */
    uring_flush_sends,
    uring_accept_peer,
    uring_stop_listener,
    uring_work_waiting,
    port__uring_buffers_out,
    uring_accept_multishot,
    uring_pool_trim,
};
#endif /* __linux__ */
