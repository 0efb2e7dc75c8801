/*
 * Digest files and checksums: the sparse layout (zero blocks are holes)
 * must give the checksums the dense one gives, for both algorithms,
 * whatever mix of holes and data, and cost only what the data does; a raw
 * image's holes are not read but count as zero blocks. The references are
 * computed here block by block, from their definitions.
 */
#include <fcntl.h>
#include <glib.h>
#include <glib/gstdio.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <xxhash.h>

#include "copier.h"

#define BLOCK ((guint64)COPIER_BLOCK_SIZE)
#define LEN   COPIER_DIGEST_LEN

/* 4 GiB and a short tail: 65537 blocks, a 1 MiB dense digest file */
static const guint64 size = (G_GUINT64_CONSTANT(4) << 30) + 1000;
/* blocks holding data; the last one is the tail */
static const guint64 data_blocks[] = { 2, 7, 40000, 65536 };

typedef struct {
    char *dir;
    char *raw;     /* the disk, sparse */
    int dense;     /* its digests, dense, computed here */
    char *want[2]; /* their checksums by CopierSum, computed here */
} Fixture;

static int tmp_file(Fixture *f, const char *name)
{
    g_autofree char *path = g_build_filename(f->dir, name, NULL);
    int fd = open(path, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);

    g_assert_cmpint(fd, >=, 0);
    return fd;
}

/* Lowercase hex of STATE's XXH3-128. */
static char *hex_of(XXH3_state_t *state)
{
    XXH128_canonical_t canon;
    GString *hex = g_string_new(NULL);

    XXH128_canonicalFromHash(&canon, XXH3_128bits_digest(state));
    for (int i = 0; i < LEN; i++) {
        g_string_append_printf(hex, "%02x", canon.digest[i]);
    }
    return g_string_free(hex, FALSE);
}

/* The checksum ALG of the dense digest file FD, from its definition:
 * every digest; or each non-zero block's index (u64 LE) and digest, then
 * the block count and the size. */
static char *reference(int fd, CopierSum alg)
{
    guint64 nblocks = copier_block_count(size);
    g_autofree guint8 *zeros = g_malloc0(BLOCK);
    XXH3_state_t *state = XXH3_createState();
    guint8 d[LEN], z[LEN], tail[LEN];
    guint64 le;
    char *hex;

    copier_block_digest(zeros, BLOCK, z);
    copier_block_digest(zeros, size - (nblocks - 1) * BLOCK, tail);
    XXH3_128bits_reset(state);
    for (guint64 b = 0; b < nblocks; b++) {
        g_assert_cmpint(pread(fd, d, LEN, b * LEN), ==, LEN);
        if (alg == COPIER_SUM_BLOCKS) {
            XXH3_128bits_update(state, d, LEN);
        } else if (memcmp(d, b == nblocks - 1 ? tail : z, LEN) != 0) {
            le = GUINT64_TO_LE(b);
            XXH3_128bits_update(state, &le, 8);
            XXH3_128bits_update(state, d, LEN);
        }
    }
    if (alg == COPIER_SUM_DATA) {
        le = GUINT64_TO_LE(nblocks);
        XXH3_128bits_update(state, &le, 8);
        le = GUINT64_TO_LE(size);
        XXH3_128bits_update(state, &le, 8);
    }
    hex = hex_of(state);
    XXH3_freeState(state);
    return hex;
}

