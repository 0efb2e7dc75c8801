/*
 * lib/fleece: a point-in-time view of a VM's disks (image fleecing) while
 * the guest writes, exported over NBD, by one of the schemes behind a
 * FleeceScheme table (DESIGN.md, "Fleecing"): A, a backup job into a
 * scratch image backed by the disk; B, a copy-before-write filter with a
 * snapshot-access view that can be released as it is copied. It speaks
 * QMP (lib/qmp) and knows nothing of checkpoints or repositories.
 *
 * Everything it adds to QEMU is named qbk-<kind><index>-<tag>, where the
 * tag is the backup's id, so that a later run can find and remove what a
 * killed one left behind, and tell another backup's nodes from its own.
 */
#ifndef QBK_FLEECE_H
#define QBK_FLEECE_H

#include <stdbool.h>

#include "qmp.h"

#define FLEECE_ERROR fleece_error_quark()
GQuark fleece_error_quark(void);

typedef enum {
    FLEECE_ERROR_FAILED,         /* QEMU refused a step; the message says */
    FLEECE_ERROR_SERVER_RUNNING, /* QEMU runs an NBD server of its own */
} FleeceErrorCode;

/* The kinds of names a FleeceDisk gives (qbk-<kind><index>-<tag>). */
#define FLEECE_KINDS "sfjecaxh"

typedef struct FleeceScheme FleeceScheme;

/* One disk being fleeced: the names of everything qbk adds for it. */
typedef struct {
    const FleeceScheme *scheme;
    char *disk;           /* the disk's id: the name of its export */
    char *node;           /* its format node */
    char *scratch;        /* scratch node */
    char *filter;         /* A: the backup job's filter node */
    char *job;            /* A: the sync=none backup job */
    char *export_;        /* NBD export id */
    char *file;           /* scratch image file, or NULL (not ours to remove) */
    bool raw_scratch;     /* the scratch is a sparse raw file, not a qcow2 */
    bool qemu_file;       /* FILE is a path on QEMU's host, made by QEMU
                             (blockdev-create) and never removed here */
    char *key_secret;     /* or NULL: the scratch is LUKS-encrypted with the
                             passphrase in this secret object of QEMU's, and
                             made by QEMU (blockdev-create) */
    char *cbw;            /* B: copy-before-write filter node */
    char *access;         /* B: snapshot-access node: the point in time */
    char *notice_export;  /* B: id and name of the scratch node's export */
    char *chain_export;   /* B: id and name of the disk node's export */
    QmpInsertPoint point; /* B: where the filter goes: above NODE */
} FleeceDisk;

struct FleeceScheme {
    const char *name;           /* "A" or "B", as manifests say */
    const char *notice_context; /* the notice export's map of what the
                                   guest overwrote since the point */
    bool releases;              /* its view may be trimmed as it is copied */
    bool qcow2_scratch;         /* its scratch must be a qcow2 (A: it has
                                   the disk as its backing) */
    guint cbw_timeout_s;        /* longest wait of a guest write, or 0 */

    /*
     * Add what goes in before the point in time: the scratch node (on the
     * image fleece_create_scratch made), and (B) the filter, not yet in
     * the guest's path.
     */
    bool (*add)(QmpClient *qmp, FleeceDisk *fd, GError **error);
    /* Actions of the point-in-time transaction (A: the backup job). */
    void (*add_actions)(QmpTransaction *tx, FleeceDisk *fd);
    /*
     * After that transaction, NULL if nothing: (B) put the filter under
     * the disk's user, which no transaction can hold. This is the point
     * in time: the caller pauses a running VM around the insertion of all
     * the disks' filters, and stops the older checkpoints only after it.
     */
    bool (*insert)(QmpClient *qmp, FleeceDisk *fd, GError **error);
    /* Export the view as FD->disk, with BITMAP (of the disk's node, may be
     * NULL) as a dirty-bitmap map; and what FD's notices are read from. */
    bool (*export)(QmpClient *qmp, FleeceDisk *fd, const char *bitmap,
                   GError **error);
    /* The export whose NOTICE_CONTEXT shows the guest's writes. */
    const char *(*notice_export)(const FleeceDisk *fd);
    /* B: the disk's own node, exported read-only with its allocation depth,
     * where the view's map does not see below the disk's top image (its
     * backing chain); NULL if the view's map is complete (A). */
    const char *(*chain_export)(const FleeceDisk *fd);
};

