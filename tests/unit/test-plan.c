/*
 * lib/copier's planner: NBD extents -> regions -> block-aligned chunks.
 * The property that matters: every dirty byte lands in some chunk, no
 * zero chunk covers a block that holds dirty data, and chunks are whole
 * blocks except at the disk's end.
 */
#include <libnbd.h>

#include "../../lib/copier/internal.h"

#define B     COPIER_BLOCK_SIZE
#define DIRTY 1

static GQueue plan(guint64 start, guint64 size, const uint32_t *alloc,
                   size_t na, const uint32_t *dirty, size_t nd, guint64 chunk,
                   guint64 *end, guint64 *skipped)
{
    GQueue chunks = G_QUEUE_INIT;
    g_autoptr(GArray) regions =
        plan_regions(start, size, alloc, na, dirty, nd, end);

    *skipped = plan_chunks(regions, size, chunk, &chunks);
    return chunks;
}

/* Which chunk kind covers byte OFF: 0 none, 1 data, 2 zero. */
static int covered(GQueue *chunks, guint64 off)
{
    int kind = 0;

    for (GList *l = chunks->head; l; l = l->next) {
        Chunk *c = l->data;

        if (off >= c->offset && off < c->offset + c->length) {
            kind |= c->zero ? 2 : 1;
        }
    }
    return kind;
}

static void check_aligned(GQueue *chunks, guint64 size, guint64 chunk_size)
{
    for (GList *l = chunks->head; l; l = l->next) {
        Chunk *c = l->data;

        g_assert_cmpuint(c->offset % B, ==, 0);
        g_assert_true((c->offset + c->length) % B == 0 ||
                      c->offset + c->length == size);
        if (!c->zero) {
            g_assert_cmpuint(c->length, <=, chunk_size);
        }
    }
}

static void test_full_copy(void)
{
    /* 1 MiB data, 2 MiB hole, 1 MiB zero-allocated, to 4 MiB */
    uint32_t alloc[] = { 1 << 20, 0,
                         2 << 20, LIBNBD_STATE_HOLE | LIBNBD_STATE_ZERO,
                         1 << 20, LIBNBD_STATE_ZERO };
    guint64 end, skipped;
    GQueue q = plan(0, 4 << 20, alloc, 3, NULL, 0, 256 * 1024, &end, &skipped);

    g_assert_cmpuint(end, ==, 4 << 20);
    g_assert_cmpuint(skipped, ==, 0);
    g_assert_cmpint(covered(&q, 0), ==, 1);
    g_assert_cmpint(covered(&q, (1 << 20) - 1), ==, 1);
    g_assert_cmpint(covered(&q, 1 << 20), ==, 2);
    g_assert_cmpint(covered(&q, (4 << 20) - 1), ==, 2);  /* merged zeros */
    g_assert_cmpuint(g_queue_get_length(&q), ==, 4 + 1); /* 4 data, 1 zero */
    check_aligned(&q, 4 << 20, 256 * 1024);
    g_queue_clear_full(&q, g_free);
}

static void test_dirty_only(void)
{
    /* all data; dirty: [64K,128K) and [1M, 1M+4K) (4K granularity) */
    uint32_t alloc[] = { 2 << 20, 0 };
    uint32_t dirty[] = {
        B, 0, B, DIRTY, (1 << 20) - 2 * B, 0, 4096, DIRTY, (1 << 20) - 4096, 0
    };
    guint64 end, skipped;
    GQueue q = plan(0, 2 << 20, alloc, 1, dirty, 5, 1 << 20, &end, &skipped);

    g_assert_cmpuint(end, ==, 2 << 20);
    g_assert_cmpint(covered(&q, 0), ==, 0);
    g_assert_cmpint(covered(&q, B), ==, 1);
    g_assert_cmpint(covered(&q, 1 << 20), ==, 1);
    g_assert_cmpint(covered(&q, (1 << 20) + B - 1), ==, 1); /* widened */
    g_assert_cmpint(covered(&q, (1 << 20) + B), ==, 0);
    g_assert_cmpuint(skipped, ==, (2 << 20) - B - 4096);
    check_aligned(&q, 2 << 20, 1 << 20);
    g_queue_clear_full(&q, g_free);
}

