/*
 * qbk-merge: consolidate backup chains without touching the VM: N adjacent
 * increments into one, or a synthetic full at any backup.
 */
#include <stdio.h>
#include <unistd.h>

#include "backup.h"
#include "cmd-common.h"

static char *opt_repo;
static char **opt_disks;
static char *opt_from;
static char *opt_to;
static char *opt_full_at;
static char *opt_format;
/* G_MININT: not given */
static gint opt_daily = G_MININT, opt_weekly = G_MININT, opt_monthly = G_MININT;
static gboolean opt_dry_run;
static gboolean opt_json;

static GOptionEntry entries[] = {
    { "repo", 'r', 0, G_OPTION_ARG_FILENAME, &opt_repo, "backup repository",
      "DIR" },
    { "disk", 'd', 0, G_OPTION_ARG_STRING_ARRAY, &opt_disks,
      "only this disk (repeat); default: every disk of the backup", "DISK" },
    { "from", 0, 0, G_OPTION_ARG_STRING, &opt_from,
      "oldest backup of the range to merge (with --to)", "ID" },
    { "to", 0, 0, G_OPTION_ARG_STRING, &opt_to,
      "newest backup of the range: it keeps its point in time and now "
      "stands on FROM's parent; the backups from FROM to TO's parent lose "
      "the disk",
      "ID" },
    { "full-at", 0, 0, G_OPTION_ARG_STRING, &opt_full_at,
      "make backup ID a full backup (synthetic: nothing read from the VM); "
      "older backups stay",
      "ID" },
    { "keep-daily", 0, 0, G_OPTION_ARG_INT, &opt_daily,
      "retention: keep the newest backup of each of the last N days", "N" },
    { "keep-weekly", 0, 0, G_OPTION_ARG_INT, &opt_weekly,
      "... of each of the last N ISO weeks", "N" },
    { "keep-monthly", 0, 0, G_OPTION_ARG_INT, &opt_monthly,
      "... of each of the last N months (the newest backup is always kept; "
      "the others are merged into the kept backups above them)",
      "N" },
    { "dry-run", 'n', 0, G_OPTION_ARG_NONE, &opt_dry_run,
      "retention: print the plan, change nothing", NULL },
    { "format", 'f', 0, G_OPTION_ARG_STRING, &opt_format,
      "of a synthetic full: qcow2 (default) or raw", "FORMAT" },
    { "json", 'j', 0, G_OPTION_ARG_NONE, &opt_json,
      "print {results: [...]} as one JSON object", NULL },
    { NULL },
};

static void print_ids(const char *title, json_object *list)
{
    printf("%s (%zu):\n", title, qmp_json_length(list));
    for (size_t i = 0; i < qmp_json_length(list); i++) {
        json_object *o = qmp_json_index(list, i);
        json_object *why = qmp_json_array(o, "why");

        printf("  %s  %s", qmp_json_string(o, "id"),
               qmp_json_string(o, "created"));
        for (size_t k = 0; why && k < qmp_json_length(why); k++) {
            printf("%s%s", k ? ", " : "  ",
                   json_object_get_string(qmp_json_index(why, k)));
        }
        printf("\n");
    }
}

static int apply_retention(Repo *repo)
{
    g_autoptr(GError) error = NULL;
    BackupRetention policy = {
        .daily = MAX(opt_daily, 0),
        .weekly = MAX(opt_weekly, 0),
        .monthly = MAX(opt_monthly, 0),
    };
    json_object *plan = backup_retention(repo, &policy, opt_dry_run, &error);
    json_object *merges;

    if (!plan) {
        cmd_error("%s", error->message);
        return cmd_backup_exit_code(error);
    }
    if (opt_json) {
        cmd_print_json(plan);
        return QBK_EXIT_OK;
    }
    print_ids("keep", qmp_json_array(plan, "keep"));
    print_ids(opt_dry_run ? "would remove" : "removed",
              qmp_json_array(plan, "remove"));
    merges = qmp_json_array(plan, "merges");
    for (size_t i = 0; i < qmp_json_length(merges); i++) {
        json_object *a = qmp_json_index(merges, i);

        printf("%s disk %s: %s..%s into %s\n",
               opt_dry_run ? "would merge" : "merged",
               qmp_json_string(a, "disk"), qmp_json_string(a, "merge"),
               qmp_json_string(a, "into"), qmp_json_string(a, "into"));
    }
    json_object_put(plan);
    return QBK_EXIT_OK;
}

/* Bounds and names, checked before the repository is touched. */
static bool check_options(GError **error)
{
    const char *ids[] = { opt_from, opt_to, opt_full_at };
    const gint keep[] = { opt_daily, opt_weekly, opt_monthly };
    const char *keep_names[] = { "--keep-daily", "--keep-weekly",
                                 "--keep-monthly" };

    for (guint i = 0; i < G_N_ELEMENTS(ids); i++) {
        if (ids[i] && g_strcmp0(ids[i], "latest") != 0 &&
            !repo_check_name("backup", ids[i], error)) {
            return false;
        }
    }
    for (guint i = 0; opt_disks && opt_disks[i]; i++) {
        if (!repo_check_name("disk", opt_disks[i], error)) {
            return false;
        }
    }
    for (guint i = 0; i < G_N_ELEMENTS(keep); i++) {
        if (keep[i] != G_MININT &&
            !cmd_check_range(keep_names[i], keep[i], 0, 100000, error)) {
            return false;
        }
    }
    return true;
}

