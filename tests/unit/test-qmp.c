/*
 * lib/qmp against a real QEMU: greeting, returns, errors with their class,
 * events queued during a command, waits with timeouts, QEMU dying, and
 * transactions. Peers that misbehave in ways QEMU never does (garbage,
 * silence, a late reply) are played by a socket in this process.
 */
#include <signal.h>
#include <stdio.h>
#include <sys/prctl.h>
#include <string.h>
#include <sys/socket.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>

#include "qmp.h"
#include "util.h"

typedef struct {
    char *dir;
    char *sock;
    char *image;
    GPid pid;
} Vm;

/* QEMU must not outlive a test that aborted on a failed assertion. */
static void die_with_parent(gpointer data)
{
    prctl(PR_SET_PDEATHSIG, SIGKILL);
}

/*
 * QEMU binds its monitor socket before it listens on it: the file exists a
 * moment before a connect() succeeds. Wait for a connection, not the file.
 * The probe's hang-up is handled before QEMU accepts the next client.
 */
static bool socket_listens(const char *path)
{
    for (int i = 0; i < 500; i++) {
        int fd = util_unix_socket(path, UTIL_SOCKET_CONNECT);

        if (fd >= 0) {
            close(fd);
            return true;
        }
        g_usleep(10000);
    }
    return false;
}

static void vm_start(Vm *vm)
{
    g_autoptr(GError) error = NULL;
    g_autofree char *qmparg = NULL;
    g_autofree char *drive = NULL;
    g_autofree char *img_cmd = NULL;
    int status;

    vm->dir = g_dir_make_tmp("qbk-test-qmp-XXXXXX", &error);
    g_assert_no_error(error);
    vm->sock = g_build_filename(vm->dir, "qmp.sock", NULL);
    vm->image = g_build_filename(vm->dir, "d.qcow2", NULL);
    img_cmd = g_strdup_printf("qemu-img create -q -f qcow2 %s 16M", vm->image);
    g_assert_true(
        g_spawn_command_line_sync(img_cmd, NULL, NULL, &status, &error));
    g_assert_no_error(error);
    g_assert_cmpint(status, ==, 0);

    qmparg = g_strdup_printf("unix:%s,server=on,wait=off", vm->sock);
    drive = g_strdup_printf("file=%s,format=qcow2,if=none,id=d0,"
                            "node-name=d0-fmt",
                            vm->image);
    const char *argv[] = {
        "qemu-system-x86_64",
        "-M",
        "q35",
        "-S",
        "-display",
        "none",
        "-nodefaults",
        "-no-user-config",
        "-qmp",
        qmparg,
        "-drive",
        drive,
        "-device",
        "virtio-blk-pci,drive=d0,id=disk0",
        NULL,
    };
    g_assert_true(g_spawn_async(NULL, (char **)argv, NULL,
                                G_SPAWN_SEARCH_PATH | G_SPAWN_DO_NOT_REAP_CHILD,
                                die_with_parent, NULL, &vm->pid, &error));
    g_assert_no_error(error);
    g_assert_true(socket_listens(vm->sock));
}

static void vm_stop(Vm *vm)
{
    int status;

    if (vm->pid > 0) {
        kill(vm->pid, SIGKILL);
        waitpid(vm->pid, &status, 0);
    }
    unlink(vm->sock);
    unlink(vm->image);
    rmdir(vm->dir);
    g_free(vm->dir);
    g_free(vm->sock);
    g_free(vm->image);
}

/* Each test gets its own QEMU and a connected client. */
typedef struct {
    Vm vm;
    QmpClient *qmp;
} Fixture;

static void fixture_setup(Fixture *f, gconstpointer data)
{
    g_autoptr(GError) error = NULL;

    vm_start(&f->vm);
    f->qmp = qmp_connect(f->vm.sock, 10000, &error);
    g_assert_no_error(error);
    g_assert_nonnull(f->qmp);
}

static void fixture_teardown(Fixture *f, gconstpointer data)
{
    qmp_free(f->qmp);
    vm_stop(&f->vm);
}

/* COMMAND with ARGS (JSON text, or NULL), which must succeed. */
static void run_ok(QmpClient *qmp, const char *command, const char *args)
{
    g_autoptr(GError) error = NULL;

    g_assert_true(
        qmp_run(qmp, command, args ? json_tokener_parse(args) : NULL, &error));
    g_assert_no_error(error);
}

/* Kill QEMU as a crash would. */
static void vm_kill(Vm *vm)
{
    int status;

    kill(vm->pid, SIGKILL);
    waitpid(vm->pid, &status, 0);
    vm->pid = 0;
}

static void test_greeting_and_return(Fixture *f, gconstpointer data)
{
    g_autoptr(GError) error = NULL;
    QmpClient *qmp = f->qmp;
    json_object *ret, *status;
    int major = -1;

    qmp_get_version(qmp, &major, NULL, NULL);
    g_assert_cmpint(major, >=, 4);
    ret = qmp_execute(qmp, "query-status", NULL, &error);
    g_assert_no_error(error);
    g_assert_true(json_object_object_get_ex(ret, "status", &status));
    g_assert_cmpstr(json_object_get_string(status), ==, "prelaunch");
    json_object_put(ret);
    /* An empty return is an empty object, not NULL. */
    ret = qmp_execute(qmp, "stop", NULL, &error);
    g_assert_no_error(error);
    g_assert_true(json_object_is_type(ret, json_type_object));
    json_object_put(ret);
}

