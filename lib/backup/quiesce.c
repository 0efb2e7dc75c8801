/*
 * Application consistency: the guest's file systems frozen through its
 * agent (qemu-guest-agent) just around the point in time, and thawed
 * whatever happens.
 *
 * A frozen guest is an outage, so the freeze is as short as the fleece
 * point (one transaction, and for scheme B the filters' insertion), and
 * every way out thaws: success, failure, a signal (the fleece point is
 * synchronous: the thaw follows it). Against a kill, a mark in the VM
 * (qbk-f<pid>-<tag>, a secret holding the agent's address) tells the next
 * qbk command to thaw (backup_undo_leftover).
 */
#include <string.h>

#include "internal.h"

/* Reaching the agent: a guest that runs it answers in milliseconds. */
#define QUIESCE_CONNECT_MS 5000

struct Quiesce {
    BackupQuiesce mode;
    char **mounts;      /* only these; NULL: all */
    char *address;      /* the agent's */
    char *tag;          /* of the backup that froze (its mark's) */
    QmpClient *agent;   /* connected; NULL: crash-consistent only */
    char *why_not;      /* try: why the backup is crash-consistent */
    gint64 frozen_at;   /* monotonic, while frozen */
    bool frozen;        /* freeze sent (a late one may still act) */
    bool marked;        /* MARK_FROZEN is in the VM */
    int filesystems;    /* as the freeze reported */
    double freeze_ms;   /* from the freeze's start to the thaw's answer */
    double freezing_ms; /* of which the freeze itself (the guest's sync) */
};

const char *backup_quiesce_name(BackupQuiesce mode)
{
    static const char *const names[] = {
        [BACKUP_QUIESCE_OFF] = "off",
        [BACKUP_QUIESCE_TRY] = "try",
        [BACKUP_QUIESCE_REQUIRED] = "required",
    };

    return names[mode];
}

bool backup_quiesce_parse(const char *text, BackupQuiesce *mode)
{
    for (BackupQuiesce m = BACKUP_QUIESCE_OFF; m <= BACKUP_QUIESCE_REQUIRED;
         m++) {
        if (g_strcmp0(text, backup_quiesce_name(m)) == 0) {
            *mode = m;
            return true;
        }
    }
    return false;
}

void quiesce_free(Quiesce *q)
{
    if (!q) {
        return;
    }
    qmp_free(q->agent);
    g_strfreev(q->mounts);
    g_free(q->address);
    g_free(q->tag);
    g_free(q->why_not);
    g_free(q);
}

/* The address of the agent: as given, else as QEMU knows it. */
static char *agent_address(QmpClient *qmp, const char *given, GError **error)
{
    char *address = given ? g_strdup(given) : qmp_find_agent(qmp, error);

    if (!address) {
        g_prefix_error(error, "no guest agent to quiesce with: ");
    }
    return address;
}

Quiesce *quiesce_open(QmpClient *qmp, const BackupOptions *opts, GError **error)
{
    g_autoptr(GError) err = NULL;
    Quiesce *q;

    if (opts->quiesce == BACKUP_QUIESCE_OFF) {
        return NULL;
    }
    q = g_new0(Quiesce, 1);
    q->mode = opts->quiesce;
    q->mounts = g_strdupv(opts->quiesce_mounts);
    q->address = agent_address(qmp, opts->guest_agent, &err);
    if (q->address) {
        q->agent = qmp_connect_agent(q->address, QUIESCE_CONNECT_MS, &err);
    }
    if (q->agent) {
        /* the freeze flushes the guest's dirty data: QMP's patience */
        qmp_set_timeout(q->agent, opts->agent_timeout_ms
                                      ? opts->agent_timeout_ms
                                      : QMP_DEFAULT_TIMEOUT_MS);
        return q;
    }
    if (q->mode == BACKUP_QUIESCE_REQUIRED) {
        g_set_error(error, BACKUP_ERROR, BACKUP_ERROR_FAILED, "--quiesce: %s",
                    err->message);
        quiesce_free(q);
        return NULL;
    }
    q->why_not = g_strdup(err->message);
    return q;
}

/* Ask the agent to thaw; once more if it failed (a late freeze may have
 * come in between). */
static bool thaw(Quiesce *q, GError **error)
{
    g_autoptr(GError) first = NULL;
    json_object *ret =
        qmp_execute(q->agent, "guest-fsfreeze-thaw", NULL, &first);

    if (!ret) {
        ret = qmp_execute(q->agent, "guest-fsfreeze-thaw", NULL, error);
    }
    json_object_put(ret);
    return ret != NULL;
}

/* guest-fsfreeze-freeze-list's arguments, or NULL for all. */
static json_object *freeze_args(const Quiesce *q)
{
    json_object *args, *list;

    if (!q->mounts) {
        return NULL;
    }
    args = json_object_new_object();
    list = json_object_new_array();
    for (guint i = 0; q->mounts[i]; i++) {
        json_object_array_add(list, json_object_new_string(q->mounts[i]));
    }
    json_object_object_add(args, "mountpoints", list);
    return args;
}

