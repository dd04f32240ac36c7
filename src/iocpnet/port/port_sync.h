/*
 * port_sync.h -- the few atomics and locks iocpnet needs, for the port layer and for the
 * Cython core (a session's send queue and state, counters).
 *
 * Spelled out with gcc/clang builtins or MSVC intrinsics rather than <stdatomic.h>,
 * because the Windows build uses MSVC, whose C11 atomics are still experimental.  These
 * are platform differences, not backend ones.
 */
#ifndef IOCPNET_PORT_SYNC_H
#define IOCPNET_PORT_SYNC_H

#include <stdint.h>

#ifdef _WIN32
#  ifndef WIN32_LEAN_AND_MEAN
#    define WIN32_LEAN_AND_MEAN
#  endif
#  include <windows.h>
#else
#  include <pthread.h>
#  include <sched.h>
#  include <time.h>
#endif

#if defined(_MSC_VER)
#  include <intrin.h>
#  define PORT_THREAD_LOCAL __declspec(thread)
#elif defined(__GLIBC__)
/* initial-exec: a plain %fs-relative load instead of a __tls_get_addr call on every
 * access (once per batch on the hot path).  glibc keeps static TLS room for modules
 * loaded with dlopen, which is how Python loads this one; ours is two pointers. */
#  define PORT_THREAD_LOCAL __thread __attribute__((tls_model("initial-exec")))
#else
#  define PORT_THREAD_LOCAL __thread
#endif

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

#if defined(_MSC_VER)
#  define PORT_COLD __declspec(noinline)
#else
#  define PORT_COLD __attribute__((noinline, cold, unused))
#endif

/* A spin lock for the tiny critical sections of the hot path (a strand's queue, the
 * receive-buffer ring's tail).  It yields after a short spin, because on a 2-core machine
 * running 5+ workers the holder is often preempted, and spinning then only burns the
 * core the holder needs.  The wait is out of line: inlined, its call to yield made every
 * caller save and restore registers around the uncontended take too. */
static PORT_COLD void port__spin_wait(volatile int32_t *l) {
    int spins = 0;
    do {
        while (port_atomic_load32(l) != 0) {
            if (++spins < 64)
                port_cpu_relax();
            else
                port_thread_yield();
        }
    } while (port_atomic_xchg32(l, 1) != 0);
}
static inline void port_spin_lock(volatile int32_t *l) {
    if (port_atomic_xchg32(l, 1) != 0)
        port__spin_wait(l);
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

/* Milliseconds of a monotonic clock (for idle timeouts and deadlines). */
static inline int64_t port_monotonic_ms(void) {
#ifdef _WIN32
    return (int64_t)GetTickCount64();
#else
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
#endif
}

#endif /* IOCPNET_PORT_SYNC_H */
