/*
 * Checking a VM's checkpoints: which of them can still answer "what was
 * written since" completely, and the one transaction that removes the rest.
 *
 * On one disk, "since checkpoint k" is the union of the chain from k to the
 * newest. It is complete only if every bitmap in that range is consistent,
 * none is missing, and the newest still records. So one bad link makes k
 * and every older checkpoint on that disk untrusted; newer ones stay good.
 */
#include <string.h>

#include "internal.h"

static const struct {
    const char *name;
    BitmapSeverity severity;
} issue_kinds[] = {
    [BITMAP_ISSUE_INCONSISTENT] = { "inconsistent", BITMAP_SEVERITY_ERROR },
    [BITMAP_ISSUE_NOT_RECORDING] = { "not-recording", BITMAP_SEVERITY_ERROR },
    [BITMAP_ISSUE_MISSING] = { "missing", BITMAP_SEVERITY_ERROR },
    [BITMAP_ISSUE_STALE_RECORDING] = { "stale-recording",
                                       BITMAP_SEVERITY_WARNING },
    [BITMAP_ISSUE_NOT_PERSISTENT] = { "not-persistent",
                                      BITMAP_SEVERITY_WARNING },
    [BITMAP_ISSUE_FOREIGN] = { "foreign", BITMAP_SEVERITY_NOTE },
    [BITMAP_ISSUE_NAMELESS] = { "nameless", BITMAP_SEVERITY_NOTE },
    [BITMAP_ISSUE_TEMPORARY] = { "temporary", BITMAP_SEVERITY_NOTE },
};

BitmapSeverity bitmap_issue_severity(BitmapIssueKind kind)
{
    return issue_kinds[kind].severity;
}

const char *bitmap_issue_kind_name(BitmapIssueKind kind)
{
    return issue_kinds[kind].name;
}

static void issue_free(BitmapIssue *issue)
{
    g_free(issue->bitmap);
    g_free(issue->message);
    g_free(issue);
}

static void verdict_free(BitmapDiskVerdict *v)
{
    g_ptr_array_unref(v->chain);
    g_ptr_array_unref(v->disable);
    g_free(v);
}

void bitmap_check_free(BitmapCheck *check)
{
    if (check) {
        g_ptr_array_unref(check->issues);
        g_ptr_array_unref(check->verdicts);
        g_free(check);
    }
}

G_GNUC_PRINTF(5, 6)
static void add_issue(BitmapCheck *check, BitmapIssueKind kind,
                      const QmpDisk *disk, const char *bitmap, const char *fmt,
                      ...)
{
    BitmapIssue *issue = g_new0(BitmapIssue, 1);
    va_list ap;

    issue->kind = kind;
    issue->disk = disk;
    issue->bitmap = g_strdup(bitmap);
    va_start(ap, fmt);
    issue->message = g_strdup_vprintf(fmt, ap);
    va_end(ap);
    g_ptr_array_add(check->issues, issue);
}

static guint seq_of(const QmpBitmap *b)
{
    guint seq = 0;

    bitmap_parse_name(b->name, &seq, NULL, NULL);
    return seq;
}

/* Bitmaps on DISK that are not checkpoints: named, never touched. */
static void check_others(BitmapCheck *check, const QmpDisk *disk)
{
    for (guint i = 0; i < disk->bitmaps->len; i++) {
        const QmpBitmap *b = disk->bitmaps->pdata[i];

        if (g_str_has_prefix(b->name, BITMAP_SINCE_PREFIX)) {
            add_issue(check, BITMAP_ISSUE_TEMPORARY, disk, b->name,
                      "temporary bitmap '%s' is left over (remove it with "
                      "'since --drop')",
                      b->name);
        } else if (!bitmap_parse_name(b->name, NULL, NULL, NULL)) {
            add_issue(check, BITMAP_ISSUE_FOREIGN, disk, b->name,
                      "bitmap '%s' is not qbk's: left alone", b->name);
        }
    }
    if (disk->nameless_bitmaps) {
        add_issue(check, BITMAP_ISSUE_NAMELESS, disk, NULL,
                  "%u internal bitmap(s) of a job or filter: left alone",
                  disk->nameless_bitmaps);
    }
}

/* Each checkpoint bitmap's own state: consistent, persistent, and only the
 * newest recording. */
static void check_states(BitmapCheck *check, BitmapDiskVerdict *v)
{
    const QmpDisk *disk = v->disk;
    GPtrArray *chain = v->chain;
    guint n = chain->len;

    for (guint i = 0; i < n; i++) {
        const QmpBitmap *b = chain->pdata[i];

        if (b->inconsistent) {
            add_issue(check, BITMAP_ISSUE_INCONSISTENT, disk, b->name,
                      "checkpoint bitmap '%s' is inconsistent (QEMU was not "
                      "shut down cleanly)",
                      b->name);
            v->untrusted = MAX(v->untrusted, i + 1);
            continue;
        }
        if (!b->persistent) {
            add_issue(check, BITMAP_ISSUE_NOT_PERSISTENT, disk, b->name,
                      "checkpoint bitmap '%s' is not persistent: it will be "
                      "lost when QEMU exits",
                      b->name);
        }
        if (i + 1 < n && b->recording) {
            add_issue(check, BITMAP_ISSUE_STALE_RECORDING, disk, b->name,
                      "older checkpoint bitmap '%s' still records", b->name);
            g_ptr_array_add(v->disable, g_strdup(b->name));
        }
    }
    if (n > 0) {
        const QmpBitmap *newest = chain->pdata[n - 1];

        if (!newest->inconsistent && !newest->recording) {
            add_issue(check, BITMAP_ISSUE_NOT_RECORDING, disk, newest->name,
                      "newest checkpoint bitmap '%s' does not record: writes "
                      "since it are not tracked",
                      newest->name);
            v->untrusted = n;
        }
    }
}

