/*
 * Guest-write notices: the notice export's map ("base:allocation" of a
 * scratch image: allocated = written; "qemu:allocation-depth" of a
 * scheme-A fleecing export: depth 1 = written) is swept every notice_ms,
 * and what the guest wrote since the point in time is copied next, then
 * its neighbourhood (guests write with locality).
 */
#include <string.h>

#include "internal.h"

/* NBD lengths are 32-bit: up to 4 GiB less a block per call */
#define NOTICE_BYTES ((G_GUINT64_CONSTANT(1) << 32) - COPIER_BLOCK_SIZE)

bool notices_connect(Copier *c, GSourceFunc pump, GError **error)
{
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
    if (nbd_get_size(c->notice) != (int64_t)c->size) {
        g_set_error(error, COPIER_ERROR, COPIER_ERROR_CONNECT,
                    "the notice export's size is not the source's");
        return false;
    }
    c->notice_depth =
        strcmp(c->opts.notice_context, "qemu:allocation-depth") == 0;
    c->notice_extents = g_array_new(FALSE, FALSE, sizeof(uint32_t));
    return true;
}

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
        copier_fail(c, COPIER_ERROR_READ,
                    "notice map at %" G_GUINT64_FORMAT ": %s", c->notice_pos,
                    nbd_get_error());
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
    copier_trace(c, "notice %" G_GUINT64_FORMAT " %" G_GUINT64_FORMAT, offset,
                 length);
}

/* What the guest wrote goes next, then its neighbourhood. */
static void finish_notice(Copier *c)
{
    const uint32_t *e = (const uint32_t *)c->notice_extents->data;
    guint64 pos = c->notice_pos;

    c->notice_in_flight = false;
    if (c->notice_error || c->notice_extents->len == 0) {
        copier_fail(
            c, COPIER_ERROR_READ,
            "the notice map at %" G_GUINT64_FORMAT " failed: %s", c->notice_pos,
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

void notices_step(Copier *c)
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
