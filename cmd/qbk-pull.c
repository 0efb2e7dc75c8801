/*
 * qbk-pull: take a crash-consistent backup of every disk of a running VM at
 * one instant, full or incremental per disk, into a repository of qcow2
 * chains and JSON manifests.
 */
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "backup.h"
#include "cmd-common.h"

static char *opt_repo;
static char *opt_mode;
static char *opt_since;
static char **opt_disks;
static char **opt_nodes;
static char *opt_scratch;
static char *opt_scratch_format;
static char *opt_format;
static gboolean opt_compress;
static gboolean opt_encrypt;
static char *opt_nbd_server;
static char *opt_nbd_listen;
static char *opt_nbd_tls_creds;
static gboolean opt_insecure;
static char *opt_fleece;
static gboolean opt_no_notices;
static gboolean opt_no_release;
static double opt_latency_ms;
static char *opt_trace;
static gint opt_progress_fd = -1;
static gboolean opt_json;
static gboolean opt_export_only;
static char *opt_guest_agent;
static char **opt_quiesce_mounts;
static char *opt_shutdown_action;
static BackupQuiesce opt_quiesce = BACKUP_QUIESCE_OFF;

/* --quiesce alone is --quiesce=required */
static gboolean parse_quiesce(const char *name, const char *value,
                              gpointer data, GError **error)
{
    if (!backup_quiesce_parse(value ? value : "required", &opt_quiesce) ||
        opt_quiesce == BACKUP_QUIESCE_OFF) {
        g_set_error(error, G_OPTION_ERROR, G_OPTION_ERROR_BAD_VALUE,
                    "--quiesce must be required or try, not '%s'", value);
        return FALSE;
    }
    return TRUE;
}

