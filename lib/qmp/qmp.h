/*
 * lib/qmp: a small synchronous client for QEMU's machine protocol.
 *
 * It connects to a QMP socket (or starts a private qemu-storage-daemon),
 * negotiates capabilities, runs commands and transactions, keeps every event
 * that arrives while it waits, and describes the VM's disks. It knows nothing
 * about backups; every other qbk module talks to QEMU through it.
 *
 * Ownership: json-c objects passed in as command arguments are taken over;
 * objects returned are new references that the caller puts.
 *
 * Debugging: with $QBK_QMP_TRACE set to a file, every message sent ("->")
 * and received ("<-") is appended to it, one line each.
 */
#ifndef QBK_QMP_H
#define QBK_QMP_H

#include <stdbool.h>
#include <stdint.h>

#include <glib.h>
#include <json-c/json.h>

#include "util.h"

/* Transport and protocol failures. */
#define QMP_ERROR qmp_error_quark()
GQuark qmp_error_quark(void);

typedef enum {
    QMP_ERROR_CONNECT,  /* the socket could not be reached */
    QMP_ERROR_PROTOCOL, /* the peer does not speak QMP */
    QMP_ERROR_TIMEOUT,  /* no answer within the timeout */
    QMP_ERROR_CLOSED,   /* QEMU closed the connection or died */
    QMP_ERROR_SPAWN,    /* a helper process could not be started */
} QmpErrorCode;

/*
 * A command that QEMU refused: the code is QEMU's error class and the
 * message is QEMU's "desc", unchanged.
 */
#define QMP_COMMAND_ERROR qmp_command_error_quark()
GQuark qmp_command_error_quark(void);

typedef enum {
    QMP_COMMAND_ERROR_GENERIC,           /* GenericError */
    QMP_COMMAND_ERROR_COMMAND_NOT_FOUND, /* CommandNotFound */
    QMP_COMMAND_ERROR_DEVICE_NOT_ACTIVE, /* DeviceNotActive */
    QMP_COMMAND_ERROR_DEVICE_NOT_FOUND,  /* DeviceNotFound */
    QMP_COMMAND_ERROR_KVM_MISSING_CAP,   /* KVMMissingCap */
    QMP_COMMAND_ERROR_UNKNOWN,           /* a class this client predates */
} QmpCommandErrorCode;

/* QEMU's name of the class of a QMP_COMMAND_ERROR, or NULL for others. */
const char *qmp_error_class(const GError *error);

/* Default for every wait, in milliseconds. */
#define QMP_DEFAULT_TIMEOUT_MS 30000

/* After this many commands in a row time out without a line from the
 * peer (not even an event or a late answer), later commands fail at once
 * (QMP_ERROR_TIMEOUT) instead of each waiting its timeout: the peer is
 * out of reach. A line from it lifts that. */
#define QMP_SILENT_GIVE_UP 2

typedef struct QmpClient QmpClient;

/*
 * Connect to ADDRESS ("PATH", "unix:PATH" or "tcp:HOST:PORT"), read the
 * greeting and leave capabilities negotiation done. TIMEOUT_MS bounds the
 * whole handshake and becomes the client's default timeout.
 */
QmpClient *qmp_connect(const char *address, int timeout_ms, GError **error);

/*
 * qmp_connect(), where ADDRESS may also be "tls:HOST:PORT": a monitor on
 * a TLS socket chardev (tls-creds-x509), reached with the credentials in
 * TLS_DIR (ca-cert.pem, client-cert.pem, client-key.pem, as QEMU lays
 * them out); the server's certificate must name HOST.
 */
QmpClient *qmp_connect_tls(const char *address, const char *tls_dir,
                           int timeout_ms, GError **error);

/* The subject of the client certificate in TLS_DIR ("CN=backup1,O=..."):
 * the identity a TLS server's authz sees for us. */
char *qmp_tls_identity(const char *tls_dir, GError **error);

