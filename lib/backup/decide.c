/*
 * What each disk's backup is to be: a pure function of the repository's
 * manifests and the VM's verdict on the disk's checkpoints. pull.c adds
 * the checks that read files (the parent's chain and digests).
 */
#include <string.h>

#include "internal.h"

/* The newest complete backup that has DISK, is a full one if WANT_FULL,
 * and was taken at CHECKPOINT (its id, checkpoint or bitmap) if given. */
static const Manifest *find_backup(GPtrArray *backups, const char *disk,
                                   bool want_full, const char *checkpoint)
{
    for (guint i = backups->len; i-- > 0;) {
        const Manifest *m = backups->pdata[i];
        const ManifestDisk *d = manifest_disk(m, disk);

        if (!d || (want_full && d->mode != MANIFEST_FULL)) {
            continue;
        }
        if (checkpoint && strcmp(m->id, checkpoint) != 0 &&
            g_strcmp0(m->checkpoint, checkpoint) != 0 &&
            g_strcmp0(m->checkpoint_bitmap, checkpoint) != 0) {
            continue;
        }
        return m;
    }
    return NULL;
}

G_GNUC_PRINTF(2, 3)
static bool fallback(DiskPlan *plan, const char *fmt, ...)
{
    va_list ap;

    va_start(ap, fmt);
    plan->why = g_strdup_vprintf(fmt, ap);
    va_end(ap);
    plan->mode = BACKUP_MODE_FULL;
    plan->parent = NULL;
    plan->fallback = true;
    return false;
}

bool disk_plan(BackupMode mode, const char *since, const QmpDisk *qd,
               GPtrArray *backups, const BitmapDiskVerdict *v, DiskPlan *plan)
{
    const ManifestDisk *entry;
    const Manifest *m;
    const char *cp;
    int i;

    memset(plan, 0, sizeof(*plan));
    plan->mode = BACKUP_MODE_FULL;
    if (qd->no_bitmaps) {
        /* It can never have a chain: full every time, whatever the mode
         * (an error here would block every incremental of the VM). */
        plan->why =
            g_strdup_printf("no checkpoints on this disk (%s)", qd->no_bitmaps);
        return true;
    }
    if (mode == BACKUP_MODE_FULL && !since) {
        plan->why = g_strdup("asked for");
        return true;
    }
    m = find_backup(backups, qd->id, mode == BACKUP_MODE_DIFFERENTIAL, since);
    if (!m) {
        return fallback(plan, "%s",
                        since ? "no backup of it at that checkpoint"
                              : "no earlier backup of this disk");
    }
    entry = manifest_disk(m, qd->id);
    cp = m->checkpoint ? m->checkpoint : m->id;
    if (entry->size != qd->size) {
        return fallback(plan, "resized since backup '%s'", m->id);
    }
    if (!m->checkpoint_bitmap || !entry->checkpointed) {
        return fallback(plan, "backup '%s' has no checkpoint", m->id);
    }
    i = bitmap_verdict_find(v, m->checkpoint_bitmap);
    if (i < 0) {
        return fallback(plan, "checkpoint '%s' is missing", cp);
    }
    if ((guint)i < v->untrusted) {
        return fallback(plan,
                        "checkpoint '%s' cannot be trusted (QEMU was killed, "
                        "or a bitmap is missing)",
                        cp);
    }
    plan->mode = mode == BACKUP_MODE_DIFFERENTIAL ? BACKUP_MODE_DIFFERENTIAL
                                                  : BACKUP_MODE_INCREMENTAL;
    plan->parent = m;
    plan->why = g_strdup_printf("changes since checkpoint '%s'", cp);
    return true;
}
