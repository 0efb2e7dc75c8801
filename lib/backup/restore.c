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

/* ---- incremental restore: only what differs ---- */

/* Add to RANGES what IMAGE's newest DEPTH links hold (qemu-img map). */
static bool changed_ranges(const char *image, guint depth, GArray *ranges,
                           GError **error)
{
    const char *args[] = { "map", "-f", "qcow2", image, NULL };
    json_object *map;

    if (depth == 0) {
        return true;
    }
    map = qemu_img_json(args, error);
    if (!map) {
        g_prefix_error(error, "cannot map '%s': ", image);
        return false;
    }
    for (size_t i = 0; i < json_object_array_length(map); i++) {
        json_object *e = json_object_array_get_idx(map, i);
        json_object *present = NULL;

        /* "present": false = allocated nowhere in the chain */
        if (json_object_object_get_ex(e, "present", &present) &&
            !json_object_get_boolean(present)) {
            continue;
        }
        if (qmp_json_uint(e, "depth") < depth) {
            CopierRange r = { qmp_json_uint(e, "start"),
                              qmp_json_uint(e, "length") };

            g_array_append_val(ranges, r);
        }
    }
    json_object_put(map);
    return true;
}

static gint cmp_range(gconstpointer a, gconstpointer b)
{
    const CopierRange *x = a, *y = b;

    return x->offset < y->offset ? -1 : x->offset > y->offset;
}

json_object *backup_restore_into(const char *repo, const char *from,
                                 const char *id, const char *disk,
                                 const char *image, GError **error)
{
    g_autoptr(GPtrArray) xs = g_ptr_array_new_with_free_func(g_free);
    g_autoptr(GPtrArray) ys = g_ptr_array_new_with_free_func(g_free);
    g_autoptr(GPtrArray) xms = g_ptr_array_new_with_free_func(qmp_json_free);
    g_autoptr(GPtrArray) yms = g_ptr_array_new_with_free_func(qmp_json_free);
    g_autoptr(GArray) ranges = g_array_new(FALSE, FALSE, sizeof(CopierRange));
    g_autoptr(GArray) merged = g_array_new(FALSE, FALSE, sizeof(CopierRange));
    g_autofree char *xtop = NULL, *ytop = NULL, *fmt = NULL;
    json_object *xe = NULL, *ye = NULL, *result;
    guint dx = 0, dy = 0;
    const char *common = NULL;
    NbdServer *src = NULL, *dst = NULL;
    CopierOptions co;
    CopierStats stats = { 0 };
    guint64 changed = 0;
    bool ok = false;

    if (!repo_disk_chain(repo, from, disk, xs, xms, error) ||
        !repo_disk_chain(repo, id, disk, ys, yms, error)) {
        goto out;
    }
    xe = manifest_disk(xms->pdata[0], disk); /* borrowed */
    ye = manifest_disk(yms->pdata[0], disk);
    /* the newest backup both chains hold: what differs is what the links
     * above it wrote, on either side */
    for (guint i = 0; i < xs->len && !common; i++) {
        guint j;

        if (g_ptr_array_find_with_equal_func(ys, xs->pdata[i], g_str_equal,
                                             &j)) {
            common = xs->pdata[i];
            dx = i;
            dy = j;
        }
    }
    if (!common) {
        g_set_error(error, BACKUP_ERROR, BACKUP_ERROR_NOT_IN_CHAIN,
                    "backups '%s' and '%s' share no chain for disk '%s': "
                    "restore in full",
                    from, id, disk);
        goto out;
    }
    if (qmp_json_uint(xe, "size") != qmp_json_uint(ye, "size")) {
        g_set_error(error, BACKUP_ERROR, BACKUP_ERROR_FAILED,
                    "disk '%s' changed size between '%s' and '%s': restore "
                    "in full",
                    disk, from, id);
        goto out;
    }
    xtop = g_build_filename(repo, qmp_json_string(xe, "image"), NULL);
    ytop = g_build_filename(repo, qmp_json_string(ye, "image"), NULL);
    if ((dx && g_strcmp0(qmp_json_string(xe, "format"), "raw") == 0) ||
        (dy && g_strcmp0(qmp_json_string(ye, "format"), "raw") == 0) ||
        !changed_ranges(xtop, dx, ranges, error) ||
        !changed_ranges(ytop, dy, ranges, error)) {
        if (error && !*error) {
            g_set_error(error, BACKUP_ERROR, BACKUP_ERROR_FAILED,
                        "a raw link cannot be mapped: restore in full");
        }
        goto out;
    }
    g_array_sort(ranges, cmp_range);
    for (guint i = 0; i < ranges->len; i++) {
        CopierRange r = g_array_index(ranges, CopierRange, i);
        CopierRange *last =
            merged->len ? &g_array_index(merged, CopierRange, merged->len - 1)
                        : NULL;

        if (last && r.offset <= last->offset + last->length) {
            last->length =
                MAX(last->length, r.offset + r.length - last->offset);
        } else {
            g_array_append_val(merged, r);
        }
    }
    for (guint i = 0; i < merged->len; i++) {
        changed += g_array_index(merged, CopierRange, i).length;
    }
    {
        const char *args[] = { "info", image, NULL };
        json_object *info = qemu_img_json(args, NULL);

        if (!info ||
            qmp_json_uint(info, "virtual-size") != qmp_json_uint(ye, "size")) {
            g_set_error(error, BACKUP_ERROR, BACKUP_ERROR_FAILED,
                        "'%s' is not an image of disk '%s' (%" G_GUINT64_FORMAT
                        " bytes)",
                        image, disk, (guint64)qmp_json_uint(ye, "size"));
            json_object_put(info);
            goto out;
        }
        fmt = g_strdup(qmp_json_string(info, "format"));
        json_object_put(info);
    }
    src = nbd_serve(ytop, qmp_json_string(ye, "format"), false, error);
    dst = src ? nbd_serve(image, fmt, true, error) : NULL;
    if (!dst) {
        goto out;
    }
    copier_options_init(&co);
    co.ranges = merged;
    ok = copier_copy(&(CopierEndpoint){ .socket = src->socket, .name = "" },
                     &(CopierEndpoint){ .socket = dst->socket, .name = "" },
                     &co, &stats, error);
out:
    nbd_server_stop(src, NULL);
    ok = nbd_server_stop(dst, ok ? error : NULL) && ok;
    if (!ok) {
        return NULL;
    }
    result = json_object_new_object();
    json_object_object_add(result, "disk", json_object_new_string(disk));
    json_object_object_add(result, "from",
                           json_object_new_string(xs->pdata[0]));
    json_object_object_add(result, "backup",
                           json_object_new_string(ys->pdata[0]));
    json_object_object_add(result, "common", json_object_new_string(common));
    json_object_object_add(result, "format", json_object_new_string(fmt));
    json_object_object_add(result, "bytes_changed",
                           json_object_new_uint64(changed));
    json_object_object_add(
        result, "bytes_written",
        json_object_new_uint64(stats.bytes_written + stats.bytes_zero));
    json_object_object_add(result, "seconds",
                           json_object_new_double(stats.seconds));
    return result;
}
