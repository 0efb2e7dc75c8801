/*
 * Private to lib/backup.
 */
#ifndef QBK_BACKUP_INTERNAL_H
#define QBK_BACKUP_INTERNAL_H

#include "backup.h"
#include "bitmap.h"
#include "fleece.h"
#include "util.h"

/* ---- marks of a backup in the VM (leftover.c) ---- */

typedef enum {
    MARK_AT_WORK = 'm',     /* the backup's checkpoint is not committed yet */
    MARK_PAUSED = 'p',      /* qbk paused the VM for it: resume it */
    MARK_SERVER = 'n',      /* qbk started QEMU's NBD server for it: stop it */
    MARK_FROZEN = 'f',      /* qbk froze the guest's file systems: thaw them
                               (the mark holds the agent's address) */
    MARK_SHUTDOWN = 's',    /* qbk made a guest poweroff pause the VM: put
                               the action back (the mark holds it) */
    MARK_AUTHZ = 'a',       /* not a secret: the authz-simple object that
                               lets our certificate into the NBD server */
    MARK_SCRATCH_KEY = 'k', /* the random passphrase of the scratch images
                               of an encrypted repository's backup */
} BackupMark;

#define MARK_LETTERS "mpnfsak"

/* The id of mark MARK of backup TAG made by this process. */
char *mark_id(BackupMark mark, GPid pid, const char *tag);

/* Put (remove) mark MARK of backup TAG, made by this process, holding
 * DATA (NULL: nothing to say). */
bool mark_add(QmpClient *qmp, BackupMark mark, const char *tag,
              const char *data, GError **error);
bool mark_del(QmpClient *qmp, BackupMark mark, const char *tag, GError **error);

/*
 * On the VM's disks as they are now (NODES as backup_query_disks), drop
 * the temporary bitmaps SINCE (strings) and, if NAME is given, merge
 * checkpoint NAME back into its predecessor so that the next incremental
 * misses no write.
 */
bool undo_checkpoint(QmpClient *qmp, char **nodes, const char *name,
                     GPtrArray *since, GError **error);

/* ---- application consistency (quiesce.c) ---- */

typedef struct Quiesce Quiesce;

/* With OPTS->quiesce, the guest agent connected (OPTS->guest_agent, else
 * found through QMP), before anything changes; NULL when off. Required
 * and unreachable: NULL with ERROR. Try: a Quiesce that only reports why
 * the backup is crash-consistent (quiesce_report). */
Quiesce *quiesce_open(QmpClient *qmp, const BackupOptions *opts,
                      GError **error);
void quiesce_free(Quiesce *q);
G_DEFINE_AUTOPTR_CLEANUP_FUNC(Quiesce, quiesce_free)

/* Freeze the guest's file systems (Q NULL: nothing to do), marked in the
 * VM as backup TAG's. A failure is an error when required; with try, the
 * backup goes on crash-consistent. Thawed again on failure. */
bool quiesce_freeze(Quiesce *q, QmpClient *qmp, const char *tag,
                    GError **error);

/* Thaw (if frozen) and drop the mark; false with ERROR naming the way out
 * if the agent would not, the mark staying for the next run. */
bool quiesce_thaw(Quiesce *q, QmpClient *qmp, GError **error);

/* The manifest's "consistency" ("application" or "crash") and "quiesce"
 * (mode, agent, file systems frozen, freeze length; or why skipped). */
void quiesce_report(const Quiesce *q, json_object *manifest);

/* A killed backup's freeze: thaw the guest through the agent at ADDRESS
 * if it is still frozen. */
bool quiesce_thaw_leftover(QmpClient *qmp, const char *address, GError **error);

/* ---- a guest that powers off during a backup (power.c) ---- */

typedef struct {
    const char *action; /* QEMU's shutdown action, as the caller said */
    char *tag;          /* of the backup that holds it */
    bool held;          /* set to "pause" by us */
} PowerHold;

/* While backup TAG holds the VM, a guest poweroff pauses it (nothing to
 * do without set-action, for a VM already shut down, or for a
 * qemu-storage-daemon). */
bool power_hold(PowerHold *h, QmpClient *qmp, const BackupOptions *opts,
                const char *tag, GError **error);

/* Put the action back; *OFF: the guest powered off meanwhile (with
 * poweroff as the action, for power_carry_out once done with QEMU). */
bool power_release(PowerHold *h, QmpClient *qmp, bool *off, GError **error);

/* OFF: do what QEMU would have done at the guest's poweroff ("quit"). */
void power_carry_out(QmpClient *qmp, bool off);

/* A killed backup's hold: put ACTION back; *QUIT: a guest poweroff came
 * meanwhile, for the caller to carry out ("quit") once done with QEMU. */
bool power_release_leftover(QmpClient *qmp, const char *action, bool *quit,
                            GError **error);

/* ---- what each disk's backup is (decide.c) ---- */

typedef struct {
    BackupMode mode;        /* full, incremental or differential */
    const Manifest *parent; /* what a non-full stands on (borrowed) */
    bool fallback;          /* full only for want of a usable chain */
    char *why;              /* for the manifest's "reason" (owned) */
} DiskPlan;

/*
 * The plan for disk QD in MODE (SINCE: a checkpoint, backup id or bitmap
 * to count changes from), from BACKUPS (complete manifests, oldest first)
 * and V, the VM's verdict on its checkpoints. Returns false for a
 * fallback: a full where MODE asked for changes (an error unless MODE is
 * auto). Reads nothing: the parent's files are the caller's to check.
 */
bool disk_plan(BackupMode mode, const char *since, const QmpDisk *qd,
               GPtrArray *backups, const BitmapDiskVerdict *v, DiskPlan *plan);

