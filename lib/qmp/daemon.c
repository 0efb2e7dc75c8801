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
#include <sys/prctl.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "internal.h"

#define QSD_BINARY "qemu-storage-daemon"

/*
 * The daemon must not outlive us: if we are killed, it gets SIGTERM, which
 * it handles as a clean "quit" (bitmaps written back, images closed).
 */
static void die_with_parent(gpointer data)
{
    prctl(PR_SET_PDEATHSIG, SIGTERM);
}

/* What the daemon said on stderr, on one line, without its own echo. */
static char *daemon_stderr(const char *dir)
{
    g_autofree char *path = g_build_filename(dir, "stderr.log", NULL);
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

static void remove_dir(const char *dir)
{
    g_autofree char *sock = g_build_filename(dir, "qmp.sock", NULL);
    g_autofree char *log = g_build_filename(dir, "stderr.log", NULL);

    unlink(sock);
    unlink(log);
    rmdir(dir);
}

/* Wait up to TIMEOUT_MS for PID to exit; returns its wait status or -1. */
static int wait_exit(GPid pid, int timeout_ms)
{
    gint64 deadline = g_get_monotonic_time() + (gint64)timeout_ms * 1000;
    int status;

    for (;;) {
        pid_t r = waitpid(pid, &status, WNOHANG);

        if (r == pid) {
            return status;
        }
        if (r < 0 && errno != EINTR) {
            return -1;
        }
        if (g_get_monotonic_time() >= deadline) {
            return -1;
        }
        g_usleep(2 * 1000);
    }
}

static char *blockdev_json(const char *image, guint index, QmpDaemonFlags flags)
{
    json_object *file = json_object_new_object();
    json_object *fmt = json_object_new_object();
    g_autofree char *node = g_strdup_printf("img%u", index);
    char *text;

    json_object_object_add(file, "driver", json_object_new_string("file"));
    json_object_object_add(file, "filename", json_object_new_string(image));
    if (flags & QMP_DAEMON_DIRECT_IO) {
        json_object *cache = json_object_new_object();

        json_object_object_add(cache, "direct", json_object_new_boolean(1));
        json_object_object_add(file, "cache", cache);
        json_object_object_add(file, "aio", json_object_new_string("native"));
    }
    json_object_object_add(fmt, "driver", json_object_new_string("qcow2"));
    json_object_object_add(fmt, "node-name", json_object_new_string(node));
    json_object_object_add(fmt, "file", file);
    text =
        g_strdup(json_object_to_json_string_ext(fmt, JSON_C_TO_STRING_PLAIN));
    json_object_put(fmt);
    return text;
}

QmpClient *qmp_spawn_storage_daemon(const char *const *images,
                                    QmpDaemonFlags flags, int timeout_ms,
                                    GError **error)
{
    g_autoptr(GPtrArray) argv = g_ptr_array_new_with_free_func(g_free);
    g_autofree char *dir = NULL;
    g_autofree char *sock = NULL;
    g_autofree char *log = NULL;
    g_autoptr(GError) local = NULL;
    QmpClient *qmp = NULL;
    gint64 deadline;
    GPid pid;
    int errfd;

    if (timeout_ms <= 0) {
        timeout_ms = QMP_DEFAULT_TIMEOUT_MS;
    }
    dir = g_dir_make_tmp("qbk-qsd-XXXXXX", &local);
    if (!dir) {
        g_set_error(error, QMP_ERROR, QMP_ERROR_SPAWN,
                    "cannot make a temporary directory: %s", local->message);
        return NULL;
    }
    sock = g_build_filename(dir, "qmp.sock", NULL);
    log = g_build_filename(dir, "stderr.log", NULL);

    g_ptr_array_add(argv, g_strdup(QSD_BINARY));
    for (guint i = 0; images[i]; i++) {
        g_ptr_array_add(argv, g_strdup("--blockdev"));
        g_ptr_array_add(argv, blockdev_json(images[i], i, flags));
    }
    g_ptr_array_add(argv, g_strdup("--chardev"));
    g_ptr_array_add(
        argv,
        g_strdup_printf("socket,id=qbk-qmp,path=%s,server=on,wait=off", sock));
    g_ptr_array_add(argv, g_strdup("--monitor"));
    g_ptr_array_add(argv, g_strdup("chardev=qbk-qmp"));
    g_ptr_array_add(argv, NULL);

    errfd = open(log, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    if (errfd < 0 || !g_spawn_async_with_fds(
                         NULL, (char **)argv->pdata, NULL,
                         G_SPAWN_SEARCH_PATH | G_SPAWN_DO_NOT_REAP_CHILD |
                             G_SPAWN_STDOUT_TO_DEV_NULL,
                         die_with_parent, NULL, &pid, -1, -1, errfd, &local)) {
        g_set_error(error, QMP_ERROR, QMP_ERROR_SPAWN,
                    "cannot start " QSD_BINARY ": %s",
                    local ? local->message : g_strerror(errno));
        if (errfd >= 0) {
            close(errfd);
        }
        remove_dir(dir);
        return NULL;
    }
    close(errfd);

    /* The socket appears once the images are open; the daemon may die. */
    deadline = g_get_monotonic_time() + (gint64)timeout_ms * 1000;
    for (;;) {
        int status;

        if (waitpid(pid, &status, WNOHANG) == pid) {
            g_autofree char *why = daemon_stderr(dir);

            g_set_error(error, QMP_ERROR, QMP_ERROR_SPAWN,
                        "cannot open the image: %s", why);
            remove_dir(dir);
            return NULL;
        }
        if (g_file_test(sock, G_FILE_TEST_EXISTS)) {
            g_clear_error(&local);
            qmp = qmp_connect(sock, timeout_ms, &local);
            if (qmp) {
                break;
            }
        }
        if (g_get_monotonic_time() >= deadline) {
            kill(pid, SIGKILL);
            wait_exit(pid, 5000);
            g_set_error(error, QMP_ERROR, QMP_ERROR_TIMEOUT,
                        QSD_BINARY " did not start within %d ms%s%s",
                        timeout_ms, local ? ": " : "",
                        local ? local->message : "");
            remove_dir(dir);
            return NULL;
        }
        g_usleep(10 * 1000);
    }
    qmp->daemon_pid = pid;
    qmp->daemon_dir = g_steal_pointer(&dir);
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
    status = wait_exit(pid, 10000);
    if (status == -1) {
        kill(pid, SIGTERM);
        status = wait_exit(pid, 5000);
    }
    if (status == -1) {
        kill(pid, SIGKILL);
        status = wait_exit(pid, 5000);
    }
    if (!(WIFEXITED(status) && WEXITSTATUS(status) == 0)) {
        g_autofree char *why = daemon_stderr(qmp->daemon_dir);

        g_set_error(error, QMP_ERROR, QMP_ERROR_SPAWN,
                    QSD_BINARY " did not exit cleanly (%s): %s",
                    status == -1        ? "killed"
                    : WIFEXITED(status) ? "non-zero exit status"
                                        : "killed by a signal",
                    why);
        remove_dir(qmp->daemon_dir);
        return false;
    }
    remove_dir(qmp->daemon_dir);
    return true;
}
