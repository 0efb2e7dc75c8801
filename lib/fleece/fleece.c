/*
 * What both fleecing schemes share: the names of what they add to QEMU,
 * the scratch image, exports, the NBD server, and the teardown that undoes
 * all of it, in any state, after a failure or a kill.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "internal.h"
#include "util.h"

/* G_DEFINE_QUARK stringifies the quark name as written. */
/* clang-format off */
G_DEFINE_QUARK(qbk-fleece-error-quark, fleece_error)
/* clang-format on */

#define EVENT_TIMEOUT_MS 30000

FleeceDisk *fleece_disk_new(const FleeceScheme *scheme, const char *disk,
                            const char *node, guint index, const char *tag,
                            const char *scratch_dir)
{
    FleeceDisk *fd = g_new0(FleeceDisk, 1);

    fd->scheme = scheme;
    fd->disk = g_strdup(disk);
    fd->node = g_strdup(node);
    fd->scratch = g_strdup_printf("qbk-s%u-%s", index, tag);
    fd->filter = g_strdup_printf("qbk-f%u-%s", index, tag);
    fd->job = g_strdup_printf("qbk-j%u-%s", index, tag);
    fd->export_ = g_strdup_printf("qbk-e%u-%s", index, tag);
    fd->cbw = g_strdup_printf("qbk-c%u-%s", index, tag);
    fd->access = g_strdup_printf("qbk-a%u-%s", index, tag);
    fd->notice_export = g_strdup_printf("qbk-x%u-%s", index, tag);
    fd->chain_export = g_strdup_printf("qbk-h%u-%s", index, tag);
    if (scratch_dir) {
        /* raw or qcow2: the scheme is chosen later */
        g_autofree char *base = g_strdup_printf("%s.scratch", fd->scratch);

        fd->file = g_build_filename(scratch_dir, base, NULL);
    }
    return fd;
}

void fleece_disk_free(FleeceDisk *fd)
{
    if (!fd) {
        return;
    }
    g_free(fd->disk);
    g_free(fd->node);
    g_free(fd->scratch);
    g_free(fd->filter);
    g_free(fd->job);
    g_free(fd->export_);
    g_free(fd->file);
    g_free(fd->key_secret);
    g_free(fd->cbw);
    g_free(fd->access);
    g_free(fd->notice_export);
    g_free(fd->chain_export);
    qmp_insert_point_clear(&fd->point);
    g_free(fd);
}

/* Add the members of FROM (taken over) to TO. */
static void merge_into(json_object *to, json_object *from)
{
    json_object_object_foreach(from, key, value)
    {
        json_object_object_add(to, key, json_object_get(value));
    }
    json_object_put(from);
}

/* A sparse raw file of SIZE bytes at PATH: made here, owner-only, never
 * through a symbolic link; no process to run. */
static bool create_raw(const char *path, guint64 size, GError **error)
{
    int fd =
        open(path, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0600);

    if (fd < 0 || ftruncate(fd, (off_t)size) < 0) {
        int e = errno;

        if (fd >= 0) {
            close(fd);
            unlink(path);
        }
        g_set_error(error, FLEECE_ERROR, FLEECE_ERROR_FAILED,
                    "cannot create the scratch image '%s': %s", path,
                    g_strerror(e));
        return false;
    }
    close(fd);
    return true;
}

/* Remove FD's scratch file, if it is ours. */
static void remove_file(const FleeceDisk *fd)
{
    if (fd->file && !fd->qemu_file) {
        unlink(fd->file);
    }
}

/* Remove the raw scratch files of the first N disks of FDS. */
static void remove_raw(GPtrArray *fds, guint n)
{
    for (guint i = 0; i < n; i++) {
        FleeceDisk *fd = fds->pdata[i];

        if (fd->raw_scratch) {
            remove_file(fd);
        }
    }
}

/* Forget concluded job ID (not a block job: a blockdev-create). */
static bool job_dismiss(QmpClient *qmp, const char *id)
{
    json_object *args = json_object_new_object();

    qmp_json_set_string(args, "id", id);
    return qmp_run(qmp, "job-dismiss", args, NULL);
}

static bool job_concluded(json_object *ev, void *opaque)
{
    json_object *data = json_object_object_get(ev, "data");

    return g_strcmp0(qmp_json_string(data, "id"), opaque) == 0 &&
           g_strcmp0(qmp_json_string(data, "status"), "concluded") == 0;
}