/*
 * Connect to the guest agent (qemu-guest-agent in the guest) through
 * ADDRESS, the host side of its virtio-serial port, as for qmp_connect().
 * Its protocol is QMP's without greeting or events; the handshake
 * (guest-sync-delimited) skips whatever a former client left in the
 * channel. TIMEOUT_MS bounds it, so an agent that is not running (or a
 * guest that does not run) is an error, not a hang. qmp_execute() then
 * runs the agent's commands.
 */
QmpClient *qmp_connect_agent(const char *address, int timeout_ms,
                             GError **error);

/*
 * The address ("unix:PATH" or "tcp:HOST:PORT") of the VM's guest agent
 * channel: the virtio-serial port named org.qemu.guest_agent.0 and its
 * socket chardev. NULL with ERROR if there is none, or it is another
 * kind of chardev.
 */
char *qmp_find_agent(QmpClient *qmp, GError **error);

/*
 * Close the connection. A client made by qmp_spawn_storage_daemon() also
 * stops its daemon (QMP "quit", then SIGTERM, then SIGKILL, each bounded).
 */
void qmp_free(QmpClient *qmp);
G_DEFINE_AUTOPTR_CLEANUP_FUNC(QmpClient, qmp_free)

void qmp_set_timeout(QmpClient *qmp, int timeout_ms);

/* QEMU's version from the greeting. */
void qmp_get_version(QmpClient *qmp, int *major, int *minor, int *micro);

/* The VM's run state ("running", "paused", "inmigrate", ...; new string)
 * and, in *RUNNING (may be NULL), whether the guest runs. NULL if QEMU
 * cannot tell: a qemu-storage-daemon has no run state. */
char *qmp_query_status(QmpClient *qmp, bool *running, GError **error);

/*
 * Run COMMAND with ARGUMENTS (taken over; may be NULL) and return QEMU's
 * "return" value as a new reference (an empty object for "{}"). Events that
 * arrive meanwhile are queued. On a timeout the late reply, if it ever comes,
 * is recognised by its id and discarded.
 */
json_object *qmp_execute(QmpClient *qmp, const char *command,
                         json_object *arguments, GError **error);

/* qmp_execute() for commands whose return value is not needed. */
bool qmp_run(QmpClient *qmp, const char *command, json_object *arguments,
             GError **error);

/* QOM property PROPERTY of the object at PATH, if it is a string (new
 * string), else NULL: no such object or property, or QEMU refused. */
char *qmp_qom_get_string(QmpClient *qmp, const char *path,
                         const char *property);

/* The user-created objects (qom-list of /objects): a new array, empty when
 * QEMU has none and so no /objects container (a qemu-storage-daemon
 * started without --object); NULL and ERROR if QEMU refused. */
json_object *qmp_list_objects(QmpClient *qmp, GError **error);

/* Run an HMP command through human-monitor-command; returns its output. */
char *qmp_hmp(QmpClient *qmp, const char *command_line, GError **error);

/*
 * Wait for an event: the oldest queued one, or the next to arrive, whose
 * name is NAME (NULL: any) and for which MATCH (NULL: always) returns true.
 * Returns the whole event object ({event, data, timestamp}) and removes it
 * from the queue; other events stay queued in order.
 */
typedef bool (*QmpEventMatch)(json_object *event, void *opaque);
json_object *qmp_wait_event(QmpClient *qmp, const char *name,
                            QmpEventMatch match, void *opaque, int timeout_ms,
                            GError **error);

/* Read whatever QEMU has already sent, without blocking; queue events. */
bool qmp_poll_events(QmpClient *qmp, GError **error);

/* Number of queued events. */
guint qmp_pending_events(QmpClient *qmp);

/* Take the oldest queued event, or NULL. */
json_object *qmp_pop_event(QmpClient *qmp);

/* ---- json-c getters (json.c): borrowed values; NULL/0/false if the key
 * is missing or of another type ---- */

const char *qmp_json_string(json_object *obj, const char *key);
gint64 qmp_json_int(json_object *obj, const char *key);
guint64 qmp_json_uint(json_object *obj, const char *key);
bool qmp_json_bool(json_object *obj, const char *key);
json_object *qmp_json_array(json_object *obj, const char *key);