static void test_error_class(Fixture *f, gconstpointer data)
{
    g_autoptr(GError) error = NULL;
    QmpClient *qmp = f->qmp;

    g_assert_null(qmp_execute(qmp, "no-such-command", NULL, &error));
    g_assert_error(error, QMP_COMMAND_ERROR,
                   QMP_COMMAND_ERROR_COMMAND_NOT_FOUND);
    g_assert_cmpstr(qmp_error_class(error), ==, "CommandNotFound");
    g_assert_nonnull(strstr(error->message, "no-such-command"));
    g_clear_error(&error);

    g_assert_false(qmp_run(qmp, "block-dirty-bitmap-add",
                           json_tokener_parse("{\"node\": \"nope\", "
                                              "\"name\": \"x\"}"),
                           &error));
    g_assert_error(error, QMP_COMMAND_ERROR, QMP_COMMAND_ERROR_GENERIC);
    g_assert_cmpstr(qmp_error_class(error), ==, "GenericError");
    g_clear_error(&error);

    /* The connection is still good after an error. */
    run_ok(qmp, "query-status", NULL);
}

static bool is_resume(json_object *event, void *opaque)
{
    json_object *name;

    (*(int *)opaque)++;
    json_object_object_get_ex(event, "event", &name);
    return strcmp(json_object_get_string(name), "RESUME") == 0;
}

static void test_events_queued(Fixture *f, gconstpointer data)
{
    g_autoptr(GError) error = NULL;
    QmpClient *qmp = f->qmp;
    json_object *event, *name;
    int calls = 0;

    /* QEMU sends RESUME before the reply to "cont", STOP before "stop". */
    run_ok(qmp, "cont", NULL);
    run_ok(qmp, "stop", NULL);
    g_assert_cmpuint(qmp_pending_events(qmp), ==, 2);

    /* Waiting for the second one leaves the first queued, in order. */
    event = qmp_wait_event(qmp, "STOP", NULL, NULL, 1000, &error);
    g_assert_no_error(error);
    g_assert_nonnull(event);
    json_object_put(event);
    g_assert_cmpuint(qmp_pending_events(qmp), ==, 1);
    event = qmp_wait_event(qmp, NULL, is_resume, &calls, 1000, &error);
    g_assert_no_error(error);
    g_assert_true(json_object_object_get_ex(event, "event", &name));
    g_assert_cmpstr(json_object_get_string(name), ==, "RESUME");
    g_assert_cmpint(calls, ==, 1);
    json_object_put(event);
    g_assert_cmpuint(qmp_pending_events(qmp), ==, 0);

    /* An event that never comes: a bounded wait. */
    g_assert_null(
        qmp_wait_event(qmp, "BLOCK_JOB_COMPLETED", NULL, NULL, 200, &error));
    g_assert_error(error, QMP_ERROR, QMP_ERROR_TIMEOUT);
    g_clear_error(&error);

    /* Events that arrive while nobody waits are kept. */
    run_ok(qmp, "cont", NULL);
    g_assert_true(qmp_poll_events(qmp, &error));
    g_assert_cmpuint(qmp_pending_events(qmp), ==, 1);
    event = qmp_pop_event(qmp);
    g_assert_nonnull(event);
    json_object_put(event);
    g_assert_null(qmp_pop_event(qmp));
}

static void test_qemu_dies(Fixture *f, gconstpointer data)
{
    g_autoptr(GError) error = NULL;
    QmpClient *qmp = f->qmp;

    vm_kill(&f->vm);
    /* Mid-wait or on the next command: a clean error, then fail fast. */
    g_assert_null(qmp_wait_event(qmp, "SHUTDOWN", NULL, NULL, 5000, &error));
    g_assert_error(error, QMP_ERROR, QMP_ERROR_CLOSED);
    g_clear_error(&error);
    g_assert_false(qmp_run(qmp, "query-status", NULL, &error));
    g_assert_error(error, QMP_ERROR, QMP_ERROR_CLOSED);
}

static void test_quit_mid_command(Fixture *f, gconstpointer data)
{
    g_autoptr(GError) error = NULL;
    QmpClient *qmp = f->qmp;
    int status;

    /* "quit" answers and exits; the next command finds the socket closed. */
    qmp_run(qmp, "quit", NULL, NULL);
    waitpid(f->vm.pid, &status, 0);
    f->vm.pid = 0;
    g_assert_false(qmp_run(qmp, "query-status", NULL, &error));
    g_assert_error(error, QMP_ERROR, QMP_ERROR_CLOSED);
}

