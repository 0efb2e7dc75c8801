/*
 * lib/copier's sinks: the raw file one writes exactly what it is given
 * (Linux AIO, O_DIRECT where it can, the odd-sized end padded and cut
 * back), makes zeros as holes, is owner-only and never writes through a
 * planted link; the null one takes anything. Completions arrive from the
 * loop.
 */
#include <fcntl.h>
#include <string.h>
#include <sys/stat.h>
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

static void test_file_sink(void)
{
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

    s = sink_file_new(path, SIZE, 16, ctx, nothing, NULL, NULL);
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
    g_assert_null(sink_file_new(path, SIZE, 16, ctx, nothing, NULL, NULL));
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
    g_test_add_func("/sink/file", test_file_sink);
    g_test_add_func("/sink/null", test_null_sink);
    return g_test_run();
}
