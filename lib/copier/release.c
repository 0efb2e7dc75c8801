/*
 * Release: trim what is in the target (and what needs no copy) on the
 * source, so that QEMU can forget it: on a snapshot-access export this
 * frees the scratch image's space and ends copy-before-write there. A
 * released region can never be read again, so planning comes first.
 */
#include "internal.h"

#define MAX_RELEASES     64         /* trims in flight at once */
#define RELEASE_GATHER   (16 << 20) /* bytes per trim, at most */
#define RELEASE_DELAY_US (5 * 1000) /* a gathered trim waits no longer */

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
    copier_trace(c, "release %" G_GUINT64_FORMAT " %" G_GUINT64_FORMAT, offset,
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
void release_range(Copier *c, guint64 offset, guint64 length)
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

void release_step(Copier *c, gint64 now)
{
    /* what planning found needs no copy, a few at a time */
    while (c->releases_in_flight < MAX_RELEASES) {
        Chunk *r = g_queue_pop_head(&c->releases);

        if (!r) {
            break;
        }
        send_release(c, r->offset, r->length);
        g_free(r);
    }
    if (c->rel_length && (now - c->rel_since_us >= RELEASE_DELAY_US ||
                          (chunk_queue_is_empty(c->queue) && c->active == 0))) {
        flush_release(c);
    }
}

bool release_idle(Copier *c)
{
    return g_queue_is_empty(&c->releases) && c->rel_length == 0 &&
           c->releases_in_flight == 0;
}
