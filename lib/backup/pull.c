/*
 * One pull backup, start to end:
 *
 *   recover   tear down what a killed qbk-pull left, roll its checkpoint back
 *   decide    per disk: full, or the changes since which checkpoint
 *   fleece    one transaction: new checkpoint, "since" bitmaps, backup jobs
 *   export    the point-in-time view of each disk over NBD
 *   copy      lib/copier, into new qcow2 images chained to their parents
 *   finish    images durable -> tear down -> manifest -> drop "since" bitmaps
 *
 * Until the manifest is written, any failure (copier, full disk, signal,
 * QEMU or the target daemon dying) undoes it all: QEMU is torn down and the
 * new checkpoint is merged back into its predecessor, so the next
 * incremental still sees every write since the last good backup.
 */
#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "bitmap.h"
#include "internal.h"

#define MANIFEST_FORMAT "qbk-manifest-1"

static const char *const mode_names[] = {
    [BACKUP_MODE_AUTO] = "auto",
    [BACKUP_MODE_FULL] = "full",
    [BACKUP_MODE_INCREMENTAL] = "incremental",
    [BACKUP_MODE_DIFFERENTIAL] = "differential",
};

const char *backup_mode_name(BackupMode mode)
{
    return mode_names[mode];
}

bool backup_mode_parse(const char *text, BackupMode *mode)
{
    for (guint i = 0; i < G_N_ELEMENTS(mode_names); i++) {
        if (g_strcmp0(text, mode_names[i]) == 0) {
            *mode = i;
            return true;
        }
    }
    return false;
}

void backup_options_init(BackupOptions *opts)
{
    *opts = (BackupOptions){ .mode = BACKUP_MODE_AUTO, .trace_fd = -1 };
}

/* One disk of the backup. */
typedef struct {
    QmpDisk *qd;          /* borrowed from Pull.disks */
    BackupMode mode;      /* as decided: full, incremental or differential */
    char *reason;         /* why this mode (e.g. why full) */
    char *base;           /* checkpoint bitmap to copy changes since */
    char *parent;         /* parent backup id (the image's backing) */
    char *since;          /* temporary union bitmap exported, or NULL */
    FleeceDisk *fd;       /* names in QEMU */
    char *image;          /* absolute path of the new image */
    char *digests;        /* absolute path of its block digests */
    char *parent_digests; /* the parent's, or NULL */
    char *parent_format;  /* of the parent's image: qcow2 or raw */
    bool raw;             /* a full backup written as a raw file */
    CopierStats stats;
    char *checksum;
} PullDisk;

typedef struct {
    /* initialized once */
    QmpClient *qmp;
    const char *repo;
    const BackupOptions *opts;
    char *id;         /* backup id, also the tag of QEMU names */
    bool export_only; /* fleece and export for another NBD client */
    bool scheme_b;    /* fleecing with copy-before-write + snapshot-access */
    double pause_ms;  /* the VM was paused this long to fleece (B) */
    int lock_fd;
    char *scratch_dir;
    char *private_dir; /* mode 0700: the fleecing NBD socket */
    char *nbd_socket;

    /* state */
    GPtrArray *disks; /* QmpDisk*, the VM's, owned */
    GPtrArray *pds;   /* PullDisk*, owned */
    GPtrArray *fds;   /* FleeceDisk*, borrowed from pds */
    char *checkpoint; /* the new checkpoint's bitmap, once decided */
    bool fleeced;     /* the transaction ran: the checkpoint exists */
    bool server_started;
    Target *target;
    json_object *manifest; /* written as ID.partial.json until complete */
    gint64 start_us;
} Pull;

static void pull_disk_free(PullDisk *pd)
{
    g_free(pd->reason);
    g_free(pd->base);
    g_free(pd->parent);
    g_free(pd->since);
    fleece_disk_free(pd->fd);
    g_free(pd->image);
    g_free(pd->digests);
    g_free(pd->parent_digests);
    g_free(pd->parent_format);
    g_free(pd->checksum);
    g_free(pd);
}

static void pull_free(Pull *p)
{
    if (p->lock_fd >= 0) {
        close(p->lock_fd);
    }
    target_free(p->target);
    if (p->nbd_socket && p->private_dir) {
        unlink(p->nbd_socket); /* ours only */
    }
    if (p->private_dir) {
        rmdir(p->private_dir);
    }
    g_free(p->id);
    g_free(p->scratch_dir);
    g_free(p->private_dir);
    g_free(p->nbd_socket);
    if (p->disks) {
        g_ptr_array_unref(p->disks);
    }
    if (p->pds) {
        g_ptr_array_unref(p->pds);
    }
    if (p->fds) {
        g_ptr_array_unref(p->fds);
    }
    g_free(p->checkpoint);
    json_object_put(p->manifest);
    g_free(p);
}
G_DEFINE_AUTOPTR_CLEANUP_FUNC(Pull, pull_free)

static bool cancelled(Pull *p, GError **error)
{
    if (p->opts->cancel && g_atomic_int_get(p->opts->cancel)) {
        g_set_error(error, BACKUP_ERROR, BACKUP_ERROR_FAILED,
                    "interrupted by a signal");
        return true;
    }
    return false;
}

static char *now_iso(void)
{
    g_autoptr(GDateTime) now = g_date_time_new_now_utc();

    return g_date_time_format_iso8601(now);
}

/* The VM's disks, or the nodes the caller named (a qemu-storage-daemon
 * has no devices). */
static GPtrArray *query_disks(Pull *p, GError **error)
{
    g_autoptr(GPtrArray) nodes = NULL;
    g_autoptr(GPtrArray) ids = NULL;
    g_autoptr(GError) err = NULL;
    GPtrArray *disks;

    if (!p->opts->nodes) {
        return qmp_query_disks(p->qmp, error);
    }
    nodes = g_ptr_array_new_with_free_func(g_free);
    ids = g_ptr_array_new_with_free_func(g_free);
    for (guint i = 0; p->opts->nodes[i]; i++) {
        const char *spec = p->opts->nodes[i];
        const char *eq = strchr(spec, '=');

        g_ptr_array_add(nodes,
                        eq ? g_strndup(spec, eq - spec) : g_strdup(spec));
        g_ptr_array_add(ids, g_strdup(eq ? eq + 1 : spec));
    }
    g_ptr_array_add(nodes, NULL);
    g_ptr_array_add(ids, NULL);
    disks = qmp_query_node_disks(p->qmp, (const char *const *)nodes->pdata,
                                 (const char *const *)ids->pdata, &err);
    if (!disks && g_error_matches(err, QMP_ERROR, QMP_ERROR_PROTOCOL)) {
        g_set_error(error, BACKUP_ERROR, BACKUP_ERROR_NOT_FOUND, "%s",
                    err->message); /* a node that isn't there */
        return NULL;
    }
    if (!disks) {
        g_propagate_error(error, g_steal_pointer(&err));
    }
    return disks;
}

