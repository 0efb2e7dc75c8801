/*
 * The QMP connection: socket set-up, line framing, command/reply matching
 * by id, and the queue of events that arrive while we wait.
 *
 * QEMU sends one JSON object per line. Replies come in order, but a reply
 * can be preceded by any number of events, and a command that timed out may
 * still be answered later: replies carry our id so such stale ones are
 * recognised and dropped.
 */
#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "internal.h"

/* G_DEFINE_QUARK stringifies the quark name as written. */
/* clang-format off */
G_DEFINE_QUARK(qmp-error-quark, qmp_error)
G_DEFINE_QUARK(qmp-command-error-quark, qmp_command_error)
/* clang-format on */

/* Indexed by QmpCommandErrorCode. */
static const char *const error_classes[] = {
    [QMP_COMMAND_ERROR_GENERIC] = "GenericError",
    [QMP_COMMAND_ERROR_COMMAND_NOT_FOUND] = "CommandNotFound",
    [QMP_COMMAND_ERROR_DEVICE_NOT_ACTIVE] = "DeviceNotActive",
    [QMP_COMMAND_ERROR_DEVICE_NOT_FOUND] = "DeviceNotFound",
    [QMP_COMMAND_ERROR_KVM_MISSING_CAP] = "KVMMissingCap",
    [QMP_COMMAND_ERROR_UNKNOWN] = "UnknownError",
};

const char *qmp_error_class(const GError *error)
{
    if (!error || error->domain != QMP_COMMAND_ERROR || error->code < 0 ||
        error->code > QMP_COMMAND_ERROR_UNKNOWN) {
        return NULL;
    }
    return error_classes[error->code];
}

static QmpCommandErrorCode error_code_of_class(const char *class)
{
    for (int i = 0; i < QMP_COMMAND_ERROR_UNKNOWN; i++) {
        if (class && strcmp(class, error_classes[i]) == 0) {
            return i;
        }
    }
    return QMP_COMMAND_ERROR_UNKNOWN;
}

/* Milliseconds left until DEADLINE (monotonic, microseconds), at least 0. */
int qmp_ms_left(gint64 deadline)
{
    gint64 left = deadline - g_get_monotonic_time();

    return left <= 0 ? 0 : (int)MIN((left + 999) / 1000, G_MAXINT);
}

static gint64 deadline_in(int timeout_ms)
{
    return g_get_monotonic_time() + (gint64)timeout_ms * 1000;
}

/* Who answers, for messages. */
static const char *peer(const QmpClient *qmp)
{
    return qmp->agent ? "the guest agent" : "QEMU";
}

static void mark_closed(QmpClient *qmp, GError **error)
{
    qmp->closed = true;
    if (qmp->agent) {
        g_set_error(error, QMP_ERROR, QMP_ERROR_CLOSED,
                    "the guest agent's socket '%s' was closed (did QEMU "
                    "exit?)",
                    qmp->address);
        return;
    }
    g_set_error(error, QMP_ERROR, QMP_ERROR_CLOSED,
                "QEMU closed the QMP connection '%s' (did it exit?)",
                qmp->address);
}

/* ---- connecting ---- */

static int connect_unix(const char *path, GError **error)
{
    int fd = util_unix_socket(path, UTIL_SOCKET_CONNECT);

    if (fd < 0) {
        int saved = errno;

        g_set_error(error, QMP_ERROR, QMP_ERROR_CONNECT,
                    "cannot connect to '%s': %s", path, g_strerror(saved));
    }
    return fd;
}

