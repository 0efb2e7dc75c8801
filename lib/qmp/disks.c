/*
 * Disk discovery: which block devices the VM has, which format node under
 * each one holds its data (and so its checkpoint bitmaps), and what those
 * bitmaps look like right now.
 */
#include <string.h>

#include "qmp.h"

/* Drivers that pass I/O through to one child: look below them. */
static const char *const filter_drivers[] = {
    "throttle",    "copy-on-read", "copy-before-write", "backup-top",
    "preallocate", "compress",     "blklogwrites",      NULL,
};

static bool is_filter(const char *driver)
{
    return driver && g_strv_contains(filter_drivers, driver);
}

static void bitmap_free(QmpBitmap *b)
{
    g_free(b->name);
    g_free(b);
}

void qmp_disk_free(QmpDisk *disk)
{
    if (!disk) {
        return;
    }
    g_free(disk->id);
    g_free(disk->qdev);
    g_free(disk->device);
    g_free(disk->node);
    g_free(disk->driver);
    g_free(disk->filename);
    g_free(disk->no_bitmaps);
    if (disk->bitmaps) {
        g_ptr_array_unref(disk->bitmaps);
    }
    g_free(disk);
}

/* node-name -> BlockDeviceInfo (borrowed from the reply). */
static GHashTable *index_nodes(json_object *nodes)
{
    GHashTable *byname = g_hash_table_new(g_str_hash, g_str_equal);

    for (size_t i = 0; i < qmp_json_length(nodes); i++) {
        json_object *n = qmp_json_index(nodes, i);
        const char *name = qmp_json_string(n, "node-name");

        if (name) {
            g_hash_table_insert(byname, (gpointer)name, n);
        }
    }
    return byname;
}

/*
 * The child that filter node NAME passes I/O to, from QEMU's block graph
 * (fetched once, into *GRAPH). Returns a borrowed name or NULL.
 */
static const char *filter_child(QmpClient *qmp, json_object **graph,
                                const char *name, GError **error)
{
    json_object *nodes, *edges;
    int64_t parent = -1;

    if (!*graph) {
        *graph = qmp_execute(qmp, "x-debug-query-block-graph", NULL, error);
        if (!*graph) {
            return NULL;
        }
    }
    json_object_object_get_ex(*graph, "nodes", &nodes);
    json_object_object_get_ex(*graph, "edges", &edges);
    for (size_t i = 0; i < qmp_json_length(nodes); i++) {
        json_object *n = qmp_json_index(nodes, i);
        const char *nname = qmp_json_string(n, "name");

        if (nname && strcmp(nname, name) == 0) {
            parent = qmp_json_uint(n, "id");
        }
    }
    for (size_t i = 0; i < qmp_json_length(edges); i++) {
        json_object *e = qmp_json_index(edges, i);

        if ((int64_t)qmp_json_uint(e, "parent") != parent ||
            g_strcmp0(qmp_json_string(e, "name"), "file") != 0) {
            continue;
        }
        for (size_t j = 0; j < qmp_json_length(nodes); j++) {
            json_object *n = qmp_json_index(nodes, j);

            if (qmp_json_uint(n, "id") == qmp_json_uint(e, "child")) {
                return qmp_json_string(n, "name");
            }
        }
    }
    g_set_error(error, QMP_ERROR, QMP_ERROR_PROTOCOL,
                "cannot find the node below filter '%s'", name);
    return NULL;
}

static void fill_from_node(QmpDisk *disk, json_object *info)
{
    json_object *image, *bitmaps;

    disk->driver = g_strdup(qmp_json_string(info, "drv"));
    disk->read_only = qmp_json_bool(info, "ro");
    disk->filename = g_strdup(qmp_json_string(info, "file"));
    if (json_object_object_get_ex(info, "image", &image)) {
        disk->size = qmp_json_uint(image, "virtual-size");
    }
    disk->bitmaps = g_ptr_array_new_with_free_func((GDestroyNotify)bitmap_free);
    if (json_object_object_get_ex(info, "dirty-bitmaps", &bitmaps)) {
        for (size_t i = 0; i < qmp_json_length(bitmaps); i++) {
            json_object *jb = qmp_json_index(bitmaps, i);
            QmpBitmap *b;

            if (!qmp_json_string(jb, "name")) {
                disk->nameless_bitmaps++; /* a job's or a filter's */
                continue;
            }
            b = g_new0(QmpBitmap, 1);
            b->name = g_strdup(qmp_json_string(jb, "name"));
            b->count = qmp_json_uint(jb, "count");
            b->granularity = (uint32_t)qmp_json_uint(jb, "granularity");
            b->recording = qmp_json_bool(jb, "recording");
            b->busy = qmp_json_bool(jb, "busy");
            b->persistent = qmp_json_bool(jb, "persistent");
            b->inconsistent = qmp_json_bool(jb, "inconsistent");
            g_ptr_array_add(disk->bitmaps, b);
        }
    }
    if (g_strcmp0(disk->driver, "qcow2") != 0) {
        disk->no_bitmaps =
            g_strdup_printf("%s image: only qcow2 can hold persistent bitmaps",
                            disk->driver ? disk->driver : "unknown");
    } else if (disk->read_only) {
        disk->no_bitmaps = g_strdup("read-only image");
    }
}

