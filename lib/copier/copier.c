/*
 * The copy engine: a fixed array of requests, each a small state machine,
 * on the caller's GMainContext with one GSource per NBD connection.
 *
 *   IDLE --(chunk)--> READING --> READ_DONE --> WRITING --> WRITE_DONE --> IDLE
 *   IDLE --(zero chunk)---------------------> WRITING ...
 *
 * Completion callbacks only record the result and the new state;
 * copier_pump(), run after every wake-up of the loop, looks at all
 * requests, starts the next step of each, keeps block-status planning
 * ahead of the requests (select.c), and ends the copy when all is copied
 * and flushed, or at the first failure. Several copiers (the disks of a
 * VM) run at once on one loop and share a budget of requests (budget.c).
 * Around it: where the data goes (sink-*.c), notices (notices.c), release
 * (release.c), pacing (pacing.c), digests (blockhash.c). Memory: the
 * budget's requests x chunk size, plus one window of extents per copier.
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

#define TICK_MS     10 /* cancel, rate, stall, notices, pacing */
#define PROGRESS_US (250 * 1000)

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
        .write_mode = COPIER_WRITE_CACHED,
        .plan_ahead = COPIER_PLAN_AHEAD,
    };
}

static const char *const write_mode_names[] = {
    [COPIER_WRITE_CACHED] = "cached",
    [COPIER_WRITE_DIRECT] = "direct",
};

bool copier_write_mode_parse(const char *text, CopierWriteMode *mode)
{
    for (guint i = 0; i < G_N_ELEMENTS(write_mode_names); i++) {
        if (g_strcmp0(text, write_mode_names[i]) == 0) {
            *mode = i;
            return true;
        }
    }
    return false;
}

const char *copier_write_mode_name(CopierWriteMode mode)
{
    return write_mode_names[mode];
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
    } else if (opts->plan_ahead < 1) {
        bad = "at least one region must be planned ahead";
    }
    if (bad) {
        g_set_error(error, COPIER_ERROR, COPIER_ERROR_OPTIONS, "%s", bad);
        return false;
    }
    return true;
}

/* ---- completions: record, nothing more ---- */

static int read_done(void *opaque, int *error)
{
    Request *r = opaque;

    r->error = *error;
    r->state = REQ_READ_DONE;
    return 1;
}

static void write_done(void *opaque, int err)
{
    Request *r = opaque;

    r->error = err;
    r->state = REQ_WRITE_DONE;
}

static void flush_done(void *opaque, int err)
{
    Copier *c = opaque;

    c->flush_error = err;
    c->flushed = true;
}

/* ---- the requests ---- */

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

/* Whether this copier may have one more request out: its fair share of
 * the budget while other copiers run, and for the cold copy (offset
 * order) its pacing window. What the guest is writing around (hot ranges)
 * is never held back: a copy there spares the guest a copy-before-write. */
static bool may_start(Copier *c)
{
    CopierBudget *b = c->budget;
    guint share = MAX(1, b->limit / MAX(1, b->running));
    guint limit = chunk_queue_next_is_hot(c->queue) ? c->nreqs : c->window;

    return c->active < limit && c->active < share && b->active < b->limit;
}

static void request_busy(Copier *c)
{
    c->active++;
    c->budget->active++;
}

/* R is done with its chunk: back to idle, its buffer to the budget. */
static void request_idle(Copier *c, Request *r)
{
    r->state = REQ_IDLE;
    budget_give(c->budget, g_steal_pointer(&r->buf));
    c->active--;
    c->budget->active--;
}

static void start_write(Copier *c, Request *r, bool zero)
{
    g_autoptr(GError) err = NULL;

    r->state = REQ_WRITING;
    if (!c->sink->ops->write(c->sink, r->buf, r->chunk.length, r->chunk.offset,
                             zero, write_done, r, &err)) {
        copier_fail(c, COPIER_ERROR_WRITE, "%s", err->message);
    }
}