static int connect_tcp(const char *hostport, GError **error)
{
    g_autofree char *host = NULL;
    const char *colon = strrchr(hostport, ':');
    struct addrinfo hints = { .ai_socktype = SOCK_STREAM };
    struct addrinfo *res = NULL;
    int saved = 0;
    int fd = -1;
    int rc;

    if (!colon || colon == hostport || !colon[1]) {
        g_set_error(error, QMP_ERROR, QMP_ERROR_CONNECT,
                    "'tcp:%s' is not of the form tcp:HOST:PORT", hostport);
        return -1;
    }
    host = g_strndup(hostport, colon - hostport);
    rc = getaddrinfo(host, colon + 1, &hints, &res);
    if (rc != 0) {
        g_set_error(error, QMP_ERROR, QMP_ERROR_CONNECT,
                    "cannot resolve '%s': %s", hostport, gai_strerror(rc));
        return -1;
    }
    for (struct addrinfo *ai = res; ai; ai = ai->ai_next) {
        fd = socket(ai->ai_family, ai->ai_socktype | SOCK_CLOEXEC,
                    ai->ai_protocol);
        if (fd >= 0 && connect(fd, ai->ai_addr, ai->ai_addrlen) == 0) {
            /* A command is two small writes (see qmp_execute): Nagle
             * would hold the second behind the peer's delayed ACK. */
            int one = 1;

            setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
            break;
        }
        saved = errno;
        if (fd >= 0) {
            close(fd);
            fd = -1;
        }
    }
    freeaddrinfo(res);
    if (fd < 0) {
        g_set_error(error, QMP_ERROR, QMP_ERROR_CONNECT,
                    "cannot connect to 'tcp:%s': %s", hostport,
                    g_strerror(saved));
    }
    return fd;
}

/* ---- a trace of every message, for debugging ($QBK_QMP_TRACE) ---- */

static void trace_line(const char *dir, const char *text)
{
    static int fd = -2;
    const char *path;

    if (fd == -2) {
        path = g_getenv("QBK_QMP_TRACE");
        fd = path ? open(path,
                         O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC | O_NOFOLLOW,
                         0600)
                  : -1;
    }
    if (fd >= 0) {
        g_autofree char *line = g_strdup_printf(
            "%.6f %s %s\n", g_get_monotonic_time() / 1e6, dir, text);

        if (write(fd, line, strlen(line)) < 0) {
            fd = -1;
        }
    }
}

/* ---- framing ---- */

/*
 * Read more bytes, waiting until DEADLINE. Returns 1 when bytes arrived,
 * 0 on timeout, -1 on error (connection closed included).
 */
static int fill(QmpClient *qmp, gint64 deadline, GError **error)
{
    struct pollfd pfd = { .fd = qmp->fd, .events = POLLIN };
    char buf[65536];
    ssize_t n;
    int rc;

    if (qmp->tls) {
        n = qmp_tls_read(qmp, buf, sizeof(buf), deadline, error);
        if (n == -2) {
            return 0;
        }
        if (n < 0) {
            qmp->closed = true;
            return -1;
        }
        if (n == 0) {
            mark_closed(qmp, error);
            return -1;
        }
        qmp_framer_push(&qmp->framer, buf, n);
        return 1;
    }

    if (qmp->tcp) {
        util_quick_ack(qmp->fd); /* an answer in two writes, at once */
    }
    do {
        rc = poll(&pfd, 1, qmp_ms_left(deadline));
    } while (rc < 0 && errno == EINTR);
    if (rc < 0) {
        g_set_error(error, QMP_ERROR, QMP_ERROR_CLOSED, "poll: %s",
                    g_strerror(errno));
        return -1;
    }
    if (rc == 0) {
        return 0;
    }
    do {
        n = read(qmp->fd, buf, sizeof(buf));
    } while (n < 0 && errno == EINTR);
    if (n < 0 && errno == EAGAIN) {
        return 1;
    }
    if (n <= 0) {
        mark_closed(qmp, error);
        return -1;
    }
    qmp_framer_push(&qmp->framer, buf, n);
    return 1;
}

/*
 * Next message from QEMU, waiting until DEADLINE. Returns NULL with ERROR
 * set on failure, or NULL with *TIMED_OUT set and no error on a timeout.
 * The deadline holds even while data keeps arriving.
 */
