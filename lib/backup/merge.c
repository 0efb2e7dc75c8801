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
 * is to happen, in names only, and every later step is idempotent: the new
 * image replaces TO's (rename), TO's manifest names its new parent, and the
 * backups that only TO needed lose this disk (their manifests first, then
 * their files). A run that finds a journal finishes it; a new image
 * without a journal is an unfinished copy and is removed.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "internal.h"

/* Some complete backup outside DROP (and other than TO) whose DISK stands
 * on one in DROP: why a merge may not drop them; "" if none. */
static char *dependent(Repo *repo, const char *disk, GPtrArray *drop,
                       const char *to, GError **error)
{
    g_autoptr(GPtrArray) all = repo_list(repo, false, NULL, error);

    if (!all) {
        return NULL;
    }
    for (guint i = 0; i < all->len; i++) {
        const Manifest *m = all->pdata[i];
        const ManifestDisk *e = manifest_disk(m, disk);

        if (e && e->parent && strcmp(m->id, to) != 0 &&
            !g_ptr_array_find_with_equal_func(drop, m->id, g_str_equal, NULL) &&
            g_ptr_array_find_with_equal_func(drop, e->parent, g_str_equal,
                                             NULL)) {
            return g_strdup_printf("backup '%s' stands on '%s'", m->id,
                                   e->parent);
        }
    }
    return g_strdup("");
}

/* ---- the journal's steps ---- */

bool backup_drop_disk(Repo *repo, const char *id, const char *disk,
                      GError **error)
{
    g_autofree char *path = repo_manifest_path(repo, id);
    g_autoptr(GError) local = NULL;
    g_autoptr(Manifest) m = repo_load(repo, id, &local);
    const ManifestDisk *gone;
    json_object *kept;
    RepoFormat format;
    bool ok;

    if (!m) {
        if (g_error_matches(local, REPO_ERROR, REPO_ERROR_NOT_FOUND)) {
            return true; /* already gone */
        }
        g_propagate_error(error, g_steal_pointer(&local));
        return false;
    }
    gone = manifest_disk(m, disk);
    if (!gone) {
        return true;
    }
    format = gone->format;
    kept = json_object_new_array();
    for (guint i = 0; i < m->disks->len; i++) {
        const ManifestDisk *d = m->disks->pdata[i];

        if (d != gone) {
            json_object_array_add(kept, json_object_get(d->json));
        }
    }
    /* the manifest first: a crash then leaves files no manifest names */
    if (json_object_array_length(kept) == 0) {
        ok = unlink(path) == 0 || errno == ENOENT;
        if (!ok) {
            g_set_error(error, BACKUP_ERROR, BACKUP_ERROR_FAILED,
                        "cannot remove '%s': %s", path, g_strerror(errno));
        }
        json_object_put(kept);
    } else {
        json_object_object_add(m->json, "disks", kept);
        ok = repo_write_json(path, m->json, error);
    }
    if (ok) {
        repo_remove_disk_files(repo, disk, id, format);
    }
    return ok;
}

/* Point the backups that stand on J->to (their image names its file) at
 * its new file: same content, so no data is rewritten (-u). */
