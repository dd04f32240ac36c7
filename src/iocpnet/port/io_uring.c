/*
 * io_uring.c -- the Linux completion port.
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
 *     wake-ups).  So only one thread, the leader, sleeps in the kernel; the others wait
 *     on a condition variable and the leader hands its place to one of them as soon as
 *     it has reaped a batch, before dispatching it.  Completions already in the ring
 *     are taken by any thread without waiting for its turn.
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
 * with few buffers and grows when the kernel runs out (ENOBUFS), so the memory touched
 * follows the peak of data in flight, not the number of connections.  A receive is a
 * single-shot recv, posted again by the caller once it has handled the data, so the
 * kernel never reads more than one buffer ahead of the application per connection.
 * When the previous read on an op did not fill its buffer, the next one asks the
 * kernel to poll first (the socket is then most likely empty, and a recv attempt would
 * only fail with EAGAIN).  Multishot recv (PORT_OPT_RECV_MULTISHOT, which the core asks
 * for) saves that submission and its poll arming per message: each arming is bounded
 * to MSHOT_BUFFERS buffers' worth of bytes (sqe->optlen, 6.16+), after which its last
 * completion is final and the caller posts the next receive once it has dealt with the
 * data, so read-ahead stays bounded as with one-shot receives.  A kernel that cannot
 * bound it (or lacks multishot) rejects the SQE with EINVAL: receives are then one-shot
 * for good.
 *
 * When every buffer is out, the receives that found the ring empty wait on a FIFO and
 * each buffer given back re-arms one of them, the oldest ("receive buffers" below).  A
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
 * inside the io_uring_enter that submits it (this file uses no links, IOSQE_ASYNC or
 * drains, the cases that would defer that), so every earlier operation holds its own
 * reference to the socket before the number is released; they end with their cancels,
 * queued by the caller ahead of the close.  The alternatives: flushing the ring before
 * close(2) costs a system call per close and needs every thread to be able to submit
 * (a SINGLE_ISSUER ring forbids it); a CLOSE linked after the operations would wait
 * for them to finish (for a send to a peer that does not read: forever); registered
 * descriptors remove the question but move the descriptor table into the ring, a larger
 * change left for when a profile asks for direct descriptors.  port_sock_close, which
 * is synchronous (and rare: listeners, refused connections), hands the ring to the
 * kernel first, then calls close(2).
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
#include "port_int.h"

#include <errno.h>
#include <linux/io_uring.h>
#include <linux/time_types.h>
#include <signal.h>
#include <stdlib.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

/* Kernel headers older than the kernel: Ubuntu 22.04 ships 5.15's, RHEL 9 5.14's, while
 * the machines often run newer kernels.  What this file uses from after 5.13 is plain
 * ABI (flag bits, a register opcode, three small structs), defined here when the header
 * lacks it; the probe at start-up asks the running kernel whether it has them.  Headers
 * before 5.13 are too old to build this file (setup.py then builds epoll only). */
#ifndef IORING_SETUP_SUBMIT_ALL
#  define IORING_SETUP_SUBMIT_ALL (1U << 7)            /* 5.18 */
#endif
#ifndef IORING_POLL_ADD_MULTI
#  define IORING_POLL_ADD_MULTI (1U << 0)              /* 5.13 */
#endif
#ifndef IORING_RECV_MULTISHOT
#  define IORING_RECV_MULTISHOT (1U << 1)              /* 6.0 */
#endif
#ifndef IORING_SETUP_COOP_TASKRUN
#  define IORING_SETUP_COOP_TASKRUN (1U << 8)          /* 5.19 */
#  define IORING_SETUP_TASKRUN_FLAG (1U << 9)
#endif
#ifndef IORING_SQ_TASKRUN
#  define IORING_SQ_TASKRUN (1U << 1)                  /* 5.19 */
#endif
#ifndef IORING_RECVSEND_POLL_FIRST
/* 5.19: the provided-buffer ring came in the same release. */
#  define IORING_RECVSEND_POLL_FIRST (1U << 0)
#  define IORING_REGISTER_PBUF_RING 22
struct io_uring_buf {
    __u64 addr;
    __u32 len;
    __u16 bid;
    __u16 resv;
};
struct io_uring_buf_ring {
    union {
        struct {
            __u64 resv1;
            __u32 resv2;
            __u16 resv3;
            __u16 tail;
        };
        struct io_uring_buf bufs[0];
    };
};
struct io_uring_buf_reg {
    __u64 ring_addr;
    __u32 ring_entries;
    __u16 bgid;
    __u16 pad;
    __u64 resv[3];
};
#endif

#ifndef __NR_io_uring_setup
#  define __NR_io_uring_setup 425
#endif
#ifndef __NR_io_uring_enter
#  define __NR_io_uring_enter 426
#endif
#ifndef __NR_io_uring_register
#  define __NR_io_uring_register 427
#endif

#define UD_IGNORE 0u          /* internal SQEs (cancels): their CQEs are dropped */
#define UD_WAKE 8u            /* port_shutdown's wake-ups */
#define UD_DOORBELL 16u       /* the doorbell's multishot poll */
#define UD_TAG_IMM 1u         /* a NOP carrying a result stored in the op */
#define UD_TAG_MASK 7u

#define BGID 0                /* our single buffer group */
#define INITIAL_BUFFERS 64u
#define MSHOT_BUFFERS 4u      /* read-ahead of one multishot arming, in buffers' worth */

/* What an op keeps while in flight, inside port_op_t.priv. */
typedef struct uring_op {
    union {
        struct msghdr msg;           /* sendmsg: the kernel reads it until completion */
        struct __kernel_timespec ts; /* timer */
        struct sockaddr_in6 sa;      /* connect: a copy, so the caller's may go away */
        struct {
            uint32_t short_read;     /* the last read did not fill its buffer */
            uint16_t woken;          /* re-armed by a buffer given back (see below) */
            uint16_t polled;         /* armed to poll first: an ENOBUFS means data waits */
        } rv;                        /* recv */
    } u;
    int64_t imm_res;                 /* result carried by an immediate completion */
    port_op_t *rearm_next;           /* recvs waiting for receive buffers */
} uring_op_t;

