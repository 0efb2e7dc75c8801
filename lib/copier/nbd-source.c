/*
 * A GSource that runs one libnbd handle's state machine on a GMainContext:
 * it polls the handle's socket in the direction libnbd asks for, tells
 * libnbd when the socket is ready, then calls the owner back so that it can
 * look at what completed and start the next commands.
 */
#include <errno.h>
#include <poll.h>

#include "internal.h"
#include "util.h"

typedef struct {
    GSource base;
    struct nbd_handle *nbd; /* borrowed: the owner closes it after the source */
    gpointer tag;           /* of the socket fd, from g_source_add_unix_fd */
    GIOCondition cond;      /* what the fd is polled for now */
    bool tcp;               /* ACKs are sent at once (util_quick_ack) */
} NbdSource;

static gboolean nbd_source_prepare(GSource *source, gint *timeout)
{
    NbdSource *s = (NbdSource *)source;
    unsigned dir = nbd_aio_get_direction(s->nbd);
    GIOCondition cond = 0;

    if (dir & LIBNBD_AIO_DIRECTION_READ) {
        cond |= G_IO_IN;
    }
    if (dir & LIBNBD_AIO_DIRECTION_WRITE) {
        cond |= G_IO_OUT;
    }
    /* g_source_modify_unix_fd() wakes the context up (an eventfd write,
     * then a read and one more poll), so it is called only on a change:
     * on every prepare it was 5 syscalls per NBD reply. */
    if (cond != s->cond) {
        g_source_modify_unix_fd(source, s->tag, cond);
        s->cond = cond;
    }
    *timeout = -1;
    return FALSE;
}

static gboolean nbd_source_check(GSource *source)
{
    NbdSource *s = (NbdSource *)source;

    return g_source_query_unix_fd(source, s->tag) != 0;
}

static gboolean nbd_source_dispatch(GSource *source, GSourceFunc callback,
                                    gpointer data)
{
    NbdSource *s = (NbdSource *)source;
    GIOCondition rev = g_source_query_unix_fd(source, s->tag);
    unsigned dir = nbd_aio_get_direction(s->nbd);

    if (s->tcp && (rev & G_IO_IN)) {
        util_quick_ack(nbd_aio_get_fd(s->nbd));
    }
    /* Errors surface through the commands' completion callbacks and
     * nbd_aio_is_dead(); the owner checks both. */
    if ((rev & (G_IO_IN | G_IO_HUP | G_IO_ERR)) &&
        (dir & LIBNBD_AIO_DIRECTION_READ)) {
        nbd_aio_notify_read(s->nbd);
    } else if (rev & G_IO_OUT) {
        nbd_aio_notify_write(s->nbd);
    } else if (rev & (G_IO_HUP | G_IO_ERR)) {
        nbd_aio_notify_read(s->nbd); /* let libnbd see the hang-up */
    }
    return callback ? callback(data) : G_SOURCE_CONTINUE;
}

static GSourceFuncs nbd_source_funcs = {
    .prepare = nbd_source_prepare,
    .check = nbd_source_check,
    .dispatch = nbd_source_dispatch,
};

/*
 * nbd_connect_uri, but bounded: a server that accepts and then says
 * nothing (or serves its last allowed client already) must not hang us.
 * 0, or -1 with libnbd's error, or -2 on timeout.
 */
static int connect_within(struct nbd_handle *nbd, const char *uri,
                          int timeout_ms)
{
    gint64 deadline = g_get_monotonic_time() + (gint64)timeout_ms * 1000;

    if (nbd_aio_connect_uri(nbd, uri) < 0) {
        return -1;
    }
    while (nbd_aio_is_connecting(nbd) == 1) {
        unsigned dir = nbd_aio_get_direction(nbd);
        struct pollfd pfd = {
            .fd = nbd_aio_get_fd(nbd),
            .events = (dir & LIBNBD_AIO_DIRECTION_READ ? POLLIN : 0) |
                      (dir & LIBNBD_AIO_DIRECTION_WRITE ? POLLOUT : 0),
        };
        gint64 left = deadline - g_get_monotonic_time();
        int rc;

        if (left <= 0) {
            return -2;
        }
        if (util_is_tcp(pfd.fd)) {
            util_quick_ack(pfd.fd); /* the handshake's replies, at once */
        }
        rc = poll(&pfd, 1, (int)MIN((left + 999) / 1000, G_MAXINT));
        if (rc < 0 && errno != EINTR) {
            return -1;
        }
        if (rc > 0 && (pfd.revents & (POLLIN | POLLHUP | POLLERR)) &&
            nbd_aio_notify_read(nbd) < 0) {
            return -1;
        }
        if (rc > 0 && (pfd.revents & POLLOUT) &&
            nbd_aio_notify_write(nbd) < 0) {
            return -1;
        }
    }
    return nbd_aio_is_ready(nbd) == 1 ? 0 : -1;
}

