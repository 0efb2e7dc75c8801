/*
 * Merge: rewrite one disk of one backup (TO) so that its image stands on
 * an older parent, or on nothing (a synthetic full), without the VM.
 *
 * The chain at TO is served read-only by qemu-nbd with its allocation
 * depth; lib/copier copies only what the newest DEPTH links hold (all of
 * it for a full) into a new image backed by the new parent, so the cost
 * follows the changed bytes, not the disk. TO's point in time does not
 * change, so neither do its block digests: the copy's digests, laid over
 * the new parent's, must give TO's recorded checksum, or nothing changes.
 *
 * Then, so that a crash at any step leaves every backup restorable, a
 * journal (REPO/merge-journal.json, temp + fsync + rename) records what
 * is to happen and every later step is idempotent: the new image replaces
 * TO's (rename), TO's manifest names its new parent, and the backups that
 * only TO needed lose this disk (their manifests first, then their files).
 * A run that finds a journal finishes it; a new image without a journal is
 * an unfinished copy and is removed.
 */
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "internal.h"

#define JOURNAL "merge-journal.json"

static char *journal_path(const char *repo)
{
    return g_build_filename(repo, JOURNAL, NULL);
}

/* Test hook: exit at step N of a merge (tests kill it at each step). */
static void crash_point(int step)
{
    const char *at = g_getenv("QBK_MERGE_CRASH_AT");

    if (at && atoi(at) == step) {
        _exit(99);
    }
}

/* Some complete backup outside DROP whose DISK stands on one in DROP. */
static char *dependent(const char *repo, const char *disk, GPtrArray *drop,
                       const char *to, GError **error)
{
    g_autoptr(GPtrArray) all = backup_list(repo, error);

    if (!all) {
        return NULL;
    }
    for (guint i = 0; i < all->len; i++) {
        json_object *e = manifest_disk(all->pdata[i], disk);
        const char *id = qmp_json_string(all->pdata[i], "id");
        const char *parent = e ? qmp_json_string(e, "parent") : NULL;

        if (parent && g_strcmp0(id, to) != 0 &&
            !g_ptr_array_find_with_equal_func(drop, id, g_str_equal, NULL) &&
            g_ptr_array_find_with_equal_func(drop, parent, g_str_equal, NULL)) {
            return g_strdup_printf("backup '%s' stands on '%s'", id, parent);
        }
    }
    return g_strdup("");
}

/* ---- the journal: what is decided, and the steps after it ---- */

/* Remove DISK from backup ID (files, then the manifest's entry; the
 * manifest goes when no disk is left). Idempotent. */
bool backup_drop_disk(const char *repo, const char *id, const char *disk,
                      GError **error)
{
    g_autofree char *path = repo_manifest_path(repo, id);
    g_autoptr(GError) local = NULL;
    json_object *m = repo_read_json(path, &local);
    json_object *disks, *kept;
    const char *image = NULL, *digests = NULL;
    bool ok = true;

    if (!m) {
        return true; /* already gone */
    }
    disks = qmp_json_array(m, "disks");
    kept = json_object_new_array();
    for (size_t i = 0; disks && i < json_object_array_length(disks); i++) {
        json_object *e = json_object_array_get_idx(disks, i);

        if (g_strcmp0(qmp_json_string(e, "disk"), disk) == 0) {
            image = qmp_json_string(e, "image");
            digests = qmp_json_string(e, "digests");
            continue;
        }
        json_object_array_add(kept, json_object_get(e));
    }
    /* the manifest first: a crash then leaves files no manifest names */
    g_autofree char *img = image ? g_build_filename(repo, image, NULL) : NULL;
    g_autofree char *dig =
        digests ? g_build_filename(repo, digests, NULL) : NULL;

    if (json_object_array_length(kept) == 0) {
        ok = unlink(path) == 0 || errno == ENOENT;
        if (!ok) {
            g_set_error(error, BACKUP_ERROR, BACKUP_ERROR_FAILED,
                        "cannot remove '%s': %s", path, g_strerror(errno));
        }
        json_object_put(kept);
    } else {
        json_object_object_add(m, "disks", kept);
        ok = repo_write_json(path, m, error);
    }
    if (ok && img) {
        unlink(img);
    }
    if (ok && dig) {
        unlink(dig);
    }
    json_object_put(m);
    return ok;
}

