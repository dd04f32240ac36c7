/*
 * port_int.h -- what the backends share: the port's common head, the backend table,
 * strands, and the few synchronisation primitives the layer needs.
 *
 * Atomics and locks are spelled out here (gcc/clang builtins, or MSVC intrinsics) rather
 * than with <stdatomic.h>, because the Windows build uses MSVC, whose C11 atomics are
 * still experimental.  These are platform differences, not backend ones.
 */
#ifndef IOCPNET_PORT_INT_H
#define IOCPNET_PORT_INT_H

#include "port.h"

#include <string.h>

#if defined(_MSC_VER)
#  include <intrin.h>
#  define PORT_THREAD_LOCAL __declspec(thread)
#else
#  define PORT_THREAD_LOCAL __thread
#endif

#if !defined(_WIN32)
#  include <pthread.h>
#  include <sched.h>
#endif

#define PORT_UNUSED(x) ((void)(x))
#define PORT_STATIC_ASSERT(cond, name) typedef char port__static_assert_##name[(cond) ? 1 : -1]

/* ---- atomics -------------------------------------------------------------------------- */
#if defined(_MSC_VER)
static __inline int32_t port_atomic_load32(volatile int32_t *p) {
    return _InterlockedCompareExchange((volatile long *)p, 0, 0);
}
static __inline void port_atomic_store32(volatile int32_t *p, int32_t v) {
    _InterlockedExchange((volatile long *)p, v);
}
static __inline int32_t port_atomic_add32(volatile int32_t *p, int32_t v) {
    return _InterlockedExchangeAdd((volatile long *)p, v) + v;
}
static __inline int64_t port_atomic_add64(volatile int64_t *p, int64_t v) {
    return _InterlockedExchangeAdd64((volatile __int64 *)p, v) + v;
}
static __inline int64_t port_atomic_load64(volatile int64_t *p) {
    return _InterlockedCompareExchange64((volatile __int64 *)p, 0, 0);
}
static __inline int32_t port_atomic_xchg32(volatile int32_t *p, int32_t v) {
    return _InterlockedExchange((volatile long *)p, v);
}
static __inline int port_atomic_cas32(volatile int32_t *p, int32_t expect, int32_t v) {
    return _InterlockedCompareExchange((volatile long *)p, v, expect) == expect;
}
static __inline void port_cpu_relax(void) { _mm_pause(); }
#else
#  define port_atomic_load32(p) __atomic_load_n((p), __ATOMIC_ACQUIRE)
#  define port_atomic_store32(p, v) __atomic_store_n((p), (v), __ATOMIC_RELEASE)
#  define port_atomic_add32(p, v) __atomic_add_fetch((p), (v), __ATOMIC_ACQ_REL)
#  define port_atomic_add64(p, v) __atomic_add_fetch((p), (v), __ATOMIC_ACQ_REL)
#  define port_atomic_load64(p) __atomic_load_n((p), __ATOMIC_ACQUIRE)
#  define port_atomic_xchg32(p, v) __atomic_exchange_n((p), (v), __ATOMIC_ACQ_REL)
static inline int port_atomic_cas32(volatile int32_t *p, int32_t expect, int32_t v) {
    return __atomic_compare_exchange_n(p, &expect, v, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE);
}
#  if defined(__x86_64__) || defined(__i386__)
static inline void port_cpu_relax(void) { __builtin_ia32_pause(); }
#  else
static inline void port_cpu_relax(void) { __asm__ __volatile__("" ::: "memory"); }
#  endif
#endif

static inline void port_thread_yield(void) {
#ifdef _WIN32
    SwitchToThread();
#else
    sched_yield();
#endif
}

/* A spin lock for the tiny critical sections of the hot path (a strand's queue, the
 * receive-buffer ring's tail).  It yields after a short spin, because on a 2-core machine
 * running 5+ workers the holder is often preempted, and spinning then only burns the
 * core the holder needs. */
static inline void port_spin_lock(volatile int32_t *l) {
    int spins = 0;
    while (port_atomic_xchg32(l, 1) != 0) {
        while (port_atomic_load32(l) != 0) {
            if (++spins < 64)
                port_cpu_relax();
            else
                port_thread_yield();
        }
    }
}
static inline void port_spin_unlock(volatile int32_t *l) { port_atomic_store32(l, 0); }

