/*
 * The target of a backup: new qcow2 images in the repository, chained to
 * their parents by relative backing file names, and written through a
 * qemu-storage-daemon that qbk starts for the copy and stops afterwards, so
 * that QEMU's own qcow2 code lays out every byte.
 */
#include <unistd.h>

#include "internal.h"

bool target_create_images(const QemuImgCreate *imgs, guint n, GError **error)
{
    GError *local = NULL;

    if (!qemu_img_create_all(imgs, n, &local)) {
        g_set_error(error, BACKUP_ERROR, BACKUP_ERROR_FAILED, "%s",
                    local->message);
        g_error_free(local);
        return false;
    }
    return true;
}

char *target_plain_name(const char *name)
{
    return g_strconcat("plain/", name, NULL);
}

/* Export NODE of the daemon as NAME, writable (the Nth image's). */
static bool export_add(Target *t, guint n, const char *node, const char *name,
                       GError **error)
{
    json_object *args = json_object_new_object();
    g_autofree char *id = g_strdup_printf("t%u-%s", n, node);

    qmp_json_set_string(args, "type", "nbd");
    qmp_json_set_string(args, "id", id);
    qmp_json_set_string(args, "node-name", node);
    qmp_json_set_string(args, "name", name);
    qmp_json_set_bool(args, "writable", 1);
    return qmp_run(t->qsd, "block-export-add", args, error);
}

Target *target_start(char **images, char **names, bool compress,
                     const char *key_file, GError **error)
{
    Target *t = g_new0(Target, 1);
    QmpDaemonFlags flags = compress ? QMP_DAEMON_COMPRESS : 0;
    json_object *args, *addr, *data;

    t->dir = privdir_new(NULL, "target", error);
    if (!t->dir) {
        target_free(t);
        return NULL;
    }
    t->socket = privdir_file(t->dir, "nbd.sock");
    /* Buffered writes and one fsync at the end are slow (DESIGN.md):
     * bypass the page cache, unless the file system refuses (tmpfs). */
    t->qsd = qmp_spawn_storage_daemon((const char *const *)images,
                                      flags | QMP_DAEMON_DIRECT_IO, key_file, 0,
                                      NULL);
    if (!t->qsd) {
        t->qsd = qmp_spawn_storage_daemon((const char *const *)images, flags,
                                          key_file, 0, error);
    }
    if (!t->qsd) {
        g_prefix_error(error, "cannot open the new images: ");
        target_free(t);
        return NULL;
    }
    args = json_object_new_object();
    addr = json_object_new_object();
    data = json_object_new_object();
    qmp_json_set_string(data, "path", t->socket);
    qmp_json_set_string(addr, "type", "unix");
    json_object_object_add(addr, "data", data);
    json_object_object_add(args, "addr", addr);
    if (!qmp_run(t->qsd, "nbd-server-start", args, error)) {
        target_free(t);
        return NULL;
    }
    for (guint i = 0; images[i]; i++) {
        g_autofree char *node = g_strdup_printf("img%u", i);
        g_autofree char *plain = g_strdup_printf("img%u-fmt", i);
        g_autofree char *plain_name = target_plain_name(names[i]);

        if (!export_add(t, i, node, names[i], error) ||
            (compress && !export_add(t, i, plain, plain_name, error))) {
            target_free(t);
            return NULL;
        }
    }
    return t;
}

void target_quit(Target *t)
{
    if (t) {
        qmp_quit_storage_daemon(t->qsd);
    }
}

bool target_stop(Target *t, GError **error)
{
    bool ok = qmp_stop_storage_daemon(t->qsd, error);

    qmp_free(t->qsd);
    t->qsd = NULL;
    return ok;
}

void target_free(Target *t)
{
    if (!t) {
        return;
    }
    qmp_free(t->qsd); /* stops the daemon if still running */
    privdir_free(t->dir);
    g_free(t->socket);
    g_free(t);
}
