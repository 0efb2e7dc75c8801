/*
 * lib/copier's sinks: the raw file one writes exactly what it is given
 * in both write modes (cached; direct: O_DIRECT where it can, the
 * odd-sized end padded and cut back), makes zeros as holes, is owner-only
 * and never writes through a planted link; cached, it keeps little of the
 * file in the page cache. The null one takes anything. Completions arrive
 * from the loop.
 */
#include <fcntl.h>
#include <linux/magic.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/vfs.h>
#include <unistd.h>

#include "../../lib/copier/internal.h"

#define B    COPIER_BLOCK_SIZE
#define SIZE (16 * B + 4096) /* not a whole block */

typedef struct {
    guint done;
    int last_error;
} Done;

static void on_done(void *opaque, int err)
{
    Done *d = opaque;

    d->done++;
    d->last_error = err;
}

static gboolean nothing(gpointer data)
{
    return G_SOURCE_CONTINUE;
}

/* Run CTX until D has seen WANT completions (bounded). */
static void wait_for(GMainContext *ctx, Done *d, guint want)
{
    gint64 deadline = g_get_monotonic_time() + 10 * G_USEC_PER_SEC;

    while (d->done < want && g_get_monotonic_time() < deadline) {
        g_main_context_iteration(ctx, TRUE);
    }
    g_assert_cmpuint(d->done, ==, want);
}

static guint8 *buffer(guint8 fill)
{
    void *buf = NULL;

    if (posix_memalign(&buf, 4096, 4 * B) != 0) {
        g_error("out of memory");
    }
    memset(buf, fill, 4 * B);
    return buf;
}

static void test_file_sink(gconstpointer data_)
{
    CopierWriteMode mode = GPOINTER_TO_INT(data_);
    g_autofree char *dir = g_dir_make_tmp("qbk-test-sink-XXXXXX", NULL);
    g_autofree char *path = g_build_filename(dir, "out.raw", NULL);
    g_autoptr(GMainContext) ctx = g_main_context_new();
    g_autofree guint8 *a = buffer(0xa5);
    g_autofree guint8 *z = buffer(0x5a);
    g_autofree char *data = NULL;
    gsize len;
    Done d = { 0 };
    struct stat st;
    Sink *s;

    s = sink_file_new(path, SIZE, 16, mode, ctx, nothing, NULL, NULL);
    g_assert_nonnull(s);
    g_assert_true(s->ops->write(s, a, 2 * B, 0, false, on_done, &d, NULL));
    g_assert_true(s->ops->write(s, z, 4 * B, 4 * B, false, on_done, &d, NULL));
    /* the last, partial block: padded for O_DIRECT, cut back at the end */
    g_assert_true(s->ops->write(s, a, 4096, 16 * B, false, on_done, &d, NULL));
    wait_for(ctx, &d, 3);
    g_assert_cmpint(d.last_error, ==, 0);
    /* zeros where data was: a hole, at once */
    g_assert_true(s->ops->write(s, NULL, B, 5 * B, true, on_done, &d, NULL));
    g_assert_cmpuint(d.done, ==, 4);
    g_assert_true(s->ops->flush(s, on_done, &d, NULL));
    wait_for(ctx, &d, 5);
    g_assert_false(s->ops->dead(s));
    sink_free(s);

    g_assert_true(g_file_get_contents(path, &data, &len, NULL));
    g_assert_cmpuint(len, ==, SIZE);
    for (gsize i = 0; i < len; i++) {
        guint8 want = i < 2 * B                 ? 0xa5
                      : i < 4 * B               ? 0
                      : i >= 5 * B && i < 6 * B ? 0
                      : i < 8 * B               ? 0x5a
                      : i >= 16 * B             ? 0xa5
                                                : 0;

        if ((guint8)data[i] != want) {
            g_error("byte %" G_GSIZE_FORMAT ": %02x, want %02x", i,
                    (guint8)data[i], want);
        }
    }
    g_assert_cmpint(stat(path, &st), ==, 0);
    g_assert_cmpint(st.st_mode & 0777, ==, 0600);
    unlink(path);

    /* a link planted at the name is refused, not written through */
    g_assert_cmpint(symlink("/dev/null", path), ==, 0);
    g_assert_null(
        sink_file_new(path, SIZE, 16, mode, ctx, nothing, NULL, NULL));
    unlink(path);
    rmdir(dir);
}