/* The length of ARRAY, 0 if it is not an array (or NULL); its element I,
 * NULL past the end. */
size_t qmp_json_length(json_object *array);
json_object *qmp_json_index(json_object *array, size_t i);

/* ---- json-c setters (json.c): OBJ[KEY] = VALUE, replacing any; a NULL
 * string is JSON null ---- */

void qmp_json_set_string(json_object *obj, const char *key, const char *value);
void qmp_json_set_int(json_object *obj, const char *key, gint64 value);
void qmp_json_set_uint(json_object *obj, const char *key, guint64 value);
void qmp_json_set_bool(json_object *obj, const char *key, bool value);
void qmp_json_set_double(json_object *obj, const char *key, double value);

/* json_object_put() as a GDestroyNotify (for GPtrArray, GQueue). */
void qmp_json_free(gpointer obj);

/* ---- transactions (transaction.c) ---- */

/*
 * A QMP "transaction": actions added one by one, then run atomically; if
 * any action fails QEMU undoes all of them.
 */
typedef struct QmpTransaction QmpTransaction;

QmpTransaction *qmp_transaction_new(void);
void qmp_transaction_free(QmpTransaction *tx);
G_DEFINE_AUTOPTR_CLEANUP_FUNC(QmpTransaction, qmp_transaction_free)

/* Append an action of TYPE with DATA (taken over). */
void qmp_transaction_add(QmpTransaction *tx, const char *type,
                         json_object *data);
guint qmp_transaction_length(const QmpTransaction *tx);

/* The "actions" array as QEMU will see it (borrowed; for logs and tests). */
json_object *qmp_transaction_actions(const QmpTransaction *tx);

/* Run all actions at once; an empty transaction succeeds without QEMU. */
bool qmp_transaction_run(QmpClient *qmp, QmpTransaction *tx, GError **error);

/* ---- the VM's disks (disks.c) ---- */

/* A named dirty bitmap of a block node (internal nameless ones skipped). */
typedef struct {
    char *name;
    uint64_t count;       /* dirty bytes */
    uint32_t granularity; /* bytes per bit */
    bool recording;
    bool busy;         /* in use by a job or an export */
    bool persistent;   /* stored in the qcow2 image */
    bool inconsistent; /* QEMU did not close it cleanly: not to be trusted */
} QmpBitmap;

/* A disk of the VM: a device's BlockBackend and its top format node. */
typedef struct {
    char *id;       /* what users type: qdev id, else drive id, else node */
    char *qdev;     /* qdev path; NULL without a device */
    char *device;   /* BlockBackend name; "" for -blockdev disks */
    char *node;     /* top format node: where checkpoint bitmaps live */
    char *driver;   /* format driver of that node: qcow2, raw, ... */
    char *filename; /* image file name */
    uint64_t size;  /* virtual size, bytes */
    bool read_only;
    char *no_bitmaps;       /* why it cannot hold persistent bitmaps, or NULL */
    GPtrArray *bitmaps;     /* QmpBitmap*, named bitmaps of the node, owned */
    guint nameless_bitmaps; /* internal bitmaps of jobs and filters */
} QmpDisk;

void qmp_disk_free(QmpDisk *disk);
G_DEFINE_AUTOPTR_CLEANUP_FUNC(QmpDisk, qmp_disk_free)

/*
 * The VM's disks, in QEMU's order. Empty drives and CD-ROMs are skipped.
 * Filters above a disk (throttle, copy-before-write, ...) are looked
 * through so that .node is the format node.
 */
GPtrArray *qmp_query_disks(QmpClient *qmp, GError **error);

/*
 * Disks made of the given format nodes, for a qemu-storage-daemon that has
 * no devices. IDS names them (same length as NODES).
 */
GPtrArray *qmp_query_node_disks(QmpClient *qmp, const char *const *nodes,
                                const char *const *ids, GError **error);