/* QEMU runs blockdev-create with OPTIONS (taken) as job fd->job, which
 * teardown knows, and forgets the job once it concluded. */
static bool qemu_create_job(QmpClient *qmp, FleeceDisk *fd,
                            json_object *options, GError **error)
{
    json_object *args = json_object_new_object();
    json_object *ev, *jobs;
    g_autofree char *why = NULL;

    qmp_json_set_string(args, "job-id", fd->job);
    json_object_object_add(args, "options", options);
    if (!qmp_run(qmp, "blockdev-create", args, error)) {
        g_prefix_error(error,
                       "cannot create the scratch image '%s': ", fd->file);
        return false;
    }
    ev = qmp_wait_event(qmp, "JOB_STATUS_CHANGE", job_concluded, fd->job,
                        EVENT_TIMEOUT_MS, error);
    json_object_put(ev);
    jobs = ev ? qmp_execute(qmp, "query-jobs", NULL, error) : NULL;
    for (size_t i = 0; i < qmp_json_length(jobs); i++) {
        json_object *j = qmp_json_index(jobs, i);

        if (g_strcmp0(qmp_json_string(j, "id"), fd->job) == 0 &&
            qmp_json_string(j, "error")) {
            why = g_strdup(qmp_json_string(j, "error"));
        }
    }
    json_object_put(jobs);
    job_dismiss(qmp, fd->job);
    if (why) {
        g_set_error(error, FLEECE_ERROR, FLEECE_ERROR_FAILED,
                    "QEMU cannot create the scratch image '%s': %s", fd->file,
                    why);
    }
    return ev && !why;
}

/* Blockdev options {"driver": DRIVER, KEY: VALUE, "size": SIZE}. */
static json_object *create_options(const char *driver, const char *key,
                                   const char *value, guint64 size)
{
    json_object *o = json_object_new_object();

    qmp_json_set_string(o, "driver", driver);
    qmp_json_set_string(o, key, value);
    qmp_json_set_uint(o, "size", size);
    return o;
}

/* An encrypted scratch's LUKS options into NODE (its format node's
 * options): the secret, on a LUKS node itself or in a qcow2's "encrypt";
 * CREATE: and a key derivation of 10 ms (the passphrase is random and
 * lives one run). */
static void add_scratch_key(json_object *node, const FleeceDisk *fd,
                            bool create)
{
    json_object *o = node;

    if (!fd->key_secret) {
        return;
    }
    if (!fd->raw_scratch) {
        o = json_object_new_object();
        qmp_json_set_string(o, "format", "luks");
        json_object_object_add(node, "encrypt", o);
    }
    qmp_json_set_string(o, "key-secret", fd->key_secret);
    if (create) {
        qmp_json_set_uint(o, "iter-time", 10);
    }
}

typedef struct {
    QmpClient *qmp;
    FleeceDisk *fd;
    const char *driver;
    guint64 size;
} Format;

/* The format step of qemu_create, as a UtilCreateFunc: the format driver
 * in the file node. */
static bool format_once(void *data, GError **error)
{
    const Format *f = data;
    json_object *o = create_options(f->driver, "file", f->fd->scratch, f->size);

    add_scratch_key(o, f->fd, true);
    return qemu_create_job(f->qmp, f->fd, o, error);
}

/* The format step of qemu_create: DRIVER in the file node; a LUKS format
 * that failed its timing is tried again (util_luks_retry). */
static bool qemu_format(QmpClient *qmp, FleeceDisk *fd, const char *driver,
                        guint64 size, GError **error)
{
    Format f = { qmp, fd, driver, size };

    return util_luks_retry(format_once, &f, error);
}

/*
 * QEMU makes FD's scratch image of SIZE bytes at fd->file on its host (an
 * existing file is truncated to nothing first): a raw file, or a qcow2 or
 * LUKS image in it, formatted through a file node that lives only for
 * that moment under the scratch node's name (which teardown removes if a
 * kill leaves it). The qcow2 names no backing file: scheme A gives it the
 * disk when it adds the scratch.
 */
