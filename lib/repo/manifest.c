/*
 * Manifests: parsed once into typed records, every field that logic uses
 * checked. A manifest is input: it may be damaged, or written by someone
 * who wants qbk to delete, read or overwrite a file elsewhere. So the paths
 * it shows ("image", "digests") must be the ones the layout gives, the
 * bitmap names it asks qbk to remove must be its own backup's, and a bad
 * file is skipped with its name, never half-trusted.
 */
#include <string.h>

#include "internal.h"

#define MANIFEST_FORMAT "qbk-manifest-1"
/* lib/copier's COPIER_SUM_*_NAME (lib/backup asserts they agree) */
#define SUM_BLOCKS       "xxh3-128-blocks-64k"
#define SUM_DATA         "xxh3-128-data-blocks-64k"
#define CHECKSUM_HEX_LEN 32

static const char *const status_names[] = {
    [MANIFEST_IN_PROGRESS] = "in-progress",
    [MANIFEST_COMPLETE] = "complete",
    [MANIFEST_FAILED] = "failed",
    [MANIFEST_EXPORTED] = "exported",
};

static const char *const mode_names[] = {
    [MANIFEST_FULL] = "full",
    [MANIFEST_INCREMENTAL] = "incremental",
    [MANIFEST_DIFFERENTIAL] = "differential",
};

const char *manifest_mode_name(ManifestMode mode)
{
    return mode_names[mode];
}

static int lookup(const char *const *names, guint n, const char *text)
{
    for (guint i = 0; i < n; i++) {
        if (g_strcmp0(text, names[i]) == 0) {
            return i;
        }
    }
    return -1;
}

static void disk_free(ManifestDisk *d)
{
    g_free(d->disk);
    g_free(d->parent);
    g_free(d->since);
    g_free(d->checksum);
    g_free(d);
}

Manifest *manifest_ref(Manifest *m)
{
    g_ref_count_inc(&m->refs);
    return m;
}

void manifest_unref(Manifest *m)
{
    if (!m || !g_ref_count_dec(&m->refs)) {
        return;
    }
    g_free(m->id);
    if (m->created) {
        g_date_time_unref(m->created);
    }
    g_free(m->checkpoint);
    g_free(m->checkpoint_bitmap);
    if (m->disks) {
        g_ptr_array_unref(m->disks);
    }
    json_object_put(m->json);
    g_free(m);
}

const ManifestDisk *manifest_disk(const Manifest *m, const char *disk)
{
    for (guint i = 0; i < m->disks->len; i++) {
        const ManifestDisk *d = m->disks->pdata[i];

        if (strcmp(d->disk, disk) == 0) {
            return d;
        }
    }
    return NULL;
}

/* "qbk-NNNNNN-ID" or "qbk-NNNNNNp-ID": the bitmap of the checkpoint that
 * backup ID made (named after it); nothing else may be rolled back. */
static bool is_own_checkpoint(const char *bitmap, const char *id)
{
    const char *p = bitmap;

    if (!g_str_has_prefix(p, "qbk-")) {
        return false;
    }
    p += 4;
    for (int i = 0; i < 6; i++, p++) {
        if (!g_ascii_isdigit(*p)) {
            return false;
        }
    }
    if (*p == 'p') {
        p++;
    }
    return *p == '-' && strcmp(p + 1, id) == 0;
}

/* "qbk-since-ID-N": a temporary bitmap of backup ID. */
static bool is_own_since(const char *bitmap, const char *id)
{
    g_autofree char *prefix = g_strconcat("qbk-since-", id, "-", NULL);
    const char *p = bitmap + strlen(prefix);

    if (!g_str_has_prefix(bitmap, prefix) || !*p) {
        return false;
    }
    for (; *p; p++) {
        if (!g_ascii_isdigit(*p)) {
            return false;
        }
    }
    return true;
}

static bool is_checksum(const char *value)
{
    if (strlen(value) != CHECKSUM_HEX_LEN) {
        return false;
    }
    for (const char *p = value; *p; p++) {
        if (!g_ascii_isxdigit(*p) || g_ascii_isupper(*p)) {
            return false;
        }
    }
    return true;
}

