/*
 * Checkpoint names, the per-disk chains, and the transactions that create,
 * delete and combine checkpoints. Every change to QEMU here is one QMP
 * transaction, so it happens on all disks or on none.
 */
#include <string.h>

#include "internal.h"

/* G_DEFINE_QUARK stringifies the quark name as written. */
/* clang-format off */
G_DEFINE_QUARK(qbk-bitmap-error-quark, bitmap_error)
/* clang-format on */

#define BITMAP_PREFIX "qbk-"
#define SEQ_DIGITS    6
#define SEQ_MAX       999999

bool bitmap_name_valid(const char *name, GError **error)
{
    size_t len = strlen(name);

    if (len == 0 || len > BITMAP_NAME_MAX) {
        g_set_error(error, BITMAP_ERROR, BITMAP_ERROR_INVALID_NAME,
                    "checkpoint name '%s' must have 1 to %d characters", name,
                    BITMAP_NAME_MAX);
        return false;
    }
    for (size_t i = 0; i < len; i++) {
        char c = name[i];

        if (!g_ascii_isalnum(c) &&
            (i == 0 || (c != '.' && c != '_' && c != '+' && c != '-'))) {
            g_set_error(error, BITMAP_ERROR, BITMAP_ERROR_INVALID_NAME,
                        "checkpoint name '%s' may only hold letters, digits "
                        "and . _ + - (not first)",
                        name);
            return false;
        }
    }
    return true;
}

bool bitmap_parse_name(const char *bitmap, guint *seq, char **name,
                       bool *partial)
{
    const char *p = bitmap;
    guint n = 0;
    bool is_partial = false;

    if (!g_str_has_prefix(p, BITMAP_PREFIX)) {
        return false;
    }
    p += strlen(BITMAP_PREFIX);
    for (int i = 0; i < SEQ_DIGITS; i++, p++) {
        if (!g_ascii_isdigit(*p)) {
            return false;
        }
        n = n * 10 + (*p - '0');
    }
    if (*p == 'p') {
        is_partial = true;
        p++;
    }
    if (*p != '-' || !bitmap_name_valid(p + 1, NULL)) {
        return false;
    }
    if (seq) {
        *seq = n;
    }
    if (name) {
        *name = g_strdup(p + 1);
    }
    if (partial) {
        *partial = is_partial;
    }
    return true;
}

void bitmap_checkpoint_free(BitmapCheckpoint *cp)
{
    if (!cp) {
        return;
    }
    g_free(cp->name);
    g_free(cp->bitmap);
    g_ptr_array_unref(cp->disks);
    g_ptr_array_unref(cp->bitmaps);
    g_free(cp);
}

static gint compare_seq(gconstpointer a, gconstpointer b)
{
    const BitmapCheckpoint *x = *(BitmapCheckpoint *const *)a;
    const BitmapCheckpoint *y = *(BitmapCheckpoint *const *)b;

    return x->seq < y->seq ? -1 : x->seq > y->seq;
}

GPtrArray *bitmap_list_checkpoints(GPtrArray *disks)
{
    GPtrArray *list =
        g_ptr_array_new_with_free_func((GDestroyNotify)bitmap_checkpoint_free);
    g_autoptr(GHashTable) bybitmap = g_hash_table_new(g_str_hash, g_str_equal);

    for (guint d = 0; d < disks->len; d++) {
        QmpDisk *disk = disks->pdata[d];

        for (guint i = 0; i < disk->bitmaps->len; i++) {
            QmpBitmap *b = disk->bitmaps->pdata[i];
            BitmapCheckpoint *cp = g_hash_table_lookup(bybitmap, b->name);
            guint seq;
            char *name;
            bool partial;

            if (!cp) {
                if (!bitmap_parse_name(b->name, &seq, &name, &partial)) {
                    continue;
                }
                cp = g_new0(BitmapCheckpoint, 1);
                cp->seq = seq;
                cp->name = name;
                cp->partial = partial;
                cp->bitmap = g_strdup(b->name);
                cp->disks = g_ptr_array_new();
                cp->bitmaps = g_ptr_array_new();
                g_hash_table_insert(bybitmap, cp->bitmap, cp);
                g_ptr_array_add(list, cp);
            }
            g_ptr_array_add(cp->disks, disk);
            g_ptr_array_add(cp->bitmaps, b);
        }
    }
    g_ptr_array_sort(list, compare_seq);
    return list;
}

