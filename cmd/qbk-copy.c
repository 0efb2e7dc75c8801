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
static gint opt_requests;    /* 0: the copier's default */
static gint opt_connections; /* 0: the copier's default */
static gint64 opt_chunk;     /* 0: the copier's default */
static gboolean opt_zeroed;
static gboolean opt_sequential;
static gboolean opt_json;
static gboolean opt_progress;
static gint64 opt_rate;
static char *opt_write_mode;

static GOptionEntry entries[] = {
    { "bitmap", 'b', 0, G_OPTION_ARG_STRING, &opt_bitmap,
      "copy only what the source's qemu:dirty-bitmap:BITMAP marks", "BITMAP" },
    { "requests", 'r', 0, G_OPTION_ARG_INT, &opt_requests,
      "requests in flight (1-1024, default 16)", "N" },
    { "connections", 'C', 0, G_OPTION_ARG_INT, &opt_connections,
      "NBD connections to the source, requests spread over them (1-8, "
      "default 2)",
      "N" },
    { "chunk-size", 'c', 0, G_OPTION_ARG_INT64, &opt_chunk,
      "bytes per request, a multiple of 65536 up to 32 MiB (default "
      "256 KiB)",
      "BYTES" },
    { "sequential", 's', 0, G_OPTION_ARG_NONE, &opt_sequential,
      "one request at a time in ascending order (the baseline)", NULL },
    { "target-zeroed", 'z', 0, G_OPTION_ARG_NONE, &opt_zeroed,
      "the target reads as zeros already: skip zero regions", NULL },
    { "digests", 'd', 0, G_OPTION_ARG_FILENAME, &opt_digests,
      "write one XXH3-128 per 64 KiB block to FILE and print the checksum",
      "FILE" },
    { "rate-limit", 0, 0, G_OPTION_ARG_INT64, &opt_rate,
      "read at most BYTES per second", "BYTES" },
    { "write-mode", 0, 0, G_OPTION_ARG_STRING, &opt_write_mode,
      "how a file target is written: cached (default: through the page "
      "cache, writeback started at once, pages dropped once written) or "
      "direct (O_DIRECT)",
      "MODE" },
    { "progress", 'p', 0, G_OPTION_ARG_NONE, &opt_progress,
      "print progress on stderr", NULL },
    { "json", 'j', 0, G_OPTION_ARG_NONE, &opt_json,
      "print the statistics as one JSON object", NULL },
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
        "them: nbd+unix:///EXPORT?socket=PATH (percent-encode odd characters)\n"
        "or nbd://HOST:PORT/EXPORT. Any other TARGET is a local raw file,\n"
        "written sparse with Linux AIO and O_DIRECT.\n"
        "\n"
        "Example:\n"
        "  qbk-copy --bitmap since-mon --digests d.bin \\\n"
        "      'nbd+unix:///disk0?socket=/run/fleece.sock' \\\n"
        "      'nbd+unix:///inc?socket=/run/target.sock'\n",
    .entries = entries,
};

/* The copier's options from the command line, bounds checked. */
static bool make_options(CopierOptions *opts, GError **error)
{
    copier_options_init(opts);
    if (opt_requests) {
        opts->requests = opt_requests;
    }
    if (opt_connections) {
        opts->connections = opt_connections;
    }
    if (opt_chunk) {
        opts->chunk_size = opt_chunk;
    }
    if (opt_sequential) {
        opts->requests = opts->connections = 1;
    }
    opts->bitmap = opt_bitmap;
    opts->target_zeroed = opt_zeroed;
    opts->rate_limit = opt_rate;
    if (!cmd_write_mode(opt_write_mode, &opts->write_mode, error)) {
        return false;
    }
    if (opt_progress) {
        opts->progress = show_progress;
    }
    return copier_options_check(opts, error);
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
    if (!cmd_check_range("--requests", opt_requests, 0, COPIER_MAX_REQUESTS,
                         &error) ||
        !cmd_check_range("--connections", opt_connections, 0,
                         COPIER_MAX_CONNECTIONS, &error) ||
        !cmd_check_range("--chunk-size", opt_chunk, 0, COPIER_MAX_CHUNK,
                         &error) ||
        !cmd_check_range("--rate-limit", opt_rate, 0, G_MAXINT64, &error) ||
        !cmd_check_path("--digests", opt_digests, &error) ||
        !cmd_check_path("TARGET", argv[2], &error) ||
        !make_options(&opts, &error)) {
        return cmd_usage("%s", error->message);
    }
    if (!copier_is_nbd_uri(argv[1])) {
        return cmd_usage("'%s' is not an NBD URI", argv[1]);
    }
    src.uri = argv[1];
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
        checksum = copier_digests_checksum(dfd, stats.size, &error);
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