/* A path the manifest shows must be the one the layout gives. */
static bool check_shown_path(json_object *e, const char *key,
                             const char *expected, const char *what,
                             GError **error)
{
    const char *shown;

    if (!jget_string(e, key, true, what, &shown, error)) {
        return false;
    }
    if (shown && strcmp(shown, expected) != 0) {
        g_autofree char *esc = g_strescape(shown, NULL);

        return repo_corrupt(error, "%s: \"%s\" is '%s', not '%s'", what, key,
                            esc, expected);
    }
    return true;
}

/* D's parent (PARENT, or NULL): a plain backup name, not ID itself, present
 * exactly when D is not full, never under a raw image. */
static bool check_parent(ManifestDisk *d, const char *parent, const char *id,
                         const char *mode, const char *what, GError **error)
{
    GError *local = NULL;

    if (parent && !repo_check_name("backup", parent, &local)) {
        repo_corrupt(error, "%s: parent: %s", what, local->message);
        g_error_free(local);
        return false;
    }
    if (parent && strcmp(parent, id) == 0) {
        repo_corrupt(error, "%s: the backup names itself as its parent", what);
        return false;
    }
    if ((d->mode == MANIFEST_FULL) != !parent ||
        (parent && d->format == REPO_RAW)) {
        repo_corrupt(error, "%s: a %s %s image %s a parent", what, mode,
                     repo_format_name(d->format), parent ? "with" : "without");
        return false;
    }
    d->parent = g_strdup(parent);
    return true;
}

/* D->checksum from SUM ({"algorithm", "value"}, or NULL). */
static bool parse_checksum(ManifestDisk *d, json_object *sum, const char *what,
                           GError **error)
{
    const char *alg, *value;

    if (!sum) {
        return true;
    }
    if (!jget_string(sum, "algorithm", false, what, &alg, error) ||
        !jget_string(sum, "value", false, what, &value, error)) {
        return false;
    }
    if ((strcmp(alg, SUM_BLOCKS) != 0 && strcmp(alg, SUM_DATA) != 0) ||
        !is_checksum(value)) {
        repo_corrupt(error, "%s: not a %s or %s checksum", what, SUM_DATA,
                     SUM_BLOCKS);
        return false;
    }
    d->sum_data = strcmp(alg, SUM_DATA) == 0;
    d->checksum = g_strdup(value);
    return true;
}

/* The fields of disk entry E of backup ID (its name already checked). */
static bool parse_disk_fields(ManifestDisk *d, json_object *e, const char *id,
                              bool complete, const char *what, GError **error)
{
    g_autofree char *image = NULL;
    g_autofree char *digests = NULL;
    const char *mode, *parent, *format, *since, *compression, *layout;
    json_object *sum;
    int i;

    if (!jget_uint(e, "size", what, &d->size, error) ||
        !jget_string(e, "mode", false, what, &mode, error) ||
        !jget_string(e, "parent", true, what, &parent, error) ||
        !jget_string(e, "format", true, what, &format, error) ||
        !jget_string(e, "compression", true, what, &compression, error) ||
        !jget_string(e, "digests_layout", true, what, &layout, error) ||
        !jget_bool(e, "checkpointed", what, &d->checkpointed, error) ||
        !jget_string(e, "since", true, what, &since, error) ||
        !jget_object(e, "checksum", !complete, what, &sum, error)) {
        return false;
    }
    if (d->size == 0) {
        repo_corrupt(error, "%s: \"size\" is 0", what);
        return false;
    }
    if ((i = lookup(mode_names, G_N_ELEMENTS(mode_names), mode)) < 0) {
        repo_corrupt(error, "%s: unknown \"mode\" '%s'", what, mode);
        return false;
    }
    d->mode = i;
    d->format = REPO_QCOW2; /* the first manifests had no "format" */
    if (format && !repo_format_parse(format, &d->format)) {
        repo_corrupt(error, "%s: unknown \"format\" '%s'", what, format);
        return false;
    }
    if (compression &&
        (strcmp(compression, "zstd") != 0 || d->format != REPO_QCOW2)) {
        repo_corrupt(error, "%s: unknown \"compression\" '%s' of a %s image",
                     what, compression, repo_format_name(d->format));
        return false;
    }
    d->compressed = compression != NULL;
    if (layout && strcmp(layout, "sparse") != 0) {
        repo_corrupt(error, "%s: unknown \"digests_layout\" '%s'", what,
                     layout);
        return false;
    }
    d->digests_sparse = layout != NULL;
    if (!check_parent(d, parent, id, mode, what, error)) {
        return false;
    }
    if (since && !is_own_since(since, id)) {
        repo_corrupt(error, "%s: \"since\" '%s' is not a bitmap of this backup",
                     what, since);
        return false;
    }
    d->since = g_strdup(since);
    image = repo_image_relpath(d->disk, id, d->format);
    digests = repo_digests_relpath(d->disk, id);
    return check_shown_path(e, "image", image, what, error) &&
           check_shown_path(e, "digests", digests, what, error) &&
           parse_checksum(d, sum, what, error);
}