static bool qemu_create(QmpClient *qmp, FleeceDisk *fd, guint64 size,
                        GError **error)
{
    bool plain_raw = fd->raw_scratch && !fd->key_secret;
    json_object *file;
    bool ok;

    if (!qemu_create_job(
            qmp, fd,
            create_options("file", "filename", fd->file, plain_raw ? size : 0),
            error)) {
        return false;
    }
    if (plain_raw) {
        return true;
    }
    file = json_object_new_object();
    qmp_json_set_string(file, "driver", "file");
    qmp_json_set_string(file, "filename", fd->file);
    qmp_json_set_string(file, "node-name", fd->scratch);
    if (!qmp_run(qmp, "blockdev-add", file, error)) {
        g_prefix_error(error, "cannot open the scratch image '%s': ", fd->file);
        return false;
    }
    ok = qemu_format(qmp, fd, fd->raw_scratch ? "luks" : "qcow2", size, error);
    file = json_object_new_object();
    qmp_json_set_string(file, "node-name", fd->scratch);
    return qmp_run(qmp, "blockdev-del", file, ok ? error : NULL) && ok;
}

bool fleece_create_scratch(QmpClient *qmp, GPtrArray *fds, const guint64 *sizes,
                           GError **error)
{
    g_autoptr(GArray) imgs = g_array_new(FALSE, TRUE, sizeof(QemuImgCreate));
    g_autoptr(GError) local = NULL;

    for (guint i = 0; i < fds->len; i++) {
        FleeceDisk *fd = fds->pdata[i];

        if (fd->qemu_file || fd->key_secret) {
            if (!qemu_create(qmp, fd, sizes[i], error)) {
                remove_raw(fds, i);
                return false;
            }
        } else if (!fd->raw_scratch) {
            g_array_append_val(
                imgs, ((QemuImgCreate){ .image = fd->file, .size = sizes[i] }));
        } else if (!create_raw(fd->file, sizes[i], error)) {
            remove_raw(fds, i);
            return false;
        }
    }
    if (!qemu_img_create_all((QemuImgCreate *)imgs->data, imgs->len, &local)) {
        g_set_error(error, FLEECE_ERROR, FLEECE_ERROR_FAILED,
                    "cannot create the scratch images: %s", local->message);
        remove_raw(fds, fds->len);
        return false;
    }
    return true;
}

/* {"no-flush": true}: the scratch outlives no crash of QEMU (the next run
 * removes it), so a flush there would only make the guest's write wait. */
static json_object *no_flush(void)
{
    json_object *cache = json_object_new_object();

    qmp_json_set_bool(cache, "no-flush", 1);
    return cache;
}

bool fleece_add_scratch(QmpClient *qmp, FleeceDisk *fd, json_object *options,
                        GError **error)
{
    json_object *args = json_object_new_object();
    json_object *file = args; /* a plain raw scratch is its file node */

    if (!fd->raw_scratch || fd->key_secret) {
        file = json_object_new_object();
        qmp_json_set_string(args, "driver", fd->raw_scratch ? "luks" : "qcow2");
        json_object_object_add(args, "file", file);
        json_object_object_add(args, "cache", no_flush());
    }
    add_scratch_key(args, fd, false);
    qmp_json_set_string(file, "driver", "file");
    qmp_json_set_string(file, "filename", fd->file);
    json_object_object_add(file, "cache", no_flush());
    if (json_object_object_get_ex(options, "discard", NULL)) {
        /* what the format node discards, its file gives back too */
        qmp_json_set_string(file, "discard", "unmap");
    }
    qmp_json_set_string(args, "node-name", fd->scratch);
    merge_into(args, options);
    if (!qmp_run(qmp, "blockdev-add", args, error)) {
        g_prefix_error(error,
                       "cannot add scratch node for disk '%s': ", fd->disk);
        remove_file(fd);
        return false;
    }
    return true;
}

bool fleece_set_user_child(QmpClient *qmp, const QmpInsertPoint *pt,
                           const char *node, GError **error)
{
    json_object *args = json_object_new_object();

    if (pt->reopen) {
        json_object *opts = NULL, *list = json_object_new_array();

        json_object_deep_copy(pt->reopen, &opts, NULL);
        qmp_json_set_string(opts, "file", node);
        json_object_array_add(list, opts);
        json_object_object_add(args, "options", list);
        return qmp_run(qmp, "blockdev-reopen", args, error);
    }
    qmp_json_set_string(args, "path", pt->qom);
    qmp_json_set_string(args, "property", "drive");
    qmp_json_set_string(args, "value", node);
    return qmp_run(qmp, "qom-set", args, error);
}

