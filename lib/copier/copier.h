/*
 * lib/copier: copy a disk, or the dirty part of it, from an NBD export to an
 * NBD target, with many requests in flight on one event loop.
 *
 * It knows NBD and files only: the caller names the source export (and the
 * dirty bitmap context to follow), the target export, and where the block
 * digests go. It never talks QMP, so backup, merge and restore can all use
 * it on exports served by QEMU, qemu-storage-daemon or qemu-nbd.
 *
 * What gets copied: every region that the source's "base:allocation" says
 * holds data (and, with a dirty bitmap, that the bitmap marks dirty), in
 * chunks aligned to COPIER_BLOCK_SIZE. Regions that read as zeros are
 * written as zeros (or skipped when the target already reads as zeros),
 * never as data. Memory: requests x chunk size, plus one window of extents.
 */
#ifndef QBK_COPIER_H
#define QBK_COPIER_H

#include <stdbool.h>
#include <stdint.h>

#include <glib.h>

#define COPIER_ERROR copier_error_quark()
GQuark copier_error_quark(void);

typedef enum {
    COPIER_ERROR_CONNECT, /* an export could not be reached or lacks a feature */
    COPIER_ERROR_READ,    /* the source failed a read or block status */
    COPIER_ERROR_WRITE,   /* the target failed a write (e.g. ENOSPC) */
    COPIER_ERROR_HASH,    /* the digest file could not be written */
    COPIER_ERROR_STALLED, /* no progress within the stall timeout */
    COPIER_ERROR_CANCELLED,
    COPIER_ERROR_OPTIONS, /* an option out of its bounds */
} CopierErrorCode;

/* Digests cover blocks of this many bytes (the last may be shorter). */
#define COPIER_BLOCK_SIZE (64 * 1024)

/* Bytes of one block's digest (XXH3-128: fast enough to hash every byte
 * copied; it detects corruption, it is not a defence against tampering). */
#define COPIER_DIGEST_LEN 16

/* An NBD export, given as an NBD URI (nbd+unix:///EXPORT?socket=PATH,
 * nbd://HOST:PORT/EXPORT, nbds... for TLS: whatever libnbd connects to);
 * or, as a target only, a local raw file written with Linux AIO and
 * O_DIRECT; or nothing (uri and file NULL: the data is read and hashed
 * only, to verify). */
typedef struct {
    const char *uri;
    /* target only: write this raw file instead */
    const char *file;
    /* target only, or NULL: the same image as URI, written without
     * compression, where URI compresses every write (QEMU's compress
     * filter): data that would not shrink goes here, at full speed */
    const char *uri_plain;
    /* for nbds URIs: ca-cert.pem, client-cert.pem, client-key.pem
     * (libnbd's tls-certificates) */
    const char *tls_dir;
    /* to connect, negotiate and shake hands; 0: COPIER_CONNECT_TIMEOUT_MS */
    int timeout_ms;
} CopierEndpoint;

/* How long a server may take to accept, negotiate and shake hands. */
#define COPIER_CONNECT_TIMEOUT_MS 30000

/* The NBD URI of export NAME on the unix socket SOCKET, escaped (any
 * character may appear in either). */
char *copier_nbd_uri(const char *socket, const char *name);

/* Whether TEXT names an NBD export (an nbd, nbds, nbd+unix ... URI)
 * rather than a file. */
bool copier_is_nbd_uri(const char *text);

/* A byte range of the disk. */
typedef struct {
    guint64 offset;
    guint64 length;
} CopierRange;