static ManifestDisk *parse_disk(json_object *e, const char *id, bool complete,
                                const char *file, GError **error)
{
    g_autofree char *what = NULL;
    ManifestDisk *d;
    const char *name;
    GError *local = NULL;

    if (!json_object_is_type(e, json_type_object)) {
        repo_corrupt(error, "%s: a disk entry is not an object", file);
        return NULL;
    }
    if (!jget_string(e, "disk", false, file, &name, error)) {
        return NULL;
    }
    if (!repo_check_name("disk", name, &local)) {
        repo_corrupt(error, "%s: %s", file, local->message);
        g_error_free(local);
        return NULL;
    }
    d = g_new0(ManifestDisk, 1);
    d->disk = g_strdup(name);
    d->json = e;
    what = g_strdup_printf("%s, disk '%s'", file, name);
    if (!parse_disk_fields(d, e, id, complete, what, error)) {
        disk_free(d);
        return NULL;
    }
    return d;
}

Manifest *manifest_parse(const char *text, size_t len, const char *id,
                         bool partial, const char *what, GError **error)
{
    g_autoptr(Manifest) m = g_new0(Manifest, 1);
    const char *format, *mid, *status, *created, *checkpoint, *bitmap;
    json_object *disks;
    int i;

    g_ref_count_init(&m->refs);
    m->disks = g_ptr_array_new_with_free_func((GDestroyNotify)disk_free);
    m->json = jparse_object(text, len, what, error);
    if (!m->json ||
        !jget_string(m->json, "format", false, what, &format, error) ||
        !jget_string(m->json, "id", false, what, &mid, error) ||
        !jget_string(m->json, "status", false, what, &status, error) ||
        !jget_string(m->json, "created", false, what, &created, error) ||
        !jget_string(m->json, "checkpoint", true, what, &checkpoint, error) ||
        !jget_string(m->json, "checkpoint_bitmap", true, what, &bitmap,
                     error) ||
        !jget_array(m->json, "disks", false, what, &disks, error)) {
        return NULL;
    }
    if (strcmp(format, MANIFEST_FORMAT) != 0) {
        repo_corrupt(error, "%s: unknown format '%s'", what, format);
        return NULL;
    }
    if (strcmp(mid, id) != 0) {
        g_autofree char *esc = g_strescape(mid, NULL);

        repo_corrupt(error, "%s: it says it is backup '%s'", what, esc);
        return NULL;
    }
    m->id = g_strdup(id);
    if ((i = lookup(status_names, G_N_ELEMENTS(status_names), status)) < 0) {
        repo_corrupt(error, "%s: unknown status '%s'", what, status);
        return NULL;
    }
    m->status = i;
    if ((m->status == MANIFEST_COMPLETE) == partial) {
        repo_corrupt(error, "%s: status '%s' in a %s manifest", what, status,
                     partial ? "partial" : "complete");
        return NULL;
    }
    m->created = g_date_time_new_from_iso8601(created, NULL);
    if (!m->created) {
        repo_corrupt(error, "%s: \"created\" '%s' is not an ISO 8601 time",
                     what, created);
        return NULL;
    }
    if (bitmap && !is_own_checkpoint(bitmap, id)) {
        repo_corrupt(error,
                     "%s: \"checkpoint_bitmap\" '%s' is not this backup's",
                     what, bitmap);
        return NULL;
    }
    m->checkpoint = g_strdup(checkpoint);
    m->checkpoint_bitmap = g_strdup(bitmap);
    if (json_object_array_length(disks) == 0 && !partial) {
        repo_corrupt(error, "%s: a backup without disks", what);
        return NULL;
    }
    for (size_t k = 0; k < json_object_array_length(disks); k++) {
        ManifestDisk *d =
            parse_disk(json_object_array_get_idx(disks, k), id,
                       m->status == MANIFEST_COMPLETE, what, error);

        if (!d) {
            return NULL;
        }
        if (manifest_disk(m, d->disk)) {
            repo_corrupt(error, "%s: disk '%s' is there twice", what, d->disk);
            disk_free(d);
            return NULL;
        }
        g_ptr_array_add(m->disks, d);
    }
    return g_steal_pointer(&m);
}

