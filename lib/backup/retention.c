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

/* Oldest first by creation time, then by id. */
static gint by_time(gconstpointer a, gconstpointer b)
{
    const Point *x = *(Point *const *)a;
    const Point *y = *(Point *const *)b;
    gint c = g_date_time_compare(x->when, y->when);

    return c ? c : strcmp(x->id, y->id);
}

/* The disks of MANIFESTS, sorted (borrowed strings). */
static GPtrArray *disks_of(GPtrArray *manifests)
{
    g_autoptr(GHashTable) seen = g_hash_table_new(g_str_hash, g_str_equal);
    GPtrArray *disks = g_ptr_array_new();

    for (guint i = 0; i < manifests->len; i++) {
        Manifest *m = manifests->pdata[i];

        for (guint d = 0; d < m->disks->len; d++) {
            char *disk = ((ManifestDisk *)m->disks->pdata[d])->disk;

            if (g_hash_table_add(seen, disk)) {
                g_ptr_array_add(disks, disk);
            }
        }
    }
    g_ptr_array_sort(disks, (GCompareFunc)g_strcmp0);
    return disks;
}

/* Per disk: merge each run of removed links into the kept one above it
 * (a removed link with several backups on it stays). */
static json_object *plan_merges(GPtrArray *points, GPtrArray *disks)
{
    json_object *actions = json_object_new_array();

    for (guint d = 0; d < disks->len; d++) {
        const char *disk = disks->pdata[d];

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

                qmp_json_set_string(a, "disk", disk);
                qmp_json_set_string(a, "merge", from->id);
                qmp_json_set_string(a, "into", y->id);
                json_object_array_add(actions, a);
            }
        }
    }
    return actions;
}

json_object *retention_plan(GPtrArray *manifests, const BackupRetention *policy)
{
    g_autoptr(GPtrArray) points =
        g_ptr_array_new_with_free_func((GDestroyNotify)point_free);
    g_autoptr(GPtrArray) disks = disks_of(manifests);
    json_object *plan = json_object_new_object();
    json_object *kept = json_object_new_array();
    json_object *removed = json_object_new_array();
    json_object *actions;

    for (guint i = 0; i < manifests->len; i++) {
        Manifest *m = manifests->pdata[i];
        Point *p = g_new0(Point, 1);

        p->m = m;
        p->id = m->id;
        p->when = m->created;
        p->why = g_ptr_array_new();
        g_ptr_array_add(points, p);
    }
    g_ptr_array_sort(points, by_time);
    if (points->len) {
        g_ptr_array_add(((Point *)points->pdata[points->len - 1])->why,
                        "newest");
    }
    keep_periods(points, policy->daily, "%Y-%m-%d", "daily");
    keep_periods(points, policy->weekly, "%G-W%V", "weekly");
    keep_periods(points, policy->monthly, "%Y-%m", "monthly");
    actions = plan_merges(points, disks);
    /* whatever is removed and has several kept backups on it stays */
    for (guint i = 0; i < points->len; i++) {
        Point *x = points->pdata[i], *only;

        for (guint d = 0; x->why->len == 0 && d < disks->len; d++) {
            if (manifest_disk(x->m, disks->pdata[d]) &&
                children(points, disks->pdata[d], x->id, &only) > 1) {
                g_ptr_array_add(x->why, "needed by several backups");
            }
        }
    }
    for (guint i = 0; i < points->len; i++) {
        Point *p = points->pdata[i];
        json_object *o = json_object_new_object();

        qmp_json_set_string(o, "id", p->id);
        qmp_json_set_string(o, "created",
                            qmp_json_string(p->m->json, "created"));
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
    return plan;
}

json_object *backup_retention(Repo *repo, const BackupRetention *policy,
                              bool dry_run, GError **error)
{
    g_autoptr(GPtrArray) all = repo_list(repo, false, NULL, error);
    g_autoptr(GPtrArray) disks = NULL;
    json_object *plan, *actions, *removed;

    if (!all) {
        return NULL;
    }
    plan = retention_plan(all, policy);
    qmp_json_set_bool(plan, "dry_run", dry_run);
    if (dry_run) {
        return plan;
    }
    /* carry it out: the merges (each verified and crash-safe), then the
     * removed backups that are left lose their disks */
    actions = qmp_json_array(plan, "merges");
    removed = qmp_json_array(plan, "remove");
    disks = disks_of(all);
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

        for (guint d = 0; d < disks->len; d++) {
            if (!backup_drop_disk(repo, id, disks->pdata[d], error)) {
                json_object_put(plan);
                return NULL;
            }
        }
    }
    return plan;
}
