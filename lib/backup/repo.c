/*
 * The backup repository on disk: directories, the lock, and manifests
 * written atomically. See backup.h for the layout.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include "internal.h"

/* G_DEFINE_QUARK stringifies the quark name as written. */
/* clang-format off */
G_DEFINE_QUARK(qbk-backup-error-quark, backup_error)
/* clang-format on */

#define REPO_FORMAT "qbk-repo-1"

char *repo_manifest_path(const char *repo, const char *id)
{
    g_autofree char *name = g_strconcat(id, ".json", NULL);

    return g_build_filename(repo, "backups", name, NULL);
}

char *repo_partial_path(const char *repo, const char *id)
{
    g_autofree char *name = g_strconcat(id, ".partial.json", NULL);

    return g_build_filename(repo, "backups", name, NULL);
}

char *repo_disk_file_name(const char *disk)
{
    char *name = g_strdup(disk);

    for (char *p = name; *p; p++) {
        if (!g_ascii_isalnum(*p) && *p != '-' && *p != '_' && *p != '.') {
            *p = '_';
        }
    }
    if (name[0] == '.') {
        name[0] = '_';
    }
    return name;
}

char *repo_disk_dir(const char *repo, const char *disk)
{
    g_autofree char *name = repo_disk_file_name(disk);

    return g_build_filename(repo, "disks", name, NULL);
}

bool repo_fsync_path(const char *path, GError **error)
{
    int fd = open(path, O_RDONLY | O_CLOEXEC);

    if (fd < 0 || fsync(fd) < 0) {
        int saved = errno;

        g_set_error(error, G_FILE_ERROR, g_file_error_from_errno(saved),
                    "cannot sync '%s': %s", path, g_strerror(saved));
        if (fd >= 0) {
            close(fd);
        }
        return false;
    }
    close(fd);
    return true;
}

bool repo_write_json(const char *path, json_object *obj, GError **error)
{
    g_autofree char *tmp = g_strconcat(path, ".tmp", NULL);
    g_autofree char *dir = g_path_get_dirname(path);
    const char *text = json_object_to_json_string_ext(
        obj, JSON_C_TO_STRING_PRETTY | JSON_C_TO_STRING_SPACED |
                 JSON_C_TO_STRING_NOSLASHESCAPE);
    size_t len = strlen(text);
    int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    const char *p = text;

    if (fd < 0) {
        goto fail;
    }
    while (len > 0) {
        ssize_t n = write(fd, p, len);

        if (n < 0 && errno == EINTR) {
            continue;
        }
        if (n <= 0) {
            goto fail;
        }
        p += n;
        len -= n;
    }
    if (write(fd, "\n", 1) != 1 || fsync(fd) < 0 || close(fd) < 0) {
        fd = -1;
        goto fail;
    }
    fd = -1;
    if (rename(tmp, path) < 0) {
        goto fail;
    }
    return repo_fsync_path(dir, error);

fail:
    g_set_error(error, G_FILE_ERROR, g_file_error_from_errno(errno),
                "cannot write '%s': %s", path, g_strerror(errno));
    if (fd >= 0) {
        close(fd);
    }
    unlink(tmp);
    return false;
}

json_object *repo_read_json(const char *path, GError **error)
{
    g_autofree char *text = NULL;
    g_autoptr(GError) local = NULL;
    json_object *obj;

    if (!g_file_get_contents(path, &text, NULL, &local)) {
        g_set_error(error, BACKUP_ERROR,
                    local->code == G_FILE_ERROR_NOENT ? BACKUP_ERROR_NOT_FOUND
                                                      : BACKUP_ERROR_CORRUPT,
                    "%s", local->message);
        return NULL;
    }
    obj = json_tokener_parse(text);
    if (!obj || !json_object_is_type(obj, json_type_object) ||
        !qmp_json_string(obj, "id") || !qmp_json_string(obj, "format")) {
        json_object_put(obj);
        g_set_error(error, BACKUP_ERROR, BACKUP_ERROR_CORRUPT,
                    "manifest '%s' is corrupt", path);
        return NULL;
    }
    return obj;
}

static bool make_dir(const char *path, GError **error)
{
    if (g_mkdir_with_parents(path, 0755) < 0) {
        g_set_error(error, G_FILE_ERROR, g_file_error_from_errno(errno),
                    "cannot create '%s': %s", path, g_strerror(errno));
        return false;
    }
    return true;
}

