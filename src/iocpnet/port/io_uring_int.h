/*
 * io_uring_int.h -- what the files of the io_uring backend share: io_uring.c (the hot
 * path: submitting, reaping, waiting, the operations), io_uring_bufs.c (the provided
 * receive buffers and the receives waiting for one) and io_uring_setup.c (making the
 * ring: feature probing, mapping, teardown).  The model and its invariants are in
 * io_uring.c's essay.
 *
 * Locks (lock order: cq_lock, then sq_lock or br_lock; strand locks last): sq_lock
 * guards claiming and filling SQE slots, cq_lock reaping, br_lock the buffer ring's
 * tail, the id table's entries and the wait queue; `room` the waiting for a place.
 */
#ifndef IOCPNET_IO_URING_INT_H
#define IOCPNET_IO_URING_INT_H

#include "port_int.h"
#include "bufpool.h"

#include <linux/io_uring.h>
#include <linux/time_types.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <unistd.h>

/* Kernel headers older than the kernel: Ubuntu 22.04 ships 5.15's, RHEL 9 5.14's, while
 * the machines often run newer kernels.  What the backend uses from after 5.13 is plain
 * ABI (flag bits, a register opcode, three small structs), defined here when the header
 * lacks it; the probe at start-up asks the running kernel whether it has them.  Headers
 * before 5.13 are too old to build it (setup.py then builds epoll only). */
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
#ifndef IORING_ACCEPT_POLL_FIRST
#  define IORING_ACCEPT_POLL_FIRST (1U << 2)            /* 6.10 */
#endif
#ifndef IORING_ACCEPT_MULTISHOT
#  define IORING_ACCEPT_MULTISHOT (1U << 0)             /* 5.19 */
#endif
/* The opcode that came with multishot accepts (an enum value: no #ifndef for it); the
 * probe's answer for it is the kernel's answer for them (no flag bit can be probed). */
#define PORT_URING_OP_SOCKET 45                        /* 5.19 */
#ifndef IORING_CQE_F_SOCK_NONEMPTY
#  define IORING_CQE_F_SOCK_NONEMPTY (1U << 2)          /* 5.19 */
#endif
#ifndef IORING_SETUP_R_DISABLED
#  define IORING_SETUP_R_DISABLED (1U << 6)            /* 5.10 */
#endif
#ifndef IORING_SETUP_SINGLE_ISSUER
#  define IORING_SETUP_SINGLE_ISSUER (1U << 12)        /* 6.0 */
#endif
#ifndef IORING_SETUP_DEFER_TASKRUN
#  define IORING_SETUP_DEFER_TASKRUN (1U << 13)        /* 6.1 */
#endif
#ifndef IORING_REGISTER_ENABLE_RINGS
#  define IORING_REGISTER_ENABLE_RINGS 12              /* 5.10 */
#endif
#ifndef IORING_UNREGISTER_PBUF_RING
#  define IORING_UNREGISTER_PBUF_RING 23               /* 5.19 */
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
#define UD_DRAIN 24u          /* the pool's own receives, taking buffers back (trim) */
#define UD_TAG_IMM 1u         /* a NOP carrying a result stored in the op */
#define UD_TAG_MASK 7u

#define BGID 0                /* our single buffer group */
/* Buffers made at start (the ring grows by one per receive with data that finds it
 * empty, io_uring_bufs.c).  Few: the ring is FIFO, so one busy connection cycles through
 * every buffer made where epoll's pool reuses one (64 x 16 KiB: 1 MiB, a whole L2). */
#define INITIAL_BUFFERS 8u
#define MSHOT_BUFFERS 4u      /* read-ahead of one multishot arming, in buffers' worth */

/* What an op keeps while in flight, inside port_op_t.priv. */
typedef struct uring_op {
    union {
        struct msghdr msg;           /* sendmsg: the kernel reads it until completion */
        struct __kernel_timespec ts; /* timer */
        struct {
            struct sockaddr_in6 sa;  /* a copy, so the caller's may go away */
            uint32_t polled;         /* orphaned: now a POLLOUT poll (resubmit_orphan) */
        } con;                       /* connect */
        struct {
            port__peer_t peer;       /* accept: the kernel writes the peer's address */
            uint32_t poll_first;     /* sent with IORING_ACCEPT_POLL_FIRST */
            uint32_t multishot;      /* armed by port_accept_multishot */
        } acc;
        struct {
            uint32_t short_read;     /* the last read left the socket empty: poll first */
            uint32_t polled;         /* armed to poll first: an ENOBUFS means data waits */
            uint32_t paused;         /* this arming was cancelled by the port (behind) */
            port_bufwait_t bufwait;  /* waiting for a receive buffer (bufpool.h) */
        } rv;                        /* recv */
    } u;
    int64_t imm_res;                 /* result carried by an immediate completion */
} uring_op_t;