/*
 * Where to set a device's "drive": the qdev path, less a trailing
 * "/virtio-backend" (QEMU 7.2 aborts when it is set on the backend; the
 * virtio proxy forwards it). NULL without a device.
 */
static char *qom_path(const char *qdev)
{
    if (!qdev || !*qdev) {
        return NULL;
    }
    if (g_str_has_suffix(qdev, "/virtio-backend")) {
        return g_strndup(qdev, strlen(qdev) - strlen("/virtio-backend"));
    }
    return g_strdup(qdev);
}

/* The qdev id in "/machine/peripheral/ID/virtio-backend", or NULL. */
static char *qdev_id(const char *qdev)
{
    const char *prefix = "/machine/peripheral/";
    const char *end;

    if (!qdev || !*qdev) {
        return NULL;
    }
    if (!strchr(qdev, '/')) {
        return g_strdup(qdev);
    }
    if (!g_str_has_prefix(qdev, prefix)) {
        return NULL;
    }
    qdev += strlen(prefix);
    end = strchr(qdev, '/');
    return end ? g_strndup(qdev, end - qdev) : g_strdup(qdev);
}

GPtrArray *qmp_query_disks(QmpClient *qmp, GError **error)
{
    g_autoptr(GPtrArray) disks =
        g_ptr_array_new_with_free_func((GDestroyNotify)qmp_disk_free);
    g_autoptr(GHashTable) byname = NULL;
    json_object *block, *nodes, *graph = NULL;
    bool ok = true;

    block = qmp_execute(qmp, "query-block", NULL, error);
    if (!block) {
        return NULL;
    }
    nodes = qmp_execute(qmp, "query-named-block-nodes",
                        json_tokener_parse("{\"flat\": true}"), error);
    if (!nodes) {
        json_object_put(block);
        return NULL;
    }
    byname = index_nodes(nodes);

    for (size_t i = 0; ok && i < qmp_json_length(block); i++) {
        json_object *bi = qmp_json_index(block, i);
        json_object *inserted, *info;
        const char *node;
        g_autoptr(QmpDisk) disk = NULL;

        if (qmp_json_bool(bi, "removable") ||
            !json_object_object_get_ex(bi, "inserted", &inserted)) {
            continue; /* CD-ROM, floppy or empty drive */
        }
        node = qmp_json_string(inserted, "node-name");
        info = node ? g_hash_table_lookup(byname, node) : NULL;
        for (int depth = 0; info && is_filter(qmp_json_string(info, "drv"));
             depth++) {
            node = depth < 16 ? filter_child(qmp, &graph, node, error) : NULL;
            if (!node) {
                ok = false;
                break;
            }
            info = g_hash_table_lookup(byname, node);
        }
        if (!ok) {
            break;
        }
        if (!info) {
            continue;
        }
        disk = g_new0(QmpDisk, 1);
        disk->qdev = g_strdup(qmp_json_string(bi, "qdev"));
        disk->device = g_strdup(
            qmp_json_string(bi, "device") ? qmp_json_string(bi, "device") : "");
        disk->node = g_strdup(node);
        disk->id = qdev_id(disk->qdev);
        if (!disk->id) {
            disk->id = g_strdup(*disk->device ? disk->device : node);
        }
        fill_from_node(disk, info);
        g_ptr_array_add(disks, g_steal_pointer(&disk));
    }
    json_object_put(graph);
    json_object_put(block);
    json_object_put(nodes);
    return ok ? g_steal_pointer(&disks) : NULL;
}

