/*
 * lib/util: what the other modules need from the operating system, done
 * once: private directories that are cleaned up even when their owner is
 * killed, and child processes (qemu-img, qemu-nbd, qemu-storage-daemon)
 * that die with us, create files owner-only and are stopped the same way.
 * It knows nothing of QEMU's protocol or of backups.
 */
#ifndef QBK_UTIL_H
#define QBK_UTIL_H

#include <stdbool.h>

#include <glib.h>
#include <json-c/json.h>

#define UTIL_ERROR util_error_quark()
GQuark util_error_quark(void);

typedef enum {
    UTIL_ERROR_IO,     /* a file or directory operation failed */
    UTIL_ERROR_SPAWN,  /* a program could not be started */
    UTIL_ERROR_EXIT,   /* a program failed; the message is its stderr */
    UTIL_ERROR_OUTPUT, /* a program's output is not what was expected */
} UtilErrorCode;

/* ---- sockets (net.c) ---- */

typedef enum {
    UTIL_SOCKET_CONNECT, /* connected to the socket at the path */
    UTIL_SOCKET_LISTEN,  /* bound at the path and listening */
} UtilSocketRole;

/*
 * A unix stream socket (close-on-exec) at PATH in ROLE, or -1 with errno
 * set (ENAMETOOLONG: PATH does not fit a socket address).
 */
int util_unix_socket(const char *path, UtilSocketRole role);

/* Whether FD is an IPv4 or IPv6 socket (TCP, for our stream sockets). */
bool util_is_tcp(int fd);

/*
 * Acknowledge what arrives on TCP socket FD at once. QEMU 7.2 writes some
 * messages (QMP answers, NBD handshake replies) in more than one write
 * without TCP_NODELAY: each later part waits for the ACK of the earlier,
 * which Linux delays by 40 ms. The kernel leaves quick-ACK mode on its
 * own, so callers ask again before each wait for QEMU.
 */
void util_quick_ack(int fd);

/* ---- private directories (privdir.c) ---- */

/*
 * A directory PARENT/qbk-WHAT-XXXXXX, mode 0700, that holds sockets, logs
 * and scratch images of one run. Its owner holds a lock on it for as long
 * as the PrivDir lives; a directory whose lock is free belongs to a process
 * that is gone, and privdir_reap() removes it.
 */
typedef struct PrivDir PrivDir;

/*
 * Make a private directory in PARENT (NULL: the temporary directory),
 * after removing those that dead processes left there. WHAT is a short
 * lowercase word saying what it holds ("pull", "qsd", "scratch").
 */
PrivDir *privdir_new(const char *parent, const char *what, GError **error);

/* Its absolute path. */
const char *privdir_path(const PrivDir *d);

/* The path of NAME inside it (new string). */
char *privdir_file(const PrivDir *d, const char *name);

/* Remove it with the files in it, and drop the lock. NULL: nothing. */
void privdir_free(PrivDir *d);
G_DEFINE_AUTOPTR_CLEANUP_FUNC(PrivDir, privdir_free)

/*
 * Remove the private directories in PARENT (NULL: the temporary directory)
 * whose owner is gone: only directories of ours, named as privdir_new()
 * names them, never through a symbolic link. Returns how many went.
 */
guint privdir_reap(const char *parent);

/* The temporary directory ($TMPDIR or /tmp), absolute (new string). */
char *util_tmp_dir(void);

/* ---- child processes (child.c) ---- */

/*
 * The child setup of every process qbk starts (GSpawnChildSetupFunc): it
 * gets SIGTERM when we die, and makes its files owner-only (umask 077)
 * whatever our caller's umask.
 */
void util_child_setup(gpointer unused);

/*
 * Wait up to TIMEOUT_MS for child PID to exit. Returns its wait status, or
 * -1 if it is still running.
 */
int util_child_wait(GPid pid, int timeout_ms);

/*
 * Wait until FILE exists (a pid file that a server writes once it serves)
 * or child PID exits, at most TIMEOUT_MS. True once FILE is there; else
 * *STATUS is the child's wait status (it exited and is reaped) or -1 (it
 * is still running: the time is up).
 */
bool util_child_wait_file(GPid pid, const char *file, int timeout_ms,
                          int *status);

/*
 * End child PID: give it GRACE_MS to exit by itself, then SIGTERM and
 * STOP_MS, then SIGKILL. Returns its wait status (never leaves a zombie).
 */