static void print_merged(const char *disk, const char *id, json_object *r)
{
    g_autofree char *copied = cmd_format_bytes(qmp_json_uint(r, "bytes_read"));
    const char *parent = qmp_json_string(r, "parent");

    cmd_info("disk '%s' of '%s' now stands on %s%s%s (%s read, "
             "%zu backup(s) dropped the disk, %.2f s)",
             disk, id, parent ? "'" : "",
             parent ? parent : "nothing: a synthetic full", parent ? "'" : "",
             copied, qmp_json_length(qmp_json_array(r, "dropped")),
             json_object_get_double(json_object_object_get(r, "seconds")));
}

/* --from/--to or --full-at, on each disk of the backup (or the --disk
 * ones); the exit status. */
static int merge_disks(Repo *repo)
{
    g_autoptr(GError) error = NULL;
    g_autoptr(Manifest) m =
        repo_load(repo, opt_to ? opt_to : opt_full_at, &error);
    g_autofree char *none = NULL;
    json_object *results;

    if (!m) {
        cmd_error("%s", error->message);
        return cmd_backup_exit_code(error);
    }
    results = json_object_new_array();
    for (guint i = 0; i < m->disks->len; i++) {
        const char *disk = ((ManifestDisk *)m->disks->pdata[i])->disk;
        json_object *r;

        if (opt_disks &&
            !g_strv_contains((const char *const *)opt_disks, disk)) {
            continue;
        }
        r = backup_merge(repo, disk, opt_from, m->id, opt_format, &error);
        if (!r && !opt_disks &&
            g_error_matches(error, BACKUP_ERROR, BACKUP_ERROR_NOT_IN_CHAIN)) {
            cmd_info("disk '%s': nothing to merge (%s)", disk, error->message);
            g_clear_error(&error);
            continue;
        }
        if (!r) {
            cmd_error("%s%s", error->message, cmd_hint(error));
            json_object_put(results);
            return cmd_backup_exit_code(error);
        }
        if (!opt_json) {
            print_merged(disk, m->id, r);
        }
        json_object_array_add(results, r);
    }
    none = g_strdup_printf("nothing merged in backup '%s'", m->id);
    return cmd_finish_results(results, NULL, opt_json, none, QBK_EXIT_OK);
}

static const CmdSpec spec = {
    .name = "qbk-merge",
    .parameters = "- merge backups of a repository",
    .summary =
        "Merges backups inside a repository; the VM and its checkpoints are\n"
        "not touched (merging backups is independent of the bitmaps on the\n"
        "VM). Only the data the merged links hold is copied (qemu-nbd serves\n"
        "the chain with its allocation depth; the copier copies the newest\n"
        "layers), and the result must hash to the backup's recorded checksum\n"
        "before anything changes. A journal (REPO/merge-journal.json) makes\n"
        "the swap crash-safe: the next qbk-merge finishes an interrupted one,\n"
        "and every kept backup restores at every step.",
    .description =
        "Examples:\n"
        "  qbk-merge --repo /backups/vm1 --from MON --to SUN  # 7 -> 1\n"
        "  qbk-merge --repo /backups/vm1 --full-at SUN --disk disk0\n"
        "  qbk-merge --repo /backups/vm1 --keep-daily 7 --keep-weekly 4 \\\n"
        "      --keep-monthly 12 --dry-run\n"
        "  qbk-merge --repo /backups/vm1  # only finish an interrupted merge\n",
    .entries = entries,
    .common = CMD_OPT_QUIET | CMD_OPT_KEY,
};

int main(int argc, char **argv)
{
    g_autoptr(GError) error = NULL;
    g_autoptr(Repo) repo = NULL;
    bool retention;

    int rc = cmd_parse(&spec, &argc, &argv);

    if (rc >= 0) {
        return rc;
    }
    retention = opt_daily != G_MININT || opt_weekly != G_MININT ||
                opt_monthly != G_MININT;
    if (argc != 1 || !opt_repo || (!opt_from != !opt_to) ||
        (opt_to && opt_full_at) || (retention && (opt_to || opt_full_at)) ||
        (opt_dry_run && !retention)) {
        return cmd_usage("give --repo DIR and one of: --from ID --to ID, "
                         "--full-at ID, --keep-* [--dry-run]");
    }
    if (opt_format && (!opt_full_at || (g_strcmp0(opt_format, "raw") != 0 &&
                                        g_strcmp0(opt_format, "qcow2") != 0))) {
        return cmd_usage("--format (raw or qcow2) goes with --full-at");
    }
    if (!check_options(&error)) {
        return cmd_usage("%s", error->message);
    }
    repo = repo_open(opt_repo, REPO_OPEN_LOCK, &error);
    if (!repo || !cmd_repo_key(repo, false, &error)) {
        cmd_error("%s%s", error->message, cmd_hint(error));
        return cmd_backup_exit_code(error);
    }
    if (!backup_merge_recover(repo, &error)) {
        cmd_error("finishing an interrupted merge: %s%s", error->message,
                  cmd_hint(error));
        return QBK_EXIT_FAILURE;
    }
    if (retention) {
        return apply_retention(repo);
    }
    if (!opt_to && !opt_full_at) {
        cmd_info("nothing to merge; the repository is consistent");
        return QBK_EXIT_OK;
    }
    return merge_disks(repo);
}
