/*
 * iocp.c -- the Windows completion port.
 *
 * How IOCP fits together
 * ----------------------
 * port.h is modelled on IOCP, so this backend is mostly a translation.  A socket is
 * associated with the port once (CreateIoCompletionPort); every overlapped call on it
 * (AcceptEx, ConnectEx, WSARecv, WSASend) takes the OVERLAPPED that is the first member
 * of our port_op_t, and when the kernel finishes the I/O it queues a completion packet
 * {key, &op->ov, bytes} on the port.  GetQueuedCompletionStatusEx dequeues a batch of
 * packets; &op->ov is the op itself (the cast is the container_of), and the I/O's final
 * NTSTATUS is in op->ov.Internal.  PostQueuedCompletionStatus queues a packet of our own.
 *
 * Invariants
 *   - Exactly one final completion per accepted submission reaches port_wait.  We never
 *     set FILE_SKIP_COMPLETION_PORT_ON_SUCCESS, so an overlapped call that succeeds at
 *     once still queues its packet, exactly like one that returns WSA_IO_PENDING; a call
 *     that fails at once queues nothing (documented for every Winsock overlapped call),
 *     and we post the error as an "immediate" packet (key KEY_IMM, result stored in the
 *     op).  close and post are immediate packets too.  So every completion, whatever its
 *     origin, comes out of the same GetQueuedCompletionStatusEx, in the port's order.
 *   - An op's memory (its OVERLAPPED, AcceptEx's address buffer, the WSABUF array of a
 *     send) stays untouched by us from the overlapped call until its packet is dequeued,
 *     also when it was cancelled or completed at once: the kernel may write to it until
 *     then.  Cancel is CancelIoEx, which only asks: the packet still comes, with
 *     STATUS_CANCELLED (or with the I/O's own result if it won the race).
 *   - Keys: KEY_IO for every associated socket, KEY_IMM for our immediate completions
 *     (lpOverlapped = the op), KEY_WAKE with no OVERLAPPED to wake the waiter.
 *
 * Receives.  A port.h receive is one-shot, like a WSARecv (it completes once: data,
 * EOF or error; the caller posts the next), and pins no buffer while the connection is
 * idle.  The IOCP idiom: a zero-byte WSARecv completes when data is there (or at EOF, or
 * with the error) without consuming anything; then a non-blocking recv() copies what
 * arrived into a buffer taken from the port's pool at that moment, and that is the
 * receive's completion (PORT_CQE_BUFFER).  recv() == 0 is EOF (res 0); WSAEWOULDBLOCK
 * (nothing there after all) posts the zero-byte WSARecv again.  The pool makes up to
 * recv_buffer_count buffers (heap blocks), each the first time it is needed, so memory
 * follows the peak of data being dispatched, as io_uring's provided buffers do; one the
 * caller keeps for good (port_recv_detach) is replaced by a new block.  When every
 * buffer is out, the receive is parked (no I/O posted), in arrival order, and each
 * buffer given back posts the zero-byte WSARecv of the oldest again (one that ends
 * without taking a buffer passes the turn on): the data waits in the kernel's socket
 * buffer, which is TCP's flow control doing its job.
 *   Descriptors: every submission here is its own system call, made before the call
 * returns, so port_close's closesocket comes after everything submitted before it, as
 * port.h requires; the zero-byte WSARecv a released buffer re-posts reads the cancel
 * flag first (below).
 * PORT_OPT_RECV_MULTISHOT (an io_uring option) is ignored: receives stay one-shot.
 *   Re-posting honours port_cancel: the cancel flag is read and the zero-byte WSARecv
 * posted under the op's spin lock, and port_cancel takes that lock around CancelIoEx, so
 * either the re-post sees the flag (and completes the receive with PORT_ECANCELED), or
 * CancelIoEx finds the WSARecv.  The same lock guards the recv() after a zero-byte
 * completion, so a caller that cancels and then closes the socket (what port.h asks)
 * never has recv() run on a closed handle.
 *
 * Ordering and several waiters.  GetQueuedCompletionStatusEx is safe from many threads,
 * but two threads that each dequeue a batch at the same moment deliver them in an order
 * nobody can tell, and strands (common.c) need every completion handed to port__deliver
 * in the order the port queued it: a session's posts, its receive and its send must reach
 * it in that order (without this, the contract's strands case sees posts overtake each
 * other under Wine).  So one waiter at a time, the *leader*, dequeues and delivers; the
 * others sleep on a condition variable until the leader leaves port_wait with its batch,
 * and the next one takes over.  This is io_uring.c's cq_lock, held across the kernel
 * wait, with the condition variable standing in for "everyone sleeps in the
 * kernel".  Dispatching (the expensive part, with the GIL) still runs on all workers at
 * once; only dequeuing is serial, and it costs one batch per turn.  Because only the
 * leader is ever inside GetQueuedCompletionStatusEx, the port's concurrency value (0: one
 * running thread per CPU) only decides when the leader is let go while other workers are
 * busy.
 *
 * Timers are a binary min-heap of ops ordered by (deadline, arming sequence), kept in
 * the port, and the leader clamps its GetQueuedCompletionStatusEx timeout to the earliest
 * deadline, then completes the due timers itself, in order, into its batch.  Arming a
 * timer that becomes the earliest posts one KEY_WAKE (at most one outstanding) so a
 * leader asleep with a later deadline recomputes.  Cancel takes the timer out of the
 * heap and posts PORT_ECANCELED; a timer already taken out by the leader completes with
 * 0.  (Threadpool timers would also work, but each costs a kernel object and a callback
 * thread racing the cancel; the heap costs nothing per timer and no hidden thread.)  A
 * wait or timer never returns early: deadlines come from QueryPerformanceCounter and the
 * leader loops until they have passed, since a Windows wait may end up to a clock tick
 * (~15.6 ms by default) off in either direction.
 *
 * What Wine does differently (the contract runs this file under Wine; we code to
 * Windows' documented behaviour, and note where Wine is laxer):
 *   - Wine lets getpeername/shutdown work on an AcceptEx socket without
 *     SO_UPDATE_ACCEPT_CONTEXT, and on a ConnectEx socket without
 *     SO_UPDATE_CONNECT_CONTEXT; Windows fails them (WSAENOTCONN).  We always set both.
 *   - On Windows, closesocket under a pending operation completes it with
 *     STATUS_CANCELLED (or STATUS_LOCAL_DISCONNECT); Wine completes it with
 *     STATUS_HANDLES_CLOSED (Win32 error 676).  Both map to PORT_ECANCELED, and any
 *     failure of an operation whose cancel was requested is reported as PORT_ECANCELED.
 *   - Windows retries a refused loopback connect for about two seconds before
 *     ERROR_CONNECTION_REFUSED; Wine reports it at once (Linux semantics).
 *   - Wine's waits are precise; Windows' have the clock-tick granularity noted above.
 *
 * DisconnectEx is not used: port_close's graceful close is closesocket with the default
 * linger, which returns at once while the stack sends what is queued and the FIN in the
 * background.  DisconnectEx(TF_REUSE_SOCKET) pays off only when sockets are recycled
 * into AcceptEx/ConnectEx, which port.h does not offer (the port makes the sockets).
 *
 * Sources: Microsoft's pages for CreateIoCompletionPort, GetQueuedCompletionStatusEx,
 * PostQueuedCompletionStatus, CancelIoEx, AcceptEx, ConnectEx, WSARecv, WSASend,
 * SetFileCompletionNotificationModes, and "I/O Completion Ports".
 */
