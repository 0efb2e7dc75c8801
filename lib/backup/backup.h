/*
 * lib/backup: pull backups of a running VM into a repository, and restore
 * them. It orchestrates the other modules: lib/bitmap for checkpoints,
 * lib/qmp for fleecing and exports, lib/copier for the data.
 *
 * Repository layout (everything relative, so the repository can move):
 *   REPO/qbk-repo.json                 format marker
 *   REPO/lock                          flock()ed by the one qbk-pull at work
 *   REPO/backups/ID.json               manifest of a complete backup
 *   REPO/backups/ID.partial.json       a backup in progress, or failed
 *   REPO/disks/DISK/ID.qcow2           the disk at backup ID; its backing
 *                                      file is the parent's "PID.qcow2"
 *   REPO/disks/DISK/ID.digests         XXH3-128 per 64 KiB block of the disk
 *                                      at backup ID (see lib/copier)
 *   REPO/.scratch/                     fleecing scratch images (default)
 */
#ifndef QBK_BACKUP_H
#define QBK_BACKUP_H

#include <stdbool.h>
#include <stdint.h>

#include "copier.h"
#include "qmp.h"

#define BACKUP_ERROR backup_error_quark()
GQuark backup_error_quark(void);

typedef enum {
    BACKUP_ERROR_FAILED,       /* the backup failed; rolled back */
    BACKUP_ERROR_LOCKED,       /* another qbk-pull works on this repo or VM */
    BACKUP_ERROR_FULL_NEEDED,  /* an incremental was asked for but a disk's
                                 chain is broken: a full backup is needed */
    BACKUP_ERROR_NOT_FOUND,    /* no such disk, backup or checkpoint */
    BACKUP_ERROR_CORRUPT,      /* a manifest or image is damaged */
    BACKUP_ERROR_MISMATCH,     /* verification found different content */
    BACKUP_ERROR_NOT_IN_CHAIN, /* merge: the backup is not in the disk's
                                  chain (e.g. the disk had a full since) */
} BackupErrorCode;

typedef enum {
    BACKUP_MODE_AUTO, /* full where needed, incremental elsewhere */
    BACKUP_MODE_FULL,
    BACKUP_MODE_INCREMENTAL,  /* since the disk's last backup */
    BACKUP_MODE_DIFFERENTIAL, /* since the disk's last full backup */
} BackupMode;

const char *backup_mode_name(BackupMode mode);
bool backup_mode_parse(const char *text, BackupMode *mode);

/* How the point in time is kept (DESIGN.md, "Fleecing"). */
typedef enum {
    BACKUP_FLEECE_AUTO, /* B where QEMU and the disks allow it, else A */
    BACKUP_FLEECE_A,    /* backup job + scratch with the disk as backing */
    BACKUP_FLEECE_B,    /* copy-before-write + snapshot-access: copied
                           regions are released as the copy goes */
} BackupFleece;

typedef struct {
    const char *disk;   /* being copied */
    guint index, count; /* which of how many disks */
    CopierStats stats;  /* of this disk so far */
} BackupProgress;

typedef void (*BackupProgressFn)(const BackupProgress *p, void *opaque);

typedef struct {
    BackupMode mode;
    const char *since;       /* checkpoint (or backup id) to copy changes
                                 since, on every disk; NULL: by mode */
    char **disks;            /* only these disks; NULL: every disk */
    char **nodes;            /* "NODE[=ID]": back up these format nodes
                                (a qemu-storage-daemon has no devices);
                                NULL: the VM's devices */
    const char *scratch_dir; /* NULL: REPO/.scratch */
    const char *nbd_server;  /* QEMU already runs an NBD server on this unix
                                socket: export there, never stop it */
    const char *format;      /* of full backups: "qcow2" (NULL) or "raw"
                                (sparse, written with Linux AIO) */
    guint requests;          /* copier requests in flight (0: default) */
    guint connections;       /* copier NBD connections to each fleecing
                                export (0: default) */
    guint64 chunk_size;      /* copier chunk size (0: default) */
    guint64 rate_limit;      /* bytes/s read from the VM; 0: unlimited */
    BackupFleece fleece;
    bool no_notices;         /* don't copy what the guest writes first */
    bool no_release;         /* scheme B: keep copied regions in scratch */
    guint latency_target_us; /* guest-aware pacing (0: off) */
    int trace_fd;            /* copier trace (benchmarks), or -1 */
    volatile gint *cancel;   /* set by a signal handler to stop */
    BackupProgressFn progress;
    void *progress_opaque;
    /* Called once the point in time is fixed (fleecing started): tests and
     * callers that must know when the guest's later writes no longer go
     * into this backup. */
    void (*fleeced)(const char *backup_id, void *opaque);
    void *fleeced_opaque;
} BackupOptions;

void backup_options_init(BackupOptions *opts);

