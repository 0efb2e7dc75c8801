/*
 * A private qemu-storage-daemon: how qbk works on images of a VM that is not
 * running. The daemon opens the images exactly as QEMU would (loading their
 * persistent bitmaps and taking the same locks), so every checkpoint
 * operation runs through the same QMP code as for a live VM, atomically
 * across images, and is written back when the daemon quits.
 */
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "internal.h"

#define QSD_BINARY "qemu-storage-daemon"

/* What the daemon said on stderr, on one line, without its own echo. */
static char *daemon_stderr(PrivDir *dir)
{
    g_autofree char *path = privdir_file(dir, "stderr.log");
    g_autofree char *text = NULL;
    char *msg, *p;

    if (!g_file_get_contents(path, &text, NULL, NULL) || !*g_strstrip(text)) {
        return g_strdup("no message");
    }
    /* "qemu-storage-daemon: --blockdev {json}: Failed to ..." */
    msg = strstr(text, "}: ");
    msg = msg ? msg + 3 : text;
    if (g_str_has_prefix(msg, QSD_BINARY ": ")) {
        msg += strlen(QSD_BINARY ": ");
    }
    for (p = msg; *p; p++) {
        if (*p == '\n') {
            *p = ' ';
        }
    }
    return g_strdup(msg);
}

static char *blockdev_json(const char *image, guint index, QmpDaemonFlags flags,
                           bool encrypted)
{
    json_object *file = json_object_new_object();
    json_object *fmt = json_object_new_object();
    g_autofree char *node = g_strdup_printf("img%u", index);
    char *text;

    qmp_json_set_string(file, "driver", "file");
    qmp_json_set_string(file, "filename", image);
    if (flags & QMP_DAEMON_DIRECT_IO) {
        json_object *cache = json_object_new_object();

        qmp_json_set_bool(cache, "direct", 1);
        json_object_object_add(file, "cache", cache);
        qmp_json_set_string(file, "aio", "native");
    }
    qmp_json_set_string(fmt, "driver", "qcow2");
    json_object_object_add(fmt, "file", file);
    if (encrypted) {
        json_object *encrypt = json_object_new_object();

        qmp_json_set_string(encrypt, "format", "luks");
        qmp_json_set_string(encrypt, "key-secret", QMP_DAEMON_KEY_SECRET);
        json_object_object_add(fmt, "encrypt", encrypt);
        json_object_object_add(fmt, "backing", NULL);
    }
    if (flags & QMP_DAEMON_COMPRESS) {
        json_object *filter = json_object_new_object();
        g_autofree char *inner = g_strdup_printf("%s-fmt", node);

        qmp_json_set_string(fmt, "node-name", inner);
        qmp_json_set_string(filter, "driver", "compress");
        json_object_object_add(filter, "file", fmt);
        fmt = filter;
    }
    qmp_json_set_string(fmt, "node-name", node);
    text =
        g_strdup(json_object_to_json_string_ext(fmt, JSON_C_TO_STRING_PLAIN));
    json_object_put(fmt);
    return text;
}

/* The daemon's command line: IMAGES as nodes, the monitor on fd 3 (a
 * socket we made: no path in an option string, and no polling for it to
 * appear), PIDFILE written once every option is carried out. */
static GPtrArray *daemon_argv(const char *const *images, QmpDaemonFlags flags,
                              const char *key_file, const char *pidfile)
{
    GPtrArray *argv = g_ptr_array_new_with_free_func(g_free);

    g_ptr_array_add(argv, g_strdup(QSD_BINARY));
    if (key_file) {
        g_ptr_array_add(argv, g_strdup("--object"));
        g_ptr_array_add(argv,
                        util_secret_object(QMP_DAEMON_KEY_SECRET, key_file));
    }
    for (guint i = 0; images[i]; i++) {
        g_ptr_array_add(argv, g_strdup("--blockdev"));
        g_ptr_array_add(argv,
                        blockdev_json(images[i], i, flags, key_file != NULL));
    }
    g_ptr_array_add(argv, g_strdup("--chardev"));
    g_ptr_array_add(argv,
                    g_strdup("socket,id=qbk-qmp,fd=3,server=on,wait=off"));
    g_ptr_array_add(argv, g_strdup("--monitor"));
    g_ptr_array_add(argv, g_strdup("chardev=qbk-qmp"));
    g_ptr_array_add(argv, g_strdup_printf("--pidfile=%s", pidfile));
    g_ptr_array_add(argv, NULL);
    return argv;
}

