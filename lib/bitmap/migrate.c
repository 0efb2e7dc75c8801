/*
 * Checkpoints across live migration. Stock QEMU carries dirty bitmaps in
 * the migration stream (capability dirty-bitmaps, both sides), but only
 * for nodes it can name on both sides: qbk always sets block-bitmap-mapping,
 * pairing each source disk with the destination disk of the same id (or
 * the node the caller maps it to), so auto-named nodes migrate too. Before:
 * the traps are checked (destination waiting with -incoming defer, no qbk
 * backup at work, no NBD export on the source). After: every checkpoint
 * must be on the destination with the source's final count, recording
 * state and content hash; one that arrived non-persistent (which happens
 * after a failed attempt) is made persistent again, with no write lost.
 */
#include <string.h>

#include "internal.h"

#define POLL_US (200 * 1000)

static json_object *bitmap_sha(QmpClient *qmp, const char *node,
                               const char *name, GError **error)
{
    json_object *args = json_object_new_object();

    qmp_json_set_string(args, "node", node);
    qmp_json_set_string(args, "name", name);
    return qmp_execute(qmp, "x-debug-block-dirty-bitmap-sha256", args, error);
}

/* {disk: {bitmap: {count, recording, persistent, sha256}}} for every named
 * bitmap of every disk with checkpoints. */
static json_object *snapshot(QmpClient *qmp, GPtrArray *disks, GError **error)
{
    json_object *all = json_object_new_object();

    for (guint i = 0; i < disks->len; i++) {
        QmpDisk *d = disks->pdata[i];
        json_object *bms = json_object_new_object();

        for (guint k = 0; d->bitmaps && k < d->bitmaps->len; k++) {
            QmpBitmap *b = d->bitmaps->pdata[k];
            json_object *o = json_object_new_object();
            json_object *sha = bitmap_sha(qmp, d->node, b->name, error);

            if (!sha) {
                json_object_put(o);
                json_object_put(bms);
                json_object_put(all);
                return NULL;
            }
            qmp_json_set_uint(o, "count", b->count);
            qmp_json_set_bool(o, "recording", b->recording);
            qmp_json_set_bool(o, "persistent", b->persistent);
            qmp_json_set_string(o, "sha256", qmp_json_string(sha, "sha256"));
            json_object_put(sha);
            json_object_object_add(bms, b->name, o);
        }
        if (d->bitmaps && d->bitmaps->len) {
            json_object_object_add(all, d->id, bms);
        } else {
            json_object_put(bms);
        }
    }
    return all;
}

/* Whether QMP's QEMU has block node NODE (false with ERROR if it failed
 * to answer). */
static bool has_node(QmpClient *qmp, const char *node, GError **error)
{
    json_object *nodes =
        qmp_execute(qmp, "query-named-block-nodes",
                    json_tokener_parse("{\"flat\": true}"), error);
    bool found = false;

    for (size_t i = 0; nodes && i < qmp_json_length(nodes); i++) {
        found |=
            g_strcmp0(qmp_json_string(qmp_json_index(nodes, i), "node-name"),
                      node) == 0;
    }
    json_object_put(nodes);
    return found;
}

static bool set_dirty_bitmaps(QmpClient *qmp, GError **error)
{
    return qmp_run(qmp, "migrate-set-capabilities",
                   json_tokener_parse("{\"capabilities\": [{\"capability\": "
                                      "\"dirty-bitmaps\", \"state\": true}]}"),
                   error);
}

/* The destination node for source disk SD: --map NODE=NODE, else the
 * destination disk with the same id. */
static const char *dest_node(const QmpDisk *sd, GPtrArray *ddisks, char **maps)
{
    for (guint i = 0; maps && maps[i]; i++) {
        const char *eq = strchr(maps[i], '=');

        if (eq && strncmp(maps[i], sd->node, eq - maps[i]) == 0 &&
            sd->node[eq - maps[i]] == '\0') {
            return eq + 1;
        }
    }
    for (guint i = 0; i < ddisks->len; i++) {
        QmpDisk *dd = ddisks->pdata[i];

        if (strcmp(dd->id, sd->id) == 0) {
            return dd->node;
        }
    }
    return NULL;
}

