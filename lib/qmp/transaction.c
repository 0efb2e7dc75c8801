/*
 * QMP "transaction": a list of actions that QEMU applies atomically, in
 * one drained section, or not at all.
 */
#include "qmp.h"

struct QmpTransaction {
    json_object *actions; /* array of {type, data}, owned */
};

QmpTransaction *qmp_transaction_new(void)
{
    QmpTransaction *tx = g_new0(QmpTransaction, 1);

    tx->actions = json_object_new_array();
    return tx;
}

void qmp_transaction_free(QmpTransaction *tx)
{
    if (tx) {
        json_object_put(tx->actions);
        g_free(tx);
    }
}

void qmp_transaction_add(QmpTransaction *tx, const char *type,
                         json_object *data)
{
    json_object *action = json_object_new_object();

    qmp_json_set_string(action, "type", type);
    json_object_object_add(action, "data",
                           data ? data : json_object_new_object());
    json_object_array_add(tx->actions, action);
}

guint qmp_transaction_length(const QmpTransaction *tx)
{
    return json_object_array_length(tx->actions);
}

json_object *qmp_transaction_actions(const QmpTransaction *tx)
{
    return tx->actions;
}

bool qmp_transaction_run(QmpClient *qmp, QmpTransaction *tx, GError **error)
{
    json_object *args;

    if (qmp_transaction_length(tx) == 0) {
        return true;
    }
    args = json_object_new_object();
    json_object_object_add(args, "actions", json_object_get(tx->actions));
    return qmp_run(qmp, "transaction", args, error);
}
