/*
 * qbk-checkpoint: manage a VM's checkpoints (persistent dirty bitmaps on
 * every disk) over QMP, or on the images of a stopped VM.
 *
 * Every subcommand builds one JSON object; --json prints it, otherwise it
 * is rendered as text. Nothing goes to stdout before the work succeeded.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "backup.h"
#include "bitmap.h"
#include "cmd-common.h"
#include "util.h"

/* Options; one table for all subcommands, checked per subcommand below. */
static char **opt_images;
static char **opt_disks;
static gboolean opt_json;
static gboolean opt_repair;
static gboolean opt_drop;
static char *opt_into;
static gint64 opt_granularity;
static char *opt_to;
static char *opt_uri;
static char **opt_maps;
static int opt_migrate_timeout = 600;

static GOptionEntry entries[] = {
    { "image", 'i', 0, G_OPTION_ARG_FILENAME_ARRAY, &opt_images,
      "work offline on this qcow2 image of a stopped VM (repeat for every "
      "disk)",
      "FILE" },
    { "disk", 'd', 0, G_OPTION_ARG_STRING_ARRAY, &opt_disks,
      "only this disk: qdev id, drive name, node name or image (repeat)",
      "DISK" },
    { "json", 'j', 0, G_OPTION_ARG_NONE, &opt_json,
      "print one JSON object on stdout", NULL },
    { "granularity", 'g', 0, G_OPTION_ARG_INT64, &opt_granularity,
      "create: bytes per bitmap bit, a power of two from 512 (default: the "
      "qcow2 cluster size)",
      "BYTES" },
    { "repair", 'r', 0, G_OPTION_ARG_NONE, &opt_repair,
      "check: remove the checkpoints that cannot be trusted, undo what a "
      "killed backup left",
      NULL },
    { "into", 0, 0, G_OPTION_ARG_STRING, &opt_into,
      "since: name of the temporary bitmap (default: qbk-since-NAME)",
      "BITMAP" },
    { "drop", 0, 0, G_OPTION_ARG_NONE, &opt_drop,
      "since: remove the temporary bitmap instead of making it", NULL },
    { "to", 0, 0, G_OPTION_ARG_FILENAME, &opt_to,
      "migrate: QMP socket of the destination QEMU, started with "
      "-incoming defer",
      "SOCKET" },
    { "uri", 0, 0, G_OPTION_ARG_STRING, &opt_uri,
      "migrate: migration URI, unix:PATH or tcp:HOST:PORT", "URI" },
    { "map", 0, 0, G_OPTION_ARG_STRING_ARRAY, &opt_maps,
      "migrate: the source node SRC is DST on the destination (repeat; "
      "default: disks pair by id)",
      "SRC=DST" },
    { "migrate-timeout", 0, 0, G_OPTION_ARG_INT, &opt_migrate_timeout,
      "migrate: cancel after this many seconds (default 600)", "SECONDS" },
    { NULL },
};

static const char summary[] =
    "Commands:\n"
    "  list            checkpoints, per disk: dirty bytes, granularity, state\n"
    "  create [NAME]   new checkpoint on every disk (or the --disk ones), at\n"
    "                  one instant; NAME defaults to the UTC time\n"
    "  delete NAME     delete a checkpoint, merging its changes into the\n"
    "                  previous one so that older checkpoints stay complete\n"
    "  since NAME      make a temporary bitmap holding everything written\n"
    "                  since NAME on each disk (for incremental backups)\n"
    "  check           find checkpoints that cannot be trusted (QEMU killed,\n"
    "                  bitmaps missing or not recording), and what a killed\n"
    "                  qbk-pull left in the VM (filters, exports, a pause);\n"
    "                  --repair removes the first and undoes the second as\n"
    "                  the next qbk-pull would (nothing lost)\n"
    "  disks           the VM's disks and whether they can hold checkpoints\n"
    "  migrate         live-migrate the VM to --to (started with -incoming\n"
    "                  defer) over --uri, with every checkpoint; then check\n"
    "                  each one arrived intact (count, state, content) and\n"
    "                  make persistent any that arrived otherwise\n"
    "\n"
    "A checkpoint is a persistent dirty bitmap named qbk-<seq>-<NAME> on each\n"
    "disk: it records what the guest writes from its creation until the next\n"
    "checkpoint. Bitmaps qbk did not make are never touched.";

static const char description[] =
    "Examples:\n"
    "  qbk-checkpoint --qmp /run/vm1/qmp.sock create monday\n"
    "  qbk-checkpoint --qmp /run/vm1/qmp.sock list --json\n"
    "  qbk-checkpoint --qmp /run/vm1/qmp.sock since monday --disk disk0\n"
    "  qbk-checkpoint --qmp /run/vm1/qmp.sock delete monday\n"
    "  qbk-checkpoint --qmp /run/vm1/qmp.sock check --repair\n"
    "  qbk-checkpoint --image vm1-a.qcow2 --image vm1-b.qcow2 list\n"
    "  qbk-checkpoint --qmp src.sock migrate --to dst.sock --uri "
    "unix:/run/vm1/mig.sock\n";