static GOptionEntry entries[] = {
    { "repo", 'r', 0, G_OPTION_ARG_FILENAME, &opt_repo,
      "backup repository (made if missing)", "DIR" },
    { "mode", 'm', 0, G_OPTION_ARG_STRING, &opt_mode,
      "auto (default: full where needed, else incremental), full, "
      "incremental or differential",
      "MODE" },
    { "since", 's', 0, G_OPTION_ARG_STRING, &opt_since,
      "copy everything changed since this checkpoint or backup id",
      "CHECKPOINT" },
    { "disk", 'd', 0, G_OPTION_ARG_STRING_ARRAY, &opt_disks,
      "only this disk (repeat); default: every disk", "DISK" },
    { "node", 0, 0, G_OPTION_ARG_STRING_ARRAY, &opt_nodes,
      "back up this format node as disk ID (repeat; for a "
      "qemu-storage-daemon, which has no devices); default: the VM's "
      "devices",
      "NODE[=ID]" },
    { "format", 'f', 0, G_OPTION_ARG_STRING, &opt_format,
      "of full backups: qcow2 (default) or raw (sparse, written with Linux "
      "AIO, see --write-mode); incrementals are always qcow2",
      "FORMAT" },
    { "compress", 'z', 0, G_OPTION_ARG_NONE, &opt_compress,
      "compress the new images' clusters with zstd (qcow2 "
      "compression_type=zstd; qemu-img and QEMU read them as they are; "
      "qbk-merge keeps them compressed)",
      NULL },
    { "encrypt", 0, 0, G_OPTION_ARG_NONE, &opt_encrypt,
      "make a new repository (or one without backups yet) encrypted with "
      "--key-file's passphrase: every image LUKS-encrypted (qcow2 "
      "encrypt.format=luks); later runs need only --key-file",
      NULL },
    { "nbd-server", 0, 0, G_OPTION_ARG_FILENAME, &opt_nbd_server,
      "QEMU already runs an NBD server on this unix socket: add the "
      "exports there (it is never stopped)",
      "SOCKET" },
    { "nbd-listen", 0, 0, G_OPTION_ARG_STRING, &opt_nbd_listen,
      "QEMU runs on another host: its NBD server listens on this address "
      "of the hypervisor's, with TLS (--tls-creds holds our client "
      "certificate; only its identity may connect)",
      "HOST:PORT" },
    { "nbd-tls-creds", 0, 0, G_OPTION_ARG_STRING, &opt_nbd_tls_creds,
      "with --nbd-listen: QEMU's tls-creds-x509 object for the NBD server "
      "(default: its only one with endpoint=server, e.g. the monitor's)",
      "ID" },
    { "insecure", 0, 0, G_OPTION_ARG_NONE, &opt_insecure,
      "with --nbd-listen: plain TCP, no TLS (anyone who can reach the "
      "port can read the disks while the backup runs)",
      NULL },
    { "scratch-dir", 0, 0, G_OPTION_ARG_FILENAME, &opt_scratch,
      "where fleecing scratch images go (default: REPO/.scratch)", "DIR" },
    { "scratch-format", 0, 0, G_OPTION_ARG_STRING, &opt_scratch_format,
      "raw (scheme B's default: a sparse file, the cheapest write for the "
      "guest's copy-before-write; released regions become holes) or qcow2 "
      "(scheme A's only choice)",
      "FORMAT" },
    { "fleece", 0, 0, G_OPTION_ARG_STRING, &opt_fleece,
      "how the point in time is kept: B (copy-before-write + "
      "snapshot-access, QEMU >= 7.1: copied regions are released, so the "
      "scratch image stays small and the guest stops paying for copies "
      "there), A (backup job + scratch image backed by the disk), or auto "
      "(default: B when QEMU and every disk allow it)",
      "A|B|auto" },
    { "no-notices", 0, 0, G_OPTION_ARG_NONE, &opt_no_notices,
      "copy in offset order only: don't copy first the regions the guest "
      "writes during the backup (and their neighbourhood)",
      NULL },
    { "no-release", 0, 0, G_OPTION_ARG_NONE, &opt_no_release,
      "scheme B: keep copied regions in the scratch image until the end",
      NULL },
    { "guest-latency-target", 0, 0, G_OPTION_ARG_DOUBLE, &opt_latency_ms,
      "pace the copy: halve the requests in flight when their mean latency "
      "(which the guest's I/O shares) is above MS milliseconds (up to 60000), "
      "add one when below; the result is in the manifest "
      "(disks[].copier.pacing)",
      "MS" },
    { "trace", 0, 0, G_OPTION_ARG_FILENAME, &opt_trace,
      "write the copier's events (release, notice, window) to FILE, one "
      "line each with a CLOCK_MONOTONIC time in ns (for benchmarks)",
      "FILE" },
    { "progress-fd", 0, 0, G_OPTION_ARG_INT, &opt_progress_fd,
      "write JSON lines to this file descriptor: the fleece point, then "
      "progress",
      "FD" },
    { "quiesce", 0, G_OPTION_FLAG_OPTIONAL_ARG, G_OPTION_ARG_CALLBACK,
      parse_quiesce,
      "application-consistent: the guest agent freezes the guest's file "
      "systems just around the point in time (milliseconds, not the copy) "
      "and thaws them whatever happens. required (the default): no agent, "
      "no backup; try: without an agent the backup is crash-consistent, "
      "and says so",
      "[required|try]" },
    { "quiesce-mount", 0, 0, G_OPTION_ARG_STRING_ARRAY, &opt_quiesce_mounts,
      "with --quiesce: freeze only this mount point of the guest (repeat; "
      "default: every file system)",
      "PATH" },
    { "guest-agent", 0, 0, G_OPTION_ARG_FILENAME, &opt_guest_agent,
      "the guest agent's socket (the host side of its virtio-serial port "
      "org.qemu.guest_agent.0; default: as QEMU knows it)",
      "SOCKET" },
    { "shutdown-action", 0, 0, G_OPTION_ARG_STRING, &opt_shutdown_action,
      "what QEMU does when the guest powers off, which QEMU cannot report: "
      "poweroff (its default: QEMU exits) or pause (-no-shutdown). A "
      "poweroff during a backup pauses the VM until the backup is done, "
      "then this is carried out",
      "ACTION" },
    { "export-only", 'e', 0, G_OPTION_ARG_NONE, &opt_export_only,
      "fleece and export over NBD without copying: print the exports as "
      "JSON, then read 'commit' (keep the new checkpoint) or 'abort' on "
      "stdin; EOF or a signal aborts",
      NULL },
    { "json", 'j', 0, G_OPTION_ARG_NONE, &opt_json,
      "print the manifest as one JSON object on stdout", NULL },
    { NULL },
};

