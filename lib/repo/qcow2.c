/*
 * The few fields of a qcow2 header that say which other files QEMU would
 * open with an image: its backing file (and format) and an external data
 * file. Read here, without QEMU, so that a repository image re-pointed at
 * a host file is refused before any tool follows it. Layout: QEMU's
 * docs/interop/qcow2.txt; all numbers big-endian.
 */
#include <errno.h>
#include <string.h>
#include <unistd.h>

#include "internal.h"

#define QCOW2_MAGIC        0x514649fbu /* "QFI\xfb" */
#define V2_HEADER_LEN      72
#define V3_HEADER_MIN      104
#define MAX_BACKING_LEN    1023 /* as QEMU */
#define EXT_END            0x00000000u
#define EXT_BACKING_FORMAT 0xe2792acau
#define EXT_DATA_FILE      0x44415441u
#define INCOMPAT_DATA_FILE (1u << 2)
#define MIN_CLUSTER_BITS   9
#define MAX_CLUSTER_BITS   21
#define FIRST_READ         (64 * 1024)

static guint32 be32(const guint8 *p)
{
    return (guint32)p[0] << 24 | (guint32)p[1] << 16 | (guint32)p[2] << 8 |
           p[3];
}

static guint64 be64(const guint8 *p)
{
    return (guint64)be32(p) << 32 | be32(p + 4);
}

/* A name of LEN bytes at BUF: no NUL inside, valid UTF-8 (new string). */
static char *name_at(const guint8 *buf, size_t len)
{
    if (memchr(buf, '\0', len) ||
        !g_utf8_validate((const char *)buf, len, NULL)) {
        return NULL;
    }
    return g_strndup((const char *)buf, len);
}

void qcow2_header_clear(Qcow2Header *h)
{
    g_clear_pointer(&h->backing, g_free);
    g_clear_pointer(&h->backing_format, g_free);
}

bool qcow2_header_parse(const guint8 *buf, size_t len, Qcow2Header *h,
                        GError **error)
{
    guint64 backing_offset, cluster_size;
    guint32 backing_len, header_len, ext_off;

    *h = (Qcow2Header){ 0 };
    if (len < V2_HEADER_LEN || be32(buf) != QCOW2_MAGIC) {
        return repo_corrupt(error, "not a qcow2 image");
    }
    h->version = be32(buf + 4);
    backing_offset = be64(buf + 8);
    backing_len = be32(buf + 16);
    h->cluster_bits = be32(buf + 20);
    h->size = be64(buf + 24);
    if (h->version != 2 && h->version != 3) {
        return repo_corrupt(error, "qcow2 version %u", h->version);
    }
    if (h->cluster_bits < MIN_CLUSTER_BITS ||
        h->cluster_bits > MAX_CLUSTER_BITS) {
        return repo_corrupt(error, "qcow2 cluster bits %u", h->cluster_bits);
    }
    cluster_size = 1u << h->cluster_bits;
    /* everything below lives in the first cluster */
    len = MIN(len, cluster_size);
    header_len = V2_HEADER_LEN;
    if (h->version == 3) {
        if (len < V3_HEADER_MIN) {
            return repo_corrupt(error, "short qcow2 header");
        }
        h->data_file = be64(buf + 72) & INCOMPAT_DATA_FILE;
        header_len = be32(buf + 100);
        if (header_len < V3_HEADER_MIN || header_len > len || header_len % 8) {
            return repo_corrupt(error, "qcow2 header length %u", header_len);
        }
    }
    if (backing_offset) {
        if (backing_len == 0 || backing_len > MAX_BACKING_LEN ||
            backing_offset > len || backing_len > len - backing_offset) {
            return repo_corrupt(
                error, "the backing file name lies outside the header");
        }
        h->backing = name_at(buf + backing_offset, backing_len);
        if (!h->backing) {
            return repo_corrupt(error, "the backing file name is not text");
        }
    }
    /* header extensions: type, length, data padded to 8 bytes */
    for (ext_off = header_len; ext_off + 8 <= len;) {
        guint32 type = be32(buf + ext_off);
        guint32 elen = be32(buf + ext_off + 4);
        guint64 next = (guint64)ext_off + 8 + ((guint64)elen + 7) / 8 * 8;

        if (type == EXT_END) {
            return true;
        }
        if (elen > len - ext_off - 8) {
            qcow2_header_clear(h);
            return repo_corrupt(error,
                                "a header extension runs past the cluster");
        }
        if (type == EXT_BACKING_FORMAT) {
            g_free(h->backing_format);
            h->backing_format = name_at(buf + ext_off + 8, elen);
            if (!h->backing_format) {
                qcow2_header_clear(h);
                return repo_corrupt(error, "the backing format is not text");
            }
        } else if (type == EXT_DATA_FILE) {
            h->data_file = true;
        }
        ext_off = (guint32)MIN(next, (guint64)len);
    }
    /* ran out of bytes without the end marker: a v2 image may have none */
    if (h->version == 3 && len >= cluster_size) {
        qcow2_header_clear(h);
        return repo_corrupt(error, "no end to the header extensions");
    }
    return true;
}

/* Read up to LEN bytes at offset 0 of FD into BUF; bytes read, or -1. */
static gssize read_start(int fd, guint8 *buf, size_t len)
{
    size_t got = 0;

    while (got < len) {
        ssize_t n = pread(fd, buf + got, len - got, got);

        if (n < 0 && errno == EINTR) {
            continue;
        }
        if (n < 0) {
            return -1;
        }
        if (n == 0) {
            break;
        }
        got += n;
    }
    return got;
}

bool qcow2_header_read(int fd, Qcow2Header *h, GError **error)
{
    g_autofree guint8 *buf = g_malloc(FIRST_READ);
    gssize got = read_start(fd, buf, FIRST_READ);
    guint32 bits;

    if (got < 0) {
        return repo_corrupt(error, "cannot read the header: %s",
                            g_strerror(errno));
    }
    /* the whole first cluster, where extensions may lie, if it is larger
     * than what was read */
    bits = got >= 24 ? be32(buf + 20) : 0;
    if (got == FIRST_READ && bits > 16 && bits <= MAX_CLUSTER_BITS) {
        buf = g_realloc(buf, (gsize)1 << bits);
        got = read_start(fd, buf, (gsize)1 << bits);
        if (got < 0) {
            return repo_corrupt(error, "cannot read the header: %s",
                                g_strerror(errno));
        }
    }
    return qcow2_header_parse(buf, got, h, error);
}
