/*
 * qbk-verify: re-read backups from a repository, following each chain, and
 * check them against the checksums recorded when they were taken. Needs
 * no VM.
 */
#include <stdio.h>

#include "backup.h"
#include "cmd-common.h"

static char *opt_repo;
static char **opt_disks;
static char *opt_backup;
static gboolean opt_json;
static gboolean opt_quiet;

static GOptionEntry entries[] = {
    { "repo", 'r', 0, G_OPTION_ARG_FILENAME, &opt_repo, "backup repository",
      "DIR" },
    { "disk", 'd', 0, G_OPTION_ARG_STRING_ARRAY, &opt_disks,
      "only this disk (repeat); default: every disk of each backup", "DISK" },
    { "backup", 'b', 0, G_OPTION_ARG_STRING, &opt_backup,
      "only this backup (or 'latest'); default: every complete backup", "ID" },
    { "json", 'j', 0, G_OPTION_ARG_NONE, &opt_json,
      "print {results: [...], failed: N} as one JSON object", NULL },
    { "quiet", 0, 0, G_OPTION_ARG_NONE, &opt_quiet, "print only failures",
      NULL },
    { NULL },
};

/* Verify DISK of backup ID; prints a line, adds a result to RESULTS.
 * Returns 0 if good, else the exit code it deserves. */
static int verify_one(Repo *repo, const char *id, const char *disk,
                      json_object *results)
{
    g_autoptr(GError) error = NULL;
    json_object *r = backup_verify(repo, id, disk, &error);

    if (!r) {
        r = json_object_new_object();
        qmp_json_set_string(r, "backup", id);
        qmp_json_set_string(r, "disk", disk);
        qmp_json_set_bool(r, "ok", 0);
        qmp_json_set_string(r, "error", error->message);
        json_object_array_add(results, r);
        if (!opt_json) {
            printf("%s  %-10s FAILED: %s\n", id, disk, error->message);
        }
        return cmd_backup_exit_code(error);
    }
    qmp_json_set_bool(r, "ok", 1);
    if (!opt_json && !opt_quiet) {
        g_autofree char *read =
            cmd_format_bytes(qmp_json_uint(r, "bytes_read"));

        printf("%s  %-10s ok  %s  (%zu link%s, %s read in %.2f s)\n", id, disk,
               qmp_json_string(r, "checksum"),
               qmp_json_length(qmp_json_array(r, "chain")),
               qmp_json_length(qmp_json_array(r, "chain")) == 1 ? "" : "s",
               read,
               json_object_get_double(json_object_object_get(r, "seconds")));
    }
    json_object_array_add(results, r);
    return QBK_EXIT_OK;
}

static const CmdSpec spec = {
    .name = "qbk-verify",
    .parameters = "- check backups against their checksums",
    .summary =
        "Re-reads each backup's disks through their qcow2 chains (no VM\n"
        "needed) and compares them with the XXH3-128 block checksums recorded\n"
        "at backup time. Each link is checked first: its image is there,\n"
        "whole, and its backing file is the parent the manifest names. A\n"
        "mismatch names the first block that differs; a manifest that cannot\n"
        "be trusted is named too. Exit status 1 if anything failed.",
    .description = "Examples:\n"
                   "  qbk-verify --repo /backups/vm1\n"
                   "  qbk-verify --repo /backups/vm1 --backup latest \\\n"
                   "      --disk disk0 --json\n",
    .entries = entries,
    .common = CMD_OPT_KEY,
};

/* The backups to verify: --backup, or all; those whose manifests do not
 * validate go to SKIPPED (as messages). NULL on failure (reported). */
static GPtrArray *backups_to_verify(Repo *repo, GPtrArray *skipped, int *rc)
{
    g_autoptr(GError) error = NULL;
    GPtrArray *backups;
    Manifest *m;

    if (!opt_backup) {
        backups = repo_list(repo, false, skipped, &error);
        if (!backups) {
            cmd_error("%s", error->message);
            *rc = QBK_EXIT_FAILURE;
        }
        return backups;
    }
    m = repo_load(repo, opt_backup, &error);
    if (!m) {
        cmd_error("%s", error->message);
        *rc = cmd_backup_exit_code(error);
        return NULL;
    }
    backups = g_ptr_array_new_with_free_func((GDestroyNotify)manifest_unref);
    g_ptr_array_add(backups, m);
    return backups;
}

/* A manifest that does not validate is a failure of verify. */
static void add_skipped(GPtrArray *skipped, json_object *results)
{
    for (guint i = 0; i < skipped->len; i++) {
        json_object *r = json_object_new_object();

        qmp_json_set_bool(r, "ok", 0);
        qmp_json_set_string(r, "error", skipped->pdata[i]);
        json_object_array_add(results, r);
        if (!opt_json) {
            printf("FAILED: %s\n", (char *)skipped->pdata[i]);
        }
    }
}

int main(int argc, char **argv)
{
    g_autoptr(GError) error = NULL;
    g_autoptr(GPtrArray) backups = NULL;
    g_autoptr(GPtrArray) skipped = g_ptr_array_new_with_free_func(g_free);
    g_autoptr(Repo) repo = NULL;
    json_object *results, *extra;
    int failed, rc = cmd_parse(&spec, &argc, &argv);

    if (rc >= 0) {
        return rc;
    }
    if (argc != 1 || !opt_repo) {
        return cmd_usage("give --repo DIR and no other argument");
    }
    for (guint i = 0; opt_disks && opt_disks[i]; i++) {
        if (!repo_check_name("disk", opt_disks[i], &error)) {
            return cmd_usage("%s", error->message);
        }
    }
    repo = repo_open(opt_repo, 0, &error);
    if (!repo || !cmd_repo_key(repo, false, &error)) {
        cmd_error("%s", error->message);
        return cmd_backup_exit_code(error);
    }
    backups = backups_to_verify(repo, skipped, &rc);
    if (!backups) {
        return rc;
    }
    if (backups->len == 0 && skipped->len == 0) {
        cmd_error("no complete backup in '%s'", repo_root(repo));
        return QBK_EXIT_USAGE;
    }
    results = json_object_new_array();
    add_skipped(skipped, results);
    failed = skipped->len;
    rc = failed ? QBK_EXIT_FAILURE : QBK_EXIT_OK;
    for (guint i = 0; i < backups->len; i++) {
        Manifest *m = backups->pdata[i];

        for (guint d = 0; d < m->disks->len; d++) {
            const char *disk = ((ManifestDisk *)m->disks->pdata[d])->disk;
            int r;

            if (opt_disks &&
                !g_strv_contains((const char *const *)opt_disks, disk)) {
                continue;
            }
            r = verify_one(repo, m->id, disk, results);
            failed += r != QBK_EXIT_OK;
            rc = rc == QBK_EXIT_OK ? r : rc;
        }
    }
    extra = json_object_new_object();
    qmp_json_set_int(extra, "failed", failed);
    return cmd_finish_results(results, extra, opt_json,
                              "no backup has the disk(s) asked for", rc);
}
