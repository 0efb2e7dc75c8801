/*
 * Fleecing, scheme A (any QEMU >= 4.2): a scratch qcow2 whose backing is
 * the disk, and a sync=none backup job from the disk into it, started in
 * the same transaction as the checkpoint's bitmap actions. From that
 * instant the scratch node reads as the disk did then (the job's filter
 * takes over every user of the disk and copies a cluster there before the
 * guest overwrites it). It is exported read-only with its allocation
 * depth, which also tells what the guest overwrote: depth 1.
 */
#include "internal.h"

static bool a_add(QmpClient *qmp, FleeceDisk *fd, GError **error)
{
    json_object *options = json_object_new_object();

    qmp_json_set_string(options, "backing", fd->node);
    return fleece_add_scratch(qmp, fd, options, error);
}

static void a_add_actions(QmpTransaction *tx, FleeceDisk *fd)
{
    json_object *a = json_object_new_object();

    qmp_json_set_string(a, "job-id", fd->job);
    qmp_json_set_string(a, "device", fd->node);
    qmp_json_set_string(a, "target", fd->scratch);
    qmp_json_set_string(a, "sync", "none");
    qmp_json_set_string(a, "filter-node-name", fd->filter);
    qmp_transaction_add(tx, "blockdev-backup", a);
}

static bool a_export(QmpClient *qmp, FleeceDisk *fd, const char *bitmap,
                     GError **error)
{
    json_object *options = json_object_new_object();

    qmp_json_set_bool(options, "allocation-depth", 1);
    if (bitmap) {
        json_object *list = json_object_new_array();
        json_object *ref = json_object_new_object();

        qmp_json_set_string(ref, "node", fd->node);
        qmp_json_set_string(ref, "name", bitmap);
        json_object_array_add(list, ref);
        json_object_object_add(options, "bitmaps", list);
    }
    if (!fleece_export_node(qmp, fd->export_, fd->scratch, fd->disk, false,
                            options, error)) {
        g_prefix_error(error, "cannot export disk '%s': ", fd->disk);
        return false;
    }
    return true;
}

static const char *a_notice_export(const FleeceDisk *fd)
{
    return fd->disk; /* its own allocation depth */
}

const FleeceScheme fleece_scheme_a = {
    .name = "A",
    .notice_context = "qemu:allocation-depth",
    .releases = false,
    .qcow2_scratch = true,
    .add = a_add,
    .add_actions = a_add_actions,
    .insert = NULL,
    .export = a_export,
    .notice_export = a_notice_export,
};