extern const FleeceScheme fleece_scheme_a;
extern const FleeceScheme fleece_scheme_b;

/*
 * Names for disk INDEX of backup TAG by SCHEME (short: QEMU limits names
 * to 31); its scratch file in SCRATCH_DIR (NULL: none).
 */
FleeceDisk *fleece_disk_new(const FleeceScheme *scheme, const char *disk,
                            const char *node, guint index, const char *tag,
                            const char *scratch_dir);
void fleece_disk_free(FleeceDisk *fd);

/* The scratch images of FDS (FleeceDisk*), SIZES[i] bytes each, made at
 * once before the schemes' add: a sparse raw file, or a qcow2 (each a
 * qemu-img run, all at once); none is left on failure. A disk whose file
 * is on QEMU's host (qemu_file) gets it from QEMU (blockdev-create), an
 * earlier one truncated and reused; so does an encrypted one (key_secret),
 * LUKS for a raw scratch, qcow2's LUKS encryption for a qcow2. */
bool fleece_create_scratch(QmpClient *qmp, GPtrArray *fds, const guint64 *sizes,
                           GError **error);

/*
 * Whether scheme B can be used for disk NODE in GRAPH: the filter goes
 * right above the format node, under its one user (a device, or a
 * pass-through filter such as throttle); a node with other users (an
 * export, a job) would have writes the filter misses. Fills FD->point.
 * WHY (new string) if not.
 */
bool fleece_b_possible(const QmpBlockGraph *graph, FleeceDisk *fd, char **why);

/* Where QEMU's NBD server listens, and how it lets clients in. */
typedef struct {
    const char *socket;    /* a unix socket (a private path), or */
    const char *host;      /* an inet address on the hypervisor: HOST and */
    const char *port;      /* PORT */
    const char *tls_creds; /* a tls-creds-x509 object (endpoint=server) of
                              QEMU's; NULL: no TLS */
    const char *tls_authz; /* an authz object: who may connect */
} FleeceServer;

/*
 * Start an NBD server as SRV says; *STARTED says whether we did.
 * FLEECE_ERROR_SERVER_RUNNING if QEMU runs one already (QMP cannot tell
 * where).
 */
bool fleece_start_server(QmpClient *qmp, const FleeceServer *srv, bool *started,
                         GError **error);

/* QEMU's one tls-creds-x509 object with endpoint=server (its id), for an
 * NBD server with TLS; an error if there is none, or several. */
char *fleece_find_tls_creds(QmpClient *qmp, GError **error);

/*
 * Undo everything fleecing added for FDS, whatever state it is in:
 * exports, jobs (cancelled, waited for), filters (the user goes back to
 * the disk's node), nodes, scratch files; stop the server if STOP_SERVER.
 * Best effort: carries on past failures and reports the first.
 */
bool fleece_teardown(QmpClient *qmp, GPtrArray *fds, bool stop_server,
                     GError **error);

/* The names of qbk's nodes, exports and jobs in QEMU now (strings). */
GPtrArray *fleece_present_names(QmpClient *qmp, GError **error);

/*
 * Tear down whatever backup TAG left in QEMU: nodes, exports, jobs (to
 * undo a killed qbk-pull; its scratch files are in a private directory
 * that lib/util removes once its owner is gone).
 */
bool fleece_cleanup_tag(QmpClient *qmp, const char *tag, GError **error);

#endif /* QBK_FLEECE_H */
