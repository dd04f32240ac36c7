/*
 * io_uring_setup.c -- making and unmaking the io_uring backend's ring, apart from the hot
 * path (io_uring.c): io_uring_setup with the newest flags the kernel takes, the feature
 * and opcode probe that decides whether this backend can run here at all (else
 * port_create falls back to epoll, saying why), mapping the rings, registering the
 * provided-buffer ring, arming the doorbell, and the teardown.
 *
 * Nothing here is shared until port__uring_create returns: no locks are needed.
 */
#if defined(__linux__)
#include "io_uring_int.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/mman.h>

/* Unmap the rings and close the ring's descriptor. */
static void unmap_rings(uring_port_t *p) {
    if (p->sqes)
        munmap(p->sqes, p->sqes_sz);
    if (p->cq_ring && p->cq_ring != p->sq_ring)
        munmap(p->cq_ring, p->cq_ring_sz);
    if (p->sq_ring)
        munmap(p->sq_ring, p->sq_ring_sz);
    if (p->ring_fd >= 0)
        close(p->ring_fd);
    p->sqes = NULL;
    p->sq_ring = p->cq_ring = NULL;
    p->ring_fd = -1;
}

void port__uring_free(uring_port_t *p) {
    if (p->buf_addr) {
        unsigned i;
        for (i = 0; i < p->buf_made; i++)
            port_buf_free(p->buf_addr[i]);   /* the pool's; kept ones were replaced,
                                                trimmed ones are NULL */
        free(p->buf_addr);
    }
    free(p->buf_free_ids);
    if (p->drain_fd[0] >= 0) {
        close(p->drain_fd[0]);
        close(p->drain_fd[1]);
    }
    if (p->br)
        munmap(p->br, p->br_sz);
    unmap_rings(p);
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

/* The opcodes the backend uses; a kernel lacking any of them gets the epoll backend. */
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

static int check_ops(uring_port_t *p, int fd, char *errbuf, size_t errlen) {
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
    p->accept_ms = PORT_URING_OP_SOCKET <= probe->last_op &&
                   (probe->ops[PORT_URING_OP_SOCKET].flags & IO_URING_OP_SUPPORTED);
    free(probe);
    return rc;
}

/* io_uring_setup with the newest flags this kernel takes, then the features and opcodes
 * the backend needs.  0, or PORT_EUNAVAIL / another code with the reason in errbuf. */
static int setup_ring(uring_port_t *p, struct io_uring_params *params, char *errbuf,
                      size_t errlen) {
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
    unsigned entries = p->base.opts.queue_depth;
    size_t k;
    for (k = 0; k < sizeof(flag_sets) / sizeof(flag_sets[0]); k++) {
        memset(params, 0, sizeof(*params));
        params->flags = flag_sets[k];
        params->cq_entries = entries * 4;
        p->ring_fd = sys_setup(entries, params);
        if (p->ring_fd >= 0 || errno != EINVAL)
            break;
    }
    p->setup_flags = params->flags;
    if (p->ring_fd < 0)
        return setup_error(errno, errbuf, errlen);
    if (!(params->features & IORING_FEAT_EXT_ARG) || !(params->features & IORING_FEAT_NODROP)) {
        port__set_err(errbuf, errlen,
                      "io_uring: the kernel lacks EXT_ARG waits or NODROP (needs 5.11+)");
        return PORT_EUNAVAIL;
    }
    return check_ops(p, p->ring_fd, errbuf, errlen);
}

static int mmap_error(int e, const char *what, char *errbuf, size_t errlen) {
    port__set_err(errbuf, errlen, "io_uring: mapping the %s failed: errno %d", what, e);
    return e == ENOMEM ? PORT_ENOMEM : port_err_from_os(e);
}

/* Map the submission and completion rings and the SQE array. */
static int map_rings(uring_port_t *p, const struct io_uring_params *params, char *errbuf,
                     size_t errlen) {
    unsigned i, *array;
    p->sq_ring_sz = params->sq_off.array + params->sq_entries * sizeof(unsigned);
    p->cq_ring_sz = params->cq_off.cqes + params->cq_entries * sizeof(struct io_uring_cqe);
    /* With SINGLE_MMAP (5.4+) one mapping holds both rings. */
    if (params->features & IORING_FEAT_SINGLE_MMAP) {
        if (p->cq_ring_sz > p->sq_ring_sz)
            p->sq_ring_sz = p->cq_ring_sz;
        p->cq_ring_sz = p->sq_ring_sz;
    }
    p->sq_ring = mmap(NULL, p->sq_ring_sz, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE,
                      p->ring_fd, IORING_OFF_SQ_RING);
    if (p->sq_ring == MAP_FAILED) {
        p->sq_ring = NULL;
        return mmap_error(errno, "rings", errbuf, errlen);
    }
    if (params->features & IORING_FEAT_SINGLE_MMAP) {
        p->cq_ring = p->sq_ring;
    } else {
        p->cq_ring = mmap(NULL, p->cq_ring_sz, PROT_READ | PROT_WRITE,
                          MAP_SHARED | MAP_POPULATE, p->ring_fd, IORING_OFF_CQ_RING);
        if (p->cq_ring == MAP_FAILED) {
            p->cq_ring = NULL;
            return mmap_error(errno, "rings", errbuf, errlen);
        }
    }
    p->sqes_sz = params->sq_entries * sizeof(struct io_uring_sqe);
    p->sqes = (struct io_uring_sqe *)mmap(NULL, p->sqes_sz, PROT_READ | PROT_WRITE,
                                          MAP_SHARED | MAP_POPULATE, p->ring_fd,
                                          IORING_OFF_SQES);
    if (p->sqes == MAP_FAILED) {
        p->sqes = NULL;
        return mmap_error(errno, "rings", errbuf, errlen);
    }
    p->sq_khead = (unsigned *)((char *)p->sq_ring + params->sq_off.head);
    p->sq_ktail = (unsigned *)((char *)p->sq_ring + params->sq_off.tail);
    p->sq_kflags = (unsigned *)((char *)p->sq_ring + params->sq_off.flags);
    p->sq_mask = *(unsigned *)((char *)p->sq_ring + params->sq_off.ring_mask);
    p->sq_entries = *(unsigned *)((char *)p->sq_ring + params->sq_off.ring_entries);
    p->sq_tail = *p->sq_ktail;
    /* The SQ index array maps ring slots to SQEs; we keep it the identity. */
    array = (unsigned *)((char *)p->sq_ring + params->sq_off.array);
    for (i = 0; i < p->sq_entries; i++)
        array[i] = i;
    p->cq_khead = (unsigned *)((char *)p->cq_ring + params->cq_off.head);
    p->cq_ktail = (unsigned *)((char *)p->cq_ring + params->cq_off.tail);
    p->cq_mask = *(unsigned *)((char *)p->cq_ring + params->cq_off.ring_mask);
    p->cqes = (struct io_uring_cqe *)((char *)p->cq_ring + params->cq_off.cqes);
    return 0;
}

/* The provided-buffer ring (io_uring_bufs.c): mapped, registered, and a first few
 * buffers in it. */
static int register_buffers(uring_port_t *p) {
    struct io_uring_buf_reg reg;
    memset(&reg, 0, sizeof(reg));
    reg.ring_addr = (uint64_t)(uintptr_t)p->br;
    reg.ring_entries = p->br_mask + 1;
    reg.bgid = BGID;
    return sys_register(p->ring_fd, IORING_REGISTER_PBUF_RING, &reg, 1);
}

static int setup_buffers(uring_port_t *p, char *errbuf, size_t errlen) {
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
        return mmap_error(errno, "buffer ring", errbuf, errlen);
    }
    p->buf_addr = (char **)calloc(p->buf_max, sizeof(char *));
    p->buf_free_ids = (uint16_t *)malloc(p->buf_max * sizeof(uint16_t));
    if (p->buf_addr == NULL || p->buf_free_ids == NULL) {
        port__set_err(errbuf, errlen, "io_uring: out of memory for the buffer table");
        return PORT_ENOMEM;
    }
    if (register_buffers(p) < 0) {
        if (errno == ENOMEM) {
            port__set_err(errbuf, errlen, "io_uring: out of memory registering buffers");
            return PORT_ENOMEM;
        }
        port__set_err(errbuf, errlen,
                      "io_uring: provided-buffer rings unsupported (kernel < 5.19)");
        return PORT_EUNAVAIL;
    }
    p->br_tail = 0;
    port__uring_br_grow(p, p->buf_max < INITIAL_BUFFERS ? p->buf_max : INITIAL_BUFFERS);
    return 0;
}

