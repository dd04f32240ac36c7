/*
 * Reference io_uring echo server: one thread, raw syscalls, no liburing.
 * It is "the limit" the other servers are expressed as ratios of, so it
 * tries to do the least work per echo that a straightforward design allows:
 *
 *  - one multishot accept for the listener;
 *  - per connection one buffer and a repeating chain
 *        recv -> (on data) send(MSG_WAITALL) linked to the next recv
 *    The link guarantees the next recv cannot overwrite the buffer before
 *    the send has finished with it. MSG_WAITALL makes io_uring retry short
 *    sends itself, and IOSQE_CQE_SKIP_SUCCESS suppresses the send's
 *    completion, so a full echo costs one CQE;
 *  - all new SQEs of a loop iteration go in with the single
 *    io_uring_enter() that also waits for the next completions;
 *  - DEFER_TASKRUN + SINGLE_ISSUER: completions are processed only when we
 *    ask for them, with no interrupting task work (setup falls back to
 *    plainer flags on kernels that lack them).
 *
 * usage: c_uring_echo PORT     (listens on 127.0.0.1:PORT, prints READY)
 */
#define _GNU_SOURCE
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

#define BUFSZ (64 * 1024)
#define SQ_ENTRIES 4096
#define CQ_ENTRIES 16384

/* user_data: connection pointer | operation tag in the low bits */
enum { OP_ACCEPT = 1, OP_RECV = 2, OP_SEND = 3 };
#define OP_MASK 7ull

struct conn {
    int fd;
    uint8_t buf[BUFSZ];
} __attribute__((aligned(16)));

static struct {
    int fd;
    unsigned *sq_head, *sq_tail, *sq_mask, *sq_array, sq_entries;
    struct io_uring_sqe *sqes;
    unsigned *cq_head, *cq_tail, *cq_mask;
    struct io_uring_cqe *cqes;
    unsigned sq_local_tail; /* SQEs filled in but not yet published */
} R;

static int listen_fd;

static int sys_setup(unsigned entries, struct io_uring_params *p)
{
    return (int)syscall(__NR_io_uring_setup, entries, p);
}

static int sys_enter(unsigned to_submit, unsigned min_complete, unsigned flags)
{
    return (int)syscall(__NR_io_uring_enter, R.fd, to_submit, min_complete, flags, NULL, 0);
}

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
    R.fd = fd;
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

static void queue_recv(struct conn *c, unsigned flags)
{
    struct io_uring_sqe *sqe = get_sqe();
    sqe->opcode = IORING_OP_RECV;
    sqe->fd = c->fd;
    sqe->addr = (uintptr_t)c->buf;
    sqe->len = BUFSZ;
    sqe->flags = (uint8_t)flags;
    sqe->user_data = (uintptr_t)c | OP_RECV;
}

static void queue_echo(struct conn *c, unsigned len)
{
    struct io_uring_sqe *sqe = get_sqe();
    sqe->opcode = IORING_OP_SEND;
    sqe->fd = c->fd;
    sqe->addr = (uintptr_t)c->buf;
    sqe->len = len;
    sqe->msg_flags = MSG_WAITALL | MSG_NOSIGNAL;
    sqe->flags = IOSQE_IO_LINK | IOSQE_CQE_SKIP_SUCCESS;
    sqe->user_data = (uintptr_t)c | OP_SEND;
    queue_recv(c, 0);
}

static void handle_cqe(uint64_t ud, int res, unsigned flags)
{
    unsigned op = (unsigned)(ud & OP_MASK);
    if (op == OP_ACCEPT) {
        if (res >= 0) {
            int one = 1;
            setsockopt(res, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
            struct conn *c = aligned_alloc(16, sizeof *c);
            if (!c) {
                close(res);
            } else {
                c->fd = res;
                queue_recv(c, 0);
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
        /* Only failed sends complete visibly. The linked recv is cancelled
         * by the kernel and its -ECANCELED completion closes the connection,
         * so nothing is touched here (the conn may already be gone). */
        return;
    }
    if (res > 0) {
        queue_echo(c, (unsigned)res);
        return;
    }
    /* 0 = orderly close, <0 = reset or cancelled chain: nothing is in
     * flight for this connection any more, so it can go */
    close(c->fd);
    free(c);
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
    listen_fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    int one = 1;
    setsockopt(listen_fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)atoi(argv[1]))};
    inet_pton(AF_INET, "127.0.0.1", &a.sin_addr);
    if (bind(listen_fd, (struct sockaddr *)&a, sizeof a) < 0 || listen(listen_fd, 1024) < 0) {
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
        while (head != tail) {
            struct io_uring_cqe *cqe = &R.cqes[head & *R.cq_mask];
            uint64_t ud = cqe->user_data;
            int res = cqe->res;
            unsigned fl = cqe->flags;
            /* release the slot before handling: handling may submit, and
             * inline completions need CQ room */
            head++;
            __atomic_store_n(R.cq_head, head, __ATOMIC_RELEASE);
            handle_cqe(ud, res, fl);
            if (head == tail)
                tail = __atomic_load_n(R.cq_tail, __ATOMIC_ACQUIRE);
        }
    }
}
