/*
 * Block digests: one XXH3-128 per COPIER_BLOCK_SIZE block of a disk, kept
 * in a file beside each backup image (offset block * COPIER_DIGEST_LEN).
 * XXH3 hashes at memory speed; SHA-256 (GChecksum) capped the copier at
 * ~170 MiB/s here (see bench/README.md). An incremental
 * backup starts from its parent's digests and rewrites only the blocks it
 * copies, so the checksum of the whole point-in-time disk costs no extra
 * read; a restored raw image can be checked against it without QEMU.
 */
#define _GNU_SOURCE /* SEEK_DATA, SEEK_HOLE */
#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include <xxhash.h>

#include "internal.h"

#define DIGEST_LEN  COPIER_DIGEST_LEN
#define IO_BLOCKS   256  /* digests per read/write of the digest file */
#define ZERO_BLOCKS 4096 /* zero blocks' digests hashed per call (64 KiB) */

guint64 copier_block_count(guint64 size)
{
    return (size + COPIER_BLOCK_SIZE - 1) / COPIER_BLOCK_SIZE;
}

void copier_block_digest(const void *data, size_t len,
                         guint8 out[COPIER_DIGEST_LEN])
{
    XXH128_canonical_t canon;

    XXH128_canonicalFromHash(&canon, XXH3_128bits(data, len));
    memcpy(out, canon.digest, COPIER_DIGEST_LEN);
}

/* Lowercase hex of the final XXH3-128 STATE. */
static char *state_hex(XXH3_state_t *state)
{
    XXH128_canonical_t canon;
    GString *hex = g_string_sized_new(2 * COPIER_DIGEST_LEN);

    XXH128_canonicalFromHash(&canon, XXH3_128bits_digest(state));
    for (int i = 0; i < COPIER_DIGEST_LEN; i++) {
        g_string_append_printf(hex, "%02x", canon.digest[i]);
    }
    return g_string_free(hex, FALSE);
}

/* Read (WRITING false) or write all LEN bytes of BUF at OFF, through
 * interrupted and short transfers. */
static bool transfer_all(int fd, void *buf, size_t len, off_t off, bool writing)
{
    while (len > 0) {
        ssize_t n =
            writing ? pwrite(fd, buf, len, off) : pread(fd, buf, len, off);

        if (n < 0 && errno == EINTR) {
            continue;
        }
        if (n <= 0) {
            return false;
        }
        buf = (guint8 *)buf + n;
        len -= n;
        off += n;
    }
    return true;
}

static bool pread_all(int fd, void *buf, size_t len, off_t off)
{
    return transfer_all(fd, buf, len, off, false);
}

static bool pwrite_all(int fd, void *buf, size_t len, off_t off)
{
    return transfer_all(fd, buf, len, off, true);
}

/* The digests of a zero block: ZERO of a whole one, TAIL of the disk's
 * last block (shorter when SIZE is not a multiple of the block). The last
 * size's are kept: verify asks for every 4096 blocks it compares. */
void digests_zero(guint64 size, guint8 zero[DIGEST_LEN],
                  guint8 tail[DIGEST_LEN])
{
    G_LOCK_DEFINE_STATIC(last);
    static guint64 last_size;
    static guint8 last_zero[DIGEST_LEN], last_tail[DIGEST_LEN];
    guint64 nblocks = copier_block_count(size);

    G_LOCK(last);
    if (last_size != size || size == 0) {
        g_autofree guint8 *zeros = g_malloc0(COPIER_BLOCK_SIZE);

        copier_block_digest(zeros, COPIER_BLOCK_SIZE, last_zero);
        copier_block_digest(zeros, size - (nblocks - 1) * COPIER_BLOCK_SIZE,
                            last_tail);
        last_size = size;
    }
    memcpy(zero, last_zero, DIGEST_LEN);
    memcpy(tail, last_tail, DIGEST_LEN);
    G_UNLOCK(last);
}

/* XOR N digests from block FIRST on with a zero block's: sparse <-> as is. */
static void flip(guint8 *d, guint64 first, guint64 n, guint64 nblocks,
                 const guint8 zero[DIGEST_LEN], const guint8 tail[DIGEST_LEN])
{
    for (guint64 i = 0; i < n; i++) {
        const guint8 *z = first + i == nblocks - 1 ? tail : zero;

        for (int k = 0; k < DIGEST_LEN; k++) {
            d[i * DIGEST_LEN + k] ^= z[k];
        }
    }
}