static int uring_create_ex(uring_port_t **out, const port_options_t *opts, char *errbuf,
                           size_t errlen) {
    struct io_uring_params params;
    pthread_condattr_t ca;
    uring_port_t *p;
    int rc;

    *out = NULL;
    p = (uring_port_t *)calloc(1, sizeof(*p));
    if (p == NULL)
        return PORT_ENOMEM;
    port__init_common(&p->base, &port__io_uring_vtable, opts);
    p->ring_fd = -1;
    p->bell_fd = -1;
    p->drain_fd[0] = p->drain_fd[1] = -1;
    port__bufwaitq_init(&p->waiters, &p->base);
    /* Multishot receives when asked for, each arming bounded (see io_uring.c). */
    p->multishot = (p->base.opts.flags & PORT_OPT_RECV_MULTISHOT) ? -1 : 0;
    p->mshot_limit = MSHOT_BUFFERS * p->base.opts.recv_buffer_size;
    p->accept_pf = -1;          /* accepts poll first once the kernel is seen to take it */
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);   /* deadlines use it */
    pthread_cond_init(&p->room_cv, &ca);
    pthread_condattr_destroy(&ca);
    pthread_mutex_init(&p->room, NULL);

    rc = setup_ring(p, &params, errbuf, errlen);
    if (rc == 0)
        rc = map_rings(p, &params, errbuf, errlen);
    if (rc == 0)
        rc = setup_buffers(p, errbuf, errlen);
    if (rc == 0) {
        p->bell_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
        if (p->bell_fd < 0) {
            rc = port_err_from_os(errno);
            port__set_err(errbuf, errlen, "io_uring: eventfd failed: errno %d", errno);
        }
    }
    if (rc != 0) {
        port__uring_free(p);
        return rc;
    }
    port__uring_arm_doorbell(p);
    port__uring_submit_now(p);
    *out = p;
    return 0;
}

