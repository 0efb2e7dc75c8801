/*
 * The transactions that create, delete and combine checkpoints. Every
 * change to QEMU here is one QMP transaction, so it happens on all disks
 * or on none.
 */
#include <string.h>

#include "internal.h"

static BitmapCheckpoint *find_or_fail(GPtrArray *checkpoints, const char *name,
                                      GError **error)
{
    BitmapCheckpoint *cp = bitmap_find_checkpoint(checkpoints, name);

    if (!cp) {
        g_set_error(error, BITMAP_ERROR, BITMAP_ERROR_NOT_FOUND,
                    "no checkpoint '%s' (see 'qbk-checkpoint list')", name);
    }
    return cp;
}

static bool check_targets(GPtrArray *targets, GError **error)
{
    if (targets->len == 0) {
        g_set_error(error, BITMAP_ERROR, BITMAP_ERROR_UNSUPPORTED,
                    "the VM has no disk that can hold checkpoints");
        return false;
    }
    for (guint i = 0; i < targets->len; i++) {
        QmpDisk *disk = targets->pdata[i];

        if (disk->no_bitmaps) {
            g_set_error(error, BITMAP_ERROR, BITMAP_ERROR_UNSUPPORTED,
                        "disk '%s' cannot hold checkpoints: %s", disk->id,
                        disk->no_bitmaps);
            return false;
        }
    }
    return true;
}

static char *default_name(GPtrArray *checkpoints)
{
    g_autoptr(GDateTime) now = g_date_time_new_now_utc();
    g_autofree char *base = g_date_time_format(now, "%Y%m%dT%H%M%SZ");
    char *name = g_strdup(base);

    /* Two checkpoints in one second: make the name unique. */
    for (int n = 2; bitmap_find_checkpoint(checkpoints, name); n++) {
        g_free(name);
        name = g_strdup_printf("%s.%d", base, n);
    }
    return name;
}

char *bitmap_add_checkpoint_actions(QmpTransaction *tx, GPtrArray *disks,
                                    GPtrArray *targets, const char *name,
                                    uint32_t granularity, GError **error)
{
    return bitmap_add_checkpoint_actions_split(tx, tx, disks, targets, name,
                                               granularity, error);
}

char *bitmap_add_checkpoint_actions_split(QmpTransaction *tx,
                                          QmpTransaction *later,
                                          GPtrArray *disks, GPtrArray *targets,
                                          const char *name,
                                          uint32_t granularity, GError **error)
{
    g_autoptr(GPtrArray) checkpoints = bitmap_list_checkpoints(disks);
    g_autofree char *chosen = NULL;
    guint seq = 1;
    guint eligible = 0;
    bool partial;

    if (!check_targets(targets, error)) {
        return NULL;
    }
    for (guint i = 0; i < disks->len; i++) {
        eligible += ((QmpDisk *)disks->pdata[i])->no_bitmaps == NULL;
    }
    partial = targets->len < eligible;
    if (name) {
        if (!bitmap_name_valid(name, error)) {
            return NULL;
        }
        if (bitmap_find_checkpoint(checkpoints, name)) {
            g_set_error(error, BITMAP_ERROR, BITMAP_ERROR_EXISTS,
                        "checkpoint '%s' already exists", name);
            return NULL;
        }
        chosen = g_strdup(name);
    } else {
        chosen = default_name(checkpoints);
    }
    if (checkpoints->len > 0) {
        BitmapCheckpoint *newest = checkpoints->pdata[checkpoints->len - 1];

        seq = newest->seq + 1;
    }
    if (seq > SEQ_MAX) {
        g_set_error(error, BITMAP_ERROR, BITMAP_ERROR_UNSUPPORTED,
                    "checkpoint numbers are exhausted (%d): delete the VM's "
                    "checkpoints and start a new chain",
                    SEQ_MAX);
        return NULL;
    }

    for (guint i = 0; i < targets->len; i++) {
        QmpDisk *disk = targets->pdata[i];
        g_autoptr(GPtrArray) chain = bitmap_disk_chain(disk);
        g_autofree char *bitmap =
            g_strdup_printf(BITMAP_PREFIX "%0*u%s-%s", SEQ_DIGITS, seq,
                            partial ? "p" : "", chosen);
        json_object *add = bitmap_ref(disk, bitmap);

        qmp_json_set_bool(add, "persistent", 1);
        if (granularity) {
            qmp_json_set_int(add, "granularity", granularity);
        }
        qmp_transaction_add(tx, "block-dirty-bitmap-add", add);
        /*
         * From this instant the new bitmap records: the older ones stop, so
         * each covers exactly its own period. Inconsistent ones do not
         * record and cannot be touched.
         */
        for (guint j = 0; j < chain->len; j++) {
            QmpBitmap *b = chain->pdata[j];

            if (b->recording && !b->inconsistent) {
                qmp_transaction_add(later, "block-dirty-bitmap-disable",
                                    bitmap_ref(disk, b->name));
            }
        }
    }
    return g_strdup_printf(BITMAP_PREFIX "%0*u%s-%s", SEQ_DIGITS, seq,
                           partial ? "p" : "", chosen);
}

