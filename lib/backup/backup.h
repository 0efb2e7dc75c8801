/*
 * lib/backup: pull backups of a running VM into a repository, and restore
 * them. It orchestrates the other modules: lib/bitmap for checkpoints,
 * lib/qmp for fleecing and exports, lib/copier for the data, lib/repo for
 * the repository (its layout is described there).
 */
#ifndef QBK_BACKUP_H
#define QBK_BACKUP_H

#include <stdbool.h>
#include <stdint.h>

#include "copier.h"
#include "qmp.h"
#include "repo.h"

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
    BACKUP_ERROR_LEFTOVER,     /* a killed backup of another repository left
                                  state in the VM that must be undone first */
    BACKUP_ERROR_USAGE,        /* an option out of its bounds */
    BACKUP_ERROR_DISK_ID,      /* a disk's id cannot name its directory */
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

/* Application consistency through the guest agent (--quiesce). */
typedef enum {
    BACKUP_QUIESCE_OFF,      /* crash-consistent */
    BACKUP_QUIESCE_TRY,      /* freeze if the agent answers, else go on
                                crash-consistent and say so */
    BACKUP_QUIESCE_REQUIRED, /* no agent, no backup (nothing changed) */
} BackupQuiesce;

const char *backup_quiesce_name(BackupQuiesce mode);
bool backup_quiesce_parse(const char *text, BackupQuiesce *mode);

typedef struct {
    const char *disk;   /* being copied */
    guint index, count; /* which of how many disks */
    CopierStats stats;  /* of this disk so far */
} BackupProgress;

typedef void (*BackupProgressFn)(const BackupProgress *p, void *opaque);

typedef struct {
    BackupMode mode;
    const char *since;          /* checkpoint (or backup id) to copy changes
                                 since, on every disk; NULL: by mode */
    char **disks;               /* only these disks; NULL: every disk */
    char **nodes;               /* "NODE[=ID]": back up these format nodes
                                (a qemu-storage-daemon has no devices);
                                NULL: the VM's devices */
    const char *scratch_dir;    /* NULL: REPO/.scratch */
    const char *scratch_format; /* "raw" (scheme B only) or "qcow2"; NULL:
                                   raw for B, qcow2 for A */
    const char *nbd_server;     /* QEMU already runs an NBD server on this unix
                                socket: export there, never stop it */
    /* A QEMU on another host: its NBD server listens on NBD_LISTEN
     * ("HOST:PORT", an address of the hypervisor's) with TLS through
     * QEMU's tls-creds-x509 object NBD_TLS_CREDS (NULL: its only one with
     * endpoint=server), letting in only the identity of our client
     * certificate in TLS_DIR; plain TCP only if INSECURE. */
    const char *nbd_listen;
    const char *nbd_tls_creds;
    const char *tls_dir;
    bool insecure;
    const char *format; /* of full backups: "qcow2" (NULL) or "raw"
                                (sparse, written with Linux AIO) */
    bool compress;      /* qcow2 images of zstd-compressed clusters */
    BackupFleece fleece;
    bool no_notices; /* don't copy what the guest writes first */
    bool no_release; /* scheme B: keep copied regions in scratch */
    /* --quiesce: through the guest agent at GUEST_AGENT (NULL: the VM's
     * agent channel as QEMU knows it), freezing QUIESCE_MOUNTS (the
     * guest's mount points; NULL: every file system), waiting
     * AGENT_TIMEOUT_MS for the freeze, the guest's sync (0:
     * QMP_DEFAULT_TIMEOUT_MS) */
    BackupQuiesce quiesce;
    const char *guest_agent;
    char **quiesce_mounts;
    int agent_timeout_ms;
    /* QEMU's shutdown action, which it cannot report: "poweroff" (its
     * default) or "pause" (-no-shutdown); what a guest poweroff during the
     * backup comes to after it */
    const char *shutdown_action;
    /* The copier's options for every disk (copier_options_init's defaults
     * from backup_options_init): requests (one budget for all the disks),
     * connections, chunk size, rate limit, pacing target, trace, cancel.
     * What is per disk (selection, notices, release, digests, progress) is
     * set by the backup. */
    CopierOptions copier;
    BackupProgressFn progress;
    void *progress_opaque;
    /* Called once the point in time is fixed (fleecing started): tests and
     * callers that must know when the guest's later writes no longer go
     * into this backup. */
    void (*fleeced)(const char *backup_id, void *opaque);
    void *fleeced_opaque;
} BackupOptions;