/* Carry out journal J: idempotent, so that it can be run again. */
static bool roll_forward(const char *repo, json_object *j, GError **error)
{
    const char *disk = qmp_json_string(j, "disk");
    const char *to = qmp_json_string(j, "to");
    g_autofree char *tmp =
        g_build_filename(repo, qmp_json_string(j, "new_image"), NULL);
    g_autofree char *image =
        g_build_filename(repo, qmp_json_string(j, "image"), NULL);
    g_autofree char *tmp_dig =
        g_build_filename(repo, qmp_json_string(j, "new_digests"), NULL);
    g_autofree char *dig =
        g_build_filename(repo, qmp_json_string(j, "digests"), NULL);
    g_autofree char *mpath = repo_manifest_path(repo, to);
    g_autofree char *jpath = journal_path(repo);
    g_autofree char *dir = g_path_get_dirname(image);
    json_object *m, *e, *drop, *merged;

    /* 1. the new image and digests take TO's names */
    if (g_file_test(tmp, G_FILE_TEST_EXISTS) &&
        (rename(tmp, image) < 0 || rename(tmp_dig, dig) < 0)) {
        g_set_error(error, BACKUP_ERROR, BACKUP_ERROR_FAILED,
                    "cannot put '%s' in place: %s", tmp, g_strerror(errno));
        return false;
    }
    if (!repo_fsync_path(dir, error)) {
        return false;
    }
    crash_point(4);
    /* 2. TO's manifest names its new parent */
    m = repo_read_json(mpath, error);
    if (!m) {
        return false;
    }
    e = manifest_disk(m, disk);
    if (e) {
        const char *parent = qmp_json_string(j, "parent");

        json_object_object_add(e, "parent",
                               parent ? json_object_new_string(parent) : NULL);
        json_object_object_add(
            e, "image", json_object_new_string(qmp_json_string(j, "image")));
        json_object_object_add(
            e, "format", json_object_new_string(qmp_json_string(j, "format")));
        json_object_object_add(
            e, "digests",
            json_object_new_string(qmp_json_string(j, "digests")));
        if (!parent) {
            json_object_object_add(e, "mode", json_object_new_string("full"));
            json_object_object_add(e, "synthetic", json_object_new_boolean(1));
        }
        merged = json_object_get(qmp_json_array(j, "drop"));
        json_object_object_add(e, "merged", merged);
    }
    if (!repo_write_json(mpath, m, error)) {
        json_object_put(m);
        return false;
    }
    json_object_put(m);
    crash_point(5);
    /* 3. the backups only TO needed lose this disk; an old image of
     * another format goes too */
    drop = qmp_json_array(j, "drop");
    for (size_t i = 0; drop && i < json_object_array_length(drop); i++) {
        if (!backup_drop_disk(
                repo,
                json_object_get_string(json_object_array_get_idx(drop, i)),
                disk, error)) {
            return false;
        }
        crash_point(6);
    }
    if (qmp_json_string(j, "old_image")) {
        g_autofree char *old =
            g_build_filename(repo, qmp_json_string(j, "old_image"), NULL);
        g_autofree char *name = g_path_get_basename(image);
        json_object *children = qmp_json_array(j, "rebase");

        /* the backups on TO name its new file (same content: -u) */
        for (size_t i = 0; children && i < json_object_array_length(children);
             i++) {
            g_autofree char *child = g_build_filename(
                repo,
                json_object_get_string(json_object_array_get_idx(children, i)),
                NULL);
            const char *argv[] = {
                "qemu-img", "rebase", "-u",
                "-f",       "qcow2",  "-b",
                name,       "-F",     qmp_json_string(j, "format"),
                child,      NULL
            };
            g_autofree char *err = NULL;
            int status;

            if (!g_spawn_sync(NULL, (char **)argv, NULL, G_SPAWN_SEARCH_PATH,
                              NULL, NULL, NULL, &err, &status, error)) {
                return false;
            }
            if (!g_spawn_check_wait_status(status, NULL)) {
                g_set_error(error, BACKUP_ERROR, BACKUP_ERROR_FAILED,
                            "cannot point '%s' at '%s': %s", child, name,
                            g_strstrip(err));
                return false;
            }
        }
        unlink(old);
    }
    if (unlink(jpath) < 0 && errno != ENOENT) {
        g_set_error(error, BACKUP_ERROR, BACKUP_ERROR_FAILED,
                    "cannot remove '%s': %s", jpath, g_strerror(errno));
        return false;
    }
    return repo_fsync_path(repo, error);
}