bool fleece_export_node(QmpClient *qmp, const char *id, const char *node,
                        const char *name, bool writable, json_object *options,
                        GError **error)
{
    json_object *args = json_object_new_object();

    qmp_json_set_string(args, "type", "nbd");
    qmp_json_set_string(args, "id", id);
    qmp_json_set_string(args, "node-name", node);
    qmp_json_set_string(args, "name", name);
    qmp_json_set_bool(args, "writable", writable);
    if (options) {
        merge_into(args, options);
    }
    return qmp_run(qmp, "block-export-add", args, error);
}

bool fleece_start_server(QmpClient *qmp, const FleeceServer *srv, bool *started,
                         GError **error)
{
    json_object *args = json_object_new_object();
    json_object *addr = json_object_new_object();
    json_object *data = json_object_new_object();
    g_autoptr(GError) local = NULL;

    if (srv->socket) {
        qmp_json_set_string(data, "path", srv->socket);
        qmp_json_set_string(addr, "type", "unix");
    } else {
        qmp_json_set_string(data, "host", srv->host);
        qmp_json_set_string(data, "port", srv->port);
        qmp_json_set_string(addr, "type", "inet");
    }
    json_object_object_add(addr, "data", data);
    json_object_object_add(args, "addr", addr);
    if (srv->tls_creds) {
        qmp_json_set_string(args, "tls-creds", srv->tls_creds);
        qmp_json_set_string(args, "tls-authz", srv->tls_authz);
    }
    *started = false;
    if (qmp_run(qmp, "nbd-server-start", args, &local)) {
        *started = true;
        return true;
    }
    if (local->domain == QMP_COMMAND_ERROR &&
        strstr(local->message, "already running")) {
        g_set_error(error, FLEECE_ERROR, FLEECE_ERROR_SERVER_RUNNING,
                    "QEMU already runs an NBD server and QMP cannot tell "
                    "its address");
        return false;
    }
    g_propagate_prefixed_error(error, g_steal_pointer(&local),
                               "cannot start the NBD server: ");
    return false;
}

/* Whether QOM object ID (a tls-creds-x509) serves: endpoint=server. */
static bool serving_creds(QmpClient *qmp, const char *id)
{
    g_autofree char *path = g_strdup_printf("/objects/%s", id);
    g_autofree char *endpoint = qmp_qom_get_string(qmp, path, "endpoint");

    return g_strcmp0(endpoint, "server") == 0;
}

char *fleece_find_tls_creds(QmpClient *qmp, GError **error)
{
    json_object *list = qmp_list_objects(qmp, error);
    g_autoptr(GPtrArray) found = g_ptr_array_new_with_free_func(g_free);

    if (!list) {
        return NULL;
    }
    for (size_t i = 0; i < qmp_json_length(list); i++) {
        json_object *o = qmp_json_index(list, i);
        const char *name = qmp_json_string(o, "name");

        if (g_strcmp0(qmp_json_string(o, "type"), "child<tls-creds-x509>") ==
                0 &&
            serving_creds(qmp, name)) {
            g_ptr_array_add(found, g_strdup(name));
        }
    }
    json_object_put(list);
    if (found->len != 1) {
        g_set_error(error, FLEECE_ERROR, FLEECE_ERROR_SERVER_RUNNING,
                    "QEMU has %u tls-creds-x509 object(s) with "
                    "endpoint=server: name the one for NBD",
                    found->len);
        return NULL;
    }
    return g_strdup(found->pdata[0]);
}

static bool has_id(json_object *ev, void *opaque)
{
    json_object *data, *id;
    const char *want = opaque;

    if (!json_object_object_get_ex(ev, "data", &data)) {
        return false;
    }
    if (!json_object_object_get_ex(data, "id", &id) &&
        !json_object_object_get_ex(data, "device", &id)) {
        return false;
    }
    return g_strcmp0(json_object_get_string(id), want) == 0;
}

