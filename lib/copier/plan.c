/*
 * Planning: from NBD block status to block-aligned chunks of work.
 *
 * Alignment matters twice: digests are per COPIER_BLOCK_SIZE block, so a
 * chunk must hold whole blocks; and a region written as zeros must never
 * cover a block that also holds data. Data is widened, zeros narrowed.
 */
#include "internal.h"

#define ALIGN_DOWN(x) ((x) / COPIER_BLOCK_SIZE * COPIER_BLOCK_SIZE)
#define ALIGN_UP(x)   ALIGN_DOWN((x) + COPIER_BLOCK_SIZE - 1)

static void add_region(GArray *regions, guint64 offset, guint64 length,
                       RegionKind kind)
{
    Region *last =
        regions->len ? &g_array_index(regions, Region, regions->len - 1) : NULL;

    if (length == 0) {
        return;
    }
    if (last && last->kind == kind && last->offset + last->length == offset) {
        last->length += length;
        return;
    }
    g_array_append_val(regions, ((Region){ offset, length, kind }));
}

GArray *plan_regions(guint64 start, guint64 size, const uint32_t *alloc,
                     size_t n_alloc, const uint32_t *dirty, size_t n_dirty,
                     guint64 *end)
{
    GArray *regions = g_array_new(FALSE, FALSE, sizeof(Region));
    guint64 alloc_end = start, dirty_end = start, stop;
    guint64 pos = start;
    size_t ia = 0, id = 0;
    guint64 a_left, d_left;

    for (size_t i = 0; i < n_alloc; i++) {
        alloc_end += alloc[2 * i];
    }
    for (size_t i = 0; i < n_dirty; i++) {
        dirty_end += dirty[2 * i];
    }
    stop = MIN(alloc_end, size);
    if (dirty) {
        stop = MIN(stop, dirty_end);
    }
    /* Block aligned, unless at the disk's end; and never less than one
     * block (a server may answer short: then that block is read whole). */
    if (stop < size) {
        stop = ALIGN_DOWN(stop);
    }
    if (stop <= start) {
        stop = MIN(start + COPIER_BLOCK_SIZE, size);
        add_region(regions, start, stop - start, REGION_DATA);
        *end = stop;
        return regions;
    }

    a_left = n_alloc ? alloc[0] : 0;
    d_left = n_dirty ? dirty[0] : 0;
    while (pos < stop) {
        guint64 step = stop - pos;
        bool is_zero = ia < n_alloc && (alloc[2 * ia + 1] & LIBNBD_STATE_ZERO);
        bool is_dirty = !dirty || (id < n_dirty && (dirty[2 * id + 1] & 1));
        RegionKind kind;

        step = MIN(step, a_left);
        if (dirty) {
            step = MIN(step, d_left);
        }
        kind = !is_dirty ? REGION_SKIP : is_zero ? REGION_ZERO : REGION_DATA;
        add_region(regions, pos, step, kind);
        pos += step;
        a_left -= step;
        if (a_left == 0 && ++ia < n_alloc) {
            a_left = alloc[2 * ia];
        }
        if (dirty) {
            d_left -= step;
            if (d_left == 0 && ++id < n_dirty) {
                d_left = dirty[2 * id];
            }
        }
    }
    *end = stop;
    return regions;
}

static void add_chunks(GQueue *chunks, guint64 offset, guint64 end,
                       guint64 chunk_size, bool zero)
{
    /* Zeros cost no data transfer: allow larger pieces. */
    guint64 max = zero ? COPIER_ZERO_CHUNK_MAX : chunk_size;

    while (offset < end) {
        Chunk *c = g_new(Chunk, 1);

        c->offset = offset;
        c->length = MIN(max, end - offset);
        c->zero = zero;
        g_queue_push_tail(chunks, c);
        offset += c->length;
    }
}

guint64 plan_chunks(GArray *regions, guint64 size, guint64 chunk_size,
                    GQueue *chunks)
{
    guint64 skipped = 0;

    g_assert(chunk_size % COPIER_BLOCK_SIZE == 0);
    for (guint i = 0; i < regions->len; i++) {
        const Region *r = &g_array_index(regions, Region, i);
        guint64 s = r->offset, e = r->offset + r->length;
        guint64 inner_s = MIN(ALIGN_UP(s), size);
        guint64 inner_e = e == size ? e : ALIGN_DOWN(e);

        switch (r->kind) {
        case REGION_SKIP:
            skipped += r->length;
            break;
        case REGION_DATA:
            add_chunks(chunks, ALIGN_DOWN(s), MIN(ALIGN_UP(e), size),
                       chunk_size, false);
            break;
        case REGION_ZERO:
            if (inner_s >= inner_e) {
                /* No whole block: read it, it may share a block with data */
                add_chunks(chunks, ALIGN_DOWN(s), MIN(ALIGN_UP(e), size),
                           chunk_size, false);
                break;
            }
            add_chunks(chunks, ALIGN_DOWN(s), inner_s, chunk_size, false);
            add_chunks(chunks, inner_s, inner_e, chunk_size, true);
            add_chunks(chunks, inner_e, MIN(ALIGN_UP(e), size), chunk_size,
                       false);
            break;
        }
    }
    return skipped;
}

bool is_unknown_hole(uint32_t flags)
{
    return (flags & (LIBNBD_STATE_HOLE | LIBNBD_STATE_ZERO)) ==
           LIBNBD_STATE_HOLE;
}

GArray *plan_chain_zeros(const uint32_t *alloc, size_t n, const uint32_t *depth,
                         size_t nd)
{
    GArray *out = g_array_new(FALSE, FALSE, sizeof(uint32_t));
    guint64 pos = 0, dpos = 0; /* from START, in ALLOC and in DEPTH */
    size_t j = 0;

    for (size_t i = 0; i < n; i++) {
        guint64 end = pos + alloc[2 * i];
        uint32_t flags = alloc[2 * i + 1];

        while (pos < end) {
            guint64 piece = end - pos;
            uint32_t f = flags;

            /* the depth extent that holds POS, if DEPTH reaches it */
            while (j < nd && dpos + depth[2 * j] <= pos) {
                dpos += depth[2 * j];
                j++;
            }
            if (j < nd) {
                piece = MIN(piece, dpos + depth[2 * j] - pos);
                if (is_unknown_hole(flags) && depth[2 * j + 1] == 0) {
                    f = LIBNBD_STATE_HOLE | LIBNBD_STATE_ZERO;
                }
            }
            if (out->len >= 2 &&
                g_array_index(out, uint32_t, out->len - 1) == f) {
                g_array_index(out, uint32_t, out->len - 2) += (uint32_t)piece;
            } else {
                uint32_t e[2] = { (uint32_t)piece, f };

                g_array_append_vals(out, e, 2);
            }
            pos += piece;
        }
    }
    return out;
}
