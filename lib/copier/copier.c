/*
 * The copy engine: a fixed array of requests, each a small state machine,
 * on one GMainContext with one GSource per NBD connection.
 *
 *   IDLE --(chunk)--> READING --> READ_DONE --> WRITING --> WRITE_DONE --> IDLE
 *   IDLE --(zero chunk)---------------------> WRITING ...
 *
 * libnbd's completion callbacks only record the result and the new state;
 * pump(), run after every wake-up of the loop, looks at all requests,
 * starts the next step of each, keeps block-status planning ahead of the
 * requests, and ends the loop when all is copied and flushed, or at the
 * first failure. Memory: requests x chunk size, plus one window of extents.
 */
#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "internal.h"

/* G_DEFINE_QUARK stringifies the quark name as written. */
/* clang-format off */
G_DEFINE_QUARK(qbk-copier-error-quark, copier_error)
/* clang-format on */

#define WINDOW_BYTES     (G_GUINT64_CONSTANT(1) << 30) /* block status per call */
#define NOTICE_BYTES     ((G_GUINT64_CONSTANT(1) << 32) - COPIER_BLOCK_SIZE)
#define TICK_MS          10 /* cancel, rate, stall, notices, pacing */
#define PROGRESS_US      (250 * 1000)
#define PACING_US        (100 * 1000) /* one pacing decision per period */
#define MAX_RELEASES     64           /* trims in flight at once */
#define RELEASE_GATHER   (16 << 20)   /* bytes per trim, at most */
#define RELEASE_DELAY_US (5 * 1000)   /* a gathered trim waits no longer */

typedef enum {
    REQ_IDLE,
    REQ_READING,
    REQ_READ_DONE,
    REQ_WRITING,
    REQ_WRITE_DONE,
} RequestState;

typedef struct Copier Copier;

typedef struct {
    RequestState state;
    struct nbd_handle *reader; /* the source connection it reads from */
    Chunk chunk;               /* what this request works on */
    guint8 *buf;               /* chunk_size bytes, owned */
    int error;                 /* errno from the last completion, 0 if none */
    gint64 read_start_us;
} Request;

struct Copier {
    /* initialized once and never changed */
    CopierOptions opts;
    guint64 size;
    char *bitmap_context; /* "qemu:dirty-bitmap:NAME", or NULL */
    GMainContext *ctx;
    GMainLoop *loop;
    struct nbd_handle *src, *dst; /* dst: NULL when writing a file */
    FileSink *file;               /* the raw file target, or NULL */
    bool null_sink;               /* no target: read and hash only */
    /* more connections to the source for reads; readers[0] is src */
    struct nbd_handle *readers[COPIER_MAX_CONNECTIONS];
    GSource *reader_sources[COPIER_MAX_CONNECTIONS];
    guint nreaders;
    GSource *src_source, *dst_source, *tick;
    guint8 zero_digest[COPIER_DIGEST_LEN];      /* of a whole zero block */
    guint8 zero_tail_digest[COPIER_DIGEST_LEN]; /* of the shorter last one */

    /* planning: block status runs ahead of the requests */
    guint64 plan_pos; /* block status asked up to here */
    bool bs_in_flight;
    bool bs_done; /* its completion arrived: plan from it */
    int bs_error;
    GArray *bs_alloc; /* uint32 (length, flags) pairs of the window */
    GArray *bs_dirty;
    ChunkQueue *queue; /* planned and not started */
    GQueue releases;   /* Chunk*: planned as not needed, to trim */
    guint releases_in_flight;
    guint64 rel_offset, rel_length; /* copied, being gathered into a trim */
    gint64 rel_since_us;

    /* guest-write notices: sweeps of the notice export's map */
    struct nbd_handle *notice;
    GSource *notice_source;
    bool notice_depth;     /* the context is qemu:allocation-depth */
    bool notice_in_flight; /* a block status call is out */
    bool notice_done;      /* ... and its answer is in */
    int notice_error;
    guint64 notice_pos;     /* where the sweep goes on */
    gint64 next_sweep_us;   /* when the next sweep starts */
    GArray *notice_extents; /* uint32 pairs of the answer */

    /* pacing */
    guint window;                       /* requests allowed in flight */
    guint64 paced_reads, paced_read_us; /* this period */
    gint64 pacing_since_us;
    double window_integral; /* window x seconds */
    guint64 all_reads, all_read_us;

    /* the requests */
    Request *reqs;
    guint nreqs;
    guint active; /* not IDLE */

    /* the end */
    bool flushing, flushed;
    int flush_error;
    GError *error; /* first failure wins */

    /* accounting */
    CopierStats stats;
    guint64 read_started; /* bytes, for the rate limit */
    gint64 start_us, last_progress_us, last_activity_us;
};

void copier_options_init(CopierOptions *opts)
{
    *opts = (CopierOptions){
        .requests = 16,
        /* bench/copier: 1.37 vs 1.60 s for 3 GiB from a RAM-backed
         * export; two sockets keep the server's replies flowing */
        .connections = 2,
        .chunk_size =
            256 * 1024, /* bench/cow: guest p99 2.3 vs 6.5 ms at 1 MiB */
        .digest_fd = -1,
        .digest_parent_fd = -1,
        .stall_seconds = 60,
        .notice_ms = 20,
        .notice_radius = 4 * 1024 * 1024,
        .trace_fd = -1,
    };
}