/* block-bitmap-mapping for one side: node (its own name) <-> alias. */
static json_object *mapping(GPtrArray *pairs, int side)
{
    json_object *list = json_object_new_array();

    for (guint i = 0; i < pairs->len; i += 3) {
        const QmpDisk *sd = pairs->pdata[i];
        json_object *m = json_object_new_object();
        json_object *bms = json_object_new_array();
        g_autofree char *alias = g_strdup_printf("qbk%u", i / 3);

        qmp_json_set_string(m, "node-name",
                            side == 0 ? sd->node : (char *)pairs->pdata[i + 1]);
        qmp_json_set_string(m, "alias", alias);
        for (guint k = 0; k < sd->bitmaps->len; k++) {
            QmpBitmap *b = sd->bitmaps->pdata[k];
            json_object *bm = json_object_new_object();

            qmp_json_set_string(bm, "name", b->name);
            qmp_json_set_string(bm, "alias", b->name);
            json_object_array_add(bms, bm);
        }
        json_object_object_add(m, "bitmaps", bms);
        json_object_array_add(list, m);
    }
    return list;
}

static bool set_mapping(QmpClient *qmp, json_object *list, GError **error)
{
    json_object *args = json_object_new_object();

    json_object_object_add(args, "block-bitmap-mapping", list);
    return qmp_run(qmp, "migrate-set-parameters", args, error);
}

/* The traps, before anything is set. */
static bool preflight(QmpClient *src, QmpClient *dst, GPtrArray *sdisks,
                      GError **error)
{
    g_autofree char *st = qmp_query_status(dst, NULL, error);
    json_object *exports, *nodes;
    bool ok = true;

    if (!st) {
        return false;
    }
    if (strcmp(st, "inmigrate") != 0) {
        g_set_error(error, BITMAP_ERROR, BITMAP_ERROR_UNSUPPORTED,
                    "the destination is '%s', not waiting for a migration: "
                    "start it with -incoming defer",
                    st);
        return false;
    }
    exports = qmp_execute(src, "query-block-exports", NULL, error);
    if (!exports) {
        return false;
    }
    if (qmp_json_length(exports) > 0) {
        g_set_error(error, BITMAP_ERROR, BITMAP_ERROR_UNSUPPORTED,
                    "the source has NBD export '%s': a writable export makes "
                    "the migration fail; remove it (block-export-del) first",
                    qmp_json_string(qmp_json_index(exports, 0), "id"));
        ok = false;
    }
    json_object_put(exports);
    nodes = ok ? qmp_execute(src, "query-named-block-nodes",
                             json_tokener_parse("{\"flat\": true}"), error)
               : NULL;
    for (size_t i = 0; nodes && ok && i < qmp_json_length(nodes); i++) {
        const char *n = qmp_json_string(qmp_json_index(nodes, i), "node-name");

        if (n && g_str_has_prefix(n, "qbk-")) {
            g_set_error(error, BITMAP_ERROR, BITMAP_ERROR_UNSUPPORTED,
                        "a qbk backup is at work on the source (node '%s'): "
                        "let it finish first",
                        n);
            ok = false;
        }
    }
    json_object_put(nodes);
    return ok && nodes != NULL;
}

/*
 * Make bitmap NAME of DISK persistent again, keeping its bits and
 * recording state: copy it into a persistent temporary, remove it, add it
 * back persistent, merge the temporary in, remove the temporary. A
 * recording bitmap's writes meanwhile land in the (recording) temporary.
 */
