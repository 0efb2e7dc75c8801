/*
 * qbk-restore: rebuild a disk as it was at any backup of a repository into
 * a sparse raw or qcow2 file, and check it against the backup's checksum.
 */
#include <stdio.h>

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
static gboolean opt_version;

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
    { "list", 'l', 0, G_OPTION_ARG_NONE, &opt_list,
      "list the repository's backups instead", NULL },
    { "json", 'j', 0, G_OPTION_ARG_NONE, &opt_json,
      "print the result as one JSON object", NULL },
    { "version", 'V', 0, G_OPTION_ARG_NONE, &opt_version,
      "print the version and exit", NULL },
    { NULL },
};

static int list_backups(void)
{
    g_autoptr(GError) error = NULL;
    g_autoptr(GPtrArray) all = backup_list(opt_repo, &error);
    json_object *arr;

    if (!all) {
        cmd_error("%s", error->message);
        return cmd_backup_exit_code(error);
    }
    arr = json_object_new_array();
    for (guint i = 0; i < all->len; i++) {
        json_object *m = all->pdata[i];
        json_object *disks = qmp_json_array(m, "disks");

        if (!opt_json) {
            printf("%s", qmp_json_string(m, "id"));
            for (size_t d = 0; d < json_object_array_length(disks); d++) {
                json_object *e = json_object_array_get_idx(disks, d);

                printf("  %s:%s", qmp_json_string(e, "disk"),
                       qmp_json_string(e, "mode"));
            }
            printf("\n");
        }
        json_object_array_add(arr, json_object_get(m));
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
        cmd_error("--into IMAGE goes with --from ID and --disk DISK, not "
                  "--output (see --help)");
        return QBK_EXIT_USAGE;
    }
    r = backup_restore_into(opt_repo, opt_from,
                            opt_backup ? opt_backup : "latest", opt_disk,
                            opt_into, &error);
    if (!r) {
        cmd_error("%s", error->message);
        return cmd_backup_exit_code(error);
    }
    if (opt_verify) {
        if (!backup_check_image(opt_repo, qmp_json_string(r, "backup"),
                                opt_disk, opt_into,
                                qmp_json_string(r, "format"), &error)) {
            cmd_error("%s", error->message);
            json_object_put(r);
            return QBK_EXIT_FAILURE;
        }
        json_object_object_add(r, "verified", json_object_new_boolean(1));
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

int main(int argc, char **argv)
{
    g_autoptr(GOptionContext) ctx =
        g_option_context_new("- rebuild a disk from a backup repository");
    g_autoptr(GError) error = NULL;
    json_object *entry;

    g_set_prgname("qbk-restore");
    g_option_context_add_main_entries(ctx, entries, NULL);
    g_option_context_set_description(
        ctx,
        "Examples:\n"
        "  qbk-restore --repo /backups/vm1 --list\n"
        "  qbk-restore --repo /backups/vm1 --disk disk0 -o disk0.raw\n"
        "  qbk-restore --repo /backups/vm1 --disk disk0 --backup "
        "20261122T213500Z \\\n      -o disk0.qcow2 --format qcow2\n"
        "  qbk-restore --repo /backups/vm1 --disk disk0 --into vm1-disk0.qcow2 "
        "--from TUE --backup MON --verify\n"
        "\n" QBK_EXIT_CODES_HELP);
    if (!g_option_context_parse(ctx, &argc, &argv, &error)) {
        cmd_error("%s (see --help)", error->message);
        return QBK_EXIT_USAGE;
    }
    if (opt_version) {
        printf("qbk-restore %s\n", QBK_VERSION);
        return QBK_EXIT_OK;
    }
    cmd_make_absolute(&opt_repo);
    if (argc != 1 || !opt_repo) {
        cmd_error("give --repo DIR (see --help)");
        return QBK_EXIT_USAGE;
    }
    if (opt_list) {
        return list_backups();
    }
    if (opt_into || opt_from || opt_verify) {
        return restore_into();
    }
    if (!opt_disk || !opt_output) {
        cmd_error("give --disk DISK and --output FILE (see --help)");
        return QBK_EXIT_USAGE;
    }
    if (!opt_format) {
        opt_format = g_strdup("raw");
    }
    if (g_strcmp0(opt_format, "raw") != 0 &&
        g_strcmp0(opt_format, "qcow2") != 0) {
        cmd_error("--format must be raw or qcow2");
        return QBK_EXIT_USAGE;
    }
    entry = backup_restore(opt_repo, opt_backup ? opt_backup : "latest",
                           opt_disk, opt_output, opt_format, &error);
    if (!entry) {
        cmd_error("%s", error->message);
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