/* ---- undoing: the checkpoint of a backup that did not complete ---- */

/*
 * Merge checkpoint BITMAP back into its predecessor and drop the "since"
 * bitmaps SINCE, on the VM as it is now.
 */
static bool rollback_checkpoint(Pull *p, const char *bitmap, GPtrArray *since,
                                GError **error)
{
    QmpClient *qmp = p->qmp;
    g_autoptr(GPtrArray) disks = query_disks(p, error);
    g_autoptr(GPtrArray) cps = NULL;

    if (!disks) {
        return false;
    }
    for (guint i = 0; since && i < since->len; i++) {
        if (bitmap_drop_since(qmp, disks, since->pdata[i], error) < 0) {
            return false;
        }
    }
    cps = bitmap_list_checkpoints(disks);
    if (bitmap && bitmap_find_checkpoint(cps, bitmap)) {
        return bitmap_delete_checkpoint(qmp, disks, bitmap, error);
    }
    return true;
}

static void remove_new_files(json_object *manifest, const char *repo)
{
    json_object *disks;

    if (!json_object_object_get_ex(manifest, "disks", &disks)) {
        return;
    }
    for (size_t i = 0; i < json_object_array_length(disks); i++) {
        json_object *d = json_object_array_get_idx(disks, i);
        const char *keys[] = { "image", "digests" };

        for (size_t k = 0; k < G_N_ELEMENTS(keys); k++) {
            if (qmp_json_string(d, keys[k])) {
                g_autofree char *path =
                    g_build_filename(repo, qmp_json_string(d, keys[k]), NULL);

                unlink(path);
            }
        }
    }
}

static void mark_failed(const char *repo, json_object *manifest,
                        const char *reason)
{
    g_autofree char *path =
        repo_partial_path(repo, qmp_json_string(manifest, "id"));
    g_autofree char *when = now_iso();

    json_object_object_add(manifest, "status",
                           json_object_new_string("failed"));
    json_object_object_add(manifest, "reason", json_object_new_string(reason));
    json_object_object_add(manifest, "finished", json_object_new_string(when));
    repo_write_json(path, manifest, NULL);
}

/* The scratch images of backup TAG (QEMU's node may no longer say where). */
static void remove_scratch_files(const char *dir, const char *tag)
{
    g_autoptr(GDir) d = g_dir_open(dir, 0, NULL);
    g_autofree char *suffix = g_strdup_printf("-%s.scratch.qcow2", tag);
    const char *name;

    while (d && (name = g_dir_read_name(d))) {
        if (g_str_has_prefix(name, "qbk-s") && g_str_has_suffix(name, suffix)) {
            g_autofree char *path = g_build_filename(dir, name, NULL);

            unlink(path);
        }
    }
}

/* Undo what a qbk-pull that died left behind, as its partial manifest
 * tells. */
static bool recover(Pull *p, GError **error)
{
    g_autoptr(GPtrArray) partials = NULL;

    if (!backup_merge_recover(p->repo, error)) {
        g_prefix_error(error, "finishing an interrupted qbk-merge: ");
        return false;
    }
    partials = repo_list_partial(p->repo, error);
    if (!partials) {
        return false;
    }
    for (guint i = 0; i < partials->len; i++) {
        json_object *m = partials->pdata[i];
        g_autoptr(GPtrArray) since = g_ptr_array_new();
        g_autofree char *foreign = NULL;
        json_object *disks;

        g_autofree char *final = NULL;
        g_autofree char *partial = NULL;
        const char *scratch_dir;

        if (g_strcmp0(qmp_json_string(m, "status"), "in-progress") != 0) {
            continue;
        }
        if (json_object_object_get_ex(m, "disks", &disks)) {
            for (size_t d = 0; d < json_object_array_length(disks); d++) {
                const char *s = qmp_json_string(
                    json_object_array_get_idx(disks, d), "since");

                if (s) {
                    g_ptr_array_add(since, (char *)s);
                }
            }
        }
        final = repo_manifest_path(p->repo, qmp_json_string(m, "id"));
        if (g_file_test(final, G_FILE_TEST_EXISTS)) {
            /* It completed (QEMU was torn down before the manifest was
             * written) and died in its last steps: only the transient
             * bitmaps and this file are left. Its checkpoint is good. */
            rollback_checkpoint(p, NULL, since, NULL);
            partial = repo_partial_path(p->repo, qmp_json_string(m, "id"));
            unlink(partial);
            continue;
        }
        scratch_dir = qmp_json_string(m, "scratch_dir")
                          ? qmp_json_string(m, "scratch_dir")
                          : p->scratch_dir;
        if (!fleece_cleanup_tag(p->qmp, qmp_json_string(m, "id"), scratch_dir,
                                &foreign, error)) {
            g_prefix_error(error, "cleaning up after backup '%s': ",
                           qmp_json_string(m, "id"));
            return false;
        }
        if (qmp_json_bool(m, "pausing")) {
            /* killed while the VM was paused to fleece: resume it */
            g_autofree char *st = qmp_query_status(p->qmp, NULL, NULL);

            if (g_strcmp0(st, "paused") == 0) {
                qmp_run(p->qmp, "cont", NULL, NULL);
            }
        }
        if (qmp_json_string(m, "nbd_server_socket")) {
            qmp_run(p->qmp, "nbd-server-stop", NULL, NULL);
            unlink(qmp_json_string(m, "nbd_server_socket"));
        }
        if (!rollback_checkpoint(p, qmp_json_string(m, "checkpoint_bitmap"),
                                 since, error)) {
            g_prefix_error(
                error, "rolling back backup '%s': ", qmp_json_string(m, "id"));
            return false;
        }
        /* the nodes may be gone (QEMU restarted) while files stay */
        remove_scratch_files(scratch_dir, qmp_json_string(m, "id"));
        remove_new_files(m, p->repo);
        mark_failed(p->repo, m,
                    "interrupted: qbk-pull did not finish; "
                    "rolled back by the next run");
    }
    return true;
}