/* Names of qbk's objects QEMU has now: exports, jobs and nodes. */
static GHashTable *present_names(QmpClient *qmp, GError **error)
{
    GHashTable *names =
        g_hash_table_new_full(g_str_hash, g_str_equal, g_free, NULL);
    struct {
        const char *cmd, *key;
        bool flat;
    } queries[] = {
        { "query-block-exports", "id", false },
        { "query-jobs", "id", false },
        { "query-named-block-nodes", "node-name", true },
    };

    for (size_t q = 0; q < G_N_ELEMENTS(queries); q++) {
        json_object *ret = qmp_execute(
            qmp, queries[q].cmd,
            queries[q].flat ? json_tokener_parse("{\"flat\": true}") : NULL,
            error);

        if (!ret) {
            g_hash_table_unref(names);
            return NULL;
        }
        if (!json_object_is_type(ret, json_type_array)) {
            g_set_error(error, QMP_ERROR, QMP_ERROR_PROTOCOL,
                        "%s did not return an array", queries[q].cmd);
            json_object_put(ret);
            g_hash_table_unref(names);
            return NULL;
        }
        for (size_t i = 0; i < qmp_json_length(ret); i++) {
            json_object *o = qmp_json_index(ret, i);
            const char *name = qmp_json_string(o, queries[q].key);

            if (name && g_str_has_prefix(name, "qbk-")) {
                g_hash_table_add(names, g_strdup(name));
            }
        }
        json_object_put(ret);
    }
    return names;
}

GPtrArray *fleece_present_names(QmpClient *qmp, GError **error)
{
    g_autoptr(GHashTable) names = present_names(qmp, error);
    GPtrArray *list;
    GHashTableIter it;
    gpointer key;

    if (!names) {
        return NULL;
    }
    list = g_ptr_array_new_with_free_func(g_free);
    g_hash_table_iter_init(&it, names);
    while (g_hash_table_iter_next(&it, &key, NULL)) {
        g_ptr_array_add(list, g_strdup(key));
    }
    return list;
}

G_GNUC_PRINTF(2, 3)
static void keep_first(GError **first, const char *fmt, ...)
{
    va_list ap;

    if (first && !*first) {
        va_start(ap, fmt);
        *first = g_error_new_valist(FLEECE_ERROR, FLEECE_ERROR_FAILED, fmt, ap);
        va_end(ap);
    }
}

static void export_del(QmpClient *qmp, GHashTable *present, const char *id,
                       GError **first)
{
    g_autoptr(GError) err = NULL;
    json_object *args, *ev;

    if (!g_hash_table_contains(present, id)) {
        return;
    }
    args = json_object_new_object();
    qmp_json_set_string(args, "id", id);
    qmp_json_set_string(args, "mode", "hard");
    if (qmp_run(qmp, "block-export-del", args, &err)) {
        ev = qmp_wait_event(qmp, "BLOCK_EXPORT_DELETED", has_id, (void *)id,
                            EVENT_TIMEOUT_MS, &err);
        json_object_put(ev);
    }
    if (err) {
        keep_first(first, "removing export '%s': %s", id, err->message);
    }
}

static void node_del(QmpClient *qmp, GHashTable *present, const char *node,
                     GError **first)
{
    g_autoptr(GError) err = NULL;
    json_object *args;

    if (!g_hash_table_contains(present, node)) {
        return;
    }
    args = json_object_new_object();
    qmp_json_set_string(args, "node-name", node);
    if (!qmp_run(qmp, "blockdev-del", args, &err)) {
        keep_first(first, "removing node '%s': %s", node, err->message);
    }
}

/* FD's nodes, job and file, once no export reads them. GRAPH: QEMU's
 * block graph with the filters still in (NULL: it could not be read, and
 * GRAPH_ERROR says why). */