static json_object *read_message(QmpClient *qmp, gint64 deadline,
                                 bool *timed_out, GError **error)
{
    *timed_out = false;
    if (qmp->closed) {
        mark_closed(qmp, error);
        return NULL;
    }
    for (bool filled = false;; filled = true) {
        json_object *msg;
        int rc = qmp_framer_next(&qmp->framer, &msg, error);

        if (rc < 0) {
            g_prefix_error(error, "'%s': ", qmp->address);
            return NULL;
        }
        if (rc > 0) {
            trace_line("<-", json_object_to_json_string_ext(
                                 msg, JSON_C_TO_STRING_PLAIN));
            qmp->silent = 0; /* it speaks */
            return msg;
        }
        /* a peer that keeps sending without finishing a line */
        if (filled && g_get_monotonic_time() >= deadline) {
            *timed_out = true;
            return NULL;
        }
        rc = fill(qmp, deadline, error);
        if (rc < 0) {
            return NULL;
        }
        if (rc == 0) {
            *timed_out = true;
            return NULL;
        }
    }
}

/* Keep EVENT for a later wait; beyond QMP_MAX_EVENTS the oldest goes. */
static void queue_event(QmpClient *qmp, json_object *event)
{
    g_queue_push_tail(&qmp->events, event);
    while (g_queue_get_length(&qmp->events) > QMP_MAX_EVENTS) {
        json_object_put(g_queue_pop_head(&qmp->events));
        qmp->events_dropped++;
    }
}

static bool is_event(json_object *msg)
{
    const char *name;

    return qmp_message_kind(msg, &name) == QMP_MESSAGE_EVENT;
}

static bool send_all(QmpClient *qmp, const char *data, size_t len,
                     gint64 deadline, GError **error)
{
    while (qmp->tls && len > 0) {
        gssize n = qmp_tls_write(qmp, data, len, deadline, error);

        if (n == -2) {
            g_set_error(error, QMP_ERROR, QMP_ERROR_TIMEOUT,
                        "%s at '%s' stopped reading commands", peer(qmp),
                        qmp->address);
            return false;
        }
        if (n < 0) {
            qmp->closed = true;
            return false;
        }
        data += n;
        len -= n;
    }
    while (len > 0) {
        struct pollfd pfd = { .fd = qmp->fd, .events = POLLOUT };
        ssize_t n = send(qmp->fd, data, len, MSG_NOSIGNAL);

        if (n > 0) {
            data += n;
            len -= n;
            continue;
        }
        if (n < 0 && errno == EINTR) {
            continue;
        }
        if (n < 0 && errno == EAGAIN) {
            if (poll(&pfd, 1, qmp_ms_left(deadline)) == 0) {
                g_set_error(error, QMP_ERROR, QMP_ERROR_TIMEOUT,
                            "%s at '%s' stopped reading commands", peer(qmp),
                            qmp->address);
                return false;
            }
            continue;
        }
        mark_closed(qmp, error);
        return false;
    }
    return true;
}

/* ---- public API ---- */

static bool parse_greeting(QmpClient *qmp, json_object *greeting,
                           GError **error)
{
    json_object *qmpobj, *version, *qemu, *v;

    if (!json_object_object_get_ex(greeting, "QMP", &qmpobj) ||
        !json_object_object_get_ex(qmpobj, "version", &version) ||
        !json_object_object_get_ex(version, "qemu", &qemu)) {
        g_set_error(error, QMP_ERROR, QMP_ERROR_PROTOCOL,
                    "'%s' is not a QMP socket: no QMP greeting", qmp->address);
        return false;
    }
    if (json_object_object_get_ex(qemu, "major", &v)) {
        qmp->major = json_object_get_int(v);
    }
    if (json_object_object_get_ex(qemu, "minor", &v)) {
        qmp->minor = json_object_get_int(v);
    }
    if (json_object_object_get_ex(qemu, "micro", &v)) {
        qmp->micro = json_object_get_int(v);
    }
    return true;
}