/* ---- deciding what each disk needs ---- */

/* The newest complete backup that has DISK and satisfies WANT_FULL. */
static json_object *find_backup(GPtrArray *backups, const char *disk,
                                bool want_full, const char *checkpoint)
{
    for (guint i = backups->len; i-- > 0;) {
        json_object *m = backups->pdata[i];
        json_object *d = manifest_disk(m, disk);

        if (!d) {
            continue;
        }
        if (want_full && g_strcmp0(qmp_json_string(d, "mode"), "full") != 0) {
            continue;
        }
        if (checkpoint &&
            g_strcmp0(qmp_json_string(m, "id"), checkpoint) != 0 &&
            g_strcmp0(qmp_json_string(m, "checkpoint"), checkpoint) != 0 &&
            g_strcmp0(qmp_json_string(m, "checkpoint_bitmap"), checkpoint) !=
                0) {
            continue;
        }
        return m;
    }
    return NULL;
}

G_GNUC_PRINTF(4, 5)
static bool need_full(Pull *p, PullDisk *pd, GError **error, const char *fmt,
                      ...)
{
    g_autofree char *why = NULL;
    va_list ap;

    va_start(ap, fmt);
    why = g_strdup_vprintf(fmt, ap);
    va_end(ap);
    if (p->opts->mode != BACKUP_MODE_AUTO) {
        g_set_error(error, BACKUP_ERROR, BACKUP_ERROR_FULL_NEEDED,
                    "disk '%s': %s: a full backup is needed", pd->qd->id, why);
        return false;
    }
    pd->mode = BACKUP_MODE_FULL;
    pd->reason = g_strdup(why);
    return true;
}

static bool decide(Pull *p, PullDisk *pd, GPtrArray *backups,
                   BitmapCheck *check, GError **error)
{
    QmpDisk *qd = pd->qd;
    bool want_full = p->opts->mode == BACKUP_MODE_DIFFERENTIAL;
    json_object *m, *entry;
    const BitmapDiskVerdict *v;
    int i;

    if (qd->no_bitmaps) {
        /* It can never have a chain: full every time, whatever the mode
         * (an error here would block every incremental of the VM). */
        pd->mode = BACKUP_MODE_FULL;
        pd->reason =
            g_strdup_printf("no checkpoints on this disk (%s)", qd->no_bitmaps);
        return true;
    }
    if (p->export_only && p->opts->since) {
        /* Another NBD client keeps its own chain: the checkpoint is
         * looked up in the VM, not in the repository. */
        g_autoptr(GPtrArray) cps = bitmap_list_checkpoints(p->disks);
        BitmapCheckpoint *cp = bitmap_find_checkpoint(cps, p->opts->since);

        v = bitmap_check_verdict(check, qd);
        i = bitmap_verdict_find(v, cp ? cp->bitmap : NULL);
        if (i < 0 || (guint)i < v->untrusted) {
            return need_full(p, pd, error,
                             "checkpoint '%s' is missing or untrusted",
                             p->opts->since);
        }
        pd->mode = BACKUP_MODE_INCREMENTAL;
        pd->base = g_strdup(cp->bitmap);
        pd->reason = g_strdup_printf("changes since checkpoint '%s'", cp->name);
        return true;
    }
    if (p->opts->mode == BACKUP_MODE_FULL && !p->opts->since) {
        pd->mode = BACKUP_MODE_FULL;
        pd->reason = g_strdup("asked for");
        return true;
    }
    m = find_backup(backups, qd->id, want_full, p->opts->since);
    if (!m) {
        return need_full(p, pd, error, "%s",
                         p->opts->since ? "no backup of it at that checkpoint"
                                        : "no earlier backup of this disk");
    }
    entry = manifest_disk(m, qd->id);
    if ((guint64)qmp_json_int(entry, "size") != qd->size) {
        return need_full(p, pd, error, "resized since backup '%s'",
                         qmp_json_string(m, "id"));
    }
    if (!qmp_json_string(m, "checkpoint_bitmap") ||
        !qmp_json_bool(entry, "checkpointed")) {
        return need_full(p, pd, error, "backup '%s' has no checkpoint",
                         qmp_json_string(m, "id"));
    }
    v = bitmap_check_verdict(check, qd);
    i = bitmap_verdict_find(v, qmp_json_string(m, "checkpoint_bitmap"));
    if (i < 0) {
        return need_full(p, pd, error, "checkpoint '%s' is missing",
                         qmp_json_string(m, "checkpoint"));
    }
    if ((guint)i < v->untrusted) {
        return need_full(p, pd, error,
                         "checkpoint '%s' cannot be trusted (QEMU was "
                         "killed, or a bitmap is missing)",
                         qmp_json_string(m, "checkpoint"));
    }
    pd->mode = p->opts->mode == BACKUP_MODE_DIFFERENTIAL
                   ? BACKUP_MODE_DIFFERENTIAL
                   : BACKUP_MODE_INCREMENTAL;
    pd->base = g_strdup(qmp_json_string(m, "checkpoint_bitmap"));
    pd->parent = g_strdup(qmp_json_string(m, "id"));
    pd->parent_digests =
        g_build_filename(p->repo, qmp_json_string(entry, "digests"), NULL);
    pd->parent_format = g_strdup(qmp_json_string(entry, "format")
                                     ? qmp_json_string(entry, "format")
                                     : "qcow2");
    pd->reason = g_strdup_printf("changes since checkpoint '%s'",
                                 qmp_json_string(m, "checkpoint"));
    return true;
}

/* ---- the manifest ---- */

static json_object *disk_json(Pull *p, PullDisk *pd)
{
    json_object *o = json_object_new_object();
    g_autofree char *file = repo_disk_file_name(pd->qd->id);
    g_autofree char *image = g_strdup_printf("disks/%s/%s.%s", file, p->id,
                                             pd->raw ? "raw" : "qcow2");
    g_autofree char *digests =
        g_strdup_printf("disks/%s/%s.digests", file, p->id);

    json_object_object_add(o, "disk", json_object_new_string(pd->qd->id));
    json_object_object_add(o, "node", json_object_new_string(pd->qd->node));
    json_object_object_add(o, "size", json_object_new_uint64(pd->qd->size));
    json_object_object_add(o, "mode",
                           json_object_new_string(mode_names[pd->mode]));
    json_object_object_add(o, "reason", json_object_new_string(pd->reason));
    json_object_object_add(
        o, "parent", pd->parent ? json_object_new_string(pd->parent) : NULL);
    json_object_object_add(o, "since_checkpoint",
                           pd->base ? json_object_new_string(pd->base) : NULL);
    json_object_object_add(
        o, "since", pd->since ? json_object_new_string(pd->since) : NULL);
    json_object_object_add(o, "checkpointed",
                           json_object_new_boolean(!pd->qd->no_bitmaps));
    json_object_object_add(o, "image", json_object_new_string(image));
    json_object_object_add(o, "format",
                           json_object_new_string(pd->raw ? "raw" : "qcow2"));
    json_object_object_add(o, "digests", json_object_new_string(digests));
    return o;
}