/* ---- JSON builders ---- */

static json_object *bitmap_json(const QmpDisk *disk, const QmpBitmap *b)
{
    json_object *o = json_object_new_object();

    qmp_json_set_string(o, "disk", disk->id);
    qmp_json_set_string(o, "node", disk->node);
    qmp_json_set_uint(o, "dirty_bytes", b->count);
    qmp_json_set_int(o, "granularity", b->granularity);
    qmp_json_set_bool(o, "recording", b->recording);
    qmp_json_set_bool(o, "busy", b->busy);
    qmp_json_set_bool(o, "persistent", b->persistent);
    qmp_json_set_bool(o, "inconsistent", b->inconsistent);
    return o;
}

static json_object *checkpoints_json(GPtrArray *disks)
{
    g_autoptr(GPtrArray) cps = bitmap_list_checkpoints(disks);
    json_object *arr = json_object_new_array();

    for (guint i = 0; i < cps->len; i++) {
        BitmapCheckpoint *cp = cps->pdata[i];
        json_object *o = json_object_new_object();
        json_object *per_disk = json_object_new_array();

        qmp_json_set_string(o, "name", cp->name);
        qmp_json_set_int(o, "seq", cp->seq);
        qmp_json_set_string(o, "bitmap", cp->bitmap);
        qmp_json_set_bool(o, "partial", cp->partial);
        for (guint d = 0; d < cp->disks->len; d++) {
            json_object_array_add(per_disk, bitmap_json(cp->disks->pdata[d],
                                                        cp->bitmaps->pdata[d]));
        }
        json_object_object_add(o, "disks", per_disk);
        json_object_array_add(arr, o);
    }
    return arr;
}

static json_object *disk_ids_json(GPtrArray *disks)
{
    json_object *arr = json_object_new_array();

    for (guint i = 0; i < disks->len; i++) {
        const QmpDisk *disk = disks->pdata[i];

        json_object_array_add(arr, json_object_new_string(disk->id));
    }
    return arr;
}

/* ---- subcommands: each returns its result, or NULL with ERROR set ---- */

static json_object *do_list(CmdVm *vm, GPtrArray *targets, const char *name,
                            GError **error)
{
    json_object *res = json_object_new_object();

    json_object_object_add(res, "checkpoints", checkpoints_json(vm->disks));
    return res;
}

static json_object *do_disks(CmdVm *vm, GPtrArray *targets, const char *name,
                             GError **error)
{
    json_object *res = json_object_new_object();
    json_object *arr = json_object_new_array();

    for (guint i = 0; i < vm->disks->len; i++) {
        const QmpDisk *disk = vm->disks->pdata[i];
        g_autoptr(GPtrArray) chain = bitmap_disk_chain(disk);
        json_object *o = json_object_new_object();

        qmp_json_set_string(o, "disk", disk->id);
        qmp_json_set_string(o, "role", qmp_disk_role(disk));
        qmp_json_set_string(o, "qdev", disk->qdev);
        qmp_json_set_string(o, "device", disk->device);
        qmp_json_set_string(o, "node", disk->node);
        qmp_json_set_string(o, "driver", disk->driver);
        qmp_json_set_string(o, "file", disk->filename);
        qmp_json_set_uint(o, "size", disk->size);
        qmp_json_set_bool(o, "read_only", disk->read_only);
        qmp_json_set_bool(o, "checkpoints_supported", !disk->no_bitmaps);
        qmp_json_set_string(o, "reason", disk->no_bitmaps);
        qmp_json_set_int(o, "checkpoints", chain->len);
        json_object_array_add(arr, o);
    }
    json_object_object_add(res, "disks", arr);
    return res;
}

static json_object *do_create(CmdVm *vm, GPtrArray *targets, const char *name,
                              GError **error)
{
    g_autofree char *bitmap = NULL;
    g_autofree char *short_name = NULL;
    json_object *res;
    guint seq;

    bitmap = bitmap_create_checkpoint(vm->qmp, vm->disks, targets, name,
                                      (uint32_t)opt_granularity, error);
    if (!bitmap) {
        return NULL;
    }
    bitmap_parse_name(bitmap, &seq, &short_name, NULL);
    res = json_object_new_object();
    qmp_json_set_string(res, "checkpoint", short_name);
    qmp_json_set_int(res, "seq", seq);
    qmp_json_set_string(res, "bitmap", bitmap);
    json_object_object_add(res, "disks", disk_ids_json(targets));
    return res;
}

