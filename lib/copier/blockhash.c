/*
 * Block digests: one XXH3-128 per COPIER_BLOCK_SIZE block of a disk, kept
 * in a file beside each backup image (offset block * COPIER_DIGEST_LEN).
 * XXH3 hashes at memory speed; SHA-256 (GChecksum) capped the copier at
 * ~170 MiB/s here (see bench/README.md). An incremental
 * backup starts from its parent's digests and rewrites only the blocks it
 * copies, so the checksum of the whole point-in-time disk costs no extra
 * read; a restored raw image can be checked against it without QEMU.
 */
#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <unistd.h>
#include <xxhash.h>

#include "internal.h"

#define DIGEST_LEN COPIER_DIGEST_LEN
#define IO_BLOCKS  256 /* digests per read/write of the digest file */

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

static bool pread_all(int fd, void *buf, size_t len, off_t off)
{
    while (len > 0) {
        ssize_t n = pread(fd, buf, len, off);

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

static bool pwrite_all(int fd, const void *buf, size_t len, off_t off)
{
    while (len > 0) {
        ssize_t n = pwrite(fd, buf, len, off);

        if (n < 0 && errno == EINTR) {
            continue;
        }
        if (n <= 0) {
            return false;
        }
        buf = (const guint8 *)buf + n;
        len -= n;
        off += n;
    }
    return true;
}

bool copier_digests_init(int fd, guint64 size, int parent_fd, GError **error)
{
    guint64 nblocks = copier_block_count(size);
    g_autofree guint8 *zeros = g_malloc0(COPIER_BLOCK_SIZE);
    g_autofree guint8 *buf = g_malloc(IO_BLOCKS * DIGEST_LEN);
    guint8 zero_digest[DIGEST_LEN], tail_digest[DIGEST_LEN];

    copier_block_digest(zeros, COPIER_BLOCK_SIZE, zero_digest);
    copier_block_digest(zeros, size - (nblocks - 1) * COPIER_BLOCK_SIZE,
                        tail_digest);
    for (guint64 b = 0; b < nblocks; b += IO_BLOCKS) {
        guint64 n = MIN(IO_BLOCKS, nblocks - b);

        if (parent_fd >= 0) {
            if (!pread_all(parent_fd, buf, n * DIGEST_LEN, b * DIGEST_LEN)) {
                g_set_error(error, G_FILE_ERROR, G_FILE_ERROR_IO,
                            "the parent backup's digests are short or "
                            "unreadable");
                return false;
            }
        } else {
            for (guint64 i = 0; i < n; i++) {
                memcpy(buf + i * DIGEST_LEN,
                       b + i == nblocks - 1 ? tail_digest : zero_digest,
                       DIGEST_LEN);
            }
        }
        if (!pwrite_all(fd, buf, n * DIGEST_LEN, b * DIGEST_LEN)) {
            g_set_error(error, G_FILE_ERROR, g_file_error_from_errno(errno),
                        "cannot write block digests: %s", g_strerror(errno));
            return false;
        }
    }
    if (ftruncate(fd, nblocks * DIGEST_LEN) < 0) {
        g_set_error(error, G_FILE_ERROR, g_file_error_from_errno(errno),
                    "cannot size the digest file: %s", g_strerror(errno));
        return false;
    }
    return true;
}

char *copier_digests_checksum(int fd, guint64 size, GError **error)
{
    guint64 nblocks = copier_block_count(size);
    XXH3_state_t *sum = XXH3_createState();
    g_autofree guint8 *buf = g_malloc(IO_BLOCKS * DIGEST_LEN);
    char *hex;

    XXH3_128bits_reset(sum);
    for (guint64 b = 0; b < nblocks; b += IO_BLOCKS) {
        guint64 n = MIN(IO_BLOCKS, nblocks - b);

        if (!pread_all(fd, buf, n * DIGEST_LEN, b * DIGEST_LEN)) {
            g_set_error(error, G_FILE_ERROR, G_FILE_ERROR_IO,
                        "the digest file is short or unreadable");
            XXH3_freeState(sum);
            return NULL;
        }
        XXH3_128bits_update(sum, buf, n * DIGEST_LEN);
    }
    hex = state_hex(sum);
    XXH3_freeState(sum);
    return hex;
}

char *copier_file_checksum(const char *path, guint64 size, GError **error)
{
    g_autofree guint8 *buf = g_malloc(COPIER_BLOCK_SIZE);
    guint8 digest[DIGEST_LEN];
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    XXH3_state_t *sum;
    char *hex;

    if (fd < 0) {
        g_set_error(error, G_FILE_ERROR, g_file_error_from_errno(errno),
                    "cannot open '%s': %s", path, g_strerror(errno));
        return NULL;
    }
    posix_fadvise(fd, 0, 0, POSIX_FADV_SEQUENTIAL);
    sum = XXH3_createState();
    XXH3_128bits_reset(sum);
    for (guint64 off = 0; off < size; off += COPIER_BLOCK_SIZE) {
        size_t len = MIN(COPIER_BLOCK_SIZE, size - off);

        if (!pread_all(fd, buf, len, off)) {
            g_set_error(error, G_FILE_ERROR, G_FILE_ERROR_IO,
                        "'%s' is shorter than %" G_GUINT64_FORMAT " bytes",
                        path, size);
            close(fd);
            XXH3_freeState(sum);
            return NULL;
        }
        copier_block_digest(buf, len, digest);
        XXH3_128bits_update(sum, digest, DIGEST_LEN);
    }
    close(fd);
    hex = state_hex(sum);
    XXH3_freeState(sum);
    return hex;
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
    digests = g_malloc(nblocks * COPIER_DIGEST_LEN);
    for (guint64 i = 0; i < nblocks; i++) {
        guint64 off = i * COPIER_BLOCK_SIZE;
        size_t len = MIN(COPIER_BLOCK_SIZE, chunk->length - off);

        if (buf) {
            copier_block_digest(buf + off, len,
                                digests + i * COPIER_DIGEST_LEN);
        } else {
            memcpy(digests + i * COPIER_DIGEST_LEN,
                   len == COPIER_BLOCK_SIZE ? c->zero_digest
                                            : c->zero_tail_digest,
                   COPIER_DIGEST_LEN);
        }
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