PORT_STATIC_ASSERT(sizeof(uring_op_t) <= sizeof(((port_op_t *)0)->priv), uring_op_fits);
PORT_STATIC_ASSERT(sizeof(port_buf_t) == sizeof(struct iovec), iovec_size);
PORT_STATIC_ASSERT(offsetof(port_buf_t, base) == offsetof(struct iovec, iov_base), iovec_base);
PORT_STATIC_ASSERT(offsetof(port_buf_t, len) == offsetof(struct iovec, iov_len), iovec_len);

#define OP_PRIV(op) ((uring_op_t *)(void *)(op)->priv)
/* The receive operation waiting for a buffer that w belongs to. */
#define OP_OF_BUFWAIT(w)                                                              \
    ((port_op_t *)(void *)((char *)(w) - offsetof(port_op_t, priv) -                   \
                           offsetof(uring_op_t, u.rv.bufwait)))

/* Buffers the one dispatcher's owner may hold back for the end of its batch. */
#define URING_RELEASE_MAX 128

typedef struct uring_port {
    port_t base;
    int ring_fd;
    unsigned setup_flags;              /* IORING_SETUP_* the ring was made with */

    /* submission ring */
    unsigned *sq_khead, *sq_ktail;
    unsigned *sq_kflags;               /* IORING_SQ_TASKRUN: completion work waits for us */
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

    /* provided receive buffers (io_uring_bufs.c) */
    struct io_uring_buf_ring *br;
    size_t br_sz;
    unsigned br_mask;
    uint16_t br_tail;                  /* under br_lock */
    char **buf_addr;                   /* buffer id -> its memory (atomic entries) */
    unsigned buf_size, buf_max, buf_made;
    volatile int32_t br_lock;
    port_bufwaitq_t waiters;           /* receives waiting for a buffer; under br_lock */
    volatile int32_t br_free;          /* buffers in the ring not yet seen taken */
    uint16_t *buf_free_ids;            /* ids whose block was given back; under br_lock */
    unsigned buf_nfree_ids;
    int drain_fd[2];                   /* the trim's socket pair (-1: not made yet) */
    volatile int32_t drain_pending;    /* the trim's receives not reaped yet */
    /* Buffers the one dispatcher's owner gave back during its batch, put in the ring
     * together when the batch ends (port__uring_release_flush): the kernel takes none
     * before the owner's next wait (DEFER_TASKRUN).  Only the owner touches them. */
    uint16_t rel_bid[URING_RELEASE_MAX];
    int rel_n;
    volatile int32_t multishot;        /* 1 works, -1 not known yet, 0 off */
    volatile uint32_t mshot_limit;     /* bytes one multishot arming may read; 0: no bound */
    volatile int32_t accept_pf;        /* IORING_ACCEPT_POLL_FIRST: 1 works, -1 not known, 0 off */
    int accept_ms;                     /* IORING_ACCEPT_MULTISHOT: the kernel has it (probe) */

    /* The doorbell: other threads' SQEs wait for a worker to submit them. */
    int bell_fd;
    volatile int32_t bell_rung;        /* written and not yet answered */

    /* One dispatcher (port_single_dispatcher): the ring was remade SINGLE_ISSUER |
     * DEFER_TASKRUN, and only its owner enters it (io_uring.c, "One dispatcher").
     * single: 0 any thread enters; 1 remade, disabled until the first waiter claims
     * it; 2 enabled.  owner: that thread's id.  entering: the owner is inside
     * io_uring_enter (a close after shutdown waits until it is out). */
    volatile int32_t single;
    volatile int32_t owner;
    volatile int32_t entering;
    volatile int32_t followers;        /* non-owners waiting on room_cv (under room) */

    /* Threads waiting for a place (leader or standby; one dispatcher's non-owners). */
    pthread_mutex_t room;
    pthread_cond_t room_cv;

    /* Kept leader and standby (io_uring.c, "waiting with several workers").  lead: the
     * leader's thread id (0: none), kept while it dispatches; lead_in: it is inside
     * io_uring_enter; lead_epoch: counts its enters; standby: the thread id of the one
     * thread that watches the leader in slices (0: none); sb_deep: the standby sleeps
     * until the leader leaves the kernel (a futex word).  All atomics, seq_cst. */
    volatile int32_t lead, lead_in, standby, sb_deep;
    volatile uint32_t lead_epoch;
} uring_port_t;

