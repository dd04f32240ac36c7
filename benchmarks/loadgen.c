/*
 * loadgen: iocpnet's own TCP echo load generator.
 *
 * One thread, pinned by the caller to a core of its own. Its job is to keep
 * the server under test busy while costing less per round trip than any
 * server does, so that a benchmark cell measures the server, not this
 * program; and to say, in every run, how close it came to being the limit.
 *
 * Engines (-e):
 *   uring       (default for pingpong/pipeline) io_uring with
 *               SINGLE_ISSUER | DEFER_TASKRUN | TASKRUN_FLAG, a multishot
 *               receive per connection into a provided-buffer ring, one send
 *               in flight per connection, every send of a pass over the
 *               completions submitted with one io_uring_enter. It never
 *               sleeps: it spins in user space on the completion ring and
 *               the ring's "task work pending" flag and enters the kernel
 *               only when there is something to submit or to run. Falls
 *               back to epoll-busy when the kernel refuses the ring.
 *   epoll-busy  (default for connect) non-blocking sockets, epoll_wait with
 *               a zero timeout in a loop.
 *   epoll       epoll_wait that sleeps: the original engine, for callers
 *               that need the load generator's core to be free when it has
 *               nothing to do (benchmarks/freethreading.py gives the server
 *               both cores). Default for idle.
 *
 * How busy it was. A busy-poller is always at 100 % CPU, so its CPU time
 * says nothing. Every pass of the loop is timed: a pass that reaped no
 * completion/event and submitted nothing is idle, everything else is work.
 *   loadgen_busy = 1 - (time in idle passes) / window
 * is the fraction of its core the load generator needed; above 0.9 it was
 * (close to) the limit and the cell does not compare servers. Idle passes
 * are short (a few ns of reading the rings for uring, one epoll_wait for
 * epoll-busy), so the count of passes that found work ("polls_with_work",
 * also reported) is much lower than the time share and is NOT the measure.
 * Anything else that runs on the core (interrupts, other processes) lands
 * in work passes, so the busy figure errs on the side of "it was the limit".
 * For the sleeping engine, busy is its CPU time over the window.
 *
 * Modes (-m):
 *   pingpong  every connection keeps exactly one message in flight
 *   pipeline  every connection keeps -d messages in flight
 *   connect   connect, one round-trip, abortive close; -c in flight at once
 *   idle      open -n connections, one round-trip each, then hold them
 *
 * Every echoed byte is checked against what was sent. Message content is a
 * function of (connection id, message number), so a stale, duplicated,
 * reordered or truncated echo is a mismatch, not a silently counted
 * round-trip (benchmarks/selftest.py proves it, on every engine).
 *
 * Output: one JSON object on stdout. Diagnostics on stderr.
 * Exit codes: 0 ok, 1 usage, 2 connection/setup error, 3 data mismatch.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <linux/io_uring.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

enum { M_PINGPONG, M_PIPELINE, M_CONNECT, M_IDLE };
static const char *mode_names[] = {"pingpong", "pipeline", "connect", "idle"};
enum { E_DEFAULT = -1, E_URING, E_EPOLL_BUSY, E_EPOLL };
static const char *engine_names[] = {"uring", "epoll-busy", "epoll"};

#define MAX_MSG (256u * 1024u)
#define POOL_SIZE (1u << 20)
#define HDR 8u
#define RXBUF (256u * 1024u)

static inline void cpu_relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
}

/* ---------- small helpers ---------- */

static void die(int code, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fputs("loadgen: error: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
    exit(code);
}

static inline uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

/* splitmix64 finaliser: cheap, and every input bit affects every output bit,
 * which is what makes neighbouring messages look nothing alike. */
static inline uint64_t mix64(uint64_t x)
{
    x += 0x9e3779b97f4a7c15ull;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
    return x ^ (x >> 31);
}

static double cpu_self_s(void)
{
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6 + ru.ru_stime.tv_sec +
           ru.ru_stime.tv_usec / 1e6;
}

/* ---------- server process probes (optional, -P pid) ---------- */

static int server_pid;

/* CPU time of the whole server process, and the time its threads were
 * runnable but waiting for a CPU (run delay: another task had their core;
 * the cleanest sign that a slice was disturbed). /proc/<pid>/task/<tid>/
 * schedstat is "run_ns delay_ns timeslices", in nanoseconds (stat's
 * utime+stime has 10 ms ticks, too coarse for 1 s slices); summing over
 * tasks covers multi-threaded servers. A thread that exits mid-window would
 * lose its time, so the tick-based figure is kept as well. */
struct sched { double run_s, delay_s; };

static int read_schedstat(const char *path, struct sched *acc)
{
    FILE *f = fopen(path, "r");
    if (!f)
        return -1;
    unsigned long long run = 0, delay = 0;
    int ok = fscanf(f, "%llu %llu", &run, &delay) == 2;
    fclose(f);
    if (!ok)
        return -1;
    acc->run_s += run / 1e9;
    acc->delay_s += delay / 1e9;
    return 0;
}

static struct sched server_sched(void)
{
    struct sched s = {-1, -1};
    char path[64];
    snprintf(path, sizeof path, "/proc/%d/task", server_pid);
    DIR *d = opendir(path);
    if (!d)
        return s;
    s.run_s = s.delay_s = 0;
    struct dirent *de;
    while ((de = readdir(d))) {
        if (de->d_name[0] == '.')
            continue;
        char p2[300];
        snprintf(p2, sizeof p2, "/proc/%d/task/%s/schedstat", server_pid, de->d_name);
        read_schedstat(p2, &s);
    }
    closedir(d);
    return s;
}

static double server_cpu_sched_s(void) { return server_sched().run_s; }

/* this (single) thread's run delay: time another task held our core */
static double self_delay_s(void)
{
    struct sched s = {0, 0};
    if (read_schedstat("/proc/thread-self/schedstat", &s) < 0)
        return -1;
    return s.delay_s;
}

static double server_cpu_ticks_s(void)
{
    char path[64], buf[4096];
    snprintf(path, sizeof path, "/proc/%d/stat", server_pid);
    FILE *f = fopen(path, "r");
    if (!f)
        return -1;
    size_t n = fread(buf, 1, sizeof buf - 1, f);
    fclose(f);
    buf[n] = 0;
    /* comm may contain spaces and parens: fields start after the last ')' */
    char *p = strrchr(buf, ')');
    if (!p)
        return -1;
    unsigned long ut = 0, st = 0;
    /* after ')' : state(3) ppid ... utime is field 14, stime 15 */
    if (sscanf(p + 2, "%*c %*d %*d %*d %*d %*d %*u %*u %*u %*u %*u %lu %lu", &ut, &st) != 2)
        return -1;
    return (double)(ut + st) / (double)sysconf(_SC_CLK_TCK);
}

/* Resident set in KiB. smaps_rollup counts what is really mapped in (and
 * is what `ps` would show); VmRSS is the fallback on kernels without it. */
static long server_rss_kb(void)
{
    char path[64], line[256];
    const char *files[2] = {"smaps_rollup", "status"};
    const char *keys[2] = {"Rss:", "VmRSS:"};
    for (int i = 0; i < 2; i++) {
        snprintf(path, sizeof path, "/proc/%d/%s", server_pid, files[i]);
        FILE *f = fopen(path, "r");
        if (!f)
            continue;
        long kb = -1;
        size_t kl = strlen(keys[i]);
        while (fgets(line, sizeof line, f)) {
            if (strncmp(line, keys[i], kl) == 0) {
                kb = strtol(line + kl, NULL, 10);
                break;
            }
        }
        fclose(f);
        if (kb >= 0)
            return kb;
    }
    return -1;
}

/* ---------- latency histogram ----------
 * Log-linear: each power of two is split into 2^SUB_BITS linear buckets, so
 * the relative error is below 1/64 (~1.6 %) over the whole range from 1 ns to
 * minutes, in a fixed 19 KiB array. */
#define SUB_BITS 6
#define SUB (1u << SUB_BITS)
#define NBUCKETS ((64 - SUB_BITS + 1) * SUB)

struct hist {
    uint64_t b[NBUCKETS];
    uint64_t n, max;
    double sum;
};

static inline unsigned hist_index(uint64_t v)
{
    if (v < SUB)
        return (unsigned)v;
    unsigned e = 63 - (unsigned)__builtin_clzll(v); /* e >= SUB_BITS */
    return (e - SUB_BITS + 1) * SUB + (unsigned)((v >> (e - SUB_BITS)) - SUB);
}

/* midpoint of a bucket: the value reported for percentiles */
static double hist_value(unsigned idx)
{
    if (idx < SUB)
        return idx;
    unsigned e = idx / SUB + SUB_BITS - 1;
    uint64_t lo = ((uint64_t)(idx % SUB) + SUB) << (e - SUB_BITS);
    uint64_t width = 1ull << (e - SUB_BITS);
    return (double)lo + (double)(width - 1) / 2.0;
}

static inline void hist_add(struct hist *h, uint64_t v)
{
    h->b[hist_index(v)]++;
    h->n++;
    h->sum += (double)v;
    if (v > h->max)
        h->max = v;
}

static double hist_pct(const struct hist *h, double p)
{
    if (!h->n)
        return 0;
    uint64_t want = (uint64_t)(p / 100.0 * (double)h->n);
    if (want >= h->n)
        want = h->n - 1;
    uint64_t acc = 0;
    for (unsigned i = 0; i < NBUCKETS; i++) {
        acc += h->b[i];
        if (acc > want) {
            double v = hist_value(i);
            return v > (double)h->max ? (double)h->max : v;
        }
    }
    return (double)h->max;
}

/* ---------- options ---------- */

static struct {
    struct sockaddr_in addr;
    const char *host;
    int port, mode, conns, size, depth, idle_count, setup_conc, engine;
    double warmup, duration, idle_hold, setup_timeout;
    double rate; /* -r: messages sent per second at most (0: as fast as the echoes allow) */
    uint64_t burst_ns; /* -b: with -r, the rate is offered in ticks this far apart (0: evenly) */
    double handicap; /* -H: share of its core withheld from itself (headroom probe) */
} o;

/* ---------- message content ----------
 * Message m of connection id is: an 8-byte header mix64(id, m), then bytes
 * from a random pool starting at an offset that also depends on (id, m).
 * Checking is therefore a memcmp against the pool, not a per-byte PRNG. */
static uint8_t *pool;

struct msgref {
    uint8_t hdr[HDR];
    const uint8_t *body; /* pool + offset; body[i] is byte i of the message */
};

static inline void msg_make(struct msgref *r, uint32_t id, uint64_t m)
{
    uint64_t h = mix64(((uint64_t)id << 40) ^ m ^ 0x5eedull);
    memcpy(r->hdr, &h, HDR);
    r->body = pool + (mix64(h) % POOL_SIZE);
}

/* ---------- connections ---------- */

enum { S_FREE, S_CONNECTING, S_READY, S_ACTIVE, S_IDLE };

struct conn {
    int fd, state;
    uint32_t id, idx;
    uint64_t tx_msg, rx_msg; /* next message to queue / message being received */
    uint32_t rx_off;         /* bytes of rx_msg already received and checked */
    struct msgref rx_ref;
    uint8_t *txbuf;
    uint32_t txlen, txpos;
    uint32_t events;   /* current epoll interest */
    uint64_t *sent_ns; /* [depth] queue time of in-flight messages */
    uint64_t t_start;  /* connect mode: when connect() was called */
    uint8_t send_busy; /* uring: a send is in flight (at most one, for order) */
    uint8_t recv_armed; /* uring: the multishot receive is armed */
    uint8_t unregistered; /* connect mode: not in the epoll set yet */
    uint8_t waiting;   /* -r: queued in rate_wait until the bucket refills */
    uint8_t prepaid;   /* -r: rate_pump took the token of its next message */
    uint64_t t_wait;   /* -r: when it began to wait for a token (connect: slot freed) */
    uint32_t credit;   /* -b: messages due at past ticks and not sent yet */
    uint64_t t_credit; /* -b: the tick the oldest of them fell due at */
};

static int ep = -1;
static int engine; /* the engine actually used */
static struct conn *conns;
static int nconns; /* slots */
static uint8_t *rxbuf;
static struct hist hist;
static int measuring;
static uint64_t measured_msgs, measured_bytes, measured_conns;
static uint64_t total_msgs;
static uint32_t next_id;
static int open_count; /* sockets currently open (connecting or better) */
static int established; /* connections that completed their first round-trip */
static int ready_count; /* uring set-up: connections whose connect() completed */

/* busy accounting, reset at the start of the measured window */
static struct {
    uint64_t idle_ns;    /* time in passes that found nothing to do */
    uint64_t passes;     /* loop passes (polls) */
    uint64_t work_passes; /* passes that reaped or submitted something */
    uint64_t enters;     /* io_uring_enter / epoll_wait calls */
    uint64_t rearms, enobufs, short_sends;
    uint64_t handicap_ns; /* -H: time withheld on purpose (neither idle nor work) */
} busy_acct;

/* ---------- headroom probe (-H) ----------
 * A busy-poller handles each completion the moment it arrives, so when a
 * server's replies trickle in one at a time it enters the kernel once per
 * reply and its busy share is high, even though, with less CPU, it would
 * simply have handled them in bigger batches at the same rate. Its busy
 * share then overstates what it needed. The probe measures the need: in
 * every HC_PERIOD_NS the generator withholds the share -H of its core from
 * itself (spinning on the clock, touching nothing), so it runs on the rest.
 * If the round-trip rate holds with, say, 20 % withheld, the generator needed
 * at most 80 % of its core and was not the limit; if the rate falls, it was.
 * The period is short next to a round trip of the 10/100-connection cases
 * (hundreds of microseconds) and long next to one pass.
 * The machine's speed drifts from second to second, so the rate with and
 * without the handicap is compared within one run: time is cut into
 * HC_PHASE_NS phases, the handicap applies in every other one, and the
 * echoes completed in each kind of phase are counted apart (the report's
 * probe_rate_ratio). A phase boundary spills about one round trip's worth of
 * backlog into the next phase, both ways: well under 1 % of a 100 ms phase. */
#define HC_PERIOD_NS 100000ull
#define HC_PHASE_NS 100000000ull
static uint64_t hc_next, hc_origin;
static uint64_t hc_phase_msgs[2]; /* measured echoes completed in free / withheld phases */

static inline int hc_withholding(uint64_t t)
{
    return (int)(((t - hc_origin) / HC_PHASE_NS) & 1);
}

/* Returns the time after the pause (t itself when there was none). */
static uint64_t handicap_pause(uint64_t t)
{
    if (o.handicap <= 0 || t < hc_next || !hc_withholding(t))
        return t;
    uint64_t off = (uint64_t)(o.handicap * (double)HC_PERIOD_NS);
    uint64_t end = t + off, t2;
    while ((t2 = now_ns()) < end)
        cpu_relax();
    busy_acct.handicap_ns += t2 - t;
    hc_next = hc_next + HC_PERIOD_NS > t2 ? hc_next + HC_PERIOD_NS : t2 + HC_PERIOD_NS - off;
    return t2;
}

static void set_interest(struct conn *c, uint32_t ev)
{
    if (c->events == ev)
        return;
    if (c->unregistered) { /* registered by the caller, with this interest */
        c->events = ev;
        return;
    }
    struct epoll_event e = {.events = ev, .data.ptr = c};
    if (epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &e) < 0)
        die(2, "epoll_ctl mod: %s", strerror(errno));
    c->events = ev;
}

