/*
 * Helpers shared by the qbk commands; see cmd-common.h.
 */
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <string.h>

#include "cmd-common.h"

#include "backup.h"
#include "fleece.h"

static bool quiet;
static gboolean show_version;

CmdCommon cmd_common = { .timeout_s = QMP_DEFAULT_TIMEOUT_MS / 1000 };

static GOptionEntry version_entries[] = {
    { "version", 'V', 0, G_OPTION_ARG_NONE, &show_version,
      "print the version and exit", NULL },
    { NULL },
};

static GOptionEntry qmp_entries[] = {
    { "qmp", 'q', 0, G_OPTION_ARG_FILENAME, &cmd_common.qmp,
      "QMP socket of the running VM: PATH, unix:PATH, tcp:HOST:PORT or "
      "tls:HOST:PORT (default: $QBK_QMP)",
      "SOCKET" },
    { "timeout", 't', 0, G_OPTION_ARG_INT, &cmd_common.timeout_s,
      "seconds to wait for QEMU before giving up (1-86400, default: 30)",
      "SECONDS" },
    { NULL },
};

/* The copier's options as given; G_MININT(64): not given. */
static gint copier_requests = G_MININT;
static gint copier_connections = G_MININT;
static gint64 copier_chunk = G_MININT64;
static char *copier_rate;
static char *copier_write_mode;
static gint copier_stall_s = G_MININT;
static gint copier_plan_ahead = G_MININT;
static gint64 copier_notice_radius = G_MININT64;
static gint copier_notice_ms = G_MININT;

static GOptionEntry copier_entries[] = {
    { "requests", 0, 0, G_OPTION_ARG_INT, &copier_requests,
      "copier requests in flight (1-1024, default 16)", "N" },
    { "connections", 0, 0, G_OPTION_ARG_INT, &copier_connections,
      "NBD connections to each source, requests spread over them (1-8, "
      "default 2)",
      "N" },
    { "chunk-size", 0, 0, G_OPTION_ARG_INT64, &copier_chunk,
      "bytes per request, a multiple of 64 KiB up to 32 MiB (default "
      "256 KiB: smaller requests wait less behind each other, and so does "
      "a guest)",
      "BYTES" },
    { "sequential", 0, 0, G_OPTION_ARG_NONE, &cmd_common.sequential,
      "one request at a time in ascending order (the baseline; qbk-pull: "
      "no notices either)",
      NULL },
    { "rate-limit", 0, 0, G_OPTION_ARG_STRING, &copier_rate,
      "read at most this much per second, e.g. 50M", "SIZE" },
    { "stall-timeout", 0, 0, G_OPTION_ARG_INT, &copier_stall_s,
      "fail when no request completes for this long, e.g. a network path "
      "that went away (1-3600, default 60)",
      "SECONDS" },
    { "write-mode", 0, 0, G_OPTION_ARG_STRING, &copier_write_mode,
      "how a local raw file is written: cached (default: through the page "
      "cache, writeback started at once, pages dropped once written) or "
      "direct (O_DIRECT)",
      "MODE" },
    /* for tests: the bound on planning ahead, met by a small disk */
    { "x-plan-ahead", 0, G_OPTION_FLAG_HIDDEN, G_OPTION_ARG_INT,
      &copier_plan_ahead, "regions planned ahead, at most", "N" },
    /* for benchmarks: how far around a guest write the copy goes first,
     * and how often the guest's writes are looked for */
    { "x-notice-radius", 0, G_OPTION_FLAG_HIDDEN, G_OPTION_ARG_INT64,
      &copier_notice_radius, "bytes each side of a guest write", "BYTES" },
    { "x-notice-ms", 0, G_OPTION_FLAG_HIDDEN, G_OPTION_ARG_INT,
      &copier_notice_ms, "milliseconds between looks", "MS" },
    { NULL },
};

static GOptionEntry tls_entries[] = {
    { "tls-creds", 0, 0, G_OPTION_ARG_FILENAME, &cmd_common.tls_creds,
      "for tls:HOST:PORT monitors and nbds:// exports: a directory with "
      "ca-cert.pem, client-cert.pem and client-key.pem (QEMU's "
      "tls-creds-x509 layout, libnbd's tls-certificates; default: "
      "$QBK_TLS_CREDS)",
      "DIR" },
    { NULL },
};

