/*
 * Restore: rebuild a disk as it was at one backup, from its qcow2 chain,
 * with stock qemu-img (sparse output), and check the result against the
 * manifest's block checksum.
 */
#include <unistd.h>

#include "internal.h"

json_object *backup_restore(const char *repo, const char *id, const char *disk,
                            const char *output, const char *format,
                            GError **error)
{
    g_autoptr(GError) local = NULL;
    g_autofree char *err = NULL;
    g_autofree char *image = NULL;
    g_autofree char *sum = NULL;
    json_object *m, *entry, *checksum;
    const char *expected;
    int status;

    m = backup_load(repo, id, error);
    if (!m) {
        return NULL;
    }
    entry = manifest_disk(m, disk);
    if (!entry || !qmp_json_string(entry, "image")) {
        g_set_error(error, BACKUP_ERROR, BACKUP_ERROR_NOT_FOUND,
                    "backup '%s' has no disk '%s'", qmp_json_string(m, "id"),
                    disk);
        json_object_put(m);
        return NULL;
    }
    entry = json_object_get(entry);
    json_object_put(m);
    image = g_build_filename(repo, qmp_json_string(entry, "image"), NULL);

    const char *in_format = qmp_json_string(entry, "format")
                                ? qmp_json_string(entry, "format")
                                : "qcow2";
    const char *argv[] = { "qemu-img", "convert", "-f",   in_format, "-O",
                           format,     image,     output, NULL };
    if (!g_spawn_sync(NULL, (char **)argv, NULL, G_SPAWN_SEARCH_PATH, NULL,
                      NULL, NULL, &err, &status, error)) {
        json_object_put(entry);
        return NULL;
    }
    if (!g_spawn_check_wait_status(status, NULL)) {
        g_set_error(error, BACKUP_ERROR, BACKUP_ERROR_CORRUPT,
                    "cannot read the chain of '%s': %s", image,
                    g_strstrip(err));
        unlink(output);
        json_object_put(entry);
        return NULL;
    }
    if (g_strcmp0(format, "raw") != 0) {
        return entry; /* verified by the caller re-reading, if wanted */
    }
    json_object_object_get_ex(entry, "checksum", &checksum);
    expected = qmp_json_string(checksum, "value");
    sum = copier_file_checksum(output, qmp_json_int(entry, "size"), error);
    if (!sum) {
        json_object_put(entry);
        return NULL;
    }
    if (g_strcmp0(sum, expected) != 0) {
        g_set_error(error, BACKUP_ERROR, BACKUP_ERROR_MISMATCH,
                    "restored disk '%s' does not match backup's checksum "
                    "(%s, expected %s)",
                    disk, sum, expected ? expected : "none");
        json_object_put(entry);
        return NULL;
    }
    json_object_object_add(entry, "verified", json_object_new_boolean(1));
    return entry;
}
