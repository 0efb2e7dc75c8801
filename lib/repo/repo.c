/*
 * The repository's skeleton: opening (and making) it owner-only, its
 * lock, every path in it, and files created and written so that nothing
 * planted there (a symbolic link, a stale file) redirects a write.
 */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include "internal.h"

#define MARKER      "qbk-repo.json"
#define REPO_FORMAT "qbk-repo-1"
#define SCRATCH     ".scratch"
#define JOURNAL     "merge-journal.json"

static const char *const format_names[] = {
    [REPO_QCOW2] = "qcow2",
    [REPO_RAW] = "raw",
};

const char *repo_format_name(RepoFormat format)
{
    return format_names[format];
}

bool repo_format_parse(const char *text, RepoFormat *format)
{
    for (guint i = 0; i < G_N_ELEMENTS(format_names); i++) {
        if (g_strcmp0(text, format_names[i]) == 0) {
            *format = i;
            return true;
        }
    }
    return false;
}

G_GNUC_PRINTF(3, 4)
static bool fail_errno(GError **error, int code, const char *fmt, ...)
{
    int saved = errno;
    g_autofree char *what = NULL;
    va_list ap;

    va_start(ap, fmt);
    what = g_strdup_vprintf(fmt, ap);
    va_end(ap);
    g_set_error(error, REPO_ERROR, code, "%s: %s", what, g_strerror(saved));
    return false;
}

/* PATH must be a real directory (not a link); MAKE: create it if absent. */
static bool check_dir(const char *path, bool make, GError **error)
{
    struct stat st;

    if (lstat(path, &st) < 0) {
        if (errno != ENOENT || !make) {
            return fail_errno(
                error, errno == ENOENT ? REPO_ERROR_NOT_FOUND : REPO_ERROR_IO,
                "cannot open '%s'", path);
        }
        if (mkdir(path, 0700) < 0 && errno != EEXIST) {
            return fail_errno(error, REPO_ERROR_IO, "cannot create '%s'", path);
        }
        return check_dir(path, false, error);
    }
    if (!S_ISDIR(st.st_mode)) {
        g_set_error(error, REPO_ERROR, REPO_ERROR_CORRUPT,
                    "'%s' is %s, not a directory: refusing to use it", path,
                    S_ISLNK(st.st_mode) ? "a symbolic link" : "a file");
        return false;
    }
    return true;
}

/* Every entry of disks/ must be a real directory. */
static bool check_disk_dirs(const char *disks, GError **error)
{
    g_autoptr(GDir) d = g_dir_open(disks, 0, NULL);
    const char *name;

    while (d && (name = g_dir_read_name(d))) {
        g_autofree char *path = g_build_filename(disks, name, NULL);

        if (!check_dir(path, false, error)) {
            return false;
        }
    }
    return true;
}

static bool write_marker(const char *marker, GError **error)
{
    json_object *o = json_object_new_object();
    bool ok;

    json_object_object_add(o, "format", json_object_new_string(REPO_FORMAT));
    ok = repo_write_json(marker, o, error);
    json_object_put(o);
    return ok;
}

static bool take_lock(Repo *r, GError **error)
{
    g_autofree char *lock = g_build_filename(r->root, "lock", NULL);

    r->lock_fd = open(lock, O_RDWR | O_CREAT | O_NOFOLLOW | O_CLOEXEC, 0600);
    if (r->lock_fd < 0) {
        return fail_errno(error, REPO_ERROR_IO, "cannot open '%s'", lock);
    }
    if (flock(r->lock_fd, LOCK_EX | LOCK_NB) < 0) {
        g_set_error(error, REPO_ERROR, REPO_ERROR_LOCKED,
                    "another qbk-pull or qbk-merge is working on "
                    "repository '%s'",
                    r->root);
        return false;
    }
    return true;
}

