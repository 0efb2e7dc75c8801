/*
 * What to copy: every region the source's "base:allocation" says holds
 * data, narrowed by one selection: a dirty bitmap's map, the top links of
 * a chain (its allocation depth), or the caller's ranges. Block status is
 * asked ahead of the requests, and what it says goes
 * into the work queue (plan.c, queue.c); what needs no copy may be
 * released at once. A source whose map stops at its top image (a
 * snapshot-access view) gets a second question per window, about its
 * chain (opts.chain), where the first answer says "hole" but not "zero".
 *
 * A selection that leaves most of a disk out (a dirty bitmap, ranges) is
 * asked about first, alone; allocation is then asked only from the
 * window's first dirty block to its last. Allocation costs the server its
 * image's metadata over the whole window (qcow2 L2 tables), and the
 * incremental of a sparse 8 TiB disk spent 1.1 s of its 1.4 s reading
 * them for clean windows. NBD answers every context a connection asked
 * for, so the map has a connection of its own (readers[1]); with one
 * connection, both are asked together.
 *
 * Up to SELECT_ASKS windows are asked at once and planned in order; an
 * answer that covers less than its window is asked again about the rest,
 * in its place, before any later window is planned.
 */
#include <string.h>

#include "internal.h"

/* Block status per call: as much as NBD's 32-bit length allows (block
 * aligned). A sparse 8 TiB disk took 8192 round trips at 1 GiB, 0.47 s of
 * a 0.85 s incremental; a server may answer less, then the next call
 * starts where the answer ended. */
#define WINDOW_BYTES                                                           \
    (G_GUINT64_CONSTANT(0xffffffff) / COPIER_BLOCK_SIZE * COPIER_BLOCK_SIZE)

#define ALIGN_UP(x)                                                            \
    (((x) + COPIER_BLOCK_SIZE - 1) / COPIER_BLOCK_SIZE * COPIER_BLOCK_SIZE)

bool select_init(Copier *c, const char **contexts, const char **map_contexts,
                 GError **error)
{
    const CopierOptions *o = &c->opts;

    contexts[0] = "base:allocation";
    contexts[1] = contexts[2] = NULL;
    map_contexts[0] = map_contexts[1] = NULL;
    if (!!o->bitmap + !!o->depth_limit + !!o->ranges > 1) {
        g_set_error(error, COPIER_ERROR, COPIER_ERROR_OPTIONS,
                    "copy by a bitmap, by allocation depth or by ranges: "
                    "one of them");
        return false;
    }
    if (o->bitmap) {
        c->bitmap_context = g_strconcat("qemu:dirty-bitmap:", o->bitmap, NULL);
        if (o->connections >= 2) {
            map_contexts[0] = c->bitmap_context;
        } else {
            contexts[1] = c->bitmap_context;
        }
    } else if (o->depth_limit) {
        c->bitmap_context = g_strdup("qemu:allocation-depth");
        contexts[1] = c->bitmap_context;
    } else if (o->ranges) {
        /* no context: ranges_as_extents() fills the dirty extents */
        c->bitmap_context = g_strdup("qbk:ranges");
    }
    for (guint i = 0; i < SELECT_ASKS; i++) {
        SelectAsk *a = &c->asks[i];

        a->copier = c;
        a->alloc = g_array_new(FALSE, FALSE, sizeof(uint32_t));
        a->dirty = g_array_new(FALSE, FALSE, sizeof(uint32_t));
    }
    return true;
}

void select_free(Copier *c)
{
    for (guint i = 0; i < SELECT_ASKS; i++) {
        SelectAsk *a = &c->asks[i];

        g_clear_pointer(&a->alloc, g_array_unref);
        g_clear_pointer(&a->dirty, g_array_unref);
        g_clear_pointer(&a->depth, g_array_unref);
    }
}

bool select_busy(const Copier *c)
{
    return c->ask_count > 0;
}

bool select_chain_connect(Copier *c, GSourceFunc pump, GError **error)
{
    const char *ctx[2] = { "qemu:allocation-depth", NULL };

    c->chain = nbd_source_connect(c->opts.chain, ctx, c->ctx, pump, c,
                                  &c->chain_source, error);
    if (!c->chain) {
        return false;
    }
    if (nbd_can_meta_context(c->chain, ctx[0]) != 1 ||
        nbd_get_size(c->chain) != (int64_t)c->size) {
        g_set_error(error, COPIER_ERROR, COPIER_ERROR_CONNECT,
                    "the chain export has no allocation depth of the "
                    "source's size");
        return false;
    }
    for (guint i = 0; i < SELECT_ASKS; i++) {
        c->asks[i].depth = g_array_new(FALSE, FALSE, sizeof(uint32_t));
    }
    return true;
}

