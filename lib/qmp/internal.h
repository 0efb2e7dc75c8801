/*
 * Private to lib/qmp: the client's state, shared by qmp.c and daemon.c.
 */
#ifndef QBK_QMP_INTERNAL_H
#define QBK_QMP_INTERNAL_H

#include <gio/gio.h>

#include "qmp.h"
#include "util.h"

/* The longest line accepted from QEMU (query-named-block-nodes of a VM
 * with many disks and bitmaps is the largest answer: well under this). */
#define QMP_MAX_LINE (64 * 1024 * 1024)

/* Events kept while nobody waits for them; the oldest go first. */
#define QMP_MAX_EVENTS 1024

/* ---- framing (framing.c) ---- */

typedef struct {
    GString *buf;   /* received bytes not yet forming a whole line */
    gsize max_line; /* longer lines are an error */
} QmpFramer;

void qmp_framer_init(QmpFramer *f, gsize max_line);
void qmp_framer_clear(QmpFramer *f);
void qmp_framer_push(QmpFramer *f, const char *data, gsize len);

/* The next message: 1 with *MSG (a JSON object, new reference), 0 if no
 * whole line has arrived, -1 with ERROR on a line that is too long or not
 * one JSON object (that line is dropped). */
int qmp_framer_next(QmpFramer *f, json_object **msg, GError **error);

typedef enum {
    QMP_MESSAGE_BAD,      /* none of these, or of the wrong types */
    QMP_MESSAGE_GREETING, /* {"QMP": ...} */
    QMP_MESSAGE_REPLY,    /* {"return": ...} or {"error": ...} */
    QMP_MESSAGE_EVENT,    /* {"event": NAME, ...}; *NAME set */
} QmpMessageKind;

QmpMessageKind qmp_message_kind(json_object *msg, const char **name);

struct QmpClient {
    /* initialized once at connect and never changed */
    int fd;                  /* connected socket, non-blocking */
    bool tcp;                /* tcp: or tls: (ACKs sent at once) */
    char *address;           /* as given, for messages */
    int major, minor, micro; /* QEMU version from the greeting */

    /* changed by every exchange */
    int timeout_ms;         /* default bound of every wait */
    QmpFramer framer;       /* received bytes not yet forming a whole line */
    GQueue events;          /* json_object*, owned, in arrival order, at most
                         QMP_MAX_EVENTS */
    guint64 events_dropped; /* the oldest, beyond QMP_MAX_EVENTS */
    guint64 last_id;        /* ids are "qbk-<n>"; older replies are stale */
    bool closed;            /* peer went away: every later call fails at once */
    guint silent;           /* commands in a row that timed out with not a
                               line from the peer since */
    bool agent;             /* a guest agent, not QEMU (qmp_connect_agent) */
    GIOStream *tls;         /* "tls:" addresses: the session over fd */
    GSocket *fd_owner;      /* with tls: owns (and closes) fd */

    /* set only for a qemu-storage-daemon that this client started */
    void (*stop)(QmpClient *qmp); /* called by qmp_free (daemon.c) */
    GPid daemon_pid;              /* 0 when not ours */
    bool daemon_quit;    /* "quit" sent: only the exit is left to wait for */
    PrivDir *daemon_dir; /* socket and the daemon's stderr */
};

/* Milliseconds from now to DEADLINE (monotonic, us), rounded up; 0 if it
 * has passed: a poll() timeout. */
int qmp_ms_left(gint64 deadline);

/* ---- TLS (tls.c) ---- */

/* A TLS session over QMP->fd, connected to HOST_PORT, with the
 * credentials in DIR (ca-cert.pem, client-cert.pem, client-key.pem),
 * handshaken within TIMEOUT_MS. */
bool qmp_tls_start(QmpClient *qmp, const char *host_port, const char *dir,
                   int timeout_ms, GError **error);

/* Read (write) what can be without waiting past DEADLINE: the bytes, 0 at
 * end of stream (read), -2 on timeout, -1 with ERROR. */
gssize qmp_tls_read(QmpClient *qmp, char *buf, gsize len, gint64 deadline,
                    GError **error);
gssize qmp_tls_write(QmpClient *qmp, const char *data, gsize len,
                     gint64 deadline, GError **error);

/* End the session and close the socket. */
void qmp_tls_close(QmpClient *qmp);

#endif /* QBK_QMP_INTERNAL_H */
