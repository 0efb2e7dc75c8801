/*
 * Private to lib/backup.
 */
#ifndef QBK_BACKUP_INTERNAL_H
#define QBK_BACKUP_INTERNAL_H

#include "backup.h"

/* ---- repository files (repo.c) ---- */

/* Make REPO's directories if missing and take its lock; returns the fd
 * holding the lock (closing it releases), or -1. */
int repo_open_locked(const char *repo, GError **error);

/* Write OBJ to PATH atomically: temp file, fsync, rename, fsync dir. */
bool repo_write_json(const char *path, json_object *obj, GError **error);

/* Parse PATH as a JSON object (new reference), or fail as corrupt. */
json_object *repo_read_json(const char *path, GError **error);

/* fsync PATH (a file or a directory). */
bool repo_fsync_path(const char *path, GError **error);

char *repo_manifest_path(const char *repo, const char *id);
char *repo_partial_path(const char *repo, const char *id);
char *repo_disk_dir(const char *repo, const char *disk);

/* Partial manifests in REPO (new refs), e.g. left by a killed qbk-pull. */
GPtrArray *repo_list_partial(const char *repo, GError **error);

/* The manifest's entry for DISK, borrowed, or NULL. */
json_object *manifest_disk(json_object *manifest, const char *disk);

/* The ids of DISK's chain from backup ID down to its full backup, newest
 * first, into IDS (strings); their manifests (new refs) into MANIFESTS. */
bool repo_disk_chain(const char *repo, const char *id, const char *disk,
                     GPtrArray *ids, GPtrArray *manifests, GError **error);

/* A disk id made safe as a file name. */
char *repo_disk_file_name(const char *disk);

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

/* Names for disk INDEX of backup TAG (short, QEMU limits names to 31). */
FleeceDisk *fleece_disk_new(const char *disk, const char *node, guint index,
                            const char *tag, const char *scratch_dir);
void fleece_disk_free(FleeceDisk *fd);

/* Create the scratch image and add its node: scheme A with the disk as its
 * backing; scheme B alone, discarding what is released. */
bool fleece_add_scratch(QmpClient *qmp, FleeceDisk *fd, guint64 size,
                        GError **error);

/* Scheme B: add the copy-before-write filter above FD->root (not yet in
 * the device's path). */
bool fleece_b_add_filter(QmpClient *qmp, FleeceDisk *fd, GError **error);

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

/*
 * Tear down whatever a backup tagged TAG left in QEMU, and its scratch
 * files in SCRATCH_DIR (names only; used to recover after a qbk-pull was
 * killed). Other tags are reported in *FOREIGN (a job id), meaning another
 * backup is at work. TAG NULL: only look for *FOREIGN.
 */
bool fleece_cleanup_tag(QmpClient *qmp, const char *tag,
                        const char *scratch_dir, char **foreign,
                        GError **error);

/* ---- where the data goes (target.c) ---- */

/* The new images of a backup, served writable over NBD by a private
 * qemu-storage-daemon. */
typedef struct {
    QmpClient *qsd;
    char *dir;    /* private, mode 0700: holds the socket */
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
    char *dir, *socket;
    GPid pid;
} NbdServer;

/* Serve IMAGE (FORMAT) as export "": read-only with its allocation depth
 * (a backup chain), or WRITABLE (cache=none). */
NbdServer *nbd_serve(const char *image, const char *format, bool writable,
                     GError **error);
/* Stop it (it ends by itself when its client is gone) and remove its
 * files; false if it did not exit cleanly (a written image may be bad). */
bool nbd_server_stop(NbdServer *s, GError **error);

/* Run "qemu-img ARGS[0] --output=json ARGS[1..]" and parse its answer;
 * NULL with qemu-img's message in ERROR (BACKUP_ERROR_CORRUPT). */
json_object *qemu_img_json(const char *const *args, GError **error);

/* ---- merge (merge.c) ---- */

/* Remove DISK from backup ID: its manifest entry first (the manifest goes
 * with its last disk), then its files. Idempotent. */
bool backup_drop_disk(const char *repo, const char *id, const char *disk,
                      GError **error);

#endif /* QBK_BACKUP_INTERNAL_H */