/* A client connected to ADDRESS, non-blocking, before any handshake. */
static QmpClient *client_open(const char *address, const char *tls_dir,
                              int timeout_ms, GError **error)
{
    g_autoptr(QmpClient) qmp = g_new0(QmpClient, 1);

    qmp->fd = -1;
    qmp->address = g_strdup(address);
    qmp->timeout_ms = timeout_ms > 0 ? timeout_ms : QMP_DEFAULT_TIMEOUT_MS;
    qmp_framer_init(&qmp->framer, QMP_MAX_LINE);
    g_queue_init(&qmp->events);

    if (g_str_has_prefix(address, "tcp:")) {
        qmp->fd = connect_tcp(address + 4, error);
    } else if (g_str_has_prefix(address, "tls:")) {
        qmp->fd = connect_tcp(address + 4, error);
        if (qmp->fd >= 0 &&
            !qmp_tls_start(qmp, address + 4, tls_dir, qmp->timeout_ms, error)) {
            return NULL;
        }
    } else if (g_str_has_prefix(address, "unix:")) {
        qmp->fd = connect_unix(address + 5, error);
    } else {
        qmp->fd = connect_unix(address, error);
    }
    if (qmp->fd < 0) {
        return NULL;
    }
    qmp->tcp = util_is_tcp(qmp->fd);
    if (fcntl(qmp->fd, F_SETFL, fcntl(qmp->fd, F_GETFL) | O_NONBLOCK) < 0) {
        g_set_error(error, QMP_ERROR, QMP_ERROR_CONNECT, "fcntl: %s",
                    g_strerror(errno));
        return NULL;
    }
    return g_steal_pointer(&qmp);
}

/* Whether MSG is an answer or an event, not a greeting. */
static bool is_leftover(json_object *msg)
{
    return json_object_object_get_ex(msg, "return", NULL) ||
           json_object_object_get_ex(msg, "error", NULL) ||
           json_object_object_get_ex(msg, "event", NULL);
}

QmpClient *qmp_connect(const char *address, int timeout_ms, GError **error)
{
    return qmp_connect_tls(address, NULL, timeout_ms, error);
}

QmpClient *qmp_connect_tls(const char *address, const char *tls_dir,
                           int timeout_ms, GError **error)
{
    g_autoptr(QmpClient) qmp = NULL;
    json_object *greeting;
    gint64 deadline;
    bool timed_out;

    g_return_val_if_fail(address != NULL, NULL);

    qmp = client_open(address, tls_dir, timeout_ms, error);
    if (!qmp) {
        return NULL;
    }
    deadline = deadline_in(qmp->timeout_ms);
    /* The greeting comes first, but a one-client monitor may still hold
     * what it wrote for the client before us (an answer, an event): seen
     * once in the tests, as "not a QMP socket". */
    while ((greeting = read_message(qmp, deadline, &timed_out, error)) &&
           is_leftover(greeting)) {
        json_object_put(greeting);
    }
    if (timed_out) {
        g_set_error(error, QMP_ERROR, QMP_ERROR_TIMEOUT,
                    "no QMP greeting from '%s' within %d ms (not a QMP "
                    "socket, or another client is connected)",
                    address, qmp->timeout_ms);
    }
    if (!greeting) {
        if (error && *error && (*error)->code == QMP_ERROR_PROTOCOL) {
            g_prefix_error(error, "not a QMP socket: ");
        } else if (qmp->tls && error && *error) {
            /* TLS 1.3: the server checks our certificate after the
             * handshake, and says no by hanging up */
            g_prefix_error(error,
                           "QEMU hung up before its greeting: it refused our "
                           "client certificate (another CA's, expired, or "
                           "not authorised) or serves another client: ");
        }
        return NULL;
    }
    if (!parse_greeting(qmp, greeting, error)) {
        json_object_put(greeting);
        return NULL;
    }
    json_object_put(greeting);

    if (!qmp_run(qmp, "qmp_capabilities", NULL, error)) {
        g_prefix_error(error, "capabilities negotiation failed: ");
        return NULL;
    }
    return g_steal_pointer(&qmp);
}

/*
 * Drop what the agent sent before its 0xFF delimiter (answers to a former
 * client, or to our own 0xFF), waiting until DEADLINE. 1 once it came,
 * 0 on timeout, -1 on error.
 */