static json_object *do_delete(CmdVm *vm, GPtrArray *targets, const char *name,
                              GError **error)
{
    g_autoptr(GPtrArray) cps = bitmap_list_checkpoints(vm->disks);
    BitmapCheckpoint *cp = bitmap_find_checkpoint(cps, name);
    json_object *res;

    if (!cp) {
        g_set_error(error, BITMAP_ERROR, BITMAP_ERROR_NOT_FOUND,
                    "no checkpoint '%s' (see 'qbk-checkpoint list')", name);
        return NULL;
    }
    res = json_object_new_object();
    qmp_json_set_string(res, "deleted", cp->name);
    qmp_json_set_string(res, "bitmap", cp->bitmap);
    json_object_object_add(res, "disks", disk_ids_json(cp->disks));
    if (!bitmap_delete_checkpoint(vm->qmp, vm->disks, name, error)) {
        json_object_put(res);
        return NULL;
    }
    return res;
}

static json_object *do_since(CmdVm *vm, GPtrArray *targets, const char *name,
                             GError **error)
{
    g_autofree char *into = opt_into
                                ? g_strdup(opt_into)
                                : g_strconcat(BITMAP_SINCE_PREFIX, name, NULL);
    g_autoptr(GPtrArray) nodes = g_ptr_array_new_with_free_func(g_free);
    json_object *res, *arr;
    int removed;

    if (opt_drop) {
        g_autoptr(GPtrArray) names = g_ptr_array_new();

        g_ptr_array_add(names, into);
        removed = bitmap_drop_since(vm->qmp, targets, names, error);
        if (removed < 0) {
            return NULL;
        }
        res = json_object_new_object();
        qmp_json_set_string(res, "dropped", into);
        qmp_json_set_int(res, "count", removed);
        return res;
    }
    /* The refresh below frees TARGETS' disks: remember their nodes. */
    for (guint i = 0; i < targets->len; i++) {
        g_ptr_array_add(nodes, g_strdup(((QmpDisk *)targets->pdata[i])->node));
    }
    if (!bitmap_since(vm->qmp, vm->disks, targets, name, into, error) ||
        !cmd_vm_refresh(vm, error)) {
        return NULL;
    }
    res = json_object_new_object();
    qmp_json_set_string(res, "since", name);
    qmp_json_set_string(res, "bitmap", into);
    arr = json_object_new_array();
    for (guint i = 0; i < nodes->len; i++) {
        const QmpDisk *disk = qmp_disk_find(vm->disks, nodes->pdata[i]);
        const QmpBitmap *b = disk ? qmp_disk_bitmap(disk, into) : NULL;

        if (b) {
            json_object_array_add(arr, bitmap_json(disk, b));
        }
    }
    json_object_object_add(res, "disks", arr);
    return res;
}

static json_object *verdicts_json(const BitmapCheck *check)
{
    json_object *arr = json_object_new_array();

    for (guint i = 0; i < check->verdicts->len; i++) {
        const BitmapDiskVerdict *v = check->verdicts->pdata[i];
        json_object *o = json_object_new_object();
        json_object *trusted = json_object_new_array();
        json_object *untrusted = json_object_new_array();

        for (guint j = 0; j < v->chain->len; j++) {
            const QmpBitmap *b = v->chain->pdata[j];
            g_autofree char *name = NULL;

            bitmap_parse_name(b->name, NULL, &name, NULL);
            json_object_array_add(j < v->untrusted ? untrusted : trusted,
                                  json_object_new_string(name));
        }
        qmp_json_set_string(o, "disk", v->disk->id);
        json_object_object_add(o, "trusted", trusted);
        json_object_object_add(o, "untrusted", untrusted);
        qmp_json_set_bool(o, "full_backup_required",
                          v->untrusted == v->chain->len);
        json_object_array_add(arr, o);
    }
    return arr;
}

static json_object *issues_json(const BitmapCheck *check)
{
    json_object *arr = json_object_new_array();

    for (guint i = 0; i < check->issues->len; i++) {
        const BitmapIssue *issue = check->issues->pdata[i];
        json_object *o = json_object_new_object();
        static const char *const severities[] = { "note", "warning", "error" };

        qmp_json_set_string(o, "disk", issue->disk->id);
        qmp_json_set_string(o, "kind", bitmap_issue_kind_name(issue->kind));
        qmp_json_set_string(o, "severity",
                            severities[bitmap_issue_severity(issue->kind)]);
        qmp_json_set_string(o, "bitmap", issue->bitmap);
        qmp_json_set_string(o, "message", issue->message);
        json_object_array_add(arr, o);
    }
    return arr;
}

static json_object *strings_json(GPtrArray *strings)
{
    json_object *arr = json_object_new_array();

    for (guint i = 0; i < strings->len; i++) {
        json_object_array_add(arr, json_object_new_string(strings->pdata[i]));
    }
    return arr;
}

