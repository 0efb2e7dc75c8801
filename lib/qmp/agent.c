/*
 * Where a VM's guest agent listens, asked of QEMU: the virtio-serial port
 * named org.qemu.guest_agent.0 and the socket of its character device.
 */
#include <string.h>

#include "internal.h"

#define AGENT_PORT_NAME "org.qemu.guest_agent.0"

/* The chardev of the agent's port among the devices under PARENT. */
static char *agent_chardev_under(QmpClient *qmp, const char *parent)
{
    json_object *args = json_object_new_object();
    json_object *list;
    char *chardev = NULL;

    qmp_json_set_string(args, "path", parent);
    list = qmp_execute(qmp, "qom-list", args, NULL);
    for (size_t i = 0; !chardev && i < qmp_json_length(list); i++) {
        json_object *e = qmp_json_index(list, i);
        const char *type = qmp_json_string(e, "type");
        g_autofree char *path = NULL;
        g_autofree char *name = NULL;

        if (g_strcmp0(type, "child<virtserialport>") != 0) {
            continue;
        }
        path = g_strdup_printf("%s/%s", parent, qmp_json_string(e, "name"));
        name = qmp_qom_get_string(qmp, path, "name");
        if (g_strcmp0(name, AGENT_PORT_NAME) == 0) {
            chardev = qmp_qom_get_string(qmp, path, "chardev");
        }
    }
    json_object_put(list);
    return chardev;
}

/* The address to reach a socket chardev of FILENAME: "unix:PATH" (an
 * absolute PATH) or "tcp:HOST:PORT"; NULL for anything else. */
static char *socket_address(const char *filename)
{
    const char *p = filename;
    const char *end;

    if (g_str_has_prefix(p, "disconnected:")) {
        p += strlen("disconnected:");
    }
    /* a relative unix path is QEMU's, not ours */
    if (!g_str_has_prefix(p, "tcp:") &&
        !(g_str_has_prefix(p, "unix:") && p[strlen("unix:")] == '/')) {
        return NULL;
    }
    end = strchr(p, ',');
    return g_strndup(p, end ? (gsize)(end - p) : strlen(p));
}

char *qmp_find_agent(QmpClient *qmp, GError **error)
{
    g_autofree char *chardev = agent_chardev_under(qmp, "/machine/peripheral");
    json_object *list;
    char *address = NULL;

    if (!chardev) {
        chardev = agent_chardev_under(qmp, "/machine/peripheral-anon");
    }
    if (!chardev) {
        g_set_error(error, QMP_ERROR, QMP_ERROR_CONNECT,
                    "the VM has no guest agent channel (a virtserialport "
                    "named " AGENT_PORT_NAME ")");
        return NULL;
    }
    list = qmp_execute(qmp, "query-chardev", NULL, error);
    if (!list) {
        return NULL;
    }
    for (size_t i = 0; !address && i < qmp_json_length(list); i++) {
        json_object *c = qmp_json_index(list, i);
        const char *filename = qmp_json_string(c, "filename");

        if (g_strcmp0(qmp_json_string(c, "label"), chardev) == 0 && filename) {
            address = socket_address(filename);
            if (!address) {
                g_set_error(error, QMP_ERROR, QMP_ERROR_CONNECT,
                            "the guest agent's channel '%s' is neither a "
                            "unix socket with an absolute path nor a TCP "
                            "socket (%s): give its address",
                            chardev, filename);
            }
        }
    }
    json_object_put(list);
    if (!address && error && !*error) {
        g_set_error(error, QMP_ERROR, QMP_ERROR_CONNECT,
                    "the guest agent's channel '%s' is not among QEMU's "
                    "character devices",
                    chardev);
    }
    return address;
}
