/*
 * A disk's chain of backups, from one backup down to its full backup: as
 * the manifests describe it (bounded, no cycles), as the images say it is
 * (their headers must name exactly their parents), and as QEMU is told to
 * open it (every link named explicitly, so no name inside an image is
 * ever followed).
 */
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "internal.h"

/*
 * A merge that was decided (its journal written) and whose new image is in
 * place, but whose manifest change may not be done yet (qbk-merge was
 * killed): the journal says what the merged link is now. NULL if none.
 */
static MergeJournal *pending_merge(const Repo *r, const char *disk)
{
    MergeJournal *j = repo_read_journal(r, NULL);
    g_autofree char *tmp = NULL;

    if (!j || strcmp(j->disk, disk) != 0) {
        merge_journal_free(j);
        return NULL;
    }
    tmp = repo_merging_path(r, j->disk, j->to, j->format);
    if (g_file_test(tmp, G_FILE_TEST_EXISTS)) {
        merge_journal_free(j); /* not swapped in yet: the manifests hold */
        return NULL;
    }
    return j;
}

/* What link M of DISK is once pending merge J is applied (J may be NULL).
 * M was loaded for this chain alone, so it is ours to change. */
static void apply_merge(const MergeJournal *j, Manifest *m, const char *disk)
{
    ManifestDisk *e = (ManifestDisk *)manifest_disk(m, disk);

    if (!j || !e || strcmp(m->id, j->to) != 0) {
        return;
    }
    g_free(e->parent);
    e->parent = g_strdup(j->parent);
    e->format = j->format;
    if (!j->parent) {
        e->mode = MANIFEST_FULL;
    }
}

GPtrArray *repo_chain(const Repo *r, const char *id, const char *disk,
                      GError **error)
{
    g_autoptr(MergeJournal) pending = pending_merge(r, disk);
    g_autoptr(GPtrArray) chain =
        g_ptr_array_new_with_free_func((GDestroyNotify)manifest_unref);
    g_autoptr(GHashTable) seen = g_hash_table_new(g_str_hash, g_str_equal);
    g_autoptr(Manifest) top = repo_load(r, id, error);
    const ManifestDisk *e = top ? manifest_disk(top, disk) : NULL;

    if (!top) {
        return NULL;
    }
    if (!e) {
        g_set_error(error, REPO_ERROR, REPO_ERROR_NOT_FOUND,
                    "backup '%s' has no disk '%s'", top->id, disk);
        return NULL;
    }
    apply_merge(pending, top, disk);
    g_ptr_array_add(chain, manifest_ref(top));
    g_hash_table_add(seen, top->id);
    while (e->parent) {
        g_autoptr(GError) local = NULL;
        const char *parent = e->parent;
        guint64 size = e->size;
        Manifest *m;

        if (g_hash_table_contains(seen, parent) ||
            chain->len >= REPO_CHAIN_MAX) {
            g_set_error(error, REPO_ERROR, REPO_ERROR_CORRUPT,
                        "the chain of backup '%s' for disk '%s' %s at '%s'",
                        top->id, disk,
                        chain->len >= REPO_CHAIN_MAX ? "is too long" : "loops",
                        parent);
            return NULL;
        }
        m = repo_load(r, parent, &local);
        if (m) {
            apply_merge(pending, m, disk);
        }
        e = m ? manifest_disk(m, disk) : NULL;
        if (!e) {
            g_set_error(error, REPO_ERROR, REPO_ERROR_CORRUPT,
                        "the chain of backup '%s' is broken: its ancestor "
                        "'%s' %s",
                        top->id, parent,
                        m ? "lacks the disk" : "is missing or unreadable");
            manifest_unref(m);
            return NULL;
        }
        g_ptr_array_add(chain, m);
        g_hash_table_add(seen, m->id);
        if (e->size != size) {
            g_set_error(error, REPO_ERROR, REPO_ERROR_CORRUPT,
                        "the chain of backup '%s' is broken: disk '%s' has "
                        "another size in '%s'",
                        top->id, disk, m->id);
            return NULL;
        }
    }
    return g_steal_pointer(&chain);
}