static bool rebase_children(Repo *repo, const MergeJournal *j, GError **error)
{
    g_autoptr(GPtrArray) all = repo_list(repo, false, NULL, error);
    g_autofree char *name = repo_image_name(j->to, j->format);

    if (!all) {
        return false;
    }
    for (guint i = 0; i < all->len; i++) {
        const Manifest *m = all->pdata[i];
        const ManifestDisk *e = manifest_disk(m, j->disk);
        g_autofree char *child = NULL;
        g_autoptr(GError) local = NULL;
        Qcow2Header h;
        int fd;

        if (!e || g_strcmp0(e->parent, j->to) != 0) {
            continue;
        }
        child = repo_image_path(repo, j->disk, m->id, e->format);
        /* qemu-img opens what the header names besides the backing file
         * (an external data file): refuse an image that names one */
        fd = repo_open_file(child, error);
        if (fd < 0) {
            return false;
        }
        if (!qcow2_header_read(fd, &h, &local) || h.data_file) {
            close(fd);
            g_set_error(error, BACKUP_ERROR, BACKUP_ERROR_CORRUPT,
                        "image '%s' is damaged or not a qbk image", child);
            qcow2_header_clear(&h);
            return false;
        }
        close(fd);
        qcow2_header_clear(&h);
        {
            g_autoptr(GPtrArray) argv = g_ptr_array_new_with_free_func(g_free);

            g_ptr_array_add(argv, g_strdup("qemu-img"));
            g_ptr_array_add(argv, g_strdup("rebase"));
            g_ptr_array_add(argv, g_strdup("-u"));
            backup_add_key_object(argv, repo_key_file(repo));
            g_ptr_array_add(argv, g_strdup("-b"));
            g_ptr_array_add(argv, g_strdup(name));
            g_ptr_array_add(argv, g_strdup("-F"));
            g_ptr_array_add(argv, g_strdup(repo_format_name(j->format)));
            if (repo_key_file(repo)) {
                /* an encrypted image opens with its key only */
                g_ptr_array_add(argv, repo_qcow2_filename(repo, child));
            } else {
                g_ptr_array_add(argv, g_strdup("-f"));
                g_ptr_array_add(argv, g_strdup("qcow2"));
                g_ptr_array_add(argv, g_strdup(child));
            }
            g_ptr_array_add(argv, NULL);
            if (!util_run((const char *const *)argv->pdata, NULL, NULL,
                          &local)) {
                g_set_error(error, BACKUP_ERROR, BACKUP_ERROR_FAILED,
                            "cannot point '%s' at '%s': %s", child, name,
                            local->message);
                return false;
            }
        }
    }
    return true;
}

/* TO's manifest names its new parent, image and format. */
static bool rewrite_manifest(Repo *repo, const MergeJournal *j, GError **error)
{
    g_autofree char *path = repo_manifest_path(repo, j->to);
    g_autofree char *image = repo_image_relpath(j->disk, j->to, j->format);
    g_autofree char *digests = repo_digests_relpath(j->disk, j->to);
    g_autoptr(Manifest) m = repo_load(repo, j->to, error);
    const ManifestDisk *e;
    json_object *merged;

    if (!m) {
        return false;
    }
    e = manifest_disk(m, j->disk);
    if (!e) {
        return true; /* done before, and dropped since */
    }
    qmp_json_set_string(e->json, "parent", j->parent);
    qmp_json_set_string(e->json, "image", image);
    qmp_json_set_string(e->json, "format", repo_format_name(j->format));
    if (j->format == REPO_RAW) {
        json_object_object_del(e->json, "compression"); /* a raw full now */
    }
    qmp_json_set_string(e->json, "digests", digests);
    if (j->digests_sparse) {
        qmp_json_set_string(e->json, "digests_layout", "sparse");
    } else {
        json_object_object_del(e->json, "digests_layout"); /* dense */
    }
    if (!j->parent) {
        qmp_json_set_string(e->json, "mode", "full");
        qmp_json_set_bool(e->json, "synthetic", 1);
    }
    merged = json_object_new_array();
    for (guint i = 0; i < j->drop->len; i++) {
        json_object_array_add(merged,
                              json_object_new_string(j->drop->pdata[i]));
    }
    json_object_object_add(e->json, "merged", merged);
    return repo_write_json(path, m->json, error);
}