static volatile gint cancel_flag;

static void on_signal(int sig)
{
    g_atomic_int_set(&cancel_flag, sig);
}

static void on_progress(const BackupProgress *p, void *opaque)
{
    const CopierStats *s = &p->stats;
    double pct = s->size ? 100.0 * s->bytes_done / s->size : 100.0;
    double mib_s = s->seconds > 0 ? s->bytes_read / 1048576.0 / s->seconds : 0;
    double rate = s->seconds > 0 ? s->bytes_done / s->seconds : 0;
    double eta = rate > 0 ? (s->size - s->bytes_done) / rate : 0;

    if (opt_progress_fd >= 0) {
        g_autofree char *line = g_strdup_printf(
            "{\"event\": \"progress\", \"disk\": \"%s\", \"index\": %u, "
            "\"count\": %u, \"done\": "
            "%" G_GUINT64_FORMAT ", \"size\": %" G_GUINT64_FORMAT
            ", \"read\": %" G_GUINT64_FORMAT ", \"seconds\": %.3f}\n",
            p->disk, p->index, p->count, s->bytes_done, s->size, s->bytes_read,
            s->seconds);

        if (write(opt_progress_fd, line, strlen(line)) < 0) {
            opt_progress_fd = -1;
        }
    }
    if (!cmd_common.quiet && isatty(STDERR_FILENO)) {
        fprintf(stderr, "\r%s: %s (%u/%u) %5.1f%%  %7.1f MiB/s  ETA %4.0fs ",
                g_get_prgname(), p->disk, p->index + 1, p->count, pct, mib_s,
                eta);
        if (s->bytes_done >= s->size) {
            fputc('\n', stderr);
        }
    }
}

/* The point in time is fixed: scripts may now let the guest go on. */
static void on_fleeced(const char *id, void *opaque)
{
    if (opt_progress_fd >= 0) {
        g_autofree char *line = g_strdup_printf(
            "{\"event\": \"fleeced\", \"backup\": \"%s\"}\n", id);

        if (write(opt_progress_fd, line, strlen(line)) < 0) {
            opt_progress_fd = -1;
        }
    }
    if (isatty(STDERR_FILENO)) {
        cmd_info("backup %s: point in time fixed, copying", id);
    }
}

static void print_summary(json_object *m)
{
    json_object *disks = qmp_json_array(m, "disks");

    printf("backup %s: %s\n", qmp_json_string(m, "id"),
           qmp_json_string(m, "status"));
    printf("%-12s %-13s %-18s %11s %11s %9s  %s\n", "DISK", "MODE", "PARENT",
           "COPIED", "SKIPPED", "MiB/s", "IMAGE");
    for (size_t i = 0; i < qmp_json_length(disks); i++) {
        json_object *d = qmp_json_index(disks, i);
        g_autofree char *copied =
            cmd_format_bytes(qmp_json_uint(d, "bytes_copied"));
        g_autofree char *skipped = cmd_format_bytes(
            qmp_json_uint(d, "bytes_skipped") + qmp_json_uint(d, "bytes_zero"));

        printf("%-12s %-13s %-18s %11s %11s %9.1f  %s\n",
               qmp_json_string(d, "disk"), qmp_json_string(d, "mode"),
               qmp_json_string(d, "parent") ? qmp_json_string(d, "parent")
                                            : "-",
               copied, skipped,
               json_object_get_double(
                   json_object_object_get(d, "throughput_mib_s")),
               qmp_json_string(d, "image"));
    }
}

