/*
 * Live restore: a disk that a VM can start from now, while the backup is
 * copied into it behind the guest's back.
 *
 * backup_live_create() makes a new qcow2 image whose backing is the
 * backup's chain, named in its header as an explicit "json:" chain (every
 * link's file and driver, and the repository's key secret if it has one),
 * so QEMU never follows a backing name written inside a repository image
 * and opens those links read-only: the repository is never written.
 * backup_live_stream() then runs QEMU's block-stream on the node that
 * opened it: every cluster the image does not hold yet is copied up, what
 * the guest writes meanwhile lands in the image and stays, and at the end
 * QEMU drops the backing from the image's header: it stands alone. A
 * stream that is cancelled or whose QEMU dies leaves a valid image on its
 * backing; streaming again copies only what is still missing.
 */
#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <unistd.h>

#include "internal.h"

#define EVENT_POLL_MS 1000

json_object *backup_live_create(Repo *repo, const char *id, const char *disk,
                                const char *output, GError **error)
{
    g_autoptr(GPtrArray) chain = repo_chain(repo, id, disk, error);
    g_autofree char *backing = NULL;
    g_autofree char *out = NULL;
    const ManifestDisk *e;
    json_object *result;

    if (!chain || !repo_check_chain(repo, chain, disk, error)) {
        return NULL;
    }
    e = manifest_disk(chain->pdata[0], disk);
    backing = repo_chain_filename(repo, chain, 0, disk, NULL);
    out = g_canonicalize_filename(output, NULL);
    {
        /* made exclusively: never over an existing file */
        QemuImgCreate img = { .image = out,
                              .size = e->size,
                              .backing = backing,
                              .backing_format = "qcow2" };

        if (!target_create_images(&img, 1, error)) {
            return NULL;
        }
    }
    result = json_object_new_object();
    qmp_json_set_string(result, "disk", disk);
    qmp_json_set_string(result, "backup", ((Manifest *)chain->pdata[0])->id);
    qmp_json_set_string(result, "image", out);
    qmp_json_set_uint(result, "size", e->size);
    qmp_json_set_uint(result, "chain", chain->len);
    if (repo_key_file(repo)) {
        qmp_json_set_string(result, "key_secret", REPO_KEY_SECRET);
    }
    return result;
}

static bool is_job_end(json_object *ev, void *opaque)
{
    const char *name = qmp_json_string(ev, "event");

    return (g_strcmp0(name, "BLOCK_JOB_COMPLETED") == 0 ||
            g_strcmp0(name, "BLOCK_JOB_CANCELLED") == 0) &&
           g_strcmp0(
               qmp_json_string(json_object_object_get(ev, "data"), "device"),
               opaque) == 0;
}

/* The job ID's {offset, len} as QEMU reports it; false if it is gone. */
static bool job_progress(QmpClient *qmp, const char *id, guint64 *done,
                         guint64 *total)
{
    json_object *jobs = qmp_execute(qmp, "query-block-jobs", NULL, NULL);
    bool found = false;

    for (size_t i = 0; i < qmp_json_length(jobs); i++) {
        json_object *j = qmp_json_index(jobs, i);

        if (g_strcmp0(qmp_json_string(j, "device"), id) == 0) {
            *done = qmp_json_uint(j, "offset");
            *total = qmp_json_uint(j, "len");
            found = true;
        }
    }
    json_object_put(jobs);
    return found;
}