static void test_transaction_atomic(Fixture *f, gconstpointer data)
{
    g_autoptr(GError) error = NULL;
    QmpClient *qmp = f->qmp;
    g_autoptr(QmpTransaction) tx = qmp_transaction_new();
    g_autoptr(QmpTransaction) ok_tx = qmp_transaction_new();
    g_autoptr(GPtrArray) disks = NULL;
    QmpDisk *disk;

    qmp_transaction_add(tx, "block-dirty-bitmap-add",
                        json_tokener_parse("{\"node\": \"d0-fmt\", "
                                           "\"name\": \"first\"}"));
    qmp_transaction_add(tx, "block-dirty-bitmap-add",
                        json_tokener_parse("{\"node\": \"missing\", "
                                           "\"name\": \"second\"}"));
    g_assert_cmpuint(qmp_transaction_length(tx), ==, 2);
    g_assert_false(qmp_transaction_run(qmp, tx, &error));
    g_assert_error(error, QMP_COMMAND_ERROR, QMP_COMMAND_ERROR_GENERIC);
    g_clear_error(&error);

    disks = qmp_query_disks(qmp, &error);
    g_assert_no_error(error);
    g_assert_cmpuint(disks->len, ==, 1);
    disk = disks->pdata[0];
    g_assert_cmpstr(disk->id, ==, "disk0");
    g_assert_cmpstr(disk->node, ==, "d0-fmt");
    g_assert_cmpstr(disk->driver, ==, "qcow2");
    g_assert_cmpuint(disk->size, ==, 16 << 20);
    g_assert_null(disk->no_bitmaps);
    g_assert_cmpuint(disk->bitmaps->len, ==, 0); /* "first" rolled back */
    g_assert_nonnull(qmp_disk_find(disks, "d0"));
    g_assert_nonnull(qmp_disk_find(disks, "/machine/peripheral/disk0/"
                                          "virtio-backend"));
    g_assert_null(qmp_disk_find(disks, "disk9"));
    g_clear_pointer(&disks, g_ptr_array_unref);

    /* An empty transaction is a no-op; a good one applies. */
    g_assert_true(qmp_transaction_run(qmp, ok_tx, &error));
    qmp_transaction_add(ok_tx, "block-dirty-bitmap-add",
                        json_tokener_parse("{\"node\": \"d0-fmt\", "
                                           "\"name\": \"first\"}"));
    g_assert_true(qmp_transaction_run(qmp, ok_tx, &error));
    g_assert_no_error(error);
    disks = qmp_query_disks(qmp, &error);
    g_assert_nonnull(qmp_disk_bitmap(disks->pdata[0], "first"));
    g_assert_true(((QmpBitmap *)((QmpDisk *)disks->pdata[0])->bitmaps->pdata[0])
                      ->recording);
}

/* A throttle filter "thr" (group "tg") between disk0 and its node d0-fmt. */
static void put_throttle(QmpClient *qmp)
{
    run_ok(qmp, "object-add",
           "{\"qom-type\": \"throttle-group\", \"id\": \"tg\"}");
    run_ok(qmp, "blockdev-add",
           "{\"driver\": \"throttle\", \"node-name\": \"thr\", "
           "\"throttle-group\": \"tg\", \"file\": \"d0-fmt\"}");
    run_ok(qmp, "qom-set",
           "{\"path\": \"disk0\", \"property\": \"drive\", "
           "\"value\": \"thr\"}");
}

/* Where a filter goes above a node, from one read of the block graph:
 * under its device, under a pass-through filter, nowhere for a node with
 * two users or none; a graph read before a change still shows the old. */
static void test_insert_points(Fixture *f, gconstpointer data)
{
    g_autoptr(GError) error = NULL;
    g_autoptr(QmpBlockGraph) before = NULL;
    g_autoptr(QmpBlockGraph) after = NULL;
    QmpClient *qmp = f->qmp;
    QmpInsertPoint pt;

    before = qmp_block_graph_get(qmp, &error);
    g_assert_no_error(error);
    g_assert_true(qmp_insert_point(before, "d0-fmt", &pt, &error));
    g_assert_no_error(error);
    g_assert_cmpstr(pt.qom, ==, "/machine/peripheral/disk0");
    g_assert_null(pt.reopen);
    g_assert_nonnull(pt.file); /* the protocol node under the format */
    qmp_insert_point_clear(&pt);
    g_assert_false(qmp_insert_point(before, "nope", &pt, &error));
    g_assert_error(error, QMP_ERROR, QMP_ERROR_PROTOCOL);
    g_assert_nonnull(strstr(error->message, "no block node 'nope'"));
    g_clear_error(&error);

    /* A throttle filter between device and disk; a node nobody uses. */
    put_throttle(qmp);
    run_ok(qmp, "blockdev-add",
           "{\"driver\": \"null-co\", \"node-name\": \"lone\"}");
    after = qmp_block_graph_get(qmp, &error);
    g_assert_no_error(error);
    g_assert_true(qmp_insert_point(after, "d0-fmt", &pt, &error));
    g_assert_null(pt.qom);
    g_assert_nonnull(pt.reopen);
    g_assert_cmpstr(qmp_json_string(pt.reopen, "driver"), ==, "throttle");
    g_assert_cmpstr(qmp_json_string(pt.reopen, "throttle-group"), ==, "tg");
    qmp_insert_point_clear(&pt);
    g_assert_true(qmp_insert_point(after, "lone", &pt, &error));
    g_assert_true(!pt.qom && !pt.reopen);
    qmp_insert_point_clear(&pt);
    /* the earlier read is a snapshot: it still has the device */
    g_assert_true(qmp_insert_point(before, "d0-fmt", &pt, &error));
    g_assert_cmpstr(pt.qom, ==, "/machine/peripheral/disk0");
    qmp_insert_point_clear(&pt);

    /* A second user: no place above the node sees every write. */
    run_ok(qmp, "blockdev-add",
           "{\"driver\": \"throttle\", \"node-name\": \"thr2\", "
           "\"throttle-group\": \"tg\", \"file\": \"d0-fmt\"}");
    g_clear_pointer(&after, qmp_block_graph_free);
    after = qmp_block_graph_get(qmp, &error);
    g_assert_no_error(error);
    g_assert_false(qmp_insert_point(after, "d0-fmt", &pt, &error));
    g_assert_error(error, QMP_ERROR, QMP_ERROR_PROTOCOL);
    g_assert_nonnull(strstr(error->message, "has 2 users"));
    g_assert_true(!pt.qom && !pt.reopen && !pt.file);
}

