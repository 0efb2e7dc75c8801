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

int main(int argc, char **argv)
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
    double seconds = 0, rate = 0, hot_fraction = 0.05, hot_share = 0.9;
    uint64_t min = 4096, max = 65536, spots = 4, seed = 1;
    const char *log_path = NULL;
    struct nbd_handle *nbd;
    FILE *log = NULL;
    uint64_t *lat = NULL, nlat = 0, cap = 0, bytes = 0;
    uint64_t size, hot_len, hot_start[64], t0, next;
    unsigned char *buf;
    struct sigaction sa = { .sa_handler = on_stop, .sa_flags = SA_RESTART };
    struct sigaction sm = { .sa_handler = on_mark, .sa_flags = SA_RESTART };
    int c;

    while ((c = getopt_long(argc, argv, "", longopts, NULL)) != -1) {
        switch (c) {
        case 's':
            seconds = atof(optarg);
            break;
        case 'r':
            rate = atof(optarg);
            break;
        case 'm':
            min = parse_size(optarg);
            break;
        case 'M':
            max = parse_size(optarg);
            break;
        case 'h':
            spots = strtoull(optarg, NULL, 10);
            break;
        case 'f':
            hot_fraction = atof(optarg);
            break;
        case 'S':
            hot_share = atof(optarg);
            break;
        case 'e':
            seed = strtoull(optarg, NULL, 10);
            break;
        case 'l':
            log_path = optarg;
            break;
        default:
            usage();
        }
    }
    if (optind + 1 != argc || min < ALIGN || max < min || spots > 64 ||
        hot_fraction <= 0 || hot_fraction > 1) {
        usage();
    }
    rng_state ^= seed * 0xbf58476d1ce4e5b9u; /* never 0: xorshift stays 0 */
    if (!rng_state) {
        rng_state = 1;
    }
    nbd = nbd_create();
    if (!nbd || nbd_connect_uri(nbd, argv[optind]) < 0) {
        fprintf(stderr, "qbk-loadgen: %s\n", nbd_get_error());
        return 1;
    }
    size = (uint64_t)nbd_get_size(nbd);
    if (nbd_is_read_only(nbd) == 1 || size < max * 2) {
        fprintf(stderr, "qbk-loadgen: the export is read-only or too small\n");
        return 1;
    }
    if (log_path && !(log = fopen(log_path, "w"))) {
        fprintf(stderr, "qbk-loadgen: %s: %s\n", log_path, strerror(errno));
        return 1;
    }
    buf = aligned_alloc(ALIGN, max + ALIGN);
    for (uint64_t i = 0; i < (max + ALIGN) / 8; i++) {
        ((uint64_t *)buf)[i] = rng();
    }
    hot_len = spots ? (uint64_t)(size * hot_fraction / spots) : 0;
    hot_len -= hot_len % ALIGN;
    for (uint64_t i = 0; i < spots; i++) {
        hot_start[i] = rng_below((size - hot_len) / ALIGN) * ALIGN;
    }
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGUSR1, &sm, NULL);
    sigaction(SIGUSR2, &sm, NULL);

    t0 = next = now_ns();
    while (!stop && (!seconds || now_ns() - t0 < seconds * 1e9)) {
        uint64_t len = min + rng_below((max - min) / ALIGN + 1) * ALIGN;
        uint64_t off, start, took;

        if (spots && hot_len >= len &&
            rng_below(1000000) < hot_share * 1000000) {
            uint64_t s = hot_start[rng_below(spots)];

            off = s + rng_below((hot_len - len) / ALIGN + 1) * ALIGN;
        } else {
            off = rng_below((size - len) / ALIGN + 1) * ALIGN;
        }
        if (rate > 0) {
            uint64_t t = now_ns();

            if (t < next) {
                struct timespec ts = { .tv_sec = (next - t) / 1000000000u,
                                       .tv_nsec = (next - t) % 1000000000u };

                nanosleep(&ts, NULL);
            }
            next += (uint64_t)(1e9 / rate);
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
        took = now_ns() - start;
        for (int m = 1; m <= 2; m++) {
            if (mark_pending[m]) {
                mark_pending[m] = 0;
                if (log) {
                    fprintf(log, "%" PRIu64 " mark %d\n", now_ns(), m);
                }
            }
        }
        if (log) {
            fprintf(log, "%" PRIu64 " %" PRIu64 " %" PRIu64 " %" PRIu64 "\n",
                    start, took, off, len);
        }
        if (nlat == cap) {
            cap = cap ? cap * 2 : 65536;
            lat = realloc(lat, cap * sizeof(*lat));
        }
        lat[nlat++] = took;
        bytes += len;
    }
    if (log) {
        fclose(log);
    }
    nbd_shutdown(nbd, 0);
    nbd_close(nbd);
    qsort(lat, nlat, sizeof(*lat), cmp_u64);
    printf("{\"writes\": %" PRIu64 ", \"bytes\": %" PRIu64
           ", \"seconds\": %.3f, \"p50_ms\": %.3f, \"p99_ms\": %.3f, "
           "\"max_ms\": %.3f}\n",
           nlat, bytes, (now_ns() - t0) / 1e9, nlat ? lat[nlat / 2] / 1e6 : 0.0,
           nlat ? lat[nlat * 99 / 100] / 1e6 : 0.0,
           nlat ? lat[nlat - 1] / 1e6 : 0.0);
    free(lat);
    free(buf);
    return 0;
}
