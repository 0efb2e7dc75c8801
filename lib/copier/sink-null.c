/*
 * No target (a Sink): what is read is only hashed, to verify a backup.
 */
#include "internal.h"

static bool null_write(Sink *s, void *buf, guint64 len, guint64 offset,
                       bool zero, SinkDone done, void *opaque, GError **error)
{
    done(opaque, 0);
    return true;
}

static bool null_flush(Sink *s, SinkDone done, void *opaque, GError **error)
{
    done(opaque, 0);
    return true;
}

static bool null_dead(Sink *s)
{
    return false;
}

static void null_free(Sink *s)
{
    g_free(s);
}

static const SinkOps null_ops = {
    .write = null_write,
    .flush = null_flush,
    .dead = null_dead,
    .free = null_free,
};

Sink *sink_null_new(void)
{
    Sink *s = g_new0(Sink, 1);

    s->ops = &null_ops;
    return s;
}