static void test_filter_looked_through(Fixture *f, gconstpointer data)
{
    g_autoptr(GError) error = NULL;
    QmpClient *qmp = f->qmp;
    g_autoptr(GPtrArray) disks = NULL;

    put_throttle(qmp);
    disks = qmp_query_disks(qmp, &error);
    g_assert_no_error(error);
    g_assert_cmpuint(disks->len, ==, 1);
    g_assert_cmpstr(((QmpDisk *)disks->pdata[0])->node, ==, "d0-fmt");
}

static void test_storage_daemon(Fixture *f, gconstpointer data)
{
    g_autoptr(GError) error = NULL;
    g_autoptr(GPtrArray) disks = NULL;
    QmpClient *qmp;
    const char *images[2] = { NULL, NULL };
    const char *nodes[] = { "img0", NULL };
    const char *ids[] = { "the-image", NULL };

    /* Only the image is needed: stop the VM first so it is not locked. */
    vm_kill(&f->vm);
    images[0] = f->vm.image;
    qmp = qmp_spawn_storage_daemon(images, 0, NULL, 10000, &error);
    g_assert_no_error(error);
    disks = qmp_query_node_disks(qmp, nodes, ids, &error);
    g_assert_no_error(error);
    g_assert_cmpstr(((QmpDisk *)disks->pdata[0])->id, ==, "the-image");
    g_assert_cmpstr(((QmpDisk *)disks->pdata[0])->driver, ==, "qcow2");
    run_ok(qmp, "block-dirty-bitmap-add",
           "{\"node\": \"img0\", \"name\": \"kept\", \"persistent\": true}");
    g_assert_true(qmp_stop_storage_daemon(qmp, &error));
    g_assert_no_error(error);
    qmp_free(qmp);

    /* The bitmap was written back, and the daemon's dir is gone. */
    qmp = qmp_spawn_storage_daemon(images, 0, NULL, 10000, &error);
    g_assert_no_error(error);
    g_clear_pointer(&disks, g_ptr_array_unref);
    disks = qmp_query_node_disks(qmp, nodes, ids, &error);
    g_assert_nonnull(qmp_disk_bitmap(disks->pdata[0], "kept"));
    qmp_free(qmp); /* stops it too */

    images[0] = "/nonexistent/x.qcow2";
    g_assert_null(qmp_spawn_storage_daemon(images, 0, NULL, 10000, &error));
    g_assert_error(error, QMP_ERROR, QMP_ERROR_SPAWN);
    g_assert_nonnull(strstr(error->message, "/nonexistent/x.qcow2"));
}

/* ---- scripted peers for what QEMU never does ---- */

/* Where a scripted peer listens: a unix socket in a private directory, or
 * 127.0.0.1 on a port of the kernel's choosing. */
typedef struct {
    char *dir;  /* the socket's directory; NULL over TCP */
    char *path; /* what the client connects to (tcp:127.0.0.1:PORT) */
    int lfd;    /* listening, made before the peer's thread runs */
} Listener;