/* Give an idle request its next chunk. Returns false if there is none. */
static bool start_next(Copier *c, Request *r)
{
    if (!may_start(c) || chunk_queue_is_empty(c->queue) ||
        !rate_allows(c, c->opts.chunk_size)) {
        return false;
    }
    r->buf = budget_take(c->budget);
    if (!r->buf) {
        copier_fail(c, COPIER_ERROR_READ,
                    "out of memory for a %" G_GUINT64_FORMAT "-byte request",
                    c->opts.chunk_size);
        return false;
    }
    chunk_queue_pop(c->queue, &r->chunk);
    r->error = 0;

    if (r->chunk.zero) {
        /* zeros are written without data */
        budget_give(c->budget, g_steal_pointer(&r->buf));
        if (!digests_write(c, &r->chunk, NULL)) {
            return false;
        }
        if (c->opts.target_zeroed) {
            c->stats.bytes_skipped += r->chunk.length;
            c->stats.bytes_done += r->chunk.length;
            release_range(c, r->chunk.offset, r->chunk.length);
            return true; /* nothing to send; still idle */
        }
        request_busy(c);
        start_write(c, r, true);
        return true;
    }
    request_busy(c);
    r->state = REQ_READING;
    r->read_start_us = g_get_monotonic_time();
    c->read_started += r->chunk.length;
    if (nbd_aio_pread(
            r->reader, r->buf, r->chunk.length, r->chunk.offset,
            (nbd_completion_callback){ .callback = read_done, .user_data = r },
            0) < 0) {
        copier_fail(c, COPIER_ERROR_READ, "read at %" G_GUINT64_FORMAT ": %s",
                    r->chunk.offset, nbd_get_error());
    }
    return true;
}

static bool is_zero(const guint8 *buf, size_t len)
{
    return len == 0 || (buf[0] == 0 && memcmp(buf, buf + 1, len - 1) == 0);
}

static void read_completed(Copier *c, Request *r)
{
    c->last_activity_us = g_get_monotonic_time();
    c->paced_reads++;
    c->paced_read_us += c->last_activity_us - r->read_start_us;
    c->all_reads++;
    c->all_read_us += c->last_activity_us - r->read_start_us;
    if (r->error) {
        copier_fail(c, COPIER_ERROR_READ,
                    "reading %" G_GUINT64_FORMAT "+%" G_GUINT64_FORMAT
                    " from the source failed: %s",
                    r->chunk.offset, r->chunk.length, g_strerror(r->error));
        return;
    }
    c->stats.bytes_read += r->chunk.length;
    if (!digests_write(c, &r->chunk, r->buf)) {
        return;
    }
    if (!is_zero(r->buf, r->chunk.length)) {
        start_write(c, r, false);
    } else if (c->opts.target_zeroed) {
        /* read, found zero: nothing to write on a zeroed target */
        c->stats.bytes_skipped += r->chunk.length;
        c->stats.bytes_done += r->chunk.length;
        release_range(c, r->chunk.offset, r->chunk.length);
        request_idle(c, r);
    } else {
        r->chunk.zero = true;
        start_write(c, r, true);
    }
}