/* The next run of data in FD at or after byte OFF, below END: from *DATA
 * to the offset returned; *DATA is END when there is none. A file system
 * that cannot tell its holes has one run: all of it. */
static off_t next_data(int fd, off_t off, off_t end, off_t *data)
{
    off_t d = lseek(fd, off, SEEK_DATA);
    off_t h;

    if (d < 0 || d >= end) {
        *data = d < 0 && errno != ENXIO ? off : end;
        return end;
    }
    h = lseek(fd, d, SEEK_HOLE);
    *data = d;
    return h < 0 || h > end ? end : h;
}

bool copier_digests_init(int fd, guint64 size, int parent_fd, bool parent_dense,
                         GError **error)
{
    guint64 nblocks = copier_block_count(size);
    off_t end = nblocks * DIGEST_LEN;
    g_autofree guint8 *buf = g_malloc(IO_BLOCKS * DIGEST_LEN);
    guint8 zero[DIGEST_LEN], tail[DIGEST_LEN];
    off_t data = 0, data_end = 0;
    struct stat st;

    digests_zero(size, zero, tail);
    /* a short parent would read as holes (zero blocks) where it stops */
    if (parent_fd >= 0 && (fstat(parent_fd, &st) < 0 || st.st_size != end)) {
        g_set_error(error, G_FILE_ERROR, G_FILE_ERROR_IO,
                    "the parent backup's digests are not of the disk's size");
        return false;
    }
    if (ftruncate(fd, 0) < 0 || ftruncate(fd, end) < 0) {
        g_set_error(error, G_FILE_ERROR, g_file_error_from_errno(errno),
                    "cannot size the digest file: %s", g_strerror(errno));
        return false;
    }
    /* a parent's digests are copied where they are not zero blocks' (its
     * holes and runs are whole file-system blocks: whole digests) */
    for (off_t off = 0; parent_fd >= 0 && off < end;) {
        guint64 n = MIN(IO_BLOCKS, (end - off) / DIGEST_LEN);
        bool all_zero = true;

        if (!parent_dense) {
            if (off >= data_end) {
                data_end = next_data(parent_fd, off, end, &data);
            }
            if (data >= end) {
                break; /* holes to the end */
            }
            off = MAX(off, data);
            n = MIN(IO_BLOCKS, MAX((data_end - off) / DIGEST_LEN, 1));
        }
        if (!pread_all(parent_fd, buf, n * DIGEST_LEN, off)) {
            g_set_error(error, G_FILE_ERROR, G_FILE_ERROR_IO,
                        "the parent backup's digests are short or "
                        "unreadable");
            return false;
        }
        if (parent_dense) {
            flip(buf, off / DIGEST_LEN, n, nblocks, zero, tail);
        }
        for (guint64 i = 0; i < n * DIGEST_LEN && all_zero; i++) {
            all_zero = buf[i] == 0;
        }
        if (!all_zero && !pwrite_all(fd, buf, n * DIGEST_LEN, off)) {
            g_set_error(error, G_FILE_ERROR, g_file_error_from_errno(errno),
                        "cannot write block digests: %s", g_strerror(errno));
            return false;
        }
        off += n * DIGEST_LEN;
    }
    return true;
}

bool copier_digests_read(int fd, guint64 size, bool dense, guint64 first,
                         guint64 n, guint8 *out)
{
    guint64 nblocks = copier_block_count(size);
    guint8 zero[DIGEST_LEN], tail[DIGEST_LEN];

    if (first + n > nblocks ||
        !pread_all(fd, out, n * DIGEST_LEN, first * DIGEST_LEN)) {
        return false;
    }
    if (!dense) {
        digests_zero(size, zero, tail);
        flip(out, first, n, nblocks, zero, tail);
    }
    return true;
}

const char *copier_sum_name(CopierSum alg)
{
    return alg == COPIER_SUM_DATA ? COPIER_SUM_DATA_NAME
                                  : COPIER_SUM_BLOCKS_NAME;
}

/*
 * A checksum being computed, from the disk's digests in block order.
 * COPIER_SUM_BLOCKS hashes every block's digest; COPIER_SUM_DATA hashes,
 * for each block that is not a zero block, its index (8 bytes, little
 * endian) and its digest, and last the block count and the disk's size (8
 * bytes each): a zero block costs nothing, so a sparse disk's checksum
 * follows its data.
 */