GPtrArray *qmp_query_node_disks(QmpClient *qmp, const char *const *nodes_in,
                                const char *const *ids, GError **error)
{
    g_autoptr(GPtrArray) disks =
        g_ptr_array_new_with_free_func((GDestroyNotify)qmp_disk_free);
    g_autoptr(GHashTable) byname = NULL;
    json_object *nodes;

    nodes = qmp_execute(qmp, "query-named-block-nodes",
                        json_tokener_parse("{\"flat\": true}"), error);
    if (!nodes) {
        return NULL;
    }
    byname = index_nodes(nodes);
    for (size_t i = 0; nodes_in[i]; i++) {
        json_object *info = g_hash_table_lookup(byname, nodes_in[i]);
        QmpDisk *disk;

        if (!info) {
            g_set_error(error, QMP_ERROR, QMP_ERROR_PROTOCOL,
                        "QEMU has no block node '%s'", nodes_in[i]);
            json_object_put(nodes);
            return NULL;
        }
        disk = g_new0(QmpDisk, 1);
        disk->id = g_strdup(ids[i]);
        disk->device = g_strdup("");
        disk->node = g_strdup(nodes_in[i]);
        fill_from_node(disk, info);
        g_ptr_array_add(disks, disk);
    }
    json_object_put(nodes);
    return g_steal_pointer(&disks);
}

QmpDisk *qmp_disk_find(GPtrArray *disks, const char *name)
{
    for (guint i = 0; i < disks->len; i++) {
        QmpDisk *d = disks->pdata[i];

        if (g_strcmp0(d->id, name) == 0 || g_strcmp0(d->qdev, name) == 0 ||
            (*d->device && g_strcmp0(d->device, name) == 0) ||
            g_strcmp0(d->node, name) == 0) {
            return d;
        }
    }
    return NULL;
}

const QmpBitmap *qmp_disk_bitmap(const QmpDisk *disk, const char *name)
{
    for (guint i = 0; i < disk->bitmaps->len; i++) {
        const QmpBitmap *b = disk->bitmaps->pdata[i];

        if (strcmp(b->name, name) == 0) {
            return b;
        }
    }
    return NULL;
}

/* ---- where a filter goes (fleecing scheme B) ---- */

void qmp_insert_point_clear(QmpInsertPoint *pt)
{
    g_clear_pointer(&pt->qom, g_free);
    g_clear_pointer(&pt->file, g_free);
    if (pt->reopen) {
        json_object_put(pt->reopen);
        pt->reopen = NULL;
    }
}

/* The graph's id of node NAME, or -1. */
static int64_t graph_id(json_object *graph, const char *name)
{
    json_object *nodes;

    json_object_object_get_ex(graph, "nodes", &nodes);
    for (size_t i = 0; i < qmp_json_length(nodes); i++) {
        json_object *n = qmp_json_index(nodes, i);

        if (g_strcmp0(qmp_json_string(n, "type"), "block-driver") == 0 &&
            g_strcmp0(qmp_json_string(n, "name"), name) == 0) {
            return (int64_t)qmp_json_uint(n, "id");
        }
    }
    return -1;
}

static json_object *graph_node(json_object *graph, uint64_t id)
{
    json_object *nodes;

    json_object_object_get_ex(graph, "nodes", &nodes);
    for (size_t i = 0; i < qmp_json_length(nodes); i++) {
        json_object *n = qmp_json_index(nodes, i);

        if (qmp_json_uint(n, "id") == id) {
            return n;
        }
    }
    return NULL;
}

/* A pass-through filter's options for blockdev-reopen, less "file"; only
 * drivers whose options we can recover (throttle keeps its group in the
 * json: name QEMU reports). */
static json_object *reopen_options(json_object *info, GError **error)
{
    const char *drv = qmp_json_string(info, "drv");
    const char *name = qmp_json_string(info, "node-name");
    json_object *o = json_object_new_object();

    qmp_json_set_string(o, "driver", drv);
    qmp_json_set_string(o, "node-name", name);
    if (g_strcmp0(drv, "throttle") == 0) {
        const char *file = qmp_json_string(info, "file");
        json_object *spec = file && g_str_has_prefix(file, "json:")
                                ? json_tokener_parse(file + 5)
                                : NULL;
        const char *group =
            spec ? qmp_json_string(spec, "throttle-group") : NULL;

        if (group) {
            qmp_json_set_string(o, "throttle-group", group);
        }
        json_object_put(spec);
        if (group) {
            return o;
        }
    } else if (g_strcmp0(drv, "copy-on-read") == 0) {
        return o;
    }
    json_object_put(o);
    g_set_error(error, QMP_ERROR, QMP_ERROR_PROTOCOL,
                "cannot reopen filter '%s' (%s) to put a node under it", name,
                drv);
    return NULL;
}

struct QmpBlockGraph {
    json_object *graph; /* x-debug-query-block-graph */
    json_object *nodes; /* query-named-block-nodes, flat */
    json_object *block; /* query-block */
    GHashTable *byname; /* node-name -> its entry in nodes */
};