/* A sleeping mutex for longer or rarer sections. */
#ifdef _WIN32
typedef SRWLOCK port_mutex_t;
#  define port_mutex_init(m) InitializeSRWLock(m)
#  define port_mutex_destroy(m) ((void)(m))
#  define port_mutex_lock(m) AcquireSRWLockExclusive(m)
#  define port_mutex_unlock(m) ReleaseSRWLockExclusive(m)
#else
typedef pthread_mutex_t port_mutex_t;
#  define port_mutex_init(m) pthread_mutex_init((m), NULL)
#  define port_mutex_destroy(m) pthread_mutex_destroy(m)
#  define port_mutex_lock(m) pthread_mutex_lock(m)
#  define port_mutex_unlock(m) pthread_mutex_unlock(m)
#endif

/* ---- the port's common head and the backend table ----------------------------------- */

typedef struct port_vtable {
    const char *name;
    int (*probe)(char *errbuf, size_t errlen);
    int (*create)(port_t **out, const port_options_t *opts, char *errbuf, size_t errlen);
    void (*shutdown)(port_t *p);
    void (*destroy)(port_t *p);
    int (*wait)(port_t *p, port_cqe_t *out, int max, int timeout_ms);
    void (*batch_end)(port_t *p);
    int (*accept)(port_t *p, port_op_t *op, port_sock_t listener);
    int (*connect)(port_t *p, port_op_t *op, const port_addr_t *addr);
    int (*recv)(port_t *p, port_op_t *op, port_sock_t sock);
    void (*recv_release)(port_t *p, uint32_t buf_id);
    int (*send)(port_t *p, port_op_t *op, port_sock_t sock, const port_buf_t *bufs, int n);
    int (*close)(port_t *p, port_op_t *op, port_sock_t sock, int flags);
    int (*cancel)(port_t *p, port_op_t *target);
    int (*post)(port_t *p, port_op_t *op, int64_t value);
    int (*timer)(port_t *p, port_op_t *op, uint64_t ms);
    int (*listen)(port_t *p, const port_addr_t *addr, int backlog, int flags, port_sock_t *out);
    int (*sock_close)(port_t *p, port_sock_t s, int flags);
} port_vtable_t;

struct port {
    const port_vtable_t *vt;
    volatile int32_t closed;
    volatile int64_t submitted;
    volatile int64_t completed;
    volatile int64_t waits;
    volatile int64_t recv_buffers;
    volatile int64_t recv_buffers_out;
    port_options_t opts;
};

void port__init_common(port_t *p, const port_vtable_t *vt, const port_options_t *opts);

/* Bookkeeping every backend does at the same two points. */
static inline void port__submitted(port_t *p, port_op_t *op) {
    op->in_flight = 1;
    port_atomic_add64(&p->submitted, 1);
}
static inline void port__completed(port_t *p, port_op_t *op) {
    op->in_flight = 0;
    port_atomic_add64(&p->completed, 1);
}

/* Put completion *c into the caller's batch out[n] (returns n + 1), or queue it on its
 * op's strand when another batch holds that strand (returns n).  `token` identifies the
 * batch being filled; call this in completion order, under whatever lock makes that
 * order (the CQ lock for io_uring, the descriptor's lock for epoll). */
int port__deliver(port_t *p, void *token, port_cqe_t *out, int n, const port_cqe_t *c);

/* Errors */
void port__set_err(char *errbuf, size_t errlen, const char *fmt, ...);

/* POSIX socket helpers shared by the Linux backends (posix_sock.c). */
#ifndef _WIN32
int port__posix_listen_socket(const port_addr_t *addr, int backlog, int flags, int *out);
int port__posix_close(int fd, int flags);
#endif

/* Backends compiled into this build (common.c lists them). */
extern const port_vtable_t port__io_uring_vtable;
extern const port_vtable_t port__epoll_vtable;
extern const port_vtable_t port__iocp_vtable;

#endif /* IOCPNET_PORT_INT_H */