/* What backups have in the VM: at work, or left by a killed qbk-pull. */
static json_object *leftovers_json(GPtrArray *leftovers)
{
    json_object *arr = json_object_new_array();

    for (guint i = 0; i < leftovers->len; i++) {
        const BackupLeftover *l = leftovers->pdata[i];
        json_object *o = json_object_new_object();

        qmp_json_set_string(o, "backup", l->tag);
        qmp_json_set_int(o, "pid", l->pid);
        qmp_json_set_bool(o, "at_work", l->alive);
        qmp_json_set_bool(o, "committed", !l->at_work);
        qmp_json_set_bool(o, "paused_vm", l->paused);
        qmp_json_set_bool(o, "started_nbd_server", l->server);
        qmp_json_set_string(o, "froze_guest_via", l->agent);
        qmp_json_set_string(o, "shutdown_action_to_restore",
                            l->shutdown_action);
        json_object_object_add(o, "objects", strings_json(l->objects));
        json_object_object_add(o, "marks", strings_json(l->marks));
        json_object_object_add(o, "bitmaps", strings_json(l->bitmaps));
        json_object_array_add(arr, o);
    }
    return arr;
}

/* Backups a killed qbk-pull left in the VM (not those at work). */
static guint count_left(GPtrArray *leftovers)
{
    guint n = 0;

    for (guint i = 0; i < leftovers->len; i++) {
        n += !((BackupLeftover *)leftovers->pdata[i])->alive;
    }
    return n;
}

/* Undo every leftover as the next qbk-pull would (their private
 * directories too); how many. *HELD_POWEROFF: one held the guest's
 * poweroff, which its undo may have carried out (QEMU exits). */
static int repair_leftovers(CmdVm *vm, GPtrArray *leftovers,
                            bool *held_poweroff, GError **error)
{
    int undone = 0;

    *held_poweroff = false;
    privdir_reap(NULL);
    for (guint i = 0; i < leftovers->len; i++) {
        const BackupLeftover *l = leftovers->pdata[i];

        if (l->alive) {
            continue;
        }
        /* no repository here: a backup is committed once its at-work mark
         * is gone (just after its manifest became durable) */
        if (!backup_undo_leftover(vm->qmp, NULL, l, !l->at_work, error)) {
            g_prefix_error(error, "undoing backup '%s': ", l->tag);
            return -1;
        }
        *held_poweroff |= l->shutdown_action != NULL;
        undone++;
    }
    return undone;
}

/* QEMU has exited (it closed the connection). */
static bool qemu_gone(CmdVm *vm)
{
    g_autoptr(GError) err = NULL;
    g_autofree char *st = qmp_query_status(vm->qmp, NULL, &err);

    return !st && g_error_matches(err, QMP_ERROR, QMP_ERROR_CLOSED);
}

static json_object *do_check(CmdVm *vm, GPtrArray *targets, const char *name,
                             GError **error)
{
    g_autoptr(BitmapCheck) before = NULL;
    g_autoptr(BitmapCheck) after = NULL;
    g_autoptr(GPtrArray) leftovers = NULL;
    json_object *res = json_object_new_object();
    int changed, undone = 0;
    bool held_poweroff;

    /* an image of a stopped VM holds no backup's state */
    leftovers = vm->offline ? g_ptr_array_new()
                            : backup_find_leftovers(vm->qmp, NULL, error);
    if (!leftovers) {
        json_object_put(res);
        return NULL;
    }
    if (opt_repair && count_left(leftovers)) {
        undone = repair_leftovers(vm, leftovers, &held_poweroff, error);
        if (undone >= 0 && held_poweroff && qemu_gone(vm)) {
            /* the guest powered off while a backup held it: done now */
            qmp_json_set_int(res, "undone", undone);
            qmp_json_set_bool(res, "qemu_exited", true);
            qmp_json_set_bool(res, "clean", true);
            qmp_json_set_bool(res, "healthy", true);
            return res;
        }
        if (undone < 0 || !cmd_vm_refresh(vm, error)) {
            json_object_put(res);
            return NULL;
        }
        g_ptr_array_unref(leftovers);
        leftovers = backup_find_leftovers(vm->qmp, NULL, error);
        if (!leftovers) {
            json_object_put(res);
            return NULL;
        }
        qmp_json_set_int(res, "undone", undone);
    }
    json_object_object_add(res, "leftovers", leftovers_json(leftovers));
    qmp_json_set_bool(res, "clean", !count_left(leftovers));
    before = bitmap_check(vm->disks);
    json_object_object_add(res, "issues", issues_json(before));
    if (!opt_repair) {
        qmp_json_set_bool(res, "healthy", !bitmap_check_has_errors(before));
        json_object_object_add(res, "disks", verdicts_json(before));
        return res;
    }
    changed = bitmap_repair(vm->qmp, before, error);
    if (changed < 0 || !cmd_vm_refresh(vm, error)) {
        json_object_put(res);
        return NULL;
    }
    after = bitmap_check(vm->disks);
    qmp_json_set_int(res, "repaired", changed);
    qmp_json_set_bool(res, "healthy", !bitmap_check_has_errors(after));
    json_object_object_add(res, "disks", verdicts_json(after));
    return res;
}