bool copier_options_check(const CopierOptions *opts, GError **error)
{
    const char *bad = NULL;

    if (opts->requests < 1 || opts->requests > COPIER_MAX_REQUESTS) {
        bad = "requests must be 1 to " G_STRINGIFY(COPIER_MAX_REQUESTS);
    } else if (opts->connections < 1 ||
               opts->connections > COPIER_MAX_CONNECTIONS) {
        bad = "connections must be 1 to " G_STRINGIFY(COPIER_MAX_CONNECTIONS);
    } else if (opts->chunk_size == 0 ||
               opts->chunk_size % COPIER_BLOCK_SIZE != 0 ||
               opts->chunk_size > COPIER_MAX_CHUNK) {
        bad = "the chunk size must be a multiple of 64 KiB up to 32 MiB";
    } else if (opts->latency_target_us > COPIER_MAX_LATENCY_US) {
        bad = "the latency target must be at most 60000 ms";
    }
    if (bad) {
        g_set_error(error, COPIER_ERROR, COPIER_ERROR_OPTIONS, "%s", bad);
        return false;
    }
    return true;
}

G_GNUC_PRINTF(3, 4)
static void fail(Copier *c, CopierErrorCode code, const char *fmt, ...)
{
    va_list ap;

    if (c->error) {
        return; /* first failure wins */
    }
    va_start(ap, fmt);
    c->error = g_error_new_valist(COPIER_ERROR, code, fmt, ap);
    va_end(ap);
}

/* ---- libnbd callbacks: record, nothing more ---- */

static int read_done(void *opaque, int *error)
{
    Request *r = opaque;

    r->error = *error;
    r->state = REQ_READ_DONE;
    return 1;
}

static int write_done(void *opaque, int *error)
{
    Request *r = opaque;

    r->error = *error;
    r->state = REQ_WRITE_DONE;
    return 1;
}

static int flush_done(void *opaque, int *error)
{
    Copier *c = opaque;

    c->flush_error = *error;
    c->flushed = true;
    return 1;
}

static int extent_cb(void *opaque, const char *context, uint64_t offset,
                     uint32_t *entries, size_t n, int *error)
{
    Copier *c = opaque;
    GArray *into =
        strcmp(context, "base:allocation") == 0 ? c->bs_alloc
        : c->bitmap_context && strcmp(context, c->bitmap_context) == 0
            ? c->bs_dirty
            : NULL;

    if (into && into->len == 0) { /* keep the first answer per context */
        /* N counts uint32 entries: (length, flags) pairs times two */
        g_array_append_vals(into, entries, n);
    }
    return 0;
}

static int bs_done_cb(void *opaque, int *error)
{
    Copier *c = opaque;

    c->bs_error = *error;
    c->bs_done = true;
    return 1;
}

G_GNUC_PRINTF(2, 3)
static void trace(Copier *c, const char *fmt, ...)
{
    g_autofree char *line = NULL;
    va_list ap;

    if (c->opts.trace_fd < 0) {
        return;
    }
    va_start(ap, fmt);
    line = g_strdup_vprintf(fmt, ap);
    va_end(ap);
    dprintf(c->opts.trace_fd, "%" G_GINT64_FORMAT "000 %s\n",
            g_get_monotonic_time(), line);
}

/* ---- release: trim what is copied, so QEMU can forget it ---- */

static int release_done(void *opaque, int *error)
{
    Copier *c = opaque;

    c->releases_in_flight--;
    if (*error) {
        c->stats.release_errors++;
    }
    return 1;
}

static void send_release(Copier *c, guint64 offset, guint64 length)
{
    if (length == 0) {
        return;
    }
    /* QEMU before 9.1 asserts (and the VM aborts) on a discard of
     * snapshot-access that is not aligned to the copy cluster (64 KiB with
     * qbk's scratch images), unless it ends at the end of the disk. */
    g_assert(offset % COPIER_BLOCK_SIZE == 0 &&
             (length % COPIER_BLOCK_SIZE == 0 || offset + length == c->size));
    if (nbd_aio_trim(c->src, length, offset,
                     (nbd_completion_callback){ .callback = release_done,
                                                .user_data = c },
                     0) < 0) {
        c->stats.release_errors++;
        return;
    }
    c->releases_in_flight++;
    c->stats.bytes_released += length;
    trace(c, "release %" G_GUINT64_FORMAT " %" G_GUINT64_FORMAT, offset,
          length);
}

/* Send the release being gathered. */
static void flush_release(Copier *c)
{
    send_release(c, c->rel_offset, c->rel_length);
    c->rel_length = 0;
}

/*
 * Release [OFFSET, OFFSET + LENGTH): copies mostly complete in offset
 * order, so adjacent ranges are gathered into one trim of up to
 * RELEASE_GATHER bytes, sent at the latest RELEASE_DELAY_US later (each
 * trim costs QEMU a request).
 */
