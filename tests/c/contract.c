/*
 * contract.c -- the contract of port.h, written once and run against every backend.
 *
 *   contract [BACKEND [CASES]]     BACKEND: io_uring, epoll, iocp (default: $IOCPNET_BACKEND,
 *                                  else the build's best); CASES: run only these
 *                                  (comma-separated).  CONTRACT_SKIP=a,b skips cases,
 *                                  CONTRACT_VERBOSE=1 prints what cases measured.
 *
 * Each case drives the port the way the Cython core will (ops embedded in the caller's
 * records, batches from port_wait, strands released with port_strand_next) and uses plain
 * BSD sockets / Winsock for the peers.  It prints one line per case and a summary
 *
 *   contract[<backend>]: N passed, M failed
 *
 * and exits 0 only when nothing failed (77 when the backend cannot run on this machine).
 * A watchdog aborts the whole run after CONTRACT_WATCHDOG seconds (default 60), so a
 * backend that loses a completion fails instead of hanging; every wait inside the cases
 * has its own timeout too, so one lost completion fails one case, not the run.
 *
 * Portable C: gcc on Linux, x86_64-w64-mingw32-gcc for Windows (run under Wine or on
 * Windows).  Threads, clocks, sleeps and atomics have small wrappers below.
 */
#include "port.h"
#include "port_int.h"   /* port__strand_idle: a strand's state is private to the port */

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#ifdef _WIN32
#  include <process.h>
typedef HANDLE thr_t;
typedef int sock_len_t;
#  define plain_closesocket closesocket
#else
#  include <arpa/inet.h>
#  include <errno.h>
#  include <netinet/tcp.h>
#  include <poll.h>
#  include <pthread.h>
#  include <sched.h>
#  include <signal.h>
#  include <time.h>
#  include <unistd.h>
typedef pthread_t thr_t;
typedef socklen_t sock_len_t;
#  define plain_closesocket close
#endif

/* ---- small platform layer ------------------------------------------------------------ */

#if defined(_MSC_VER)
#  include <intrin.h>
#  define A_LOAD(p) _InterlockedCompareExchange((volatile long *)(p), 0, 0)
#  define A_STORE(p, v) _InterlockedExchange((volatile long *)(p), (v))
#  define A_ADD(p, v) (_InterlockedExchangeAdd((volatile long *)(p), (v)) + (v))
#  define A_XCHG(p, v) _InterlockedExchange((volatile long *)(p), (v))
#else
#  define A_LOAD(p) __atomic_load_n((p), __ATOMIC_SEQ_CST)
#  define A_STORE(p, v) __atomic_store_n((p), (v), __ATOMIC_SEQ_CST)
#  define A_ADD(p, v) __atomic_add_fetch((p), (v), __ATOMIC_SEQ_CST)
#  define A_XCHG(p, v) __atomic_exchange_n((p), (v), __ATOMIC_SEQ_CST)
#endif

typedef void (*thr_fn)(void *);
typedef struct thr_start_args {
    thr_fn fn;
    void *arg;
} thr_start_args;

#ifdef _WIN32
static unsigned __stdcall thr_trampoline(void *a) {
    thr_start_args s = *(thr_start_args *)a;
    free(a);
    s.fn(s.arg);
    return 0;
}
#else
static void *thr_trampoline(void *a) {
    thr_start_args s = *(thr_start_args *)a;
    free(a);
    s.fn(s.arg);
    return NULL;
}
#endif

static int thr_start(thr_t *t, thr_fn fn, void *arg) {
    thr_start_args *a = (thr_start_args *)malloc(sizeof(*a));
    if (a == NULL)
        return -1;
    a->fn = fn;
    a->arg = arg;
#ifdef _WIN32
    *t = (HANDLE)_beginthreadex(NULL, 0, thr_trampoline, a, 0, NULL);
    if (*t == 0) {
        free(a);
        return -1;
    }
#else
    if (pthread_create(t, NULL, thr_trampoline, a) != 0) {
        free(a);
        return -1;
    }
#endif
    return 0;
}

static void thr_join(thr_t t) {
#ifdef _WIN32
    WaitForSingleObject(t, INFINITE);
    CloseHandle(t);
#else
    pthread_join(t, NULL);
#endif
}

static void sleep_ms(int ms) {
#ifdef _WIN32
    Sleep((DWORD)ms);
#else
    struct timespec ts;
    ts.tv_sec = ms / 1000;
    ts.tv_nsec = (long)(ms % 1000) * 1000000L;
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR) {
    }
#endif
}

static void yield_now(void) {
#ifdef _WIN32
    SwitchToThread();
#else
    sched_yield();
#endif
}

/* Milliseconds of a monotonic clock, with a fraction. */
static double now_ms(void) {
#ifdef _WIN32
    static LARGE_INTEGER freq;
    LARGE_INTEGER c;
    if (freq.QuadPart == 0)
        QueryPerformanceFrequency(&freq);
    QueryPerformanceCounter(&c);
    return (double)c.QuadPart * 1000.0 / (double)freq.QuadPart;
#else
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec * 1000.0 + (double)ts.tv_nsec / 1e6;
#endif
}

/* A mutex for the harness's own bookkeeping (failure messages from worker threads). */
#ifdef _WIN32
static SRWLOCK g_lock = SRWLOCK_INIT;
#  define HLOCK() AcquireSRWLockExclusive(&g_lock)
#  define HUNLOCK() ReleaseSRWLockExclusive(&g_lock)
#else
static pthread_mutex_t g_lock = PTHREAD_MUTEX_INITIALIZER;
#  define HLOCK() pthread_mutex_lock(&g_lock)
#  define HUNLOCK() pthread_mutex_unlock(&g_lock)
#endif

/* ---- the harness ---------------------------------------------------------------------- */

static const char *g_backend;
static const char *volatile g_case_name = "(setup)";
static volatile long g_case_failures;
static long g_checks;

static void check_failed(const char *file, int line, const char *expr, const char *fmt, ...) {
    va_list ap;
    HLOCK();
    fprintf(stderr, "%s:%d: [%s/%s] CHECK failed: %s", file, line, g_backend, g_case_name, expr);
    if (fmt != NULL && fmt[0] != '\0') {
        fputs(" -- ", stderr);
        va_start(ap, fmt);
        vfprintf(stderr, fmt, ap);
        va_end(ap);
    }
    fputc('\n', stderr);
    fflush(stderr);
    HUNLOCK();
    A_ADD(&g_case_failures, 1);
}