static void test_zero_edges_become_data(void)
{
    /* a dirty zero region [32K, 200K): its partial blocks are read, the
     * whole blocks [64K, 192K) are zeroed */
    uint32_t alloc[] = {
        32768, 0, 200 * 1024 - 32768, LIBNBD_STATE_ZERO, (256 - 200) * 1024, 0
    };
    guint64 end, skipped;
    GQueue q = plan(0, 256 * 1024, alloc, 3, NULL, 0, B, &end, &skipped);

    g_assert_cmpint(covered(&q, 0), ==, 1);
    g_assert_cmpint(covered(&q, 40000), ==, 1);
    g_assert_cmpint(covered(&q, B), ==, 2);
    g_assert_cmpint(covered(&q, 3 * B - 1), ==, 2);
    g_assert_cmpint(covered(&q, 3 * B), ==, 1);
    check_aligned(&q, 256 * 1024, B);
    g_queue_clear_full(&q, g_free);
}

static void test_small_zero_is_read(void)
{
    /* a zero run smaller than a block must not zero its block */
    uint32_t alloc[] = { 4096, 0, 8192, LIBNBD_STATE_ZERO, B - 12288, 0 };
    guint64 end, skipped;
    GQueue q = plan(0, B, alloc, 3, NULL, 0, B, &end, &skipped);

    for (guint64 off = 0; off < B; off += 4096) {
        g_assert_cmpint(covered(&q, off) & 2, ==, 0);
        g_assert_cmpint(covered(&q, off), ==, 1);
    }
    g_queue_clear_full(&q, g_free);
}

static void test_short_answer(void)
{
    /* the server answered for less than a block: that block is read */
    uint32_t alloc[] = { 4096, 0 };
    uint32_t dirty[] = { 1 << 20, 0 };
    guint64 end, skipped;
    GQueue q = plan(B, 1 << 20, alloc, 1, dirty, 1, B, &end, &skipped);

    g_assert_cmpuint(end, ==, 2 * B);
    g_assert_cmpint(covered(&q, B), ==, 1);
    g_queue_clear_full(&q, g_free);

    /* contexts disagree on length: stop where both answered, aligned */
    uint32_t alloc2[] = { 3 * B + 100, 0 };
    uint32_t dirty2[] = { 10 * B, DIRTY };
    q = plan(0, 1 << 20, alloc2, 1, dirty2, 1, B, &end, &skipped);
    g_assert_cmpuint(end, ==, 3 * B);
    g_queue_clear_full(&q, g_free);
}

static void test_disk_end_unaligned(void)
{
    guint64 size = 3 * B + 512;
    uint32_t alloc[] = { size, 0 };
    guint64 end, skipped;
    GQueue q = plan(0, size, alloc, 1, NULL, 0, 2 * B, &end, &skipped);
    Chunk *last = g_queue_peek_tail(&q);

    g_assert_cmpuint(end, ==, size);
    g_assert_cmpuint(last->offset + last->length, ==, size);
    check_aligned(&q, size, 2 * B);
    g_queue_clear_full(&q, g_free);
}

/* Random extents of SIZE bytes into EXTENTS (length, flags pairs), each
 * with FLAG or not; IS[s] tells whether 512-byte sector s has it. */
static void random_extents(GRand *rand, guint64 size, uint32_t flag,
                           GArray *extents, guint8 *is)
{
    for (guint64 pos = 0; pos < size;) {
        guint64 want = g_rand_int_range(rand, 1, 40) * 512;
        uint32_t len = MIN(size - pos, want); /* MIN evaluates twice */
        uint32_t fl = g_rand_boolean(rand) ? flag : 0;

        g_array_append_val(extents, len);
        g_array_append_val(extents, fl);
        for (guint64 s = pos / 512; s < (pos + len) / 512; s++) {
            is[s] = fl != 0;
        }
        pos += len;
    }
}

/* Random extents: every dirty byte is covered by data, or by zero only
 * where the source reads zero across whole blocks. */
