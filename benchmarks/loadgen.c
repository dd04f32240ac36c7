/*
 * loadgen: iocpnet's own TCP echo load generator.
 *
 * One thread, one epoll instance, non-blocking sockets. It is deliberately
 * simple so that its own cost per message is small and predictable: the
 * servers under test get one core, this gets the other one.
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
 * round-trip.
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
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

enum { M_PINGPONG, M_PIPELINE, M_CONNECT, M_IDLE };
static const char *mode_names[] = {"pingpong", "pipeline", "connect", "idle"};

#define MAX_MSG (256u * 1024u)
#define POOL_SIZE (1u << 20)
#define HDR 8u
#define RXBUF (256u * 1024u)

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

/* CPU time of the whole server process. /proc/<pid>/task/<tid>/schedstat
 * is in nanoseconds (stat's utime+stime has 10 ms ticks, too coarse for 1 s
 * slices); summing over tasks covers multi-threaded servers. A thread that
 * exits mid-window would lose its time, so the tick-based figure is kept
 * as well and the caller can compare. */
static double server_cpu_sched_s(void)
{
    char path[64];
    snprintf(path, sizeof path, "/proc/%d/task", server_pid);
    DIR *d = opendir(path);
    if (!d)
        return -1;
    double total = 0;
    struct dirent *de;
    while ((de = readdir(d))) {
        if (de->d_name[0] == '.')
            continue;
        char p2[300];
        snprintf(p2, sizeof p2, "/proc/%d/task/%s/schedstat", server_pid, de->d_name);
        FILE *f = fopen(p2, "r");
        if (!f)
            continue;
        unsigned long long run = 0;
        if (fscanf(f, "%llu", &run) == 1)
            total += run / 1e9;
        fclose(f);
    }
    closedir(d);
    return total;
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
    int port, mode, conns, size, depth, idle_count, setup_conc;
    double warmup, duration, idle_hold, setup_timeout;
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

enum { S_FREE, S_CONNECTING, S_ACTIVE, S_IDLE };

struct conn {
    int fd, state;
    uint32_t id;
    uint64_t tx_msg, rx_msg; /* next message to queue / message being received */
    uint32_t rx_off;         /* bytes of rx_msg already received and checked */
    struct msgref rx_ref;
    uint8_t *txbuf;
    uint32_t txlen, txpos;
    uint32_t events;   /* current epoll interest */
    uint64_t *sent_ns; /* [depth] queue time of in-flight messages */
    uint64_t t_start;  /* connect mode: when connect() was called */
};

static int ep;
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

static void set_interest(struct conn *c, uint32_t ev)
{
    if (c->events == ev)
        return;
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
    open_count--;
}

static void start_connect(struct conn *c)
{
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0)
        die(2, "socket: %s", strerror(errno));
    int one = 1;
    /* small pipelined writes must not wait for ACKs (Nagle) */
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    c->fd = fd;
    c->id = next_id++;
    c->tx_msg = c->rx_msg = 0;
    c->rx_off = 0;
    c->txlen = c->txpos = 0;
    c->t_start = now_ns();
    msg_make(&c->rx_ref, c->id, 0);
    open_count++;
    int r = connect(fd, (struct sockaddr *)&o.addr, sizeof o.addr);
    if (r < 0 && errno != EINPROGRESS)
        die(2, "connect to %s:%d: %s", o.host, o.port, strerror(errno));
    c->state = S_CONNECTING;
    c->events = EPOLLOUT;
    struct epoll_event e = {.events = EPOLLOUT, .data.ptr = c};
    if (epoll_ctl(ep, EPOLL_CTL_ADD, fd, &e) < 0)
        die(2, "epoll_ctl add: %s", strerror(errno));
}

static int depth_for_mode(void) { return o.mode == M_PIPELINE ? o.depth : 1; }

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

/* Queue as many new messages as the window allows, but only once the
 * previous batch has been fully written: the buffer is then reused from 0. */
