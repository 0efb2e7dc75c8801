/*
 * Retention: which backups a policy keeps ("the newest backup of each of
 * the last N days, weeks, months", and always the newest), and how the
 * others go without breaking the kept ones. Per disk: a run of removed
 * links under a kept backup is merged into it (backup_merge --from the
 * oldest of the run --to it); removed links that nothing kept stands on
 * just lose the disk. A removed backup that several kept backups stand on
 * (e.g. a full under several differentials) is kept, and the plan says so.
 */
#include <string.h>

#include "internal.h"

typedef struct {
    Manifest *m;    /* borrowed */
    const char *id; /* m->id */
    GDateTime *when;
    GPtrArray *why; /* reasons it is kept (static strings) */
} Point;

static void point_free(Point *p)
{
    g_ptr_array_unref(p->why);
    g_free(p);
}

/* Keep the newest point of each of the last N periods (KEY format). */
static void keep_periods(GPtrArray *points, guint n, const char *key,
                         const char *reason)
{
    g_autoptr(GHashTable) seen =
        g_hash_table_new_full(g_str_hash, g_str_equal, g_free, NULL);

    for (guint i = points->len; i-- > 0 && g_hash_table_size(seen) < n;) {
        Point *p = points->pdata[i];
        char *k = g_date_time_format(p->when, key);

        if (g_hash_table_contains(seen, k)) {
            g_free(k);
            continue;
        }
        g_hash_table_add(seen, k);
        g_ptr_array_add(p->why, (char *)reason);
    }
}

static Point *find_point(GPtrArray *points, const char *id)
{
    for (guint i = 0; id && i < points->len; i++) {
        Point *p = points->pdata[i];

        if (strcmp(p->id, id) == 0) {
            return p;
        }
    }
    return NULL;
}

static const char *parent_of(Point *p, const char *disk)
{
    const ManifestDisk *e = manifest_disk(p->m, disk);

    return e ? e->parent : NULL;
}

/* Backups whose DISK stands on ID. */
static guint children(GPtrArray *points, const char *disk, const char *id,
                      Point **one)
{
    guint n = 0;

    for (guint i = 0; i < points->len; i++) {
        Point *p = points->pdata[i];

        if (g_strcmp0(parent_of(p, disk), id) == 0) {
            n++;
            *one = p;
        }
    }
    return n;
}

json_object *backup_retention(Repo *repo, const BackupRetention *policy,
                              bool dry_run, GError **error)
{
    g_autoptr(GPtrArray) all = repo_list(repo, false, NULL, error);
    g_autoptr(GPtrArray) points =
        g_ptr_array_new_with_free_func((GDestroyNotify)point_free);
    g_autoptr(GHashTable) disks = g_hash_table_new(g_str_hash, g_str_equal);
    json_object *plan, *kept, *removed, *actions;
    GHashTableIter it;
    gpointer key;

    if (!all) {
        return NULL;
    }
    for (guint i = 0; i < all->len; i++) {
        Manifest *m = all->pdata[i];
        Point *p = g_new0(Point, 1);

        p->m = m;
        p->id = m->id;
        p->when = m->created;
        p->why = g_ptr_array_new();
        g_ptr_array_add(points, p);
        for (guint d = 0; d < m->disks->len; d++) {
            g_hash_table_add(disks, ((ManifestDisk *)m->disks->pdata[d])->disk);
        }
    }
    /* repo_list sorts by id; the policy goes by creation time */
    for (guint i = 1; i < points->len; i++) {
        for (guint k = i; k > 0; k--) {
            Point *a = points->pdata[k - 1], *b = points->pdata[k];

            if (g_date_time_compare(a->when, b->when) <= 0) {
                break;
            }
            points->pdata[k - 1] = b;
            points->pdata[k] = a;
        }
    }
    if (points->len) {
        g_ptr_array_add(((Point *)points->pdata[points->len - 1])->why,
                        "newest");
    }
    keep_periods(points, policy->daily, "%Y-%m-%d", "daily");
    keep_periods(points, policy->weekly, "%G-W%V", "weekly");
    keep_periods(points, policy->monthly, "%Y-%m", "monthly");

    plan = json_object_new_object();
    actions = json_object_new_array();
    /* per disk: merge each run of removed links into the kept one above;
     * a removed link with several backups on it stays */
    g_hash_table_iter_init(&it, disks);
    while (g_hash_table_iter_next(&it, &key, NULL)) {
        const char *disk = key;

        for (guint i = 0; i < points->len; i++) {
            Point *y = points->pdata[i];
            Point *x = find_point(points, parent_of(y, disk));
            Point *from = NULL, *only;

            if (!manifest_disk(y->m, disk) || y->why->len == 0) {
                continue;
            }
            while (x && x->why->len == 0 &&
                   children(points, disk, x->id, &only) == 1) {
                from = x;
                x = find_point(points, parent_of(x, disk));
            }
            if (from) {
                json_object *a = json_object_new_object();

                json_object_object_add(a, "disk", json_object_new_string(disk));
                json_object_object_add(a, "merge",
                                       json_object_new_string(from->id));
                json_object_object_add(a, "into",
                                       json_object_new_string(y->id));
                json_object_array_add(actions, a);
            }
        }
    }
    /* whatever is removed and has several kept backups on it stays */
    for (guint i = 0; i < points->len; i++) {
        Point *x = points->pdata[i], *only;

        g_hash_table_iter_init(&it, disks);
        while (x->why->len == 0 && g_hash_table_iter_next(&it, &key, NULL)) {
            if (manifest_disk(x->m, key) &&
                children(points, key, x->id, &only) > 1) {
                g_ptr_array_add(x->why, "needed by several backups");
            }
        }
    }
    kept = json_object_new_array();
    removed = json_object_new_array();
    for (guint i = 0; i < points->len; i++) {
        Point *p = points->pdata[i];
        json_object *o = json_object_new_object();

        json_object_object_add(o, "id", json_object_new_string(p->id));
        json_object_object_add(
            o, "created",
            json_object_new_string(qmp_json_string(p->m->json, "created")));
        if (p->why->len) {
            json_object *w = json_object_new_array();

            for (guint k = 0; k < p->why->len; k++) {
                json_object_array_add(w,
                                      json_object_new_string(p->why->pdata[k]));
            }
            json_object_object_add(o, "why", w);
            json_object_array_add(kept, o);
        } else {
            json_object_array_add(removed, o);
        }
    }
    json_object_object_add(plan, "keep", kept);
    json_object_object_add(plan, "remove", removed);
    json_object_object_add(plan, "merges", actions);
    json_object_object_add(plan, "dry_run", json_object_new_boolean(dry_run));
    if (dry_run) {
        return plan;
    }

    /* carry it out: the merges (each verified and crash-safe), then the
     * removed backups that are left lose their disks */
    for (size_t i = 0; i < qmp_json_length(actions); i++) {
        json_object *a = qmp_json_index(actions, i);
        json_object *r = backup_merge(repo, qmp_json_string(a, "disk"),
                                      qmp_json_string(a, "merge"),
                                      qmp_json_string(a, "into"), NULL, error);

        if (!r) {
            json_object_put(plan);
            return NULL;
        }
        json_object_object_add(a, "result", r);
    }
    for (size_t i = qmp_json_length(removed); i-- > 0;) {
        const char *id = qmp_json_string(qmp_json_index(removed, i), "id");

        g_hash_table_iter_init(&it, disks);
        while (g_hash_table_iter_next(&it, &key, NULL)) {
            if (!backup_drop_disk(repo, id, key, error)) {
                json_object_put(plan);
                return NULL;
            }
        }
    }
    return plan;
}