Repo *repo_open(const char *path, RepoOpenFlags flags, GError **error)
{
    g_autoptr(Repo) r = g_new0(Repo, 1);
    bool create = flags & REPO_OPEN_CREATE;
    g_autofree char *marker = NULL;
    g_autofree char *backups = NULL;
    g_autofree char *disks = NULL;
    g_autofree char *scratch = NULL;
    struct stat st;

    r->lock_fd = -1;
    if (!path || !*path) {
        g_set_error(error, REPO_ERROR, REPO_ERROR_INVALID,
                    "the repository path is empty");
        return NULL;
    }
    r->root = g_canonicalize_filename(path, NULL);
    marker = g_build_filename(r->root, MARKER, NULL);
    backups = g_build_filename(r->root, "backups", NULL);
    disks = g_build_filename(r->root, "disks", NULL);
    scratch = g_build_filename(r->root, SCRATCH, NULL);

    if (create && g_mkdir_with_parents(r->root, 0700) < 0) {
        fail_errno(error, REPO_ERROR_IO, "cannot create '%s'", r->root);
        return NULL;
    }
    /* The root itself may be a link the user made; what is inside may not. */
    if (stat(r->root, &st) < 0 || !S_ISDIR(st.st_mode)) {
        g_set_error(error, REPO_ERROR, REPO_ERROR_NOT_FOUND,
                    "'%s' is not a qbk repository", r->root);
        return NULL;
    }
    if (lstat(marker, &st) < 0 && !create) {
        g_set_error(error, REPO_ERROR, REPO_ERROR_NOT_FOUND,
                    "'%s' is not a qbk repository", r->root);
        return NULL;
    }
    if (create) {
        /* backups hold whole disks: owner-only, even a repository made by
         * an older qbk or under a lax umask */
        struct stat rs;

        if (stat(r->root, &rs) == 0 && rs.st_uid == geteuid() &&
            (rs.st_mode & 077) && chmod(r->root, 0700) < 0) {
            fail_errno(error, REPO_ERROR_IO, "cannot make '%s' owner-only",
                       r->root);
            return NULL;
        }
    }
    if (!check_dir(backups, create, error) ||
        !check_dir(disks, create, error) || !check_disk_dirs(disks, error)) {
        return NULL;
    }
    if ((lstat(scratch, &st) == 0 || create) &&
        !check_dir(scratch, create, error)) {
        return NULL;
    }
    if (lstat(marker, &st) < 0) {
        if (!write_marker(marker, error)) {
            return NULL;
        }
    } else if (!S_ISREG(st.st_mode)) {
        g_set_error(error, REPO_ERROR, REPO_ERROR_CORRUPT,
                    "'%s' is not a regular file: refusing to use it", marker);
        return NULL;
    }
    if ((flags & REPO_OPEN_LOCK) && !take_lock(r, error)) {
        return NULL;
    }
    return g_steal_pointer(&r);
}

void repo_free(Repo *r)
{
    if (!r) {
        return;
    }
    if (r->lock_fd >= 0) {
        close(r->lock_fd);
    }
    g_free(r->root);
    g_free(r->key_file);
    g_free(r);
}

const char *repo_root(const Repo *r)
{
    return r->root;
}

/* ---- paths ---- */

static void assert_name(const char *kind, const char *name)
{
    g_assert(repo_check_name(kind, name, NULL));
}

char *repo_manifest_path(const Repo *r, const char *id)
{
    g_autofree char *name = g_strconcat(id, ".json", NULL);

    assert_name("backup", id);
    return g_build_filename(r->root, "backups", name, NULL);
}

char *repo_partial_path(const Repo *r, const char *id)
{
    g_autofree char *name = g_strconcat(id, ".partial.json", NULL);

    assert_name("backup", id);
    return g_build_filename(r->root, "backups", name, NULL);
}

char *repo_journal_path(const Repo *r)
{
    return g_build_filename(r->root, JOURNAL, NULL);
}

char *repo_disk_dir(const Repo *r, const char *disk)
{
    assert_name("disk", disk);
    return g_build_filename(r->root, "disks", disk, NULL);
}

char *repo_image_name(const char *id, RepoFormat format)
{
    assert_name("backup", id);
    return g_strconcat(id, ".", repo_format_name(format), NULL);
}

char *repo_image_relpath(const char *disk, const char *id, RepoFormat format)
{
    g_autofree char *name = repo_image_name(id, format);

    assert_name("disk", disk);
    return g_strconcat("disks/", disk, "/", name, NULL);
}

char *repo_digests_relpath(const char *disk, const char *id)
{
    assert_name("disk", disk);
    assert_name("backup", id);
    return g_strconcat("disks/", disk, "/", id, ".digests", NULL);
}

char *repo_image_path(const Repo *r, const char *disk, const char *id,
                      RepoFormat format)
{
    g_autofree char *rel = repo_image_relpath(disk, id, format);

    return g_build_filename(r->root, rel, NULL);
}

char *repo_digests_path(const Repo *r, const char *disk, const char *id)
{
    g_autofree char *rel = repo_digests_relpath(disk, id);

    return g_build_filename(r->root, rel, NULL);
}

void repo_remove_disk_files(const Repo *r, const char *disk, const char *id,
                            RepoFormat format)
{
    g_autofree char *image = repo_image_path(r, disk, id, format);
    g_autofree char *digests = repo_digests_path(r, disk, id);

    unlink(image);
    unlink(digests);
}

