/*
 * One pull backup, start to end:
 *
 *   recover   undo what a killed qbk-pull left (recover.c)
 *   decide    per disk: full, or the changes since which checkpoint
 *   fleece    one transaction: new checkpoint, "since" bitmaps, backup jobs
 *   export    the point-in-time view of each disk over NBD
 *   copy      lib/copier, into new qcow2 images chained to their parents
 *   finish    images durable -> tear down -> manifest -> drop "since" bitmaps
 *
 * Until the manifest is written, any failure (copier, full disk, signal,
 * QEMU or the target daemon dying) undoes it all: QEMU is torn down and the
 * new checkpoint is merged back into its predecessor, so the next
 * incremental still sees every write since the last good backup. What the
 * backup does to the VM is marked in the VM (leftover.c), so that a run
 * killed at any point is undone from the VM alone.
 */
#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <unistd.h>

#include "bitmap.h"
#include "internal.h"

#define MANIFEST_FORMAT "qbk-manifest-1"

/* G_DEFINE_QUARK stringifies the quark name as written. */
/* clang-format off */
G_DEFINE_QUARK(qbk-backup-error-quark, backup_error)
/* clang-format on */

/* lib/repo checks these names */
G_STATIC_ASSERT(sizeof(COPIER_SUM_BLOCKS_NAME) ==
                sizeof("xxh3-128-blocks-64k"));
G_STATIC_ASSERT(sizeof(COPIER_SUM_DATA_NAME) ==
                sizeof("xxh3-128-data-blocks-64k"));

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
    *opts = (BackupOptions){ .mode = BACKUP_MODE_AUTO,
                             .shutdown_action = "poweroff" };
    copier_options_init(&opts->copier);
}

G_GNUC_PRINTF(2, 3)
static bool usage(GError **error, const char *fmt, ...)
{
    va_list ap;

    va_start(ap, fmt);
    g_propagate_error(
        error, g_error_new_valist(BACKUP_ERROR, BACKUP_ERROR_USAGE, fmt, ap));
    va_end(ap);
    return false;
}

bool backup_options_check(const BackupOptions *opts, GError **error)
{
    g_autoptr(GHashTable) ids = g_hash_table_new(g_str_hash, g_str_equal);
    g_autoptr(GError) local = NULL;
    RepoFormat format;

    if (!copier_options_check(&opts->copier, &local)) {
        return usage(error, "%s", local->message);
    }
    if (opts->format && !repo_format_parse(opts->format, &format)) {
        return usage(error, "the format must be qcow2 or raw");
    }
    if (opts->scratch_format &&
        !repo_format_parse(opts->scratch_format, &format)) {
        return usage(error, "the scratch format must be raw or qcow2");
    }
    if (opts->compress && g_strcmp0(opts->format, "raw") == 0) {
        return usage(error, "--compress writes qcow2 images: not with "
                            "--format raw");
    }
    if (opts->fleece == BACKUP_FLEECE_A &&
        g_strcmp0(opts->scratch_format, "raw") == 0) {
        return usage(error, "a raw scratch needs fleecing scheme B (scheme "
                            "A's scratch has the disk as its backing)");
    }
    if (opts->scratch_dir && !*opts->scratch_dir) {
        return usage(error, "the scratch directory is empty");
    }
    if (opts->nbd_listen &&
        (!opts->scratch_dir || !g_path_is_absolute(opts->scratch_dir))) {
        return usage(error, "--nbd-listen needs --scratch-dir: an absolute "
                            "path on QEMU's host, where QEMU makes the "
                            "scratch files");
    }
    for (guint i = 0; opts->disks && opts->disks[i]; i++) {
        if (!repo_check_name("disk", opts->disks[i], &local)) {
            return usage(error, "%s", local->message);
        }
    }
    /* each ID is a directory of the repository: plain, and once only */
    for (guint i = 0; opts->nodes && opts->nodes[i]; i++) {
        const char *eq = strchr(opts->nodes[i], '=');
        const char *id = eq ? eq + 1 : opts->nodes[i];

        if (eq == opts->nodes[i]) {
            return usage(error, "--node '%s' names no node", opts->nodes[i]);
        }
        if (!repo_check_name("disk", id, &local)) {
            return usage(error, "--node '%s': %s", opts->nodes[i],
                         local->message);
        }
        if (!g_hash_table_add(ids, (char *)id)) {
            return usage(error, "disk id '%s' is given twice", id);
        }
    }
    return true;
}

/* One disk of the backup. */
typedef struct {
    QmpDisk *qd;               /* borrowed from Pull.disks */
    BackupMode mode;           /* as decided: full, incremental, differential */
    char *reason;              /* why this mode (e.g. why full) */
    char *base;                /* checkpoint bitmap to copy changes since */
    char *parent;              /* parent backup id (the image's backing) */
    RepoFormat parent_format;  /* of the parent's image */
    char *parent_checksum;     /* the parent's, to check its digests */
    char *since;               /* temporary union bitmap exported, or NULL */
    FleeceDisk *fd;            /* names in QEMU */
    RepoFormat format;         /* of the new image (raw: a raw full) */
    char *image;               /* path of the new image */
    char *digests;             /* path of its block digests */
    int parent_digests_fd;     /* the parent's, checked; or -1 */
    bool parent_digests_dense; /* ... in the dense layout */
    CopierStats stats;
    char *checksum;
} PullDisk;

typedef struct {
    /* initialized once */
    QmpClient *qmp;
    Repo *repo;
    const BackupOptions *opts;
    char *id;                   /* backup id, also the tag of QEMU names */
    bool export_only;           /* fleece and export for another NBD client */
    const FleeceScheme *scheme; /* how the point in time is kept */
    double pause_ms;            /* the VM was paused this long to fleece (B) */
    Quiesce *quiesce;           /* the guest agent, with --quiesce */
    PowerHold power;            /* a guest poweroff pauses the VM meanwhile */
    bool powered_off;           /* it did: carried out at the very end */
    char *scratch_dir;          /* where scratch images go */
    PrivDir *scratch; /* ours in SCRATCH_DIR: this backup's scratch images */
    PrivDir *rundir;  /* ours in the temporary directory: the NBD socket */
    char *nbd_socket; /* the exports' unix socket, or */
    char *nbd_host;   /* their host and port (--nbd-listen) */
    char *nbd_port;
    bool authz;         /* our MARK_AUTHZ object is in QEMU */
    bool scratch_keyed; /* our MARK_SCRATCH_KEY is in QEMU */

    /* state */
    GPtrArray *disks;    /* QmpDisk*, the VM's, owned */
    GPtrArray *warnings; /* strings: manifests left out as damaged */
    GPtrArray *pds;      /* PullDisk*, owned */
    GPtrArray *fds;      /* FleeceDisk*, borrowed from pds */
    char *checkpoint;    /* the new checkpoint's bitmap, once decided */
    bool marked;         /* MARK_AT_WORK is in the VM */
    bool fleeced;        /* the transaction ran: the checkpoint exists */
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
    g_free(pd->parent_checksum);
    g_free(pd->since);
    fleece_disk_free(pd->fd);
    g_free(pd->image);
    g_free(pd->digests);
    if (pd->parent_digests_fd >= 0) {
        close(pd->parent_digests_fd);
    }
    g_free(pd->checksum);
    g_free(pd);
}

