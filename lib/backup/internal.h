/*
 * Private to lib/backup.
 */
#ifndef QBK_BACKUP_INTERNAL_H
#define QBK_BACKUP_INTERNAL_H

#include "backup.h"
#include "util.h"

/* ---- the VM side of a backup (fleece.c) ---- */

/* One disk being fleeced: names of everything qbk adds to QEMU for it. */
typedef struct {
    char *disk;    /* the disk's id */
    char *node;    /* its format node */
    char *scratch; /* scratch node */
    char *filter;  /* scheme A: the backup job's filter node */
    char *job;     /* scheme A: the sync=none backup job */
    char *export_; /* NBD export id; the export's name is the disk id */
    char *file;    /* scratch image file */
    /* scheme B */
    bool scheme_b;
    char *cbw;            /* copy-before-write filter node */
    char *access;         /* snapshot-access node: the point-in-time view */
    char *notice_export;  /* id and name of the scratch node's export */
    QmpInsertPoint point; /* where the filter goes: above NODE */
} FleeceDisk;

/* Names for disk INDEX of backup TAG (short, QEMU limits names to 31);
 * its scratch file in SCRATCH_DIR (NULL: none). */
FleeceDisk *fleece_disk_new(const char *disk, const char *node, guint index,
                            const char *tag, const char *scratch_dir);
void fleece_disk_free(FleeceDisk *fd);

/* Create the scratch image and add its node: scheme A with the disk as its
 * backing; scheme B alone, discarding what is released. */
bool fleece_add_scratch(QmpClient *qmp, FleeceDisk *fd, guint64 size,
                        GError **error);

/* Scheme B: add the copy-before-write filter above FD->node (not yet in
 * the device's path); a guest write waits at most TIMEOUT_S seconds for
 * its copy, then the snapshot breaks. */
bool fleece_b_add_filter(QmpClient *qmp, FleeceDisk *fd, guint timeout_s,
                         GError **error);

/* Scheme B: put the filter under the device (from now on the scratch
 * node keeps the point in time) and add the snapshot-access node. */
bool fleece_b_insert(QmpClient *qmp, FleeceDisk *fd, GError **error);

/* The sync=none backup that fleeces FD: one action of the caller's
 * transaction, so that the point in time is that of the bitmap actions. */
void fleece_add_backup_action(QmpTransaction *tx, FleeceDisk *fd);

/*
 * Start an NBD server on SOCKET (a private path); *STARTED says whether we
 * did (false: one was already running, and it is not ours to stop).
 */
bool fleece_start_server(QmpClient *qmp, const char *socket, bool *started,
                         GError **error);

/* Export FD's point-in-time view, with BITMAP (may be NULL) of the disk's
 * node as a dirty-bitmap context: scheme A read-only with the scratch's
 * allocation depth; scheme B writable (for trims: release) and, as
 * FD->notice_export, the scratch node read-only (its map: guest writes). */
bool fleece_export(QmpClient *qmp, FleeceDisk *fd, const char *bitmap,
                   GError **error);

/*
 * Undo everything fleece_* added for FDS, whatever state it is in: export,
 * job (cancelled, waited for), scratch node and file; stop the server if
 * STOP_SERVER. Best effort: carries on past failures and reports the first.
 */
bool fleece_teardown(QmpClient *qmp, GPtrArray *fds, bool stop_server,
                     GError **error);

/* The kinds of names fleece_disk_new() gives (qbk-<kind><index>-<tag>). */
#define FLEECE_KINDS "sfjecax"

/* The names of qbk's nodes, exports and jobs in QEMU now (strings). */
GPtrArray *fleece_present_names(QmpClient *qmp, GError **error);

/*
 * Tear down whatever backup TAG left in QEMU: nodes, exports, jobs (used
 * to undo a killed qbk-pull; its scratch files are in a private directory
 * that privdir_reap() removes).
 */
bool fleece_cleanup_tag(QmpClient *qmp, const char *tag, GError **error);

/* ---- marks of a backup in the VM (leftover.c) ---- */

typedef enum {
    MARK_AT_WORK = 'm', /* the backup's checkpoint is not committed yet */
    MARK_PAUSED = 'p',  /* qbk paused the VM for it: resume it */
    MARK_SERVER = 'n',  /* qbk started QEMU's NBD server for it: stop it */
} BackupMark;

/* Put (remove) mark MARK of backup TAG, made by this process. */
bool mark_add(QmpClient *qmp, BackupMark mark, const char *tag, GError **error);
bool mark_del(QmpClient *qmp, BackupMark mark, const char *tag, GError **error);

/*
 * On the VM's disks as they are now (NODES as backup_query_disks), drop
 * the temporary bitmaps SINCE (strings) and, if NAME is given, merge
 * checkpoint NAME back into its predecessor so that the next incremental
 * misses no write.
 */
bool undo_checkpoint(QmpClient *qmp, char **nodes, const char *name,
                     GPtrArray *since, GError **error);

/* ---- where the data goes (target.c) ---- */

/* The new images of a backup, served writable over NBD by a private
 * qemu-storage-daemon. */
typedef struct {
    QmpClient *qsd;
    PrivDir *dir; /* holds the socket */
    char *socket; /* NBD server of the daemon */
} Target;

/*
 * Create IMAGE (qcow2, SIZE bytes) with BACKING (a file name relative to
 * IMAGE's directory, or NULL for a full backup) of BACKING_FORMAT.
 */
bool target_create_image(const char *image, guint64 size, const char *backing,
                         const char *backing_format, GError **error);

/* Serve IMAGES[i] as export NAMES[i]. */
Target *target_start(char **images, char **names, GError **error);

/* Ask the daemon to flush and quit, without waiting (NULL: nothing). */
void target_quit(Target *t);

/* Stop the daemon; only a clean exit means the images are complete. */
bool target_stop(Target *t, GError **error);
void target_free(Target *t);

/* ---- qemu-nbd on a private socket (nbd-serve.c) ---- */

typedef struct {
    PrivDir *dir; /* holds the socket, the log and the pid file */
    char *socket;
    GPid pid;
} NbdServer;

/* Serve IMAGE (FORMAT; NULL for a "json:" IMAGE that names its driver) as
 * export "": read-only with its allocation depth (a backup chain), or
 * WRITABLE (cache=none). */
NbdServer *nbd_serve(const char *image, const char *format, bool writable,
                     GError **error);
/* Stop it (it ends by itself when its client is gone) and remove its
 * files; false if it did not exit cleanly (a written image may be bad). */
bool nbd_server_stop(NbdServer *s, GError **error);

/* ---- undoing killed backups (recover.c) ---- */

/* Remove the new image and digests of DISK in backup ID. */
void pull_remove_files(const Repo *repo, const char *id, const char *disk,
                       RepoFormat format);

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

/* ---- merge (merge.c) ---- */

/* Remove DISK from backup ID: its manifest entry first (the manifest goes
 * with its last disk), then its files. Idempotent. */
bool backup_drop_disk(Repo *repo, const char *id, const char *disk,
                      GError **error);

#endif /* QBK_BACKUP_INTERNAL_H */
