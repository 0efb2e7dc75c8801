/*
 * qbk-restore: rebuild a disk as it was at any backup of a repository into
 * a sparse raw or qcow2 file, and check it against the backup's checksum.
 */
#include <signal.h>
#include <stdio.h>
#include <string.h>

#include "backup.h"
#include "cmd-common.h"

static char *opt_repo;
static char *opt_disk;
static char *opt_backup;
static char *opt_output;
static char *opt_format;
static gboolean opt_json;
static gboolean opt_list;
static char *opt_into;
static char *opt_from;
static gboolean opt_verify;
static gboolean opt_live;
static char *opt_stream;
static char *opt_stream_rate;
static char *opt_export;
static gboolean opt_insecure;

static GOptionEntry entries[] = {
    { "repo", 'r', 0, G_OPTION_ARG_FILENAME, &opt_repo, "backup repository",
      "DIR" },
    { "disk", 'd', 0, G_OPTION_ARG_STRING, &opt_disk, "the disk to restore",
      "DISK" },
    { "backup", 'b', 0, G_OPTION_ARG_STRING, &opt_backup,
      "backup id (default: latest)", "ID" },
    { "output", 'o', 0, G_OPTION_ARG_FILENAME, &opt_output,
      "file to write (sparse)", "FILE" },
    { "format", 'f', 0, G_OPTION_ARG_STRING, &opt_format,
      "raw (default; verified against the checksum) or qcow2", "FORMAT" },
    { "into", 0, 0, G_OPTION_ARG_FILENAME, &opt_into,
      "bring this existing image (raw or qcow2), which equals backup FROM, "
      "to the backup asked for, forward or back, writing only the regions "
      "that differ",
      "IMAGE" },
    { "from", 0, 0, G_OPTION_ARG_STRING, &opt_from,
      "with --into: the backup the image equals now", "ID" },
    { "verify", 0, 0, G_OPTION_ARG_NONE, &opt_verify,
      "with --into: then re-read the whole image and check it against the "
      "backup's checksum",
      NULL },
    { "live", 0, 0, G_OPTION_ARG_NONE, &opt_live,
      "live restore: make --output a qcow2 image on the backup's chain (read "
      "only; nothing is copied yet) that a VM can start from at once; then "
      "--stream copies the backup into it while the guest runs",
      NULL },
    { "stream", 0, 0, G_OPTION_ARG_STRING, &opt_stream,
      "live restore, second step: in the VM at --qmp, copy the backup into "
      "the --live image its node NODE opened (QEMU's block-stream), then it "
      "stands alone; SIGINT/SIGTERM cancel, and a rerun goes on where it "
      "stopped",
      "NODE" },
    { "stream-rate", 0, 0, G_OPTION_ARG_STRING, &opt_stream_rate,
      "with --stream: copy at most this much per second, e.g. 100M", "SIZE" },
    { "export", 0, 0, G_OPTION_ARG_FILENAME, &opt_export,
      "serve --disk of the backup read-only over NBD until SIGINT/SIGTERM: "
      "at a unix socket PATH, or at HOST:PORT with TLS (--tls-creds: a "
      "directory with ca-cert.pem, server-cert.pem and server-key.pem; "
      "clients show a certificate of that CA) or --insecure",
      "PATH|HOST:PORT" },
    { "insecure", 0, 0, G_OPTION_ARG_NONE, &opt_insecure,
      "with --export HOST:PORT: plain TCP, readable by anyone who reaches "
      "the port",
      NULL },
    { "list", 'l', 0, G_OPTION_ARG_NONE, &opt_list,
      "list the repository's backups instead", NULL },
    { "json", 'j', 0, G_OPTION_ARG_NONE, &opt_json,
      "print the result as one JSON object", NULL },
    { NULL },
};

static Repo *repo;
static volatile gint stop_flag;

static void on_signal(int sig)
{
    g_atomic_int_set(&stop_flag, sig);
}

static void catch_signals(void)
{
    struct sigaction sa = { .sa_handler = on_signal };

    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGHUP, &sa, NULL);
}