/* Abortive close (RST): neither side keeps TIME_WAIT state, so thousands of
 * short connections do not exhaust ephemeral ports. Servers must cope with
 * ECONNRESET anyway. */
static void close_abort(struct conn *c)
{
    struct linger l = {.l_onoff = 1, .l_linger = 0};
    setsockopt(c->fd, SOL_SOCKET, SO_LINGER, &l, sizeof l);
    close(c->fd);
    c->fd = -1;
    c->state = S_FREE;
    c->t_wait = now_ns(); /* connect mode -r: the free slot waits for a token from now */
    open_count--;
}

static void refill_and_send(struct conn *c);

/* ---------- rate cap (-r) ----------
 * A token bucket: a message (connect mode: a connection) may start only with
 * a token; tokens accrue at o.rate per second, at most one millisecond's
 * worth (at least 2) saved up. A connection whose window is open but found no
 * token waits in rate_wait and is served, in order, when tokens are back
 * (connect mode: a free slot waits for a token, and run_connect takes one per
 * connect itself). The cap makes an equal-rate cell: every server is offered
 * the same load, and what differs is the server CPU it costs.
 *
 * Whether the generator HELD that schedule is measured, not assumed (its
 * busy share cannot say: at a high capped rate nearly every pass finds an
 * echo to handle, so it is near 100 % even with time to spare):
 *   sched_lag   for each start that had to wait for its token, how long
 *               after the later of (the token falling due, the sender being
 *               ready) it really started: the generator's own lateness;
 *   lost_late   tokens the full bucket dropped while a sender was waiting:
 *               the generator was more than the burst (1 ms) behind;
 *   lost_full   tokens dropped while no sender was waiting: every window was
 *               full (connect: every slot in flight), i.e. the echoes (the
 *               server) set the pace, not the schedule.
 * A cell whose achieved rate is the offered one and whose generator was
 * rarely late compares servers whatever its busy share (benchmarks/run.py,
 * CAPPED rule). */
static double rate_tokens, rate_burst;
static uint64_t rate_t;
static struct conn **rate_wait;
static int rate_nwait, rate_whead;
#define SCHED_LATE_NS 100000ull /* a start later than this is "late" */
static struct {
    uint64_t starts;      /* starts that took a token (in the window) */
    uint64_t waited;      /* of which had waited for it */
    uint64_t late;        /* of those, started more than SCHED_LATE_NS late */
    double lag_ns;        /* sum of the lateness of the waited starts */
    double lost_late, lost_full; /* tokens dropped by the full bucket */
    uint64_t deferred;    /* -b: starts sent after their tick, when an echo let them */
} sched;

/* Refill the bucket at time t. wanted: a sender was waiting for a token
 * (then a token the full bucket drops is the generator's lateness). */
static void rate_refill_w(uint64_t t, int wanted)
{
    rate_tokens += (double)(t - rate_t) * o.rate / 1e9;
    rate_t = t;
    if (rate_tokens > rate_burst) {
        if (measuring) {
            if (wanted)
                sched.lost_late += rate_tokens - rate_burst;
            else
                sched.lost_full += rate_tokens - rate_burst;
        }
        rate_tokens = rate_burst;
    }
}

static void rate_refill(uint64_t t) { rate_refill_w(t, rate_nwait > 0); }

/* Take a token at time t for a sender ready since `ready` (0: it did not
 * wait, e.g. an echo just opened its window and a token was there). The
 * oldest token goes first: it fell due (tokens - 1) / rate ago. */