static void test_random_property(void)
{
    GRand *rand = g_rand_new_with_seed(42);

    for (int iter = 0; iter < 200; iter++) {
        guint64 size = (g_rand_int_range(rand, 1, 64) * 4096);
        g_autoptr(GArray) alloc = g_array_new(FALSE, FALSE, 4);
        g_autoptr(GArray) dirty = g_array_new(FALSE, FALSE, 4);
        g_autofree guint8 *isdirty = g_malloc0(size / 512);
        g_autofree guint8 *iszero = g_malloc0(size / 512);
        guint64 end, skipped, start = 0;
        GQueue all = G_QUEUE_INIT;

        random_extents(rand, size, LIBNBD_STATE_ZERO, alloc, iszero);
        random_extents(rand, size, DIRTY, dirty, isdirty);
        /* Plan windows as the copier does: each from where the last ended,
         * with the extents clipped to the window. */
        while (start < size) {
            g_autoptr(GArray) a = g_array_new(FALSE, FALSE, 4);
            g_autoptr(GArray) d = g_array_new(FALSE, FALSE, 4);
            GQueue q;

            for (int k = 0; k < 2; k++) {
                GArray *src = k ? dirty : alloc, *dst = k ? d : a;
                guint64 p = 0;

                for (guint i = 0; i < src->len; i += 2) {
                    guint64 e0 = p, e1 = p + g_array_index(src, uint32_t, i);
                    uint32_t len;

                    p = e1;
                    if (e1 <= start) {
                        continue;
                    }
                    len = e1 - MAX(e0, start);
                    g_array_append_val(dst, len);
                    g_array_append_val(dst,
                                       g_array_index(src, uint32_t, i + 1));
                }
            }
            q = plan(start, size, (uint32_t *)a->data, a->len / 2,
                     (uint32_t *)d->data, d->len / 2, 2 * B, &end, &skipped);
            g_assert_cmpuint(end, >, start);
            check_aligned(&q, size, 2 * B);
            while (!g_queue_is_empty(&q)) {
                g_queue_push_tail(&all, g_queue_pop_head(&q));
            }
            start = end;
        }
        for (guint64 s = 0; s < size / 512; s++) {
            int kind = covered(&all, s * 512);

            if (isdirty[s]) {
                g_assert_cmpint(kind, !=, 0);
            }
            if (kind & 2) {
                g_assert_true(iszero[s]); /* zeroing only what reads zero */
            }
        }
        g_queue_clear_full(&all, g_free);
    }
    g_rand_free(rand);
}

/* Unknown holes (hole, not zero) become zeros where the chain has nothing
 * (depth 0), and only there; data, known zeros, and what the depth answer
 * does not reach keep their flags; equal neighbours merge. */
static void test_chain_zeros(void)
{
    /* alloc: data 4B | hole 8B | hole+zero 2B | hole 6B */
    const uint32_t alloc[] = { 4 * B, 0,
                               8 * B, LIBNBD_STATE_HOLE,
                               2 * B, LIBNBD_STATE_HOLE | LIBNBD_STATE_ZERO,
                               6 * B, LIBNBD_STATE_HOLE };
    /* depth: 0 over 6B, 2 (backing) over 3B, 0 over 7B; stops at 16B */
    const uint32_t depth[] = { 6 * B, 0, 3 * B, 2, 7 * B, 0 };
    const uint32_t want[] = {
        4 * B,
        0, /* data stays */
        2 * B,
        LIBNBD_STATE_HOLE | LIBNBD_STATE_ZERO, /* depth 0 */
        3 * B,
        LIBNBD_STATE_HOLE, /* the backing holds data */
        7 * B,
        LIBNBD_STATE_HOLE | LIBNBD_STATE_ZERO, /* 3B hole + 2B zero + 2B */
        4 * B,
        LIBNBD_STATE_HOLE, /* beyond the depth answer */
    };
    g_autoptr(GArray) out = plan_chain_zeros(alloc, G_N_ELEMENTS(alloc) / 2,
                                             depth, G_N_ELEMENTS(depth) / 2);

    g_assert_cmpuint(out->len, ==, G_N_ELEMENTS(want));
    for (guint i = 0; i < out->len; i++) {
        g_assert_cmpuint(g_array_index(out, uint32_t, i), ==, want[i]);
    }
    /* no depth answer: unchanged */
    g_array_unref(g_steal_pointer(&out));
    out = plan_chain_zeros(alloc, G_N_ELEMENTS(alloc) / 2, NULL, 0);
    g_assert_cmpuint(out->len, ==, G_N_ELEMENTS(alloc));
    for (guint i = 0; i < out->len; i++) {
        g_assert_cmpuint(g_array_index(out, uint32_t, i), ==, alloc[i]);
    }
}

int main(int argc, char **argv)
{
    g_test_init(&argc, &argv, NULL);
    g_test_add_func("/plan/full-copy", test_full_copy);
    g_test_add_func("/plan/chain-zeros", test_chain_zeros);
    g_test_add_func("/plan/dirty-only", test_dirty_only);
    g_test_add_func("/plan/zero-edges-become-data",
                    test_zero_edges_become_data);
    g_test_add_func("/plan/small-zero-is-read", test_small_zero_is_read);
    g_test_add_func("/plan/short-answer", test_short_answer);
    g_test_add_func("/plan/disk-end-unaligned", test_disk_end_unaligned);
    g_test_add_func("/plan/random-property", test_random_property);
    return g_test_run();
}
