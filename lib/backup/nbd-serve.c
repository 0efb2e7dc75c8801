/*
 * qemu-nbd on a private socket: how verify, merge and restore --into read
 * a backup chain (read-only, with its allocation depth) or write an image.
 */
#include <errno.h>
#include <signal.h>
#include <stdlib.h>
#include <unistd.h>

#include "internal.h"

NbdServer *nbd_serve(const char *image, const char *format, bool writable,
                     GError **error)
{
    g_autoptr(GPtrArray) argv = g_ptr_array_new_with_free_func(g_free);
    g_autofree char *err = NULL;
    g_autofree char *text = NULL;
    NbdServer *s = g_new0(NbdServer, 1);
    int status;

    s->dir = g_dir_make_tmp("qbk-nbd-XXXXXX", error);
    if (!s->dir) {
        g_free(s);
        return NULL;
    }
    s->socket = g_build_filename(s->dir, "nbd.sock", NULL);
    s->pidfile = g_build_filename(s->dir, "qemu-nbd.pid", NULL);
    g_ptr_array_add(argv, g_strdup("qemu-nbd"));
    g_ptr_array_add(argv, g_strdup(writable ? "--cache=none" : "--read-only"));
    if (writable) {
        g_ptr_array_add(argv, g_strdup("--aio=native"));
    } else {
        g_ptr_array_add(argv, g_strdup("--allocation-depth"));
    }
    g_ptr_array_add(argv, g_strdup("--fork"));
    g_ptr_array_add(argv, g_strdup_printf("--format=%s", format));
    g_ptr_array_add(argv, g_strdup_printf("--socket=%s", s->socket));
    g_ptr_array_add(argv, g_strdup_printf("--pid-file=%s", s->pidfile));
    g_ptr_array_add(argv, g_strdup(image));
    g_ptr_array_add(argv, NULL);
    if (!g_spawn_sync(NULL, (char **)argv->pdata, NULL, G_SPAWN_SEARCH_PATH,
                      NULL, NULL, NULL, &err, &status, error)) {
        nbd_server_stop(s);
        return NULL;
    }
    if (!g_spawn_check_wait_status(status, NULL) ||
        !g_file_get_contents(s->pidfile, &text, NULL, NULL)) {
        g_set_error(error, BACKUP_ERROR, BACKUP_ERROR_CORRUPT,
                    "cannot serve '%s': %s", image, g_strstrip(err));
        nbd_server_stop(s);
        return NULL;
    }
    s->pid = atoi(text);
    return s;
}

void nbd_server_stop(NbdServer *s)
{
    if (!s) {
        return;
    }
    /* It ends by itself once its one client is gone; make sure, and wait
     * so that a writable image is closed before the caller goes on. */
    if (s->pid > 0 && kill(s->pid, SIGTERM) == 0) {
        for (int i = 0; i < 500 && kill(s->pid, 0) == 0; i++) {
            g_usleep(10 * 1000);
        }
    }
    if (s->socket) {
        unlink(s->socket);
    }
    if (s->pidfile) {
        unlink(s->pidfile);
    }
    if (s->dir) {
        rmdir(s->dir);
    }
    g_free(s->socket);
    g_free(s->pidfile);
    g_free(s->dir);
    g_free(s);
}
