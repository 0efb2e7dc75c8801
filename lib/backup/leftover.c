/*
 * What a backup leaves in the VM while it runs, and how to undo it after
 * its qbk-pull was killed, from the VM alone.
 *
 * Besides its nodes, exports and jobs (named qbk-<kind><index>-<tag>, see
 * fleece.c) and its temporary bitmaps (qbk-since-<tag>-<n>), a backup puts
 * marks in QEMU: QOM objects of type "secret" named
 * qbk-<mark><pid>-<tag>, where PID is the qbk-pull at work:
 *
 *   m  the backup is at work: its checkpoint is not committed yet
 *   p  qbk paused the VM to fleece, and must resume it
 *   n  qbk started QEMU's NBD server, and must stop it
 *   f  qbk froze the guest's file systems through the guest agent whose
 *      address the mark holds, and must thaw them
 *   s  qbk made a guest poweroff pause the VM, and must put back the
 *      shutdown action the mark holds
 *   a  (an authz-simple object, not a secret) who may connect to the NBD
 *      server qbk started on an inet address with TLS
 *   k  the random passphrase of an encrypted repository's backup's
 *      scratch images (LUKS), which QEMU reads
 *
 * A mark lives and dies with the QEMU process, as the state it describes
 * does: a VM restarted (or paused again by its administrator) carries no
 * mark of ours, so it is never resumed by mistake. And with the pid, a
 * later command can tell a backup at work from the remains of a killed one.
 */
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "bitmap.h"
#include "internal.h"

#define SINCE_PREFIX "qbk-since-"

char *mark_id(BackupMark mark, GPid pid, const char *tag)
{
    return g_strdup_printf("qbk-%c%d-%s", (char)mark, (int)pid, tag);
}

bool mark_add(QmpClient *qmp, BackupMark mark, const char *tag,
              const char *data, GError **error)
{
    g_autofree char *id = mark_id(mark, getpid(), tag);
    json_object *args = json_object_new_object();

    qmp_json_set_string(args, "qom-type", "secret");
    qmp_json_set_string(args, "id", id);
    /* a secret must hold something */
    qmp_json_set_string(args, "data", data ? data : "qbk");
    if (!qmp_run(qmp, "object-add", args, error)) {
        g_prefix_error(error, "cannot mark the VM: ");
        return false;
    }
    return true;
}

static bool object_del(QmpClient *qmp, const char *id, GError **error)
{
    json_object *args = json_object_new_object();

    qmp_json_set_string(args, "id", id);
    return qmp_run(qmp, "object-del", args, error);
}

bool mark_del(QmpClient *qmp, BackupMark mark, const char *tag, GError **error)
{
    g_autofree char *id = mark_id(mark, getpid(), tag);

    return object_del(qmp, id, error);
}

/* ---- finding leftovers ---- */

void backup_leftover_free(BackupLeftover *l)
{
    if (!l) {
        return;
    }
    g_free(l->tag);
    g_free(l->agent);
    g_free(l->shutdown_action);
    g_ptr_array_unref(l->objects);
    g_ptr_array_unref(l->marks);
    g_ptr_array_unref(l->bitmaps);
    g_free(l);
}

static BackupLeftover *leftover_of(GHashTable *by_tag, const char *tag)
{
    BackupLeftover *l = g_hash_table_lookup(by_tag, tag);

    if (!l) {
        l = g_new0(BackupLeftover, 1);
        l->tag = g_strdup(tag);
        l->objects = g_ptr_array_new_with_free_func(g_free);
        l->marks = g_ptr_array_new_with_free_func(g_free);
        l->bitmaps = g_ptr_array_new_with_free_func(g_free);
        g_hash_table_insert(by_tag, l->tag, l);
    }
    return l;
}

/* Whether qbk-pull PID runs on this host. Unknown counts as running: a
 * backup at work must never be undone under its feet. */
static bool pull_alive(GPid pid)
{
    g_autofree char *path = g_strdup_printf("/proc/%d/comm", (int)pid);
    g_autofree char *comm = NULL;

    if (kill(pid, 0) < 0 && errno == ESRCH) {
        return false;
    }
    if (!g_file_get_contents(path, &comm, NULL, NULL)) {
        return true;
    }
    return g_str_has_prefix(comm, "qbk-pull");
}

/* What mark ID holds (a secret's data). */
static char *mark_data(QmpClient *qmp, const char *id)
{
    g_autofree char *path = g_strdup_printf("/objects/%s", id);

    return qmp_qom_get_string(qmp, path, "data");
}

