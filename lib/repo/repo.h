/*
 * lib/repo: the backup repository on disk, and the only place that knows
 * its layout. Every path is built here from the repository's root and
 * names checked by repo_check_name(); no path is ever read from a file.
 * Every file here is parsed once into a typed, validated record, and a
 * file that does not validate is reported by name, never followed.
 *
 *   REPO/qbk-repo.json            format marker
 *   REPO/lock                     flock()ed by the one writer at work
 *   REPO/backups/ID.json          manifest of a complete backup
 *   REPO/backups/ID.partial.json  a backup in progress, failed, or exported
 *   REPO/merge-journal.json       a merge that was decided (merge.c)
 *   REPO/disks/DISK/ID.qcow2      the disk at backup ID; its backing file
 *                                 is the parent's "PARENT.qcow2" (or .raw)
 *   REPO/disks/DISK/ID.raw        a full backup written as a raw file
 *   REPO/disks/DISK/ID.digests    XXH3-128 per 64 KiB block (lib/copier)
 *   REPO/.scratch/                fleecing scratch images (default)
 *
 * Everything is owner-only: directories 0700, files 0600, whatever the
 * umask. No directory of the skeleton may be a symbolic link.
 */
#ifndef QBK_REPO_H
#define QBK_REPO_H

#include <stdbool.h>
#include <stdint.h>

#include <glib.h>
#include <json-c/json.h>

#include "util.h"

#define REPO_ERROR repo_error_quark()
GQuark repo_error_quark(void);

typedef enum {
    REPO_ERROR_NOT_FOUND, /* no such repository, backup or disk */
    REPO_ERROR_INVALID,   /* a name that is not a plain name */
    REPO_ERROR_CORRUPT,   /* a file of the repository is damaged or hostile */
    REPO_ERROR_LOCKED,    /* another writer works on it */
    REPO_ERROR_IO,        /* the file system refused */
    REPO_ERROR_KEY,       /* no key, or not the repository's */
} RepoErrorCode;

/* ---- names (names.c) ---- */

/* Longest disk id or backup id. */
#define REPO_NAME_MAX 64

/* Longest chain of backups a disk may have (a cycle is an error). QEMU
 * parses JSON nested at most 1024 deep, and a chain opened as one JSON
 * description nests one level per link. */
#define REPO_CHAIN_MAX 1000

/*
 * Whether NAME is a plain name, usable as one file name component: 1 to
 * REPO_NAME_MAX letters, digits and . _ + -, beginning with a letter or a
 * digit. KIND ("disk", "backup") says what it names, in the error. A
 * backup id may also not be "latest" or end in ".partial" or ".merging"
 * (their files would collide with others).
 */
bool repo_check_name(const char *kind, const char *name, GError **error);

/* ---- the repository (repo.c) ---- */

typedef struct Repo Repo;

typedef enum {
    REPO_OPEN_CREATE = 1 << 0, /* make it (owner-only) if missing */
    REPO_OPEN_LOCK = 1 << 1,   /* take the writer's lock, or fail LOCKED */
} RepoOpenFlags;

/*
 * Open the repository at PATH (made absolute). Its skeleton is checked:
 * the marker, backups/ and disks/ and every disks/DISK/ must be real
 * directories and files, not symbolic links. With REPO_OPEN_CREATE the
 * root is also made owner-only (0700) if it was not.
 */
Repo *repo_open(const char *path, RepoOpenFlags flags, GError **error);
void repo_free(Repo *r);
G_DEFINE_AUTOPTR_CLEANUP_FUNC(Repo, repo_free)

/* The root, absolute. */
const char *repo_root(const Repo *r);

/* Whether R holds no backup at all, complete or not (nothing in backups/). */
bool repo_is_empty(const Repo *r);

typedef enum {
    REPO_QCOW2,
    REPO_RAW,
} RepoFormat;

const char *repo_format_name(RepoFormat format);
bool repo_format_parse(const char *text, RepoFormat *format);

/*
 * Paths, each built from the root and names that passed repo_check_name()
 * (asserted). New strings.
 */
char *repo_manifest_path(const Repo *r, const char *id);
char *repo_partial_path(const Repo *r, const char *id);
char *repo_journal_path(const Repo *r);
char *repo_disk_dir(const Repo *r, const char *disk);
char *repo_image_path(const Repo *r, const char *disk, const char *id,
                      RepoFormat format);
char *repo_digests_path(const Repo *r, const char *disk, const char *id);
/* Remove DISK's image (of FORMAT) and digests in backup ID, if there. */
void repo_remove_disk_files(const Repo *r, const char *disk, const char *id,
                            RepoFormat format);
/* Where a merge writes the new image and digests before the swap. */
char *repo_merging_path(const Repo *r, const char *disk, const char *id,
                        RepoFormat format);
char *repo_merging_digests_path(const Repo *r, const char *disk,
                                const char *id);
char *repo_default_scratch_dir(const Repo *r);

/* The backing file name of a child of backup ID: "ID.qcow2" or "ID.raw",
 * relative to the disk's directory. */
char *repo_image_name(const char *id, RepoFormat format);