void backup_options_init(BackupOptions *opts);

/* Whether OPTS are within their bounds (BACKUP_ERROR_USAGE if not): the
 * copier's, the disk and node names. To be called before the VM is
 * touched; backup_pull() and backup_export() call it again. */
bool backup_options_check(const BackupOptions *opts, GError **error);

/*
 * Take one backup of every (selected) disk of the VM at QMP into REPO (made
 * if missing), at one instant. Returns the manifest (new reference). On
 * failure everything in QEMU is torn down, the checkpoint is rolled back so
 * that the next incremental misses no write, the partial backup is
 * recorded as failed, and ERROR says why.
 */
json_object *backup_pull(QmpClient *qmp, Repo *repo, const BackupOptions *opts,
                         GError **error);

/*
 * Fleece and export every (selected) disk as backup_pull() would, without
 * copying: WAIT gets the exports ({backup, checkpoint, exports: [{disk,
 * uri, size, mode, bitmap_context}]}, borrowed) and returns true to commit
 * (tear down, keep the new checkpoint) or false to roll everything back.
 * Returns the exports' description on commit (new reference).
 */
typedef bool (*BackupExportWait)(json_object *exports, void *opaque);
json_object *backup_export(QmpClient *qmp, Repo *repo,
                           const BackupOptions *opts, BackupExportWait wait,
                           void *opaque, GError **error);

/* ---- what killed backups leave in a VM (leftover.c) ---- */

/* The VM's disks (qmp_query_disks), or with NODES ("NODE[=ID]", for a
 * qemu-storage-daemon) the disks made of those format nodes. */
GPtrArray *backup_query_disks(QmpClient *qmp, char **nodes, GError **error);

/* What one backup has in the VM now. */
typedef struct {
    char *tag;             /* the backup's id */
    GPid pid;              /* the qbk-pull that made it; 0 if unknown (an older
                           qbk) */
    bool alive;            /* that qbk-pull still runs on this host: the backup
                           is at work, not a leftover */
    bool at_work;          /* not committed: its checkpoint is to be merged
                           back into its predecessor */
    bool paused;           /* qbk paused the VM for it */
    bool server;           /* qbk started QEMU's NBD server for it */
    char *agent;           /* qbk froze the guest through this agent: thaw */
    char *shutdown_action; /* qbk set the shutdown action to pause: put
                              this back */
    GPtrArray *objects;    /* its nodes, exports and jobs (names) */
    GPtrArray *marks;      /* its marks (QOM object ids) */
    GPtrArray *bitmaps;    /* its temporary bitmaps ("DISK:BITMAP") */
} BackupLeftover;

void backup_leftover_free(BackupLeftover *l);

/* Every backup that has something in the VM (NODES as backup_query_disks),
 * at work or left behind, by tag. */
GPtrArray *backup_find_leftovers(QmpClient *qmp, char **nodes, GError **error);

/*
 * Undo what backup L left, as the next qbk-pull would: its nodes,
 * exports and jobs go, a guest qbk froze is thawed (first), a VM qbk
 * paused is resumed, a server qbk started is
 * stopped, its temporary bitmaps go and, unless COMMITTED (its manifest is
 * durable), its checkpoint is merged back into its predecessor, so that
 * nothing is lost. Its marks go last. The caller makes sure L is not at
 * work (L->alive).
 */
bool backup_undo_leftover(QmpClient *qmp, char **nodes, const BackupLeftover *l,
                          bool committed, GError **error);

/*
 * Rebuild DISK as it was at backup ID into OUTPUT (FORMAT "raw" or
 * "qcow2", sparse), and, for raw output, verify it against the manifest's
 * checksum. Returns the disk's manifest entry (new reference).
 */