typedef struct {
    CopierSum alg;
    XXH3_state_t *state;
    guint64 nblocks, size;
    guint8 zero[DIGEST_LEN], tail[DIGEST_LEN];
    guint8 *zbuf; /* ZERO_BLOCKS copies of ZERO (COPIER_SUM_BLOCKS) */
} Summer;

static void summer_init(Summer *s, CopierSum alg, guint64 size)
{
    s->alg = alg;
    s->size = size;
    s->nblocks = copier_block_count(size);
    digests_zero(size, s->zero, s->tail);
    s->zbuf = g_malloc(ZERO_BLOCKS * DIGEST_LEN);
    for (guint i = 0; i < ZERO_BLOCKS; i++) {
        memcpy(s->zbuf + i * DIGEST_LEN, s->zero, DIGEST_LEN);
    }
    s->state = XXH3_createState();
    XXH3_128bits_reset(s->state);
}

static void summer_free(Summer *s)
{
    XXH3_freeState(s->state);
    g_free(s->zbuf);
}

static void update_u64(XXH3_state_t *state, guint64 v)
{
    guint64 le = GUINT64_TO_LE(v);

    XXH3_128bits_update(state, &le, sizeof(le));
}

/* The digests D of N blocks from block FIRST on, as they are. */
static void summer_digests(Summer *s, guint64 first, guint64 n, const guint8 *d)
{
    if (s->alg == COPIER_SUM_BLOCKS) {
        XXH3_128bits_update(s->state, d, n * DIGEST_LEN);
        return;
    }
    for (guint64 i = 0; i < n; i++) {
        const guint8 *z = first + i == s->nblocks - 1 ? s->tail : s->zero;

        if (memcmp(d + i * DIGEST_LEN, z, DIGEST_LEN) != 0) {
            update_u64(s->state, first + i);
            XXH3_128bits_update(s->state, d + i * DIGEST_LEN, DIGEST_LEN);
        }
    }
}

/* N zero blocks from block FIRST on. */
static void summer_zeros(Summer *s, guint64 first, guint64 n)
{
    bool has_tail = first + n == s->nblocks;

    if (s->alg == COPIER_SUM_DATA) {
        return;
    }
    n -= has_tail;
    while (n > 0) {
        guint64 k = MIN(n, ZERO_BLOCKS);

        XXH3_128bits_update(s->state, s->zbuf, k * DIGEST_LEN);
        n -= k;
    }
    if (has_tail) {
        XXH3_128bits_update(s->state, s->tail, DIGEST_LEN);
    }
}

/* The checksum as lowercase hex; S is freed. */
static char *summer_end(Summer *s)
{
    char *hex;

    if (s->alg == COPIER_SUM_DATA) {
        update_u64(s->state, s->nblocks);
        update_u64(s->state, s->size);
    }
    hex = state_hex(s->state);
    summer_free(s);
    return hex;
}

char *copier_digests_checksum(int fd, guint64 size, bool dense, CopierSum alg,
                              GError **error)
{
    guint64 nblocks = copier_block_count(size);
    off_t end = nblocks * DIGEST_LEN;
    g_autofree guint8 *buf = g_malloc(IO_BLOCKS * DIGEST_LEN);
    off_t data = 0, data_end = 0;
    struct stat st;
    Summer sum;

    summer_init(&sum, alg, size);
    if (fstat(fd, &st) < 0 || st.st_size < end) {
        goto short_file;
    }
    for (off_t off = 0; off < end;) {
        guint64 b = off / DIGEST_LEN;
        guint64 n = MIN(IO_BLOCKS, nblocks - b);

        if (!dense && off >= data_end) {
            data_end = next_data(fd, off, end, &data);
        }
        if (!dense && off < data) { /* a hole: zero blocks up to the data */
            n = MIN(MAX((data - off) / DIGEST_LEN, 1), nblocks - b);
            summer_zeros(&sum, b, n);
            off += n * DIGEST_LEN;
            continue;
        }
        if (!dense) {
            n = MIN(n, MAX((data_end - off) / DIGEST_LEN, 1));
        }
        if (!pread_all(fd, buf, n * DIGEST_LEN, off)) {
            goto short_file;
        }
        if (!dense) {
            flip(buf, b, n, nblocks, sum.zero, sum.tail);
        }
        summer_digests(&sum, b, n, buf);
        off += n * DIGEST_LEN;
    }
    return summer_end(&sum);

short_file:
    g_set_error(error, G_FILE_ERROR, G_FILE_ERROR_IO,
                "the digest file is short or unreadable");
    summer_free(&sum);
    return NULL;
}