/* Listen on L (over TCP if TCP), then run FN(DATA) in a thread. */
static GThread *listen_then_run(Listener *l, bool tcp, GThreadFunc fn,
                                gpointer data)
{
    if (tcp) {
        struct sockaddr_in in = { .sin_family = AF_INET,
                                  .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
        socklen_t len = sizeof(in);

        l->lfd = socket(AF_INET, SOCK_STREAM, 0);
        g_assert_cmpint(bind(l->lfd, (struct sockaddr *)&in, sizeof(in)), ==,
                        0);
        g_assert_cmpint(listen(l->lfd, 1), ==, 0);
        getsockname(l->lfd, (struct sockaddr *)&in, &len);
        l->path = g_strdup_printf("tcp:127.0.0.1:%u", ntohs(in.sin_port));
    } else {
        l->dir = g_dir_make_tmp("qbk-test-peer-XXXXXX", NULL);
        g_assert_nonnull(l->dir);
        l->path = g_build_filename(l->dir, "peer.sock", NULL);
        l->lfd = util_unix_socket(l->path, UTIL_SOCKET_LISTEN);
        g_assert_cmpint(l->lfd, >=, 0);
    }
    return g_thread_new("peer", fn, data);
}

/* Wait for the peer's thread T (it closes the sockets), then remove what
 * L made. */
static void join_and_clean(Listener *l, GThread *t)
{
    g_thread_join(t);
    if (l->dir) {
        unlink(l->path);
        rmdir(l->dir);
    }
    g_clear_pointer(&l->dir, g_free);
    g_clear_pointer(&l->path, g_free);
}

typedef struct {
    Listener l;
    const char *script; /* sent after accept; NULL: stay silent */
    bool reply_late;    /* answer the first command's id only after the
                           client has given up, then answer the second */
    bool mute;          /* answer qmp_capabilities, then nothing; count
                           the lines that come */
    int lines;          /* (mute) lines received after qmp_capabilities */
    bool tcp;           /* listen on 127.0.0.1, not a unix socket */
} Peer;

static gpointer peer_thread(gpointer data)
{
    Peer *peer = data;
    int lfd = peer->l.lfd;
    int fd;
    char buf[4096];

    fd = accept(lfd, NULL, NULL);
    if (peer->script) {
        g_assert_cmpint(write(fd, peer->script, strlen(peer->script)), >, 0);
    }
    if (peer->reply_late) {
        /* qmp_capabilities (qbk-1), then query-status (qbk-2) times out */
        g_assert_cmpint(read(fd, buf, sizeof(buf)), >, 0);
        const char *caps = "{\"return\": {}, \"id\": \"qbk-1\"}\r\n";
        g_assert_cmpint(write(fd, caps, strlen(caps)), >, 0);
        g_assert_cmpint(read(fd, buf, sizeof(buf)), >, 0);
        g_usleep(400 * 1000);
        /* then query-name (qbk-3): answer both in order */
        g_assert_cmpint(read(fd, buf, sizeof(buf)), >, 0);
        const char *late = "{\"return\": {\"status\": \"late\"}, "
                           "\"id\": \"qbk-2\"}\r\n"
                           "{\"return\": {\"name\": \"vm\"}, "
                           "\"id\": \"qbk-3\"}\r\n";
        g_assert_cmpint(write(fd, late, strlen(late)), >, 0);
    }
    if (peer->mute) {
        const char *caps = "{\"return\": {}, \"id\": \"qbk-1\"}\r\n";
        int newlines = 0;
        ssize_t n;

        /* count every line, however the reads cut them; the first is
         * qmp_capabilities, answered once it is whole */
        while ((n = read(fd, buf, sizeof(buf))) > 0) {
            for (ssize_t i = 0; i < n; i++) {
                if (buf[i] == '\n' && ++newlines == 1) {
                    g_assert_cmpint(write(fd, caps, strlen(caps)), >, 0);
                }
            }
        }
        peer->lines = MAX(newlines - 1, 0);
    }
    g_usleep(1500 * 1000);
    close(fd);
    close(lfd);
    return NULL;
}

static GThread *peer_start_with(Peer *peer, GThreadFunc fn)
{
    return listen_then_run(&peer->l, peer->tcp, fn, peer);
}

static GThread *peer_start(Peer *peer)
{
    return peer_start_with(peer, peer_thread);
}

static void peer_finish(Peer *peer, GThread *t)
{
    join_and_clean(&peer->l, t);
}

static void test_not_qmp(void)
{
    g_autoptr(GError) error = NULL;
    Peer peer = { .script = "SSH-2.0-OpenSSH_9.2\r\n" };
    GThread *t = peer_start(&peer);

    g_assert_null(qmp_connect(peer.l.path, 2000, &error));
    g_assert_error(error, QMP_ERROR, QMP_ERROR_PROTOCOL);
    g_assert_nonnull(strstr(error->message, "not a QMP socket"));
    peer_finish(&peer, t);

    g_clear_error(&error);
    peer = (Peer){ .script = "{\"hello\": 1}\r\n" };
    t = peer_start(&peer);
    g_assert_null(qmp_connect(peer.l.path, 2000, &error));
    g_assert_error(error, QMP_ERROR, QMP_ERROR_PROTOCOL);
    peer_finish(&peer, t);
}

static void test_silent_peer(void)
{
    g_autoptr(GError) error = NULL;
    Peer peer = { .script = NULL };
    GThread *t = peer_start(&peer);
    gint64 start = g_get_monotonic_time();

    g_assert_null(qmp_connect(peer.l.path, 300, &error));
    g_assert_error(error, QMP_ERROR, QMP_ERROR_TIMEOUT);
    /* bounded: well under the peer's 1.5 s */
    g_assert_cmpint(g_get_monotonic_time() - start, <, 1200 * 1000);
    peer_finish(&peer, t);
}

/* A guest agent, scripted: what a former client left, then the answer to
 * our guest-sync-delimited behind its 0xFF, then one command's answer. */
static gpointer agent_thread(gpointer data)
{
    Peer *peer = data;
    int fd = accept(peer->l.lfd, NULL, NULL);
    char buf[4096];
    ssize_t n;
    const char *id;
    guint64 token;
    g_autofree char *answer = NULL;
    const char *status = "{\"return\": \"thawed\", \"id\": \"qbk-1\"}\n";

    n = read(fd, buf, sizeof(buf) - 1);
    g_assert_cmpint(n, >, 0);
    buf[n] = 0;
    g_assert_cmpint((guchar)buf[0], ==, 0xff); /* the parser reset */
    id = strstr(buf, "\"id\": ");
    g_assert_nonnull(id);
    token = g_ascii_strtoull(id + 6, NULL, 10);
    answer = g_strdup_printf(
        "{\"error\": {\"class\": \"GenericError\", \"desc\": \"stray\"}}\n"
        "{\"return\": 12}\n"    /* a former client's, before our delimiter */
        "\xff{\"return\": 7}\n" /* another's late sync */
        "{\"return\": %" G_GUINT64_FORMAT "}\n",
        token);
    g_assert_cmpint(write(fd, answer, strlen(answer)), >, 0);
    g_assert_cmpint(read(fd, buf, sizeof(buf)), >, 0);
    g_assert_nonnull(g_strstr_len(buf, sizeof(buf), "guest-fsfreeze-status"));
    g_assert_cmpint(write(fd, status, strlen(status)), >, 0);
    g_usleep(300 * 1000);
    close(fd);
    close(peer->l.lfd);
    return NULL;
}

static void test_agent(void)
{
    g_autoptr(GError) error = NULL;
    Peer peer = { 0 };
    GThread *t;
    QmpClient *agent;
    json_object *ret;

    /* the handshake skips everything before the 0xFF and other tokens */
    t = peer_start_with(&peer, agent_thread);
    agent = qmp_connect_agent(peer.l.path, 2000, &error);
    g_assert_no_error(error);
    ret = qmp_execute(agent, "guest-fsfreeze-status", NULL, &error);
    g_assert_no_error(error);
    g_assert_cmpstr(json_object_get_string(ret), ==, "thawed");
    json_object_put(ret);
    qmp_free(agent);
    peer_finish(&peer, t);

    /* nobody answers (a guest without its agent): bounded, and says so */
    peer = (Peer){ .script = NULL };
    t = peer_start(&peer);
    g_assert_null(qmp_connect_agent(peer.l.path, 300, &error));
    g_assert_error(error, QMP_ERROR, QMP_ERROR_TIMEOUT);
    g_assert_nonnull(strstr(error->message, "is qemu-guest-agent running"));
    peer_finish(&peer, t);
}

static void test_late_reply_dropped(void)
{
    g_autoptr(GError) error = NULL;
    Peer peer = {
        .script = "{\"QMP\": {\"version\": {\"qemu\": {\"major\": 7, "
                  "\"minor\": 2, \"micro\": 0}}, \"capabilities\": []}}\r\n",
        .reply_late = true,
    };
    GThread *t = peer_start(&peer);
    g_autoptr(QmpClient) qmp = qmp_connect(peer.l.path, 2000, &error);
    json_object *ret, *name;

    g_assert_no_error(error);
    qmp_set_timeout(qmp, 200);
    g_assert_null(qmp_execute(qmp, "query-status", NULL, &error));
    g_assert_error(error, QMP_ERROR, QMP_ERROR_TIMEOUT);
    g_clear_error(&error);
    qmp_set_timeout(qmp, 2000);
    /* The stale answer to query-status must not be taken for this one. */
    ret = qmp_execute(qmp, "query-name", NULL, &error);
    g_assert_no_error(error);
    g_assert_true(json_object_object_get_ex(ret, "name", &name));
    g_assert_cmpstr(json_object_get_string(name), ==, "vm");
    json_object_put(ret);
    g_clear_pointer(&qmp, qmp_free);
    peer_finish(&peer, t);
}

/* What a one-client monitor still held for the client before: skipped
 * until the greeting. */
static void test_leftovers_before_greeting(void)
{
    g_autoptr(GError) error = NULL;
    Peer peer = {
        .script = "{\"return\": {}, \"id\": \"qbk-7\"}\r\n"
                  "{\"timestamp\": {\"seconds\": 1, \"microseconds\": 2}, "
                  "\"event\": \"RESUME\"}\r\n"
                  "{\"QMP\": {\"version\": {\"qemu\": {\"major\": 7, "
                  "\"minor\": 2, \"micro\": 0}}, \"capabilities\": []}}\r\n",
        .mute = true,
    };
    GThread *t = peer_start(&peer);
    QmpClient *qmp = qmp_connect(peer.l.path, 2000, &error);

    g_assert_no_error(error);
    g_assert_nonnull(qmp);
    qmp_free(qmp);
    peer_finish(&peer, t);
}

/* The socket of this process that is connected to PORT on 127.0.0.1. */
static int socket_to(unsigned port)
{
    for (int fd = 0; fd < 1024; fd++) {
        struct sockaddr_in in;
        socklen_t len = sizeof(in);

        if (getpeername(fd, (struct sockaddr *)&in, &len) == 0 &&
            in.sin_family == AF_INET && ntohs(in.sin_port) == port) {
            return fd;
        }
    }
    return -1;
}

/* Over TCP a command goes out at once: with Nagle on, its newline (a
 * write of its own, see qmp_execute) waited for the peer's delayed ACK,
 * 40 ms a command, seconds per backup over TLS. */
static void test_tcp_no_delay(void)
{
    g_autoptr(GError) error = NULL;
    Peer peer = {
        .script = "{\"QMP\": {\"version\": {\"qemu\": {\"major\": 7, "
                  "\"minor\": 2, \"micro\": 0}}, \"capabilities\": []}}\r\n",
        .mute = true,
        .tcp = true,
    };
    GThread *t = peer_start(&peer);
    QmpClient *qmp = qmp_connect(peer.l.path, 2000, &error);
    int fd, on = 0;
    socklen_t len = sizeof(on);

    g_assert_no_error(error);
    fd = socket_to(atoi(strrchr(peer.l.path, ':') + 1));
    g_assert_cmpint(fd, >=, 0);
    g_assert_cmpint(getsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &on, &len), ==, 0);
    g_assert_cmpint(on, ==, 1);
    qmp_free(qmp);
    peer_finish(&peer, t);
}