typedef struct {
    guint64 size;          /* of the disk, bytes */
    guint64 bytes_read;    /* read from the source */
    guint64 bytes_written; /* written as data to the target */
    guint64 bytes_zero;    /* written as zeros (no data sent) */
    guint64 bytes_skipped; /* not dirty, or zero on a zeroed target */
    guint64 bytes_done;    /* of size: accounted for so far */
    double seconds;        /* wall time of the copy */
    /* guest-write notices, release, pacing (zero when not asked for) */
    guint64 notices;              /* written extents seen in the notice map */
    guint64 bytes_bumped;         /* moved ahead in the queue by notices */
    guint64 bytes_released;       /* trimmed on the source after copying */
    guint64 release_errors;       /* trims the source refused (not fatal) */
    double read_ms_mean;          /* mean latency of a read request */
    guint window_min, window_max; /* requests allowed in flight (pacing) */
    double window_mean;           /* time-weighted */
    guint pacing_cuts;            /* times the window was cut */
    /* planning: what block status said, and what it cost */
    guint64 extents;             /* regions planned (data, zero, skipped) */
    guint64 block_status_calls;  /* questions asked of the source */
    guint64 allocation_asked;    /* bytes whose allocation was asked (a
                                  * selection's clean windows are not) */
    double block_status_seconds; /* waiting for their answers (overlaps
                                  * the copy) */
    double plan_seconds;         /* turning answers into work (the loop's
                                  * own time) */
    guint64 planned_max;         /* most regions planned ahead at once */
} CopierStats;

typedef void (*CopierProgress)(const CopierStats *stats, void *opaque);

/* How a file target is written (an NBD target is the server's business). */
typedef enum {
    /* through the page cache, each write's writeback started at once and
     * the pages dropped once written back (COPIER_WRITE_BEHIND bytes
     * behind): the device always has work, and the cache stays small */
    COPIER_WRITE_CACHED,
    /* O_DIRECT (the page cache where the file system refuses it) */
    COPIER_WRITE_DIRECT,
} CopierWriteMode;

/* Cached writes: bytes written but not yet known durable and dropped. */
#define COPIER_WRITE_BEHIND (64 * 1024 * 1024)

bool copier_write_mode_parse(const char *text, CopierWriteMode *mode);
const char *copier_write_mode_name(CopierWriteMode mode);

typedef struct {
    guint requests;       /* in flight at once (default 16) */
    guint connections;    /* to the source; requests spread over them
                             (default 2, at most COPIER_MAX_CONNECTIONS) */
    guint64 chunk_size;   /* bytes per request, a multiple of
                             COPIER_BLOCK_SIZE (default 256 KiB) */
    const char *bitmap;   /* copy only what the source's
                             "qemu:dirty-bitmap:BITMAP" marks; NULL: all */
    guint depth_limit;    /* instead of a bitmap: copy only what the
                                source's "qemu:allocation-depth" puts in
                                its top DEPTH_LIMIT layers (a backing
                                chain's newest links); 0: off */
    const GArray *ranges; /* instead of a bitmap: copy only these
                                CopierRange (sorted, disjoint); NULL: off */
    bool target_zeroed;   /* the target reads as zeros: skip zero regions */
    /* The source's own chain, exported with "qemu:allocation-depth", for a
     * source whose map stops at its top image (a snapshot-access view says
     * "hole" but not "zero" where that image has nothing): there, a depth
     * of 0 (nothing in the whole chain), asked after the source's map,
     * means zeros. The images below the top must not change. NULL: off. */
    const CopierEndpoint *chain;
    CopierWriteMode write_mode; /* how a file target is written */
    int digest_fd;            /* -1, or a file receiving one digest per block at
                             offset block * COPIER_DIGEST_LEN (sparse
                             layout); filled from digest_parent_fd, so
                             blocks not copied keep the parent's digests */
    int digest_parent_fd;     /* the parent backup's digests; -1: the disk's
                             blocks not copied read as zeros */
    bool digest_parent_dense; /* ... in the dense layout */
    guint64 rate_limit;       /* bytes read per second; 0: unlimited */
    guint stall_seconds;      /* fail after this long without progress (60) */
    volatile gint *cancel;    /* set to non-zero (e.g. by a signal handler) to
                              stop the copy; may be NULL */
    CopierProgress progress;  /* called at most every 250 ms, and at the end */
    void *progress_opaque;

    /*
     * Guest-write notices: NOTICES is an export whose NOTICE_CONTEXT map
     * shows where the guest wrote since the point in time ("base:allocation"
     * of a scratch image: allocated = written; "qemu:allocation-depth" of a
     * scheme-A fleecing export: depth 1 = written). It is swept every
     * NOTICE_MS; what the guest wrote is copied next, then what lies within
     * NOTICE_RADIUS of it (guests write with locality).
     */
    const CopierEndpoint *notices;
    const char *notice_context;
    guint notice_ms;       /* default 20 */
    guint64 notice_radius; /* bytes each side; default 4 MiB */
    /* Trim the source once a region is in the target, and regions that
     * need no copy once planned: on a snapshot-access export this frees
     * QEMU's scratch space and ends copy-before-write there. A released
     * region can never be read again. */
    bool release;
    /* Guest-aware pacing: keep the mean read latency near this many
     * microseconds by cutting the requests in flight in half when above
     * and adding one when below (0: off). Reads wait in the same queue as
     * the guest's I/O, so their latency is what the guest feels. */
    guint latency_target_us;
    /* -1, or a file receiving text lines "NS EVENT OFFSET LENGTH" (events:
     * copy, release, notice; "NS window N MEAN_US" for pacing), NS on
     * CLOCK_MONOTONIC, for tests and benchmarks. */
    int trace_fd;
    /* Regions planned ahead and not yet started (work queued, releases
     * waiting), at most: block status waits while there are more, so
     * that memory follows this, not a disk's extents (50-110 bytes
     * each). The windows already asked add theirs (a 4 GiB window of
     * scattered 4 KiB pieces: ~100k). Notices reach only what is
     * planned. Default COPIER_PLAN_AHEAD. */
    guint plan_ahead;
} CopierOptions;