/* --live: the image a VM can start from now. */
static int live_create(void)
{
    g_autoptr(GError) error = NULL;
    json_object *r = backup_live_create(
        repo, opt_backup ? opt_backup : "latest", opt_disk, opt_output, &error);

    if (!r) {
        cmd_error("%s%s", error->message, cmd_hint(error));
        return cmd_backup_exit_code(error);
    }
    if (opt_json) {
        cmd_print_json(r);
        return QBK_EXIT_OK;
    }
    cmd_info("'%s' holds disk '%s' as backup '%s' (on its chain of "
             "%" G_GUINT64_FORMAT
             " image%s, read-only): start the VM on it (qcow2)%s, then run "
             "qbk-restore --stream NODE --qmp SOCKET",
             opt_output, opt_disk, qmp_json_string(r, "backup"),
             qmp_json_uint(r, "chain"),
             qmp_json_uint(r, "chain") > 1 ? "s" : "",
             qmp_json_string(r, "key_secret")
                 ? " with the key as a secret object (-object "
                   "secret,id=" REPO_KEY_SECRET ",file=KEYFILE)"
                 : "");
    json_object_put(r);
    return QBK_EXIT_OK;
}

static void on_stream_progress(guint64 done, guint64 total, void *opaque)
{
    g_autofree char *d = cmd_format_bytes(done);
    g_autofree char *t = cmd_format_bytes(total);

    cmd_info("streamed %s of %s", d, t);
}

/* --stream NODE: the second step, in a running VM. */
static int live_stream(void)
{
    g_autoptr(GError) error = NULL;
    g_autoptr(QmpClient) qmp = NULL;
    guint64 rate = 0;
    json_object *r;

    if (opt_stream_rate &&
        !cmd_parse_size("--stream-rate", opt_stream_rate, &rate, &error)) {
        return cmd_usage("%s", error->message);
    }
    qmp = cmd_qmp_connect(cmd_common.qmp, cmd_common.timeout_s * 1000, &error);
    if (!qmp) {
        cmd_error("%s", error->message);
        return QBK_EXIT_FAILURE;
    }
    catch_signals();
    r = backup_live_stream(qmp, opt_stream, rate, &stop_flag,
                           on_stream_progress, NULL, &error);
    if (!r) {
        cmd_error("%s", error->message);
        return cmd_backup_exit_code(error);
    }
    if (opt_json) {
        cmd_print_json(r);
    } else {
        cmd_info("node '%s' holds the whole backup and stands alone",
                 opt_stream);
        json_object_put(r);
    }
    return QBK_EXIT_OK;
}

static void on_export_ready(json_object *info, void *opaque)
{
    if (opt_json) {
        puts(json_object_to_json_string_ext(
            info, JSON_C_TO_STRING_PLAIN | JSON_C_TO_STRING_NOSLASHESCAPE));
    } else {
        printf("%s\n", qmp_json_string(info, "uri"));
    }
    fflush(stdout);
    cmd_info("serving backup '%s' of disk '%s' read-only; SIGINT or SIGTERM "
             "stops",
             qmp_json_string(info, "backup"), opt_disk);
}

/* --export: serve the backup until told to stop. */
static int export_backup(void)
{
    g_autoptr(GError) error = NULL;
    g_autofree char *host = NULL;
    BackupServe where = { 0 };
    const char *colon = strrchr(opt_export, ':');
    json_object *r;

    if (strchr(opt_export, '/')) {
        where.socket = opt_export;
    } else if (colon && colon != opt_export && colon[1]) {
        host = g_strndup(opt_export, colon - opt_export);
        where.host = host;
        where.port = colon + 1;
        where.tls_dir = cmd_common.tls_creds;
        if (!where.tls_dir && !opt_insecure) {
            return cmd_usage("--export HOST:PORT needs --tls-creds DIR, or "
                             "--insecure for plain TCP");
        }
    } else {
        return cmd_usage("--export takes a socket path (with a /) or "
                         "HOST:PORT, not '%s'",
                         opt_export);
    }
    catch_signals();
    r = backup_serve(repo, opt_backup ? opt_backup : "latest", opt_disk, &where,
                     &stop_flag, on_export_ready, NULL, &error);
    if (!r) {
        cmd_error("%s%s", error->message, cmd_hint(error));
        return cmd_backup_exit_code(error);
    }
    json_object_put(r);
    cmd_info("stopped serving");
    return QBK_EXIT_OK;
}

