/*
 * Checkpoints as the VM shows them: bitmap names (qbk-<seq>-<name>), the
 * checkpoints across disks, and each disk's chain, oldest first. Reads
 * only what lib/qmp found; changes nothing in QEMU.
 */
#include <string.h>

#include "internal.h"

/* G_DEFINE_QUARK stringifies the quark name as written. */
/* clang-format off */
G_DEFINE_QUARK(qbk-bitmap-error-quark, bitmap_error)
/* clang-format on */

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

    qmp_json_set_string(o, "node", disk->node);
    qmp_json_set_string(o, "name", name);
    return o;
}