static void release(Copier *c, guint64 offset, guint64 length)
{
    if (!c->opts.release || length == 0) {
        return;
    }
    if (c->rel_length && c->rel_offset + c->rel_length == offset &&
        c->rel_length + length <= RELEASE_GATHER) {
        c->rel_length += length;
        return;
    }
    flush_release(c);
    c->rel_offset = offset;
    c->rel_length = length;
    c->rel_since_us = g_get_monotonic_time();
}

/* Trim the regions planning found need no copy, a few at a time. */
static void release_planned(Copier *c)
{
    while (c->releases_in_flight < MAX_RELEASES) {
        Chunk *r = g_queue_pop_head(&c->releases);

        if (!r) {
            return;
        }
        send_release(c, r->offset, r->length);
        g_free(r);
    }
}

/* ---- guest-write notices ---- */

static int notice_extent_cb(void *opaque, const char *context, uint64_t offset,
                            uint32_t *entries, size_t n, int *error)
{
    Copier *c = opaque;

    if (strcmp(context, c->opts.notice_context) == 0 &&
        c->notice_extents->len == 0) {
        g_array_append_vals(c->notice_extents, entries, n);
    }
    return 0;
}

static int notice_done_cb(void *opaque, int *error)
{
    Copier *c = opaque;

    c->notice_error = *error;
    c->notice_done = true;
    return 1;
}

static void start_notice(Copier *c)
{
    /* NBD lengths are 32-bit: up to 4 GiB less a block per call */
    guint64 len = MIN(NOTICE_BYTES, c->size - c->notice_pos);

    g_array_set_size(c->notice_extents, 0);
    c->notice_done = false;
    c->notice_error = 0;
    if (nbd_aio_block_status(c->notice, len, c->notice_pos,
                             (nbd_extent_callback){
                                 .callback = notice_extent_cb, .user_data = c },
                             (nbd_completion_callback){
                                 .callback = notice_done_cb, .user_data = c },
                             0) < 0) {
        fail(c, COPIER_ERROR_READ, "notice map at %" G_GUINT64_FORMAT ": %s",
             c->notice_pos, nbd_get_error());
        return;
    }
    c->notice_in_flight = true;
}

static void noticed(guint64 offset, guint64 length, guint64 bumped,
                    void *opaque)
{
    Copier *c = opaque;

    c->stats.notices++;
    c->stats.bytes_bumped += bumped;
    trace(c, "notice %" G_GUINT64_FORMAT " %" G_GUINT64_FORMAT, offset, length);
}

/* What the guest wrote goes next, then its neighbourhood. */
static void finish_notice(Copier *c)
{
    const uint32_t *e = (const uint32_t *)c->notice_extents->data;
    guint64 pos = c->notice_pos;

    c->notice_in_flight = false;
    if (c->notice_error || c->notice_extents->len == 0) {
        fail(c, COPIER_ERROR_READ,
             "the notice map at %" G_GUINT64_FORMAT " failed: %s",
             c->notice_pos,
             c->notice_error ? g_strerror(c->notice_error) : "no extents");
        return;
    }
    pos = notice_apply(c->queue, pos, c->size, e, c->notice_extents->len,
                       c->notice_depth, c->opts.notice_radius, noticed, c);
    c->notice_pos = pos >= c->size ? 0 : pos;
    if (c->notice_pos == 0) {
        c->next_sweep_us = g_get_monotonic_time() + c->opts.notice_ms * 1000;
    }
}

static void step_notices(Copier *c)
{
    if (!c->notice) {
        return;
    }
    if (c->notice_in_flight && c->notice_done) {
        finish_notice(c);
    }
    if (!c->error && !c->notice_in_flight && !chunk_queue_is_empty(c->queue) &&
        (c->notice_pos > 0 || g_get_monotonic_time() >= c->next_sweep_us)) {
        start_notice(c);
    }
}

/* ---- pacing: AIMD on the requests in flight ---- */

static void step_pacing(Copier *c, gint64 now)
{
    double mean_us;

    if (!c->opts.latency_target_us || now - c->pacing_since_us < PACING_US) {
        return;
    }
    c->window_integral += c->window * (now - c->pacing_since_us) / 1e6;
    c->pacing_since_us = now;
    if (c->paced_reads == 0) {
        return;
    }
    mean_us = (double)c->paced_read_us / c->paced_reads;
    c->paced_reads = c->paced_read_us = 0;
    if (mean_us > c->opts.latency_target_us && c->window > 1) {
        c->window = MAX(1, c->window / 2);
        c->stats.pacing_cuts++;
    } else if (mean_us < c->opts.latency_target_us && c->window < c->nreqs) {
        c->window++;
    } else {
        return;
    }
    c->stats.window_min = MIN(c->stats.window_min, c->window);
    c->stats.window_max = MAX(c->stats.window_max, c->window);
    trace(c, "window %u %.0f", c->window, mean_us);
}

/* ---- digests ---- */