QmpBlockGraph *qmp_block_graph_get(QmpClient *qmp, GError **error)
{
    QmpBlockGraph *g = g_new0(QmpBlockGraph, 1);

    g->graph = qmp_execute(qmp, "x-debug-query-block-graph", NULL, error);
    g->nodes = g->graph
                   ? qmp_execute(qmp, "query-named-block-nodes",
                                 json_tokener_parse("{\"flat\": true}"), error)
                   : NULL;
    g->block = g->nodes ? qmp_execute(qmp, "query-block", NULL, error) : NULL;
    if (!g->block) {
        qmp_block_graph_free(g);
        return NULL;
    }
    g->byname = index_nodes(g->nodes);
    return g;
}

void qmp_block_graph_free(QmpBlockGraph *g)
{
    if (!g) {
        return;
    }
    if (g->byname) {
        g_hash_table_unref(g->byname);
    }
    json_object_put(g->block);
    json_object_put(g->nodes);
    json_object_put(g->graph);
    g_free(g);
}

/* PT->qom: the device whose block backend shows NODE (a device's root
 * edge; not an export's or a job's). */
static bool device_of(const QmpBlockGraph *g, const char *node,
                      QmpInsertPoint *pt, GError **error)
{
    for (size_t b = 0; b < qmp_json_length(g->block); b++) {
        json_object *bi = qmp_json_index(g->block, b);
        json_object *ins;

        if (json_object_object_get_ex(bi, "inserted", &ins) &&
            g_strcmp0(qmp_json_string(ins, "node-name"), node) == 0) {
            pt->qom = qom_path(qmp_json_string(bi, "qdev"));
        }
    }
    if (!pt->qom) {
        g_set_error(error, QMP_ERROR, QMP_ERROR_PROTOCOL,
                    "node '%s' is used by an export or a job, not only by a "
                    "device",
                    node);
        return false;
    }
    return true;
}

bool qmp_insert_point(const QmpBlockGraph *g, const char *node,
                      QmpInsertPoint *pt, GError **error)
{
    json_object *graph = g->graph, *edges;
    int64_t id;
    guint users = 0;
    bool ok = false;

    memset(pt, 0, sizeof(*pt));
    id = graph_id(graph, node);
    if (id < 0) {
        g_set_error(error, QMP_ERROR, QMP_ERROR_PROTOCOL,
                    "QEMU has no block node '%s'", node);
        return false;
    }
    json_object_object_get_ex(graph, "edges", &edges);
    ok = true;
    for (size_t i = 0; ok && i < qmp_json_length(edges); i++) {
        json_object *e = qmp_json_index(edges, i);
        json_object *parent = graph_node(graph, qmp_json_uint(e, "parent"));
        const char *type = qmp_json_string(parent, "type");
        const char *pname = qmp_json_string(parent, "name");
        const char *edge = qmp_json_string(e, "name");
        json_object *pnode = g_hash_table_lookup(g->byname, pname ? pname : "");

        if ((int64_t)qmp_json_uint(e, "parent") == id &&
            g_strcmp0(edge, "file") == 0) {
            json_object *child = graph_node(graph, qmp_json_uint(e, "child"));

            pt->file = g_strdup(qmp_json_string(child, "name"));
        }
        if ((int64_t)qmp_json_uint(e, "child") != id ||
            (pname && g_str_has_prefix(pname, "qbk-a"))) {
            continue; /* not a user (our snapshot-access reads the filter) */
        }
        /* Every user is looked at, so that one that cannot be moved is
         * named; of several, only the count is kept (refused below). */
        users++;
        g_clear_pointer(&pt->reopen, json_object_put);
        g_clear_pointer(&pt->qom, g_free);
        if (g_strcmp0(type, "block-driver") == 0 &&
            g_strcmp0(edge, "file") == 0 &&
            is_filter(qmp_json_string(pnode, "drv"))) {
            pt->reopen = reopen_options(pnode, error);
            ok = pt->reopen != NULL;
        } else if (g_strcmp0(type, "block-backend") == 0 &&
                   g_strcmp0(edge, "root") == 0) {
            ok = device_of(g, node, pt, error);
        } else {
            g_set_error(error, QMP_ERROR, QMP_ERROR_PROTOCOL,
                        "node '%s' is used by '%s' as '%s'", node,
                        pname && *pname ? pname : type, edge);
            ok = false;
        }
    }
    if (ok && users > 1) {
        g_set_error(error, QMP_ERROR, QMP_ERROR_PROTOCOL,
                    "node '%s' has %u users: a filter under one of them "
                    "would miss the others' writes",
                    node, users);
        ok = false;
    }
    if (!ok) {
        qmp_insert_point_clear(pt);
    }
    return ok;
}

const char *qmp_disk_role(const QmpDisk *disk)
{
    /* the machine's flash devices, /machine/system.flashN */
    if (disk->qdev && g_str_has_prefix(disk->qdev, "/machine/system.flash")) {
        return disk->read_only ? "firmware" : "firmware-vars";
    }
    return "disk";
}