static int skip_to_delimiter(QmpClient *qmp, gint64 deadline, GError **error)
{
    for (;;) {
        GString *buf = qmp->framer.buf;
        char *ff = memchr(buf->str, 0xff, buf->len);
        int rc;

        if (ff) {
            g_string_erase(buf, 0, ff - buf->str + 1);
            return 1;
        }
        g_string_truncate(buf, 0);
        rc = fill(qmp, deadline, error);
        if (rc <= 0) {
            return rc;
        }
    }
}

QmpClient *qmp_connect_agent(const char *address, int timeout_ms,
                             GError **error)
{
    g_autoptr(QmpClient) qmp = NULL;
    g_autofree char *sync = NULL;
    guint32 token = g_random_int_range(1, G_MAXINT32);
    gint64 deadline;
    int rc;

    g_return_val_if_fail(address != NULL, NULL);

    qmp = client_open(address, NULL, timeout_ms, error);
    if (!qmp) {
        return NULL;
    }
    qmp->agent = true;
    deadline = deadline_in(qmp->timeout_ms);
    /* 0xFF resets the agent's parser (a former client may have left half a
     * command); the answer to guest-sync-delimited starts with 0xFF too */
    sync = g_strdup_printf("\xff{\"execute\": \"guest-sync-delimited\", "
                           "\"arguments\": {\"id\": %u}}\n",
                           token);
    trace_line("->", sync + 1);
    if (!send_all(qmp, sync, strlen(sync), deadline, error)) {
        return NULL;
    }
    rc = skip_to_delimiter(qmp, deadline, error);
    for (; rc > 0;) {
        bool timed_out;
        json_object *reply = read_message(qmp, deadline, &timed_out, error);
        json_object *ret;

        if (!reply) {
            rc = timed_out ? 0 : -1;
            break;
        }
        /* anything else is a late answer to someone else's command */
        if (json_object_object_get_ex(reply, "return", &ret) &&
            json_object_is_type(ret, json_type_int) &&
            json_object_get_int64(ret) == token) {
            json_object_put(reply);
            return g_steal_pointer(&qmp);
        }
        json_object_put(reply);
    }
    if (rc == 0) {
        g_set_error(error, QMP_ERROR, QMP_ERROR_TIMEOUT,
                    "no answer from the guest agent at '%s' within %d ms "
                    "(is qemu-guest-agent running in the guest?)",
                    address, qmp->timeout_ms);
    } else {
        g_prefix_error(error, "the guest agent at '%s': ", address);
    }
    return NULL;
}

void qmp_free(QmpClient *qmp)
{
    if (!qmp) {
        return;
    }
    if (qmp->stop) {
        qmp->stop(qmp); /* a daemon of ours: stopped before we hang up */
    }
    if (qmp->fd_owner) {
        qmp_tls_close(qmp); /* closes fd */
    } else if (qmp->fd >= 0) {
        close(qmp->fd);
    }
    privdir_free(qmp->daemon_dir);
    g_queue_clear_full(&qmp->events, qmp_json_free);
    qmp_framer_clear(&qmp->framer);
    g_free(qmp->address);
    g_free(qmp);
}

void qmp_set_timeout(QmpClient *qmp, int timeout_ms)
{
    qmp->timeout_ms = timeout_ms > 0 ? timeout_ms : QMP_DEFAULT_TIMEOUT_MS;
}

char *qmp_query_status(QmpClient *qmp, bool *running, GError **error)
{
    json_object *st = qmp_execute(qmp, "query-status", NULL, error);
    char *status;

    if (!st) {
        return NULL;
    }
    status = g_strdup(
        qmp_json_string(st, "status") ? qmp_json_string(st, "status") : "");
    if (running) {
        *running = qmp_json_bool(st, "running");
    }
    json_object_put(st);
    return status;
}

void qmp_get_version(QmpClient *qmp, int *major, int *minor, int *micro)
{
    if (major) {
        *major = qmp->major;
    }
    if (minor) {
        *minor = qmp->minor;
    }
    if (micro) {
        *micro = qmp->micro;
    }
}