/* A peer out of reach: two commands wait their timeouts, the third is not
 * even sent. */
static void test_gives_up_on_silence(void)
{
    g_autoptr(GError) error = NULL;
    Peer peer = {
        .script = "{\"QMP\": {\"version\": {\"qemu\": {\"major\": 7, "
                  "\"minor\": 2, \"micro\": 0}}, \"capabilities\": []}}\r\n",
        .mute = true,
    };
    GThread *t = peer_start(&peer);
    QmpClient *qmp = qmp_connect(peer.l.path, 2000, &error);

    g_assert_no_error(error);
    qmp_set_timeout(qmp, 100);
    for (int i = 0; i < QMP_SILENT_GIVE_UP; i++) {
        g_assert_false(qmp_run(qmp, "query-status", NULL, &error));
        g_assert_error(error, QMP_ERROR, QMP_ERROR_TIMEOUT);
        g_assert_nonnull(strstr(error->message, "did not answer"));
        g_clear_error(&error);
    }
    g_assert_false(qmp_run(qmp, "blockdev-del", NULL, &error));
    g_assert_error(error, QMP_ERROR, QMP_ERROR_TIMEOUT);
    g_assert_nonnull(strstr(error->message, "stopped answering"));
    qmp_free(qmp); /* the peer reads to EOF */
    peer_finish(&peer, t);
    g_assert_cmpint(peer.lines, ==, QMP_SILENT_GIVE_UP);
}

