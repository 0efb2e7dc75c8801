/*
 * qbk-qmp: run one QMP command (or an HMP command line) against a VM and
 * print QEMU's answer as JSON. For scripts and tests that need to look at or
 * poke QEMU directly, e.g. to read a bitmap's hash.
 */
#include <stdio.h>
#include <string.h>

#include "cmd-common.h"

static gboolean opt_hmp;
static char *opt_wait_event;
static char *opt_agent;

static GOptionEntry entries[] = {
    { "hmp", 0, 0, G_OPTION_ARG_NONE, &opt_hmp,
      "COMMAND is an HMP command line; print its output as text", NULL },
    { "wait-event", 'w', 0, G_OPTION_ARG_STRING, &opt_wait_event,
      "after the command, wait for this event and print it", "EVENT" },
    { "agent", 'a', 0, G_OPTION_ARG_FILENAME, &opt_agent,
      "COMMAND goes to the guest agent on this socket (the host side of "
      "its virtio-serial port), not to QEMU",
      "SOCKET" },
    { NULL },
};

static const CmdSpec spec = {
    .name = "qbk-qmp",
    .parameters = "COMMAND [ARGUMENTS-JSON] - talk to QEMU",
    .summary = NULL,
    .description =
        "Examples:\n"
        "  qbk-qmp --qmp vm.sock query-block\n"
        "  qbk-qmp --qmp vm.sock x-debug-block-dirty-bitmap-sha256 \\\n"
        "      '{\"node\": \"disk0-fmt\", \"name\": \"qbk-000001-mon\"}'\n"
        "  qbk-qmp --qmp vm.sock --hmp 'info block'\n"
        "  qbk-qmp --agent vm-ga.sock guest-fsfreeze-status\n",
    .entries = entries,
    .common = CMD_OPT_QMP,
};

int main(int argc, char **argv)
{
    g_autoptr(GError) error = NULL;
    g_autoptr(QmpClient) qmp = NULL;
    json_object *args = NULL;
    json_object *ret;

    int rc = cmd_parse(&spec, &argc, &argv);

    if (rc >= 0) {
        return rc;
    }
    if (argc < 2 || argc > 3 || !(cmd_common.qmp || opt_agent)) {
        return cmd_usage("give --qmp SOCKET (or --agent SOCKET) and one "
                         "COMMAND");
    }
    if (opt_agent && (opt_hmp || opt_wait_event)) {
        return cmd_usage("a guest agent has no HMP and no events");
    }
    if (argc == 3) {
        if (opt_hmp) {
            cmd_error("--hmp takes one command line");
            return QBK_EXIT_USAGE;
        }
        args = json_tokener_parse(argv[2]);
        if (!args || !json_object_is_type(args, json_type_object)) {
            cmd_error("ARGUMENTS must be a JSON object: %s", argv[2]);
            json_object_put(args);
            return QBK_EXIT_USAGE;
        }
    }
    qmp = opt_agent ? qmp_connect_agent(opt_agent, cmd_common.timeout_s * 1000,
                                        &error)
                    : cmd_qmp_connect(cmd_common.qmp,
                                      cmd_common.timeout_s * 1000, &error);
    if (!qmp) {
        cmd_error("%s", error->message);
        return QBK_EXIT_FAILURE;
    }
    if (opt_hmp) {
        g_autofree char *out = qmp_hmp(qmp, argv[1], &error);

        if (!out) {
            cmd_error("%s", error->message);
            return QBK_EXIT_FAILURE;
        }
        fputs(out, stdout);
        return QBK_EXIT_OK;
    }
    ret = qmp_execute(qmp, argv[1], args, &error);
    if (!ret) {
        cmd_error("%s: %s: %s", argv[1],
                  qmp_error_class(error) ? qmp_error_class(error) : "error",
                  error->message);
        return QBK_EXIT_FAILURE;
    }
    if (opt_wait_event) {
        json_object *event =
            qmp_wait_event(qmp, opt_wait_event, NULL, NULL,
                           cmd_common.timeout_s * 1000, &error);

        if (!event) {
            json_object_put(ret);
            cmd_error("%s", error->message);
            return QBK_EXIT_FAILURE;
        }
        json_object_put(ret);
        ret = event;
    }
    cmd_print_json(ret);
    return QBK_EXIT_OK;
}