static void teardown_one(QmpClient *qmp, GHashTable *present,
                         const QmpBlockGraph *graph, const GError *graph_error,
                         FleeceDisk *fd, GError **first)
{
    g_autoptr(GError) err = NULL;
    json_object *args, *ev;

    /* Scheme B: the snapshot goes first (while it reads through the
     * filter, the filter lets no one else write below it), then the disk's
     * user goes back to the disk's node, then the filter. */
    node_del(qmp, present, fd->access, first);
    if (g_hash_table_contains(present, fd->cbw)) {
        QmpInsertPoint pt = { 0 };

        if (!graph) {
            err = g_error_copy(graph_error);
        }
        /* Whoever uses the filter now (device or pass-through node; none
         * if it never went in) goes back to the node under it. */
        if (!graph || !qmp_insert_point(graph, fd->cbw, &pt, &err) ||
            ((pt.reopen || pt.qom) &&
             !fleece_set_user_child(qmp, &pt, pt.file, &err))) {
            keep_first(first, "putting disk '%s' back under its user: %s",
                       fd->disk, err->message);
            g_clear_error(&err);
        }
        qmp_insert_point_clear(&pt);
        node_del(qmp, present, fd->cbw, first);
    }
    if (g_hash_table_contains(present, fd->job)) {
        args = json_object_new_object();
        qmp_json_set_string(args, "device", fd->job);
        qmp_json_set_bool(args, "force", 1);
        if (qmp_run(qmp, "block-job-cancel", args, &err)) {
            /* sync=none ends as CANCELLED; a failed job ends as COMPLETED */
            ev = qmp_wait_event(qmp, NULL, has_id, fd->job, EVENT_TIMEOUT_MS,
                                &err);
            json_object_put(ev);
        } else {
            /* not a block job: a killed run's blockdev-create (a moment
             * long), concluded by now */
            if (job_dismiss(qmp, fd->job)) {
                g_clear_error(&err);
            }
        }
        if (err) {
            keep_first(first, "cancelling job '%s': %s", fd->job, err->message);
            g_clear_error(&err);
        }
    }
    node_del(qmp, present, fd->scratch, first);
    remove_file(fd);
}

bool fleece_teardown(QmpClient *qmp, GPtrArray *fds, bool stop_server,
                     GError **error)
{
    g_autoptr(GHashTable) present = present_names(qmp, error);
    g_autoptr(QmpBlockGraph) graph = NULL;
    g_autoptr(GError) graph_error = NULL;
    GError *first = NULL;
    bool any_filter = false;

    if (!present) {
        /* QEMU is gone: its nodes went with it; the files are ours. */
        for (guint i = 0; i < fds->len; i++) {
            remove_file(fds->pdata[i]);
        }
        return false;
    }
    /* Exports first, all of them: then no client reads a disk whose
     * filter goes, and the block graph, read once for all disks, shows
     * only the users that are put back. */
    for (guint i = 0; i < fds->len; i++) {
        FleeceDisk *fd = fds->pdata[i];

        export_del(qmp, present, fd->export_, &first);
        export_del(qmp, present, fd->notice_export, &first);
        export_del(qmp, present, fd->chain_export, &first);
        any_filter = any_filter || g_hash_table_contains(present, fd->cbw);
    }
    if (any_filter) {
        graph = qmp_block_graph_get(qmp, &graph_error);
    }
    for (guint i = 0; i < fds->len; i++) {
        teardown_one(qmp, present, graph, graph_error, fds->pdata[i], &first);
    }
    if (stop_server) {
        g_autoptr(GError) err = NULL;

        if (!qmp_run(qmp, "nbd-server-stop", NULL, &err)) {
            keep_first(&first, "stopping the NBD server: %s", err->message);
        }
    }
    if (first) {
        g_propagate_error(error, first);
        return false;
    }
    return true;
}

bool fleece_cleanup_tag(QmpClient *qmp, const char *tag, GError **error)
{
    g_autoptr(GHashTable) present = present_names(qmp, error);
    g_autoptr(GPtrArray) fds =
        g_ptr_array_new_with_free_func((GDestroyNotify)fleece_disk_free);
    g_autoptr(GHashTable) indexes = g_hash_table_new(NULL, NULL);
    g_autofree char *suffix = g_strconcat("-", tag, NULL);
    GHashTableIter it;
    gpointer key;

    if (!present) {
        return false;
    }
    g_hash_table_iter_init(&it, present);
    while (g_hash_table_iter_next(&it, &key, NULL)) {
        const char *name = key;
        char kind;
        guint index;

        if (sscanf(name, "qbk-%c%u-", &kind, &index) == 2 &&
            strchr(FLEECE_KINDS, kind) && g_str_has_suffix(name, suffix)) {
            g_hash_table_add(indexes, GUINT_TO_POINTER(index + 1));
        }
    }
    /* Rebuild each disk's names from its index. Its scratch file is in a
     * private directory that goes once its owner is gone (privdir_reap). */
    g_hash_table_iter_init(&it, indexes);
    while (g_hash_table_iter_next(&it, &key, NULL)) {
        /* the scheme does not matter: teardown looks for every kind */
        FleeceDisk *fd = fleece_disk_new(&fleece_scheme_a, "", "",
                                         GPOINTER_TO_UINT(key) - 1, tag, NULL);

        g_ptr_array_add(fds, fd);
    }
    return fleece_teardown(qmp, fds, false, error);
}