/* The disk of link I of CHAIN. */
static const ManifestDisk *link_disk(GPtrArray *chain, guint i,
                                     const char *disk)
{
    return manifest_disk(chain->pdata[i], disk);
}

/* The backing file link I of CHAIN must name: its parent's image (or, in
 * the middle of PENDING's merge, the parent's old image if HAVE names it). */
static char *wanted_backing(GPtrArray *chain, guint i, const char *disk,
                            const MergeJournal *pending, const char *have)
{
    const ManifestDisk *e = link_disk(chain, i, disk);
    g_autofree char *old = NULL;

    if (!e->parent) {
        return NULL;
    }
    if (pending && strcmp(e->parent, pending->to) == 0 &&
        pending->old_format != pending->format) {
        /* a merge changed its parent's format and did not get to point
         * this image at the new file yet: the old one still names the same
         * content (and the chain is opened explicitly anyway) */
        old = repo_image_name(e->parent, pending->old_format);
        if (g_strcmp0(have, old) == 0) {
            return g_steal_pointer(&old);
        }
    }
    return repo_image_name(e->parent, link_disk(chain, i + 1, disk)->format);
}

/* qcow2 header H of IMAGE against disk entry E and the backing file WANT. */
static bool check_header(const Qcow2Header *h, const char *image,
                         const ManifestDisk *e, const char *want,
                         GError **error)
{
    g_autofree char *dot_format =
        h->backing_format ? g_strconcat(".", h->backing_format, NULL) : NULL;

    if (g_strcmp0(h->backing, want) != 0) {
        g_autofree char *have =
            h->backing ? g_strescape(h->backing, NULL) : NULL;

        g_set_error(error, REPO_ERROR, REPO_ERROR_CORRUPT,
                    "image '%s' names backing file '%s' where the manifest "
                    "says '%s'",
                    image, have ? have : "", want ? want : "");
        return false;
    }
    if (want && dot_format && !g_str_has_suffix(want, dot_format)) {
        g_set_error(error, REPO_ERROR, REPO_ERROR_CORRUPT,
                    "image '%s' names backing format '%s' for '%s'", image,
                    h->backing_format, want);
        return false;
    }
    if (h->data_file) {
        g_set_error(error, REPO_ERROR, REPO_ERROR_CORRUPT,
                    "image '%s' has an external data file: not a qbk image",
                    image);
        return false;
    }
    if (h->size != e->size) {
        g_set_error(error, REPO_ERROR, REPO_ERROR_CORRUPT,
                    "image '%s' is of %" G_GUINT64_FORMAT
                    " bytes, the disk %" G_GUINT64_FORMAT,
                    image, h->size, e->size);
        return false;
    }
    return true;
}

static bool check_link(const Repo *r, GPtrArray *chain, guint i,
                       const char *disk, const MergeJournal *pending,
                       GError **error)
{
    const Manifest *m = chain->pdata[i];
    const ManifestDisk *e = link_disk(chain, i, disk);
    g_autofree char *image = repo_image_path(r, disk, m->id, e->format);
    g_autofree char *want = NULL;
    const char *top = ((Manifest *)chain->pdata[0])->id;
    g_autoptr(GError) local = NULL;
    Qcow2Header h;
    struct stat st = { 0 };
    int fd = repo_open_file(image, &local);
    bool ok;

    if (fd < 0) {
        bool missing = g_error_matches(local, REPO_ERROR, REPO_ERROR_NOT_FOUND);

        g_set_error(error, REPO_ERROR, REPO_ERROR_CORRUPT,
                    missing ? "the chain of backup '%s' is broken: image '%s' "
                              "is missing"
                            : "the chain of backup '%s' is broken: %s",
                    top, missing ? image : local->message);
        return false;
    }
    if (e->format == REPO_RAW) {
        ok = fstat(fd, &st) == 0 && (guint64)st.st_size == e->size;
        close(fd);
        if (!ok) {
            g_set_error(error, REPO_ERROR, REPO_ERROR_CORRUPT,
                        "image '%s' has %lld bytes, the disk %" G_GUINT64_FORMAT
                        ": truncated or replaced",
                        image, (long long)st.st_size, e->size);
        }
        return ok;
    }
    ok = qcow2_header_read(fd, &h, &local);
    close(fd);
    if (!ok) {
        g_set_error(error, REPO_ERROR, REPO_ERROR_CORRUPT,
                    "image '%s' is damaged: %s", image, local->message);
        return false;
    }
    want = wanted_backing(chain, i, disk, pending, h.backing);
    ok = check_header(&h, image, e, want, error);
    qcow2_header_clear(&h);
    return ok;
}

