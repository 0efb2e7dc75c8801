/*
 * Verify: check one disk of one backup without the VM. First the chain:
 * every link's image is there, whole, and names as its backing file the
 * parent the manifest names. Then the data: the chain is served read-only
 * by qemu-nbd, read through by lib/copier (into no target), hashed block
 * by block, and the image checksum compared with the one recorded when
 * the backup was taken; on a mismatch the stored block digests say where.
 */
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "internal.h"

G_GNUC_PRINTF(3, 4)
static void corrupt(GError **error, int code, const char *fmt, ...)
{
    va_list ap;

    va_start(ap, fmt);
    g_propagate_error(error, g_error_new_valist(BACKUP_ERROR, code, fmt, ap));
    va_end(ap);
}

/* The backing file name IMAGE (qcow2) records, "" for none; NULL with
 * ERROR if qemu-img cannot read it. */
static char *backing_of(const char *image, GError **error)
{
    const char *args[] = { "info", "-U", "-f", "qcow2", image, NULL };
    json_object *info = qemu_img_json(args, error);
    char *backing;

    if (!info) {
        g_prefix_error(error, "image '%s' is damaged: ", image);
        return NULL;
    }
    backing = g_strdup(qmp_json_string(info, "backing-filename")
                           ? qmp_json_string(info, "backing-filename")
                           : "");
    json_object_put(info);
    return backing;
}

/*
 * Walk DISK's chain from backup ID down to its full backup, checking each
 * link. Fills CHAIN with the backup ids, newest first. Returns the top's
 * manifest entry (new reference).
 */
static json_object *check_chain(const char *repo, const char *id,
                                const char *disk, GPtrArray *chain,
                                GError **error)
{
    json_object *top = NULL;
    g_autofree char *cur = g_strdup(id);
    GError *bad = NULL; /* what is wrong with the link at hand */

    while (cur) {
        g_autoptr(GError) local = NULL;
        json_object *m = backup_load(repo, cur, &local);
        json_object *e = m ? manifest_disk(m, disk) : NULL;
        g_autofree char *image = NULL;
        g_autofree char *want = NULL;
        g_autofree char *have = NULL;
        const char *parent;
        struct stat st;

        if (!e) {
            if (top) {
                corrupt(error, BACKUP_ERROR_CORRUPT,
                        "the chain of backup '%s' is broken: its ancestor "
                        "'%s' %s",
                        id, cur,
                        m ? "lacks the disk" : "is missing or unreadable");
            } else if (m) {
                corrupt(error, BACKUP_ERROR_NOT_FOUND,
                        "backup '%s' has no disk '%s'", cur, disk);
            } else {
                g_propagate_error(error, g_steal_pointer(&local));
            }
            json_object_put(m);
            json_object_put(top);
            return NULL;
        }
        g_ptr_array_add(chain, g_strdup(qmp_json_string(m, "id")));
        if (!top) {
            top = json_object_get(e);
        }
        image = g_build_filename(repo, qmp_json_string(e, "image"), NULL);
        parent = qmp_json_string(e, "parent");
        if (stat(image, &st) < 0) {
            corrupt(&bad, BACKUP_ERROR_CORRUPT,
                    "the chain of backup '%s' is broken: image '%s' is "
                    "missing",
                    id, image);
        } else if (g_strcmp0(qmp_json_string(e, "format"), "raw") == 0) {
            if ((guint64)st.st_size != (guint64)qmp_json_uint(e, "size")) {
                corrupt(&bad, BACKUP_ERROR_CORRUPT,
                        "image '%s' has %lld bytes, the disk %" G_GUINT64_FORMAT
                        ": truncated or replaced",
                        image, (long long)st.st_size,
                        (guint64)qmp_json_uint(e, "size"));
            } else if (parent) {
                corrupt(&bad, BACKUP_ERROR_CORRUPT,
                        "manifest of '%s' gives a raw image a parent", cur);
            }
        } else if ((have = backing_of(image, &bad))) {
            json_object *pm = parent ? backup_load(repo, parent, NULL) : NULL;
            json_object *pe = pm ? manifest_disk(pm, disk) : NULL;

            want = parent ? g_strdup_printf("%s.%s", parent,
                                            pe && qmp_json_string(pe, "format")
                                                ? qmp_json_string(pe, "format")
                                                : "qcow2")
                          : g_strdup("");
            json_object_put(pm);
            if (strcmp(have, want) != 0) {
                corrupt(&bad, BACKUP_ERROR_CORRUPT,
                        "image '%s' names backing file '%s' where the "
                        "manifest says '%s'",
                        image, have, want);
            }
        }
        g_free(cur);
        cur = g_strdup(parent);
        json_object_put(m);
        if (bad) {
            g_propagate_error(error, bad);
            json_object_put(top);
            return NULL;
        }
    }
    return top;
}