/*
 * Take one backup of every (selected) disk of the VM at QMP into REPO (made
 * if missing), at one instant. Returns the manifest (new reference). On
 * failure everything in QEMU is torn down, the checkpoint is rolled back so
 * that the next incremental misses no write, the partial backup is
 * recorded as failed, and ERROR says why.
 */
json_object *backup_pull(QmpClient *qmp, const char *repo,
                         const BackupOptions *opts, GError **error);

/*
 * Fleece and export every (selected) disk as backup_pull() would, without
 * copying: WAIT gets the exports ({backup, checkpoint, exports: [{disk,
 * uri, size, mode, bitmap_context}]}, borrowed) and returns true to commit
 * (tear down, keep the new checkpoint) or false to roll everything back.
 * Returns the exports' description on commit (new reference).
 */
typedef bool (*BackupExportWait)(json_object *exports, void *opaque);
json_object *backup_export(QmpClient *qmp, const char *repo,
                           const BackupOptions *opts, BackupExportWait wait,
                           void *opaque, GError **error);

/* ---- repository (repo.c) ---- */

/* Take REPO's lock (one writer at a time: qbk-pull, qbk-merge); returns
 * the fd that holds it (close to release), or -1. */
int backup_lock(const char *repo, GError **error);

/* Manifests of the complete backups in REPO, oldest first (new refs). */
GPtrArray *backup_list(const char *repo, GError **error);

/* The manifest of backup ID ("latest" for the newest), new reference. */
json_object *backup_load(const char *repo, const char *id, GError **error);

/*
 * Rebuild DISK as it was at backup ID into OUTPUT (FORMAT "raw" or
 * "qcow2", sparse), and, for raw output, verify it against the manifest's
 * checksum. Returns the disk's manifest entry (new reference).
 */
json_object *backup_restore(const char *repo, const char *id, const char *disk,
                            const char *output, const char *format,
                            GError **error);

/*
 * Verify DISK of backup ID ("latest" for the newest) without the VM: each
 * link of its chain is there, whole, and backed by the parent its manifest
 * names (else BACKUP_ERROR_CORRUPT); the chain read back hashes to the
 * checksum recorded at backup time (else BACKUP_ERROR_MISMATCH, saying
 * where the first block differs). Returns {backup, disk, chain, checksum,
 * bytes_read, seconds}.
 */
json_object *backup_verify(const char *repo, const char *id, const char *disk,
                           GError **error);

/*
 * Merge DISK's backups FROM..TO (FROM an older link of TO's chain) into
 * one: TO keeps its point in time and checksum, its image now stands on
 * FROM's parent (or on nothing if FROM is the full backup), and the links
 * from FROM up to TO's parent lose DISK. FROM NULL: make TO a synthetic
 * full (FORMAT "qcow2" or "raw"; older backups stay). Copies only what the
 * merged links hold; the result is verified against TO's checksum before
 * anything changes, and a journal makes the swap crash-safe. Refuses to
 * drop a link another backup stands on. Returns {disk, backup, parent,
 * format, dropped, bytes_copied, bytes_read, checksum, seconds}.
 */
json_object *backup_merge(const char *repo, const char *disk, const char *from,
                          const char *to, const char *format, GError **error);

/* Finish a merge a crash interrupted (REPO/merge-journal.json), and remove
 * unfinished merge copies. */
bool backup_merge_recover(const char *repo, GError **error);

/* A retention policy: keep the newest backup of each of the last DAILY
 * days, WEEKLY ISO weeks and MONTHLY months (by creation time, UTC), and
 * always the newest backup. */
typedef struct {
    guint daily, weekly, monthly;
} BackupRetention;

/*
 * Apply POLICY to REPO (the caller holds the lock): {keep: [{id, created,
 * why}], remove: [{id, created}], merges: [{disk, merge, into}]}. Removed
 * links under a kept backup are merged into it (backup_merge), the rest
 * lose their disks; a removed backup several kept ones stand on is kept
 * ("needed by several backups"). DRY_RUN: only the plan.
 */
json_object *backup_retention(const char *repo, const BackupRetention *policy,
                              bool dry_run, GError **error);

/*
 * Incremental restore: IMAGE (raw or qcow2, any path) holds DISK as backup
 * FROM; bring it to backup ID, forward or back, by writing only the
 * regions that the links above their newest common backup changed. The
 * caller checks the result (backup_check_image) if it does not trust
 * that IMAGE equalled FROM. Returns {disk, from, backup, common, format
 * (of IMAGE), bytes_changed, bytes_written, seconds}.
 */
json_object *backup_restore_into(const char *repo, const char *from,
                                 const char *id, const char *disk,
                                 const char *image, GError **error);

/* Whether IMAGE (FORMAT) reads exactly as DISK of backup ID: its block
 * checksum against the manifest's (BACKUP_ERROR_MISMATCH if not). */
bool backup_check_image(const char *repo, const char *id, const char *disk,
                        const char *image, const char *format, GError **error);

#endif /* QBK_BACKUP_H */