#ifdef _WIN32
#include "port_int.h"
#include "bufpool.h"
#include "timer_heap.h"

#include <limits.h>
#include <stdlib.h>

#if defined(_WIN32_WINNT) && _WIN32_WINNT < 0x0600
#  error "iocpnet's IOCP backend needs Windows Vista or later (_WIN32_WINNT >= 0x0600)"
#endif

#define KEY_IO 0
#define KEY_IMM 1
#define KEY_WAKE 2

#define ENTRIES_MAX 64         /* packets dequeued per GetQueuedCompletionStatusEx */
#define SEND_INLINE 4          /* WSABUFs kept inside the op; more are allocated */
#define SEND_MAX_BUFS 1024     /* a send of more buffers sends the first 1024 (partial) */
#define ACCEPT_ADDR_LEN ((DWORD)(sizeof(struct sockaddr_in6) + 16))

/* What an op keeps while in flight, inside port_op_t.priv. */
typedef struct iocp_op {
    union {
        char accept_addrs[2 * (sizeof(struct sockaddr_in6) + 16)];  /* AcceptEx writes here */
        struct sockaddr_in6 sa;            /* connect: the caller's address, copied */
        WSABUF inl[SEND_INLINE];           /* send: a short WSABUF array */
        port_tnode_t timer;                /* timer: its place in the heap (deadline in us) */
    } u;
    union {
        SOCKET accept_sock;                /* accept: the socket AcceptEx fills */
        WSABUF *heap_bufs;                 /* send: a long WSABUF array, freed at completion */
    } u2;
    int64_t imm_res;                       /* result carried by a KEY_IMM packet */
    port_bufwait_t bufwait;                /* recv: waiting for a pool buffer (bufpool.h) */
    volatile int32_t lock;                 /* issue vs cancel (see the top) */
} iocp_op_t;

