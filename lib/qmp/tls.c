/*
 * QMP over TLS: a QEMU monitor on `-chardev socket,...,tls-creds=ID`,
 * reached from another host. The client is GLib's (GTlsClientConnection,
 * with glib-networking's GnuTLS backend) over the socket qmp.c connected;
 * qmp.c then reads and writes through it without blocking, as it does a
 * plain socket.
 *
 * Credentials come from one directory laid out as QEMU's tls-creds-x509
 * and libnbd's tls-certificates want it: ca-cert.pem (the CA that signed
 * the server), client-cert.pem and client-key.pem (ours, which QEMU's
 * verify-peer=on checks). The server's certificate must name the host we
 * connect to.
 */
#include <errno.h>
#include <poll.h>
#include <string.h>

#include "internal.h"

/* DIR/NAME, which must be a readable file. */
static char *creds_file(const char *dir, const char *name, GError **error)
{
    char *path = g_build_filename(dir, name, NULL);

    if (!g_file_test(path, G_FILE_TEST_IS_REGULAR)) {
        g_set_error(error, QMP_ERROR, QMP_ERROR_CONNECT,
                    "no %s in the TLS credentials directory '%s'", name, dir);
        g_free(path);
        return NULL;
    }
    return path;
}

/* Our certificate and the CA's, from DIR, on TLS. */
static bool set_credentials(GTlsConnection *tls, const char *dir,
                            GError **error)
{
    g_autofree char *ca = creds_file(dir, "ca-cert.pem", error);
    g_autofree char *cert =
        ca ? creds_file(dir, "client-cert.pem", error) : NULL;
    g_autofree char *key =
        cert ? creds_file(dir, "client-key.pem", error) : NULL;
    g_autoptr(GTlsCertificate) mine = NULL;
    g_autoptr(GTlsDatabase) db = NULL;

    if (!key) {
        return false;
    }
    mine = g_tls_certificate_new_from_files(cert, key, error);
    db = mine ? g_tls_file_database_new(ca, error) : NULL;
    if (!db) {
        g_prefix_error(error, "TLS credentials in '%s': ", dir);
        return false;
    }
    g_tls_connection_set_certificate(tls, mine);
    g_tls_connection_set_database(tls, db);
    return true;
}

/* Why GLib found the server's certificate unacceptable (its flags). */
static gboolean note_rejection(GTlsConnection *conn, GTlsCertificate *cert,
                               GTlsCertificateFlags errors, gpointer data)
{
    *(GTlsCertificateFlags *)data = errors;
    return FALSE;
}

static char *rejection_text(GTlsCertificateFlags flags, const char *host_port)
{
    GString *s = g_string_new("the server's certificate ");
    const char *sep = "";

    if (flags & G_TLS_CERTIFICATE_UNKNOWN_CA) {
        g_string_append(s, "is not signed by the CA in ca-cert.pem");
        sep = "; it ";
    }
    if (flags & G_TLS_CERTIFICATE_BAD_IDENTITY) {
        g_autofree char *host =
            g_strndup(host_port, strrchr(host_port, ':') - host_port);

        g_string_append_printf(s, "%sdoes not name '%s'", sep, host);
        sep = "; it ";
    }
    if (flags & (G_TLS_CERTIFICATE_EXPIRED | G_TLS_CERTIFICATE_NOT_ACTIVATED)) {
        g_string_append_printf(s, "%sis expired or not yet valid", sep);
        sep = "; it ";
    }
    if (!*sep) {
        g_string_append(s, "is not acceptable");
    }
    return g_string_free(s, FALSE);
}