static void write_completed(Copier *c, Request *r)
{
    c->last_activity_us = g_get_monotonic_time();
    if (r->error) {
        copier_fail(c, COPIER_ERROR_WRITE,
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
    copier_trace(c, "copy %" G_GUINT64_FORMAT " %" G_GUINT64_FORMAT,
                 r->chunk.offset, r->chunk.length);
    release_range(c, r->chunk.offset, r->chunk.length);
    request_idle(c, r);
}

/* ---- the pump ---- */

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

/* Fail if the copy is to stop: cancelled, stalled, a server gone. */
static void check_health(Copier *c, gint64 now)
{
    if (c->opts.cancel && g_atomic_int_get(c->opts.cancel)) {
        copier_fail(c, COPIER_ERROR_CANCELLED, "cancelled");
    }
    if (c->opts.stall_seconds &&
        now - c->last_activity_us > (gint64)c->opts.stall_seconds * 1000000) {
        copier_fail(c, COPIER_ERROR_STALLED, "no progress for %u s",
                    c->opts.stall_seconds);
    }
    for (guint i = 0; i < c->nreaders; i++) {
        if (nbd_source_gone(c->readers[i])) {
            copier_fail(c, COPIER_ERROR_READ,
                        "the source NBD server went away");
        }
    }
    if (nbd_source_gone(c->notice) || nbd_source_gone(c->chain)) {
        copier_fail(c, COPIER_ERROR_READ, "the source NBD server went away");
    }
    if (c->sink->ops->dead(c->sink)) {
        copier_fail(c, COPIER_ERROR_WRITE, "the target went away");
    }
}

/* Everything copied and released: make the target durable. */
static void maybe_flush(Copier *c)
{
    g_autoptr(GError) err = NULL;

    if (c->flushing || c->plan_pos < c->size || select_busy(c) ||
        !chunk_queue_is_empty(c->queue) || c->active || !release_idle(c)) {
        return;
    }
    c->flushing = true;
    if (!c->sink->ops->flush(c->sink, flush_done, c, &err)) {
        copier_fail(c, COPIER_ERROR_WRITE, "%s", err->message);
    }
}

/* The copy ended (done or failed): say so once, from the loop. */
static void end(Copier *c)
{
    c->ended = true;
    c->budget->running--;
    if (c->tick) {
        g_source_destroy(c->tick);
        g_clear_pointer(&c->tick, g_source_unref);
    }
    pacing_end(c);
    c->stats.read_ms_mean =
        c->all_reads ? c->all_read_us / 1e3 / c->all_reads : 0;
    report(c, true);
    if (c->done) {
        c->done(c, c->done_opaque);
    }
}

gboolean copier_pump(gpointer data)
{
    Copier *c = data;
    gint64 now = g_get_monotonic_time();

    if (!c->started || c->ended) {
        return G_SOURCE_CONTINUE;
    }
    check_health(c, now);
    for (guint i = 0; !c->error && i < c->nreqs; i++) {
        Request *r = &c->reqs[i];

        if (r->state == REQ_READ_DONE) {
            read_completed(c, r);
        } else if (r->state == REQ_WRITE_DONE) {
            write_completed(c, r);
        }
    }
    if (!c->error) {
        select_plan(c);
    }
    if (!c->error) {
        notices_step(c);
        pacing_step(c, now);
        release_step(c, now);
    }
    for (guint i = 0; !c->error && i < c->nreqs; i++) {
        Request *r = &c->reqs[i];

        while (!c->error && r->state == REQ_IDLE && start_next(c, r)) {
            if (r->state == REQ_WRITE_DONE) {
                /* a sink that wrote at once (zeros, no target): go on now,
                 * not at the next tick (8 TiB of zeros took 250 s so) */
                write_completed(c, r);
            }
        }
    }
    /* Plan ahead, up to opts.plan_ahead regions, so that requests never
     * wait for block status and notices reach what is planned. */
    if (!c->error) {
        select_ask(c);
    }
    if (!c->error) {
        maybe_flush(c);
    }
    if (c->flushed && c->flush_error) {
        copier_fail(c, COPIER_ERROR_WRITE, "flushing the target failed: %s",
                    g_strerror(c->flush_error));
    }
    report(c, false);
    if (c->error || c->flushed) {
        end(c);
    }
    return G_SOURCE_CONTINUE;
}

/* ---- set-up and tear-down ---- */

/* The source: a connection asking for allocation (and the selection's
 * map, unless the second connection asks for that alone: select.c), and
 * more connections for reads (the point-in-time view does not change, so
 * they are consistent whatever the server says about multi-conn). */
static bool connect_source(Copier *c, const CopierEndpoint *source,
                           GError **error)
{
    const char *contexts[3], *map_contexts[2];
    int64_t size;

    if (!select_init(c, contexts, map_contexts, error)) {
        return false;
    }
    c->src = nbd_source_connect(source, contexts, c->ctx, copier_pump, c,
                                &c->src_source, error);
    if (!c->src) {
        return false;
    }
    c->readers[0] = c->src;
    c->reader_sources[0] = c->src_source;
    c->nreaders = 1;
    for (guint i = 1; i < c->opts.connections; i++) {
        c->readers[i] = nbd_source_connect(
            source, i == 1 && map_contexts[0] ? map_contexts : NULL, c->ctx,
            copier_pump, c, &c->reader_sources[i], error);
        if (!c->readers[i]) {
            return false;
        }
        c->nreaders++;
    }
    c->map = map_contexts[0] ? c->readers[1] : NULL;
    size = nbd_get_size(c->src);
    if (size < 0) {
        g_set_error(error, COPIER_ERROR, COPIER_ERROR_CONNECT,
                    "cannot get the source's size: %s", nbd_get_error());
        return false;
    }
    c->size = c->stats.size = size;
    if (c->opts.release &&
        (nbd_is_read_only(c->src) == 1 || nbd_can_trim(c->src) != 1)) {
        g_set_error(error, COPIER_ERROR, COPIER_ERROR_CONNECT,
                    "cannot release copied regions: the source export is "
                    "read-only or cannot trim");
        return false;
    }
    return true;
}

static Sink *open_sink(Copier *c, const CopierEndpoint *target, GError **error)
{
    if (target->file) {
        return sink_file_new(target->file, c->size, c->opts.requests,
                             c->opts.write_mode, c->ctx, copier_pump, c, error);
    }
    if (target->uri) {
        return sink_nbd_new(target, c->size, c->ctx, copier_pump, c, error);
    }
    return sink_null_new();
}

Copier *copier_new(const CopierEndpoint *source, const CopierEndpoint *target,
                   const CopierOptions *opts, GMainContext *ctx,
                   CopierBudget *budget, GError **error)
{
    g_autoptr(Copier) c = g_new0(Copier, 1);

    if (!copier_options_check(opts, error)) {
        return NULL;
    }
    c->opts = *opts;
    c->ctx = g_main_context_ref(ctx);
    if (!budget || budget->chunk_size != opts->chunk_size) {
        budget = c->own_budget =
            copier_budget_new(opts->requests, opts->chunk_size);
    }
    c->budget = budget;
    c->queue = chunk_queue_new(c->opts.chunk_size);
    g_queue_init(&c->releases);
    if (!connect_source(c, source, error) ||
        !(c->sink = open_sink(c, target, error)) ||
        (c->opts.notices && !notices_connect(c, copier_pump, error)) ||
        (c->opts.chain && !select_chain_connect(c, copier_pump, error))) {
        return NULL;
    }
    if (c->opts.digest_fd >= 0 &&
        !copier_digests_init(c->opts.digest_fd, c->size,
                             c->opts.digest_parent_fd,
                             c->opts.digest_parent_dense, error)) {
        return NULL;
    }
    digests_zero(c->size, c->zero_digest, c->zero_tail_digest);
    c->nreqs = c->opts.requests;
    /* Pacing starts half open and finds its level within a second. */
    c->window = c->opts.latency_target_us ? MAX(1, c->nreqs / 2) : c->nreqs;
    c->stats.window_min = c->stats.window_max = c->window;
    c->reqs = g_new0(Request, c->nreqs);
    for (guint i = 0; i < c->nreqs; i++) {
        c->reqs[i].copier = c;
        c->reqs[i].reader = c->readers[i % c->nreaders];
    }
    return g_steal_pointer(&c);
}

static gboolean first_pump(gpointer data)
{
    copier_pump(data);
    return G_SOURCE_REMOVE;
}

void copier_start(Copier *c, CopierDone done, void *opaque)
{
    g_assert(!c->started);
    c->done = done;
    c->done_opaque = opaque;
    c->started = true;
    c->budget->running++;
    c->start_us = c->last_activity_us = g_get_monotonic_time();
    c->pacing_since_us = c->start_us;
    c->tick = g_timeout_source_new(TICK_MS);
    g_source_set_callback(c->tick, copier_pump, c, NULL);
    g_source_attach(c->tick, c->ctx);
    /* from the loop: DONE must not run before the caller's own return */
    {
        GSource *now = g_idle_source_new();

        g_source_set_callback(now, first_pump, c, NULL);
        g_source_attach(now, c->ctx);
        g_source_unref(now);
    }
}

void copier_cancel(Copier *c)
{
    if (c->started && !c->ended) {
        copier_fail(c, COPIER_ERROR_CANCELLED, "cancelled");
    }
}

bool copier_result(Copier *c, CopierStats *stats, GError **error)
{
    if (stats) {
        *stats = c->stats;
    }
    if (c->error) {
        g_propagate_error(error, g_error_copy(c->error));
        return false;
    }
    if (!c->ended) {
        g_set_error(error, COPIER_ERROR, COPIER_ERROR_CANCELLED,
                    "the copy has not ended");
        return false;
    }
    return true;
}

void copier_free(Copier *c)
{
    if (!c) {
        return;
    }
    if (c->started && !c->ended) {
        c->budget->running--;
    }
    if (c->tick) {
        g_source_destroy(c->tick);
        g_source_unref(c->tick);
    }
    for (guint i = 0; i < c->nreaders; i++) {
        nbd_source_close(c->readers[i], c->reader_sources[i]);
    }
    nbd_source_close(c->notice, c->notice_source);
    nbd_source_close(c->chain, c->chain_source);
    sink_free(c->sink); /* the kernel is done with the buffers after it */
    for (guint i = 0; c->reqs && i < c->nreqs; i++) {
        if (c->reqs[i].state != REQ_IDLE) {
            c->budget->active--;
        }
        budget_give(c->budget, c->reqs[i].buf);
    }
    g_free(c->reqs);
    chunk_queue_free(c->queue);
    g_queue_clear_full(&c->releases, g_free);
    if (c->notice_extents) {
        g_array_unref(c->notice_extents);
    }
    select_free(c);
    copier_budget_free(c->own_budget);
    if (c->ctx) {
        g_main_context_unref(c->ctx);
    }
    g_free(c->bitmap_context);
    g_clear_error(&c->error);
    g_free(c);
}

static void quit_loop(Copier *c, void *opaque)
{
    g_main_loop_quit(opaque);
}

bool copier_copy(const CopierEndpoint *source, const CopierEndpoint *target,
                 const CopierOptions *opts, CopierStats *stats, GError **error)
{
    g_autoptr(GMainContext) ctx = g_main_context_new();
    g_autoptr(GMainLoop) loop = g_main_loop_new(ctx, FALSE);
    g_autoptr(Copier) c = copier_new(source, target, opts, ctx, NULL, error);

    if (!c) {
        return false;
    }
    copier_start(c, quit_loop, loop);
    g_main_loop_run(loop);
    return copier_result(c, stats, error);
}