char *copier_file_checksum(const char *path, guint64 size, CopierSum alg,
                           GError **error)
{
    guint64 nblocks = copier_block_count(size);
    g_autofree guint8 *buf = g_malloc(COPIER_BLOCK_SIZE);
    guint8 digest[DIGEST_LEN];
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    off_t data = 0, data_end = 0;
    struct stat st;
    Summer sum;

    if (fd < 0) {
        g_set_error(error, G_FILE_ERROR, g_file_error_from_errno(errno),
                    "cannot open '%s': %s", path, g_strerror(errno));
        return NULL;
    }
    if (fstat(fd, &st) < 0 || (guint64)st.st_size < size) {
        g_set_error(error, G_FILE_ERROR, G_FILE_ERROR_IO,
                    "'%s' is shorter than %" G_GUINT64_FORMAT " bytes", path,
                    size);
        close(fd);
        return NULL;
    }
    posix_fadvise(fd, 0, 0, POSIX_FADV_SEQUENTIAL);
    summer_init(&sum, alg, size);
    for (guint64 b = 0; b < nblocks;) {
        guint64 off = b * COPIER_BLOCK_SIZE;
        size_t len = MIN(COPIER_BLOCK_SIZE, size - off);

        if ((off_t)off >= data_end) {
            data_end = next_data(fd, off, size, &data);
        }
        if ((guint64)data >= off + len) { /* whole blocks of a hole */
            guint64 n =
                MIN(MAX((data - off) / COPIER_BLOCK_SIZE, 1), nblocks - b);

            summer_zeros(&sum, b, n);
            b += n;
            continue;
        }
        if (!pread_all(fd, buf, len, off)) {
            g_set_error(error, G_FILE_ERROR, G_FILE_ERROR_IO,
                        "cannot read '%s' at %" G_GUINT64_FORMAT, path, off);
            close(fd);
            summer_free(&sum);
            return NULL;
        }
        copier_block_digest(buf, len, digest);
        summer_digests(&sum, b, 1, digest);
        b++;
    }
    close(fd);
    return summer_end(&sum);
}

bool digests_write(Copier *c, const Chunk *chunk, const guint8 *buf)
{
    guint64 first = chunk->offset / COPIER_BLOCK_SIZE;
    guint64 nblocks = copier_block_count(chunk->offset + chunk->length) - first;
    g_autofree guint8 *digests = NULL;
    ssize_t n;

    if (c->opts.digest_fd < 0) {
        return true;
    }
    /* sparse layout: a zero block's digest is stored as zero bytes, and
     * zeros as a hole where the file system can (a full backup's zero
     * regions would otherwise fill a page per 256 blocks) */
    if (!buf &&
        fallocate(c->opts.digest_fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                  first * COPIER_DIGEST_LEN,
                  nblocks * COPIER_DIGEST_LEN) == 0) {
        return true;
    }
    digests = g_malloc0(nblocks * COPIER_DIGEST_LEN);
    for (guint64 i = 0; buf && i < nblocks; i++) {
        guint64 off = i * COPIER_BLOCK_SIZE;
        size_t len = MIN(COPIER_BLOCK_SIZE, chunk->length - off);

        copier_block_digest(buf + off, len, digests + i * COPIER_DIGEST_LEN);
    }
    if (buf) {
        flip(digests, first, nblocks, copier_block_count(c->size),
             c->zero_digest, c->zero_tail_digest);
    }
    n = pwrite(c->opts.digest_fd, digests, nblocks * COPIER_DIGEST_LEN,
               first * COPIER_DIGEST_LEN);
    if (n != (ssize_t)(nblocks * COPIER_DIGEST_LEN)) {
        copier_fail(c, COPIER_ERROR_HASH, "cannot write block digests: %s",
                    n < 0 ? g_strerror(errno) : "short write");
        return false;
    }
    return true;
}