bool qmp_tls_start(QmpClient *qmp, const char *host_port, const char *dir,
                   int timeout_ms, GError **error)
{
    GTlsCertificateFlags rejected = 0;
    g_autoptr(GSocket) sock = NULL;
    g_autoptr(GSocketConnection) conn = NULL;
    g_autoptr(GSocketConnectable) peer = NULL;
    g_autoptr(GIOStream) tls = NULL;
    g_autoptr(GError) err = NULL;

    if (!dir) {
        g_set_error(error, QMP_ERROR, QMP_ERROR_CONNECT,
                    "'tls:%s' needs TLS credentials (a directory with "
                    "ca-cert.pem, client-cert.pem and client-key.pem)",
                    host_port);
        return false;
    }
    sock = g_socket_new_from_fd(qmp->fd, error);
    if (!sock) {
        return false;
    }
    qmp->fd_owner = g_object_ref(sock); /* closes the fd from now on */
    peer = g_network_address_parse(host_port, 0, error);
    if (!peer) {
        return false;
    }
    conn = g_socket_connection_factory_create_connection(sock);
    tls = g_tls_client_connection_new(G_IO_STREAM(conn), peer, &err);
    if (!tls) {
        g_set_error(error, QMP_ERROR, QMP_ERROR_CONNECT,
                    "no TLS for 'tls:%s': %s (is glib-networking "
                    "installed?)",
                    host_port, err->message);
        return false;
    }
    if (!set_credentials(G_TLS_CONNECTION(tls), dir, error)) {
        return false;
    }
    g_signal_connect(tls, "accept-certificate", G_CALLBACK(note_rejection),
                     &rejected);
    /* the handshake blocks, within the connection's deadline */
    g_socket_set_timeout(sock, MAX(1, (timeout_ms + 999) / 1000));
    if (!g_tls_connection_handshake(G_TLS_CONNECTION(tls), NULL, &err)) {
        g_autofree char *why =
            rejected ? rejection_text(rejected, host_port) : NULL;

        g_set_error(error, QMP_ERROR, QMP_ERROR_CONNECT,
                    "TLS with 'tls:%s' failed: %s", host_port,
                    why ? why : err->message);
        return false;
    }
    g_signal_handlers_disconnect_by_data(tls, &rejected);
    g_socket_set_timeout(sock, 0);
    qmp->tls = g_steal_pointer(&tls);
    return true;
}

/* Wait until FD is ready for EVENTS or DEADLINE: 1, 0 on timeout, -1. */
static int wait_fd(int fd, short events, gint64 deadline)
{
    struct pollfd pfd = { .fd = fd, .events = events };
    int rc;

    do {
        rc = poll(&pfd, 1, qmp_ms_left(deadline));
    } while (rc < 0 && errno == EINTR);
    return rc;
}

gssize qmp_tls_read(QmpClient *qmp, char *buf, gsize len, gint64 deadline,
                    GError **error)
{
    GPollableInputStream *in =
        G_POLLABLE_INPUT_STREAM(g_io_stream_get_input_stream(qmp->tls));

    for (;;) {
        g_autoptr(GError) err = NULL;
        gssize n =
            g_pollable_input_stream_read_nonblocking(in, buf, len, NULL, &err);
        int rc;

        if (n >= 0) {
            return n;
        }
        if (!g_error_matches(err, G_IO_ERROR, G_IO_ERROR_WOULD_BLOCK)) {
            g_set_error(error, QMP_ERROR, QMP_ERROR_CLOSED,
                        "TLS read from '%s': %s", qmp->address, err->message);
            return -1;
        }
        util_quick_ack(qmp->fd); /* an answer in several records, at once */
        rc = wait_fd(qmp->fd, POLLIN, deadline);
        if (rc <= 0) {
            return rc == 0 ? -2 : -1;
        }
    }
}

gssize qmp_tls_write(QmpClient *qmp, const char *data, gsize len,
                     gint64 deadline, GError **error)
{
    GPollableOutputStream *out =
        G_POLLABLE_OUTPUT_STREAM(g_io_stream_get_output_stream(qmp->tls));

    for (;;) {
        g_autoptr(GError) err = NULL;
        gssize n = g_pollable_output_stream_write_nonblocking(out, data, len,
                                                              NULL, &err);

        if (n >= 0) {
            return n;
        }
        if (!g_error_matches(err, G_IO_ERROR, G_IO_ERROR_WOULD_BLOCK)) {
            g_set_error(error, QMP_ERROR, QMP_ERROR_CLOSED,
                        "TLS write to '%s': %s", qmp->address, err->message);
            return -1;
        }
        if (wait_fd(qmp->fd, POLLOUT, deadline) <= 0) {
            return -2;
        }
    }
}

void qmp_tls_close(QmpClient *qmp)
{
    g_clear_object(&qmp->tls);
    g_clear_object(&qmp->fd_owner);
}

char *qmp_tls_identity(const char *dir, GError **error)
{
    g_autofree char *path = creds_file(dir, "client-cert.pem", error);
    g_autoptr(GTlsCertificate) cert = NULL;
    char *dn = NULL;

    if (!path) {
        return NULL;
    }
    cert = g_tls_certificate_new_from_file(path, error);
    if (!cert) {
        g_prefix_error(error, "'%s': ", path);
        return NULL;
    }
    g_object_get(cert, "subject-name", &dn, NULL);
    if (!dn || !*dn) {
        g_free(dn);
        g_set_error(error, QMP_ERROR, QMP_ERROR_CONNECT,
                    "'%s' names no subject", path);
        return NULL;
    }
    return dn;
}