static void pull_free(Pull *p)
{
    target_free(p->target);
    quiesce_free(p->quiesce);
    g_free(p->power.tag);
    privdir_free(p->rundir);
    privdir_free(p->scratch);
    g_free(p->id);
    g_free(p->scratch_dir);
    g_free(p->nbd_socket);
    g_free(p->nbd_host);
    g_free(p->nbd_port);
    if (p->disks) {
        g_ptr_array_unref(p->disks);
    }
    if (p->warnings) {
        g_ptr_array_unref(p->warnings);
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
    if (p->opts->copier.cancel && g_atomic_int_get(p->opts->copier.cancel)) {
        g_set_error(error, BACKUP_ERROR, BACKUP_ERROR_FAILED,
                    "interrupted by a signal");
        return true;
    }
    return false;
}

/* ---- deciding what each disk needs ---- */

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

/*
 * The parent's block digests, which an incremental inherits: open only if
 * they hash to the checksum the parent recorded (a damaged file would
 * make the new backup record a checksum no restore can match). -1 and
 * WHY if not.
 */
static int open_parent_digests(Pull *p, const char *parent, const char *disk,
                               guint64 size, const ManifestDisk *entry,
                               char **why)
{
    g_autofree char *path = repo_digests_path(p->repo, disk, parent);
    g_autofree char *sum = NULL;
    g_autoptr(GError) local = NULL;
    struct stat st;
    int fd = repo_open_file(path, &local);

    if (fd >= 0 && fstat(fd, &st) == 0 &&
        (guint64)st.st_size == copier_block_count(size) * COPIER_DIGEST_LEN &&
        (sum = copier_digests_checksum(fd, size, !entry->digests_sparse,
                                       backup_entry_sum(entry), &local)) &&
        strcmp(sum, entry->checksum) == 0) {
        return fd;
    }
    *why = g_strdup_printf("the block digests of backup '%s' are %s", parent,
                           fd < 0 ? "missing" : "damaged");
    if (fd >= 0) {
        close(fd);
    }
    return -1;
}

/* Whether DISK's chain at backup PARENT holds, as manifests and images
 * (an incremental on a broken chain would never restore); WHY if not. */
static bool parent_chain_sound(Pull *p, const char *parent, const char *disk,
                               char **why)
{
    g_autoptr(GError) local = NULL;
    g_autoptr(GPtrArray) chain = repo_chain(p->repo, parent, disk, &local);

    if (!chain || !repo_check_chain(p->repo, chain, disk, &local)) {
        *why = g_strdup(local->message);
        return false;
    }
    return true;
}

/* Since which checkpoint DISK's backup copies changes, with --export-only
 * --since: another NBD client keeps its own chain, so the checkpoint is
 * looked up in the VM, not in the repository. */
static bool decide_export_since(Pull *p, PullDisk *pd, BitmapCheck *check,
                                GError **error)
{
    g_autoptr(GPtrArray) cps = bitmap_list_checkpoints(p->disks);
    BitmapCheckpoint *cp = bitmap_find_checkpoint(cps, p->opts->since);
    const BitmapDiskVerdict *v = bitmap_check_verdict(check, pd->qd);
    int i = bitmap_verdict_find(v, cp ? cp->bitmap : NULL);

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

static bool decide(Pull *p, PullDisk *pd, GPtrArray *backups,
                   BitmapCheck *check, GError **error)
{
    QmpDisk *qd = pd->qd;
    g_autofree char *why = NULL;
    const ManifestDisk *entry;
    DiskPlan plan;

    if (p->export_only && p->opts->since && !qd->no_bitmaps) {
        return decide_export_since(p, pd, check, error);
    }
    if (!disk_plan(p->opts->mode, p->opts->since, qd, backups,
                   bitmap_check_verdict(check, qd), &plan)) {
        why = plan.why;
        return need_full(p, pd, error, "%s", why);
    }
    if (!plan.parent) {
        pd->mode = plan.mode;
        pd->reason = plan.why;
        return true;
    }
    /* the parent's files must hold, or no restore could use the new one */
    entry = manifest_disk(plan.parent, qd->id);
    if (!parent_chain_sound(p, plan.parent->id, qd->id, &why) ||
        (pd->parent_digests_fd = open_parent_digests(
             p, plan.parent->id, qd->id, qd->size, entry, &why)) < 0) {
        g_free(plan.why);
        return need_full(p, pd, error, "%s", why);
    }
    pd->mode = plan.mode;
    pd->reason = plan.why;
    pd->base = g_strdup(plan.parent->checkpoint_bitmap);
    pd->parent = g_strdup(plan.parent->id);
    pd->parent_format = entry->format;
    pd->parent_digests_dense = !entry->digests_sparse;
    pd->parent_checksum = g_strdup(entry->checksum);
    return true;
}

/* ---- the manifest ---- */

static json_object *disk_json(Pull *p, PullDisk *pd)
{
    json_object *o = json_object_new_object();
    g_autofree char *image = repo_image_relpath(pd->qd->id, p->id, pd->format);
    g_autofree char *digests = repo_digests_relpath(pd->qd->id, p->id);

    qmp_json_set_string(o, "disk", pd->qd->id);
    qmp_json_set_string(o, "node", pd->qd->node);
    qmp_json_set_uint(o, "size", pd->qd->size);
    qmp_json_set_string(o, "mode", mode_names[pd->mode]);
    qmp_json_set_string(o, "reason", pd->reason);
    qmp_json_set_string(o, "parent", pd->parent);
    qmp_json_set_string(o, "since_checkpoint", pd->base);
    qmp_json_set_string(o, "since", pd->since);
    qmp_json_set_string(o, "role", qmp_disk_role(pd->qd));
    qmp_json_set_bool(o, "checkpointed", !pd->qd->no_bitmaps);
    qmp_json_set_string(o, "image", image);
    qmp_json_set_string(o, "format", repo_format_name(pd->format));
    if (p->opts->compress) {
        qmp_json_set_string(o, "compression", "zstd");
    }
    qmp_json_set_string(o, "digests", digests);
    qmp_json_set_string(o, "digests_layout", "sparse");
    return o;
}

static bool write_partial(Pull *p, GError **error)
{
    g_autofree char *path = repo_partial_path(p->repo, p->id);

    return repo_write_json(path, p->manifest, error);
}

/* How the copier was set, and what it did beyond copying: notices,
 * releases, pacing. */
static json_object *copier_json(Pull *p, const PullDisk *pd)
{
    const CopierOptions *opts = &p->opts->copier;
    const CopierStats *s = &pd->stats;
    json_object *o = json_object_new_object();

    qmp_json_set_uint(o, "requests", opts->requests);
    qmp_json_set_uint(o, "connections", opts->connections);
    qmp_json_set_uint(o, "chunk_size", opts->chunk_size);
    if (opts->rate_limit) {
        qmp_json_set_uint(o, "rate_limit", opts->rate_limit);
    }
    if (pd->format == REPO_RAW) { /* a file: the copier writes it */
        qmp_json_set_string(o, "write_mode",
                            copier_write_mode_name(opts->write_mode));
    }
    qmp_json_set_double(o, "read_ms_mean", s->read_ms_mean);
    qmp_json_set_uint(o, "notices", s->notices);
    qmp_json_set_uint(o, "bytes_bumped", s->bytes_bumped);
    qmp_json_set_uint(o, "bytes_released", s->bytes_released);
    qmp_json_set_uint(o, "release_errors", s->release_errors);
    qmp_json_set_uint(o, "extents", s->extents);
    qmp_json_set_uint(o, "block_status_calls", s->block_status_calls);
    qmp_json_set_uint(o, "allocation_asked", s->allocation_asked);
    qmp_json_set_uint(o, "planned_max", s->planned_max);
    qmp_json_set_double(o, "block_status_seconds", s->block_status_seconds);
    qmp_json_set_double(o, "plan_seconds", s->plan_seconds);
    if (p->opts->copier.latency_target_us) {
        json_object *w = json_object_new_object();

        qmp_json_set_uint(w, "target_us", p->opts->copier.latency_target_us);
        qmp_json_set_int(w, "min", s->window_min);
        qmp_json_set_int(w, "max", s->window_max);
        qmp_json_set_double(w, "mean", s->window_mean);
        qmp_json_set_int(w, "cuts", s->pacing_cuts);
        json_object_object_add(o, "pacing", w);
    }
    return o;
}

static void add_results(Pull *p)
{
    json_object *disks;
    guint64 total = 0;
    double seconds = (g_get_monotonic_time() - p->start_us) / 1e6;
    g_autofree char *when = backup_now_iso();

    json_object_object_get_ex(p->manifest, "disks", &disks);
    for (guint i = 0; i < p->pds->len; i++) {
        PullDisk *pd = p->pds->pdata[i];
        json_object *d = json_object_array_get_idx(disks, i);
        json_object *sum = json_object_new_object();
        const CopierStats *s = &pd->stats;
        double mib = s->bytes_read / 1048576.0;

        qmp_json_set_uint(d, "bytes_copied", s->bytes_written);
        qmp_json_set_uint(d, "bytes_read", s->bytes_read);
        qmp_json_set_uint(d, "bytes_zero", s->bytes_zero);
        qmp_json_set_uint(d, "bytes_skipped", s->bytes_skipped);
        qmp_json_set_double(d, "seconds", s->seconds);
        qmp_json_set_double(d, "throughput_mib_s",
                            s->seconds > 0 ? mib / s->seconds : 0);
        qmp_json_set_string(sum, "algorithm", COPIER_SUM_DATA_NAME);
        qmp_json_set_string(sum, "value", pd->checksum);
        json_object_object_add(d, "checksum", sum);
        json_object_object_add(d, "copier", copier_json(p, pd));
        total += s->bytes_written;
    }
    qmp_json_set_string(p->manifest, "status", "complete");
    qmp_json_set_string(p->manifest, "finished", when);
    qmp_json_set_bool(p->manifest, "guest_powered_off", p->powered_off);
    qmp_json_set_double(p->manifest, "seconds", seconds);
    qmp_json_set_uint(p->manifest, "bytes_copied", total);
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
        /* whoever finds this mark after a kill resumes the VM; a VM paused
         * by someone else carries none */
        if (!mark_add(p->qmp, MARK_PAUSED, p->id, NULL, error)) {
            return false;
        }
        paused_at = g_get_monotonic_time();
        if (!qmp_run(p->qmp, "stop", NULL, error)) {
            g_prefix_error(error, "cannot pause the VM: ");
            mark_del(p->qmp, MARK_PAUSED, p->id, NULL);
            return false;
        }
        stopped = true;
        backup_test_crash("paused");
    }
    for (guint i = 0; ok && i < p->pds->len; i++) {
        ok = p->scheme->insert(p->qmp, ((PullDisk *)p->pds->pdata[i])->fd,
                               error);
    }
    if (stopped) {
        if (!qmp_run(p->qmp, "cont", NULL, &cont_err)) {
            if (ok) {
                g_set_error(error, BACKUP_ERROR, BACKUP_ERROR_FAILED,
                            "the VM was paused to fleece and could not be "
                            "resumed: %s",
                            cont_err->message);
            }
            return false; /* the mark stays: recovery resumes it */
        }
        mark_del(p->qmp, MARK_PAUSED, p->id, NULL);
        p->pause_ms = (g_get_monotonic_time() - paused_at) / 1e3;
        qmp_json_set_double(p->manifest, "pause_ms", p->pause_ms);
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

/* The point in time: TX, then (B) the filters and LATER. */
static bool fix_point(Pull *p, QmpTransaction *tx, QmpTransaction *later,
                      GError **error)
{
    if (!qmp_transaction_run(p->qmp, tx, error)) {
        g_prefix_error(error, "cannot start fleecing: ");
        return false;
    }
    p->fleeced = true;
    return !later || insert_filters(p, later, error);
}

/* fix_point, with the guest's file systems frozen around it (--quiesce);
 * they are thawed whatever happens. */
static bool freeze_point(Pull *p, QmpTransaction *tx, QmpTransaction *later,
                         GError **error)
{
    g_autoptr(GError) thaw_err = NULL;
    bool fixed, thawed;

    if (!quiesce_freeze(p->quiesce, p->qmp, p->id, error)) {
        return false;
    }
    backup_test_slow("frozen");
    fixed =
        !backup_test_fail("frozen", error) && fix_point(p, tx, later, error);
    thawed = quiesce_thaw(p->quiesce, p->qmp, &thaw_err);
    quiesce_report(p->quiesce, p->manifest);
    if (!thawed) {
        if (fixed) {
            g_propagate_error(error, g_steal_pointer(&thaw_err));
        } else {
            g_prefix_error(error, "%s; and: ", thaw_err->message);
        }
        return false;
    }
    return fixed;
}

/*
 * An encrypted repository's backup keeps the guest's overwritten data
 * encrypted in its scratch images too (LUKS, made by QEMU), with a random
 * passphrase that lives in QEMU and in this run only: a scratch a crash
 * leaves behind cannot be read.
 */
static bool scratch_key(Pull *p, GError **error)
{
    guint8 raw[32];
    g_autofree char *hex = NULL;

    if (getrandom(raw, sizeof(raw), 0) != sizeof(raw)) {
        g_set_error(error, BACKUP_ERROR, BACKUP_ERROR_FAILED,
                    "no random bytes for the scratch's key: %s",
                    g_strerror(errno));
        return false;
    }
    hex = util_hex(raw, sizeof(raw));
    if (!mark_add(p->qmp, MARK_SCRATCH_KEY, p->id, hex, error)) {
        return false;
    }
    p->scratch_keyed = true;
    for (guint i = 0; i < p->fds->len; i++) {
        FleeceDisk *fd = p->fds->pdata[i];

        fd->key_secret = mark_id(MARK_SCRATCH_KEY, getpid(), p->id);
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
        p->scheme->insert ? qmp_transaction_new() : NULL;
    g_autoptr(GPtrArray) targets = g_ptr_array_new();
    g_autofree guint64 *sizes = g_new(guint64, p->pds->len);

    /* From here on the VM holds this backup's objects: a run that finds
     * this mark without its qbk-pull undoes them. */
    if (!mark_add(p->qmp, MARK_AT_WORK, p->id, NULL, error)) {
        return false;
    }
    p->marked = true;
    if (!power_hold(&p->power, p->qmp, p->opts, p->id, error)) {
        return false;
    }
    for (guint i = 0; i < p->pds->len; i++) {
        PullDisk *pd = p->pds->pdata[i];

        g_ptr_array_add(p->fds, pd->fd); /* torn down even if half added */
        sizes[i] = pd->qd->size;
    }
    if ((repo_key_file(p->repo) && !scratch_key(p, error)) ||
        !fleece_create_scratch(p->qmp, p->fds, sizes, error)) {
        return false;
    }
    for (guint i = 0; i < p->pds->len; i++) {
        PullDisk *pd = p->pds->pdata[i];

        if (!p->scheme->add(p->qmp, pd->fd, error)) {
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
    for (guint i = 0; p->scheme->add_actions && i < p->pds->len; i++) {
        p->scheme->add_actions(tx, ((PullDisk *)p->pds->pdata[i])->fd);
    }
    qmp_json_set_string(p->manifest, "checkpoint_bitmap", p->checkpoint);
    if (!write_partial(p, error) || !freeze_point(p, tx, later, error)) {
        return false;
    }
    if (p->opts->fleeced) {
        p->opts->fleeced(p->id, p->opts->fleeced_opaque);
    }
    return true;
}

/* The URI of export NAME, as the copier (or any client) reaches it. */
static char *export_uri(const Pull *p, const char *name)
{
    g_autofree char *n = NULL;

    if (!p->nbd_host) {
        return copier_nbd_uri(p->nbd_socket, name);
    }
    n = g_uri_escape_string(name, NULL, FALSE);
    return g_strdup_printf("%s://%s:%s/%s", p->opts->insecure ? "nbd" : "nbds",
                           p->nbd_host, p->nbd_port, n);
}

/* Only the identity of our client certificate may connect: an authz
 * object, named as a mark so that a killed run's is removed too. */
static bool add_authz(Pull *p, char **id, GError **error)
{
    g_autofree char *identity = qmp_tls_identity(p->opts->tls_dir, error);
    json_object *args;

    if (!identity) {
        return false;
    }
    *id = mark_id(MARK_AUTHZ, getpid(), p->id);
    args = json_object_new_object();
    qmp_json_set_string(args, "qom-type", "authz-simple");
    qmp_json_set_string(args, "id", *id);
    qmp_json_set_string(args, "identity", identity);
    if (!qmp_run(p->qmp, "object-add", args, error)) {
        g_prefix_error(error, "cannot let '%s' in: ", identity);
        return false;
    }
    p->authz = true;
    return true;
}

/* --nbd-listen: QEMU's NBD server on an address of the hypervisor's, TLS
 * unless --insecure. */
static bool remote_server(Pull *p, FleeceServer *srv, char **creds,
                          char **authz, GError **error)
{
    const char *colon = strrchr(p->opts->nbd_listen, ':');

    if (!colon || colon == p->opts->nbd_listen || !colon[1]) {
        g_set_error(error, BACKUP_ERROR, BACKUP_ERROR_USAGE,
                    "--nbd-listen '%s' is not HOST:PORT", p->opts->nbd_listen);
        return false;
    }
    p->nbd_host = g_strndup(p->opts->nbd_listen, colon - p->opts->nbd_listen);
    p->nbd_port = g_strdup(colon + 1);
    srv->host = p->nbd_host;
    srv->port = p->nbd_port;
    if (p->opts->insecure) {
        return true;
    }
    *creds = p->opts->nbd_tls_creds ? g_strdup(p->opts->nbd_tls_creds)
                                    : fleece_find_tls_creds(p->qmp, error);
    if (!*creds || !add_authz(p, authz, error)) {
        return false;
    }
    srv->tls_creds = *creds;
    srv->tls_authz = *authz;
    return true;
}

static bool export_all(Pull *p, GError **error)
{
    FleeceServer srv = { 0 };
    g_autofree char *creds = NULL;
    g_autofree char *authz = NULL;

    if (p->opts->nbd_listen) {
        if (!remote_server(p, &srv, &creds, &authz, error)) {
            return false;
        }
    } else if (p->opts->nbd_server) {
        /* Someone else's server: use it, never stop it. */
        p->nbd_socket = g_strdup(p->opts->nbd_server);
    } else {
        p->rundir = privdir_new(NULL, "pull", error);
        if (!p->rundir) {
            return false;
        }
        p->nbd_socket = privdir_file(p->rundir, "nbd.sock");
        srv.socket = p->nbd_socket;
    }
    if (!p->opts->nbd_server) {
        /* Only a server we started is ours to stop, now or after a kill:
         * mark it before starting it, and take the mark back if one was
         * running already. */
        if (!mark_add(p->qmp, MARK_SERVER, p->id, NULL, error)) {
            return false;
        }
        if (!fleece_start_server(p->qmp, &srv, &p->server_started, error)) {
            mark_del(p->qmp, MARK_SERVER, p->id, NULL);
            return false;
        }
    }
    for (guint i = 0; i < p->pds->len; i++) {
        PullDisk *pd = p->pds->pdata[i];

        if (!p->scheme->export(p->qmp, pd->fd, pd->since, error)) {
            return false;
        }
    }
    return true;
}

/* Take everything of this backup out of QEMU. */
static bool teardown(Pull *p, GError **error)
{
    if (!fleece_teardown(p->qmp, p->fds, p->server_started, error)) {
        return false;
    }
    g_ptr_array_set_size(p->fds, 0);
    if (p->server_started) {
        p->server_started = false;
        mark_del(p->qmp, MARK_SERVER, p->id, NULL);
    }
    /* once the server is gone: it holds the authz */
    if (p->authz && mark_del(p->qmp, MARK_AUTHZ, p->id, NULL)) {
        p->authz = false;
    }
    if (p->scratch_keyed && mark_del(p->qmp, MARK_SCRATCH_KEY, p->id, NULL)) {
        p->scratch_keyed = false;
    }
    return true;
}

static bool make_targets(Pull *p, GError **error)
{
    g_autoptr(GPtrArray) images = g_ptr_array_new();
    g_autoptr(GPtrArray) names = g_ptr_array_new();
    g_autoptr(GPtrArray) backings = g_ptr_array_new_with_free_func(g_free);
    g_autoptr(GArray) create = g_array_new(FALSE, TRUE, sizeof(QemuImgCreate));

    for (guint i = 0; i < p->pds->len; i++) {
        PullDisk *pd = p->pds->pdata[i];
        char *backing = NULL;

        if (!repo_make_disk_dir(p->repo, pd->qd->id, error)) {
            return false;
        }
        if (pd->format == REPO_RAW) {
            continue; /* the copier writes the file itself */
        }
        if (pd->parent) {
            backing = repo_image_name(pd->parent, pd->parent_format);
            g_ptr_array_add(backings, backing);
        }
        g_array_append_val(
            create, ((QemuImgCreate){ pd->image, pd->qd->size, backing,
                                      repo_format_name(pd->parent_format),
                                      p->opts->compress, repo_key_file(p->repo),
                                      REPO_KEY_SECRET }));
        g_ptr_array_add(images, pd->image);
        g_ptr_array_add(names, pd->qd->id);
    }
    if (images->len == 0) {
        return true;
    }
    /* all at once: each is a qemu-img run with an fsync or two */
    if (!target_create_images((QemuImgCreate *)create->data, create->len,
                              error)) {
        return false;
    }
    g_ptr_array_add(images, NULL);
    g_ptr_array_add(names, NULL);
    p->target = target_start((char **)images->pdata, (char **)names->pdata,
                             p->opts->compress, repo_key_file(p->repo), error);
    return p->target != NULL;
}

/* The copy of one disk, one of several at once on one loop. */
typedef struct {
    Pull *p;
    guint index;
    Copier *copier;
    int digests_fd;
} DiskCopy;

/* All the disks' copies: they share a loop and a budget of requests. */
typedef struct {
    GMainLoop *loop;
    DiskCopy *disks;
    guint count, running;
    DiskCopy *failed; /* the first to fail: the others are cancelled */
} CopyRun;

static void on_progress(const CopierStats *stats, void *opaque)
{
    DiskCopy *dc = opaque;
    Pull *p = dc->p;
    BackupProgress bp = {
        .disk = ((PullDisk *)p->pds->pdata[dc->index])->qd->id,
        .index = dc->index,
        .count = p->pds->len,
        .stats = *stats,
    };

    p->opts->progress(&bp, p->opts->progress_opaque);
}

static void disk_copied(Copier *c, void *opaque)
{
    CopyRun *run = opaque;

    if (!run->failed && !copier_result(c, NULL, NULL)) {
        for (guint i = 0; i < run->count; i++) {
            if (run->disks[i].copier == c) {
                run->failed = &run->disks[i];
            } else if (run->disks[i].copier) {
                copier_cancel(run->disks[i].copier);
            }
        }
    }
    if (--run->running == 0) {
        g_main_loop_quit(run->loop);
    }
}

/* Set up the copy of disk DC (not started): its digests and endpoints. */
static bool copy_setup(Pull *p, DiskCopy *dc, GMainContext *ctx,
                       CopierBudget *budget, GError **error)
{
    PullDisk *pd = p->pds->pdata[dc->index];
    g_autofree char *src_uri = export_uri(p, pd->qd->id);
    g_autofree char *notice_uri =
        export_uri(p, p->scheme->notice_export(pd->fd));
    g_autofree char *dst_uri = NULL;
    g_autofree char *plain_uri = NULL;
    g_autofree char *chain_uri =
        p->scheme->chain_export ? export_uri(p, p->scheme->chain_export(pd->fd))
                                : NULL;
    const char *tls = p->nbd_host ? p->opts->tls_dir : NULL;
    CopierEndpoint src = { .uri = src_uri, .tls_dir = tls };
    CopierEndpoint dst = { .file = pd->image };
    CopierEndpoint notices = { .uri = notice_uri, .tls_dir = tls };
    CopierEndpoint chain = { .uri = chain_uri, .tls_dir = tls };
    CopierOptions co = p->opts->copier;

    if (pd->format != REPO_RAW) {
        dst_uri = copier_nbd_uri(p->target->socket, pd->qd->id);
        dst = (CopierEndpoint){ .uri = dst_uri };
        if (p->opts->compress) {
            g_autofree char *name = target_plain_name(pd->qd->id);

            plain_uri = copier_nbd_uri(p->target->socket, name);
            dst.uri_plain = plain_uri;
        }
    }
    co.bitmap = pd->since;
    co.target_zeroed = pd->mode == BACKUP_MODE_FULL;
    if (!p->opts->no_notices) {
        co.notices = &notices;
        co.notice_context = p->scheme->notice_context;
    }
    co.release = p->scheme->releases && !p->opts->no_release;
    co.chain = chain_uri ? &chain : NULL;
    if (p->opts->progress) {
        co.progress = on_progress;
        co.progress_opaque = dc;
    }
    dc->digests_fd = repo_create_file(pd->digests, error);
    if (dc->digests_fd < 0) {
        g_prefix_error(error, "disk '%s': ", pd->qd->id);
        return false;
    }
    co.digest_fd = dc->digests_fd;
    co.digest_parent_fd = pd->parent_digests_fd;
    co.digest_parent_dense = pd->parent_digests_dense;
    dc->copier = copier_new(&src, &dst, &co, ctx, budget, error);
    if (!dc->copier) {
        g_prefix_error(error, "disk '%s': ", pd->qd->id);
        return false;
    }
    return true;
}

/*
 * A read of scheme B's snapshot fails once the filter broke it: a guest
 * write it could not copy into the scratch image (full, or slower than
 * the timeout). QEMU 7.2 says so nowhere, so add the likely cause to
 * *ERROR: the guest's writes went through; the backup is rolled back.
 */
static void why_broken(Pull *p, GError **error)
{
    g_autofree char *state = NULL;
    struct statvfs fs;

    if (!p->scheme->releases ||
        !g_error_matches(*error, COPIER_ERROR, COPIER_ERROR_READ)) {
        return;
    }
    state = qmp_query_status(p->qmp, NULL, NULL);
    if (!state) { /* not a broken snapshot: QEMU is gone */
        g_prefix_error(error, "QEMU went away: ");
    } else if (!p->opts->nbd_listen && statvfs(p->scratch_dir, &fs) == 0 &&
               fs.f_bavail == 0) {
        g_prefix_error(error,
                       "the scratch directory '%s' is full, which broke the "
                       "point in time (the guest's writes went on): ",
                       p->scratch_dir);
    } else {
        g_prefix_error(error,
                       "the point in time may have broken (a copy-before-write "
                       "failed or took over %u s; the guest's writes went "
                       "on): ",
                       p->scheme->cbw_timeout_s);
    }
}

/* After the loop: the copy of disk DC, its checksum, its digests durable. */
static bool copy_result(Pull *p, DiskCopy *dc, GError **error)
{
    PullDisk *pd = p->pds->pdata[dc->index];
    bool ok = copier_result(dc->copier, &pd->stats, error);

    if (ok) {
        pd->checksum = copier_digests_checksum(dc->digests_fd, pd->qd->size,
                                               false, COPIER_SUM_DATA, error);
        ok = pd->checksum && fsync(dc->digests_fd) == 0;
    }
    if (!ok && g_error_matches(*error, COPIER_ERROR, COPIER_ERROR_CANCELLED)) {
        g_clear_error(error);
        g_set_error(error, BACKUP_ERROR, BACKUP_ERROR_FAILED,
                    "interrupted by a signal");
    } else if (!ok) {
        why_broken(p, error);
        g_prefix_error(error, "disk '%s': ", pd->qd->id);
    }
    return ok;
}

/*
 * Copy every disk at once, on one loop, under one budget of requests: a
 * VM's disks do not wait for each other (nor pay each its own ramp-up and
 * flush in turn), and memory stays requests x chunk size. The first disk
 * to fail stops the others.
 */
static bool copy_all(Pull *p, GError **error)
{
    g_autoptr(GMainContext) ctx = g_main_context_new();
    g_autoptr(GMainLoop) loop = g_main_loop_new(ctx, FALSE);
    g_autofree DiskCopy *disks = g_new0(DiskCopy, p->pds->len);
    CopierBudget *budget =
        copier_budget_new(p->opts->copier.requests, p->opts->copier.chunk_size);
    CopyRun run = { .loop = loop, .disks = disks, .count = p->pds->len };
    bool ok = !cancelled(p, error);

    for (guint i = 0; i < run.count; i++) {
        disks[i] = (DiskCopy){ .p = p, .index = i, .digests_fd = -1 };
    }
    for (guint i = 0; ok && i < run.count; i++) {
        ok = copy_setup(p, &disks[i], ctx, budget, error);
    }
    if (ok) {
        run.running = run.count;
        for (guint i = 0; i < run.count; i++) {
            copier_start(disks[i].copier, disk_copied, &run);
        }
        g_main_loop_run(loop);
        /* the first failure is the one to tell (the rest were stopped) */
        ok = !run.failed;
        if (run.failed) {
            copy_result(p, run.failed, error);
        }
        for (guint i = 0; ok && i < run.count; i++) {
            ok = copy_result(p, &disks[i], error);
        }
    }
    for (guint i = 0; i < run.count; i++) {
        copier_free(disks[i].copier);
        if (disks[i].digests_fd >= 0) {
            close(disks[i].digests_fd);
        }
    }
    copier_budget_free(budget);
    return ok;
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

static void remove_new_files(Pull *p)
{
    for (guint i = 0; i < p->pds->len; i++) {
        PullDisk *pd = p->pds->pdata[i];

        repo_remove_disk_files(p->repo, pd->qd->id, p->id, pd->format);
    }
}

/* Undo everything this backup did; WHY gets what went wrong doing so. */
static void fail_and_undo(Pull *p, GError *why)
{
    g_autoptr(GError) err = NULL;
    g_autoptr(GPtrArray) since = since_bitmaps(p);
    GString *reason = g_string_new(why->message);
    g_autofree char *st = NULL;

    target_free(p->target);
    p->target = NULL;
    if (p->fds->len && !teardown(p, &err)) {
        g_string_append_printf(reason, "; teardown: %s", err->message);
        g_clear_error(&err);
    }
    /* paused to fleece and not resumed (a failed 'cont'): try again */
    st = qmp_query_status(p->qmp, NULL, NULL);
    if (g_strcmp0(st, "paused") == 0 &&
        mark_del(p->qmp, MARK_PAUSED, p->id, NULL)) {
        qmp_run(p->qmp, "cont", NULL, NULL);
    }
    if (p->fleeced &&
        !undo_checkpoint(p->qmp, p->opts->nodes, p->checkpoint, since, &err)) {
        /* QEMU gone: its bitmaps are untrusted now. QEMU unreachable: the
         * at-work mark stays there for the next run to act on. */
        g_string_append_printf(
            reason, "; could not roll the checkpoint back (%s): %s",
            err->message,
            g_error_matches(err, QMP_ERROR, QMP_ERROR_CLOSED)
                ? "the next backup of each disk will be full"
                : "the next qbk-pull (or check --repair) will");
        g_clear_error(&err);
    }
    if (!power_release(&p->power, p->qmp, &p->powered_off, &err)) {
        g_string_append_printf(reason, "; %s", err->message);
        g_clear_error(&err);
    }
    if (p->marked && mark_del(p->qmp, MARK_AT_WORK, p->id, NULL)) {
        p->marked = false;
    }
    if (p->manifest) {
        remove_new_files(p);
        pull_mark_failed(p->repo, p->manifest, p->id, reason->str, NULL);
    }
    power_carry_out(p->qmp, p->powered_off);
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
    g_autoptr(QmpBlockGraph) graph = NULL;
    g_autoptr(GError) local = NULL;
    g_autofree char *why = NULL;

    if (version < 701) {
        why = g_strdup("QEMU is older than 7.1 (no snapshot-access)");
    } else if (p->export_only) {
        why = g_strdup("--export-only serves another NBD client");
    } else if (p->opts->fleece == BACKUP_FLEECE_A) {
        why = g_strdup("scheme A was asked for");
    } else if (p->pds->len > 1 && !can_pause(p->qmp)) {
        why = g_strdup("QEMU cannot pause to fleece several disks at once");
    }
    if (!why) {
        graph = qmp_block_graph_get(p->qmp, &local);
        if (!graph) {
            why = g_strdup_printf("cannot read the block graph: %s",
                                  local->message);
        }
    }
    for (guint i = 0; !why && i < p->pds->len; i++) {
        fleece_b_possible(graph, ((PullDisk *)p->pds->pdata[i])->fd, &why);
    }
    if (p->opts->fleece == BACKUP_FLEECE_B && why) {
        g_set_error(error, BACKUP_ERROR, BACKUP_ERROR_FAILED,
                    "cannot fleece with scheme B: %s", why);
        return false;
    }
    p->scheme = why ? &fleece_scheme_a : &fleece_scheme_b;
    if (p->scheme->qcow2_scratch &&
        g_strcmp0(p->opts->scratch_format, "raw") == 0) {
        g_set_error(error, BACKUP_ERROR, BACKUP_ERROR_FAILED,
                    "a raw scratch needs fleecing scheme B, and scheme A is "
                    "used: %s",
                    why);
        return false;
    }
    for (guint i = 0; i < p->pds->len; i++) {
        FleeceDisk *fd = ((PullDisk *)p->pds->pdata[i])->fd;

        fd->scheme = p->scheme;
        fd->raw_scratch = !p->scheme->qcow2_scratch &&
                          g_strcmp0(p->opts->scratch_format, "qcow2") != 0;
    }
    return true;
}

/* What names this VM among others on its host: its UUID, else its name
 * (new string), else NULL. */
static char *vm_key(QmpClient *qmp)
{
    json_object *uuid = qmp_execute(qmp, "query-uuid", NULL, NULL);
    json_object *name = NULL;
    const char *u = qmp_json_string(uuid, "UUID");
    char *key = NULL;

    if (u && strspn(u, "0-") != strlen(u)) {
        key = g_strdup(u);
    } else if ((name = qmp_execute(qmp, "query-name", NULL, NULL)) &&
               qmp_json_string(name, "name") &&
               repo_check_name("VM", qmp_json_string(name, "name"), NULL)) {
        key = g_strdup(qmp_json_string(name, "name"));
    }
    json_object_put(uuid);
    json_object_put(name);
    return key;
}

/*
 * --nbd-listen: the scratch files are on QEMU's host, in --scratch-dir
 * there, made by QEMU (blockdev-create). QEMU cannot remove a file, so
 * each disk has one, named after the VM and the disk, that every backup
 * truncates and reuses.
 */
static bool remote_scratch(Pull *p, GError **error)
{
    g_autofree char *key = NULL;

    key = vm_key(p->qmp);
    if (!key) {
        g_set_error(error, BACKUP_ERROR, BACKUP_ERROR_USAGE,
                    "the VM has neither a UUID nor a plain name to name its "
                    "scratch files on its host (give QEMU -uuid or -name)");
        return false;
    }
    for (guint i = 0; i < p->pds->len; i++) {
        FleeceDisk *fd = ((PullDisk *)p->pds->pdata[i])->fd;
        g_autofree char *base =
            g_strdup_printf("qbk-%s-%s.scratch", key, fd->disk);

        g_free(fd->file);
        fd->file = g_build_filename(p->scratch_dir, base, NULL);
        fd->qemu_file = true;
    }
    return true;
}

/* The disks to back up: those asked for (all by default), each with an id
 * that can name its directory, no two alike. */
static bool select_disks(Pull *p, GError **error)
{
    g_autoptr(GHashTable) ids = g_hash_table_new(g_str_hash, g_str_equal);

    for (guint i = 0; p->opts->disks && p->opts->disks[i]; i++) {
        if (!qmp_disk_find(p->disks, p->opts->disks[i])) {
            g_set_error(error, BACKUP_ERROR, BACKUP_ERROR_NOT_FOUND,
                        "the VM has no disk '%s'", p->opts->disks[i]);
            return false;
        }
    }
    for (guint i = 0; i < p->disks->len; i++) {
        QmpDisk *qd = p->disks->pdata[i];
        g_autoptr(GError) local = NULL;
        PullDisk *pd;

        if (p->opts->disks &&
            !g_strv_contains((const char *const *)p->opts->disks, qd->id)) {
            continue;
        }
        if (!repo_check_name("disk", qd->id, &local)) {
            g_set_error(error, BACKUP_ERROR, BACKUP_ERROR_DISK_ID,
                        "the VM's %s", local->message);
            return false;
        }
        if (!g_hash_table_add(ids, qd->id)) {
            g_set_error(error, BACKUP_ERROR, BACKUP_ERROR_USAGE,
                        "two disks of the VM are called '%s'", qd->id);
            return false;
        }
        pd = g_new0(PullDisk, 1);
        pd->qd = qd;
        pd->parent_digests_fd = -1;
        g_ptr_array_add(p->pds, pd);
    }
    if (p->pds->len == 0) {
        g_set_error(error, BACKUP_ERROR, BACKUP_ERROR_NOT_FOUND,
                    "the VM has no disk to back up");
        return false;
    }
    return true;
}

static json_object *new_manifest(Pull *p, int major, int minor, int micro)
{
    json_object *m = json_object_new_object();
    json_object *jdisks = json_object_new_array();
    g_autofree char *when = backup_now_iso();
    g_autofree char *version = g_strdup_printf("%d.%d.%d", major, minor, micro);

    qmp_json_set_string(m, "format", MANIFEST_FORMAT);
    qmp_json_set_string(m, "id", p->id);
    qmp_json_set_string(m, "status", "in-progress");
    qmp_json_set_string(m, "created", when);
    qmp_json_set_string(m, "qemu", version);
    qmp_json_set_string(m, "checkpoint", p->id);
    qmp_json_set_string(m, "fleece", p->scheme->name);
    if (p->scheme->cbw_timeout_s) {
        qmp_json_set_int(m, "cbw_timeout_s", p->scheme->cbw_timeout_s);
    }
    if (p->pds->len) {
        FleeceDisk *fd = ((PullDisk *)p->pds->pdata[0])->fd;

        qmp_json_set_string(m, "scratch_format",
                            fd->raw_scratch ? "raw" : "qcow2");
    }
    for (guint i = 0; i < p->pds->len; i++) {
        json_object_array_add(jdisks, disk_json(p, p->pds->pdata[i]));
    }
    json_object_object_add(m, "disks", jdisks);
    if (p->warnings->len) {
        /* never trusted, never built on: a full backup where needed */
        json_object *w = json_object_new_array();

        for (guint i = 0; i < p->warnings->len; i++) {
            json_object_array_add(
                w, json_object_new_string(p->warnings->pdata[i]));
        }
        json_object_object_add(m, "skipped_manifests", w);
    }
    return m;
}

static bool prepare(Pull *p, GError **error)
{
    g_autoptr(GPtrArray) backups = NULL;
    g_autoptr(BitmapCheck) check = NULL;
    int major, minor, micro;

    if (!pull_recover(p->qmp, p->repo, p->opts->nodes,
                      p->opts->nbd_listen ? NULL : p->scratch_dir, error)) {
        return false;
    }
    p->disks = backup_query_disks(p->qmp, p->opts->nodes, error);
    backups = p->disks ? repo_list(p->repo, false, p->warnings, error) : NULL;
    if (!backups || !select_disks(p, error) || !unique_id(p, error)) {
        return false;
    }
    /* also removes what killed runs left in the scratch directory */
    if (!p->opts->nbd_listen &&
        !(p->scratch = privdir_new(p->scratch_dir, "scratch", error))) {
        return false;
    }
    check = bitmap_check(p->disks);
    for (guint i = 0; i < p->pds->len; i++) {
        PullDisk *pd = p->pds->pdata[i];

        if (!decide(p, pd, backups, check, error)) {
            return false;
        }
        if (pd->base) {
            pd->since = g_strdup_printf("qbk-since-%s-%u", p->id, i);
        }
        /* scheme A until choose_scheme() says */
        pd->fd = fleece_disk_new(&fleece_scheme_a, pd->qd->id, pd->qd->node, i,
                                 p->id,
                                 p->scratch ? privdir_path(p->scratch) : NULL);
        pd->format = pd->mode == BACKUP_MODE_FULL &&
                             g_strcmp0(p->opts->format, "raw") == 0
                         ? REPO_RAW
                         : REPO_QCOW2;
        pd->image = repo_image_path(p->repo, pd->qd->id, p->id, pd->format);
        pd->digests = repo_digests_path(p->repo, pd->qd->id, p->id);
    }
    qmp_get_version(p->qmp, &major, &minor, &micro);
    if (!choose_scheme(p, major * 100 + minor, error) ||
        (p->opts->nbd_listen && !remote_scratch(p, error))) {
        return false;
    }
    if (p->opts->quiesce != BACKUP_QUIESCE_OFF &&
        !(p->quiesce = quiesce_open(p->qmp, p->opts, error))) {
        return false;
    }
    p->manifest = new_manifest(p, major, minor, micro);
    return write_partial(p, error);
}

/* Lock, recover, decide: everything before QEMU is touched. */
static Pull *pull_begin(QmpClient *qmp, Repo *repo, const BackupOptions *opts,
                        bool export_only, GError **error)
{
    g_autoptr(Pull) p = g_new0(Pull, 1);
    g_autoptr(GError) err = NULL;

    if (!backup_options_check(opts, error)) {
        return NULL;
    }
    /* an encrypted repository gets encrypted qcow2 images only */
    if (repo_encrypted(repo) && !repo_key_file(repo)) {
        g_set_error(error, BACKUP_ERROR, BACKUP_ERROR_USAGE,
                    "the repository is encrypted and its key was not given");
        return NULL;
    }
    if (repo_key_file(repo) && g_strcmp0(opts->format, "raw") == 0) {
        g_set_error(error, BACKUP_ERROR, BACKUP_ERROR_USAGE,
                    "an encrypted repository holds qcow2 images only: not "
                    "--format raw");
        return NULL;
    }
    p->qmp = qmp;
    p->repo = repo;
    p->opts = opts;
    p->export_only = export_only;
    p->start_us = g_get_monotonic_time();
    p->pds = g_ptr_array_new_with_free_func((GDestroyNotify)pull_disk_free);
    p->fds = g_ptr_array_new();
    p->warnings = g_ptr_array_new_with_free_func(g_free);
    if (opts->nbd_listen) {
        /* a directory on QEMU's host: nothing to make or see here */
        p->scratch_dir = g_strdup(opts->scratch_dir);
    } else {
        p->scratch_dir = opts->scratch_dir
                             ? g_canonicalize_filename(opts->scratch_dir, NULL)
                             : repo_default_scratch_dir(repo);
    }
    if (!opts->nbd_listen && g_mkdir_with_parents(p->scratch_dir, 0700) < 0) {
        g_set_error(error, BACKUP_ERROR, BACKUP_ERROR_FAILED,
                    "cannot create '%s': %s", p->scratch_dir,
                    g_strerror(errno));
        return NULL;
    }
    if (!prepare(p, &err)) {
        if (p->manifest) {
            pull_mark_failed(repo, p->manifest, p->id, err->message, NULL);
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
    g_propagate_error(error, err);
}

/* Committed: the checkpoint stays; the mark and the "since" bitmaps go
 * (a failure loses nothing: they are transient, and check reports them). */
static void commit(Pull *p)
{
    g_autoptr(GPtrArray) since = since_bitmaps(p);

    mark_del(p->qmp, MARK_AT_WORK, p->id, NULL);
    p->marked = false;
    undo_checkpoint(p->qmp, p->opts->nodes, NULL, since, NULL);
}

static json_object *exports_json(Pull *p)
{
    json_object *info = json_object_new_object();
    json_object *exports = json_object_new_array();

    qmp_json_set_string(info, "backup", p->id);
    qmp_json_set_string(info, "checkpoint", p->checkpoint);
    for (guint i = 0; i < p->pds->len; i++) {
        PullDisk *pd = p->pds->pdata[i];
        json_object *e = json_object_new_object();
        g_autofree char *uri = export_uri(p, pd->qd->id);
        g_autofree char *ctx =
            pd->since ? g_strconcat("qemu:dirty-bitmap:", pd->since, NULL)
                      : NULL;

        qmp_json_set_string(e, "disk", pd->qd->id);
        qmp_json_set_string(e, "uri", uri);
        qmp_json_set_uint(e, "size", pd->qd->size);
        qmp_json_set_string(e, "mode", mode_names[pd->mode]);
        qmp_json_set_string(e, "bitmap_context", ctx);
        json_object_array_add(exports, e);
    }
    json_object_object_add(info, "exports", exports);
    return info;
}

json_object *backup_export(QmpClient *qmp, Repo *repo,
                           const BackupOptions *opts, BackupExportWait wait,
                           void *opaque, GError **error)
{
    g_autoptr(Pull) p = pull_begin(qmp, repo, opts, true, error);
    GError *err = NULL;
    json_object *info;
    g_autofree char *path = NULL;
    bool ok;

    if (!p) {
        return NULL;
    }
    if (!fleece(p, &err) || !export_all(p, &err)) {
        pull_fail(p, err, error);
        return NULL;
    }
    info = exports_json(p);
    ok = wait(info, opaque) && !cancelled(p, &err);
    if (!ok && !err) {
        err = g_error_new(BACKUP_ERROR, BACKUP_ERROR_FAILED,
                          "the export was aborted");
    }
    if (!ok || !teardown(p, &err) ||
        !power_release(&p->power, p->qmp, &p->powered_off, &err)) {
        json_object_put(info);
        pull_fail(p, err, error);
        return NULL;
    }
    /* Committed: the repository records the export (it holds no images,
     * so it is no backup). */
    remove_new_files(p);
    qmp_json_set_string(p->manifest, "status", "exported");
    write_partial(p, NULL);
    commit(p);
    power_carry_out(p->qmp, p->powered_off);
    return info;
}

json_object *backup_pull(QmpClient *qmp, Repo *repo, const BackupOptions *opts,
                         GError **error)
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
        ok = teardown(p, &err) && finish_targets(p, &err) &&
             !cancelled(p, &err) &&
             power_release(&p->power, p->qmp, &p->powered_off, &err);
    }
    if (!ok) {
        pull_fail(p, g_steal_pointer(&err), error);
        return NULL;
    }

    /* The point of no return: the backup is good once this is durable. */
    add_results(p);
    final_path = repo_manifest_path(repo, p->id);
    partial_path = repo_partial_path(repo, p->id);
    if (!repo_write_json(final_path, p->manifest, &err)) {
        pull_fail(p, g_steal_pointer(&err), error);
        return NULL;
    }
    unlink(partial_path);
    backup_test_crash("committed");
    commit(p);
    power_carry_out(p->qmp, p->powered_off);
    return json_object_get(p->manifest);
}