static bool is_zero(const guint8 *buf, size_t len)
{
    return len == 0 || (buf[0] == 0 && memcmp(buf, buf + 1, len - 1) == 0);
}

/* Write the digests of CHUNK's blocks: from BUF, or of zeros if NULL. */
static bool write_digests(Copier *c, const Chunk *chunk, const guint8 *buf)
{
    guint64 first = chunk->offset / COPIER_BLOCK_SIZE;
    guint64 nblocks = copier_block_count(chunk->offset + chunk->length) - first;
    g_autofree guint8 *digests = g_malloc(nblocks * COPIER_DIGEST_LEN);
    ssize_t n;

    if (c->opts.digest_fd < 0) {
        return true;
    }
    for (guint64 i = 0; i < nblocks; i++) {
        guint64 off = i * COPIER_BLOCK_SIZE;
        size_t len = MIN(COPIER_BLOCK_SIZE, chunk->length - off);

        if (buf) {
            copier_block_digest(buf + off, len,
                                digests + i * COPIER_DIGEST_LEN);
        } else {
            memcpy(digests + i * COPIER_DIGEST_LEN,
                   len == COPIER_BLOCK_SIZE ? c->zero_digest
                                            : c->zero_tail_digest,
                   COPIER_DIGEST_LEN);
        }
    }
    n = pwrite(c->opts.digest_fd, digests, nblocks * COPIER_DIGEST_LEN,
               first * COPIER_DIGEST_LEN);
    if (n != (ssize_t)(nblocks * COPIER_DIGEST_LEN)) {
        fail(c, COPIER_ERROR_HASH, "cannot write block digests: %s",
             n < 0 ? g_strerror(errno) : "short write");
        return false;
    }
    return true;
}

/* ---- the pump ---- */

static void start_block_status(Copier *c)
{
    guint64 len = MIN(WINDOW_BYTES, c->size - c->plan_pos);

    g_array_set_size(c->bs_alloc, 0);
    g_array_set_size(c->bs_dirty, 0);
    c->bs_done = false;
    c->bs_error = 0;
    if (nbd_aio_block_status(
            c->src, len, c->plan_pos,
            (nbd_extent_callback){ .callback = extent_cb, .user_data = c },
            (nbd_completion_callback){ .callback = bs_done_cb, .user_data = c },
            0) < 0) {
        fail(c, COPIER_ERROR_READ, "block status at %" G_GUINT64_FORMAT ": %s",
             c->plan_pos, nbd_get_error());
        return;
    }
    c->bs_in_flight = true;
}

/* The caller's ranges as a dirty context's extents over the window that
 * block status was asked for: (length, 1) inside a range, (length, 0)
 * outside. */
static void ranges_as_extents(Copier *c)
{
    guint64 pos = c->plan_pos;
    guint64 end = c->plan_pos + MIN(WINDOW_BYTES, c->size - c->plan_pos);
    const CopierRange *r = (const CopierRange *)c->opts.ranges->data;
    guint n = c->opts.ranges->len;

    g_array_set_size(c->bs_dirty, 0);
    for (guint i = 0; i < n && pos < end; i++) {
        guint64 rs = MAX(r[i].offset, pos);
        guint64 re = MIN(r[i].offset + r[i].length, end);
        uint32_t e[4];

        if (re <= rs) {
            continue;
        }
        e[0] = (uint32_t)(rs - pos);
        e[1] = 0;
        e[2] = (uint32_t)(re - rs);
        e[3] = 1;
        g_array_append_vals(c->bs_dirty, rs > pos ? e : e + 2,
                            rs > pos ? 4 : 2);
        pos = re;
    }
    if (pos < end) {
        uint32_t e[2] = { (uint32_t)(end - pos), 0 };

        g_array_append_vals(c->bs_dirty, e, 2);
    }
}

static void finish_block_status(Copier *c)
{
    g_autoptr(GArray) regions = NULL;
    guint64 end;

    c->bs_in_flight = false;
    if (c->opts.ranges) {
        ranges_as_extents(c);
    }
    if (c->bs_error || c->bs_alloc->len == 0 ||
        (c->bitmap_context && c->bs_dirty->len == 0)) {
        fail(c, COPIER_ERROR_READ,
             "block status at %" G_GUINT64_FORMAT " failed: %s", c->plan_pos,
             c->bs_error ? g_strerror(c->bs_error) : "no extents");
        return;
    }
    if (c->opts.depth_limit) {
        /* allocation depth -> dirty flag: written in the top layers */
        uint32_t *e = (uint32_t *)c->bs_dirty->data;

        for (guint i = 1; i < c->bs_dirty->len; i += 2) {
            e[i] = e[i] >= 1 && e[i] <= c->opts.depth_limit;
        }
    }
    regions =
        plan_regions(c->plan_pos, c->size, (uint32_t *)c->bs_alloc->data,
                     c->bs_alloc->len / 2,
                     c->bitmap_context ? (uint32_t *)c->bs_dirty->data : NULL,
                     c->bs_dirty->len / 2, &end);
    {
        GQueue planned = G_QUEUE_INIT;
        Chunk *ch;

        c->stats.bytes_skipped +=
            plan_chunks(regions, c->size, c->opts.chunk_size, &planned);
        while ((ch = g_queue_pop_head(&planned))) {
            chunk_queue_push(c->queue, ch->offset, ch->length, ch->zero);
            g_free(ch);
        }
    }
    if (c->opts.release) {
        /* Not to be copied: release now, in whole blocks only (a partial
         * block's other part may be copied). */
        for (guint i = 0; i < regions->len; i++) {
            const Region *r = &g_array_index(regions, Region, i);
            guint64 s = r->offset + COPIER_BLOCK_SIZE - 1;
            guint64 e = r->offset + r->length;

            s -= s % COPIER_BLOCK_SIZE;
            if (e != c->size) {
                e -= e % COPIER_BLOCK_SIZE;
            }
            if (r->kind == REGION_SKIP && s < e) {
                Chunk *rel = g_new(Chunk, 1);

                *rel = (Chunk){ .offset = s, .length = e - s };
                g_queue_push_tail(&c->releases, rel);
            }
        }
    }
    c->plan_pos = end;
    c->last_activity_us = g_get_monotonic_time();
}