PORT_STATIC_ASSERT(sizeof(iocp_op_t) <= sizeof(((port_op_t *)0)->priv), iocp_op_fits);
PORT_STATIC_ASSERT(offsetof(port_op_t, ov) == 0, ov_first);

#define OP_PRIV(op) ((iocp_op_t *)(void *)(op)->priv)
/* The receive operation waiting for a buffer that w belongs to. */
#define OP_OF_BUFWAIT(w) \
    ((port_op_t *)(void *)((char *)(w) - offsetof(port_op_t, priv) - offsetof(iocp_op_t, bufwait)))

typedef struct iocp_port {
    port_t base;
    HANDLE iocp;
    LARGE_INTEGER qpc_freq;

    /* the leader (see the top) */
    SRWLOCK lead_lock;
    CONDITION_VARIABLE lead_cv;
    int leading;                       /* under lead_lock */

    port_timers_t timers;
    volatile int32_t wake_pending;     /* a KEY_WAKE for the timers is queued */

    port_bufpool_t pool;               /* receive buffers; waiters are receive ops */
} iocp_port_t;

/* ---- clock ------------------------------------------------------------------------------ */

static int64_t now_us(iocp_port_t *p) {
    LARGE_INTEGER c;
    int64_t f = p->qpc_freq.QuadPart;
    QueryPerformanceCounter(&c);
    return (c.QuadPart / f) * 1000000 + (c.QuadPart % f) * 1000000 / f;
}

/* Milliseconds to wait for `us` microseconds, rounded up (never wake early). */
static DWORD ms_ceil(int64_t us) {
    int64_t ms;
    if (us <= 0)
        return 0;
    ms = (us + 999) / 1000;
    return ms >= (int64_t)0x7ffffffe ? (DWORD)0x7ffffffe : (DWORD)ms;
}

/* ---- immediate completions ------------------------------------------------------------ */

/* Complete op with res without I/O: a packet of our own, dequeued like any other. */
static void post_imm(iocp_port_t *p, port_op_t *op, int64_t res) {
    OP_PRIV(op)->imm_res = res;
    /* Fails only when the kernel is out of memory for the packet; a completion must
     * never be dropped, so wait for memory like port__deliver does. */
    while (!PostQueuedCompletionStatus(p->iocp, 0, KEY_IMM, &op->ov))
        Sleep(1);
}

static void post_wake(iocp_port_t *p) {
    while (!PostQueuedCompletionStatus(p->iocp, 0, KEY_WAKE, NULL))
        Sleep(1);
}

/* The result of a failed operation: a cancel that was asked for wins over whatever the
 * abort looked like (a socket closed under the I/O reports a local disconnect). */
static int64_t fail_res(port_op_t *op, int rc) {
    if (port_atomic_load32(&op->cancel_requested) &&
        (rc == PORT_ECANCELED || rc == PORT_ECONNABORTED || rc == PORT_EBADF ||
         rc == PORT_EIO || rc == PORT_EUNKNOWN))
        return PORT_ECANCELED;
    return rc;
}

/* ---- receive buffers (bufpool.c) ------------------------------------------------------ */

static void arm_recv(iocp_port_t *p, port_op_t *op);

/* A receive woken for a buffer given back: post its zero-byte WSARecv again now. */
static void pool_wake(iocp_port_t *p, port_bufwait_t *w) {
    if (w != NULL)
        arm_recv(p, OP_OF_BUFWAIT(w));
}

static void iocp_recv_release(port_t *bp, uint32_t id, char *fresh) {
    iocp_port_t *p = (iocp_port_t *)bp;
    pool_wake(p, port__bufpool_put(&p->pool, id, fresh));
}

/* ---- issuing I/O ------------------------------------------------------------------------ */

/* Post the zero-byte WSARecv that waits for data (or complete with PORT_ECANCELED when a
 * cancel came first: see the top).  Also used again when a receive resumes after
 * waiting for a pool buffer, or after a wake-up that found no data. */
static void arm_recv(iocp_port_t *p, port_op_t *op) {
    iocp_op_t *o = OP_PRIV(op);
    WSABUF none;
    DWORD flags = 0;
    int rc, e = 0;
    none.buf = NULL;
    none.len = 0;
    port_spin_lock(&o->lock);
    if (port_atomic_load32(&op->cancel_requested)) {
        port_spin_unlock(&o->lock);
        post_imm(p, op, PORT_ECANCELED);
        return;
    }
    memset(&op->ov, 0, sizeof(op->ov));
    rc = WSARecv(op->sock, &none, 1, NULL, &flags, &op->ov, NULL);
    if (rc != 0)
        e = WSAGetLastError();
    port_spin_unlock(&o->lock);
    if (rc != 0 && e != WSA_IO_PENDING)
        post_imm(p, op, port_err_from_os(e));
}