/* Where the fresh digests (FD) first differ from the stored ones (PATH). */
static char *first_difference(int fd, const char *path, guint64 size)
{
    g_autofree guint8 *a = NULL;
    g_autofree guint8 *b = NULL;
    gsize len;
    guint64 n = copier_block_count(size) * COPIER_DIGEST_LEN;

    if (!g_file_get_contents(path, (char **)&b, &len, NULL) || len != n) {
        return g_strdup("the stored block digests are missing or damaged");
    }
    a = g_malloc(n);
    if (pread(fd, a, n, 0) != (ssize_t)n) {
        return g_strdup("cannot read the fresh block digests");
    }
    for (guint64 i = 0; i < n / COPIER_DIGEST_LEN; i++) {
        if (memcmp(a + i * COPIER_DIGEST_LEN, b + i * COPIER_DIGEST_LEN,
                   COPIER_DIGEST_LEN) != 0) {
            return g_strdup_printf(
                "first different block at offset %" G_GUINT64_FORMAT,
                i * COPIER_BLOCK_SIZE);
        }
    }
    return g_strdup("the stored block digests match: the manifest's "
                    "checksum is wrong");
}

/*
 * Read IMAGE (FORMAT; a qcow2 image follows its backing chain) through
 * qemu-nbd and hash every block. Returns the image checksum; the block
 * digests stay in *DIGESTS_FD (an unlinked temporary file, the caller
 * closes it), the copier's figures in STATS.
 */
static char *read_checksum(const char *image, const char *format,
                           int *digests_fd, CopierStats *stats, GError **error)
{
    g_autofree char *path =
        g_build_filename(g_get_tmp_dir(), "qbk-digests-XXXXXX", NULL);
    NbdServer *nbd = nbd_serve(image, format, false, error);
    CopierOptions co;
    char *sum = NULL;
    int fd;

    *digests_fd = -1;
    if (!nbd) {
        return NULL;
    }
    fd = g_mkstemp_full(path, O_RDWR | O_CLOEXEC, 0600);
    if (fd < 0) {
        g_set_error(error, BACKUP_ERROR, BACKUP_ERROR_FAILED, "%s: %s", path,
                    g_strerror(errno));
        nbd_server_stop(nbd, NULL);
        return NULL;
    }
    unlink(path);
    copier_options_init(&co);
    co.digest_fd = fd;
    if (copier_copy(&(CopierEndpoint){ .socket = nbd->socket, .name = "" },
                    &(CopierEndpoint){ 0 }, &co, stats, error)) {
        sum = copier_digests_checksum(fd, stats->size, error);
    }
    nbd_server_stop(nbd, NULL);
    if (!sum) {
        close(fd);
        return NULL;
    }
    *digests_fd = fd;
    return sum;
}