PORT_STATIC_ASSERT(sizeof(uring_op_t) <= sizeof(((port_op_t *)0)->priv), uring_op_fits);
PORT_STATIC_ASSERT(sizeof(port_buf_t) == sizeof(struct iovec), iovec_size);
PORT_STATIC_ASSERT(offsetof(port_buf_t, base) == offsetof(struct iovec, iov_base), iovec_base);
PORT_STATIC_ASSERT(offsetof(port_buf_t, len) == offsetof(struct iovec, iov_len), iovec_len);

#define OP_PRIV(op) ((uring_op_t *)(void *)(op)->priv)

typedef struct uring_port {
    port_t base;
    int ring_fd;
    unsigned features;
    unsigned setup_flags;              /* IORING_SETUP_* the ring was made with */

    /* submission ring */
    unsigned *sq_khead, *sq_ktail, *sq_kflags;
    unsigned sq_mask, sq_entries;
    unsigned sq_tail;                  /* our tail, under sq_lock */
    struct io_uring_sqe *sqes;
    volatile int32_t sq_lock;

    /* completion ring */
    unsigned *cq_khead, *cq_ktail;
    unsigned cq_mask;
    struct io_uring_cqe *cqes;
    volatile int32_t cq_lock;

    void *sq_ring, *cq_ring;
    size_t sq_ring_sz, cq_ring_sz, sqes_sz;

    /* provided receive buffers */
    struct io_uring_buf_ring *br;
    size_t br_sz;
    unsigned br_mask;
    uint16_t br_tail;                  /* under br_lock */
    char **buf_addr;                   /* buffer id -> its memory (atomic entries) */
    unsigned buf_size, buf_max, buf_made;
    volatile int32_t br_lock;
    port_op_t *rearm_head, *rearm_tail; /* receives waiting for a buffer; under br_lock */
    uint32_t woken;                    /* of them, re-armed and not yet resolved; br_lock */
    volatile int32_t br_free;          /* buffers in the ring not yet seen taken */
    volatile int32_t multishot;        /* 1 works, -1 not known yet, 0 off */
    volatile uint32_t mshot_limit;     /* bytes one multishot arming may read; 0: no bound */

    volatile int32_t waiters;

    /* The doorbell: other threads' SQEs wait for a worker to submit them. */
    int bell_fd;
    volatile int32_t bell_rung;        /* written and not yet answered */

    /* Leader/follower: one thread sleeps in the kernel, the others here. */
    pthread_mutex_t room;
    pthread_cond_t room_cv;
    int leader;                        /* written under room; read by after_submit */
} uring_port_t;

/* The port whose batch this thread is dispatching: its submissions are deferred. */
static PORT_THREAD_LOCAL uring_port_t *tls_batch;
/* This thread deferred a send during its batch: port_flush_sends hands it over. */
static PORT_THREAD_LOCAL int tls_send_deferred;
/* This thread re-armed a receive waiting for a buffer while reaping: submit before the
 * batch is dispatched (see waiter_submit). */
static PORT_THREAD_LOCAL uring_port_t *tls_waiter_rearmed;