static int iocp_recv(port_t *bp, port_op_t *op, port_sock_t sock) {
    iocp_port_t *p = (iocp_port_t *)bp;
    op->sock = sock;
    port__submitted(bp, op);
    arm_recv(p, op);
    return 0;
}

static int iocp_accept(port_t *bp, port_op_t *op, port_sock_t listener) {
    iocp_port_t *p = (iocp_port_t *)bp;
    iocp_op_t *o = OP_PRIV(op);
    struct sockaddr_storage ss;
    int sslen = (int)sizeof(ss), e = 0;
    LPFN_ACCEPTEX acceptex;
    SOCKET as;
    DWORD bytes = 0;
    BOOL ok;

    op->sock = listener;
    o->u2.accept_sock = INVALID_SOCKET;
    port__submitted(bp, op);
    /* The new socket must be of the listener's family. */
    if (getsockname(listener, (struct sockaddr *)&ss, &sslen) != 0) {
        post_imm(p, op, port_err_from_os(WSAGetLastError()));
        return 0;
    }
    acceptex = port__win_acceptex(ss.ss_family);
    if (acceptex == NULL) {
        post_imm(p, op, PORT_EAFNOSUPPORT);
        return 0;
    }
    as = port__win_socket(ss.ss_family);
    if (as == INVALID_SOCKET) {
        post_imm(p, op, port_err_from_os(WSAGetLastError()));
        return 0;
    }
    if (CreateIoCompletionPort((HANDLE)as, p->iocp, KEY_IO, 0) == NULL) {
        e = (int)GetLastError();
        closesocket(as);
        post_imm(p, op, port_err_from_os(e));
        return 0;
    }
    o->u2.accept_sock = as;
    port_spin_lock(&o->lock);
    memset(&op->ov, 0, sizeof(op->ov));
    ok = acceptex(listener, as, o->u.accept_addrs, 0, ACCEPT_ADDR_LEN, ACCEPT_ADDR_LEN, &bytes,
                  &op->ov);
    if (!ok)
        e = WSAGetLastError();
    port_spin_unlock(&o->lock);
    if (!ok && e != ERROR_IO_PENDING) {
        o->u2.accept_sock = INVALID_SOCKET;
        closesocket(as);
        post_imm(p, op, port_err_from_os(e));
    }
    return 0;
}

static int iocp_connect(port_t *bp, port_op_t *op, const port_addr_t *addr) {
    iocp_port_t *p = (iocp_port_t *)bp;
    iocp_op_t *o = OP_PRIV(op);
    int family = addr->ss.ss_family, rc, e = 0;
    LPFN_CONNECTEX connectex = port__win_connectex(family);
    struct sockaddr_storage any;
    SOCKET s;
    BOOL ok;

    port__submitted(bp, op);
    op->sock = INVALID_SOCKET;
    if (connectex == NULL || (family != AF_INET && family != AF_INET6) ||
        (size_t)addr->len > sizeof(o->u.sa)) {
        post_imm(p, op, PORT_EAFNOSUPPORT);
        return 0;
    }
    s = port__win_socket(family);
    if (s == INVALID_SOCKET) {
        post_imm(p, op, port_err_from_os(WSAGetLastError()));
        return 0;
    }
    op->sock = s;   /* from here on the caller closes it */
    rc = port__win_nonblock(s);
    if (rc == 0 && CreateIoCompletionPort((HANDLE)s, p->iocp, KEY_IO, 0) == NULL)
        rc = port_err_from_os((int)GetLastError());
    if (rc == 0) {
        /* ConnectEx wants a bound socket: the wildcard address, any port. */
        memset(&any, 0, sizeof(any));
        any.ss_family = (ADDRESS_FAMILY)family;
        if (bind(s, (struct sockaddr *)&any,
                 family == AF_INET6 ? (int)sizeof(struct sockaddr_in6)
                                    : (int)sizeof(struct sockaddr_in)) != 0)
            rc = port_err_from_os(WSAGetLastError());
    }
    if (rc != 0) {
        post_imm(p, op, rc);
        return 0;
    }
    memcpy(&o->u.sa, &addr->ss, (size_t)addr->len);
    port_spin_lock(&o->lock);
    memset(&op->ov, 0, sizeof(op->ov));
    ok = connectex(s, (const struct sockaddr *)&o->u.sa, addr->len, NULL, 0, NULL, &op->ov);
    if (!ok)
        e = WSAGetLastError();
    port_spin_unlock(&o->lock);
    if (!ok && e != ERROR_IO_PENDING)
        post_imm(p, op, port_err_from_os(e));
    return 0;
}