/* CHECK records a failure and goes on; REQUIRE also leaves the case (goto done). */
#define CHECK(cond)                                                              \
    do {                                                                         \
        A_ADD(&g_checks, 1);                                                     \
        if (!(cond))                                                             \
            check_failed(__FILE__, __LINE__, #cond, NULL);                       \
    } while (0)
#define CHECKF(cond, ...)                                                        \
    do {                                                                         \
        A_ADD(&g_checks, 1);                                                     \
        if (!(cond))                                                             \
            check_failed(__FILE__, __LINE__, #cond, __VA_ARGS__);                \
    } while (0)
#define CHECK_EQ(a, b)                                                           \
    do {                                                                         \
        long long a_ = (long long)(a), b_ = (long long)(b);                      \
        A_ADD(&g_checks, 1);                                                     \
        if (a_ != b_)                                                            \
            check_failed(__FILE__, __LINE__, #a " == " #b, "%lld != %lld%s%s",   \
                         a_, b_, a_ < 0 ? " " : "", a_ < 0 ? port_errname((int)a_) : ""); \
    } while (0)
#define REQUIRE(cond)                                                            \
    do {                                                                         \
        A_ADD(&g_checks, 1);                                                     \
        if (!(cond)) {                                                           \
            check_failed(__FILE__, __LINE__, #cond, "(case stops here)");        \
            goto done;                                                           \
        }                                                                        \
    } while (0)
#define REQUIREF(cond, ...)                                                      \
    do {                                                                         \
        A_ADD(&g_checks, 1);                                                     \
        if (!(cond)) {                                                           \
            check_failed(__FILE__, __LINE__, #cond, __VA_ARGS__);                \
            goto done;                                                           \
        }                                                                        \
    } while (0)

static void note(const char *fmt, ...) {
    va_list ap;
    if (getenv("CONTRACT_VERBOSE") == NULL)
        return;
    HLOCK();
    fprintf(stderr, "    [%s] ", g_case_name);
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputc('\n', stderr);
    HUNLOCK();
}

/* ---- watchdog ------------------------------------------------------------------------- */

static int g_watchdog_s = 60;

static void watchdog_fire(void) {
    char msg[256];
    int len = snprintf(msg, sizeof(msg),
                       "contract[%s]: WATCHDOG: still running after %d s (in case %s); aborting\n",
                       g_backend, g_watchdog_s, g_case_name);
#ifdef _WIN32
    fwrite(msg, 1, (size_t)len, stderr);
    fflush(stderr);
    ExitProcess(124);
#else
    if (write(2, msg, (size_t)len) < 0) {
    }
    _exit(124);
#endif
}

#ifdef _WIN32
static void watchdog_thread(void *arg) {
    (void)arg;
    Sleep((DWORD)g_watchdog_s * 1000);
    watchdog_fire();
}
static void watchdog_start(void) {
    thr_t t;
    if (thr_start(&t, watchdog_thread, NULL) == 0)
        CloseHandle(t);
}
#else
static void on_alarm(int sig) {
    (void)sig;
    watchdog_fire();
}
static void watchdog_start(void) {
    signal(SIGALRM, on_alarm);
    alarm((unsigned)g_watchdog_s);
}
#endif

/* ---- plain sockets for the peers ------------------------------------------------------ */

static void plain_set_timeout(port_sock_t s, int ms) {
#ifdef _WIN32
    DWORD t = (DWORD)ms;
    setsockopt(s, SOL_SOCKET, SO_RCVTIMEO, (const char *)&t, sizeof(t));
    setsockopt(s, SOL_SOCKET, SO_SNDTIMEO, (const char *)&t, sizeof(t));
#else
    struct timeval tv;
    tv.tv_sec = ms / 1000;
    tv.tv_usec = (ms % 1000) * 1000;
    setsockopt(s, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
    setsockopt(s, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
#endif
}

static void plain_close(port_sock_t s) {
    if (s != PORT_INVALID_SOCK)
        plain_closesocket(s);
}

/* Abortive close: the peer sees a reset. */
static void plain_reset_close(port_sock_t s) {
    struct linger lg;
    lg.l_onoff = 1;
    lg.l_linger = 0;
    setsockopt(s, SOL_SOCKET, SO_LINGER, (const char *)&lg, sizeof(lg));
    plain_closesocket(s);
}

/* EINTR from a plain call: the io_uring backend's task work interrupts blocking socket
 * calls of the thread that submitted (the kernel notifies it like a signal), so blocking
 * peers in the test retry, as Python's socket module does (PEP 475). */
static int plain_eintr(void) {
#ifdef _WIN32
    return WSAGetLastError() == WSAEINTR;
#else
    return errno == EINTR;
#endif
}

static port_sock_t plain_connect(const port_addr_t *a) {
    port_sock_t s = socket(a->ss.ss_family, SOCK_STREAM, IPPROTO_TCP);
    if (s == PORT_INVALID_SOCK)
        return s;
    if (connect(s, (const struct sockaddr *)&a->ss, (sock_len_t)a->len) != 0) {
#ifndef _WIN32
        /* Interrupted: the connection goes on; wait for it and read its outcome. */
        if (errno == EINTR) {
            struct pollfd pfd;
            int e = 0, r;
            socklen_t el = sizeof(e);
            pfd.fd = s;
            pfd.events = POLLOUT;
            do
                r = poll(&pfd, 1, 10000);
            while (r < 0 && errno == EINTR);
            if (r == 1 && getsockopt(s, SOL_SOCKET, SO_ERROR, &e, &el) == 0 && e == 0) {
                plain_set_timeout(s, 10000);
                return s;
            }
        }
#endif
        plain_closesocket(s);
        return PORT_INVALID_SOCK;
    }
    plain_set_timeout(s, 10000);
    return s;
}

/* A plain listener on 127.0.0.1, any port; *bound gets its address. */
static port_sock_t plain_listen(port_addr_t *bound) {
    struct sockaddr_in a;
    sock_len_t len = sizeof(bound->ss);
    port_sock_t s = socket(AF_INET, SOCK_STREAM, IPPROTO_TCP);
    if (s == PORT_INVALID_SOCK)
        return s;
    memset(&a, 0, sizeof(a));
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(0x7f000001);
    if (bind(s, (struct sockaddr *)&a, sizeof(a)) != 0 || listen(s, 16) != 0 ||
        getsockname(s, (struct sockaddr *)&bound->ss, &len) != 0) {
        plain_closesocket(s);
        return PORT_INVALID_SOCK;
    }
    bound->len = (int)len;
    return s;
}

/* accept() that gives up after ms (so a backend that never connects fails, not hangs). */
static port_sock_t plain_accept(port_sock_t l, int ms) {
    fd_set rd;
    struct timeval tv;
    port_sock_t s;
    FD_ZERO(&rd);
    FD_SET(l, &rd);
    tv.tv_sec = ms / 1000;
    tv.tv_usec = (ms % 1000) * 1000;
    if (select((int)l + 1, &rd, NULL, NULL, &tv) <= 0)
        return PORT_INVALID_SOCK;
    do
        s = accept(l, NULL, NULL);
    while (s == PORT_INVALID_SOCK && plain_eintr());
    if (s != PORT_INVALID_SOCK)
        plain_set_timeout(s, 10000);
    return s;
}

static int plain_send_all(port_sock_t s, const char *b, size_t len) {
    size_t off = 0;
    while (off < len) {
        size_t chunk = len - off > 65536 ? 65536 : len - off;
        int r = (int)send(s, b + off, (int)chunk, 0);
        if (r < 0 && plain_eintr())
            continue;
        if (r <= 0)
            return -1;
        off += (size_t)r;
    }
    return 0;
}

/* Read exactly len bytes (fewer only on EOF, error or timeout): returns bytes read. */
static size_t plain_recv_all(port_sock_t s, char *b, size_t len) {
    size_t off = 0;
    while (off < len) {
        size_t chunk = len - off > 65536 ? 65536 : len - off;
        int r = (int)recv(s, b + off, (int)chunk, 0);
        if (r < 0 && plain_eintr())
            continue;
        if (r <= 0)
            break;
        off += (size_t)r;
    }
    return off;
}

static int addr_port(const port_addr_t *a) {
    char host[64];
    int pn = -1;
    if (port_addr_format(a, host, sizeof(host), &pn) != 0)
        return -1;
    return pn;
}

/* ---- port helpers --------------------------------------------------------------------- */

/* CONTRACT_RECV_MULTISHOT=1 asks for PORT_OPT_RECV_MULTISHOT (io_uring and epoll honour
 * it; IOCP's receives stay one-shot, which the cases accept in that mode). */
static int g_multishot;

static port_t *new_port_opts(const port_options_t *given) {
    port_t *p = NULL;
    char err[256] = "";
    port_options_t opts;
    int rc;
    memset(&opts, 0, sizeof(opts));
    if (given != NULL)
        opts = *given;
    if (g_multishot)
        opts.flags |= PORT_OPT_RECV_MULTISHOT;
    rc = port_create(&p, g_backend, &opts, err, sizeof(err));
    CHECKF(rc == 0 && p != NULL, "port_create(%s): %s: %s", g_backend, port_errname(rc), err);
    if (p != NULL)
        CHECKF(strcmp(port_backend(p), g_backend) == 0, "backend %s", port_backend(p));
    return p;
}
static port_t *new_port(void) { return new_port_opts(NULL); }

/* Every case ends here: nothing may be left in flight or held. */
static void end_port(port_t *p) {
    port_stats_t st;
    if (p == NULL)
        return;
    port_get_stats(p, &st);
    CHECKF(st.in_flight == 0, "in_flight %lld at end of case (submitted %llu, completed %llu)",
           (long long)st.in_flight, (unsigned long long)st.submitted,
           (unsigned long long)st.completed);
    CHECKF(st.recv_buffers_out == 0, "recv_buffers_out %llu at end of case",
           (unsigned long long)st.recv_buffers_out);
    CHECKF(st.recv_waiting == 0, "recv_waiting %llu at end of case",
           (unsigned long long)st.recv_waiting);
    port_shutdown(p);
    port_destroy(p);
}

/* A receive is ARMED (in op->user_flags, which port.h leaves to the caller) from its
 * port_recv until the caller has taken its final completion: in_flight alone cannot
 * tell, because a final completion sitting in a batch has already cleared it. */
#define ARMED 0x1u

static int recv_post(port_t *p, port_op_t *rv, port_sock_t sock) {
    int rc = port_recv(p, rv, sock);
    if (rc == 0)
        rv->user_flags |= ARMED;
    return rc;
}

static void recv_consumed(const port_cqe_t *c) {
    if (c->op->type == PORT_OP_RECV && !(c->flags & PORT_CQE_MORE))
        c->op->user_flags &= (uint16_t)~ARMED;
}

/* One thread's view of the completions: port_wait batches, handed out one at a time.
 * Submissions made while holding completions are not deferred (port_batch_end), because
 * the single-threaded cases block on plain sockets right after submitting. */
typedef struct waiter {
    port_t *p;
    port_cqe_t q[64];
    int head, n;
    int batches;        /* port_wait calls that returned completions */
} waiter_t;

static void waiter_init(waiter_t *w, port_t *p) {
    memset(w, 0, sizeof(*w));
    w->p = p;
}

/* 1: *out holds the next completion; 0: none within timeout_ms; < 0: a port error. */
static int next_cqe(waiter_t *w, port_cqe_t *out, int timeout_ms) {
    double deadline = now_ms() + timeout_ms;
    while (w->n == 0) {
        int left = (int)(deadline - now_ms() + 0.999);
        int rc;
        if (left < 0)
            left = 0;
        rc = port_wait(w->p, w->q, 64, left);
        port_batch_end(w->p);
        if (rc == PORT_EINTR)
            continue;
        if (rc < 0)
            return rc;
        if (rc == 0 && now_ms() >= deadline)
            return 0;
        w->head = 0;
        w->n = rc;
        w->batches++;
    }
    *out = w->q[w->head++];
    w->n--;
    recv_consumed(out);
    return 1;
}

/* The next completion, which must be for `op`; fails the check otherwise. */
static int expect_cqe(waiter_t *w, port_op_t *op, port_cqe_t *out, int timeout_ms,
                      const char *what) {
    int rc = next_cqe(w, out, timeout_ms);
    CHECKF(rc == 1, "%s: no completion within %d ms (rc %d)", what, timeout_ms, rc);
    if (rc != 1)
        return 0;
    CHECKF(out->op == op, "%s: completion for another op (type %d, res %lld)", what,
           out->op ? out->op->type : -1, (long long)out->res);
    return out->op == op;
}

/* Nothing may complete within ms. */
static void expect_quiet(waiter_t *w, int ms, const char *what) {
    port_cqe_t c;
    int rc = next_cqe(w, &c, ms);
    CHECKF(rc == 0, "%s: unexpected completion (type %d, res %lld %s)", what,
           rc == 1 && c.op ? c.op->type : -1, rc == 1 ? (long long)c.res : (long long)rc,
           rc == 1 && c.res < 0 ? port_errname((int)c.res) : "");
    if (rc == 1 && (c.flags & PORT_CQE_BUFFER))
        port_recv_release(w->p, &c);
}

static int loopback(port_addr_t *a) { return port_resolve("127.0.0.1", 0, 1, a); }

/* A listener on loopback (*ls, its address *bound) with n accepts posted on it, as the
 * Listener keeps them.  0, or -1 if the listener could not be made. */
static int listen_with_accepts(port_t *P, port_op_t *acc, int n, port_sock_t *ls,
                               port_addr_t *bound) {
    port_addr_t a;
    int i;
    if (loopback(&a) != 0 || port_listen(P, &a, 16, 0, ls) != 0 ||
            port_sockname(*ls, bound) != 0)
        return -1;
    for (i = 0; i < n; i++) {
        port_op_init(&acc[i], PORT_OP_ACCEPT, &acc[i], NULL);
        CHECK_EQ(port_accept(P, &acc[i], *ls), 0);
        CHECK(acc[i].in_flight);
    }
    return 0;
}

/* A connected pair: *srv accepted through the port, *cli a plain socket. */
static int make_pair(waiter_t *w, port_sock_t *srv, port_sock_t *cli) {
    port_addr_t a, bound;
    port_sock_t ls = PORT_INVALID_SOCK;
    port_op_t acc;
    port_cqe_t c;
    int ok = 0;
    *srv = *cli = PORT_INVALID_SOCK;
    if (loopback(&a) != 0 || port_listen(w->p, &a, 16, 0, &ls) != 0 ||
        port_sockname(ls, &bound) != 0) {
        CHECKF(0, "make_pair: cannot listen on 127.0.0.1");
        goto out;
    }
    port_op_init(&acc, PORT_OP_ACCEPT, NULL, NULL);
    if (port_accept(w->p, &acc, ls) != 0) {
        CHECKF(0, "make_pair: port_accept failed");
        goto out;
    }
    *cli = plain_connect(&bound);
    CHECKF(*cli != PORT_INVALID_SOCK, "make_pair: plain connect failed");
    if (!expect_cqe(w, &acc, &c, 5000, "make_pair accept"))
        goto out;
    CHECKF(c.res >= 0, "make_pair: accept res %lld %s", (long long)c.res,
           c.res < 0 ? port_errname((int)c.res) : "");
    if (c.res >= 0 && *cli != PORT_INVALID_SOCK) {
        *srv = (port_sock_t)c.res;
        ok = 1;
    }
out:
    if (ls != PORT_INVALID_SOCK)
        port_sock_close(w->p, ls, 0);
    if (!ok) {
        plain_close(*cli);
        *cli = PORT_INVALID_SOCK;
    }
    return ok;
}

/* Close a port socket through a close operation and check its completion. */
static void close_op(waiter_t *w, port_sock_t s, int flags) {
    port_op_t cl;
    port_cqe_t c;
    port_op_init(&cl, PORT_OP_CLOSE, NULL, NULL);
    CHECK_EQ(port_close(w->p, &cl, s, flags), 0);
    if (expect_cqe(w, &cl, &c, 5000, "close"))
        CHECK_EQ(c.res, 0);
}

/* Cancel an armed receive and drain it to its final completion, releasing buffers. */
static void cancel_recv(waiter_t *w, port_op_t *rv) {
    port_cqe_t c;
    if (!(rv->user_flags & ARMED))
        return;
    CHECK_EQ(port_cancel(w->p, rv), 0);
    for (;;) {
        if (!expect_cqe(w, rv, &c, 5000, "cancel recv"))
            return;
        port_recv_release(w->p, &c);
        if (!(c.flags & PORT_CQE_MORE))
            break;
    }
}

/* A data completion: it carries its buffer, and either ends the receive (one-shot, the
 * default: no PORT_CQE_MORE, the op is free again) or keeps it armed (multishot:
 * PORT_CQE_MORE, still in flight).  Single-threaded cases only (reads op->in_flight). */
static void check_data_cqe(const port_cqe_t *c) {
    CHECK(c->res > 0);
    CHECK(c->flags & PORT_CQE_BUFFER);
    CHECK(c->buf != NULL);
    if (!g_multishot)
        CHECKF(!(c->flags & PORT_CQE_MORE), "a one-shot receive completed with PORT_CQE_MORE");
    /* (With PORT_CQE_MORE the receive's final completion may already sit later in the
     * same batch, so in_flight says nothing then.) */
    if (!(c->flags & PORT_CQE_MORE))
        CHECKF(!c->op->in_flight, "a receive completed without PORT_CQE_MORE is still in flight");
}

/* The next completion of a receive on sock, posting it first unless it is armed. */
static int recv_next(waiter_t *w, port_op_t *rv, port_sock_t sock, port_cqe_t *c,
                     int timeout_ms, const char *what) {
    if (!(rv->user_flags & ARMED))
        CHECK_EQ(recv_post(w->p, rv, sock), 0);
    return expect_cqe(w, rv, c, timeout_ms, what);
}

static unsigned char pattern(size_t msg, size_t j) {
    return (unsigned char)(j * 7u + msg * 13u + (j >> 8) + (j >> 16));
}

/* ====================================================================================== */
/* Cases                                                                                  */
/* ====================================================================================== */

/* The end of an accept case: the clients, the sockets accepted for them, the listener. */
static void close_accepted(port_t *P, port_sock_t *cli, port_sock_t *srv, int n,
                           port_sock_t ls) {
    int i;
    for (i = 0; i < n; i++) {
        plain_close(cli[i]);
        if (srv[i] != PORT_INVALID_SOCK)
            port_sock_close(P, srv[i], 0);
    }
    if (ls != PORT_INVALID_SOCK)
        port_sock_close(P, ls, 0);
}

/* Several accepts posted up front (as the Listener does), each completing with its own
 * socket; the op record is reusable after its completion. */
static void case_accept_several(void) {
    enum { N = 4 };
    port_t *P = new_port();
    waiter_t w;
    port_addr_t bound;
    port_sock_t ls = PORT_INVALID_SOCK, cli[N + 1], srv[N + 1];
    port_op_t acc[N];
    int got[N] = {0}, matched[N + 1];
    int i, k;
    for (i = 0; i <= N; i++)
        cli[i] = srv[i] = PORT_INVALID_SOCK;
    REQUIRE(P != NULL);
    waiter_init(&w, P);
    REQUIRE(listen_with_accepts(P, acc, N, &ls, &bound) == 0);
    /* A record carries one operation at a time. */
    CHECK_EQ(port_accept(P, &acc[0], ls), PORT_EINVAL);
    {
        port_addr_t ap;      /* no address before the accept has completed */
        CHECK_EQ(port_accept_peer(P, &acc[0], &ap), PORT_EOPNOTSUPP);
    }
    for (i = 0; i < N; i++) {
        cli[i] = plain_connect(&bound);
        CHECK(cli[i] != PORT_INVALID_SOCK);
    }
    for (k = 0; k < N; k++) {
        port_cqe_t c;
        int rc = next_cqe(&w, &c, 5000);
        REQUIREF(rc == 1, "accept %d of %d: rc %d", k, N, rc);
        i = (int)(c.op - acc);
        REQUIREF(i >= 0 && i < N, "completion for an unknown op");
        CHECK(c.op->owner == &acc[i]);
        CHECKF(!got[i], "accept op %d completed twice", i);
        got[i] = 1;
        CHECKF(c.res >= 0, "accept res %lld %s", (long long)c.res, port_errname((int)c.res));
        CHECK(!(c.flags & PORT_CQE_MORE));
        CHECK(!acc[i].in_flight);
        srv[i] = c.res >= 0 ? (port_sock_t)c.res : PORT_INVALID_SOCK;
    }
    /* Each accepted socket is one of the clients: its peer is a client's local address. */
    for (i = 0; i <= N; i++)
        matched[i] = 0;
    for (i = 0; i < N; i++) {
        port_addr_t peer, local;
        char host[64];
        int pn = 0, j, found = 0;
        if (srv[i] == PORT_INVALID_SOCK)
            continue;
        CHECK_EQ(port_peername(srv[i], &peer), 0);
        CHECK_EQ(port_addr_format(&peer, host, sizeof(host), &pn), 0);
        CHECKF(strcmp(host, "127.0.0.1") == 0, "peer host %s", host);
        {
            /* The accept reported the same peer (where the backend keeps it), and the
             * socket has TCP_NODELAY (port.h). */
            port_addr_t ap;
            char ahost[64];
            int apn = 0, nd = 0, rc;
            sock_len_t ndlen = sizeof(nd);
            rc = port_accept_peer(P, &acc[i], &ap);
            CHECKF(rc == 0 || rc == PORT_EOPNOTSUPP, "port_accept_peer: %s", port_errname(rc));
#ifndef _WIN32
            CHECKF(rc == 0, "port_accept_peer: %s (POSIX backends keep it)", port_errname(rc));
#endif
            if (rc == 0) {
                CHECK_EQ(port_addr_format(&ap, ahost, sizeof(ahost), &apn), 0);
                CHECKF(strcmp(ahost, host) == 0 && apn == pn, "accept's peer %s:%d, "
                       "getpeername's %s:%d", ahost, apn, host, pn);
            }
            CHECK(getsockopt(srv[i], IPPROTO_TCP, TCP_NODELAY, (char *)&nd, &ndlen) == 0);
            CHECKF(nd != 0, "accepted socket %d without TCP_NODELAY", i);
        }
        CHECK_EQ(port_sockname(srv[i], &local), 0);
        CHECK_EQ(addr_port(&local), addr_port(&bound));
        for (j = 0; j < N; j++) {
            port_addr_t cl;
            if (cli[j] == PORT_INVALID_SOCK || port_sockname(cli[j], &cl) != 0)
                continue;
            if (addr_port(&cl) == pn) {
                CHECKF(!matched[j], "two accepted sockets for client %d", j);
                matched[j] = 1;
                found = 1;
            }
        }
        CHECKF(found, "accepted socket %d has no client (peer port %d)", i, pn);
    }
    /* Reuse a completed record for one more accept. */
    CHECK_EQ(port_accept(P, &acc[0], ls), 0);
    cli[N] = plain_connect(&bound);
    {
        port_cqe_t c;
        if (expect_cqe(&w, &acc[0], &c, 5000, "reused accept")) {
            CHECK(c.res >= 0);
            srv[N] = c.res >= 0 ? (port_sock_t)c.res : PORT_INVALID_SOCK;
        }
    }
    expect_quiet(&w, 20, "after accepts");
done:
    close_accepted(P, cli, srv, N + 1, ls);
    end_port(P);
}

/* port_stop_accepts: the accepts a closing Listener holds, ended together: each
 * completes once, cancelled; none stays in flight; nothing more completes. */
static void case_cancel_accepts(void) {
    enum { N = 64 };
    port_t *P = new_port();
    waiter_t w;
    port_addr_t bound;
    port_sock_t ls = PORT_INVALID_SOCK;
    static port_op_t acc[N];
    int got[N] = {0};
    int i, k;
    REQUIRE(P != NULL);
    waiter_init(&w, P);
    REQUIRE(listen_with_accepts(P, acc, N, &ls, &bound) == 0);
    CHECK_EQ(port_stop_accepts(P, acc, N, ls), 0);
    for (k = 0; k < N; k++) {
        port_cqe_t c;
        int rc = next_cqe(&w, &c, 5000);
        REQUIREF(rc == 1, "cancelled accept %d of %d: rc %d", k, N, rc);
        i = (int)(c.op - acc);
        REQUIREF(i >= 0 && i < N, "completion for an unknown op");
        CHECKF(!got[i], "accept op %d completed twice", i);
        got[i] = 1;
        CHECKF(c.res == PORT_ECANCELED, "accept %d: res %lld %s", i, (long long)c.res,
               port_errname((int)c.res));
        CHECK(!acc[i].in_flight);
    }
    /* Nothing in flight: a no-op. */
    CHECK_EQ(port_stop_accepts(P, acc, N, ls), 0);
    expect_quiet(&w, 50, "after the cancelled accepts");
done:
    if (ls != PORT_INVALID_SOCK)
        port_sock_close(P, ls, 0);
    end_port(P);
}

/* port_accept_multishot: one operation accepts every connection, each completion with
 * PORT_CQE_MORE while it stays armed, and port_stop_accepts ends it with one final
 * PORT_ECANCELED.  No address comes with it: port_peername gives it, also for a peer
 * that reset before its connection was looked at.  A backend without it says
 * PORT_EOPNOTSUPP and submits nothing (the caller posts port_accept instead); an op
 * with a strand is refused everywhere (its completions go to several threads). */
static void case_accept_multishot(void) {
    enum { N = 4 };
    port_t *P = new_port();
    waiter_t w;
    port_addr_t a, bound;
    port_sock_t ls = PORT_INVALID_SOCK, cli[N + 1], srv[N + 1];
    port_op_t m;
    port_strand_t st;
    port_cqe_t c;
    int i, j, rc;
    for (i = 0; i <= N; i++)
        cli[i] = srv[i] = PORT_INVALID_SOCK;
    REQUIRE(P != NULL);
    waiter_init(&w, P);
    REQUIRE(loopback(&a) == 0 && port_listen(P, &a, 16, 0, &ls) == 0 &&
            port_sockname(ls, &bound) == 0);
    port_strand_init(&st, NULL);
    port_op_init(&m, PORT_OP_ACCEPT, &m, &st);
    CHECK_EQ(port_accept_multishot(P, &m, ls), PORT_EINVAL);
    CHECK(!m.in_flight);
    port_op_init(&m, PORT_OP_ACCEPT, &m, NULL);
    rc = port_accept_multishot(P, &m, ls);
    if (strcmp(port_backend(P), "io_uring") != 0) {
        CHECKF(rc == PORT_EOPNOTSUPP, "%s: port_accept_multishot %s", port_backend(P),
               port_errname(rc));
    } else {
        CHECKF(rc == 0 || rc == PORT_EOPNOTSUPP, "port_accept_multishot %s",
               port_errname(rc));
    }
    if (rc != 0) {
        CHECK(!m.in_flight);
        expect_quiet(&w, 20, "a multishot accept the backend does not have");
        goto done;
    }
    CHECK(m.in_flight);
    CHECK_EQ(port_accept_multishot(P, &m, ls), PORT_EINVAL);   /* armed already */
    for (i = 0; i < N; i++) {
        cli[i] = plain_connect(&bound);
        CHECK(cli[i] != PORT_INVALID_SOCK);
    }
    for (i = 0; i < N; i++) {
        port_addr_t peer, ap;
        if (!expect_cqe(&w, &m, &c, 5000, "a multishot accept's connection"))
            goto done;
        CHECKF(c.res >= 0, "accept res %lld %s", (long long)c.res, port_errname((int)c.res));
        CHECK(c.flags & PORT_CQE_MORE);
        CHECK(m.in_flight);
        if (c.res < 0)
            continue;
        srv[i] = (port_sock_t)c.res;
        CHECK_EQ(port_accept_peer(P, &m, &ap), PORT_EOPNOTSUPP);
        CHECK_EQ(port_peername(srv[i], &peer), 0);
        for (j = 0; j < N; j++) {       /* one of the clients */
            port_addr_t cl;
            if (cli[j] != PORT_INVALID_SOCK && port_sockname(cli[j], &cl) == 0 &&
                    addr_port(&cl) == addr_port(&peer))
                break;
        }
        CHECKF(j < N, "accepted socket %d has no client (peer port %d)", i,
               addr_port(&peer));
    }
    /* A peer gone before its connection is looked at: its address is still known. */
    cli[N] = plain_connect(&bound);
    CHECK(cli[N] != PORT_INVALID_SOCK);
    if (expect_cqe(&w, &m, &c, 5000, "the connection of a peer that resets")) {
        port_addr_t cl;
        CHECK(c.flags & PORT_CQE_MORE);
        CHECK(c.res >= 0);
        if (c.res >= 0) {
            srv[N] = (port_sock_t)c.res;
            CHECK_EQ(port_sockname(cli[N], &cl), 0);
            plain_reset_close(cli[N]);
            cli[N] = PORT_INVALID_SOCK;
            sleep_ms(50);
#ifndef _WIN32
            {
                port_addr_t peer;
                CHECK_EQ(port_peername(srv[N], &peer), 0);
                CHECK_EQ(addr_port(&peer), addr_port(&cl));
            }
#endif
        }
    }
    expect_quiet(&w, 20, "an armed multishot accept with no connection");
    CHECK_EQ(port_stop_accepts(P, &m, 1, ls), 0);
    if (expect_cqe(&w, &m, &c, 5000, "the stopped multishot accept")) {
        CHECKF(c.res == PORT_ECANCELED, "res %lld %s", (long long)c.res,
               port_errname((int)c.res));
        CHECK(!(c.flags & PORT_CQE_MORE));
        CHECK(!m.in_flight);
    }
    expect_quiet(&w, 50, "after the stopped multishot accept");
done:
    close_accepted(P, cli, srv, N + 1, ls);
    end_port(P);
}

/* port_strand_claim: a strand held without a completion of its own (a multishot
 * accept's new session): what completes on it meanwhile waits for the claimer's
 * port_strand_next, in order; a strand held or with a queue cannot be claimed. */
static void case_strand_claim(void) {
    enum { N = 3 };
    port_t *P = new_port();
    waiter_t w;
    port_strand_t st;
    port_op_t post[N];
    port_cqe_t c;
    int i;
    REQUIRE(P != NULL);
    waiter_init(&w, P);
    port_strand_init(&st, &st);
    CHECK_EQ(port_strand_claim(&st), 0);
    CHECK_EQ(port_strand_claim(&st), PORT_EBUSY);
    for (i = 0; i < N; i++) {
        port_op_init(&post[i], PORT_OP_POST, &post[i], &st);
        CHECK_EQ(port_post(P, &post[i], i), 0);
    }
    expect_quiet(&w, 50, "posts to a claimed strand");
    for (i = 0; i < N; i++) {
        CHECKF(port_strand_next(P, &st, &c) == 1, "queued post %d", i);
        CHECK(c.op == &post[i] && c.res == i);
    }
    CHECK_EQ(port_strand_next(P, &st, &c), 0);     /* released */
    CHECK(port__strand_idle(&st));
    /* Free again: claimed and released with nothing queued. */
    CHECK_EQ(port_strand_claim(&st), 0);
    CHECK_EQ(port_strand_next(P, &st, &c), 0);
    CHECK(port__strand_idle(&st));
    /* A free strand's completion is handed out by port_wait, which holds it: no claim. */
    CHECK_EQ(port_post(P, &post[0], 7), 0);
    if (expect_cqe(&w, &post[0], &c, 5000, "a post to a free strand")) {
        CHECK_EQ(port_strand_claim(&st), PORT_EBUSY);
        CHECK_EQ(port_strand_next(P, &st, &c), 0);
    }
    CHECK(port__strand_idle(&st));
    port_strand_discard(P, &st);
done:
    end_port(P);
}

/* port_connect: a socket made and connected by the port; data both ways; refused. */
static void case_connect(void) {
    port_t *P = new_port();
    waiter_t w;
    port_addr_t bound, a;
    port_sock_t pl = PORT_INVALID_SOCK, as = PORT_INVALID_SOCK, dead;
    port_op_t co, rv, sd, co2;
    port_cqe_t c;
    port_buf_t b;
    char buf[16];
    int refused_port;
    int connected = 0;
    port_op_init(&co, PORT_OP_CONNECT, NULL, NULL);
    port_op_init(&co2, PORT_OP_CONNECT, NULL, NULL);
    port_op_init(&rv, PORT_OP_RECV, NULL, NULL);
    port_op_init(&sd, PORT_OP_SEND, NULL, NULL);
    REQUIRE(P != NULL);
    waiter_init(&w, P);
    pl = plain_listen(&bound);
    REQUIRE(pl != PORT_INVALID_SOCK);
    CHECK_EQ(port_connect(P, &co, &bound), 0);
    CHECK(co.sock != PORT_INVALID_SOCK);
    as = plain_accept(pl, 5000);
    CHECK(as != PORT_INVALID_SOCK);
    REQUIRE(expect_cqe(&w, &co, &c, 5000, "connect"));
    CHECK_EQ(c.res, 0);
    CHECK(!co.in_flight);
    REQUIRE(c.res == 0 && as != PORT_INVALID_SOCK);
    connected = 1;
    {
        port_addr_t peer, local, asp;
        sock_len_t len = sizeof(asp.ss);
        CHECK_EQ(port_peername(co.sock, &peer), 0);
        CHECK_EQ(addr_port(&peer), addr_port(&bound));
        CHECK_EQ(port_sockname(co.sock, &local), 0);
        CHECK(getpeername(as, (struct sockaddr *)&asp.ss, &len) == 0);
        asp.len = (int)len;
        CHECK_EQ(addr_port(&local), addr_port(&asp));
    }
    CHECK_EQ(port_set_nodelay(co.sock, 1), 0);
    /* plain -> port */
    CHECK(plain_send_all(as, "hello", 5) == 0);
    if (recv_next(&w, &rv, co.sock, &c, 5000, "recv")) {
        CHECK_EQ(c.res, 5);
        check_data_cqe(&c);
        CHECK(c.res == 5 && c.buf != NULL && memcmp(c.buf, "hello", 5) == 0);
        port_recv_release(P, &c);
    }
    /* port -> plain */
    b.base = "world";
    b.len = 5;
    CHECK_EQ(port_send(P, &sd, co.sock, &b, 1), 0);
    if (expect_cqe(&w, &sd, &c, 5000, "send"))
        CHECK_EQ(c.res, 5);
    memset(buf, 0, sizeof(buf));
    CHECK_EQ(plain_recv_all(as, buf, 5), 5);
    CHECK(memcmp(buf, "world", 5) == 0);
    cancel_recv(&w, &rv);
    close_op(&w, co.sock, 0);
    co.sock = PORT_INVALID_SOCK;

    /* Refused: a port nobody listens on any more. */
    dead = plain_listen(&a);
    REQUIRE(dead != PORT_INVALID_SOCK);
    refused_port = addr_port(&a);
    plain_close(dead);
    CHECK(refused_port > 0);
    CHECK_EQ(port_connect(P, &co2, &a), 0);
    if (expect_cqe(&w, &co2, &c, 10000, "refused connect"))
        CHECK_EQ(c.res, PORT_ECONNREFUSED);
    if (co2.sock != PORT_INVALID_SOCK)
        port_sock_close(P, co2.sock, 0);
    co2.sock = PORT_INVALID_SOCK;
done:
    if (!connected && co.sock != PORT_INVALID_SOCK && !co.in_flight)
        port_sock_close(P, co.sock, 0);
    plain_close(as);
    plain_close(pl);
    end_port(P);
}

/* ---- echo: 1 byte to 4 MiB ------------------------------------------------------------ */

static const size_t echo_sizes[] = {1, 2, 3, 100, 1460, 4096, 16383, 16384, 16385,
                                    65536, 100000, 1u << 20, 4u << 20};
#define ECHO_MSGS (sizeof(echo_sizes) / sizeof(echo_sizes[0]))

typedef struct echo_peer {
    port_sock_t s;
    volatile long echoed;     /* messages whose echo the reader verified */
    volatile long failed;
    volatile long reader_done;
    char *expect;
} echo_peer_t;

static void echo_writer(void *arg) {
    echo_peer_t *e = (echo_peer_t *)arg;
    size_t i, j;
    char *msg = (char *)malloc(4u << 20);
    if (msg == NULL) {
        A_STORE(&e->failed, 1);
        return;
    }
    for (i = 0; i < ECHO_MSGS; i++) {
        double t0 = now_ms();
        /* One message at a time: the 1-byte one travels alone. */
        while (A_LOAD(&e->echoed) < (long)i && !A_LOAD(&e->failed)) {
            if (now_ms() - t0 > 30000) {
                A_STORE(&e->failed, 2);
                break;
            }
            sleep_ms(1);
        }
        if (A_LOAD(&e->failed))
            break;
        for (j = 0; j < echo_sizes[i]; j++)
            msg[j] = (char)pattern(i, j);
        if (plain_send_all(e->s, msg, echo_sizes[i]) != 0) {
            A_STORE(&e->failed, 3);
            break;
        }
    }
    free(msg);
}

static void echo_reader(void *arg) {
    echo_peer_t *e = (echo_peer_t *)arg;
    size_t i, j;
    char *buf = (char *)malloc(4u << 20);
    if (buf == NULL) {
        A_STORE(&e->failed, 1);
        A_STORE(&e->reader_done, 1);
        return;
    }
    for (i = 0; i < ECHO_MSGS; i++) {
        size_t got = plain_recv_all(e->s, buf, echo_sizes[i]);
        if (got != echo_sizes[i]) {
            fprintf(stderr, "echo: message %u (%u bytes): echo gave %u bytes\n", (unsigned)i,
                    (unsigned)echo_sizes[i], (unsigned)got);
            A_STORE(&e->failed, 4);
            break;
        }
        for (j = 0; j < echo_sizes[i]; j++) {
            if ((unsigned char)buf[j] != pattern(i, j)) {
                fprintf(stderr, "echo: message %u byte %u differs\n", (unsigned)i, (unsigned)j);
                A_STORE(&e->failed, 5);
                break;
            }
        }
        if (A_LOAD(&e->failed))
            break;
        A_STORE(&e->echoed, (long)i + 1);
    }
    free(buf);
    /* All echoed: close, so the server sees a graceful end. */
    plain_closesocket(e->s);
    A_STORE(&e->reader_done, 1);
}

typedef struct echo_srv {
    port_t *P;
    port_sock_t s;
    port_op_t rv, sd, cl;
    port_buf_t b;             /* the send's buffer: port_send reads it until its completion */
    char *out;
    size_t len, cap, sent, asked;
    int sending, eof, closing, closed;
    long recvs, sends, partial_sends;
    size_t max_piece;
} echo_srv_t;

static void echo_kick(echo_srv_t *e) {
    if (e->sending || e->sent == e->len)
        return;
    e->b.base = e->out + e->sent;
    e->b.len = e->len - e->sent;
    e->asked = e->b.len;
    if (port_send(e->P, &e->sd, e->s, &e->b, 1) == 0)
        e->sending = 1;
    else
        CHECKF(0, "echo: port_send refused");
}

static void echo_dispatch(echo_srv_t *e, const port_cqe_t *c) {
    recv_consumed(c);
    if (c->op == &e->rv) {
        if (c->res > 0) {
            check_data_cqe(c);
            /* Fixed room: an in-flight send points into e->out, so it never moves.  The
             * writer sends one message at a time, so 4 MiB is all that is ever pending. */
            if (e->len + (size_t)c->res > e->cap) {
                CHECKF(0, "echo: more than %u bytes pending", (unsigned)e->cap);
                port_recv_release(e->P, c);
                return;
            }
            memcpy(e->out + e->len, c->buf, (size_t)c->res);
            e->len += (size_t)c->res;
            if ((size_t)c->res > e->max_piece)
                e->max_piece = (size_t)c->res;
            e->recvs++;
            port_recv_release(e->P, c);
            /* One-shot: post the next receive now that this one is dealt with. */
            if (!(c->flags & PORT_CQE_MORE))
                CHECK_EQ(recv_post(e->P, &e->rv, e->s), 0);
            echo_kick(e);
        } else {
            CHECK(!(c->flags & PORT_CQE_MORE));
            CHECKF(c->res == 0, "echo: recv ended with %s", port_errname((int)c->res));
            port_recv_release(e->P, c);
            e->eof = 1;
        }
    } else if (c->op == &e->sd) {
        e->sending = 0;
        e->sends++;
        CHECKF(c->res > 0, "echo: send res %lld %s", (long long)c->res,
               c->res < 0 ? port_errname((int)c->res) : "");
        if (c->res > 0) {
            CHECK((size_t)c->res <= e->asked);
            if ((size_t)c->res < e->asked)
                e->partial_sends++;   /* continue from where it stopped */
            e->sent += (size_t)c->res;
            if (e->sent == e->len)
                e->sent = e->len = 0;
            echo_kick(e);
        } else {
            e->sent = e->len = 0;
        }
    } else if (c->op == &e->cl) {
        CHECK_EQ(c->res, 0);
        e->closed = 1;
    } else {
        CHECKF(0, "echo: completion for an unknown op");
    }
    if (e->eof && !e->sending && e->len == 0 && !e->closing) {
        e->closing = 1;
        CHECK_EQ(port_close(e->P, &e->cl, e->s, 0), 0);
    }
}

static void case_echo(void) {
    port_t *P = new_port();
    waiter_t w;
    echo_srv_t e;
    echo_peer_t peer;
    thr_t tw, tr;
    int started = 0;
    double t0;
    port_sock_t cli = PORT_INVALID_SOCK;
    memset(&e, 0, sizeof(e));
    memset(&peer, 0, sizeof(peer));
    REQUIRE(P != NULL);
    waiter_init(&w, P);
    e.P = P;
    e.cap = 4u << 20;
    e.out = (char *)malloc(e.cap);
    REQUIRE(e.out != NULL);
    REQUIRE(make_pair(&w, &e.s, &cli));
    peer.s = cli;
    port_op_init(&e.rv, PORT_OP_RECV, &e, NULL);
    port_op_init(&e.sd, PORT_OP_SEND, &e, NULL);
    port_op_init(&e.cl, PORT_OP_CLOSE, &e, NULL);
    CHECK_EQ(recv_post(P, &e.rv, e.s), 0);
    REQUIRE(thr_start(&tw, echo_writer, &peer) == 0);
    if (thr_start(&tr, echo_reader, &peer) != 0) {
        A_STORE(&peer.failed, 9);
        thr_join(tw);
        REQUIRE(0);
    }
    started = 1;
    /* The port side: a plain batch loop.  Sends made while dispatching a batch are
     * flushed by the next port_wait (the deferral port.h describes). */
    t0 = now_ms();
    while (!e.closed) {
        port_cqe_t out[32];
        int i, n;
        if (now_ms() - t0 > 40000) {
            CHECKF(0, "echo: not finished after 40 s (echoed %ld of %u messages)",
                   A_LOAD(&peer.echoed), (unsigned)ECHO_MSGS);
            break;
        }
        if (A_LOAD(&peer.failed) && !e.eof)
            break;
        n = port_wait(P, out, 32, 100);
        if (n == PORT_EINTR)
            continue;
        CHECKF(n >= 0, "port_wait: %s", port_errname(n));
        if (n < 0)
            break;
        for (i = 0; i < n; i++)
            echo_dispatch(&e, &out[i]);
    }
    port_batch_end(P);
done:
    if (started) {
        if (!e.closed)
            A_STORE(&peer.failed, 10);
        thr_join(tw);
        thr_join(tr);
        CHECKF(A_LOAD(&peer.failed) == 0, "echo peer failed (%ld)", A_LOAD(&peer.failed));
        CHECK_EQ(A_LOAD(&peer.echoed), (long)ECHO_MSGS);
        CHECKF(e.recvs > (long)ECHO_MSGS, "receives did not come in pieces (%ld)", e.recvs);
        CHECKF(e.max_piece <= 16384, "a receive piece (%u) exceeds the buffer size",
               (unsigned)e.max_piece);
        note("%ld receive completions, %ld sends (%ld partial)", e.recvs, e.sends,
             e.partial_sends);
    } else {
        plain_close(cli);
    }
    if (!e.closed && e.s != PORT_INVALID_SOCK && P != NULL) {
        /* A failure left operations armed: cancel and drain so the port can go. */
        cancel_recv(&w, &e.rv);
        if (e.sd.in_flight) {
            port_cqe_t c;
            port_cancel(P, &e.sd);
            expect_cqe(&w, &e.sd, &c, 5000, "drain send");
        }
        if (!e.closing)
            port_sock_close(P, e.s, 0);
        else if (e.cl.in_flight) {
            port_cqe_t c;
            expect_cqe(&w, &e.cl, &c, 5000, "drain close");
        }
    }
    free(e.out);
    end_port(P);
}

/* ---- gather send ------------------------------------------------------------------------ */

typedef struct reader_args {
    port_sock_t s;
    char *buf;
    size_t want, got;
} reader_args_t;

static void reader_thread(void *arg) {
    reader_args_t *r = (reader_args_t *)arg;
    /* Start late, so the sender finds its socket buffer full (partial sends). */
    sleep_ms(30);
    r->got = plain_recv_all(r->s, r->buf, r->want);
}

/* Send bufs[0..n) completely with as many port_send calls as it takes (each may complete
 * partially; continue from where it stopped).  Returns the number of port_send calls. */
static int send_all_gather(waiter_t *w, port_op_t *sd, port_sock_t s, port_buf_t *bufs,
                           int n, size_t *partials) {
    int calls = 0, first = 0;
    port_buf_t *v = (port_buf_t *)malloc(sizeof(port_buf_t) * (size_t)n);
    if (v == NULL)
        return -1;
    memcpy(v, bufs, sizeof(port_buf_t) * (size_t)n);
    while (first < n) {
        port_cqe_t c;
        size_t asked = 0, left;
        int i;
        for (i = first; i < n; i++)
            asked += v[i].len;
        CHECK_EQ(port_send(w->p, sd, s, v + first, n - first), 0);
        calls++;
        if (!expect_cqe(w, sd, &c, 10000, "gather send")) {
            calls = -1;
            break;
        }
        CHECKF(c.res > 0, "gather send res %lld %s", (long long)c.res,
               c.res < 0 ? port_errname((int)c.res) : "");
        if (c.res <= 0) {
            calls = -1;
            break;
        }
        CHECK((size_t)c.res <= asked);
        if ((size_t)c.res < asked)
            (*partials)++;
        left = (size_t)c.res;
        while (first < n && left >= v[first].len) {
            left -= v[first].len;
            first++;
        }
        if (first < n) {
            v[first].base += left;
            v[first].len -= left;
        }
    }
    free(v);
    return calls;
}

static void case_gather_send(void) {
    static const size_t sizes[] = {1, 3, 1000, 65536, 7, 200000, 2};
    enum { NB = sizeof(sizes) / sizeof(sizes[0]), NSMALL = 200 };
    port_t *P = new_port();
    waiter_t w;
    port_sock_t srv = PORT_INVALID_SOCK, cli = PORT_INVALID_SOCK;
    port_op_t sd;
    port_buf_t bufs[NSMALL];
    char *data[NB];
    char small[NSMALL];
    size_t total = 0, off, partials = 0, i, j;
    reader_args_t r;
    thr_t t;
    int calls;
    memset(data, 0, sizeof(data));
    memset(&r, 0, sizeof(r));
    REQUIRE(P != NULL);
    waiter_init(&w, P);
    REQUIRE(make_pair(&w, &srv, &cli));
    port_op_init(&sd, PORT_OP_SEND, NULL, NULL);
    {
        /* Small socket buffers on both ends make partial completions likely where the
         * OS has them (Linux); Windows completes an overlapped send whole. */
        int small_buf = 16384;
        setsockopt(srv, SOL_SOCKET, SO_SNDBUF, (const char *)&small_buf, sizeof(small_buf));
        setsockopt(cli, SOL_SOCKET, SO_RCVBUF, (const char *)&small_buf, sizeof(small_buf));
    }
    for (i = 0; i < NB; i++) {
        data[i] = (char *)malloc(sizes[i]);
        REQUIRE(data[i] != NULL);
        for (j = 0; j < sizes[i]; j++)
            data[i][j] = (char)pattern(i + 100, j);
        bufs[i].base = data[i];
        bufs[i].len = sizes[i];
        total += sizes[i];
    }
    r.s = cli;
    r.want = total;
    r.buf = (char *)malloc(total);
    REQUIRE(r.buf != NULL);
    REQUIRE(thr_start(&t, reader_thread, &r) == 0);
    calls = send_all_gather(&w, &sd, srv, bufs, NB, &partials);
    thr_join(t);
    CHECK(calls >= 1);
    CHECK_EQ(r.got, total);
    off = 0;
    for (i = 0; i < NB && r.got == total; i++) {
        CHECKF(memcmp(r.buf + off, data[i], sizes[i]) == 0, "buffer %u out of order",
               (unsigned)i);
        off += sizes[i];
    }
    note("%u bytes in %d port_send calls (%u partial)", (unsigned)total, calls,
         (unsigned)partials);

    /* Many tiny buffers in one call: a backend may send fewer buffers than asked (a
     * partial completion), never reorder them. */
    for (i = 0; i < NSMALL; i++) {
        small[i] = (char)(i * 3 + 1);
        bufs[i].base = &small[i];
        bufs[i].len = 1;
    }
    partials = 0;
    calls = send_all_gather(&w, &sd, srv, bufs, NSMALL, &partials);
    CHECK(calls >= 1);
    {
        char got[NSMALL];
        CHECK_EQ(plain_recv_all(cli, got, NSMALL), NSMALL);
        CHECK(memcmp(got, small, NSMALL) == 0);
    }
    close_op(&w, srv, 0);
    srv = PORT_INVALID_SOCK;
done:
    for (i = 0; i < NB; i++)
        free(data[i]);
    free(r.buf);
    plain_close(cli);
    if (srv != PORT_INVALID_SOCK)
        port_sock_close(P, srv, 0);
    end_port(P);
}

/* ---- graceful close and reset ---------------------------------------------------------- */

static void case_graceful_close(void) {
    port_t *P = new_port();
    waiter_t w;
    port_sock_t srv = PORT_INVALID_SOCK, cli = PORT_INVALID_SOCK;
    port_op_t rv;
    port_cqe_t c;
    char got[16];
    size_t n = 0;
    int final_seen = 0;
    port_op_init(&rv, PORT_OP_RECV, NULL, NULL);
    REQUIRE(P != NULL);
    waiter_init(&w, P);
    REQUIRE(make_pair(&w, &srv, &cli));
    CHECK_EQ(recv_post(P, &rv, srv), 0);
    expect_quiet(&w, 30, "idle recv");
    CHECK(plain_send_all(cli, "bye", 3) == 0);
    plain_close(cli);
    cli = PORT_INVALID_SOCK;
    while (!final_seen) {
        if (!recv_next(&w, &rv, srv, &c, 5000, "recv until EOF"))
            break;
        if (c.res > 0) {
            check_data_cqe(&c);
            if (n + (size_t)c.res <= sizeof(got))
                memcpy(got + n, c.buf, (size_t)c.res);
            n += (size_t)c.res;
            port_recv_release(P, &c);
        } else {
            final_seen = 1;
            CHECKF(c.res == 0, "final res %lld %s, expected 0", (long long)c.res,
                   port_errname((int)c.res));
            CHECK(!(c.flags & PORT_CQE_MORE));
            CHECK(!(c.flags & PORT_CQE_BUFFER));
            port_recv_release(P, &c);
        }
    }
    CHECK(final_seen);
    CHECK(!rv.in_flight);
    CHECK_EQ(n, 3);
    CHECK(n == 3 && memcmp(got, "bye", 3) == 0);
    expect_quiet(&w, 20, "after EOF");
    close_op(&w, srv, 0);
    srv = PORT_INVALID_SOCK;
done:
    cancel_recv(&w, &rv);
    plain_close(cli);
    if (srv != PORT_INVALID_SOCK)
        port_sock_close(P, srv, 0);
    end_port(P);
}

/* The peer resets (SO_LINGER 0): the armed receive ends with PORT_ECONNRESET on every
 * backend (IOCP reports ERROR_NETNAME_DELETED / WSAECONNRESET, Linux ECONNRESET). */
static void case_peer_reset(void) {
    port_t *P = new_port();
    waiter_t w;
    port_sock_t srv = PORT_INVALID_SOCK, cli = PORT_INVALID_SOCK;
    port_op_t rv, sd;
    port_cqe_t c;
    port_buf_t b;
    port_op_init(&rv, PORT_OP_RECV, NULL, NULL);
    port_op_init(&sd, PORT_OP_SEND, NULL, NULL);
    REQUIRE(P != NULL);
    waiter_init(&w, P);
    REQUIRE(make_pair(&w, &srv, &cli));
    CHECK_EQ(recv_post(P, &rv, srv), 0);
    expect_quiet(&w, 30, "idle recv");
    plain_reset_close(cli);
    cli = PORT_INVALID_SOCK;
    if (expect_cqe(&w, &rv, &c, 5000, "recv after reset")) {
        CHECKF(c.res == PORT_ECONNRESET, "res %lld %s, expected ECONNRESET", (long long)c.res,
               port_errname((int)c.res));
        CHECK(!(c.flags & PORT_CQE_MORE));
        port_recv_release(P, &c);
    }
    CHECK(!rv.in_flight);
    /* A send on the reset connection fails (which code is the OS's choice). */
    b.base = "x";
    b.len = 1;
    CHECK_EQ(port_send(P, &sd, srv, &b, 1), 0);
    if (expect_cqe(&w, &sd, &c, 5000, "send after reset"))
        CHECKF(c.res == PORT_ECONNRESET || c.res == PORT_EPIPE || c.res == PORT_ECONNABORTED,
               "send after reset: res %lld %s", (long long)c.res,
               c.res < 0 ? port_errname((int)c.res) : "");
    close_op(&w, srv, 0);
    srv = PORT_INVALID_SOCK;
done:
    cancel_recv(&w, &rv);
    plain_close(cli);
    if (srv != PORT_INVALID_SOCK)
        port_sock_close(P, srv, 0);
    end_port(P);
}

/* ---- send progress ---------------------------------------------------------------------- */

/* Send from s without blocking until the kernel takes no more; returns the bytes sent. */
static size_t fill_send_buffers(port_sock_t s) {
    static char chunk[16384];
    size_t total = 0;
    int quiet = 0;
#ifdef _WIN32
    u_long on = 1;
    ioctlsocket(s, FIONBIO, &on);
#endif
    while (quiet < 20) {            /* 20 tries 10 ms apart: the window has closed */
#ifdef _WIN32
        int n = send(s, chunk, (int)sizeof(chunk), 0);
#else
        ssize_t n = send(s, chunk, sizeof(chunk), MSG_DONTWAIT | MSG_NOSIGNAL);
#endif
        if (n > 0) {
            total += (size_t)n;
            quiet = 0;
        } else {
            quiet++;
            sleep_ms(10);
        }
    }
    return total;
}

/* port_sock_send_progress: the mark stays put while the peer reads nothing, and moves
 * when it reads (a slow reader is told from a stalled one). */
static void case_send_progress(void) {
    port_t *P = new_port();
    waiter_t w;
    port_sock_t srv = PORT_INVALID_SOCK, cli = PORT_INVALID_SOCK;
    uint64_t m1 = 0, m2 = 0, m3 = 0;
    size_t filled, drained = 0;
    char buf[65536];
    int rc, i;
    REQUIRE(P != NULL);
    waiter_init(&w, P);
    REQUIRE(make_pair(&w, &srv, &cli));
    rc = port_sock_send_progress(srv, &m1);
    if (rc == PORT_EOPNOTSUPP) {
        note("not supported here: only send completions tell progress");
        goto done;
    }
    CHECKF(rc == 0, "port_sock_send_progress: %s", port_errname(rc));
    filled = fill_send_buffers(srv);
    CHECK(filled > 0);
    /* Nothing read: the mark settles and stays. */
    for (i = 0; i < 50; i++) {
        CHECK_EQ(port_sock_send_progress(srv, &m1), 0);
        sleep_ms(20);
        CHECK_EQ(port_sock_send_progress(srv, &m2), 0);
        if (m1 == m2)
            break;
    }
    sleep_ms(200);
    CHECK_EQ(port_sock_send_progress(srv, &m2), 0);
    CHECKF(m1 == m2, "the mark moved (%llu -> %llu) while the peer read nothing",
           (unsigned long long)m1, (unsigned long long)m2);
    /* The peer reads: the mark moves as soon as it opens its window (a receiver
     * announces room only once a good part of its buffer is free, so read until then). */
    plain_set_timeout(cli, 2000);
    m3 = m2;
    while (m3 == m2 && drained < filled) {
        int n = (int)recv(cli, buf, sizeof(buf), 0);
        if (n <= 0)
            break;
        drained += (size_t)n;
        for (i = 0; i < 5 && m3 == m2; i++) {
            sleep_ms(2);
            CHECK_EQ(port_sock_send_progress(srv, &m3), 0);
        }
    }
    CHECKF(m3 != m2, "the mark did not move while the peer read %u of %u bytes",
           (unsigned)drained, (unsigned)filled);
    note("%u bytes queued; mark %llu, then %llu after the peer read %u bytes",
         (unsigned)filled, (unsigned long long)m2, (unsigned long long)m3,
         (unsigned)drained);
done:
    plain_close(cli);
    if (srv != PORT_INVALID_SOCK)
        port_sock_close(P, srv, 0);
    end_port(P);
}

/* port_sock_drain: unread input dropped before a graceful close turns what would be a
 * reset into the FIN, and the peer reads our last bytes whole. */
static void case_drain_before_close(void) {
    port_t *P = new_port();
    waiter_t w;
    port_sock_t srv = PORT_INVALID_SOCK, cli = PORT_INVALID_SOCK;
    char req[3000], reply[20000], got[20000];
    size_t i, n = 0;
    int64_t dropped = 0;
    REQUIRE(P != NULL);
    waiter_init(&w, P);
    REQUIRE(make_pair(&w, &srv, &cli));
    for (i = 0; i < sizeof(req); i++)
        req[i] = (char)i;
    for (i = 0; i < sizeof(reply); i++)
        reply[i] = (char)pattern(7, i);
    CHECK_EQ(send(cli, req, (int)sizeof(req), 0), (int)sizeof(req));   /* never read */
    for (i = 0; i < 100 && dropped < (int64_t)sizeof(req); i++) {
        int64_t d = port_sock_drain(srv);
        CHECKF(d >= 0, "port_sock_drain: %s", port_errname((int)d));
        if (d > 0)
            dropped += d;
        else
            sleep_ms(10);
    }
    CHECK_EQ(dropped, (int64_t)sizeof(req));
    CHECK_EQ(port_sock_drain(srv), 0);               /* nothing more: no waiting */
    CHECK_EQ(send(srv, reply, (int)sizeof(reply), 0), (int)sizeof(reply));
    close_op(&w, srv, 0);
    srv = PORT_INVALID_SOCK;
    /* The whole reply, then EOF: no reset. */
    plain_set_timeout(cli, 5000);
    n = plain_recv_all(cli, got, sizeof(got));
    CHECK_EQ(n, sizeof(reply));
    CHECK(memcmp(got, reply, n) == 0);
    CHECK_EQ(recv(cli, got, 1, 0), 0);
done:
    plain_close(cli);
    if (srv != PORT_INVALID_SOCK)
        port_sock_close(P, srv, 0);
    end_port(P);
}

/* ---- cancel ---------------------------------------------------------------------------- */

static void case_cancel_recv(void) {
    port_t *P = new_port();
    waiter_t w;
    port_sock_t srv = PORT_INVALID_SOCK, cli = PORT_INVALID_SOCK, ls = PORT_INVALID_SOCK;
    port_sock_t acc_sock = PORT_INVALID_SOCK, cli2 = PORT_INVALID_SOCK;
    port_op_t rv, acc;
    port_cqe_t c;
    port_addr_t a, bound;
    char got[8];
    size_t n;
    int i;
    port_op_init(&rv, PORT_OP_RECV, NULL, NULL);
    port_op_init(&acc, PORT_OP_ACCEPT, NULL, NULL);
    REQUIRE(P != NULL);
    waiter_init(&w, P);
    REQUIRE(make_pair(&w, &srv, &cli));

    /* A pending receive: cancel gives one final PORT_ECANCELED. */
    CHECK_EQ(recv_post(P, &rv, srv), 0);
    expect_quiet(&w, 50, "idle recv");
    CHECK_EQ(port_cancel(P, &rv), 0);
    if (expect_cqe(&w, &rv, &c, 5000, "cancelled recv")) {
        CHECK_EQ(c.res, PORT_ECANCELED);
        CHECK(!(c.flags & PORT_CQE_MORE));
        CHECK(!(c.flags & PORT_CQE_BUFFER));
    }
    CHECK(!rv.in_flight);
    /* Cancelling what is not in flight is harmless and produces nothing. */
    CHECK_EQ(port_cancel(P, &rv), 0);
    expect_quiet(&w, 30, "cancel of an idle op");

    /* The record is reusable. */
    CHECK_EQ(recv_post(P, &rv, srv), 0);
    CHECK(plain_send_all(cli, "again", 5) == 0);
    if (expect_cqe(&w, &rv, &c, 5000, "recv after re-arm")) {
        CHECK_EQ(c.res, 5);
        CHECK(c.res == 5 && memcmp(c.buf, "again", 5) == 0);
        check_data_cqe(&c);
        port_recv_release(P, &c);
    }
    cancel_recv(&w, &rv);
    CHECK(!rv.in_flight);

    /* Cancel racing with arriving data: the receive ends with PORT_ECANCELED or with
     * its data (it finished first); what was delivered plus what a new receive gets is
     * exactly what was sent. */
    for (i = 0; i < 3; i++) {
        n = 0;
        CHECK_EQ(recv_post(P, &rv, srv), 0);
        CHECK(plain_send_all(cli, "zz", 2) == 0);
        if (i > 0)
            sleep_ms(i * 5);
        CHECK_EQ(port_cancel(P, &rv), 0);
        for (;;) {
            if (!expect_cqe(&w, &rv, &c, 5000, "racing cancel"))
                break;
            if (c.flags & PORT_CQE_MORE) {
                CHECK(c.res > 0);
                if (c.res > 0 && n + (size_t)c.res <= sizeof(got))
                    memcpy(got + n, c.buf, (size_t)c.res);
                n += (size_t)c.res;
                port_recv_release(P, &c);
                continue;
            }
            CHECKF(c.res == PORT_ECANCELED || c.res > 0, "racing cancel: final %lld %s",
                   (long long)c.res, c.res < 0 ? port_errname((int)c.res) : "");
            if (c.res > 0 && n + (size_t)c.res <= sizeof(got))
                memcpy(got + n, c.buf, (size_t)c.res);
            if (c.res > 0)
                n += (size_t)c.res;
            port_recv_release(P, &c);
            break;
        }
        if (n < 2) {
            while (n < 2) {
                if (!recv_next(&w, &rv, srv, &c, 5000, "rest after cancel"))
                    break;
                CHECK(c.res > 0);
                if (c.res <= 0)
                    break;
                if (n + (size_t)c.res <= sizeof(got))
                    memcpy(got + n, c.buf, (size_t)c.res);
                n += (size_t)c.res;
                port_recv_release(P, &c);
            }
            cancel_recv(&w, &rv);
        }
        CHECK_EQ(n, 2);
        CHECK(n == 2 && memcmp(got, "zz", 2) == 0);
    }

    /* A pending accept is cancellable too, and its record reusable. */
    REQUIRE(loopback(&a) == 0);
    REQUIRE(port_listen(P, &a, 16, 0, &ls) == 0);
    REQUIRE(port_sockname(ls, &bound) == 0);
    CHECK_EQ(port_accept(P, &acc, ls), 0);
    expect_quiet(&w, 30, "idle accept");
    CHECK_EQ(port_cancel(P, &acc), 0);
    if (expect_cqe(&w, &acc, &c, 5000, "cancelled accept"))
        CHECK_EQ(c.res, PORT_ECANCELED);
    CHECK_EQ(port_accept(P, &acc, ls), 0);
    cli2 = plain_connect(&bound);
    if (expect_cqe(&w, &acc, &c, 5000, "accept after cancel")) {
        CHECK(c.res >= 0);
        if (c.res >= 0)
            acc_sock = (port_sock_t)c.res;
    }
    close_op(&w, srv, 0);
    srv = PORT_INVALID_SOCK;
done:
    cancel_recv(&w, &rv);
    plain_close(cli);
    plain_close(cli2);
    if (acc_sock != PORT_INVALID_SOCK)
        port_sock_close(P, acc_sock, 0);
    if (ls != PORT_INVALID_SOCK)
        port_sock_close(P, ls, 0);
    if (srv != PORT_INVALID_SOCK)
        port_sock_close(P, srv, 0);
    end_port(P);
}

/* ---- post --------------------------------------------------------------------------------- */

typedef struct poster {
    port_t *P;
    port_op_t *ops;
    const int64_t *values;
    int n, delay_ms;
    volatile long errors;
} poster_t;

static void poster_thread(void *arg) {
    poster_t *t = (poster_t *)arg;
    int i;
    if (t->delay_ms)
        sleep_ms(t->delay_ms);
    for (i = 0; i < t->n; i++)
        if (port_post(t->P, &t->ops[i], t->values[i]) != 0)
            A_ADD(&t->errors, 1);
}

static void case_post_thread(void) {
    static const int64_t values[] = {0, 42, (int64_t)1 << 40};
    enum { N = 3 };
    port_t *P = new_port();
    waiter_t w;
    port_op_t ops[N], bad;
    poster_t t;
    thr_t th;
    int seen[N] = {0, 0, 0};
    int i, k;
    double t0;
    REQUIRE(P != NULL);
    waiter_init(&w, P);
    for (i = 0; i < N; i++)
        port_op_init(&ops[i], PORT_OP_POST, &ops[i], NULL);
    /* The poster starts while we are asleep in port_wait: a post must wake it. */
    memset(&t, 0, sizeof(t));
    t.P = P;
    t.ops = ops;
    t.values = values;
    t.n = 1;
    t.delay_ms = 80;
    REQUIRE(thr_start(&th, poster_thread, &t) == 0);
    t0 = now_ms();
    {
        port_cqe_t c;
        int rc = next_cqe(&w, &c, 5000);
        double el = now_ms() - t0;
        CHECKF(rc == 1, "no completion from the posting thread (rc %d)", rc);
        if (rc == 1) {
            CHECK(c.op == &ops[0]);
            CHECK_EQ(c.res, values[0]);
            CHECK(!(c.flags & (PORT_CQE_MORE | PORT_CQE_BUFFER)));
            seen[0] = 1;
        }
        CHECKF(el >= 60 && el < 3000, "woke after %.1f ms", el);
    }
    thr_join(th);
    CHECK_EQ(A_LOAD(&t.errors), 0);
    /* Then the rest from another thread at once. */
    t.ops = ops + 1;
    t.values = values + 1;
    t.n = N - 1;
    t.delay_ms = 0;
    REQUIRE(thr_start(&th, poster_thread, &t) == 0);
    thr_join(th);
    CHECK_EQ(A_LOAD(&t.errors), 0);
    for (k = 1; k < N; k++) {
        port_cqe_t c;
        if (next_cqe(&w, &c, 5000) != 1) {
            CHECKF(0, "post %d never completed", k);
            break;
        }
        i = (int)(c.op - ops);
        REQUIRE(i >= 0 && i < N);
        CHECKF(!seen[i], "post %d completed twice", i);
        seen[i] = 1;
        CHECK_EQ(c.res, values[i]);
        CHECK(c.op->owner == &ops[i]);
    }
    for (i = 0; i < N; i++)
        CHECK(seen[i]);
    /* A negative value is refused at once and produces nothing. */
    port_op_init(&bad, PORT_OP_POST, NULL, NULL);
    CHECK_EQ(port_post(P, &bad, -1), PORT_EINVAL);
    CHECK(!bad.in_flight);
    expect_quiet(&w, 30, "after a refused post");
done:
    end_port(P);
}

/* ---- two waiters share a batch stream ---------------------------------------------------- */

enum { BW_N = 2000, BW_FIRST = 600 };

typedef struct bw {
    port_t *P;
    port_op_t *ops;
    volatile long seen[BW_N];
    volatile long total;
    volatile long dup, bad;
    volatile long per_thread[2];
    volatile long max_batch;
    volatile long go;
} bw_t;

typedef struct bw_arg {
    bw_t *b;
    int idx;
} bw_arg_t;

static void bw_thread(void *arg) {
    bw_arg_t *a = (bw_arg_t *)arg;
    bw_t *b = a->b;
    double t0 = now_ms();
    int held = 0;
    while (!A_LOAD(&b->go))
        sleep_ms(1);
    while (A_LOAD(&b->total) < BW_N && now_ms() - t0 < 20000) {
        port_cqe_t out[32];
        int i, n = port_wait(b->P, out, 32, 50);
        if (n == PORT_EINTR || n == 0)
            continue;
        if (n < 0) {
            A_ADD(&b->bad, 1);
            break;
        }
        if (n > A_LOAD(&b->max_batch))
            A_STORE(&b->max_batch, n);
        for (i = 0; i < n; i++) {
            long k = (long)(out[i].op - b->ops);
            if (k < 0 || k >= BW_N || out[i].res != k) {
                A_ADD(&b->bad, 1);
                continue;
            }
            if (A_XCHG(&b->seen[k], 1) != 0)
                A_ADD(&b->dup, 1);
            A_ADD(&b->per_thread[a->idx], 1);
            A_ADD(&b->total, 1);
        }
        /* "Dispatching" takes a while, so the other waiter gets its turn.  The first
         * batch is held until the other waiter has had one: on a loaded machine its
         * thread could otherwise be scheduled only once this one had taken everything
         * (2000 / 0, a case that proved nothing).  The hold ends at the event; 10 s
         * without it is a port that gives nothing to a second waiter while the first
         * dispatches: the split check fails. */
        if (!held) {
            double h0 = now_ms();
            held = 1;
            while (A_LOAD(&b->per_thread[1 - a->idx]) == 0 && now_ms() - h0 < 10000)
                sleep_ms(1);
        } else {
            sleep_ms(1);
        }
    }
    port_batch_end(b->P);
}

static void case_batch_two_waiters(void) {
    port_t *P = new_port();
    bw_t *b = (bw_t *)calloc(1, sizeof(bw_t));
    port_op_t *ops = (port_op_t *)calloc(BW_N, sizeof(port_op_t));
    bw_arg_t args[2];
    thr_t th[2];
    int i, started = 0;
    REQUIRE(P != NULL && b != NULL && ops != NULL);
    b->P = P;
    b->ops = ops;
    for (i = 0; i < BW_N; i++)
        port_op_init(&ops[i], PORT_OP_POST, NULL, NULL);
    /* Some completions are queued before anyone waits (the first wait gets a batch)... */
    for (i = 0; i < BW_FIRST; i++)
        CHECK_EQ(port_post(P, &ops[i], i), 0);
    for (i = 0; i < 2; i++) {
        args[i].b = b;
        args[i].idx = i;
        if (thr_start(&th[i], bw_thread, &args[i]) == 0)
            started++;
    }
    REQUIRE(started == 2);
    A_STORE(&b->go, 1);
    /* ...the rest arrive while both wait. */
    for (i = BW_FIRST; i < BW_N; i++) {
        CHECK_EQ(port_post(P, &ops[i], i), 0);
        if (i % 50 == 0)
            sleep_ms(2);
    }
    for (i = 0; i < 2; i++)
        thr_join(th[i]);
    started = 0;
    CHECK_EQ(A_LOAD(&b->total), BW_N);
    CHECK_EQ(A_LOAD(&b->dup), 0);
    CHECK_EQ(A_LOAD(&b->bad), 0);
    for (i = 0; i < BW_N; i++)
        if (!b->seen[i]) {
            CHECKF(0, "post %d lost", i);
            break;
        }
    CHECKF(A_LOAD(&b->per_thread[0]) > 0 && A_LOAD(&b->per_thread[1]) > 0,
           "completions not split: %ld / %ld", A_LOAD(&b->per_thread[0]),
           A_LOAD(&b->per_thread[1]));
    CHECKF(A_LOAD(&b->max_batch) > 1, "never more than one completion per wait");
    note("split %ld / %ld, largest batch %ld", A_LOAD(&b->per_thread[0]),
         A_LOAD(&b->per_thread[1]), A_LOAD(&b->max_batch));
done:
    if (started == 1)
        thr_join(th[0]);
    end_port(P);
    free(b);
    free(ops);
}

/* ---- wait timeout ------------------------------------------------------------------------ */

/* How early a timed wait may return: "roughly the timeout", never early by more than this. */
#define EARLY_SLACK_MS 2.0

static void case_wait_timeout(void) {
    port_t *P = new_port();
    port_cqe_t out[4];
    double t0, el;
    int rc, i;
    REQUIRE(P != NULL);
    t0 = now_ms();
    rc = port_wait(P, out, 4, 0);
    el = now_ms() - t0;
    CHECK_EQ(rc, 0);
    CHECKF(el < 200, "a poll took %.1f ms", el);
    t0 = now_ms();
    do
        rc = port_wait(P, out, 4, 250);
    while (rc == PORT_EINTR);
    el = now_ms() - t0;
    CHECK_EQ(rc, 0);
    CHECKF(el >= 250 - EARLY_SLACK_MS, "returned early: %.1f ms for 250", el);
    CHECKF(el < 250 + 1500, "returned late: %.1f ms for 250", el);
    for (i = 0; i < 5; i++) {
        t0 = now_ms();
        rc = port_wait(P, out, 4, 20);
        el = now_ms() - t0;
        if (rc == PORT_EINTR)
            continue;
        CHECK_EQ(rc, 0);
        CHECKF(el >= 20 - EARLY_SLACK_MS, "returned early: %.2f ms for 20", el);
        CHECKF(el < 20 + 1000, "returned late: %.1f ms for 20", el);
    }
    port_batch_end(P);
done:
    end_port(P);
}

/* ---- timers ------------------------------------------------------------------------------ */

static void case_timers(void) {
    static const int ms[] = {90, 30, 60, 45, 0};   /* [3] is cancelled */
    enum { N = 5, CANCELLED = 3 };
    port_t *P = new_port();
    waiter_t w;
    port_op_t t[N];
    double armed[N], armed_by[N], t0;   /* before and after arming: its deadline between */
    double cancelled_by;
    int order[N], batch[N], norder = 0, i, k, cancelled_pos = -1, cancelled_batch = -1;
    port_cqe_t c;
    REQUIRE(P != NULL);
    waiter_init(&w, P);
    for (i = 0; i < N; i++)
        port_op_init(&t[i], PORT_OP_TIMER, NULL, NULL);
    for (i = 0; i < N; i++) {
        armed[i] = now_ms();
        CHECK_EQ(port_timer(P, &t[i], (uint64_t)ms[i]), 0);
        armed_by[i] = now_ms();
    }
    CHECK_EQ(port_cancel(P, &t[CANCELLED]), 0);
    cancelled_by = now_ms();
    for (k = 0; k < N; k++) {
        double at;
        if (next_cqe(&w, &c, 5000) != 1) {
            CHECKF(0, "timer completion %d of %d missing", k, N);
            break;
        }
        at = now_ms();
        i = (int)(c.op - t);
        REQUIRE(i >= 0 && i < N);
        if (i == CANCELLED) {
            CHECKF(c.res == PORT_ECANCELED, "cancelled timer res %lld", (long long)c.res);
            cancelled_pos = k;
            cancelled_batch = w.batches;
            continue;
        }
        batch[norder] = w.batches;
        CHECKF(c.res == 0, "timer %d ms: res %lld %s", ms[i], (long long)c.res,
               port_errname((int)c.res));
        CHECKF(at - armed[i] >= ms[i] - EARLY_SLACK_MS, "timer %d ms fired after %.1f ms",
               ms[i], at - armed[i]);
        CHECKF(at - armed[i] < ms[i] + 1000, "timer %d ms fired after %.1f ms", ms[i],
               at - armed[i]);
        order[norder++] = i;
    }
    /* In the order of their deadlines.  Those are where arming placed them: a stalled
     * thread (valgrind on a loaded machine) can arm the 30 ms timer more than 60 ms after
     * the 90 ms one, whose deadline then comes first.  So a timer that fired before
     * another must have had a deadline no later than the latest the other could have. */
    for (k = 1; k < norder; k++) {
        int a = order[k - 1], b = order[k];
        CHECKF(armed[a] + ms[a] <= armed_by[b] + ms[b] + 1.0,
               "timers out of order: %d ms (due at %.1f ms) before %d ms (due by %.1f ms)",
               ms[a], armed[a] + ms[a] - armed[0], ms[b], armed_by[b] + ms[b] - armed[0]);
    }
    CHECK_EQ(norder, N - 1);
    /* The cancel is immediate: no wait returns a timer that was still due when
     * port_cancel returned before (in an earlier batch than) the cancel's completion.
     * On a quiet machine that is "before the 30 ms timer"; a thread stalled by valgrind
     * on a loaded machine may wait again only once the 30 ms timer is due too, and one
     * batch then holds both, in the port's order. */
    CHECKF(cancelled_pos >= 0, "no completion for the cancelled timer");
    for (k = 0; k < cancelled_pos && k < norder; k++)
        CHECKF(armed[order[k]] + ms[order[k]] <= cancelled_by + 1.0 ||
               batch[k] == cancelled_batch,
               "the %d ms timer, due %.1f ms after the cancel, came in a wait before its "
               "completion", ms[order[k]], armed[order[k]] + ms[order[k]] - cancelled_by);
    /* A cancelled timer's record is reusable; cancelling a fired one is harmless. */
    t0 = now_ms();
    CHECK_EQ(port_timer(P, &t[CANCELLED], 15), 0);
    if (expect_cqe(&w, &t[CANCELLED], &c, 5000, "re-armed timer")) {
        CHECK_EQ(c.res, 0);
        CHECK(now_ms() - t0 >= 15 - EARLY_SLACK_MS);
    }
    CHECK_EQ(port_cancel(P, &t[CANCELLED]), 0);
    expect_quiet(&w, 30, "cancel of a fired timer");
    /* Many timers with one deadline all fire, once each. */
    {
        port_op_t many[50];
        int seen[50], got = 0;
        memset(seen, 0, sizeof(seen));
        for (i = 0; i < 50; i++) {
            port_op_init(&many[i], PORT_OP_TIMER, NULL, NULL);
            CHECK_EQ(port_timer(P, &many[i], 10), 0);
        }
        while (got < 50) {
            if (next_cqe(&w, &c, 5000) != 1)
                break;
            i = (int)(c.op - many);
            REQUIRE(i >= 0 && i < 50);
            CHECK(!seen[i]);
            seen[i] = 1;
            CHECK_EQ(c.res, 0);
            got++;
        }
        CHECK_EQ(got, 50);
    }
done:
    end_port(P);
}

/* ---- operations on a closed socket ------------------------------------------------------- */

static void case_closed_socket(void) {
    port_t *P = new_port();
    waiter_t w;
    port_addr_t a;
    port_sock_t dead = PORT_INVALID_SOCK;
    port_op_t rv, sd, acc, cl;
    port_cqe_t c;
    port_buf_t b;
    port_op_init(&rv, PORT_OP_RECV, NULL, NULL);
    port_op_init(&sd, PORT_OP_SEND, NULL, NULL);
    port_op_init(&acc, PORT_OP_ACCEPT, NULL, NULL);
    port_op_init(&cl, PORT_OP_CLOSE, NULL, NULL);
    REQUIRE(P != NULL);
    waiter_init(&w, P);
    REQUIRE(loopback(&a) == 0);
    REQUIRE(port_listen(P, &a, 16, 0, &dead) == 0);
    CHECK_EQ(port_sock_close(P, dead, 0), 0);
    /* `dead` is now a closed socket; nothing in this process opens another meanwhile. */
    CHECK_EQ(recv_post(P, &rv, dead), 0);
    if (expect_cqe(&w, &rv, &c, 5000, "recv on a closed socket")) {
        CHECK_EQ(c.res, PORT_EBADF);
        CHECK(!(c.flags & PORT_CQE_MORE));
        port_recv_release(P, &c);
    }
    b.base = "x";
    b.len = 1;
    CHECK_EQ(port_send(P, &sd, dead, &b, 1), 0);
    if (expect_cqe(&w, &sd, &c, 5000, "send on a closed socket"))
        CHECK_EQ(c.res, PORT_EBADF);
    CHECK_EQ(port_accept(P, &acc, dead), 0);
    if (expect_cqe(&w, &acc, &c, 5000, "accept on a closed socket"))
        CHECK_EQ(c.res, PORT_EBADF);
    CHECK_EQ(port_close(P, &cl, dead, 0), 0);
    if (expect_cqe(&w, &cl, &c, 5000, "close of a closed socket"))
        CHECK_EQ(c.res, PORT_EBADF);
    CHECK_EQ(port_sock_close(P, dead, 0), PORT_EBADF);
    expect_quiet(&w, 20, "after the failures");
done:
    end_port(P);
}

/* ---- strands ------------------------------------------------------------------------------ */

enum { ST_POSTS = 400, ST_FREE = 200, ST_THREADS = 3, ST_BYTES = 512 * 1024 };

typedef struct st {
    port_t *P;
    port_strand_t strand;
    port_op_t posts[ST_POSTS], frees[ST_FREE], rv;
    port_sock_t srv;
    volatile long inside;          /* a thread is inside the strand */
    volatile long overlap;         /* times two threads were */
    long next_post;                /* strand state: touched only inside the strand */
    long order_errors;
    size_t recv_off;
    long recv_errors, recv_pieces;
    int recv_final;
    int64_t recv_final_res;
    volatile long frees_seen;
    volatile long done;
    volatile long wait_errors;
    volatile long per_thread[ST_THREADS];
    int yield_after;               /* >0: hand the strand on after this many queued ones */
    volatile long yields;          /* port_strand_yield calls that handed it on */
    volatile long yielder;         /* 1 + the thread that last handed it on */
    volatile long wakeups, wakeups_elsewhere;
} st_t;

static void st_dispatch(st_t *s, const port_cqe_t *c, int tid) {
    if (c->op->strand == NULL) {
        A_ADD(&s->frees_seen, 1);
        return;
    }
    if (A_XCHG(&s->inside, 1) != 0)
        A_ADD(&s->overlap, 1);
    recv_consumed(c);
    A_ADD(&s->per_thread[tid], 1);
    if (c->op == &s->rv) {
        if (c->res > 0) {
            long k;
            for (k = 0; k < c->res; k++)
                if ((unsigned char)c->buf[k] != pattern(7, s->recv_off + (size_t)k)) {
                    s->recv_errors++;
                    break;
                }
            s->recv_off += (size_t)c->res;
            s->recv_pieces++;
            port_recv_release(s->P, c);
            /* One-shot: the next receive is posted from inside the strand. */
            if (!(c->flags & PORT_CQE_MORE) && recv_post(s->P, &s->rv, s->srv) != 0)
                s->recv_errors++;
        } else if (c->res == PORT_ECANCELED) {
            /* Nobody cancelled it: the port ended a kept-armed receive whose
             * completions waited behind this strand (port.h); post it again. */
            if (recv_post(s->P, &s->rv, s->srv) != 0)
                s->recv_errors++;
        } else {
            s->recv_final_res = c->res;
            A_STORE(&s->recv_final, 1);    /* the main thread polls these two */
        }
    } else {
        long k = (long)(c->op - s->posts);
        if (k != s->next_post || c->res != k)
            s->order_errors++;
        A_STORE(&s->next_post, k + 1);
    }
    /* Dispatch takes a little while, sometimes long enough to be preempted. */
    if ((s->recv_pieces + s->next_post) % 16 == 0)
        sleep_ms(1);
    else
        yield_now();
    A_STORE(&s->inside, 0);
}

static void st_worker_body(st_t *s, int tid) {
    double t0 = now_ms();
    int run = 0;
    while (!A_LOAD(&s->done) && now_ms() - t0 < 30000) {
        port_cqe_t out[8];
        int i, n = port_wait(s->P, out, 8, 20);
        if (n == PORT_EINTR || n == 0)
            continue;
        if (n < 0) {
            A_ADD(&s->wait_errors, 1);
            break;
        }
        for (i = 0; i < n; i++) {
            port_cqe_t c = out[i];
            port_strand_t *strand = c.op->strand;
            int turn = 0;
            if (port_strand_wakeup(&c)) {
                /* A strand handed on: nothing of ours to dispatch, go on with its queue. */
                A_ADD(&s->wakeups, 1);
                if (A_LOAD(&s->yielder) != tid + 1)
                    A_ADD(&s->wakeups_elsewhere, 1);
            } else {
                st_dispatch(s, &c, tid);
            }
            if (strand != NULL) {
                run++;
                while (port_strand_next(s->P, strand, &c)) {
                    if (s->yield_after > 0 && ++turn > s->yield_after) {
                        A_STORE(&s->yielder, tid + 1);
                        if (port_strand_yield(s->P, strand, &c) == 0) {
                            A_ADD(&s->yields, 1);
                            break;
                        }
                    }
                    st_dispatch(s, &c, tid);
                    run++;
                }
            }
        }
        /* A thread that has had the strand for a long run steps aside for a moment, so
         * the strand moves between threads (what this case is about). */
        if (run >= 40) {
            port_batch_end(s->P);
            sleep_ms(10);
            run = 0;
        }
    }
    port_batch_end(s->P);
}

typedef struct st_arg {
    st_t *s;
    int tid;
} st_arg_t;

static void st_worker(void *arg) {
    st_arg_t *a = (st_arg_t *)arg;
    st_worker_body(a->s, a->tid);
}

typedef struct st_peer {
    port_sock_t s;
    volatile long failed;
} st_peer_t;

static void st_peer_thread(void *arg) {
    st_peer_t *p = (st_peer_t *)arg;
    char chunk[4096];
    size_t off = 0, j;
    while (off < ST_BYTES) {
        size_t len = sizeof(chunk) - (off % 1000);
        if (len > ST_BYTES - off)
            len = ST_BYTES - off;
        for (j = 0; j < len; j++)
            chunk[j] = (char)pattern(7, off + j);
        if (plain_send_all(p->s, chunk, len) != 0) {
            A_STORE(&p->failed, 1);
            break;
        }
        off += len;
        if ((off / len) % 8 == 0)
            sleep_ms(1);
    }
    plain_closesocket(p->s);
}

static void run_strands(int yield_after) {
    port_t *P = new_port();
    waiter_t w;
    st_t *s = (st_t *)calloc(1, sizeof(st_t));
    st_arg_t args[ST_THREADS];
    thr_t th[ST_THREADS], pt;
    st_peer_t peer;
    port_sock_t srv = PORT_INVALID_SOCK, cli = PORT_INVALID_SOCK;
    int i, nthreads = 0, peer_started = 0;
    double t0;
    memset(&peer, 0, sizeof(peer));
    REQUIRE(P != NULL && s != NULL);
    waiter_init(&w, P);
    s->P = P;
    s->yield_after = yield_after;
    port_strand_init(&s->strand, s);
    CHECK(s->strand.owner == s);
    for (i = 0; i < ST_POSTS; i++)
        port_op_init(&s->posts[i], PORT_OP_POST, s, &s->strand);
    for (i = 0; i < ST_FREE; i++)
        port_op_init(&s->frees[i], PORT_OP_POST, s, NULL);
    port_op_init(&s->rv, PORT_OP_RECV, s, &s->strand);
    REQUIRE(make_pair(&w, &srv, &cli));
    s->srv = srv;
    CHECK_EQ(recv_post(P, &s->rv, srv), 0);
    for (i = 0; i < ST_THREADS; i++) {
        args[i].s = s;
        args[i].tid = i;
        if (thr_start(&th[i], st_worker, &args[i]) == 0)
            nthreads++;
    }
    REQUIRE(nthreads == ST_THREADS);
    peer.s = cli;
    if (thr_start(&pt, st_peer_thread, &peer) == 0) {
        peer_started = 1;
        cli = PORT_INVALID_SOCK;   /* the peer thread closes it */
    }
    CHECK(peer_started);
    /* Posts on the strand, in order, in bursts, mixed with posts on no strand. */
    for (i = 0; i < ST_POSTS; i++) {
        CHECK_EQ(port_post(P, &s->posts[i], i), 0);
        if (i < ST_FREE)
            CHECK_EQ(port_post(P, &s->frees[i], i), 0);
        if (i % 10 == 9)
            sleep_ms(3);
    }
    t0 = now_ms();
    while (now_ms() - t0 < 25000) {
        /* Strand state is read here only once the strand is quiet and everything came. */
        if (A_LOAD(&s->frees_seen) == ST_FREE && A_LOAD(&s->inside) == 0) {
            long posts = (long)A_LOAD(&s->next_post);
            int fin = (int)A_LOAD(&s->recv_final);
            if (posts == ST_POSTS && fin)
                break;
        }
        sleep_ms(5);
    }
    A_STORE(&s->done, 1);
    for (i = 0; i < nthreads; i++)
        thr_join(th[i]);
    nthreads = 0;
    if (peer_started)
        thr_join(pt);
    CHECK_EQ(A_LOAD(&s->overlap), 0);
    CHECK_EQ(s->order_errors, 0);
    CHECK_EQ(s->next_post, ST_POSTS);
    CHECK_EQ(A_LOAD(&s->frees_seen), ST_FREE);
    CHECK_EQ(A_LOAD(&s->wait_errors), 0);
    CHECK_EQ(peer.failed, 0);
    CHECK_EQ(s->recv_errors, 0);
    CHECK_EQ(s->recv_off, ST_BYTES);
    CHECK(s->recv_final);
    CHECK_EQ(s->recv_final_res, 0);
    CHECK(port__strand_idle(&s->strand));
    {
        int busy = 0;
        for (i = 0; i < ST_THREADS; i++)
            busy += A_LOAD(&s->per_thread[i]) > 0;
        note("strand completions per thread: %ld %ld %ld; %ld receive pieces",
             A_LOAD(&s->per_thread[0]), A_LOAD(&s->per_thread[1]),
             A_LOAD(&s->per_thread[2]), s->recv_pieces);
        CHECKF(busy >= 2, "only one thread ever held the strand (the case proves nothing)");
    }
    if (yield_after > 0) {
        note("strand handed on %ld times; %ld wake-ups, %ld on another thread",
             A_LOAD(&s->yields), A_LOAD(&s->wakeups), A_LOAD(&s->wakeups_elsewhere));
        CHECKF(A_LOAD(&s->yields) > 0, "the strand was never handed on (proves nothing)");
        CHECK_EQ(A_LOAD(&s->wakeups), A_LOAD(&s->yields));
        /* Which thread takes a wake-up is the scheduler's choice: under ASan or load
         * the yielding thread sometimes takes them all (seen twice on 2026-12-06). The
         * hand-on itself is checked above; this only says whether the run showed it. */
        if (A_LOAD(&s->wakeups_elsewhere) == 0)
            note("no wake-up was taken by another thread this run (scheduling)");
    }
    close_op(&w, srv, 0);
    srv = PORT_INVALID_SOCK;
done:
    if (s != NULL) {
        A_STORE(&s->done, 1);
        for (i = 0; i < nthreads; i++)
            thr_join(th[i]);
        cancel_recv(&w, &s->rv);
    }
    plain_close(cli);
    if (srv != PORT_INVALID_SOCK)
        port_sock_close(P, srv, 0);
    end_port(P);
    if (s != NULL)
        port_strand_discard(NULL, &s->strand);   /* frees the wake-up record of a yield */
    free(s);
}

static void case_strands(void) { run_strands(0); }

/* The same with the strand handed on (port_strand_yield) after every 3 queued
 * completions: still in order, never two threads inside, and the wake-ups go to
 * whichever thread reaps them. */
static void case_strand_yield_threads(void) { run_strands(3); }

/* port_strand_yield, step by step on one thread (plus one helper thread): the yielded
 * completion comes back first, before what was queued behind it and what arrives after
 * the yield; the wake-up is in flight (a drain waits for it, none is lost), another
 * thread can continue the strand; once the port is shut down, yield refuses and the
 * holder goes on itself. */
enum { SY_POSTS = 12 };

typedef struct sy {
    port_t *P;
    port_strand_t strand;
    port_op_t posts[SY_POSTS];
    long next;                 /* the next post value expected */
    long errors;
    int got;                   /* completions dispatched by the helper thread */
} sy_t;

static void sy_dispatch(sy_t *s, const port_cqe_t *c) {
    long k = (long)(c->op - s->posts);
    if (c->op->strand != &s->strand || k < 0 || k >= SY_POSTS || k != s->next ||
        c->res != k)
        s->errors++;
    s->next = k + 1;
}

/* Wait for the strand's wake-up (nothing else may come) and run the strand dry. */
static void sy_continue(void *arg) {
    sy_t *s = (sy_t *)arg;
    port_cqe_t out[8], c;
    int n;
    double t0 = now_ms();
    do
        n = port_wait(s->P, out, 8, 100);
    while ((n == 0 || n == PORT_EINTR) && now_ms() - t0 < 5000);
    if (n != 1 || !port_strand_wakeup(&out[0]) || out[0].op->strand != &s->strand) {
        s->errors += 1000;
        return;
    }
    while (port_strand_next(s->P, &s->strand, &c)) {
        sy_dispatch(s, &c);
        s->got++;
    }
    port_batch_end(s->P);
}

/* Post values a..b-1 on the strand; take the first alone (one batch holds the strand),
 * then the rest, which another batch queues on the strand. */
static int sy_hold_with_queue(sy_t *s, int a, int b, port_cqe_t *first) {
    port_cqe_t out1[1], out2[8];
    int i, n;
    double t0;
    for (i = a; i < b; i++)
        if (port_post(s->P, &s->posts[i], i) != 0)
            return 0;
    t0 = now_ms();
    do
        n = port_wait(s->P, out1, 1, 100);
    while ((n == 0 || n == PORT_EINTR) && now_ms() - t0 < 5000);
    if (n != 1)
        return 0;
    *first = out1[0];
    /* Whatever else is ready: all of it goes to the strand's queue. */
    n = port_wait(s->P, out2, 8, 50);
    port_batch_end(s->P);
    return n == 0;
}

static void case_strand_yield(void) {
    port_t *P = new_port();
    sy_t *s = (sy_t *)calloc(1, sizeof(sy_t));
    port_cqe_t c, out[8];
    port_stats_t st;
    thr_t th;
    int i, n;
    double t0;
    REQUIRE(P != NULL && s != NULL);
    s->P = P;
    port_strand_init(&s->strand, s);
    for (i = 0; i < SY_POSTS; i++)
        port_op_init(&s->posts[i], PORT_OP_POST, s, &s->strand);

    /* 1. Yield the second of 0..3; post 4 afterwards: 1 comes back first, then 2, 3, 4.
     *    The wake-up record is made by the first yield (an idle strand has none). */
    REQUIRE(sy_hold_with_queue(s, 0, 4, &c));
    sy_dispatch(s, &c);                                /* 0 */
    REQUIRE(port_strand_next(P, &s->strand, &c));      /* 1: held, not dispatched */
    CHECKF(s->strand.wake == NULL, "a strand that never yielded has a wake-up record");
    CHECK_EQ(port_strand_yield(P, &s->strand, &c), 0);
    CHECK(s->strand.wake != NULL);
    CHECK(!port__strand_idle(&s->strand));
    port_get_stats(P, &st);
    CHECKF(st.in_flight == 1, "the wake-up is in flight: in_flight %lld", (long long)st.in_flight);
    CHECK_EQ(port_post(P, &s->posts[4], 4), 0);
    t0 = now_ms();
    do
        n = port_wait(P, out, 8, 100);
    while ((n == 0 || n == PORT_EINTR) && now_ms() - t0 < 5000);
    port_batch_end(P);
    /* Only the wake-up: post 4 arrived after it took the strand, behind the queue. */
    CHECK_EQ(n, 1);
    REQUIRE(n >= 1 && port_strand_wakeup(&out[0]) && out[0].op->strand == &s->strand);
    for (i = 1; i < n; i++)
        CHECKF(0, "a completion beside the wake-up (op type %d)", out[i].op->type);
    while (port_strand_next(P, &s->strand, &c))
        sy_dispatch(s, &c);                            /* 1, 2, 3, 4 */
    CHECK_EQ(s->next, 5);
    CHECK(port__strand_idle(&s->strand));

    /* 2. Yield, and another thread (as a worker would, this one being about to stop)
     *    reaps the wake-up and runs the rest: nothing is lost, order is kept. */
    REQUIRE(sy_hold_with_queue(s, 5, 9, &c));
    sy_dispatch(s, &c);                                /* 5 */
    REQUIRE(port_strand_next(P, &s->strand, &c));      /* 6 */
    CHECK_EQ(port_strand_yield(P, &s->strand, &c), 0);
    REQUIRE(thr_start(&th, sy_continue, s) == 0);
    thr_join(th);
    CHECK_EQ(s->got, 3);                               /* 6, 7, 8 on the other thread */
    CHECK_EQ(s->next, 9);
    CHECK(port__strand_idle(&s->strand));

    /* 3. Once the port is shut down the wake-up cannot be posted: yield refuses, changes
     *    nothing, and the holder goes on with the strand itself. */
    REQUIRE(sy_hold_with_queue(s, 9, 12, &c));
    sy_dispatch(s, &c);                                /* 9 */
    REQUIRE(port_strand_next(P, &s->strand, &c));      /* 10 */
    port_shutdown(P);
    CHECK_EQ(port_strand_yield(P, &s->strand, &c), PORT_ECLOSED);
    sy_dispatch(s, &c);                                /* 10 */
    while (port_strand_next(P, &s->strand, &c))
        sy_dispatch(s, &c);                            /* 11 */
    CHECK_EQ(s->next, SY_POSTS);
    CHECK(port__strand_idle(&s->strand));
    /* Yielding a strand nobody holds is refused too. */
    CHECK_EQ(port_strand_yield(P, &s->strand, &c), PORT_EINVAL);
    CHECK(port__strand_idle(&s->strand));
    CHECK_EQ(s->errors, 0);
done:
    end_port(P);
    /* After the port: a case stopped half-way may have left the wake-up in flight.  Only
     * posts were queued (no receive buffer to give back), and the record goes. */
    if (s != NULL)
        port_strand_discard(NULL, &s->strand);
    free(s);
}

/* ---- shutdown ----------------------------------------------------------------------------- */

typedef struct sd_waiter {
    port_t *P;
    int rc;
    double elapsed;
} sd_waiter_t;

static void sd_thread(void *arg) {
    sd_waiter_t *s = (sd_waiter_t *)arg;
    port_cqe_t out[4];
    double t0 = now_ms();
    do
        s->rc = port_wait(s->P, out, 4, 10000);
    while (s->rc == PORT_EINTR || s->rc == 0);
    s->elapsed = now_ms() - t0;
}

static void case_shutdown(void) {
    enum { N = 3 };
    port_t *P = new_port();
    sd_waiter_t ws[N];
    thr_t th[N];
    port_op_t op;
    port_cqe_t out[4];
    int i, started = 0;
    double t0;
    REQUIRE(P != NULL);
    for (i = 0; i < N; i++) {
        ws[i].P = P;
        ws[i].rc = 1;
        ws[i].elapsed = 0;
        if (thr_start(&th[i], sd_thread, &ws[i]) == 0)
            started++;
    }
    REQUIRE(started == N);
    sleep_ms(150);
    t0 = now_ms();
    port_shutdown(P);
    for (i = 0; i < N; i++)
        thr_join(th[i]);
    CHECKF(now_ms() - t0 < 3000, "waiters took %.0f ms to wake", now_ms() - t0);
    for (i = 0; i < N; i++) {
        CHECKF(ws[i].rc == PORT_ECLOSED, "waiter %d: rc %d %s", i, ws[i].rc,
               port_errname(ws[i].rc));
        CHECKF(ws[i].elapsed < 5000, "waiter %d waited %.0f ms", i, ws[i].elapsed);
    }
    CHECK_EQ(port_wait(P, out, 4, 0), PORT_ECLOSED);
    t0 = now_ms();
    CHECK_EQ(port_wait(P, out, 4, 1000), PORT_ECLOSED);
    CHECK(now_ms() - t0 < 500);
    port_op_init(&op, PORT_OP_POST, NULL, NULL);
    CHECK_EQ(port_post(P, &op, 1), PORT_ECLOSED);
    CHECK(!op.in_flight);
    port_shutdown(P);   /* idempotent */
    CHECK_EQ(port_wait(P, out, 4, 0), PORT_ECLOSED);
done:
    end_port(P);
}

/* ---- stats -------------------------------------------------------------------------------- */

static void case_stats_balance(void) {
    port_t *P = new_port();
    waiter_t w;
    port_stats_t st;
    port_op_t posts[5], rv;
    port_sock_t srv = PORT_INVALID_SOCK, cli = PORT_INVALID_SOCK;
    port_cqe_t c, held;
    int i;
    uint64_t sub0;
    port_op_init(&rv, PORT_OP_RECV, NULL, NULL);
    REQUIRE(P != NULL);
    waiter_init(&w, P);
    port_get_stats(P, &st);
    CHECK_EQ(st.submitted, 0);
    CHECK_EQ(st.completed, 0);
    CHECK_EQ(st.in_flight, 0);
    CHECK_EQ(st.recv_buffers_out, 0);
    for (i = 0; i < 5; i++) {
        port_op_init(&posts[i], PORT_OP_POST, NULL, NULL);
        CHECK_EQ(port_post(P, &posts[i], i), 0);
    }
    port_get_stats(P, &st);
    CHECK_EQ(st.submitted, 5);
    CHECK_EQ(st.in_flight, 5);
    for (i = 0; i < 5; i++)
        if (next_cqe(&w, &c, 5000) != 1)
            CHECKF(0, "post %d missing", i);
    port_get_stats(P, &st);
    CHECK_EQ(st.completed, 5);
    CHECK_EQ(st.in_flight, 0);
    REQUIRE(make_pair(&w, &srv, &cli));
    port_get_stats(P, &st);
    sub0 = st.submitted;
    CHECK_EQ(st.in_flight, 0);
    CHECK_EQ(recv_post(P, &rv, srv), 0);
    CHECK(plain_send_all(cli, "abcd", 4) == 0);
    port_get_stats(P, &st);
    CHECK_EQ(st.submitted, sub0 + 1);
    CHECK_EQ(st.in_flight, 1);
    if (expect_cqe(&w, &rv, &held, 5000, "recv")) {
        CHECK(held.flags & PORT_CQE_BUFFER);
        port_get_stats(P, &st);
        CHECK_EQ(st.recv_buffers_out, 1);   /* held by us */
        CHECK(st.recv_buffers >= 1);
        /* A one-shot receive is over; a multishot one stays armed. */
        CHECK_EQ(st.in_flight, (held.flags & PORT_CQE_MORE) ? 1 : 0);
        port_recv_release(P, &held);
        port_get_stats(P, &st);
        CHECK_EQ(st.recv_buffers_out, 0);
    }
    cancel_recv(&w, &rv);
    port_get_stats(P, &st);
    CHECK_EQ(st.in_flight, 0);
    CHECK_EQ(st.submitted, st.completed);
    close_op(&w, srv, 0);
    srv = PORT_INVALID_SOCK;
done:
    cancel_recv(&w, &rv);
    plain_close(cli);
    if (srv != PORT_INVALID_SOCK)
        port_sock_close(P, srv, 0);
    end_port(P);
}

/* ---- the receive pool under pressure ------------------------------------------------------ */

/* Connection i sends msg[i]; its receive takes one buffer of the pool, which is held
 * (held[i]) and checked.  Returns how many were received (n unless a check failed). */
static int hold_one_each(waiter_t *w, port_op_t *rv, const port_sock_t *srv,
                         const port_sock_t *cli, char (*msg)[32], int n, port_cqe_t *held,
                         const char *what) {
    int i;
    for (i = 0; i < n; i++) {
        CHECK(plain_send_all(cli[i], msg[i], strlen(msg[i])) == 0);
        if (!recv_next(w, &rv[i], srv[i], &held[i], 5000, what))
            break;
        check_data_cqe(&held[i]);
        CHECK(held[i].res == (int64_t)strlen(msg[i]) &&
              memcmp(held[i].buf, msg[i], strlen(msg[i])) == 0);
    }
    return i;
}

/* The end of a pool case: what is held goes back, the receives end, the sockets close. */
static void end_pool_case(waiter_t *w, port_cqe_t *held, int nheld, port_op_t *rv,
                          port_sock_t *srv, port_sock_t *cli, int nconn) {
    int i;
    while (nheld > 0)
        port_recv_release(w->p, &held[--nheld]);
    for (i = 0; i < nconn; i++) {
        cancel_recv(w, &rv[i]);
        plain_close(cli[i]);
        if (srv[i] != PORT_INVALID_SOCK)
            port_sock_close(w->p, srv[i], 0);
    }
    end_port(w->p);
}

/* Buffers held by the caller are not reused; when all are out, a receive with data
 * waiting completes only after a release (no data lost, no error).  NBUF connections
 * each hold one buffer; one more connection's receive must wait for a release. */
static void case_recv_pool_backpressure(void) {
    enum { NBUF = 4, BUFSZ = 1024, NCONN = NBUF + 1 };
    port_options_t o;
    port_t *P;
    waiter_t w;
    port_sock_t srv[NCONN], cli[NCONN];
    port_op_t rv[NCONN];
    port_cqe_t held[NBUF], c;
    char msg[NCONN][32];
    int nheld = 0, i, j, nconn = 0;
    memset(&o, 0, sizeof(o));
    o.recv_buffer_count = NBUF;
    o.recv_buffer_size = BUFSZ;
    for (i = 0; i < NCONN; i++) {
        srv[i] = cli[i] = PORT_INVALID_SOCK;
        port_op_init(&rv[i], PORT_OP_RECV, NULL, NULL);
        snprintf(msg[i], sizeof(msg[i]), "message %d", i);
    }
    P = new_port_opts(&o);
    REQUIRE(P != NULL);
    waiter_init(&w, P);
    for (nconn = 0; nconn < NCONN; nconn++)
        REQUIRE(make_pair(&w, &srv[nconn], &cli[nconn]));
    /* Each of the first NBUF connections takes one buffer, which we hold. */
    nheld = hold_one_each(&w, rv, srv, cli, msg, NBUF, held, "recv into the pool");
    REQUIRE(nheld == NBUF);
    for (i = 0; i < NBUF; i++)
        for (j = i + 1; j < NBUF; j++)
            CHECK(held[i].buf != held[j].buf);
    /* The pool is empty: the last connection's data waits. */
    CHECK(plain_send_all(cli[NBUF], msg[NBUF], strlen(msg[NBUF])) == 0);
    CHECK_EQ(recv_post(P, &rv[NBUF], srv[NBUF]), 0);
    expect_quiet(&w, 80, "all buffers held");
    port_recv_release(P, &held[--nheld]);
    if (expect_cqe(&w, &rv[NBUF], &c, 5000, "recv after a release")) {
        check_data_cqe(&c);
        CHECK(c.res == (int64_t)strlen(msg[NBUF]) &&
              memcmp(c.buf, msg[NBUF], strlen(msg[NBUF])) == 0);
        port_recv_release(P, &c);
    }
    {
        port_stats_t st;
        port_get_stats(P, &st);
        CHECKF(st.recv_buffers <= NBUF, "the pool made %llu buffers, limit %d",
               (unsigned long long)st.recv_buffers, NBUF);
    }
done:
    end_pool_case(&w, held, nheld, rv, srv, cli, nconn);
}

/* The pool gives back what a spike made (port_recv_pool_trim): NCONN receives held at
 * once grow it past its floor; once they are back and a window or two has passed with
 * nothing lent, the trims take it back to the floor, a buffer the caller kept
 * (detached) stays the caller's and intact, and the pool still serves receives.  On
 * io_uring the buffers come back out of the ring through the port's own receives, so
 * the port is waited on meanwhile (nothing may complete for the caller). */
static void case_recv_pool_trim(void) {
    enum { NCONN = 24, BUFSZ = 1024, WINDOW_MS = 100 };
    port_options_t o;
    port_t *P;
    waiter_t w;
    port_sock_t srv[NCONN], cli[NCONN];
    port_op_t rv[NCONN];
    port_cqe_t held[NCONN];
    port_stats_t st;
    char msg[NCONN][32], *kept = NULL;
    int nheld = 0, i, nconn = 0, tries;
    int64_t ms, grew;
    uint64_t spike;
    memset(&o, 0, sizeof(o));
    o.recv_buffer_count = 64;
    o.recv_buffer_size = BUFSZ;
    o.recv_pool_window_ms = WINDOW_MS;
    for (i = 0; i < NCONN; i++) {
        srv[i] = cli[i] = PORT_INVALID_SOCK;
        port_op_init(&rv[i], PORT_OP_RECV, NULL, NULL);
        snprintf(msg[i], sizeof(msg[i]), "spike message %d", i);
    }
    P = new_port_opts(&o);
    REQUIRE(P != NULL);
    waiter_init(&w, P);
    for (nconn = 0; nconn < NCONN; nconn++)
        REQUIRE(make_pair(&w, &srv[nconn], &cli[nconn]));
    nheld = hold_one_each(&w, rv, srv, cli, msg, NCONN, held, "recv of the spike");
    REQUIRE(nheld == NCONN);
    port_get_stats(P, &st);
    spike = st.recv_buffers;
    CHECKF(spike >= NCONN, "the pool holds %llu buffers with %d lent",
           (unsigned long long)spike, NCONN);
    grew = port_recv_pool_grew(P);
    CHECKF(grew == WINDOW_MS, "port_recv_pool_grew said %lld", (long long)grew);
    CHECK_EQ(port_recv_pool_grew(P), 0);          /* once */
    /* Keep one (the caller's for good), give the rest back. */
    CHECK_EQ(port_recv_detach(P, &held[0]), 0);
    kept = held[0].buf;
    for (i = 1; i < nheld; i++)
        port_recv_release(P, &held[i]);
    nheld = 0;
    /* Trim as the core's timer does, waiting on the port between calls. */
    ms = grew;
    for (tries = 0; tries < 200 && ms > 0; tries++) {
        expect_quiet(&w, ms < 50 ? (int)ms : 50, "trimming");
        ms = port_recv_pool_trim(P);
    }
    CHECKF(ms == 0, "the trims went on: %lld ms after %d calls", (long long)ms, tries);
    port_get_stats(P, &st);
    CHECKF(st.recv_buffers <= 8, "the pool holds %llu buffers after the spike (%llu then)",
           (unsigned long long)st.recv_buffers, (unsigned long long)spike);
    CHECKF(st.recv_buffers_trimmed + st.recv_buffers >= spike,
           "%llu given back, %llu held, %llu after the spike",
           (unsigned long long)st.recv_buffers_trimmed, (unsigned long long)st.recv_buffers,
           (unsigned long long)spike);
    CHECK(st.recv_buffers_trimmed > 0);
    CHECK_EQ(st.recv_buffers_out, 0);
    CHECK(memcmp(kept, msg[0], strlen(msg[0])) == 0);
    /* The pool serves receives again, and grows again. */
    nheld = hold_one_each(&w, rv, srv, cli, msg, NCONN, held, "recv after the trim");
    port_get_stats(P, &st);
    CHECK(st.recv_buffers >= (uint64_t)nheld);
    CHECK(port_recv_pool_grew(P) > 0);
done:
    end_pool_case(&w, held, nheld, rv, srv, cli, nconn);
    port_buf_free(kept);      /* after the port: the caller's memory outlives it */
}

/* A receive waiting for a pool buffer is cancelled like any other. */
static void case_recv_parked_cancel(void) {
    port_options_t o;
    port_t *P;
    waiter_t w;
    port_sock_t srv[2], cli[2];
    port_op_t rv[2];
    port_cqe_t held, c;
    int i, nconn = 0, holding = 0;
    memset(&o, 0, sizeof(o));
    o.recv_buffer_count = 1;
    o.recv_buffer_size = 512;
    for (i = 0; i < 2; i++) {
        srv[i] = cli[i] = PORT_INVALID_SOCK;
        port_op_init(&rv[i], PORT_OP_RECV, NULL, NULL);
    }
    P = new_port_opts(&o);
    REQUIRE(P != NULL);
    waiter_init(&w, P);
    for (nconn = 0; nconn < 2; nconn++)
        REQUIRE(make_pair(&w, &srv[nconn], &cli[nconn]));
    CHECK(plain_send_all(cli[0], "a", 1) == 0);
    REQUIRE(recv_next(&w, &rv[0], srv[0], &held, 5000, "recv the only buffer"));
    holding = 1;
    CHECK(plain_send_all(cli[1], "b", 1) == 0);
    CHECK_EQ(recv_post(P, &rv[1], srv[1]), 0);
    expect_quiet(&w, 50, "no buffer left");
    CHECK_EQ(port_cancel(P, &rv[1]), 0);
    if (expect_cqe(&w, &rv[1], &c, 5000, "cancelled parked recv")) {
        CHECK_EQ(c.res, PORT_ECANCELED);
        CHECK(!(c.flags & (PORT_CQE_MORE | PORT_CQE_BUFFER)));
    }
    CHECK(!rv[1].in_flight);
    port_recv_release(P, &held);
    holding = 0;
    /* Nothing was lost: the byte is still there for the next receive. */
    if (recv_next(&w, &rv[1], srv[1], &c, 5000, "recv after the cancel")) {
        CHECK(c.res == 1 && c.buf != NULL && c.buf[0] == 'b');
        port_recv_release(P, &c);
    }
done:
    if (holding)
        port_recv_release(P, &held);
    for (i = 0; i < nconn; i++) {
        cancel_recv(&w, &rv[i]);
        plain_close(cli[i]);
        if (srv[i] != PORT_INVALID_SOCK)
            port_sock_close(P, srv[i], 0);
    }
    end_port(P);
}

/* A stream of completions that fills every batch must not starve a socket: once its
 * data is there, a receive completes within a few batches.  (The epoll backend once
 * returned queued completions without polling whenever they alone filled the batch.) */
static void case_recv_not_starved(void) {
    enum { NPOST = 16, MAXB = 4, MAX_WAITS = 2 * NPOST / MAXB + 4 };
    port_t *P = new_port();
    waiter_t w;
    port_sock_t srv = PORT_INVALID_SOCK, cli = PORT_INVALID_SOCK;
    port_op_t rv, posts[NPOST];
    port_cqe_t q[MAXB];
    int i, k, waits = 0, got = 0, busy;
    double deadline;
    port_op_init(&rv, PORT_OP_RECV, NULL, NULL);
    for (i = 0; i < NPOST; i++)
        port_op_init(&posts[i], PORT_OP_POST, NULL, NULL);
    REQUIRE(P != NULL);
    waiter_init(&w, P);
    REQUIRE(make_pair(&w, &srv, &cli));
    CHECK_EQ(recv_post(P, &rv, srv), 0);
    expect_quiet(&w, 20, "recv with no data yet");   /* parked, waiting for data */
    for (i = 0; i < NPOST; i++)
        CHECK_EQ(port_post(P, &posts[i], i), 0);
    CHECK(plain_send_all(cli, "x", 1) == 0);
    deadline = now_ms() + 5000;
    while (!got && now_ms() < deadline) {
        int n = port_wait(P, q, MAXB, 100);
        port_batch_end(P);
        if (n == PORT_EINTR)
            continue;
        REQUIRE(n >= 0);
        waits++;
        for (k = 0; k < n; k++) {
            recv_consumed(&q[k]);
            if (q[k].op == &rv) {
                CHECK(q[k].res == 1 && q[k].buf != NULL && q[k].buf[0] == 'x');
                port_recv_release(P, &q[k]);
                got = 1;
            } else if (q[k].op->type == PORT_OP_POST && !got) {
                CHECK_EQ(port_post(P, q[k].op, 0), 0);   /* keep every batch full */
            }
        }
    }
    CHECKF(got, "the receive never completed in %d batches filled by posts", waits);
    CHECKF(waits <= MAX_WAITS, "the receive took %d batches (bound %d)", waits, MAX_WAITS);
done:
    /* Let the posts still queued come out before the receive is cancelled. */
    deadline = now_ms() + 5000;
    do {
        busy = 0;
        for (i = 0; i < NPOST; i++)
            busy |= posts[i].in_flight;
        if (busy) {
            int n = port_wait(P, q, MAXB, 100);
            port_batch_end(P);
            for (k = 0; k < n; k++) {
                recv_consumed(&q[k]);
                if (q[k].flags & PORT_CQE_BUFFER)
                    port_recv_release(P, &q[k]);
            }
        }
    } while (busy && now_ms() < deadline);
    CHECKF(!busy, "posts still in flight after 5 s");
    cancel_recv(&w, &rv);
    plain_close(cli);
    if (srv != PORT_INVALID_SOCK)
        port_sock_close(P, srv, 0);
    end_port(P);
}

/* ---- descriptor lifetime ---------------------------------------------------------------- */

/* Enter a batch: take one completion and do not end the batch, so that (on io_uring)
 * what this thread submits now waits for its next port_wait, as a hook's does. */
static int enter_batch(port_t *P, port_op_t *post) {
    port_cqe_t q[4];
    int n;
    double deadline = now_ms() + 5000;
    if (port_post(P, post, 7) != 0)
        return 0;
    do
        n = port_wait(P, q, 4, 100);
    while ((n == 0 || n == PORT_EINTR) && now_ms() < deadline);
    return n == 1 && q[0].op == post;
}

/* A socket closed while operations submitted before the close have not reached the kernel
 * yet (io_uring hands a dispatching thread's submissions over with its next wait): the
 * close is ordered after them (port.h, "Descriptors").  Its number is reused at once by a
 * new connection, which must see neither the old send's bytes nor lose its own first
 * bytes to the old receive.  (A hook that calls Send then Abort, while another session's
 * accept reuses the number, did exactly this.) */
static void case_close_orders_after_ops(void) {
    static const char secret[] = "OLD-SECRET";
    port_t *P = new_port();
    waiter_t w;
    port_sock_t srv = PORT_INVALID_SOCK, cli = PORT_INVALID_SOCK, l2 = PORT_INVALID_SOCK;
    port_sock_t c2 = PORT_INVALID_SOCK, a2 = PORT_INVALID_SOCK, old = PORT_INVALID_SOCK;
    port_addr_t b2;
    port_op_t post, sd, rv, cl;
    port_buf_t b;
    port_cqe_t c;
    char got[32];
    size_t k;
    int pending = 3;
    port_op_init(&post, PORT_OP_POST, NULL, NULL);
    port_op_init(&sd, PORT_OP_SEND, NULL, NULL);
    port_op_init(&rv, PORT_OP_RECV, NULL, NULL);
    port_op_init(&cl, PORT_OP_CLOSE, NULL, NULL);
    REQUIRE(P != NULL);
    waiter_init(&w, P);
    REQUIRE(make_pair(&w, &srv, &cli));
    l2 = plain_listen(&b2);
    REQUIRE(l2 != PORT_INVALID_SOCK);
    REQUIRE(enter_batch(P, &post));
    b.base = secret;
    b.len = sizeof(secret) - 1;
    CHECK_EQ(port_send(P, &sd, srv, &b, 1), 0);
    CHECK_EQ(port_recv(P, &rv, srv), 0);
    /* What a session's abort does: cancel what is in flight, then close. */
    CHECK_EQ(port_cancel(P, &rv), 0);
    CHECK_EQ(port_cancel(P, &sd), 0);
    CHECK_EQ(port_close(P, &cl, srv, PORT_CLOSE_RESET), 0);
    old = srv;
    srv = PORT_INVALID_SOCK;
    /* A new connection, made while the batch is still being dispatched: the lowest free
     * number, the one just closed if the close already happened. */
    c2 = plain_connect(&b2);
    REQUIRE(c2 != PORT_INVALID_SOCK);
    a2 = plain_accept(l2, 5000);
    REQUIRE(a2 != PORT_INVALID_SOCK);
    note("old socket %d, new client socket %d, new server socket %d", (int)old, (int)c2,
         (int)a2);
    CHECK(plain_send_all(a2, "NEW-FIRST", 9) == 0);
    /* The next wait hands the batch's submissions to the kernel. */
    while (pending > 0) {
        if (next_cqe(&w, &c, 5000) != 1) {
            CHECKF(0, "%d completion(s) missing after the close", pending);
            break;
        }
        if (c.op == &sd || c.op == &rv || c.op == &cl)
            pending--;
        if (c.op == &rv)
            CHECKF(c.res < 0 || c.res == 0, "the old receive read %lld bytes after its socket "
                   "was closed: %.*s", (long long)c.res, (int)(c.res > 0 ? c.res : 0),
                   c.res > 0 ? c.buf : "");
        if (c.op == &cl)
            CHECK_EQ(c.res, 0);
        port_recv_release(P, &c);
    }
    /* The new connection's own first bytes are there, untouched. */
    plain_set_timeout(c2, 1000);
    k = plain_recv_all(c2, got, 9);
    CHECKF(k == 9 && memcmp(got, "NEW-FIRST", 9) == 0,
           "the new connection lost its first bytes: got %u: %.*s", (unsigned)k, (int)k, got);
    /* ... and the first bytes its peer receives are its own, not the old send's. */
    CHECK(plain_send_all(c2, "HELLO", 5) == 0);
    plain_set_timeout(a2, 1000);
    k = plain_recv_all(a2, got, 5);
    CHECKF(k == 5 && memcmp(got, "HELLO", 5) == 0,
           "bytes sent on the closed socket reached the new connection: %.*s", (int)k, got);
done:
    plain_close(c2);
    plain_close(a2);
    plain_close(l2);
    plain_close(cli);
    if (srv != PORT_INVALID_SOCK)
        port_sock_close(P, srv, 0);
    end_port(P);
}

/* The same rule for port_sock_close (a listener closed while its cancelled accept has not
 * reached the kernel yet): a new listener that reuses the number keeps its connections. */
static void case_sock_close_orders_after_ops(void) {
    port_t *P = new_port();
    waiter_t w;
    port_sock_t l1 = PORT_INVALID_SOCK, l2 = PORT_INVALID_SOCK, c3 = PORT_INVALID_SOCK;
    port_sock_t a3 = PORT_INVALID_SOCK, old = PORT_INVALID_SOCK;
    port_addr_t a, b2;
    port_op_t post, acc;
    port_cqe_t c;
    port_op_init(&post, PORT_OP_POST, NULL, NULL);
    port_op_init(&acc, PORT_OP_ACCEPT, NULL, NULL);
    REQUIRE(P != NULL);
    waiter_init(&w, P);
    REQUIRE(loopback(&a) == 0);
    REQUIRE(port_listen(P, &a, 16, 0, &l1) == 0);
    REQUIRE(enter_batch(P, &post));
    CHECK_EQ(port_accept(P, &acc, l1), 0);
    CHECK_EQ(port_cancel(P, &acc), 0);
    CHECK_EQ(port_sock_close(P, l1, 0), 0);
    old = l1;
    l1 = PORT_INVALID_SOCK;
    l2 = plain_listen(&b2);
    REQUIRE(l2 != PORT_INVALID_SOCK);
    note("old listener %d, new listener %d", (int)old, (int)l2);
    c3 = plain_connect(&b2);
    REQUIRE(c3 != PORT_INVALID_SOCK);
    if (expect_cqe(&w, &acc, &c, 5000, "the cancelled accept")) {
        CHECKF(c.res < 0, "the old accept took a connection of the listener that reused its "
               "number (socket %lld)", (long long)c.res);
        if (c.res >= 0)
            port_sock_close(P, (port_sock_t)c.res, 0);
    }
    a3 = plain_accept(l2, 2000);
    CHECKF(a3 != PORT_INVALID_SOCK, "the new listener lost its connection");
done:
    plain_close(a3);
    plain_close(c3);
    plain_close(l2);
    if (l1 != PORT_INVALID_SOCK)
        port_sock_close(P, l1, 0);
    end_port(P);
}

/* ---- receive buffer waiters ----------------------------------------------------------- */

/* Receives waiting for a pool buffer are served one per buffer given back, oldest first:
 * no stampede of re-armed receives, and no newcomer served before older waiters. */
static void case_recv_waiters_in_order(void) {
    enum { NBUF = 2, BUFSZ = 512, NW = 4, NCONN = NBUF + NW };
    port_options_t o;
    port_t *P;
    waiter_t w;
    port_sock_t srv[NCONN], cli[NCONN];
    port_op_t rv[NCONN];
    port_cqe_t held[NBUF], c;
    char msg[NCONN][16];
    int nheld = 0, i, nconn = 0;
    memset(&o, 0, sizeof(o));
    o.recv_buffer_count = NBUF;
    o.recv_buffer_size = BUFSZ;
    for (i = 0; i < NCONN; i++) {
        srv[i] = cli[i] = PORT_INVALID_SOCK;
        port_op_init(&rv[i], PORT_OP_RECV, NULL, NULL);
        snprintf(msg[i], sizeof(msg[i]), "conn %d", i);
    }
    P = new_port_opts(&o);
    REQUIRE(P != NULL);
    waiter_init(&w, P);
    for (nconn = 0; nconn < NCONN; nconn++)
        REQUIRE(make_pair(&w, &srv[nconn], &cli[nconn]));
    for (i = 0; i < NBUF; i++) {
        CHECK(plain_send_all(cli[i], msg[i], strlen(msg[i])) == 0);
        REQUIRE(recv_next(&w, &rv[i], srv[i], &held[nheld], 5000, "take a buffer"));
        nheld++;
    }
    /* The waiters, in this order, each with data and no buffer. */
    for (i = NBUF; i < NCONN; i++) {
        port_stats_t st;
        CHECK(plain_send_all(cli[i], msg[i], strlen(msg[i])) == 0);
        CHECK_EQ(recv_post(P, &rv[i], srv[i]), 0);
        expect_quiet(&w, 40, "waiting for a buffer");
        port_get_stats(P, &st);
        CHECK_EQ(st.recv_waiting, i - NBUF + 1);
    }
    /* Each buffer given back serves exactly the oldest waiter. */
    for (i = NBUF; i < NCONN; i++) {
        port_recv_release(P, &held[0]);
        held[0] = held[1];
        nheld--;
        if (next_cqe(&w, &c, 5000) != 1) {
            CHECKF(0, "waiter %d was not served after a buffer was given back", i - NBUF);
            break;
        }
        if (c.op != &rv[i]) {
            CHECKF(0, "waiter %d was served before waiter %d", (int)(c.op - rv) - NBUF, i - NBUF);
            port_recv_release(P, &c);
            break;
        }
        CHECK(c.res == (int64_t)strlen(msg[i]) && memcmp(c.buf, msg[i], strlen(msg[i])) == 0);
        held[nheld++] = c;
        expect_quiet(&w, 30, "one waiter per buffer");
    }
done:
    while (nheld > 0)
        port_recv_release(P, &held[--nheld]);
    for (i = 0; i < nconn; i++) {
        cancel_recv(&w, &rv[i]);
        plain_close(cli[i]);
        if (srv[i] != PORT_INVALID_SOCK)
            port_sock_close(P, srv[i], 0);
    }
    end_port(P);
}

/* Receives posted on idle connections while every buffer is out do not wait for one
 * (io_uring: a receive that does not poll first fails with ENOBUFS before it even looks
 * for data); only a receive with data waits, so a buffer given back goes to it and not
 * to an idle connection that would strand it. */
static void case_recv_idle_do_not_wait(void) {
    enum { NIDLE = 4, NCONN = NIDLE + 2 };
    port_options_t o;
    port_t *P;
    waiter_t w;
    port_sock_t srv[NCONN], cli[NCONN];
    port_op_t rv[NCONN];
    port_cqe_t held, c;
    port_stats_t st;
    int i, nconn = 0, holding = 0;
    memset(&o, 0, sizeof(o));
    o.recv_buffer_count = 1;
    o.recv_buffer_size = 512;
    for (i = 0; i < NCONN; i++) {
        srv[i] = cli[i] = PORT_INVALID_SOCK;
        port_op_init(&rv[i], PORT_OP_RECV, NULL, NULL);
    }
    P = new_port_opts(&o);
    REQUIRE(P != NULL);
    waiter_init(&w, P);
    for (nconn = 0; nconn < NCONN; nconn++)
        REQUIRE(make_pair(&w, &srv[nconn], &cli[nconn]));
    CHECK(plain_send_all(cli[0], "a", 1) == 0);
    REQUIRE(recv_next(&w, &rv[0], srv[0], &held, 5000, "take the only buffer"));
    holding = 1;
    for (i = 1; i <= NIDLE; i++)
        CHECK_EQ(recv_post(P, &rv[i], srv[i]), 0);
    expect_quiet(&w, 40, "idle receives");
    CHECK(plain_send_all(cli[NCONN - 1], "z", 1) == 0);
    CHECK_EQ(recv_post(P, &rv[NCONN - 1], srv[NCONN - 1]), 0);
    expect_quiet(&w, 40, "a receive with data and no buffer");
    port_get_stats(P, &st);
    CHECKF(st.recv_waiting == 1, "%llu receives wait for a buffer; only one has data",
           (unsigned long long)st.recv_waiting);
    port_recv_release(P, &held);
    holding = 0;
    if (expect_cqe(&w, &rv[NCONN - 1], &c, 5000, "the receive with data")) {
        CHECK(c.res == 1 && c.buf != NULL && c.buf[0] == 'z');
        port_recv_release(P, &c);
    }
done:
    if (holding)
        port_recv_release(P, &held);
    for (i = 0; i < nconn; i++) {
        cancel_recv(&w, &rv[i]);
        plain_close(cli[i]);
        if (srv[i] != PORT_INVALID_SOCK)
            port_sock_close(P, srv[i], 0);
    }
    end_port(P);
}

/* A receive buffer kept for good (port_recv_detach) leaves the pool, which makes another
 * in its place: a caller that keeps every message never runs a one-buffer pool dry, and
 * what it kept stays valid and unchanged by later receives, also after the port is
 * destroyed (port_buf_free frees it then). */
static void case_recv_detach(void) {
    enum { NBUF = 1, BUFSZ = 512, NMSG = 6, MAXKEPT = 64 };
    port_options_t o;
    port_t *P;
    waiter_t w;
    port_sock_t srv = PORT_INVALID_SOCK, cli = PORT_INVALID_SOCK;
    port_op_t rv;
    port_cqe_t c;
    port_stats_t st;
    char *kept[MAXKEPT];
    size_t klen[MAXKEPT], kmsg[MAXKEPT], koff[MAXKEPT], j;
    int nkept = 0, i, k;
    memset(&o, 0, sizeof(o));
    o.recv_buffer_count = NBUF;
    o.recv_buffer_size = BUFSZ;
    port_op_init(&rv, PORT_OP_RECV, NULL, NULL);
    P = new_port_opts(&o);
    REQUIRE(P != NULL);
    waiter_init(&w, P);
    REQUIRE(make_pair(&w, &srv, &cli));
    for (i = 0; i < NMSG; i++) {
        char msg[BUFSZ];
        size_t len = 10 + (size_t)i * 50, got = 0;
        for (j = 0; j < len; j++)
            msg[j] = (char)pattern((size_t)i, j);
        CHECK(plain_send_all(cli, msg, len) == 0);
        while (got < len && nkept < MAXKEPT) {
            if (!recv_next(&w, &rv, srv, &c, 5000, "recv with every buffer kept"))
                goto done;
            check_data_cqe(&c);
            CHECK_EQ(port_recv_detach(P, &c), 0);
            kept[nkept] = c.buf;
            klen[nkept] = (size_t)c.res;
            kmsg[nkept] = (size_t)i;
            koff[nkept] = got;
            nkept++;
            got += (size_t)c.res;
        }
        CHECK_EQ(got, len);
        port_get_stats(P, &st);
        CHECK_EQ(st.recv_buffers_out, 0);
    }
    port_get_stats(P, &st);
    CHECKF(st.recv_buffers <= NBUF, "the pool made %llu buffers, limit %d",
           (unsigned long long)st.recv_buffers, NBUF);
    CHECK_EQ(st.recv_buffers_detached, nkept);
    for (k = 1; k < nkept; k++)
        CHECK(kept[k] != kept[k - 1]);
    /* Only a completion that carries a buffer can give it. */
    c.flags = 0;
    CHECK_EQ(port_recv_detach(P, &c), PORT_EINVAL);
done:
    cancel_recv(&w, &rv);
    plain_close(cli);
    if (srv != PORT_INVALID_SOCK)
        port_sock_close(P, srv, 0);
    end_port(P);
    /* The port is gone; what was kept is intact. */
    for (k = 0; k < nkept; k++) {
        int same = 1;
        for (j = 0; j < klen[k]; j++)
            same &= (unsigned char)kept[k][j] == pattern(kmsg[k], koff[k] + j);
        CHECKF(same, "kept piece %d (message %u) changed", k, (unsigned)kmsg[k]);
        port_buf_free(kept[k]);
    }
}

/* ---- addresses ----------------------------------------------------------------------------- */

/* The "any address" listener of port_resolve(NULL) takes IPv4 clients too (dual stack,
 * which Windows does not do by default), and their addresses read as plain IPv4. */
static void case_dual_stack_listener(void) {
    port_t *P = new_port();
    waiter_t w;
    port_addr_t any, to, peer;
    port_sock_t ls = PORT_INVALID_SOCK, cli = PORT_INVALID_SOCK, srv = PORT_INVALID_SOCK;
    port_op_t acc;
    port_cqe_t c;
    char host[64];
    int pn = 0;
    port_op_init(&acc, PORT_OP_ACCEPT, NULL, NULL);
    REQUIRE(P != NULL);
    waiter_init(&w, P);
    REQUIRE(port_resolve(NULL, 0, 1, &any) == 0);
    CHECK_EQ(port_resolve(NULL, 0, 0, &to), PORT_EINVAL);   /* no wildcard to connect to */
    CHECK_EQ(port_resolve("127.0.0.1", 70000, 0, &to), PORT_EINVAL);
    REQUIRE(port_listen(P, &any, 16, 0, &ls) == 0);
    REQUIRE(port_sockname(ls, &to) == 0);
    note("wildcard listener family %s", any.ss.ss_family == AF_INET6 ? "IPv6" : "IPv4");
    pn = addr_port(&to);
    REQUIRE(port_resolve("127.0.0.1", pn, 0, &to) == 0);
    CHECK_EQ(port_accept(P, &acc, ls), 0);
    cli = plain_connect(&to);
    CHECKF(cli != PORT_INVALID_SOCK, "an IPv4 client cannot reach the wildcard listener");
    if (expect_cqe(&w, &acc, &c, 5000, "accept on the wildcard listener")) {
        CHECKF(c.res >= 0, "accept res %lld %s", (long long)c.res,
               c.res < 0 ? port_errname((int)c.res) : "");
        if (c.res >= 0) {
            srv = (port_sock_t)c.res;
            CHECK_EQ(port_peername(srv, &peer), 0);
            CHECK_EQ(port_addr_format(&peer, host, sizeof(host), &pn), 0);
            CHECKF(strcmp(host, "127.0.0.1") == 0, "IPv4 peer shown as %s", host);
        }
    }
done:
    if (acc.in_flight) {
        port_cancel(P, &acc);
        if (expect_cqe(&w, &acc, &c, 5000, "drain accept") && c.res >= 0)
            port_sock_close(P, (port_sock_t)c.res, 0);
    }
    plain_close(cli);
    if (srv != PORT_INVALID_SOCK)
        port_sock_close(P, srv, 0);
    if (ls != PORT_INVALID_SOCK)
        port_sock_close(P, ls, 0);
    end_port(P);
}

/* ---- send_now -------------------------------------------------------------------------- */

/* port_send_now sends at once and completes nothing; it reports a full socket as 0 and a
 * reset peer as an error.  (IOCP cannot send outside an operation: always 0.) */
static void case_send_now(void) {
    port_t *P = new_port();
    waiter_t w;
    port_sock_t srv = PORT_INVALID_SOCK, cli = PORT_INVALID_SOCK;
    port_stats_t before, after;
    port_buf_t b[2];
    char got[16];
    static char big[65536];
    int64_t r;
    int i, inline_ok = strcmp(g_backend, "iocp") != 0;
    REQUIRE(P != NULL);
    waiter_init(&w, P);
    REQUIRE(make_pair(&w, &srv, &cli));
    port_get_stats(P, &before);
    b[0].base = "hello";
    b[0].len = 5;
    b[1].base = " world";
    b[1].len = 6;
    r = port_send_now(P, srv, b, 2);
    CHECK_EQ(port_send_now(P, srv, b, 0), PORT_EINVAL);
    if (!inline_ok) {
        CHECK_EQ(r, 0);
        goto done;
    }
    CHECK_EQ(r, 11);
    plain_set_timeout(cli, 5000);
    CHECK_EQ(plain_recv_all(cli, got, 11), 11);
    CHECK(memcmp(got, "hello world", 11) == 0);
    expect_quiet(&w, 30, "after port_send_now");
    port_get_stats(P, &after);
    CHECK_EQ(after.submitted, before.submitted);
    CHECK_EQ(after.completed, before.completed);
    /* The peer does not read: the socket fills, and then takes nothing. */
    memset(big, 'x', sizeof(big));
    b[0].base = big;
    b[0].len = sizeof(big);
    for (i = 0; i < 4096; i++) {
        r = port_send_now(P, srv, b, 1);
        CHECKF(r >= 0, "filling: %lld %s", (long long)r, r < 0 ? port_errname((int)r) : "");
        if (r <= 0)
            break;
    }
    CHECKF(r == 0, "the socket never filled (%d sends)", i);
    /* The peer resets: a send now fails (which code is the OS's choice). */
    plain_reset_close(cli);
    cli = PORT_INVALID_SOCK;
    for (i = 0; i < 500; i++) {
        r = port_send_now(P, srv, b, 1);
        if (r < 0)
            break;
        sleep_ms(2);
    }
    CHECKF(r == PORT_ECONNRESET || r == PORT_EPIPE || r == PORT_ECONNABORTED,
           "send_now after reset: %lld %s", (long long)r, r < 0 ? port_errname((int)r) : "");
    expect_quiet(&w, 30, "after failed port_send_now");
done:
    plain_close(cli);
    if (srv != PORT_INVALID_SOCK)
        close_op(&w, srv, 0);
    end_port(P);
}

/* ---- os_errors ------------------------------------------------------------------------------ */

/* Every error a socket call can return on TCP has a portable code: the errno values that
 * the Linux man pages of socket, bind, listen, accept, connect, send, recv, getsockopt,
 * setsockopt, getpeername and shutdown list (not ELOOP / ENOENT: Unix-domain sockets),
 * io_uring's own (ECANCELED, ETIME), and their Winsock twins.  EUNKNOWN hid a send from a
 * bad pointer (EFAULT) in a contract bug once. */
static void case_os_errors(void) {
#ifdef _WIN32
    static const int os[] = {
        WSAEACCES, WSAEADDRINUSE, WSAEADDRNOTAVAIL, WSAEAFNOSUPPORT, WSAEWOULDBLOCK,
        WSAEALREADY, WSAENOTSOCK, WSAECONNABORTED, WSAECONNREFUSED, WSAECONNRESET,
        WSAEDESTADDRREQ, WSAEFAULT, WSAEHOSTDOWN, WSAEHOSTUNREACH, WSAEINPROGRESS,
        WSAEINTR, WSAEINVAL, WSAEISCONN, WSAEMFILE, WSAEMSGSIZE, WSAENETDOWN,
        WSAENETUNREACH, WSAENOBUFS, WSAENOPROTOOPT, WSAENOTCONN, WSAEOPNOTSUPP,
        WSAEPROTONOSUPPORT, WSAEPROTOTYPE, WSAESOCKTNOSUPPORT, WSAETIMEDOUT, WSAENETRESET,
        WSAESHUTDOWN, WSAEBADF, ERROR_NOACCESS,
    };
    const int efault = WSAEFAULT;
#else
    static const int os[] = {
        EACCES, EADDRINUSE, EADDRNOTAVAIL, EAFNOSUPPORT, EAGAIN, EALREADY, EBADF,
        ECONNABORTED, ECONNREFUSED, ECONNRESET, EDESTADDRREQ, EFAULT, EHOSTDOWN,
        EHOSTUNREACH, EINPROGRESS, EINTR, EINVAL, EISCONN, EMFILE, EMSGSIZE, ENETDOWN,
        ENETUNREACH, ENFILE, ENOBUFS, ENOMEM, ENONET, ENOPROTOOPT, ENOTCONN, ENOTSOCK,
        EOPNOTSUPP, EPERM, EPIPE, EPROTO, EPROTONOSUPPORT, EPROTOTYPE, ESOCKTNOSUPPORT,
        ETIMEDOUT, ENETRESET, ESHUTDOWN, ECANCELED, ETIME,
    };
    const int efault = EFAULT;
#endif
    port_t *P = NULL;
    waiter_t w;
    port_sock_t srv = PORT_INVALID_SOCK, cli = PORT_INVALID_SOCK;
    port_op_t sd;
    port_cqe_t c;
    port_buf_t b;
    int64_t r;
    size_t i;
    for (i = 0; i < sizeof(os) / sizeof(os[0]); i++)
        CHECKF(port_err_from_os(os[i]) != PORT_EUNKNOWN, "OS error %d has no port code",
               os[i]);
    /* By name: the name is what the Python layer turns into an OSError subclass. */
    CHECKF(strcmp(port_errname(port_err_from_os(efault)), "EFAULT") == 0, "EFAULT reads %s",
           port_errname(port_err_from_os(efault)));
    /* A send from memory the process cannot read (the first page is never mapped) fails
     * with EFAULT, from the completion and from port_send_now.  Not under valgrind: it
     * reports the syscall's bad pointer, which is the point here. */
    if (getenv("CONTRACT_NO_BAD_POINTERS") != NULL)
        return;
    P = new_port();
    REQUIRE(P != NULL);
    waiter_init(&w, P);
    REQUIRE(make_pair(&w, &srv, &cli));
    b.base = (const char *)(uintptr_t)64;
    b.len = 16;
    port_op_init(&sd, PORT_OP_SEND, NULL, NULL);
    CHECK_EQ(port_send(P, &sd, srv, &b, 1), 0);
    if (expect_cqe(&w, &sd, &c, 5000, "send from a bad pointer"))
        CHECKF(strcmp(port_errname((int)c.res), "EFAULT") == 0, "res %lld %s",
               (long long)c.res, port_errname((int)c.res));
    r = port_send_now(P, srv, &b, 1);
    if (strcmp(g_backend, "iocp") == 0 && r == 0) {
        /* IOCP sends nothing inline */
    } else {
        CHECKF(strcmp(port_errname((int)r), "EFAULT") == 0, "port_send_now %lld %s",
               (long long)r, port_errname((int)r));
    }
    expect_quiet(&w, 30, "after the failed sends");
done:
    plain_close(cli);
    if (srv != PORT_INVALID_SOCK)
        close_op(&w, srv, 0);
    end_port(P);
}

/* ---- recv_bounded_readahead -------------------------------------------------------------- */

typedef struct bulk_sender {
    port_sock_t s;
    int ok;
} bulk_sender_t;

static void bulk_send_thread(void *arg) {
    bulk_sender_t *b = (bulk_sender_t *)arg;
    static char chunk[65536];
    int k;
    memset(chunk, 'r', sizeof(chunk));
    b->ok = 1;
    for (k = 0; k < 16 && b->ok; k++)
        b->ok = plain_send_all(b->s, chunk, sizeof(chunk)) == 0;
}

/* A receive kept armed (PORT_OPT_RECV_MULTISHOT) does not take the whole pool while its
 * caller sits on what it got: the peer sends 1 MiB, the caller keeps every buffer it is
 * given, and the port lends it a bounded number (4 buffers' worth per arming: io_uring
 * where the kernel can bound it, epoll always).  The data is all there once the caller
 * gives them back. */
static void case_recv_bounded_readahead(void) {
    port_options_t o;
    if (strcmp(g_backend, "iocp") == 0) {
        note("skipped: IOCP receives are one-shot");
        return;
    }
    {
    port_t *P;
    waiter_t w;
    port_sock_t srv = PORT_INVALID_SOCK, cli = PORT_INVALID_SOCK;
    port_op_t rv;
    port_cqe_t c, held[64];
    int nheld = 0, k;
    size_t total = 0, want = 1u << 20;
    bulk_sender_t bs;
    thr_t sender;
    int started = 0;
    memset(&o, 0, sizeof(o));
    o.recv_buffer_size = 4096;
    o.recv_buffer_count = 1024;
    o.flags = PORT_OPT_RECV_MULTISHOT;
    P = new_port_opts(&o);
    port_op_init(&rv, PORT_OP_RECV, NULL, NULL);
    REQUIRE(P != NULL);
    waiter_init(&w, P);
    REQUIRE(make_pair(&w, &srv, &cli));
    CHECK_EQ(recv_post(P, &rv, srv), 0);
    bs.s = cli;
    bs.ok = 0;
    REQUIRE(thr_start(&sender, bulk_send_thread, &bs) == 0);
    started = 1;
    /* Keep what arrives for a while, without giving anything back. */
    while (nheld < 64 && next_cqe(&w, &c, 200) == 1) {
        CHECK(c.op == &rv);
        if (c.flags & PORT_CQE_BUFFER) {
            total += (size_t)c.res;
            held[nheld++] = c;
        }
        if (!(c.flags & PORT_CQE_MORE))
            break;
    }
    note("held %d buffers (%zu bytes) before the port stopped lending", nheld, total);
    CHECKF(nheld <= 8, "the port lent %d buffers to one receive without bound", nheld);
    for (k = 0; k < nheld; k++)
        port_recv_release(P, &held[k]);
    /* The rest arrives, whole, once the caller consumes. */
    while (total < want) {
        if (!(rv.user_flags & ARMED))
            CHECK_EQ(recv_post(P, &rv, srv), 0);
        if (!expect_cqe(&w, &rv, &c, 5000, "the rest of 1 MiB"))
            break;
        CHECKF(c.res > 0, "res %lld", (long long)c.res);
        if (c.res <= 0)
            break;
        total += (size_t)c.res;
        port_recv_release(P, &c);
    }
    CHECK_EQ(total, want);
done:
    if (started) {
        thr_join(sender);
        CHECK(bs.ok);
    }
    cancel_recv(&w, &rv);
    plain_close(cli);
    if (srv != PORT_INVALID_SOCK)
        close_op(&w, srv, 0);
    end_port(P);
    }
}

/* ====================================================================================== */

typedef struct test_case {
    const char *name;
    void (*fn)(void);
} test_case_t;

/* ---- single_dispatcher ------------------------------------------------------------------ */

/* port_single_dispatcher: from then on one thread (the first to wait without a timeout)
 * dispatches; io_uring
 * remakes its ring so that only that thread enters the kernel.  Other threads still post,
 * receive, poll, close and shut down: their SQEs reach the kernel through the owner, a
 * sleeping owner is woken for them, and their port_sock_close is done when it returns.
 * Other backends refuse (nothing to change); so does a port that already submitted. */
typedef struct sd {
    port_t *P;
    port_op_t posts[2];
    port_op_t rv;
    volatile long seen[2];
    volatile long recv_bytes, recv_final, bad, ended;
} sd_t;

static void sd_owner(void *arg) {
    sd_t *d = (sd_t *)arg;
    for (;;) {
        port_cqe_t out[16];
        int i, n = port_wait(d->P, out, 16, -1);
        if (n == PORT_EINTR)
            continue;
        if (n < 0) {
            A_STORE(&d->ended, n);
            return;
        }
        for (i = 0; i < n; i++) {
            port_cqe_t *c = &out[i];
            if (c->op == &d->posts[0] || c->op == &d->posts[1]) {
                A_ADD(&d->seen[c->op - d->posts], 1);
            } else if (c->op == &d->rv) {
                if (c->res > 0)
                    A_ADD(&d->recv_bytes, (long)c->res);
                if (c->flags & PORT_CQE_BUFFER)
                    port_recv_release(d->P, c);
                if (!(c->flags & PORT_CQE_MORE))
                    A_STORE(&d->recv_final, c->res == 0 ? 1 : 2);
            } else {
                A_ADD(&d->bad, 1);
            }
        }
        port_batch_end(d->P);
    }
}

static int sd_wait(volatile long *v, long want, int ms) {
    double t0 = now_ms();
    while (A_LOAD(v) != want && now_ms() - t0 < ms)
        sleep_ms(2);
    return A_LOAD(v) == want;
}

static void case_single_dispatcher(void) {
    sd_t *d = (sd_t *)calloc(1, sizeof(sd_t));
    port_addr_t bound;
    port_sock_t l = PORT_INVALID_SOCK, cli = PORT_INVALID_SOCK, srv = PORT_INVALID_SOCK;
    port_sock_t cli2 = PORT_INVALID_SOCK, srv2 = PORT_INVALID_SOCK;
    port_cqe_t out[4];
    thr_t th;
    int rc, started = 0;
    char ch;
    REQUIRE(d != NULL);
    d->P = new_port();
    REQUIRE(d->P != NULL);
    rc = port_single_dispatcher(d->P);
    if (strcmp(g_backend, "io_uring") != 0) {
        CHECK_EQ(rc, PORT_EUNAVAIL);   /* nothing to change on this backend */
        goto done;
    }
    CHECK_EQ(rc, 0);
    CHECK_EQ(port_single_dispatcher(d->P), PORT_EUNAVAIL);   /* once */
    port_op_init(&d->posts[0], PORT_OP_POST, NULL, NULL);
    port_op_init(&d->posts[1], PORT_OP_POST, NULL, NULL);
    port_op_init(&d->rv, PORT_OP_RECV, NULL, NULL);
    /* Posted before anyone waits: it waits in the ring for the owner. */
    CHECK_EQ(port_post(d->P, &d->posts[0], 7), 0);
    /* A poll and a timed wait from this thread before the owner's first wait do not
     * take the ring (they did: the owner then never entered the kernel): they find
     * nothing, and the post stays for the owner. */
    CHECK_EQ(port_wait(d->P, out, 4, 0), 0);
    CHECK_EQ(port_wait(d->P, out, 4, 20), 0);
    REQUIRE(thr_start(&th, sd_owner, d) == 0);
    started = 1;
    CHECKF(sd_wait(&d->seen[0], 1, 5000), "the post made before the owner waited");
    sleep_ms(50);                          /* the owner is asleep in the kernel */
    CHECK_EQ(port_post(d->P, &d->posts[1], 8), 0);
    CHECKF(sd_wait(&d->seen[1], 1, 5000), "a post from another thread woke the owner");
    rc = port_wait(d->P, out, 4, 0);       /* a follower's poll: returns, takes nothing */
    CHECK(rc >= 0);
    rc = port_wait(d->P, out, 4, 30);      /* and a follower's timed wait */
    CHECK(rc >= 0);
    /* A receive armed from this thread while the owner sleeps. */
    l = plain_listen(&bound);
    REQUIRE(l != PORT_INVALID_SOCK);
    cli = plain_connect(&bound);
    srv = plain_accept(l, 5000);
    REQUIRE(cli != PORT_INVALID_SOCK && srv != PORT_INVALID_SOCK);
    CHECK_EQ(recv_post(d->P, &d->rv, srv), 0);
    sleep_ms(20);
    CHECK_EQ(plain_send_all(cli, "abc", 3), 0);
    CHECKF(sd_wait(&d->recv_bytes, 3, 5000), "received %ld bytes", A_LOAD(&d->recv_bytes));
    /* port_sock_close from this thread is done when it returns: the peer sees EOF.  The
     * receive armed on srv ends first (cancel, then close), as the core does it. */
    CHECK_EQ(port_cancel(d->P, &d->rv), 0);
    CHECKF(sd_wait(&d->recv_final, 2, 5000) || A_LOAD(&d->recv_final) == 1,
           "the cancelled receive ended (%ld)", A_LOAD(&d->recv_final));
    CHECK_EQ(port_sock_close(d->P, srv, 0), 0);
    srv = PORT_INVALID_SOCK;
    CHECK_EQ(plain_recv_all(cli, &ch, 1), 0);
    /* After shutdown (the owner leaves), a close is still done at once. */
    cli2 = plain_connect(&bound);
    srv2 = plain_accept(l, 5000);
    REQUIRE(cli2 != PORT_INVALID_SOCK && srv2 != PORT_INVALID_SOCK);
    port_shutdown(d->P);
    thr_join(th);
    started = 0;
    CHECK_EQ(A_LOAD(&d->ended), PORT_ECLOSED);
    CHECK_EQ(port_sock_close(d->P, srv2, 0), 0);
    srv2 = PORT_INVALID_SOCK;
    CHECK_EQ(plain_recv_all(cli2, &ch, 1), 0);
    CHECK_EQ(A_LOAD(&d->bad), 0);
done:
    if (started) {
        port_shutdown(d->P);
        thr_join(th);
    }
    plain_close(srv);
    plain_close(srv2);
    plain_close(cli);
    plain_close(cli2);
    plain_close(l);
    if (d != NULL)
        end_port(d->P);
    free(d);
}

#ifndef _WIN32
#  include <sys/wait.h>
/* A child made by fork() lets go of the port it inherited (port_forsake) and leaves the
 * parent's alone: its wait reaps nothing of the parent's (the data waiting stays for the
 * parent's receive), its submissions say PORT_ECLOSED, and closing its copy of a socket,
 * even with a reset asked for, neither resets nor unregisters the parent's. */
static void case_forsake_after_fork(void) {
    port_t *P = new_port();
    waiter_t w;
    port_sock_t srv = PORT_INVALID_SOCK, cli = PORT_INVALID_SOCK;
    port_op_t rv;
    port_cqe_t c;
    port_buf_t b;
    char got[8];
    int status = -1;
    pid_t pid;
    port_op_init(&rv, PORT_OP_RECV, NULL, NULL);
    REQUIRE(P != NULL);
    waiter_init(&w, P);
    REQUIRE(make_pair(&w, &srv, &cli));
    CHECK_EQ(recv_post(P, &rv, srv), 0);
    CHECK(plain_send_all(cli, "hello", 5) == 0);
    sleep_ms(50);           /* the receive's completion waits in the port */
    pid = fork();
    if (pid == 0) {
        port_op_t post;
        port_cqe_t q[8];
        int bad = 0;
        port_forsake(P);
        port_op_init(&post, PORT_OP_POST, NULL, NULL);
        bad |= port_wait(P, q, 8, 200) != PORT_ECLOSED;
        bad |= (port_post(P, &post, 1) != PORT_ECLOSED) << 1;
        b.base = "x";
        b.len = 1;
        bad |= (port_send_now(P, srv, &b, 1) != PORT_ECLOSED) << 2;
        bad |= (port_sock_close(P, srv, PORT_CLOSE_RESET) != 0) << 3;
        port_destroy(P);
        _exit(bad);
    }
    REQUIRE(pid > 0);
    CHECK_EQ(waitpid(pid, &status, 0), pid);
    CHECKF(WIFEXITED(status) && WEXITSTATUS(status) == 0,
           "the child's checks failed: status %#x (exit bits: 1 wait, 2 post, 4 send_now, "
           "8 sock_close)", status);
    if (recv_next(&w, &rv, srv, &c, 5000, "the parent's receive after the child")) {
        check_data_cqe(&c);
        CHECK(c.res == 5 && memcmp(c.buf, "hello", 5) == 0);
        port_recv_release(P, &c);
    }
    b.base = "back";
    b.len = 4;
    CHECK_EQ(port_send_now(P, srv, &b, 1), 4);
    plain_set_timeout(cli, 5000);
    CHECK_EQ(plain_recv_all(cli, got, 4), 4);
    CHECK(memcmp(got, "back", 4) == 0);
    cancel_recv(&w, &rv);
    close_op(&w, srv, 0);
    srv = PORT_INVALID_SOCK;
done:
    cancel_recv(&w, &rv);
    plain_close(cli);
    if (srv != PORT_INVALID_SOCK)
        port_sock_close(P, srv, 0);
    end_port(P);
}
#endif

static const test_case_t cases[] = {
    {"accept_several", case_accept_several},
    {"cancel_accepts", case_cancel_accepts},
    {"accept_multishot", case_accept_multishot},
    {"strand_claim", case_strand_claim},
    {"connect", case_connect},
    {"echo_1B_to_4MiB", case_echo},
    {"gather_send_order", case_gather_send},
    {"graceful_close", case_graceful_close},
    {"peer_reset", case_peer_reset},
    {"send_progress", case_send_progress},
    {"drain_before_close", case_drain_before_close},
    {"cancel_recv", case_cancel_recv},
    {"post_from_thread", case_post_thread},
    {"batch_two_waiters", case_batch_two_waiters},
    {"wait_timeout", case_wait_timeout},
    {"timers", case_timers},
    {"closed_socket_ops", case_closed_socket},
    {"strands", case_strands},
    {"strand_yield", case_strand_yield},
    {"strand_yield_threads", case_strand_yield_threads},
    {"shutdown_wakes_waiters", case_shutdown},
    {"stats_balance", case_stats_balance},
    {"recv_pool_backpressure", case_recv_pool_backpressure},
    {"recv_pool_trim", case_recv_pool_trim},
    {"recv_parked_cancel", case_recv_parked_cancel},
    {"recv_not_starved", case_recv_not_starved},
    {"os_errors", case_os_errors},
    {"dual_stack_listener", case_dual_stack_listener},
    {"send_now", case_send_now},
    {"recv_bounded_readahead", case_recv_bounded_readahead},
    {"close_orders_after_ops", case_close_orders_after_ops},
    {"sock_close_orders_after_ops", case_sock_close_orders_after_ops},
    {"recv_waiters_in_order", case_recv_waiters_in_order},
    {"recv_detach", case_recv_detach},
    {"recv_idle_do_not_wait", case_recv_idle_do_not_wait},
    {"single_dispatcher", case_single_dispatcher},
#ifndef _WIN32
    {"forsake_after_fork", case_forsake_after_fork},
#endif
};

/* Is `name` one of the comma-separated names in `list`? */
static int in_list(const char *list, const char *name) {
    size_t len = strlen(name);
    while (list != NULL && *list != '\0') {
        const char *end = strchr(list, ',');
        size_t n = end ? (size_t)(end - list) : strlen(list);
        if (n == len && strncmp(list, name, len) == 0)
            return 1;
        list = end ? end + 1 : NULL;
    }
    return 0;
}

int main(int argc, char **argv) {
    const char *only = NULL, *skip;
    const char *env;
    char err[256] = "";
    int rc, passed = 0, failed = 0, skipped = 0;
    size_t i;
#ifdef _WIN32
    WSADATA wsa;
    WSAStartup(MAKEWORD(2, 2), &wsa);
#else
    signal(SIGPIPE, SIG_IGN);
#endif
    setvbuf(stdout, NULL, _IONBF, 0);
    g_backend = argc > 1 ? argv[1] : getenv("IOCPNET_BACKEND");
    if (g_backend == NULL || g_backend[0] == '\0')
        g_backend = port_backends()[0];
    if (g_backend == NULL) {
        fprintf(stderr, "contract: this build has no backend\n");
        return 2;
    }
    if (argc > 2)
        only = argv[2];
    skip = getenv("CONTRACT_SKIP");
    env = getenv("CONTRACT_RECV_MULTISHOT");
    g_multishot = env != NULL && atoi(env) != 0;
    env = getenv("CONTRACT_WATCHDOG");
    if (env != NULL && atoi(env) > 0)
        g_watchdog_s = atoi(env);

    rc = port_backend_probe(g_backend, err, sizeof(err));
    if (rc != 0) {
        printf("contract[%s]: skipped: %s (%s)\n", g_backend, err, port_errname(rc));
        return rc == PORT_EUNAVAIL ? 77 : 1;
    }
    watchdog_start();
    for (i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        double t0;
        if (only != NULL && !in_list(only, cases[i].name))
            continue;
        if (in_list(skip, cases[i].name)) {
            skipped++;
            printf("  skip  %-26s (CONTRACT_SKIP)\n", cases[i].name);
            continue;
        }
        g_case_name = cases[i].name;
        A_STORE(&g_case_failures, 0);
        t0 = now_ms();
        cases[i].fn();
        if (A_LOAD(&g_case_failures) == 0) {
            passed++;
            printf("  ok    %-26s %7.0f ms\n", cases[i].name, now_ms() - t0);
        } else {
            failed++;
            printf("  FAIL  %-26s %7.0f ms  (%ld checks failed)\n", cases[i].name,
                   now_ms() - t0, A_LOAD(&g_case_failures));
        }
    }
    g_case_name = "(done)";
    if (skipped)
        printf("contract[%s]: %d passed, %d failed, %d skipped\n", g_backend, passed, failed,
               skipped);
    else
        printf("contract[%s]: %d passed, %d failed\n", g_backend, passed, failed);
    return failed ? 1 : 0;
}