static bool write_partial(Pull *p, GError **error)
{
    g_autofree char *path = repo_partial_path(p->repo, p->id);

    return repo_write_json(path, p->manifest, error);
}

/* What the copier did beyond copying: notices, releases, pacing. */
static json_object *copier_json(Pull *p, const CopierStats *s)
{
    json_object *o = json_object_new_object();

    json_object_object_add(o, "read_ms_mean",
                           json_object_new_double(s->read_ms_mean));
    json_object_object_add(o, "notices", json_object_new_uint64(s->notices));
    json_object_object_add(o, "bytes_bumped",
                           json_object_new_uint64(s->bytes_bumped));
    json_object_object_add(o, "bytes_released",
                           json_object_new_uint64(s->bytes_released));
    json_object_object_add(o, "release_errors",
                           json_object_new_uint64(s->release_errors));
    if (p->opts->latency_target_us) {
        json_object *w = json_object_new_object();

        json_object_object_add(
            w, "target_us", json_object_new_uint64(p->opts->latency_target_us));
        json_object_object_add(w, "min", json_object_new_int(s->window_min));
        json_object_object_add(w, "max", json_object_new_int(s->window_max));
        json_object_object_add(w, "mean",
                               json_object_new_double(s->window_mean));
        json_object_object_add(w, "cuts", json_object_new_int(s->pacing_cuts));
        json_object_object_add(o, "pacing", w);
    }
    return o;
}

static void add_results(Pull *p)
{
    json_object *disks;
    guint64 total = 0;
    double seconds = (g_get_monotonic_time() - p->start_us) / 1e6;
    g_autofree char *when = now_iso();

    json_object_object_get_ex(p->manifest, "disks", &disks);
    for (guint i = 0; i < p->pds->len; i++) {
        PullDisk *pd = p->pds->pdata[i];
        json_object *d = json_object_array_get_idx(disks, i);
        json_object *sum = json_object_new_object();
        const CopierStats *s = &pd->stats;
        double mib = s->bytes_read / 1048576.0;

        json_object_object_add(d, "bytes_copied",
                               json_object_new_uint64(s->bytes_written));
        json_object_object_add(d, "bytes_read",
                               json_object_new_uint64(s->bytes_read));
        json_object_object_add(d, "bytes_zero",
                               json_object_new_uint64(s->bytes_zero));
        json_object_object_add(d, "bytes_skipped",
                               json_object_new_uint64(s->bytes_skipped));
        json_object_object_add(d, "seconds",
                               json_object_new_double(s->seconds));
        json_object_object_add(
            d, "throughput_mib_s",
            json_object_new_double(s->seconds > 0 ? mib / s->seconds : 0));
        json_object_object_add(
            sum, "algorithm",
            json_object_new_string(COPIER_CHECKSUM_ALGORITHM));
        json_object_object_add(sum, "value",
                               json_object_new_string(pd->checksum));
        json_object_object_add(d, "checksum", sum);
        json_object_object_add(d, "copier", copier_json(p, s));
        total += s->bytes_written;
    }
    json_object_object_add(p->manifest, "status",
                           json_object_new_string("complete"));
    json_object_object_add(p->manifest, "finished",
                           json_object_new_string(when));
    json_object_object_add(p->manifest, "seconds",
                           json_object_new_double(seconds));
    json_object_object_add(p->manifest, "bytes_copied",
                           json_object_new_uint64(total));
}

/* ---- the steps ---- */

static bool vm_running(QmpClient *qmp)
{
    bool running = false;
    g_autofree char *st = qmp_query_status(qmp, &running, NULL);

    return st && running;
}

/*
 * Scheme B, after the first transaction: put the filters in and stop the
 * older bitmaps. The filter goes in with qom-set or blockdev-reopen,
 * which no transaction can hold, so: (1) the first transaction added the
 * new checkpoint (and the "since" bitmaps, recording); (2) the filters go
 * in: that is the point in time, the same instant for all disks because a
 * running VM is paused around it; (3) LATER stops the older checkpoints
 * and the "since" bitmaps. Every write before (2) is in the old bitmaps,
 * every write after it in the new one; writes between (1) and (3) are in
 * both, which costs a few bytes of the next backup, never a missed write.
 */
static bool insert_filters(Pull *p, QmpTransaction *later, GError **error)
{
    g_autoptr(GError) cont_err = NULL;
    bool stopped = false, ok = true;
    gint64 paused_at = 0;

    if (p->pds->len > 1 && vm_running(p->qmp)) {
        /* a run that finds this set after a kill resumes the VM */
        json_object_object_add(p->manifest, "pausing",
                               json_object_new_boolean(1));
        if (!write_partial(p, error)) {
            return false;
        }
        paused_at = g_get_monotonic_time();
        if (!qmp_run(p->qmp, "stop", NULL, error)) {
            g_prefix_error(error, "cannot pause the VM: ");
            return false;
        }
        stopped = true;
    }
    for (guint i = 0; ok && i < p->pds->len; i++) {
        ok = fleece_b_insert(p->qmp, ((PullDisk *)p->pds->pdata[i])->fd, error);
    }
    if (stopped) {
        if (!qmp_run(p->qmp, "cont", NULL, &cont_err) && ok) {
            g_set_error(error, BACKUP_ERROR, BACKUP_ERROR_FAILED,
                        "the VM was paused to fleece and could not be "
                        "resumed: %s",
                        cont_err->message);
            ok = false;
        }
        p->pause_ms = (g_get_monotonic_time() - paused_at) / 1e3;
        json_object_object_add(p->manifest, "pause_ms",
                               json_object_new_double(p->pause_ms));
        json_object_object_del(p->manifest, "pausing");
        if (ok && !write_partial(p, error)) {
            return false;
        }
    }
    if (!ok) {
        return false;
    }
    if (!qmp_transaction_run(p->qmp, later, error)) {
        g_prefix_error(error, "cannot stop the older checkpoints: ");
        return false;
    }
    return true;
}