/* ---- text output, rendered from the JSON result ---- */

static char *state_flags(json_object *b)
{
    GString *s = g_string_new(NULL);

    if (qmp_json_bool(b, "inconsistent")) {
        g_string_append(s, "INCONSISTENT,");
    }
    g_string_append(s,
                    qmp_json_bool(b, "recording") ? "recording," : "disabled,");
    if (qmp_json_bool(b, "busy")) {
        g_string_append(s, "busy,");
    }
    g_string_append(s, qmp_json_bool(b, "persistent") ? "persistent"
                                                      : "TRANSIENT");
    return g_string_free(s, FALSE);
}

/* Width of the widest KEY of the objects in ARR (or of its elements'
 * SUB array), at least MIN. */
static int column_width(json_object *arr, const char *sub, const char *key,
                        int min)
{
    int w = min;

    for (size_t i = 0; i < qmp_json_length(arr); i++) {
        json_object *o = qmp_json_index(arr, i);

        if (sub) {
            w = MAX(w, column_width(qmp_json_array(o, sub), NULL, key, min));
        } else if (qmp_json_string(o, key)) {
            w = MAX(w, (int)strlen(qmp_json_string(o, key)));
        }
    }
    return w;
}

static void print_list(json_object *res)
{
    json_object *cps = qmp_json_array(res, "checkpoints");
    int nw, dw;

    if (qmp_json_length(cps) == 0) {
        printf("no checkpoints\n");
        return;
    }
    nw = column_width(cps, NULL, "name", 10);
    dw = column_width(cps, "disks", "disk", 4);
    printf("%-6s %-*s %-*s %12s %9s  %s\n", "SEQ", nw, "CHECKPOINT", dw, "DISK",
           "DIRTY", "GRAIN", "STATE");
    for (size_t i = 0; i < qmp_json_length(cps); i++) {
        json_object *cp = qmp_json_index(cps, i);
        json_object *disks = qmp_json_array(cp, "disks");

        for (size_t d = 0; d < qmp_json_length(disks); d++) {
            json_object *b = qmp_json_index(disks, d);
            g_autofree char *dirty =
                cmd_format_bytes(qmp_json_int(b, "dirty_bytes"));
            g_autofree char *grain =
                cmd_format_bytes(qmp_json_int(b, "granularity"));
            g_autofree char *flags = state_flags(b);
            g_autofree char *seq =
                g_strdup_printf("%" G_GINT64_FORMAT, qmp_json_int(cp, "seq"));

            printf("%-6s %-*s %-*s %12s %9s  %s\n", d ? "" : seq, nw,
                   d ? "" : qmp_json_string(cp, "name"), dw,
                   qmp_json_string(b, "disk"), dirty, grain, flags);
        }
    }
}

static void print_disks(json_object *res)
{
    json_object *disks = qmp_json_array(res, "disks");
    int dw = column_width(disks, NULL, "disk", 4);
    int nw = column_width(disks, NULL, "node", 4);

    printf("%-*s %-13s %-*s %-7s %10s  %-5s %s\n", dw, "DISK", "ROLE", nw,
           "NODE", "DRIVER", "SIZE", "CKPTS", "FILE");
    for (size_t i = 0; i < qmp_json_length(disks); i++) {
        json_object *d = qmp_json_index(disks, i);
        g_autofree char *size = cmd_format_bytes(qmp_json_int(d, "size"));
        g_autofree char *ckpts =
            qmp_json_bool(d, "checkpoints_supported")
                ? g_strdup_printf("%" G_GINT64_FORMAT,
                                  qmp_json_int(d, "checkpoints"))
                : g_strdup("no");

        printf("%-*s %-13s %-*s %-7s %10s  %-5s %s", dw,
               qmp_json_string(d, "disk"), qmp_json_string(d, "role"), nw,
               qmp_json_string(d, "node"), qmp_json_string(d, "driver"), size,
               ckpts,
               qmp_json_string(d, "file") ? qmp_json_string(d, "file") : "");
        if (qmp_json_string(d, "reason")) {
            printf("  (%s)", qmp_json_string(d, "reason"));
        }
        printf("\n");
    }
}

static char *join_names(json_object *arr)
{
    GString *s = g_string_new(NULL);

    for (size_t i = 0; i < qmp_json_length(arr); i++) {
        g_string_append_printf(s, "%s%s", i ? ", " : "",
                               json_object_get_string(qmp_json_index(arr, i)));
    }
    return g_string_free(s, FALSE);
}

