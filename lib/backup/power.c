/*
 * A guest that powers off in the middle of a backup must not take the
 * backup with it: while a backup holds the VM, QEMU's shutdown action is
 * "pause" (set-action, QEMU >= 6.0), so a guest poweroff stops the vCPUs
 * and leaves the disks to the copy. Afterwards the action is put back and,
 * if the guest did power off, carried out as QEMU would have: "quit" for
 * poweroff, nothing for pause. A reboot needs nothing: QEMU resets the
 * guest in place (with -no-reboot it is a shutdown, as above).
 *
 * QEMU cannot tell its current action, so the caller says what it is
 * (BackupOptions.shutdown_action: poweroff, QEMU's default, or pause, what
 * -no-shutdown gives). A mark (qbk-s<pid>-<tag>, holding that action) lets
 * the next run put it back after a kill.
 */
#include <string.h>

#include "internal.h"

/* set-action came with QEMU 6.0 */
#define SET_ACTION_SINCE 600

static bool set_shutdown_action(QmpClient *qmp, const char *action,
                                GError **error)
{
    json_object *args = json_object_new_object();

    qmp_json_set_string(args, "shutdown", action);
    return qmp_run(qmp, "set-action", args, error);
}

/* ACTION back as QEMU's shutdown action. */
static bool restore_action(QmpClient *qmp, const char *action, GError **error)
{
    if (!set_shutdown_action(qmp, action, error)) {
        g_prefix_error(error,
                       "cannot put the shutdown action back to '%s': ", action);
        return false;
    }
    return true;
}

static bool shut_down(QmpClient *qmp)
{
    g_autofree char *st = qmp_query_status(qmp, NULL, NULL);

    return g_strcmp0(st, "shutdown") == 0;
}

bool power_hold(PowerHold *h, QmpClient *qmp, const BackupOptions *opts,
                const char *tag, GError **error)
{
    g_autofree char *st = NULL;
    int major, minor;

    *h = (PowerHold){ .action = opts->shutdown_action };
    if (g_strcmp0(h->action, "pause") == 0) {
        return true; /* already what a backup needs */
    }
    qmp_get_version(qmp, &major, &minor, NULL);
    if (major * 100 + minor < SET_ACTION_SINCE) {
        return true; /* no set-action */
    }
    /* a storage daemon has no run state, hence no guest; a guest that is
     * shut down already cannot power off */
    st = qmp_query_status(qmp, NULL, NULL);
    if (!st || strcmp(st, "shutdown") == 0) {
        return true;
    }
    if (!mark_add(qmp, MARK_SHUTDOWN, tag, h->action, error)) {
        return false;
    }
    h->tag = g_strdup(tag);
    if (!set_shutdown_action(qmp, "pause", error)) {
        g_prefix_error(error, "cannot hold the guest's poweroff: ");
        mark_del(qmp, MARK_SHUTDOWN, tag, NULL);
        g_clear_pointer(&h->tag, g_free);
        return false;
    }
    h->held = true;
    return true;
}

bool power_release(PowerHold *h, QmpClient *qmp, bool *off, GError **error)
{
    *off = false;
    if (!h->held) {
        g_clear_pointer(&h->tag, g_free);
        return true;
    }
    *off = shut_down(qmp);
    if (!restore_action(qmp, h->action, error)) {
        return false; /* the mark stays: the next run puts it back */
    }
    h->held = false;
    mark_del(qmp, MARK_SHUTDOWN, h->tag, NULL);
    g_clear_pointer(&h->tag, g_free);
    return true;
}

void power_carry_out(QmpClient *qmp, bool off)
{
    if (off) {
        /* what QEMU would have done when the guest powered off */
        qmp_run(qmp, "quit", NULL, NULL);
    }
}

bool power_release_leftover(QmpClient *qmp, const char *action, bool *quit,
                            GError **error)
{
    *quit = shut_down(qmp) && g_strcmp0(action, "poweroff") == 0;
    return restore_action(qmp, action, error);
}