BitmapCheckpoint *bitmap_find_checkpoint(GPtrArray *checkpoints,
                                         const char *name)
{
    for (guint i = 0; i < checkpoints->len; i++) {
        BitmapCheckpoint *cp = checkpoints->pdata[i];

        if (strcmp(cp->name, name) == 0 || strcmp(cp->bitmap, name) == 0) {
            return cp;
        }
    }
    return NULL;
}

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

static gint compare_bitmap_seq(gconstpointer a, gconstpointer b)
{
    const QmpBitmap *x = *(QmpBitmap *const *)a;
    const QmpBitmap *y = *(QmpBitmap *const *)b;
    guint sx = 0, sy = 0;

    bitmap_parse_name(x->name, &sx, NULL, NULL);
    bitmap_parse_name(y->name, &sy, NULL, NULL);
    return sx < sy ? -1 : sx > sy;
}

GPtrArray *bitmap_disk_chain(const QmpDisk *disk)
{
    GPtrArray *chain = g_ptr_array_new();

    for (guint i = 0; i < disk->bitmaps->len; i++) {
        QmpBitmap *b = disk->bitmaps->pdata[i];

        if (bitmap_parse_name(b->name, NULL, NULL, NULL)) {
            g_ptr_array_add(chain, b);
        }
    }
    g_ptr_array_sort(chain, compare_bitmap_seq);
    return chain;
}

json_object *bitmap_ref(const QmpDisk *disk, const char *name)
{
    json_object *o = json_object_new_object();

    json_object_object_add(o, "node", json_object_new_string(disk->node));
    json_object_object_add(o, "name", json_object_new_string(name));
    return o;
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

        json_object_object_add(add, "persistent", json_object_new_boolean(1));
        if (granularity) {
            json_object_object_add(add, "granularity",
                                   json_object_new_int64(granularity));
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
            json_object_object_add(merge, "node",
                                   json_object_new_string(disk->node));
            json_object_object_add(merge, "target",
                                   json_object_new_string(prev->name));
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
    json_object_object_add(add, "persistent", json_object_new_boolean(0));
    json_object_object_add(add, "disabled", json_object_new_boolean(!later));
    json_object_object_add(add, "granularity",
                           json_object_new_int64(granularity));
    qmp_transaction_add(tx, "block-dirty-bitmap-add", add);

    merge = json_object_new_object();
    sources = json_object_new_array();
    for (guint j = start; j < v->chain->len; j++) {
        QmpBitmap *b = v->chain->pdata[j];

        json_object_array_add(sources, json_object_new_string(b->name));
    }
    json_object_object_add(merge, "node", json_object_new_string(disk->node));
    json_object_object_add(merge, "target",
                           json_object_new_string(target_bitmap));
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

int bitmap_drop_since(QmpClient *qmp, GPtrArray *targets,
                      const char *target_bitmap, GError **error)
{
    g_autoptr(QmpTransaction) tx = qmp_transaction_new();

    for (guint i = 0; i < targets->len; i++) {
        QmpDisk *disk = targets->pdata[i];

        if (qmp_disk_bitmap(disk, target_bitmap)) {
            qmp_transaction_add(tx, "block-dirty-bitmap-remove",
                                bitmap_ref(disk, target_bitmap));
        }
    }
    if (!qmp_transaction_run(qmp, tx, error)) {
        g_prefix_error(error, "cannot remove '%s': ", target_bitmap);
        return -1;
    }
    return (int)qmp_transaction_length(tx);
}
