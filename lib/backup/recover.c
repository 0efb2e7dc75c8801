/*
 * Before a backup: undo what killed runs left, in the repository and in
 * the VM. A partial manifest of this repository says which backup did not
 * finish; the VM says what of it is still there (leftover.c). A backup
 * whose manifest is durable is never rolled back, only tidied; one that
 * is not has its checkpoint merged back, its new files removed and its
 * partial manifest marked failed. Another repository's killed backup is
 * not ours to judge: it is reported, and qbk-checkpoint check --repair
 * undoes it.
 */
#include <errno.h>
#include <unistd.h>

#include "internal.h"

char *backup_now_iso(void)
{
    g_autoptr(GDateTime) now = g_date_time_new_now_utc();

    return g_date_time_format_iso8601(now);
}

bool pull_mark_failed(const Repo *repo, json_object *manifest, const char *id,
                      const char *reason, GError **error)
{
    g_autofree char *path = repo_partial_path(repo, id);
    g_autofree char *when = backup_now_iso();

    qmp_json_set_string(manifest, "status", "failed");
    qmp_json_set_string(manifest, "reason", reason);
    qmp_json_set_string(manifest, "finished", when);
    return repo_write_json(path, manifest, error);
}

/* Scratch images of a qbk older than private scratch directories, named
 * after backup TAG, in this run's scratch directory. */
static void remove_old_scratch_files(const char *dir, const char *tag)
{
    g_autoptr(GDir) d = dir ? g_dir_open(dir, 0, NULL) : NULL;
    g_autofree char *suffix = g_strdup_printf("-%s.scratch.qcow2", tag);
    const char *name;

    while (d && (name = g_dir_read_name(d))) {
        if (g_str_has_prefix(name, "qbk-s") && g_str_has_suffix(name, suffix)) {
            g_autofree char *path = g_build_filename(dir, name, NULL);

            unlink(path);
        }
    }
}

static BackupLeftover *find_tag(GPtrArray *leftovers, const char *tag)
{
    for (guint i = 0; i < leftovers->len; i++) {
        BackupLeftover *l = leftovers->pdata[i];

        if (g_strcmp0(l->tag, tag) == 0) {
            return l;
        }
    }
    return NULL;
}

/* Undo backup M of this repository, which did not finish. */
static bool recover_one(QmpClient *qmp, const Repo *repo, char **nodes,
                        const char *scratch_dir, Manifest *m, BackupLeftover *l,
                        GError **error)
{
    g_autofree char *final = repo_manifest_path(repo, m->id);
    g_autofree char *partial = repo_partial_path(repo, m->id);
    bool committed = g_file_test(final, G_FILE_TEST_EXISTS);

    if (l && !backup_undo_leftover(qmp, nodes, l, committed, error)) {
        return false;
    }
    if (!l && !committed && !undo_checkpoint(qmp, nodes, m->id, NULL, error)) {
        return false; /* QEMU restarted: only a persistent checkpoint */
    }
    if (json_object_object_get_ex(m->json, "nbd_server_socket", NULL) &&
        (!l || l->marks->len == 0)) {
        /* a qbk older than the marks said here that it started the
         * server (its socket went with its private directory) */
        qmp_run(qmp, "nbd-server-stop", NULL, NULL);
    }
    remove_old_scratch_files(scratch_dir, m->id);
    if (committed) {
        /* it finished but for its last steps; its checkpoint is good */
        unlink(partial);
        return true;
    }
    for (guint i = 0; i < m->disks->len; i++) {
        const ManifestDisk *d = m->disks->pdata[i];

        repo_remove_disk_files(repo, d->disk, m->id, d->format);
    }
    return pull_mark_failed(repo, m->json, m->id,
                            "interrupted: qbk-pull did not finish; rolled "
                            "back by the next run",
                            error);
}

bool pull_recover(QmpClient *qmp, Repo *repo, char **nodes,
                  const char *scratch_dir, GError **error)
{
    g_autoptr(GPtrArray) partials = NULL;
    g_autoptr(GPtrArray) leftovers = NULL;

    if (!backup_merge_recover(repo, error)) {
        g_prefix_error(error, "finishing an interrupted qbk-merge: ");
        return false;
    }
    partials = repo_list(repo, true, NULL, error);
    leftovers = partials ? backup_find_leftovers(qmp, nodes, error) : NULL;
    if (!leftovers) {
        return false;
    }
    for (guint i = 0; i < partials->len; i++) {
        Manifest *m = partials->pdata[i];
        BackupLeftover *l = find_tag(leftovers, m->id);
        bool ok = true;

        if (m->status == MANIFEST_IN_PROGRESS) {
            ok = recover_one(qmp, repo, nodes, scratch_dir, m, l, error);
        } else if (l) {
            /* killed in its last steps after an export was committed, or
             * while its failure was being undone */
            ok = backup_undo_leftover(qmp, nodes, l,
                                      m->status == MANIFEST_EXPORTED, error);
        }
        if (!ok) {
            g_prefix_error(error, "rolling back backup '%s': ", m->id);
            return false;
        }
        if (l) {
            g_ptr_array_remove(leftovers, l);
        }
    }
    /* killed after its manifest was written and its partial one removed:
     * only marks and temporary bitmaps are left, and the checkpoint stays */
    for (guint i = leftovers->len; i-- > 0;) {
        BackupLeftover *l = leftovers->pdata[i];
        g_autofree char *final = NULL;

        if (!repo_check_name("backup", l->tag, NULL)) {
            continue;
        }
        final = repo_manifest_path(repo, l->tag);
        if (g_file_test(final, G_FILE_TEST_EXISTS)) {
            if (!backup_undo_leftover(qmp, nodes, l, true, error)) {
                return false;
            }
            g_ptr_array_remove_index(leftovers, i);
        }
    }
    /* what is left belongs to backups of other repositories */
    for (guint i = 0; i < leftovers->len; i++) {
        BackupLeftover *l = leftovers->pdata[i];

        if (l->alive) {
            g_set_error(error, BACKUP_ERROR, BACKUP_ERROR_LOCKED,
                        "the VM has another backup at work ('%s', qbk-pull "
                        "pid %d)",
                        l->tag, (int)l->pid);
            return false;
        }
        if (l->at_work) {
            g_set_error(error, BACKUP_ERROR, BACKUP_ERROR_LEFTOVER,
                        "backup '%s' (not of this repository) was killed "
                        "and left %u object(s) in the VM",
                        l->tag, l->objects->len + l->marks->len);
            return false;
        }
    }
    return true;
}