/*
 * The one user of a block node, as a place to put a filter above the node:
 * REOPEN, the options of a pass-through filter (throttle, copy-on-read) to
 * blockdev-reopen with a new "file"; or QOM, a device whose "drive" can be
 * set. Both NULL: the node has no user. FILE: the node's own "file" child.
 * Fails if the node has several users (a filter under one would miss the
 * others' writes) or one we cannot move (an export, a job).
 */
typedef struct {
    json_object *reopen;
    char *qom;
    char *file;
} QmpInsertPoint;

/*
 * QEMU's block graph at one moment (x-debug-query-block-graph,
 * query-named-block-nodes and query-block): the insert points of all of a
 * VM's disks from three round trips, not three per disk. Take it again
 * after a change that concerns the nodes asked about.
 */
typedef struct QmpBlockGraph QmpBlockGraph;
QmpBlockGraph *qmp_block_graph_get(QmpClient *qmp, GError **error);
void qmp_block_graph_free(QmpBlockGraph *g);
G_DEFINE_AUTOPTR_CLEANUP_FUNC(QmpBlockGraph, qmp_block_graph_free)

bool qmp_insert_point(const QmpBlockGraph *g, const char *node,
                      QmpInsertPoint *pt, GError **error);
void qmp_insert_point_clear(QmpInsertPoint *pt);

/* The disk whose id, qdev path, drive name or node name is NAME, or NULL. */
QmpDisk *qmp_disk_find(GPtrArray *disks, const char *name);

/* The named bitmap of DISK, or NULL. */
const QmpBitmap *qmp_disk_bitmap(const QmpDisk *disk, const char *name);

/* What DISK is to the VM: "firmware" (a read-only pflash: the UEFI code),
 * "firmware-vars" (a writable pflash: the UEFI variable store) or
 * "disk". */
const char *qmp_disk_role(const QmpDisk *disk);

/* ---- a private qemu-storage-daemon (daemon.c) ---- */

/*
 * Start qemu-storage-daemon on IMAGES (qcow2 or raw, opened read-write and
 * locked, so an image in use by a running VM is refused) with a QMP monitor
 * on a private socket, and connect to it. The node of IMAGES[i] is named
 * "img<i>". qmp_free() stops the daemon, which writes persistent bitmaps back
 * to the images. KEY_FILE (or NULL): the images are LUKS-encrypted qcow2s
 * with the passphrase in that file (secret QMP_DAEMON_KEY_SECRET), opened
 * without their backing files (the copier writes whole clusters: nothing
 * is read from below).
 */
typedef enum {
    QMP_DAEMON_DIRECT_IO = 1 << 0, /* cache.direct + native AIO: bypass the
                                      page cache (not on tmpfs) */
    QMP_DAEMON_COMPRESS = 1 << 1,  /* "img<i>" is QEMU's compress filter on
                                      the qcow2 ("img<i>-fmt"): every
                                      cluster written there is compressed.
                                      A cluster can be written so only
                                      once, and whole (but the image's
                                      last) */
} QmpDaemonFlags;

#define QMP_DAEMON_KEY_SECRET UTIL_KEY_SECRET

QmpClient *qmp_spawn_storage_daemon(const char *const *images,
                                    QmpDaemonFlags flags, const char *key_file,
                                    int timeout_ms, GError **error);

/*
 * Ask the daemon that qmp_spawn_storage_daemon() started to quit, without
 * waiting for it to exit: a daemon takes tens of milliseconds to close its
 * images, which the caller can spend on other work before
 * qmp_stop_storage_daemon().
 */
void qmp_quit_storage_daemon(QmpClient *qmp);

/*
 * Stop the daemon that qmp_spawn_storage_daemon() started (asking it to quit
 * unless qmp_quit_storage_daemon() did) and report how it ended (an unclean
 * exit loses bitmap updates). Closes the connection.
 */
bool qmp_stop_storage_daemon(QmpClient *qmp, GError **error);

#endif /* QBK_QMP_H */