static void stop_quietly(QmpClient *qmp)
{
    /* best effort: qmp_free's caller wanted no report of how it ended */
    qmp_stop_storage_daemon(qmp, NULL);
}

QmpClient *qmp_spawn_storage_daemon(const char *const *images,
                                    QmpDaemonFlags flags, const char *key_file,
                                    int timeout_ms, GError **error)
{
    g_autoptr(GPtrArray) argv = NULL;
    g_autoptr(PrivDir) dir = NULL;
    g_autofree char *sock = NULL;
    g_autofree char *log = NULL;
    g_autofree char *pidfile = NULL;
    g_autoptr(GError) local = NULL;
    QmpClient *qmp = NULL;
    GPid pid;
    int errfd, status;

    if (timeout_ms <= 0) {
        timeout_ms = QMP_DEFAULT_TIMEOUT_MS;
    }
    dir = privdir_new(NULL, "qsd", &local);
    if (!dir) {
        g_set_error(error, QMP_ERROR, QMP_ERROR_SPAWN, "%s", local->message);
        return NULL;
    }
    sock = privdir_file(dir, "qmp.sock");
    log = privdir_file(dir, "stderr.log");
    pidfile = privdir_file(dir, "qsd.pid");

    argv = daemon_argv(images, flags, key_file, pidfile);

    errfd = open(log, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
    if (errfd < 0 || !util_spawn_on_socket((const char *const *)argv->pdata,
                                           sock, false, errfd, &pid, &local)) {
        g_set_error(error, QMP_ERROR, QMP_ERROR_SPAWN,
                    "cannot start " QSD_BINARY ": %s",
                    local ? local->message : g_strerror(errno));
        if (errfd >= 0) {
            close(errfd);
        }
        return NULL;
    }
    close(errfd);

    /* A client that connects before the monitor is set up can get the
     * greeting and then no answer (seen with QEMU 7.2): wait for the pid
     * file, written once the images are open and the monitor is there. The
     * daemon may die first. */
    if (util_child_wait_file(pid, pidfile, timeout_ms, &status)) {
        qmp = qmp_connect(sock, timeout_ms, &local);
    } else if (status == -1) {
        local = g_error_new(QMP_ERROR, QMP_ERROR_TIMEOUT,
                            "not ready within %d ms", timeout_ms);
    }
    if (!qmp) {
        if (status == -1) {
            status = util_child_stop(pid, 0, 5000);
        }
        if (!local) {
            g_autofree char *why = daemon_stderr(dir);

            g_set_error(error, QMP_ERROR, QMP_ERROR_SPAWN,
                        "cannot open the image: %s", why);
        } else {
            g_set_error(error, QMP_ERROR, QMP_ERROR_TIMEOUT,
                        QSD_BINARY " did not start: %s", local->message);
        }
        return NULL;
    }
    qmp->daemon_pid = pid;
    qmp->daemon_dir = g_steal_pointer(&dir);
    qmp->stop = stop_quietly;
    return qmp;
}

void qmp_quit_storage_daemon(QmpClient *qmp)
{
    if (qmp->daemon_pid > 0 && !qmp->daemon_quit) {
        /* "quit" may lose the reply when the daemon exits first: not an
         * error. */
        qmp_run(qmp, "quit", NULL, NULL);
        qmp->daemon_quit = true;
    }
}

bool qmp_stop_storage_daemon(QmpClient *qmp, GError **error)
{
    GPid pid = qmp->daemon_pid;
    int status;

    if (pid <= 0) {
        return true;
    }
    qmp_quit_storage_daemon(qmp);
    qmp->daemon_pid = 0;
    status = util_child_stop(pid, 10000, 5000);
    if (!(WIFEXITED(status) && WEXITSTATUS(status) == 0)) {
        g_autofree char *why = daemon_stderr(qmp->daemon_dir);

        g_set_error(error, QMP_ERROR, QMP_ERROR_SPAWN,
                    QSD_BINARY " did not exit cleanly (%s): %s",
                    WIFEXITED(status) ? "non-zero exit status"
                                      : "killed by a signal",
                    why);
        g_clear_pointer(&qmp->daemon_dir, privdir_free);
        return false;
    }
    g_clear_pointer(&qmp->daemon_dir, privdir_free);
    return true;
}
