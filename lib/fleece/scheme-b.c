/*
 * Fleecing, scheme B (QEMU >= 7.1): a copy-before-write filter right
 * above the disk's format node, under its one user, copying old data into
 * a scratch image before the guest overwrites it, and a
 * snapshot-access node that reads the point in time. The view is exported
 * writable only so that trims reach snapshot-access (it refuses writes):
 * a trim releases a region, which frees it in the scratch image and ends
 * copy-before-write there. The scratch node is exported read-only as well:
 * its allocation map is what the guest overwrote.
 *
 * The filter keeps its own map of what it copied, so the scratch needs no
 * backing and no format: by default a sparse raw file (its file node), so
 * that a copy-before-write is one write to the page cache, with no qcow2
 * cluster to allocate, no refcount and L2 update, no flush between them;
 * a release punches a hole (bench/cow and DESIGN.md have the numbers).
 */
#include "internal.h"

/* A guest write waits at most this long for its copy-before-write; past
 * it the snapshot breaks (the backup fails and is rolled back), the guest
 * never sees an error. Before QEMU 9.1 the timeout is kept in 32-bit
 * nanoseconds: 4 s is the largest whole number of seconds that survives
 * (60 became 4.17). */
#define CBW_TIMEOUT_S 4

static bool b_add(QmpClient *qmp, FleeceDisk *fd, GError **error)
{
    json_object *options = json_object_new_object();
    json_object *args;

    /* released clusters go back to the file system */
    qmp_json_set_string(options, "discard", "unmap");
    if (!fleece_add_scratch(qmp, fd, options, error)) {
        return false;
    }
    args = json_object_new_object();
    qmp_json_set_string(args, "driver", "copy-before-write");
    qmp_json_set_string(args, "node-name", fd->cbw);
    qmp_json_set_string(args, "file", fd->node);
    qmp_json_set_string(args, "target", fd->scratch);
    /* A slow or failing copy breaks the snapshot (our reads fail), never
     * the guest's write. */
    qmp_json_set_string(args, "on-cbw-error", "break-snapshot");
    qmp_json_set_int(args, "cbw-timeout", CBW_TIMEOUT_S);
    if (!qmp_run(qmp, "blockdev-add", args, error)) {
        g_prefix_error(error,
                       "cannot add the copy-before-write filter of "
                       "disk '%s': ",
                       fd->disk);
        return false;
    }
    return true;
}

static bool b_insert(QmpClient *qmp, FleeceDisk *fd, GError **error)
{
    json_object *args;

    if (!fleece_set_user_child(qmp, &fd->point, fd->cbw, error)) {
        g_prefix_error(error,
                       "cannot put the filter above disk '%s': ", fd->disk);
        return false;
    }
    args = json_object_new_object();
    qmp_json_set_string(args, "driver", "snapshot-access");
    qmp_json_set_string(args, "node-name", fd->access);
    qmp_json_set_string(args, "file", fd->cbw);
    qmp_json_set_string(args, "discard", "unmap");
    if (!qmp_run(qmp, "blockdev-add", args, error)) {
        g_prefix_error(error,
                       "cannot add the snapshot of disk '%s': ", fd->disk);
        return false;
    }
    return true;
}

static bool b_export(QmpClient *qmp, FleeceDisk *fd, const char *bitmap,
                     GError **error)
{
    json_object *options = NULL;

    if (bitmap) {
        json_object *list = json_object_new_array();
        json_object *ref = json_object_new_object();

        options = json_object_new_object();
        qmp_json_set_string(ref, "node", fd->node);
        qmp_json_set_string(ref, "name", bitmap);
        json_object_array_add(list, ref);
        json_object_object_add(options, "bitmaps", list);
    }
    if (!fleece_export_node(qmp, fd->export_, fd->access, fd->disk, true,
                            options, error)) {
        g_prefix_error(error, "cannot export disk '%s': ", fd->disk);
        return false;
    }
    if (!fleece_export_node(qmp, fd->notice_export, fd->scratch,
                            fd->notice_export, false, NULL, error)) {
        g_prefix_error(
            error, "cannot export the scratch image of disk '%s': ", fd->disk);
        return false;
    }
    options = json_object_new_object();
    qmp_json_set_bool(options, "allocation-depth", 1);
    if (!fleece_export_node(qmp, fd->chain_export, fd->node, fd->chain_export,
                            false, options, error)) {
        g_prefix_error(error,
                       "cannot export the node of disk '%s': ", fd->disk);
        return false;
    }
    return true;
}

static const char *b_notice_export(const FleeceDisk *fd)
{
    return fd->notice_export; /* the scratch node's allocation */
}

/*
 * The snapshot's map comes from the disk's top image only (the filter asks
 * its node, not the chain below): where that image has nothing, it says
 * "hole" but not "zero", and the copier would read the whole chain's holes.
 * The images below the top never change while the VM runs, so the live
 * node's allocation depth, asked after the snapshot's map, tells where the
 * whole chain has nothing: zeros at the point in time too (copier, select.c).
 */
static const char *b_chain_export(const FleeceDisk *fd)
{
    return fd->chain_export;
}

const FleeceScheme fleece_scheme_b = {
    .name = "B",
    .notice_context = "base:allocation",
    .releases = true,
    .cbw_timeout_s = CBW_TIMEOUT_S,
    .add = b_add,
    .add_actions = NULL,
    .insert = b_insert,
    .export = b_export,
    .notice_export = b_notice_export,
    .chain_export = b_chain_export,
};

bool fleece_b_possible(const QmpBlockGraph *graph, FleeceDisk *fd, char **why)
{
    g_autoptr(GError) err = NULL;

    if (!qmp_insert_point(graph, fd->node, &fd->point, &err)) {
        *why = g_strdup_printf("disk '%s': %s", fd->disk, err->message);
        return false;
    }
    if (!fd->point.reopen && !fd->point.qom) {
        *why = g_strdup_printf("disk '%s' has no user", fd->disk);
        return false;
    }
    return true;
}