/* Carry out journal J: idempotent, so that it can be run again. */
static bool roll_forward(Repo *repo, const MergeJournal *j, GError **error)
{
    g_autofree char *tmp = repo_merging_path(repo, j->disk, j->to, j->format);
    g_autofree char *tmp_dig = repo_merging_digests_path(repo, j->disk, j->to);
    g_autofree char *image = repo_image_path(repo, j->disk, j->to, j->format);
    g_autofree char *dig = repo_digests_path(repo, j->disk, j->to);
    g_autofree char *dir = repo_disk_dir(repo, j->disk);

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
    backup_test_crash("merge-4");
    /* 2. TO's manifest names its new parent */
    if (!rewrite_manifest(repo, j, error)) {
        return false;
    }
    backup_test_crash("merge-5");
    /* 3. the backups only TO needed lose this disk */
    for (guint i = 0; i < j->drop->len; i++) {
        if (!backup_drop_disk(repo, j->drop->pdata[i], j->disk, error)) {
            return false;
        }
        backup_test_crash("merge-6");
    }
    /* 4. a new file name (another format): the backups on TO follow it,
     * and the old image goes */
    if (j->old_format != j->format) {
        g_autofree char *old =
            repo_image_path(repo, j->disk, j->to, j->old_format);

        if (!g_file_test(image, G_FILE_TEST_IS_REGULAR)) {
            g_set_error(error, BACKUP_ERROR, BACKUP_ERROR_CORRUPT,
                        "'%s' is missing: keeping '%s'", image, old);
            return false;
        }
        if (!rebase_children(repo, j, error)) {
            return false;
        }
        unlink(old);
    }
    return repo_remove_journal(repo, error);
}

/* Whether the string array ARR holds exactly the ids of IDS, in order. */
static bool same_ids(json_object *arr, GPtrArray *ids)
{
    if (!json_object_is_type(arr, json_type_array) ||
        json_object_array_length(arr) != ids->len) {
        return false;
    }
    for (guint i = 0; i < ids->len; i++) {
        if (g_strcmp0(json_object_get_string(json_object_array_get_idx(arr, i)),
                      ids->pdata[i]) != 0) {
            return false;
        }
    }
    return true;
}

/* After the swap (step 1), TO's image is the merged one: it stands on the
 * journal's parent. */
static bool swapped_in(Repo *repo, const MergeJournal *j)
{
    g_autofree char *image = repo_image_path(repo, j->disk, j->to, j->format);
    g_autofree char *want = NULL;
    Qcow2Header h;
    int fd;
    bool ok;

    if (j->format == REPO_RAW) {
        return !j->parent && g_file_test(image, G_FILE_TEST_IS_REGULAR);
    }
    if (j->parent) {
        g_autoptr(Manifest) pm = repo_load(repo, j->parent, NULL);
        const ManifestDisk *pe = pm ? manifest_disk(pm, j->disk) : NULL;

        if (!pe) {
            return false;
        }
        want = repo_image_name(j->parent, pe->format);
    }
    fd = repo_open_file(image, NULL);
    if (fd < 0) {
        return false;
    }
    ok = qcow2_header_read(fd, &h, NULL) && g_strcmp0(h.backing, want) == 0;
    close(fd);
    qcow2_header_clear(&h);
    return ok;
}

/*
 * A journal is input too: it may only describe a merge that could have
 * been decided here. Either its manifest step is done (TO stands on the
 * journal's parent and records exactly the journal's links as merged), or
 * not yet (the parent is an ancestor of TO, or none, the links to drop are
 * those strictly between them, or none for a synthetic full, and the new
 * image is there: beside TO's, or already in its place).
 */
static bool journal_plausible(Repo *repo, const MergeJournal *j, GError **error)
{
    g_autoptr(Manifest) m = repo_load(repo, j->to, NULL);
    g_autoptr(GPtrArray) above = g_ptr_array_new_with_free_func(g_free);
    const ManifestDisk *e = m ? manifest_disk(m, j->disk) : NULL;
    g_autofree char *cur = NULL;
    json_object *merged = NULL;
    bool found = !j->parent;

    if (!e) {
        goto refuse;
    }
    if (g_strcmp0(e->parent, j->parent) == 0 && e->format == j->format &&
        ((json_object_object_get_ex(e->json, "merged", &merged) &&
          same_ids(merged, j->drop)) ||
         j->drop->len == 0)) {
        return true;
    }
    /* the ancestors of TO down to the new parent, by the manifests */
    cur = g_strdup(e->parent);
    for (guint n = 0; cur && n < REPO_CHAIN_MAX; n++) {
        g_autoptr(Manifest) a = NULL;
        const ManifestDisk *ae;

        if (g_strcmp0(cur, j->parent) == 0) {
            found = true;
            break;
        }
        a = repo_load(repo, cur, NULL);
        ae = a ? manifest_disk(a, j->disk) : NULL;
        if (!ae) {
            break;
        }
        g_ptr_array_add(above, g_strdup(cur));
        g_free(cur);
        cur = g_strdup(ae->parent);
    }
    if (found && (j->drop->len == 0 || j->drop->len == above->len)) {
        g_autofree char *tmp =
            repo_merging_path(repo, j->disk, j->to, j->format);
        /* the new image waits beside TO's, or has taken its place */
        bool all = g_file_test(tmp, G_FILE_TEST_EXISTS) || swapped_in(repo, j);

        for (guint i = 0; i < j->drop->len && all; i++) {
            all = g_ptr_array_find_with_equal_func(above, j->drop->pdata[i],
                                                   g_str_equal, NULL);
        }
        if (all) {
            return true;
        }
    }
refuse:
    g_set_error(error, REPO_ERROR, REPO_ERROR_CORRUPT,
                "the merge journal does not describe a merge of this "
                "repository (backup '%s', disk '%s'): refusing it",
                j->to, j->disk);
    return false;
}