static void rate_spend(uint64_t t, uint64_t ready)
{
    double age_ns = (rate_tokens - 1) * 1e9 / o.rate;
    rate_tokens -= 1;
    if (!measuring)
        return;
    sched.starts++;
    if (!ready)
        return;
    double lag = (double)(t - ready);
    if (age_ns < lag)
        lag = age_ns;
    if (lag < 0)
        lag = 0;
    sched.waited++;
    sched.lag_ns += lag;
    if (lag > (double)SCHED_LATE_NS)
        sched.late++;
}

static int rate_take(struct conn *c)
{
    /* connect mode: run_connect took this connection's token before it
     * started it; its one message needs no second one */
    if (o.rate <= 0 || o.mode == M_CONNECT)
        return 1;
    if (rate_tokens >= 1) {
        rate_spend(0, 0);
        return 1;
    }
    if (!c->waiting) {
        c->waiting = 1;
        c->t_wait = now_ns();
        rate_wait[(rate_whead + rate_nwait++) % nconns] = c;
    }
    return 0;
}

static int burst_pump(uint64_t t);

/* Refill the bucket; hand tokens to the waiting connections (-b: hand out
 * the ticks due). Returns how many connections it served (they queued
 * sends: that is work). */
static int rate_pump(uint64_t t)
{
    if (o.rate <= 0)
        return 0;
    if (o.burst_ns)
        return burst_pump(t);
    rate_refill(t);
    int served = 0;
    while (rate_nwait && rate_tokens >= 1) {
        struct conn *c = rate_wait[rate_whead];
        rate_whead = (rate_whead + 1) % nconns;
        rate_nwait--;
        c->waiting = 0;
        rate_spend(t, c->t_wait);
        c->prepaid = 1;
        refill_and_send(c);
        served++;
    }
    return served;
}

/* Completion time of the messages in the current receive batch: one clock
 * read per batch instead of per message keeps the generator's own cost down
 * in pipelined runs; the error is the time to check one batch (microseconds). */
static uint64_t t_batch;

/* ---------- bursts (-b, with -r) ----------
 * The token bucket spaces the messages evenly: at a capped rate every server
 * then wakes for nearly every message and its CPU follows the wall clock,
 * not the messages (at 1M/s, 64 B x 100, every Python server sat at 0.98 of
 * its core and C io_uring cost twice its pipelined figure at 500k/s). With
 * -b the same rate is offered in ticks burst_ns apart, on a fixed clock
 * (tick k falls due at burst_origin + k * burst_ns, whatever the server):
 * at each tick every connection is credited its share of the tick's
 * messages (burst_q, fractions carried so that the total is exact) and
 * writes what its window allows in ONE send. So every server is offered the
 * same bursts at the same times, in batches as in the uncapped pipelined
 * case. Accounting (sched):
 *   starts sent in the tick's pass: late when that pass came more than
 *     SCHED_LATE_NS after the tick fell due (a burst that starts late is
 *     late, every message of it);
 *   deferred: credit the window (or the send in flight) held back at its
 *     tick, sent when an echo let it: the server was over a tick behind, so
 *     it was not offered the schedule (run.py's CAPPED rule counts it);
 *     its lag is from the later of its tick and the echo;
 *   lost_full: credit over one window (-d) that a still-full window could
 *     not take: the echoes set the pace (the rate falls below the offer);
 *     lost_late when the pass was late: ticks it missed pile up (they are
 *     handed out together, every message late). */
static int depth_for_mode(void);
static double burst_q;          /* messages per connection per tick */
static uint64_t burst_origin, burst_k;
static uint64_t burst_tick_due; /* the due time of the tick being handed out, 0 outside */

static void burst_spend(struct conn *c, uint32_t n)
{
    if (!measuring)
        return;
    uint64_t t = now_ns();
    uint64_t ready = burst_tick_due;
    if (!ready) { /* out of a tick: sent because an echo (or a send) completed */
        ready = t_batch > c->t_credit ? t_batch : c->t_credit;
        sched.deferred += n;
    }
    double lag = t > ready ? (double)(t - ready) : 0;
    sched.starts += n;
    sched.waited += n;
    sched.lag_ns += lag * n;
    if (lag > (double)SCHED_LATE_NS)
        sched.late += n;
}

static int burst_pump(uint64_t t)
{
    if (!burst_origin)
        burst_origin = t;
    uint64_t due = burst_origin + burst_k * o.burst_ns;
    if (t < due)
        return 0;
    /* every tick due by now, in one hand-out (a pass more than a tick late
     * sends them together, all late from the oldest); cumulative, so that a
     * fractional share is paid in full over the ticks */
    uint64_t k1 = (t - burst_origin) / o.burst_ns + 1;
    uint32_t n = (uint32_t)((uint64_t)((double)k1 * burst_q) -
                            (uint64_t)((double)burst_k * burst_q));
    burst_k = k1;
    int late = t - due > SCHED_LATE_NS, served = 0;
    uint32_t depth = (uint32_t)depth_for_mode();
    burst_tick_due = due;
    for (int i = 0; n && i < nconns; i++) {
        struct conn *c = &conns[i];
        if (c->state != S_ACTIVE)
            continue;
        if (!c->credit)
            c->t_credit = due;
        c->credit += n;
        uint64_t before = c->tx_msg;
        refill_and_send(c);
        served += c->tx_msg != before;
        if (c->credit > depth) { /* over a window: the echoes' pace, or ours if late */
            if (measuring) {
                if (late)
                    sched.lost_late += c->credit - depth;
                else
                    sched.lost_full += c->credit - depth;
            }
            c->credit = depth;
        }
    }
    burst_tick_due = 0;
    return served;
}

static void print_sched(double secs)
{
    if (o.rate <= 0)
        return;
    printf(", \"sched\": {\"offered\": %.1f, \"starts\": %llu, \"waited\": %llu, "
           "\"late\": %llu, \"late_over_us\": %.0f, \"lag_us_mean\": %.3f, "
           "\"lost_late\": %.1f, \"lost_full\": %.1f",
           o.rate * secs, (unsigned long long)sched.starts, (unsigned long long)sched.waited,
           (unsigned long long)sched.late, SCHED_LATE_NS / 1e3,
           sched.waited ? sched.lag_ns / sched.waited / 1e3 : 0.0, sched.lost_late,
           sched.lost_full);
    if (o.burst_ns)
        printf(", \"burst_us\": %.1f, \"deferred\": %llu", o.burst_ns / 1e3,
               (unsigned long long)sched.deferred);
    printf("}");
}

static void start_connect(struct conn *c)
{
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0)
        die(2, "socket: %s", strerror(errno));
    int one = 1;
    /* small pipelined writes must not wait for ACKs (Nagle); a storm
     * connection sends one message, which Nagle never holds back */
    if (o.mode != M_CONNECT)
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    c->fd = fd;
    c->id = next_id++;
    c->tx_msg = c->rx_msg = 0;
    c->rx_off = 0;
    c->txlen = c->txpos = 0;
    c->send_busy = c->recv_armed = 0;
    c->t_start = now_ns();
    msg_make(&c->rx_ref, c->id, 0);
    open_count++;
    int r = connect(fd, (struct sockaddr *)&o.addr, sizeof o.addr);
    if (r < 0 && errno != EINPROGRESS)
        die(2, "connect to %s:%d: %s", o.host, o.port, strerror(errno));
    if (o.mode == M_CONNECT) {
        /* The storm's cost per connection is mostly the kernel's, and on
         * loopback the handshake has usually completed inside connect():
         * send at once (EAGAIN if it has not: then on EPOLLOUT), and one
         * epoll_ctl per connection, with the interest the send left. A
         * failed connect shows up as an error on the receive. */
        c->state = S_ACTIVE;
        c->unregistered = 1;
        c->events = EPOLLIN;
        refill_and_send(c);
        c->unregistered = 0;
        struct epoll_event e = {.events = c->events, .data.ptr = c};
        if (epoll_ctl(ep, EPOLL_CTL_ADD, fd, &e) < 0)
            die(2, "epoll_ctl add: %s", strerror(errno));
        return;
    }
    c->state = S_CONNECTING;
    c->events = EPOLLOUT;
    struct epoll_event e = {.events = EPOLLOUT, .data.ptr = c};
    if (epoll_ctl(ep, EPOLL_CTL_ADD, fd, &e) < 0)
        die(2, "epoll_ctl add: %s", strerror(errno));
}

static int depth_for_mode(void) { return o.mode == M_PIPELINE ? o.depth : 1; }

static void do_write(struct conn *c);
static void uring_send(struct conn *c);

/* Queue as many new messages as the window allows, but only once the
 * previous batch has been fully written: the buffer is then reused from 0. */
static void refill_and_send(struct conn *c)
{
    if (c->txpos < c->txlen || c->send_busy)
        return;
    c->txpos = c->txlen = 0;
    uint64_t limit = (o.mode == M_PINGPONG || o.mode == M_PIPELINE) ? UINT64_MAX : 1;
    int depth = depth_for_mode();
    uint64_t t = 0;
    uint32_t from_credit = 0;
    while (c->tx_msg - c->rx_msg < (uint64_t)depth && c->tx_msg < limit) {
        if (o.burst_ns) {
            if (from_credit == c->credit)
                break;
            from_credit++;
        } else if (c->prepaid)
            c->prepaid = 0;
        else if (c->waiting || !rate_take(c))
            break;
        struct msgref r;
        msg_make(&r, c->id, c->tx_msg);
        uint8_t *dst = c->txbuf + c->txlen;
        memcpy(dst, r.body, o.size);
        memcpy(dst, r.hdr, o.size < (int)HDR ? (size_t)o.size : HDR);
        if (!t)
            t = now_ns();
        c->sent_ns[c->tx_msg % depth] = t;
        c->txlen += o.size;
        c->tx_msg++;
    }
    if (from_credit) {
        c->credit -= from_credit;
        burst_spend(c, from_credit);
    }
    if (!c->txlen)
        return;
    if (engine == E_URING)
        uring_send(c);
    else
        do_write(c);
}