/* The marks: qbk-<MARK_LETTERS><pid>-<tag> among the VM's objects. */
static bool find_marks(QmpClient *qmp, GHashTable *by_tag, GError **error)
{
    json_object *list = qmp_list_objects(qmp, error);

    if (!list) {
        return false;
    }
    for (size_t i = 0; json_object_is_type(list, json_type_array) &&
                       i < qmp_json_length(list);
         i++) {
        const char *name = qmp_json_string(qmp_json_index(list, i), "name");
        char mark;
        int pid, end = 0;
        BackupLeftover *l;

        if (!name || sscanf(name, "qbk-%c%d-%n", &mark, &pid, &end) != 2 ||
            end == 0 || !strchr(MARK_LETTERS, mark) || pid <= 0 || !name[end]) {
            continue;
        }
        l = leftover_of(by_tag, name + end);
        l->pid = pid;
        l->at_work |= mark == MARK_AT_WORK;
        l->paused |= mark == MARK_PAUSED;
        l->server |= mark == MARK_SERVER;
        if (mark == MARK_FROZEN && !l->agent) {
            l->agent = mark_data(qmp, name);
        }
        if (mark == MARK_SHUTDOWN && !l->shutdown_action) {
            l->shutdown_action = mark_data(qmp, name);
        }
        g_ptr_array_add(l->marks, g_strdup(name));
    }
    json_object_put(list);
    return true;
}

/* Nodes, exports and jobs named qbk-<kind><index>-<tag>. */
static bool find_objects(QmpClient *qmp, GHashTable *by_tag, GError **error)
{
    g_autoptr(GPtrArray) names = fleece_present_names(qmp, error);

    if (!names) {
        return false;
    }
    for (guint i = 0; i < names->len; i++) {
        const char *name = names->pdata[i];
        char kind;
        guint index;
        int end = 0;

        if (sscanf(name, "qbk-%c%u-%n", &kind, &index, &end) == 2 && end &&
            name[end] && strchr(FLEECE_KINDS, kind)) {
            g_ptr_array_add(leftover_of(by_tag, name + end)->objects,
                            g_strdup(name));
        }
    }
    return true;
}

/* Temporary bitmaps qbk-since-<tag>-<n> on the disks. */
static void find_bitmaps(GPtrArray *disks, GHashTable *by_tag)
{
    for (guint d = 0; d < disks->len; d++) {
        QmpDisk *disk = disks->pdata[d];

        for (guint i = 0; i < disk->bitmaps->len; i++) {
            const char *name = ((QmpBitmap *)disk->bitmaps->pdata[i])->name;
            const char *dash = strrchr(name, '-');
            g_autofree char *tag = NULL;

            if (!g_str_has_prefix(name, SINCE_PREFIX) ||
                dash <= name + strlen(SINCE_PREFIX)) {
                continue;
            }
            tag = g_strndup(name + strlen(SINCE_PREFIX),
                            dash - name - strlen(SINCE_PREFIX));
            g_ptr_array_add(leftover_of(by_tag, tag)->bitmaps,
                            g_strdup_printf("%s:%s", disk->id, name));
        }
    }
}

GPtrArray *backup_query_disks(QmpClient *qmp, char **nodes, GError **error)
{
    g_autoptr(GPtrArray) names = NULL;
    g_autoptr(GPtrArray) ids = NULL;
    g_autoptr(GError) err = NULL;
    GPtrArray *disks;

    if (!nodes) {
        return qmp_query_disks(qmp, error);
    }
    names = g_ptr_array_new_with_free_func(g_free);
    ids = g_ptr_array_new_with_free_func(g_free);
    for (guint i = 0; nodes[i]; i++) {
        const char *eq = strchr(nodes[i], '=');

        g_ptr_array_add(names, eq ? g_strndup(nodes[i], eq - nodes[i])
                                  : g_strdup(nodes[i]));
        g_ptr_array_add(ids, g_strdup(eq ? eq + 1 : nodes[i]));
    }
    g_ptr_array_add(names, NULL);
    g_ptr_array_add(ids, NULL);
    disks = qmp_query_node_disks(qmp, (const char *const *)names->pdata,
                                 (const char *const *)ids->pdata, &err);
    if (!disks && g_error_matches(err, QMP_ERROR, QMP_ERROR_PROTOCOL)) {
        g_set_error(error, BACKUP_ERROR, BACKUP_ERROR_NOT_FOUND, "%s",
                    err->message); /* a node that isn't there */
        return NULL;
    }
    if (!disks) {
        g_propagate_error(error, g_steal_pointer(&err));
    }
    return disks;
}

