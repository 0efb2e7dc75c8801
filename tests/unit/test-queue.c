/*
 * lib/copier's work queue: every byte pushed comes out exactly once, in
 * aligned chunks; hot ranges come out first, hotter and newer first; the
 * rest in offset order; memory follows ranges, not bytes.
 */
#include <string.h>

#include <libnbd.h>

#include "../../lib/copier/internal.h"

#define B   COPIER_BLOCK_SIZE
#define MiB (1024 * 1024)

static Chunk pop(ChunkQueue *q)
{
    Chunk c;

    g_assert_true(chunk_queue_pop(q, &c));
    return c;
}

static void test_order_and_merge(void)
{
    g_autoptr(ChunkQueue) q = chunk_queue_new(MiB);
    Chunk c;

    chunk_queue_push(q, 0, 2 * MiB, false);
    chunk_queue_push(q, 2 * MiB, MiB, false);     /* merges */
    chunk_queue_push(q, 2 * MiB, 2 * MiB, false); /* overlaps: 1 MiB new */
    chunk_queue_push(q, 8 * MiB, 1152 * MiB, true);
    g_assert_cmpuint(chunk_queue_entries(q), ==, 2);
    g_assert_cmpuint(chunk_queue_bytes(q), ==, 1156 * MiB);
    for (guint64 off = 0; off < 4 * MiB; off += MiB) {
        c = pop(q);
        g_assert_cmpuint(c.offset, ==, off);
        g_assert_cmpuint(c.length, ==, MiB);
        g_assert_false(c.zero);
    }
    c = pop(q); /* zeros go in pieces of up to 1 GiB */
    g_assert_true(c.zero);
    g_assert_cmpuint(c.offset, ==, 8 * MiB);
    g_assert_cmpuint(c.length, ==, 1024 * MiB);
    c = pop(q);
    g_assert_cmpuint(c.length, ==, 128 * MiB);
    g_assert_true(chunk_queue_is_empty(q));
    g_assert_false(chunk_queue_pop(q, &c));
}

static void test_bump_goes_first(void)
{
    g_autoptr(ChunkQueue) q = chunk_queue_new(MiB);
    Chunk c;

    chunk_queue_push(q, 0, 16 * MiB, false);
    g_assert_false(chunk_queue_next_is_hot(q));
    /* unaligned: widened to whole blocks */
    g_assert_cmpuint(chunk_queue_bump(q, 5 * MiB + 100, 2 * B, 1), ==, 3 * B);
    g_assert_cmpuint(chunk_queue_entries(q), ==, 3);
    g_assert_true(chunk_queue_next_is_hot(q)); /* pacing lets it through */
    c = pop(q);
    g_assert_cmpuint(c.offset, ==, 5 * MiB);
    g_assert_cmpuint(c.length, ==, 3 * B);
    g_assert_false(chunk_queue_next_is_hot(q));
    c = pop(q); /* then back to offset order */
    g_assert_cmpuint(c.offset, ==, 0);
    /* bumping what was taken or is already as hot does nothing */
    g_assert_cmpuint(chunk_queue_bump(q, 5 * MiB, 3 * B, 1), ==, 0);
    g_assert_cmpuint(chunk_queue_bump(q, 0, MiB, 1), ==, 0);
}

static void test_levels_and_recency(void)
{
    g_autoptr(ChunkQueue) q = chunk_queue_new(MiB);

    chunk_queue_push(q, 0, 64 * MiB, false);
    chunk_queue_bump(q, 10 * MiB, MiB, 2); /* older, hotter */
    chunk_queue_bump(q, 20 * MiB, MiB, 1);
    chunk_queue_bump(q, 30 * MiB, MiB, 1);     /* newest */
    chunk_queue_bump(q, 10 * MiB, 4 * MiB, 1); /* 11-14 only: 10 is hotter */
    g_assert_cmpuint(pop(q).offset, ==, 10 * MiB);
    g_assert_cmpuint(pop(q).offset, ==, 11 * MiB);
    g_assert_cmpuint(pop(q).offset, ==, 12 * MiB);
    g_assert_cmpuint(pop(q).offset, ==, 13 * MiB);
    g_assert_cmpuint(pop(q).offset, ==, 30 * MiB);
    g_assert_cmpuint(pop(q).offset, ==, 20 * MiB);
    g_assert_cmpuint(pop(q).offset, ==, 0);
}

/* Random pushes, bumps and pops against a byte map: each block out once,
 * chunks aligned and bounded, a bumped block before any cold one. */
