/*
 * qbk-restore: rebuild a disk as it was at any backup of a repository into
 * a sparse raw or qcow2 file, and check it against the backup's checksum.
 */
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
    { NULL },
};

static Repo *repo;

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
        "      --into vm1-disk0.qcow2 --from TUE --backup MON --verify\n",
    .entries = entries,
    .common = CMD_OPT_KEY,
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
    if (argc != 1 || !opt_repo) {
        return cmd_usage("give --repo DIR");
    }
    if (!check_names(&error)) {
        return cmd_usage("%s", error->message);
    }
    if (!opt_list && !opt_into && !opt_from && !opt_verify &&
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
