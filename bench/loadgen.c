/*
 * qbk-loadgen: a guest that writes, for bench/cow. It writes to an NBD
 * export (a pass-through node above the disk, as a guest's device would)
 * and records every write's latency.
 *
 * Closed loop at queue depth 1 (the next write starts when the last one
 * ended), or a fixed rate. Offsets are 4 KiB aligned, sizes 4-64 KiB;
 * a share of the writes goes to a few hot spots (guests write with
 * locality). The data is incompressible.
 *
 * Log: one line per write, "START_NS LATENCY_NS OFFSET LENGTH", START on
 * CLOCK_MONOTONIC; SIGUSR1 and SIGUSR2 add a line "START_NS mark 1|2"
 * (bench/cow marks when the backup's point in time is fixed and when the
 * backup ended). SIGTERM or SIGINT stops it; a summary goes to stdout.
 */
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <signal.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <libnbd.h>

#define ALIGN 4096

static volatile sig_atomic_t stop;
static volatile sig_atomic_t mark_pending[3];

static void on_stop(int sig)
{
    stop = 1;
}

static void on_mark(int sig)
{
    mark_pending[sig == SIGUSR1 ? 1 : 2] = 1;
}

static uint64_t now_ns(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* xorshift64*: fast, seeded, good enough for offsets and data */
static uint64_t rng_state = 0x9e3779b97f4a7c15u;

static uint64_t rng(void)
{
    rng_state ^= rng_state >> 12;
    rng_state ^= rng_state << 25;
    rng_state ^= rng_state >> 27;
    return rng_state * 0x2545f4914f6cdd1du;
}

static uint64_t rng_below(uint64_t n)
{
    return n ? rng() % n : 0;
}

static int cmp_u64(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;

    return x < y ? -1 : x > y;
}

static uint64_t parse_size(const char *s)
{
    char *end;
    uint64_t v = strtoull(s, &end, 10);

    switch (*end) {
    case 'k':
    case 'K':
        return v << 10;
    case 'm':
    case 'M':
        return v << 20;
    case 'g':
    case 'G':
        return v << 30;
    default:
        return v;
    }
}

static void usage(void)
{
    fprintf(stderr,
            "usage: qbk-loadgen [options] NBD-URI\n"
            "  --seconds S      stop after S seconds (default: at SIGTERM)\n"
            "  --rate IOPS      fixed rate instead of a closed loop (QD1)\n"
            "  --min SIZE       smallest write (default 4k)\n"
            "  --max SIZE       largest write (default 64k)\n"
            "  --hot-spots N    number of hot spots (default 4; 0: uniform)\n"
            "  --hot-fraction F of the disk they cover (default 0.05)\n"
            "  --hot-share F    of the writes they get (default 0.9)\n"
            "  --seed N         (default 1)\n"
            "  --log FILE       one line per write (see the source)\n");
    exit(2);
}

typedef struct {
    double seconds, rate, hot_fraction, hot_share;
    uint64_t min, max, spots, seed;
    const char *log_path;
    const char *uri;
} Options;

static void parse_options(int argc, char **argv, Options *o)
{
    static const struct option longopts[] = {
        { "seconds", required_argument, NULL, 's' },
        { "rate", required_argument, NULL, 'r' },
        { "min", required_argument, NULL, 'm' },
        { "max", required_argument, NULL, 'M' },
        { "hot-spots", required_argument, NULL, 'h' },
        { "hot-fraction", required_argument, NULL, 'f' },
        { "hot-share", required_argument, NULL, 'S' },
        { "seed", required_argument, NULL, 'e' },
        { "log", required_argument, NULL, 'l' },
        { NULL },
    };
    int c;

    *o = (Options){ .hot_fraction = 0.05,
                    .hot_share = 0.9,
                    .min = 4096,
                    .max = 65536,
                    .spots = 4,
                    .seed = 1 };
    while ((c = getopt_long(argc, argv, "", longopts, NULL)) != -1) {
        switch (c) {
        case 's':
            o->seconds = atof(optarg);
            break;
        case 'r':
            o->rate = atof(optarg);
            break;
        case 'm':
            o->min = parse_size(optarg);
            break;
        case 'M':
            o->max = parse_size(optarg);
            break;
        case 'h':
            o->spots = strtoull(optarg, NULL, 10);
            break;
        case 'f':
            o->hot_fraction = atof(optarg);
            break;
        case 'S':
            o->hot_share = atof(optarg);
            break;
        case 'e':
            o->seed = strtoull(optarg, NULL, 10);
            break;
        case 'l':
            o->log_path = optarg;
            break;
        default:
            usage();
        }
    }
    if (optind + 1 != argc || o->min < ALIGN || o->max < o->min ||
        o->spots > 64 || o->hot_fraction <= 0 || o->hot_fraction > 1) {
        usage();
    }
    o->uri = argv[optind];
}

/* Where the next write of LEN goes: in a hot spot (HOT_LEN bytes at each
 * of HOT_START) with probability hot_share, else anywhere in SIZE. */
static uint64_t pick_offset(const Options *o, uint64_t size, uint64_t len,
                            uint64_t hot_len, const uint64_t *hot_start)
{
    if (o->spots && hot_len >= len &&
        rng_below(1000000) < o->hot_share * 1000000) {
        uint64_t s = hot_start[rng_below(o->spots)];

        return s + rng_below((hot_len - len) / ALIGN + 1) * ALIGN;
    }
    return rng_below((size - len) / ALIGN + 1) * ALIGN;
}

/* Sleep until *NEXT, then move it on by one write at RATE per second. */
static void pace(uint64_t *next, double rate)
{
    uint64_t t = now_ns();

    if (t < *next) {
        struct timespec ts = { .tv_sec = (*next - t) / 1000000000u,
                               .tv_nsec = (*next - t) % 1000000000u };

        nanosleep(&ts, NULL);
    }
    *next += (uint64_t)(1e9 / rate);
}

/* One write done: to the log (with any marks a signal asked for) and to
 * the latencies. */
typedef struct {
    FILE *log;
    uint64_t *lat, nlat, cap, bytes;
} Record;

static void record(Record *r, uint64_t start, uint64_t took, uint64_t off,
                   uint64_t len)
{
    for (int m = 1; m <= 2; m++) {
        if (mark_pending[m]) {
            mark_pending[m] = 0;
            if (r->log) {
                fprintf(r->log, "%" PRIu64 " mark %d\n", now_ns(), m);
            }
        }
    }
    if (r->log) {
        fprintf(r->log, "%" PRIu64 " %" PRIu64 " %" PRIu64 " %" PRIu64 "\n",
                start, took, off, len);
    }
    if (r->nlat == r->cap) {
        r->cap = r->cap ? r->cap * 2 : 65536;
        r->lat = realloc(r->lat, r->cap * sizeof(*r->lat));
    }
    r->lat[r->nlat++] = took;
    r->bytes += len;
}

static void print_summary(Record *r, uint64_t t0)
{
    uint64_t n = r->nlat;

    qsort(r->lat, n, sizeof(*r->lat), cmp_u64);
    printf("{\"writes\": %" PRIu64 ", \"bytes\": %" PRIu64
           ", \"seconds\": %.3f, \"p50_ms\": %.3f, \"p99_ms\": %.3f, "
           "\"max_ms\": %.3f}\n",
           n, r->bytes, (now_ns() - t0) / 1e9, n ? r->lat[n / 2] / 1e6 : 0.0,
           n ? r->lat[n * 99 / 100] / 1e6 : 0.0, n ? r->lat[n - 1] / 1e6 : 0.0);
}

int main(int argc, char **argv)
{
    Options o;
    Record r = { 0 };
    struct nbd_handle *nbd;
    uint64_t size, hot_len, hot_start[64], t0, next;
    unsigned char *buf;
    struct sigaction sa = { .sa_handler = on_stop, .sa_flags = SA_RESTART };
    struct sigaction sm = { .sa_handler = on_mark, .sa_flags = SA_RESTART };

    parse_options(argc, argv, &o);
    rng_state ^= o.seed * 0xbf58476d1ce4e5b9u; /* never 0: xorshift stays 0 */
    if (!rng_state) {
        rng_state = 1;
    }
    nbd = nbd_create();
    if (!nbd || nbd_connect_uri(nbd, o.uri) < 0) {
        fprintf(stderr, "qbk-loadgen: %s\n", nbd_get_error());
        return 1;
    }
    size = (uint64_t)nbd_get_size(nbd);
    if (nbd_is_read_only(nbd) == 1 || size < o.max * 2) {
        fprintf(stderr, "qbk-loadgen: the export is read-only or too small\n");
        return 1;
    }
    if (o.log_path && !(r.log = fopen(o.log_path, "w"))) {
        fprintf(stderr, "qbk-loadgen: %s: %s\n", o.log_path, strerror(errno));
        return 1;
    }
    buf = aligned_alloc(ALIGN, o.max + ALIGN);
    for (uint64_t i = 0; i < (o.max + ALIGN) / 8; i++) {
        ((uint64_t *)buf)[i] = rng();
    }
    hot_len = o.spots ? (uint64_t)(size * o.hot_fraction / o.spots) : 0;
    hot_len -= hot_len % ALIGN;
    for (uint64_t i = 0; i < o.spots; i++) {
        hot_start[i] = rng_below((size - hot_len) / ALIGN) * ALIGN;
    }
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGUSR1, &sm, NULL);
    sigaction(SIGUSR2, &sm, NULL);

    t0 = next = now_ns();
    while (!stop && (!o.seconds || now_ns() - t0 < o.seconds * 1e9)) {
        uint64_t len = o.min + rng_below((o.max - o.min) / ALIGN + 1) * ALIGN;
        uint64_t off = pick_offset(&o, size, len, hot_len, hot_start);
        uint64_t start;

        if (o.rate > 0) {
            pace(&next, o.rate);
        }
        /* a different buffer start each time: no two writes alike */
        start = now_ns();
        if (nbd_pwrite(nbd, buf + rng_below(ALIGN / 8) * 8, len, off, 0) < 0) {
            if (stop) {
                break;
            }
            fprintf(stderr, "qbk-loadgen: write at %" PRIu64 ": %s\n", off,
                    nbd_get_error());
            return 1;
        }
        record(&r, start, now_ns() - start, off, len);
    }
    if (r.log) {
        fclose(r.log);
    }
    nbd_shutdown(nbd, 0);
    nbd_close(nbd);
    print_summary(&r, t0);
    free(r.lat);
    free(buf);
    return 0;
}