static bool rate_allows(Copier *c, guint64 len)
{
    double elapsed;

    if (!c->opts.rate_limit) {
        return true;
    }
    elapsed = (g_get_monotonic_time() - c->start_us) / 1e6;
    return c->read_started == 0 ||
           c->read_started + len <= elapsed * c->opts.rate_limit;
}

static void file_write_done(void *opaque, int err)
{
    Request *r = opaque;

    r->error = err;
    r->state = REQ_WRITE_DONE;
}

static void start_write(Copier *c, Request *r, bool zero)
{
    if (c->null_sink) {
        r->state = REQ_WRITE_DONE; /* read (and hashed) only */
        return;
    }
    if (c->file) {
        g_autoptr(GError) err = NULL;

        r->state = REQ_WRITING;
        if (!zero) {
            file_sink_write(c->file, r->buf, r->chunk.length, r->chunk.offset,
                            file_write_done, r);
        } else if (!file_sink_zero(c->file, r->chunk.length, r->chunk.offset,
                                   &err)) {
            fail(c, COPIER_ERROR_WRITE, "%s", err->message);
        } else {
            file_write_done(r, 0);
        }
        return;
    }
    nbd_completion_callback cb = { .callback = write_done, .user_data = r };
    int64_t rc;

    r->state = REQ_WRITING;
    rc = zero ? nbd_aio_zero(c->dst, r->chunk.length, r->chunk.offset, cb, 0)
              : nbd_aio_pwrite(c->dst, r->buf, r->chunk.length, r->chunk.offset,
                               cb, 0);
    if (rc < 0) {
        fail(c, COPIER_ERROR_WRITE, "write at %" G_GUINT64_FORMAT ": %s",
             r->chunk.offset, nbd_get_error());
    }
}

/* Give an idle request its next chunk. Returns false if there is none. */
static bool start_next(Copier *c, Request *r)
{
    if (c->active >= c->window || chunk_queue_is_empty(c->queue) ||
        !rate_allows(c, c->opts.chunk_size)) {
        return false;
    }
    chunk_queue_pop(c->queue, &r->chunk);
    r->error = 0;

    if (r->chunk.zero) {
        if (!write_digests(c, &r->chunk, NULL)) {
            return false;
        }
        if (c->opts.target_zeroed) {
            c->stats.bytes_skipped += r->chunk.length;
            c->stats.bytes_done += r->chunk.length;
            release(c, r->chunk.offset, r->chunk.length);
            return true; /* nothing to send; still idle */
        }
        c->active++;
        start_write(c, r, true);
        return true;
    }
    c->active++;
    r->state = REQ_READING;
    r->read_start_us = g_get_monotonic_time();
    c->read_started += r->chunk.length;
    if (nbd_aio_pread(
            r->reader, r->buf, r->chunk.length, r->chunk.offset,
            (nbd_completion_callback){ .callback = read_done, .user_data = r },
            0) < 0) {
        fail(c, COPIER_ERROR_READ, "read at %" G_GUINT64_FORMAT ": %s",
             r->chunk.offset, nbd_get_error());
    }
    return true;
}