char *bitmap_create_checkpoint(QmpClient *qmp, GPtrArray *disks,
                               GPtrArray *targets, const char *name,
                               uint32_t granularity, GError **error)
{
    g_autoptr(QmpTransaction) tx = qmp_transaction_new();
    g_autofree char *bitmap = bitmap_add_checkpoint_actions(
        tx, disks, targets, name, granularity, error);
    g_autofree char *short_name = NULL;

    if (!bitmap) {
        return NULL;
    }
    if (!qmp_transaction_run(qmp, tx, error)) {
        bitmap_parse_name(bitmap, NULL, &short_name, NULL);
        g_prefix_error(error, "cannot create checkpoint '%s': ", short_name);
        return NULL;
    }
    return g_steal_pointer(&bitmap);
}

bool bitmap_delete_checkpoint(QmpClient *qmp, GPtrArray *disks,
                              const char *name, GError **error)
{
    g_autoptr(GPtrArray) checkpoints = bitmap_list_checkpoints(disks);
    g_autoptr(QmpTransaction) tx = qmp_transaction_new();
    BitmapCheckpoint *cp = find_or_fail(checkpoints, name, error);

    if (!cp) {
        return false;
    }
    for (guint i = 0; i < cp->disks->len; i++) {
        QmpDisk *disk = cp->disks->pdata[i];
        QmpBitmap *victim = cp->bitmaps->pdata[i];
        g_autoptr(GPtrArray) chain = bitmap_disk_chain(disk);
        QmpBitmap *prev = NULL;

        for (guint j = 0; j < chain->len && chain->pdata[j] != victim; j++) {
            prev = chain->pdata[j];
        }
        /*
         * An inconsistent bitmap holds nothing usable (and QEMU refuses to
         * merge it); its predecessors are untrusted anyway: just remove.
         */
        if (prev && !victim->inconsistent && !prev->inconsistent) {
            json_object *merge = json_object_new_object();
            json_object *sources = json_object_new_array();

            json_object_array_add(sources, json_object_new_string(cp->bitmap));
            qmp_json_set_string(merge, "node", disk->node);
            qmp_json_set_string(merge, "target", prev->name);
            json_object_object_add(merge, "bitmaps", sources);
            qmp_transaction_add(tx, "block-dirty-bitmap-merge", merge);
            if (victim->recording && !prev->recording) {
                qmp_transaction_add(tx, "block-dirty-bitmap-enable",
                                    bitmap_ref(disk, prev->name));
            }
        }
        qmp_transaction_add(tx, "block-dirty-bitmap-remove",
                            bitmap_ref(disk, cp->bitmap));
    }
    if (!qmp_transaction_run(qmp, tx, error)) {
        g_prefix_error(error, "cannot delete checkpoint '%s': ", cp->name);
        return false;
    }
    return true;
}

