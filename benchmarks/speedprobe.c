/*
 * speedprobe: how fast is this core right now?
 *
 * benchmarks/run.py runs it on both CPUs at once, just before and just after
 * each one-connection slice, to tell the machine's speed states apart from
 * the servers: on this VM the cost of every round trip moved by 1.3-2x, for
 * seconds at a time, on both cores and for every server alike (see run.py,
 * one_connection_md). A server-independent measure of the core's speed,
 * taken around the slice, says whether a slow slice was the machine.
 *
 * What it measures: a fixed unit of register-only work (a multiply-xorshift
 * chain: no memory, no branches to mispredict, so caches and the other
 * processes' working sets do not enter), timed in this thread's CPU time (so
 * time another task held the core does not enter either), repeated for the
 * given milliseconds of wall time. What is left is the core's own speed:
 * its clock, and whatever shares its execution units (a hyperthread sibling
 * on the host).
 *
 * usage: speedprobe MILLISECONDS [alu|mem|wake]   (prints one JSON object)
 *   unit_us_median  median time of one unit, µs: the figure
 *   unit_us_min     the fastest unit
 *   units           how many ran (one at least; at most 4096, ~130 ms here, whatever
 *                   the time asked for)
 *
 * The register-only unit (alu, the default) stayed flat at 33.0 µs while
 * every server and the load generator doubled (rounds 1-2 of session 7's
 * run): the slow state is not the cores' arithmetic. Two other witnesses,
 * still independent of the servers, look at what a one-connection round
 * trip does besides arithmetic:
 *   mem   a dependent pointer chase through MEM_BYTES (past the caches a
 *         core has to itself), timed in thread CPU time: memory latency, which
 *         a noisy neighbour on the host moves; unit = MEM_HOPS loads;
 *   wake  two threads, one on CPU 0 and one on CPU 1 (the server's and the
 *         load generator's), passing a byte back and forth over two pipes,
 *         each sleeping in read(): the cross-core wake-up a round trip at
 *         one connection pays twice (an IPI, which a VM exits for), timed on
 *         the wall clock; unit = WAKE_TRIPS round trips, figure per trip.
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <sched.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define MAX_UNITS 4096
#define MEM_BYTES (8u << 20)
#define MEM_HOPS 1024
#define WAKE_TRIPS 16

static uint64_t ns(clockid_t c)
{
    struct timespec t;
    clock_gettime(c, &t);
    return (uint64_t)t.tv_sec * 1000000000ull + (uint64_t)t.tv_nsec;
}

static int cmp(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

static void pin(int cpu)
{
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(cpu, &set);
    sched_setaffinity(0, sizeof set, &set); /* best effort: a 1-CPU box still measures */
}

static uint64_t unit[MAX_UNITS];
static int n_units;
static uint64_t stop;

static void run_alu(void)
{
    volatile uint64_t sink = 0;
    do {    /* one unit at least, however short the time asked for */
        uint64_t c0 = ns(CLOCK_THREAD_CPUTIME_ID), x = 0x9e3779b97f4a7c15ull + (uint64_t)n_units;
        for (int i = 0; i < 20000; i++) { /* ~20-30 µs on this machine */
            x = x * 6364136223846793005ull + 1442695040888963407ull;
            x ^= x >> 17;
        }
        sink = x;
        unit[n_units++] = ns(CLOCK_THREAD_CPUTIME_ID) - c0;
    } while (n_units < MAX_UNITS && ns(CLOCK_MONOTONIC) < stop);
    (void)sink;
}