static void step_request(Copier *c, Request *r)
{
    switch (r->state) {
    case REQ_READ_DONE:
        c->last_activity_us = g_get_monotonic_time();
        c->paced_reads++;
        c->paced_read_us += c->last_activity_us - r->read_start_us;
        c->all_reads++;
        c->all_read_us += c->last_activity_us - r->read_start_us;
        if (r->error) {
            fail(c, COPIER_ERROR_READ,
                 "reading %" G_GUINT64_FORMAT "+%" G_GUINT64_FORMAT
                 " from the source failed: %s",
                 r->chunk.offset, r->chunk.length, g_strerror(r->error));
            return;
        }
        c->stats.bytes_read += r->chunk.length;
        if (!write_digests(c, &r->chunk, r->buf)) {
            return;
        }
        if (is_zero(r->buf, r->chunk.length)) {
            if (c->opts.target_zeroed) {
                /* read, found zero: nothing to write on a zeroed target */
                c->stats.bytes_skipped += r->chunk.length;
                c->stats.bytes_done += r->chunk.length;
                release(c, r->chunk.offset, r->chunk.length);
                r->state = REQ_IDLE;
                c->active--;
                return;
            }
            r->chunk.zero = true;
            start_write(c, r, true);
        } else {
            start_write(c, r, false);
        }
        return;
    case REQ_WRITE_DONE:
        c->last_activity_us = g_get_monotonic_time();
        if (r->error) {
            fail(c, COPIER_ERROR_WRITE,
                 "writing %" G_GUINT64_FORMAT "+%" G_GUINT64_FORMAT
                 " to the target failed: %s",
                 r->chunk.offset, r->chunk.length, g_strerror(r->error));
            return;
        }
        if (r->chunk.zero) {
            c->stats.bytes_zero += r->chunk.length;
        } else {
            c->stats.bytes_written += r->chunk.length;
        }
        c->stats.bytes_done += r->chunk.length;
        trace(c, "copy %" G_GUINT64_FORMAT " %" G_GUINT64_FORMAT,
              r->chunk.offset, r->chunk.length);
        release(c, r->chunk.offset, r->chunk.length);
        r->state = REQ_IDLE;
        c->active--;
        return;
    default:
        return;
    }
}

static double now_seconds(Copier *c)
{
    return (g_get_monotonic_time() - c->start_us) / 1e6;
}

static void report(Copier *c, bool final)
{
    gint64 now = g_get_monotonic_time();

    c->stats.seconds = (now - c->start_us) / 1e6;
    if (c->opts.progress &&
        (final || now - c->last_progress_us >= PROGRESS_US)) {
        CopierStats s = c->stats;

        s.bytes_done = MIN(s.bytes_done + s.bytes_skipped, s.size);
        if (final && !c->error) {
            s.bytes_done = s.size;
        }
        c->last_progress_us = now;
        c->opts.progress(&s, c->opts.progress_opaque);
    }
}

static gboolean pump(gpointer data)
{
    Copier *c = data;
    gint64 now = g_get_monotonic_time();

    if (c->opts.cancel && g_atomic_int_get(c->opts.cancel)) {
        fail(c, COPIER_ERROR_CANCELLED, "cancelled");
    }
    if (c->opts.stall_seconds &&
        now - c->last_activity_us > (gint64)c->opts.stall_seconds * 1000000) {
        fail(c, COPIER_ERROR_STALLED, "no progress for %u s",
             c->opts.stall_seconds);
    }
    for (guint i = 0; i < c->nreaders; i++) {
        if (nbd_aio_is_dead(c->readers[i]) ||
            nbd_aio_is_closed(c->readers[i])) {
            fail(c, COPIER_ERROR_READ, "the source NBD server went away");
        }
    }
    if (nbd_aio_is_dead(c->src) || nbd_aio_is_closed(c->src) ||
        (c->notice &&
         (nbd_aio_is_dead(c->notice) || nbd_aio_is_closed(c->notice)))) {
        fail(c, COPIER_ERROR_READ, "the source NBD server went away");
    }
    if (c->dst && (nbd_aio_is_dead(c->dst) || nbd_aio_is_closed(c->dst))) {
        fail(c, COPIER_ERROR_WRITE, "the target NBD server went away");
    }

    for (guint i = 0; !c->error && i < c->nreqs; i++) {
        step_request(c, &c->reqs[i]);
    }
    if (!c->error && c->bs_in_flight && c->bs_done) {
        finish_block_status(c);
    }
    if (!c->error) {
        step_notices(c);
        step_pacing(c, now);
        release_planned(c);
        if (c->rel_length &&
            (now - c->rel_since_us >= RELEASE_DELAY_US ||
             (chunk_queue_is_empty(c->queue) && c->active == 0))) {
            flush_release(c);
        }
    }
    for (guint i = 0; !c->error && i < c->nreqs; i++) {
        Request *r = &c->reqs[i];

        while (!c->error && r->state == REQ_IDLE && start_next(c, r)) {
        }
    }
    /* Plan the whole disk ahead (memory follows its extents), so that
     * requests never wait for block status and notices can reach any
     * region still to copy. */
    if (!c->error && !c->bs_in_flight && c->plan_pos < c->size) {
        start_block_status(c);
    }
    if (!c->error && !c->flushing && c->plan_pos >= c->size &&
        !c->bs_in_flight && chunk_queue_is_empty(c->queue) && c->active == 0 &&
        g_queue_is_empty(&c->releases) && c->rel_length == 0 &&
        c->releases_in_flight == 0) {
        c->flushing = true;
        if (c->null_sink) {
            c->flushed = true;
        } else if (c->file) {
            g_autoptr(GError) err = NULL;

            if (file_sink_finish(c->file, &err)) {
                c->flushed = true;
            } else {
                fail(c, COPIER_ERROR_WRITE, "%s", err->message);
            }
        } else if (nbd_aio_flush(c->dst,
                                 (nbd_completion_callback){
                                     .callback = flush_done, .user_data = c },
                                 0) < 0) {
            fail(c, COPIER_ERROR_WRITE, "flush: %s", nbd_get_error());
        }
    }
    if (c->flushed && c->flush_error) {
        fail(c, COPIER_ERROR_WRITE, "flushing the target failed: %s",
             g_strerror(c->flush_error));
    }
    report(c, false);
    if (c->error || c->flushed) {
        g_main_loop_quit(c->loop);
    }
    return G_SOURCE_CONTINUE;
}

