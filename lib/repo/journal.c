/*
 * The merge journal: what a decided merge still has to do, as names only.
 * Every path follows from them and the layout, so a damaged or hostile
 * journal can at worst name backups of this repository.
 */
#include <errno.h>
#include <string.h>
#include <unistd.h>

#include "internal.h"

#define JOURNAL_FORMAT "qbk-merge-journal-1"

MergeJournal *merge_journal_new(void)
{
    MergeJournal *j = g_new0(MergeJournal, 1);

    j->drop = g_ptr_array_new_with_free_func(g_free);
    return j;
}

void merge_journal_free(MergeJournal *j)
{
    if (!j) {
        return;
    }
    g_free(j->disk);
    g_free(j->to);
    g_free(j->parent);
    g_ptr_array_unref(j->drop);
    g_free(j);
}

static bool check(const char *kind, const char *name, GError **error)
{
    g_autoptr(GError) local = NULL;

    if (!repo_check_name(kind, name, &local)) {
        return repo_corrupt(error, "merge journal: %s", local->message);
    }
    return true;
}

/* A journal of the first qbk-merge named files; only their format counts
 * (the old image's name ends in its format). */
static bool old_format(json_object *o, MergeJournal *j, GError **error)
{
    const char *old;

    j->old_format = j->format;
    if (!jget_string(o, "old_image", true, "merge journal", &old, error)) {
        return false;
    }
    if (old) {
        j->old_format = j->format == REPO_RAW ? REPO_QCOW2 : REPO_RAW;
        if (!g_str_has_suffix(old, repo_format_name(j->old_format))) {
            return repo_corrupt(error, "merge journal: odd \"old_image\"");
        }
    }
    return true;
}

MergeJournal *merge_journal_parse(const char *text, size_t len, GError **error)
{
    const char *what = "merge journal";
    g_autoptr(MergeJournal) j = merge_journal_new();
    json_object *o = jparse_object(text, len, what, error);
    const char *marker, *disk, *to, *parent, *format, *old;
    const char *layout = NULL;
    json_object *drop;
    bool ok = o != NULL;

    ok = ok && jget_string(o, "journal", true, what, &marker, error) &&
         jget_string(o, "disk", false, what, &disk, error) &&
         jget_string(o, "to", false, what, &to, error) &&
         jget_string(o, "parent", true, what, &parent, error) &&
         jget_string(o, "format", false, what, &format, error) &&
         jget_string(o, "digests_layout", true, what, &layout, error) &&
         jget_array(o, "drop", false, what, &drop, error);
    ok = ok && check("disk", disk, error) && check("backup", to, error) &&
         (!parent || check("backup", parent, error));
    if (ok && (!repo_format_parse(format, &j->format) ||
               (marker && strcmp(marker, JOURNAL_FORMAT) != 0))) {
        ok = repo_corrupt(error, "merge journal: unknown format");
    }
    if (ok && layout && strcmp(layout, "sparse") != 0) {
        ok = repo_corrupt(error, "merge journal: unknown \"digests_layout\"");
    }
    j->digests_sparse = layout != NULL;
    if (ok && marker) {
        ok = jget_string(o, "old_format", false, what, &old, error);
        if (ok && !repo_format_parse(old, &j->old_format)) {
            ok = repo_corrupt(error, "merge journal: unknown \"old_format\"");
        }
    } else if (ok) {
        ok = old_format(o, j, error);
    }
    for (size_t i = 0; ok && i < json_object_array_length(drop); i++) {
        json_object *id = json_object_array_get_idx(drop, i);

        if (!json_object_is_type(id, json_type_string)) {
            ok = repo_corrupt(error,
                              "merge journal: \"drop\" holds a non-string");
            break;
        }
        ok = check("backup", json_object_get_string(id), error);
        if (ok && (strcmp(json_object_get_string(id), to) == 0 ||
                   g_strcmp0(json_object_get_string(id), parent) == 0)) {
            ok = repo_corrupt(error, "merge journal: it would drop '%s'",
                              json_object_get_string(id));
        }
        if (ok) {
            g_ptr_array_add(j->drop, g_strdup(json_object_get_string(id)));
        }
    }
    if (ok && parent && strcmp(parent, to) == 0) {
        ok = repo_corrupt(error, "merge journal: '%s' would stand on itself",
                          to);
    }
    if (ok) {
        j->disk = g_strdup(disk);
        j->to = g_strdup(to);
        j->parent = g_strdup(parent);
    }
    json_object_put(o);
    return ok ? g_steal_pointer(&j) : NULL;
}

MergeJournal *repo_read_journal(const Repo *r, GError **error)
{
    g_autofree char *path = repo_journal_path(r);
    g_autofree char *text = NULL;
    g_autoptr(GError) local = NULL;
    MergeJournal *j;
    size_t len;

    text = repo_read_text(path, &len, &local);
    if (!text) {
        if (!g_error_matches(local, REPO_ERROR, REPO_ERROR_NOT_FOUND)) {
            g_propagate_error(error, g_steal_pointer(&local));
        }
        return NULL;
    }
    j = merge_journal_parse(text, len, error);
    if (!j) {
        g_prefix_error(error, "%s: ", path);
    }
    return j;
}

bool repo_write_journal(const Repo *r, const MergeJournal *j, GError **error)
{
    g_autofree char *path = repo_journal_path(r);
    json_object *o = json_object_new_object();
    json_object *drop = json_object_new_array();
    bool ok;

    for (guint i = 0; i < j->drop->len; i++) {
        json_object_array_add(drop, json_object_new_string(j->drop->pdata[i]));
    }
    json_object_object_add(o, "journal",
                           json_object_new_string(JOURNAL_FORMAT));
    json_object_object_add(o, "disk", json_object_new_string(j->disk));
    json_object_object_add(o, "to", json_object_new_string(j->to));
    json_object_object_add(
        o, "parent", j->parent ? json_object_new_string(j->parent) : NULL);
    json_object_object_add(o, "format",
                           json_object_new_string(repo_format_name(j->format)));
    json_object_object_add(
        o, "old_format",
        json_object_new_string(repo_format_name(j->old_format)));
    if (j->digests_sparse) {
        json_object_object_add(o, "digests_layout",
                               json_object_new_string("sparse"));
    }
    json_object_object_add(o, "drop", drop);
    ok = repo_write_json(path, o, error);
    json_object_put(o);
    return ok;
}

bool repo_remove_journal(const Repo *r, GError **error)
{
    g_autofree char *path = repo_journal_path(r);

    if (unlink(path) < 0 && errno != ENOENT) {
        g_set_error(error, REPO_ERROR, REPO_ERROR_IO, "cannot remove '%s': %s",
                    path, g_strerror(errno));
        return false;
    }
    return repo_fsync_path(repo_root(r), error);
}