static void print_leftovers(json_object *res)
{
    json_object *list = qmp_json_array(res, "leftovers");

    if (json_object_object_get_ex(res, "undone", NULL)) {
        printf("undone: %" G_GINT64_FORMAT
               " backup(s) that killed qbk-pulls left\n",
               qmp_json_int(res, "undone"));
    }
    for (size_t i = 0; i < qmp_json_length(list); i++) {
        json_object *l = qmp_json_index(list, i);
        size_t objects = qmp_json_length(qmp_json_array(l, "objects")) +
                         qmp_json_length(qmp_json_array(l, "marks"));
        size_t bitmaps = qmp_json_length(qmp_json_array(l, "bitmaps"));

        if (qmp_json_bool(l, "at_work")) {
            printf(
                "note: backup '%s' is at work (qbk-pull pid %" G_GINT64_FORMAT
                ")\n",
                qmp_json_string(l, "backup"), qmp_json_int(l, "pid"));
            continue;
        }
        printf("error: backup '%s' was left by a qbk-pull that is gone: "
               "%zu object(s) and %zu temporary bitmap(s) in the VM%s%s%s%s\n",
               qmp_json_string(l, "backup"), objects, bitmaps,
               qmp_json_string(l, "froze_guest_via")
                   ? ", the guest's file systems perhaps still frozen by it"
                   : "",
               qmp_json_bool(l, "paused_vm") ? ", the VM paused by it" : "",
               qmp_json_bool(l, "started_nbd_server") ? ", its NBD server" : "",
               qmp_json_bool(l, "committed")
                   ? ""
                   : "; its checkpoint is to be merged back");
    }
}

static void print_check(json_object *res)
{
    json_object *issues = qmp_json_array(res, "issues");
    json_object *disks = qmp_json_array(res, "disks");

    print_leftovers(res);
    if (qmp_json_bool(res, "qemu_exited")) {
        printf("the guest powered off while a killed backup held it: QEMU "
               "has now exited, as it would have then\n");
        return;
    }
    for (size_t i = 0; i < qmp_json_length(issues); i++) {
        json_object *issue = qmp_json_index(issues, i);

        printf("%s: %s: %s\n", qmp_json_string(issue, "disk"),
               qmp_json_string(issue, "severity"),
               qmp_json_string(issue, "message"));
    }
    if (json_object_object_get_ex(res, "repaired", NULL)) {
        printf("repaired: %" G_GINT64_FORMAT " bitmap(s) changed; now:\n",
               qmp_json_int(res, "repaired"));
    }
    for (size_t i = 0; i < qmp_json_length(disks); i++) {
        json_object *d = qmp_json_index(disks, i);
        g_autofree char *trusted = join_names(qmp_json_array(d, "trusted"));
        g_autofree char *untrusted = join_names(qmp_json_array(d, "untrusted"));

        printf("%s: ", qmp_json_string(d, "disk"));
        if (*untrusted) {
            printf("untrusted: %s; ", untrusted);
        }
        if (qmp_json_bool(d, "full_backup_required")) {
            printf("next backup must be full\n");
        } else {
            printf("incremental since: %s\n", trusted);
        }
    }
    printf("%s\n", qmp_json_bool(res, "healthy")
                       ? "checkpoints are healthy"
                       : "checkpoints need repair: run 'qbk-checkpoint check "
                         "--repair'");
    if (!qmp_json_bool(res, "clean")) {
        printf("a killed backup left state in the VM: run 'qbk-checkpoint "
               "check --repair' to undo it\n");
    }
}

static void print_create(json_object *res)
{
    printf("%s\n", qmp_json_string(res, "checkpoint"));
    cmd_info("created checkpoint '%s' (bitmap %s) on %zu disk(s)",
             qmp_json_string(res, "checkpoint"), qmp_json_string(res, "bitmap"),
             qmp_json_length(qmp_json_array(res, "disks")));
}

static void print_delete(json_object *res)
{
    cmd_info("deleted checkpoint '%s' from %zu disk(s)",
             qmp_json_string(res, "deleted"),
             qmp_json_length(qmp_json_array(res, "disks")));
}

static void print_since(json_object *res)
{
    json_object *disks = qmp_json_array(res, "disks");

    if (qmp_json_string(res, "dropped")) {
        cmd_info("removed '%s' from %" G_GINT64_FORMAT " disk(s)",
                 qmp_json_string(res, "dropped"), qmp_json_int(res, "count"));
        return;
    }
    for (size_t i = 0; i < qmp_json_length(disks); i++) {
        json_object *b = qmp_json_index(disks, i);

        printf("%s\t%s\t%s\t%" G_GINT64_FORMAT "\n", qmp_json_string(b, "disk"),
               qmp_json_string(b, "node"), qmp_json_string(res, "bitmap"),
               qmp_json_int(b, "dirty_bytes"));
    }
}