json_object *backup_live_stream(QmpClient *qmp, const char *node, guint64 speed,
                                volatile int *cancel,
                                BackupLiveProgressFn progress, void *opaque,
                                GError **error)
{
    g_autofree char *id = g_strdup_printf("qbk-stream-%s", node);
    json_object *args = json_object_new_object();
    json_object *ev = NULL, *data, *result;
    gint64 start = g_get_monotonic_time();
    guint64 done = 0, total = 0;
    bool cancelling = false;

    qmp_json_set_string(args, "job-id", id);
    qmp_json_set_string(args, "device", node);
    if (speed) {
        qmp_json_set_uint(args, "speed", speed);
    }
    if (!qmp_run(qmp, "block-stream", args, error)) {
        g_prefix_error(error, "cannot stream into node '%s': ", node);
        return NULL;
    }
    while (!ev) {
        g_autoptr(GError) local = NULL;

        if (!cancelling && cancel && g_atomic_int_get(cancel)) {
            json_object *c = json_object_new_object();

            qmp_json_set_string(c, "device", id);
            if (!qmp_run(qmp, "block-job-cancel", c, error)) {
                return NULL;
            }
            cancelling = true;
        }
        ev = qmp_wait_event(qmp, NULL, is_job_end, id, EVENT_POLL_MS, &local);
        if (!ev && !g_error_matches(local, QMP_ERROR, QMP_ERROR_TIMEOUT)) {
            g_propagate_prefixed_error(error, g_steal_pointer(&local),
                                       "streaming into node '%s': ", node);
            return NULL;
        }
        if (!ev && progress && job_progress(qmp, id, &done, &total)) {
            progress(done, total, opaque);
        }
    }
    data = json_object_object_get(ev, "data");
    if (g_strcmp0(qmp_json_string(ev, "event"), "BLOCK_JOB_CANCELLED") == 0) {
        json_object_put(ev);
        g_set_error(error, BACKUP_ERROR, BACKUP_ERROR_FAILED,
                    "stream into node '%s' cancelled: the image still stands "
                    "on the backup; stream again to go on",
                    node);
        return NULL;
    }
    if (qmp_json_string(data, "error")) {
        g_set_error(error, BACKUP_ERROR, BACKUP_ERROR_FAILED,
                    "stream into node '%s' failed: %s; the image still "
                    "stands on the backup",
                    node, qmp_json_string(data, "error"));
        json_object_put(ev);
        return NULL;
    }
    result = json_object_new_object();
    qmp_json_set_string(result, "node", node);
    qmp_json_set_uint(result, "bytes", qmp_json_uint(data, "len"));
    qmp_json_set_double(result, "seconds",
                        (g_get_monotonic_time() - start) / 1e6);
    json_object_put(ev);
    return result;
}

/* Start ARGV with stdout and stderr to LOG_FD, as our child. */
static bool spawn_logged(GPtrArray *argv, int log_fd, GPid *pid, GError **error)
{
    return g_spawn_async_with_fds(
        NULL, (char **)argv->pdata, NULL,
        G_SPAWN_SEARCH_PATH | G_SPAWN_DO_NOT_REAP_CHILD, util_child_setup, NULL,
        pid, -1, log_fd, log_fd, error);
}

/* qemu-nbd's command line to serve DISK's CHAIN at WHERE. */
static GPtrArray *serve_argv(Repo *repo, GPtrArray *chain, const char *disk,
                             const BackupServe *where, const char *pidfile)
{
    GPtrArray *argv = g_ptr_array_new_with_free_func(g_free);

    g_ptr_array_add(argv, g_strdup("qemu-nbd"));
    g_ptr_array_add(argv, g_strdup("--read-only"));
    g_ptr_array_add(argv, g_strdup("--persistent"));
    g_ptr_array_add(argv, g_strdup("--shared=16"));
    g_ptr_array_add(argv, g_strdup("--allocation-depth"));
    g_ptr_array_add(argv, g_strdup_printf("--export-name=%s", disk));
    g_ptr_array_add(argv, g_strdup_printf("--pid-file=%s", pidfile));
    backup_add_key_object(argv, repo_key_file(repo));
    if (where->tls_dir) {
        json_object *o = json_object_new_object();

        qmp_json_set_string(o, "qom-type", "tls-creds-x509");
        qmp_json_set_string(o, "id", "qbk-tls");
        qmp_json_set_string(o, "dir", where->tls_dir);
        qmp_json_set_string(o, "endpoint", "server");
        qmp_json_set_bool(o, "verify-peer", 1);
        g_ptr_array_add(argv, g_strdup("--object"));
        g_ptr_array_add(argv, g_strdup(json_object_to_json_string_ext(
                                  o, JSON_C_TO_STRING_PLAIN |
                                         JSON_C_TO_STRING_NOSLASHESCAPE)));
        json_object_put(o);
        g_ptr_array_add(argv, g_strdup("--tls-creds=qbk-tls"));
    }
    if (!where->socket) {
        g_ptr_array_add(argv, g_strdup_printf("--bind=%s", where->host));
        g_ptr_array_add(argv, g_strdup_printf("--port=%s", where->port));
    }
    g_ptr_array_add(argv, repo_chain_filename(repo, chain, 0, disk, NULL));
    g_ptr_array_add(argv, NULL);
    return argv;
}

