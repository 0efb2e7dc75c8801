/*
 * Child processes: started one way (they die with us and create files
 * owner-only), waited for and stopped one way (bounded waits, then
 * SIGTERM, then SIGKILL; never a zombie), and, for servers, started on a
 * socket that already listens so that "ready" needs no guessing.
 */
#include <errno.h>
#include <signal.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "util.h"

/* The first descriptor of systemd's socket activation protocol. */
#define ACTIVATION_FD 3

void util_child_setup(gpointer unused)
{
    /* Only async-signal-safe calls here: we are between fork and exec. */
    prctl(PR_SET_PDEATHSIG, SIGTERM);
    umask(077);
}

int util_child_wait(GPid pid, int timeout_ms)
{
    gint64 deadline = g_get_monotonic_time() + (gint64)timeout_ms * 1000;

    for (;;) {
        int status;
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

bool util_child_wait_file(GPid pid, const char *file, int timeout_ms,
                          int *status)
{
    gint64 deadline = g_get_monotonic_time() + (gint64)timeout_ms * 1000;

    *status = -1;
    while (!g_file_test(file, G_FILE_TEST_EXISTS)) {
        if (g_get_monotonic_time() >= deadline) {
            return false;
        }
        *status = util_child_wait(pid, 2);
        if (*status != -1) {
            return false;
        }
    }
    return true;
}

int util_child_stop(GPid pid, int grace_ms, int stop_ms)
{
    int status = util_child_wait(pid, grace_ms);

    if (status == -1) {
        kill(pid, SIGTERM);
        status = util_child_wait(pid, stop_ms);
    }
    if (status == -1) {
        kill(pid, SIGKILL);
        /* SIGKILL cannot be refused: wait for it, reaping the zombie */
        while (waitpid(pid, &status, 0) < 0 && errno == EINTR) {
        }
    }
    return status;
}

bool util_run(const char *const *argv, const char *cwd, char **out,
              GError **error)
{
    g_autofree char *err = NULL;
    g_autoptr(GError) local = NULL;
    int status;

    if (!g_spawn_sync(cwd, (char **)argv, NULL, G_SPAWN_SEARCH_PATH,
                      util_child_setup, NULL, out, &err, &status, &local)) {
        g_set_error(error, UTIL_ERROR, UTIL_ERROR_SPAWN, "cannot run %s: %s",
                    argv[0], local->message);
        return false;
    }
    if (!g_spawn_check_wait_status(status, NULL)) {
        g_set_error(error, UTIL_ERROR, UTIL_ERROR_EXIT, "%s",
                    *g_strstrip(err) ? err : "failed without a message");
        if (out) {
            g_clear_pointer(out, g_free);
        }
        return false;
    }
    return true;
}

/* The standard error of a child, read to its end (the child may be
 * blocked writing it until then). */
static char *read_all(int fd)
{
    GString *text = g_string_new(NULL);
    char buf[4096];
    ssize_t n;

    while ((n = read(fd, buf, sizeof(buf))) > 0 || (n < 0 && errno == EINTR)) {
        if (n > 0) {
            g_string_append_len(text, buf, n);
        }
    }
    close(fd);
    return g_string_free(text, FALSE);
}

bool util_run_all(const char *const *const *argvs, const char *const *cwds,
                  guint n, GError **error)
{
    g_autofree GPid *pids = g_new0(GPid, n);
    g_autofree int *errfds = g_new(int, n);
    GError *first = NULL;

    for (guint i = 0; i < n && !first; i++) {
        g_autoptr(GError) local = NULL;

        if (!g_spawn_async_with_pipes(
                cwds ? cwds[i] : NULL, (char **)argvs[i], NULL,
                G_SPAWN_SEARCH_PATH | G_SPAWN_DO_NOT_REAP_CHILD |
                    G_SPAWN_STDOUT_TO_DEV_NULL,
                util_child_setup, NULL, &pids[i], NULL, NULL, &errfds[i],
                &local)) {
            first =
                g_error_new(UTIL_ERROR, UTIL_ERROR_SPAWN, "cannot run %s: %s",
                            argvs[i][0], local->message);
            pids[i] = 0;
        }
    }
    /* every child started is waited for, even after a failure */
    for (guint i = 0; i < n && pids[i]; i++) {
        g_autofree char *err = read_all(errfds[i]);
        int status = 0;

        while (waitpid(pids[i], &status, 0) < 0 && errno == EINTR) {
        }

        if (!first && !g_spawn_check_wait_status(status, NULL)) {
            first = g_error_new(UTIL_ERROR, UTIL_ERROR_EXIT, "%s",
                                *g_strstrip(err) ? err
                                                 : "failed without a message");
        }
    }
    if (first) {
        g_propagate_error(error, first);
        return false;
    }
    return true;
}

int util_listen_unix(const char *path, GError **error)
{
    int fd = util_unix_socket(path, UTIL_SOCKET_LISTEN);

    if (fd < 0) {
        int saved = errno;

        g_set_error(error, UTIL_ERROR, UTIL_ERROR_IO,
                    "cannot listen on '%s': %s", path, g_strerror(saved));
    }
    return fd;
}

bool util_spawn_on_socket(const char *const *argv, const char *socket,
                          bool activation, int log_fd, GPid *pid,
                          GError **error)
{
    g_autoptr(GPtrArray) sh = g_ptr_array_new();
    g_autoptr(GError) local = NULL;
    int source = util_listen_unix(socket, error);
    int target = ACTIVATION_FD;
    bool ok;

    if (source < 0) {
        return false;
    }
    /* LISTEN_PID must be the server's own pid: a shell that sets it to
     * its own ($$) and then execs the server keeps that pid. */
    if (activation) {
        g_ptr_array_add(sh, "/bin/sh");
        g_ptr_array_add(sh, "-c");
        g_ptr_array_add(sh, "LISTEN_PID=$$ LISTEN_FDS=1 exec \"$0\" \"$@\"");
    }
    for (guint i = 0; argv[i]; i++) {
        g_ptr_array_add(sh, (char *)argv[i]);
    }
    g_ptr_array_add(sh, NULL);
    ok = g_spawn_async_with_pipes_and_fds(
        NULL, (const char *const *)sh->pdata, NULL,
        G_SPAWN_DO_NOT_REAP_CHILD | G_SPAWN_STDIN_FROM_DEV_NULL |
            G_SPAWN_SEARCH_PATH,
        util_child_setup, NULL, -1, log_fd, log_fd, &source, &target, 1, pid,
        NULL, NULL, NULL, &local);
    close(source); /* the child has its own copy */
    if (!ok) {
        g_set_error(error, UTIL_ERROR, UTIL_ERROR_SPAWN, "cannot run %s: %s",
                    argv[0], local->message);
        unlink(socket);
    }
    return ok;
}