#define COPIER_MAX_CONNECTIONS 8
/* Bounds of the memory the copier takes: requests x chunk size. */
#define COPIER_MAX_REQUESTS 1024
#define COPIER_MAX_CHUNK    (32 * 1024 * 1024) /* QEMU's NBD request limit */
/* Longest pacing target, microseconds. */
#define COPIER_MAX_LATENCY_US (60 * 1000 * 1000)
/* Regions planned ahead, by default: up to ~25 MiB of them. */
#define COPIER_PLAN_AHEAD (256 * 1024)

/* Fill OPTS with the defaults. */
void copier_options_init(CopierOptions *opts);

/* Requests in flight by default for a source over TCP (nbd://, nbds://):
 * a network's latency needs more than a local socket's 16 to keep the
 * link busy (bench/remote, 256 KiB chunks: at 10 ms added per read, 16
 * requests keep 0.51 of the 0 ms throughput, 64 and 128 keep 1.0; at
 * 50 ms 16 keep 0.13, 64 0.49, 128 0.76; 128 cost nothing at 0 ms). Their
 * buffers are 32 MiB. */
#define COPIER_REMOTE_REQUESTS 128

/* Whether URI reaches its server over TCP (nbd://, nbds://). */
bool copier_uri_is_tcp(const char *uri);

/* Whether OPTS are within their bounds: requests 1 to COPIER_MAX_REQUESTS,
 * connections 1 to COPIER_MAX_CONNECTIONS, chunk size a multiple of
 * COPIER_BLOCK_SIZE up to COPIER_MAX_CHUNK, pacing target up to
 * COPIER_MAX_LATENCY_US (COPIER_ERROR_OPTIONS, naming the option). */
bool copier_options_check(const CopierOptions *opts, GError **error);

/*
 * Copy SOURCE to TARGET (both of the same size) as OPTS say, flush the
 * target, and fill STATS. On failure the target holds an unknown part of
 * the data; "first failure wins" and is the error returned.
 */
bool copier_copy(const CopierEndpoint *source, const CopierEndpoint *target,
                 const CopierOptions *opts, CopierStats *stats, GError **error);

/*
 * Several copies at once on one loop (all the disks of a VM): each is a
 * Copier on the caller's GMainContext, and they share a budget of requests
 * in flight (and of buffers: memory is LIMIT x chunk size, whatever the
 * number of copiers), in fair shares while several run.
 */
typedef struct CopierBudget CopierBudget;

