/*
 * qemu-img, the one way qbk calls it: images created exclusively and
 * owner-only, JSON answers parsed with json-c.
 */
#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <unistd.h>

#include "util.h"

char *util_secret_object(const char *id, const char *file)
{
    json_object *o = json_object_new_object();
    char *text;

    json_object_object_add(o, "qom-type", json_object_new_string("secret"));
    json_object_object_add(o, "id", json_object_new_string(id));
    json_object_object_add(o, "file", json_object_new_string(file));
    text = g_strdup(json_object_to_json_string_ext(
        o, JSON_C_TO_STRING_PLAIN | JSON_C_TO_STRING_NOSLASHESCAPE));
    json_object_put(o);
    return text;
}

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
    if (img->key_file) {
        g_ptr_array_add(argv, g_strdup("--object"));
        g_ptr_array_add(argv,
                        util_secret_object(img->key_secret, img->key_file));
    }
    if (img->compress || img->key_file) {
        GString *o = g_string_new(NULL);

        if (img->compress) {
            g_string_append(o, "compression_type=zstd,");
        }
        if (img->key_file) {
            /* LUKS's PBKDF2 is tuned to take this long at every open of
             * every image of a chain (its default, 2 s, is for a disk
             * unlocked once a boot) */
            g_string_append_printf(o,
                                   "encrypt.format=luks,"
                                   "encrypt.key-secret=%s,"
                                   "encrypt.iter-time=%d,",
                                   img->key_secret, UTIL_LUKS_ITER_MS);
        }
        g_string_truncate(o, o->len - 1);
        g_ptr_array_add(argv, g_strdup("-o"));
        g_ptr_array_add(argv, g_string_free(o, FALSE));
    }
    g_ptr_array_add(argv, g_strdup(abs));
    g_ptr_array_add(argv, g_strdup_printf("%" G_GUINT64_FORMAT, img->size));
    g_ptr_array_add(argv, NULL);
    *dir = g_path_get_dirname(abs);
    return argv;
}

bool util_luks_timing_failed(const GError *error)
{
    return error && strstr(error->message, "Unable to get accurate CPU usage");
}

bool util_luks_retry(UtilCreateFunc create, void *data, GError **error)
{
    for (int i = 0;; i++) {
        g_autoptr(GError) local = NULL;

        if (create(data, &local)) {
            return true;
        }
        if (i == UTIL_LUKS_RETRIES || !util_luks_timing_failed(local)) {
            g_propagate_error(error, g_steal_pointer(&local));
            return false;
        }
    }
}

typedef struct {
    const char *const *argv;
    const char *dir;
} Creation;

/* One qemu-img creation, as a UtilCreateFunc. */
static bool run_create(void *data, GError **error)
{
    const Creation *c = data;

    return util_run(c->argv, c->dir, NULL, error);
}

/* Run the N qemu-img creations (ARGVS: argv arrays) at once. If a LUKS
 * creation failed its timing (util_luks_timing_failed), each is run again
 * on its own, with its own retries: retried all together, every one must
 * pass in the same try, and with three disks and about a quarter of
 * failures each, ten tries were not enough in one test run here. */
static bool run_creates(GPtrArray *argvs, GPtrArray *dirs, guint n,
                        GError **error)
{
    g_autoptr(GError) local = NULL;

    if (util_run_all((const char *const *const *)argvs->pdata,
                     (const char *const *)dirs->pdata, n, &local)) {
        return true;
    }
    if (!util_luks_timing_failed(local)) {
        g_propagate_error(error, g_steal_pointer(&local));
        return false;
    }
    for (guint i = 0; i < n; i++) {
        Creation c = { argvs->pdata[i], dirs->pdata[i] };

        if (!util_luks_retry(run_create, &c, error)) {
            return false;
        }
    }
    return true;
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
    if (ok && !run_creates(pdatas, dirs, n, error)) {
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
