/*
 * The work queue: what is left to copy, as block-aligned ranges in offset
 * order, some of them "hot". A hot range goes before every cold one; among
 * hot ranges the higher level goes first, then the newer bump, then the
 * lower offset. Cold ranges go in offset order, which is what a disk reads
 * fastest.
 *
 * Ranges are stored as they were planned (one entry per extent, not per
 * chunk) and cut into chunks as they are taken, so memory follows the
 * number of extents and bumps, never the disk's size. Two GSequences hold
 * the same entries: one by offset (to find what a bump covers) and one by
 * priority (to find what goes next); both are O(log n).
 */
#include "internal.h"

typedef struct {
    guint64 offset;
    guint64 length;
    bool zero;
    guint level; /* 0: cold */
    guint64 seq; /* of the bump that made it hot */
    GSequenceIter *by_offset;
    GSequenceIter *by_heat; /* NULL while cold */
} Work;

struct ChunkQueue {
    GSequence *by_offset; /* Work*, owns them */
    GSequence *by_heat;   /* hot Work* only */
    guint64 chunk_size;
    guint64 bytes; /* pending, in all entries */
    guint64 seq;   /* bumps so far */
    guint64 end;   /* of the last range pushed */
};

static gint cmp_offset(gconstpointer a, gconstpointer b, gpointer unused)
{
    const Work *x = a, *y = b;

    return x->offset < y->offset ? -1 : x->offset > y->offset;
}

/* Hotter first: level, then newer, then lower offset. */
static gint cmp_heat(gconstpointer a, gconstpointer b, gpointer unused)
{
    const Work *x = a, *y = b;

    if (x->level != y->level) {
        return x->level > y->level ? -1 : 1;
    }
    if (x->seq != y->seq) {
        return x->seq > y->seq ? -1 : 1;
    }
    return cmp_offset(a, b, NULL);
}

ChunkQueue *chunk_queue_new(guint64 chunk_size)
{
    ChunkQueue *q = g_new0(ChunkQueue, 1);

    g_assert(chunk_size > 0 && chunk_size % COPIER_BLOCK_SIZE == 0);
    q->by_offset = g_sequence_new(g_free);
    q->by_heat = g_sequence_new(NULL);
    q->chunk_size = chunk_size;
    return q;
}

void chunk_queue_free(ChunkQueue *q)
{
    if (!q) {
        return;
    }
    g_sequence_free(q->by_heat);
    g_sequence_free(q->by_offset);
    g_free(q);
}

guint64 chunk_queue_bytes(const ChunkQueue *q)
{
    return q->bytes;
}

bool chunk_queue_is_empty(const ChunkQueue *q)
{
    return q->bytes == 0;
}

bool chunk_queue_next_is_hot(const ChunkQueue *q)
{
    return !g_sequence_is_empty(q->by_heat);
}

guint chunk_queue_entries(const ChunkQueue *q)
{
    return g_sequence_get_length(q->by_offset);
}

void chunk_queue_push(ChunkQueue *q, guint64 offset, guint64 length, bool zero)
{
    GSequenceIter *last;
    Work *w;

    /* Planning widens data to whole blocks, so a range may start inside
     * the previous one: keep only what is new. */
    if (offset < q->end) {
        guint64 cut = MIN(q->end - offset, length);

        offset += cut;
        length -= cut;
    }
    if (length == 0) {
        return;
    }
    q->end = offset + length;
    q->bytes += length;
    last = g_sequence_get_end_iter(q->by_offset);
    if (!g_sequence_iter_is_begin(last)) {
        w = g_sequence_get(g_sequence_iter_prev(last));
        if (w->level == 0 && w->zero == zero &&
            w->offset + w->length == offset) {
            w->length += length;
            return;
        }
    }
    w = g_new0(Work, 1);
    w->offset = offset;
    w->length = length;
    w->zero = zero;
    w->by_offset = g_sequence_append(q->by_offset, w);
}

static void remove_work(ChunkQueue *q, Work *w)
{
    if (w->by_heat) {
        g_sequence_remove(w->by_heat);
    }
    g_sequence_remove(w->by_offset); /* frees W */
}