/* --export-only: show the exports, then let the user decide. */
static bool wait_for_commit(json_object *exports, void *opaque)
{
    g_autoptr(GIOChannel) in = g_io_channel_unix_new(STDIN_FILENO);
    g_autofree char *line = NULL;
    json_object *list = qmp_json_array(exports, "exports");

    if (opt_json) {
        puts(json_object_to_json_string_ext(
            exports, JSON_C_TO_STRING_PLAIN | JSON_C_TO_STRING_NOSLASHESCAPE));
    } else {
        for (size_t i = 0; i < qmp_json_length(list); i++) {
            json_object *e = qmp_json_index(list, i);
            const char *ctx = qmp_json_string(e, "bitmap_context");

            printf("%s\t%s\t%s\n", qmp_json_string(e, "disk"),
                   qmp_json_string(e, "uri"), ctx ? ctx : "-");
        }
    }
    fflush(stdout);
    cmd_info("exports ready; type 'commit' to keep the checkpoint or "
             "'abort' to roll back");
    /* GLib retries reads on EINTR: poll, so that a signal aborts. */
    while (!g_atomic_int_get(&cancel_flag)) {
        struct pollfd pfd = { .fd = STDIN_FILENO, .events = POLLIN };

        if (poll(&pfd, 1, 200) <= 0) {
            continue;
        }
        if (g_io_channel_read_line(in, &line, NULL, NULL, NULL) !=
            G_IO_STATUS_NORMAL) {
            return false; /* EOF */
        }
        g_strstrip(line);
        if (strcmp(line, "commit") == 0) {
            return true;
        }
        if (strcmp(line, "abort") == 0) {
            return false;
        }
        cmd_error("say 'commit' or 'abort', not '%s'", line);
        g_clear_pointer(&line, g_free);
    }
    return false;
}

/* Every option's bounds (G_OPTION_ERROR), before anything is touched. */
static bool check_bounds(GError **error)
{
    if (opt_encrypt && !cmd_common.key_file) {
        g_set_error(error, G_OPTION_ERROR, G_OPTION_ERROR_BAD_VALUE,
                    "--encrypt needs --key-file");
        return false;
    }
    return cmd_check_path("--repo", opt_repo, error) &&
           cmd_check_path("--scratch-dir", opt_scratch, error) &&
           cmd_check_path("--trace", opt_trace, error) &&
           cmd_check_path("--guest-agent", opt_guest_agent, error) &&
           cmd_check_number("--guest-latency-target", opt_latency_ms, 0,
                            COPIER_MAX_LATENCY_US / 1000, error) &&
           cmd_check_range("--progress-fd", opt_progress_fd, -1, G_MAXINT,
                           error);
}

/* A QEMU on another host: --nbd-listen and how it is secured. */
static bool remote_options(BackupOptions *opts, GError **error)
{
    const char *bad = NULL;

    if (!opt_nbd_listen && (opt_insecure || opt_nbd_tls_creds)) {
        bad = "--insecure and --nbd-tls-creds go with --nbd-listen";
    } else if (opt_nbd_listen && opt_nbd_server) {
        bad = "--nbd-listen and --nbd-server exclude each other";
    } else if (opt_nbd_listen && !opt_insecure && !cmd_common.tls_creds) {
        bad = "--nbd-listen needs --tls-creds DIR (or --insecure)";
    }
    if (bad) {
        g_set_error(error, G_OPTION_ERROR, G_OPTION_ERROR_BAD_VALUE, "%s", bad);
        return false;
    }
    opts->nbd_listen = opt_nbd_listen;
    if (opt_nbd_listen && !cmd_common.requests_given) {
        opts->copier.requests = COPIER_REMOTE_REQUESTS; /* over a network */
    }
    opts->nbd_tls_creds = opt_nbd_tls_creds;
    opts->insecure = opt_insecure;
    opts->tls_dir = cmd_common.tls_creds;
    return true;
}

