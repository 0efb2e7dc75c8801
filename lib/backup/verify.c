/*
 * Verify: check one disk of one backup without the VM. First the chain:
 * every link's image is there, whole, and names as its backing file the
 * parent the manifest names (lib/repo). Then the data: the chain is served
 * read-only by qemu-nbd, every link named explicitly, read through by
 * lib/copier (into no target), hashed block by block, and the image
 * checksum compared with the one recorded when the backup was taken; on a
 * mismatch the stored block digests say where.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "internal.h"

/* Where the fresh digests (FD) first differ from the stored ones (PATH,
 * DENSE: in the dense layout). */
static char *first_difference(int fd, const char *path, bool dense,
                              guint64 size)
{
    guint64 nblocks = copier_block_count(size);
    guint64 step = COPIER_BLOCK_SIZE / COPIER_DIGEST_LEN;
    g_autofree guint8 *a = g_malloc(COPIER_BLOCK_SIZE);
    g_autofree guint8 *b = g_malloc(COPIER_BLOCK_SIZE);
    int sfd = repo_open_file(path, NULL);
    struct stat st;
    char *where = NULL;

    if (sfd < 0 || fstat(sfd, &st) < 0 ||
        (guint64)st.st_size != nblocks * COPIER_DIGEST_LEN) {
        where = g_strdup("the stored block digests are missing or damaged");
    }
    for (guint64 first = 0; !where && first < nblocks; first += step) {
        guint64 n = MIN(step, nblocks - first);

        if (!copier_digests_read(fd, size, false, first, n, a) ||
            !copier_digests_read(sfd, size, dense, first, n, b)) {
            where = g_strdup("cannot read the block digests");
            break;
        }
        for (guint64 i = 0; i < n; i++) {
            if (memcmp(a + i * COPIER_DIGEST_LEN, b + i * COPIER_DIGEST_LEN,
                       COPIER_DIGEST_LEN) != 0) {
                where = g_strdup_printf(
                    "first different block at offset %" G_GUINT64_FORMAT,
                    (first + i) * COPIER_BLOCK_SIZE);
                break;
            }
        }
    }
    if (sfd >= 0) {
        close(sfd);
    }
    return where ? where
                 : g_strdup("the stored block digests match: the manifest's "
                            "checksum is wrong");
}

json_object *backup_verify(Repo *repo, const char *id, const char *disk,
                           GError **error)
{
    g_autoptr(GPtrArray) chain = repo_chain(repo, id, disk, error);
    g_autofree char *source = NULL;
    g_autofree char *sum = NULL;
    const char *top;
    const ManifestDisk *e;
    json_object *result, *jchain;
    CopierStats stats;
    int dfd;
    bool ok;

    if (!chain || !repo_check_chain(repo, chain, disk, error)) {
        return NULL;
    }
    top = ((Manifest *)chain->pdata[0])->id;
    e = manifest_disk(chain->pdata[0], disk);
    source = repo_chain_filename(repo, chain, 0, disk, NULL);
    sum = backup_read_image(source, NULL, repo_key_file(repo), NULL,
                            backup_entry_sum(e), &dfd, &stats, error);
    ok = sum != NULL;
    if (ok && stats.size != e->size) {
        g_set_error(error, BACKUP_ERROR, BACKUP_ERROR_CORRUPT,
                    "the chain of '%s' reads as %" G_GUINT64_FORMAT
                    " bytes, the disk had %" G_GUINT64_FORMAT,
                    top, stats.size, e->size);
        ok = false;
    }
    if (ok && strcmp(sum, e->checksum) != 0) {
        g_autofree char *stored = repo_digests_path(repo, disk, top);
        g_autofree char *where =
            first_difference(dfd, stored, !e->digests_sparse, stats.size);

        g_set_error(error, BACKUP_ERROR, BACKUP_ERROR_MISMATCH,
                    "disk '%s' of backup '%s' does not match its checksum "
                    "(%s, expected %s): %s",
                    disk, top, sum, e->checksum, where);
        ok = false;
    }
    if (dfd >= 0) {
        close(dfd);
    }
    if (!ok) {
        return NULL;
    }
    result = json_object_new_object();
    qmp_json_set_string(result, "backup", top);
    qmp_json_set_string(result, "disk", disk);
    jchain = json_object_new_array();
    for (guint i = 0; i < chain->len; i++) {
        json_object_array_add(
            jchain, json_object_new_string(((Manifest *)chain->pdata[i])->id));
    }
    json_object_object_add(result, "chain", jchain);
    qmp_json_set_string(result, "checksum", sum);
    qmp_json_set_uint(result, "bytes_read", stats.bytes_read);
    qmp_json_set_double(result, "seconds", stats.seconds);
    return result;
}

bool backup_check_image(Repo *repo, const char *id, const char *disk,
                        const char *image, const char *format, GError **error)
{
    g_autoptr(Manifest) m = repo_load(repo, id, error);
    const ManifestDisk *e = m ? manifest_disk(m, disk) : NULL;
    g_autofree char *sum = NULL;
    CopierStats stats;
    int dfd;
    bool ok;

    if (!e) {
        if (m) {
            g_set_error(error, BACKUP_ERROR, BACKUP_ERROR_NOT_FOUND,
                        "backup '%s' has no disk '%s'", m->id, disk);
        }
        return false;
    }
    sum = backup_read_image(image, format, NULL, NULL, backup_entry_sum(e),
                            &dfd, &stats, error);
    ok = sum != NULL;
    if (ok && g_strcmp0(sum, e->checksum) != 0) {
        g_set_error(error, BACKUP_ERROR, BACKUP_ERROR_MISMATCH,
                    "'%s' does not equal disk '%s' of backup '%s' "
                    "(checksum %s, expected %s)",
                    image, disk, m->id, sum, e->checksum);
        ok = false;
    }
    if (dfd >= 0) {
        close(dfd);
    }
    return ok;
}