/* The image and digests paths relative to the root, as a manifest
 * records them for people and stock tools ("disks/DISK/ID.qcow2"). */
char *repo_image_relpath(const char *disk, const char *id, RepoFormat format);
char *repo_digests_relpath(const char *disk, const char *id);

/* Make DISK's directory (0700) if missing; a symbolic link there fails. */
bool repo_make_disk_dir(const Repo *r, const char *disk, GError **error);

/*
 * Open PATH, a file of the repository, for reading, never through a
 * symbolic link: an fd, or -1 (REPO_ERROR_NOT_FOUND if missing,
 * REPO_ERROR_CORRUPT if not a regular file).
 */
int repo_open_file(const char *path, GError **error);

/* Create PATH afresh for writing (0600): a stale file or a planted link
 * there is removed first, and the new one is made exclusively. */
int repo_create_file(const char *path, GError **error);

/* Write OBJ to PATH atomically: temp file (exclusive, 0600), fsync,
 * rename, fsync of the directory. */
bool repo_write_json(const char *path, json_object *obj, GError **error);

/* fsync PATH (a file or a directory). */
bool repo_fsync_path(const char *path, GError **error);

/* ---- encryption at rest (key.c) ----
 * An encrypted repository's qcow2 images are LUKS-encrypted (qcow2
 * encrypt.format=luks) with the passphrase in a key file: UTF-8 text, its
 * bytes as they are (newline included), owner-only. QEMU reads it itself
 * (a secret object with file=, never a command line or the environment).
 * The repository keeps a fingerprint of it (PBKDF2-HMAC-SHA256 with a
 * random salt, in REPO/key.json), never the key, so that a wrong key is
 * refused before anything is read or written. */

/* The id of the secret object every QEMU tool gets for the key. */
#define REPO_KEY_SECRET UTIL_KEY_SECRET

/* Whether the repository has a key (its backups are encrypted). */
bool repo_encrypted(const Repo *r);

/*
 * Check KEY_FILE against the repository's fingerprint and keep it for
 * repo_key_file(). A repository without a key takes this one if ADOPT
 * (the caller knows it holds no backup yet), else it is refused.
 * REPO_ERROR_KEY: a key file that is unreadable, not owner-only, empty,
 * not UTF-8, or not the repository's; REPO_ERROR_CORRUPT: a damaged
 * key.json.
 */
bool repo_key_check(Repo *r, const char *key_file, bool adopt, GError **error);

/* The checked key file (absolute), or NULL. */
const char *repo_key_file(const Repo *r);

/* PBKDF2-HMAC-SHA256 of PASS with SALT, ITERATIONS rounds, 32 bytes into
 * OUT (RFC 8018; exposed for its test vectors). */
void repo_pbkdf2_sha256(const guint8 *pass, gsize pass_len, const guint8 *salt,
                        gsize salt_len, guint iterations, guint8 out[32]);

/* ---- manifests (manifest.c) ---- */

typedef enum {
    MANIFEST_IN_PROGRESS, /* "in-progress": a qbk-pull at work, or killed */
    MANIFEST_COMPLETE,    /* "complete": a backup */
    MANIFEST_FAILED,      /* "failed": rolled back */
    MANIFEST_EXPORTED,    /* "exported": --export-only, committed */
} ManifestStatus;

typedef enum {
    MANIFEST_FULL,
    MANIFEST_INCREMENTAL,
    MANIFEST_DIFFERENTIAL,
} ManifestMode;

const char *manifest_mode_name(ManifestMode mode);

/* One disk of a backup, as validated. */
typedef struct {
    char *disk;          /* a plain name: its directory under disks/ */
    guint64 size;        /* bytes, > 0 */
    ManifestMode mode;   /* full: no parent; else a parent */
    char *parent;        /* backup id its image stands on, or NULL */
    RepoFormat format;   /* of its image (a missing "format" is qcow2) */
    bool compressed;     /* its qcow2 image's clusters are compressed (zstd) */
    bool digests_sparse; /* its digest file's layout ("digests_layout"):
                            sparse, or dense (the first repositories) */
    bool checkpointed;   /* a checkpoint was made on it */
    char *since;         /* the temporary "since" bitmap in the VM, or NULL */
    bool sum_data;       /* its checksum is over the data blocks only
                            (COPIER_SUM_DATA), else over every block */
    char *checksum;      /* lowercase hex; NULL
                          only in a backup that is not complete */
    json_object *json;   /* the entry as read (borrowed from Manifest.json) */
} ManifestDisk;

/* A backup's manifest, as validated. Reference counted. */
typedef struct {
    char *id;                /* a plain name, that of its file */
    ManifestStatus status;   /* complete in backups/ID.json */
    GDateTime *created;      /* UTC */
    char *checkpoint;        /* the checkpoint's name, or NULL */
    char *checkpoint_bitmap; /* its bitmap in the VM ("qbk-NNNNNN-ID"), or
                                NULL */
    GPtrArray *disks;        /* ManifestDisk*, owned, unique by disk */
    json_object *json;       /* the whole object as read, owned (for
                                --json output and fields only shown) */
    grefcount refs;
} Manifest;