bool quiesce_freeze(Quiesce *q, QmpClient *qmp, const char *tag, GError **error)
{
    g_autoptr(GError) err = NULL;
    json_object *ret;

    if (!q || !q->agent) {
        return true;
    }
    /* whoever finds this mark after a kill thaws the guest */
    if (!mark_add(qmp, MARK_FROZEN, tag, q->address, error)) {
        return false;
    }
    q->marked = true;
    q->tag = g_strdup(tag);
    q->frozen = true;
    q->frozen_at = g_get_monotonic_time();
    ret = qmp_execute(q->agent,
                      q->mounts ? "guest-fsfreeze-freeze-list"
                                : "guest-fsfreeze-freeze",
                      freeze_args(q), &err);
    q->freezing_ms = (g_get_monotonic_time() - q->frozen_at) / 1e3;
    if (ret) {
        q->filesystems = json_object_get_int(ret);
        json_object_put(ret);
        backup_test_crash("frozen");
        /* the agent skips mount points the guest does not have */
        if (!q->mounts || q->filesystems >= (int)g_strv_length(q->mounts)) {
            return true;
        }
        g_set_error(&err, BACKUP_ERROR, BACKUP_ERROR_FAILED,
                    "it froze %d of the %u mount points asked for",
                    q->filesystems, g_strv_length(q->mounts));
    }
    /* a freeze that failed half-way (or answers late) leaves some file
     * systems frozen: thaw before anything else */
    quiesce_thaw(q, qmp, NULL);
    if (q->mode == BACKUP_QUIESCE_REQUIRED) {
        g_set_error(error, BACKUP_ERROR, BACKUP_ERROR_FAILED,
                    "the guest agent could not freeze the file systems: %s",
                    err->message);
        return false;
    }
    q->why_not = g_strdup_printf("the guest agent could not freeze the "
                                 "file systems: %s",
                                 err->message);
    qmp_free(g_steal_pointer(&q->agent));
    return true;
}

bool quiesce_thaw(Quiesce *q, QmpClient *qmp, GError **error)
{
    if (!q || !q->frozen) {
        return true;
    }
    if (!q->agent || !thaw(q, error)) {
        g_prefix_error(error,
                       "the guest's file systems may still be frozen (the "
                       "next qbk command thaws them; or run 'qbk-qmp --agent "
                       "%s guest-fsfreeze-thaw'): ",
                       q->address);
        return false; /* the mark stays */
    }
    q->frozen = false;
    q->freeze_ms = (g_get_monotonic_time() - q->frozen_at) / 1e3;
    if (q->marked && mark_del(qmp, MARK_FROZEN, q->tag, NULL)) {
        q->marked = false;
    }
    /* the agent serves one client: let others in for the copy */
    g_clear_pointer(&q->agent, qmp_free);
    return true;
}

void quiesce_report(const Quiesce *q, json_object *manifest)
{
    json_object *o;

    if (!q) {
        qmp_json_set_string(manifest, "consistency", "crash");
        return;
    }
    o = json_object_new_object();
    qmp_json_set_string(o, "mode", backup_quiesce_name(q->mode));
    qmp_json_set_string(o, "agent", q->address);
    if (q->why_not) {
        qmp_json_set_string(o, "skipped", q->why_not);
    } else {
        qmp_json_set_int(o, "filesystems", q->filesystems);
        qmp_json_set_double(o, "freezing_ms", q->freezing_ms);
        qmp_json_set_double(o, "frozen_ms", q->freeze_ms);
    }
    qmp_json_set_string(manifest, "consistency",
                        q->why_not ? "crash" : "application");
    json_object_object_add(manifest, "quiesce", o);
}

bool quiesce_thaw_leftover(QmpClient *qmp, const char *address, GError **error)
{
    g_autoptr(QmpClient) agent = NULL;
    g_autoptr(GError) err = NULL;
    json_object *status;
    bool frozen;

    agent = qmp_connect_agent(address, QUIESCE_CONNECT_MS, &err);
    if (!agent) {
        g_set_error(error, BACKUP_ERROR, BACKUP_ERROR_FAILED,
                    "a killed backup froze the guest's file systems, and "
                    "they cannot be thawed: %s",
                    err->message);
        return false;
    }
    status = qmp_execute(agent, "guest-fsfreeze-status", NULL, error);
    if (!status) {
        return false;
    }
    frozen = g_strcmp0(json_object_get_string(status), "frozen") == 0;
    json_object_put(status);
    if (frozen) {
        json_object *ret =
            qmp_execute(agent, "guest-fsfreeze-thaw", NULL, error);

        json_object_put(ret);
        if (!ret) {
            g_prefix_error(error, "cannot thaw the guest's file systems: ");
            return false;
        }
    }
    return true;
}