/*
 * A checkpoint made on every disk must be on each disk whose chain spans
 * it; where it is gone, the chain below it lost that period.
 */
static void check_gaps(BitmapCheck *check, BitmapDiskVerdict *v,
                       GPtrArray *checkpoints)
{
    GPtrArray *chain = v->chain;
    guint n = chain->len;

    for (guint c = 0; n > 1 && c < checkpoints->len; c++) {
        const BitmapCheckpoint *cp = checkpoints->pdata[c];
        guint below = 0;
        bool here = false;

        if (cp->partial || cp->seq <= seq_of(chain->pdata[0]) ||
            cp->seq >= seq_of(chain->pdata[n - 1])) {
            continue;
        }
        for (guint i = 0; i < n; i++) {
            if (seq_of(chain->pdata[i]) == cp->seq) {
                here = true;
            } else if (seq_of(chain->pdata[i]) < cp->seq) {
                below = i + 1;
            }
        }
        if (!here) {
            add_issue(check, BITMAP_ISSUE_MISSING, v->disk, cp->bitmap,
                      "checkpoint bitmap '%s' is missing here but exists on "
                      "other disks",
                      cp->bitmap);
            v->untrusted = MAX(v->untrusted, below);
        }
    }
}

static void check_disk(BitmapCheck *check, const QmpDisk *disk,
                       GPtrArray *checkpoints)
{
    BitmapDiskVerdict *v = g_new0(BitmapDiskVerdict, 1);

    v->disk = disk;
    v->chain = bitmap_disk_chain(disk);
    v->disable = g_ptr_array_new_with_free_func(g_free);
    g_ptr_array_add(check->verdicts, v);
    check_others(check, disk);
    check_states(check, v);
    check_gaps(check, v, checkpoints);

    /* What the repair removes need not be disabled first. */
    for (guint i = 0; i < v->untrusted; i++) {
        const QmpBitmap *b = v->chain->pdata[i];

        for (guint j = 0; j < v->disable->len; j++) {
            if (strcmp(v->disable->pdata[j], b->name) == 0) {
                g_ptr_array_remove_index(v->disable, j);
                break;
            }
        }
    }
}

BitmapCheck *bitmap_check(GPtrArray *disks)
{
    BitmapCheck *check = g_new0(BitmapCheck, 1);
    g_autoptr(GPtrArray) checkpoints = bitmap_list_checkpoints(disks);

    check->issues = g_ptr_array_new_with_free_func((GDestroyNotify)issue_free);
    check->verdicts =
        g_ptr_array_new_with_free_func((GDestroyNotify)verdict_free);
    for (guint d = 0; d < disks->len; d++) {
        const QmpDisk *disk = disks->pdata[d];

        if (!disk->no_bitmaps) {
            check_disk(check, disk, checkpoints);
        }
    }
    return check;
}

bool bitmap_check_has_errors(const BitmapCheck *check)
{
    for (guint i = 0; i < check->issues->len; i++) {
        const BitmapIssue *issue = check->issues->pdata[i];

        if (bitmap_issue_severity(issue->kind) == BITMAP_SEVERITY_ERROR) {
            return true;
        }
    }
    return false;
}

int bitmap_verdict_find(const BitmapDiskVerdict *v, const char *bitmap)
{
    for (guint i = 0; v && bitmap && i < v->chain->len; i++) {
        const QmpBitmap *b = v->chain->pdata[i];

        if (strcmp(b->name, bitmap) == 0) {
            return (int)i;
        }
    }
    return -1;
}

const BitmapDiskVerdict *bitmap_check_verdict(const BitmapCheck *check,
                                              const QmpDisk *disk)
{
    for (guint i = 0; i < check->verdicts->len; i++) {
        const BitmapDiskVerdict *v = check->verdicts->pdata[i];

        if (v->disk == disk) {
            return v;
        }
    }
    return NULL;
}

int bitmap_repair(QmpClient *qmp, const BitmapCheck *check, GError **error)
{
    g_autoptr(QmpTransaction) tx = qmp_transaction_new();

    for (guint i = 0; i < check->verdicts->len; i++) {
        const BitmapDiskVerdict *v = check->verdicts->pdata[i];

        for (guint j = 0; j < v->untrusted; j++) {
            const QmpBitmap *b = v->chain->pdata[j];

            qmp_transaction_add(tx, "block-dirty-bitmap-remove",
                                bitmap_ref(v->disk, b->name));
        }
        for (guint j = 0; j < v->disable->len; j++) {
            qmp_transaction_add(tx, "block-dirty-bitmap-disable",
                                bitmap_ref(v->disk, v->disable->pdata[j]));
        }
    }
    if (!qmp_transaction_run(qmp, tx, error)) {
        g_prefix_error(error, "repair failed, nothing changed: ");
        return -1;
    }
    return (int)qmp_transaction_length(tx);
}