static GOptionEntry key_entries[] = {
    { "key-file", 0, 0, G_OPTION_ARG_FILENAME, &cmd_common.key_file,
      "an encrypted repository's key: a file (owner-only) holding its "
      "passphrase as UTF-8 text, read by QEMU itself; the repository keeps "
      "only a fingerprint, and a wrong key is refused before anything is "
      "read or written (default: $QBK_KEY_FILE)",
      "FILE" },
    { NULL },
};

static GOptionEntry quiet_entries[] = {
    { "quiet", 0, 0, G_OPTION_ARG_NONE, &cmd_common.quiet,
      "print nothing on stderr but errors", NULL },
    { NULL },
};

/* --write-mode TEXT into *MODE (TEXT NULL: *MODE stays). */
static bool cmd_write_mode(const char *text, CopierWriteMode *mode,
                           GError **error)
{
    if (text && !copier_write_mode_parse(text, mode)) {
        g_set_error(error, G_OPTION_ERROR, G_OPTION_ERROR_BAD_VALUE,
                    "--write-mode must be cached or direct");
        return false;
    }
    return true;
}

/* The copier's options into cmd_common.copier, bounds checked. */
static bool check_copier(GError **error)
{
    CopierOptions *o = &cmd_common.copier;

    copier_options_init(o);
    if ((copier_requests != G_MININT &&
         !cmd_check_range("--requests", copier_requests, 1, COPIER_MAX_REQUESTS,
                          error)) ||
        (copier_connections != G_MININT &&
         !cmd_check_range("--connections", copier_connections, 1,
                          COPIER_MAX_CONNECTIONS, error)) ||
        (copier_chunk != G_MININT64 &&
         !cmd_check_range("--chunk-size", copier_chunk, COPIER_BLOCK_SIZE,
                          COPIER_MAX_CHUNK, error)) ||
        (copier_rate &&
         !cmd_parse_size("--rate-limit", copier_rate, &o->rate_limit, error)) ||
        (copier_stall_s != G_MININT &&
         !cmd_check_range("--stall-timeout", copier_stall_s, 1, 3600, error)) ||
        (copier_plan_ahead != G_MININT &&
         !cmd_check_range("--x-plan-ahead", copier_plan_ahead, 1, G_MAXINT,
                          error)) ||
        (copier_notice_radius != G_MININT64 &&
         !cmd_check_range("--x-notice-radius", copier_notice_radius, 0,
                          G_GINT64_CONSTANT(1) << 40, error)) ||
        (copier_notice_ms != G_MININT &&
         !cmd_check_range("--x-notice-ms", copier_notice_ms, 1, 10000,
                          error)) ||
        !cmd_write_mode(copier_write_mode, &o->write_mode, error)) {
        return false;
    }
    if (copier_requests != G_MININT) {
        o->requests = copier_requests;
    }
    cmd_common.requests_given =
        copier_requests != G_MININT || cmd_common.sequential;
    if (copier_connections != G_MININT) {
        o->connections = copier_connections;
    }
    if (copier_chunk != G_MININT64) {
        o->chunk_size = copier_chunk;
    }
    if (copier_stall_s != G_MININT) {
        o->stall_seconds = copier_stall_s;
    }
    if (copier_plan_ahead != G_MININT) {
        o->plan_ahead = copier_plan_ahead;
    }
    if (copier_notice_radius != G_MININT64) {
        o->notice_radius = copier_notice_radius;
    }
    if (copier_notice_ms != G_MININT) {
        o->notice_ms = copier_notice_ms;
    }
    if (cmd_common.sequential) {
        o->requests = o->connections = 1;
    }
    return copier_options_check(o, error);
}

/* The shared options' bounds and defaults, after parsing. */
/* An option not given takes environment variable VAR, if set and not
 * empty; true if it did. */
static bool env_default(char **option, const char *var)
{
    const char *value = g_getenv(var);

    if (*option || !value || !*value) {
        return false;
    }
    *option = g_strdup(value);
    return true;
}