/*
 * Fix the point in time. Scheme A: one transaction adds the checkpoint
 * and "since" bitmaps, stops the older ones and starts the sync=none
 * backup jobs. Scheme B: the same bitmap actions, but the older ones stop
 * in a second transaction once the filters are in (insert_filters).
 */
static bool fleece(Pull *p, GError **error)
{
    g_autoptr(QmpTransaction) tx = qmp_transaction_new();
    g_autoptr(QmpTransaction) later =
        p->scheme_b ? qmp_transaction_new() : NULL;
    g_autoptr(GPtrArray) targets = g_ptr_array_new();

    for (guint i = 0; i < p->pds->len; i++) {
        PullDisk *pd = p->pds->pdata[i];

        if (!fleece_add_scratch(p->qmp, pd->fd, pd->qd->size, error)) {
            return false;
        }
        g_ptr_array_add(p->fds, pd->fd);
        if (p->scheme_b && !fleece_b_add_filter(p->qmp, pd->fd, error)) {
            return false;
        }
        if (!pd->qd->no_bitmaps) {
            g_ptr_array_add(targets, pd->qd);
        }
        if (pd->base && !bitmap_add_since_actions(tx, later, p->disks, pd->qd,
                                                  pd->base, pd->since, error)) {
            return false;
        }
    }
    if (targets->len &&
        !(p->checkpoint = bitmap_add_checkpoint_actions_split(
              tx, later ? later : tx, p->disks, targets, p->id, 0, error))) {
        return false;
    }
    for (guint i = 0; !p->scheme_b && i < p->pds->len; i++) {
        fleece_add_backup_action(tx, ((PullDisk *)p->pds->pdata[i])->fd);
    }
    json_object_object_add(p->manifest, "checkpoint_bitmap",
                           p->checkpoint ? json_object_new_string(p->checkpoint)
                                         : NULL);
    /* Written before the transaction: if we die after it, the next run
     * knows which checkpoint to roll back. */
    if (!write_partial(p, error)) {
        return false;
    }
    if (!qmp_transaction_run(p->qmp, tx, error)) {
        g_prefix_error(error, "cannot start fleecing: ");
        return false;
    }
    p->fleeced = true;
    if (later && !insert_filters(p, later, error)) {
        return false;
    }
    if (p->opts->fleeced) {
        p->opts->fleeced(p->id, p->opts->fleeced_opaque);
    }
    return true;
}

static bool export_all(Pull *p, GError **error)
{
    if (p->opts->nbd_server) {
        /* Someone else's server: use it, never stop it. */
        p->nbd_socket = g_strdup(p->opts->nbd_server);
        p->server_started = false;
        for (guint i = 0; i < p->pds->len; i++) {
            PullDisk *pd = p->pds->pdata[i];

            if (!fleece_export(p->qmp, pd->fd, pd->since, error)) {
                return false;
            }
        }
        return true;
    }
    p->private_dir = g_dir_make_tmp("qbk-pull-XXXXXX", error);
    if (!p->private_dir) {
        return false;
    }
    p->nbd_socket = g_build_filename(p->private_dir, "nbd.sock", NULL);
    /* Only a server we started is ours to stop, now or after a crash:
     * say so before starting it (a kill right after must not leave it),
     * and take it back if one was running already. */
    json_object_object_add(p->manifest, "nbd_server_socket",
                           json_object_new_string(p->nbd_socket));
    if (!write_partial(p, error)) {
        return false;
    }
    if (!fleece_start_server(p->qmp, p->nbd_socket, &p->server_started,
                             error)) {
        json_object_object_del(p->manifest, "nbd_server_socket");
        write_partial(p, NULL);
        return false;
    }
    for (guint i = 0; i < p->pds->len; i++) {
        PullDisk *pd = p->pds->pdata[i];

        if (!fleece_export(p->qmp, pd->fd, pd->since, error)) {
            return false;
        }
    }
    return true;
}

static bool make_targets(Pull *p, GError **error)
{
    g_autoptr(GPtrArray) images = g_ptr_array_new();
    g_autoptr(GPtrArray) names = g_ptr_array_new();

    for (guint i = 0; i < p->pds->len; i++) {
        PullDisk *pd = p->pds->pdata[i];
        g_autofree char *dir = repo_disk_dir(p->repo, pd->qd->id);
        g_autofree char *backing = NULL;

        if (g_mkdir_with_parents(dir, 0755) < 0) {
            g_set_error(error, BACKUP_ERROR, BACKUP_ERROR_FAILED,
                        "cannot create '%s': %s", dir, g_strerror(errno));
            return false;
        }
        if (pd->raw) {
            continue; /* the copier writes the file itself */
        }
        if (pd->parent) {
            backing = g_strdup_printf("%s.%s", pd->parent, pd->parent_format);
        }
        if (!target_create_image(pd->image, pd->qd->size, backing,
                                 pd->parent_format, error)) {
            return false;
        }
        g_ptr_array_add(images, pd->image);
        g_ptr_array_add(names, pd->qd->id);
    }
    if (images->len == 0) {
        return true;
    }
    g_ptr_array_add(images, NULL);
    g_ptr_array_add(names, NULL);
    p->target =
        target_start((char **)images->pdata, (char **)names->pdata, error);
    return p->target != NULL;
}

typedef struct {
    Pull *p;
    guint index;
} ProgressCtx;

static void on_progress(const CopierStats *stats, void *opaque)
{
    ProgressCtx *ctx = opaque;
    Pull *p = ctx->p;
    BackupProgress bp = {
        .disk = ((PullDisk *)p->pds->pdata[ctx->index])->qd->id,
        .index = ctx->index,
        .count = p->pds->len,
        .stats = *stats,
    };

    p->opts->progress(&bp, p->opts->progress_opaque);
}