/* check's status: a broken chain is the more serious (the next backup is
 * full), then what a killed backup left. */
static int check_status(json_object *res)
{
    return !qmp_json_bool(res, "healthy") ? QBK_EXIT_FULL_NEEDED
           : !qmp_json_bool(res, "clean") ? QBK_EXIT_LEFTOVER
                                          : QBK_EXIT_OK;
}

/* ---- main ---- */

static int exit_code(const GError *error)
{
    if (error->domain == G_OPTION_ERROR) {
        return QBK_EXIT_USAGE;
    }
    if (error->domain == BITMAP_ERROR) {
        switch ((BitmapErrorCode)error->code) {
        case BITMAP_ERROR_INVALID_NAME:
        case BITMAP_ERROR_EXISTS:
        case BITMAP_ERROR_NOT_FOUND:
            return QBK_EXIT_USAGE;
        case BITMAP_ERROR_UNTRUSTED:
            return QBK_EXIT_FULL_NEEDED;
        case BITMAP_ERROR_UNSUPPORTED:
            return QBK_EXIT_FAILURE;
        }
    }
    return QBK_EXIT_FAILURE;
}

static void on_migrate_progress(json_object *q, void *opaque)
{
    json_object *ram = NULL;

    json_object_object_get_ex(q, "ram", &ram);
    cmd_info("migration %s: %" G_GUINT64_FORMAT " MiB sent, %" G_GUINT64_FORMAT
             " MiB left",
             qmp_json_string(q, "status"),
             (guint64)qmp_json_uint(ram, "transferred") >> 20,
             (guint64)qmp_json_uint(ram, "remaining") >> 20);
}

static json_object *do_migrate(CmdVm *vm, GPtrArray *targets, const char *name,
                               GError **error)
{
    g_autoptr(QmpClient) dst =
        cmd_qmp_connect(opt_to, cmd_common.timeout_s * 1000, error);
    BitmapMigrateOptions o = {
        .uri = opt_uri,
        .maps = opt_maps,
        .timeout_s = opt_migrate_timeout,
        .progress = on_migrate_progress,
    };
    json_object *res;

    if (!dst) {
        g_prefix_error(error, "destination: ");
        return NULL;
    }
    res = bitmap_migrate(vm->qmp, dst, &o, error);
    if (res && !opt_json) {
        json_object *cps = qmp_json_array(res, "checkpoints");

        for (size_t i = 0; i < qmp_json_length(cps); i++) {
            json_object *c = qmp_json_index(cps, i);

            printf("%-10s %-36s %12" G_GUINT64_FORMAT " bytes  %s\n",
                   qmp_json_string(c, "disk"), qmp_json_string(c, "bitmap"),
                   (guint64)qmp_json_uint(c, "count"),
                   qmp_json_bool(c, "ok") ? "arrived intact" : "PROBLEM");
        }
        cmd_info("migrated in %.1f s; %zu checkpoint(s) verified on the "
                 "destination, %d made persistent again",
                 json_object_get_double(json_object_object_get(res, "seconds")),
                 qmp_json_length(cps),
                 (int)qmp_json_int(res, "made_persistent"));
    }
    return res;
}

typedef struct {
    const char *name;
    int min_args, max_args; /* positional arguments after the command */
    json_object *(*run)(CmdVm *vm, GPtrArray *targets, const char *name,
                        GError **error);
    void (*print)(json_object *res); /* as text, without --json */
    int (*status)(json_object *res); /* its exit status; NULL: 0 */
} Command;

static const Command commands[] = {
    { "list", 0, 0, do_list, print_list, NULL },
    { "create", 0, 1, do_create, print_create, NULL },
    { "delete", 1, 1, do_delete, print_delete, NULL },
    { "since", 1, 1, do_since, print_since, NULL },
    { "check", 0, 0, do_check, print_check, check_status },
    { "disks", 0, 0, do_disks, print_disks, NULL },
    { "migrate", 0, 0, do_migrate, NULL, NULL },
};

static const CmdSpec spec = {
    .name = "qbk-checkpoint",
    .parameters = "COMMAND [NAME] - manage a VM's checkpoints",
    .summary = summary,
    .description = description,
    .entries = entries,
    .common = CMD_OPT_QMP | CMD_OPT_QUIET,
};

/* Options that go with one command only, and bounds: a usage error in
 * ERROR (G_OPTION_ERROR) before the VM is touched. */
