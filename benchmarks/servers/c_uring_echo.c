/*
 * Reference io_uring echo server: one thread, raw syscalls, no liburing.
 * It is "the limit" the other servers are expressed as ratios of, so it does
 * what the best C io_uring servers do on a current kernel, and nothing more:
 *
 *  - IORING_SETUP_SINGLE_ISSUER | DEFER_TASKRUN: completions are produced
 *    only when this thread asks for them in io_uring_enter, with no task
 *    work interrupting it and no wake-up per completion; the ring fd is
 *    registered (IORING_REGISTER_RING_FDS), saving a lookup per enter;
 *  - one multishot accept for the listener;
 *  - one multishot receive per connection, into a ring of provided buffers
 *    (IORING_REGISTER_PBUF_RING): an idle connection holds no buffer;
 *  - the echo is sent straight from the buffer the data arrived in
 *    (MSG_WAITALL: the kernel finishes a short send itself); the buffer goes
 *    back to the ring when that send completes. One send in flight per
 *    connection keeps the bytes in order; what arrives meanwhile waits in a
 *    per-connection list of buffers (linked through a per-buffer array);
 *  - every SQE of a pass over the completions goes in with the single
 *    io_uring_enter that also waits for the next ones.
 *
 * When the buffer ring runs dry (a peer that sends faster than it reads),
 * the kernel ends that connection's multishot receive with ENOBUFS; it is
 * armed again once buffers have come back. Setup falls back to plainer
 * flags on kernels that lack them.
 *
 * usage: c_uring_echo PORT     (listens on 127.0.0.1:PORT, prints READY)
 *
 * py_floor.c includes this file with C_URING_ECHO_RING defined: the ring, the buffers and
 * the submission helpers, not the echo (CONN_EXTRA: fields it adds to a connection).
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <arpa/inet.h>
#include <errno.h>
#include <linux/io_uring.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <unistd.h>

#define SQ_ENTRIES 4096
#define CQ_ENTRIES 16384
#define BGID 1
#ifndef NBUF
#define NBUF 512u /* power of two; 512 x 16 KiB = 8 MiB, touched as used */
#endif
#define BUFSZ (16u * 1024u)
#define NO_BUF 0xffffu

/* user_data: connection pointer | operation tag in the low bits */
enum { OP_ACCEPT = 1, OP_RECV = 2, OP_SEND = 3 };
#define OP_MASK 7ull

struct conn {
    int fd;
    uint8_t recv_armed, send_busy, closing, wants_rearm;
    uint16_t q_head, q_tail; /* buffers waiting to be echoed (bids), in order */
    struct conn *rearm_next;
#ifdef CONN_EXTRA
    CONN_EXTRA
#endif
} __attribute__((aligned(8)));

static struct {
    int fd, enter_fd;
    unsigned enter_flags;
    unsigned *sq_head, *sq_tail, *sq_mask, *sq_array, sq_entries;
    struct io_uring_sqe *sqes;
    unsigned *cq_head, *cq_tail, *cq_mask;
    struct io_uring_cqe *cqes;
    unsigned sq_local_tail; /* SQEs filled in but not yet published */
    struct io_uring_buf_ring *br;
    uint8_t *bufs;
    uint16_t br_tail;
    uint16_t buf_next[NBUF]; /* per-buffer link of a connection's send queue */
    uint32_t buf_len[NBUF];
} R;

static int listen_fd;
static struct conn *rearm_list; /* connections whose receive ran out of buffers */

static int sys_setup(unsigned entries, struct io_uring_params *p)
{
    return (int)syscall(__NR_io_uring_setup, entries, p);
}

static int sys_enter(unsigned to_submit, unsigned min_complete, unsigned flags)
{
    return (int)syscall(__NR_io_uring_enter, R.enter_fd, to_submit, min_complete,
                        flags | R.enter_flags, NULL, 0);
}

static void buf_give(uint16_t bid)
{
    struct io_uring_buf *b = &R.br->bufs[R.br_tail & (NBUF - 1)];
    b->addr = (uintptr_t)(R.bufs + (size_t)bid * BUFSZ);
    b->len = BUFSZ;
    b->bid = bid;
    R.br_tail++;
}

static void buf_publish(void) { __atomic_store_n(&R.br->tail, R.br_tail, __ATOMIC_RELEASE); }