static int check_common(const CmdSpec *spec)
{
    g_autoptr(GError) error = NULL;

    if ((spec->common & CMD_OPT_COPIER) && !check_copier(&error)) {
        return cmd_usage("%s", error->message);
    }
    if (spec->common & (CMD_OPT_QMP | CMD_OPT_TLS)) {
        if (!cmd_check_path("--tls-creds", cmd_common.tls_creds, &error)) {
            return cmd_usage("%s", error->message);
        }
        env_default(&cmd_common.tls_creds, "QBK_TLS_CREDS");
    }

    if (spec->common & CMD_OPT_KEY) {
        if (!cmd_check_path("--key-file", cmd_common.key_file, &error)) {
            return cmd_usage("%s", error->message);
        }
        /* the file's name, never the key itself */
        cmd_common.key_env = env_default(&cmd_common.key_file, "QBK_KEY_FILE");
    }
    if (spec->common & CMD_OPT_QMP) {
        if (!cmd_check_range("--timeout", cmd_common.timeout_s, 1,
                             CMD_MAX_TIMEOUT_S, &error) ||
            !cmd_check_path("--qmp", cmd_common.qmp, &error)) {
            return cmd_usage("%s", error->message);
        }
        cmd_common.qmp_env = env_default(&cmd_common.qmp, "QBK_QMP");
    }
    cmd_set_quiet(cmd_common.quiet);
    return -1;
}

int cmd_parse(const CmdSpec *spec, int *argc, char ***argv)
{
    g_autoptr(GOptionContext) ctx = g_option_context_new(spec->parameters);
    g_autoptr(GError) error = NULL;
    g_autofree char *description =
        g_strconcat(spec->description ? spec->description : "",
                    spec->description ? "\n" : "", QBK_EXIT_CODES_HELP, NULL);

    g_set_prgname(spec->name);
    g_option_context_add_main_entries(ctx, spec->entries, NULL);
    if (spec->common & CMD_OPT_QMP) {
        g_option_context_add_main_entries(ctx, qmp_entries, NULL);
    }
    if (spec->common & (CMD_OPT_QMP | CMD_OPT_TLS)) {
        g_option_context_add_main_entries(ctx, tls_entries, NULL);
    }
    if (spec->common & CMD_OPT_COPIER) {
        g_option_context_add_main_entries(ctx, copier_entries, NULL);
    }
    if (spec->common & CMD_OPT_KEY) {
        g_option_context_add_main_entries(ctx, key_entries, NULL);
    }
    if (spec->common & CMD_OPT_QUIET) {
        g_option_context_add_main_entries(ctx, quiet_entries, NULL);
    }
    g_option_context_add_main_entries(ctx, version_entries, NULL);
    if (spec->summary) {
        g_option_context_set_summary(ctx, spec->summary);
    }
    g_option_context_set_description(ctx, description);
    if (!g_option_context_parse(ctx, argc, argv, &error)) {
        return cmd_usage("%s", error->message);
    }
    if (show_version) {
        printf("%s %s\n", spec->name, QBK_VERSION);
        return QBK_EXIT_OK;
    }
    return check_common(spec);
}

void cmd_set_quiet(bool q)
{
    quiet = q;
}

static void vprint(const char *fmt, va_list ap)
{
    g_autofree char *msg = g_strdup_vprintf(fmt, ap);

    fprintf(stderr, "%s: %s\n", g_get_prgname(), msg);
}

void cmd_error(const char *fmt, ...)
{
    va_list ap;

    va_start(ap, fmt);
    vprint(fmt, ap);
    va_end(ap);
}

void cmd_info(const char *fmt, ...)
{
    va_list ap;

    if (quiet) {
        return;
    }
    va_start(ap, fmt);
    vprint(fmt, ap);
    va_end(ap);
}

CmdVm *cmd_vm_open(const char *qmp_address, char **images, int timeout_ms,
                   GError **error)
{
    g_autoptr(CmdVm) vm = g_new0(CmdVm, 1);

    if (images && images[0]) {
        guint n = g_strv_length(images);

        vm->offline = true;
        vm->image_ids = g_strdupv(images);
        vm->nodes = g_new0(char *, n + 1);
        for (guint i = 0; i < n; i++) {
            vm->nodes[i] = g_strdup_printf("img%u", i);
        }
        vm->qmp = qmp_spawn_storage_daemon((const char *const *)images, 0, NULL,
                                           timeout_ms, error);
    } else {
        vm->qmp = cmd_qmp_connect(qmp_address, timeout_ms, error);
    }
    if (!vm->qmp || !cmd_vm_refresh(vm, error)) {
        return NULL;
    }
    return g_steal_pointer(&vm);
}