static bool make_persistent(QmpClient *qmp, const QmpDisk *disk,
                            const QmpBitmap *b, GError **error)
{
    g_autoptr(QmpTransaction) t1 = qmp_transaction_new();
    g_autoptr(QmpTransaction) t2 = qmp_transaction_new();
    g_autoptr(QmpTransaction) t3 = qmp_transaction_new();
    g_autofree char *tmp =
        g_strdup_printf(BITMAP_SINCE_PREFIX "fix-%s", b->name);
    json_object *a, *m;

    a = bitmap_ref(disk, tmp);
    qmp_json_set_int(a, "granularity", b->granularity);
    qmp_json_set_bool(a, "disabled", !b->recording);
    qmp_transaction_add(t1, "block-dirty-bitmap-add", a);
    m = bitmap_ref(disk, tmp);
    json_object_object_del(m, "name");
    qmp_json_set_string(m, "target", tmp);
    json_object_object_add(m, "bitmaps", json_object_new_array_ext(1));
    json_object_array_add(json_object_object_get(m, "bitmaps"),
                          json_object_new_string(b->name));
    qmp_transaction_add(t1, "block-dirty-bitmap-merge", m);
    qmp_transaction_add(t2, "block-dirty-bitmap-remove",
                        bitmap_ref(disk, b->name));
    a = bitmap_ref(disk, b->name);
    qmp_json_set_bool(a, "persistent", 1);
    qmp_json_set_int(a, "granularity", b->granularity);
    qmp_json_set_bool(a, "disabled", !b->recording);
    qmp_transaction_add(t3, "block-dirty-bitmap-add", a);
    m = bitmap_ref(disk, b->name);
    json_object_object_del(m, "name");
    qmp_json_set_string(m, "target", b->name);
    json_object_object_add(m, "bitmaps", json_object_new_array_ext(1));
    json_object_array_add(json_object_object_get(m, "bitmaps"),
                          json_object_new_string(tmp));
    qmp_transaction_add(t3, "block-dirty-bitmap-merge", m);
    qmp_transaction_add(t3, "block-dirty-bitmap-remove", bitmap_ref(disk, tmp));
    if (!qmp_transaction_run(qmp, t1, error) ||
        !qmp_transaction_run(qmp, t2, error) ||
        !qmp_transaction_run(qmp, t3, error)) {
        g_prefix_error(error, "making '%s' of disk '%s' persistent: ", b->name,
                       disk->id);
        return false;
    }
    return true;
}

/* Fix the flags of qbk's checkpoints on QMP's side; returns how many. */
static int fix_persistent(QmpClient *qmp, GError **error)
{
    g_autoptr(GPtrArray) disks = qmp_query_disks(qmp, error);
    int fixed = 0;

    if (!disks) {
        return -1;
    }
    for (guint i = 0; i < disks->len; i++) {
        QmpDisk *d = disks->pdata[i];

        for (guint k = 0; d->bitmaps && k < d->bitmaps->len; k++) {
            QmpBitmap *b = d->bitmaps->pdata[k];

            if (!b->persistent &&
                bitmap_parse_name(b->name, NULL, NULL, NULL)) {
                if (!make_persistent(qmp, d, b, error)) {
                    return -1;
                }
                fixed++;
            }
        }
    }
    return fixed;
}

/* Pair each source disk holding bitmaps with its node on the destination:
 * PAIRS gets (QmpDisk *, node name, NULL) triples. */
static bool pair_disks(QmpClient *dst, GPtrArray *sdisks, GPtrArray *ddisks,
                       char **maps, GPtrArray *pairs, GError **error)
{
    for (guint i = 0; i < sdisks->len; i++) {
        QmpDisk *sd = sdisks->pdata[i];
        const char *dn;

        if (!sd->bitmaps || sd->bitmaps->len == 0) {
            continue;
        }
        dn = dest_node(sd, ddisks, maps);
        if (!dn) {
            g_set_error(error, BITMAP_ERROR, BITMAP_ERROR_NOT_FOUND,
                        "disk '%s' (node '%s') has no counterpart on the "
                        "destination: give --map %s=NODE",
                        sd->id, sd->node, sd->node);
            return false;
        }
        if (!has_node(dst, dn, error)) {
            if (error && !*error) {
                g_set_error(error, BITMAP_ERROR, BITMAP_ERROR_NOT_FOUND,
                            "the destination has no node '%s' for disk '%s'",
                            dn, sd->id);
            }
            return false;
        }
        g_ptr_array_add(pairs, sd);
        g_ptr_array_add(pairs, (char *)dn);
        g_ptr_array_add(pairs, NULL);
    }
    return true;
}