/* ---- hostile peers: QMP as input, bounded in memory and time ---- */

#define GREETING                                                               \
    "{\"QMP\": {\"version\": {\"qemu\": {\"major\": 7, \"minor\": 2, "         \
    "\"micro\": 0}}, \"capabilities\": []}}\r\n"

typedef enum {
    HOSTILE_FLOOD,     /* events without end, never an answer */
    HOSTILE_LONG_LINE, /* an answer that never ends its line */
    HOSTILE_SHAPES,    /* answers of the wrong shape */
} Hostility;

typedef struct {
    Listener l;
    Hostility how;
} Hostile;

static bool send_text(int fd, const char *text)
{
    return send(fd, text, strlen(text), MSG_NOSIGNAL) == (ssize_t)strlen(text);
}

/* Read one command (a line); false when the client went away. */
static bool read_command(int fd)
{
    char c;

    do {
        if (read(fd, &c, 1) != 1) {
            return false;
        }
    } while (c != '\n');
    return true;
}

static gpointer hostile_thread(gpointer data)
{
    Hostile *h = data;
    int fd = accept(h->l.lfd, NULL, NULL);
    g_autofree char *junk = g_malloc(65536);

    send_text(fd, GREETING);
    read_command(fd);
    send_text(fd, "{\"return\": {}, \"id\": \"qbk-1\"}\r\n");
    read_command(fd);
    switch (h->how) {
    case HOSTILE_FLOOD:
        while (send_text(fd, "{\"event\": \"SPAM\", \"data\": {}}\n")) {
        }
        break;
    case HOSTILE_LONG_LINE:
        memset(junk, 'x', 65536);
        send_text(fd, "{\"return\": \"");
        while (send(fd, junk, 65536, MSG_NOSIGNAL) == 65536) {
        }
        break;
    case HOSTILE_SHAPES:
        /* query-block: an object where an array belongs; then an event
         * without a name, then an answer to the wait's command */
        send_text(fd, "{\"return\": {\"not\": \"an array\"}, "
                      "\"id\": \"qbk-2\"}\n");
        read_command(fd); /* query-named-block-nodes */
        send_text(fd, "{\"return\": 17, \"id\": \"qbk-3\"}\n");
        read_command(fd);
        send_text(fd, "{\"return\": {}, \"id\": \"qbk-4\"}\n"
                      "{\"event\": null}\n{\"event\": 5, \"data\": 1}\n"
                      "{\"event\": \"DONE\", \"data\": {\"id\": null}}\n");
        read_command(fd);
        break;
    }
    close(fd);
    close(h->l.lfd);
    return NULL;
}

static GThread *hostile_start(Hostile *h)
{
    return listen_then_run(&h->l, false, hostile_thread, h);
}

static void test_event_flood(void)
{
    g_autoptr(GError) error = NULL;
    Hostile h = { .how = HOSTILE_FLOOD };
    GThread *t = hostile_start(&h);
    QmpClient *qmp = qmp_connect(h.l.path, 2000, &error);
    gint64 start;

    g_assert_no_error(error);
    qmp_set_timeout(qmp, 500);
    start = g_get_monotonic_time();
    g_assert_null(qmp_execute(qmp, "query-status", NULL, &error));
    g_assert_error(error, QMP_ERROR, QMP_ERROR_TIMEOUT);
    /* the deadline holds while events keep coming, and memory is bounded */
    g_assert_cmpint(g_get_monotonic_time() - start, <, 1500 * 1000);
    g_assert_cmpuint(qmp_pending_events(qmp), <=, 1024);
    qmp_free(qmp);
    join_and_clean(&h.l, t);
}