static void refill_and_send(struct conn *c)
{
    if (c->txpos < c->txlen)
        return;
    c->txpos = c->txlen = 0;
    uint64_t limit = (o.mode == M_PINGPONG || o.mode == M_PIPELINE) ? UINT64_MAX : 1;
    int depth = depth_for_mode();
    uint64_t t = 0;
    while (c->tx_msg - c->rx_msg < (uint64_t)depth && c->tx_msg < limit) {
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
    if (c->txlen)
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

/* Completion time of the messages in the current recv() batch: one clock read
 * per batch instead of per message keeps the generator's own cost down in
 * pipelined runs; the error is the time to check one batch (microseconds). */
static uint64_t t_batch;

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

static void do_read(struct conn *c)
{
    for (;;) {
        ssize_t n = recv(c->fd, rxbuf, RXBUF, 0);
        if (n > 0) {
            t_batch = now_ns();
            uint32_t pos = 0;
            while (pos < (uint32_t)n) {
                if (c->rx_msg >= c->tx_msg)
                    die(3, "conn %u received %u bytes nobody sent (stale or duplicated echo)",
                        c->id, (uint32_t)n - pos);
                uint32_t k = verify_chunk(c, rxbuf + pos, (uint32_t)n - pos);
                c->rx_off += k;
                pos += k;
                if (c->rx_off == (uint32_t)o.size && message_done(c)) {
                    if (pos < (uint32_t)n)
                        die(3, "conn %u received %u bytes after its last message", c->id,
                            (uint32_t)n - pos);
                    return;
                }
            }
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
    if (e->events & (EPOLLIN | EPOLLERR | EPOLLHUP))
        do_read(c);
    if (c->state == S_ACTIVE && (e->events & EPOLLOUT)) {
        do_write(c);
        if (c->txpos == c->txlen)
            refill_and_send(c);
    }
}

static int poll_events(int timeout_ms)
{
    static struct epoll_event evs[1024];
    int n = epoll_wait(ep, evs, 1024, timeout_ms);
    if (n < 0) {
        if (errno == EINTR)
            return 0;
        die(2, "epoll_wait: %s", strerror(errno));
    }
    for (int i = 0; i < n; i++)
        handle_event(&evs[i]);
    return n;
}

static int ms_until(uint64_t deadline)
{
    uint64_t t = now_ns();
    if (t >= deadline)
        return 0;
    return (int)((deadline - t + 999999) / 1000000);
}

/* ---------- modes ---------- */

struct window {
    uint64_t t0, t1;
    double lg_cpu0, lg_cpu1, sv_sched0, sv_sched1, sv_tick0, sv_tick1;
};

static void window_begin(struct window *w)
{
    measuring = 1;
    w->t0 = now_ns();
    w->lg_cpu0 = cpu_self_s();
    if (server_pid) {
        w->sv_sched0 = server_cpu_sched_s();
        w->sv_tick0 = server_cpu_ticks_s();
    }
}

static void window_end(struct window *w)
{
    measuring = 0;
    w->t1 = now_ns();
    w->lg_cpu1 = cpu_self_s();
    if (server_pid) {
        w->sv_sched1 = server_cpu_sched_s();
        w->sv_tick1 = server_cpu_ticks_s();
    }
}

static void print_common(const struct window *w)
{
    double secs = (w->t1 - w->t0) / 1e9;
    printf("\"window_s\": %.6f, \"loadgen_cpu_s\": %.6f", secs, w->lg_cpu1 - w->lg_cpu0);
    if (server_pid) {
        double sched = (w->sv_sched0 >= 0 && w->sv_sched1 >= 0) ? w->sv_sched1 - w->sv_sched0 : -1;
        double tick = (w->sv_tick0 >= 0 && w->sv_tick1 >= 0) ? w->sv_tick1 - w->sv_tick0 : -1;
        printf(", \"server_cpu_s\": %.6f, \"server_cpu_ticks_s\": %.3f",
               sched >= 0 ? sched : tick, tick);
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
    conns = calloc((size_t)n, sizeof *conns);
    if (!conns)
        die(2, "out of memory");
    for (int i = 0; i < n; i++) {
        conns[i].fd = -1;
        conns[i].txbuf = malloc((size_t)depth * (size_t)o.size);
        conns[i].sent_ns = calloc((size_t)depth, sizeof(uint64_t));
        if (!conns[i].txbuf || !conns[i].sent_ns)
            die(2, "out of memory");
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
    while (established < o.conns) {
        while (started < o.conns && open_count - established < o.setup_conc)
            start_connect(&conns[started++]);
        poll_events(ms_until(setup_deadline));
        if (now_ns() >= setup_deadline)
            die(2, "only %d of %d connections established within %.0f s", established,
                o.conns, o.setup_timeout);
    }
    uint64_t t_warm_end = now_ns() + (uint64_t)(o.warmup * 1e9);
    while (now_ns() < t_warm_end)
        poll_events(ms_until(t_warm_end));
    struct window w;
    window_begin(&w);
    uint64_t t_end = w.t0 + (uint64_t)(o.duration * 1e9);
    while (now_ns() < t_end)
        poll_events(ms_until(t_end));
    window_end(&w);

    double secs = (w.t1 - w.t0) / 1e9;
    printf("{\"mode\": \"%s\", \"conns\": %d, \"size\": %d, \"depth\": %d, ", mode_names[o.mode],
           o.conns, o.size, depth_for_mode());
    printf("\"roundtrips\": %llu, \"rt_per_s\": %.1f, \"mb_per_s\": %.3f, ",
           (unsigned long long)measured_msgs, measured_msgs / secs, measured_bytes / secs / 1e6);
    print_common(&w);
    printf(", ");
    print_latency();
    printf(", \"errors\": 0}\n");
    if (measured_msgs == 0)
        die(2, "no round-trip completed in the measured window");
    for (int i = 0; i < nconns; i++)
        if (conns[i].fd >= 0)
            close_abort(&conns[i]);
}

static void run_connect(void)
{
    alloc_conns(o.conns, 1);
    uint64_t t_warm_end = now_ns() + (uint64_t)(o.warmup * 1e9);
    uint64_t t_end = t_warm_end + (uint64_t)(o.duration * 1e9);
    struct window w;
    int in_window = 0;
    for (;;) {
        uint64_t t = now_ns();
        if (!in_window && t >= t_warm_end) {
            window_begin(&w);
            in_window = 1;
        }
        if (t >= t_end)
            break;
        for (int i = 0; i < nconns; i++)
            if (conns[i].state == S_FREE)
                start_connect(&conns[i]);
        poll_events(ms_until(in_window ? t_end : t_warm_end));
    }
    window_end(&w);
    double secs = (w.t1 - w.t0) / 1e9;
    printf("{\"mode\": \"connect\", \"conns\": %d, \"size\": %d, ", o.conns, o.size);
    printf("\"connections\": %llu, \"conn_per_s\": %.1f, \"roundtrips\": %llu, \"rt_per_s\": %.1f, ",
           (unsigned long long)measured_conns, measured_conns / secs,
           (unsigned long long)measured_msgs, measured_msgs / secs);
    print_common(&w);
    printf(", ");
    print_latency();
    printf(", \"errors\": 0}\n");
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
    measuring = 1; /* latency of the single round-trips is still informative */
    while (established < o.idle_count) {
        while (started < o.idle_count && open_count - established < o.setup_conc)
            start_connect(&conns[started++]);
        poll_events(ms_until(setup_deadline));
        if (now_ns() >= setup_deadline)
            die(2, "only %d of %d idle connections established within %.0f s", established,
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
        poll_events(ms_until(until));
    }
    if (server_pid) {
        rss_last = server_rss_kb();
        if (rss_last > rss_max)
            rss_max = rss_last;
    }
    double cpu1 = server_pid ? server_cpu_sched_s() : 0;
    double hold_s = (now_ns() - t_hold) / 1e9;
    printf("{\"mode\": \"idle\", \"idle_count\": %d, \"size\": %d, \"setup_s\": %.3f, "
           "\"hold_s\": %.3f, ",
           o.idle_count, o.size, setup_s, hold_s);
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
            "  -c N       connections (pingpong/pipeline: 1; connect: in flight, 50)\n"
            "  -s BYTES   message size (64, max %u)\n"
            "  -d N       pipeline depth per connection (16)\n"
            "  -w SECS    warm-up before the measured window (1)\n"
            "  -t SECS    measured window (5)\n"
            "  -n N       idle: number of connections (10000)\n"
            "  -i SECS    idle: how long to hold them (5)\n"
            "  -C N       connects in progress at once during set-up (64)\n"
            "  -T SECS    set-up timeout (60)\n"
            "  -P PID     server pid: report its CPU time (and RSS in idle mode)\n",
            MAX_MSG);
}

static double parse_secs(const char *s)
{
    char *end;
    double v = strtod(s, &end);
    if (*end || v < 0 || v > 3600) {
        fprintf(stderr, "loadgen: bad duration '%s'\n", s);
        exit(1);
    }
    return v;
}

static long parse_int(const char *s, long lo, long hi)
{
    char *end;
    long v = strtol(s, &end, 10);
    if (*end || v < lo || v > hi) {
        fprintf(stderr, "loadgen: '%s' is not a number in [%ld, %ld]\n", s, lo, hi);
        exit(1);
    }
    return v;
}

int main(int argc, char **argv)
{
    o.host = "127.0.0.1";
    o.mode = M_PINGPONG;
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
    while ((opt = getopt(argc, argv, "a:p:m:c:s:d:w:t:n:i:C:T:P:h")) != -1) {
        switch (opt) {
        case 'a': o.host = optarg; break;
        case 'p': o.port = (int)parse_int(optarg, 1, 65535); break;
        case 'm': {
            int found = -1;
            for (int i = 0; i < 4; i++)
                if (strcmp(optarg, mode_names[i]) == 0)
                    found = i;
            if (found < 0) {
                fprintf(stderr, "loadgen: unknown mode '%s'\n", optarg);
                return 1;
            }
            o.mode = found;
            break;
        }
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

    switch (o.mode) {
    case M_PINGPONG:
    case M_PIPELINE: run_traffic(); break;
    case M_CONNECT: run_connect(); break;
    case M_IDLE: run_idle(); break;
    }
    fflush(stdout);
    return 0;
}