bool cmd_vm_refresh(CmdVm *vm, GError **error)
{
    GPtrArray *disks;

    if (vm->offline) {
        disks = qmp_query_node_disks(vm->qmp, (const char *const *)vm->nodes,
                                     (const char *const *)vm->image_ids, error);
    } else {
        disks = qmp_query_disks(vm->qmp, error);
    }
    if (!disks) {
        return false;
    }
    if (vm->disks) {
        g_ptr_array_unref(vm->disks);
    }
    vm->disks = disks;
    return true;
}

bool cmd_vm_close(CmdVm *vm, GError **error)
{
    bool ok = true;

    if (vm->qmp && vm->offline) {
        ok = qmp_stop_storage_daemon(vm->qmp, error);
    }
    qmp_free(vm->qmp);
    vm->qmp = NULL;
    return ok;
}

void cmd_vm_free(CmdVm *vm)
{
    if (!vm) {
        return;
    }
    qmp_free(vm->qmp);
    if (vm->disks) {
        g_ptr_array_unref(vm->disks);
    }
    g_strfreev(vm->image_ids);
    g_strfreev(vm->nodes);
    g_free(vm);
}

GPtrArray *cmd_vm_select_disks(CmdVm *vm, char **names, GError **error)
{
    GPtrArray *sel = g_ptr_array_new();

    if (!names || !names[0]) {
        for (guint i = 0; i < vm->disks->len; i++) {
            QmpDisk *disk = vm->disks->pdata[i];

            if (!disk->no_bitmaps) {
                g_ptr_array_add(sel, disk);
            }
        }
        return sel;
    }
    for (guint i = 0; names[i]; i++) {
        QmpDisk *disk = qmp_disk_find(vm->disks, names[i]);

        if (!disk) {
            g_set_error(error, G_OPTION_ERROR, G_OPTION_ERROR_BAD_VALUE,
                        "unknown disk '%s' (see 'qbk-checkpoint disks')",
                        names[i]);
            g_ptr_array_unref(sel);
            return NULL;
        }
        if (!g_ptr_array_find(sel, disk, NULL)) {
            g_ptr_array_add(sel, disk);
        }
    }
    return sel;
}

int cmd_usage(const char *fmt, ...)
{
    g_autofree char *msg = NULL;
    va_list ap;

    va_start(ap, fmt);
    msg = g_strdup_vprintf(fmt, ap);
    va_end(ap);
    cmd_error("%s (see --help)", msg);
    return QBK_EXIT_USAGE;
}

bool cmd_check_range(const char *name, gint64 value, gint64 min, gint64 max,
                     GError **error)
{
    if (value < min || value > max) {
        g_set_error(error, G_OPTION_ERROR, G_OPTION_ERROR_BAD_VALUE,
                    "%s must be %" G_GINT64_FORMAT " to %" G_GINT64_FORMAT
                    ", not %" G_GINT64_FORMAT,
                    name, min, max, value);
        return false;
    }
    return true;
}

bool cmd_check_number(const char *name, double value, double min, double max,
                      GError **error)
{
    if (!isfinite(value) || value < min || value > max) {
        g_set_error(error, G_OPTION_ERROR, G_OPTION_ERROR_BAD_VALUE,
                    "%s must be a number from %g to %g", name, min, max);
        return false;
    }
    return true;
}

bool cmd_parse_size(const char *name, const char *text, guint64 *out,
                    GError **error)
{
    static const char units[] = "KMGT";
    const char *u;
    char *end;
    guint64 v;

    errno = 0;
    v = g_ascii_isdigit(text[0]) ? g_ascii_strtoull(text, &end, 10) : 0;
    if (!g_ascii_isdigit(text[0]) || errno == ERANGE) {
        goto bad;
    }
    if (*end) {
        u = strchr(units, g_ascii_toupper(*end));
        if (!u || (end[1] && g_ascii_strcasecmp(end + 1, "iB") != 0 &&
                   g_ascii_strcasecmp(end + 1, "B") != 0)) {
            goto bad;
        }
        if (v > (G_MAXUINT64 >> (10 * (u - units + 1)))) {
            goto bad;
        }
        v <<= 10 * (u - units + 1);
    }
    if (v == 0) {
        goto bad;
    }
    *out = v;
    return true;

bad:
    g_set_error(error, G_OPTION_ERROR, G_OPTION_ERROR_BAD_VALUE,
                "%s '%s' is not a size like 50M (1 byte to 16 EiB)", name,
                text);
    return false;
}