static inline int sys_setup(unsigned entries, struct io_uring_params *p) {
    return (int)syscall(__NR_io_uring_setup, entries, p);
}
static inline int sys_enter(int fd, unsigned to_submit, unsigned min_complete, unsigned flags,
                            void *arg, size_t argsz) {
    return (int)syscall(__NR_io_uring_enter, fd, to_submit, min_complete, flags, arg, argsz);
}
static inline int sys_register(int fd, unsigned opcode, void *arg, unsigned nr) {
    return (int)syscall(__NR_io_uring_register, fd, opcode, arg, nr);
}

#define LOAD_ACQ(p) __atomic_load_n((p), __ATOMIC_ACQUIRE)
#define STORE_REL(p, v) __atomic_store_n((p), (v), __ATOMIC_RELEASE)

/* ---- io_uring.c ------------------------------------------------------------------------ */

/* How a receive is armed (port__uring_resubmit_recv's poll_first): RECV_POLL_MAYBE polls
 * first if this is a one-shot receive (the previous read came back short);
 * RECV_POLL_ALWAYS makes a one-shot receive that polls first even where receives are
 * multishot: it takes a buffer only once data is there (io_uring_bufs.c, "Waiters"). */
#define RECV_POLL_MAYBE 1
#define RECV_POLL_ALWAYS 2

extern const port_vtable_t port__io_uring_vtable;
/* Hand every written SQE to the kernel now (gives up after a while if it cannot). */
void port__uring_submit_now(uring_port_t *p);
/* (Re-)arm the doorbell's multishot poll. */
void port__uring_arm_doorbell(uring_port_t *p);
/* Arm (or re-arm) a receive, or complete it as cancelled if a cancel came first. */
void port__uring_resubmit_recv(uring_port_t *p, port_op_t *op, int poll_first);
/* A receive re-armed for a buffer given back goes to the kernel now (`reaping`: this
 * thread is reaping a batch; it submits before handing the batch out). */
void port__uring_waiter_submit(uring_port_t *p, int reaping);

/* ---- io_uring_bufs.c ------------------------------------------------------------------- */

/* Make up to `count` more buffers (under br_lock, or before the port is shared). */
unsigned port__uring_br_grow(uring_port_t *p, unsigned count);
void port__uring_recv_release(port_t *bp, uint32_t bid, char *fresh);
void port__uring_release_flush(uring_port_t *p);
/* A trim receive's CQE (UD_DRAIN): the buffer it took is given back, or put back in
 * the ring if the pool needs it again; while reaping. */
void port__uring_drain_done(uring_port_t *p, uint32_t flags);
uint64_t port__uring_buffers_out(port_t *bp);
/* A receive woken for a buffer completed without ENOBUFS (called while reaping). */
void port__uring_recv_woken_done(uring_port_t *p, port_op_t *op);
/* The kernel ran out of buffers for op's receive (called while reaping). */
void port__uring_recv_out_of_buffers(uring_port_t *p, port_op_t *op);

/* ---- io_uring_setup.c ------------------------------------------------------------------ */

int port__uring_probe(char *errbuf, size_t errlen);
int port__uring_create(port_t **out, const port_options_t *opts, char *errbuf, size_t errlen);
/* Remake a port that never submitted anything as a SINGLE_ISSUER | DEFER_TASKRUN ring,
 * disabled until its first waiter claims it.  0, or PORT_EUNAVAIL (kept as it is). */
int port__uring_single_issuer(uring_port_t *p);
/* Unmap and close everything; the port's memory too. */
void port__uring_free(uring_port_t *p);

#endif /* IOCPNET_IO_URING_INT_H */