CopierBudget *copier_budget_new(guint limit, guint64 chunk_size);
void copier_budget_free(CopierBudget *b);
G_DEFINE_AUTOPTR_CLEANUP_FUNC(CopierBudget, copier_budget_free)

typedef struct Copier Copier;
typedef void (*CopierDone)(Copier *c, void *opaque);

/* Connect to SOURCE and TARGET for a copy on CTX under BUDGET (NULL: its
 * own, of OPTS->requests); nothing is read yet. */
Copier *copier_new(const CopierEndpoint *source, const CopierEndpoint *target,
                   const CopierOptions *opts, GMainContext *ctx,
                   CopierBudget *budget, GError **error);

/* Start copying; DONE(C, OPAQUE) runs from CTX once it finished or
 * failed. */
void copier_start(Copier *c, CopierDone done, void *opaque);

/* Stop a copy that runs (it then fails as COPIER_ERROR_CANCELLED). */
void copier_cancel(Copier *c);

/* After DONE: its figures, and whether it succeeded. */
bool copier_result(Copier *c, CopierStats *stats, GError **error);

void copier_free(Copier *c);
G_DEFINE_AUTOPTR_CLEANUP_FUNC(Copier, copier_free)

/* ---- block digests (blockhash.c) ---- */

/* The digest of one block of LEN bytes. */
void copier_block_digest(const void *data, size_t len,
                         guint8 out[COPIER_DIGEST_LEN]);

/* Number of blocks of a disk of SIZE bytes. */
guint64 copier_block_count(guint64 size);

/*
 * Digest files hold a digest per block, at offset block *
 * COPIER_DIGEST_LEN. In the sparse layout (what the copier writes) each is
 * stored XORed with the digest of a zero block of its length, so a zero
 * block is stored as zero bytes: a hole in the file. A disk's digest file
 * then costs what its data does, not its size (8 TiB: 2 GiB dense). The
 * dense layout, each digest as it is, is that of the first repositories:
 * read, never written.
 */

/*
 * Make FD an empty digest file for a disk of SIZE bytes: a copy of
 * PARENT_FD's digests (PARENT_DENSE: in the dense layout), or with -1,
 * every block's digest that of a zero block. Holes are not read or copied.
 */
bool copier_digests_init(int fd, guint64 size, int parent_fd, bool parent_dense,
                         GError **error);

/*
 * An image checksum: XXH3-128 over the disk's block digests, in block
 * order, as lowercase hex. COPIER_SUM_DATA, what new backups record, hashes
 * only the blocks that are not zero blocks (each with its index, then the
 * block count and the size), so its cost follows the data: 2 GiB of zero
 * blocks' digests were hashed twice for an incremental of an 8 TiB disk.
 * COPIER_SUM_BLOCKS hashes every block's digest: the first repositories'.
 */
typedef enum {
    COPIER_SUM_BLOCKS, /* COPIER_SUM_BLOCKS_NAME */
    COPIER_SUM_DATA,   /* COPIER_SUM_DATA_NAME */
} CopierSum;

#define COPIER_SUM_BLOCKS_NAME "xxh3-128-blocks-64k"
#define COPIER_SUM_DATA_NAME   "xxh3-128-data-blocks-64k"

const char *copier_sum_name(CopierSum alg);

/* The checksum ALG of the digest file FD (DENSE: in the dense layout); a
 * sparse file's holes are not read. */
char *copier_digests_checksum(int fd, guint64 size, bool dense, CopierSum alg,
                              GError **error);

/* N digests of a disk of SIZE bytes from block FIRST on, as they are
 * (DENSE: the file's layout) into OUT; false if the file is short. */
bool copier_digests_read(int fd, guint64 size, bool dense, guint64 first,
                         guint64 n, guint8 *out);

/*
 * The same checksum computed from a raw image file (or any file reading as
 * the disk's bytes), for verification without QEMU. The file's holes are
 * not read.
 */
char *copier_file_checksum(const char *path, guint64 size, CopierSum alg,
                           GError **error);

#endif /* QBK_COPIER_H */