static int iocp_send(port_t *bp, port_op_t *op, port_sock_t sock, const port_buf_t *bufs,
                     int nbufs) {
    iocp_port_t *p = (iocp_port_t *)bp;
    iocp_op_t *o = OP_PRIV(op);
    WSABUF *wb = o->u.inl;
    int i, rc, e = 0;

    op->sock = sock;
    o->u2.heap_bufs = NULL;
    port__submitted(bp, op);
    /* The WSABUF array stays valid until the completion, as WSASend's page asks.  Past
     * SEND_MAX_BUFS, or when memory is short, fewer buffers go out: a partial send,
     * which port.h allows (the caller continues from where it stopped). */
    if (nbufs > SEND_MAX_BUFS)
        nbufs = SEND_MAX_BUFS;
    if (nbufs > SEND_INLINE) {
        o->u2.heap_bufs = (WSABUF *)malloc(sizeof(WSABUF) * (size_t)nbufs);
        if (o->u2.heap_bufs != NULL)
            wb = o->u2.heap_bufs;
        else
            nbufs = SEND_INLINE;
    }
    for (i = 0; i < nbufs; i++) {
        /* A WSABUF length is a ULONG: a larger buffer goes out in part. */
        wb[i].buf = (char *)bufs[i].base;
        wb[i].len = bufs[i].len > 0x40000000u ? 0x40000000u : (ULONG)bufs[i].len;
        if (bufs[i].len != wb[i].len) {
            nbufs = i + 1;
            break;
        }
    }
    port_spin_lock(&o->lock);
    memset(&op->ov, 0, sizeof(op->ov));
    rc = WSASend(sock, wb, (DWORD)nbufs, NULL, 0, &op->ov, NULL);
    if (rc != 0)
        e = WSAGetLastError();
    port_spin_unlock(&o->lock);
    if (rc != 0 && e != WSA_IO_PENDING) {
        free(o->u2.heap_bufs);
        o->u2.heap_bufs = NULL;
        post_imm(p, op, port_err_from_os(e));
    }
    return 0;
}

static int iocp_close(port_t *bp, port_op_t *op, port_sock_t sock, int flags) {
    iocp_port_t *p = (iocp_port_t *)bp;
    int rc = port__win_close(sock, flags);
    op->sock = sock;
    port__submitted(bp, op);
    post_imm(p, op, rc);
    return 0;
}

static int iocp_post(port_t *bp, port_op_t *op, int64_t value) {
    port__submitted(bp, op);
    post_imm((iocp_port_t *)bp, op, value);
    return 0;
}

/* ---- timers (timer_heap.h) ------------------------------------------------------------ */

static int iocp_timer(port_t *bp, port_op_t *op, uint64_t ms) {
    iocp_port_t *p = (iocp_port_t *)bp;
    uint64_t cap_ms = ms > (uint64_t)4000000000000ULL ? (uint64_t)4000000000000ULL : ms;
    int rc;

    port__submitted(bp, op);
    rc = port__timers_add(&p->timers, &OP_PRIV(op)->u.timer, now_us(p) + (int64_t)cap_ms * 1000);
    if (rc < 0)
        post_imm(p, op, rc);
    else if (rc == 1 && port_atomic_xchg32(&p->wake_pending, 1) == 0)
        post_wake(p);   /* a leader asleep for a later deadline must look again */
    return 0;
}

/* ---- cancel ----------------------------------------------------------------------------- */

static int iocp_cancel(port_t *bp, port_op_t *target) {
    iocp_port_t *p = (iocp_port_t *)bp;
    iocp_op_t *o = OP_PRIV(target);

    switch (target->type) {
    case PORT_OP_TIMER:
        if (port__timers_cancel(&p->timers, &o->u.timer))
            post_imm(p, target, PORT_ECANCELED);
        return 0;
    case PORT_OP_POST:
    case PORT_OP_CLOSE:
        return 0;   /* already complete: their packet is queued */
    case PORT_OP_RECV:
        /* A receive parked for a buffer has no I/O to cancel: finish it here. */
        if (port__bufpool_cancel(&p->pool, &o->bufwait)) {
            post_imm(p, target, PORT_ECANCELED);
            return 0;
        }
        break;
    default:
        break;
    }
    /* Ask the kernel; the operation's packet comes either way.  ERROR_NOT_FOUND means it
     * finished already (or a receive is between two I/Os: its re-arm sees the flag). */
    port_spin_lock(&o->lock);
    CancelIoEx((HANDLE)target->sock, &target->ov);
    port_spin_unlock(&o->lock);
    return 0;
}