/* ---- libnbd callbacks: record, nothing more ---- */

static int extent_cb(void *opaque, const char *context, uint64_t offset,
                     uint32_t *entries, size_t n, int *error)
{
    SelectAsk *a = opaque;
    const char *map = a->copier->bitmap_context;
    bool is_alloc = strcmp(context, "base:allocation") == 0;
    bool is_map = map && strcmp(context, map) == 0;
    GArray *into = NULL;

    switch (a->step) {
    case ASK_BOTH:
        into = is_alloc ? a->alloc : is_map ? a->dirty : NULL;
        break;
    case ASK_DIRTY:
        into = is_map ? a->dirty : NULL;
        break;
    case ASK_ALLOC:
        into = is_alloc ? a->alloc : NULL;
        break;
    case ASK_CHAIN:
        into = strcmp(context, "qemu:allocation-depth") == 0 ? a->depth : NULL;
        break;
    }
    if (into && into->len == 0) { /* keep the first answer per context */
        /* N counts uint32 entries: (length, flags) pairs times two */
        g_array_append_vals(into, entries, n);
    }
    return 0;
}

static int bs_done_cb(void *opaque, int *error)
{
    SelectAsk *a = opaque;

    a->error = *error;
    a->done = true;
    a->copier->stats.block_status_seconds +=
        (g_get_monotonic_time() - a->asked_us) / 1e6;
    return 1;
}

/* Ask NBD for the block status of [POS, POS + LEN), as A's STEP, the
 * answer going where extent_cb puts it; WHAT names it in an error. */
static bool ask_block_status(SelectAsk *a, AskStep step, struct nbd_handle *nbd,
                             guint64 pos, guint64 len, const char *what)
{
    Copier *c = a->copier;

    a->step = step;
    a->done = false;
    a->error = 0;
    a->asked_us = g_get_monotonic_time();
    c->stats.block_status_calls++;
    if (step == ASK_BOTH || step == ASK_ALLOC) {
        c->stats.allocation_asked += len;
    }
    if (nbd_aio_block_status(
            nbd, len, pos,
            (nbd_extent_callback){ .callback = extent_cb, .user_data = a },
            (nbd_completion_callback){ .callback = bs_done_cb, .user_data = a },
            0) < 0) {
        copier_fail(c, COPIER_ERROR_READ,
                    "%sblock status at %" G_GUINT64_FORMAT ": %s", what, pos,
                    nbd_get_error());
        return false;
    }
    return true;
}

/* The caller's ranges as a dirty context's extents over the window that
 * block status was asked for: (length, 1) inside a range, (length, 0)
 * outside. */
static void ranges_as_extents(Copier *c, SelectAsk *a)
{
    guint64 pos = a->pos;
    guint64 end = a->pos + a->len;
    const CopierRange *r = (const CopierRange *)c->opts.ranges->data;
    guint n = c->opts.ranges->len;

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
        g_array_append_vals(a->dirty, rs > pos ? e : e + 2, rs > pos ? 4 : 2);
        pos = re;
    }
    if (pos < end) {
        uint32_t e[2] = { (uint32_t)(end - pos), 0 };

        g_array_append_vals(a->dirty, e, 2);
    }
}

/* Ask A about the window [POS, POS + LEN): about the selection first, if
 * it has a question of its own (or none: the caller's ranges are known). */
static bool ask_window(SelectAsk *a, guint64 pos, guint64 len)
{
    Copier *c = a->copier;

    a->pos = a->alloc_pos = pos;
    a->len = len;
    g_array_set_size(a->alloc, 0);
    g_array_set_size(a->dirty, 0);
    if (c->opts.ranges) {
        ranges_as_extents(c, a);
        a->step = ASK_DIRTY;
        a->error = 0;
        a->done = true;
        return true;
    }
    if (c->map) {
        return ask_block_status(a, ASK_DIRTY, c->map, pos, len, "");
    }
    return ask_block_status(a, ASK_BOTH, c->src, pos, len, "");
}

/* Regions planned and not started: work queued, releases waiting. */
static guint64 planned_ahead(Copier *c)
{
    return chunk_queue_entries(c->queue) + g_queue_get_length(&c->releases);
}