static void run_mem(void)
{
    /* one random cycle through every slot (Sattolo), a cache line apart,
     * so that each load depends on the last and none is prefetched */
    uint64_t t_setup = ns(CLOCK_MONOTONIC);
    size_t n = MEM_BYTES / 64, step = 64 / sizeof(size_t);
    /* small pages always: whether the kernel had a huge page to give would
     * otherwise move the figure (TLB misses) from one run to the next */
    size_t *a = mmap(NULL, MEM_BYTES, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    size_t *perm = malloc(n * sizeof *perm);
    if (a == MAP_FAILED || !perm || madvise(a, MEM_BYTES, MADV_NOHUGEPAGE)) {
        fprintf(stderr, "speedprobe: out of memory\n");
        exit(2);
    }
    for (size_t i = 0; i < n; i++)
        perm[i] = i;
    uint64_t r = 0x2545f4914f6cdd1dull;
    for (size_t i = n - 1; i > 0; i--) {
        r ^= r << 13, r ^= r >> 7, r ^= r << 17;
        size_t j = (size_t)(r % i), t = perm[i];
        perm[i] = perm[j], perm[j] = t;
    }
    for (size_t i = 0; i < n; i++)
        a[perm[i] * step] = perm[(i + 1) % n] * step;
    free(perm);
    size_t p = 0;
    stop += ns(CLOCK_MONOTONIC) - t_setup; /* the time asked for is the chase's */
    do {
        uint64_t c0 = ns(CLOCK_THREAD_CPUTIME_ID);
        for (int i = 0; i < MEM_HOPS; i++)
            p = a[p];
        unit[n_units++] = ns(CLOCK_THREAD_CPUTIME_ID) - c0;
    } while (n_units < MAX_UNITS && ns(CLOCK_MONOTONIC) < stop);
    if (p == (size_t)-1) /* keeps the chase */
        puts("");
    munmap(a, MEM_BYTES);
}

static int ping[2], pong[2];

static void *wake_echo(void *arg)
{
    (void)arg;
    pin(0);
    char b;
    while (read(ping[0], &b, 1) == 1 && b)
        if (write(pong[1], &b, 1) != 1)
            break;
    return NULL;
}

static void run_wake(void)
{
    if (pipe(ping) || pipe(pong)) {
        perror("speedprobe: pipe");
        exit(2);
    }
    pthread_t th;
    if (pthread_create(&th, NULL, wake_echo, NULL)) {
        fprintf(stderr, "speedprobe: pthread_create failed\n");
        exit(2);
    }
    pin(1);
    char b = 1;
    do {
        uint64_t t0 = ns(CLOCK_MONOTONIC);
        for (int i = 0; i < WAKE_TRIPS; i++)
            if (write(ping[1], &b, 1) != 1 || read(pong[0], &b, 1) != 1) {
                perror("speedprobe: pipe");
                exit(2);
            }
        unit[n_units++] = (ns(CLOCK_MONOTONIC) - t0) / WAKE_TRIPS;
    } while (n_units < MAX_UNITS && ns(CLOCK_MONOTONIC) < stop);
    b = 0;
    if (write(ping[1], &b, 1) == 1)
        pthread_join(th, NULL);
}

int main(int argc, char **argv)
{
    char *end = NULL;
    double ms = argc > 1 ? strtod(argv[1], &end) : 0;
    const char *kind = argc > 2 ? argv[2] : "alu";
    int known = !strcmp(kind, "alu") || !strcmp(kind, "mem") || !strcmp(kind, "wake");
    if (argc < 2 || argc > 3 || end == argv[1] || *end || !(ms > 0 && ms <= 10000) || !known) {
        /* "5x" is no 5 */
        fprintf(stderr, "usage: speedprobe MILLISECONDS (0-10000] [alu|mem|wake]\n");
        return 1;
    }
    stop = ns(CLOCK_MONOTONIC) + (uint64_t)(ms * 1e6);
    if (kind[0] == 'm')
        run_mem();
    else if (kind[0] == 'w')
        run_wake();
    else
        run_alu();
    qsort(unit, (size_t)n_units, sizeof unit[0], cmp);
    printf("{\"unit_us_median\": %.3f, \"unit_us_min\": %.3f, \"units\": %d}\n",
           unit[n_units / 2] / 1e3, unit[0] / 1e3, n_units);
    return 0;
}
