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

bool select_init(Copier *c, const char **contexts, GError **error)
{
    const CopierOptions *o = &c->opts;

    contexts[0] = "base:allocation";
    contexts[1] = contexts[2] = NULL;
    if (!!o->bitmap + !!o->depth_limit + !!o->ranges > 1) {
        g_set_error(error, COPIER_ERROR, COPIER_ERROR_OPTIONS,
                    "copy by a bitmap, by allocation depth or by ranges: "
                    "one of them");
        return false;
    }
    if (o->bitmap) {
        c->bitmap_context = g_strconcat("qemu:dirty-bitmap:", o->bitmap, NULL);
        contexts[1] = c->bitmap_context;
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
    const char *bitmap = a->copier->bitmap_context;
    GArray *into =
        a->chain_asked
            ? (strcmp(context, "qemu:allocation-depth") == 0 ? a->depth : NULL)
        : strcmp(context, "base:allocation") == 0 ? a->alloc
        : bitmap && strcmp(context, bitmap) == 0  ? a->dirty
                                                  : NULL;

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
    return 1;
}

/* Ask NBD for the block status of LEN bytes from A's start, the answer
 * going where extent_cb puts it; WHAT names it in an error. */
static bool ask_block_status(SelectAsk *a, struct nbd_handle *nbd, guint64 len,
                             const char *what)
{
    Copier *c = a->copier;

    a->done = false;
    a->error = 0;
    a->asked_us = g_get_monotonic_time();
    c->stats.block_status_calls++;
    if (nbd_aio_block_status(
            nbd, len, a->pos,
            (nbd_extent_callback){ .callback = extent_cb, .user_data = a },
            (nbd_completion_callback){ .callback = bs_done_cb, .user_data = a },
            0) < 0) {
        copier_fail(c, COPIER_ERROR_READ,
                    "%sblock status at %" G_GUINT64_FORMAT ": %s", what, a->pos,
                    nbd_get_error());
        return false;
    }
    return true;
}

/* Ask A about the window [POS, POS + LEN). */
static bool ask_window(SelectAsk *a, guint64 pos, guint64 len)
{
    a->pos = pos;
    a->len = len;
    a->chain_asked = false;
    g_array_set_size(a->alloc, 0);
    g_array_set_size(a->dirty, 0);
    return ask_block_status(a, a->copier->src, len, "");
}

void select_ask(Copier *c)
{
    while (!c->error && c->ask_count < SELECT_ASKS && c->ask_pos < c->size) {
        SelectAsk *a = &c->asks[(c->ask_head + c->ask_count) % SELECT_ASKS];
        guint64 len = MIN(WINDOW_BYTES, c->size - c->ask_pos);

        if (!ask_window(a, c->ask_pos, len)) {
            return;
        }
        c->ask_pos += len;
        c->ask_count++;
    }
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

    g_array_set_size(a->dirty, 0);
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

/* Whether the first answer has a hole that is not zero. */
static bool has_unknown_hole(const GArray *alloc)
{
    for (guint i = 1; i < alloc->len; i += 2) {
        if (is_unknown_hole(g_array_index(alloc, uint32_t, i))) {
            return true;
        }
    }
    return false;
}

/* Ask the chain export about what A's first answer covered; false if
 * there is nothing to ask (or it failed: the copier failed then). */
static bool ask_chain(Copier *c, SelectAsk *a)
{
    guint64 len = 0;

    if (!c->chain || !has_unknown_hole(a->alloc)) {
        return false;
    }
    for (guint i = 0; i < a->alloc->len; i += 2) {
        len += g_array_index(a->alloc, uint32_t, i);
    }
    g_array_set_size(a->depth, 0);
    a->chain_asked = true;
    ask_block_status(a, c->chain, len, "chain "); /* fails the copier if not */
    return true;
}

/* A's second answer in: where the chain has nothing, holes are zeros. */
static void apply_chain(SelectAsk *a)
{
    GArray *merged;

    a->chain_asked = false;
    if (a->depth->len == 0) {
        return; /* no answer: the holes stay unknown, and are read */
    }
    merged = plan_chain_zeros((uint32_t *)a->alloc->data, a->alloc->len / 2,
                              (uint32_t *)a->depth->data, a->depth->len / 2);
    g_array_unref(a->alloc);
    a->alloc = merged;
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
    c->stats.block_status_seconds += (t0 - a->asked_us) / 1e6;
    if (c->opts.ranges) {
        ranges_as_extents(c, a);
    }
    if (a->error || a->alloc->len == 0 ||
        (c->bitmap_context && a->dirty->len == 0)) {
        copier_fail(c, COPIER_ERROR_READ,
                    "block status at %" G_GUINT64_FORMAT " failed: %s", a->pos,
                    a->error ? g_strerror(a->error) : "no extents");
        return false;
    }
    if (a->chain_asked) {
        apply_chain(a);
    } else if (ask_chain(c, a)) {
        return false; /* planned when the second answer is in */
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