/* ---- completions ------------------------------------------------------------------------ */

/* The zero-byte WSARecv of `op` completed successfully: read what arrived. */
static int recv_ready(iocp_port_t *p, port_op_t *op, port_cqe_t *out, int n) {
    iocp_op_t *o = OP_PRIV(op);
    port_cqe_t c;
    uint32_t id = 0;
    char *buf = NULL;
    int got, r, e = 0;

    /* A buffer, or (every buffer with the dispatchers) park until one comes back, in
     * arrival order (one woken that lost its buffer to another receive stays the
     * oldest); a receive cancelled meanwhile is not parked but ends here. */
    got = port__bufpool_get(&p->pool, &o->bufwait, &op->cancel_requested, &id, &buf);
    if (got == 0)
        return n;
    if (got < 0)
        return port__deliver_final(&p->base, out, n, op, got);
    /* Under the op lock: a caller that cancels then closes waits for us here. */
    port_spin_lock(&o->lock);
    if (port_atomic_load32(&op->cancel_requested)) {
        r = -1;
        e = WSA_OPERATION_ABORTED;
    } else {
        r = recv(op->sock, buf, (int)p->pool.size, 0);
        if (r < 0)
            e = WSAGetLastError();
    }
    port_spin_unlock(&o->lock);
    if (r > 0) {
        c.op = op;
        c.res = r;
        c.flags = PORT_CQE_BUFFER;
        c.buf_id = id;
        c.buf = buf;
        port_atomic_add64(&p->base.recv_buffers_out, 1);
        port__completed(&p->base, op);
        return port__deliver(&p->base, out, out, n, &c);
    }
    iocp_recv_release(&p->base, id, NULL);
    if (r < 0 && e == WSAEWOULDBLOCK) {
        arm_recv(p, op);   /* nothing there after all */
        return n;
    }
    return port__deliver_final(&p->base, out, n, op,
                               r == 0 ? 0 : fail_res(op, port_err_from_os(e)));
}

/* Turn one dequeued packet into at most one completion; returns the new batch size. */
static int handle_entry(iocp_port_t *p, const OVERLAPPED_ENTRY *ent, port_cqe_t *out, int n) {
    port_op_t *op = (port_op_t *)(void *)ent->lpOverlapped;
    iocp_op_t *o;
    int64_t res;
    int rc;

    if (ent->lpCompletionKey == KEY_WAKE || op == NULL) {
        port_atomic_store32(&p->wake_pending, 0);
        return n;
    }
    o = OP_PRIV(op);
    if (ent->lpCompletionKey == KEY_IMM) {
        if (op->type == PORT_OP_RECV)   /* cancelled before it could take its buffer */
            pool_wake(p, port__bufpool_pass(&p->pool, &o->bufwait));
        return port__deliver_final(&p->base, out, n, op, o->imm_res);
    }
    rc = port__win_status((LONG)op->ov.Internal);
    switch (op->type) {
    case PORT_OP_RECV:
        if (rc == 0)
            return recv_ready(p, op, out, n);
        pool_wake(p, port__bufpool_pass(&p->pool, &o->bufwait));
        res = fail_res(op, rc);
        break;
    case PORT_OP_SEND:
        free(o->u2.heap_bufs);
        o->u2.heap_bufs = NULL;
        res = rc == 0 ? (int64_t)ent->dwNumberOfBytesTransferred : fail_res(op, rc);
        break;
    case PORT_OP_ACCEPT: {
        SOCKET as = o->u2.accept_sock, ls = op->sock;
        o->u2.accept_sock = INVALID_SOCKET;
        /* Give the new socket the listener's properties: without this Windows refuses
         * getpeername, shutdown and more on it (Wine does not care). */
        if (rc == 0 && setsockopt(as, SOL_SOCKET, SO_UPDATE_ACCEPT_CONTEXT, (const char *)&ls,
                                  (int)sizeof(ls)) != 0)
            rc = port_err_from_os(WSAGetLastError());
        if (rc == 0)
            rc = port__win_nonblock(as);
        if (rc == 0) {
            /* port.h: accepted sockets have TCP_NODELAY (set here: Windows does not document
             * passing it on from the listener). */
            BOOL one = TRUE;
            (void)setsockopt(as, IPPROTO_TCP, TCP_NODELAY, (const char *)&one, sizeof(one));
            res = (int64_t)as;
        } else {
            closesocket(as);
            res = fail_res(op, rc);
        }
        break;
    }
    case PORT_OP_CONNECT:
        if (rc == 0 &&
            setsockopt(op->sock, SOL_SOCKET, SO_UPDATE_CONNECT_CONTEXT, NULL, 0) != 0)
            rc = port_err_from_os(WSAGetLastError());
        res = rc == 0 ? 0 : fail_res(op, rc);
        break;
    default:
        res = rc == 0 ? (int64_t)ent->dwNumberOfBytesTransferred : rc;
        break;
    }
    return port__deliver_final(&p->base, out, n, op, res);
}