static bool copy_all(Pull *p, GError **error)
{
    for (guint i = 0; i < p->pds->len; i++) {
        PullDisk *pd = p->pds->pdata[i];
        CopierEndpoint src = { .socket = p->nbd_socket, .name = pd->qd->id };
        CopierEndpoint dst = { .file = pd->image };
        CopierEndpoint notices = {
            .socket = p->nbd_socket,
            .name = p->scheme_b ? pd->fd->notice_export : pd->qd->id,
        };
        ProgressCtx ctx = { p, i };
        CopierOptions co;
        int dfd, pfd = -1;
        bool ok;

        if (cancelled(p, error)) {
            return false;
        }
        if (!pd->raw) {
            dst = (CopierEndpoint){ .socket = p->target->socket,
                                    .name = pd->qd->id };
        }
        copier_options_init(&co);
        if (p->opts->requests) {
            co.requests = p->opts->requests;
        }
        if (p->opts->connections) {
            co.connections = p->opts->connections;
        }
        if (p->opts->chunk_size) {
            co.chunk_size = p->opts->chunk_size;
        }
        co.bitmap = pd->since;
        co.target_zeroed = pd->mode == BACKUP_MODE_FULL;
        co.rate_limit = p->opts->rate_limit;
        if (!p->opts->no_notices) {
            /* A: the fleecing export's own allocation depth; B: the
             * scratch node's map. Both show what the guest overwrote. */
            co.notices = &notices;
            co.notice_context =
                p->scheme_b ? "base:allocation" : "qemu:allocation-depth";
        }
        co.release = p->scheme_b && !p->opts->no_release;
        co.latency_target_us = p->opts->latency_target_us;
        co.trace_fd = p->opts->trace_fd;
        co.cancel = p->opts->cancel;
        if (p->opts->progress) {
            co.progress = on_progress;
            co.progress_opaque = &ctx;
        }
        dfd = open(pd->digests, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
        if (pd->parent_digests) {
            pfd = open(pd->parent_digests, O_RDONLY | O_CLOEXEC);
        }
        if (dfd < 0 || (pd->parent_digests && pfd < 0)) {
            g_set_error(error, BACKUP_ERROR, BACKUP_ERROR_FAILED,
                        "cannot open the digests of disk '%s': %s", pd->qd->id,
                        g_strerror(errno));
            if (dfd >= 0) {
                close(dfd);
            }
            return false;
        }
        co.digest_fd = dfd;
        co.digest_parent_fd = pfd;
        ok = copier_copy(&src, &dst, &co, &pd->stats, error);
        if (ok) {
            pd->checksum = copier_digests_checksum(dfd, pd->qd->size, error);
            ok = pd->checksum && fsync(dfd) == 0;
        }
        close(dfd);
        if (pfd >= 0) {
            close(pfd);
        }
        if (!ok &&
            g_error_matches(*error, COPIER_ERROR, COPIER_ERROR_CANCELLED)) {
            g_clear_error(error);
            g_set_error(error, BACKUP_ERROR, BACKUP_ERROR_FAILED,
                        "interrupted by a signal");
            return false;
        }
        if (!ok) {
            g_prefix_error(error, "disk '%s': ", pd->qd->id);
            return false;
        }
    }
    return true;
}

/* The images are complete only when the daemon flushed and exited
 * cleanly; then make them durable. */
static bool finish_targets(Pull *p, GError **error)
{
    bool ok = !p->target || target_stop(p->target, error);

    target_free(p->target);
    p->target = NULL;
    for (guint i = 0; ok && i < p->pds->len; i++) {
        PullDisk *pd = p->pds->pdata[i];
        g_autofree char *dir = g_path_get_dirname(pd->image);

        ok = repo_fsync_path(pd->image, error) && repo_fsync_path(dir, error);
    }
    return ok;
}

/* The "since" bitmaps of the backup's disks (borrowed strings). */
static GPtrArray *since_bitmaps(Pull *p)
{
    GPtrArray *since = g_ptr_array_new();

    for (guint i = 0; i < p->pds->len; i++) {
        PullDisk *pd = p->pds->pdata[i];

        if (pd->since) {
            g_ptr_array_add(since, pd->since);
        }
    }
    return since;
}

static void fail_and_undo(Pull *p, GError *why)
{
    g_autoptr(GError) err = NULL;
    g_autoptr(GPtrArray) since = since_bitmaps(p);
    GString *reason = g_string_new(why->message);

    target_free(p->target);
    p->target = NULL;
    if (p->fds->len &&
        !fleece_teardown(p->qmp, p->fds, p->server_started, &err)) {
        g_string_append_printf(reason, "; teardown: %s", err->message);
        g_clear_error(&err);
    }
    if (p->fleeced && !rollback_checkpoint(p, p->checkpoint, since, &err)) {
        g_string_append_printf(reason,
                               "; could not roll the checkpoint back (%s): "
                               "the next backup of each disk will be full",
                               err->message);
    }
    if (p->manifest) {
        remove_new_files(p->manifest, p->repo);
        mark_failed(p->repo, p->manifest, reason->str);
    }
    g_free(why->message);
    why->message = g_string_free(reason, FALSE);
}

static bool unique_id(Pull *p, GError **error)
{
    g_autoptr(GDateTime) now = g_date_time_new_now_utc();
    g_autofree char *base = g_date_time_format(now, "%Y%m%dT%H%M%SZ");
    /* The id names the checkpoint too: another repository's backup of
     * this VM in the same second must not collide with it. */
    g_autoptr(GPtrArray) cps = bitmap_list_checkpoints(p->disks);

    for (int n = 1; n < 1000; n++) {
        g_autofree char *id =
            n == 1 ? g_strdup(base) : g_strdup_printf("%s.%d", base, n);
        g_autofree char *m = repo_manifest_path(p->repo, id);
        g_autofree char *pm = repo_partial_path(p->repo, id);

        if (!g_file_test(m, G_FILE_TEST_EXISTS) &&
            !g_file_test(pm, G_FILE_TEST_EXISTS) &&
            !bitmap_find_checkpoint(cps, id)) {
            p->id = g_steal_pointer(&id);
            return true;
        }
    }
    g_set_error(error, BACKUP_ERROR, BACKUP_ERROR_FAILED,
                "cannot find a free backup id");
    return false;
}

/* Whether QEMU can pause the guest (a system emulator, not a
 * qemu-storage-daemon). */
static bool can_pause(QmpClient *qmp)
{
    g_autofree char *st = qmp_query_status(qmp, NULL, NULL);

    return st != NULL;
}

/*
 * Scheme B (copy-before-write + snapshot-access, QEMU >= 7.1) releases
 * copied regions. The filter goes right above each disk's format node,
 * under its one user (a device, or a pass-through filter such as throttle):
 * a node with other users (an export, a job) would have writes the filter
 * misses. Several disks need a pause for one instant, which only a system
 * emulator can do. --export-only stays on A: a foreign client could not
 * be told that a trim makes a region unreadable. Auto falls back to A
 * wherever B cannot be done; an explicit B fails with the reason.
 */
static bool choose_scheme(Pull *p, int version, GError **error)
{
    g_autofree char *why = NULL;

    if (version < 701) {
        why = g_strdup("QEMU is older than 7.1 (no snapshot-access)");
    } else if (p->export_only) {
        why = g_strdup("--export-only serves another NBD client");
    } else if (p->opts->fleece == BACKUP_FLEECE_A) {
        why = g_strdup("--fleece A");
    } else if (p->pds->len > 1 && !can_pause(p->qmp)) {
        why = g_strdup("QEMU cannot pause to fleece several disks at once");
    }
    for (guint i = 0; !why && i < p->pds->len; i++) {
        PullDisk *pd = p->pds->pdata[i];
        g_autoptr(GError) err = NULL;

        if (!qmp_insert_point(p->qmp, pd->qd->node, &pd->fd->point, &err)) {
            why = g_strdup_printf("disk '%s': %s", pd->qd->id, err->message);
        } else if (!pd->fd->point.reopen && !pd->fd->point.qom) {
            why = g_strdup_printf("disk '%s' has no user", pd->qd->id);
        }
    }
    if (p->opts->fleece == BACKUP_FLEECE_B && why) {
        g_set_error(error, BACKUP_ERROR, BACKUP_ERROR_FAILED,
                    "cannot fleece with scheme B: %s", why);
        return false;
    }
    p->scheme_b = !why;
    for (guint i = 0; i < p->pds->len; i++) {
        ((PullDisk *)p->pds->pdata[i])->fd->scheme_b = p->scheme_b;
    }
    return true;
}

static bool prepare(Pull *p, GError **error)
{
    g_autoptr(GPtrArray) backups = NULL;
    g_autoptr(BitmapCheck) check = NULL;
    g_autofree char *foreign = NULL;
    g_autofree char *when = now_iso();
    g_autofree char *version = NULL;
    json_object *jdisks;
    int major, minor, micro;

    if (!recover(p, error)) {
        return false;
    }
    if (!fleece_cleanup_tag(p->qmp, NULL, NULL, &foreign, error)) {
        return false;
    }
    if (foreign) {
        g_set_error(error, BACKUP_ERROR, BACKUP_ERROR_LOCKED,
                    "the VM has another backup at work ('%s')", foreign);
        return false;
    }
    p->disks = query_disks(p, error);
    backups = p->disks ? backup_list(p->repo, error) : NULL;
    if (!backups || !unique_id(p, error)) {
        return false;
    }
    check = bitmap_check(p->disks);

    for (guint i = 0; i < p->disks->len; i++) {
        QmpDisk *qd = p->disks->pdata[i];
        PullDisk *pd;
        g_autofree char *dir = NULL;
        g_autofree char *since = NULL;

        if (p->opts->disks &&
            !g_strv_contains((const char *const *)p->opts->disks, qd->id)) {
            continue;
        }
        pd = g_new0(PullDisk, 1);
        pd->qd = qd;
        g_ptr_array_add(p->pds, pd);
        if (!decide(p, pd, backups, check, error)) {
            return false;
        }
        if (pd->base) {
            pd->since = g_strdup_printf("qbk-since-%s-%u", p->id, i);
        }
        pd->fd = fleece_disk_new(qd->id, qd->node, i, p->id, p->scratch_dir);
        dir = repo_disk_dir(p->repo, qd->id);
        pd->raw = pd->mode == BACKUP_MODE_FULL &&
                  g_strcmp0(p->opts->format, "raw") == 0;
        since = g_strdup_printf("%s.%s", p->id, pd->raw ? "raw" : "qcow2");
        pd->image = g_build_filename(dir, since, NULL);
        g_free(since);
        since = g_strdup_printf("%s.digests", p->id);
        pd->digests = g_build_filename(dir, since, NULL);
    }
    for (guint i = 0; p->opts->disks && p->opts->disks[i]; i++) {
        if (!qmp_disk_find(p->disks, p->opts->disks[i])) {
            g_set_error(error, BACKUP_ERROR, BACKUP_ERROR_NOT_FOUND,
                        "the VM has no disk '%s'", p->opts->disks[i]);
            return false;
        }
    }
    if (p->pds->len == 0) {
        g_set_error(error, BACKUP_ERROR, BACKUP_ERROR_NOT_FOUND,
                    "the VM has no disk to back up");
        return false;
    }

    qmp_get_version(p->qmp, &major, &minor, &micro);
    if (!choose_scheme(p, major * 100 + minor, error)) {
        return false;
    }
    p->manifest = json_object_new_object();
    json_object_object_add(p->manifest, "format",
                           json_object_new_string(MANIFEST_FORMAT));
    json_object_object_add(p->manifest, "id", json_object_new_string(p->id));
    json_object_object_add(p->manifest, "status",
                           json_object_new_string("in-progress"));
    json_object_object_add(p->manifest, "created",
                           json_object_new_string(when));
    version = g_strdup_printf("%d.%d.%d", major, minor, micro);
    json_object_object_add(p->manifest, "qemu",
                           json_object_new_string(version));
    json_object_object_add(p->manifest, "checkpoint",
                           json_object_new_string(p->id));
    json_object_object_add(p->manifest, "scratch_dir",
                           json_object_new_string(p->scratch_dir));
    json_object_object_add(p->manifest, "fleece",
                           json_object_new_string(p->scheme_b ? "B" : "A"));
    jdisks = json_object_new_array();
    for (guint i = 0; i < p->pds->len; i++) {
        json_object_array_add(jdisks, disk_json(p, p->pds->pdata[i]));
    }
    json_object_object_add(p->manifest, "disks", jdisks);
    return write_partial(p, error);
}

/* Lock, recover, decide: everything before QEMU is touched. */
static Pull *pull_begin(QmpClient *qmp, const char *repo,
                        const BackupOptions *opts, bool export_only,
                        GError **error)
{
    g_autoptr(Pull) p = g_new0(Pull, 1);
    g_autoptr(GError) err = NULL;

    p->qmp = qmp;
    p->repo = repo;
    p->opts = opts;
    p->export_only = export_only;
    p->start_us = g_get_monotonic_time();
    p->pds = g_ptr_array_new_with_free_func((GDestroyNotify)pull_disk_free);
    p->fds = g_ptr_array_new();
    p->scratch_dir = opts->scratch_dir
                         ? g_strdup(opts->scratch_dir)
                         : g_build_filename(repo, ".scratch", NULL);

    p->lock_fd = repo_open_locked(repo, error);
    if (p->lock_fd < 0) {
        return NULL;
    }
    if (g_mkdir_with_parents(p->scratch_dir, 0700) < 0) {
        g_set_error(error, BACKUP_ERROR, BACKUP_ERROR_FAILED,
                    "cannot create '%s': %s", p->scratch_dir,
                    g_strerror(errno));
        return NULL;
    }
    if (!prepare(p, &err)) {
        if (p->manifest) {
            mark_failed(repo, p->manifest, err->message);
        }
        g_propagate_error(error, g_steal_pointer(&err));
        return NULL;
    }
    return g_steal_pointer(&p);
}

/* Report ERR as the backup's failure, after undoing everything. */
static void pull_fail(Pull *p, GError *err, GError **error)
{
    fail_and_undo(p, err);
    if (err->domain != BACKUP_ERROR) {
        g_set_error(error, BACKUP_ERROR, BACKUP_ERROR_FAILED, "%s",
                    err->message);
        g_error_free(err);
    } else {
        g_propagate_error(error, err);
    }
}

/* Drop the transient "since" bitmaps, on the VM as it is now. */
static void drop_since(Pull *p)
{
    g_autoptr(GPtrArray) since = since_bitmaps(p);

    rollback_checkpoint(p, NULL, since, NULL);
}

json_object *backup_export(QmpClient *qmp, const char *repo,
                           const BackupOptions *opts, BackupExportWait wait,
                           void *opaque, GError **error)
{
    g_autoptr(Pull) p = pull_begin(qmp, repo, opts, true, error);
    GError *err = NULL;
    json_object *info, *exports;
    g_autofree char *path = NULL;
    bool commit;

    if (!p) {
        return NULL;
    }
    if (!fleece(p, &err) || !export_all(p, &err)) {
        pull_fail(p, err, error);
        return NULL;
    }
    info = json_object_new_object();
    exports = json_object_new_array();
    json_object_object_add(info, "backup", json_object_new_string(p->id));
    json_object_object_add(info, "checkpoint",
                           p->checkpoint ? json_object_new_string(p->checkpoint)
                                         : NULL);
    for (guint i = 0; i < p->pds->len; i++) {
        PullDisk *pd = p->pds->pdata[i];
        json_object *e = json_object_new_object();
        g_autofree char *uri = g_strdup_printf("nbd+unix:///%s?socket=%s",
                                               pd->qd->id, p->nbd_socket);
        g_autofree char *ctx =
            pd->since ? g_strconcat("qemu:dirty-bitmap:", pd->since, NULL)
                      : NULL;

        json_object_object_add(e, "disk", json_object_new_string(pd->qd->id));
        json_object_object_add(e, "uri", json_object_new_string(uri));
        json_object_object_add(e, "size", json_object_new_uint64(pd->qd->size));
        json_object_object_add(e, "mode",
                               json_object_new_string(mode_names[pd->mode]));
        json_object_object_add(e, "bitmap_context",
                               ctx ? json_object_new_string(ctx) : NULL);
        json_object_array_add(exports, e);
    }
    json_object_object_add(info, "exports", exports);
    commit = wait(info, opaque);
    if (!commit || cancelled(p, &err)) {
        if (!err) {
            err = g_error_new(BACKUP_ERROR, BACKUP_ERROR_FAILED,
                              "the export was aborted");
        }
        json_object_put(info);
        pull_fail(p, err, error);
        return NULL;
    }
    if (!fleece_teardown(p->qmp, p->fds, p->server_started, &err)) {
        json_object_put(info);
        pull_fail(p, err, error);
        return NULL;
    }
    g_ptr_array_set_size(p->fds, 0);
    /* Committed: the checkpoint stays, the since bitmaps go; the repository
     * records the export (it holds no images, so it is no backup). */
    drop_since(p);
    remove_new_files(p->manifest, p->repo);
    json_object_object_add(p->manifest, "status",
                           json_object_new_string("exported"));
    path = repo_partial_path(p->repo, p->id);
    repo_write_json(path, p->manifest, NULL);
    return info;
}

json_object *backup_pull(QmpClient *qmp, const char *repo,
                         const BackupOptions *opts, GError **error)
{
    g_autoptr(Pull) p = pull_begin(qmp, repo, opts, false, error);
    g_autoptr(GError) err = NULL;
    g_autofree char *final_path = NULL;
    g_autofree char *partial_path = NULL;
    bool ok;

    if (!p) {
        return NULL;
    }
    ok = fleece(p, &err) && !cancelled(p, &err) && export_all(p, &err) &&
         make_targets(p, &err) && copy_all(p, &err);
    if (ok) {
        /* The target daemon closes its images (tens of milliseconds) while
         * the VM's fleecing comes down; only its clean exit, awaited in
         * finish_targets(), makes the backup good. */
        target_quit(p->target);
        ok = fleece_teardown(p->qmp, p->fds, p->server_started, &err);
    }
    if (ok) {
        g_ptr_array_set_size(p->fds, 0); /* torn down */
        ok = finish_targets(p, &err) && !cancelled(p, &err);
    }
    if (!ok) {
        fail_and_undo(p, err);
        if (err->domain != BACKUP_ERROR) {
            g_set_error(error, BACKUP_ERROR, BACKUP_ERROR_FAILED, "%s",
                        err->message);
        } else {
            g_propagate_error(error, g_steal_pointer(&err));
        }
        return NULL;
    }

    /* The point of no return: the backup is good once this is durable. */
    add_results(p);
    json_object_object_del(p->manifest, "nbd_server_socket");
    json_object_object_del(p->manifest, "scratch_dir");
    final_path = repo_manifest_path(repo, p->id);
    partial_path = repo_partial_path(repo, p->id);
    if (!repo_write_json(final_path, p->manifest, &err)) {
        fail_and_undo(p, err);
        g_propagate_error(error, g_steal_pointer(&err));
        return NULL;
    }
    unlink(partial_path);

    /* Commit: the new checkpoint stays, the "since" bitmaps go. A failure
     * here loses nothing (they are transient); check reports them. */
    drop_since(p);
    return json_object_get(p->manifest);
}
