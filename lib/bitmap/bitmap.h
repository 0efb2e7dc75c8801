/*
 * lib/bitmap: checkpoints, i.e. persistent dirty bitmaps that qbk keeps on
 * every disk of a VM, on top of lib/qmp.
 *
 * A checkpoint is a bitmap named "qbk-<seq>-<name>" on each disk it covers
 * (seq: 6 digits, VM-wide, increasing; "qbk-<seq>p-<name>" when it was made
 * on some disks only). On one disk, the checkpoints sorted by seq form a
 * chain: checkpoint k records the writes from its own instant until the next
 * checkpoint's, and only the newest one is recording. So "everything written
 * since checkpoint k" is the union of the bitmaps k..newest, and deleting k
 * merges it into its predecessor. The VM alone tells names and order; qbk
 * never touches a bitmap whose name it did not make.
 */
#ifndef QBK_BITMAP_H
#define QBK_BITMAP_H

#include <stdbool.h>
#include <stdint.h>

#include "qmp.h"

#define BITMAP_ERROR bitmap_error_quark()
GQuark bitmap_error_quark(void);

typedef enum {
    BITMAP_ERROR_INVALID_NAME, /* not a valid checkpoint name */
    BITMAP_ERROR_EXISTS,       /* a checkpoint of that name exists */
    BITMAP_ERROR_NOT_FOUND,    /* no such checkpoint or disk */
    BITMAP_ERROR_UNSUPPORTED,  /* the disk cannot hold persistent bitmaps */
    BITMAP_ERROR_UNTRUSTED,    /* chain broken: a full backup is needed */
} BitmapErrorCode;

/* Longest user-chosen checkpoint name, in bytes. */
#define BITMAP_NAME_MAX 64

/* Prefix of the temporary union bitmaps made by bitmap_since(). */
#define BITMAP_SINCE_PREFIX "qbk-since-"

/* Check a user-chosen name: [A-Za-z0-9][A-Za-z0-9._+-]*, at most 64. */
bool bitmap_name_valid(const char *name, GError **error);

/*
 * Split a bitmap name made by qbk into its parts. Returns false for any
 * other bitmap. NAME (may be NULL) is a new string.
 */
bool bitmap_parse_name(const char *bitmap, guint *seq, char **name,
                       bool *partial);

/* A checkpoint as seen across the VM's disks. */
typedef struct {
    guint seq;          /* VM-wide order: larger is newer */
    char *name;         /* the user's name */
    char *bitmap;       /* the bitmap's name in QEMU, the same on every disk */
    bool partial;       /* made with --disk on some disks only */
    GPtrArray *disks;   /* QmpDisk* that hold it (borrowed) */
    GPtrArray *bitmaps; /* QmpBitmap* on those disks, same order (borrowed) */
} BitmapCheckpoint;

void bitmap_checkpoint_free(BitmapCheckpoint *cp);

/*
 * Every checkpoint found on DISKS, oldest first. The result borrows from
 * DISKS, which must outlive it.
 */
GPtrArray *bitmap_list_checkpoints(GPtrArray *disks);

/* The checkpoint called NAME (user name or bitmap name), or NULL. */
BitmapCheckpoint *bitmap_find_checkpoint(GPtrArray *checkpoints,
                                         const char *name);

/* DISK's checkpoint bitmaps (QmpBitmap*, borrowed), oldest first. */
GPtrArray *bitmap_disk_chain(const QmpDisk *disk);

/*
 * Create checkpoint NAME (NULL: the current UTC time) on TARGETS, a subset
 * of DISKS (the VM's disks: they decide the sequence number), in one
 * transaction: add a new persistent bitmap and disable the recording ones
 * of older checkpoints, on every target or on none. GRANULARITY 0 lets QEMU
 * choose (the qcow2 cluster size). Returns the new bitmap's name.
 */
char *bitmap_create_checkpoint(QmpClient *qmp, GPtrArray *disks,
                               GPtrArray *targets, const char *name,
                               uint32_t granularity, GError **error);

/*
 * The actions of bitmap_create_checkpoint(), added to the caller's TX so
 * that the checkpoint's instant is that of the caller's other actions.
 * Returns the bitmap's name.
 */
char *bitmap_add_checkpoint_actions(QmpTransaction *tx, GPtrArray *disks,
                                    GPtrArray *targets, const char *name,
                                    uint32_t granularity, GError **error);

/*
 * The same, but the older checkpoints keep recording until the caller runs
 * LATER, where their disable actions go: for a point in time fixed between
 * the two transactions (fleecing with a filter inserted by qom-set), the
 * new bitmap starts before it and the old ones end after it, so no write
 * is missed and the overlap only costs a few extra bytes next time.
 */
char *bitmap_add_checkpoint_actions_split(QmpTransaction *tx,
                                          QmpTransaction *later,
                                          GPtrArray *disks, GPtrArray *targets,
                                          const char *name,
                                          uint32_t granularity, GError **error);

/*
 * Delete checkpoint NAME on every disk that holds it, in one transaction
 * that merges it into the disk's previous checkpoint (so "since" older
 * checkpoints stays complete) and, when it was the recording one, lets the
 * previous one record again.
 */
bool bitmap_delete_checkpoint(QmpClient *qmp, GPtrArray *disks,
                              const char *name, GError **error);

/*
 * Make TARGET_BITMAP on every disk of TARGETS: a disabled, non-persistent
 * bitmap holding everything written since checkpoint NAME (the union of its
 * chain), all disks at one instant. Fails with BITMAP_ERROR_UNTRUSTED,
 * creating nothing, if a target disk lacks the checkpoint or its chain since
 * then cannot be trusted.
 */