char *repo_merging_path(const Repo *r, const char *disk, const char *id,
                        RepoFormat format)
{
    g_autofree char *dir = repo_disk_dir(r, disk);
    g_autofree char *name =
        g_strconcat(id, ".merging.", repo_format_name(format), NULL);

    assert_name("backup", id);
    return g_build_filename(dir, name, NULL);
}

char *repo_merging_digests_path(const Repo *r, const char *disk, const char *id)
{
    g_autofree char *dir = repo_disk_dir(r, disk);
    g_autofree char *name = g_strconcat(id, ".merging.digests", NULL);

    assert_name("backup", id);
    return g_build_filename(dir, name, NULL);
}

char *repo_default_scratch_dir(const Repo *r)
{
    return g_build_filename(r->root, SCRATCH, NULL);
}

bool repo_make_disk_dir(const Repo *r, const char *disk, GError **error)
{
    g_autofree char *dir = repo_disk_dir(r, disk);

    return check_dir(dir, true, error);
}

/* ---- files ---- */

int repo_open_file(const char *path, GError **error)
{
    int fd = open(path, O_RDONLY | O_NOFOLLOW | O_CLOEXEC);
    struct stat st;

    if (fd < 0) {
        if (errno == ELOOP) {
            g_set_error(error, REPO_ERROR, REPO_ERROR_CORRUPT,
                        "'%s' is a symbolic link: refusing to follow it", path);
            return -1;
        }
        fail_errno(error,
                   errno == ENOENT ? REPO_ERROR_NOT_FOUND : REPO_ERROR_IO,
                   "cannot open '%s'", path);
        return -1;
    }
    if (fstat(fd, &st) < 0 || !S_ISREG(st.st_mode)) {
        g_set_error(error, REPO_ERROR, REPO_ERROR_CORRUPT,
                    "'%s' is not a regular file", path);
        close(fd);
        return -1;
    }
    return fd;
}

int repo_create_file(const char *path, GError **error)
{
    int fd;

    /* unlink removes a link itself, never what it points to */
    if (unlink(path) < 0 && errno != ENOENT) {
        fail_errno(error, REPO_ERROR_IO, "cannot replace '%s'", path);
        return -1;
    }
    fd = open(path, O_RDWR | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0600);
    if (fd < 0) {
        fail_errno(error, REPO_ERROR_IO, "cannot create '%s'", path);
    }
    return fd;
}

bool repo_fsync_path(const char *path, GError **error)
{
    int fd = open(path, O_RDONLY | O_CLOEXEC);

    if (fd < 0 || fsync(fd) < 0) {
        fail_errno(error, REPO_ERROR_IO, "cannot sync '%s'", path);
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
    const char *p = text;
    int fd = repo_create_file(tmp, error);

    if (fd < 0) {
        return false;
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
    if (write(fd, "\n", 1) != 1 || fsync(fd) < 0) {
        goto fail;
    }
    if (close(fd) < 0) {
        fd = -1;
        goto fail;
    }
    fd = -1;
    if (rename(tmp, path) < 0) {
        goto fail;
    }
    return repo_fsync_path(dir, error);

fail:
    fail_errno(error, REPO_ERROR_IO, "cannot write '%s'", path);
    if (fd >= 0) {
        close(fd);
    }
    unlink(tmp);
    return false;
}

char *repo_read_text(const char *path, size_t *len, GError **error)
{
    int fd = repo_open_file(path, error);
    struct stat st;
    char *text;
    size_t got = 0;

    if (fd < 0) {
        return NULL;
    }
    if (fstat(fd, &st) < 0 || st.st_size > MAX_JSON_SIZE) {
        g_set_error(error, REPO_ERROR, REPO_ERROR_CORRUPT,
                    "'%s' is larger than %d MiB", path, MAX_JSON_SIZE >> 20);
        close(fd);
        return NULL;
    }
    text = g_malloc(st.st_size + 1);
    while (got < (size_t)st.st_size) {
        ssize_t n = read(fd, text + got, st.st_size - got);

        if (n < 0 && errno == EINTR) {
            continue;
        }
        if (n <= 0) {
            break;
        }
        got += n;
    }
    close(fd);
    text[got] = '\0';
    *len = got;
    return text;
}

bool repo_is_empty(const Repo *r)
{
    g_autofree char *backups = g_build_filename(r->root, "backups", NULL);
    g_autoptr(GDir) dir = g_dir_open(backups, 0, NULL);

    /* GDir skips "." and ".." */
    return dir && g_dir_read_name(dir) == NULL;
}