static int list_backups(void)
{
    g_autoptr(GError) error = NULL;
    g_autoptr(GPtrArray) skipped = g_ptr_array_new_with_free_func(g_free);
    g_autoptr(GPtrArray) all = repo_list(repo, false, skipped, &error);
    json_object *arr;

    if (!all) {
        cmd_error("%s", error->message);
        return cmd_backup_exit_code(error);
    }
    for (guint i = 0; i < skipped->len; i++) {
        cmd_error("skipped %s", (char *)skipped->pdata[i]);
    }
    arr = json_object_new_array();
    for (guint i = 0; i < all->len; i++) {
        Manifest *m = all->pdata[i];

        if (!opt_json) {
            printf("%s", m->id);
            for (guint d = 0; d < m->disks->len; d++) {
                const ManifestDisk *e = m->disks->pdata[d];

                printf("  %s:%s", e->disk, manifest_mode_name(e->mode));
            }
            printf("\n");
        }
        json_object_array_add(arr, json_object_get(m->json));
    }
    if (opt_json) {
        cmd_print_json(arr);
    } else {
        json_object_put(arr);
    }
    return QBK_EXIT_OK;
}

static int restore_into(void)
{
    g_autoptr(GError) error = NULL;
    json_object *r;

    if (!opt_into || !opt_from || !opt_disk || opt_output) {
        return cmd_usage("--into IMAGE goes with --from ID and --disk DISK, "
                         "not --output");
    }
    r = backup_restore_into(repo, opt_from, opt_backup ? opt_backup : "latest",
                            opt_disk, opt_into, &error);
    if (!r) {
        cmd_error("%s%s", error->message, cmd_hint(error));
        return cmd_backup_exit_code(error);
    }
    if (opt_verify) {
        if (!backup_check_image(repo, qmp_json_string(r, "backup"), opt_disk,
                                opt_into, qmp_json_string(r, "format"),
                                &error)) {
            cmd_error("%s", error->message);
            json_object_put(r);
            return QBK_EXIT_FAILURE;
        }
        qmp_json_set_bool(r, "verified", 1);
    }
    if (opt_json) {
        cmd_print_json(r);
    } else {
        g_autofree char *changed =
            cmd_format_bytes(qmp_json_uint(r, "bytes_changed"));

        cmd_info("'%s' now holds disk '%s' as backup '%s' (from '%s' via "
                 "'%s': %s rewritten)%s",
                 opt_into, opt_disk, qmp_json_string(r, "backup"),
                 qmp_json_string(r, "from"), qmp_json_string(r, "common"),
                 changed,
                 qmp_json_bool(r, "verified") ? ", checksum verified" : "");
        json_object_put(r);
    }
    return QBK_EXIT_OK;
}

/* Names given on the command line, checked before any path is made. */
static bool check_names(GError **error)
{
    const char *backups[] = { opt_backup, opt_from };

    for (guint i = 0; i < G_N_ELEMENTS(backups); i++) {
        if (backups[i] && strcmp(backups[i], "latest") != 0 &&
            !repo_check_name("backup", backups[i], error)) {
            return false;
        }
    }
    return (!opt_disk || repo_check_name("disk", opt_disk, error)) &&
           cmd_check_path("--output", opt_output, error) &&
           cmd_check_path("--into", opt_into, error);
}