static void test_endless_line(void)
{
    g_autoptr(GError) error = NULL;
    Hostile h = { .how = HOSTILE_LONG_LINE };
    GThread *t = hostile_start(&h);
    QmpClient *qmp = qmp_connect(h.l.path, 2000, &error);

    g_assert_no_error(error);
    qmp_set_timeout(qmp, 60000);
    g_assert_null(qmp_execute(qmp, "query-status", NULL, &error));
    g_assert_error(error, QMP_ERROR, QMP_ERROR_PROTOCOL);
    g_assert_nonnull(strstr(error->message, "longer than"));
    qmp_free(qmp);
    join_and_clean(&h.l, t);
}

static bool always(json_object *event, void *opaque)
{
    return TRUE;
}

static void test_wrong_shapes(void)
{
    g_autoptr(GError) error = NULL;
    Hostile h = { .how = HOSTILE_SHAPES };
    GThread *t = hostile_start(&h);
    QmpClient *qmp = qmp_connect(h.l.path, 2000, &error);
    GPtrArray *disks;
    json_object *ev;

    g_assert_no_error(error);
    /* a non-array query-block is no disk, not an abort */
    disks = qmp_query_disks(qmp, &error);
    if (disks) {
        g_assert_cmpuint(disks->len, ==, 0);
        g_ptr_array_unref(disks);
    }
    g_clear_error(&error);
    qmp_run(qmp, "stop", NULL, &error);
    g_assert_no_error(error);
    /* events without a (string) name never match, never crash */
    ev = qmp_wait_event(qmp, "DONE", always, NULL, 2000, &error);
    g_assert_no_error(error);
    g_assert_nonnull(ev);
    json_object_put(ev);
    qmp_free(qmp);
    join_and_clean(&h.l, t);
}

static void test_connect_errors(void)
{
    g_autoptr(GError) error = NULL;
    g_autofree char *too_long = NULL;

    g_assert_null(qmp_connect("/nonexistent/qmp.sock", 1000, &error));
    g_assert_error(error, QMP_ERROR, QMP_ERROR_CONNECT);
    g_clear_error(&error);
    g_assert_null(qmp_connect("tcp:127.0.0.1", 1000, &error));
    g_assert_error(error, QMP_ERROR, QMP_ERROR_CONNECT);
    g_clear_error(&error);
    g_assert_null(qmp_connect("tcp:127.0.0.1:1", 1000, &error));
    g_assert_error(error, QMP_ERROR, QMP_ERROR_CONNECT);
    g_clear_error(&error);
    /* longer than a unix socket address holds */
    too_long = g_strnfill(200, 'x');
    g_assert_null(qmp_connect(too_long, 1000, &error));
    g_assert_error(error, QMP_ERROR, QMP_ERROR_CONNECT);
    g_assert_nonnull(strstr(error->message, "too long"));
}

int main(int argc, char **argv)
{
    g_test_init(&argc, &argv, NULL);
    g_test_add_func("/qmp/leftovers-before-greeting",
                    test_leftovers_before_greeting);
    g_test_add("/qmp/greeting-and-return", Fixture, NULL, fixture_setup,
               test_greeting_and_return, fixture_teardown);
    g_test_add("/qmp/error-class", Fixture, NULL, fixture_setup,
               test_error_class, fixture_teardown);
    g_test_add("/qmp/events-queued", Fixture, NULL, fixture_setup,
               test_events_queued, fixture_teardown);
    g_test_add("/qmp/qemu-dies", Fixture, NULL, fixture_setup, test_qemu_dies,
               fixture_teardown);
    g_test_add("/qmp/quit-then-command", Fixture, NULL, fixture_setup,
               test_quit_mid_command, fixture_teardown);
    g_test_add("/qmp/transaction-atomic", Fixture, NULL, fixture_setup,
               test_transaction_atomic, fixture_teardown);
    g_test_add("/qmp/filter-looked-through", Fixture, NULL, fixture_setup,
               test_filter_looked_through, fixture_teardown);
    g_test_add("/qmp/insert-points", Fixture, NULL, fixture_setup,
               test_insert_points, fixture_teardown);
    g_test_add("/qmp/storage-daemon", Fixture, NULL, fixture_setup,
               test_storage_daemon, fixture_teardown);
    g_test_add_func("/qmp/not-qmp", test_not_qmp);
    g_test_add_func("/qmp/silent-peer", test_silent_peer);
    g_test_add_func("/qmp/late-reply-dropped", test_late_reply_dropped);
    g_test_add_func("/qmp/gives-up-on-silence", test_gives_up_on_silence);
    g_test_add_func("/qmp/agent", test_agent);
    g_test_add_func("/qmp/connect-errors", test_connect_errors);
    g_test_add_func("/qmp/tcp-no-delay", test_tcp_no_delay);
    g_test_add_func("/qmp/hostile/event-flood", test_event_flood);
    g_test_add_func("/qmp/hostile/endless-line", test_endless_line);
    g_test_add_func("/qmp/hostile/wrong-shapes", test_wrong_shapes);
    return g_test_run();
}