/* ---- reading them from the repository ---- */

static Manifest *load_file(const Repo *r, const char *id, bool partial,
                           GError **error)
{
    g_autofree char *path =
        partial ? repo_partial_path(r, id) : repo_manifest_path(r, id);
    g_autofree char *what =
        g_strconcat("backups/", id, partial ? ".partial.json" : ".json", NULL);
    g_autofree char *text = NULL;
    size_t len;

    text = repo_read_text(path, &len, error);
    if (!text) {
        return NULL;
    }
    return manifest_parse(text, len, id, partial, what, error);
}

static gint compare_ids(gconstpointer a, gconstpointer b)
{
    const Manifest *x = *(Manifest *const *)a;
    const Manifest *y = *(Manifest *const *)b;

    return strcmp(x->id, y->id);
}

GPtrArray *repo_list(const Repo *r, bool partial, GPtrArray *skipped,
                     GError **error)
{
    g_autofree char *dir = g_build_filename(repo_root(r), "backups", NULL);
    GPtrArray *list =
        g_ptr_array_new_with_free_func((GDestroyNotify)manifest_unref);
    g_autoptr(GError) local = NULL;
    g_autoptr(GDir) d = g_dir_open(dir, 0, &local);
    const char *name;

    if (!d) {
        g_set_error(error, REPO_ERROR, REPO_ERROR_IO, "%s", local->message);
        g_ptr_array_unref(list);
        return NULL;
    }
    while ((name = g_dir_read_name(d))) {
        const char *suffix = partial ? ".partial.json" : ".json";
        g_autofree char *id = NULL;
        Manifest *m;

        if (!g_str_has_suffix(name, suffix) ||
            (!partial && g_str_has_suffix(name, ".partial.json"))) {
            continue; /* not a manifest of this kind (a .tmp, the other) */
        }
        id = g_strndup(name, strlen(name) - strlen(suffix));
        g_clear_error(&local);
        if (!repo_check_name("backup", id, &local) ||
            !(m = load_file(r, id, partial, &local))) {
            if (skipped) {
                /* parse errors name the file already */
                g_ptr_array_add(skipped,
                                g_str_has_prefix(local->message, "backups/")
                                    ? g_strdup(local->message)
                                    : g_strdup_printf("backups/%s: %s", name,
                                                      local->message));
            }
            continue;
        }
        g_ptr_array_add(list, m);
    }
    g_ptr_array_sort(list, compare_ids);
    return list;
}

Manifest *repo_load(const Repo *r, const char *id, GError **error)
{
    if (!id || strcmp(id, "latest") == 0) {
        g_autoptr(GPtrArray) all = repo_list(r, false, NULL, error);

        if (!all) {
            return NULL;
        }
        if (all->len == 0) {
            g_set_error(error, REPO_ERROR, REPO_ERROR_NOT_FOUND,
                        "repository '%s' has no complete backup", repo_root(r));
            return NULL;
        }
        return manifest_ref(all->pdata[all->len - 1]);
    }
    if (!repo_check_name("backup", id, error)) {
        return NULL;
    }
    return load_file(r, id, false, error);
}

Manifest *repo_load_partial(const Repo *r, const char *id, GError **error)
{
    if (!repo_check_name("backup", id, error)) {
        return NULL;
    }
    return load_file(r, id, true, error);
}