struct nbd_handle *nbd_source_connect(const CopierEndpoint *endpoint,
                                      const char *const *meta_contexts,
                                      GMainContext *ctx, GSourceFunc callback,
                                      gpointer data, GSource **source,
                                      GError **error)
{
    struct nbd_handle *nbd = nbd_create();
    int timeout_ms = endpoint->timeout_ms > 0 ? endpoint->timeout_ms
                                              : COPIER_CONNECT_TIMEOUT_MS;
    int rc = 0;
    NbdSource *s;

    if (!nbd) {
        g_set_error(error, COPIER_ERROR, COPIER_ERROR_CONNECT, "%s",
                    nbd_get_error());
        return NULL;
    }
    for (guint i = 0; meta_contexts && meta_contexts[i]; i++) {
        nbd_add_meta_context(nbd, meta_contexts[i]);
    }
    /* libnbd zeroes every read buffer first, in case a caller ignores a
     * failed read; we never do, and it cost 6% of the copier's CPU. */
    nbd_set_pread_initialize(nbd, false);
    /* A URI may name a unix socket or a TCP host (TLS comes with nbds);
     * never a local file to read keys from, nor a command to run. */
    if (nbd_set_uri_allow_transports(nbd, LIBNBD_ALLOW_TRANSPORT_UNIX |
                                              LIBNBD_ALLOW_TRANSPORT_TCP) < 0 ||
        (endpoint->tls_dir &&
         nbd_set_tls_certificates(nbd, endpoint->tls_dir) < 0) ||
        (rc = connect_within(nbd, endpoint->uri, timeout_ms)) < 0) {
        if (rc == -2) {
            g_set_error(error, COPIER_ERROR, COPIER_ERROR_CONNECT,
                        "cannot open NBD export %s: no answer within %d ms "
                        "(a server that serves its last client already, or "
                        "that hangs)",
                        endpoint->uri, timeout_ms);
        } else {
            g_set_error(error, COPIER_ERROR, COPIER_ERROR_CONNECT,
                        "cannot open NBD export %s: %s", endpoint->uri,
                        nbd_get_error());
        }
        nbd_close(nbd);
        return NULL;
    }
    for (guint i = 0; meta_contexts && meta_contexts[i]; i++) {
        if (nbd_can_meta_context(nbd, meta_contexts[i]) != 1) {
            g_set_error(error, COPIER_ERROR, COPIER_ERROR_CONNECT,
                        "NBD export %s does not offer '%s'", endpoint->uri,
                        meta_contexts[i]);
            nbd_close(nbd);
            return NULL;
        }
    }
    s = (NbdSource *)g_source_new(&nbd_source_funcs, sizeof(NbdSource));
    s->nbd = nbd;
    s->tag = g_source_add_unix_fd(&s->base, nbd_aio_get_fd(nbd), 0);
    s->tcp = util_is_tcp(nbd_aio_get_fd(nbd));
    g_source_set_callback(&s->base, callback, data, NULL);
    /* glib blocks a source while it dispatches by taking its fd out of the
     * poll set and back, waking the context twice; ours never recurse. */
    g_source_set_can_recurse(&s->base, TRUE);
    g_source_attach(&s->base, ctx);
    *source = &s->base;
    return nbd;
}

bool nbd_source_gone(struct nbd_handle *nbd)
{
    return nbd && (nbd_aio_is_dead(nbd) || nbd_aio_is_closed(nbd));
}

void nbd_source_close(struct nbd_handle *nbd, GSource *source)
{
    if (source) {
        g_source_destroy(source);
        g_source_unref(source);
    }
    nbd_close(nbd); /* abandons anything still in flight */
}

char *copier_nbd_uri(const char *socket, const char *name)
{
    g_autofree char *n = g_uri_escape_string(name, NULL, FALSE);
    g_autofree char *s = g_uri_escape_string(socket, "/", FALSE);

    return g_strdup_printf("nbd+unix:///%s?socket=%s", n, s);
}

bool copier_is_nbd_uri(const char *text)
{
    const char *scheme = g_uri_peek_scheme(text); /* lower case */

    return scheme &&
           (strcmp(scheme, "nbd") == 0 || g_str_has_prefix(scheme, "nbd+") ||
            g_str_has_prefix(scheme, "nbds"));
}

bool copier_uri_is_tcp(const char *uri)
{
    const char *scheme = g_uri_peek_scheme(uri); /* lower case */

    return scheme &&
           (strcmp(scheme, "nbd") == 0 || strcmp(scheme, "nbds") == 0);
}