/* What concerns the guest: --quiesce and its agent, --shutdown-action. */
static bool guest_options(BackupOptions *opts, GError **error)
{
    if (opt_quiesce_mounts && opt_quiesce == BACKUP_QUIESCE_OFF) {
        g_set_error(error, G_OPTION_ERROR, G_OPTION_ERROR_BAD_VALUE,
                    "--quiesce-mount goes with --quiesce");
        return false;
    }
    if (opt_shutdown_action && g_strcmp0(opt_shutdown_action, "poweroff") &&
        g_strcmp0(opt_shutdown_action, "pause")) {
        g_set_error(error, G_OPTION_ERROR, G_OPTION_ERROR_BAD_VALUE,
                    "--shutdown-action must be poweroff or pause");
        return false;
    }
    opts->quiesce = opt_quiesce;
    opts->guest_agent = opt_guest_agent;
    opts->quiesce_mounts = opt_quiesce_mounts;
    if (opt_shutdown_action) {
        opts->shutdown_action = opt_shutdown_action;
    }
    return true;
}

/* OPTS from the command line, checked (G_OPTION_ERROR). */
static bool check_options(int argc, BackupOptions *opts, GError **error)
{
    if (argc != 1 || !cmd_common.qmp || !opt_repo) {
        g_set_error(error, G_OPTION_ERROR, G_OPTION_ERROR_BAD_VALUE,
                    "give --qmp SOCKET and --repo DIR, and no other argument");
        return false;
    }
    if (!check_bounds(error)) {
        return false;
    }
    if (opt_progress_fd >= 0 && fcntl(opt_progress_fd, F_GETFD) < 0) {
        g_set_error(error, G_OPTION_ERROR, G_OPTION_ERROR_BAD_VALUE,
                    "--progress-fd %d is not open", opt_progress_fd);
        return false;
    }
    if (opt_mode && !backup_mode_parse(opt_mode, &opts->mode)) {
        g_set_error(error, G_OPTION_ERROR, G_OPTION_ERROR_BAD_VALUE,
                    "unknown --mode '%s'", opt_mode);
        return false;
    }
    if (opt_since && opts->mode == BACKUP_MODE_FULL) {
        g_set_error(error, G_OPTION_ERROR, G_OPTION_ERROR_BAD_VALUE,
                    "--since goes with an incremental backup, not --mode full");
        return false;
    }
    if (!opt_fleece || g_ascii_strcasecmp(opt_fleece, "auto") == 0) {
        opts->fleece = BACKUP_FLEECE_AUTO;
    } else if (g_ascii_strcasecmp(opt_fleece, "a") == 0) {
        opts->fleece = BACKUP_FLEECE_A;
    } else if (g_ascii_strcasecmp(opt_fleece, "b") == 0) {
        opts->fleece = BACKUP_FLEECE_B;
    } else {
        g_set_error(error, G_OPTION_ERROR, G_OPTION_ERROR_BAD_VALUE,
                    "--fleece must be A, B or auto");
        return false;
    }
    opts->since = opt_since;
    opts->disks = opt_disks;
    opts->nodes = opt_nodes;
    opts->scratch_dir = opt_scratch;
    opts->scratch_format = opt_scratch_format;
    opts->format = opt_format;
    opts->compress = opt_compress;
    opts->nbd_server = opt_nbd_server;
    opts->copier = cmd_common.copier;
    if (!remote_options(opts, error)) {
        return false;
    }
    if (!guest_options(opts, error)) {
        return false;
    }
    opts->agent_timeout_ms = cmd_common.timeout_s * 1000;
    opts->no_notices = opt_no_notices || cmd_common.sequential;
    opts->no_release = opt_no_release;
    opts->copier.latency_target_us = (guint)(opt_latency_ms * 1000);
    return backup_options_check(opts, error);
}

/* --export-only: export the point in time until a client commits. */
static int export_only(QmpClient *qmp, Repo *repo, BackupOptions *opts)
{
    g_autoptr(GError) error = NULL;
    json_object *info =
        backup_export(qmp, repo, opts, wait_for_commit, NULL, &error);

    if (!info) {
        cmd_error("export failed: %s%s", error->message, cmd_hint(error));
        return cmd_backup_exit_code(error);
    }
    cmd_info("committed: checkpoint kept, exports removed");
    json_object_put(info);
    return QBK_EXIT_OK;
}