bool chunk_queue_pop(ChunkQueue *q, Chunk *out)
{
    GSequenceIter *it = g_sequence_get_begin_iter(q->by_heat);
    Work *w;

    if (g_sequence_iter_is_end(it)) {
        it = g_sequence_get_begin_iter(q->by_offset);
        if (g_sequence_iter_is_end(it)) {
            return false;
        }
    }
    w = g_sequence_get(it);
    /* Zeros move no data: larger pieces (COPIER_ZERO_CHUNK_MAX). */
    out->offset = w->offset;
    out->length =
        MIN(w->length, w->zero ? COPIER_ZERO_CHUNK_MAX : q->chunk_size);
    out->zero = w->zero;
    q->bytes -= out->length;
    if (out->length == w->length) {
        remove_work(q, w);
    } else {
        /* Both orders stay valid: W keeps its place among its peers. */
        w->offset += out->length;
        w->length -= out->length;
    }
    return true;
}

/* Split W at POS (inside it): W keeps [offset, POS), the new entry gets
 * [POS, end) with W's kind and heat. Returns the new entry. */
static Work *split(ChunkQueue *q, Work *w, guint64 pos)
{
    Work *n = g_new0(Work, 1);

    g_assert(pos > w->offset && pos < w->offset + w->length);
    *n = *w;
    n->offset = pos;
    n->length = w->offset + w->length - pos;
    w->length = pos - w->offset;
    n->by_offset =
        g_sequence_insert_before(g_sequence_iter_next(w->by_offset), n);
    n->by_heat = w->by_heat
                     ? g_sequence_insert_sorted(q->by_heat, n, cmp_heat, NULL)
                     : NULL;
    return n;
}

/* The first entry that ends after OFFSET, or NULL. */
static Work *first_after(ChunkQueue *q, guint64 offset)
{
    Work key = { .offset = offset };
    GSequenceIter *it = g_sequence_search(q->by_offset, &key, cmp_offset, NULL);
    Work *w;

    /* IT is the first entry starting after OFFSET; the one before may
     * still cover it. */
    if (!g_sequence_iter_is_begin(it)) {
        w = g_sequence_get(g_sequence_iter_prev(it));
        if (w->offset + w->length > offset) {
            return w;
        }
    }
    return g_sequence_iter_is_end(it) ? NULL : g_sequence_get(it);
}

guint64 chunk_queue_bump(ChunkQueue *q, guint64 offset, guint64 length,
                         guint level)
{
    guint64 end, bumped = 0;
    Work *w;

    g_assert(level > 0);
    if (length == 0 || q->bytes == 0) {
        return 0;
    }
    /* Whole blocks, so that chunks stay aligned. */
    end = offset + length;
    offset -= offset % COPIER_BLOCK_SIZE;
    if (end % COPIER_BLOCK_SIZE) {
        end += COPIER_BLOCK_SIZE - end % COPIER_BLOCK_SIZE;
    }
    q->seq++;
    for (w = first_after(q, offset); w && w->offset < end;) {
        GSequenceIter *next;

        if (w->level >= level) {
            /* Already as hot: leave its place as it is. */
            next = g_sequence_iter_next(w->by_offset);
            w = g_sequence_iter_is_end(next) ? NULL : g_sequence_get(next);
            continue;
        }
        if (w->offset < offset) {
            w = split(q, w, offset);
        }
        if (w->offset + w->length > end) {
            split(q, w, end);
        }
        if (w->by_heat) {
            g_sequence_remove(w->by_heat);
        }
        w->level = level;
        w->seq = q->seq;
        w->by_heat = g_sequence_insert_sorted(q->by_heat, w, cmp_heat, NULL);
        bumped += w->length;
        next = g_sequence_iter_next(w->by_offset);
        w = g_sequence_iter_is_end(next) ? NULL : g_sequence_get(next);
    }
    return bumped;
}

guint64 notice_apply(ChunkQueue *q, guint64 pos, guint64 size,
                     const uint32_t *entries, size_t n, bool depth,
                     guint64 radius, NoticeFn fn, void *opaque)
{
    for (size_t i = 0; i + 1 < n && pos < size; i += 2) {
        guint64 len = MIN(entries[i], size - pos);
        /* depth 1: in the scratch image itself; 0 or 2+: not written */
        bool written =
            depth ? entries[i + 1] == 1 : !(entries[i + 1] & LIBNBD_STATE_HOLE);

        if (written) {
            guint64 lo = pos > radius ? pos - radius : 0;
            guint64 hi = MIN(pos + len + radius, size);
            guint64 hot = chunk_queue_bump(q, pos, len, 2);

            hot += chunk_queue_bump(q, lo, hi - lo, 1);
            if (hot && fn) {
                fn(pos, len, hot, opaque);
            }
        }
        pos += len;
    }
    return pos;
}