int repo_open_locked(const char *repo, GError **error)
{
    g_autofree char *backups = g_build_filename(repo, "backups", NULL);
    g_autofree char *disks = g_build_filename(repo, "disks", NULL);
    g_autofree char *marker = g_build_filename(repo, "qbk-repo.json", NULL);
    g_autofree char *lock = g_build_filename(repo, "lock", NULL);
    int fd;

    if (!make_dir(backups, error) || !make_dir(disks, error)) {
        return -1;
    }
    if (!g_file_test(marker, G_FILE_TEST_EXISTS)) {
        json_object *o = json_object_new_object();
        bool ok;

        json_object_object_add(o, "format",
                               json_object_new_string(REPO_FORMAT));
        ok = repo_write_json(marker, o, error);
        json_object_put(o);
        if (!ok) {
            return -1;
        }
    }
    fd = open(lock, O_RDWR | O_CREAT | O_CLOEXEC, 0644);
    if (fd < 0) {
        g_set_error(error, G_FILE_ERROR, g_file_error_from_errno(errno),
                    "cannot open '%s': %s", lock, g_strerror(errno));
        return -1;
    }
    if (flock(fd, LOCK_EX | LOCK_NB) < 0) {
        g_set_error(error, BACKUP_ERROR, BACKUP_ERROR_LOCKED,
                    "another qbk-pull is working on repository '%s'", repo);
        close(fd);
        return -1;
    }
    return fd;
}

static gint compare_ids(gconstpointer a, gconstpointer b)
{
    json_object *x = *(json_object *const *)a;
    json_object *y = *(json_object *const *)b;

    return g_strcmp0(qmp_json_string(x, "id"), qmp_json_string(y, "id"));
}

static GPtrArray *list_manifests(const char *repo, bool partial, GError **error)
{
    g_autofree char *dir = g_build_filename(repo, "backups", NULL);
    GPtrArray *list = g_ptr_array_new_with_free_func(qmp_json_free);
    g_autoptr(GDir) d = g_dir_open(dir, 0, NULL);
    const char *name;

    if (!d) {
        return list; /* no backups yet */
    }
    while ((name = g_dir_read_name(d))) {
        bool is_partial = g_str_has_suffix(name, ".partial.json");
        g_autofree char *path = NULL;
        json_object *m;

        if (!g_str_has_suffix(name, ".json") || is_partial != partial) {
            continue;
        }
        path = g_build_filename(dir, name, NULL);
        m = repo_read_json(path, error);
        if (!m) {
            g_ptr_array_unref(list);
            return NULL;
        }
        g_ptr_array_add(list, m);
    }
    g_ptr_array_sort(list, compare_ids);
    return list;
}

GPtrArray *backup_list(const char *repo, GError **error)
{
    return list_manifests(repo, false, error);
}

GPtrArray *repo_list_partial(const char *repo, GError **error)
{
    return list_manifests(repo, true, error);
}

json_object *backup_load(const char *repo, const char *id, GError **error)
{
    g_autofree char *path = NULL;

    if (g_strcmp0(id, "latest") == 0 || !id) {
        g_autoptr(GPtrArray) all = backup_list(repo, error);

        if (!all) {
            return NULL;
        }
        if (all->len == 0) {
            g_set_error(error, BACKUP_ERROR, BACKUP_ERROR_NOT_FOUND,
                        "repository '%s' has no complete backup", repo);
            return NULL;
        }
        return json_object_get(all->pdata[all->len - 1]);
    }
    path = repo_manifest_path(repo, id);
    return repo_read_json(path, error);
}

json_object *manifest_disk(json_object *manifest, const char *disk)
{
    json_object *disks;

    if (!json_object_object_get_ex(manifest, "disks", &disks)) {
        return NULL;
    }
    for (size_t i = 0; i < json_object_array_length(disks); i++) {
        json_object *d = json_object_array_get_idx(disks, i);

        if (g_strcmp0(qmp_json_string(d, "disk"), disk) == 0) {
            return d;
        }
    }
    return NULL;
}

int backup_lock(const char *repo, GError **error)
{
    g_autofree char *marker = g_build_filename(repo, "qbk-repo.json", NULL);

    if (!g_file_test(marker, G_FILE_TEST_EXISTS)) {
        g_set_error(error, BACKUP_ERROR, BACKUP_ERROR_NOT_FOUND,
                    "'%s' is not a qbk repository", repo);
        return -1;
    }
    return repo_open_locked(repo, error);
}

bool repo_disk_chain(const char *repo, const char *id, const char *disk,
                     GPtrArray *ids, GPtrArray *manifests, GError **error)
{
    g_autofree char *cur = g_strdup(id);

    while (cur) {
        json_object *m = backup_load(repo, cur, error);
        json_object *e = m ? manifest_disk(m, disk) : NULL;

        if (!e) {
            if (m) {
                g_set_error(error, BACKUP_ERROR, BACKUP_ERROR_NOT_FOUND,
                            "backup '%s' has no disk '%s'", cur, disk);
                json_object_put(m);
            }
            return false;
        }
        g_ptr_array_add(ids, g_strdup(qmp_json_string(m, "id")));
        g_ptr_array_add(manifests, m);
        g_free(cur);
        cur = g_strdup(qmp_json_string(e, "parent"));
    }
    return true;
}
