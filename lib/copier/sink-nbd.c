/*
 * An NBD export as the copier's target (a Sink): writes and zeros as
 * libnbd's async commands on the copier's loop, and a flush at the end.
 * A target that compresses every write may come with a plain export of
 * the same image: a chunk whose bytes look random (compressed or
 * encrypted data) goes there instead, since trying to compress it would
 * cost CPU for nothing.
 */
#include <errno.h>
#include <math.h>

#include "internal.h"

typedef struct {
    Sink base;
    struct nbd_handle *nbd;
    GSource *source;
    struct nbd_handle *plain; /* or NULL */
    GSource *plain_source;
} NbdSink;

/* Bits per byte above which a block is taken as incompressible: random
 * bytes measure ~7.95 in a 4 KiB sample, text 4.5-6. */
#define RANDOM_BITS  7.5
#define SAMPLE_BYTES 4096

/* Whether every 64 KiB block of BUF (LEN bytes) looks random: the
 * Shannon entropy of a sample at its start. */
static bool incompressible(const guint8 *buf, guint64 len)
{
    for (guint64 at = 0; at < len; at += COPIER_BLOCK_SIZE) {
        guint counts[256] = { 0 };
        guint n = (guint)MIN((guint64)SAMPLE_BYTES, len - at);
        double bits = 0;

        for (guint i = 0; i < n; i++) {
            counts[buf[at + i]]++;
        }
        for (guint i = 0; i < 256; i++) {
            if (counts[i]) {
                double p = (double)counts[i] / n;

                bits -= p * log2(p);
            }
        }
        if (n < SAMPLE_BYTES / 4 || bits < RANDOM_BITS) {
            return false;
        }
    }
    return true;
}

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
    struct nbd_handle *to =
        s->plain && !zero && incompressible(buf, len) ? s->plain : s->nbd;
    int64_t rc =
        zero
            ? nbd_aio_zero(to, len, offset, completion(done, opaque), 0)
            : nbd_aio_pwrite(to, buf, len, offset, completion(done, opaque), 0);

    if (rc < 0) {
        g_set_error(error, COPIER_ERROR, COPIER_ERROR_WRITE,
                    "write at %" G_GUINT64_FORMAT ": %s", offset,
                    nbd_get_error());
        return false;
    }
    return true;
}

/* The plain export's flush done: then the other's, which tells. */
typedef struct {
    NbdSink *s;
    SinkDone done;
    void *opaque;
} FlushNext;

static void plain_flushed(void *opaque, int error)
{
    FlushNext *f = opaque;

    if (error) {
        f->done(f->opaque, error);
    } else if (nbd_aio_flush(f->s->nbd, completion(f->done, f->opaque), 0) <
               0) {
        f->done(f->opaque, EIO);
    }
    g_free(f);
}

static bool nbd_sink_flush(Sink *sink, SinkDone done, void *opaque,
                           GError **error)
{
    NbdSink *s = (NbdSink *)sink;

    if (s->plain) {
        FlushNext *f = g_new(FlushNext, 1);

        *f = (FlushNext){ s, done, opaque };
        if (nbd_aio_flush(s->plain, completion(plain_flushed, f), 0) < 0) {
            g_free(f);
            g_set_error(error, COPIER_ERROR, COPIER_ERROR_WRITE, "flush: %s",
                        nbd_get_error());
            return false;
        }
        return true;
    }
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

    return nbd_source_gone(s->nbd) || (s->plain && nbd_source_gone(s->plain));
}

static void nbd_sink_free(Sink *sink)
{
    NbdSink *s = (NbdSink *)sink;

    nbd_source_close(s->nbd, s->source); /* abandons what is in flight */
    if (s->plain) {
        nbd_source_close(s->plain, s->plain_source);
    }
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
    if (endpoint->uri_plain) {
        CopierEndpoint plain = *endpoint;

        plain.uri = endpoint->uri_plain;
        s->plain = nbd_source_connect(&plain, NULL, ctx, callback, data,
                                      &s->plain_source, error);
        if (!s->plain || nbd_get_size(s->plain) != have ||
            nbd_is_read_only(s->plain) == 1) {
            if (s->plain) {
                g_set_error(error, COPIER_ERROR, COPIER_ERROR_CONNECT,
                            "the plain target export is not the same image");
            }
            nbd_sink_free(&s->base);
            return NULL;
        }
    }
    return &s->base;
}
