/*
 * How a copy reports: its first failure (the one the caller sees) and the
 * trace lines benchmarks read (microseconds, then the event).
 */
#include <stdio.h>

#include "internal.h"

void copier_fail(Copier *c, CopierErrorCode code, const char *fmt, ...)
{
    va_list ap;

    if (c->error) {
        return; /* first failure wins */
    }
    va_start(ap, fmt);
    c->error = g_error_new_valist(COPIER_ERROR, code, fmt, ap);
    va_end(ap);
}

void copier_trace(Copier *c, const char *fmt, ...)
{
    g_autofree char *line = NULL;
    va_list ap;

    if (c->opts.trace_fd < 0) {
        return;
    }
    va_start(ap, fmt);
    line = g_strdup_vprintf(fmt, ap);
    va_end(ap);
    dprintf(c->opts.trace_fd, "%" G_GINT64_FORMAT "000 %s\n",
            g_get_monotonic_time(), line);
}