/* Pages of PATH's first LEN bytes in the page cache. */
static guint64 resident_pages(int fd, guint64 len)
{
    long page = sysconf(_SC_PAGESIZE);
    g_autofree unsigned char *vec = g_malloc((len + page - 1) / page);
    void *map = mmap(NULL, len, PROT_READ, MAP_SHARED, fd, 0);
    guint64 n = 0;

    g_assert_true(map != MAP_FAILED);
    g_assert_cmpint(mincore(map, len, vec), ==, 0);
    for (guint64 i = 0; i < (len + page - 1) / page; i++) {
        n += vec[i] & 1;
    }
    munmap(map, len);
    return n;
}

/* Cached: past COPIER_WRITE_BEHIND, the oldest writes are made durable and
 * dropped from the page cache as the copy goes; after the flush, all. */
static void test_file_sink_write_behind(void)
{
    const guint64 size = COPIER_WRITE_BEHIND + 32 * 1024 * 1024;
    const guint64 chunk = 1024 * 1024;
    g_autofree char *dir = g_dir_make_tmp("qbk-test-sink-XXXXXX", NULL);
    g_autofree char *path = g_build_filename(dir, "out.raw", NULL);
    g_autoptr(GMainContext) ctx = g_main_context_new();
    g_autofree guint8 *buf = g_malloc(chunk);
    long page = sysconf(_SC_PAGESIZE);
    Done d = { 0 };
    struct statfs fs;
    guint64 during, after;
    Sink *s;
    int fd;

    g_assert_cmpint(statfs(dir, &fs), ==, 0);
    if (fs.f_type == TMPFS_MAGIC) {
        g_test_skip("the page cache is tmpfs's storage");
        rmdir(dir);
        return;
    }
    s = sink_file_new(path, size, 16, COPIER_WRITE_CACHED, ctx, nothing, NULL,
                      NULL);
    g_assert_nonnull(s);
    for (guint64 off = 0; off < size; off += chunk) {
        memset(buf, (int)(off / chunk) + 1, chunk);
        g_assert_true(
            s->ops->write(s, buf, chunk, off, false, on_done, &d, NULL));
        wait_for(ctx, &d, off / chunk + 1); /* the buffer is reused */
    }
    fd = open(path, O_RDONLY | O_CLOEXEC);
    during = resident_pages(fd, size) * page;
    g_assert_true(s->ops->flush(s, on_done, &d, NULL));
    wait_for(ctx, &d, size / chunk + 1);
    after = resident_pages(fd, size) * page;
    sink_free(s);
    g_test_message("resident: %" G_GUINT64_FORMAT
                   " MiB before the flush, %" G_GUINT64_FORMAT " MiB after",
                   during >> 20, after >> 20);
    g_assert_cmpuint(during, <=, COPIER_WRITE_BEHIND + chunk);
    g_assert_cmpuint(after, <=, chunk);
    /* and every byte is there */
    for (guint64 off = 0; off < size; off += chunk) {
        g_assert_cmpint(pread(fd, buf, chunk, off), ==, chunk);
        g_assert_cmpint(buf[0], ==, (guint8)(off / chunk + 1));
        g_assert_cmpint(buf[chunk - 1], ==, (guint8)(off / chunk + 1));
    }
    close(fd);
    unlink(path);
    rmdir(dir);
}

static void test_null_sink(void)
{
    Sink *s = sink_null_new();
    Done d = { 0 };

    g_assert_true(s->ops->write(s, NULL, B, 0, false, on_done, &d, NULL));
    g_assert_true(s->ops->flush(s, on_done, &d, NULL));
    g_assert_cmpuint(d.done, ==, 2);
    g_assert_false(s->ops->dead(s));
    sink_free(s);
}

int main(int argc, char **argv)
{
    g_test_init(&argc, &argv, NULL);
    g_test_add_data_func("/sink/file/cached",
                         GINT_TO_POINTER(COPIER_WRITE_CACHED), test_file_sink);
    g_test_add_data_func("/sink/file/direct",
                         GINT_TO_POINTER(COPIER_WRITE_DIRECT), test_file_sink);
    g_test_add_func("/sink/file/write-behind", test_file_sink_write_behind);
    g_test_add_func("/sink/null", test_null_sink);
    return g_test_run();
}