static int iocp_wait(port_t *bp, port_cqe_t *out, int max, int timeout_ms) {
    iocp_port_t *p = (iocp_port_t *)bp;
    int64_t deadline = 0;
    int n = 0, err = 0;

    if (max <= 0)
        return PORT_EINVAL;
    if (port_atomic_load32(&p->base.closed))
        return PORT_ECLOSED;
    if (timeout_ms > 0)
        deadline = now_us(p) + (int64_t)timeout_ms * 1000;

    /* Become the leader, or sleep until the leader leaves (see the top).  Whoever
     * leaves wakes one sleeper, so while anyone waits there is a leader. */
    AcquireSRWLockExclusive(&p->lead_lock);
    while (p->leading) {
        DWORD ms = INFINITE;
        if (port_atomic_load32(&p->base.closed) || timeout_ms == 0) {
            ReleaseSRWLockExclusive(&p->lead_lock);
            return port_atomic_load32(&p->base.closed) ? PORT_ECLOSED : 0;
        }
        if (timeout_ms > 0) {
            int64_t left = deadline - now_us(p);
            if (left <= 0) {
                ReleaseSRWLockExclusive(&p->lead_lock);
                return 0;
            }
            ms = ms_ceil(left);
        }
        SleepConditionVariableSRW(&p->lead_cv, &p->lead_lock, ms, 0);
    }
    if (port_atomic_load32(&p->base.closed)) {
        WakeConditionVariable(&p->lead_cv);
        ReleaseSRWLockExclusive(&p->lead_lock);
        return PORT_ECLOSED;
    }
    p->leading = 1;
    ReleaseSRWLockExclusive(&p->lead_lock);

    for (;;) {
        OVERLAPPED_ENTRY ent[ENTRIES_MAX];
        ULONG got = 0, i;
        DWORD ms;
        int64_t now, until;

        if (port_atomic_load32(&p->base.closed))
            break;
        now = now_us(p);
        until = port__timers_next(&p->timers);
        if (timeout_ms == 0)
            ms = 0;
        else {
            if (timeout_ms > 0 && deadline < until)
                until = deadline;
            ms = until == INT64_MAX ? INFINITE : ms_ceil(until - now);
        }
        if (!GetQueuedCompletionStatusEx(p->iocp, ent, (ULONG)(max < ENTRIES_MAX ? max : ENTRIES_MAX),
                                         &got, ms, FALSE)) {
            DWORD e = GetLastError();
            got = 0;
            if (e != WAIT_TIMEOUT) {
                err = port_err_from_os((int)e);
                if (err == PORT_EUNKNOWN || err == PORT_EBADF)
                    err = PORT_ECLOSED;   /* the port's handle is gone */
            }
        }
        port_atomic_add64(&p->base.waits, 1);
        for (i = 0; i < got; i++)
            n = handle_entry(p, &ent[i], out, n);
        n = port__timers_run(&p->timers, &p->base, now_us(p), out, n, max);
        if (n > 0 || err != 0 || timeout_ms == 0)
            break;
        if (timeout_ms > 0 && now_us(p) >= deadline)
            break;
    }

    AcquireSRWLockExclusive(&p->lead_lock);
    p->leading = 0;
    WakeConditionVariable(&p->lead_cv);
    ReleaseSRWLockExclusive(&p->lead_lock);
    return port__wait_result(&p->base, n, err);
}

static void iocp_batch_end(port_t *bp) {
    PORT_UNUSED(bp);   /* every submission is its own system call here: nothing deferred */
}

/* ---- sockets ---------------------------------------------------------------------------- */

static int iocp_listen(port_t *bp, const port_addr_t *addr, int backlog, int flags,
                       port_sock_t *out) {
    iocp_port_t *p = (iocp_port_t *)bp;
    SOCKET s;
    int rc = port__win_listen_socket(addr, backlog, flags, &s);
    if (rc != 0)
        return rc;
    /* AcceptEx completes through the listener's association. */
    if (CreateIoCompletionPort((HANDLE)s, p->iocp, KEY_IO, 0) == NULL) {
        rc = port_err_from_os((int)GetLastError());
        closesocket(s);
        return rc;
    }
    *out = s;
    return 0;
}