/* ---- where the data goes (target.c) ---- */

/* The new images of a backup, served writable over NBD by a private
 * qemu-storage-daemon. */
typedef struct {
    QmpClient *qsd;
    PrivDir *dir; /* holds the socket */
    char *socket; /* NBD server of the daemon */
} Target;

/* Create the N new images of IMGS at once (a full backup's has no
 * backing file); none is left on failure. */
bool target_create_images(const QemuImgCreate *imgs, guint n, GError **error);

/* The name of the plain export of export NAME (new string). */
char *target_plain_name(const char *name);

/* Serve IMAGES[i] as export NAMES[i]; COMPRESS: every cluster written
 * is compressed (QMP_DAEMON_COMPRESS), and export target_plain_name(NAMES[i])
 * writes the same image plain (for data that does not compress);
 * KEY_FILE: they are encrypted with the repository's key. */
Target *target_start(char **images, char **names, bool compress,
                     const char *key_file, GError **error);

/* Ask the daemon to flush and quit, without waiting (NULL: nothing). */
void target_quit(Target *t);

/* Stop the daemon; only a clean exit means the images are complete. */
bool target_stop(Target *t, GError **error);
void target_free(Target *t);

/* ---- qemu-nbd on a private socket (nbd-serve.c) ---- */

/* With a repository's KEY_FILE (repo_key_file; NULL: nothing): "--object"
 * and its secret (REPO_KEY_SECRET) appended to ARGV (of g_strdup'ed
 * strings), for a QEMU tool that opens the repository's images. */
void backup_add_key_object(GPtrArray *argv, const char *key_file);

/* What a child left in its log PATH, on one line ("no message" if
 * nothing): for a one-line error. */
char *backup_log_line(const char *path);

typedef struct {
    PrivDir *dir; /* holds the socket, the log and the pid file */
    char *socket;
    char *uri; /* of the export, for the copier */
    GPid pid;
} NbdServer;

/* Serve IMAGE (FORMAT; NULL for a "json:" IMAGE that names its driver) as
 * export "": read-only with its allocation depth (a backup chain), or
 * WRITABLE (cache=none); KEY_FILE: the secret REPO_KEY_SECRET (an
 * encrypted repository's chain). */
NbdServer *nbd_serve(const char *image, const char *format, bool writable,
                     const char *key_file, GError **error);
/* Stop it (it ends by itself when its client is gone) and remove its
 * files; false if it did not exit cleanly (a written image may be bad). */
bool nbd_server_stop(NbdServer *s, GError **error);

/* Read IMAGE (FORMAT, NULL for a "json:" chain; KEY_FILE: an encrypted
 * repository's) through qemu-nbd with lib/copier, into the new raw file
 * TARGET (sparse, synced; NULL: into nothing), hashing every block read.
 * Returns the image checksum ALG (of the size read, in STATS with the
 * copier's other figures), or NULL; the block digests stay in *DIGESTS_FD
 * if it is given (an unlinked temporary file, the caller closes it). */
char *backup_read_image(const char *image, const char *format,
                        const char *key_file, const char *target, CopierSum alg,
                        int *digests_fd, CopierStats *stats, GError **error);

/* ---- undoing killed backups (recover.c) ---- */

/* The time now, UTC, ISO 8601 (for manifests). */
char *backup_now_iso(void);

/* Record in MANIFEST, the partial manifest of backup ID, that it failed
 * and why, and write it. */
bool pull_mark_failed(const Repo *repo, json_object *manifest, const char *id,
                      const char *reason, GError **error);

/*
 * Before a backup: finish an interrupted merge, undo every backup of
 * REPO that a killed qbk-pull left (in the VM and in the repository), and
 * refuse (BACKUP_ERROR_LOCKED, _LEFTOVER) if another repository's backup
 * is at work or left state in the VM. NODES as backup_query_disks;
 * SCRATCH_DIR, this run's, for scratch files of an older qbk.
 */
bool pull_recover(QmpClient *qmp, Repo *repo, char **nodes,
                  const char *scratch_dir, GError **error);

/* ---- test hooks (test builds only: QBK_TEST_HOOKS) ---- */

/* Exit at once (status 99) if $QBK_CRASH_AT is WHERE: the tests kill a
 * command at each step that matters. A no-op in other builds. */
void backup_test_crash(const char *where);

/* Whether $QBK_FAIL_AT is WHERE, with ERROR set: the tests fail a step on
 * purpose. Always false in other builds. */
bool backup_test_fail(const char *where, GError **error);

/* Wait 2 s if $QBK_SLOW_AT is WHERE (signals do not cut it short): the
 * tests act in a window that is otherwise milliseconds long. */
void backup_test_slow(const char *where);

/* ---- retention (retention.c) ---- */

/* What POLICY keeps of MANIFESTS (complete backups), and how the rest go:
 * {keep: [{id, created, why}], remove: [{id, created}], merges: [{disk,
 * merge, into}]}. Pure: nothing is read or changed. */
json_object *retention_plan(GPtrArray *manifests,
                            const BackupRetention *policy);

/* ---- merge (merge.c) ---- */

/* Remove DISK from backup ID: its manifest entry first (the manifest goes
 * with its last disk), then its files. Idempotent. */
bool backup_drop_disk(Repo *repo, const char *id, const char *disk,
                      GError **error);

/* The checksum algorithm backup entry E records. */
static inline CopierSum backup_entry_sum(const ManifestDisk *e)
{
    return e->sum_data ? COPIER_SUM_DATA : COPIER_SUM_BLOCKS;
}

#endif /* QBK_BACKUP_INTERNAL_H */