static void mismatch(struct conn *c, uint32_t off, uint8_t want, uint8_t got)
{
    die(3, "data mismatch on conn %u, message %llu, byte %u: expected 0x%02x got 0x%02x",
        c->id, (unsigned long long)c->rx_msg, off, want, got);
}

/* Check one chunk that belongs to the current message; returns its length. */
static uint32_t verify_chunk(struct conn *c, const uint8_t *p, uint32_t n)
{
    uint32_t k = (uint32_t)o.size - c->rx_off;
    if (k > n)
        k = n;
    uint32_t i = 0, off = c->rx_off;
    for (; i < k && off + i < HDR; i++)
        if (p[i] != c->rx_ref.hdr[off + i])
            mismatch(c, off + i, c->rx_ref.hdr[off + i], p[i]);
    if (i < k && memcmp(p + i, c->rx_ref.body + off + i, k - i) != 0) {
        for (; i < k; i++)
            if (p[i] != c->rx_ref.body[off + i])
                mismatch(c, off + i, c->rx_ref.body[off + i], p[i]);
    }
    return k;
}

/* returns 1 if the connection was closed here (connect mode) */
static int message_done(struct conn *c)
{
    uint64_t t = t_batch;
    int depth = depth_for_mode();
    uint64_t lat = t - (o.mode == M_CONNECT ? c->t_start : c->sent_ns[c->rx_msg % depth]);
    total_msgs++;
    if (measuring) {
        hist_add(&hist, lat);
        measured_msgs++;
        measured_bytes += (uint64_t)o.size;
        if (o.handicap > 0)
            hc_phase_msgs[hc_withholding(t)]++;
    }
    c->rx_msg++;
    c->rx_off = 0;
    msg_make(&c->rx_ref, c->id, c->rx_msg);
    if (o.mode == M_CONNECT) {
        if (measuring)
            measured_conns++;
        close_abort(c);
        return 1;
    }
    if (o.mode == M_IDLE) {
        c->state = S_IDLE;
        established++;
        return 0;
    }
    if (c->rx_msg == 1)
        established++;
    return 0;
}

/* Check and count n received bytes. Returns 1 if the connection was closed
 * (connect mode: its one message is done). Anything that is not exactly the
 * next expected bytes ends the run with exit code 3. */
static int consume(struct conn *c, const uint8_t *buf, uint32_t n)
{
    uint32_t pos = 0;
    while (pos < n) {
        if (c->rx_msg >= c->tx_msg)
            die(3, "conn %u received %u bytes nobody sent (stale or duplicated echo)", c->id,
                n - pos);
        uint32_t k = verify_chunk(c, buf + pos, n - pos);
        c->rx_off += k;
        pos += k;
        if (c->rx_off == (uint32_t)o.size && message_done(c)) {
            if (pos < n)
                die(3, "conn %u received %u bytes after its last message", c->id, n - pos);
            return 1;
        }
    }
    return 0;
}

/* ---------- epoll engines (sleeping, or busy with a zero timeout) ---------- */

static void do_write(struct conn *c)
{
    while (c->txpos < c->txlen) {
        ssize_t n = send(c->fd, c->txbuf + c->txpos, c->txlen - c->txpos, MSG_NOSIGNAL);
        if (n > 0) {
            c->txpos += (uint32_t)n;
            continue;
        }
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0 && errno == EAGAIN) {
            set_interest(c, EPOLLIN | EPOLLOUT);
            return;
        }
        die(2, "send on conn %u: %s", c->id, n < 0 ? strerror(errno) : "returned 0");
    }
    set_interest(c, EPOLLIN);
}

static void do_read(struct conn *c)
{
    for (;;) {
        ssize_t n = recv(c->fd, rxbuf, RXBUF, 0);
        if (n > 0) {
            t_batch = now_ns();
            if (consume(c, rxbuf, (uint32_t)n))
                return;
            if (n == (ssize_t)RXBUF)
                continue; /* maybe more queued */
            break;
        }
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0 && errno == EAGAIN)
            break;
        if (n == 0)
            die(2, "server closed conn %u (after %llu messages)", c->id,
                (unsigned long long)c->rx_msg);
        die(2, "recv on conn %u: %s", c->id, strerror(errno));
    }
    if (c->state == S_ACTIVE)
        refill_and_send(c);
}

static void on_connected(struct conn *c)
{
    int err = 0;
    socklen_t len = sizeof err;
    getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &len);
    if (err)
        die(2, "connect to %s:%d: %s", o.host, o.port, strerror(err));
    if (engine == E_URING) {
        /* set-up only: the traffic goes through the ring once all are up */
        c->state = S_READY;
        ready_count++;
        set_interest(c, 0);
        return;
    }
    c->state = S_ACTIVE;
    set_interest(c, EPOLLIN);
    refill_and_send(c);
}

static void handle_event(struct epoll_event *e)
{
    struct conn *c = e->data.ptr;
    if (c->state == S_CONNECTING) {
        if (e->events & (EPOLLOUT | EPOLLERR | EPOLLHUP))
            on_connected(c);
        return;
    }
    if (c->state == S_IDLE) {
        /* an idle connection must stay silent; anything here is the server
         * closing it or sending junk */
        char b[64];
        ssize_t n = recv(c->fd, b, sizeof b, 0);
        if (n == 0)
            die(2, "server closed idle conn %u", c->id);
        if (n > 0)
            die(3, "unexpected %zd bytes on idle conn %u", n, c->id);
        if (errno != EAGAIN && errno != EINTR)
            die(2, "idle conn %u: %s", c->id, strerror(errno));
        return;
    }
    if (c->state == S_READY)
        return;
    if (e->events & (EPOLLIN | EPOLLERR | EPOLLHUP))
        do_read(c);
    if (c->state == S_ACTIVE && (e->events & EPOLLOUT)) {
        do_write(c);
        if (c->txpos == c->txlen)
            refill_and_send(c);
    }
}

/* One pass: wait up to timeout_ms (0 for the busy engine, whatever the
 * caller asks), handle what came. */
static int poll_events(int timeout_ms, int busy)
{
    static struct epoll_event evs[1024];
    uint64_t t0 = busy ? now_ns() : 0;
    int n = epoll_wait(ep, evs, 1024, busy ? 0 : timeout_ms);
    busy_acct.enters++;
    busy_acct.passes++;
    if (n < 0) {
        if (errno == EINTR)
            return 0;
        die(2, "epoll_wait: %s", strerror(errno));
    }
    for (int i = 0; i < n; i++)
        handle_event(&evs[i]);
    if (n > 0)
        busy_acct.work_passes++;
    else if (busy) {
        busy_acct.idle_ns += now_ns() - t0;
        cpu_relax();
    }
    return n;
}

static int ms_until(uint64_t deadline)
{
    uint64_t t = now_ns();
    if (t >= deadline)
        return 0;
    return (int)((deadline - t + 999999) / 1000000);
}

/* ---------- io_uring engine (busy-polling) ----------
 * Raw syscalls, no liburing. One ring, owned by this (only) thread:
 * SINGLE_ISSUER | DEFER_TASKRUN means completions are produced only when we
 * enter the kernel and ask, so nobody interrupts the spinning thread, and a
 * server's send that makes our socket readable costs it no wake-up (we are
 * never asleep). TASKRUN_FLAG makes the kernel raise IORING_SQ_TASKRUN in
 * the shared ring when such deferred work is waiting, so the spin reads two
 * words in user space and enters the kernel only when there is work. */

#define U_SQ 1024
#define U_CQ 16384
#define U_BGID 7
#define U_NBUF 256u          /* power of two */
#define U_BUFSZ (16u * 1024u)
enum { OP_RECV = 1, OP_SEND = 2 };

static struct {
    int fd, enter_fd;
    unsigned enter_flags;
    int taskrun_flag; /* IORING_SQ_TASKRUN can be trusted: spin without entering */
    unsigned setup_flags;
    unsigned *sq_head, *sq_tail, *sq_mask, *sq_array, *sq_flags, sq_entries;
    struct io_uring_sqe *sqes;
    unsigned *cq_head, *cq_tail, *cq_mask;
    struct io_uring_cqe *cqes;
    unsigned sq_local_tail;
    struct io_uring_buf_ring *br;
    uint8_t *bufs;
    uint16_t br_tail;
    struct conn **rearm; /* connections whose multishot receive ended */
    int nrearm;
    int fixed_files; /* the sockets are registered: SQEs name them by index */
} U;

static int u_enter(unsigned to_submit, unsigned min_complete, unsigned flags)
{
    busy_acct.enters++;
    return (int)syscall(__NR_io_uring_enter, U.enter_fd, to_submit, min_complete,
                        flags | U.enter_flags, NULL, 0);
}

static void u_buf_give(uint16_t bid)
{
    struct io_uring_buf *b = &U.br->bufs[U.br_tail & (U_NBUF - 1)];
    b->addr = (uintptr_t)(U.bufs + (size_t)bid * U_BUFSZ);
    b->len = U_BUFSZ;
    b->bid = bid;
    U.br_tail++;
}