static const CmdSpec spec = {
    .name = "qbk-restore",
    .parameters = "- rebuild a disk from a backup repository",
    .summary = NULL,
    .description =
        "Every link of the chain is checked against the manifests before it\n"
        "is read, and the output appears under its name only once it is\n"
        "complete (and, for raw, verified); it is created owner-only.\n"
        "\n"
        "Examples:\n"
        "  qbk-restore --repo /backups/vm1 --list\n"
        "  qbk-restore --repo /backups/vm1 --disk disk0 -o disk0.raw\n"
        "  qbk-restore --repo /backups/vm1 --disk disk0 \\\n"
        "      --backup 20261122T213500Z -o disk0.qcow2 --format qcow2\n"
        "  qbk-restore --repo /backups/vm1 --disk disk0 \\\n"
        "      --into vm1-disk0.qcow2 --from TUE --backup MON --verify\n"
        "\n"
        "Live restore (the VM runs from the backup at once):\n"
        "  qbk-restore --repo /backups/vm1 --disk disk0 --live -o new.qcow2\n"
        "  qemu-system-x86_64 ... -blockdev driver=file,filename=new.qcow2,\\\n"
        "      node-name=f0 -blockdev driver=qcow2,file=f0,node-name=d0 ...\n"
        "  qbk-restore --stream d0 --qmp /run/vm1/qmp.sock\n"
        "Serving a backup to any NBD client:\n"
        "  qbk-restore --repo /backups/vm1 --disk disk0 --export /run/b.sock\n",
    .entries = entries,
    .common = CMD_OPT_KEY | CMD_OPT_QMP | CMD_OPT_QUIET,
};

int main(int argc, char **argv)
{
    g_autoptr(GError) error = NULL;
    g_autoptr(Repo) opened = NULL;
    json_object *entry;

    int rc = cmd_parse(&spec, &argc, &argv);

    if (rc >= 0) {
        return rc;
    }
    if (argc != 1) {
        return cmd_usage("unexpected argument '%s'", argv[1]);
    }
    if (opt_stream) {
        if (opt_repo || opt_live || opt_export || !cmd_common.qmp) {
            return cmd_usage("--stream NODE goes with --qmp SOCKET alone");
        }
        return live_stream();
    }
    if (!opt_repo) {
        return cmd_usage("give --repo DIR");
    }
    if ((opt_live || opt_export) &&
        (!opt_disk || opt_into || opt_list || (opt_live && opt_export) ||
         (opt_live && !opt_output) || (opt_export && opt_output))) {
        return cmd_usage("--live goes with --disk and --output; --export "
                         "with --disk");
    }
    if (!check_names(&error)) {
        return cmd_usage("%s", error->message);
    }
    if (!opt_list && !opt_into && !opt_from && !opt_verify && !opt_export &&
        (!opt_disk || !opt_output)) {
        return cmd_usage("give --disk DISK and --output FILE");
    }
    if (!opt_format) {
        opt_format = g_strdup("raw");
    }
    if (g_strcmp0(opt_format, "raw") != 0 &&
        g_strcmp0(opt_format, "qcow2") != 0) {
        return cmd_usage("--format must be raw or qcow2");
    }
    cmd_make_absolute(&opt_into);
    opened = repo = repo_open(opt_repo, 0, &error);
    if (!repo || (!opt_list && !cmd_repo_key(repo, false, &error))) {
        cmd_error("%s%s", error->message, cmd_hint(error));
        return cmd_backup_exit_code(error);
    }
    if (opt_list) {
        return list_backups();
    }
    if (opt_live) {
        return live_create();
    }
    if (opt_export) {
        return export_backup();
    }
    if (opt_into || opt_from || opt_verify) {
        return restore_into();
    }
    entry = backup_restore(repo, opt_backup ? opt_backup : "latest", opt_disk,
                           opt_output, opt_format, &error);
    if (!entry) {
        cmd_error("%s%s", error->message, cmd_hint(error));
        return cmd_backup_exit_code(error);
    }
    if (opt_json) {
        cmd_print_json(entry);
    } else {
        cmd_info("restored disk '%s' to '%s'%s", opt_disk, opt_output,
                 qmp_json_bool(entry, "verified") ? ", checksum verified" : "");
        json_object_put(entry);
    }
    return QBK_EXIT_OK;
}