static bool reply_has_id(json_object *msg, const char *id)
{
    json_object *jid;

    return json_object_object_get_ex(msg, "id", &jid) &&
           json_object_is_type(jid, json_type_string) &&
           strcmp(json_object_get_string(jid), id) == 0;
}

static void set_command_error(json_object *reply, const char *command,
                              GError **error)
{
    json_object *err, *class = NULL, *desc = NULL;

    json_object_object_get_ex(reply, "error", &err);
    json_object_object_get_ex(err, "class", &class);
    json_object_object_get_ex(err, "desc", &desc);
    g_set_error(error, QMP_COMMAND_ERROR,
                error_code_of_class(json_object_get_string(class)), "%s",
                desc ? json_object_get_string(desc)
                     : "QEMU refused the command without a reason");
}

/* Whether COMMAND may be sent: the connection is open and still answers. */
static bool may_send(QmpClient *qmp, const char *command, GError **error)
{
    if (qmp->closed) {
        mark_closed(qmp, error);
        return false;
    }
    if (qmp->silent >= QMP_SILENT_GIVE_UP) {
        /* A path that is cut makes every command wait its whole timeout:
         * a rollback of many would take minutes to learn nothing more. */
        g_set_error(error, QMP_ERROR, QMP_ERROR_TIMEOUT,
                    "%s stopped answering (%u commands in a row timed out); "
                    "'%s' not sent",
                    peer(qmp), qmp->silent, command);
        return false;
    }
    return true;
}

json_object *qmp_execute(QmpClient *qmp, const char *command,
                         json_object *arguments, GError **error)
{
    g_autofree char *id = NULL;
    gint64 deadline = deadline_in(qmp->timeout_ms);
    json_object *msg;
    const char *text;
    bool ok;

    if (!may_send(qmp, command, error)) {
        json_object_put(arguments);
        return NULL;
    }
    id = g_strdup_printf("qbk-%" G_GUINT64_FORMAT, ++qmp->last_id);
    msg = json_object_new_object();
    qmp_json_set_string(msg, "execute", command);
    if (arguments) {
        json_object_object_add(msg, "arguments", arguments);
    }
    qmp_json_set_string(msg, "id", id);
    text = json_object_to_json_string_ext(msg, JSON_C_TO_STRING_PLAIN);
    trace_line("->", text);
    /* The newline is a TLS record of its own: QEMU 7.2's monitor reads a
     * byte at a time, woken by its socket, so a command's last bytes
     * would wait in gnutls's buffer until the next record came. */
    ok = send_all(qmp, text, strlen(text), deadline, error) &&
         send_all(qmp, "\n", 1, deadline, error);
    json_object_put(msg);
    if (!ok) {
        return NULL;
    }

    for (;;) {
        bool timed_out;
        json_object *reply = read_message(qmp, deadline, &timed_out, error);
        json_object *ret;

        /* events that keep coming do not extend the wait */
        if (!timed_out && reply && g_get_monotonic_time() > deadline &&
            (is_event(reply) || !reply_has_id(reply, id))) {
            json_object_put(reply);
            timed_out = true;
        }
        if (timed_out) {
            qmp->silent++;
            g_set_error(error, QMP_ERROR, QMP_ERROR_TIMEOUT,
                        "%s did not answer '%s' within %d ms", peer(qmp),
                        command, qmp->timeout_ms);
            return NULL;
        }
        if (!reply) {
            return NULL;
        }
        if (is_event(reply)) {
            queue_event(qmp, reply);
            continue;
        }
        if (!reply_has_id(reply, id)) {
            /* The late answer to a command that timed out. */
            json_object_put(reply);
            continue;
        }
        if (json_object_object_get_ex(reply, "return", &ret)) {
            ret = json_object_get(ret);
            json_object_put(reply);
            return ret ? ret : json_object_new_object();
        }
        set_command_error(reply, command, error);
        json_object_put(reply);
        return NULL;
    }
}

bool qmp_run(QmpClient *qmp, const char *command, json_object *arguments,
             GError **error)
{
    json_object *ret = qmp_execute(qmp, command, arguments, error);

    json_object_put(ret);
    return ret != NULL;
}