json_object *backup_verify(const char *repo, const char *id, const char *disk,
                           GError **error)
{
    g_autoptr(GPtrArray) chain = g_ptr_array_new_with_free_func(g_free);
    g_autofree char *image = NULL;
    g_autofree char *sum = NULL;
    json_object *entry, *checksum = NULL, *result, *jchain;
    const char *expected;
    CopierStats stats;
    int dfd;
    bool ok;

    entry = check_chain(repo, id, disk, chain, error);
    if (!entry) {
        return NULL;
    }
    json_object_object_get_ex(entry, "checksum", &checksum);
    expected = qmp_json_string(checksum, "value");
    if (!expected || g_strcmp0(qmp_json_string(checksum, "algorithm"),
                               COPIER_CHECKSUM_ALGORITHM) != 0) {
        corrupt(error, BACKUP_ERROR_CORRUPT,
                "backup '%s' records no %s checksum for disk '%s'",
                (char *)chain->pdata[0], COPIER_CHECKSUM_ALGORITHM, disk);
        json_object_put(entry);
        return NULL;
    }
    image = g_build_filename(repo, qmp_json_string(entry, "image"), NULL);
    sum = read_checksum(image, qmp_json_string(entry, "format"), &dfd, &stats,
                        error);
    ok = sum != NULL;
    if (ok && stats.size != (guint64)qmp_json_uint(entry, "size")) {
        corrupt(error, BACKUP_ERROR_CORRUPT,
                "the chain of '%s' reads as %" G_GUINT64_FORMAT
                " bytes, the disk had %" G_GUINT64_FORMAT,
                image, stats.size, (guint64)qmp_json_uint(entry, "size"));
        ok = false;
    }
    if (ok && strcmp(sum, expected) != 0) {
        g_autofree char *stored =
            g_build_filename(repo, qmp_json_string(entry, "digests"), NULL);
        g_autofree char *where = first_difference(dfd, stored, stats.size);

        corrupt(error, BACKUP_ERROR_MISMATCH,
                "disk '%s' of backup '%s' does not match its checksum "
                "(%s, expected %s): %s",
                disk, (char *)chain->pdata[0], sum, expected, where);
        ok = false;
    }
    if (dfd >= 0) {
        close(dfd);
    }
    if (!ok) {
        json_object_put(entry);
        return NULL;
    }
    result = json_object_new_object();
    json_object_object_add(result, "backup",
                           json_object_new_string(chain->pdata[0]));
    json_object_object_add(result, "disk", json_object_new_string(disk));
    jchain = json_object_new_array();
    for (guint i = 0; i < chain->len; i++) {
        json_object_array_add(jchain, json_object_new_string(chain->pdata[i]));
    }
    json_object_object_add(result, "chain", jchain);
    json_object_object_add(result, "checksum", json_object_new_string(sum));
    json_object_object_add(result, "bytes_read",
                           json_object_new_uint64(stats.bytes_read));
    json_object_object_add(result, "seconds",
                           json_object_new_double(stats.seconds));
    json_object_put(entry);
    return result;
}

bool backup_check_image(const char *repo, const char *id, const char *disk,
                        const char *image, const char *format, GError **error)
{
    g_autofree char *sum = NULL;
    json_object *m, *e, *checksum = NULL;
    CopierStats stats;
    int dfd;
    bool ok;

    m = backup_load(repo, id, error);
    e = m ? manifest_disk(m, disk) : NULL;
    if (!e) {
        if (m) {
            g_set_error(error, BACKUP_ERROR, BACKUP_ERROR_NOT_FOUND,
                        "backup '%s' has no disk '%s'", id, disk);
        }
        json_object_put(m);
        return false;
    }
    json_object_object_get_ex(e, "checksum", &checksum);
    sum = read_checksum(image, format, &dfd, &stats, error);
    ok = sum != NULL;
    if (ok && g_strcmp0(sum, qmp_json_string(checksum, "value")) != 0) {
        g_set_error(error, BACKUP_ERROR, BACKUP_ERROR_MISMATCH,
                    "'%s' does not equal disk '%s' of backup '%s' "
                    "(checksum %s, expected %s)",
                    image, disk, qmp_json_string(m, "id"), sum,
                    qmp_json_string(checksum, "value"));
        ok = false;
    }
    if (dfd >= 0) {
        close(dfd);
    }
    json_object_put(m);
    return ok;
}