static bool check_options(const Command *cmd, GError **error)
{
    const struct {
        bool given;
        const char *command, *what;
    } only[] = {
        { opt_repair, "check", "--repair goes with 'check'" },
        { opt_drop || opt_into, "since", "--into and --drop go with 'since'" },
        { opt_granularity, "create", "--granularity goes with 'create'" },
        { opt_to || opt_uri || opt_maps, "migrate",
          "--to, --uri and --map go with 'migrate'" },
    };
    bool migrate = strcmp(cmd->name, "migrate") == 0;

    for (size_t i = 0; i < G_N_ELEMENTS(only); i++) {
        if (only[i].given && strcmp(cmd->name, only[i].command) != 0) {
            g_set_error(error, G_OPTION_ERROR, G_OPTION_ERROR_FAILED, "%s",
                        only[i].what);
            return false;
        }
    }
    if (migrate && (!opt_to || !opt_uri)) {
        g_set_error(error, G_OPTION_ERROR, G_OPTION_ERROR_FAILED,
                    "'migrate' needs --to SOCKET and --uri URI");
        return false;
    }
    if (migrate && opt_images) {
        g_set_error(error, G_OPTION_ERROR, G_OPTION_ERROR_FAILED,
                    "'migrate' works on a running VM, not --image");
        return false;
    }
    if (!cmd_check_range("--migrate-timeout", opt_migrate_timeout, 1,
                         7 * CMD_MAX_TIMEOUT_S, error)) {
        return false;
    }
    if (opt_granularity &&
        (opt_granularity < 512 || opt_granularity > (1 << 30) ||
         (opt_granularity & (opt_granularity - 1)))) {
        g_set_error(error, G_OPTION_ERROR, G_OPTION_ERROR_BAD_VALUE,
                    "--granularity %" G_GINT64_FORMAT
                    " is not a power of two from 512 to 1 GiB",
                    opt_granularity);
        return false;
    }
    if (opt_images && cmd_common.qmp_env) {
        g_clear_pointer(&cmd_common.qmp, g_free); /* --image wins */
    }
    if (!!cmd_common.qmp == !!opt_images) {
        g_set_error(error, G_OPTION_ERROR, G_OPTION_ERROR_FAILED, "%s",
                    cmd_common.qmp ? "give --qmp or --image, not both"
                                   : "give --qmp SOCKET or --image FILE");
        return false;
    }
    return true;
}

/* Run CMD on the VM (or images) and print its result; the exit status. */
static int run(const Command *cmd, const char *name)
{
    g_autoptr(GError) error = NULL;
    g_autoptr(CmdVm) vm = NULL;
    g_autoptr(GPtrArray) targets = NULL;
    json_object *res;
    int rc;

    vm = cmd_vm_open(cmd_common.qmp, opt_images, cmd_common.timeout_s * 1000,
                     &error);
    targets = vm ? cmd_vm_select_disks(vm, opt_disks, &error) : NULL;
    if (!targets) {
        cmd_error("%s", error->message);
        return exit_code(error);
    }
    res = cmd->run(vm, targets, name, &error);
    if (!res) {
        cmd_error("%s: %s", cmd->name, error->message);
        return exit_code(error);
    }
    /* Offline, the images are only safe once the daemon wrote them back. */
    if (!cmd_vm_close(vm, &error)) {
        cmd_error("%s: %s", cmd->name, error->message);
        json_object_put(res);
        return QBK_EXIT_FAILURE;
    }
    rc = cmd->status ? cmd->status(res) : QBK_EXIT_OK;
    if (opt_json) {
        cmd_print_json(res);
        return rc;
    }
    if (cmd->print) {
        cmd->print(res);
    }
    json_object_put(res);
    return rc;
}

int main(int argc, char **argv)
{
    g_autoptr(GError) error = NULL;
    const Command *cmd = NULL;
    const char *name;
    int nargs, rc = cmd_parse(&spec, &argc, &argv);

    if (rc >= 0) {
        return rc;
    }
    if (argc < 2) {
        return cmd_usage("%s", "no command given");
    }
    for (size_t i = 0; i < G_N_ELEMENTS(commands); i++) {
        if (strcmp(argv[1], commands[i].name) == 0) {
            cmd = &commands[i];
        }
    }
    if (!cmd) {
        return cmd_usage("unknown command '%s'", argv[1]);
    }
    nargs = argc - 2;
    if (nargs < cmd->min_args || nargs > cmd->max_args) {
        return cmd->min_args
                   ? cmd_usage("'%s' needs a checkpoint NAME", cmd->name)
                   : cmd_usage("too many arguments for '%s'", cmd->name);
    }
    if (!check_options(cmd, &error)) {
        return cmd_usage("%s", error->message);
    }
    name = nargs ? argv[2] : NULL;
    if (name && strcmp(cmd->name, "create") == 0 &&
        !bitmap_name_valid(name, &error)) {
        cmd_error("%s", error->message);
        return exit_code(error);
    }
    return run(cmd, name);
}