char *qmp_qom_get_string(QmpClient *qmp, const char *path, const char *property)
{
    json_object *args = json_object_new_object();
    json_object *v;
    char *s = NULL;

    qmp_json_set_string(args, "path", path);
    qmp_json_set_string(args, "property", property);
    v = qmp_execute(qmp, "qom-get", args, NULL);
    if (v && json_object_is_type(v, json_type_string)) {
        s = g_strdup(json_object_get_string(v));
    }
    json_object_put(v);
    return s;
}

json_object *qmp_list_objects(QmpClient *qmp, GError **error)
{
    g_autoptr(GError) local = NULL;
    json_object *args = json_object_new_object();
    json_object *list;

    qmp_json_set_string(args, "path", "/objects");
    list = qmp_execute(qmp, "qom-list", args, &local);
    if (!list && g_error_matches(local, QMP_COMMAND_ERROR,
                                 QMP_COMMAND_ERROR_DEVICE_NOT_FOUND)) {
        return json_object_new_array();
    }
    if (!list) {
        g_propagate_error(error, g_steal_pointer(&local));
    }
    return list;
}

char *qmp_hmp(QmpClient *qmp, const char *command_line, GError **error)
{
    json_object *args = json_object_new_object();
    json_object *ret;
    char *out;

    qmp_json_set_string(args, "command-line", command_line);
    ret = qmp_execute(qmp, "human-monitor-command", args, error);
    if (!ret) {
        return NULL;
    }
    out = g_strdup(json_object_get_string(ret));
    json_object_put(ret);
    return out;
}

static bool event_matches(json_object *event, const char *name,
                          QmpEventMatch match, void *opaque)
{
    const char *have;

    if (qmp_message_kind(event, &have) != QMP_MESSAGE_EVENT ||
        (name && strcmp(have, name) != 0)) {
        return false;
    }
    return !match || match(event, opaque);
}

json_object *qmp_wait_event(QmpClient *qmp, const char *name,
                            QmpEventMatch match, void *opaque, int timeout_ms,
                            GError **error)
{
    gint64 deadline =
        deadline_in(timeout_ms > 0 ? timeout_ms : qmp->timeout_ms);

    for (GList *l = qmp->events.head; l; l = l->next) {
        if (event_matches(l->data, name, match, opaque)) {
            json_object *event = l->data;

            g_queue_delete_link(&qmp->events, l);
            return event;
        }
    }
    for (;;) {
        bool timed_out;
        json_object *msg = read_message(qmp, deadline, &timed_out, error);

        if (!timed_out && msg && g_get_monotonic_time() > deadline &&
            !event_matches(msg, name, match, opaque)) {
            json_object_put(msg);
            timed_out = true;
        }
        if (timed_out) {
            g_set_error(error, QMP_ERROR, QMP_ERROR_TIMEOUT,
                        "no %s event within %d ms", name ? name : "QMP",
                        timeout_ms > 0 ? timeout_ms : qmp->timeout_ms);
            return NULL;
        }
        if (!msg) {
            return NULL;
        }
        if (!is_event(msg)) {
            json_object_put(msg); /* stale reply */
            continue;
        }
        if (event_matches(msg, name, match, opaque)) {
            return msg;
        }
        queue_event(qmp, msg);
    }
}

bool qmp_poll_events(QmpClient *qmp, GError **error)
{
    /* what has arrived, not a flood that keeps coming */
    for (guint n = 0; n < QMP_MAX_EVENTS; n++) {
        bool timed_out;
        json_object *msg =
            read_message(qmp, g_get_monotonic_time() + 1, &timed_out, error);

        if (timed_out) {
            return true;
        }
        if (!msg) {
            return false;
        }
        if (is_event(msg)) {
            queue_event(qmp, msg);
        } else {
            json_object_put(msg);
        }
    }
    return true;
}

guint qmp_pending_events(QmpClient *qmp)
{
    return g_queue_get_length(&qmp->events);
}

json_object *qmp_pop_event(QmpClient *qmp)
{
    return g_queue_pop_head(&qmp->events);
}
