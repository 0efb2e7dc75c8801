/*
 * qemu-img, the one way qbk calls it: images created exclusively and
 * owner-only, JSON answers parsed with json-c.
 */
#include <errno.h>
#include <fcntl.h>
#include <unistd.h>

#include "util.h"

/* The command line of IMG's creation (strings owned by ARGV), run in the
 * image's directory, which goes to *DIR. */
static GPtrArray *create_argv(const QemuImgCreate *img, char **dir)
{
    g_autofree char *abs = g_canonicalize_filename(img->image, NULL);
    GPtrArray *argv = g_ptr_array_new_with_free_func(g_free);
    const char *fixed[] = { "qemu-img", "create", "-q", "-f", "qcow2" };

    for (guint i = 0; i < G_N_ELEMENTS(fixed); i++) {
        g_ptr_array_add(argv, g_strdup(fixed[i]));
    }
    if (img->backing) {
        /* Not opened: the size is given and qbk checked the chain. */
        g_ptr_array_add(argv, g_strdup("-u"));
        g_ptr_array_add(argv, g_strdup("-b"));
        g_ptr_array_add(argv, g_strdup(img->backing));
        g_ptr_array_add(argv, g_strdup("-F"));
        g_ptr_array_add(argv, g_strdup(img->backing_format ? img->backing_format
                                                           : "qcow2"));
    }
    if (img->compress) {
        g_ptr_array_add(argv, g_strdup("-o"));
        g_ptr_array_add(argv, g_strdup("compression_type=zstd"));
    }
    g_ptr_array_add(argv, g_strdup(abs));
    g_ptr_array_add(argv, g_strdup_printf("%" G_GUINT64_FORMAT, img->size));
    g_ptr_array_add(argv, NULL);
    *dir = g_path_get_dirname(abs);
    return argv;
}

bool qemu_img_create_all(const QemuImgCreate *imgs, guint n, GError **error)
{
    g_autoptr(GPtrArray) argvs =
        g_ptr_array_new_with_free_func((GDestroyNotify)g_ptr_array_unref);
    g_autoptr(GPtrArray) dirs = g_ptr_array_new_with_free_func(g_free);
    g_autoptr(GPtrArray) pdatas = g_ptr_array_new();
    guint made = 0;
    bool ok = true;

    /* Ours alone from the start: qemu-img then writes into these files
     * (never a planted link), and their mode is kept. */
    for (; made < n; made++) {
        int fd =
            open(imgs[made].image,
                 O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0600);

        if (fd < 0) {
            g_set_error(error, UTIL_ERROR, UTIL_ERROR_IO,
                        "cannot create image '%s': %s", imgs[made].image,
                        g_strerror(errno));
            ok = false;
            break;
        }
        close(fd);
    }
    for (guint i = 0; ok && i < n; i++) {
        char *dir;
        GPtrArray *argv = create_argv(&imgs[i], &dir);

        g_ptr_array_add(argvs, argv);
        g_ptr_array_add(pdatas, argv->pdata);
        g_ptr_array_add(dirs, dir);
    }
    /* Relative backing names resolve from each image's directory. */
    if (ok && !util_run_all((const char *const *const *)pdatas->pdata,
                            (const char *const *)dirs->pdata, n, error)) {
        g_prefix_error(error,
                       "cannot create image%s '%s'%s: ", n > 1 ? "s" : "",
                       imgs[0].image, n > 1 ? " ..." : "");
        ok = false;
    }
    for (guint i = 0; !ok && i < made; i++) {
        unlink(imgs[i].image);
    }
    return ok;
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