bool bitmap_add_since_actions(QmpTransaction *tx, QmpTransaction *later,
                              GPtrArray *disks, const QmpDisk *disk,
                              const char *name, const char *target_bitmap,
                              GError **error)
{
    g_autoptr(GPtrArray) checkpoints = bitmap_list_checkpoints(disks);
    g_autoptr(BitmapCheck) check = bitmap_check(disks);
    BitmapCheckpoint *cp = find_or_fail(checkpoints, name, error);
    const BitmapDiskVerdict *v;
    json_object *add, *merge, *sources;
    guint start;
    int found;
    uint32_t granularity;

    if (!cp) {
        return false;
    }
    if (disk->no_bitmaps) {
        g_set_error(error, BITMAP_ERROR, BITMAP_ERROR_UNSUPPORTED,
                    "disk '%s' cannot hold checkpoints: %s", disk->id,
                    disk->no_bitmaps);
        return false;
    }
    v = bitmap_check_verdict(check, disk);
    found = bitmap_verdict_find(v, cp->bitmap);
    if (found < 0) {
        g_set_error(error, BITMAP_ERROR, BITMAP_ERROR_UNTRUSTED,
                    "disk '%s' has no checkpoint '%s': it needs a full "
                    "backup",
                    disk->id, cp->name);
        return false;
    }
    start = (guint)found;
    granularity = ((QmpBitmap *)v->chain->pdata[start])->granularity;
    if (start < v->untrusted) {
        g_set_error(error, BITMAP_ERROR, BITMAP_ERROR_UNTRUSTED,
                    "disk '%s': the changes since checkpoint '%s' are not "
                    "fully recorded (see 'check'): it needs a full backup",
                    disk->id, cp->name);
        return false;
    }
    if (qmp_disk_bitmap(disk, target_bitmap)) {
        g_set_error(error, BITMAP_ERROR, BITMAP_ERROR_EXISTS,
                    "disk '%s' already has a bitmap '%s'", disk->id,
                    target_bitmap);
        return false;
    }

    add = bitmap_ref(disk, target_bitmap);
    qmp_json_set_bool(add, "persistent", 0);
    qmp_json_set_bool(add, "disabled", !later);
    qmp_json_set_int(add, "granularity", granularity);
    qmp_transaction_add(tx, "block-dirty-bitmap-add", add);

    merge = json_object_new_object();
    sources = json_object_new_array();
    for (guint j = start; j < v->chain->len; j++) {
        QmpBitmap *b = v->chain->pdata[j];

        json_object_array_add(sources, json_object_new_string(b->name));
    }
    qmp_json_set_string(merge, "node", disk->node);
    qmp_json_set_string(merge, "target", target_bitmap);
    json_object_object_add(merge, "bitmaps", sources);
    qmp_transaction_add(tx, "block-dirty-bitmap-merge", merge);
    if (later) {
        qmp_transaction_add(later, "block-dirty-bitmap-disable",
                            bitmap_ref(disk, target_bitmap));
    }
    return true;
}

bool bitmap_since(QmpClient *qmp, GPtrArray *disks, GPtrArray *targets,
                  const char *name, const char *target_bitmap, GError **error)
{
    g_autoptr(GPtrArray) checkpoints = bitmap_list_checkpoints(disks);
    g_autoptr(QmpTransaction) tx = qmp_transaction_new();
    BitmapCheckpoint *cp = find_or_fail(checkpoints, name, error);

    if (!cp || !check_targets(targets, error)) {
        return false;
    }
    for (guint i = 0; i < targets->len; i++) {
        if (!bitmap_add_since_actions(tx, NULL, disks, targets->pdata[i], name,
                                      target_bitmap, error)) {
            return false;
        }
    }
    if (!qmp_transaction_run(qmp, tx, error)) {
        g_prefix_error(error, "cannot compute changes since '%s': ", cp->name);
        return false;
    }
    return true;
}

int bitmap_drop_since(QmpClient *qmp, GPtrArray *targets, GPtrArray *names,
                      GError **error)
{
    g_autoptr(QmpTransaction) tx = qmp_transaction_new();

    for (guint i = 0; i < targets->len; i++) {
        QmpDisk *disk = targets->pdata[i];

        for (guint k = 0; k < names->len; k++) {
            if (qmp_disk_bitmap(disk, names->pdata[k])) {
                qmp_transaction_add(tx, "block-dirty-bitmap-remove",
                                    bitmap_ref(disk, names->pdata[k]));
            }
        }
    }
    if (!qmp_transaction_run(qmp, tx, error)) {
        g_prefix_error(error, "cannot remove the \"since\" bitmaps: ");
        return -1;
    }
    return (int)qmp_transaction_length(tx);
}