static void u_buf_publish(void) { __atomic_store_n(&U.br->tail, U.br_tail, __ATOMIC_RELEASE); }

/* Returns 0 on success, or a reason the ring cannot be used (the caller
 * falls back to epoll-busy). */
static const char *uring_init(void)
{
    struct io_uring_params p;
    /* newest flags first; each fallback drops what an older kernel lacks */
    static const struct { unsigned flags; int taskrun_flag; } sets[] = {
        {IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_DEFER_TASKRUN | IORING_SETUP_TASKRUN_FLAG, 1},
        {IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_DEFER_TASKRUN, 0},
        {IORING_SETUP_COOP_TASKRUN | IORING_SETUP_TASKRUN_FLAG, 1},
        {0, 0},
    };
    int fd = -1;
    for (unsigned i = 0; i < sizeof sets / sizeof sets[0]; i++) {
        memset(&p, 0, sizeof p);
        p.flags = sets[i].flags | IORING_SETUP_CQSIZE | IORING_SETUP_SUBMIT_ALL;
        p.cq_entries = U_CQ;
        fd = (int)syscall(__NR_io_uring_setup, U_SQ, &p);
        if (fd >= 0) {
            U.taskrun_flag = sets[i].taskrun_flag;
            U.setup_flags = sets[i].flags;
            break;
        }
    }
    if (fd < 0)
        return "io_uring_setup failed";
    if (!(p.features & IORING_FEAT_SINGLE_MMAP) || !(p.features & IORING_FEAT_NODROP)) {
        close(fd);
        return "kernel too old (no single mmap / nodrop)";
    }
    U.fd = U.enter_fd = fd;
    size_t sq_sz = p.sq_off.array + p.sq_entries * sizeof(unsigned);
    size_t cq_sz = p.cq_off.cqes + p.cq_entries * sizeof(struct io_uring_cqe);
    size_t sz = sq_sz > cq_sz ? sq_sz : cq_sz;
    uint8_t *ring = mmap(NULL, sz, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd,
                         IORING_OFF_SQ_RING);
    U.sqes = mmap(NULL, p.sq_entries * sizeof(struct io_uring_sqe), PROT_READ | PROT_WRITE,
                  MAP_SHARED | MAP_POPULATE, fd, IORING_OFF_SQES);
    if (ring == MAP_FAILED || U.sqes == MAP_FAILED)
        return "mmap of the ring failed";
    U.sq_head = (unsigned *)(ring + p.sq_off.head);
    U.sq_tail = (unsigned *)(ring + p.sq_off.tail);
    U.sq_mask = (unsigned *)(ring + p.sq_off.ring_mask);
    U.sq_array = (unsigned *)(ring + p.sq_off.array);
    U.sq_flags = (unsigned *)(ring + p.sq_off.flags);
    U.sq_entries = p.sq_entries;
    U.cq_head = (unsigned *)(ring + p.cq_off.head);
    U.cq_tail = (unsigned *)(ring + p.cq_off.tail);
    U.cq_mask = (unsigned *)(ring + p.cq_off.ring_mask);
    U.cqes = (struct io_uring_cqe *)(ring + p.cq_off.cqes);
    for (unsigned i = 0; i < p.sq_entries; i++)
        U.sq_array[i] = i;
    U.sq_local_tail = *U.sq_tail;

    /* a registered ring descriptor saves the fd lookup on every enter */
    struct io_uring_rsrc_update up = {.offset = -1U, .data = (uint64_t)fd};
    if (syscall(__NR_io_uring_register, fd, IORING_REGISTER_RING_FDS, &up, 1) == 1) {
        U.enter_fd = (int)up.offset;
        U.enter_flags = IORING_ENTER_REGISTERED_RING;
    }

    /* provided-buffer ring for the multishot receives */
    size_t ring_bytes = U_NBUF * sizeof(struct io_uring_buf);
    U.br = mmap(NULL, ring_bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    U.bufs = mmap(NULL, (size_t)U_NBUF * U_BUFSZ, PROT_READ | PROT_WRITE,
                  MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
    if (U.br == MAP_FAILED || U.bufs == MAP_FAILED)
        return "out of memory for the buffer ring";
    struct io_uring_buf_reg reg = {.ring_addr = (uintptr_t)U.br, .ring_entries = U_NBUF,
                                   .bgid = U_BGID};
    if (syscall(__NR_io_uring_register, fd, IORING_REGISTER_PBUF_RING, &reg, 1) != 0)
        return "no provided-buffer rings (IORING_REGISTER_PBUF_RING)";
    U.br_tail = 0;
    for (unsigned i = 0; i < U_NBUF; i++)
        u_buf_give((uint16_t)i);
    u_buf_publish();
    return NULL;
}

static unsigned u_pending(void)
{
    return U.sq_local_tail - __atomic_load_n(U.sq_head, __ATOMIC_ACQUIRE);
}

static void u_publish(void) { __atomic_store_n(U.sq_tail, U.sq_local_tail, __ATOMIC_RELEASE); }

static void u_flush(void)
{
    u_publish();
    unsigned n = u_pending();
    while (n) {
        int r = u_enter(n, 0, IORING_ENTER_GETEVENTS);
        if (r < 0 && errno != EINTR && errno != EAGAIN && errno != EBUSY)
            die(2, "io_uring_enter: %s", strerror(errno));
        n = u_pending();
    }
}

static struct io_uring_sqe *u_sqe(void)
{
    if (U.sq_local_tail - __atomic_load_n(U.sq_head, __ATOMIC_ACQUIRE) >= U.sq_entries)
        u_flush();
    struct io_uring_sqe *sqe = &U.sqes[U.sq_local_tail & *U.sq_mask];
    U.sq_local_tail++;
    memset(sqe, 0, sizeof *sqe);
    return sqe;
}

static void uring_arm_recv(struct conn *c)
{
    struct io_uring_sqe *sqe = u_sqe();
    sqe->opcode = IORING_OP_RECV;
    sqe->fd = U.fixed_files ? (int)c->idx : c->fd;
    sqe->ioprio = IORING_RECV_MULTISHOT;
    sqe->flags = IOSQE_BUFFER_SELECT | (U.fixed_files ? IOSQE_FIXED_FILE : 0);
    sqe->buf_group = U_BGID;
    sqe->user_data = ((uint64_t)c->idx << 8) | OP_RECV;
    c->recv_armed = 1;
}

/* One send in flight per connection: a second one could overtake the rest
 * of a first that went short, and the bytes would arrive out of order.
 * MSG_WAITALL has the kernel finish a short send itself. */
static void uring_send(struct conn *c)
{
    struct io_uring_sqe *sqe = u_sqe();
    sqe->opcode = IORING_OP_SEND;
    sqe->fd = U.fixed_files ? (int)c->idx : c->fd;
    sqe->flags = U.fixed_files ? IOSQE_FIXED_FILE : 0;
    sqe->addr = (uintptr_t)(c->txbuf + c->txpos);
    sqe->len = c->txlen - c->txpos;
    sqe->msg_flags = MSG_NOSIGNAL | MSG_WAITALL;
    sqe->user_data = ((uint64_t)c->idx << 8) | OP_SEND;
    c->send_busy = 1;
}

static void uring_cqe(uint64_t ud, int res, unsigned flags)
{
    struct conn *c = &conns[ud >> 8];
    if ((ud & 0xff) == OP_SEND) {
        c->send_busy = 0;
        if (res < 0)
            die(2, "send on conn %u: %s", c->id, strerror(-res));
        c->txpos += (uint32_t)res;
        if (c->txpos < c->txlen) {
            busy_acct.short_sends++;
            uring_send(c);
        } else {
            refill_and_send(c); /* the window may have opened meanwhile */
        }
        return;
    }
    if (!(flags & IORING_CQE_F_MORE)) {
        c->recv_armed = 0;
        U.rearm[U.nrearm++] = c;
    }
    if (res > 0) {
        if (!(flags & IORING_CQE_F_BUFFER))
            die(2, "receive without a buffer on conn %u", c->id);
        uint16_t bid = (uint16_t)(flags >> IORING_CQE_BUFFER_SHIFT);
        consume(c, U.bufs + (size_t)bid * U_BUFSZ, (uint32_t)res);
        u_buf_give(bid); /* checked: back to the kernel */
        refill_and_send(c);
        return;
    }
    if (res == -ENOBUFS) { /* ring ran dry: re-armed below, once buffers are back */
        busy_acct.enobufs++;
        return;
    }
    if (res == 0)
        die(2, "server closed conn %u (after %llu messages)", c->id, (unsigned long long)c->rx_msg);
    die(2, "recv on conn %u: %s", c->id, strerror(-res));
}

/* Reap everything in the completion ring; returns how many. */
static unsigned uring_reap(void)
{
    unsigned head = *U.cq_head, n = 0;
    unsigned tail = __atomic_load_n(U.cq_tail, __ATOMIC_ACQUIRE);
    if (head == tail)
        return 0;
    t_batch = now_ns();
    while (head != tail) {
        struct io_uring_cqe *cqe = &U.cqes[head & *U.cq_mask];
        uint64_t ud = cqe->user_data;
        int res = cqe->res;
        unsigned fl = cqe->flags;
        head++;
        n++;
        __atomic_store_n(U.cq_head, head, __ATOMIC_RELEASE);
        uring_cqe(ud, res, fl);
        if (head == tail)
            tail = __atomic_load_n(U.cq_tail, __ATOMIC_ACQUIRE);
    }
    u_buf_publish();
    for (int i = 0; i < U.nrearm; i++)
        if (!U.rearm[i]->recv_armed) {
            busy_acct.rearms++;
            uring_arm_recv(U.rearm[i]);
        }
    U.nrearm = 0;
    return n;
}

/* Spin until the deadline. */
static void uring_run(uint64_t deadline)
{
    uint64_t t = now_ns();
    while (t < deadline) {
        if (o.handicap > 0)
            t = handicap_pause(t);
        u_publish();
        unsigned pending = u_pending();
        unsigned sqf = __atomic_load_n(U.sq_flags, __ATOMIC_ACQUIRE);
        int enter = pending || !U.taskrun_flag ||
                    (sqf & (IORING_SQ_TASKRUN | IORING_SQ_CQ_OVERFLOW));
        if (enter) {
            int r = u_enter(pending, 0, IORING_ENTER_GETEVENTS);
            if (r < 0 && errno != EINTR && errno != EAGAIN && errno != EBUSY)
                die(2, "io_uring_enter: %s", strerror(errno));
        }
        unsigned got = uring_reap();
        if (o.rate > 0)
            got += (unsigned)rate_pump(now_ns());
        uint64_t t2 = now_ns();
        busy_acct.passes++;
        if (got || pending) {
            busy_acct.work_passes++;
        } else {
            busy_acct.idle_ns += t2 - t;
            cpu_relax();
        }
        t = t2;
    }
}

/* Connections are set up with (sleeping) epoll, then handed to the ring:
 * the receive armed and the first messages sent. */
static void uring_start_traffic(void)
{
    U.rearm = calloc((size_t)nconns, sizeof *U.rearm);
    int *fds = calloc((size_t)nconns, sizeof *fds);
    if (!U.rearm || !fds)
        die(2, "out of memory");
    /* registered sockets: each send and receive skips the descriptor
     * lookup and its reference count (fget/fput); optional */
    for (int i = 0; i < nconns; i++)
        fds[i] = conns[i].fd;
    U.fixed_files = syscall(__NR_io_uring_register, U.fd, IORING_REGISTER_FILES, fds,
                            (unsigned)nconns) == 0;
    free(fds);
    for (int i = 0; i < nconns; i++) {
        struct conn *c = &conns[i];
        epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
        c->state = S_ACTIVE;
        uring_arm_recv(c);
        refill_and_send(c);
    }
}

/* ---------- modes ---------- */

struct window {
    uint64_t t0, t1;
    double lg_cpu0, lg_cpu1, lg_delay0, lg_delay1, sv_tick0, sv_tick1;
    struct sched sv0, sv1;
};

static void window_begin(struct window *w)
{
    measuring = 1;
    memset(&busy_acct, 0, sizeof busy_acct);
    hc_phase_msgs[0] = hc_phase_msgs[1] = 0;
    memset(&sched, 0, sizeof sched);
    w->t0 = now_ns();
    w->lg_cpu0 = cpu_self_s();
    w->lg_delay0 = self_delay_s();
    if (server_pid) {
        w->sv0 = server_sched();
        w->sv_tick0 = server_cpu_ticks_s();
    }
}

static void window_end(struct window *w)
{
    measuring = 0;
    w->t1 = now_ns();
    w->lg_cpu1 = cpu_self_s();
    w->lg_delay1 = self_delay_s();
    if (server_pid) {
        w->sv1 = server_sched();
        w->sv_tick1 = server_cpu_ticks_s();
    }
}

static void print_common(const struct window *w)
{
    double secs = (w->t1 - w->t0) / 1e9;
    double cpu = w->lg_cpu1 - w->lg_cpu0;
    /* see the essay at the top: a busy-poller's CPU time is always ~100 %,
     * the share of its time that found work is what says it was the limit */
    /* with -H, the share of the time it allowed itself that it used */
    double avail = secs - busy_acct.handicap_ns / 1e9;
    double busy = engine == E_EPOLL ? cpu / secs : 1.0 - (busy_acct.idle_ns / 1e9) / avail;
    if (busy < 0)
        busy = 0;
    printf("\"engine\": \"%s\", \"window_s\": %.6f, \"loadgen_cpu_s\": %.6f, "
           "\"loadgen_busy\": %.4f, \"loadgen_idle_s\": %.6f, \"loadgen_polls\": %llu, "
           "\"loadgen_polls_with_work\": %llu, \"loadgen_kernel_calls\": %llu",
           engine_names[engine], secs, cpu, busy, busy_acct.idle_ns / 1e9,
           (unsigned long long)busy_acct.passes, (unsigned long long)busy_acct.work_passes,
           (unsigned long long)busy_acct.enters);
    if (o.handicap > 0) {
        /* time of the window in free (0) and withheld (1) phases */
        double ph[2] = {0, 0};
        for (uint64_t a = w->t0; a < w->t1;) {
            uint64_t slot = (a - hc_origin) / HC_PHASE_NS;
            uint64_t b = hc_origin + (slot + 1) * HC_PHASE_NS;
            if (b > w->t1)
                b = w->t1;
            ph[slot & 1] += (b - a) / 1e9;
            a = b;
        }
        double r0 = ph[0] > 0 ? hc_phase_msgs[0] / ph[0] : 0;
        double r1 = ph[1] > 0 ? hc_phase_msgs[1] / ph[1] : 0;
        printf(", \"loadgen_handicap\": %.3f, \"loadgen_withheld_s\": %.6f, "
               "\"probe_free_s\": %.6f, \"probe_withheld_s\": %.6f, "
               "\"probe_free_rate\": %.1f, \"probe_withheld_rate\": %.1f, "
               "\"probe_rate_ratio\": %.4f, \"probe_withheld_share\": %.4f",
               o.handicap, busy_acct.handicap_ns / 1e9, ph[0], ph[1], r0, r1,
               r0 > 0 ? r1 / r0 : 0, ph[1] > 0 ? busy_acct.handicap_ns / 1e9 / ph[1] : 0);
    }
    if (engine == E_URING)
        printf(", \"uring\": {\"setup_flags\": %u, \"taskrun_flag\": %d, \"registered_ring\": %d, "
               "\"fixed_files\": %d, "
               "\"recv_rearms\": %llu, \"enobufs\": %llu, \"short_sends\": %llu}",
               U.setup_flags, U.taskrun_flag, U.enter_flags != 0, U.fixed_files,
               (unsigned long long)busy_acct.rearms, (unsigned long long)busy_acct.enobufs,
               (unsigned long long)busy_acct.short_sends);
    if (w->lg_delay0 >= 0 && w->lg_delay1 >= 0)
        printf(", \"loadgen_run_delay_s\": %.6f", w->lg_delay1 - w->lg_delay0);
    if (server_pid) {
        int ok = w->sv0.run_s >= 0 && w->sv1.run_s >= 0;
        double sched = ok ? w->sv1.run_s - w->sv0.run_s : -1;
        double tick = (w->sv_tick0 >= 0 && w->sv_tick1 >= 0) ? w->sv_tick1 - w->sv_tick0 : -1;
        printf(", \"server_cpu_s\": %.6f, \"server_cpu_ticks_s\": %.3f, \"server_rss_kb\": %ld",
               sched >= 0 ? sched : tick, tick, server_rss_kb());
        if (ok)
            printf(", \"server_run_delay_s\": %.6f", w->sv1.delay_s - w->sv0.delay_s);
    }
}

static void print_latency(void)
{
    printf("\"lat_us\": {\"mean\": %.3f, \"p50\": %.3f, \"p90\": %.3f, \"p99\": %.3f, "
           "\"p999\": %.3f, \"max\": %.3f}",
           hist.n ? hist.sum / hist.n / 1e3 : 0.0, hist_pct(&hist, 50) / 1e3,
           hist_pct(&hist, 90) / 1e3, hist_pct(&hist, 99) / 1e3, hist_pct(&hist, 99.9) / 1e3,
           hist.max / 1e3);
}

static void alloc_conns(int n, int depth)
{
    nconns = n;
    rate_wait = calloc((size_t)n, sizeof *rate_wait);
    /* at least 2: with room for one token only, the part of the next token
     * accrued between its falling due and the pass that spends it would be
     * dropped (a 2 % schedule loss at 1000/s for a 20 us late pass) */
    rate_burst = o.rate / 1000.0 < 2 ? 2 : o.rate / 1000.0;
    rate_tokens = rate_burst;
    rate_t = now_ns();
    conns = calloc((size_t)n, sizeof *conns);
    if (!conns)
        die(2, "out of memory");
    for (int i = 0; i < n; i++) {
        conns[i].fd = -1;
        conns[i].idx = (uint32_t)i;
        conns[i].txbuf = malloc((size_t)depth * (size_t)o.size);
        conns[i].sent_ns = calloc((size_t)depth, sizeof(uint64_t));
        if (!conns[i].txbuf || !conns[i].sent_ns)
            die(2, "out of memory");
    }
}

/* Run the current engine until the deadline. */
static void run_until(uint64_t deadline)
{
    if (engine == E_URING) {
        uring_run(deadline);
        return;
    }
    int busy = engine == E_EPOLL_BUSY;
    while (now_ns() < deadline) {
        /* a capped sleeping engine wakes at least every millisecond to refill */
        int ms = ms_until(deadline);
        if (o.rate > 0 && ms > 1)
            ms = 1;
        if (busy)
            handicap_pause(now_ns());
        poll_events(ms, busy);
        rate_pump(now_ns());
    }
}

/* pingpong / pipeline: connect everything, warm up, measure */
static void run_traffic(void)
{
    alloc_conns(o.conns, depth_for_mode());
    /* connect in bounded batches: a burst of thousands of SYNs would overflow
     * a small listen backlog and stall on 1 s SYN retransmits */
    uint64_t setup_deadline = now_ns() + (uint64_t)(o.setup_timeout * 1e9);
    int started = 0;
    int *done = engine == E_URING ? &ready_count : &established;
    while (*done < o.conns) {
        while (started < o.conns && open_count - *done < o.setup_conc)
            start_connect(&conns[started++]);
        poll_events(o.rate > 0 ? 1 : ms_until(setup_deadline), 0);
        rate_pump(now_ns()); /* epoll engines send the first messages here */
        if (*done < o.conns && now_ns() >= setup_deadline)
            die(2, "only %d of %d connections established within %g s", *done, o.conns,
                o.setup_timeout);
    }
    if (engine == E_URING)
        uring_start_traffic();
    run_until(now_ns() + (uint64_t)(o.warmup * 1e9));
    struct window w;
    window_begin(&w);
    run_until(w.t0 + (uint64_t)(o.duration * 1e9));
    window_end(&w);

    double secs = (w.t1 - w.t0) / 1e9;
    printf("{\"mode\": \"%s\", \"conns\": %d, \"size\": %d, \"depth\": %d, \"rate_cap\": %.0f, ",
           mode_names[o.mode], o.conns, o.size, depth_for_mode(), o.rate);
    printf("\"roundtrips\": %llu, \"rt_per_s\": %.1f, \"mb_per_s\": %.3f, ",
           (unsigned long long)measured_msgs, measured_msgs / secs, measured_bytes / secs / 1e6);
    print_common(&w);
    print_sched(secs);
    printf(", ");
    print_latency();
    printf(", \"errors\": 0}\n");
    fflush(stdout);
    if (measured_msgs == 0) {
        /* say where it stood, so that a stall can be told from starvation */
        uint64_t inflight = 0, credit = 0;
        int sending = 0, armed = 0;
        for (int i = 0; i < nconns; i++) {
            inflight += conns[i].tx_msg - conns[i].rx_msg;
            credit += conns[i].credit;
            sending += conns[i].send_busy;
            armed += conns[i].recv_armed;
        }
        die(2, "no round-trip completed in the measured window (%.3f s: %d connections, "
            "%llu messages in flight, %d sends in flight, %d receives armed, %llu credit; "
            "%llu passes, %llu with work; it waited %.3f s for its core; server CPU %.3f s)",
            secs, nconns, (unsigned long long)inflight, sending, armed,
            (unsigned long long)credit, (unsigned long long)busy_acct.passes,
            (unsigned long long)busy_acct.work_passes, w.lg_delay1 - w.lg_delay0,
            server_pid ? w.sv1.run_s - w.sv0.run_s : -1.0);
    }
    if (engine == E_URING && U.fixed_files) /* let close() below really close them */
        syscall(__NR_io_uring_register, U.fd, IORING_UNREGISTER_FILES, NULL, 0);
    for (int i = 0; i < nconns; i++)
        if (conns[i].fd >= 0)
            close_abort(&conns[i]);
}

/* Connect mode with -r: sleep in epoll until the next token falls due or an
 * event comes (epoll_pwait2: a nanosecond timeout; the timer slack is set to
 * 1 ns for it), so that the generator's CPU time is what the offered rate
 * costs it (engine "epoll": busy = CPU time / window) instead of a spin. */
static void poll_events_until(uint64_t deadline)
{
    static struct epoll_event evs[1024];
    uint64_t t = now_ns();
    uint64_t d = deadline > t ? deadline - t : 0;
    struct timespec ts = {.tv_sec = (time_t)(d / 1000000000ull), .tv_nsec = (long)(d % 1000000000ull)};
    int n = (int)syscall(SYS_epoll_pwait2, ep, evs, 1024, &ts, NULL, (size_t)8);
    if (n < 0 && errno == ENOSYS)
        n = epoll_wait(ep, evs, 1024, (int)((d + 999999) / 1000000));
    busy_acct.enters++;
    busy_acct.passes++;
    if (n < 0) {
        if (errno == EINTR)
            return;
        die(2, "epoll_wait: %s", strerror(errno));
    }
    if (n > 0)
        busy_acct.work_passes++;
    for (int i = 0; i < n; i++)
        handle_event(&evs[i]);
}

static void run_connect(void)
{
    alloc_conns(o.conns, 1);
    int busy = engine == E_EPOLL_BUSY;
    uint64_t t_warm_end = now_ns() + (uint64_t)(o.warmup * 1e9);
    uint64_t t_end = t_warm_end + (uint64_t)(o.duration * 1e9);
    struct window w;
    int in_window = 0;
    for (int i = 0; i < nconns; i++)
        conns[i].t_wait = now_ns(); /* a free slot waits for its token from now */
    for (;;) {
        uint64_t t = now_ns();
        if (!in_window && t >= t_warm_end) {
            window_begin(&w);
            in_window = 1;
        }
        if (t >= t_end)
            break;
        if (busy)
            handicap_pause(t);
        uint64_t wake = in_window ? t_end : t_warm_end;
        if (o.rate > 0) {
            /* -r: every connection takes one token here, before it starts
             * (its one message takes none: rate_take), so the cap counts
             * connections and every server is offered the same number per
             * second; a free slot is a sender waiting for its token */
            rate_refill_w(t, open_count < nconns);
            for (int i = 0; i < nconns && rate_tokens >= 1; i++)
                if (conns[i].state == S_FREE) {
                    rate_spend(t, conns[i].t_wait);
                    start_connect(&conns[i]);
                }
            if (open_count < nconns) { /* sleep until the next token falls due */
                uint64_t due = t + (uint64_t)((1 - rate_tokens) * 1e9 / o.rate) + 1;
                if (due < wake)
                    wake = due;
            }
            poll_events_until(wake);
            continue;
        }
        for (int i = 0; i < nconns; i++)
            if (conns[i].state == S_FREE)
                start_connect(&conns[i]);
        poll_events(ms_until(wake), busy);
    }
    window_end(&w);
    double secs = (w.t1 - w.t0) / 1e9;
    printf("{\"mode\": \"connect\", \"conns\": %d, \"size\": %d, \"rate_cap\": %.0f, ",
           o.conns, o.size, o.rate);
    printf("\"connections\": %llu, \"conn_per_s\": %.1f, \"roundtrips\": %llu, \"rt_per_s\": %.1f, ",
           (unsigned long long)measured_conns, measured_conns / secs,
           (unsigned long long)measured_msgs, measured_msgs / secs);
    print_common(&w);
    print_sched(secs);
    printf(", ");
    print_latency();
    printf(", \"errors\": 0}\n");
    fflush(stdout);
    if (measured_conns == 0)
        die(2, "no connection completed in the measured window");
    for (int i = 0; i < nconns; i++)
        if (conns[i].fd >= 0)
            close_abort(&conns[i]);
}

static void run_idle(void)
{
    long rss_before = server_pid ? server_rss_kb() : -1;
    alloc_conns(o.idle_count, 1);
    uint64_t t0 = now_ns();
    uint64_t setup_deadline = t0 + (uint64_t)(o.setup_timeout * 1e9);
    int started = 0;
    int busy = engine == E_EPOLL_BUSY;
    measuring = 1; /* latency of the single round-trips is still informative */
    while (established < o.idle_count) {
        while (started < o.idle_count && open_count - established < o.setup_conc)
            start_connect(&conns[started++]);
        poll_events(ms_until(setup_deadline), busy);
        if (established < o.idle_count && now_ns() >= setup_deadline)
            die(2, "only %d of %d idle connections established within %g s", established,
                o.idle_count, o.setup_timeout);
    }
    measuring = 0;
    double setup_s = (now_ns() - t0) / 1e9;
    /* hold: keep watching for the server dropping connections, sample RSS */
    uint64_t t_hold = now_ns();
    uint64_t t_end = t_hold + (uint64_t)(o.idle_hold * 1e9);
    long rss_max = -1, rss_last = -1;
    double cpu0 = server_pid ? server_cpu_sched_s() : 0;
    uint64_t next_sample = t_hold;
    while (now_ns() < t_end) {
        if (server_pid && now_ns() >= next_sample) {
            rss_last = server_rss_kb();
            if (rss_last > rss_max)
                rss_max = rss_last;
            next_sample += 250000000ull;
        }
        uint64_t until = next_sample < t_end ? next_sample : t_end;
        poll_events(ms_until(until), busy);
    }
    if (server_pid) {
        rss_last = server_rss_kb();
        if (rss_last > rss_max)
            rss_max = rss_last;
    }
    double cpu1 = server_pid ? server_cpu_sched_s() : 0;
    double hold_s = (now_ns() - t_hold) / 1e9;
    printf("{\"mode\": \"idle\", \"engine\": \"%s\", \"idle_count\": %d, \"size\": %d, "
           "\"setup_s\": %.3f, \"hold_s\": %.3f, ",
           engine_names[engine], o.idle_count, o.size, setup_s, hold_s);
    printf("\"server_rss_before_kb\": %ld, \"server_rss_held_kb\": %ld, "
           "\"server_rss_held_max_kb\": %ld, \"server_cpu_during_hold_s\": %.6f, ",
           rss_before, rss_last, rss_max, cpu1 - cpu0);
    print_latency();
    printf(", \"errors\": 0}\n");
    fflush(stdout);
    for (int i = 0; i < nconns; i++)
        if (conns[i].fd >= 0)
            close_abort(&conns[i]);
}

/* ---------- main ---------- */

static void usage(FILE *f)
{
    fprintf(f,
            "usage: loadgen -p PORT [options]\n"
            "  -a ADDR    IPv4 loopback address of the server (127.0.0.1)\n"
            "  -p PORT    server port (required)\n"
            "  -m MODE    pingpong | pipeline | connect | idle (pingpong)\n"
            "  -e ENGINE  uring | epoll-busy | epoll (uring for pingpong/pipeline,\n"
            "             epoll-busy for connect, epoll for idle; uring applies to\n"
            "             pingpong/pipeline only)\n"
            "  -c N       connections (pingpong/pipeline: 1; connect: in flight, 50)\n"
            "  -s BYTES   message size (64, max %u)\n"
            "  -d N       pipeline depth per connection (16)\n"
            "  -w SECS    warm-up before the measured window (1)\n"
            "  -t SECS    measured window (5)\n"
            "  -n N       idle: number of connections (10000)\n"
            "  -i SECS    idle: how long to hold them (5)\n"
            "  -C N       connects in progress at once during set-up (64)\n"
            "  -T SECS    set-up timeout (60)\n"
            "  -P PID     server pid: report its CPU time (and RSS)\n"
            "  -r RATE    pingpong/pipeline: send at most RATE messages per second;\n"
            "             connect: start at most RATE connections per second, sleeping\n"
            "             between tokens (engine epoll: busy = its CPU time)\n"
            "             (0, the default: as fast as the echoes come back)\n"
            "  -b USEC    with -r (pingpong/pipeline): offer the rate in ticks USEC\n"
            "             apart, each connection writing its share of a tick in one\n"
            "             send (0, the default: every message on its own token)\n"
            "  -H SHARE   headroom probe: withhold SHARE (0-0.9) of its core from\n"
            "             itself in every other 100 ms phase and report the rate in\n"
            "             both kinds of phase (busy-polling engines; see handicap_pause)\n",
            MAX_MSG);
}

static double parse_secs(const char *s)
{
    char *end;
    double v = strtod(s, &end);
    if (end == s || *end || !(v >= 0 && v <= 3600)) {   /* "" is no 0 (nor is nan) */
        fprintf(stderr, "loadgen: bad duration '%s'\n", s);
        exit(1);
    }
    return v;
}

static long parse_int(const char *s, long lo, long hi)
{
    char *end;
    long v = strtol(s, &end, 10);
    if (end == s || *end || v < lo || v > hi) {   /* "" is no 0: -r "" meant no cap */
        fprintf(stderr, "loadgen: '%s' is not a number in [%ld, %ld]\n", s, lo, hi);
        exit(1);
    }
    return v;
}

static int lookup(const char *what, const char *s, const char **names, int n)
{
    for (int i = 0; i < n; i++)
        if (strcmp(s, names[i]) == 0)
            return i;
    fprintf(stderr, "loadgen: unknown %s '%s'\n", what, s);
    exit(1);
}

int main(int argc, char **argv)
{
    o.host = "127.0.0.1";
    o.mode = M_PINGPONG;
    o.engine = E_DEFAULT;
    o.conns = -1;
    o.size = 64;
    o.depth = 16;
    o.warmup = 1;
    o.duration = 5;
    o.idle_count = 10000;
    o.idle_hold = 5;
    o.setup_conc = 64;
    o.setup_timeout = 60;
    int opt;
    while ((opt = getopt(argc, argv, "a:p:m:e:c:s:d:w:t:n:i:C:T:P:r:b:H:h")) != -1) {
        switch (opt) {
        case 'a': o.host = optarg; break;
        case 'p': o.port = (int)parse_int(optarg, 1, 65535); break;
        case 'm': o.mode = lookup("mode", optarg, mode_names, 4); break;
        case 'e': o.engine = lookup("engine", optarg, engine_names, 3); break;
        case 'c': o.conns = (int)parse_int(optarg, 1, 1000000); break;
        case 's': o.size = (int)parse_int(optarg, 1, MAX_MSG); break;
        case 'd': o.depth = (int)parse_int(optarg, 1, 4096); break;
        case 'w': o.warmup = parse_secs(optarg); break;
        case 't': o.duration = parse_secs(optarg); break;
        case 'n': o.idle_count = (int)parse_int(optarg, 1, 1000000); break;
        case 'i': o.idle_hold = parse_secs(optarg); break;
        case 'C': o.setup_conc = (int)parse_int(optarg, 1, 100000); break;
        case 'T': o.setup_timeout = parse_secs(optarg); break;
        case 'P': server_pid = (int)parse_int(optarg, 1, 1 << 30); break;
        case 'r': o.rate = (double)parse_int(optarg, 0, 100000000); break;
        case 'b': o.burst_ns = (uint64_t)parse_int(optarg, 0, 1000000) * 1000u; break;
        case 'H': {
            char *end;
            o.handicap = strtod(optarg, &end);
            if (end == optarg || *end || !(o.handicap >= 0 && o.handicap <= 0.9)) {
                fprintf(stderr, "loadgen: -H wants a share in [0, 0.9], not '%s'\n", optarg);
                return 1;
            }
            break;
        }
        case 'h': usage(stdout); return 0;
        default: usage(stderr); return 1;
        }
    }
    if (!o.port || optind != argc) {
        usage(stderr);
        return 1;
    }
    if (o.conns < 0)
        o.conns = o.mode == M_CONNECT ? 50 : 1;
    /* A window of 0 s measures nothing (it connected, then failed on zero round
     * trips); a set-up timeout of 0 s gives up before the first connect. */
    if (o.duration <= 0 && o.mode != M_IDLE)
        die(1, "-t: the measured window must be longer than 0 s");
    if (o.setup_timeout <= 0)
        die(1, "-T: the set-up timeout must be longer than 0 s");
    if (o.rate > 0 && o.mode == M_IDLE)
        die(1, "-r applies to pingpong, pipeline and connect only");
    if (o.burst_ns && (o.rate <= 0 || o.mode == M_CONNECT || o.mode == M_IDLE))
        die(1, "-b applies with -r to pingpong and pipeline only");
    if (o.burst_ns)
        burst_q = o.rate * (o.burst_ns / 1e9) / o.conns;
    if (o.mode == M_PIPELINE && (uint64_t)o.depth * (uint64_t)o.size > 64u * 1024u * 1024u)
        die(1, "pipeline depth x size above 64 MiB per connection");

    /* This tool generates load: refuse anything but the loopback network so
     * a typo can never point it at another machine. */
    o.addr.sin_family = AF_INET;
    o.addr.sin_port = htons((uint16_t)o.port);
    if (inet_pton(AF_INET, o.host, &o.addr.sin_addr) != 1)
        die(1, "'%s' is not an IPv4 address", o.host);
    if ((ntohl(o.addr.sin_addr.s_addr) >> 24) != 127)
        die(1, "refusing non-loopback target %s (only 127.0.0.0/8 is allowed)", o.host);

    /* 10,000 idle connections need more descriptors than the usual soft
     * limit; take everything the hard limit allows. */
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
    getrlimit(RLIMIT_NOFILE, &rl);
    long need = (o.mode == M_IDLE ? o.idle_count : o.conns) + 16;
    if ((long)rl.rlim_cur < need)
        die(2, "need %ld file descriptors, RLIMIT_NOFILE allows %ld", need, (long)rl.rlim_cur);

    signal(SIGPIPE, SIG_IGN);

    /* deterministic pool: runs are reproducible and a mismatch report can be
     * replayed */
    pool = malloc(POOL_SIZE + MAX_MSG);
    rxbuf = malloc(RXBUF);
    if (!pool || !rxbuf)
        die(2, "out of memory");
    uint64_t s = 0x1234567;
    for (size_t i = 0; i < POOL_SIZE + MAX_MSG; i += 8) {
        uint64_t v = mix64(s++);
        memcpy(pool + i, &v, 8);
    }

    ep = epoll_create1(EPOLL_CLOEXEC);
    if (ep < 0)
        die(2, "epoll_create1: %s", strerror(errno));

    /* the engine: uring drives traffic only; connect and idle use epoll */
    int traffic = o.mode == M_PINGPONG || o.mode == M_PIPELINE;
    engine = o.engine;
    if (engine == E_DEFAULT)
        engine = traffic ? E_URING : (o.mode == M_CONNECT ? E_EPOLL_BUSY : E_EPOLL);
    if (engine == E_URING && !traffic)
        engine = o.mode == M_CONNECT ? E_EPOLL_BUSY : E_EPOLL;
    if (o.mode == M_CONNECT && o.rate > 0) {
        /* a capped storm sleeps between its tokens (run_connect): its busy
         * share is then its CPU time, the measure of the sleeping engine */
        engine = E_EPOLL;
        prctl(PR_SET_TIMERSLACK, 1UL, 0, 0, 0);
    }
    if (engine == E_URING) {
        const char *why = uring_init();
        if (why) {
            fprintf(stderr, "loadgen: io_uring engine unavailable (%s); using epoll-busy\n", why);
            engine = E_EPOLL_BUSY;
        }
    }

    hc_origin = now_ns();
    switch (o.mode) {
    case M_PINGPONG:
    case M_PIPELINE: run_traffic(); break;
    case M_CONNECT: run_connect(); break;
    case M_IDLE: run_idle(); break;
    }
    fflush(stdout);
    return 0;
}