bool backup_merge_recover(const char *repo, GError **error)
{
    g_autofree char *jpath = journal_path(repo);
    g_autofree char *dirs = g_build_filename(repo, "disks", NULL);
    g_autoptr(GDir) d = NULL;
    const char *name;
    json_object *j;
    bool ok;

    if (g_file_test(jpath, G_FILE_TEST_EXISTS)) {
        j = repo_read_json(jpath, error);
        if (!j) {
            return false;
        }
        ok = roll_forward(repo, j, error);
        json_object_put(j);
        if (!ok) {
            return false;
        }
    }
    /* new images without a journal: copies that did not finish */
    d = g_dir_open(dirs, 0, NULL);
    while (d && (name = g_dir_read_name(d))) {
        g_autofree char *sub = g_build_filename(dirs, name, NULL);
        g_autoptr(GDir) sd = g_dir_open(sub, 0, NULL);
        const char *f;

        while (sd && (f = g_dir_read_name(sd))) {
            if (strstr(f, ".merging.")) {
                g_autofree char *p = g_build_filename(sub, f, NULL);

                unlink(p);
            }
        }
    }
    return true;
}

/* ---- making the new image ---- */

json_object *backup_merge(const char *repo, const char *disk, const char *from,
                          const char *to, const char *format, GError **error)
{
    g_autoptr(GPtrArray) ids = g_ptr_array_new_with_free_func(g_free);
    g_autoptr(GPtrArray) ms = g_ptr_array_new_with_free_func(qmp_json_free);
    g_autoptr(GPtrArray) drop = g_ptr_array_new();
    g_autofree char *why = NULL;
    g_autofree char *dir = NULL;
    g_autofree char *file = NULL;
    g_autofree char *rel_image = NULL, *rel_tmp = NULL;
    g_autofree char *rel_dig = NULL, *rel_tmp_dig = NULL;
    g_autofree char *tmp = NULL, *tmp_dig = NULL, *top = NULL;
    g_autofree char *backing = NULL, *parent_dig = NULL;
    g_autofree char *sum = NULL;
    g_autofree char *jpath = journal_path(repo);
    json_object *te, *pe = NULL, *j, *jdrop, *result;
    const char *parent = NULL, *expected;
    guint depth = 0;
    CopierOptions co;
    CopierStats stats = { 0 };
    NbdServer *t = NULL; /* serves the new qcow2 image, writable */
    NbdServer *nbd = NULL;
    int dfd = -1, pfd = -1;
    bool full, ok;
    gint64 t0 = g_get_monotonic_time();

    if (!repo_disk_chain(repo, to, disk, ids, ms, error)) {
        return NULL;
    }
    te = manifest_disk(ms->pdata[0], disk);
    full = from == NULL; /* a synthetic full at TO */
    if (!full) {
        guint at;

        if (!g_ptr_array_find_with_equal_func(ids, from, g_str_equal, &at) ||
            at == 0) {
            g_set_error(error, BACKUP_ERROR, BACKUP_ERROR_NOT_IN_CHAIN,
                        "disk '%s': '%s' is not an older link of the chain "
                        "of '%s'",
                        disk, from, to);
            return NULL;
        }
        g_ptr_array_set_size(drop, 0);
        for (guint i = 1; i <= at; i++) {
            g_ptr_array_add(drop, ids->pdata[i]);
        }
        depth = at + 1;
        if (at + 1 < ids->len) {
            parent = ids->pdata[at + 1];
            pe = manifest_disk(ms->pdata[at + 1], disk);
        } else {
            full = true; /* FROM is the full backup: the result is full */
        }
    } else {
        format = format ? format : "qcow2";
    }
    if (!full && format && strcmp(format, "qcow2") != 0) {
        g_set_error(error, BACKUP_ERROR, BACKUP_ERROR_FAILED,
                    "an increment can only be qcow2");
        return NULL;
    }
    format = full && format ? format : "qcow2";
    if (full) {
        /* a full replaces TO's chain for TO; older backups stay */
        g_ptr_array_set_size(drop, 0);
        if (from) {
            for (guint i = 1; i < ids->len; i++) {
                g_ptr_array_add(drop, ids->pdata[i]);
            }
        }
    }
    why = dependent(repo, disk, drop, to, error);
    if (!why) {
        return NULL;
    }
    if (*why) {
        g_set_error(error, BACKUP_ERROR, BACKUP_ERROR_FAILED,
                    "disk '%s': cannot drop what another backup needs: %s",
                    disk, why);
        return NULL;
    }
    json_object *checksum = NULL;

    json_object_object_get_ex(te, "checksum", &checksum);
    expected = qmp_json_string(checksum, "value");
    if (!expected) {
        g_set_error(error, BACKUP_ERROR, BACKUP_ERROR_CORRUPT,
                    "backup '%s' records no checksum for disk '%s'", to, disk);
        return NULL;
    }

    /* the new image, beside TO's */
    file = repo_disk_file_name(disk);
    rel_image = g_strdup_printf("disks/%s/%s.%s", file, to, format);
    rel_tmp = g_strdup_printf("disks/%s/%s.merging.%s", file, to, format);
    rel_dig = g_strdup(qmp_json_string(te, "digests"));
    rel_tmp_dig = g_strdup_printf("disks/%s/%s.merging.digests", file, to);
    tmp = g_build_filename(repo, rel_tmp, NULL);
    tmp_dig = g_build_filename(repo, rel_tmp_dig, NULL);
    top = g_build_filename(repo, qmp_json_string(te, "image"), NULL);
    if (parent) {
        backing = g_strdup_printf("%s.%s", parent,
                                  qmp_json_string(pe, "format")
                                      ? qmp_json_string(pe, "format")
                                      : "qcow2");
        parent_dig =
            g_build_filename(repo, qmp_json_string(pe, "digests"), NULL);
    }
    unlink(tmp);
    ok = strcmp(format, "raw") == 0 ||
         target_create_image(tmp, qmp_json_uint(te, "size"), backing,
                             parent ? (qmp_json_string(pe, "format")
                                           ? qmp_json_string(pe, "format")
                                           : "qcow2")
                                    : NULL,
                             error);
    crash_point(1);
    if (ok) {
        nbd = nbd_serve(top, qmp_json_string(te, "format"), false, error);
        ok = nbd != NULL;
    }
    if (ok && strcmp(format, "qcow2") == 0) {
        t = nbd_serve(tmp, "qcow2", true, error);
        ok = t != NULL;
    }
    if (ok) {
        dfd = open(tmp_dig, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
        pfd = parent_dig ? open(parent_dig, O_RDONLY | O_CLOEXEC) : -1;
        if (dfd < 0 || (parent_dig && pfd < 0)) {
            g_set_error(error, BACKUP_ERROR, BACKUP_ERROR_CORRUPT,
                        "cannot open the block digests: %s", g_strerror(errno));
            ok = false;
        }
    }
    if (ok) {
        CopierEndpoint src = { .socket = nbd->socket, .name = "" };
        CopierEndpoint dst = { .socket = t ? t->socket : NULL,
                               .name = "",
                               .file = t ? NULL : tmp };

        copier_options_init(&co);
        co.depth_limit = full ? 0 : depth;
        co.target_zeroed = full;
        co.digest_fd = dfd;
        co.digest_parent_fd = pfd;
        ok = copier_copy(&src, &dst, &co, &stats, error);
        /* TO's point in time, so TO's checksum */
        ok = ok && (sum = copier_digests_checksum(dfd, stats.size, error));
        if (ok && strcmp(sum, expected) != 0) {
            g_set_error(error, BACKUP_ERROR, BACKUP_ERROR_MISMATCH,
                        "disk '%s': the merged image would not equal backup "
                        "'%s' (checksum %s, expected %s); a link is damaged: "
                        "run qbk-verify",
                        disk, to, sum, expected);
            ok = false;
        }
        ok = ok && fsync(dfd) == 0;
    }
    nbd_server_stop(nbd, NULL);
    /* the new image is whole only if qemu-nbd closed it cleanly */
    ok = nbd_server_stop(t, ok ? error : NULL) && ok;
    if (dfd >= 0) {
        close(dfd);
    }
    if (pfd >= 0) {
        close(pfd);
    }
    ok = ok && repo_fsync_path(tmp, error);
    if (!ok) {
        unlink(tmp);
        unlink(tmp_dig);
        return NULL;
    }
    crash_point(2);

    /* decided: the journal, then the steps */
    j = json_object_new_object();
    json_object_object_add(j, "id", json_object_new_string(to));
    json_object_object_add(j, "disk", json_object_new_string(disk));
    json_object_object_add(j, "to", json_object_new_string(to));
    json_object_object_add(j, "parent",
                           parent ? json_object_new_string(parent) : NULL);
    json_object_object_add(j, "format", json_object_new_string(format));
    json_object_object_add(j, "new_image", json_object_new_string(rel_tmp));
    json_object_object_add(j, "image", json_object_new_string(rel_image));
    json_object_object_add(j, "new_digests",
                           json_object_new_string(rel_tmp_dig));
    json_object_object_add(j, "digests", json_object_new_string(rel_dig));
    if (strcmp(rel_image, qmp_json_string(te, "image")) != 0) {
        /* a new file name (raw): the backups on TO follow it */
        g_autoptr(GPtrArray) all = backup_list(repo, error);
        json_object *children = json_object_new_array();

        json_object_object_add(
            j, "old_image",
            json_object_new_string(qmp_json_string(te, "image")));
        for (guint i = 0; all && i < all->len; i++) {
            json_object *e = manifest_disk(all->pdata[i], disk);

            if (e && g_strcmp0(qmp_json_string(e, "parent"), to) == 0) {
                json_object_array_add(
                    children,
                    json_object_new_string(qmp_json_string(e, "image")));
            }
        }
        json_object_object_add(j, "rebase", children);
        if (!all) {
            json_object_put(j);
            unlink(tmp);
            unlink(tmp_dig);
            return NULL;
        }
    }
    jdrop = json_object_new_array();
    for (guint i = 0; i < drop->len; i++) {
        json_object_array_add(jdrop, json_object_new_string(drop->pdata[i]));
    }
    json_object_object_add(j, "drop", jdrop);
    ok = repo_write_json(jpath, j, error);
    crash_point(3);
    ok = ok && roll_forward(repo, j, error);
    if (!ok) {
        json_object_put(j);
        return NULL;
    }
    result = json_object_new_object();
    json_object_object_add(result, "disk", json_object_new_string(disk));
    json_object_object_add(result, "backup", json_object_new_string(to));
    json_object_object_add(result, "parent",
                           parent ? json_object_new_string(parent) : NULL);
    json_object_object_add(result, "format", json_object_new_string(format));
    json_object_object_add(result, "dropped", json_object_get(jdrop));
    json_object_object_add(result, "bytes_copied",
                           json_object_new_uint64(stats.bytes_written));
    json_object_object_add(result, "bytes_read",
                           json_object_new_uint64(stats.bytes_read));
    json_object_object_add(result, "checksum", json_object_new_string(sum));
    json_object_object_add(result, "copy_seconds",
                           json_object_new_double(stats.seconds));
    json_object_object_add(
        result, "seconds",
        json_object_new_double((g_get_monotonic_time() - t0) / 1e6));
    json_object_put(j);
    return result;
}
