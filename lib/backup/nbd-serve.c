/*
 * qemu-nbd on a private socket: how verify, merge and restore --into read
 * a backup chain (read-only, with its allocation depth) or write an image;
 * and qemu-img's JSON answers about images.
 * It runs as our child (not --fork: its exit status tells whether a
 * written image was closed cleanly, and no zombie is left to an init that
 * may not reap), and dies with us.
 */
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "internal.h"

#define START_TIMEOUT_MS 10000
#define STOP_TIMEOUT_MS  30000

char *backup_log_line(const char *path)
{
    char *text = NULL;

    if (!g_file_get_contents(path, &text, NULL, NULL) || !*g_strstrip(text)) {
        g_free(text);
        return g_strdup("no message");
    }
    g_strdelimit(text, "\n", ' ');
    return text;
}

static char *log_text(NbdServer *s)
{
    g_autofree char *path = privdir_file(s->dir, "qemu-nbd.log");

    return backup_log_line(path);
}

void backup_add_key_object(GPtrArray *argv, const char *key_file)
{
    if (key_file) {
        g_ptr_array_add(argv, g_strdup("--object"));
        g_ptr_array_add(argv, util_secret_object(REPO_KEY_SECRET, key_file));
    }
}

NbdServer *nbd_serve(const char *image, const char *format, bool writable,
                     const char *key_file, GError **error)
{
    g_autoptr(GPtrArray) argv = g_ptr_array_new_with_free_func(g_free);
    g_autofree char *log = NULL;
    g_autofree char *pidfile = NULL;
    NbdServer *s = g_new0(NbdServer, 1);
    int fd, status;

    s->dir = privdir_new(NULL, "nbd", error);
    if (!s->dir) {
        g_free(s);
        return NULL;
    }
    s->socket = privdir_file(s->dir, "nbd.sock");
    s->uri = copier_nbd_uri(s->socket, "");
    log = privdir_file(s->dir, "qemu-nbd.log");
    pidfile = privdir_file(s->dir, "qemu-nbd.pid");
    g_ptr_array_add(argv, g_strdup("qemu-nbd"));
    if (writable) {
        g_ptr_array_add(argv, g_strdup("--cache=none"));
        g_ptr_array_add(argv, g_strdup("--aio=native"));
    } else {
        g_ptr_array_add(argv, g_strdup("--read-only"));
        g_ptr_array_add(argv, g_strdup("--allocation-depth"));
        /* the copier reads over several connections */
        g_ptr_array_add(argv,
                        g_strdup_printf("--shared=%d", COPIER_MAX_CONNECTIONS));
    }
    if (format) {
        g_ptr_array_add(argv, g_strdup_printf("--format=%s", format));
    }
    backup_add_key_object(argv, key_file);
    /* written once the image is open: then it serves */
    g_ptr_array_add(argv, g_strdup_printf("--pid-file=%s", pidfile));
    g_ptr_array_add(argv, g_strdup(image));
    g_ptr_array_add(argv, NULL);
    fd = open(log, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
    if (fd < 0) {
        g_set_error(error, BACKUP_ERROR, BACKUP_ERROR_FAILED,
                    "cannot write '%s': %s", log, g_strerror(errno));
        nbd_server_stop(s, NULL);
        return NULL;
    }
    /* The socket listens before qemu-nbd runs (socket activation): a
     * client never finds it there but refusing. */
    if (!util_spawn_on_socket((const char *const *)argv->pdata, s->socket, true,
                              fd, &s->pid, error)) {
        close(fd);
        nbd_server_stop(s, NULL);
        return NULL;
    }
    close(fd);
    /* Wait for the image to be open, to report a bad one here. */
    if (!util_child_wait_file(s->pid, pidfile, START_TIMEOUT_MS, &status)) {
        g_autofree char *why = log_text(s);

        if (status != -1) {
            s->pid = 0; /* exited, reaped */
        }
        g_set_error(error, BACKUP_ERROR, BACKUP_ERROR_CORRUPT,
                    "cannot serve '%s': %s", image,
                    status != -1 ? why : "qemu-nbd did not start");
        nbd_server_stop(s, NULL);
        return NULL;
    }
    return s;
}

bool nbd_server_stop(NbdServer *s, GError **error)
{
    bool ok = true;
    int status;

    if (!s) {
        return true;
    }
    if (s->pid > 0) {
        /* it ends by itself once its one client is gone */
        status = util_child_stop(s->pid, 100, STOP_TIMEOUT_MS);
        if (!(WIFEXITED(status) && WEXITSTATUS(status) == 0) &&
            !(WIFSIGNALED(status) && WTERMSIG(status) == SIGTERM)) {
            g_autofree char *why = log_text(s);

            g_set_error(error, BACKUP_ERROR, BACKUP_ERROR_FAILED,
                        "qemu-nbd did not exit cleanly: %s", why);
            ok = false;
        }
    }
    privdir_free(s->dir);
    g_free(s->socket);
    g_free(s->uri);
    g_free(s);
    return ok;
}

char *backup_read_image(const char *image, const char *format,
                        const char *key_file, const char *target, CopierSum alg,
                        int *digests_fd, CopierStats *stats, GError **error)
{
    g_autofree char *path =
        g_build_filename(g_get_tmp_dir(), "qbk-digests-XXXXXX", NULL);
    NbdServer *nbd = nbd_serve(image, format, false, key_file, error);
    CopierOptions co;
    char *sum = NULL;
    bool ok;

    if (digests_fd) {
        *digests_fd = -1;
    }
    if (!nbd) {
        return NULL;
    }
    copier_options_init(&co);
    co.target_zeroed = target != NULL; /* a new file: holes read as zeros */
    co.digest_fd = g_mkstemp_full(path, O_RDWR | O_CLOEXEC, 0600);
    if (co.digest_fd < 0) {
        g_set_error(error, BACKUP_ERROR, BACKUP_ERROR_FAILED, "%s: %s", path,
                    g_strerror(errno));
        nbd_server_stop(nbd, NULL);
        return NULL;
    }
    unlink(path);
    ok = copier_copy(&(CopierEndpoint){ .uri = nbd->uri },
                     &(CopierEndpoint){ .file = target }, &co, stats, error);
    ok = nbd_server_stop(nbd, ok ? error : NULL) && ok;
    if (ok) {
        sum = copier_digests_checksum(co.digest_fd, stats->size, false, alg,
                                      error);
    }
    if (sum && digests_fd) {
        *digests_fd = co.digest_fd;
    } else {
        close(co.digest_fd);
    }
    return sum;
}