static gint compare_tags(gconstpointer a, gconstpointer b)
{
    const BackupLeftover *x = *(BackupLeftover *const *)a;
    const BackupLeftover *y = *(BackupLeftover *const *)b;

    return strcmp(x->tag, y->tag);
}

GPtrArray *backup_find_leftovers(QmpClient *qmp, char **nodes, GError **error)
{
    g_autoptr(GHashTable) by_tag = g_hash_table_new_full(
        g_str_hash, g_str_equal, NULL, (GDestroyNotify)backup_leftover_free);
    g_autoptr(GPtrArray) disks = backup_query_disks(qmp, nodes, error);
    GPtrArray *list;
    GHashTableIter it;
    gpointer value;

    if (!disks || !find_marks(qmp, by_tag, error) ||
        !find_objects(qmp, by_tag, error)) {
        return NULL;
    }
    find_bitmaps(disks, by_tag);
    list = g_ptr_array_new_with_free_func((GDestroyNotify)backup_leftover_free);
    g_hash_table_iter_init(&it, by_tag);
    while (g_hash_table_iter_next(&it, NULL, &value)) {
        BackupLeftover *l = value;

        g_hash_table_iter_steal(&it);
        l->alive = l->pid > 0 && pull_alive(l->pid);
        /* a qbk-pull older than the marks: its nodes say it was killed
         * before it committed (they go before the manifest is written) */
        if (l->marks->len == 0 && l->objects->len > 0) {
            l->at_work = true;
        }
        g_ptr_array_add(list, l);
    }
    g_ptr_array_sort(list, compare_tags);
    return list;
}

/* ---- undoing them ---- */

bool undo_checkpoint(QmpClient *qmp, char **nodes, const char *name,
                     GPtrArray *since, GError **error)
{
    g_autoptr(GPtrArray) disks = backup_query_disks(qmp, nodes, error);
    g_autoptr(GPtrArray) cps = NULL;

    if (!disks) {
        return false;
    }
    if (since && since->len &&
        bitmap_drop_since(qmp, disks, since, error) < 0) {
        return false;
    }
    cps = bitmap_list_checkpoints(disks);
    if (name && bitmap_find_checkpoint(cps, name)) {
        /* merged into its predecessor: the next incremental sees every
         * write since the last good backup */
        return bitmap_delete_checkpoint(qmp, disks, name, error);
    }
    return true;
}

bool backup_undo_leftover(QmpClient *qmp, char **nodes, const BackupLeftover *l,
                          bool committed, GError **error)
{
    g_autoptr(GPtrArray) since = g_ptr_array_new_with_free_func(g_free);
    bool quit = false;

    /* a frozen guest is an outage: first */
    if (l->agent && !quiesce_thaw_leftover(qmp, l->agent, error)) {
        return false;
    }
    if (!fleece_cleanup_tag(qmp, l->tag, error)) {
        return false;
    }
    if (l->paused) {
        g_autofree char *st = qmp_query_status(qmp, NULL, NULL);

        if (g_strcmp0(st, "paused") == 0 &&
            !qmp_run(qmp, "cont", NULL, error)) {
            g_prefix_error(error, "cannot resume the VM: ");
            return false;
        }
    }
    if (l->server) {
        /* its exports are gone; the server was ours (its socket went with
         * the dead qbk-pull's private directory) */
        qmp_run(qmp, "nbd-server-stop", NULL, NULL);
    }
    for (guint i = 0; i < l->bitmaps->len; i++) {
        const char *colon = strchr(l->bitmaps->pdata[i], ':');

        if (!g_ptr_array_find_with_equal_func(since, colon + 1, g_str_equal,
                                              NULL)) {
            g_ptr_array_add(since, g_strdup(colon + 1));
        }
    }
    if (!undo_checkpoint(qmp, nodes, l->at_work && !committed ? l->tag : NULL,
                         since, error)) {
        return false;
    }
    if (l->shutdown_action &&
        !power_release_leftover(qmp, l->shutdown_action, &quit, error)) {
        return false;
    }
    /* the marks go last: an undo cut short is done again next time */
    for (guint i = 0; i < l->marks->len; i++) {
        if (!object_del(qmp, l->marks->pdata[i], error)) {
            return false;
        }
    }
    /* the guest powered off while the backup held it */
    power_carry_out(qmp, quit);
    return true;
}