int util_child_stop(GPid pid, int grace_ms, int stop_ms);

/*
 * Run ARGV (the program is looked up in PATH) in directory CWD (NULL: ours)
 * and wait for it. Its standard output goes to *OUT (may be NULL). Fails
 * with UTIL_ERROR_EXIT and its standard error as the message unless it
 * exits with status 0.
 */
bool util_run(const char *const *argv, const char *cwd, char **out,
              GError **error);

/*
 * Run N programs at once (ARGVS[i] in directory CWDS[i]; CWDS may be NULL)
 * and wait for all of them; their output is dropped. Fails with the first
 * failure (as util_run) once every one that started has ended.
 */
bool util_run_all(const char *const *const *argvs, const char *const *cwds,
                  guint n, GError **error);

/*
 * Start ARGV with a unix socket bound at SOCKET and already listening as
 * its file descriptor 3; ACTIVATION also sets LISTEN_FDS=1 and LISTEN_PID
 * (systemd's socket activation, which qemu-nbd follows; QEMU's own
 * programs take "fd=3" in a chardev instead). Clients can connect from the
 * moment this returns, before the program runs: there is no window in
 * which the socket file exists but refuses connections. Its stdout and
 * stderr go to LOG_FD.
 */
bool util_spawn_on_socket(const char *const *argv, const char *socket,
                          bool activation, int log_fd, GPid *pid,
                          GError **error);

/*
 * A unix socket bound at PATH and listening (close-on-exec), or -1.
 */
int util_listen_unix(const char *path, GError **error);

/* ---- qemu-img (qemu-img.c) ---- */

/* How long LUKS's key derivation takes on this machine for each image of
 * an encrypted repository, at its creation and at every open (ms). */
#define UTIL_LUKS_ITER_MS 100

/* QEMU 7.2's LUKS times its key derivation on the thread's CPU clock and
 * gives up ("Unable to get accurate CPU usage") when that clock has not
 * moved, as happens on a kernel with coarse CPU accounting and a fast
 * SHA-256 (a quarter of the runs on the test machine). Whether ERROR is
 * that; such a creation is tried again, up to UTIL_LUKS_RETRIES times. */
#define UTIL_LUKS_RETRIES 10
bool util_luks_timing_failed(const GError *error);

/* Run CREATE(DATA) until it succeeds or fails other than by LUKS's timing,
 * that at most UTIL_LUKS_RETRIES more times (CREATE must start afresh each
 * time: overwrite its file, remake its node). */
typedef bool (*UtilCreateFunc)(void *data, GError **error);
bool util_luks_retry(UtilCreateFunc create, void *data, GError **error);

/* QEMU's --object for a secret ID that QEMU reads from FILE itself (new
 * string; JSON, so that no character of the path needs escaping). */
char *util_secret_object(const char *id, const char *file);

/* The id of the secret that holds an encrypted repository's key, in every
 * QEMU process that opens its images (qemu-img, qemu-nbd, daemons). */
#define UTIL_KEY_SECRET "qbk-key"

/* N bytes as 2 * N lowercase hex digits (new string). */
char *util_hex(const guint8 *bytes, gsize n);

/* A qcow2 image to make: IMAGE of SIZE bytes on BACKING (a file name
 * relative to IMAGE's directory, or NULL) of BACKING_FORMAT; COMPRESS:
 * its compressed clusters are zstd's (compression_type=zstd); KEY_FILE:
 * LUKS-encrypted with the passphrase in that file (secret KEY_SECRET). */
typedef struct {
    const char *image;
    guint64 size;
    const char *backing;
    const char *backing_format; /* NULL: qcow2 */
    bool compress;
    const char *key_file;
    const char *key_secret;
} QemuImgCreate;

/*
 * Create the N images of IMGS at once (qemu-img each, run concurrently).
 * No image may exist: each is created here exclusively, owner-only, never
 * through a symbolic link. On failure none is left.
 */
bool qemu_img_create_all(const QemuImgCreate *imgs, guint n, GError **error);

/* Run "qemu-img ARGS[0] --output=json ARGS[1..]" and parse its answer (new
 * reference); UTIL_ERROR_EXIT with qemu-img's message if it fails. */
json_object *qemu_img_json(const char *const *args, GError **error);

#endif /* QBK_UTIL_H */