static void ring_init(void)
{
    struct io_uring_params p;
    /* newest flags first; each fallback drops what an older kernel rejects */
    const unsigned flag_sets[] = {
        IORING_SETUP_CQSIZE | IORING_SETUP_SUBMIT_ALL | IORING_SETUP_SINGLE_ISSUER |
            IORING_SETUP_DEFER_TASKRUN,
        IORING_SETUP_CQSIZE | IORING_SETUP_SUBMIT_ALL | IORING_SETUP_COOP_TASKRUN,
        IORING_SETUP_CQSIZE,
    };
    int fd = -1;
    for (unsigned i = 0; i < sizeof flag_sets / sizeof flag_sets[0]; i++) {
        memset(&p, 0, sizeof p);
        p.flags = flag_sets[i];
        p.cq_entries = CQ_ENTRIES;
        fd = sys_setup(SQ_ENTRIES, &p);
        if (fd >= 0)
            break;
    }
    if (fd < 0) {
        perror("io_uring_setup");
        exit(1);
    }
    if (!(p.features & IORING_FEAT_SINGLE_MMAP) || !(p.features & IORING_FEAT_NODROP)) {
        fprintf(stderr, "kernel too old for this server\n");
        exit(1);
    }
    R.fd = R.enter_fd = fd;
    size_t sq_sz = p.sq_off.array + p.sq_entries * sizeof(unsigned);
    size_t cq_sz = p.cq_off.cqes + p.cq_entries * sizeof(struct io_uring_cqe);
    size_t sz = sq_sz > cq_sz ? sq_sz : cq_sz;
    uint8_t *ring = mmap(NULL, sz, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd,
                         IORING_OFF_SQ_RING);
    R.sqes = mmap(NULL, p.sq_entries * sizeof(struct io_uring_sqe), PROT_READ | PROT_WRITE,
                  MAP_SHARED | MAP_POPULATE, fd, IORING_OFF_SQES);
    if (ring == MAP_FAILED || R.sqes == MAP_FAILED) {
        perror("mmap");
        exit(1);
    }
    R.sq_head = (unsigned *)(ring + p.sq_off.head);
    R.sq_tail = (unsigned *)(ring + p.sq_off.tail);
    R.sq_mask = (unsigned *)(ring + p.sq_off.ring_mask);
    R.sq_array = (unsigned *)(ring + p.sq_off.array);
    R.sq_entries = p.sq_entries;
    R.cq_head = (unsigned *)(ring + p.cq_off.head);
    R.cq_tail = (unsigned *)(ring + p.cq_off.tail);
    R.cq_mask = (unsigned *)(ring + p.cq_off.ring_mask);
    R.cqes = (struct io_uring_cqe *)(ring + p.cq_off.cqes);
    /* identity map once: slot i of the array always points at SQE i */
    for (unsigned i = 0; i < p.sq_entries; i++)
        R.sq_array[i] = i;
    R.sq_local_tail = *R.sq_tail;

    struct io_uring_rsrc_update up = {.offset = -1U, .data = (uint64_t)fd};
    if (syscall(__NR_io_uring_register, fd, IORING_REGISTER_RING_FDS, &up, 1) == 1) {
        R.enter_fd = (int)up.offset;
        R.enter_flags = IORING_ENTER_REGISTERED_RING;
    }

    /* buffers are not pre-faulted: RSS grows only with what is in use */
    R.br = mmap(NULL, NBUF * sizeof(struct io_uring_buf), PROT_READ | PROT_WRITE,
                MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    R.bufs = mmap(NULL, (size_t)NBUF * BUFSZ, PROT_READ | PROT_WRITE,
                  MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (R.br == MAP_FAILED || R.bufs == MAP_FAILED) {
        perror("mmap buffers");
        exit(1);
    }
    struct io_uring_buf_reg reg = {.ring_addr = (uintptr_t)R.br, .ring_entries = NBUF,
                                   .bgid = BGID};
    if (syscall(__NR_io_uring_register, fd, IORING_REGISTER_PBUF_RING, &reg, 1) != 0) {
        perror("IORING_REGISTER_PBUF_RING");
        exit(1);
    }
    for (unsigned i = 0; i < NBUF; i++)
        buf_give((uint16_t)i);
    buf_publish();
}

static unsigned pending_submit(void)
{
    return R.sq_local_tail - __atomic_load_n(R.sq_head, __ATOMIC_ACQUIRE);
}

static void publish(void) { __atomic_store_n(R.sq_tail, R.sq_local_tail, __ATOMIC_RELEASE); }

/* submit without waiting; used only when the SQ ring fills up mid-batch */
static void flush_sq(void)
{
    publish();
    unsigned n = pending_submit();
    while (n) {
        int r = sys_enter(n, 0, 0);
        if (r < 0 && errno != EINTR && errno != EAGAIN && errno != EBUSY) {
            perror("io_uring_enter");
            exit(1);
        }
        if (r < 0) /* CQ backlog: let the kernel flush it, then retry */
            sys_enter(0, 0, IORING_ENTER_GETEVENTS);
        n = pending_submit();
    }
}

static struct io_uring_sqe *get_sqe(void)
{
    if (R.sq_local_tail - __atomic_load_n(R.sq_head, __ATOMIC_ACQUIRE) >= R.sq_entries)
        flush_sq();
    struct io_uring_sqe *sqe = &R.sqes[R.sq_local_tail & *R.sq_mask];
    R.sq_local_tail++;
    memset(sqe, 0, sizeof *sqe);
    return sqe;
}

static void queue_accept(void)
{
    struct io_uring_sqe *sqe = get_sqe();
    sqe->opcode = IORING_OP_ACCEPT;
    sqe->fd = listen_fd;
    sqe->ioprio = IORING_ACCEPT_MULTISHOT;
    sqe->accept_flags = SOCK_CLOEXEC;
    sqe->user_data = OP_ACCEPT;
}

static void arm_recv(struct conn *c)
{
    struct io_uring_sqe *sqe = get_sqe();
    sqe->opcode = IORING_OP_RECV;
    sqe->fd = c->fd;
    sqe->ioprio = IORING_RECV_MULTISHOT;
    sqe->flags = IOSQE_BUFFER_SELECT;
    sqe->buf_group = BGID;
    sqe->user_data = (uintptr_t)c | OP_RECV;
    c->recv_armed = 1;
}

/* Out of buffers: armed again once some have come back (after the pass). */
static void wait_for_buffers(struct conn *c)
{
    if (!c->wants_rearm) {
        c->wants_rearm = 1;
        c->rearm_next = rearm_list;
        rearm_list = c;
    }
}

/* The listening socket on 127.0.0.1:port, or -1. */
static int listen_loopback(int port)
{
    int one = 1;
    listen_fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    setsockopt(listen_fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    inet_pton(AF_INET, "127.0.0.1", &a.sin_addr);
    if (bind(listen_fd, (struct sockaddr *)&a, sizeof a) < 0 || listen(listen_fd, 1024) < 0)
        return -1;
    return listen_fd;
}

static void send_head(struct conn *c)
{
    uint16_t bid = c->q_head;
    struct io_uring_sqe *sqe = get_sqe();
    sqe->opcode = IORING_OP_SEND;
    sqe->fd = c->fd;
    sqe->addr = (uintptr_t)(R.bufs + (size_t)bid * BUFSZ);
    sqe->len = R.buf_len[bid];
    sqe->msg_flags = MSG_WAITALL | MSG_NOSIGNAL;
    sqe->user_data = (uintptr_t)c | OP_SEND;
    c->send_busy = 1;
}

static void enqueue(struct conn *c, uint16_t bid, unsigned len)
{
    R.buf_len[bid] = len;
    R.buf_next[bid] = NO_BUF;
    if (c->q_head == NO_BUF)
        c->q_head = bid;
    else
        R.buf_next[c->q_tail] = bid;
    c->q_tail = bid;
    if (!c->send_busy)
        send_head(c);
}

#ifndef C_URING_ECHO_RING
/* Frees the connection once nothing of it is in flight any more. */
static void maybe_free(struct conn *c)
{
    /* (one waiting for a re-arm is freed by the re-arm pass, which holds
     * a pointer to it) */
    if (!c->closing || c->recv_armed || c->send_busy || c->wants_rearm)
        return;
    while (c->q_head != NO_BUF) {
        uint16_t bid = c->q_head;
        c->q_head = R.buf_next[bid];
        buf_give(bid);
    }
    close(c->fd);
    free(c);
}

static void start_close(struct conn *c)
{
    if (!c->closing) {
        c->closing = 1;
        /* ends the multishot receive too: it completes, and then we free */
        if (c->recv_armed)
            shutdown(c->fd, SHUT_RDWR);
    }
    maybe_free(c);
}

static void handle_cqe(uint64_t ud, int res, unsigned flags)
{
    unsigned op = (unsigned)(ud & OP_MASK);
    if (op == OP_ACCEPT) {
        if (res >= 0) {
            int one = 1;
            setsockopt(res, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
            struct conn *c = calloc(1, sizeof *c);
            if (!c) {
                close(res);
            } else {
                c->fd = res;
                c->q_head = c->q_tail = NO_BUF;
                arm_recv(c);
            }
        } else if (res != -ECONNABORTED && res != -EINTR && res != -EAGAIN) {
            fprintf(stderr, "accept: %s\n", strerror(-res));
        }
        if (!(flags & IORING_CQE_F_MORE)) /* multishot ended: re-arm */
            queue_accept();
        return;
    }
    struct conn *c = (struct conn *)(uintptr_t)(ud & ~OP_MASK);
    if (op == OP_SEND) {
        c->send_busy = 0;
        uint16_t bid = c->q_head;
        c->q_head = R.buf_next[bid];
        buf_give(bid); /* published after this pass over the completions */
        if (res < 0 || (unsigned)res < R.buf_len[bid] || c->closing) {
            start_close(c); /* reset by the peer, or closing anyway */
            return;
        }
        if (c->q_head != NO_BUF)
            send_head(c);
        return;
    }
    /* OP_RECV */
    if (!(flags & IORING_CQE_F_MORE))
        c->recv_armed = 0;
    if (res > 0) {
        enqueue(c, (uint16_t)(flags >> IORING_CQE_BUFFER_SHIFT), (unsigned)res);
        if (!c->recv_armed && !c->closing)
            arm_recv(c);
        return;
    }
    if (res == -ENOBUFS && !c->closing) {
        wait_for_buffers(c);
        return;
    }
    /* 0 = orderly close, <0 = reset: echo what is queued is pointless */
    start_close(c);
}

#ifndef IORING_REGISTER_PBUF_STATUS /* Linux 6.8; older uapi headers lack it */
#define IORING_REGISTER_PBUF_STATUS 26
struct io_uring_buf_status {
    uint32_t buf_group, head, resv[8];
};
#endif

/* Does the ring hold buffers the kernel has not taken? Asked only when receives wait
 * for buffers and the pass gave none back from a send: where task work may run at any
 * return to user space (the COOP_TASKRUN and plain fallbacks), an ENOBUFS can be posted
 * after the pass that gave the last buffers back, and with no send left in flight no
 * later pass would give any, so those receives would wait for ever. */
__attribute__((noinline, cold)) static int ring_has_buffers(void)
{
    struct io_uring_buf_status st = {.buf_group = BGID};
    if (syscall(__NR_io_uring_register, R.fd, IORING_REGISTER_PBUF_STATUS, &st, 1) != 0)
        return 1; /* kernel before 6.8: re-arm; at worst the receive ends again */
    return (uint16_t)st.head != R.br_tail;
}

int main(int argc, char **argv)
{
    if (argc != 2) {
        fprintf(stderr, "usage: %s PORT\n", argv[0]);
        return 1;
    }
    signal(SIGPIPE, SIG_IGN);
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
    if (listen_loopback(atoi(argv[1])) < 0) {
        perror("bind/listen");
        return 1;
    }
    ring_init();
    queue_accept();
    printf("READY\n");
    fflush(stdout);

    for (;;) {
        publish();
        int r = sys_enter(pending_submit(), 1, IORING_ENTER_GETEVENTS);
        if (r < 0 && errno != EINTR && errno != EAGAIN && errno != EBUSY) {
            perror("io_uring_enter");
            return 1;
        }
        unsigned head = *R.cq_head;
        unsigned tail = __atomic_load_n(R.cq_tail, __ATOMIC_ACQUIRE);
        int returned = 0;
        while (head != tail) {
            struct io_uring_cqe *cqe = &R.cqes[head & *R.cq_mask];
            uint64_t ud = cqe->user_data;
            int res = cqe->res;
            unsigned fl = cqe->flags;
            /* release the slot before handling: handling may submit, and
             * inline completions need CQ room */
            head++;
            __atomic_store_n(R.cq_head, head, __ATOMIC_RELEASE);
            returned |= (ud & OP_MASK) == OP_SEND;
            handle_cqe(ud, res, fl);
            if (head == tail)
                tail = __atomic_load_n(R.cq_tail, __ATOMIC_ACQUIRE);
        }
        buf_publish();
        if (rearm_list && (returned || ring_has_buffers())) {
            struct conn *c = rearm_list;
            rearm_list = NULL;
            while (c) {
                struct conn *next = c->rearm_next;
                c->wants_rearm = 0;
                if (!c->recv_armed && !c->closing)
                    arm_recv(c);
                else
                    maybe_free(c);
                c = next;
            }
        }
    }
}
#endif /* C_URING_ECHO_RING */