/* ---- set-up and tear-down ---- */

static void copier_free(Copier *c)
{
    if (c->tick) {
        g_source_destroy(c->tick);
        g_source_unref(c->tick);
    }
    if (c->src_source) {
        g_source_destroy(c->src_source);
        g_source_unref(c->src_source);
    }
    if (c->dst_source) {
        g_source_destroy(c->dst_source);
        g_source_unref(c->dst_source);
    }
    for (guint i = 1; i < c->nreaders; i++) {
        g_source_destroy(c->reader_sources[i]);
        g_source_unref(c->reader_sources[i]);
        nbd_close(c->readers[i]);
    }
    nbd_close(c->src); /* abandons anything still in flight */
    nbd_close(c->dst);
    file_sink_free(c->file); /* waits for the kernel to release buffers */
    for (guint i = 0; c->reqs && i < c->nreqs; i++) {
        free(c->reqs[i].buf);
    }
    g_free(c->reqs);
    chunk_queue_free(c->queue);
    g_queue_clear_full(&c->releases, g_free);
    if (c->notice_source) {
        g_source_destroy(c->notice_source);
        g_source_unref(c->notice_source);
    }
    nbd_close(c->notice);
    if (c->notice_extents) {
        g_array_unref(c->notice_extents);
    }
    if (c->bs_alloc) {
        g_array_unref(c->bs_alloc);
        g_array_unref(c->bs_dirty);
    }
    if (c->loop) {
        g_main_loop_unref(c->loop);
    }
    if (c->ctx) {
        g_main_context_unref(c->ctx);
    }
    g_free(c->bitmap_context);
    g_clear_error(&c->error);
    g_free(c);
}
G_DEFINE_AUTOPTR_CLEANUP_FUNC(Copier, copier_free)