static void test_random(void)
{
    const guint64 size = 256 * MiB + 12345; /* odd end */
    const guint64 nblocks = (size + B - 1) / B;
    g_autofree guint8 *state = g_malloc0(nblocks); /* 0 no,1 queued,2 out */
    g_autofree guint8 *hot = g_malloc0(nblocks);
    GRand *rand = g_rand_new_with_seed(42);

    for (int round = 0; round < 20; round++) {
        g_autoptr(ChunkQueue) q =
            chunk_queue_new(B * g_rand_int_range(rand, 1, 20));
        guint64 pos = 0, queued = 0;
        Chunk c;

        memset(state, 0, nblocks);
        memset(hot, 0, nblocks);
        while (pos < size) {
            guint64 want = B * (guint64)g_rand_int_range(rand, 1, 300);
            guint64 len = MIN(size - pos, want);

            if (g_rand_boolean(rand)) {
                bool zero = g_rand_int_range(rand, 0, 4) == 0;

                chunk_queue_push(q, pos, len, zero);
                for (guint64 b = pos / B; b < (pos + len + B - 1) / B; b++) {
                    state[b] = 1;
                    queued++;
                }
            }
            pos += len;
        }
        g_assert_cmpuint(chunk_queue_bytes(q), <=, queued * B);
        while (chunk_queue_pop(q, &c)) {
            bool any_hot = false;

            g_assert_cmpuint(c.offset % B, ==, 0);
            g_assert_true(c.offset + c.length == size || c.length % B == 0);
            for (guint64 b = 0; b < nblocks; b++) {
                any_hot |= hot[b] && state[b] == 1;
            }
            for (guint64 b = c.offset / B;
                 b < (c.offset + c.length + B - 1) / B; b++) {
                g_assert_cmpuint(state[b], ==, 1);
                state[b] = 2;
                if (any_hot) {
                    g_assert_true(hot[b]);
                }
            }
            if (g_rand_int_range(rand, 0, 3) == 0) {
                guint64 off = g_rand_int_range(rand, 0, size);
                guint64 len = g_rand_int_range(rand, 1, 8 * MiB);

                len = MIN(len, size - off);
                chunk_queue_bump(q, off, len, g_rand_int_range(rand, 1, 3));
                for (guint64 b = off / B; b < (off + len + B - 1) / B; b++) {
                    hot[b] = 1;
                }
            }
        }
        for (guint64 b = 0; b < nblocks; b++) {
            g_assert_cmpuint(state[b], !=, 1);
        }
        g_assert_cmpuint(chunk_queue_bytes(q), ==, 0);
    }
    g_rand_free(rand);
}

/* A whole disk's worth of bumps keeps entries near the number of ranges. */
static void test_entries_bounded(void)
{
    g_autoptr(ChunkQueue) q = chunk_queue_new(MiB);

    chunk_queue_push(q, 0, G_GUINT64_CONSTANT(1) << 40, false); /* 1 TiB */
    g_assert_cmpuint(chunk_queue_entries(q), ==, 1);
    for (int i = 0; i < 1000; i++) {
        chunk_queue_bump(q, (guint64)i * 1000 * MiB, 4 * MiB, 1);
    }
    g_assert_cmpuint(chunk_queue_entries(q), <=, 2001);
}

static guint noticed_count;

static void count_notice(guint64 offset, guint64 length, guint64 bumped,
                         void *opaque)
{
    noticed_count++;
}

/* Notices: written extents first, then their neighbourhood, then the rest;
 * depth 0 and 2 (backing) are not writes; holes are not writes. */
static void test_notices(void)
{
    g_autoptr(ChunkQueue) q = chunk_queue_new(MiB);
    /* allocation depth over 64 MiB: 0..40 backing (2), 40..41 scratch (1),
     * 41..50 unallocated (0), 50..64 backing (2) */
    const uint32_t depth[] = { 40 * MiB, 2, MiB, 1, 9 * MiB, 0, 14 * MiB, 2 };
    /* base:allocation of a scratch image: 10..11 allocated, rest holes */
    const uint32_t alloc[] = {
        10 * MiB, LIBNBD_STATE_HOLE | LIBNBD_STATE_ZERO, MiB, 0,
        53 * MiB, LIBNBD_STATE_HOLE | LIBNBD_STATE_ZERO
    };

    chunk_queue_push(q, 0, 64 * MiB, false);
    noticed_count = 0;
    g_assert_cmpuint(notice_apply(q, 0, 64 * MiB, depth, G_N_ELEMENTS(depth),
                                  true, 2 * MiB, count_notice, NULL),
                     ==, 64 * MiB);
    g_assert_cmpuint(noticed_count, ==, 1);
    g_assert_cmpuint(pop(q).offset, ==, 40 * MiB); /* written */
    g_assert_cmpuint(pop(q).offset, ==, 38 * MiB); /* neighbourhood */
    g_assert_cmpuint(pop(q).offset, ==, 39 * MiB);
    g_assert_cmpuint(pop(q).offset, ==, 41 * MiB);
    g_assert_cmpuint(pop(q).offset, ==, 42 * MiB);
    g_assert_cmpuint(pop(q).offset, ==, 0); /* then offset order */
    /* the same map again: nothing left to bump there */
    noticed_count = 0;
    notice_apply(q, 0, 64 * MiB, depth, G_N_ELEMENTS(depth), true, 2 * MiB,
                 count_notice, NULL);
    g_assert_cmpuint(noticed_count, ==, 0);

    notice_apply(q, 0, 64 * MiB, alloc, G_N_ELEMENTS(alloc), false, 0,
                 count_notice, NULL);
    g_assert_cmpuint(noticed_count, ==, 1);
    g_assert_cmpuint(pop(q).offset, ==, 10 * MiB);
    g_assert_cmpuint(pop(q).offset, ==, MiB);
}

int main(int argc, char **argv)
{
    g_test_init(&argc, &argv, NULL);
    g_test_add_func("/queue/order-and-merge", test_order_and_merge);
    g_test_add_func("/queue/bump-goes-first", test_bump_goes_first);
    g_test_add_func("/queue/levels-and-recency", test_levels_and_recency);
    g_test_add_func("/queue/random", test_random);
    g_test_add_func("/queue/entries-bounded", test_entries_bounded);
    g_test_add_func("/queue/notices", test_notices);
    return g_test_run();
}