static void fixture_set_up(Fixture *f, gconstpointer unused)
{
    guint64 nblocks = copier_block_count(size);
    g_autofree guint8 *buf = g_malloc(BLOCK);
    guint8 d[LEN];
    int fd;

    f->dir = g_dir_make_tmp("qbk-digests-XXXXXX", NULL);
    g_assert_nonnull(f->dir);
    f->raw = g_build_filename(f->dir, "disk.raw", NULL);
    fd = open(f->raw, O_RDWR | O_CREAT | O_CLOEXEC, 0600);
    g_assert_cmpint(ftruncate(fd, size), ==, 0);
    for (guint i = 0; i < G_N_ELEMENTS(data_blocks); i++) {
        guint64 off = data_blocks[i] * BLOCK;

        memset(buf, 'a' + i, BLOCK);
        g_assert_cmpint(pwrite(fd, buf, MIN(BLOCK, size - off), off), >, 0);
    }
    close(fd);

    /* the reference: every block's digest, zeros included (the holes'
     * are those of zero blocks: not read here, to keep the test fast) */
    f->dense = tmp_file(f, "dense");
    for (guint64 b = 0, k = 0; b < nblocks; b++) {
        size_t len = MIN(BLOCK, size - b * BLOCK);
        bool data = k < G_N_ELEMENTS(data_blocks) && data_blocks[k] == b;

        memset(buf, data ? 'a' + k : 0, len);
        k += data;
        copier_block_digest(buf, len, d);
        g_assert_cmpint(pwrite(f->dense, d, LEN, b * LEN), ==, LEN);
    }
    f->want[COPIER_SUM_BLOCKS] = reference(f->dense, COPIER_SUM_BLOCKS);
    f->want[COPIER_SUM_DATA] = reference(f->dense, COPIER_SUM_DATA);
}

static void fixture_tear_down(Fixture *f, gconstpointer unused)
{
    g_autofree char *cmd = g_strdup_printf("rm -rf '%s'", f->dir);

    close(f->dense);
    g_assert_cmpint(system(cmd), ==, 0);
    g_free(f->dir);
    g_free(f->raw);
    g_free(f->want[0]);
    g_free(f->want[1]);
}

/* Bytes FD really holds on disk. */
static guint64 allocated(int fd)
{
    struct stat st;

    g_assert_cmpint(fstat(fd, &st), ==, 0);
    return (guint64)st.st_blocks * 512;
}

static void test_file_checksum(Fixture *f, gconstpointer unused)
{
    g_autoptr(GError) error = NULL;
    g_autofree char *none = NULL;

    for (CopierSum alg = COPIER_SUM_BLOCKS; alg <= COPIER_SUM_DATA; alg++) {
        g_autofree char *sum = copier_file_checksum(f->raw, size, alg, NULL);
        g_autofree char *dense =
            copier_digests_checksum(f->dense, size, true, alg, NULL);

        g_assert_cmpstr(sum, ==, f->want[alg]);
        g_assert_cmpstr(dense, ==, f->want[alg]);
    }
    g_assert_cmpstr(f->want[0], !=, f->want[1]);
    /* a file shorter than the disk is an error, not zeros */
    none = copier_file_checksum(f->raw, size + BLOCK, COPIER_SUM_DATA, &error);
    g_assert_null(none);
    g_assert_nonnull(strstr(error->message, "shorter"));
}