static int sys_setup(unsigned entries, struct io_uring_params *p) {
    return (int)syscall(__NR_io_uring_setup, entries, p);
}
static int sys_enter(int fd, unsigned to_submit, unsigned min_complete, unsigned flags,
                     void *arg, size_t argsz) {
    return (int)syscall(__NR_io_uring_enter, fd, to_submit, min_complete, flags, arg, argsz);
}
static int sys_register(int fd, unsigned opcode, void *arg, unsigned nr) {
    return (int)syscall(__NR_io_uring_register, fd, opcode, arg, nr);
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

#define LOAD_ACQ(p) __atomic_load_n((p), __ATOMIC_ACQUIRE)
#define STORE_REL(p, v) __atomic_store_n((p), (v), __ATOMIC_RELEASE)

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
static void submit_now(uring_port_t *p) {
    int tries = 0;
    for (;;) {
        unsigned n = sq_pending(p);
        if (n == 0)
            return;
        if (sys_enter(p->ring_fd, n, 0, 0, NULL, 0) >= 0)
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
        if (sys_enter(p->ring_fd, sq_pending(p), 0, 0, NULL, 0) < 0 && errno != EINTR &&
            errno != EAGAIN && errno != EBUSY)
            return 0;
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
        submit_now(p);
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

static void arm_doorbell(uring_port_t *p);

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
static void after_submit(uring_port_t *p) {
    if (tls_batch == p)
        return;
    if (__atomic_load_n(&p->leader, __ATOMIC_ACQUIRE))
        ring_doorbell(p);
    else
        submit_now(p);
}

/* poll_first: RECV_POLL_MAYBE polls first if this is a one-shot receive (the previous
 * read came back short), RECV_POLL_ALWAYS makes a one-shot receive that polls first even
 * where receives are multishot: it takes a buffer only once data is there (see
 * "receive buffers" below). */
#define RECV_POLL_MAYBE 1
#define RECV_POLL_ALWAYS 2

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
        /* sqe->optlen (6.16+; the file_index field of older headers): the arming ends,
         * with a final completion carrying data, after this many bytes. */
        sqe->file_index = LOAD_ACQ(&p->mshot_limit);
    } else if (poll_first) {
        sqe->ioprio = IORING_RECVSEND_POLL_FIRST;
        polled = 1;
    }
    __atomic_store_n(&OP_PRIV(op)->u.rv.polled, (uint16_t)polled, __ATOMIC_RELAXED);
    sqe->user_data = (uint64_t)(uintptr_t)op;
}

static void prep_accept(struct io_uring_sqe *sqe, port_op_t *op) {
    sqe->opcode = IORING_OP_ACCEPT;
    sqe->fd = op->sock;
    sqe->accept_flags = SOCK_NONBLOCK | SOCK_CLOEXEC;
    sqe->user_data = (uint64_t)(uintptr_t)op;
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

/* A NOP that completes op with res (see the top of the file). */
static void prep_imm(struct io_uring_sqe *sqe, port_op_t *op, int64_t res) {
    OP_PRIV(op)->imm_res = res;
    sqe->opcode = IORING_OP_NOP;
    sqe->user_data = (uint64_t)(uintptr_t)op | UD_TAG_IMM;
}

/* Arm (or re-arm, after ENOBUFS or a single-shot completion) a receive.  The cancel
 * flag is read under sq_lock: port_cancel sets it before queueing its ASYNC_CANCEL under
 * the same lock, so either we see the flag, or our SQE is ahead of the cancel in the
 * ring and the kernel finds the receive to cancel. */
static void resubmit_recv(uring_port_t *p, port_op_t *op, int poll_first) {
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

/* Complete op with res without doing I/O (see the top of the file). */
static void submit_imm(uring_port_t *p, port_op_t *op, int64_t res) {
    struct io_uring_sqe *sqe;
    port_spin_lock(&p->sq_lock);
    sqe = sqe_get(p);
    prep_imm(sqe, op, res);
    sqe_commit(p);
    port_spin_unlock(&p->sq_lock);
}

/* (Re-)arm the doorbell's multishot poll; called by the thread reaping its end. */
static void arm_doorbell(uring_port_t *p) {
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
    submit_now(p);
}

/* ---- receive buffers ------------------------------------------------------------------ */

/* Each buffer is a heap block of its own (buf_addr[id]), so that one the caller keeps
 * (port_recv_detach) simply leaves the pool, which puts a fresh block under the same id.
 *
 * Waiters.  A receive that finds the ring empty completes with ENOBUFS.  One that did
 * not poll first picks its buffer before reading, so its ENOBUFS says nothing about data:
 * it is re-armed to poll first.  One that polled first has data waiting: it is parked on
 * a FIFO, and each buffer given back re-arms one waiter, the oldest, to poll first again
 * (re-arming them all would cost one SQE and one ENOBUFS completion per waiter per
 * release, and the newest would win; waking an idle connection would strand the buffer).  br_free counts the buffers in the ring that no reaped completion has
 * taken yet, `woken` the waiters re-armed for one of them whose outcome is not known
 * yet: a waiter is woken only while br_free > woken.  A woken receive that completes
 * without taking a buffer (cancelled, the peer closed) passes the wake on; one that
 * lost its buffer to another receive goes back to the head of the queue.  br_free may
 * run ahead of the ring for as long as a completion that took a buffer is not reaped,
 * which at worst re-arms a receive that then waits again. */

static void br_add(uring_port_t *p, unsigned bid) {
    /* Write the fields one by one: the ring's tail lives in the `resv` field of entry 0. */
    struct io_uring_buf *b = &p->br->bufs[p->br_tail & p->br_mask];
    b->addr = (uint64_t)(uintptr_t)LOAD_ACQ(&p->buf_addr[bid]);
    b->len = p->buf_size;
    b->bid = (uint16_t)bid;
    p->br_tail++;
}

static void br_publish(uring_port_t *p) { STORE_REL(&p->br->tail, p->br_tail); }

/* Make up to `count` more buffers (under br_lock).  Returns how many were made. */
static unsigned br_grow(uring_port_t *p, unsigned count) {
    unsigned made = 0;
    if (count > p->buf_max - p->buf_made)
        count = p->buf_max - p->buf_made;
    while (made < count) {
        char *b = port__buf_alloc(p->buf_size);
        if (b == NULL)
            break;      /* out of memory: the pool stays smaller (receives wait) */
        STORE_REL(&p->buf_addr[p->buf_made], b);
        br_add(p, p->buf_made);
        p->buf_made++;
        made++;
    }
    if (made) {
        br_publish(p);
        port_atomic_add32(&p->br_free, (int32_t)made);
        port_atomic_add64(&p->base.recv_buffers, made);
    }
    return made;
}

/* The oldest waiter, if a buffer is free for it (under br_lock); the caller re-arms it. */
static port_op_t *waiter_wake(uring_port_t *p) {
    port_op_t *op = p->rearm_head;
    if (op == NULL || port_atomic_load32(&p->br_free) <= (int32_t)p->woken)
        return NULL;
    p->rearm_head = OP_PRIV(op)->rearm_next;
    if (p->rearm_head == NULL)
        p->rearm_tail = NULL;
    port_atomic_add64(&p->base.recv_waiting, -1);
    __atomic_store_n(&OP_PRIV(op)->u.rv.woken, (uint16_t)1, __ATOMIC_RELAXED);
    p->woken++;
    return op;
}

/* A waiter just re-armed belongs to another session, and the rest of this thread's
 * batch may take long (a hook that blocks holds every later completion of its batch):
 * so its SQE goes to the kernel now, not with this thread's next wait.  While reaping,
 * uring_wait does it before handing out the batch.  Rare: only when the pool is dry. */
static void waiter_submit(uring_port_t *p, int reaping) {
    if (reaping)
        tls_waiter_rearmed = p;
    else if (__atomic_load_n(&p->leader, __ATOMIC_ACQUIRE))
        ring_doorbell(p);
    else
        submit_now(p);
}

/* A woken receive's outcome is known (under br_lock). */
static void waiter_resolved(uring_port_t *p, port_op_t *op) {
    __atomic_store_n(&OP_PRIV(op)->u.rv.woken, (uint16_t)0, __ATOMIC_RELAXED);
    p->woken--;
}

static void uring_recv_release(port_t *bp, uint32_t bid, char *fresh) {
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
    if (w != NULL) {
        resubmit_recv(p, w, RECV_POLL_ALWAYS);
        waiter_submit(p, 0);
    }
}

/* A receive that was woken for a buffer completed without ENOBUFS (called while
 * reaping): it took the buffer, or it ended without one and passes the wake on. */
static void recv_woken_done(uring_port_t *p, port_op_t *op) {
    port_op_t *w;
    port_spin_lock(&p->br_lock);
    waiter_resolved(p, op);
    w = waiter_wake(p);
    port_spin_unlock(&p->br_lock);
    if (w != NULL) {
        resubmit_recv(p, w, RECV_POLL_ALWAYS);
        waiter_submit(p, 1);
    }
}

/* The kernel ran out of buffers for op's receive (called while reaping). */
static void recv_out_of_buffers(uring_port_t *p, port_op_t *op) {
    int now = 0, mode = 0, woken;
    port_spin_lock(&p->br_lock);
    woken = (int)__atomic_load_n(&OP_PRIV(op)->u.rv.woken, __ATOMIC_RELAXED);
    if (woken)
        waiter_resolved(p, op);
    if (br_grow(p, p->buf_made) > 0) {
        now = 1;           /* room again */
    } else if (!__atomic_load_n(&OP_PRIV(op)->u.rv.polled, __ATOMIC_RELAXED)) {
        /* A receive that does not poll first picks its buffer before it reads: this
         * ENOBUFS says nothing about data (an idle connection gets it too).  Re-arm it
         * to poll first: it asks for a buffer, or comes back here, only once data is
         * there, so the queue holds receives with data waiting, and a wake never goes
         * to a connection with nothing to read. */
        now = 1;
        mode = RECV_POLL_ALWAYS;
    } else if ((woken || p->rearm_head == NULL) &&
               port_atomic_load32(&p->br_free) > (int32_t)p->woken) {
        /* A buffer came back since the kernel looked, and nobody older waits for it. */
        __atomic_store_n(&OP_PRIV(op)->u.rv.woken, (uint16_t)1, __ATOMIC_RELAXED);
        p->woken++;
        now = 1;
        mode = RECV_POLL_ALWAYS;
    } else if (woken) {
        /* Another receive took the buffer it was woken for: it stays the oldest. */
        port_atomic_add64(&p->base.recv_waiting, 1);
        OP_PRIV(op)->rearm_next = p->rearm_head;
        p->rearm_head = op;
        if (p->rearm_tail == NULL)
            p->rearm_tail = op;
    } else {
        port_atomic_add64(&p->base.recv_waiting, 1);
        OP_PRIV(op)->rearm_next = NULL;
        if (p->rearm_tail != NULL)
            OP_PRIV(p->rearm_tail)->rearm_next = op;
        else
            p->rearm_head = op;
        p->rearm_tail = op;
    }
    port_spin_unlock(&p->br_lock);
    if (now) {
        resubmit_recv(p, op, mode);
        waiter_submit(p, 1);
    }
}

/* ---- completions ---------------------------------------------------------------------- */

/* An operation ended with -ECANCELED that nobody asked for: the worker that submitted
 * it exited while it waited (see the top).  Submit it again from this thread if it can
 * simply be repeated; returns 1 if so.  A connect cannot (the attempt may have gone on
 * in the kernel): it is reported. */
static int resubmit_orphan(uring_port_t *p, port_op_t *op) {
    struct io_uring_sqe *sqe;
    switch (op->type) {
    case PORT_OP_RECV:
        resubmit_recv(p, op, (int)OP_PRIV(op)->u.rv.short_read);
        return 1;
    case PORT_OP_ACCEPT:
    case PORT_OP_SEND:
    case PORT_OP_TIMER:
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
        prep_accept(sqe, op);
    } else if (op->type == PORT_OP_SEND) {
        prep_send(sqe, op);
    } else {
        prep_timer(sqe, op);
    }
    sqe_commit(p);
    port_spin_unlock(&p->sq_lock);
    return 1;
}

/* Turn one CQE into at most one port completion; returns the new batch size. */
static int handle_cqe(uring_port_t *p, port_cqe_t *out, int n, uint64_t ud, int32_t res,
                      uint32_t flags) {
    port_cqe_t c;
    port_op_t *op = (port_op_t *)(uintptr_t)(ud & ~(uint64_t)UD_TAG_MASK);

    c.op = op;
    c.flags = 0;
    c.buf_id = 0;
    c.buf = NULL;

    if (ud & UD_TAG_IMM) {
        c.res = OP_PRIV(op)->imm_res;
        if (op->type == PORT_OP_RECV && __atomic_load_n(&OP_PRIV(op)->u.rv.woken, __ATOMIC_RELAXED))
            recv_woken_done(p, op);   /* cancelled before it took its buffer */
        goto final;
    }

    if (res == -ECANCELED && !LOAD_ACQ(&op->cancel_requested) && resubmit_orphan(p, op))
        return n;      /* its submitter exited; it runs again, now owned by this thread */

    switch (op->type) {
    case PORT_OP_RECV:
        if (flags & IORING_CQE_F_BUFFER) {
            c.buf_id = flags >> IORING_CQE_BUFFER_SHIFT;
            c.buf = LOAD_ACQ(&p->buf_addr[c.buf_id]);
            c.flags |= PORT_CQE_BUFFER;
            port_atomic_add32(&p->br_free, -1);
            port_atomic_add64(&p->base.recv_buffers_out, 1);
        }
        if (res == -ENOBUFS && !LOAD_ACQ(&op->cancel_requested)) {
            recv_out_of_buffers(p, op);
            return n;
        }
        if (__atomic_load_n(&OP_PRIV(op)->u.rv.woken, __ATOMIC_RELAXED))
            recv_woken_done(p, op);
        if (res > 0) {
            c.res = res;
            OP_PRIV(op)->u.rv.short_read = (uint32_t)res < p->buf_size;
            if (p->multishot == 0 || !(flags & IORING_CQE_F_MORE)) {
                /* A one-shot receive, or an arming that ended with data (its bound
                 * reached): final.  The caller posts the next receive once it has
                 * dealt with this data, which is what bounds the read-ahead. */
                goto final;
            }
            if (p->multishot < 0)
                port_atomic_store32(&p->multishot, 1);
            c.flags |= PORT_CQE_MORE;
            return port__deliver(&p->base, out, out, n, &c);
        }
        if (res == -EINVAL && p->multishot < 0) {
            /* A kernel without multishot recv rejects the flag, one without the bound
             * (before 6.16) the bound: fall back for good to single-shot receives. */
            port_atomic_store32(&p->multishot, 0);
            resubmit_recv(p, op, 0);
            return n;
        }
        c.res = res == 0 ? 0 : (res == -ENOBUFS ? PORT_ECANCELED : port_err_from_os(-res));
        goto final;
    case PORT_OP_TIMER:
        c.res = (res == -ETIME || res >= 0) ? 0 : port_err_from_os(-res);
        goto final;
    default:
        c.res = res >= 0 ? res : port_err_from_os(-res);
        goto final;
    }

final:
    port__completed(&p->base, op);
    return port__deliver(&p->base, out, out, n, &c);
}

static int reap(uring_port_t *p, port_cqe_t *out, int max, int *woke) {
    unsigned head, tail;
    int n = 0;
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
        if (ud == UD_IGNORE)
            continue;
        if (ud == UD_WAKE) {
            *woke = 1;
            continue;
        }
        if (ud == UD_DOORBELL) {
            uint64_t count;
            /* Answered: the caller's next enter submits what was written before the
             * bell rang (the exchange orders it before our read of the ring's tail). */
            port_atomic_xchg32(&p->bell_rung, 0);
            while (read(p->bell_fd, &count, sizeof(count)) < 0 && errno == EINTR)
                ;
            if (!(flags & IORING_CQE_F_MORE))
                arm_doorbell(p);     /* ended (its submitter exited, say): re-arm */
            continue;
        }
        n = handle_cqe(p, out, n, ud, res, flags);
    }
    STORE_REL(p->cq_khead, head);
    port_spin_unlock(&p->cq_lock);
    return n;
}

static int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static int is_main_thread(void) { return (pid_t)syscall(SYS_gettid) == getpid(); }

/* Wait for the leader's place.  Returns 0 once this thread is the leader, 1 when the
 * deadline passed, PORT_EINTR when the main thread should look at its signals (Python
 * only runs signal handlers there; a follower would otherwise sleep through Ctrl-C),
 * PORT_ECLOSED after shutdown. */
static int become_leader(uring_port_t *p, int64_t deadline) {
    int rc = 0, main_thread = -1;
    pthread_mutex_lock(&p->room);
    while (p->leader) {
        struct timespec ts;
        int64_t until = deadline;
        if (port_atomic_load32(&p->base.closed)) {
            rc = PORT_ECLOSED;
            break;
        }
        if (main_thread < 0)
            main_thread = is_main_thread();
        if (main_thread) {
            int64_t slice = now_ns() + 100 * 1000000LL;
            if (until == 0 || slice < until)
                until = slice;
        }
        if (until == 0) {
            pthread_cond_wait(&p->room_cv, &p->room);
            continue;
        }
        ts.tv_sec = until / 1000000000;
        ts.tv_nsec = until % 1000000000;
        if (pthread_cond_timedwait(&p->room_cv, &p->room, &ts) == ETIMEDOUT && p->leader) {
            rc = (deadline != 0 && now_ns() >= deadline) ? 1 : PORT_EINTR;
            break;
        }
    }
    if (rc == 0)
        __atomic_store_n(&p->leader, 1, __ATOMIC_RELEASE);
    pthread_mutex_unlock(&p->room);
    return rc;
}

static void leave_leader(uring_port_t *p) {
    pthread_mutex_lock(&p->room);
    __atomic_store_n(&p->leader, 0, __ATOMIC_RELEASE);
    pthread_cond_signal(&p->room_cv);
    pthread_mutex_unlock(&p->room);
}

static int uring_wait(port_t *bp, port_cqe_t *out, int max, int timeout_ms) {
    uring_port_t *p = (uring_port_t *)bp;
    int n = 0, woke = 0, err = 0, rc;
    int64_t deadline = timeout_ms > 0 ? now_ns() + (int64_t)timeout_ms * 1000000 : 0;

    tls_batch = NULL;
    if (port_atomic_load32(&p->base.closed))
        return PORT_ECLOSED;
    /* Completions already in the ring: take them at once.  Nothing flushed this
     * thread's deferred submissions then, so do it here. */
    n = reap(p, out, max, &woke);
    if (n > 0 || timeout_ms == 0) {
        tls_waiter_rearmed = NULL;
        if (n == 0 && (sq_pending(p) || taskrun_pending(p))) {
            /* A poll: submit, and run the completion work waiting for us, in one call. */
            (void)sys_enter(p->ring_fd, sq_pending(p), 0, IORING_ENTER_GETEVENTS, NULL, 0);
        } else if (sq_pending(p)) {
            submit_now(p);
        }
        tls_send_deferred = 0;
        if (n == 0)
            n = reap(p, out, max, &woke);
        if (n > 0)
            tls_batch = p;
        return n;
    }
    /* The leader's enter submits whatever is in the ring when it starts; what this
     * thread deferred must not wait for the next leader. */
    if (sq_pending(p))
        submit_now(p);
    tls_send_deferred = 0;
    rc = become_leader(p, deadline);
    if (rc != 0)
        return rc == 1 ? 0 : rc;
    port_atomic_add32(&p->waiters, 1);
    for (;;) {
        struct io_uring_getevents_arg arg;
        struct __kernel_timespec ts;
        unsigned flags = IORING_ENTER_GETEVENTS;
        void *argp = NULL;
        size_t argsz = 0;

        if (port_atomic_load32(&p->base.closed))
            break;
        n = reap(p, out, max, &woke);
        if (n > 0)
            break;
        if (timeout_ms > 0) {
            int64_t left = deadline - now_ns();
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
        /* Flush what is in the submission ring and wait, in one call. */
        rc = sys_enter(p->ring_fd, sq_pending(p), 1, flags, argp, argsz);
        port_atomic_add64(&p->base.waits, 1);
        if (rc < 0 && errno == EINTR) {
            err = PORT_EINTR;
            break;
        }
        if (rc < 0 && errno != ETIME && errno != EAGAIN && errno != EBUSY) {
            err = port_err_from_os(errno);
            break;
        }
    }
    port_atomic_add32(&p->waiters, -1);
    leave_leader(p);    /* before dispatching: the next thread waits meanwhile */
    if (tls_waiter_rearmed == p) {
        tls_waiter_rearmed = NULL;
        submit_now(p);
    }
    if (n > 0) {
        tls_batch = p;
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
    /* This thread will not wait again soon (a game loop polling once per frame): what
     * its batch submitted must not wait for the next frame. */
    if (sq_pending(p))
        submit_now(p);
}

static void uring_flush_sends(port_t *bp) {
    uring_port_t *p = (uring_port_t *)bp;
    if (tls_send_deferred && tls_batch == p) {
        tls_send_deferred = 0;
        if (sq_pending(p))
            submit_now(p);
    }
}

static int64_t uring_send_now(port_t *bp, port_sock_t sock, const port_buf_t *bufs, int nbufs) {
    PORT_UNUSED(bp);
    return port__posix_send_now(sock, bufs, nbufs);
}

/* ---- operations ----------------------------------------------------------------------- */

static int uring_accept(port_t *bp, port_op_t *op, port_sock_t listener) {
    uring_port_t *p = (uring_port_t *)bp;
    struct io_uring_sqe *sqe;
    op->sock = listener;
    port__submitted(bp, op);
    port_spin_lock(&p->sq_lock);
    sqe = sqe_get(p);
    prep_accept(sqe, op);
    sqe_commit(p);
    port_spin_unlock(&p->sq_lock);
    after_submit(p);
    return 0;
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
    if ((size_t)addr->len > sizeof(OP_PRIV(op)->u.sa)) {
        submit_imm(p, op, PORT_EAFNOSUPPORT);
        after_submit(p);
        return 0;
    }
    memcpy(&OP_PRIV(op)->u.sa, &addr->ss, (size_t)addr->len);
    port_spin_lock(&p->sq_lock);
    sqe = sqe_get(p);
    sqe->opcode = IORING_OP_CONNECT;
    sqe->fd = fd;
    sqe->addr = (uint64_t)(uintptr_t)&OP_PRIV(op)->u.sa;
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
    resubmit_recv(p, op, (int)OP_PRIV(op)->u.rv.short_read);
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
    struct io_uring_sqe *sqe;
    port_op_t **pp;
    int parked = 0;

    /* A receive parked for buffers is not in the kernel: finish it here. */
    if (target->type == PORT_OP_RECV) {
        port_op_t *prev = NULL;
        port_spin_lock(&p->br_lock);
        for (pp = &p->rearm_head; *pp != NULL; prev = *pp, pp = &OP_PRIV(*pp)->rearm_next) {
            if (*pp == target) {
                *pp = OP_PRIV(target)->rearm_next;
                if (p->rearm_tail == target)
                    p->rearm_tail = prev;
                port_atomic_add64(&p->base.recv_waiting, -1);
                parked = 1;
                break;
            }
        }
        port_spin_unlock(&p->br_lock);
        if (parked) {
            submit_imm(p, target, PORT_ECANCELED);
            after_submit(p);
            return 0;
        }
    }
    port_spin_lock(&p->sq_lock);
    sqe = sqe_get(p);
    sqe->opcode = IORING_OP_ASYNC_CANCEL;
    sqe->addr = (uint64_t)(uintptr_t)target;
    sqe->user_data = UD_IGNORE;
    sqe_commit(p);
    port_spin_unlock(&p->sq_lock);
    after_submit(p);
    return 0;
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

static int uring_sock_close(port_t *bp, port_sock_t s, int flags) {
    uring_port_t *p = (uring_port_t *)bp;
    /* Done when this returns, with close(2)'s own result: so hand what the ring holds
     * (operations on s among them) to the kernel first.  Nothing on s can be written
     * after that: the caller submits nothing more on it, and a receive or accept that
     * this port re-arms by itself reads its cancel flag first. */
    if (!submit_all(p))
        return PORT_EBUSY;   /* the ring cannot be submitted: better a leak than a cross */
    return port__posix_close(s, flags);
}

/* ---- setup ---------------------------------------------------------------------------- */

static void uring_free(uring_port_t *p) {
    if (p->buf_addr) {
        unsigned i;
        for (i = 0; i < p->buf_made; i++)
            port_buf_free(p->buf_addr[i]);   /* the pool's; kept ones were replaced */
        free(p->buf_addr);
    }
    if (p->br)
        munmap(p->br, p->br_sz);
    if (p->sqes)
        munmap(p->sqes, p->sqes_sz);
    if (p->cq_ring && p->cq_ring != p->sq_ring)
        munmap(p->cq_ring, p->cq_ring_sz);
    if (p->sq_ring)
        munmap(p->sq_ring, p->sq_ring_sz);
    if (p->ring_fd >= 0)
        close(p->ring_fd);
    if (p->bell_fd >= 0)
        close(p->bell_fd);
    pthread_cond_destroy(&p->room_cv);
    pthread_mutex_destroy(&p->room);
    free(p);
}

static int setup_error(int e, char *errbuf, size_t errlen) {
    switch (e) {
    case EPERM:
    case EACCES:
        port__set_err(errbuf, errlen,
                      "io_uring_setup: operation not permitted (blocked by a seccomp profile, "
                      "as in Docker's default, or disabled by the kernel.io_uring_disabled "
                      "sysctl)");
        return PORT_EUNAVAIL;
    case ENOSYS:
        port__set_err(errbuf, errlen,
                      "io_uring_setup: not implemented by this kernel (or sandbox, e.g. gVisor)");
        return PORT_EUNAVAIL;
    case EINVAL:
        port__set_err(errbuf, errlen,
                      "io_uring_setup: parameters rejected (kernel too old for iocpnet's "
                      "io_uring backend)");
        return PORT_EUNAVAIL;
    case ENOMEM:
        port__set_err(errbuf, errlen,
                      "io_uring_setup: out of memory; on kernels before 5.12 rings are "
                      "charged to RLIMIT_MEMLOCK, raise it with `ulimit -l`");
        return PORT_ENOMEM;
    case EMFILE:
    case ENFILE:
        port__set_err(errbuf, errlen, "io_uring_setup: too many open files");
        return port_err_from_os(e);
    }
    port__set_err(errbuf, errlen, "io_uring_setup failed: errno %d", e);
    return port_err_from_os(e);
}

/* The opcodes this file uses; a kernel lacking any of them gets the epoll backend. */
static const struct {
    int op;
    const char *name;
} required_ops[] = {
    {IORING_OP_NOP, "NOP"},           {IORING_OP_ACCEPT, "ACCEPT"},
    {IORING_OP_CONNECT, "CONNECT"},   {IORING_OP_RECV, "RECV"},
    {IORING_OP_SEND, "SEND"},         {IORING_OP_SENDMSG, "SENDMSG"},
    {IORING_OP_ASYNC_CANCEL, "ASYNC_CANCEL"}, {IORING_OP_TIMEOUT, "TIMEOUT"},
    {IORING_OP_POLL_ADD, "POLL_ADD"}, {IORING_OP_CLOSE, "CLOSE"},
};

static int check_ops(int fd, char *errbuf, size_t errlen) {
    size_t sz = sizeof(struct io_uring_probe) + 256 * sizeof(struct io_uring_probe_op);
    struct io_uring_probe *probe = (struct io_uring_probe *)calloc(1, sz);
    size_t i;
    int rc = 0;
    if (probe == NULL)
        return PORT_ENOMEM;
    if (sys_register(fd, IORING_REGISTER_PROBE, probe, 256) < 0) {
        port__set_err(errbuf, errlen, "io_uring: IORING_REGISTER_PROBE failed (kernel < 5.6)");
        free(probe);
        return PORT_EUNAVAIL;
    }
    for (i = 0; i < sizeof(required_ops) / sizeof(required_ops[0]); i++) {
        int op = required_ops[i].op;
        if (op > probe->last_op || !(probe->ops[op].flags & IO_URING_OP_SUPPORTED)) {
            port__set_err(errbuf, errlen, "io_uring: the kernel lacks IORING_OP_%s",
                          required_ops[i].name);
            rc = PORT_EUNAVAIL;
            break;
        }
    }
    free(probe);
    return rc;
}

static int uring_create_ex(uring_port_t **out, const port_options_t *opts, int with_buffers,
                           char *errbuf, size_t errlen) {
    struct io_uring_params params;
    uring_port_t *p;
    unsigned entries, i;
    int rc, e;

    *out = NULL;
    p = (uring_port_t *)calloc(1, sizeof(*p));
    if (p == NULL)
        return PORT_ENOMEM;
    port__init_common(&p->base, &port__io_uring_vtable, opts);
    p->ring_fd = -1;
    p->bell_fd = -1;
    /* Multishot receives when asked for, each arming bounded (see the top). */
    p->multishot = (p->base.opts.flags & PORT_OPT_RECV_MULTISHOT) ? -1 : 0;
    p->mshot_limit = MSHOT_BUFFERS * p->base.opts.recv_buffer_size;
    {
        pthread_condattr_t ca;
        pthread_condattr_init(&ca);
        pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);   /* deadlines use it */
        pthread_cond_init(&p->room_cv, &ca);
        pthread_condattr_destroy(&ca);
        pthread_mutex_init(&p->room, NULL);
    }
    entries = p->base.opts.queue_depth;

    {
        /* A completion ring four times the submission ring: a batch of sends to many
         * sessions plus the receives that answer them must not overflow it.
         * COOP_TASKRUN: completion work for a submitter that is running is done at its
         * next entry into the kernel instead of interrupting it with an IPI (one per
         * completion, measured: the largest io_uring-only cost per round trip);
         * TASKRUN_FLAG tells us when such work waits, so a poll still runs it.  Each set
         * is tried in turn: older kernels reject the newer flags with EINVAL. */
        static const unsigned flag_sets[] = {
            IORING_SETUP_CQSIZE | IORING_SETUP_SUBMIT_ALL | IORING_SETUP_COOP_TASKRUN |
                IORING_SETUP_TASKRUN_FLAG,
            IORING_SETUP_CQSIZE | IORING_SETUP_SUBMIT_ALL,
            IORING_SETUP_CQSIZE,
        };
        size_t k;
        for (k = 0; k < sizeof(flag_sets) / sizeof(flag_sets[0]); k++) {
            memset(&params, 0, sizeof(params));
            params.flags = flag_sets[k];
            params.cq_entries = entries * 4;
            p->ring_fd = sys_setup(entries, &params);
            if (p->ring_fd >= 0 || errno != EINVAL)
                break;
        }
        p->setup_flags = params.flags;
    }
    if (p->ring_fd < 0) {
        e = errno;
        rc = setup_error(e, errbuf, errlen);
        goto fail;
    }
    p->features = params.features;
    if (!(params.features & IORING_FEAT_EXT_ARG) || !(params.features & IORING_FEAT_NODROP)) {
        port__set_err(errbuf, errlen,
                      "io_uring: the kernel lacks EXT_ARG waits or NODROP (needs 5.11+)");
        rc = PORT_EUNAVAIL;
        goto fail;
    }
    rc = check_ops(p->ring_fd, errbuf, errlen);
    if (rc)
        goto fail;

    /* Map the rings.  With SINGLE_MMAP (5.4+) one mapping holds both. */
    p->sq_ring_sz = params.sq_off.array + params.sq_entries * sizeof(unsigned);
    p->cq_ring_sz = params.cq_off.cqes + params.cq_entries * sizeof(struct io_uring_cqe);
    if (params.features & IORING_FEAT_SINGLE_MMAP) {
        if (p->cq_ring_sz > p->sq_ring_sz)
            p->sq_ring_sz = p->cq_ring_sz;
        p->cq_ring_sz = p->sq_ring_sz;
    }
    p->sq_ring = mmap(NULL, p->sq_ring_sz, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE,
                      p->ring_fd, IORING_OFF_SQ_RING);
    if (p->sq_ring == MAP_FAILED) {
        p->sq_ring = NULL;
        goto fail_errno;
    }
    if (params.features & IORING_FEAT_SINGLE_MMAP) {
        p->cq_ring = p->sq_ring;
    } else {
        p->cq_ring = mmap(NULL, p->cq_ring_sz, PROT_READ | PROT_WRITE,
                          MAP_SHARED | MAP_POPULATE, p->ring_fd, IORING_OFF_CQ_RING);
        if (p->cq_ring == MAP_FAILED) {
            p->cq_ring = NULL;
            goto fail_errno;
        }
    }
    p->sqes_sz = params.sq_entries * sizeof(struct io_uring_sqe);
    p->sqes = (struct io_uring_sqe *)mmap(NULL, p->sqes_sz, PROT_READ | PROT_WRITE,
                                          MAP_SHARED | MAP_POPULATE, p->ring_fd,
                                          IORING_OFF_SQES);
    if (p->sqes == MAP_FAILED) {
        p->sqes = NULL;
        goto fail_errno;
    }
    p->sq_khead = (unsigned *)((char *)p->sq_ring + params.sq_off.head);
    p->sq_ktail = (unsigned *)((char *)p->sq_ring + params.sq_off.tail);
    p->sq_kflags = (unsigned *)((char *)p->sq_ring + params.sq_off.flags);
    p->sq_mask = *(unsigned *)((char *)p->sq_ring + params.sq_off.ring_mask);
    p->sq_entries = *(unsigned *)((char *)p->sq_ring + params.sq_off.ring_entries);
    p->sq_tail = *p->sq_ktail;
    {
        /* The SQ index array maps ring slots to SQEs; we keep it the identity. */
        unsigned *array = (unsigned *)((char *)p->sq_ring + params.sq_off.array);
        for (i = 0; i < p->sq_entries; i++)
            array[i] = i;
    }
    p->cq_khead = (unsigned *)((char *)p->cq_ring + params.cq_off.head);
    p->cq_ktail = (unsigned *)((char *)p->cq_ring + params.cq_off.tail);
    p->cq_mask = *(unsigned *)((char *)p->cq_ring + params.cq_off.ring_mask);
    p->cqes = (struct io_uring_cqe *)((char *)p->cq_ring + params.cq_off.cqes);

    if (with_buffers) {
        struct io_uring_buf_reg reg;
        unsigned ring_entries = 1;
        p->buf_size = p->base.opts.recv_buffer_size;
        p->buf_max = p->base.opts.recv_buffer_count;
        if (p->buf_max > 32768)
            p->buf_max = 32768;     /* the ring's limit, and bid is 16 bits */
        while (ring_entries < p->buf_max)
            ring_entries <<= 1;
        p->br_mask = ring_entries - 1;
        p->br_sz = ring_entries * sizeof(struct io_uring_buf);
        p->br = (struct io_uring_buf_ring *)mmap(NULL, p->br_sz, PROT_READ | PROT_WRITE,
                                                 MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (p->br == MAP_FAILED) {
            p->br = NULL;
            goto fail_errno;
        }
        p->buf_addr = (char **)calloc(p->buf_max, sizeof(char *));
        if (p->buf_addr == NULL) {
            rc = PORT_ENOMEM;
            port__set_err(errbuf, errlen, "io_uring: out of memory for the buffer table");
            goto fail;
        }
        memset(&reg, 0, sizeof(reg));
        reg.ring_addr = (uint64_t)(uintptr_t)p->br;
        reg.ring_entries = ring_entries;
        reg.bgid = BGID;
        if (sys_register(p->ring_fd, IORING_REGISTER_PBUF_RING, &reg, 1) < 0) {
            e = errno;
            if (e == ENOMEM) {
                rc = PORT_ENOMEM;
                port__set_err(errbuf, errlen, "io_uring: out of memory registering buffers");
            } else {
                rc = PORT_EUNAVAIL;
                port__set_err(errbuf, errlen,
                              "io_uring: provided-buffer rings unsupported (kernel < 5.19)");
            }
            goto fail;
        }
        p->br_tail = 0;
        br_grow(p, p->buf_max < INITIAL_BUFFERS ? p->buf_max : INITIAL_BUFFERS);
    }
    p->bell_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (p->bell_fd < 0)
        goto fail_errno;
    arm_doorbell(p);
    submit_now(p);
    *out = p;
    return 0;

fail_errno:
    e = errno;
    rc = e == ENOMEM ? PORT_ENOMEM : port_err_from_os(e);
    port__set_err(errbuf, errlen, "io_uring: mapping the rings failed: errno %d", e);
fail:
    uring_free(p);
    return rc;
}

static int uring_probe(char *errbuf, size_t errlen) {
    port_options_t small;
    uring_port_t *p;
    int rc;
    memset(&small, 0, sizeof(small));
    small.queue_depth = 4;
    small.recv_buffer_count = 1;
    small.recv_buffer_size = 4096;
    rc = uring_create_ex(&p, &small, 1, errbuf, errlen);
    if (rc == 0)
        uring_free(p);
    return rc;
}

static int uring_create(port_t **out, const port_options_t *opts, char *errbuf, size_t errlen) {
    uring_port_t *p;
    int rc = uring_create_ex(&p, opts, 1, errbuf, errlen);
    *out = rc == 0 ? &p->base : NULL;
    return rc;
}

static void uring_shutdown(port_t *bp) {
    uring_port_t *p = (uring_port_t *)bp;
    if (port_atomic_xchg32(&p->base.closed, 1))
        return;
    post_wake(p);      /* the leader, in the kernel */
    pthread_mutex_lock(&p->room);
    pthread_cond_broadcast(&p->room_cv);   /* the followers */
    pthread_mutex_unlock(&p->room);
}

static void uring_destroy(port_t *bp) {
    uring_port_t *p = (uring_port_t *)bp;
    port_atomic_store32(&p->base.closed, 1);
    if (tls_batch == p)
        tls_batch = NULL;
    uring_free(p);
}

const port_vtable_t port__io_uring_vtable = {
    "io_uring",
    uring_probe,
    uring_create,
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
    uring_send_now,
    uring_flush_sends,
};
#endif /* __linux__ */