static int pull(QmpClient *qmp, Repo *repo, BackupOptions *opts)
{
    g_autoptr(GError) error = NULL;
    json_object *manifest = backup_pull(qmp, repo, opts, &error);
    json_object *skipped;
    const char *why_not;

    if (!manifest) {
        cmd_error("backup failed: %s%s", error->message, cmd_hint(error));
        return cmd_backup_exit_code(error);
    }
    why_not =
        qmp_json_string(json_object_object_get(manifest, "quiesce"), "skipped");
    if (why_not) {
        cmd_info("warning: crash-consistent only: %s", why_not);
    }
    skipped = qmp_json_array(manifest, "skipped_manifests");
    for (size_t i = 0; i < qmp_json_length(skipped); i++) {
        cmd_info("warning: left out a damaged manifest: %s",
                 json_object_get_string(qmp_json_index(skipped, i)));
    }
    if (opt_json) {
        cmd_print_json(manifest);
    } else {
        print_summary(manifest);
        json_object_put(manifest);
    }
    return QBK_EXIT_OK;
}

static const CmdSpec spec = {
    .name = "qbk-pull",
    .parameters = "- back up a running VM",
    .summary =
        "Takes a crash-consistent backup of every disk of a running VM at one\n"
        "instant (image fleecing), while the guest keeps writing. Per disk: a\n"
        "full backup when there is no usable chain, else only what changed\n"
        "since the disk's last backup (auto). The repository keeps one qcow2\n"
        "chain per disk (full <- inc <- ...) with relative backing files, and\n"
        "a JSON manifest per backup, all owner-only. On failure or\n"
        "SIGINT/SIGTERM everything is rolled back: the next backup misses no\n"
        "write.",
    .description =
        "Examples:\n"
        "  qbk-pull --qmp /run/vm1/qmp.sock --repo /backups/vm1\n"
        "  qbk-pull --qmp /run/vm1/qmp.sock --repo /backups/vm1 \\\n"
        "      --mode differential\n"
        "  qbk-pull --qmp /run/vm1/qmp.sock --repo /backups/vm1 \\\n"
        "      --since 20261122T213500Z --json\n"
        "  qbk-restore --repo /backups/vm1 --disk disk0 -o disk0.raw\n",
    .entries = entries,
    .common = CMD_OPT_QMP | CMD_OPT_QUIET | CMD_OPT_COPIER | CMD_OPT_KEY,
};

int main(int argc, char **argv)
{
    g_autoptr(GError) error = NULL;
    g_autoptr(QmpClient) qmp = NULL;
    g_autoptr(Repo) repo = NULL;
    struct sigaction sa = { .sa_handler = on_signal };
    BackupOptions opts;
    int trace_fd = -1; /* closed at exit */

    int rc = cmd_parse(&spec, &argc, &argv);

    if (rc >= 0) {
        return rc;
    }
    backup_options_init(&opts);
    if (!check_options(argc, &opts, &error)) {
        return cmd_usage("%s", error->message);
    }
    if (opt_trace) {
        trace_fd =
            open(opt_trace, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
        if (trace_fd < 0) {
            cmd_error("cannot write '%s': %s", opt_trace, g_strerror(errno));
            return QBK_EXIT_USAGE;
        }
        opts.copier.trace_fd = trace_fd;
    }
    opts.copier.cancel = &cancel_flag;
    opts.progress = on_progress;
    opts.fleeced = on_fleeced;

    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGHUP, &sa, NULL);

    /* one writer at a time, before the VM is touched */
    repo = repo_open(opt_repo, REPO_OPEN_CREATE | REPO_OPEN_LOCK, &error);
    if (!repo ||
        !cmd_repo_key(repo, opt_encrypt && repo_is_empty(repo), &error)) {
        cmd_error("%s%s", error->message, cmd_hint(error));
        return cmd_backup_exit_code(error);
    }
    qmp = cmd_qmp_connect(cmd_common.qmp, cmd_common.timeout_s * 1000, &error);
    if (!qmp) {
        cmd_error("%s", error->message);
        return QBK_EXIT_FAILURE;
    }
    return opt_export_only ? export_only(qmp, repo, &opts)
                           : pull(qmp, repo, &opts);
}