json_object *backup_restore(Repo *repo, const char *id, const char *disk,
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
json_object *backup_verify(Repo *repo, const char *id, const char *disk,
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
json_object *backup_merge(Repo *repo, const char *disk, const char *from,
                          const char *to, const char *format, GError **error);

/* Finish a merge a crash interrupted (REPO/merge-journal.json), and remove
 * unfinished merge copies. */
bool backup_merge_recover(Repo *repo, GError **error);

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
json_object *backup_retention(Repo *repo, const BackupRetention *policy,
                              bool dry_run, GError **error);

/*
 * Incremental restore: IMAGE (raw or qcow2, any path) holds DISK as backup
 * FROM; bring it to backup ID, forward or back, by writing only the
 * regions that the links above their newest common backup changed. The
 * caller checks the result (backup_check_image) if it does not trust
 * that IMAGE equalled FROM. Returns {disk, from, backup, common, format
 * (of IMAGE), bytes_changed, bytes_written, seconds}.
 */
json_object *backup_restore_into(Repo *repo, const char *from, const char *id,
                                 const char *disk, const char *image,
                                 GError **error);

/*
 * Live restore, step one: OUTPUT (which must not exist) becomes a qcow2
 * image of DISK whose backing is backup ID's chain, named in its header as
 * an explicit json: chain of read-only links (with the secret
 * REPO_KEY_SECRET if the repository is encrypted: the VM's QEMU needs
 * that secret object). A VM can start from it at once. Returns {disk,
 * backup, image, size, chain, key_secret?}.
 */
json_object *backup_live_create(Repo *repo, const char *id, const char *disk,
                                const char *output, GError **error);

/* Called about once a second while a stream runs: DONE of TOTAL bytes. */
typedef void (*BackupLiveProgressFn)(guint64 done, guint64 total, void *opaque);

/*
 * Live restore, step two: on the QEMU at QMP, copy into NODE (the image
 * of backup_live_create, opened by a VM) everything it does not hold yet
 * from its backing chain (block-stream, at most SPEED bytes/s, 0: no
 * limit), while the guest runs; then NODE's image stands alone (no
 * backing in its header). *CANCEL set: the stream is cancelled. A stream
 * cancelled, failed, or cut short by QEMU's death leaves the image valid
 * on its backing; streaming again copies what is still missing. Returns
 * {node, bytes, seconds}.
 */
json_object *backup_live_stream(QmpClient *qmp, const char *node, guint64 speed,
                                volatile int *cancel,
                                BackupLiveProgressFn progress, void *opaque,
                                GError **error);

/* Where backup_serve listens: a unix SOCKET (a path, which must not
 * exist), or HOST and PORT, with TLS through the server certificates in
 * TLS_DIR (QEMU's tls-creds-x509 layout; clients must show a certificate
 * of its CA), or without (NULL). */
typedef struct {
    const char *socket;
    const char *host;
    const char *port;
    const char *tls_dir;
} BackupServe;

/* Called once the export serves, with {disk, backup, uri}. */
typedef void (*BackupServeReadyFn)(json_object *info, void *opaque);

/*
 * Serve DISK of backup ID read-only over NBD (qemu-nbd: any number of
 * clients in turn, 16 at once, with its allocation depth) at WHERE, until
 * *STOP is set. Returns the same {disk, backup, uri} (new reference); an
 * error if qemu-nbd cannot start or stops by itself.
 */
json_object *backup_serve(Repo *repo, const char *id, const char *disk,
                          const BackupServe *where, volatile int *stop,
                          BackupServeReadyFn ready, void *opaque,
                          GError **error);

/* Whether IMAGE (FORMAT) reads exactly as DISK of backup ID: its block
 * checksum against the manifest's (BACKUP_ERROR_MISMATCH if not). */
bool backup_check_image(Repo *repo, const char *id, const char *disk,
                        const char *image, const char *format, GError **error);

#endif /* QBK_BACKUP_H */