bool cmd_check_path(const char *name, const char *path, GError **error)
{
    if (path && !*path) {
        g_set_error(error, G_OPTION_ERROR, G_OPTION_ERROR_BAD_VALUE,
                    "%s is empty", name);
        return false;
    }
    return true;
}

char *cmd_format_bytes(guint64 bytes)
{
    return g_format_size_full(bytes, G_FORMAT_SIZE_IEC_UNITS);
}

void cmd_print_json(json_object *obj)
{
    puts(json_object_to_json_string_ext(
        obj, JSON_C_TO_STRING_PRETTY | JSON_C_TO_STRING_SPACED |
                 JSON_C_TO_STRING_NOSLASHESCAPE));
    fflush(stdout);
    json_object_put(obj);
}

int cmd_finish_results(json_object *results, json_object *extra, bool json,
                       const char *none, int rc)
{
    bool empty = qmp_json_length(results) == 0;
    json_object *out;

    if (empty) {
        cmd_error("%s", none);
        rc = QBK_EXIT_USAGE;
    }
    if (!json || empty) {
        json_object_put(results);
        json_object_put(extra);
        return rc;
    }
    out = json_object_new_object();
    json_object_object_add(out, "results", results);
    if (extra) {
        json_object_object_foreach(extra, key, value)
        {
            json_object_object_add(out, key, json_object_get(value));
        }
        json_object_put(extra);
    }
    cmd_print_json(out);
    return rc;
}

void cmd_make_absolute(char **path)
{
    char *abs;

    if (!*path) {
        return;
    }
    abs = g_canonicalize_filename(*path, NULL);
    g_free(*path);
    *path = abs;
}

int cmd_backup_exit_code(const GError *error)
{
    if (error->domain == REPO_ERROR) {
        return error->code == REPO_ERROR_NOT_FOUND ||
                       error->code == REPO_ERROR_INVALID ||
                       error->code == REPO_ERROR_KEY
                   ? QBK_EXIT_USAGE
                   : QBK_EXIT_FAILURE;
    }
    if (error->domain == G_OPTION_ERROR) {
        return QBK_EXIT_USAGE;
    }
    if (error->domain != BACKUP_ERROR) {
        return QBK_EXIT_FAILURE;
    }
    switch ((BackupErrorCode)error->code) {
    case BACKUP_ERROR_FULL_NEEDED:
        return QBK_EXIT_FULL_NEEDED;
    case BACKUP_ERROR_NOT_FOUND:
    case BACKUP_ERROR_NOT_IN_CHAIN:
    case BACKUP_ERROR_USAGE:
    case BACKUP_ERROR_DISK_ID:
        return QBK_EXIT_USAGE;
    default:
        return QBK_EXIT_FAILURE;
    }
}

const char *cmd_hint(const GError *error)
{
    if (g_error_matches(error, BACKUP_ERROR, BACKUP_ERROR_LEFTOVER)) {
        return " (run 'qbk-checkpoint check --repair' to undo it)";
    }
    if (g_error_matches(error, BACKUP_ERROR, BACKUP_ERROR_DISK_ID)) {
        return " (give the device an id, or name the node with --node "
               "NODE=ID)";
    }
    if (g_error_matches(error, FLEECE_ERROR, FLEECE_ERROR_SERVER_RUNNING)) {
        return " (give its socket with --nbd-server SOCKET)";
    }
    if (error->domain == REPO_ERROR && error->code == REPO_ERROR_CORRUPT) {
        return " (see 'qbk-verify')";
    }
    return "";
}

QmpClient *cmd_qmp_connect(const char *address, int timeout_ms, GError **error)
{
    return qmp_connect_tls(address, cmd_common.tls_creds, timeout_ms, error);
}

bool cmd_repo_key(Repo *repo, bool adopt, GError **error)
{
    if (cmd_common.key_env && !adopt && !repo_encrypted(repo)) {
        return true; /* one $QBK_KEY_FILE for a host's encrypted ones */
    }
    if (cmd_common.key_file) {
        return repo_key_check(repo, cmd_common.key_file, adopt, error);
    }
    if (repo_encrypted(repo)) {
        g_set_error(error, REPO_ERROR, REPO_ERROR_KEY,
                    "repository '%s' is encrypted: give its key with "
                    "--key-file",
                    repo_root(repo));
        return false;
    }
    return true;
}
