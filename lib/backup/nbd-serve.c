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
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "internal.h"

#define START_TIMEOUT_MS 10000
#define STOP_TIMEOUT_MS  30000

static void die_with_parent(gpointer unused)
{
    prctl(PR_SET_PDEATHSIG, SIGTERM);
}

static char *log_text(NbdServer *s)
{
    g_autofree char *path = g_build_filename(s->dir, "qemu-nbd.log", NULL);
    char *text = NULL;

    if (!g_file_get_contents(path, &text, NULL, NULL) || !*g_strstrip(text)) {
        g_free(text);
        return g_strdup("no message");
    }
    return text;
}

/* Wait up to TIMEOUT_MS for the child to exit; its status, or -1. */
static int wait_child(GPid pid, int timeout_ms)
{
    for (int waited = 0; waited <= timeout_ms; waited += 5) {
        int status;
        pid_t r = waitpid(pid, &status, WNOHANG);

        if (r == pid) {
            return status;
        }
        if (r < 0 && errno != EINTR) {
            return -1;
        }
        g_usleep(5 * 1000);
    }
    return -1;
}

NbdServer *nbd_serve(const char *image, const char *format, bool writable,
                     GError **error)
{
    g_autoptr(GPtrArray) argv = g_ptr_array_new_with_free_func(g_free);
    g_autofree char *log = NULL;
    NbdServer *s = g_new0(NbdServer, 1);
    int fd;

    s->dir = g_dir_make_tmp("qbk-nbd-XXXXXX", error);
    if (!s->dir) {
        g_free(s);
        return NULL;
    }
    s->socket = g_build_filename(s->dir, "nbd.sock", NULL);
    log = g_build_filename(s->dir, "qemu-nbd.log", NULL);
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
    g_ptr_array_add(argv, g_strdup_printf("--format=%s", format));
    g_ptr_array_add(argv, g_strdup_printf("--socket=%s", s->socket));
    g_ptr_array_add(argv, g_strdup(image));
    g_ptr_array_add(argv, NULL);
    fd = open(log, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    if (fd < 0 || !g_spawn_async_with_fds(
                      NULL, (char **)argv->pdata, NULL,
                      G_SPAWN_SEARCH_PATH | G_SPAWN_DO_NOT_REAP_CHILD,
                      die_with_parent, NULL, &s->pid, -1, fd, fd, error)) {
        if (fd >= 0) {
            close(fd);
        } else {
            g_set_error(error, BACKUP_ERROR, BACKUP_ERROR_FAILED,
                        "cannot write '%s': %s", log, g_strerror(errno));
        }
        nbd_server_stop(s, NULL);
        return NULL;
    }
    close(fd);
    /* ready when its socket is there */
    for (int waited = 0; !g_file_test(s->socket, G_FILE_TEST_EXISTS);
         waited += 5) {
        int status;

        if (waitpid(s->pid, &status, WNOHANG) == s->pid ||
            waited > START_TIMEOUT_MS) {
            g_autofree char *why = log_text(s);

            if (waited <= START_TIMEOUT_MS) {
                s->pid = 0; /* reaped */
            }
            g_set_error(error, BACKUP_ERROR, BACKUP_ERROR_CORRUPT,
                        "cannot serve '%s': %s", image, why);
            nbd_server_stop(s, NULL);
            return NULL;
        }
        g_usleep(5 * 1000);
    }
    return s;
}

bool nbd_server_stop(NbdServer *s, GError **error)
{
    g_autofree char *log = NULL;
    bool ok = true;
    int status;

    if (!s) {
        return true;
    }
    if (s->pid > 0) {
        /* it ends by itself once its one client is gone */
        status = wait_child(s->pid, 100);
        if (status == -1) {
            kill(s->pid, SIGTERM);
            status = wait_child(s->pid, STOP_TIMEOUT_MS);
        }
        if (status == -1) {
            kill(s->pid, SIGKILL);
            status = wait_child(s->pid, STOP_TIMEOUT_MS);
        }
        if (!(WIFEXITED(status) && WEXITSTATUS(status) == 0) &&
            !(WIFSIGNALED(status) && WTERMSIG(status) == SIGTERM)) {
            g_autofree char *why = log_text(s);

            g_set_error(error, BACKUP_ERROR, BACKUP_ERROR_FAILED,
                        "qemu-nbd did not exit cleanly: %s", why);
            ok = false;
        }
    }
    if (s->socket) {
        unlink(s->socket);
    }
    log = g_build_filename(s->dir, "qemu-nbd.log", NULL);
    unlink(log);
    rmdir(s->dir);
    g_free(s->socket);
    g_free(s->dir);
    g_free(s);
    return ok;
}

json_object *qemu_img_json(const char *const *args, GError **error)
{
    g_autoptr(GPtrArray) argv = g_ptr_array_new();
    g_autofree char *out = NULL;
    g_autofree char *err = NULL;
    json_object *obj;
    int status;

    g_ptr_array_add(argv, "qemu-img");
    g_ptr_array_add(argv, (char *)args[0]);
    g_ptr_array_add(argv, "--output=json");
    for (guint i = 1; args[i]; i++) {
        g_ptr_array_add(argv, (char *)args[i]);
    }
    g_ptr_array_add(argv, NULL);
    if (!g_spawn_sync(NULL, (char **)argv->pdata, NULL, G_SPAWN_SEARCH_PATH,
                      NULL, NULL, &out, &err, &status, error)) {
        return NULL;
    }
    if (!g_spawn_check_wait_status(status, NULL) ||
        !(obj = json_tokener_parse(out))) {
        g_set_error(error, BACKUP_ERROR, BACKUP_ERROR_CORRUPT, "%s",
                    g_strstrip(err));
        return NULL;
    }
    return obj;
}