/* Capabilities and mappings on both sides, then the migration started. */
static bool start_migration(QmpClient *src, QmpClient *dst, GPtrArray *sdisks,
                            GPtrArray *pairs, const char *uri, GError **error)
{
    json_object *before = snapshot(src, sdisks, error);
    bool readable = before != NULL; /* all the snapshot must show */
    json_object *args;

    json_object_put(before);
    if (!readable || !set_dirty_bitmaps(src, error) ||
        !set_dirty_bitmaps(dst, error) ||
        !set_mapping(src, mapping(pairs, 0), error) ||
        !set_mapping(dst, mapping(pairs, 1), error)) {
        g_prefix_error(error, "preparing the migration: ");
        return false;
    }
    args = json_object_new_object();
    qmp_json_set_string(args, "uri", uri);
    if (!qmp_run(dst, "migrate-incoming", args, error)) {
        g_prefix_error(error, "destination: ");
        return false;
    }
    args = json_object_new_object();
    qmp_json_set_string(args, "uri", uri);
    if (!qmp_run(src, "migrate", args, error)) {
        g_prefix_error(error, "source: ");
        return false;
    }
    return true;
}

/* Poll the source until the migration ends (cancelled past O's timeout);
 * its final status (interned). */
static const char *wait_migration(QmpClient *src, const BitmapMigrateOptions *o,
                                  gint64 t0, GError **error)
{
    guint timeout_s = o->timeout_s ? o->timeout_s : 600;
    gint64 deadline = t0 + (gint64)timeout_s * G_USEC_PER_SEC;

    for (;;) {
        json_object *q = qmp_execute(src, "query-migrate", NULL, error);
        const char *status, *why;

        if (!q) {
            return NULL;
        }
        status = g_intern_string(
            qmp_json_string(q, "status") ? qmp_json_string(q, "status") : "");
        why = qmp_json_string(q, "error-desc");
        if (o->progress) {
            o->progress(q, o->progress_opaque);
        }
        if (strcmp(status, "failed") == 0 || strcmp(status, "cancelled") == 0) {
            g_set_error(error, BITMAP_ERROR, BITMAP_ERROR_UNSUPPORTED,
                        "the migration %s: %s", status,
                        why ? why : "no reason given");
            status = NULL;
        }
        json_object_put(q);
        if (!status || strcmp(status, "completed") == 0) {
            return status;
        }
        if (g_get_monotonic_time() > deadline) {
            qmp_run(src, "migrate_cancel", NULL, NULL);
            g_set_error(error, BITMAP_ERROR, BITMAP_ERROR_UNSUPPORTED,
                        "the migration did not complete in %u s: cancelled",
                        timeout_s);
            return NULL;
        }
        g_usleep(POLL_US);
    }
}

/* One checkpoint's arrival: WANT (the source's) against GOT (or NULL). */
static json_object *check_arrival(const char *disk, const char *name,
                                  json_object *want, json_object *got, int *bad)
{
    json_object *c = json_object_new_object();
    const char *why = NULL;

    if (!got) {
        why = "missing on the destination";
    } else if (g_strcmp0(qmp_json_string(got, "sha256"),
                         qmp_json_string(want, "sha256")) != 0 ||
               qmp_json_uint(got, "count") != qmp_json_uint(want, "count")) {
        why = "content differs";
    } else if (qmp_json_bool(got, "recording") !=
               qmp_json_bool(want, "recording")) {
        why = "recording state differs";
    } else if (!qmp_json_bool(got, "persistent")) {
        why = "not persistent";
    }
    qmp_json_set_string(c, "disk", disk);
    qmp_json_set_string(c, "bitmap", name);
    qmp_json_set_uint(c, "count", qmp_json_uint(want, "count"));
    qmp_json_set_string(c, "sha256", qmp_json_string(want, "sha256"));
    qmp_json_set_bool(c, "ok", !why);
    if (why) {
        qmp_json_set_string(c, "problem", why);
        (*bad)++;
    }
    return c;
}

