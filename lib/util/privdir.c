/*
 * Private directories that clean up after a killed owner.
 *
 * A qbk process that is killed (SIGKILL, a crash, the machine's OOM killer)
 * cannot remove its sockets, logs and scratch images. So each directory it
 * makes is locked (flock on the directory itself) for as long as it is in
 * use, and the next qbk process that makes a directory in the same place
 * removes every one whose lock is free: its owner is gone. The lock, not a
 * pid, says so: a pid can be reused, a lock dies with its process.
 *
 * Only what looks exactly like ours is touched: a directory (not a symbolic
 * link) owned by us, named qbk-WORD-XXXXXX, holding files only.
 */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include "util.h"

/* G_DEFINE_QUARK stringifies the quark name as written. */
/* clang-format off */
G_DEFINE_QUARK(qbk-util-error-quark, util_error)
/* clang-format on */

#define PREFIX      "qbk-"
#define RANDOM_LEN  6 /* the XXXXXX of mkdtemp */
#define MAX_RETRIES 5

struct PrivDir {
    char *path; /* absolute */
    int fd;     /* the directory, locked (LOCK_EX) while we live */
};

char *util_tmp_dir(void)
{
    return g_canonicalize_filename(g_get_tmp_dir(), NULL);
}

/* qbk-WORD-XXXXXX: WORD lowercase letters, XXXXXX from mkdtemp. */
static bool is_private_name(const char *name)
{
    const char *p = name + strlen(PREFIX);
    const char *dash;

    if (!g_str_has_prefix(name, PREFIX) || !(dash = strchr(p, '-')) ||
        dash == p || strlen(dash + 1) != RANDOM_LEN) {
        return false;
    }
    for (; p < dash; p++) {
        if (!g_ascii_islower(*p)) {
            return false;
        }
    }
    for (p = dash + 1; *p; p++) {
        if (!g_ascii_isalnum(*p)) {
            return false;
        }
    }
    return true;
}

/* Remove every entry of the directory open at FD (files only). */
static bool empty_dir(int fd)
{
    int dup_fd = dup(fd);
    DIR *d = dup_fd >= 0 ? fdopendir(dup_fd) : NULL;
    struct dirent *e;
    bool ok = true;

    if (!d) {
        if (dup_fd >= 0) {
            close(dup_fd);
        }
        return false;
    }
    while ((e = readdir(d))) {
        if (strcmp(e->d_name, ".") == 0 || strcmp(e->d_name, "..") == 0) {
            continue;
        }
        /* a subdirectory is not ours to remove: leave the whole thing */
        if (unlinkat(fd, e->d_name, 0) < 0 && errno != ENOENT) {
            ok = false;
        }
    }
    closedir(d);
    return ok;
}

guint privdir_reap(const char *parent)
{
    g_autofree char *dir =
        parent ? g_canonicalize_filename(parent, NULL) : util_tmp_dir();
    int pfd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    DIR *d = pfd >= 0 ? fdopendir(pfd) : NULL;
    struct dirent *e;
    guint reaped = 0;

    if (!d) {
        if (pfd >= 0) {
            close(pfd);
        }
        return 0;
    }
    while ((e = readdir(d))) {
        struct stat st;
        int fd;

        if (!is_private_name(e->d_name)) {
            continue;
        }
        fd = openat(pfd, e->d_name,
                    O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
        if (fd < 0) {
            continue; /* a symbolic link, or not a directory */
        }
        if (fstat(fd, &st) < 0 || st.st_uid != geteuid() ||
            (st.st_mode & 077) != 0 || flock(fd, LOCK_EX | LOCK_NB) < 0) {
            close(fd); /* not ours, or its owner is alive */
            continue;
        }
        /* Ours, and nobody holds it. A process that just made it and waits
         * for the lock sees it gone (st_nlink 0) and makes another. */
        if (empty_dir(fd) && unlinkat(pfd, e->d_name, AT_REMOVEDIR) == 0) {
            reaped++;
        }
        close(fd);
    }
    closedir(d);
    return reaped;
}

PrivDir *privdir_new(const char *parent, const char *what, GError **error)
{
    g_autofree char *dir =
        parent ? g_canonicalize_filename(parent, NULL) : util_tmp_dir();
    g_autofree char *name = g_strdup_printf(PREFIX "%s-XXXXXX", what);

    for (const char *p = what; *p; p++) {
        g_assert(g_ascii_islower(*p));
    }
    privdir_reap(dir);
    for (int attempt = 0; attempt < MAX_RETRIES; attempt++) {
        g_autofree char *path = g_build_filename(dir, name, NULL);
        struct stat st;
        int fd;

        if (!g_mkdtemp_full(path, 0700)) {
            g_set_error(error, UTIL_ERROR, UTIL_ERROR_IO,
                        "cannot make a private directory in '%s': %s", dir,
                        g_strerror(errno));
            return NULL;
        }
        fd = open(path, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
        if (fd >= 0 && flock(fd, LOCK_EX) == 0 && fstat(fd, &st) == 0 &&
            st.st_nlink > 0) {
            PrivDir *d = g_new0(PrivDir, 1);

            d->path = g_steal_pointer(&path);
            d->fd = fd;
            return d;
        }
        /* reaped between mkdtemp and flock: make another */
        if (fd >= 0) {
            close(fd);
        }
    }
    g_set_error(error, UTIL_ERROR, UTIL_ERROR_IO,
                "cannot keep a private directory in '%s'", dir);
    return NULL;
}

const char *privdir_path(const PrivDir *d)
{
    return d->path;
}

char *privdir_file(const PrivDir *d, const char *name)
{
    return g_build_filename(d->path, name, NULL);
}

void privdir_free(PrivDir *d)
{
    if (!d) {
        return;
    }
    empty_dir(d->fd);
    rmdir(d->path);
    close(d->fd);
    g_free(d->path);
    g_free(d);
}
