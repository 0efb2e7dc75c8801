/*
 * qbk-copy: copy one NBD export to another with qbk's copier: many requests
 * in flight, holes and zeros not sent as data, optionally only the regions
 * a dirty bitmap marks, and per-block digests of what was read.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "cmd-common.h"
#include "copier.h"

static char *opt_bitmap;
static char *opt_digests;
static gboolean opt_zeroed;
static gboolean opt_json;
static gboolean opt_progress;
static gint opt_timeout_s = COPIER_CONNECT_TIMEOUT_MS / 1000;

static GOptionEntry entries[] = {
    { "bitmap", 'b', 0, G_OPTION_ARG_STRING, &opt_bitmap,
      "copy only what the source's qemu:dirty-bitmap:BITMAP marks", "BITMAP" },
    { "target-zeroed", 'z', 0, G_OPTION_ARG_NONE, &opt_zeroed,
      "the target reads as zeros already: skip zero regions", NULL },
    { "digests", 'd', 0, G_OPTION_ARG_FILENAME, &opt_digests,
      "write one XXH3-128 per 64 KiB block to FILE (sparse: each XORed "
      "with a zero block's, so zero blocks are holes) and print the checksum",
      "FILE" },
    { "progress", 'p', 0, G_OPTION_ARG_NONE, &opt_progress,
      "print progress on stderr", NULL },
    { "json", 'j', 0, G_OPTION_ARG_NONE, &opt_json,
      "print the statistics as one JSON object", NULL },
    { "timeout", 't', 0, G_OPTION_ARG_INT, &opt_timeout_s,
      "seconds an NBD server may take to answer while connecting "
      "(1-86400, default 30)",
      "SECONDS" },
    { NULL },
};

static void show_progress(const CopierStats *s, void *opaque)
{
    double mib = (s->bytes_read + s->bytes_zero) / 1048576.0;

    fprintf(stderr, "\r%s: %5.1f%%  %8.1f MiB/s ", g_get_prgname(),
            s->size ? 100.0 * s->bytes_done / s->size : 100.0,
            s->seconds > 0 ? mib / s->seconds : 0.0);
}

static const CmdSpec spec = {
    .name = "qbk-copy",
    .parameters = "SOURCE-URI TARGET - copy an NBD export",
    .summary = NULL,
    .description =
        "SOURCE-URI and a TARGET that is one are NBD URIs, as libnbd reads\n"
        "them: nbd+unix:///EXPORT?socket=PATH (percent-encode odd "
        "characters),\n"
        "nbd://HOST:PORT/EXPORT, or nbds://HOST:PORT/EXPORT for TLS (with\n"
        "--tls-creds). Any other TARGET is a local raw file,\n"
        "written sparse with Linux AIO (see --write-mode).\n"
        "\n"
        "Example:\n"
        "  qbk-copy --bitmap since-mon --digests d.bin \\\n"
        "      'nbd+unix:///disk0?socket=/run/fleece.sock' \\\n"
        "      'nbd+unix:///inc?socket=/run/target.sock'\n",
    .entries = entries,
    .common = CMD_OPT_COPIER | CMD_OPT_TLS,
};

/* The copier's options: the shared ones (cmd_parse checked them) and
 * qbk-copy's own. */
static void make_options(CopierOptions *opts)
{
    *opts = cmd_common.copier;
    opts->bitmap = opt_bitmap;
    opts->target_zeroed = opt_zeroed;
    if (opt_progress) {
        opts->progress = show_progress;
    }
}

static void print_result(const CopierStats *stats, const char *checksum)
{
    json_object *o;

    if (!opt_json) {
        if (checksum) {
            printf("%s\n", checksum);
        }
        return;
    }
    o = json_object_new_object();
    qmp_json_set_uint(o, "size", stats->size);
    qmp_json_set_uint(o, "bytes_read", stats->bytes_read);
    qmp_json_set_uint(o, "bytes_written", stats->bytes_written);
    qmp_json_set_uint(o, "bytes_zero", stats->bytes_zero);
    qmp_json_set_uint(o, "bytes_skipped", stats->bytes_skipped);
    qmp_json_set_double(o, "seconds", stats->seconds);
    qmp_json_set_uint(o, "extents", stats->extents);
    qmp_json_set_uint(o, "block_status_calls", stats->block_status_calls);
    qmp_json_set_uint(o, "allocation_asked", stats->allocation_asked);
    qmp_json_set_uint(o, "planned_max", stats->planned_max);
    qmp_json_set_double(o, "block_status_seconds", stats->block_status_seconds);
    qmp_json_set_double(o, "plan_seconds", stats->plan_seconds);
    qmp_json_set_string(o, "checksum", checksum);
    cmd_print_json(o);
}

int main(int argc, char **argv)
{
    g_autoptr(GError) error = NULL;
    g_autofree char *checksum = NULL;
    CopierEndpoint src = { 0 }, dst = { 0 };
    CopierOptions opts;
    CopierStats stats;
    int dfd = -1;
    bool ok;

    int rc = cmd_parse(&spec, &argc, &argv);

    if (rc >= 0) {
        return rc;
    }
    if (argc != 3) {
        return cmd_usage("give SOURCE-URI and TARGET");
    }
    if (!cmd_check_path("--digests", opt_digests, &error) ||
        !cmd_check_path("TARGET", argv[2], &error) ||
        !cmd_check_range("--timeout", opt_timeout_s, 1, CMD_MAX_TIMEOUT_S,
                         &error)) {
        return cmd_usage("%s", error->message);
    }
    make_options(&opts);
    if (!copier_is_nbd_uri(argv[1])) {
        return cmd_usage("'%s' is not an NBD URI", argv[1]);
    }
    src.uri = argv[1];
    if (!cmd_common.requests_given && copier_uri_is_tcp(src.uri)) {
        opts.requests = COPIER_REMOTE_REQUESTS;
    }
    src.tls_dir = dst.tls_dir = cmd_common.tls_creds;
    src.timeout_ms = dst.timeout_ms = opt_timeout_s * 1000;
    if (copier_is_nbd_uri(argv[2])) {
        dst.uri = argv[2];
    } else {
        dst.file = argv[2]; /* a local raw file, written with Linux AIO */
        opts.target_zeroed = true; /* made sparse: it reads as zeros */
    }
    if (opt_digests) {
        dfd = open(opt_digests, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
        if (dfd < 0) {
            cmd_error("cannot create '%s': %s", opt_digests, g_strerror(errno));
            return QBK_EXIT_FAILURE;
        }
        opts.digest_fd = dfd;
    }
    ok = copier_copy(&src, &dst, &opts, &stats, &error);
    if (opt_progress) {
        fputc('\n', stderr);
    }
    if (ok && dfd >= 0) {
        checksum = copier_digests_checksum(dfd, stats.size, false,
                                           COPIER_SUM_DATA, &error);
        ok = checksum != NULL;
    }
    if (dfd >= 0) {
        close(dfd);
    }
    if (!ok) {
        cmd_error("%s", error->message);
        return QBK_EXIT_FAILURE;
    }
    print_result(&stats, checksum);
    return QBK_EXIT_OK;
}