/* After the migration: the source's checkpoints against what arrived (made
 * persistent first where they arrived otherwise: *FIXED of them). */
static json_object *check_arrivals(QmpClient *src, QmpClient *dst, int *fixed,
                                   int *bad, GError **error)
{
    g_autoptr(GPtrArray) sdisks = qmp_query_disks(src, error);
    g_autoptr(GPtrArray) ddisks = sdisks ? qmp_query_disks(dst, error) : NULL;
    json_object *after = sdisks ? snapshot(src, sdisks, error) : NULL;
    json_object *arrived = NULL, *checks;

    *fixed = ddisks && after ? fix_persistent(dst, error) : -1;
    if (*fixed > 0) {
        g_ptr_array_unref(ddisks);
        ddisks = qmp_query_disks(dst, error);
    }
    arrived = *fixed >= 0 && ddisks ? snapshot(dst, ddisks, error) : NULL;
    if (!arrived) {
        json_object_put(after);
        return NULL;
    }
    checks = json_object_new_array();
    json_object_object_foreach(after, disk, bms)
    {
        json_object *dest = json_object_object_get(arrived, disk);

        json_object_object_foreach(bms, name, want)
        {
            if (bitmap_parse_name(name, NULL, NULL, NULL)) {
                json_object_array_add(
                    checks,
                    check_arrival(
                        disk, name, want,
                        dest ? json_object_object_get(dest, name) : NULL, bad));
            }
        }
    }
    json_object_put(after);
    json_object_put(arrived);
    return checks;
}

json_object *bitmap_migrate(QmpClient *src, QmpClient *dst,
                            const BitmapMigrateOptions *o, GError **error)
{
    g_autoptr(GPtrArray) sdisks = qmp_query_disks(src, error);
    g_autoptr(GPtrArray) ddisks = sdisks ? qmp_query_disks(dst, error) : NULL;
    g_autoptr(GPtrArray) pairs = g_ptr_array_new(); /* sd, node, NULL */
    json_object *result, *checks;
    const char *status;
    gint64 t0 = g_get_monotonic_time();
    int fixed = 0, bad = 0;
    GError *local = NULL;

    if (!ddisks || !preflight(src, dst, sdisks, error) ||
        !pair_disks(dst, sdisks, ddisks, o->maps, pairs, error) ||
        !start_migration(src, dst, sdisks, pairs, o->uri, error)) {
        return NULL;
    }
    status = wait_migration(src, o, t0, &local);
    if (!status) {
        /* The source keeps its checkpoints; put right any flag a failed
         * attempt changed, and say so. */
        int n = fix_persistent(src, NULL);

        g_propagate_prefixed_error(
            error, local, "%s",
            n > 0 ? "source checkpoints re-made persistent; "
                  : "source checkpoints untouched; ");
        return NULL;
    }
    checks = check_arrivals(src, dst, &fixed, &bad, error);
    if (!checks) {
        return NULL;
    }
    if (bad) {
        g_set_error(error, BITMAP_ERROR, BITMAP_ERROR_UNTRUSTED,
                    "%d checkpoint(s) did not arrive intact: run "
                    "'qbk-checkpoint check' on the destination",
                    bad);
        json_object_put(checks);
        return NULL;
    }
    result = json_object_new_object();
    qmp_json_set_string(result, "status", status);
    qmp_json_set_double(result, "seconds", (g_get_monotonic_time() - t0) / 1e6);
    json_object_object_add(result, "checkpoints", checks);
    qmp_json_set_int(result, "made_persistent", fixed);
    qmp_json_set_bool(result, "verified", true);
    return result;
}