bool bitmap_since(QmpClient *qmp, GPtrArray *disks, GPtrArray *targets,
                  const char *name, const char *target_bitmap, GError **error);

/* The actions of bitmap_since() for one DISK, added to the caller's TX.
 * LATER non-NULL: the new bitmap records until LATER (which disables it)
 * runs, so it also covers writes up to a point in time between the two. */
bool bitmap_add_since_actions(QmpTransaction *tx, QmpTransaction *later,
                              GPtrArray *disks, const QmpDisk *disk,
                              const char *name, const char *target_bitmap,
                              GError **error);

/* Remove the bitmaps NAMES ("since" bitmaps) from every target disk that
 * has them, in one transaction whatever the number of disks; returns how
 * many were removed, or -1. */
int bitmap_drop_since(QmpClient *qmp, GPtrArray *targets, GPtrArray *names,
                      GError **error);

/* ---- live migration (migrate.c) ---- */

typedef struct {
    const char *uri; /* migration URI, e.g. unix:/path or tcp:host:port */
    char **maps;     /* "SRCNODE=DSTNODE"; other disks pair by disk id */
    guint timeout_s; /* give up (and cancel) after this long; 0: 600 */
    void (*progress)(json_object *query_migrate, void *opaque);
    void *progress_opaque;
} BitmapMigrateOptions;

/*
 * Migrate the VM at SRC to the QEMU at DST (started with -incoming defer)
 * with every checkpoint: the traps are checked first (destination
 * waiting, no qbk backup at work, no NBD export on the source), then
 * dirty-bitmaps and block-bitmap-mapping are set on both sides, the
 * migration runs, and every checkpoint is compared, source's final state
 * against the destination's (count, recording, content hash); one that
 * arrived non-persistent is made persistent. On a failed migration the
 * source keeps its checkpoints (their flags put right) and the error says
 * so. Returns {status, seconds, checkpoints: [{disk, bitmap, count,
 * sha256, ok}], made_persistent, verified}.
 */
json_object *bitmap_migrate(QmpClient *src, QmpClient *dst,
                            const BitmapMigrateOptions *opts, GError **error);

/* ---- checking a VM's checkpoints (chain-check.c) ---- */

typedef enum {
    /* errors: checkpoints that cannot be trusted */
    BITMAP_ISSUE_INCONSISTENT,  /* QEMU did not close it: content unknown */
    BITMAP_ISSUE_NOT_RECORDING, /* the newest checkpoint does not record */
    BITMAP_ISSUE_MISSING,       /* a checkpoint is gone from the chain */
    /* warnings: safe, but not as it should be */
    BITMAP_ISSUE_STALE_RECORDING, /* an older checkpoint still records */
    BITMAP_ISSUE_NOT_PERSISTENT,  /* would be lost when QEMU exits */
    /* notes: bitmaps qbk leaves alone */
    BITMAP_ISSUE_FOREIGN,   /* someone else's bitmap */
    BITMAP_ISSUE_NAMELESS,  /* internal bitmaps of jobs or filters */
    BITMAP_ISSUE_TEMPORARY, /* a leftover "since" bitmap */
} BitmapIssueKind;

typedef enum {
    BITMAP_SEVERITY_NOTE,
    BITMAP_SEVERITY_WARNING,
    BITMAP_SEVERITY_ERROR,
} BitmapSeverity;

typedef struct {
    BitmapIssueKind kind;
    const QmpDisk *disk; /* borrowed */
    char *bitmap;        /* the bitmap concerned, or NULL */
    char *message;       /* one line, for people */
} BitmapIssue;

/* The verdict on one disk. */
typedef struct {
    const QmpDisk *disk;
    GPtrArray *chain; /* QmpBitmap*, borrowed: its checkpoints, oldest first */
    guint untrusted;  /* chain[0 .. untrusted-1] cannot be trusted */
    GPtrArray *disable; /* char*: stale recording bitmaps to disable */
} BitmapDiskVerdict;

typedef struct {
    GPtrArray *issues;   /* BitmapIssue* */
    GPtrArray *verdicts; /* BitmapDiskVerdict*, one per disk that can hold
                            bitmaps, in disk order */
} BitmapCheck;

BitmapCheck *bitmap_check(GPtrArray *disks);
void bitmap_check_free(BitmapCheck *check);
G_DEFINE_AUTOPTR_CLEANUP_FUNC(BitmapCheck, bitmap_check_free)

BitmapSeverity bitmap_issue_severity(BitmapIssueKind kind);
const char *bitmap_issue_kind_name(BitmapIssueKind kind);

/* Whether CHECK found any error. */
bool bitmap_check_has_errors(const BitmapCheck *check);

/* Where BITMAP stands in V's chain (trusted if >= V->untrusted), or -1. */
int bitmap_verdict_find(const BitmapDiskVerdict *v, const char *bitmap);

/* The verdict on DISK, or NULL. */
const BitmapDiskVerdict *bitmap_check_verdict(const BitmapCheck *check,
                                              const QmpDisk *disk);

/*
 * Apply CHECK's remedy in one transaction: remove every untrusted
 * checkpoint bitmap and disable stale recording ones. Nothing else is
 * touched. Returns how many bitmaps changed, or -1.
 */
int bitmap_repair(QmpClient *qmp, const BitmapCheck *check, GError **error);

#endif /* QBK_BITMAP_H */