bool repo_check_chain(const Repo *r, GPtrArray *chain, const char *disk,
                      GError **error)
{
    g_autoptr(MergeJournal) pending = pending_merge(r, disk);

    for (guint i = 0; i < chain->len; i++) {
        if (!check_link(r, chain, i, disk, pending, error)) {
            return false;
        }
    }
    return true;
}

/* Block options that open FILE with DRIVER. */
static json_object *image_options(const char *driver, const char *filename)
{
    json_object *node = json_object_new_object();
    json_object *file = json_object_new_object();

    json_object_object_add(file, "driver", json_object_new_string("file"));
    json_object_object_add(file, "filename", json_object_new_string(filename));
    json_object_object_add(node, "driver", json_object_new_string(driver));
    json_object_object_add(node, "file", file);
    return node;
}

/* With the repository's key, a qcow2 NODE is opened with it. */
static void add_key(const Repo *r, json_object *node)
{
    if (repo_key_file(r)) {
        json_object *encrypt = json_object_new_object();

        json_object_object_add(encrypt, "format",
                               json_object_new_string("luks"));
        json_object_object_add(encrypt, "key-secret",
                               json_object_new_string(REPO_KEY_SECRET));
        json_object_object_add(node, "encrypt", encrypt);
    }
}

/* Block options that open links I.. of CHAIN: each link's file and driver
 * and, for qcow2, its backing given explicitly (null under the full). */
static json_object *link_options(const Repo *r, GPtrArray *chain, guint i,
                                 const char *disk)
{
    const Manifest *m = chain->pdata[i];
    const ManifestDisk *e = link_disk(chain, i, disk);
    g_autofree char *image = repo_image_path(r, disk, m->id, e->format);
    json_object *node = image_options(repo_format_name(e->format), image);

    if (e->format == REPO_QCOW2) {
        add_key(r, node);
        json_object_object_add(
            node, "backing",
            i + 1 < chain->len ? link_options(r, chain, i + 1, disk) : NULL);
    }
    return node;
}

/* "json:" and O's text (O taken). */
static char *json_filename(json_object *o)
{
    char *name = g_strconcat(
        "json:",
        json_object_to_json_string_ext(o, JSON_C_TO_STRING_PLAIN |
                                              JSON_C_TO_STRING_NOSLASHESCAPE),
        NULL);

    json_object_put(o);
    return name;
}

char *repo_qcow2_filename(const Repo *r, const char *image)
{
    json_object *o = image_options("qcow2", image);

    add_key(r, o);
    return json_filename(o);
}

char *repo_chain_filename(const Repo *r, GPtrArray *chain, guint from,
                          const char *disk, const char *top)
{
    json_object *below =
        from < chain->len ? link_options(r, chain, from, disk) : NULL;
    json_object *o = below;

    if (top) {
        o = image_options("qcow2", top);
        add_key(r, o);
        json_object_object_add(o, "backing", below);
    }
    g_assert(o);
    return json_filename(o);
}