static int iocp_sock_close(port_t *bp, port_sock_t s, int flags) {
    PORT_UNUSED(bp);
    return port__win_close(s, flags);
}

/* ---- setup ------------------------------------------------------------------------------ */

static void iocp_free(iocp_port_t *p) {
    if (p->iocp != NULL)
        CloseHandle(p->iocp);
    port__bufpool_destroy(&p->pool);
    port__timers_destroy(&p->timers);
    free(p);
}

static int iocp_probe(char *errbuf, size_t errlen) {
    HANDLE h;
    int rc = port__win_init();
    if (rc != 0) {
        port__set_err(errbuf, errlen,
                      "iocp: Winsock start-up or AcceptEx/ConnectEx lookup failed (%s)",
                      port_errname(rc));
        return rc == PORT_EUNAVAIL ? rc : PORT_EUNAVAIL;
    }
    h = CreateIoCompletionPort(INVALID_HANDLE_VALUE, NULL, 0, 0);
    if (h == NULL) {
        port__set_err(errbuf, errlen, "iocp: CreateIoCompletionPort failed: error %lu",
                      (unsigned long)GetLastError());
        return PORT_EUNAVAIL;
    }
    CloseHandle(h);
    return 0;
}

static int iocp_create(port_t **out, const port_options_t *opts, char *errbuf, size_t errlen) {
    iocp_port_t *p;
    int rc;

    *out = NULL;
    rc = iocp_probe(errbuf, errlen);
    if (rc != 0)
        return rc;
    p = (iocp_port_t *)calloc(1, sizeof(*p));
    if (p == NULL)
        return PORT_ENOMEM;
    port__init_common(&p->base, &port__iocp_vtable, opts);
    QueryPerformanceFrequency(&p->qpc_freq);
    InitializeSRWLock(&p->lead_lock);
    InitializeConditionVariable(&p->lead_cv);
    port__timers_init(&p->timers, offsetof(port_op_t, priv) + offsetof(iocp_op_t, u.timer));
    /* Concurrency 0: one running thread per CPU (see the top on what it means here). */
    p->iocp = CreateIoCompletionPort(INVALID_HANDLE_VALUE, NULL, 0, 0);
    if (p->iocp == NULL) {
        port__set_err(errbuf, errlen, "iocp: CreateIoCompletionPort failed: error %lu",
                      (unsigned long)GetLastError());
        rc = port_err_from_os((int)GetLastError());
        goto fail;
    }
    rc = port__bufpool_init(&p->pool, &p->base, "iocp", errbuf, errlen);
    if (rc != 0)
        goto fail;
    *out = &p->base;
    return 0;
fail:
    iocp_free(p);
    return rc;
}

static void iocp_shutdown(port_t *bp) {
    iocp_port_t *p = (iocp_port_t *)bp;
    if (port_atomic_xchg32(&p->base.closed, 1))
        return;
    /* The leader sleeps in the kernel: a packet wakes it.  The others sleep on the
     * condition variable: the lock makes sure none misses the broadcast. */
    post_wake(p);
    AcquireSRWLockExclusive(&p->lead_lock);
    WakeAllConditionVariable(&p->lead_cv);
    ReleaseSRWLockExclusive(&p->lead_lock);
}

static void iocp_destroy(port_t *bp) {
    iocp_port_t *p = (iocp_port_t *)bp;
    port_atomic_store32(&p->base.closed, 1);
    iocp_free(p);
}

/* A free buffer is the pool's alone (a receive takes one only once its zero-byte
 * WSARecv says data is there), so it may go at once. */
static int64_t iocp_pool_trim(port_t *bp, int64_t keep, int *more) {
    PORT_UNUSED(more);
    return port__bufpool_trim(&((iocp_port_t *)bp)->pool, keep);
}

const port_vtable_t port__iocp_vtable = {
    "iocp",
    iocp_probe,
    iocp_create,
    iocp_shutdown,
    iocp_destroy,
    iocp_wait,
    iocp_batch_end,
    iocp_accept,
    iocp_connect,
    iocp_recv,
    iocp_recv_release,
    iocp_send,
    iocp_close,
    iocp_cancel,
    iocp_post,
    iocp_timer,
    iocp_listen,
    iocp_sock_close,
    NULL,   /* send_now: every send is an overlapped WSASend here */
    NULL,   /* flush_sends: nothing is deferred */
    NULL,   /* accept_peer */
    NULL,   /* stop_listener: CancelIoEx names its overlapped */
    NULL,   /* work_waiting */
    NULL,   /* buffers_out: counted */
    NULL,   /* accept_multishot: AcceptEx takes one socket made ahead per call */
    iocp_pool_trim,
};
#endif /* _WIN32 */