bool backup_merge_recover(Repo *repo, GError **error)
{
    g_autofree char *dirs = g_build_filename(repo_root(repo), "disks", NULL);
    g_autoptr(MergeJournal) j = NULL;
    g_autoptr(GError) local = NULL;
    g_autoptr(GDir) d = NULL;
    const char *name;

    j = repo_read_journal(repo, &local);
    if (local) {
        g_propagate_error(error, g_steal_pointer(&local));
        return false;
    }
    if (j &&
        (!journal_plausible(repo, j, error) || !roll_forward(repo, j, error))) {
        return false;
    }
    /* new images without a journal: copies that did not finish (the
     * disk directories are real ones: repo_open checked) */
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

typedef struct {
    GPtrArray *chain; /* Manifest*: TO's chain, newest first */
    guint at;         /* index of FROM in CHAIN */
    bool full;        /* the result is a full backup */
    RepoFormat format;
    const ManifestDisk *to;     /* TO's entry */
    const ManifestDisk *parent; /* the new parent's entry, or NULL */
    const char *parent_id;
    GPtrArray *drop; /* ids (borrowed from CHAIN) that lose the disk */
} MergePlan;

/* Decide what the merge does, before anything is written. */
static bool plan_merge(Repo *repo, const char *disk, const char *from,
                       const char *to, const char *format, MergePlan *plan,
                       GError **error)
{
    g_autofree char *why = NULL;
    guint depth;

    plan->chain = repo_chain(repo, to, disk, error);
    if (!plan->chain) {
        return false;
    }
    plan->to = manifest_disk(plan->chain->pdata[0], disk);
    plan->full = from == NULL; /* a synthetic full at TO */
    plan->at = plan->chain->len - 1;
    if (from) {
        plan->at = 0;
        for (guint i = 1; i < plan->chain->len && !plan->at; i++) {
            if (strcmp(((Manifest *)plan->chain->pdata[i])->id, from) == 0) {
                plan->at = i;
            }
        }
        if (!plan->at) {
            g_set_error(error, BACKUP_ERROR, BACKUP_ERROR_NOT_IN_CHAIN,
                        "disk '%s': '%s' is not an older link of the chain "
                        "of '%s'",
                        disk, from, to);
            return false;
        }
        plan->full = plan->at + 1 == plan->chain->len;
    }
    if (format && !repo_format_parse(format, &plan->format)) {
        g_set_error(error, BACKUP_ERROR, BACKUP_ERROR_USAGE,
                    "the format must be qcow2 or raw");
        return false;
    }
    if (repo_encrypted(repo) && plan->format != REPO_QCOW2) {
        g_set_error(error, BACKUP_ERROR, BACKUP_ERROR_USAGE,
                    "an encrypted repository holds qcow2 images only");
        return false;
    }
    if (!plan->full && plan->format != REPO_QCOW2) {
        g_set_error(error, BACKUP_ERROR, BACKUP_ERROR_FAILED,
                    "an increment can only be qcow2");
        return false;
    }
    if (!plan->full) {
        Manifest *pm = plan->chain->pdata[plan->at + 1];

        plan->parent_id = pm->id;
        plan->parent = manifest_disk(pm, disk);
    }
    /* the links from FROM to TO's parent lose the disk; a synthetic full
     * (no FROM) keeps the older backups */
    plan->drop = g_ptr_array_new();
    depth = from ? plan->at : 0;
    for (guint i = 1; i <= depth; i++) {
        g_ptr_array_add(plan->drop, ((Manifest *)plan->chain->pdata[i])->id);
    }
    why = dependent(repo, disk, plan->drop, to, error);
    if (!why) {
        return false;
    }
    if (*why) {
        g_set_error(error, BACKUP_ERROR, BACKUP_ERROR_FAILED,
                    "disk '%s': cannot drop what another backup needs: %s",
                    disk, why);
        return false;
    }
    if (!plan->to->checksum) {
        g_set_error(error, BACKUP_ERROR, BACKUP_ERROR_CORRUPT,
                    "backup '%s' records no checksum for disk '%s'", to, disk);
        return false;
    }
    /* every link is what the manifests say before it is read */
    return repo_check_chain(repo, plan->chain, disk, error);
}

static void plan_clear(MergePlan *plan)
{
    if (plan->chain) {
        g_ptr_array_unref(plan->chain);
    }
    if (plan->drop) {
        g_ptr_array_unref(plan->drop);
    }
}

/*
 * A qcow2 merge's new image TMP, made over the new parent's image, and
 * the name to open it by: above the new parent's chain, every link named,
 * and behind the compress filter if TO was written compressed.
 */
static char *merge_target(Repo *repo, const char *disk, MergePlan *plan,
                          const char *tmp, GError **error)
{
    g_autofree char *backing = NULL;
    char *target;

    if (plan->parent) {
        backing = repo_image_name(plan->parent_id, plan->parent->format);
    }
    QemuImgCreate img = { tmp,
                          plan->to->size,
                          backing,
                          plan->parent ? repo_format_name(plan->parent->format)
                                       : NULL,
                          plan->to->compressed,
                          repo_key_file(repo),
                          REPO_KEY_SECRET };

    if (!target_create_images(&img, 1, error)) {
        return NULL;
    }
    target = repo_chain_filename(repo, plan->chain, plan->at + 1, disk, tmp);
    if (plan->to->compressed) {
        /* as TO was written: every cluster compressed */
        char *filtered =
            g_strdup_printf("json:{\"driver\": \"compress\", \"file\": %s}",
                            target + strlen("json:"));

        g_free(target);
        target = filtered;
    }
    return target;
}

/*
 * Copy what the merged links hold into TMP (TMP_DIG: its digests), over
 * the new parent, and check that the result reads as TO. STATS: the
 * copier's figures; *SUM: the checksum.
 */
static bool copy_merged(Repo *repo, const char *disk, MergePlan *plan,
                        const char *tmp, const char *tmp_dig,
                        CopierStats *stats, char **sum, GError **error)
{
    const char *to = ((Manifest *)plan->chain->pdata[0])->id;
    g_autofree char *source =
        repo_chain_filename(repo, plan->chain, 0, disk, NULL);
    g_autofree char *target = NULL;
    g_autofree char *parent_dig = NULL;
    NbdServer *nbd = NULL, *t = NULL;
    CopierOptions co;
    int dfd = -1, pfd = -1;
    bool ok = true;

    if (plan->format == REPO_QCOW2) {
        target = merge_target(repo, disk, plan, tmp, error);
        ok = target != NULL;
    }
    backup_test_crash("merge-1");
    if (ok) {
        nbd = nbd_serve(source, NULL, false, repo_key_file(repo), error);
        ok = nbd != NULL;
    }
    if (ok && target) {
        t = nbd_serve(target, NULL, true, repo_key_file(repo), error);
        ok = t != NULL;
    }
    if (ok) {
        dfd = repo_create_file(tmp_dig, error);
        if (plan->parent) {
            parent_dig = repo_digests_path(repo, disk, plan->parent_id);
            pfd = repo_open_file(parent_dig, dfd >= 0 ? error : NULL);
        }
        ok = dfd >= 0 && (!plan->parent || pfd >= 0);
    }
    if (ok) {
        CopierEndpoint src = { .uri = nbd->uri };
        CopierEndpoint dst = { .uri = t ? t->uri : NULL,
                               .file = t ? NULL : tmp };

        copier_options_init(&co);
        co.depth_limit = plan->full ? 0 : plan->at + 1;
        co.target_zeroed = plan->full;
        co.digest_fd = dfd;
        co.digest_parent_fd = pfd;
        co.digest_parent_dense = plan->parent && !plan->parent->digests_sparse;
        ok = copier_copy(&src, &dst, &co, stats, error);
        /* TO's point in time, so TO's checksum */
        ok = ok &&
             (*sum = copier_digests_checksum(
                  dfd, stats->size, false, backup_entry_sum(plan->to), error));
        if (ok && strcmp(*sum, plan->to->checksum) != 0) {
            g_set_error(error, BACKUP_ERROR, BACKUP_ERROR_MISMATCH,
                        "disk '%s': the merged image would not equal backup "
                        "'%s' (checksum %s, expected %s); a link is damaged: "
                        "run qbk-verify",
                        disk, to, *sum, plan->to->checksum);
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
    return ok && repo_fsync_path(tmp, error);
}

static json_object *merge_result(const char *disk, const char *to,
                                 const MergePlan *plan, const char *sum,
                                 const CopierStats *stats, gint64 t0)
{
    json_object *result = json_object_new_object();
    json_object *dropped = json_object_new_array();

    for (guint i = 0; i < plan->drop->len; i++) {
        json_object_array_add(dropped,
                              json_object_new_string(plan->drop->pdata[i]));
    }
    qmp_json_set_string(result, "disk", disk);
    qmp_json_set_string(result, "backup", to);
    qmp_json_set_string(result, "parent", plan->parent_id);
    qmp_json_set_string(result, "format", repo_format_name(plan->format));
    json_object_object_add(result, "dropped", dropped);
    qmp_json_set_uint(result, "bytes_copied", stats->bytes_written);
    qmp_json_set_uint(result, "bytes_read", stats->bytes_read);
    qmp_json_set_string(result, "checksum", sum);
    qmp_json_set_double(result, "copy_seconds", stats->seconds);
    qmp_json_set_double(result, "seconds", (g_get_monotonic_time() - t0) / 1e6);
    return result;
}

json_object *backup_merge(Repo *repo, const char *disk, const char *from,
                          const char *to, const char *format, GError **error)
{
    MergePlan plan = { .format = REPO_QCOW2 };
    g_autoptr(MergeJournal) j = NULL;
    g_autofree char *tmp = NULL, *tmp_dig = NULL, *sum = NULL;
    CopierStats stats = { 0 };
    json_object *result = NULL;
    gint64 t0 = g_get_monotonic_time();

    if (!plan_merge(repo, disk, from, to, format, &plan, error)) {
        plan_clear(&plan);
        return NULL;
    }
    /* the new image, beside TO's */
    tmp = repo_merging_path(repo, disk, to, plan.format);
    tmp_dig = repo_merging_digests_path(repo, disk, to);
    unlink(tmp);
    if (!copy_merged(repo, disk, &plan, tmp, tmp_dig, &stats, &sum, error)) {
        unlink(tmp);
        unlink(tmp_dig);
        plan_clear(&plan);
        return NULL;
    }
    backup_test_crash("merge-2");

    /* decided: the journal, then the steps */
    j = merge_journal_new();
    j->disk = g_strdup(disk);
    j->to = g_strdup(to);
    j->parent = g_strdup(plan.parent_id);
    j->format = plan.format;
    j->old_format = plan.to->format;
    j->digests_sparse = true; /* the copier's */
    for (guint i = 0; i < plan.drop->len; i++) {
        g_ptr_array_add(j->drop, g_strdup(plan.drop->pdata[i]));
    }
    if (repo_write_journal(repo, j, error)) {
        backup_test_crash("merge-3");
        if (roll_forward(repo, j, error)) {
            result = merge_result(disk, to, &plan, sum, &stats, t0);
        }
    }
    plan_clear(&plan);
    return result;
}