void select_ask(Copier *c)
{
    while (!c->error && c->ask_count < SELECT_ASKS && c->ask_pos < c->size &&
           planned_ahead(c) < c->opts.plan_ahead) {
        SelectAsk *a = &c->asks[(c->ask_head + c->ask_count) % SELECT_ASKS];
        guint64 len = MIN(WINDOW_BYTES, c->size - c->ask_pos);

        if (!ask_window(a, c->ask_pos, len)) {
            return;
        }
        c->ask_pos += len;
        c->ask_count++;
    }
}

/* Regions that need no copy: released at once, in whole blocks only (a
 * partial block's other part may be copied). */
static void release_skipped(Copier *c, GArray *regions)
{
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

/* The sum of the lengths of EXTENTS, uint32 (length, flags) pairs. */
static guint64 extents_length(const GArray *extents)
{
    guint64 len = 0;

    for (guint i = 0; i < extents->len; i += 2) {
        len += g_array_index(extents, uint32_t, i);
    }
    return len;
}

/* What A's map says, from the window's start: how far it reaches within
 * the window (*COVERED), and its dirty span in whole blocks within the
 * window, [*FIRST, *LAST) (*FIRST >= *COVERED: nothing dirty). */
static void map_span(const SelectAsk *a, guint64 *covered, guint64 *first,
                     guint64 *last)
{
    const uint32_t *e = (const uint32_t *)a->dirty->data;
    guint64 at = 0;

    *first = G_MAXUINT64;
    *last = 0;
    for (guint i = 0; i < a->dirty->len; i += 2) {
        if (e[i + 1] & 1) {
            *first = MIN(*first, at);
            *last = at + e[i];
        }
        at += e[i];
    }
    *covered = MIN(at, a->len);
    if (*first < *covered) {
        /* whole blocks: the planner reads a dirty block whole */
        *first -= *first % COPIER_BLOCK_SIZE;
        *last = MIN(ALIGN_UP(*last), a->len);
    }
}

/* A's map is in (ASK_DIRTY): ask allocation from its first dirty block to
 * its last, and true; or false if nothing in it is dirty, ALLOC then
 * covering what the map did (it plans as skipped whatever it says). */
static bool ask_alloc(Copier *c, SelectAsk *a)
{
    guint64 covered, first, last;

    map_span(a, &covered, &first, &last);
    if (first >= covered) {
        uint32_t all[2] = { (uint32_t)covered, 0 };

        g_array_append_vals(a->alloc, all, 2);
        return false;
    }
    a->alloc_pos = a->pos + first;
    /* (fails the copier if it cannot be asked) */
    ask_block_status(a, ASK_ALLOC, c->src, a->alloc_pos, last - first, "");
    return true;
}

/* When the map was asked first: ALLOC starts at ALLOC_POS, after the
 * window's first clean blocks; make it start at POS (not dirty, so "data"
 * is as good as anything), and, if it covers the last dirty block, reach
 * as far as the map does. */
static void alloc_over_window(Copier *c, SelectAsk *a)
{
    guint64 alloc_end = a->alloc_pos + extents_length(a->alloc);
    guint64 covered, first, last, map_end;

    if (!c->map && !c->opts.ranges) {
        return; /* asked together: ALLOC is all there is */
    }
    map_span(a, &covered, &first, &last);
    map_end = a->pos + covered;
    last = first < covered ? a->pos + MIN(last, covered) : a->pos;
    if (a->alloc_pos > a->pos) {
        uint32_t head[2] = { (uint32_t)(a->alloc_pos - a->pos), 0 };

        g_array_prepend_vals(a->alloc, head, 2);
    }
    if (alloc_end >= last && alloc_end < map_end) {
        uint32_t tail[2] = { (uint32_t)(map_end - alloc_end), 0 };

        g_array_append_vals(a->alloc, tail, 2);
    }
    a->alloc_pos = a->pos;
}

/* Whether the allocation answer has a hole that is not zero. */
static bool has_unknown_hole(const GArray *alloc)
{
    for (guint i = 1; i < alloc->len; i += 2) {
        if (is_unknown_hole(g_array_index(alloc, uint32_t, i))) {
            return true;
        }
    }
    return false;
}

/* Ask the chain export about what A's allocation answer covered; false if
 * there is nothing to ask (or it failed: the copier failed then). */
static bool ask_chain(Copier *c, SelectAsk *a)
{
    if (!c->chain || !has_unknown_hole(a->alloc)) {
        return false;
    }
    g_array_set_size(a->depth, 0);
    /* (fails the copier if it cannot be asked) */
    ask_block_status(a, ASK_CHAIN, c->chain, a->alloc_pos,
                     extents_length(a->alloc), "chain ");
    return true;
}

/* A's chain answer in: where the chain has nothing, holes are zeros. */
static void apply_chain(SelectAsk *a)
{
    GArray *merged;

    if (a->depth->len == 0) {
        return; /* no answer: the holes stay unknown, and are read */
    }
    merged = plan_chain_zeros((uint32_t *)a->alloc->data, a->alloc->len / 2,
                              (uint32_t *)a->depth->data, a->depth->len / 2);
    g_array_unref(a->alloc);
    a->alloc = merged;
}

/* The answers to A's questions so far, in order: false if another
 * question went out (or the copier failed), true if all are in. */
static bool answers_in(Copier *c, SelectAsk *a)
{
    if (a->error || (a->step == ASK_DIRTY && a->dirty->len == 0) ||
        (a->step == ASK_BOTH && c->bitmap_context && a->dirty->len == 0) ||
        (a->step != ASK_DIRTY && a->step != ASK_CHAIN && a->alloc->len == 0)) {
        copier_fail(c, COPIER_ERROR_READ,
                    "block status at %" G_GUINT64_FORMAT " failed: %s", a->pos,
                    a->error ? g_strerror(a->error) : "no extents");
        return false;
    }
    switch (a->step) {
    case ASK_DIRTY:
        if (ask_alloc(c, a)) {
            return false;
        }
        break;
    case ASK_BOTH:
    case ASK_ALLOC:
        if (ask_chain(c, a)) {
            return false;
        }
        break;
    case ASK_CHAIN:
        apply_chain(a);
        break;
    }
    alloc_over_window(c, a);
    return !c->error;
}

/* Plan from the answers of A, the oldest window: false if they are not
 * all in yet (a second question went out) or the copier failed. */
static bool plan_window(Copier *c, SelectAsk *a)
{
    g_autoptr(GArray) regions = NULL;
    GQueue planned = G_QUEUE_INIT;
    Chunk *ch;
    guint64 end;
    gint64 t0 = g_get_monotonic_time();

    g_assert(a->pos == c->plan_pos);
    if (!answers_in(c, a)) {
        return false;
    }
    if (c->opts.depth_limit) {
        /* allocation depth -> dirty flag: written in the top layers */
        uint32_t *e = (uint32_t *)a->dirty->data;

        for (guint i = 1; i < a->dirty->len; i += 2) {
            e[i] = e[i] >= 1 && e[i] <= c->opts.depth_limit;
        }
    }
    /* never past the window: the next one is asked already (a server may
     * describe more than it was asked) */
    regions = plan_regions(
        a->pos, a->pos + a->len, (uint32_t *)a->alloc->data, a->alloc->len / 2,
        c->bitmap_context ? (uint32_t *)a->dirty->data : NULL,
        a->dirty->len / 2, &end);
    c->stats.bytes_skipped +=
        plan_chunks(regions, c->size, c->opts.chunk_size, &planned);
    while ((ch = g_queue_pop_head(&planned))) {
        chunk_queue_push(c->queue, ch->offset, ch->length, ch->zero);
        g_free(ch);
    }
    if (c->opts.release) {
        release_skipped(c, regions);
    }
    c->plan_pos = end;
    c->stats.extents += regions->len;
    c->stats.planned_max = MAX(c->stats.planned_max, planned_ahead(c));
    c->last_activity_us = g_get_monotonic_time();
    c->stats.plan_seconds += (c->last_activity_us - t0) / 1e6;
    return true;
}

void select_plan(Copier *c)
{
    while (!c->error && c->ask_count > 0) {
        SelectAsk *a = &c->asks[c->ask_head];
        guint64 window_end = a->pos + a->len;

        if (!a->done || !plan_window(c, a)) {
            return;
        }
        if (c->plan_pos < window_end) {
            /* a short answer: ask again about the rest of the window, in
             * the same place of the ring (windows are planned in order) */
            ask_window(a, c->plan_pos, window_end - c->plan_pos);
            return;
        }
        c->ask_head = (c->ask_head + 1) % SELECT_ASKS;
        c->ask_count--;
    }
}