bool copier_copy(const CopierEndpoint *source, const CopierEndpoint *target,
                 const CopierOptions *opts, CopierStats *stats, GError **error)
{
    g_autoptr(Copier) c = g_new0(Copier, 1);
    const char *contexts[3] = { "base:allocation", NULL, NULL };
    g_autofree guint8 *zeros = g_malloc0(COPIER_BLOCK_SIZE);
    int64_t src_size, dst_size;

    c->opts = *opts;
    if (!copier_options_check(opts, error)) {
        return false;
    }
    if (!!opts->bitmap + !!opts->depth_limit + !!opts->ranges > 1) {
        g_set_error(error, COPIER_ERROR, COPIER_ERROR_CONNECT,
                    "copy by a bitmap or by allocation depth, not both");
        return false;
    }
    if (opts->bitmap) {
        c->bitmap_context =
            g_strconcat("qemu:dirty-bitmap:", opts->bitmap, NULL);
        contexts[1] = c->bitmap_context;
    } else if (opts->depth_limit) {
        c->bitmap_context = g_strdup("qemu:allocation-depth");
        contexts[1] = c->bitmap_context;
    } else if (opts->ranges) {
        /* no context: ranges_as_extents() fills the dirty extents */
        c->bitmap_context = g_strdup("qbk:ranges");
    }
    c->ctx = g_main_context_new();
    c->loop = g_main_loop_new(c->ctx, FALSE);
    c->queue = chunk_queue_new(c->opts.chunk_size);
    g_queue_init(&c->releases);
    c->notice_extents = g_array_new(FALSE, FALSE, sizeof(uint32_t));
    c->bs_alloc = g_array_new(FALSE, FALSE, sizeof(uint32_t));
    c->bs_dirty = g_array_new(FALSE, FALSE, sizeof(uint32_t));

    c->src = nbd_source_connect(source, contexts, c->ctx, pump, c,
                                &c->src_source, error);
    if (!c->src) {
        return false;
    }
    /* Reads spread over more connections: the point-in-time view does
     * not change, so they are consistent whatever the server says about
     * multi-conn. */
    c->readers[0] = c->src;
    c->reader_sources[0] = c->src_source;
    c->nreaders = CLAMP(c->opts.connections, 1, COPIER_MAX_CONNECTIONS);
    for (guint i = 1; i < c->nreaders; i++) {
        c->readers[i] = nbd_source_connect(source, NULL, c->ctx, pump, c,
                                           &c->reader_sources[i], error);
        if (!c->readers[i]) {
            c->nreaders = i;
            return false;
        }
    }
    src_size = nbd_get_size(c->src);
    if (src_size < 0) {
        g_set_error(error, COPIER_ERROR, COPIER_ERROR_CONNECT,
                    "cannot get the source's size: %s", nbd_get_error());
        return false;
    }
    c->null_sink = !target->file && !target->socket;
    if (c->null_sink) {
        /* nothing to write: reading and hashing (verification) */
    } else if (target->file) {
        c->file = file_sink_open(target->file, src_size, c->opts.requests,
                                 c->ctx, pump, c, error);
        if (!c->file) {
            return false;
        }
    } else {
        c->dst = nbd_source_connect(target, NULL, c->ctx, pump, c,
                                    &c->dst_source, error);
        if (!c->dst) {
            return false;
        }
        dst_size = nbd_get_size(c->dst);
        if (src_size != dst_size) {
            g_set_error(error, COPIER_ERROR, COPIER_ERROR_CONNECT,
                        "source (%" G_GINT64_FORMAT
                        " bytes) and target (%" G_GINT64_FORMAT
                        " bytes) differ in size",
                        src_size, dst_size);
            return false;
        }
        if (nbd_is_read_only(c->dst) == 1 || nbd_can_zero(c->dst) != 1) {
            g_set_error(error, COPIER_ERROR, COPIER_ERROR_CONNECT,
                        "the target export is read-only or cannot write "
                        "zeros");
            return false;
        }
    }
    c->size = c->stats.size = src_size;
    if (c->opts.release &&
        (nbd_is_read_only(c->src) == 1 || nbd_can_trim(c->src) != 1)) {
        g_set_error(error, COPIER_ERROR, COPIER_ERROR_CONNECT,
                    "cannot release copied regions: the source export is "
                    "read-only or cannot trim");
        return false;
    }
    if (c->opts.notices) {
        const char *nctx[2] = { c->opts.notice_context, NULL };

        if (!c->opts.notice_context) {
            g_set_error(error, COPIER_ERROR, COPIER_ERROR_CONNECT,
                        "guest-write notices need a map context");
            return false;
        }
        c->notice = nbd_source_connect(c->opts.notices, nctx, c->ctx, pump, c,
                                       &c->notice_source, error);
        if (!c->notice) {
            return false;
        }
        if (nbd_can_meta_context(c->notice, c->opts.notice_context) != 1) {
            g_set_error(error, COPIER_ERROR, COPIER_ERROR_CONNECT,
                        "the notice export has no '%s' map",
                        c->opts.notice_context);
            return false;
        }
        if (nbd_get_size(c->notice) != src_size) {
            g_set_error(error, COPIER_ERROR, COPIER_ERROR_CONNECT,
                        "the notice export's size is not the source's");
            return false;
        }
        c->notice_depth =
            strcmp(c->opts.notice_context, "qemu:allocation-depth") == 0;
    }
    if (c->opts.digest_fd >= 0 &&
        !copier_digests_init(c->opts.digest_fd, c->size,
                             c->opts.digest_parent_fd, error)) {
        return false;
    }
    copier_block_digest(zeros, COPIER_BLOCK_SIZE, c->zero_digest);
    copier_block_digest(zeros, c->size % COPIER_BLOCK_SIZE,
                        c->zero_tail_digest);

    c->nreqs = c->opts.requests;
    /* Pacing starts half open and finds its level within a second. */
    c->window = c->opts.latency_target_us ? MAX(1, c->nreqs / 2) : c->nreqs;
    c->stats.window_min = c->stats.window_max = c->window;
    c->reqs = g_new0(Request, c->nreqs);
    for (guint i = 0; i < c->nreqs; i++) {
        c->reqs[i].reader = c->readers[i % c->nreaders];
        /* page aligned, ready for an O_DIRECT sink */
        if (posix_memalign((void **)&c->reqs[i].buf, 4096,
                           c->opts.chunk_size) != 0) {
            g_set_error(error, COPIER_ERROR, COPIER_ERROR_CONNECT,
                        "out of memory for %u x %" G_GUINT64_FORMAT " bytes",
                        c->nreqs, c->opts.chunk_size);
            return false;
        }
    }
    c->tick = g_timeout_source_new(TICK_MS);
    g_source_set_callback(c->tick, pump, c, NULL);
    g_source_attach(c->tick, c->ctx);

    c->start_us = c->last_activity_us = g_get_monotonic_time();
    c->pacing_since_us = c->start_us;
    c->last_progress_us = 0;
    pump(c);
    if (!c->error && !c->flushed) {
        g_main_loop_run(c->loop);
    }
    if (c->opts.latency_target_us) {
        gint64 now = g_get_monotonic_time();

        c->window_integral += c->window * (now - c->pacing_since_us) / 1e6;
    }
    c->stats.window_mean = c->window;
    if (c->opts.latency_target_us && now_seconds(c) > 0) {
        c->stats.window_mean = c->window_integral / now_seconds(c);
    }
    c->stats.read_ms_mean =
        c->all_reads ? c->all_read_us / 1e3 / c->all_reads : 0;
    report(c, true);
    if (stats) {
        *stats = c->stats;
    }
    if (c->error) {
        g_propagate_error(error, g_steal_pointer(&c->error));
        return false;
    }
    return true;
}
