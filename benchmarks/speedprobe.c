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
 * usage: speedprobe MILLISECONDS      (prints one JSON object)
 *   unit_us_median  median CPU time of one unit, µs: the figure
 *   unit_us_min     the fastest unit
 *   units           how many ran (one at least; at most 4096, ~130 ms here, whatever
 *                   the time asked for)
 */
#define _GNU_SOURCE
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#define MAX_UNITS 4096

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

int main(int argc, char **argv)
{
    char *end = NULL;
    double ms = argc > 1 ? strtod(argv[1], &end) : 0;
    if (argc != 2 || end == argv[1] || *end || !(ms > 0 && ms <= 10000)) {   /* "5x" is no 5 */
        fprintf(stderr, "usage: speedprobe MILLISECONDS (0-10000]\n");
        return 1;
    }
    static uint64_t unit[MAX_UNITS];
    int n = 0;
    volatile uint64_t sink = 0;
    uint64_t stop = ns(CLOCK_MONOTONIC) + (uint64_t)(ms * 1e6);
    do {    /* one unit at least, however short the time asked for */
        uint64_t c0 = ns(CLOCK_THREAD_CPUTIME_ID), x = 0x9e3779b97f4a7c15ull + (uint64_t)n;
        for (int i = 0; i < 20000; i++) { /* ~20-30 µs on this machine */
            x = x * 6364136223846793005ull + 1442695040888963407ull;
            x ^= x >> 17;
        }
        sink = x;
        unit[n++] = ns(CLOCK_THREAD_CPUTIME_ID) - c0;
    } while (n < MAX_UNITS && ns(CLOCK_MONOTONIC) < stop);
    (void)sink;
    qsort(unit, (size_t)n, sizeof unit[0], cmp);
    printf("{\"unit_us_median\": %.3f, \"unit_us_min\": %.3f, \"units\": %d}\n", unit[n / 2] / 1e3,
           unit[0] / 1e3, n);
    return 0;
}
