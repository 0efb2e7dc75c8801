/*
 * Private to lib/qmp: the client's state, shared by qmp.c and daemon.c.
 */
#ifndef QBK_QMP_INTERNAL_H
#define QBK_QMP_INTERNAL_H

#include "qmp.h"

struct QmpClient {
    /* initialized once at connect and never changed */
    int fd;                  /* connected socket, non-blocking */
    char *address;           /* as given, for messages */
    int major, minor, micro; /* QEMU version from the greeting */

    /* changed by every exchange */
    int timeout_ms;  /* default bound of every wait */
    GString *inbuf;  /* received bytes not yet forming a whole line */
    GQueue events;   /* json_object*, owned, in arrival order */
    guint64 last_id; /* ids are "qbk-<n>"; older replies are stale */
    bool closed;     /* peer went away: every later call fails at once */

    /* set only for a qemu-storage-daemon that this client started */
    GPid daemon_pid;  /* 0 when not ours */
    bool daemon_quit; /* "quit" sent: only the exit is left to wait for */
    char *daemon_dir; /* private temp dir: socket and the daemon's stderr */
};

#endif /* QBK_QMP_INTERNAL_H */