/*
 * Parse TEXT as the manifest of backup ID (its file name): every field
 * logic depends on is checked (types, ranges, names, status, a disk's
 * image and digests at the places the layout says, a parent other than
 * itself), and PARTIAL says whether it is a partial manifest. The file's
 * name in errors is WHAT.
 */
Manifest *manifest_parse(const char *text, size_t len, const char *id,
                         bool partial, const char *what, GError **error);
Manifest *manifest_ref(Manifest *m);
void manifest_unref(Manifest *m);
G_DEFINE_AUTOPTR_CLEANUP_FUNC(Manifest, manifest_unref)

/* The manifest's disk DISK, or NULL. */
const ManifestDisk *manifest_disk(const Manifest *m, const char *disk);

/*
 * The complete backups of R (PARTIAL: the partial manifests), oldest
 * first (by id). A file that does not validate is left out and described
 * in SKIPPED (strings: "FILE: why"; may be NULL).
 */
GPtrArray *repo_list(const Repo *r, bool partial, GPtrArray *skipped,
                     GError **error);

/* The manifest of backup ID ("latest" or NULL: the newest complete one). */
Manifest *repo_load(const Repo *r, const char *id, GError **error);

/* The partial manifest of backup ID, or NULL (NOT_FOUND if absent). */
Manifest *repo_load_partial(const Repo *r, const char *id, GError **error);

/* ---- chains (chain.c) ---- */

/*
 * DISK's chain from backup ID ("latest" for the newest) down to its full
 * backup: the manifests, newest first (a GPtrArray that holds a reference
 * to each). A missing link, a cycle, a chain longer than REPO_CHAIN_MAX,
 * or a disk whose size changes along the chain is an error.
 */
GPtrArray *repo_chain(const Repo *r, const char *id, const char *disk,
                      GError **error);

/*
 * Check each link's image of CHAIN (from repo_chain): a regular file; a
 * qcow2 one whose header names exactly its parent's image as backing file
 * ("PARENT.FMT", with that format), or none for the full backup, with the
 * disk's size and no external data file; a raw one of the disk's size.
 * REPO_ERROR_CORRUPT, naming the image, if not.
 */
bool repo_check_chain(const Repo *r, GPtrArray *chain, const char *disk,
                      GError **error);

/*
 * How QEMU should open links FROM.. of CHAIN (FROM 0: all of it): a
 * "json:{...}" file name that names every link's file and driver
 * explicitly, so that no backing file name written inside an image is
 * ever followed. With TOP (a qcow2 image being written, e.g. by a merge),
 * TOP is opened above those links (above nothing if FROM is past the end).
 * With the repository's key checked, every qcow2 is opened with the secret
 * REPO_KEY_SECRET (see util_secret_object).
 */
char *repo_chain_filename(const Repo *r, GPtrArray *chain, guint from,
                          const char *disk, const char *top);

/* How QEMU should open the qcow2 IMAGE alone ("json:{...}", with the
 * repository's key if checked); its backing is the caller's concern. */
char *repo_qcow2_filename(const Repo *r, const char *image);

/* ---- the merge journal (journal.c) ---- */

/* What a decided merge still has to do (see lib/backup/merge.c). */
typedef struct {
    char *disk;            /* the disk merged */
    char *to;              /* the backup that gets the new image */
    char *parent;          /* its new parent, or NULL (now a full) */
    RepoFormat format;     /* of the new image */
    RepoFormat old_format; /* of TO's image before */
    GPtrArray *drop;       /* backup ids that lose the disk (strings) */
    bool digests_sparse;   /* the new digests' layout; a journal of a qbk
                              from before sparse digests left dense ones */
} MergeJournal;

MergeJournal *merge_journal_new(void);
void merge_journal_free(MergeJournal *j);
G_DEFINE_AUTOPTR_CLEANUP_FUNC(MergeJournal, merge_journal_free)

/* Parse TEXT (validating every id and name). */
MergeJournal *merge_journal_parse(const char *text, size_t len, GError **error);

/* The journal of R, NULL with no error if there is none. */
MergeJournal *repo_read_journal(const Repo *r, GError **error);
bool repo_write_journal(const Repo *r, const MergeJournal *j, GError **error);
bool repo_remove_journal(const Repo *r, GError **error);

/* ---- qcow2 headers (qcow2.c) ---- */

typedef struct {
    guint32 version;      /* 2 or 3 */
    guint32 cluster_bits; /* 9 to 21 */
    guint64 size;         /* virtual size, bytes */
    char *backing;        /* backing file name, or NULL */
    char *backing_format; /* from the header extension, or NULL */
    bool data_file;       /* it has an external data file */
} Qcow2Header;

/* Parse the first LEN bytes of an image (at least its first cluster, or
 * the whole file if shorter). */
bool qcow2_header_parse(const guint8 *buf, size_t len, Qcow2Header *h,
                        GError **error);
bool qcow2_header_read(int fd, Qcow2Header *h, GError **error);
void qcow2_header_clear(Qcow2Header *h);

#endif /* QBK_REPO_H */
