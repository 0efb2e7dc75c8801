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

    json_object_object_add(args, "node", json_object_new_string(node));
    json_object_object_add(args, "name", json_object_new_string(name));
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
            json_object_object_add(o, "count",
                                   json_object_new_uint64(b->count));
            json_object_object_add(o, "recording",
                                   json_object_new_boolean(b->recording));
            json_object_object_add(o, "persistent",
                                   json_object_new_boolean(b->persistent));
            json_object_object_add(
                o, "sha256",
                json_object_new_string(qmp_json_string(sha, "sha256")));
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

        json_object_object_add(
            m, "node-name",
            json_object_new_string(side == 0 ? sd->node
                                             : (char *)pairs->pdata[i + 1]));
        json_object_object_add(m, "alias", json_object_new_string(alias));
        for (guint k = 0; k < sd->bitmaps->len; k++) {
            QmpBitmap *b = sd->bitmaps->pdata[k];
            json_object *bm = json_object_new_object();

            json_object_object_add(bm, "name", json_object_new_string(b->name));
            json_object_object_add(bm, "alias",
                                   json_object_new_string(b->name));
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
    json_object_object_add(a, "granularity",
                           json_object_new_int64(b->granularity));
    json_object_object_add(a, "disabled",
                           json_object_new_boolean(!b->recording));
    qmp_transaction_add(t1, "block-dirty-bitmap-add", a);
    m = bitmap_ref(disk, tmp);
    json_object_object_del(m, "name");
    json_object_object_add(m, "target", json_object_new_string(tmp));
    json_object_object_add(m, "bitmaps", json_object_new_array_ext(1));
    json_object_array_add(json_object_object_get(m, "bitmaps"),
                          json_object_new_string(b->name));
    qmp_transaction_add(t1, "block-dirty-bitmap-merge", m);
    qmp_transaction_add(t2, "block-dirty-bitmap-remove",
                        bitmap_ref(disk, b->name));
    a = bitmap_ref(disk, b->name);
    json_object_object_add(a, "persistent", json_object_new_boolean(1));
    json_object_object_add(a, "granularity",
                           json_object_new_int64(b->granularity));
    json_object_object_add(a, "disabled",
                           json_object_new_boolean(!b->recording));
    qmp_transaction_add(t3, "block-dirty-bitmap-add", a);
    m = bitmap_ref(disk, b->name);
    json_object_object_del(m, "name");
    json_object_object_add(m, "target", json_object_new_string(b->name));
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

json_object *bitmap_migrate(QmpClient *src, QmpClient *dst,
                            const BitmapMigrateOptions *o, GError **error)
{
    g_autoptr(GPtrArray) sdisks = qmp_query_disks(src, error);
    g_autoptr(GPtrArray) ddisks = sdisks ? qmp_query_disks(dst, error) : NULL;
    g_autoptr(GPtrArray) pairs = g_ptr_array_new(); /* sd, node, NULL */
    json_object *before = NULL, *after = NULL, *arrived = NULL;
    json_object *result, *args, *checks;
    const char *status = "";
    gint64 t0 = g_get_monotonic_time(), deadline;
    int fixed = 0, bad = 0;
    GError *local = NULL;

    if (!ddisks || !preflight(src, dst, sdisks, error)) {
        return NULL;
    }
    for (guint i = 0; i < sdisks->len; i++) {
        QmpDisk *sd = sdisks->pdata[i];
        const char *dn;

        if (!sd->bitmaps || sd->bitmaps->len == 0) {
            continue;
        }
        dn = dest_node(sd, ddisks, o->maps);
        if (!dn) {
            g_set_error(error, BITMAP_ERROR, BITMAP_ERROR_NOT_FOUND,
                        "disk '%s' (node '%s') has no counterpart on the "
                        "destination: give --map %s=NODE",
                        sd->id, sd->node, sd->node);
            return NULL;
        }
        if (!has_node(dst, dn, error)) {
            if (error && !*error) {
                g_set_error(error, BITMAP_ERROR, BITMAP_ERROR_NOT_FOUND,
                            "the destination has no node '%s' for disk '%s'",
                            dn, sd->id);
            }
            return NULL;
        }
        g_ptr_array_add(pairs, sd);
        g_ptr_array_add(pairs, (char *)dn);
        g_ptr_array_add(pairs, NULL);
    }
    before = snapshot(src, sdisks, error);
    if (!before || !set_dirty_bitmaps(src, error) ||
        !set_dirty_bitmaps(dst, error) ||
        !set_mapping(src, mapping(pairs, 0), error) ||
        !set_mapping(dst, mapping(pairs, 1), error)) {
        g_prefix_error(error, "preparing the migration: ");
        json_object_put(before);
        return NULL;
    }
    args = json_object_new_object();
    json_object_object_add(args, "uri", json_object_new_string(o->uri));
    if (!qmp_run(dst, "migrate-incoming", args, error)) {
        g_prefix_error(error, "destination: ");
        json_object_put(before);
        return NULL;
    }
    args = json_object_new_object();
    json_object_object_add(args, "uri", json_object_new_string(o->uri));
    if (!qmp_run(src, "migrate", args, error)) {
        g_prefix_error(error, "source: ");
        json_object_put(before);
        return NULL;
    }
    deadline = t0 + (gint64)(o->timeout_s ? o->timeout_s : 600) * 1000000;
    for (;;) {
        json_object *q = qmp_execute(src, "query-migrate", NULL, &local);

        if (!q) {
            break;
        }
        status = g_intern_string(
            qmp_json_string(q, "status") ? qmp_json_string(q, "status") : "");
        if (o->progress) {
            o->progress(q, o->progress_opaque);
        }
        if (strcmp(status, "completed") == 0 || strcmp(status, "failed") == 0 ||
            strcmp(status, "cancelled") == 0) {
            if (strcmp(status, "completed") != 0) {
                g_set_error(&local, BITMAP_ERROR, BITMAP_ERROR_UNSUPPORTED,
                            "the migration %s: %s", status,
                            qmp_json_string(q, "error-desc")
                                ? qmp_json_string(q, "error-desc")
                                : "no reason given");
            }
            json_object_put(q);
            break;
        }
        json_object_put(q);
        if (g_get_monotonic_time() > deadline) {
            qmp_run(src, "migrate_cancel", NULL, NULL);
            g_set_error(&local, BITMAP_ERROR, BITMAP_ERROR_UNSUPPORTED,
                        "the migration did not complete in %u s: cancelled",
                        o->timeout_s ? o->timeout_s : 600);
            break;
        }
        g_usleep(POLL_US);
    }
    if (local) {
        /* The source keeps its checkpoints; put right any flag a failed
         * attempt changed, and say so. */
        int n = fix_persistent(src, NULL);

        g_propagate_prefixed_error(
            error, local, "%s",
            n > 0 ? "source checkpoints re-made persistent; "
                  : "source checkpoints untouched; ");
        json_object_put(before);
        return NULL;
    }

    /* the source's final state against what arrived */
    g_ptr_array_unref(sdisks);
    g_ptr_array_unref(ddisks);
    sdisks = qmp_query_disks(src, error);
    ddisks = sdisks ? qmp_query_disks(dst, error) : NULL;
    after = sdisks ? snapshot(src, sdisks, error) : NULL;
    fixed = ddisks ? fix_persistent(dst, error) : -1;
    if (fixed > 0) {
        g_ptr_array_unref(ddisks);
        ddisks = qmp_query_disks(dst, error);
    }
    arrived = fixed >= 0 && ddisks ? snapshot(dst, ddisks, error) : NULL;
    if (!arrived) {
        json_object_put(before);
        json_object_put(after);
        return NULL;
    }
    checks = json_object_new_array();
    json_object_object_foreach(after, disk, bms)
    {
        json_object *dest = json_object_object_get(arrived, disk);

        json_object_object_foreach(bms, name, want)
        {
            json_object *got = dest ? json_object_object_get(dest, name) : NULL;
            json_object *c = json_object_new_object();
            const char *why = NULL;

            if (!bitmap_parse_name(name, NULL, NULL, NULL)) {
                json_object_put(c);
                continue; /* not a checkpoint */
            }
            if (!got) {
                why = "missing on the destination";
            } else if (g_strcmp0(qmp_json_string(got, "sha256"),
                                 qmp_json_string(want, "sha256")) != 0 ||
                       qmp_json_uint(got, "count") !=
                           qmp_json_uint(want, "count")) {
                why = "content differs";
            } else if (qmp_json_bool(got, "recording") !=
                       qmp_json_bool(want, "recording")) {
                why = "recording state differs";
            } else if (!qmp_json_bool(got, "persistent")) {
                why = "not persistent";
            }
            json_object_object_add(c, "disk", json_object_new_string(disk));
            json_object_object_add(c, "bitmap", json_object_new_string(name));
            json_object_object_add(
                c, "count",
                json_object_new_uint64(qmp_json_uint(want, "count")));
            json_object_object_add(
                c, "sha256",
                json_object_new_string(qmp_json_string(want, "sha256")));
            json_object_object_add(c, "ok", json_object_new_boolean(!why));
            if (why) {
                json_object_object_add(c, "problem",
                                       json_object_new_string(why));
                bad++;
            }
            json_object_array_add(checks, c);
        }
    }
    result = json_object_new_object();
    json_object_object_add(result, "status", json_object_new_string(status));
    json_object_object_add(
        result, "seconds",
        json_object_new_double((g_get_monotonic_time() - t0) / 1e6));
    json_object_object_add(result, "checkpoints", checks);
    json_object_object_add(result, "made_persistent",
                           json_object_new_int(fixed));
    json_object_object_add(result, "verified",
                           json_object_new_boolean(bad == 0));
    json_object_put(before);
    json_object_put(after);
    json_object_put(arrived);
    if (bad) {
        g_set_error(error, BITMAP_ERROR, BITMAP_ERROR_UNTRUSTED,
                    "%d checkpoint(s) did not arrive intact: run "
                    "'qbk-checkpoint check' on the destination",
                    bad);
        json_object_put(result);
        return NULL;
    }
    return result;
}
