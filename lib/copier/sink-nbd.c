/*
 * An NBD export as the copier's target (a Sink): writes and zeros as
 * libnbd's async commands on the copier's loop, and a flush at the end.
 */
#include "internal.h"

typedef struct {
    Sink base;
    struct nbd_handle *nbd;
    GSource *source;
} NbdSink;

/* What a command's completion is to tell. */
typedef struct {
    SinkDone done;
    void *opaque;
} Completion;

static int completed(void *data, int *error)
{
    Completion *c = data;

    c->done(c->opaque, *error);
    return 1;
}

static nbd_completion_callback completion(SinkDone done, void *opaque)
{
    Completion *c = g_new(Completion, 1);

    *c = (Completion){ done, opaque };
    return (nbd_completion_callback){ .callback = completed,
                                      .user_data = c,
                                      .free = g_free };
}

static bool nbd_sink_write(Sink *sink, void *buf, guint64 len, guint64 offset,
                           bool zero, SinkDone done, void *opaque,
                           GError **error)
{
    NbdSink *s = (NbdSink *)sink;
    int64_t rc =
        zero ? nbd_aio_zero(s->nbd, len, offset, completion(done, opaque), 0)
             : nbd_aio_pwrite(s->nbd, buf, len, offset,
                              completion(done, opaque), 0);

    if (rc < 0) {
        g_set_error(error, COPIER_ERROR, COPIER_ERROR_WRITE,
                    "write at %" G_GUINT64_FORMAT ": %s", offset,
                    nbd_get_error());
        return false;
    }
    return true;
}

static bool nbd_sink_flush(Sink *sink, SinkDone done, void *opaque,
                           GError **error)
{
    NbdSink *s = (NbdSink *)sink;

    if (nbd_aio_flush(s->nbd, completion(done, opaque), 0) < 0) {
        g_set_error(error, COPIER_ERROR, COPIER_ERROR_WRITE, "flush: %s",
                    nbd_get_error());
        return false;
    }
    return true;
}

static bool nbd_sink_dead(Sink *sink)
{
    NbdSink *s = (NbdSink *)sink;

    return nbd_source_gone(s->nbd);
}

static void nbd_sink_free(Sink *sink)
{
    NbdSink *s = (NbdSink *)sink;

    nbd_source_close(s->nbd, s->source); /* abandons what is in flight */
    g_free(s);
}

static const SinkOps nbd_ops = {
    .write = nbd_sink_write,
    .flush = nbd_sink_flush,
    .dead = nbd_sink_dead,
    .free = nbd_sink_free,
};

Sink *sink_nbd_new(const CopierEndpoint *endpoint, guint64 size,
                   GMainContext *ctx, GSourceFunc callback, gpointer data,
                   GError **error)
{
    NbdSink *s = g_new0(NbdSink, 1);
    int64_t have;

    s->base.ops = &nbd_ops;
    s->nbd = nbd_source_connect(endpoint, NULL, ctx, callback, data, &s->source,
                                error);
    if (!s->nbd) {
        g_free(s);
        return NULL;
    }
    have = nbd_get_size(s->nbd);
    if (have < 0 || (guint64)have != size) {
        g_set_error(error, COPIER_ERROR, COPIER_ERROR_CONNECT,
                    "source (%" G_GUINT64_FORMAT
                    " bytes) and target (%" G_GINT64_FORMAT
                    " bytes) differ in size",
                    size, have);
        nbd_sink_free(&s->base);
        return NULL;
    }
    if (nbd_is_read_only(s->nbd) == 1 || nbd_can_zero(s->nbd) != 1) {
        g_set_error(error, COPIER_ERROR, COPIER_ERROR_CONNECT,
                    "the target export is read-only or cannot write zeros");
        nbd_sink_free(&s->base);
        return NULL;
    }
    return &s->base;
}