/* One dispatcher (io_uring.c): the same port on a new ring made SINGLE_ISSUER |
 * DEFER_TASKRUN | R_DISABLED.  Only a port that never submitted an operation and that no
 * thread waits on is remade: then the old ring holds nothing but the doorbell's poll,
 * and the kernel never took a receive buffer (the new registration starts reading the
 * buffer ring at entry 0, where ours starts too).  A kernel that refuses the flags
 * (before 6.1), or anything failing, leaves the port as it was. */
int port__uring_single_issuer(uring_port_t *p) {
    struct io_uring_params params;
    struct io_uring_buf_reg reg;
    char err[160];
    int rc = PORT_EUNAVAIL, fd;
    uint64_t count;
    /* The old ring, to restore on failure or unmap on success. */
    uring_port_t old;

    pthread_mutex_lock(&p->room);
    port_spin_lock(&p->cq_lock);
    port_spin_lock(&p->sq_lock);
    port_spin_lock(&p->br_lock);
    if (p->single || p->lead || p->standby || port_atomic_load32(&p->base.closed) ||
        __atomic_load_n(&p->base.submitted, __ATOMIC_ACQUIRE) != 0 ||
        LOAD_ACQ(p->sq_ktail) != LOAD_ACQ(p->sq_khead) || p->sq_tail != *p->sq_ktail)
        goto out;
    memset(&params, 0, sizeof(params));
    params.flags = IORING_SETUP_CQSIZE | IORING_SETUP_SUBMIT_ALL | IORING_SETUP_SINGLE_ISSUER |
                   IORING_SETUP_DEFER_TASKRUN | IORING_SETUP_TASKRUN_FLAG |
                   IORING_SETUP_R_DISABLED;
    params.cq_entries = p->base.opts.queue_depth * 4;
    fd = sys_setup(p->base.opts.queue_depth, &params);
    if (fd < 0)
        goto out;
    memcpy(&old, p, sizeof(old));
    p->ring_fd = fd;
    p->sqes = NULL;
    p->sq_ring = p->cq_ring = NULL;
    if (map_rings(p, &params, err, sizeof(err)) != 0 || register_buffers(p) < 0) {
        unmap_rings(p);
        p->ring_fd = old.ring_fd;
        p->sq_ring = old.sq_ring;
        p->cq_ring = old.cq_ring;
        p->sqes = old.sqes;
        p->sq_ring_sz = old.sq_ring_sz;
        p->cq_ring_sz = old.cq_ring_sz;
        p->sqes_sz = old.sqes_sz;
        p->sq_khead = old.sq_khead;
        p->sq_ktail = old.sq_ktail;
        p->sq_kflags = old.sq_kflags;
        p->sq_mask = old.sq_mask;
        p->sq_entries = old.sq_entries;
        p->sq_tail = old.sq_tail;
        p->cq_khead = old.cq_khead;
        p->cq_ktail = old.cq_ktail;
        p->cq_mask = old.cq_mask;
        p->cqes = old.cqes;
        goto out;
    }
    /* The old ring lets go of the buffer ring, then goes (its doorbell poll with it). */
    memset(&reg, 0, sizeof(reg));
    reg.bgid = BGID;
    (void)sys_register(old.ring_fd, IORING_UNREGISTER_PBUF_RING, &reg, 1);
    unmap_rings(&old);
    p->setup_flags = params.flags;
    while (read(p->bell_fd, &count, sizeof(count)) > 0)
        ;
    port_atomic_store32(&p->bell_rung, 0);
    port_atomic_store32(&p->owner, 0);
    port_atomic_store32(&p->single, 1);
    rc = 0;
out:
    port_spin_unlock(&p->br_lock);
    port_spin_unlock(&p->sq_lock);
    port_spin_unlock(&p->cq_lock);
    pthread_mutex_unlock(&p->room);
    if (rc == 0)
        port__uring_arm_doorbell(p);   /* in the ring until the owner's first enter */
    return rc;
}

int port__uring_single_dispatcher(port_t *bp) {
    return port__uring_single_issuer((uring_port_t *)bp);
}

int port__uring_probe(char *errbuf, size_t errlen) {
    port_options_t small;
    uring_port_t *p;
    int rc;
    memset(&small, 0, sizeof(small));
    small.queue_depth = 4;
    small.recv_buffer_count = 1;
    small.recv_buffer_size = 4096;
    rc = uring_create_ex(&p, &small, errbuf, errlen);
    if (rc == 0)
        port__uring_free(p);
    return rc;
}

int port__uring_create(port_t **out, const port_options_t *opts, char *errbuf, size_t errlen) {
    uring_port_t *p;
    int rc = uring_create_ex(&p, opts, errbuf, errlen);
    *out = rc == 0 ? &p->base : NULL;
    return rc;
}
#endif /* __linux__ */
