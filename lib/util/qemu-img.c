/*
 * qemu-img, the one way qbk calls it: images created exclusively and
 * owner-only, JSON answers parsed with json-c.
 */
#include <errno.h>
#include <fcntl.h>
#include <unistd.h>

#include "util.h"

bool qemu_img_create(const char *image, guint64 size, const char *backing,
                     const char *backing_format, GError **error)
{
    g_autofree char *size_s = g_strdup_printf("%" G_GUINT64_FORMAT, size);
    g_autofree char *abs = g_canonicalize_filename(image, NULL);
    g_autofree char *dir = g_path_get_dirname(abs);
    g_autoptr(GPtrArray) argv = g_ptr_array_new();
    int fd;

    /* Ours alone from the start: qemu-img then writes into this file
     * (never a planted link), and its mode is kept. */
    fd = open(abs, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0600);
    if (fd < 0) {
        g_set_error(error, UTIL_ERROR, UTIL_ERROR_IO,
                    "cannot create image '%s': %s", image, g_strerror(errno));
        return false;
    }
    close(fd);
    g_ptr_array_add(argv, "qemu-img");
    g_ptr_array_add(argv, "create");
    g_ptr_array_add(argv, "-q");
    g_ptr_array_add(argv, "-f");
    g_ptr_array_add(argv, "qcow2");
    if (backing) {
        g_ptr_array_add(argv, "-b");
        g_ptr_array_add(argv, (char *)backing);
        g_ptr_array_add(argv, "-F");
        g_ptr_array_add(argv,
                        (char *)(backing_format ? backing_format : "qcow2"));
    }
    g_ptr_array_add(argv, abs);
    g_ptr_array_add(argv, size_s);
    g_ptr_array_add(argv, NULL);
    /* Relative backing names resolve from the image's directory. */
    if (!util_run((const char *const *)argv->pdata, dir, NULL, error)) {
        g_prefix_error(error, "cannot create image '%s': ", image);
        unlink(abs);
        return false;
    }
    return true;
}

json_object *qemu_img_json(const char *const *args, GError **error)
{
    g_autoptr(GPtrArray) argv = g_ptr_array_new();
    g_autofree char *out = NULL;
    json_object *obj;

    g_ptr_array_add(argv, "qemu-img");
    g_ptr_array_add(argv, (char *)args[0]);
    g_ptr_array_add(argv, "--output=json");
    for (guint i = 1; args[i]; i++) {
        g_ptr_array_add(argv, (char *)args[i]);
    }
    g_ptr_array_add(argv, NULL);
    if (!util_run((const char *const *)argv->pdata, NULL, &out, error)) {
        return NULL;
    }
    obj = json_tokener_parse(out);
    if (!obj) {
        g_set_error(error, UTIL_ERROR, UTIL_ERROR_OUTPUT,
                    "qemu-img %s gave no JSON", args[0]);
    }
    return obj;
}