/* {disk, backup, uri} of DISK's CHAIN served at WHERE. */
static json_object *serve_info(GPtrArray *chain, const char *disk,
                               const BackupServe *where)
{
    json_object *info = json_object_new_object();
    g_autofree char *uri =
        where->socket
            ? copier_nbd_uri(where->socket, disk)
            : g_strdup_printf("%s://%s:%s/%s", where->tls_dir ? "nbds" : "nbd",
                              where->host, where->port, disk);

    qmp_json_set_string(info, "disk", disk);
    qmp_json_set_string(info, "backup", ((Manifest *)chain->pdata[0])->id);
    qmp_json_set_string(info, "uri", uri);
    return info;
}

json_object *backup_serve(Repo *repo, const char *id, const char *disk,
                          const BackupServe *where, volatile int *stop,
                          BackupServeReadyFn ready, void *opaque,
                          GError **error)
{
    g_autoptr(GPtrArray) chain = repo_chain(repo, id, disk, error);
    g_autoptr(GPtrArray) argv = NULL;
    g_autoptr(PrivDir) dir = NULL;
    g_autofree char *log = NULL;
    g_autofree char *pidfile = NULL;
    json_object *info;
    GPid pid = 0;
    int fd, status;
    bool ok;

    if (!chain || !repo_check_chain(repo, chain, disk, error) ||
        !(dir = privdir_new(NULL, "export", error))) {
        return NULL;
    }
    log = privdir_file(dir, "qemu-nbd.log");
    pidfile = privdir_file(dir, "qemu-nbd.pid");
    argv = serve_argv(repo, chain, disk, where, pidfile);

    fd = open(log, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
    if (fd < 0) {
        g_set_error(error, BACKUP_ERROR, BACKUP_ERROR_FAILED,
                    "cannot write '%s': %s", log, g_strerror(errno));
        return NULL;
    }
    /* a unix socket: bound here (never over an existing file) and handed
     * over listening, so that it serves from the moment it is shown */
    ok = where->socket
             ? util_spawn_on_socket((const char *const *)argv->pdata,
                                    where->socket, true, fd, &pid, error)
             : spawn_logged(argv, fd, &pid, error);
    close(fd);
    if (!ok) {
        g_prefix_error(error, "cannot start qemu-nbd: ");
        return NULL;
    }
    if (!util_child_wait_file(pid, pidfile, 10000, &status)) {
        g_autofree char *why = backup_log_line(log);

        if (status == -1) {
            util_child_stop(pid, 0, 5000);
        }
        if (where->socket) {
            unlink(where->socket);
        }
        g_set_error(error, BACKUP_ERROR, BACKUP_ERROR_FAILED,
                    "cannot serve backup '%s': %s",
                    ((Manifest *)chain->pdata[0])->id, why);
        return NULL;
    }
    info = serve_info(chain, disk, where);
    if (ready) {
        ready(info, opaque);
    }
    /* until we are told to stop, or qemu-nbd ends by itself */
    while (!g_atomic_int_get(stop) &&
           (status = util_child_wait(pid, 200)) < 0) {
    }
    if (status >= 0) {
        g_autofree char *why = backup_log_line(log);

        json_object_put(info);
        g_set_error(error, BACKUP_ERROR, BACKUP_ERROR_FAILED,
                    "qemu-nbd stopped serving: %s", why);
        info = NULL;
    } else {
        util_child_stop(pid, 0, 5000);
    }
    if (where->socket) {
        unlink(where->socket);
    }
    return info;
}