static void test_sparse_from_dense(Fixture *f, gconstpointer unused)
{
    int sp = tmp_file(f, "sparse"), sp2 = tmp_file(f, "sparse2");
    guint8 a[LEN], b[LEN];

    g_assert_true(copier_digests_init(sp, size, f->dense, true, NULL));
    for (CopierSum alg = COPIER_SUM_BLOCKS; alg <= COPIER_SUM_DATA; alg++) {
        g_autofree char *s1 =
            copier_digests_checksum(sp, size, false, alg, NULL);

        g_assert_cmpstr(s1, ==, f->want[alg]);
    }
    /* only the pages that hold data blocks' digests */
    g_assert_cmpuint(allocated(sp), <=, G_N_ELEMENTS(data_blocks) * 4096);
    /* and a copy of the sparse file is sparse too */
    g_assert_true(copier_digests_init(sp2, size, sp, false, NULL));
    for (CopierSum alg = COPIER_SUM_BLOCKS; alg <= COPIER_SUM_DATA; alg++) {
        g_autofree char *s2 =
            copier_digests_checksum(sp2, size, false, alg, NULL);

        g_assert_cmpstr(s2, ==, f->want[alg]);
    }
    g_assert_cmpuint(allocated(sp2), <=, G_N_ELEMENTS(data_blocks) * 4096);
    /* read back as they are: a data block, a zero block, the tail */
    for (guint64 blk = 0; blk < 8; blk++) {
        g_assert_true(copier_digests_read(sp2, size, false, blk, 1, a));
        g_assert_true(copier_digests_read(f->dense, size, true, blk, 1, b));
        g_assert_cmpmem(a, LEN, b, LEN);
    }
    g_assert_true(copier_digests_read(sp2, size, false, 65536, 1, a));
    g_assert_true(copier_digests_read(f->dense, size, true, 65536, 1, b));
    g_assert_cmpmem(a, LEN, b, LEN);
    g_assert_false(copier_digests_read(sp2, size, false, 65536, 2, a));
    close(sp);
    close(sp2);
}

static void test_fresh_is_zeros(Fixture *f, gconstpointer unused)
{
    int sp = tmp_file(f, "fresh");
    g_autofree char *zeros = g_build_filename(f->dir, "zeros.raw", NULL);
    int fd = open(zeros, O_RDWR | O_CREAT | O_CLOEXEC, 0600);

    g_assert_cmpint(ftruncate(fd, size), ==, 0);
    close(fd);
    g_assert_true(copier_digests_init(sp, size, -1, false, NULL));
    for (CopierSum alg = COPIER_SUM_BLOCKS; alg <= COPIER_SUM_DATA; alg++) {
        g_autofree char *want = copier_file_checksum(zeros, size, alg, NULL);
        g_autofree char *got =
            copier_digests_checksum(sp, size, false, alg, NULL);

        g_assert_cmpstr(got, ==, want);
        g_assert_cmpstr(got, !=, f->want[alg]);
    }
    g_assert_cmpuint(allocated(sp), ==, 0);
    close(sp);
}

static void test_damaged(Fixture *f, gconstpointer unused)
{
    int sp = tmp_file(f, "damaged"), child;
    guint8 one = 1;
    g_autofree char *sum = NULL;
    g_autoptr(GError) error = NULL;

    g_assert_true(copier_digests_init(sp, size, f->dense, true, NULL));
    /* one bit in a hole's place: the checksum changes */
    g_assert_cmpint(pwrite(sp, &one, 1, 30000 * LEN), ==, 1);
    sum = copier_digests_checksum(sp, size, false, COPIER_SUM_DATA, NULL);
    g_assert_cmpstr(sum, !=, f->want[COPIER_SUM_DATA]);
    g_free(g_steal_pointer(&sum));
    /* a short file is refused, never read as zeros */
    g_assert_cmpint(ftruncate(sp, 100 * LEN), ==, 0);
    sum = copier_digests_checksum(sp, size, false, COPIER_SUM_DATA, &error);
    g_assert_null(sum);
    g_assert_nonnull(error);
    g_clear_error(&error);
    /* ... and as a parent: an incremental never builds on it */
    child = tmp_file(f, "child");
    g_assert_false(copier_digests_init(child, size, sp, false, &error));
    g_assert_nonnull(strstr(error->message, "size"));
    close(child);
    close(sp);
}

int main(int argc, char **argv)
{
    g_test_init(&argc, &argv, NULL);
#define ADD(path, fn)                                                          \
    g_test_add(path, Fixture, NULL, fixture_set_up, fn, fixture_tear_down)
    ADD("/digests/file-checksum-skips-holes", test_file_checksum);
    ADD("/digests/sparse-from-dense", test_sparse_from_dense);
    ADD("/digests/fresh-is-zeros", test_fresh_is_zeros);
    ADD("/digests/damaged", test_damaged);
    return g_test_run();
}
